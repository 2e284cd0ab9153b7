//! LoRA heads: the list with where each is loaded, registering one, removing one.

use axum::{
    extract::{Path, State},
    http::StatusCode,
    response::IntoResponse,
};
use loco_rs::{
    app::AppContext,
    controller::views::{engines::TeraView, ViewEngine},
};
use serde_json::{json, Map, Value};

use super::{internal, not_found_page, render, see_other, AdminForm, Fields, PageResult, SignedIn};
// The admin API's rules for adapters; the dashboard is another front for them.
use crate::controllers::admin::adapters as api;
use crate::{errors::ErrorCode, models::adapters, services::Services};

pub(super) async fn page(
    State(ctx): State<AppContext>,
    admin: SignedIn,
    ViewEngine(v): ViewEngine<TeraView>,
) -> PageResult {
    view(
        &ctx,
        &admin,
        &v,
        StatusCode::OK,
        &Fields::new(),
        &Map::new(),
    )
    .await
}

/// The page, with the register form's values and errors.
async fn view(
    ctx: &AppContext,
    admin: &SignedIn,
    v: &TeraView,
    status: StatusCode,
    form: &Fields,
    errors: &Map<String, Value>,
) -> PageResult {
    let services = Services::from_ctx(ctx).map_err(IntoResponse::into_response)?;
    let holders = services.models.adapter_holders().await;
    let rows: Vec<Value> = adapters::Model::list(&ctx.db)
        .await
        .map_err(internal)?
        .iter()
        .map(|a| {
            json!({
                "name": a.name,
                "model": format!("{}:{}", a.base_model, a.name),
                "file": a.file,
                "default_scale": a.default_scale,
                "loaded_on": api::loaded_on(&holders, &a.name),
            })
        })
        .collect();
    render(
        v,
        status,
        "dashboard/adapters.html",
        &admin.page(json!({
            "adapters": rows,
            "adapters_dir": services.settings.engine.adapters_dir.display().to_string(),
            "form": form,
            "errors": errors,
        })),
    )
}

/// The page again (422) with the form as sent and `message` next to `field`.
async fn form_error(
    ctx: &AppContext,
    admin: &SignedIn,
    v: &TeraView,
    fields: &Fields,
    field: &str,
    message: impl Into<Value>,
) -> PageResult {
    let mut errors = Map::new();
    errors.insert(field.into(), message.into());
    view(
        ctx,
        admin,
        v,
        StatusCode::UNPROCESSABLE_ENTITY,
        fields,
        &errors,
    )
    .await
}

pub(super) async fn register(
    State(ctx): State<AppContext>,
    ViewEngine(v): ViewEngine<TeraView>,
    AdminForm { admin, fields }: AdminForm,
) -> PageResult {
    let services = Services::from_ctx(&ctx).map_err(IntoResponse::into_response)?;
    let field = |n: &str| fields.get(n).map_or("", String::as_str);
    let scale = match field("scale").trim() {
        "" => None,
        raw => match raw.parse::<f64>() {
            Ok(x) => Some(x),
            Err(_) => {
                return form_error(&ctx, &admin, &v, &fields, "scale", "A number from 0 to 4.")
                    .await
            }
        },
    };
    match api::register(&ctx, &services, field("name"), field("path"), scale, None).await {
        Ok(a) => {
            tracing::info!(adapter = %a.name, admin = %admin.admin.email, "LoRA head registered from the dashboard");
            Ok(see_other("/admin/adapters"))
        }
        Err(e) if e.status().is_client_error() => {
            let target = match e.code {
                ErrorCode::InvalidAdapterName | ErrorCode::AdapterExists => "name",
                ErrorCode::InvalidScale => "scale",
                _ => "path",
            };
            form_error(&ctx, &admin, &v, &fields, target, e.message).await
        }
        Err(e) => Err(internal(e.message)),
    }
}

pub(super) async fn remove(
    State(ctx): State<AppContext>,
    Path(name): Path<String>,
    AdminForm { admin, .. }: AdminForm,
) -> PageResult {
    match adapters::ActiveModel::remove(&ctx.db, &name)
        .await
        .map_err(internal)?
    {
        Some(_) => {
            tracing::info!(adapter = %name, admin = %admin.admin.email, "LoRA head removed from the dashboard");
            Ok(see_other("/admin/adapters"))
        }
        None => Err(not_found_page("No such LoRA head.")),
    }
}
