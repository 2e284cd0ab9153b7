//! The routes of the systems Tollgate replaces (../shared/seeds/) and of the servers its users
//! move from (llama.cpp's server), each in its own file, each a thin adapter: extract the
//! caller, convert the wire body into the one admission input, admit, shape the answer as that
//! system did. Seed 003's routes are Tollgate's own ([`super::native`]).

pub mod llama_server;
pub mod ollama;
pub mod seed000;
pub mod seed001;
pub mod seed002;
pub mod seed004;
