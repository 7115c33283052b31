//! The replisync protocol as the benchmark speaks it: the one builder of push bodies and of
//! pull bodies, and the HTTP calls that send them to a server on loopback.

use std::sync::Arc;

use anyhow::bail;
use serde_json::{Value, json};

/// A mutation before it is numbered: a mutator and its arguments.
pub(crate) struct Mutation {
    name: &'static str,
    args: Value,
}

/// The `increment` mutator: adds `delta` to the number at `key`.
pub(crate) fn increment(key: &str, delta: i64) -> Mutation {
    Mutation {
        name: "increment",
        args: json!({"key": key, "delta": delta}),
    }
}

/// `jsIncrement` of the benchmark's JavaScript module (mutators.js beside this file): what
/// `increment` does, in JavaScript.
pub(crate) fn js_increment(key: &str, delta: i64) -> Mutation {
    Mutation {
        name: "jsIncrement",
        args: json!({"key": key, "delta": delta}),
    }
}

/// The `set` mutator: writes `value` at `key`.
pub(crate) fn set(key: &str, value: Value) -> Mutation {
    Mutation {
        name: "set",
        args: json!({"key": key, "value": value}),
    }
}

/// The `delete` mutator: removes `key` (a tombstone stays until compaction).
pub(crate) fn delete(key: &str) -> Mutation {
    Mutation {
        name: "delete",
        args: json!({"key": key}),
    }
}

/// A push body: `mutations` of `client` (in client group `group`), numbered from `first_id`.
pub(crate) fn push_body(
    group: &str,
    client: &str,
    first_id: u64,
    mutations: impl IntoIterator<Item = Mutation>,
) -> Value {
    let mutations: Vec<Value> = mutations
        .into_iter()
        .zip(first_id..)
        .map(|(mutation, id)| {
            json!({"id": id, "name": mutation.name, "clientID": client,
                   "args": mutation.args, "timestamp": 1.0})
        })
        .collect();
    json!({"pushVersion": 1, "schemaVersion": "", "profileID": "bench",
           "clientGroupID": group, "mutations": mutations})
}

/// A server API call's body (`POST /api/spaces/{space}/mutations`): `mutations` applied all or
/// nothing, once per `idempotency_key`.
pub(crate) fn mutation_call_body(
    idempotency_key: &str,
    mutations: impl IntoIterator<Item = Mutation>,
) -> Value {
    let mutations: Vec<Value> = mutations
        .into_iter()
        .map(|mutation| json!({"name": mutation.name, "args": mutation.args}))
        .collect();
    json!({"idempotencyKey": idempotency_key, "mutations": mutations})
}

/// A pull body for client group `group`, from `cookie` (null for a first pull).
pub(crate) fn pull_body(group: &str, cookie: Value) -> Value {
    json!({"pullVersion": 1, "schemaVersion": "", "profileID": "bench", "clientGroupID": group, "cookie": cookie})
}

/// One replisync server, reached through a shared HTTP client.
#[derive(Clone)]
pub(crate) struct Api {
    http: reqwest::Client,
    base: String,
    /// `Authorization` of every request, in place of the client's default (one user's token).
    bearer: Option<Arc<str>>,
}

impl Api {
    pub(crate) fn new(http: reqwest::Client, base: &str) -> Api {
        Api {
            http,
            base: base.to_owned(),
            bearer: None,
        }
    }

    /// The same HTTP client (and token), talking to the server at `base`.
    pub(crate) fn at(&self, base: &str) -> Api {
        Api {
            base: base.to_owned(),
            ..self.clone()
        }
    }

    /// The same server and HTTP client, every request sent with `Authorization: <bearer>`.
    pub(crate) fn with_bearer(&self, bearer: &str) -> Api {
        Api {
            bearer: Some(bearer.into()),
            ..self.clone()
        }
    }

    /// A POST to `path`, with this Api's token when it has one.
    fn post_request(&self, path: &str, body: &Value) -> reqwest::RequestBuilder {
        let request = self
            .http
            .post(format!("{}{path}", self.base))
            .body(body.to_string());
        match &self.bearer {
            Some(bearer) => request.header(reqwest::header::AUTHORIZATION, &**bearer),
            None => request,
        }
    }

    pub(crate) async fn push(&self, space: &str, body: &Value) -> anyhow::Result<Value> {
        self.post(&format!("/spaces/{space}/push"), body).await
    }

    pub(crate) async fn pull(&self, space: &str, body: &Value) -> anyhow::Result<Value> {
        self.post(&format!("/spaces/{space}/pull"), body).await
    }

    /// A server API call (`POST /api/spaces/{space}/mutations`; this Api's bearer must be the
    /// service token); anything but a 200 without an `error` field is an error. Answers the
    /// call's `status` (`committed` or `alreadyApplied`).
    pub(crate) async fn apply_mutations(
        &self,
        space: &str,
        body: &Value,
    ) -> anyhow::Result<String> {
        let answer = self
            .post(&format!("/api/spaces/{space}/mutations"), body)
            .await?;
        match answer["status"].as_str() {
            Some(status) => Ok(status.to_owned()),
            None => bail!("a server API call answered without a status: {answer}"),
        }
    }

    /// A GET of `path_and_query` (a server API read, with this Api's bearer); anything but a
    /// 200 is an error.
    pub(crate) async fn get_json(&self, path_and_query: &str) -> anyhow::Result<Value> {
        let request = self.http.get(format!("{}{path_and_query}", self.base));
        let request = match &self.bearer {
            Some(bearer) => request.header(reqwest::header::AUTHORIZATION, &**bearer),
            None => request,
        };
        let response = request.send().await?;
        let status = response.status();
        let body: Value = response.json().await?;
        if status != 200 {
            bail!("{path_and_query} answered {status}: {body}");
        }
        Ok(body)
    }

    /// Sends a pull and counts the bytes of its response as they stream in, without parsing.
    pub(crate) async fn pull_response_bytes(
        &self,
        space: &str,
        body: &Value,
    ) -> anyhow::Result<usize> {
        let mut response = self
            .post_request(&format!("/spaces/{space}/pull"), body)
            .send()
            .await?;
        let mut bytes = 0usize;
        while let Some(chunk) = response.chunk().await? {
            bytes += chunk.len();
        }
        Ok(bytes)
    }

    /// The current value of the counter `name` on the server's `/metrics` (0 when absent).
    pub(crate) async fn metric(&self, name: &str) -> anyhow::Result<u64> {
        let text = self
            .http
            .get(format!("{}/metrics", self.base))
            .send()
            .await?
            .text()
            .await?;
        Ok(metric_value(&text, name))
    }

    /// POSTs a push or pull; anything but a 200 without an `error` field is an error.
    async fn post(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        let response = self.post_request(path, body).send().await?;
        let status = response.status();
        let body: Value = response.json().await?;
        if status != 200 || body.get("error").is_some() {
            bail!("{path} answered {status}: {body}");
        }
        Ok(body)
    }
}

fn metric_value(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|line| {
            line.strip_prefix(name)
                .and_then(|rest| rest.trim().parse().ok())
        })
        .unwrap_or(0)
}
