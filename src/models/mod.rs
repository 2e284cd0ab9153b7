//! Domain logic over the generated entities in `_entities/`.

pub mod _entities;
pub mod adapters;
pub mod admin_sessions;
pub mod admins;
pub mod api_keys;
pub mod budgets;
pub mod conversations;
pub mod jobs;
pub mod model_configs;
pub mod model_placements;
pub mod usage_records;
pub mod users;
pub mod workers;

/// Failures of model operations that are not plain database errors.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("database: {0}")]
    Db(#[from] sea_orm::DbErr),
    #[error("{0}")]
    Invalid(String),
    #[error("not found: {0}")]
    NotFound(String),
    /// The row would duplicate a unique value (e.g. a username).
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("password hashing: {0}")]
    Hash(String),
}

impl ModelError {
    /// `e` from updating a row read a moment before: when the row was gone by then (deleted by
    /// a concurrent request), `NotFound` with `what`, as if the lookup had missed it (a 404,
    /// not a 500); any other error as it is.
    pub fn gone_as(e: sea_orm::DbErr, what: impl FnOnce() -> String) -> Self {
        match e {
            sea_orm::DbErr::RecordNotUpdated => Self::NotFound(what()),
            other => Self::Db(other),
        }
    }
}

/// Current time as stored in every timestamp column: UTC with a `+00:00` offset, so that SQLite's
/// text comparison of timestamps orders them correctly.
#[must_use]
pub fn now() -> sea_orm::prelude::DateTimeWithTimeZone {
    chrono::Utc::now().fixed_offset()
}

#[cfg(test)]
mod tests {
    use super::ModelError;

    #[test]
    fn a_row_gone_before_its_update_is_not_found_and_other_errors_stay() {
        let gone = ModelError::gone_as(sea_orm::DbErr::RecordNotUpdated, || "no user \"a\"".into());
        assert!(
            matches!(gone, ModelError::NotFound(ref m) if m == "no user \"a\""),
            "{gone:?}"
        );
        let other = ModelError::gone_as(sea_orm::DbErr::Custom("disk".into()), String::new);
        assert!(matches!(other, ModelError::Db(_)), "{other:?}");
    }
}
