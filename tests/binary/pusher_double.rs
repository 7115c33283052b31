//! A Pusher HTTP API double that answers when the test says so: it records every event POST as
//! it arrives and holds the answer until released, like a Pusher that is slow as replisync stops.

// A test double, not sockudo: "Pusher is slow right when replisync stops" cannot be produced on
// demand with a real Pusher-compatible server, which answers as fast as it can.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::routing::post;
use serde_json::Value;
use tokio::sync::watch;

use crate::harness::poll_for;

/// One event publication as the double received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Published {
    pub(crate) event: String,
    pub(crate) channels: Vec<String>,
}

impl Published {
    pub(crate) fn new(event: &str, channels: &[&str]) -> Published {
        Published {
            event: event.to_owned(),
            channels: channels.iter().map(|&c| c.to_owned()).collect(),
        }
    }
}

/// What the double's handler and the test share.
#[derive(Clone)]
struct Shared {
    received: Arc<Mutex<Vec<Published>>>,
    answered: Arc<AtomicUsize>,
    release: watch::Receiver<bool>,
}

/// The double, serving on a loopback port until the test ends.
pub(crate) struct SlowPusher {
    port: String,
    shared: Shared,
    release: watch::Sender<bool>,
}

impl SlowPusher {
    /// Serves `POST /apps/{app_id}/events` on a free loopback port, holding every answer.
    pub(crate) async fn start() -> SlowPusher {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port().to_string();
        let (release, released) = watch::channel(false);
        let shared = Shared {
            received: Arc::default(),
            answered: Arc::default(),
            release: released,
        };
        let app = Router::new()
            .route("/apps/{app_id}/events", post(publish))
            .with_state(shared.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        SlowPusher {
            port,
            shared,
            release,
        }
    }

    /// The PUSHER_* variables that point replisync at this double.
    pub(crate) fn env(&self) -> Vec<(&'static str, &str)> {
        vec![
            ("PUSHER_APP_ID", "1"),
            ("PUSHER_KEY", "double-key"),
            ("PUSHER_SECRET", "double-secret"),
            ("PUSHER_HOST", "127.0.0.1"),
            ("PUSHER_PORT", self.port.as_str()),
            ("PUSHER_SCHEME", "http"),
        ]
    }

    /// Every publication received so far, answered or not, in arrival order.
    pub(crate) fn received(&self) -> Vec<Published> {
        self.shared.received.lock().unwrap().clone()
    }

    /// How many publications were answered (200) so far.
    pub(crate) fn answered(&self) -> usize {
        self.shared.answered.load(Ordering::SeqCst)
    }

    /// Waits up to `within` until `count` publications have arrived; returns them all.
    pub(crate) async fn wait_for_received(&self, count: usize, within: Duration) -> Vec<Published> {
        poll_for(within, || {
            Some(self.received()).filter(|all| all.len() >= count)
        })
        .await
        .unwrap_or_else(|| self.received())
    }

    /// Answers every held publication, and every later one at once.
    pub(crate) fn release(&self) {
        self.release.send_replace(true);
    }
}

/// Records the publication, then answers 200 once the test releases the double.
async fn publish(State(shared): State<Shared>, body: String) -> &'static str {
    let body: Value = serde_json::from_str(&body).expect("a JSON publication");
    let channels = body["channels"].as_array().expect("channels").iter();
    shared.received.lock().unwrap().push(Published {
        event: body["name"].as_str().expect("an event name").to_owned(),
        channels: channels.map(|c| c.as_str().unwrap().to_owned()).collect(),
    });
    let mut release = shared.release.clone();
    let _ = release.wait_for(|released| *released).await;
    shared.answered.fetch_add(1, Ordering::SeqCst);
    "{}"
}
