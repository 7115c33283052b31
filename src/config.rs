//! The command line: the subcommands, and the configuration from environment variables (or the
//! matching flags), gathered from each feature's own settings. Every variable is in `.env.example`.

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

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

impl Cli {
    /// The command line as the binary reads it: variables from `./.env` where the environment
    /// does not set them, flags before or after the subcommand, and an error that names the
    /// variable as well as the flag. Exits (as clap does) on `--help`, `--version` or an error.
    pub fn from_env_and_args() -> Cli {
        if let Err(error) = load_dot_env() {
            eprintln!("replisync: {error}");
            std::process::exit(2);
        }
        Cli::parse_args(std::env::args_os()).unwrap_or_else(|error| error.exit())
    }

    /// `args` (the program name first) parsed with every flag allowed after the subcommand too.
    pub fn parse_args(
        args: impl IntoIterator<Item = impl Into<std::ffi::OsString> + Clone>,
    ) -> Result<Cli, clap::Error> {
        let mut command = Cli::command().mut_args(|arg| arg.global(true));
        let matches = command
            .try_get_matches_from_mut(args)
            .map_err(|error| naming_the_variable(error, &command))?;
        Cli::from_arg_matches(&matches).map_err(|error| error.format(&mut command))
    }
}

/// Sets the variables of `./.env` that the environment does not set already. A missing file is
/// fine; one that cannot be read or parsed stops start-up, naming the file and the line.
fn load_dot_env() -> Result<(), String> {
    match dotenvy::from_filename(".env") {
        Ok(_) => Ok(()),
        Err(dotenvy::Error::Io(error)) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(error) => Err(format!(
            "cannot read ./.env: {error} (fix the file, or remove it and set the variables in the environment)"
        )),
    }
}

/// A bad value's error names the environment variable it may have come from, not only the flag.
fn naming_the_variable(error: clap::Error, command: &clap::Command) -> clap::Error {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    if !matches!(
        error.kind(),
        ErrorKind::ValueValidation | ErrorKind::InvalidValue
    ) {
        return error;
    }
    let Some(ContextValue::String(flag)) = error.get(ContextKind::InvalidArg) else {
        return error;
    };
    let long = flag
        .trim_start_matches("--")
        .split([' ', '='])
        .next()
        .unwrap_or_default();
    let variable = command
        .get_arguments()
        .find(|arg| arg.get_long() == Some(long))
        .and_then(clap::Arg::get_env)
        .map(|name| name.to_string_lossy().into_owned());
    let Some(variable) = variable else {
        return error;
    };
    let mut message = error.render().to_string();
    let first_line_end = message.find('\n').unwrap_or(message.len());
    message.insert_str(
        first_line_end,
        &format!(" (set by {variable}, or by the flag)"),
    );
    clap::Error::raw(error.kind(), message.trim_start_matches("error: "))
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

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::Cli;

    /// Every variable `--help` names, with the text of the files that must document it.
    fn variables_missing_from(text: &str) -> Vec<String> {
        Cli::command()
            .get_arguments()
            .filter_map(|arg| arg.get_env())
            .map(|name| name.to_string_lossy().into_owned())
            .filter(|name| !text.contains(name.as_str()))
            .collect()
    }

    fn read(path: &std::path::Path) -> String {
        std::fs::read_to_string(path).expect("the file exists")
    }

    #[test]
    fn every_variable_is_in_env_example_and_the_docs() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let example = read(&root.join(".env.example"));
        assert_eq!(variables_missing_from(&example), Vec::<String>::new());
        let pages = std::fs::read_dir(root.join("docs")).expect("docs/ exists");
        let docs: String = pages
            .map(|page| page.expect("a readable entry").path())
            .filter(|path| path.extension().is_some_and(|ext| ext == "md"))
            .map(|path| read(&path))
            .collect();
        assert_eq!(variables_missing_from(&docs), Vec::<String>::new());
    }
}
