//! The rules workload's world: the rules file, 1000 users in 10 teams with a token each, and
//! spaces filled alike with shared, per-user and per-team keys, each written by a user allowed to.

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use futures::{StreamExt, TryStreamExt};
use serde::Serialize;
use serde_json::{Value, json};

use crate::api::{Api, pull_body, push_body, set};

/// The rules file: spaces `team-*` are ruled, the rest (`plain-*`) are not.
pub(crate) const RULES: &str = r#"{"spaces": [{"space": "team-*",
  "read":  ["shared/*", "user/{user}/*", "team/{claims.teams}/*"],
  "write": ["shared/*", "user/{user}/*", "team/{claims.teams}/*"]}]}"#;

/// The ruled space and the unruled one of a workload named `name`.
pub(crate) fn spaces(name: &str) -> [(bool, String); 2] {
    [
        (true, format!("team-{name}")),
        (false, format!("plain-{name}")),
    ]
}

/// Users `u0`... `u999`, user u in team `t{u % 10}`.
pub(crate) const USERS: usize = 1000;
pub(crate) const TEAMS: usize = 10;

/// The HS256 secret of the rules server when the benchmark was given none (32 bytes at least).
pub(crate) const DEFAULT_SECRET: &str = "replisync-bench-rules-secret-0123456789abcdef";

/// Keys set per push while filling a space.
const FILL_BATCH: usize = 500;
/// Pushes in flight at once while filling a space.
const FILL_CONCURRENCY: usize = 8;
/// Filling one space may take this long at most.
const FILL_DEADLINE: Duration = Duration::from_secs(300);

pub(crate) fn team_of(user: usize) -> usize {
    user % TEAMS
}

/// Whether user `user` may read `key` in a ruled space: RULES, in the benchmark's terms (to
/// check what the server answers).
pub(crate) fn readable(user: usize, key: &str) -> bool {
    key.starts_with("shared/")
        || key.starts_with(&format!("user/u{user}/"))
        || key.starts_with(&format!("team/t{}/", team_of(user)))
}

/// `Bearer <token>` for `sub`, in `teams`, granting every space for a day.
pub(crate) fn bearer(secret: &str, sub: &str, teams: &[String]) -> anyhow::Result<String> {
    let claims = json!({
        "sub": sub,
        "exp": jsonwebtoken::get_current_timestamp() + 24 * 60 * 60,
        "spaces": ["*"],
        "teams": teams,
    });
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )?;
    Ok(format!("Bearer {token}"))
}

/// The rules server as each user reaches it (its own token), and as `writer`, a user of
/// every team.
pub(crate) struct Callers {
    pub users: Vec<Api>,
    pub writer: Api,
}

impl Callers {
    pub(crate) fn new(api: &Api, secret: &str) -> anyhow::Result<Callers> {
        let users = (0..USERS)
            .map(|u| {
                let token = bearer(secret, &format!("u{u}"), &[format!("t{}", team_of(u))])?;
                anyhow::Ok(api.with_bearer(&token))
            })
            .collect::<Result<_, _>>()?;
        let teams: Vec<String> = (0..TEAMS).map(|t| format!("t{t}")).collect();
        let writer = api.with_bearer(&bearer(secret, "writer", &teams)?);
        Ok(Callers { users, writer })
    }
}

/// How many keys of each kind a space holds: `shared/<i>`, `user/u<u>/<i>` for each user,
/// `team/t<t>/<i>` for each team; each value about 200 bytes.
#[derive(Clone, Copy, Serialize)]
pub(crate) struct Layout {
    pub shared: usize,
    pub per_user: usize,
    pub per_team: usize,
}

impl Layout {
    /// The spaces of the storm and the incremental pulls: 5,600 entries, 155 per reader.
    pub(crate) const SMALL: Layout = Layout {
        shared: 100,
        per_user: 5,
        per_team: 50,
    };
    /// The first pull's: 100,000 entries, 11,080 per reader.
    pub(crate) const BIG: Layout = Layout {
        shared: 10_000,
        per_user: 80,
        per_team: 1_000,
    };

    pub(crate) fn entries(&self) -> usize {
        self.shared + self.per_user * USERS + self.per_team * TEAMS
    }

    /// What one user may read of a ruled space.
    pub(crate) fn readable_by_one(&self) -> usize {
        self.shared + self.per_user + self.per_team
    }

    /// What a first pull of a space of this layout must return: every entry, or the reader's.
    pub(crate) fn expected(&self, ruled: bool) -> usize {
        if ruled {
            self.readable_by_one()
        } else {
            self.entries()
        }
    }

    /// The pushes that fill a space: (user who pushes, keys), each user writing its own keys,
    /// the first user of each team its team's, user 0 the shared ones.
    fn pushes(&self) -> Vec<(usize, Vec<String>)> {
        let mut pushes = Vec::new();
        let mut add = |user: usize, keys: Vec<String>| {
            for chunk in keys.chunks(FILL_BATCH) {
                pushes.push((user, chunk.to_vec()));
            }
        };
        add(
            0,
            (0..self.shared).map(|i| format!("shared/{i:06}")).collect(),
        );
        for t in 0..TEAMS {
            add(
                t,
                (0..self.per_team)
                    .map(|i| format!("team/t{t}/{i:06}"))
                    .collect(),
            );
        }
        for u in 0..USERS {
            add(
                u,
                (0..self.per_user)
                    .map(|i| format!("user/u{u}/{i:06}"))
                    .collect(),
            );
        }
        pushes
    }
}

/// Fills `space` as `layout` says, each push by its user (FILL_CONCURRENCY at once).
pub(crate) async fn fill(
    callers: &Callers,
    space: &str,
    layout: Layout,
) -> anyhow::Result<Duration> {
    let text = "x".repeat(180);
    let started = Instant::now();
    futures::stream::iter(layout.pushes().into_iter().enumerate())
        .map(|(n, (user, keys))| {
            let api = callers.users[user].clone();
            let sets = keys
                .iter()
                .map(|key| set(key, json!({"key": key, "text": text})))
                .collect::<Vec<_>>();
            let client = format!("{space}-fill-{n}");
            let body = push_body(&format!("{client}-group"), &client, 1, sets);
            async move {
                ensure!(
                    started.elapsed() < FILL_DEADLINE,
                    "filling {space} took too long"
                );
                api.push(space, &body).await.map(drop)
            }
        })
        .buffer_unordered(FILL_CONCURRENCY)
        .try_collect::<()>()
        .await?;
    Ok(started.elapsed())
}

/// The keys a pull's answer sets or deletes; fails unless it starts with `clear` exactly when
/// `from_scratch` (a first pull; never a reset elsewhere).
pub(crate) fn patch_keys(answer: &Value, from_scratch: bool) -> anyhow::Result<Vec<&str>> {
    let patch = answer["patch"]
        .as_array()
        .with_context(|| format!("a pull answered no patch: {answer}"))?;
    let clears = patch.iter().filter(|op| op["op"] == "clear").count();
    let cleared_first = patch.first().is_some_and(|op| op["op"] == "clear");
    ensure!(
        clears == usize::from(from_scratch) && cleared_first == from_scratch,
        "a pull {} (cookie {})",
        if from_scratch {
            "from no cookie did not start with one clear"
        } else {
            "from a cookie was answered a reset"
        },
        answer["cookie"]
    );
    Ok(patch.iter().filter_map(|op| op["key"].as_str()).collect())
}

/// Fails unless every key of a pull's answer to `user` is one it may read (in a ruled space).
pub(crate) fn check_readable(ruled: bool, user: usize, keys: &[&str]) -> anyhow::Result<()> {
    if !ruled {
        return Ok(());
    }
    if let Some(key) = keys.iter().find(|key| !readable(user, key)) {
        anyhow::bail!("user u{user} was sent {key:?}, which the rules hide from it");
    }
    Ok(())
}

/// A first pull of `space` (of `layout`) by `user` in group `group`: fails unless it returned
/// exactly what the user may read (every entry where unruled). Answers its cookie and how many
/// entries it returned.
pub(crate) async fn checked_first_pull(
    api: &Api,
    (ruled, space): (bool, &str),
    user: usize,
    group: &str,
    layout: Layout,
) -> anyhow::Result<(Value, usize)> {
    let answer = api.pull(space, &pull_body(group, Value::Null)).await?;
    let keys = patch_keys(&answer, true)?;
    check_readable(ruled, user, &keys)?;
    let expected = layout.expected(ruled);
    ensure!(
        keys.len() == expected,
        "a first pull of {space} by u{user} returned {} entries, not {expected}",
        keys.len()
    );
    let cookie = answer["cookie"].clone();
    ensure!(
        cookie.is_object() == ruled,
        "a first pull of {space} answered the cookie {cookie}: an object in a ruled space only"
    );
    Ok((cookie, keys.len()))
}
