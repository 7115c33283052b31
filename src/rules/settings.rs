//! Visibility rules' setting: the rules file (REPLISYNC_RULES), read and checked at start-up;
//! a file that does not parse stops the server, naming the entry and the problem.

use std::path::PathBuf;

use super::Rules;

/// Largest rules file read (a rules file is a few kilobytes).
const MAX_RULES_FILE_BYTES: u64 = 1024 * 1024;

/// Which keys of a space each caller may read and write.
#[derive(clap::Args, Debug, Clone)]
#[command(next_help_heading = "Visibility rules")]
pub struct RulesArgs {
    /// A JSON file of per-space key rules: which keys a caller may read and write, from its
    /// user id and token claims (docs/rules.md). Unset: no rules, every caller who may use a
    /// space reads and writes all of it.
    #[arg(long, env = "REPLISYNC_RULES")]
    pub rules: Option<PathBuf>,
}

impl RulesArgs {
    /// The rules, read now; none without REPLISYNC_RULES.
    pub fn load(&self) -> anyhow::Result<Rules> {
        let Some(path) = &self.rules else {
            return Ok(Rules::none());
        };
        let shown = path.display();
        let size = std::fs::metadata(path)
            .map_err(|e| anyhow::anyhow!("REPLISYNC_RULES: cannot read {shown}: {e}"))?
            .len();
        if size > MAX_RULES_FILE_BYTES {
            anyhow::bail!(
                "REPLISYNC_RULES: {shown} has {size} bytes, more than a rules file may \
                 ({MAX_RULES_FILE_BYTES}); use prefixes and claims rather than listing keys"
            );
        }
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("REPLISYNC_RULES: cannot read {shown}: {e}"))?;
        let rules =
            Rules::parse(&text).map_err(|e| anyhow::anyhow!("REPLISYNC_RULES: {shown}: {e}"))?;
        tracing::info!(file = %shown, spaces = rules.len(), "visibility rules on");
        Ok(rules)
    }
}
