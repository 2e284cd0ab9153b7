//! HTTP routes, one module per route family. Every handler is a thin adapter: a caller
//! extractor decides who calls and whether they may, the body becomes one domain type, and
//! [`crate::admission`] admits it; [`respond`] shapes the answers they share.

pub mod admin;
pub mod compat;
pub mod dashboard;
pub mod native;
pub mod openai;
pub mod openapi;
pub mod ping;
pub mod respond;
pub mod tool_calls;
