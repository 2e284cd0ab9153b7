//! Routes for operators: LoRA head registrations ([`adapters`]), the worker registry and
//! Prometheus metrics ([`ops`]), and seed 002's users ([`users`]). The dashboard ([`super::dashboard`]) drives the same
//! operations for people.

pub mod adapters;
pub mod ops;
pub mod users;
