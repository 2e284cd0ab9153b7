//! Queue consumers and their heartbeat.

pub mod generation;
pub mod heartbeat;
