//! Pusher HTTP API signing (auth_version 1.0): body md5, string to sign, signed query, and the
//! private-channel auth signature; plus the exact JSON body of one poke call.

use std::time::{SystemTime, UNIX_EPOCH};

use hmac::{Hmac, KeyInit, Mac};
use md5::{Digest, Md5};
use serde::Serialize;
use sha2::Sha256;

/// The only signing scheme Pusher's HTTP API knows.
pub const AUTH_VERSION: &str = "1.0";

/// Lowercase hex MD5 of the exact body bytes.
pub fn body_md5(body: &[u8]) -> String {
    hex::encode(Md5::digest(body))
}

/// `METHOD\npath\nquery`: every parameter but `auth_signature`, keys lowercased, sorted by key,
/// joined `k=v&k=v`, not URL-escaped.
pub fn string_to_sign(method: &str, path: &str, params: &[(&str, &str)]) -> String {
    let mut pairs: Vec<(String, &str)> = params
        .iter()
        .filter(|(key, _)| !key.eq_ignore_ascii_case("auth_signature"))
        .map(|(key, value)| (key.to_ascii_lowercase(), *value))
        .collect();
    pairs.sort();
    let query: Vec<String> = pairs
        .iter()
        .map(|(key, value)| format!("{key}={value}"))
        .collect();
    format!(
        "{}\n{path}\n{}",
        method.to_ascii_uppercase(),
        query.join("&")
    )
}

/// The `auth_signature` of a request: hex HMAC-SHA256 of [`string_to_sign`] keyed with `secret`.
pub fn sign(secret: &str, method: &str, path: &str, params: &[(&str, &str)]) -> String {
    hmac_sha256_hex(secret, &string_to_sign(method, path, params))
}

/// The full query string of a signed request: `params`, then `auth_key`, `auth_timestamp`,
/// `auth_version`, `body_md5` (only when `body` is non-empty) and `auth_signature`.
pub fn signed_query(
    key: &str,
    secret: &str,
    method: &str,
    path: &str,
    params: &[(&str, &str)],
    body: &[u8],
    auth_timestamp: u64,
) -> Vec<(String, String)> {
    let mut query: Vec<(String, String)> = params
        .iter()
        .map(|(name, value)| (name.to_string(), value.to_string()))
        .collect();
    query.push(("auth_key".into(), key.into()));
    query.push(("auth_timestamp".into(), auth_timestamp.to_string()));
    query.push(("auth_version".into(), AUTH_VERSION.into()));
    if !body.is_empty() {
        query.push(("body_md5".into(), body_md5(body)));
    }
    let unsigned: Vec<(&str, &str)> = query
        .iter()
        .map(|(name, value)| (name.as_str(), value.as_str()))
        .collect();
    let signature = sign(secret, method, path, &unsigned);
    query.push(("auth_signature".into(), signature));
    query
}

/// The `auth` answer to a private-channel subscription: `<key>:<hex HMAC(secret, socket:channel)>`.
pub fn channel_auth_signature(key: &str, secret: &str, socket_id: &str, channel: &str) -> String {
    let signature = hmac_sha256_hex(secret, &format!("{socket_id}:{channel}"));
    format!("{key}:{signature}")
}

fn hmac_sha256_hex(secret: &str, message: &str) -> String {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC accepts keys of any length");
    mac.update(message.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// Seconds since the Unix epoch, as `auth_timestamp` wants them.
pub(super) fn unix_timestamp() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|since_epoch| since_epoch.as_secs())
        .unwrap_or(0)
}

/// The body of one poke call: `{"name":<event>,"data":"","channels":[...]}`.
#[derive(Serialize)]
struct TriggerBody<'a> {
    name: &'a str,
    data: &'a str,
    channels: &'a [String],
}

pub(super) fn trigger_body(
    event_name: &str,
    channels: &[String],
) -> Result<Vec<u8>, serde_json::Error> {
    serde_json::to_vec(&TriggerBody {
        name: event_name,
        data: "",
        channels,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::poke::pusher::test_support::{KEY, SECRET, query_value};

    const DOC_KEY: &str = "278d425bdf160c739803";
    const DOC_SECRET: &str = "7ad3773142a6692b25b8";

    // --- signing vectors (docs/pusher.md) ---------------------------------------------------

    #[test]
    fn pusher_documented_example_vector() {
        let body = br#"{"name":"foo","channels":["project-3"],"data":"{\"some\":\"data\"}"}"#;
        assert_eq!(body_md5(body), "ec365a775a4cd0599faeb73354201b6f");
        let params = [
            ("auth_key", DOC_KEY),
            ("auth_timestamp", "1353088179"),
            ("auth_version", "1.0"),
            ("body_md5", "ec365a775a4cd0599faeb73354201b6f"),
        ];
        assert_eq!(
            string_to_sign("POST", "/apps/3/events", &params),
            "POST\n/apps/3/events\nauth_key=278d425bdf160c739803&auth_timestamp=1353088179\
             &auth_version=1.0&body_md5=ec365a775a4cd0599faeb73354201b6f"
        );
        let expected = "da454824c97ba181a32ccc17a72625ba02771f50b50e1e7430e47a1f3f457e6c";
        assert_eq!(
            sign(DOC_SECRET, "POST", "/apps/3/events", &params),
            expected
        );
        let query = signed_query(
            DOC_KEY,
            DOC_SECRET,
            "POST",
            "/apps/3/events",
            &[],
            body,
            1353088179,
        );
        assert_eq!(query_value(&query, "auth_signature"), Some(expected));
    }

    fn assert_sdk_post_vector(ts: u64, path: &str, body: &str, md5: &str, signature: &str) {
        assert_eq!(body_md5(body.as_bytes()), md5);
        let query = signed_query(KEY, SECRET, "POST", path, &[], body.as_bytes(), ts);
        let expected_names = [
            "auth_key",
            "auth_timestamp",
            "auth_version",
            "body_md5",
            "auth_signature",
        ];
        let names: Vec<&str> = query.iter().map(|(name, _)| name.as_str()).collect();
        assert_eq!(names, expected_names);
        assert_eq!(query_value(&query, "auth_key"), Some(KEY));
        assert_eq!(query_value(&query, "auth_version"), Some("1.0"));
        assert_eq!(query_value(&query, "body_md5"), Some(md5));
        assert_eq!(query_value(&query, "auth_signature"), Some(signature));
    }

    #[test]
    fn sdk_vector_poke_with_empty_data() {
        assert_sdk_post_vector(
            1700000000,
            "/apps/12345/events",
            r#"{"name":"poke","data":"","channels":["space-0f3c2a"]}"#,
            "64bbecb8ddb6866af416fc681aa8ab6e",
            "ffc4024238c5abd6fe93ef9e7fa4393b6c0303c5ff54763e2ff7567540fa23cc",
        );
    }

    #[test]
    fn sdk_vector_event_with_socket_id() {
        assert_sdk_post_vector(
            1700000001,
            "/apps/12345/events",
            r#"{"name":"poke","data":"{}","channels":["space-0f3c2a"],"socket_id":"123.456"}"#,
            "3247a604758ecdebed3e0656686fe918",
            "edb94d6e3f7399fc78b36c5c5cb5f246dcb2d0daf39a0771c31c3bd0d9386906",
        );
    }

    #[test]
    fn sdk_vector_batch_events() {
        assert_sdk_post_vector(
            1700000002,
            "/apps/12345/batch_events",
            r#"{"batch":[{"channel":"space-a","name":"poke","data":""},{"channel":"space-b","name":"poke","data":""}]}"#,
            "9abb83c2ddd5c3c58819abf8b4efbd0f",
            "3eb4e0cf1feb4ae664e4f41651a18d1c14fed0ffc23d898881c687d52b5c2718",
        );
    }

    #[test]
    fn sdk_vector_get_without_body_has_no_body_md5() {
        let params = [
            ("filter_by_prefix", "space-"),
            ("info", "subscription_count"),
        ];
        let path = "/apps/12345/channels";
        let query = signed_query(KEY, SECRET, "GET", path, &params, b"", 1700000003);
        assert_eq!(query_value(&query, "body_md5"), None);
        assert_eq!(query_value(&query, "filter_by_prefix"), Some("space-"));
        let unsigned: Vec<(&str, &str)> = query
            .iter()
            .map(|(name, value)| (name.as_str(), value.as_str()))
            .collect();
        assert_eq!(
            string_to_sign("GET", path, &unsigned),
            "GET\n/apps/12345/channels\nauth_key=app-key-abc&auth_timestamp=1700000003\
             &auth_version=1.0&filter_by_prefix=space-&info=subscription_count"
        );
        assert_eq!(
            query_value(&query, "auth_signature"),
            Some("8353155c7d1a06fa93a1f90093fb4a65d17049dc87770b7e4921c7bd49d19219")
        );
    }

    #[test]
    fn channel_auth_vectors() {
        assert_eq!(
            channel_auth_signature(DOC_KEY, DOC_SECRET, "1234.1234", "private-foobar"),
            "278d425bdf160c739803:58df8b0c36d6982b82c3ecf6b4662e34fe8c25bba48f5369f135bf843651c3a4"
        );
        assert_eq!(
            channel_auth_signature(KEY, SECRET, "123.456", "private-space-0f3c2a"),
            "app-key-abc:60e3c477313d84247eb82c9405b703f045cd38b6cbbed774aa8f4cd06d2149ef"
        );
    }

    #[test]
    fn trigger_body_is_byte_for_byte_the_sdk_poke_vector() {
        let body = trigger_body("poke", &["space-0f3c2a".to_owned()]).expect("serializes");
        assert_eq!(
            body,
            br#"{"name":"poke","data":"","channels":["space-0f3c2a"]}"#
        );
        assert_eq!(body_md5(&body), "64bbecb8ddb6866af416fc681aa8ab6e");
    }

    #[test]
    fn string_to_sign_lowercases_sorts_and_leaves_out_the_signature() {
        let params = [
            ("b", "2"),
            ("auth_signature", "ignored"),
            ("A", "1"),
            ("c", "x y"),
        ];
        assert_eq!(
            string_to_sign("post", "/p", &params),
            "POST\n/p\na=1&b=2&c=x y"
        );
    }
}
