//! Garbage collection's settings: the client and tombstone TTLs, the time between background
//! passes and their pacing, from the `REPLISYNC_*TTL` and `REPLISYNC_GC_*` variables.

use std::time::Duration;

use super::GcSettings;

/// The garbage collection variables as given; [`GcArgs::settings`] checks them.
#[derive(clap::Args, Debug, Clone)]
#[command(next_help_heading = "Garbage collection")]
pub struct GcArgs {
    /// Client groups that have neither pushed nor pulled for this long are deleted with their
    /// clients (a duration: `30d`, `12h`, `90m`, `3600s`, or seconds). A client that comes back
    /// later starts over by itself; its unpushed mutations are lost. Activity is recorded at
    /// most once per 24th of this, and at most hourly.
    #[arg(long, env = "REPLISYNC_CLIENT_TTL", default_value = "30d", value_parser = duration)]
    pub client_ttl: Duration,

    /// Deleted entries (tombstones) older than this are removed (a duration, as
    /// REPLISYNC_CLIENT_TTL). A client whose cookie is older than a removed deletion gets the
    /// whole space at its next pull instead of a delta.
    #[arg(long, env = "REPLISYNC_TOMBSTONE_TTL", default_value = "30d", value_parser = duration)]
    pub tombstone_ttl: Duration,

    /// Time between background garbage collection passes (a duration, as REPLISYNC_CLIENT_TTL);
    /// 0 turns them off (`replisync gc` still runs a pass). With Postgres, one instance at a
    /// time collects.
    #[arg(long, env = "REPLISYNC_GC_INTERVAL", default_value = "1h", value_parser = duration)]
    pub gc_interval: Duration,

    /// After each batch of 1000 rows, a background garbage collection pass pauses this many
    /// times as long as the batch took: it keeps at most 1/(1 + this) of one database connection
    /// busy. Lower drains a large backlog faster; 0 runs at full speed, as `replisync gc` does.
    #[arg(long, env = "REPLISYNC_GC_PAUSE_FACTOR", default_value_t = 19)]
    pub gc_pause_factor: u32,
}

impl GcArgs {
    /// Garbage collection's settings, checked: a TTL below a second would forget a client
    /// group between two of its requests.
    pub fn settings(&self) -> Result<GcSettings, String> {
        if self.client_ttl < Duration::from_secs(1) {
            return Err("REPLISYNC_CLIENT_TTL must be at least 1s (the default is 30d)".into());
        }
        if self.tombstone_ttl < Duration::from_secs(1) {
            return Err("REPLISYNC_TOMBSTONE_TTL must be at least 1s (the default is 30d)".into());
        }
        Ok(GcSettings {
            client_ttl: self.client_ttl,
            tombstone_ttl: self.tombstone_ttl,
            interval: Some(self.gc_interval).filter(|interval| !interval.is_zero()),
            pause_factor: self.gc_pause_factor,
        })
    }
}

/// A duration: a whole number with an optional unit, `s` (the default), `m`, `h` or `d`.
fn duration(raw: &str) -> Result<Duration, String> {
    let raw = raw.trim();
    let split = raw.find(|c: char| !c.is_ascii_digit()).unwrap_or(raw.len());
    let (number, unit) = raw.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{raw:?} is not a duration such as 30d, 12h, 90m or 3600s"))?;
    let unit_secs = match unit.trim() {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        other => return Err(format!("unknown duration unit {other:?}: use s, m, h or d")),
    };
    number
        .checked_mul(unit_secs)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("{raw:?} is too long"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(args: &[&str]) -> GcArgs {
        crate::config::parse_feature_args(args)
    }

    #[test]
    fn gc_durations_take_units_and_the_ttl_has_a_floor() {
        let defaults = config(&[]).settings().unwrap();
        assert_eq!(defaults.client_ttl, Duration::from_secs(30 * 86_400));
        assert_eq!(defaults.interval, Some(Duration::from_secs(3600)));
        assert_eq!(defaults.pause_factor, 19);
        let set = config(&["--client-ttl", "36h", "--gc-interval", "90m"]);
        assert_eq!(set.client_ttl, Duration::from_secs(36 * 3600));
        assert_eq!(set.gc_interval, Duration::from_secs(90 * 60));
        assert_eq!(duration("45"), Ok(Duration::from_secs(45)));
        assert!(duration("3 weeks").is_err());
        assert!(duration("d").is_err());
        // Activity is recorded to a 24th of the TTL, from a second up to an hour.
        let granularity = |ttl| crate::store::activity_granularity(duration(ttl).unwrap());
        assert_eq!(granularity("30d"), 3600);
        assert_eq!(granularity("2h"), 300);
        assert_eq!(granularity("4s"), 1);
        let off = config(&["--gc-interval", "0"]).settings().unwrap();
        assert_eq!(off.interval, None);
        let short = config(&["--client-ttl", "0"]).settings().unwrap_err();
        assert!(short.contains("REPLISYNC_CLIENT_TTL"), "{short}");
        let tombstones = config(&["--tombstone-ttl", "0s"]).settings().unwrap_err();
        assert!(
            tombstones.contains("REPLISYNC_TOMBSTONE_TTL"),
            "{tombstones}"
        );
    }
}
