//! The command line: the subcommands, and the configuration from environment variables (or the
//! matching flags), gathered from each feature's own settings. Every variable is in `.env.example`.

use clap::{Parser, Subcommand};

use crate::auth::settings::AuthArgs;
use crate::gc::settings::GcArgs;
use crate::http::settings::HttpArgs;
use crate::mutators::settings::MutatorArgs;
use crate::poke::settings::PokeArgs;
use crate::pull::settings::PullArgs;
use crate::push::settings::PushArgs;
use crate::store::settings::StoreArgs;

#[derive(Parser, Debug)]
#[command(
    name = "replisync",
    version,
    about = "A sync server for Replicache apps"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub config: Config,
}

#[derive(Subcommand, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Serve push, pull and pokes (the default).
    Serve,
    /// Apply database migrations and exit.
    Migrate,
    /// Run one garbage collection pass (forget client groups idle past REPLISYNC_CLIENT_TTL)
    /// and exit; does nothing when another instance is collecting.
    Gc,
    /// Ask the server on REPLISYNC_LISTEN's port (through 127.0.0.1 when it listens on every
    /// address) for `GET /healthz`; exit 0 on 200, 1 otherwise. For container health checks.
    Healthcheck,
}

/// Every feature's variables, each checked by its own module.
#[derive(Parser, Debug, Clone)]
pub struct Config {
    #[command(flatten)]
    pub store: StoreArgs,

    #[command(flatten)]
    pub http: HttpArgs,

    #[command(flatten)]
    pub push: PushArgs,

    #[command(flatten)]
    pub pull: PullArgs,

    #[command(flatten)]
    pub gc: GcArgs,

    /// `text` or `json` log lines. Levels come from RUST_LOG (default `info`).
    #[arg(long, env = "REPLISYNC_LOG_FORMAT", default_value = "text")]
    pub log_format: LogFormat,

    #[command(flatten)]
    pub auth: AuthArgs,

    #[command(flatten)]
    pub js: MutatorArgs,

    #[command(flatten)]
    pub pokes: PokeArgs,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Tests of a feature's settings: `args` (without the program name) parsed into that feature's
/// flattened arguments alone, with the same environment variables and defaults as the binary.
#[cfg(test)]
pub(crate) fn parse_feature_args<A: clap::Args + clap::FromArgMatches>(args: &[&str]) -> A {
    #[derive(Parser)]
    struct Only<A: clap::Args + clap::FromArgMatches> {
        #[command(flatten)]
        feature: A,
    }
    let argv = std::iter::once("replisync").chain(args.iter().copied());
    Only::<A>::try_parse_from(argv)
        .expect("valid arguments")
        .feature
}
