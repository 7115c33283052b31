//! Generators of client input: arbitrary bytes and JSON, odd numbers and strings, and
//! near-valid push and pull bodies, tokens, forms and query strings with a few places changed.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, KeyInit, Mac};
use proptest::prelude::*;
use proptest::sample::{Index, select};
use serde_json::{Map, Number, Value, json};
use sha2::{Sha256, Sha384, Sha512};

/// The secret the fuzzed servers verify tokens with.
pub(crate) const SECRET: &str = "fuzz-secret-of-some-length";
/// A secret the servers do not know.
const WRONG_SECRET: &str = "another-secret";

/// Names a client might use for fields: the protocol's, the token's, the form's.
const FIELDS: &[&str] = &[
    "pushVersion",
    "pullVersion",
    "schemaVersion",
    "profileID",
    "clientGroupID",
    "mutations",
    "cookie",
    "id",
    "name",
    "args",
    "timestamp",
    "clientID",
    "key",
    "value",
    "delta",
    "sub",
    "exp",
    "nbf",
    "iat",
    "iss",
    "aud",
    "spaces",
    "spaces_read",
    "alg",
    "typ",
    "kid",
    "crit",
];

/// Strings that mean something somewhere: empty, NUL, mutator names, patterns, escapes.
const WORDS: &[&str] = &[
    "",
    "\0",
    "a\0b",
    "set",
    "delete",
    "increment",
    "null",
    "*",
    "-",
    "..",
    "/",
    "private-space-",
    "Bearer",
    "%00",
    "\u{feff}",
    "\u{10ffff}",
    "\r\n",
];

/// Byte lengths at the limits of space ids (100), client ids (200) and keys (1000).
const LIMIT_LENGTHS: &[usize] = &[99, 100, 101, 199, 200, 201, 999, 1000, 1001];

/// Pieces of a path segment that decode oddly, or not at all.
const PATH_PIECES: &[&str] = &[
    ".", "..", "%2F", "%00", "%", "%zz", "%C3", "%C3%A9", "a", "-", "%20", "+", ";", "@",
];

/// Integers at the edges of what the server stores and adopts.
const EDGE_INTEGERS: &[u64] = &[
    0,
    1,
    1 << 50,
    (1 << 50) + 1,
    1 << 53,
    i64::MAX as u64 - 1,
    i64::MAX as u64,
    i64::MAX as u64 + 1,
    u64::MAX - 1,
    u64::MAX,
];

/// Number texts that are not serde_json `Value`s, or not JSON at all.
const RAW_NUMBERS: &[&str] = &[
    "1e400",
    "-1e400",
    "18446744073709551616",
    "-9223372036854775809",
    "100000000000000000000000000000000000000",
    "1.0",
    "1e0",
    "-0",
    "01",
    "1.",
    ".5",
    "+1",
    "NaN",
    "Infinity",
    "0x10",
];

/// Texts that are not JSON, or JSON that parsers handle specially.
const BROKEN: &[&str] = &[
    "",
    "{",
    "}",
    "[1,]",
    "{\"a\":1,}",
    "tru",
    "nul",
    "'single'",
    "\"unterminated",
    "\"\\ud800\"",
    "\"\\udc00\\ud800\"",
    "\"\\u0000\"",
    "\"\u{1}\"",
    "\"\\x\"",
    "{\"a\" 1}",
    "{\"a\":1,\"a\":2}",
    "[] []",
];

/// Pieces a body is assembled from in `token_soup`.
const TOKENS: &[&str] = &[
    "{",
    "}",
    "[",
    "]",
    ":",
    ",",
    " ",
    "\"",
    "\\",
    "null",
    "true",
    "1",
    "-1",
    "1e999",
    "0.5",
    "\"pushVersion\"",
    "\"pullVersion\"",
    "\"clientGroupID\"",
    "\"mutations\"",
    "\"cookie\"",
    "\"id\"",
    "\"clientID\"",
    "\"name\"",
    "\"args\"",
    "\"g\"",
    "\"\\u0000\"",
];

/// Bytes a client sends, shown as text (lossily) when a case fails.
#[derive(Clone)]
pub(crate) struct Input(pub Vec<u8>);

impl fmt::Debug for Input {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = String::from_utf8_lossy(&self.0);
        if text.chars().count() <= 3000 {
            write!(f, "{text:?}")
        } else {
            let start: String = text.chars().take(3000).collect();
            write!(
                f,
                "{start:?} (and {} bytes more)",
                self.0.len() - start.len()
            )
        }
    }
}

/// Strings matching `regex`, compiled once (a `&str` strategy compiles its regex per case).
pub(crate) fn matching(regex: &str) -> impl Strategy<Value = String> + use<> {
    proptest::string::string_regex(regex).expect("a valid regex")
}

pub(crate) fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs() as i64
}

/// Plain ids, any Unicode, control characters, meaningful words, and strings at and around
/// the length limits (200-byte ids, 1000-byte keys) or far beyond them.
pub(crate) fn odd_string() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => matching("[a-zA-Z0-9_-]{0,12}"),
        2 => any::<String>(),
        1 => matching("[\\x00-\\x1f\\x7f\"\\\\/%.*]{0,8}"),
        1 => select(WORDS).prop_map(str::to_owned),
        1 => (select(LIMIT_LENGTHS), select(vec!["a", "é"]))
            .prop_map(|(bytes, unit)| unit.repeat(bytes / unit.len())),
        1 => (0usize..20_000, any::<char>()).prop_map(|(n, c)| c.to_string().repeat(n)),
    ]
}

/// Small counts, any 64-bit integer, the edges the server cares about, negatives and fractions.
pub(crate) fn odd_number() -> impl Strategy<Value = Value> {
    prop_oneof![
        3 => (0u64..8).prop_map(Value::from),
        1 => any::<u64>().prop_map(Value::from),
        1 => any::<i64>().prop_map(Value::from),
        2 => select(EDGE_INTEGERS).prop_map(Value::from),
        1 => select(vec![
            json!(-1), json!(i64::MIN), json!(0.5), json!(-0.0), json!(1e300), json!(1.0)
        ]),
        1 => any::<f64>().prop_filter_map("JSON numbers are finite", finite_number),
    ]
}

fn finite_number(f: f64) -> Option<Value> {
    Number::from_f64(f).map(Value::Number)
}

/// Field names: mostly ones the server knows, sometimes any string.
pub(crate) fn field_name() -> impl Strategy<Value = String> {
    prop_oneof![3 => select(FIELDS).prop_map(str::to_owned), 1 => odd_string()]
}

/// Any JSON value, a few levels deep, with odd leaves and the server's field names.
pub(crate) fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        odd_number(),
        odd_string().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 24, 5, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::vec((field_name(), inner), 0..5)
                .prop_map(|fields| Value::Object(fields.into_iter().collect())),
        ]
    })
}

/// Texts that no `Value` serializes to: out-of-range and non-JSON numbers, nesting far past
/// serde_json's recursion limit, and broken JSON.
pub(crate) fn raw_json_text() -> impl Strategy<Value = String> {
    prop_oneof![
        select(RAW_NUMBERS).prop_map(str::to_owned),
        (1usize..5000).prop_map(|depth| format!("{}{}", "[".repeat(depth), "]".repeat(depth))),
        (1usize..5000).prop_map(|depth| format!(
            "{}1{}",
            "{\"a\":".repeat(depth),
            "}".repeat(depth)
        )),
        (1usize..5000).prop_map(|depth| "[".repeat(depth)),
        select(BROKEN).prop_map(str::to_owned),
    ]
}

/// Arbitrary bytes, or JSON-looking bytes assembled from JSON's punctuation and the protocol's
/// field names.
pub(crate) fn any_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..256),
        prop::collection::vec(select(TOKENS), 0..40)
            .prop_map(|tokens| tokens.concat().into_bytes()),
    ]
}

/// One change to a JSON body, made at a place chosen among all of its places.
#[derive(Debug, Clone)]
pub(crate) enum Change {
    Replace(Value),
    Remove,
    AddField(String, Value),
    /// Replaces the value with text no `Value` serializes to (see `raw_json_text`).
    Raw(String),
    /// Adds a member written as text: a duplicate `"pushVersion":0`, a `"cookie":1e400`.
    RawField(String),
}

pub(crate) fn change() -> impl Strategy<Value = Change> {
    prop_oneof![
        3 => prop_oneof![any_json(), odd_number(), odd_string().prop_map(Value::String)]
            .prop_map(Change::Replace),
        1 => Just(Change::Remove),
        1 => (field_name(), any_json()).prop_map(|(name, value)| Change::AddField(name, value)),
        2 => raw_json_text().prop_map(Change::Raw),
        1 => (select(FIELDS), prop_oneof![raw_json_text(), any_json().prop_map(|v| v.to_string())])
            .prop_map(|(name, value)| Change::RawField(format!("\"{name}\":{value}"))),
    ]
}

/// Up to three changes, each at a place chosen by its `Index`.
pub(crate) fn changes() -> impl Strategy<Value = Vec<(Index, Change)>> {
    prop::collection::vec((any::<Index>(), change()), 0..=3)
}

/// A step into a JSON value.
#[derive(Debug, Clone)]
enum Step {
    Key(String),
    At(usize),
}

/// Every place in `value`, the root (the empty path) first.
fn places(value: &Value) -> Vec<Vec<Step>> {
    let mut found = vec![Vec::new()];
    let mut index = 0;
    while index < found.len() {
        let path = found[index].clone();
        let children: Vec<Step> = match at(value, &path) {
            Some(Value::Object(fields)) => fields.keys().cloned().map(Step::Key).collect(),
            Some(Value::Array(items)) => (0..items.len()).map(Step::At).collect(),
            _ => Vec::new(),
        };
        for step in children {
            let mut child = path.clone();
            child.push(step);
            found.push(child);
        }
        index += 1;
    }
    found
}

fn at<'v>(value: &'v Value, path: &[Step]) -> Option<&'v Value> {
    path.iter().try_fold(value, |value, step| match step {
        Step::Key(key) => value.get(key),
        Step::At(index) => value.get(index),
    })
}

fn at_mut<'v>(value: &'v mut Value, path: &[Step]) -> Option<&'v mut Value> {
    path.iter().try_fold(value, |value, step| match step {
        Step::Key(key) => value.get_mut(key),
        Step::At(index) => value.get_mut(index),
    })
}

/// The text standing for raw change `n` until the body is serialized.
fn placeholder(n: usize) -> String {
    format!("@@raw-{n}@@")
}

/// `body` with `changes` made, as the bytes a client would send.
pub(crate) fn changed(mut body: Value, changes: &[(Index, Change)]) -> Vec<u8> {
    let mut raw_values = Vec::new();
    let mut raw_fields = Vec::new();
    for (index, change) in changes {
        let places = places(&body);
        let path = &places[index.index(places.len())];
        match change {
            Change::Replace(value) => *at_mut(&mut body, path).expect("a place") = value.clone(),
            Change::Remove => remove(&mut body, path),
            Change::AddField(name, value) => {
                if let Some(Value::Object(fields)) = at_mut(&mut body, path) {
                    fields.insert(name.clone(), value.clone());
                }
            }
            Change::Raw(text) => {
                *at_mut(&mut body, path).expect("a place") =
                    Value::String(placeholder(raw_values.len()));
                raw_values.push(text.clone());
            }
            Change::RawField(member) => {
                if let Some(Value::Object(fields)) = at_mut(&mut body, path) {
                    fields.insert(placeholder(1000 + raw_fields.len()), Value::Null);
                    raw_fields.push(member.clone());
                }
            }
        }
    }
    let mut text = body.to_string();
    for (n, raw) in raw_values.iter().enumerate() {
        text = text.replacen(&format!("\"{}\"", placeholder(n)), raw, 1);
    }
    for (n, member) in raw_fields.iter().enumerate() {
        text = text.replacen(&format!("\"{}\":null", placeholder(1000 + n)), member, 1);
    }
    text.into_bytes()
}

fn remove(body: &mut Value, path: &[Step]) {
    let Some((last, parent)) = path.split_last() else {
        return;
    };
    match (at_mut(body, parent), last) {
        (Some(Value::Object(fields)), Step::Key(key)) => {
            fields.remove(key);
        }
        (Some(Value::Array(items)), Step::At(index)) => {
            items.remove(*index);
        }
        _ => {}
    }
}

/// Bytes of any kind, any JSON, or (most often) `template` with up to three changes.
fn body_from(template: impl Strategy<Value = Value>) -> impl Strategy<Value = Input> {
    prop_oneof![
        1 => any_bytes(),
        1 => any_json().prop_map(|value| value.to_string().into_bytes()),
        5 => (template, changes()).prop_map(|(body, changes)| changed(body, &changes)),
    ]
    .prop_map(Input)
}

/// Keys a mutator might be given: a few short ones shared by every case (so that values
/// accumulate), or odd strings.
fn key() -> impl Strategy<Value = Value> {
    prop_oneof![
        3 => matching("[a-d]{1,2}").prop_map(Value::from),
        1 => odd_string().prop_map(Value::from),
    ]
}

/// `(name, args)` of a mutation of the built-in mutators, with plausible or odd arguments.
fn mutation_call() -> impl Strategy<Value = (String, Value)> {
    let name = prop_oneof![
        4 => select(vec!["set", "delete", "increment"]).prop_map(str::to_owned),
        1 => odd_string(),
    ];
    let args = prop_oneof![
        (key(), any_json()).prop_map(|(key, value)| json!({"key": key, "value": value})),
        (key(), odd_number()).prop_map(|(key, delta)| json!({"key": key, "delta": delta})),
        key().prop_map(|key| json!({"key": key})),
        any_json(),
    ];
    (name, args)
}

/// A valid push of a new client group and client: mutations 1, 2, ... of built-in mutators.
pub(crate) fn push_template() -> impl Strategy<Value = Value> {
    ("[a-z0-9]{8}", prop::collection::vec(mutation_call(), 0..6)).prop_map(|(tag, calls)| {
        let client = format!("c-{tag}");
        let mutations: Vec<Value> = calls
            .into_iter()
            .enumerate()
            .map(|(index, (name, args))| {
                json!({"id": index + 1, "name": name, "args": args, "timestamp": 12.5,
                       "clientID": client})
            })
            .collect();
        json!({"pushVersion": 1, "schemaVersion": "", "profileID": "p",
               "clientGroupID": format!("g-{tag}"), "mutations": mutations})
    })
}

pub(crate) fn push_body() -> impl Strategy<Value = Input> {
    body_from(push_template())
}

/// A pull of a new or odd client group with a null, numeric or odd cookie.
pub(crate) fn pull_template() -> impl Strategy<Value = Value> {
    let group = prop_oneof![3 => matching("g-[a-z0-9]{8}"), 1 => odd_string()];
    let cookie = prop_oneof![2 => Just(Value::Null), 3 => odd_number(), 1 => any_json()];
    (group, cookie).prop_map(|(group, cookie)| {
        json!({"pullVersion": 1, "schemaVersion": "", "profileID": "p",
               "clientGroupID": group, "cookie": cookie})
    })
}

pub(crate) fn pull_body() -> impl Strategy<Value = Input> {
    body_from(pull_template())
}

/// Claims that verify against the fuzzed servers: user `fuzzer`, every space, an hour left.
pub(crate) fn good_claims() -> Value {
    json!({"sub": "fuzzer", "exp": now() + 3600, "spaces": ["*"]})
}

/// `Bearer <token>` of `good_claims`.
pub(crate) fn good_authorization() -> String {
    format!(
        "Bearer {}",
        token_of(
            br#"{"alg":"HS256","typ":"JWT"}"#,
            good_claims().to_string().as_bytes(),
            SECRET
        )
    )
}

/// Claims near the good ones: odd users, expiries, grants, issuers and audiences.
fn claims_template() -> impl Strategy<Value = Value> {
    let sub = prop_oneof![
        3 => matching("[a-z]{1,8}").prop_map(Value::from),
        1 => odd_string().prop_map(Value::from),
    ];
    let exp = prop_oneof![3 => Just(json!(now() + 3600)), 1 => odd_number()];
    let spaces = prop_oneof![
        3 => Just(json!(["*"])),
        1 => prop::collection::vec(odd_string(), 0..4).prop_map(Value::from),
    ];
    let extra = prop::collection::vec((field_name(), any_json()), 0..3);
    (sub, exp, spaces, extra).prop_map(|(sub, exp, spaces, extra)| {
        let mut claims = json!({"sub": sub, "exp": exp, "spaces": spaces});
        let fields = claims.as_object_mut().expect("an object");
        for (name, value) in extra {
            fields.entry(name).or_insert(value);
        }
        claims
    })
}

/// Claims as bytes: near-valid ones with changes, any JSON, or any bytes.
pub(crate) fn claims_bytes() -> impl Strategy<Value = Input> {
    body_from(claims_template())
}

/// A JOSE header near `{"alg":"HS256","typ":"JWT"}`.
fn header_bytes() -> impl Strategy<Value = Vec<u8>> {
    let template = select(vec![
        "HS256", "HS384", "HS512", "none", "RS256", "EdDSA", "hs256",
    ])
    .prop_map(|alg| json!({"alg": alg, "typ": "JWT"}));
    prop_oneof![
        4 => template.clone().prop_map(|header| header.to_string().into_bytes()),
        2 => (template, changes()).prop_map(|(header, changes)| changed(header, &changes)),
        1 => any_bytes(),
    ]
}

/// A compact JWS of `header` and `claims` (any bytes), signed with `secret` by the HMAC its
/// header names (HS256 when it names none), so that odd headers and claims pass the signature.
pub(crate) fn token_of(header: &[u8], claims: &[u8], secret: &str) -> String {
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(claims)
    );
    let alg = serde_json::from_slice::<Map<String, Value>>(header)
        .ok()
        .and_then(|header| header.get("alg").and_then(Value::as_str).map(str::to_owned));
    let signature = match alg.as_deref() {
        Some("HS384") => hmac_sign::<Hmac<Sha384>>(secret, &signing_input),
        Some("HS512") => hmac_sign::<Hmac<Sha512>>(secret, &signing_input),
        _ => hmac_sign::<Hmac<Sha256>>(secret, &signing_input),
    };
    format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(signature))
}

fn hmac_sign<M: Mac + KeyInit>(secret: &str, input: &str) -> Vec<u8> {
    let mut mac = <M as KeyInit>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(input.as_bytes());
    mac.finalize().into_bytes().to_vec()
}

/// A token as a client might send it: odd headers and claims signed with the server's secret
/// (most often) or another one, three base64 segments of garbage, or any string; and, so that
/// many get past verification, tokens whose only oddities are their user, expiry and grants.
pub(crate) fn token() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => claims_template().prop_map(|claims| {
            token_of(br#"{"alg":"HS256","typ":"JWT"}"#, claims.to_string().as_bytes(), SECRET)
        }),
        6 => (header_bytes(), claims_bytes())
            .prop_map(|(header, claims)| token_of(&header, &claims.0, SECRET)),
        1 => (header_bytes(), claims_bytes())
            .prop_map(|(header, claims)| token_of(&header, &claims.0, WRONG_SECRET)),
        1 => prop::collection::vec(any_bytes(), 1..5).prop_map(|segments| {
            segments.iter().map(|s| URL_SAFE_NO_PAD.encode(s)).collect::<Vec<_>>().join(".")
        }),
        1 => matching("[A-Za-z0-9_.=+/-]{0,300}"),
        1 => any::<String>(),
    ]
}

/// An `Authorization` value: a token after `Bearer` (in odd spellings) or another scheme.
pub(crate) fn authorization() -> impl Strategy<Value = String> {
    let scheme = select(vec![
        "Bearer ",
        "Bearer ",
        "bearer ",
        "BEARER  ",
        " Bearer\t",
        "",
        "Bearer",
        "Basic ",
        "Token ",
    ]);
    let tail = select(vec!["", "", " ", "\t", " x", "\0"]);
    (scheme, token(), tail).prop_map(|(scheme, token, tail)| format!("{scheme}{token}{tail}"))
}

/// Percent-encodes every byte but the unreserved ones (form and query encoding).
pub(crate) fn percent_encoded(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Escapes only what a URI cannot carry at all, leaving `%`, `&`, `=` and `+` as they are: a
/// query that still reaches the server, with its structure as broken as generated.
pub(crate) fn uri_safe(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' => (b as char).to_string(),
            b'-' | b'.' | b'_' | b'~' | b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'*' | b'+' => {
                (b as char).to_string()
            }
            b',' | b';' | b'=' | b':' | b'@' | b'/' | b'?' | b'%' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `name=value` pairs joined by `&`, each percent-encoded or (when its flag is false) left raw.
fn joined_pairs(pairs: &[(String, String, bool)]) -> String {
    pairs
        .iter()
        .map(|(name, value, encode)| {
            if *encode {
                format!("{}={}", percent_encoded(name), percent_encoded(value))
            } else {
                format!("{name}={value}")
            }
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// Socket ids: valid ones, near ones, and odd strings.
fn socket_id() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => matching("[0-9]{1,20}\\.[0-9]{1,20}"),
        1 => matching("[0-9]{19,22}\\.[0-9]{0,22}"),
        1 => matching("[0-9.:a ]{0,12}"),
        1 => odd_string(),
    ]
}

/// Channel names: the fuzzed space's private channel, other private channels, near ones, and
/// odd strings.
fn channel_name(space: &'static str) -> impl Strategy<Value = String> {
    prop_oneof![
        2 => Just(format!("private-space-{space}")),
        2 => matching("private-space-[a-zA-Z0-9_-]{0,101}"),
        1 => odd_string().prop_map(|s| format!("private-space-{s}")),
        1 => matching("(private-|presence-|)(space-|)[a-z]{0,4}"),
        1 => odd_string(),
    ]
}

/// A `/pusher/auth` body: the two fields (valid, near or odd), extra or repeated fields,
/// encoded or raw, or any bytes.
pub(crate) fn pusher_form(space: &'static str) -> impl Strategy<Value = Input> {
    let name = prop_oneof![
        3 => select(vec!["socket_id", "channel_name", "socket_id[]", "channel_name ", "", "auth"])
            .prop_map(str::to_owned),
        1 => odd_string(),
    ];
    let value = prop_oneof![socket_id(), channel_name(space)];
    let extra = prop::collection::vec((name, value, any::<bool>()), 0..3);
    let fields = (
        socket_id(),
        channel_name(space),
        any::<bool>(),
        extra.clone(),
    )
        .prop_map(|(socket, channel, encode, extra)| {
            let mut pairs = vec![
                ("socket_id".to_owned(), socket, encode),
                ("channel_name".to_owned(), channel, encode),
            ];
            pairs.extend(extra);
            joined_pairs(&pairs).into_bytes()
        });
    prop_oneof![
        5 => fields,
        1 => extra.prop_map(|pairs| joined_pairs(&pairs).into_bytes()),
        1 => any_bytes(),
    ]
    .prop_map(Input)
}

/// A query string for the SSE stream: `auth=` with the good token, another token or an odd
/// value, among other and repeated fields, encoded or raw; or query-ish soup.
pub(crate) fn sse_query(good_token: String) -> impl Strategy<Value = String> {
    let name = prop_oneof![
        4 => Just("auth".to_owned()),
        1 => select(vec!["Auth", "auth[]", "", "authorization", "x"]).prop_map(str::to_owned),
        1 => odd_string(),
    ];
    let value = prop_oneof![
        2 => Just(good_token.clone()),
        2 => token(),
        1 => authorization(),
        1 => odd_string(),
    ];
    let pairs = prop::collection::vec((name, value, any::<bool>()), 0..4)
        .prop_map(|pairs| uri_safe(&joined_pairs(&pairs)));
    let soup = prop::collection::vec(
        select(vec![
            "auth",
            "=",
            "&",
            "%",
            "%00",
            "%zz",
            "%e9",
            "+",
            "%2B",
            ";",
            "?",
            "Bearer%20",
            "a",
        ]),
        0..12,
    )
    .prop_map(|pieces| pieces.concat());
    prop_oneof![4 => pairs, 1 => soup, 1 => any::<String>().prop_map(|s| uri_safe(&s))]
}

/// A `{space}` path segment: valid, near the 100-character limit, percent-encoded odd strings,
/// or raw URI pieces.
pub(crate) fn space_segment() -> impl Strategy<Value = String> {
    prop_oneof![
        2 => matching("[a-zA-Z0-9_-]{1,12}"),
        1 => matching("[a-zA-Z0-9_-]{99,102}"),
        2 => odd_string().prop_map(|s| percent_encoded(&s)),
        1 => prop::collection::vec(select(PATH_PIECES), 0..8).prop_map(|pieces| pieces.concat()),
    ]
}
