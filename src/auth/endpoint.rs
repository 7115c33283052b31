//! The URLs replisync calls about authentication (the webhook, the identity provider's JWKS),
//! checked at start-up: they must parse, and use https unless they stay on this machine, since
//! the webhook is sent the caller's token and a JWKS decides which tokens are genuine.

use std::net::IpAddr;

use reqwest::Url;

/// `raw`, parsed, when it is an `https` URL, or an `http` one to a loopback host (`localhost`,
/// `127.0.0.0/8`, `[::1]`); otherwise an error naming `variable` and saying what to set.
pub fn check_endpoint_url(raw: &str, variable: &str) -> Result<Url, String> {
    let url = Url::parse(raw.trim()).map_err(|error| {
        format!("{variable} ({raw:?}) is not a URL ({error}): set it to https://host/path")
    })?;
    match url.scheme() {
        "https" => Ok(url),
        "http" if is_loopback_host(&url) => Ok(url),
        "http" => Err(format!(
            "{variable} must use https unless its host is a loopback address: {} would travel \
             in the clear to {}; use https://{}",
            what_travels(variable),
            url.host_str().unwrap_or_default(),
            raw.trim().trim_start_matches("http://")
        )),
        other => Err(format!(
            "{variable} must be an https URL (or http to a loopback host), not {other}"
        )),
    }
}

/// What an attacker on the path would see or forge, for the error message.
fn what_travels(variable: &str) -> &'static str {
    if variable.contains("JWKS") {
        "the keys that decide which tokens are genuine"
    } else {
        "callers' tokens"
    }
}

/// `localhost` (and its subdomains), or a loopback IP address.
fn is_loopback_host(url: &Url) -> bool {
    let Some(host) = url.host_str() else {
        return false;
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let host = host.to_ascii_lowercase();
    host == "localhost"
        || host.ends_with(".localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    const VAR: &str = "REPLISYNC_AUTHZ_URL";

    #[test]
    fn https_anywhere_and_http_on_loopback_only() {
        for good in [
            "https://app.example.com/authz",
            "http://127.0.0.1:3000/authz",
            "http://127.8.9.10/authz",
            "http://localhost:3000/authz",
            "http://[::1]:3000/authz",
        ] {
            assert!(check_endpoint_url(good, VAR).is_ok(), "{good}");
        }
        for bad in [
            "http://app.example.com/authz",
            "http://10.0.0.2:3000/authz",
            "http://0.0.0.0:3000/authz",
            "http://localhost.example.com/authz",
            "ftp://app.example.com/authz",
            "not a url",
            "app.example.com/authz",
        ] {
            let error = check_endpoint_url(bad, VAR).unwrap_err();
            assert!(error.contains(VAR), "{bad}: {error}");
        }
        let error = check_endpoint_url("http://authz.internal/check", VAR).unwrap_err();
        assert!(error.contains("https"), "{error}");
    }
}
