//! Queue consumers.

pub mod generation;
