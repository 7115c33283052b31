//! Visibility rules: three users in one space with shared, per-user and per-team keys see
//! exactly their keys on every pull path, write only theirs, and converge when their claims
//! change; a randomized run checks that no answer ever holds a key its caller may not read.

use std::collections::BTreeMap;
use std::sync::Arc;

use replisync::mutators::Mutators;
use replisync::mutators::js::JsMutators;
use replisync::pull::PullLimits;
use replisync::rules::Rules;
use replisync::startup::{App, AppBuilder};
use serde_json::{Value, json};

use crate::auth::{claims, hmac_options, token};
use crate::harness::{Backend, TestServer, push_body};
use crate::js_mutators::{TokenIsUser, fixture, metric, test_limits};

const SPACE: &str = "team-1";

/// Everyone reads and writes `shared/`, their own `user/<id>/` and their teams' `team/<t>/`.
const RULES: &str = r#"{"spaces": [{
    "space": "team-*",
    "read": ["shared/*", "user/{user}/*", "team/{claims.teams}/*"],
    "write": ["shared/*", "user/{user}/*", "team/{claims.teams}/*"]
}]}"#;

fn with_rules(app: AppBuilder) -> AppBuilder {
    app.rules(Rules::parse(RULES).unwrap())
}

/// A server whose deltas are shared (built in memory), or streamed from a snapshot each.
async fn ruled_server(backend: Backend, streamed_deltas: bool) -> TestServer {
    let mut app = with_rules(hmac_options());
    if streamed_deltas {
        app = app.pulls(PullLimits {
            max_shared_delta_bytes: 1,
            ..PullLimits::default()
        });
    }
    TestServer::start_with(backend, app).await
}

/// What the rules let `user` of `teams` read, written independently of the server's matcher.
fn visible(user: &str, teams: &[&str], key: &str) -> bool {
    key.starts_with("shared/")
        || key.starts_with(&format!("user/{user}/"))
        || teams.iter().any(|t| key.starts_with(&format!("team/{t}/")))
}

/// A user's Replicache client: one client group, the cookie and the keys it holds.
struct Tab {
    user: String,
    teams: Vec<String>,
    group: String,
    client: String,
    next_mutation: u64,
    cookie: Value,
    entries: BTreeMap<String, Value>,
}

impl Tab {
    fn new(user: &str, teams: &[&str]) -> Tab {
        Tab {
            user: user.into(),
            teams: teams.iter().map(|t| t.to_string()).collect(),
            group: format!("{user}-group"),
            client: format!("{user}-client"),
            next_mutation: 1,
            cookie: Value::Null,
            entries: BTreeMap::new(),
        }
    }

    fn auth(&self) -> String {
        let mut claims = claims(&self.user, &["*"]);
        claims["teams"] = json!(self.teams);
        token(&claims)
    }

    fn teams(&self) -> Vec<&str> {
        self.teams.iter().map(String::as_str).collect()
    }

    /// Pulls from its cookie, checks the answer and applies it; answers the response.
    async fn pull(&mut self, server: &TestServer) -> Value {
        let (status, body) = server
            .pull_as(SPACE, &self.group, self.cookie.clone(), &self.auth())
            .await;
        assert_eq!(status, 200, "{}'s pull: {body}", self.user);
        self.apply(&body);
        body
    }

    /// Applies a pull answer as the real client does, after checking it holds no key the
    /// user may not read and that its cookie does not go backwards (and moves when it changes
    /// anything).
    fn apply(&mut self, body: &Value) {
        let patch = body["patch"].as_array().expect("a patch");
        let teams = self.teams();
        for op in patch {
            if let Some(key) = op["key"].as_str() {
                assert!(
                    visible(&self.user, &teams, key),
                    "{} (teams {teams:?}) was sent {op}",
                    self.user
                );
            }
        }
        let (before, after) = (order(&self.cookie), order(&body["cookie"]));
        assert!(
            after >= before,
            "cookie went backwards: {} -> {}",
            self.cookie,
            body["cookie"]
        );
        if after == before {
            assert!(
                patch.is_empty(),
                "a change under the same cookie is ignored: {body}"
            );
            return;
        }
        self.cookie = body["cookie"].clone();
        for op in patch {
            match op["op"].as_str() {
                Some("clear") => self.entries.clear(),
                Some("put") => {
                    let key = op["key"].as_str().unwrap().to_owned();
                    self.entries.insert(key, op["value"].clone());
                }
                Some("del") => {
                    self.entries.remove(op["key"].as_str().unwrap());
                }
                other => panic!("unknown op {other:?}"),
            }
        }
    }

    /// A push of `set`s (`Some`) and `delete`s (`None`), one mutation each, answered 200.
    async fn write(&mut self, server: &TestServer, writes: &[(&str, Option<Value>)]) {
        let mutations: Vec<(&str, u64, &str, Value)> = writes
            .iter()
            .map(|(key, value)| {
                let id = self.next_mutation;
                self.next_mutation += 1;
                match value {
                    Some(value) => (
                        self.client.as_str(),
                        id,
                        "set",
                        json!({"key": key, "value": value}),
                    ),
                    None => (self.client.as_str(), id, "delete", json!({"key": key})),
                }
            })
            .collect();
        let body = push_body(&self.group, &mutations);
        let answer = server.push_as(SPACE, &body, &self.auth()).await;
        assert_eq!(answer, (200, json!({})), "{}'s push {body}", self.user);
    }

    /// The keys of `space` (as `model` holds it) this user may read.
    fn should_hold(&self, model: &BTreeMap<String, Value>) -> BTreeMap<String, Value> {
        let teams = self.teams();
        model
            .iter()
            .filter(|(key, _)| visible(&self.user, &teams, key))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

/// A cookie's order: the number itself, or an object's `order`; null is lowest.
fn order(cookie: &Value) -> i128 {
    match cookie {
        Value::Null => -1,
        Value::Number(n) => n.as_u64().unwrap().into(),
        other => other["order"]
            .as_u64()
            .unwrap_or_else(|| panic!("a cookie replisync would not issue: {other}"))
            .into(),
    }
}

/// Every namespace, written by whoever may: shared, each user's own, each team's.
async fn write_every_namespace(server: &TestServer, tabs: &mut [Tab], round: u32) {
    for tab in tabs.iter_mut() {
        let user = tab.user.clone();
        let team = tab.teams[0].clone();
        let own = format!("user/{user}/note");
        let team_key = format!("team/{team}/{user}");
        let shared = format!("shared/{user}");
        let writes = [
            (own.as_str(), Some(json!(round))),
            (team_key.as_str(), Some(json!(round))),
            (shared.as_str(), Some(json!(round))),
        ];
        tab.write(server, &writes).await;
    }
}

fn model_after(rounds: u32, tabs: &[Tab]) -> BTreeMap<String, Value> {
    let mut model = BTreeMap::new();
    for tab in tabs {
        let user = &tab.user;
        model.insert(format!("user/{user}/note"), json!(rounds));
        model.insert(format!("team/{}/{user}", tab.teams[0]), json!(rounds));
        model.insert(format!("shared/{user}"), json!(rounds));
    }
    model
}

fn three_users() -> Vec<Tab> {
    vec![
        Tab::new("alice", &["red"]),
        Tab::new("bob", &["red"]),
        Tab::new("carol", &["blue"]),
    ]
}

/// A server with rules, the three users, and one round of their writes (and its model).
async fn three_users_after_one_round(
    backend: Backend,
) -> (TestServer, Vec<Tab>, BTreeMap<String, Value>) {
    let server = ruled_server(backend, false).await;
    let mut tabs = three_users();
    write_every_namespace(&server, &mut tabs, 1).await;
    let model = model_after(1, &tabs);
    (server, tabs, model)
}

async fn every_pull_path_answers_exactly_the_callers_keys(backend: Backend) {
    for streamed_deltas in [false, true] {
        let server = ruled_server(backend, streamed_deltas).await;
        let mut tabs = three_users();
        write_every_namespace(&server, &mut tabs, 1).await;
        // First pulls, streamed.
        let model = model_after(1, &tabs);
        for tab in &mut tabs {
            let first = tab.pull(&server).await;
            assert_eq!(first["patch"][0], json!({"op": "clear"}));
            assert_eq!(tab.entries, tab.should_hold(&model), "{}", tab.user);
            assert_eq!(first["lastMutationIDChanges"][&tab.client], 3);
        }
        // Deltas (shared, or streamed), all three users pulling at once from their cookies.
        write_every_namespace(&server, &mut tabs, 2).await;
        tabs[1]
            .write(&server, &[("user/bob/note", None), ("team/red/bob", None)])
            .await;
        let mut model = model_after(2, &tabs);
        model.remove("user/bob/note");
        model.remove("team/red/bob");
        let auths: Vec<String> = tabs.iter().map(Tab::auth).collect();
        let answers = futures::future::join_all(
            tabs.iter()
                .zip(&auths)
                .map(|(tab, auth)| server.pull_as(SPACE, &tab.group, tab.cookie.clone(), auth)),
        )
        .await;
        for (tab, (status, body)) in tabs.iter_mut().zip(answers) {
            assert_eq!(status, 200, "{body}");
            assert_ne!(
                body["patch"][0],
                json!({"op": "clear"}),
                "a delta, not a reset"
            );
            tab.apply(&body);
            assert_eq!(tab.entries, tab.should_hold(&model), "{}", tab.user);
        }
        // Bob's deletions reached alice (same team) as dels; carol got neither key nor del.
        // A change carol cannot see moves her cookie with an empty patch.
        tabs[0]
            .write(&server, &[("user/alice/secret", Some(json!("x")))])
            .await;
        let before = order(&tabs[2].cookie);
        let nothing = tabs[2].pull(&server).await;
        assert_eq!(nothing["patch"], json!([]), "{nothing}");
        assert!(order(&tabs[2].cookie) > before);
        // A cookie ahead of the space (a replaced database): a reset, filtered too.
        let carol = &mut tabs[2];
        let ahead = json!({"order": (order(&carol.cookie) as u64 / 1024 + 5) * 1024,
                           "rules": carol.cookie["rules"]});
        carol.cookie = ahead;
        let reset = carol.pull(&server).await;
        assert_eq!(reset["patch"][0], json!({"op": "clear"}));
        model.insert("user/alice/secret".into(), json!("x"));
        assert_eq!(carol.entries, carol.should_hold(&model));
    }
}

async fn a_write_outside_the_callers_rules_fails_only_that_mutation(backend: Backend) {
    let server = ruled_server(backend, false).await;
    let mut alice = Tab::new("alice", &["red"]);
    let mut bob = Tab::new("bob", &["blue"]);
    alice
        .write(
            &server,
            &[
                ("user/alice/a", Some(json!(1))),
                ("user/bob/planted", Some(json!("by alice"))),
                ("team/blue/planted", Some(json!("by alice"))),
                ("elsewhere", Some(json!(0))),
                ("user/alice/b", Some(json!(2))),
            ],
        )
        .await;
    let answer = alice.pull(&server).await;
    assert_eq!(
        answer["lastMutationIDChanges"]["alice-client"], 5,
        "all processed"
    );
    let expected: BTreeMap<String, Value> = [
        ("user/alice/a".into(), json!(1)),
        ("user/alice/b".into(), json!(2)),
    ]
    .into();
    assert_eq!(alice.entries, expected);
    bob.pull(&server).await;
    assert_eq!(
        bob.entries,
        BTreeMap::new(),
        "nothing was planted in bob's keys"
    );
    let series = r#"replisync_mutations_failed_total{kind="builtin",reason="forbidden_key"}"#;
    assert_eq!(metric(&server, series).await, 3);
    // Deleting someone else's key fails the same way.
    bob.write(&server, &[("user/bob/mine", Some(json!(1)))])
        .await;
    alice.write(&server, &[("user/bob/mine", None)]).await;
    bob.pull(&server).await;
    assert_eq!(bob.entries.get("user/bob/mine"), Some(&json!(1)));
}

async fn losing_a_team_removes_its_keys_and_gaining_one_brings_them(backend: Backend) {
    let (server, mut tabs, model) = three_users_after_one_round(backend).await;
    let mut alice = tabs.remove(0);
    alice.pull(&server).await;
    assert!(alice.entries.contains_key("team/red/bob"));
    // Alice moves from red to blue: her next pull, with no write in between, converges to
    // exactly what she may read now, under a higher cookie.
    alice.teams = vec!["blue".into()];
    let before = order(&alice.cookie);
    let moved = alice.pull(&server).await;
    assert!(order(&alice.cookie) > before, "{moved}");
    assert_eq!(alice.entries, alice.should_hold(&model));
    assert!(!alice.entries.contains_key("team/red/bob"));
    assert!(alice.entries.contains_key("team/blue/carol"));
    // Red's later writes never reach her.
    let mut bob = tabs.remove(0);
    bob.write(&server, &[("team/red/later", Some(json!("red only")))])
        .await;
    let later = alice.pull(&server).await;
    assert_eq!(later["patch"], json!([]), "{later}");
    // A token with both teams brings red back, its later write included.
    alice.teams = vec!["blue".into(), "red".into()];
    alice.pull(&server).await;
    assert_eq!(
        alice.entries.get("team/red/later"),
        Some(&json!("red only"))
    );
    assert!(alice.entries.contains_key("team/red/bob"));
    let resets = metric(&server, "replisync_pull_visibility_resets_total").await;
    assert_eq!(resets, 2);
}

async fn spaces_without_rules_keep_number_cookies_and_every_key(backend: Backend) {
    let server = ruled_server(backend, false).await;
    let auth = token(&claims("alice", &["*"]));
    let body = push_body(
        "g",
        &[("c", 1, "set", json!({"key": "user/bob/x", "value": 1}))],
    );
    assert_eq!(
        server.push_as("doc-1", &body, &auth).await,
        (200, json!({}))
    );
    let first = server.pull_ok_as("doc-1", "g", Value::Null, &auth).await;
    assert_eq!(first["cookie"], 1);
    assert_eq!(first["patch"][1]["key"], "user/bob/x");
}

async fn claims_that_expand_too_far_are_refused(backend: Backend) {
    let server = ruled_server(backend, false).await;
    let mut claims = claims("alice", &["*"]);
    claims["teams"] = json!((0..300).map(|i| format!("t{i}")).collect::<Vec<_>>());
    let (status, body) = server
        .pull_as(SPACE, "g", Value::Null, &token(&claims))
        .await;
    assert_eq!(status, 403, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("key patterns"),
        "{body}"
    );
}

/// A JavaScript mutator that catches the error of a forbidden write still fails, and nothing
/// it wrote is kept.
async fn a_javascript_mutator_cannot_catch_its_way_past_the_rules(backend: Backend) {
    let js = JsMutators::load(&fixture(), test_limits()).expect("the fixture loads");
    let app = with_rules(App::builder())
        .mutators(js.register(Mutators::builtin()))
        .authenticator(Arc::new(TokenIsUser));
    let server = TestServer::start_with(backend, app).await;
    let args = json!({"allowed": "user/alice/a", "forbidden": "user/bob/planted"});
    let body = push_body(
        "g-alice",
        &[
            ("c-alice", 1, "writesOutsideAndCatches", args),
            (
                "c-alice",
                2,
                "set",
                json!({"key": "user/alice/ok", "value": 1}),
            ),
        ],
    );
    assert_eq!(
        server.push_as(SPACE, &body, "alice").await,
        (200, json!({}))
    );
    let alice = server
        .pull_ok_as(SPACE, "g-alice", Value::Null, "alice")
        .await;
    assert_eq!(alice["lastMutationIDChanges"]["c-alice"], 2);
    let keys: Vec<&str> = alice["patch"].as_array().unwrap()[1..]
        .iter()
        .map(|op| op["key"].as_str().unwrap())
        .collect();
    assert_eq!(keys, ["user/alice/ok"]);
    let bob = server.pull_ok_as(SPACE, "g-bob", Value::Null, "bob").await;
    assert_eq!(bob["patch"], json!([{"op": "clear"}]), "nothing planted");
    let series = r#"replisync_mutations_failed_total{kind="javascript",reason="forbidden_key"}"#;
    assert_eq!(metric(&server, series).await, 1);
}

/// A hostile client gains nothing from the cookie it sends (another user's, one claiming every
/// key, an old number) or from odd claim values: each answer holds only its own keys.
async fn forged_cookies_and_odd_claims_reveal_nothing(backend: Backend) {
    let (server, mut tabs, model) = three_users_after_one_round(backend).await;
    let mut alice = tabs.remove(0);
    alice.pull(&server).await;
    let mut carol = tabs.remove(1);
    let version = order(&alice.cookie) as u64 / 1024;
    let forged = [
        alice.cookie.clone(),
        json!({"order": version * 1024, "rules": "all"}),
        json!({"order": 0, "rules": "all"}),
        json!(version),
        json!(0),
    ];
    for cookie in forged {
        carol.cookie = cookie.clone();
        carol.entries = model.clone(); // as if it held everything: the answer must say clear
        let answer = carol.pull(&server).await;
        assert_eq!(
            answer["patch"][0],
            json!({"op": "clear"}),
            "{cookie}: {answer}"
        );
        assert_eq!(carol.entries, carol.should_hold(&model), "{cookie}");
    }
    // Claim values that are not strings or integers, empty, or hold the separator, give no
    // pattern; the usable ones still work.
    let mut odd = Tab::new("dave", &[]);
    let mut claims = claims("dave", &["*"]);
    claims["teams"] = json!([{"x": 1}, "", "red/../blue", 1.5, true, null, "blue"]);
    let (status, body) = server
        .pull_as(SPACE, &odd.group, Value::Null, &token(&claims))
        .await;
    assert_eq!(status, 200, "{body}");
    odd.teams = vec!["blue".into()];
    odd.apply(&body);
    assert_eq!(odd.entries, odd.should_hold(&model));
    assert!(odd.entries.contains_key("team/blue/carol"));
}

/// Many users pulling the same cookie at once share database reads, never a filtered answer.
async fn concurrent_pulls_of_different_users_never_share_an_answer(backend: Backend) {
    let server = ruled_server(backend, false).await;
    let mut tabs = three_users();
    write_every_namespace(&server, &mut tabs, 1).await;
    for tab in &mut tabs {
        tab.pull(&server).await;
    }
    write_every_namespace(&server, &mut tabs, 2).await;
    let model = model_after(2, &tabs);
    // Everyone's cookie is now behind by the same writes; 30 pulls at once, ten per user.
    let pulls: Vec<(usize, String)> = (0..30).map(|i| (i % 3, tabs[i % 3].auth())).collect();
    let answers = futures::future::join_all(pulls.iter().map(|(who, auth)| {
        let tab = &tabs[*who];
        server.pull_as(SPACE, &tab.group, tab.cookie.clone(), auth)
    }))
    .await;
    for ((who, _), (status, body)) in pulls.iter().zip(answers) {
        assert_eq!(status, 200, "{body}");
        let mut view = Tab::new(&tabs[*who].user, &tabs[*who].teams());
        view.cookie = tabs[*who].cookie.clone();
        view.entries = tabs[*who].entries.clone();
        view.apply(&body);
        assert_eq!(view.entries, view.should_hold(&model), "{}", view.user);
    }
}

/// A small deterministic generator (xorshift), so a failing run can be replayed.
struct Dice(u64);

impl Dice {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

async fn no_answer_holds_a_key_its_caller_may_not_read(backend: Backend) {
    for streamed_deltas in [false, true] {
        random_pushes_and_pulls(backend, streamed_deltas).await;
    }
}

/// 300 random steps (writes allowed or not, pulls, claims changing, fresh starts), each pull
/// checked against what its caller may read, and every client converging to its share.
async fn random_pushes_and_pulls(backend: Backend, streamed_deltas: bool) {
    const STEPS: usize = 300;
    let server = ruled_server(backend, streamed_deltas).await;
    let mut tabs = [
        Tab::new("alice", &["red"]),
        Tab::new("bob", &["red", "blue"]),
        Tab::new("carol", &[]),
    ];
    let keys: Vec<String> = ["shared/a", "shared/b", "user/alice/x", "user/bob/x"]
        .iter()
        .map(|k| k.to_string())
        .chain(
            [
                "user/carol/x",
                "team/red/x",
                "team/red/y",
                "team/blue/x",
                "elsewhere",
            ]
            .map(String::from),
        )
        .collect();
    let team_sets: [&[&str]; 4] = [&[], &["red"], &["blue"], &["red", "blue"]];
    let mut model: BTreeMap<String, Value> = BTreeMap::new();
    let mut dice = Dice(0x9e37_79b9_7f4a_7c15);
    for step in 0..STEPS {
        let who = dice.below(tabs.len());
        match dice.below(10) {
            0..=3 => {
                let tab = &mut tabs[who];
                let key = dice.pick(&keys).clone();
                let value = (dice.below(2) == 0).then(|| json!(step));
                tab.write(&server, &[(key.as_str(), value.clone())]).await;
                if visible(&tab.user, &tab.teams(), &key) {
                    match value {
                        Some(value) => model.insert(key, value),
                        None => model.remove(&key),
                    };
                }
            }
            4..=7 => {
                tabs[who].pull(&server).await;
                assert_eq!(
                    tabs[who].entries,
                    tabs[who].should_hold(&model),
                    "step {step}"
                );
            }
            8 => {
                let teams = dice.pick(&team_sets);
                tabs[who].teams = teams.iter().map(|t| t.to_string()).collect();
            }
            _ => {
                // A fresh start: a first pull from a null cookie.
                tabs[who].cookie = Value::Null;
                tabs[who].pull(&server).await;
                assert_eq!(
                    tabs[who].entries,
                    tabs[who].should_hold(&model),
                    "step {step}"
                );
            }
        }
    }
    for tab in &mut tabs {
        tab.pull(&server).await;
        assert_eq!(
            tab.entries,
            tab.should_hold(&model),
            "{} at the end",
            tab.user
        );
    }
}

crate::on_both_stores!(
    every_pull_path_answers_exactly_the_callers_keys,
    a_write_outside_the_callers_rules_fails_only_that_mutation,
    losing_a_team_removes_its_keys_and_gaining_one_brings_them,
    spaces_without_rules_keep_number_cookies_and_every_key,
    claims_that_expand_too_far_are_refused,
    a_javascript_mutator_cannot_catch_its_way_past_the_rules,
    forged_cookies_and_odd_claims_reveal_nothing,
    concurrent_pulls_of_different_users_never_share_an_answer,
    no_answer_holds_a_key_its_caller_may_not_read,
);
