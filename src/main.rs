//! The replisync binary: parses the configuration, sets up logging, hands over to `commands`.
//! A fatal error is printed once: on stderr with text logs, as one error event with JSON logs.

use replisync::config::{Cli, Command, LogFormat};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::from_env_and_args();
    let rust_log = std::env::var("RUST_LOG").ok();
    if let Err(error) = replisync::logging::init(rust_log.as_deref(), cli.config.log_format) {
        eprintln!("replisync: {error}");
        return std::process::ExitCode::from(2);
    }
    let format = cli.config.log_format;
    match replisync::commands::run(cli.command.unwrap_or(Command::Serve), cli.config).await {
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
