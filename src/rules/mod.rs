//! Per-user visibility inside a space: the rules file (REPLISYNC_RULES) says, per space pattern,
//! which keys a caller may read and write, from its user id and token claims; pull and push ask.
//!
//! Rules look at keys only, never at values, so one check filters puts and dels alike (a `del`
//! never reveals a key the caller may not read) and no per-client state is kept.

mod keys;
pub mod settings;
mod template;

use serde::Deserialize;

pub use self::keys::{ALL_KEYS, CallerKeys, KeySet};
use self::template::KeyTemplate;
pub use self::template::{KeyPattern, RuleInputs, TooManyPatterns};
use crate::auth::space_matches;
use crate::protocol::SpaceId;

/// Most key patterns one caller's read (or write) rules may come to in one space, once each
/// placeholder is filled with each value of its claim: past it the caller is refused.
pub const MAX_PATTERNS_PER_CALLER: usize = 256;

/// Most patterns one space entry of the file may list, under `read` or `write`.
const MAX_PATTERNS_PER_RULE: usize = 64;

/// Most space entries a file may have (each request looks for its space's entry in order).
const MAX_SPACE_ENTRIES: usize = 1000;

/// The rules file, loaded once: space entries in file order, the first whose pattern matches a
/// space applies to it; a space no entry matches has no rules (everyone who may use it sees
/// and writes every key, as without a rules file).
#[derive(Debug, Clone, Default)]
pub struct Rules {
    spaces: Vec<SpaceRules>,
}

#[derive(Debug, Clone)]
struct SpaceRules {
    space: String,
    read: Vec<KeyTemplate>,
    write: Vec<KeyTemplate>,
}

/// The file as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RulesFile {
    spaces: Vec<SpaceEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SpaceEntry {
    space: String,
    #[serde(default)]
    read: Vec<String>,
    #[serde(default)]
    write: Vec<String>,
}

impl Rules {
    /// No rules: every space as without a rules file.
    pub fn none() -> Rules {
        Rules::default()
    }

    /// Parses a rules file, naming the first problem (entry, pattern and why).
    pub fn parse(text: &str) -> Result<Rules, String> {
        let file: RulesFile = serde_json::from_str(text).map_err(|error| {
            format!(
                "{error}; a rules file is {{\"spaces\": [{{\"space\": \"team-*\", \"read\": \
                 [\"shared/*\", \"user/{{user}}/*\"], \"write\": [\"user/{{user}}/*\"]}}]}}"
            )
        })?;
        if file.spaces.len() > MAX_SPACE_ENTRIES {
            return Err(format!(
                "{} space entries, more than {MAX_SPACE_ENTRIES}; give spaces that share rules \
                 one prefix entry (\"team-*\")",
                file.spaces.len()
            ));
        }
        let spaces = file
            .spaces
            .into_iter()
            .enumerate()
            .map(|(index, entry)| {
                SpaceRules::parse(entry).map_err(|e| format!("spaces[{index}]: {e}"))
            })
            .collect::<Result<_, _>>()?;
        Ok(Rules { spaces })
    }

    pub fn is_empty(&self) -> bool {
        self.spaces.is_empty()
    }

    /// How many space entries the file has (for the start-up log).
    pub fn len(&self) -> usize {
        self.spaces.len()
    }

    /// What `inputs` may read and write in `space`: everything when no entry matches the
    /// space; refused when the caller's claims expand past [`MAX_PATTERNS_PER_CALLER`].
    pub fn for_caller(
        &self,
        space: &SpaceId,
        inputs: RuleInputs<'_>,
    ) -> Result<CallerKeys, TooManyPatterns> {
        let Some(rules) = self
            .spaces
            .iter()
            .find(|rules| space_matches(&rules.space, space.as_str()))
        else {
            return Ok(CallerKeys::unruled());
        };
        Ok(CallerKeys::ruled(
            expand(&rules.read, inputs)?,
            expand(&rules.write, inputs)?,
        ))
    }
}

impl SpaceRules {
    fn parse(entry: SpaceEntry) -> Result<SpaceRules, String> {
        let SpaceEntry { space, read, write } = entry;
        let body = space.strip_suffix('*').unwrap_or(&space);
        if body.contains('*') || space.is_empty() {
            return Err(format!(
                "space {space:?}: name one space (\"doc-42\"), a prefix (\"team-*\") or every \
                 space (\"*\")"
            ));
        }
        Ok(SpaceRules {
            read: templates(&read, "read")?,
            write: templates(&write, "write")?,
            space,
        })
    }
}

fn templates(patterns: &[String], list: &str) -> Result<Vec<KeyTemplate>, String> {
    if patterns.len() > MAX_PATTERNS_PER_RULE {
        return Err(format!(
            "{list}: {} patterns, more than {MAX_PATTERNS_PER_RULE}; use prefixes",
            patterns.len()
        ));
    }
    patterns
        .iter()
        .map(|pattern| KeyTemplate::parse(pattern).map_err(|e| format!("{list}: {e}")))
        .collect()
}

fn expand(templates: &[KeyTemplate], inputs: RuleInputs<'_>) -> Result<KeySet, TooManyPatterns> {
    let mut patterns = Vec::new();
    for template in templates {
        template.expand_into(inputs, &mut patterns, MAX_PATTERNS_PER_CALLER)?;
    }
    Ok(KeySet::only(patterns))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    const TEAM_RULES: &str = r#"{"spaces": [
        {"space": "team-*",
         "read": ["shared/*", "user/{user}/*", "team/{claims.teams}/*"],
         "write": ["user/{user}/*", "team/{claims.teams}/*"]},
        {"space": "locked", "read": ["public/*"]}
    ]}"#;

    fn space(id: &str) -> SpaceId {
        SpaceId::parse(id).unwrap()
    }

    fn keys_of(rules: &Rules, space_id: &str, user: &str, claims: Value) -> CallerKeys {
        let claims = claims.as_object().unwrap().clone();
        rules
            .for_caller(
                &space(space_id),
                RuleInputs {
                    user,
                    claims: &claims,
                },
            )
            .unwrap()
    }

    #[test]
    fn the_first_matching_entry_decides_and_other_spaces_are_unruled() {
        let rules = Rules::parse(TEAM_RULES).unwrap();
        let alice = keys_of(&rules, "team-1", "alice", json!({"teams": ["red"]}));
        assert!(alice.is_ruled());
        assert!(alice.read.allows("shared/x") && !alice.write.allows("shared/x"));
        assert!(alice.read.allows("user/alice/x") && alice.write.allows("user/alice/x"));
        assert!(!alice.read.allows("user/bob/x") && !alice.write.allows("user/bob/x"));
        assert!(alice.read.allows("team/red/x") && !alice.read.allows("team/blue/x"));
        let locked = keys_of(&rules, "locked", "alice", json!({}));
        assert!(locked.read.allows("public/a") && !locked.write.allows("public/a"));
        assert_eq!(
            keys_of(&rules, "doc-1", "alice", json!({})),
            CallerKeys::unruled()
        );
    }

    #[test]
    fn bad_files_name_the_entry_and_the_problem() {
        for (text, says) in [
            ("{}", "missing field `spaces`"),
            (
                r#"{"spaces": [{"space": "a", "reads": []}]}"#,
                "unknown field `reads`",
            ),
            (
                r#"{"spaces": [{"space": "a*b"}]}"#,
                "spaces[0]: space \"a*b\"",
            ),
            (r#"{"spaces": [{"space": ""}]}"#, "spaces[0]"),
            (
                r#"{"spaces": [{"space": "a"}, {"space": "b", "write": ["x/{user}*"]}]}"#,
                "spaces[1]: write: \"x/{user}*\"",
            ),
        ] {
            let error = Rules::parse(text).unwrap_err();
            assert!(error.contains(says), "{text}: {error}");
        }
    }

    #[test]
    fn a_caller_whose_claims_expand_too_far_is_refused() {
        let rules = Rules::parse(TEAM_RULES).unwrap();
        let teams: Vec<String> = (0..=MAX_PATTERNS_PER_CALLER)
            .map(|i| format!("t{i}"))
            .collect();
        let claims = json!({ "teams": teams });
        let inputs = RuleInputs {
            user: "alice",
            claims: claims.as_object().unwrap(),
        };
        assert_eq!(
            rules.for_caller(&space("team-1"), inputs),
            Err(TooManyPatterns)
        );
    }
}
