//! HTTP routes, one module per route family.

pub mod accounts;
pub mod adapters;
pub mod api;
pub mod dashboard;
pub mod embeddings;
pub mod llm;
pub mod openai;
pub mod ops;
pub mod ping;
pub mod queue_api;
pub mod usage;
