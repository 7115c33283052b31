//! The JavaScript contexts an engine keeps between pushes (issue 27): one per space served
//! lately, each apart from the others, within REPLISYNC_MUTATOR_CONTEXTS_MB, a space's pushes
//! going to the engine that keeps its context.

use std::time::{Duration, Instant};

use replisync::mutators::js::JsLimits;
use serde_json::{Value, json};

use crate::harness::{Backend, TestServer};
use crate::js_mutators::{js_server_with, metric, run, test_limits};

/// One engine keeping contexts within `contexts_bytes`.
fn one_engine(contexts_bytes: usize) -> JsLimits {
    JsLimits {
        engines: 1,
        contexts_bytes,
        ..test_limits()
    }
}

/// What `probeGlobals` writes in a context where `leakGlobal` left `secret` and it ran `calls`
/// times in all (100 for `leakGlobal`, 1 per probe).
fn seen(secret: Option<&str>, calls: u64) -> Value {
    json!({"leaked": secret, "polluted": secret, "calls": calls})
}

/// Waits for `replisync_mutator_contexts` to settle (an engine counts its contexts after it
/// answered the push) and answers it.
async fn kept_contexts(server: &TestServer) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = metric(server, "replisync_mutator_contexts").await;
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = metric(server, "replisync_mutator_contexts").await;
        if now == last || Instant::now() > deadline {
            return now;
        }
        last = now;
    }
}

/// Leaves `secret of <space>` in `space`'s globals, a prototype and its module state.
async fn leak_in(server: &TestServer, space: &str) {
    let secret = json!({"value": format!("secret of {space}")});
    run(server, space, 1, &[("leakGlobal", secret)]).await;
}

/// What a probe in `space` (mutation `id`) sees.
async fn probe(server: &TestServer, space: &str, id: u64) -> Value {
    let entries = run(
        server,
        space,
        id,
        &[("probeGlobals", json!({"into": "out"}))],
    )
    .await;
    entries["out"].clone()
}

/// Two spaces' contexts kept on one engine stay apart: each space's later push finds its own
/// globals and module state, never the other's, and a third space starts afresh.
async fn contexts_kept_on_one_engine_stay_apart(backend: Backend) {
    let server = js_server_with(backend, one_engine(8 * 1024 * 1024)).await;
    leak_in(&server, "a").await;
    leak_in(&server, "b").await;
    assert_eq!(probe(&server, "a", 2).await, seen(Some("secret of a"), 101));
    assert_eq!(probe(&server, "b", 2).await, seen(Some("secret of b"), 101));
    assert_eq!(probe(&server, "a", 3).await, seen(Some("secret of a"), 102));
    assert_eq!(probe(&server, "c", 1).await, seen(None, 1));
    assert_eq!(kept_contexts(&server).await, 3);
}

/// Past its bound an engine drops the contexts of the spaces it served least recently: many
/// spaces do not make it hold more and more, and the latest space's context is still kept.
async fn the_bound_drops_the_least_recently_used_contexts(backend: Backend) {
    const SPACES: u64 = 24;
    let server = js_server_with(backend, one_engine(1024 * 1024)).await;
    for space in 0..SPACES {
        leak_in(&server, &format!("s{space}")).await;
    }
    let kept = kept_contexts(&server).await;
    assert!(
        (1..SPACES / 2).contains(&kept),
        "{kept} contexts kept of {SPACES} spaces"
    );
    let last = format!("s{}", SPACES - 1);
    assert_eq!(
        probe(&server, &last, 2).await,
        seen(Some(&format!("secret of {last}")), 101),
        "the latest space's context is kept"
    );
    assert_eq!(
        probe(&server, "s0", 2).await,
        seen(None, 1),
        "the first space's was dropped"
    );
}

/// With two engines, a space's pushes one after another go to the engine that keeps its
/// context, each finding the state the one before left.
async fn a_space_keeps_to_its_engine(backend: Backend) {
    let limits = JsLimits {
        engines: 2,
        ..test_limits()
    };
    let server = js_server_with(backend, limits).await;
    leak_in(&server, "a").await;
    for id in 2..8 {
        assert_eq!(
            probe(&server, "a", id).await,
            seen(Some("secret of a"), 99 + id)
        );
    }
}

crate::on_both_stores!(
    contexts_kept_on_one_engine_stay_apart,
    the_bound_drops_the_least_recently_used_contexts,
    a_space_keeps_to_its_engine,
);
