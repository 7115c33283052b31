//! First contact with Postgres at start-up: one bounded connection attempt whose failure says
//! where it went (user, host, port, database; never the password) and why, in words a user can act on.

use std::time::Duration;

use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection};

/// How long the first connection may take before start-up gives up on it.
pub const FIRST_CONTACT_TIMEOUT: Duration = Duration::from_secs(5);

/// Where `options` connect, for messages: `user@host:port/database`, never the password.
pub fn describe_target(options: &PgConnectOptions) -> String {
    let database = options.get_database().unwrap_or(options.get_username());
    format!(
        "{}@{}:{}/{}",
        options.get_username(),
        options.get_host(),
        options.get_port(),
        database
    )
}

/// Opens and closes one connection within `timeout`. The error names the target and the cause
/// (refused, timed out, unknown host, authentication failed, no such database) and what to do.
pub async fn first_contact(options: &PgConnectOptions, timeout: Duration) -> Result<(), String> {
    let target = describe_target(options);
    let attempt = tokio::time::timeout(timeout, options.connect()).await;
    let cause = match attempt {
        Ok(Ok(connection)) => {
            let _ = Connection::close(connection).await;
            return Ok(());
        }
        Ok(Err(error)) => explain(&error, options),
        Err(_) => format!(
            "no answer within {} s (is the host right, and does a firewall let the port through?)",
            timeout.as_secs()
        ),
    };
    Err(format!(
        "cannot connect to Postgres at {target} (DATABASE_URL): {cause}"
    ))
}

/// What went wrong, and what to do about it.
fn explain(error: &sqlx::Error, options: &PgConnectOptions) -> String {
    if let sqlx::Error::Database(database_error) = error {
        return match database_error.code().as_deref() {
            Some("28P01") => format!(
                "authentication failed for user {:?} (check the user and password in DATABASE_URL)",
                options.get_username()
            ),
            Some("28000") => format!(
                "the server refused user {:?}: {} (check the user in DATABASE_URL, and the server's pg_hba.conf)",
                options.get_username(),
                database_error.message()
            ),
            Some("3D000") => {
                let database = options.get_database().unwrap_or(options.get_username());
                format!(
                    "the database {database:?} does not exist (create it, e.g. `createdb {database}`, or name another in DATABASE_URL)"
                )
            }
            _ => format!("the server refused: {}", database_error.message()),
        };
    }
    if let sqlx::Error::Io(io) = error {
        return match io.kind() {
            std::io::ErrorKind::ConnectionRefused => {
                "connection refused (is Postgres running, and listening on that host and port?)"
                    .to_string()
            }
            std::io::ErrorKind::TimedOut => {
                "timed out (is the host right, and does a firewall let the port through?)"
                    .to_string()
            }
            _ if looks_like_unknown_host(io) => {
                format!("{io} (is the host name in DATABASE_URL right?)")
            }
            _ => io.to_string(),
        };
    }
    if let sqlx::Error::Tls(tls) = error {
        return format!("TLS failed: {tls} (check sslmode in DATABASE_URL)");
    }
    error.to_string()
}

/// The resolver's failure: the standard library reports it as an uncategorized error whose text
/// names the lookup.
fn looks_like_unknown_host(io: &std::io::Error) -> bool {
    let text = io.to_string();
    text.contains("failed to lookup address") || text.contains("Name or service not known")
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use super::*;

    #[test]
    fn the_target_names_user_host_port_and_database_but_never_the_password() {
        let options =
            PgConnectOptions::from_str("postgres://app:hunter2-secret@db.internal:6543/orders")
                .unwrap();
        let target = describe_target(&options);
        assert_eq!(target, "app@db.internal:6543/orders");
        assert!(!target.contains("hunter2"));
    }
}
