//! replisync: a sync server for Replicache apps. Push and pull (protocol version 1) on
//! Postgres or embedded SQLite, with per-space versions and pokes through Pusher or SSE.
// No unsafe code, but in the JavaScript engine's allocator (src/mutators/js/allocator.rs),
// the one place allowed it: QuickJS's allocator hook is an unsafe trait.
#![deny(unsafe_code)]

pub mod auth;
pub mod commands;
pub mod config;
pub mod error;
pub mod gc;
pub mod http;
pub mod logging;
pub mod metrics;
pub mod mutators;
pub mod poke;
pub mod protocol;
pub mod pull;
pub mod push;
pub mod rules;
pub mod server_api;
pub mod startup;
pub mod store;
pub mod traces;
pub mod transfer;
