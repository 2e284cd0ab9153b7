//! Request extractors whose rejections are [`crate::errors::ApiError`]s: who calls
//! ([`Caller`] and its admin and metered forms) and the JSON body ([`JsonBody`]).

pub mod caller;
pub mod json;

pub use caller::{AdminCaller, Caller, MeteredCaller};
pub use json::JsonBody;
