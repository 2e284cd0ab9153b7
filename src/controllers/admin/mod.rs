//! Routes for operators: LoRA head registrations ([`adapters`]) and the worker registry and
//! Prometheus metrics ([`ops`]). The dashboard ([`super::dashboard`]) drives the same
//! operations for people.

pub mod adapters;
pub mod ops;
