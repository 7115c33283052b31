//! The app's JavaScript mutators' settings: the module to load and the bounds on running it,
//! from the `REPLISYNC_MUTATOR*` variables; [`MutatorArgs::load`] builds the registry from them.

use std::path::PathBuf;
use std::time::Duration;

use super::Mutators;
use super::js::{JsLimits, JsMutators};

/// The app's own mutators, in JavaScript, and the bounds on running them.
#[derive(clap::Args, Debug, Clone)]
#[command(next_help_heading = "JavaScript mutators")]
pub struct MutatorArgs {
    /// A JavaScript module exporting the app's mutators (the file the client passes to
    /// `new Replicache({mutators})`), run on every push beside the built-in ones.
    #[arg(long, env = "REPLISYNC_MUTATORS")]
    pub mutators: Option<PathBuf>,

    /// Milliseconds one JavaScript mutation may run, its reads included; past it the mutation
    /// fails (its writes discarded) and the push goes on.
    #[arg(long, env = "REPLISYNC_MUTATOR_TIMEOUT_MS", default_value_t = 1000)]
    pub mutator_timeout_ms: u64,

    /// Megabytes a JavaScript engine may hold while it runs a push's mutations; past it the
    /// mutation fails.
    #[arg(long, env = "REPLISYNC_MUTATOR_MEMORY_MB", default_value_t = 64)]
    pub mutator_memory_mb: usize,

    /// JavaScript engines (threads), hence pushes to different spaces running JavaScript at
    /// once. Unset: the number of CPUs.
    #[arg(long, env = "REPLISYNC_MUTATOR_ENGINES")]
    pub mutator_engines: Option<usize>,

    /// Megabytes a JavaScript engine may keep between pushes: the contexts (module loaded) of
    /// the spaces it served lately, so that their next pushes need not load the module again;
    /// past it the least recently used are dropped. At most half of REPLISYNC_MUTATOR_MEMORY_MB
    /// counts; 0 keeps none.
    #[arg(long, env = "REPLISYNC_MUTATOR_CONTEXTS_MB", default_value_t = DEFAULT_CONTEXTS_MB)]
    pub mutator_contexts_mb: usize,
}

impl MutatorArgs {
    /// The built-in mutators, and the app's JavaScript ones when REPLISYNC_MUTATORS names a module
    /// (loaded now: a module that does not load stops start-up, naming its file and line).
    pub fn load(&self) -> anyhow::Result<Mutators> {
        let Some(path) = &self.mutators else {
            return Ok(Mutators::builtin());
        };
        let limits = self.limits().map_err(anyhow::Error::msg)?;
        let js = JsMutators::load(path, limits)?;
        tracing::info!(
            module = %path.display(),
            engines = limits.engines,
            timeout_ms = limits.timeout.as_millis() as u64,
            memory_mb = limits.memory_bytes / (1024 * 1024),
            contexts_mb = self.mutator_contexts_mb,
            "JavaScript mutators on"
        );
        Ok(js.register(Mutators::builtin()))
    }

    /// The limits, checked.
    pub fn limits(&self) -> Result<JsLimits, String> {
        if self.mutator_timeout_ms == 0 {
            return Err("REPLISYNC_MUTATOR_TIMEOUT_MS must be above 0".into());
        }
        if self.mutator_memory_mb < MIN_MUTATOR_MEMORY_MB {
            return Err(format!(
                "REPLISYNC_MUTATOR_MEMORY_MB must be at least {MIN_MUTATOR_MEMORY_MB}: an engine needs that much for the module and its context"
            ));
        }
        if self.mutator_engines == Some(0) {
            return Err("REPLISYNC_MUTATOR_ENGINES must be above 0".into());
        }
        let defaults = JsLimits::default();
        Ok(JsLimits {
            timeout: Duration::from_millis(self.mutator_timeout_ms),
            memory_bytes: self.mutator_memory_mb.saturating_mul(1024 * 1024),
            engines: self.mutator_engines.unwrap_or(defaults.engines),
            contexts_bytes: self.mutator_contexts_mb.saturating_mul(1024 * 1024),
        })
    }
}

/// Below this an engine cannot even hold a context.
const MIN_MUTATOR_MEMORY_MB: usize = 4;

/// Room for the contexts of a couple of hundred spaces per engine (a context with a small module
/// takes about 100 KB), within half of the default REPLISYNC_MUTATOR_MEMORY_MB.
const DEFAULT_CONTEXTS_MB: usize = 24;

#[cfg(test)]
mod tests {
    use super::*;

    fn args(args: &[&str]) -> MutatorArgs {
        crate::config::parse_feature_args(args)
    }

    #[test]
    fn mutator_limits_default_and_name_their_variable() {
        let js = args(&[]);
        assert!(js.mutators.is_none());
        let limits = js.limits().unwrap();
        assert_eq!(limits.timeout, Duration::from_millis(1000));
        assert_eq!(limits.memory_bytes, 64 * 1024 * 1024);
        assert!(limits.engines >= 1);
        assert_eq!(limits.contexts_bytes, 24 * 1024 * 1024);
        let js = args(&["--mutator-timeout-ms", "0"]);
        assert!(
            js.limits()
                .unwrap_err()
                .contains("REPLISYNC_MUTATOR_TIMEOUT_MS")
        );
        let js = args(&["--mutator-memory-mb", "1"]);
        assert!(
            js.limits()
                .unwrap_err()
                .contains("REPLISYNC_MUTATOR_MEMORY_MB")
        );
        let js = args(&["--mutator-engines", "3", "--mutators", "app/mutators.js"]);
        assert_eq!(js.limits().unwrap().engines, 3);
        assert_eq!(js.mutators.unwrap(), PathBuf::from("app/mutators.js"));
        let js = args(&["--mutator-contexts-mb", "2"]);
        assert_eq!(js.limits().unwrap().contexts_bytes, 2 * 1024 * 1024);
    }
}
