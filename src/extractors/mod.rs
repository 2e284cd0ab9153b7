//! Request extractors whose rejections are [`crate::errors::ApiError`]s: who calls
//! ([`Caller`] and its admin and metered forms), from where ([`ClientAddress`]) and the JSON body
//! ([`JsonBody`]).

pub mod caller;
pub mod client_address;
pub mod json;
pub mod known_keys;

pub use caller::{AdminCaller, Caller, MeteredCaller};
pub use client_address::ClientAddress;
pub use json::JsonBody;
pub use known_keys::KnownKeys;
