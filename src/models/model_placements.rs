//! Which models should be loaded on worker processes (production), and who holds each.
//!
//! An API instance has no engine in production, so `load_model`/`unload_model` record the
//! wish here; a worker process started with `accept_loads=true` claims a wanted model with one
//! conditional UPDATE (so exactly one worker takes it, and another takes over when the holder's
//! heartbeat stops), loads it and heartbeats it like any worker; the API sees it served once a
//! live worker lists it. An unload sets `desired = unloaded`; the holder stops serving it and
//! deletes the row.

use sea_orm::{
    entity::prelude::*,
    sea_query::{Expr, OnConflict},
    ActiveValue::Set,
    Condition,
};

pub use super::_entities::model_placements::{self, ActiveModel, Column, Entity, Model};
use super::{now, ModelError};

impl ActiveModelBehavior for ActiveModel {}

pub const LOADED: &str = "loaded";
pub const UNLOADED: &str = "unloaded";

/// Records that `model_id` should be served from configuration `config_id`. A row already
/// wanting it loaded is left as it is (an earlier error is cleared for a new attempt).
///
/// # Errors
/// On database errors.
pub async fn want_loaded<C: ConnectionTrait>(
    db: &C,
    model_id: &str,
    config_id: &str,
) -> Result<(), ModelError> {
    let ts = now();
    Entity::insert(ActiveModel {
        model_id: Set(model_id.to_string()),
        config_id: Set(config_id.to_string()),
        desired: Set(LOADED.to_string()),
        holder: Set(None),
        error: Set(None),
        created_at: Set(ts),
        updated_at: Set(ts),
    })
    .on_conflict(
        OnConflict::column(Column::ModelId)
            .update_columns([
                Column::ConfigId,
                Column::Desired,
                Column::Error,
                Column::UpdatedAt,
            ])
            .to_owned(),
    )
    .exec_without_returning(db)
    .await?;
    Ok(())
}

/// Records that `model_id` should no longer be served; `false` when no row wanted it.
///
/// # Errors
/// On database errors.
pub async fn want_unloaded<C: ConnectionTrait>(db: &C, model_id: &str) -> Result<bool, ModelError> {
    let res = Entity::update_many()
        .col_expr(Column::Desired, Expr::value(UNLOADED))
        .col_expr(Column::UpdatedAt, Expr::value(now()))
        .filter(Column::ModelId.eq(model_id))
        .exec(db)
        .await?;
    Ok(res.rows_affected > 0)
}

/// # Errors
/// On database errors.
pub async fn find<C: ConnectionTrait>(db: &C, model_id: &str) -> Result<Option<Model>, ModelError> {
    Ok(Entity::find_by_id(model_id.to_string()).one(db).await?)
}

/// Every placement, for workers to act on.
///
/// # Errors
/// On database errors.
pub async fn all<C: ConnectionTrait>(db: &C) -> Result<Vec<Model>, ModelError> {
    Ok(Entity::find().all(db).await?)
}

/// Takes `model_id` for worker `me` when nobody live holds it: unheld, or held by one of
/// `dead` (workers whose heartbeat stopped), and still wanted loaded without an error. `true`
/// when this worker now holds it.
///
/// # Errors
/// On database errors.
pub async fn claim<C: ConnectionTrait>(
    db: &C,
    model_id: &str,
    me: &str,
    dead: &[String],
) -> Result<bool, ModelError> {
    let mut free = Condition::any().add(Column::Holder.is_null());
    if !dead.is_empty() {
        free = free.add(Column::Holder.is_in(dead.iter().cloned()));
    }
    let res = Entity::update_many()
        .col_expr(Column::Holder, Expr::value(me))
        .col_expr(Column::UpdatedAt, Expr::value(now()))
        .filter(Column::ModelId.eq(model_id))
        .filter(Column::Desired.eq(LOADED))
        .filter(Column::Error.is_null())
        .filter(free)
        .exec(db)
        .await?;
    Ok(res.rows_affected > 0)
}

/// The holder could not load it: the row keeps the reason (the API reports it) and is free.
///
/// # Errors
/// On database errors.
pub async fn failed<C: ConnectionTrait>(
    db: &C,
    model_id: &str,
    me: &str,
    reason: &str,
) -> Result<(), ModelError> {
    Entity::update_many()
        .col_expr(Column::Holder, Expr::value(Option::<String>::None))
        .col_expr(Column::Error, Expr::value(reason))
        .col_expr(Column::UpdatedAt, Expr::value(now()))
        .filter(Column::ModelId.eq(model_id))
        .filter(Column::Holder.eq(me))
        .exec(db)
        .await?;
    Ok(())
}

/// The holder stopped serving an unwanted model: the row goes.
///
/// # Errors
/// On database errors.
pub async fn remove<C: ConnectionTrait>(db: &C, model_id: &str) -> Result<(), ModelError> {
    Entity::delete_many()
        .filter(Column::ModelId.eq(model_id))
        .filter(Column::Desired.eq(UNLOADED))
        .exec(db)
        .await?;
    Ok(())
}
