//! Push's settings: what one push may carry and do, and how pushes to one space are grouped,
//! from the `REPLISYNC_*PUSH*` variables, checked at start-up with messages naming the variable.

use std::time::Duration;

/// The push variables as given; [`PushArgs::limits`] checks them.
#[derive(clap::Args, Debug, Clone)]
#[command(next_help_heading = "Push")]
pub struct PushArgs {
    /// Largest accepted push body, in bytes (larger ones get 413). Replicache sends every
    /// pending mutation in one push, so this is what a client may have pending.
    #[arg(long, env = "REPLISYNC_MAX_PUSH_BODY_BYTES", default_value_t = 32 * 1024 * 1024)]
    pub max_push_body_bytes: usize,

    /// Most distinct client ids in one push (more get 400 and change nothing).
    #[arg(long, env = "REPLISYNC_MAX_CLIENTS_PER_PUSH", default_value_t = 100)]
    pub max_clients_per_push: usize,

    /// Most mutations one push applies; the rest stay pending on the client and are applied
    /// by its next pushes.
    #[arg(
        long,
        env = "REPLISYNC_MAX_MUTATIONS_PER_PUSH",
        default_value_t = 10_000
    )]
    pub max_mutations_per_push: usize,

    /// Most bytes of keys and values one push's mutators may put (built-in and JavaScript
    /// alike); the mutation that goes past it fails, its writes discarded, and the push goes on.
    #[arg(
        long,
        env = "REPLISYNC_MAX_PUSH_WRITE_BYTES",
        default_value_t = 64 * 1024 * 1024
    )]
    pub max_push_write_bytes: usize,

    /// Milliseconds a push spends running mutators before it commits what it applied and
    /// answers 503 PartiallyApplied (the client sends the rest at once). Unset: a third of
    /// REPLISYNC_REQUEST_TIMEOUT_SECS, so the wait for the space's lock and the commit fit in
    /// what remains.
    #[arg(long, env = "REPLISYNC_PUSH_TIME_BUDGET_MS")]
    pub push_time_budget_ms: Option<u64>,

    /// Bytes of push bodies read at once across all requests; a push beyond it gets 503 with
    /// `Retry-After` (the client retries).
    #[arg(long, env = "REPLISYNC_MAX_PUSH_BYTES_IN_FLIGHT", default_value_t = 64 * 1024 * 1024)]
    pub max_push_bytes_in_flight: usize,

    /// Most pushes to one space applied in one transaction (group commit: pushes that arrive
    /// while their space's transaction is busy are applied together in the next). 1 applies
    /// every push in a transaction of its own.
    #[arg(long, env = "REPLISYNC_PUSH_GROUP_MAX_PUSHES", default_value_t = 64)]
    pub push_group_max_pushes: usize,

    /// Milliseconds after which a push group starts no more pushes; those left go to the next
    /// group, so no push waits long behind others.
    #[arg(long, env = "REPLISYNC_PUSH_GROUP_MAX_AGE_MS", default_value_t = 50)]
    pub push_group_max_age_ms: u64,
}

impl PushArgs {
    /// The limits, checked: none may be 0, the time budget must end before the request's
    /// timeout, and a push of the largest size must fit in the in-flight budget.
    pub fn limits(&self, request_timeout: Duration) -> Result<PushLimits, String> {
        for (value, variable) in [
            (self.max_push_body_bytes, "REPLISYNC_MAX_PUSH_BODY_BYTES"),
            (self.max_clients_per_push, "REPLISYNC_MAX_CLIENTS_PER_PUSH"),
            (
                self.max_mutations_per_push,
                "REPLISYNC_MAX_MUTATIONS_PER_PUSH",
            ),
            (self.max_push_write_bytes, "REPLISYNC_MAX_PUSH_WRITE_BYTES"),
            (
                self.push_group_max_pushes,
                "REPLISYNC_PUSH_GROUP_MAX_PUSHES",
            ),
        ] {
            if value == 0 {
                return Err(format!("{variable} must be above 0"));
            }
        }
        let request_timeout_secs = request_timeout.as_secs();
        if let Some(budget) = self.push_time_budget_ms
            && (budget == 0 || budget >= request_timeout_secs.max(1) * 1000)
        {
            return Err(format!(
                "REPLISYNC_PUSH_TIME_BUDGET_MS ({budget}) must be above 0 and below REPLISYNC_REQUEST_TIMEOUT_SECS ({request_timeout_secs} s), or the push would time out before it commits"
            ));
        }
        if self.max_push_bytes_in_flight < self.max_push_body_bytes {
            return Err(format!(
                "REPLISYNC_MAX_PUSH_BYTES_IN_FLIGHT ({}) must be at least REPLISYNC_MAX_PUSH_BODY_BYTES ({}): a push of the largest size must be able to get in",
                self.max_push_bytes_in_flight, self.max_push_body_bytes
            ));
        }
        Ok(PushLimits {
            max_body_bytes: self.max_push_body_bytes,
            max_clients: self.max_clients_per_push,
            max_mutations: self.max_mutations_per_push,
            max_write_bytes: self.max_push_write_bytes,
            max_bytes_in_flight: self.max_push_bytes_in_flight,
            time_budget: self.push_time_budget_ms.map(Duration::from_millis),
            group: GroupLimits {
                max_pushes: self.push_group_max_pushes,
                max_age: Duration::from_millis(self.push_group_max_age_ms),
            },
        })
    }
}

/// Bounds on one push, and on pushes together; a real client never meets them.
#[derive(Clone, Debug)]
pub struct PushLimits {
    /// Largest push body, in bytes (413 beyond it).
    pub max_body_bytes: usize,
    /// Most distinct client ids in one push (400 beyond it).
    pub max_clients: usize,
    /// Most mutations one push applies; later ones are left for the next push.
    pub max_mutations: usize,
    /// Most bytes of keys and values one push's mutators may put; the mutation that goes past
    /// it fails.
    pub max_write_bytes: usize,
    /// Bytes of push bodies read at once (503 with `Retry-After` beyond it).
    pub max_bytes_in_flight: usize,
    /// Time spent running mutators before the push commits what it applied; `None`: a third of
    /// the request timeout.
    pub time_budget: Option<Duration>,
    /// How many pushes to one space share a transaction.
    pub group: GroupLimits,
}

impl PushLimits {
    /// Time a push spends running mutators before it commits what it applied and leaves the
    /// rest for the next push: as configured, or a third of the request timeout, so the commit
    /// and the wait for the space's lock fit in what remains.
    pub fn work_budget(&self, request_timeout: Duration) -> Duration {
        self.time_budget.unwrap_or(request_timeout / 3)
    }
}

/// How large a push group may grow: no push waits long behind others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupLimits {
    /// Most pushes in one transaction; 1 turns grouping off.
    pub max_pushes: usize,
    /// No push after a group's first is started once the group has run this long: the rest go
    /// to the next group.
    pub max_age: Duration,
}

impl Default for GroupLimits {
    fn default() -> Self {
        GroupLimits {
            max_pushes: 64,
            max_age: Duration::from_millis(50),
        }
    }
}

impl Default for PushLimits {
    fn default() -> Self {
        PushLimits {
            max_body_bytes: 32 * 1024 * 1024,
            max_clients: 100,
            max_mutations: 10_000,
            max_write_bytes: 64 * 1024 * 1024,
            max_bytes_in_flight: 64 * 1024 * 1024,
            time_budget: None,
            group: GroupLimits::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(args: &[&str]) -> PushArgs {
        crate::config::parse_feature_args(args)
    }

    const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

    #[test]
    fn push_limits_are_checked_and_name_their_variable() {
        let push = args(&[]).limits(REQUEST_TIMEOUT).unwrap();
        assert_eq!(push.max_body_bytes, 32 * 1024 * 1024);
        assert_eq!(push.max_bytes_in_flight, 64 * 1024 * 1024);
        let mut small = args(&["--max-push-bytes-in-flight", "1024"]);
        assert!(
            small
                .limits(REQUEST_TIMEOUT)
                .unwrap_err()
                .contains("REPLISYNC_MAX_PUSH_BYTES_IN_FLIGHT")
        );
        small.max_push_bytes_in_flight = small.max_push_body_bytes;
        small.max_mutations_per_push = 0;
        assert!(
            small
                .limits(REQUEST_TIMEOUT)
                .unwrap_err()
                .contains("REPLISYNC_MAX_MUTATIONS_PER_PUSH")
        );
    }

    #[test]
    fn the_push_time_budget_defaults_to_a_third_of_the_request_timeout() {
        let nine = Duration::from_secs(9);
        let limits = args(&[]).limits(nine).unwrap();
        assert_eq!(limits.work_budget(nine), Duration::from_secs(3));
        let limits = args(&["--push-time-budget-ms", "250"])
            .limits(REQUEST_TIMEOUT)
            .unwrap();
        assert_eq!(
            limits.work_budget(REQUEST_TIMEOUT),
            Duration::from_millis(250)
        );
        let too_long = args(&["--push-time-budget-ms", "2000"]);
        assert!(
            too_long
                .limits(Duration::from_secs(2))
                .unwrap_err()
                .contains("REPLISYNC_PUSH_TIME_BUDGET_MS")
        );
    }
}
