//! Seed 002's routes: `POST /token` (username + password → bearer token), `POST
//! /db_request/add_user/` (admin), `POST /llm_request` (with optional server-side conversation
//! memory) and `GET /active_models/`. Spec: ../shared/seeds/002.
//!
//! A token is an ordinary API key linked to the user, so every other route accepts it too, and
//! every generation made with it is charged to the key and reserved against the user's token
//! budget (see `models::budgets`).

use std::time::Duration;

use axum::{
    body::Body,
    extract::{Request, State},
    http::header,
    response::{IntoResponse, Response},
    Json,
};
use loco_rs::{app::AppContext, controller::Routes};
use serde::Deserialize;
use serde_json::json;

use super::api::{accepted, settled, usage_json};
use crate::{
    engine::{ChatMessage, Prompt},
    errors::{ApiError, ApiResult},
    extractors::{AdminKey, ApiKey, JsonBody},
    models::{
        api_keys,
        conversations::{self, Owner},
        jobs,
        users::{self, Login, NewUser, Role},
        ModelError,
    },
    services::{Services, Submission},
    validation::{prompt_text, SamplingInput},
};

/// Longest a memory request keeps following a job that outlived the request's wait, so that
/// its exchange still lands in the conversation.
const REMEMBER_FOR: Duration = Duration::from_secs(3600);

#[derive(Debug, Deserialize)]
struct Credentials {
    username: Option<String>,
    password: Option<String>,
    /// OAuth2 password-flow clients (FastAPI's `OAuth2PasswordRequestForm`) send
    /// `grant_type=password`; other fields they send (`scope`, `client_id`) are ignored.
    grant_type: Option<String>,
}

/// The login body: JSON (the seed's documented request) or a form (OAuth2 clients).
async fn read_credentials(req: Request<Body>, limit: usize) -> ApiResult<Credentials> {
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    let is_form = content_type == "application/x-www-form-urlencoded";
    if !(is_form || content_type.is_empty() || content_type.ends_with("json")) {
        return Err(ApiError::bad_request(
            "unsupported_content_type",
            format!(
                "send the credentials as JSON or application/x-www-form-urlencoded, got {content_type}"
            ),
        ));
    }
    let bytes = axum::body::to_bytes(req.into_body(), limit)
        .await
        .map_err(|_| ApiError::payload_too_large(limit))?;
    let text = std::str::from_utf8(&bytes)
        .map_err(|_| ApiError::bad_request("invalid_body", "the body is not UTF-8"))?
        .trim();
    if text.is_empty() {
        return Err(ApiError::bad_request(
            "empty_body",
            "send {\"username\": …, \"password\": …}",
        ));
    }
    // `curl -d '{…}'` labels JSON as a form: a body that opens like JSON is read as JSON.
    if text.starts_with('{') || !is_form {
        let value: serde_json::Value = serde_json::from_str(text).map_err(|e| {
            ApiError::bad_request("invalid_json", format!("the body is not valid JSON: {e}"))
        })?;
        return serde_json::from_value(value)
            .map_err(|e| ApiError::unprocessable("invalid_body", format!("invalid request: {e}")));
    }
    serde_urlencoded::from_str(text)
        .map_err(|e| ApiError::unprocessable("invalid_body", format!("invalid form: {e}")))
}

/// `POST /token`: `{"username", "password"}` (JSON or form) → `{"username", "access_token",
/// "token_type": "bearer", "expires_in", "expires_at"}`.
#[tracing::instrument(skip_all)]
async fn token(State(ctx): State<AppContext>, req: Request<Body>) -> ApiResult<Response> {
    let services = Services::from_ctx(&ctx)?;
    let creds = read_credentials(req, services.settings.api.max_body_bytes).await?;
    if creds
        .grant_type
        .as_deref()
        .is_some_and(|g| !g.is_empty() && g != "password")
    {
        return Err(ApiError::bad_request(
            "unsupported_grant_type",
            "only grant_type=password is supported",
        ));
    }
    let (Some(username), Some(password)) =
        (creds.username.map(|u| u.trim().to_string()), creds.password)
    else {
        return Err(ApiError::unprocessable(
            "invalid_body",
            "`username` and `password` are required",
        ));
    };
    if username.is_empty() || password.is_empty() {
        return Err(ApiError::unprocessable(
            "invalid_body",
            "`username` and `password` must not be empty",
        ));
    }
    if let Err(wait) = services.logins.begin(&username) {
        return Err(ApiError::too_many_attempts(
            "too_many_login_attempts",
            format!(
                "too many failed logins for this username; try again in {} s",
                wait.as_secs().max(1)
            ),
            wait.as_secs() + 1,
        ));
    }
    let user = match users::authenticate(&ctx.db, &username, &password).await? {
        Login::Ok(user) => user,
        Login::Disabled(_) => {
            services.logins.succeeded(&username);
            return Err(ApiError::forbidden(
                "user_disabled",
                "this user is disabled",
            ));
        }
        Login::Invalid => {
            tracing::info!("failed login");
            return Err(ApiError::unauthorized(
                "invalid_credentials",
                "incorrect username or password",
            ));
        }
    };
    services.logins.succeeded(&username);
    let ttl = chrono::Duration::minutes(i64::from(services.settings.auth.token_ttl_minutes));
    let issued = users::issue_token(&ctx.db, &user, ttl).await?;
    tracing::info!(user_id = user.id, key = %issued.key.prefix, "login token issued");
    Ok(Json(json!({
        "username": user.username,
        "access_token": issued.secret,
        "token_type": "bearer",
        "expires_in": ttl.num_seconds(),
        "expires_at": issued.key.valid_until.map(|t| t.to_rfc3339()),
    }))
    .into_response())
}

#[derive(Debug, Deserialize)]
struct AddUser {
    username: String,
    password: String,
    /// Tokens already spent (users migrated from seed 002 keep their counters).
    prompt_token_number: Option<i64>,
    gen_token_number: Option<i64>,
    gen_token_limit: Option<i64>,
    prompt_token_limit: Option<i64>,
    /// Tollgate extension: `user` (default) or `admin`.
    role: Option<String>,
    /// Tollgate extension: create the user disabled.
    enabled: Option<bool>,
}

/// `POST /db_request/add_user/` (admin scope) → `{"status": "success", "message"}`.
#[tracing::instrument(skip_all, fields(api_key))]
async fn add_user(
    State(ctx): State<AppContext>,
    AdminKey(_admin): AdminKey,
    body: Result<JsonBody<AddUser>, ApiError>,
) -> ApiResult<Response> {
    let JsonBody(body) = body?;
    let invalid = |e: ModelError| ApiError::unprocessable("invalid_user", e.to_string());
    let role = body
        .role
        .as_deref()
        .map(Role::parse)
        .transpose()
        .map_err(invalid)?
        .unwrap_or_default();
    let created = users::ActiveModel::create(
        &ctx.db,
        NewUser {
            username: body.username,
            password: body.password,
            role,
            enabled: body.enabled.unwrap_or(true),
            prompt_token_limit: body.prompt_token_limit,
            gen_token_limit: body.gen_token_limit,
            prompt_tokens_used: body.prompt_token_number.unwrap_or(0),
            gen_tokens_used: body.gen_token_number.unwrap_or(0),
        },
    )
    .await;
    let user = match created {
        Ok(user) => user,
        Err(e @ ModelError::Invalid(_)) => return Err(invalid(e)),
        Err(ModelError::Conflict(message)) => {
            return Err(ApiError::conflict("user_exists", message))
        }
        Err(e) => return Err(e.into()),
    };
    tracing::info!(user_id = user.id, role = %user.role, "user added");
    Ok(Json(json!({
        "status": "success",
        "message": format!("user {} added", user.username),
    }))
    .into_response())
}

#[derive(Debug, Deserialize)]
struct LlmRequest {
    model: String,
    // `inference_endpoint` (seed 002: the vLLM server to call) is accepted and ignored, like
    // any other unknown field: Tollgate serves the model itself.
    prompt: String,
    memory: Option<bool>,
    conversation_number: Option<i64>,
    #[serde(flatten)]
    sampling: SamplingInput,
}

/// The caller's name in seed 002's answers: the key's user, or the key's own name.
async fn caller_name(db: &sea_orm::DatabaseConnection, key: &api_keys::Model) -> ApiResult<String> {
    Ok(match key.user_id {
        Some(id) => users::Model::find(db, id)
            .await?
            .map_or_else(|| key.name.clone(), |u| u.username),
        None => key.name.clone(),
    })
}

/// Appends the exchange once a job that outlived the request's wait settles (notification
/// first, the record as the fallback for workers in other processes).
fn remember_later(
    db: sea_orm::DatabaseConnection,
    services: &Services,
    job_id: String,
    memory: (Owner, i64),
    prompt: String,
) {
    let events = services.events.clone();
    tokio::spawn(async move {
        let mut done = events.subscribe(&job_id);
        let deadline = tokio::time::Instant::now() + REMEMBER_FOR;
        loop {
            match jobs::Model::find_any(&db, &job_id).await {
                Ok(Some(job)) if job.is_finished() => {
                    drop(done);
                    events.forget(&job_id);
                    if job.status == jobs::DONE {
                        let reply = job.result.unwrap_or_default();
                        if let Err(e) =
                            conversations::append(&db, memory.0, memory.1, &prompt, &reply, &job.id)
                                .await
                        {
                            tracing::error!(error = %e, "could not store the conversation turn");
                        }
                    }
                    return;
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "reading a job to remember it"),
            }
            if tokio::time::Instant::now() >= deadline {
                drop(done);
                events.forget(&job_id);
                return;
            }
            // Wakes at once on the notification, else re-reads the record every few seconds.
            if tokio::time::timeout(Duration::from_secs(5), &mut done)
                .await
                .is_ok()
            {
                done = events.subscribe(&job_id);
            }
        }
    });
}

/// `POST /llm_request` → `{"username", "data"}` (plus `job_id` and `usage`).
#[tracing::instrument(skip_all, fields(api_key))]
async fn llm_request(
    State(ctx): State<AppContext>,
    ApiKey(key): ApiKey,
    body: Result<JsonBody<LlmRequest>, ApiError>,
) -> ApiResult<Response> {
    let services = Services::from_ctx(&ctx)?;
    services.precheck(&key).await?;
    let JsonBody(body) = body?;
    // The served model or one started with `/vllm_request/start` (seed 002's engines).
    let resolved = services
        .resolve_model(
            &ctx.db,
            &key,
            crate::services::ModelChoice {
                model: Some(body.model.clone()),
                ..Default::default()
            },
        )
        .await?;
    let tokenizer = services.tokenizer_for(&resolved.model);
    prompt_text("prompt", &body.prompt)?;
    let memory = match (body.memory.unwrap_or(false), body.conversation_number) {
        (false, _) => None,
        (true, Some(n)) => Some((Owner::of(&key), n)),
        (true, None) => {
            return Err(ApiError::unprocessable(
                "conversation_number_required",
                "`conversation_number` is required when `memory` is true",
            ))
        }
    };
    let params = body.sampling.into_params(&services.settings.api)?;
    let message = ChatMessage {
        role: "user".into(),
        content: body.prompt.clone(),
    };
    let messages = match memory {
        None => vec![message],
        Some((owner, number)) => {
            let context = tokenizer.context_size();
            let history = conversations::recent(&ctx.db, owner, number, u64::from(context)).await?;
            let budget = context.saturating_sub(params.max_tokens) as usize;
            conversations::fit(history, message, budget, |chat| {
                tokenizer.count(&Prompt::Chat {
                    messages: chat.to_vec(),
                })
            })
            .map_err(|e| {
                ApiError::unprocessable("invalid_prompt", format!("prompt cannot be rendered: {e}"))
            })?
        }
    };
    let request = resolved.request(Prompt::Chat { messages }, params);
    let username = caller_name(&ctx.db, &key).await?;
    match services
        .submit_and_wait(&ctx.db, &key, "/llm_request", request, None)
        .await?
    {
        Submission::Pending(job) => {
            if let Some(memory) = memory {
                remember_later(
                    ctx.db.clone(),
                    &services,
                    job.id.clone(),
                    memory,
                    body.prompt,
                );
            }
            Ok(accepted(&job))
        }
        Submission::Finished(job) => {
            let job = settled(job)?;
            let reply = job.result.clone().unwrap_or_default();
            if let Some((owner, number)) = memory {
                // The answer was generated and charged: a storage failure is logged, not
                // turned into an error the client would retry (and pay for) again.
                if let Err(e) =
                    conversations::append(&ctx.db, owner, number, &body.prompt, &reply, &job.id)
                        .await
                {
                    tracing::error!(error = %e, "could not store the conversation turn");
                }
            }
            Ok(Json(json!({
                "username": username,
                "data": reply,
                "job_id": job.id,
                "usage": usage_json(&job),
            }))
            .into_response())
        }
    }
}

/// `GET /active_models/`: the models this server's worker has loaded, in seed 002's shape,
/// from what the engine reports (an engine that is not ready is not listed; with workers in
/// other processes this instance sees no engine and lists none).
#[tracing::instrument(skip_all, fields(api_key))]
async fn active_models(
    State(ctx): State<AppContext>,
    ApiKey(key): ApiKey,
    headers: axum::http::HeaderMap,
) -> ApiResult<Response> {
    let services = Services::from_ctx(&ctx)?;
    let caller = caller_name(&ctx.db, &key).await?;
    let endpoint = super::llm::openai_base_url(&headers);
    let entry = |container: Option<String>, status: crate::engine::EngineStatus| {
        json!({
            "engine_name": status.model,
            "container_id": container,
            "model_name": status.model,
            "quantized": status.quantized,
            "max_model_length": status.context_size,
            "seed": null,
            "inference_end_point": endpoint,
            "timestamp": status.loaded_at,
            // Models are shared by every user; the seed listed the caller's own engines.
            "user_id": caller,
            "device": status.device,
        })
    };
    let mut list: Vec<serde_json::Value> = services
        .engine_status()
        .filter(|status| status.ready)
        .map(|status| entry(services.worker_name.clone(), status))
        .into_iter()
        .collect();
    // Engines started with `/vllm_request/start` or `/llm/load_model`.
    list.extend(
        services
            .registry
            .all()
            .iter()
            .map(|m| (m.model_id.clone(), m.status()))
            .filter(|(_, status)| status.ready)
            .map(|(id, status)| entry(Some(id), status)),
    );
    // Worker processes elsewhere (production).
    list.extend(
        services
            .remote_workers(&ctx.db)
            .await
            .iter()
            .filter_map(|w| w.engine_status().map(|status| (w.id.clone(), status)))
            .filter(|(_, status)| status.ready)
            .map(|(id, status)| entry(Some(id), status)),
    );
    Ok(Json(list).into_response())
}

pub fn routes() -> Routes {
    Routes::new()
        // Trailing-slash forms (the seed's `/active_models/`, `/db_request/add_user/`) reach
        // these through `app::into_service`, which trims the slash before routing.
        .add("/token", axum::routing::post(token))
        .add("/db_request/add_user", axum::routing::post(add_user))
        .add("/llm_request", axum::routing::post(llm_request))
        .add("/active_models", axum::routing::get(active_models))
}
