//! The replisync binary: parses the configuration, sets up logging and traces (flushed at exit),
//! hands over to `commands`; a fatal error is printed once (on stderr, or one JSON error event).

use replisync::config::{Cli, Command, LogFormat};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::from_env_and_args();
    let rust_log = std::env::var("RUST_LOG").ok();
    let (format, buffer_lines) = (cli.config.log_format, cli.config.log_buffer_lines);
    // Kept to the end of `main`: its drop writes the log lines still buffered.
    let command = cli.command.unwrap_or(Command::Serve);
    // An export writes its spaces to stdout: its log lines go to stderr.
    let to_stderr = matches!(command, Command::Export(_) | Command::Import(_));
    let logging = replisync::logging::init(rust_log.as_deref(), format, buffer_lines, to_stderr);
    let mut logging = match logging {
        Ok(logging) => logging,
        Err(error) => {
            eprintln!("replisync: {error}");
            return std::process::ExitCode::from(2);
        }
    };
    let ran = replisync::commands::run(command, cli.config).await;
    if let Some(traces) = logging.traces.take() {
        // Blocking (the exporter's last batch, within its timeout): off the runtime's workers.
        let _ = tokio::task::spawn_blocking(move || traces.shutdown()).await;
    }
    match ran {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            match format {
                LogFormat::Json => tracing::error!("{error:#}"),
                LogFormat::Text => eprintln!("replisync: {error:#}"),
            }
            std::process::ExitCode::FAILURE
        }
    }
}
