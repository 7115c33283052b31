//! Running an operation again when it met a dead pooled connection: a database restart costs
//! no request an error.

use super::error::ConnectionLoss;

/// How many times an operation that met a dead pooled connection is run again. Each failed
/// attempt retires one dead connection, so this covers a restart under the default pool size.
pub const RECONNECT_ATTEMPTS: u32 = 20;

/// Runs `operation`, again at once each time it meets a dead connection (up to
/// [`RECONNECT_ATTEMPTS`] times): a database restart costs no request an error. The operation
/// must be safe to run again (a read, or a whole push).
pub async fn reconnecting<T, E, F, Fut>(mut operation: F) -> Result<T, E>
where
    E: ConnectionLoss,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let mut attempt = 0;
    loop {
        let result = operation().await;
        match result
            .as_ref()
            .err()
            .and_then(ConnectionLoss::connection_lost)
        {
            Some(cause) if attempt < RECONNECT_ATTEMPTS => {
                attempt += 1;
                tracing::info!(attempt, %cause, "database connection lost; running again on another");
            }
            _ => return result,
        }
    }
}
