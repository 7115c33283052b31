//! The server API's setting: the service token (REPLISYNC_SERVICE_TOKEN) that trusted backends
//! present; unset, the API is off. A token too short to be secret stops start-up.

use super::{ServerApi, ServiceToken};

/// Fewest bytes a service token may have: 32 random characters are beyond guessing.
pub const MIN_SERVICE_TOKEN_BYTES: usize = 32;

/// The server API for the app's own backends (docs/server-api.md).
#[derive(clap::Args, Clone)]
#[command(next_help_heading = "Server API")]
pub struct ServerApiArgs {
    /// The secret a trusted backend sends as `Authorization: Bearer <token>` to read spaces and
    /// apply mutations through /api/... (at least 32 characters; `openssl rand -hex 32`).
    /// Unset: the server API is off (its routes answer 404). Never an end user's token.
    #[arg(long, env = "REPLISYNC_SERVICE_TOKEN", hide_env_values = true)]
    pub service_token: Option<String>,
}

/// Never shows the token.
impl std::fmt::Debug for ServerApiArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerApiArgs")
            .field(
                "service_token",
                &self.service_token.as_ref().map(|_| "<set>"),
            )
            .finish()
    }
}

impl ServerApiArgs {
    /// The server API as configured: off without a token; an error for a token too short.
    pub fn load(&self) -> Result<ServerApi, String> {
        let Some(token) = &self.service_token else {
            return Ok(ServerApi::off());
        };
        let token = token.trim();
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(
                "REPLISYNC_SERVICE_TOKEN holds a character an HTTP header cannot carry as is: use \
                 visible ASCII only (make one with `openssl rand -hex 32`)"
                    .to_owned(),
            );
        }
        if token.len() < MIN_SERVICE_TOKEN_BYTES {
            return Err(format!(
                "REPLISYNC_SERVICE_TOKEN has {} characters; a service token needs at least \
                 {MIN_SERVICE_TOKEN_BYTES} (make one with `openssl rand -hex 32`), or leave it \
                 unset to keep the server API off",
                token.len()
            ));
        }
        tracing::info!("server API on (REPLISYNC_SERVICE_TOKEN is set)");
        Ok(ServerApi::with_token(ServiceToken::new(token)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_feature_args;

    #[test]
    fn unset_is_off_and_a_short_token_is_refused() {
        let off: ServerApiArgs = parse_feature_args(&[]);
        assert!(!off.load().unwrap().is_on());
        let short: ServerApiArgs = parse_feature_args(&["--service-token", "abc"]);
        let error = short.load().unwrap_err();
        assert!(error.contains("at least 32"), "{error}");
        let accented: ServerApiArgs = parse_feature_args(&["--service-token", &"é".repeat(20)]);
        assert!(accented.load().unwrap_err().contains("visible ASCII"));
        let token = "0123456789abcdef0123456789abcdef";
        let on: ServerApiArgs = parse_feature_args(&["--service-token", token]);
        assert!(on.load().unwrap().is_on());
        assert!(!format!("{on:?}").contains(token));
    }
}
