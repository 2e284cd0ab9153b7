//! Tollgate: a self-hosted LLM API server. Keys with quotas and date windows, a durable job
//! queue, and one resident llama.cpp model per worker.

pub mod admission;
pub mod app;
pub mod controllers;
pub mod engine;
pub mod errors;
pub mod extractors;
pub mod metrics;
pub mod models;
pub mod notify;
pub mod openapi;
pub mod paths;
pub mod queue;
pub mod ratelimit;
pub mod request_id;
pub mod retention;
pub mod services;
pub mod serving;
pub mod settings;
pub mod setup_link;
pub mod sqlite;
pub mod tasks;
pub mod throttle;
pub mod views;
pub mod workers;
