//! The [`Poker`]: the handle the push path calls, and the one background worker per service
//! that coalesces, batches, sends, retries with backoff and logs rejections at most once a minute.

use std::any::Any;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use futures::FutureExt;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tracing::Instrument;

use super::options::{Counters, PokerOptions, PokerStats, add};
use super::queue::{Insert, PendingPoke, PokeQueue};
use super::transport::{Sent, Transport};
use crate::metrics::timing::Timing;
use crate::poke::PokeSink;
use crate::protocol::SpaceId;

/// Publishes pokes through transport `T` from one background task; see [`PokeSink`].
pub struct Poker<T: Transport> {
    shared: Arc<Shared>,
    transport: Option<Arc<T>>,
    worker: Mutex<Option<JoinHandle<()>>>,
}

impl<T: Transport> std::fmt::Debug for Poker<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Poker")
            .field("service", &T::NAME)
            .field("worker", &self.worker)
            .finish_non_exhaustive()
    }
}

impl<T: Transport> Poker<T> {
    /// Spawns the worker task (call it inside a Tokio runtime: `tokio::spawn` panics outside).
    /// A transport that could not be set up (`Err`, the reason) is logged at error level, and
    /// every poke is given up.
    pub fn spawn(transport: Result<T, String>, options: PokerOptions) -> Arc<Poker<T>> {
        let shared = Arc::new(Shared {
            queue: Mutex::new(PokeQueue::new(options.max_pending_spaces)),
            wake: Notify::new(),
            counters: Counters::default(),
        });
        let transport = transport
            .inspect_err(|reason| tracing::error!(%reason, "{} pokes cannot be sent", T::NAME))
            .ok()
            .map(Arc::new);
        let worker = Worker {
            last_call_ended: None,
            shared: Arc::clone(&shared),
            rejections: RejectionLog::new(options.rejection_log_interval),
            transport: transport.clone(),
            options,
        };
        let handle = tokio::spawn(worker.run());
        Arc::new(Poker {
            shared,
            transport,
            worker: Mutex::new(Some(handle)),
        })
    }

    /// From commit to the service accepting the poke (`replisync_poke_delay_seconds`).
    pub fn delay(&self) -> &Timing {
        &self.shared.counters.delay
    }

    pub fn stats(&self) -> PokerStats {
        self.shared.counters.snapshot()
    }

    /// The transport, for what it counts itself; `None` when it could not be set up.
    pub fn transport(&self) -> Option<&T> {
        self.transport.as_deref()
    }

    /// Stops accepting changes, flushes every pending poke (still coalesced and batched) and
    /// waits for that until `deadline`, then abandons the rest. Returns how many of the spaces
    /// pending or in flight when shutdown began were not delivered.
    pub async fn shutdown(&self, deadline: Duration) -> usize {
        let given_up_before = self.stats().given_up_spaces;
        self.shared.stop_accepting();
        let worker = self
            .worker
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(mut worker) = worker
            && tokio::time::timeout(deadline, &mut worker).await.is_err()
        {
            worker.abort();
            let _ = worker.await;
        }
        let abandoned = self.shared.queue().abandon_all();
        if abandoned > 0 {
            add(&self.shared.counters.given_up_spaces, abandoned);
            tracing::warn!(
                spaces = abandoned,
                service = T::NAME,
                "shutdown deadline reached before every poke was delivered"
            );
        }
        let given_up = self.stats().given_up_spaces.saturating_sub(given_up_before);
        usize::try_from(given_up).unwrap_or(usize::MAX)
    }
}

impl<T: Transport> PokeSink for Poker<T> {
    fn space_changed(&self, space: &SpaceId, committed_at: Instant) {
        let outcome = self.shared.queue().insert(space, committed_at);
        match outcome {
            Insert::Queued | Insert::AlreadyPending => {}
            Insert::QueuedDroppingOldest(dropped) => {
                add(&self.shared.counters.dropped_spaces, 1);
                tracing::debug!(space = dropped.as_str(), "poke queue full: dropped oldest");
            }
            Insert::Refused => {
                add(&self.shared.counters.dropped_spaces, 1);
                tracing::debug!(space = space.as_str(), "poke after shutdown began: dropped");
            }
        }
        self.shared.wake.notify_one();
    }
}

impl<T: Transport> Drop for Poker<T> {
    /// Without `shutdown`, the worker still flushes what is pending, then ends.
    fn drop(&mut self) {
        self.shared.stop_accepting();
    }
}

/// State shared by the handle (`Poker`) and its worker task.
struct Shared {
    queue: Mutex<PokeQueue>,
    wake: Notify,
    counters: Counters,
}

impl Shared {
    fn queue(&self) -> MutexGuard<'_, PokeQueue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn stop_accepting(&self) {
        self.queue().stop_accepting();
        self.wake.notify_one();
    }
}

struct Worker<T: Transport> {
    /// When the last batch's call (retries included) ended.
    last_call_ended: Option<Instant>,
    shared: Arc<Shared>,
    transport: Option<Arc<T>>,
    options: PokerOptions,
    rejections: RejectionLog,
}

impl<T: Transport> Worker<T> {
    async fn run(mut self) {
        while let Some(batch) = self.next_batch().await {
            self.deliver(&batch).await;
            self.last_call_ended = Some(Instant::now());
            self.shared.queue().finish_batch();
        }
    }

    /// Waits for a change, then takes a batch: at once when the last call ended at least the
    /// coalescing window ago (an idle poker adds no delay), otherwise once the window since it
    /// has passed, so that under load calls stay a window apart and the changes meanwhile
    /// coalesce. `None` once shutdown began and nothing is pending.
    async fn next_batch(&self) -> Option<Vec<PendingPoke>> {
        loop {
            let (pending, accepting) = {
                let queue = self.shared.queue();
                (queue.pending(), queue.is_accepting())
            };
            match (pending, accepting) {
                (0, false) => return None,
                (0, true) => self.shared.wake.notified().await,
                (_, true) => {
                    let Some(ended) = self.last_call_ended else {
                        break;
                    };
                    let ready = ended + self.options.coalesce_window;
                    if Instant::now() >= ready {
                        break;
                    }
                    tokio::select! {
                        () = tokio::time::sleep_until(ready.into()) => break,
                        // A change or shutdown: look again (shutdown flushes at once).
                        () = self.shared.wake.notified() => {}
                    }
                }
                (_, false) => break,
            }
        }
        Some(self.shared.queue().take_batch(T::MAX_SPACES_PER_CALL))
    }

    async fn deliver(&mut self, batch: &[PendingPoke]) {
        let counters = &self.shared.counters;
        let Some(transport) = &self.transport else {
            let reason = format!("the {} client is not set up", T::NAME);
            give_up::<T>(counters, batch, &reason);
            return;
        };
        let spaces: Vec<SpaceId> = batch.iter().map(|poke| poke.space.clone()).collect();
        for attempt in 1..=self.options.max_attempts.max(1) {
            let span = tracing::debug_span!(parent: None, "poke.deliver", service = T::NAME, spaces = spaces.len() as i64, attempt = i64::from(attempt));
            match send_guarded(transport.as_ref(), &spaces)
                .instrument(span)
                .await
            {
                Sent::Accepted => {
                    record_delivery::<T>(counters, batch);
                    return;
                }
                Sent::Unsendable { reason } => {
                    give_up::<T>(counters, batch, &reason);
                    return;
                }
                Sent::Rejected { code, detail, hint } => {
                    add(&counters.failed_calls, 1);
                    add(&counters.given_up_spaces, batch.len());
                    let log_as_error = self.rejections.should_log(code, Instant::now());
                    log_rejection::<T>(code, &detail, hint, batch, log_as_error);
                    return;
                }
                Sent::Transient {
                    reason,
                    retry_after,
                } => {
                    add(&counters.failed_calls, 1);
                    if attempt >= self.options.max_attempts {
                        give_up::<T>(counters, batch, &reason);
                        return;
                    }
                    add(&counters.retries, 1);
                    let delay = retry_delay(&self.options, attempt, retry_after);
                    tracing::debug!(%reason, attempt, delay_ms = delay.as_secs_f64() * 1000.0, "{} poke failed; retrying", T::NAME);
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }
}

/// `transport.send`, with a panic inside it turned into a batch given up (logged as an error)
/// instead of the end of the worker, which would leave every later poke undelivered.
async fn send_guarded<T: Transport>(transport: &T, spaces: &[SpaceId]) -> Sent {
    match AssertUnwindSafe(transport.send(spaces))
        .catch_unwind()
        .await
    {
        Ok(sent) => sent,
        Err(panic) => {
            let reason = panic_message(panic.as_ref());
            tracing::error!(%reason, "the {} client panicked while poking", T::NAME);
            Sent::Unsendable {
                reason: format!("the {} client panicked: {reason}", T::NAME),
            }
        }
    }
}

fn panic_message(panic: &(dyn Any + Send)) -> String {
    match (panic.downcast_ref::<&str>(), panic.downcast_ref::<String>()) {
        (Some(text), _) => (*text).to_owned(),
        (_, Some(text)) => text.clone(),
        _ => "a panic without a message".to_owned(),
    }
}

fn record_delivery<T: Transport>(counters: &Counters, batch: &[PendingPoke]) {
    add(&counters.calls_ok, 1);
    add(&counters.spaces_poked, batch.len());
    let accepted_at = Instant::now();
    tracing::debug!(spaces = batch.len(), "{} accepted the poke", T::NAME);
    for poke in batch {
        let latency = accepted_at.saturating_duration_since(poke.committed_at);
        counters.delay.observe(latency);
        tracing::debug!(
            space = poke.space.as_str(),
            service = T::NAME,
            poke_latency_ms = latency.as_secs_f64() * 1000.0,
            "space poked"
        );
    }
}

fn give_up<T: Transport>(counters: &Counters, batch: &[PendingPoke], reason: &str) {
    add(&counters.given_up_spaces, batch.len());
    tracing::warn!(
        spaces = ?space_list(batch),
        reason,
        "gave up poking {} space(s) through {}",
        batch.len(),
        T::NAME
    );
}

fn log_rejection<T: Transport>(
    code: u16,
    detail: &str,
    hint: &str,
    batch: &[PendingPoke],
    log_as_error: bool,
) {
    let spaces = space_list(batch);
    if log_as_error {
        tracing::error!(
            status = code,
            response = detail,
            ?spaces,
            "{} rejected the poke with {code}: {hint} (not retried; logged at most once a minute)",
            T::NAME
        );
    } else {
        tracing::debug!(
            status = code,
            response = detail,
            ?spaces,
            "{} rejected the poke again",
            T::NAME
        );
    }
}

/// The batch's spaces, logged with `?`: a JSON array in JSON logs.
fn space_list(batch: &[PendingPoke]) -> Vec<&str> {
    batch.iter().map(|poke| poke.space.as_str()).collect()
}

/// Rate-limits the error log of a rejection: the same code at most once per interval.
struct RejectionLog {
    interval: Duration,
    last_logged: Option<(u16, Instant)>,
}

impl RejectionLog {
    fn new(interval: Duration) -> Self {
        RejectionLog {
            interval,
            last_logged: None,
        }
    }

    fn should_log(&mut self, code: u16, now: Instant) -> bool {
        let recently_logged = matches!(
            self.last_logged,
            Some((last_code, at)) if last_code == code
                && now.saturating_duration_since(at) < self.interval
        );
        if !recently_logged {
            self.last_logged = Some((code, now));
        }
        !recently_logged
    }
}

/// Exponential backoff with up to 25% jitter; the service's asked-for wait (capped) if longer.
fn retry_delay(options: &PokerOptions, attempt: u32, retry_after: Option<Duration>) -> Duration {
    let backoff = with_jitter(exponential_backoff(options, attempt));
    match retry_after {
        Some(wait) => wait.min(options.max_retry_after).max(backoff),
        None => backoff,
    }
}

fn exponential_backoff(options: &PokerOptions, attempt: u32) -> Duration {
    let factor = 2u32.saturating_pow(attempt.saturating_sub(1));
    options
        .first_backoff
        .saturating_mul(factor)
        .min(options.max_backoff)
}

fn with_jitter(delay: Duration) -> Duration {
    delay.saturating_add((delay / 4).mul_f64(rand::random::<f64>()))
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener as StdTcpListener;

    use wiremock::ResponseTemplate;

    use super::*;
    use crate::poke::pusher::test_support::{
        MockPusher, PATIENCE, Received, channel_counts, config_for_port, reply, space,
    };
    use crate::poke::pusher::{MAX_CHANNELS_PER_CALL, PusherPoker};

    #[test]
    fn backoff_grows_exponentially_with_bounded_jitter() {
        let options = PokerOptions::default();
        for _ in 0..100 {
            let first = retry_delay(&options, 1, None);
            assert!(first >= Duration::from_millis(100) && first <= Duration::from_millis(125));
            let third = retry_delay(&options, 3, None);
            assert!(third >= Duration::from_millis(400) && third <= Duration::from_millis(500));
            let capped = retry_delay(&options, 30, None);
            assert!(capped >= Duration::from_secs(2) && capped <= Duration::from_millis(2500));
        }
    }

    #[test]
    fn retry_after_is_honoured_and_capped() {
        let options = PokerOptions::default();
        let one_second = retry_delay(&options, 1, Some(Duration::from_secs(1)));
        assert_eq!(one_second, Duration::from_secs(1));
        let hour = retry_delay(&options, 1, Some(Duration::from_secs(3600)));
        assert_eq!(hour, options.max_retry_after);
    }

    #[test]
    fn rejection_log_repeats_the_same_status_at_most_once_per_interval() {
        let mut log = RejectionLog::new(Duration::from_secs(60));
        let start = Instant::now();
        assert!(log.should_log(401, start));
        assert!(!log.should_log(401, start + Duration::from_secs(59)));
        assert!(log.should_log(403, start + Duration::from_secs(59)));
        assert!(log.should_log(401, start + Duration::from_secs(60)));
        assert!(!log.should_log(401, start + Duration::from_secs(61)));
        assert!(log.should_log(401, start + Duration::from_secs(121)));
    }

    fn fast_options() -> PokerOptions {
        PokerOptions {
            first_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(40),
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(10),
            ..PokerOptions::default()
        }
    }

    /// Whether `poker` gives up a batch within [`PATIENCE`].
    async fn some_given_up<T: Transport>(poker: &Poker<T>) -> bool {
        tokio::time::timeout(PATIENCE, async {
            while poker.stats().given_up_spaces == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .is_ok()
    }

    /// A transport whose first call panics (a fault no real service produces on demand: it
    /// stands for a bug in a client library) and whose later calls succeed.
    #[derive(Default)]
    struct PanicsOnce {
        calls: std::sync::atomic::AtomicUsize,
    }

    impl Transport for PanicsOnce {
        const NAME: &'static str = "test";
        const MAX_SPACES_PER_CALL: usize = 100;

        async fn send(&self, _spaces: &[SpaceId]) -> Sent {
            let earlier_calls = self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            assert!(earlier_calls > 0, "a bug in the client");
            Sent::Accepted
        }
    }

    #[tokio::test]
    async fn a_panicking_client_costs_its_batch_and_later_pokes_still_go() {
        let poker = Poker::spawn(Ok(PanicsOnce::default()), fast_options());
        poker.space_changed(&space("first"), Instant::now());
        assert!(
            some_given_up(&poker).await,
            "the panicked batch was never given up"
        );

        poker.space_changed(&space("second"), Instant::now());
        assert_eq!(poker.shutdown(PATIENCE).await, 0);
        let stats = poker.stats();
        assert_eq!(
            (stats.spaces_poked, stats.given_up_spaces),
            (1, 1),
            "{stats:?}"
        );
        assert_eq!(
            poker
                .transport()
                .map(|t| t.calls.load(std::sync::atomic::Ordering::SeqCst)),
            Some(2)
        );
    }

    fn assert_all_well_formed(requests: &[Received]) {
        for request in requests {
            assert!(request.signed_correctly, "badly signed: {request:?}");
            assert_eq!(request.event, "poke");
            assert_eq!(request.data, "", "a poke carries no data");
            assert!(request.channels.len() <= MAX_CHANNELS_PER_CALL);
            assert!(request.user_agent.starts_with("replisync/"), "{request:?}");
        }
    }

    fn unused_port() -> u16 {
        let listener = StdTcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("address").port()
    }

    #[tokio::test]
    async fn changes_made_together_become_one_call() {
        let mock = MockPusher::start(vec![]).await;
        let poker = PusherPoker::start(mock.config(), fast_options());
        let sink: Arc<dyn PokeSink> = poker.clone();
        for _ in 0..50 {
            sink.space_changed(&space("s1"), Instant::now());
        }
        assert_eq!(poker.shutdown(PATIENCE).await, 0);

        let requests = mock.requests().await;
        assert_eq!(requests.len(), 1, "{requests:?}");
        assert_eq!(requests[0].channels, ["space-s1"]);
        assert_all_well_formed(&requests);
        let stats = poker.stats();
        assert_eq!((stats.calls_ok, stats.spaces_poked), (1, 1));
    }

    #[tokio::test]
    async fn changes_while_a_call_is_in_flight_coalesce_into_one_more_call() {
        let mock = MockPusher::start(vec![reply(200).set_delay(Duration::from_millis(300))]).await;
        let poker = PusherPoker::start(mock.config(), fast_options());
        poker.space_changed(&space("s1"), Instant::now());
        mock.wait_for_requests(1).await;
        for _ in 0..49 {
            poker.space_changed(&space("s1"), Instant::now());
        }
        assert_eq!(poker.shutdown(PATIENCE).await, 0);

        let requests = mock.requests().await;
        assert_eq!(requests.len(), 2, "{requests:?}");
        for request in &requests {
            assert_eq!(request.channels, ["space-s1"]);
        }
        assert_all_well_formed(&requests);
        assert_eq!(poker.stats().spaces_poked, 2);
    }

    #[tokio::test]
    async fn an_idle_poker_calls_at_once_and_changes_right_after_wait_for_the_window() {
        let mock = MockPusher::start(vec![]).await;
        // A window far longer than the wait for the first call: that call cannot have waited
        // for it.
        let options = PokerOptions {
            coalesce_window: PATIENCE * 2,
            ..fast_options()
        };
        let poker = PusherPoker::start(mock.config(), options);
        poker.space_changed(&space("s1"), Instant::now());
        mock.wait_for_requests(1).await;
        // Right after that call, changes wait for the window and coalesce. Shutdown flushes
        // them without waiting for the window (were it to wait, it would give them up at its
        // deadline, half the window): one call for all.
        for n in 0..20 {
            poker.space_changed(&space(&format!("s{n}")), Instant::now());
        }
        assert_eq!(poker.shutdown(PATIENCE).await, 0);
        let requests = mock.requests().await;
        assert_eq!(requests.len(), 2, "{requests:?}");
        assert_eq!(requests[1].channels.len(), 20);
        assert_all_well_formed(&requests);
    }

    #[tokio::test]
    async fn the_call_after_a_call_waits_for_the_coalescing_window() {
        let mock = MockPusher::start(vec![]).await;
        let window = Duration::from_millis(300);
        let options = PokerOptions {
            coalesce_window: window,
            ..fast_options()
        };
        let poker = PusherPoker::start(mock.config(), options);
        // The window counts from the end of the first call, which is after this.
        let first_asked = Instant::now();
        poker.space_changed(&space("first"), first_asked);
        mock.wait_for_requests(1).await;
        for n in 0..20 {
            poker.space_changed(&space(&format!("s{n}")), Instant::now());
        }
        let second_seen = mock.wait_for_requests(2).await;
        let apart = second_seen.duration_since(first_asked);
        assert!(
            apart >= window,
            "the second call came {apart:?} after the first, inside the {window:?} window"
        );
        assert_eq!(poker.shutdown(PATIENCE).await, 0);
        let requests = mock.requests().await;
        assert_eq!(requests.len(), 2, "{requests:?}");
        assert_eq!(requests[1].channels.len(), 20, "one call for the window");
        assert_all_well_formed(&requests);
    }

    #[tokio::test]
    async fn a_poker_dropped_without_shutdown_still_delivers_what_is_pending() {
        let mock = MockPusher::start(vec![reply(200).set_delay(Duration::from_millis(100))]).await;
        let poker = PusherPoker::start(mock.config(), fast_options());
        poker.space_changed(&space("in-flight"), Instant::now());
        mock.wait_for_requests(1).await;
        poker.space_changed(&space("pending"), Instant::now());
        let shared = Arc::clone(&poker.shared);
        drop(poker);
        assert!(
            !shared.queue().is_accepting(),
            "a dropped poker accepts no more changes"
        );
        mock.wait_for_requests(2).await;
        let requests = mock.requests().await;
        let channels: Vec<Vec<String>> = requests.iter().map(|r| r.channels.clone()).collect();
        assert_eq!(channels, [vec!["space-in-flight"], vec!["space-pending"]]);
        assert_all_well_formed(&requests);
        let delivered = tokio::time::timeout(PATIENCE, async {
            while shared.counters.snapshot().spaces_poked < 2 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        assert!(
            delivered.is_ok(),
            "the worker did not count both calls: {:?}",
            shared.counters.snapshot()
        );
    }

    #[tokio::test]
    async fn many_spaces_are_batched_at_most_100_channels_per_call() {
        let mock = MockPusher::start(vec![]).await;
        let poker = PusherPoker::start(mock.config(), fast_options());
        let spaces: Vec<SpaceId> = (0..250).map(|n| space(&format!("s{n}"))).collect();
        for space in &spaces {
            poker.space_changed(space, Instant::now());
        }
        assert_eq!(poker.shutdown(PATIENCE).await, 0);

        let requests = mock.requests().await;
        assert_all_well_formed(&requests);
        let sizes: Vec<usize> = requests.iter().map(|r| r.channels.len()).collect();
        assert_eq!(sizes, [100, 100, 50]);
        let counts = channel_counts(&requests);
        assert_eq!(counts.len(), 250);
        for space in &spaces {
            assert_eq!(counts.get(&format!("space-{}", space.as_str())), Some(&1));
        }
        let stats = poker.stats();
        assert_eq!((stats.calls_ok, stats.spaces_poked), (3, 250));
    }

    #[tokio::test]
    async fn server_error_then_success_is_delivered_after_a_retry() {
        let mock = MockPusher::start(vec![reply(500)]).await;
        let poker = PusherPoker::start(mock.config(), fast_options());
        poker.space_changed(&space("a"), Instant::now());
        assert_eq!(poker.shutdown(PATIENCE).await, 0);

        let requests = mock.requests().await;
        assert_eq!(requests.len(), 2);
        assert!(requests.iter().all(|r| r.channels == ["space-a"]));
        assert_all_well_formed(&requests);
        let stats = poker.stats();
        assert_eq!(stats.calls_ok, 1);
        assert_eq!(stats.spaces_poked, 1);
        assert_eq!(stats.failed_calls, 1);
        assert_eq!(stats.retries, 1);
        assert_eq!(stats.given_up_spaces, 0);
    }

    #[tokio::test]
    async fn persistent_server_errors_give_up_after_max_attempts() {
        let mock = MockPusher::start(vec![reply(503); 10]).await;
        let options = PokerOptions {
            max_attempts: 3,
            ..fast_options()
        };
        let poker = PusherPoker::start(mock.config(), options);
        poker.space_changed(&space("a"), Instant::now());
        assert_eq!(poker.shutdown(PATIENCE).await, 1);

        assert_eq!(mock.requests().await.len(), 3);
        let stats = poker.stats();
        assert_eq!(stats.failed_calls, 3);
        assert_eq!(stats.retries, 2);
        assert_eq!(stats.given_up_spaces, 1);
        assert_eq!(stats.calls_ok, 0);
    }

    #[tokio::test]
    async fn rate_limited_call_waits_for_retry_after_then_delivers() {
        let mock = MockPusher::start(vec![reply(429).insert_header("retry-after", "1")]).await;
        let poker = PusherPoker::start(mock.config(), fast_options());
        poker.space_changed(&space("a"), Instant::now());
        let first_seen = mock.wait_for_requests(1).await;
        let second_seen = mock.wait_for_requests(2).await;
        assert_eq!(poker.shutdown(PATIENCE).await, 0);

        let requests = mock.requests().await;
        assert_eq!(requests.len(), 2);
        assert_all_well_formed(&requests);
        let waited = second_seen.duration_since(first_seen);
        assert!(
            waited >= Duration::from_millis(900) && waited < Duration::from_secs(8),
            "waited {waited:?}"
        );
        let stats = poker.stats();
        assert_eq!(
            (stats.calls_ok, stats.retries, stats.failed_calls),
            (1, 1, 1)
        );
    }

    #[tokio::test]
    async fn rejected_call_is_not_retried_and_later_pokes_still_work() {
        let unauthorized =
            ResponseTemplate::new(401).set_body_string(r#"{"error":"Invalid signature"}"#);
        let mock = MockPusher::start(vec![unauthorized]).await;
        let poker = PusherPoker::start(mock.config(), fast_options());
        poker.space_changed(&space("a"), Instant::now());
        mock.wait_for_requests(1).await;
        assert!(
            some_given_up(&poker).await,
            "the rejected poke was never given up"
        );

        // The worker sends one batch at a time, retries included: a retry of a's call would
        // come before b's, so two calls, the second b's, prove a's was not retried.
        poker.space_changed(&space("b"), Instant::now());
        assert_eq!(poker.shutdown(PATIENCE).await, 0);
        let requests = mock.requests().await;
        assert_eq!(requests.len(), 2);
        assert_eq!(requests[1].channels, ["space-b"]);
        assert_all_well_formed(&requests);
        let stats = poker.stats();
        assert_eq!(stats.failed_calls, 1);
        assert_eq!(stats.retries, 0);
        assert_eq!(stats.given_up_spaces, 1);
        assert_eq!((stats.calls_ok, stats.spaces_poked), (1, 1));
    }

    #[tokio::test]
    async fn refused_connection_gives_up_after_bounded_attempts() {
        let options = PokerOptions {
            max_attempts: 3,
            ..fast_options()
        };
        let poker = PusherPoker::start(config_for_port(unused_port()), options);
        poker.space_changed(&space("a"), Instant::now());
        poker.space_changed(&space("b"), Instant::now());
        assert_eq!(poker.shutdown(PATIENCE).await, 2);

        let stats = poker.stats();
        assert_eq!(
            stats.failed_calls, 3,
            "one call per attempt for the one batch"
        );
        assert_eq!(stats.retries, 2);
        assert_eq!(stats.given_up_spaces, 2);
        assert_eq!(stats.calls_ok, 0);
    }

    #[tokio::test]
    async fn full_queue_drops_the_oldest_space_and_counts_it() {
        let mock = MockPusher::start(vec![reply(200).set_delay(Duration::from_millis(300))]).await;
        let options = PokerOptions {
            max_pending_spaces: 3,
            ..fast_options()
        };
        let poker = PusherPoker::start(mock.config(), options);
        poker.space_changed(&space("first"), Instant::now());
        mock.wait_for_requests(1).await;
        for id in ["a", "b", "c", "d", "e"] {
            poker.space_changed(&space(id), Instant::now());
        }
        assert_eq!(poker.stats().dropped_spaces, 2);
        assert_eq!(poker.shutdown(PATIENCE).await, 0);

        let requests = mock.requests().await;
        assert_all_well_formed(&requests);
        let channels: Vec<Vec<String>> = requests.into_iter().map(|r| r.channels).collect();
        assert_eq!(
            channels,
            [vec!["space-first"], vec!["space-c", "space-d", "space-e"]]
        );
        assert_eq!(poker.stats().spaces_poked, 4);
    }

    #[tokio::test]
    async fn shutdown_drains_pending_pokes_and_then_refuses_new_ones() {
        let slow = reply(200).set_delay(Duration::from_millis(50));
        let mock = MockPusher::start(vec![slow.clone(), slow]).await;
        let poker = PusherPoker::start(mock.config(), fast_options());
        for n in 0..150 {
            poker.space_changed(&space(&format!("s{n}")), Instant::now());
        }
        assert_eq!(poker.shutdown(PATIENCE).await, 0);

        let requests = mock.requests().await;
        assert_eq!(requests.len(), 2);
        assert_all_well_formed(&requests);
        let counts = channel_counts(&requests);
        assert_eq!(counts.len(), 150);
        assert!(counts.values().all(|&count| count == 1));

        // The worker has ended (shutdown awaited it): a poke now is refused and counted.
        poker.space_changed(&space("late"), Instant::now());
        assert_eq!(mock.requests().await.len(), 2, "no poke after shutdown");
        let stats = poker.stats();
        assert_eq!((stats.spaces_poked, stats.dropped_spaces), (150, 1));
    }

    #[tokio::test]
    async fn shutdown_gives_up_at_the_deadline() {
        let mock = MockPusher::start(vec![reply(200).set_delay(Duration::from_secs(5))]).await;
        let poker = PusherPoker::start(mock.config(), fast_options());
        poker.space_changed(&space("in-flight"), Instant::now());
        mock.wait_for_requests(1).await;
        poker.space_changed(&space("p1"), Instant::now());
        poker.space_changed(&space("p2"), Instant::now());

        let started = Instant::now();
        assert_eq!(poker.shutdown(Duration::from_millis(200)).await, 3);
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
        let stats = poker.stats();
        assert_eq!((stats.given_up_spaces, stats.calls_ok), (3, 0));
        assert_eq!(poker.shutdown(Duration::from_millis(200)).await, 0);
    }

    #[tokio::test]
    async fn an_invalid_configuration_drops_pokes_without_panicking() {
        let mut config = config_for_port(unused_port());
        config.channel_prefix = "bad:prefix".to_owned();
        let poker = PusherPoker::start(config, fast_options());
        poker.space_changed(&space("a"), Instant::now());
        assert_eq!(poker.shutdown(PATIENCE).await, 1);
        let stats = poker.stats();
        assert_eq!((stats.given_up_spaces, stats.failed_calls), (1, 0));
    }
}
