//! The real binary, as an operator runs it: each module below starts `replisync` as a child
//! process with an empty environment in a fresh directory, and checks what it does and says.

mod access_log;
mod configuration;
mod harness;
mod json_logs;
mod metrics;
mod pusher_double;
mod refusals;
mod serving;
mod shutdown;
mod socketio;
mod start_up;
mod subcommands;
mod traces;
mod transfer;
