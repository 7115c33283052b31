//! The sync server's behaviour over HTTP, against each store: Postgres (a fresh schema per test
//! in TEST_DATABASE_URL, default postgres://postgres@127.0.0.1:5432/test) and SQLite (a fresh file).

mod auth;
mod bad_input;
mod clients_leave;
mod commit_batches;
mod compaction;
mod concurrency;
mod conflicts;
mod db_sessions;
mod faults;
mod gc;
mod group_commit;
mod harness;
mod js_contexts;
mod js_engine;
mod js_hostile;
mod js_mutators;
mod known_states;
mod large_deltas;
mod limits;
mod migrations;
mod observed;
mod protocol;
mod pull_faults;
mod push_limits;
mod read_batches;
mod rules;
mod schema_versions;
mod server_api;
mod slow_requests;
mod sql_functions;
mod sse;
mod stalled;
mod transfer;
