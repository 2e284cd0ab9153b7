//! Request extractors whose rejections are [`crate::errors::ApiError`]s.

pub mod api_key;
pub mod json;

pub use api_key::{AdminKey, ApiKey};
pub use json::JsonBody;
