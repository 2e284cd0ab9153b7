//! Server-side pieces of the dashboard's pages that are easier to build in Rust than in a
//! template.

pub mod chart;
