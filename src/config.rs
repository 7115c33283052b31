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
use crate::rules::settings::RulesArgs;
use crate::server_api::settings::ServerApiArgs;
use crate::store::settings::StoreArgs;
use crate::transfer::{ExportArgs, ImportArgs};

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

#[derive(Subcommand, Debug, Clone)]
pub enum Command {
    /// Serve push, pull and pokes (the default).
    Serve,
    /// Apply database migrations and exit.
    Migrate,
    /// Run one garbage collection pass (forget client groups idle past REPLISYNC_CLIENT_TTL)
    /// and exit; does nothing when another instance is collecting.
    Gc,
    /// Write spaces as NDJSON (entries and version, each space from one snapshot) to standard
    /// output or --output: a backup, or a move to another database (docs/export-import.md).
    Export(ExportArgs),
    /// Load spaces from an export (standard input or --input) into this database, all in one
    /// transaction; refused when a space exists already. Imported spaces get a new identity:
    /// clients of the old database start from the whole space.
    Import(ImportArgs),
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
    pub auth: AuthArgs,

    #[command(flatten)]
    pub push: PushArgs,

    #[command(flatten)]
    pub pull: PullArgs,

    #[command(flatten)]
    pub js: MutatorArgs,

    #[command(flatten)]
    pub rules: RulesArgs,

    #[command(flatten)]
    pub server_api: ServerApiArgs,

    #[command(flatten)]
    pub pokes: PokeArgs,

    #[command(flatten)]
    pub gc: GcArgs,

    /// `text` or `json` log lines. Levels come from RUST_LOG (default `info`; a value that
    /// names no level and no crate of replisync stops start-up).
    #[arg(
        long,
        env = "REPLISYNC_LOG_FORMAT",
        default_value = "text",
        help_heading = "Logging"
    )]
    pub log_format: LogFormat,

    /// Log lines that may wait for the thread that writes them to stdout; past them a line is
    /// dropped (counted in replisync_log_lines_dropped_total) rather than make a request wait.
    #[arg(
        long,
        env = "REPLISYNC_LOG_BUFFER_LINES",
        default_value_t = 131_072,
        value_parser = clap::value_parser!(u64).range(1..=16_777_216),
        help_heading = "Logging"
    )]
    pub log_buffer_lines: u64,
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

    /// Every variable `--help` names, with the heading it is listed under.
    fn variables_by_heading() -> Vec<(String, String)> {
        Cli::command()
            .get_arguments()
            .filter_map(|arg| {
                let variable = arg.get_env()?.to_string_lossy().into_owned();
                Some((arg.get_help_heading()?.to_owned(), variable))
            })
            .collect()
    }

    /// The part of `text` after the line `marker heading`, up to the next line that starts
    /// with `marker` (the next heading).
    fn section<'t>(text: &'t str, marker: &str, heading: &str) -> Option<&'t str> {
        let mut start = 0;
        for line in text.split_inclusive('\n') {
            start += line.len();
            let title = line
                .strip_prefix(marker)
                .map(|title| title.trim_end_matches(['-', ' ', '\n']));
            if title == Some(heading) {
                let rest = &text[start..];
                let end = rest.find(&format!("\n{marker}")).unwrap_or(rest.len());
                return Some(&rest[..end]);
            }
        }
        None
    }

    /// Whether `text` names `variable` as a whole word (`REPLISYNC_SSE` is not named by
    /// `REPLISYNC_SSE_MAX_STREAMS`).
    fn names(text: &str, variable: &str) -> bool {
        let is_name_char = |c: char| c.is_ascii_alphanumeric() || c == '_';
        text.match_indices(variable).any(|(at, _)| {
            let before = text[..at].chars().next_back();
            let after = text[at + variable.len()..].chars().next();
            !before.is_some_and(is_name_char) && !after.is_some_and(is_name_char)
        })
    }

    /// `heading: VARIABLE` for each variable missing from its heading's section of `text`.
    fn misplaced(text: &str, marker: &str) -> Vec<String> {
        variables_by_heading()
            .into_iter()
            .filter(|(heading, variable)| {
                !section(text, marker, heading).is_some_and(|s| names(s, variable))
            })
            .map(|(heading, variable)| format!("{heading}: {variable}"))
            .collect()
    }

    fn read(path: &str) -> String {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        std::fs::read_to_string(root.join(path)).expect("the file exists")
    }

    #[test]
    fn every_variable_has_a_help_heading() {
        let unheaded: Vec<String> = Cli::command()
            .get_arguments()
            .filter(|arg| arg.get_env().is_some() && arg.get_help_heading().is_none())
            .map(|arg| arg.get_id().to_string())
            .collect();
        assert_eq!(unheaded, Vec::<String>::new());
    }

    #[test]
    fn every_variable_is_documented_under_its_help_heading() {
        let page = read("docs/configuration.md");
        assert_eq!(misplaced(&page, "## "), Vec::<String>::new());
        let example = read(".env.example");
        assert_eq!(misplaced(&example, "# --- "), Vec::<String>::new());
    }
}
