#![allow(elided_lifetimes_in_paths)]
#![allow(clippy::wildcard_imports)]
pub use sea_orm_migration::prelude::*;

mod m20261123_000001_foundation;
mod m20261123_000002_job_client_ref;
mod m20261123_000003_key_permissions;
mod m20261123_000004_adapters;
mod m20261123_000005_accounts;
mod m20261123_000006_model_configs;
mod m20261123_000007_admin_sessions;
mod m20261123_000008_workers;
mod m20261123_000009_key_priority;
mod m20261130_000010_job_status_index;
mod m20261130_000011_usage_input_words;
mod m20261130_000012_job_totals;
mod m20261130_000013_model_placements;
mod m20261130_000014_job_logprobs;
mod m20261130_000015_job_choices;
mod m20261130_000016_job_cached_tokens;
mod m20261130_000017_scale_indexes;
mod m20261201_000018_job_echo;

pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261123_000001_foundation::Migration),
            Box::new(m20261123_000002_job_client_ref::Migration),
            Box::new(m20261123_000003_key_permissions::Migration),
            Box::new(m20261123_000004_adapters::Migration),
            Box::new(m20261123_000005_accounts::Migration),
            Box::new(m20261123_000006_model_configs::Migration),
            Box::new(m20261123_000007_admin_sessions::Migration),
            Box::new(m20261123_000008_workers::Migration),
            Box::new(m20261123_000009_key_priority::Migration),
            Box::new(m20261130_000010_job_status_index::Migration),
            Box::new(m20261130_000011_usage_input_words::Migration),
            Box::new(m20261130_000012_job_totals::Migration),
            Box::new(m20261130_000013_model_placements::Migration),
            Box::new(m20261130_000014_job_logprobs::Migration),
            Box::new(m20261130_000015_job_choices::Migration),
            Box::new(m20261130_000016_job_cached_tokens::Migration),
            Box::new(m20261130_000017_scale_indexes::Migration),
            Box::new(m20261201_000018_job_echo::Migration),
        ]
    }
}
