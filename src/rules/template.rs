//! One key pattern of a rules file, as written (`team/{claims.team}/*`), and what it comes to
//! for one caller: a list of exact keys or key prefixes, one per value of its placeholders.

use serde_json::{Map, Value};

/// A pattern: literal text and placeholders, then `*` (a prefix) or nothing (one exact key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct KeyTemplate {
    parts: Vec<Part>,
    prefix: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    User,
    Claim(String),
}

/// A pattern as it applies to one caller: the key itself, or every key starting with it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KeyPattern {
    pub text: String,
    pub prefix: bool,
}

impl KeyPattern {
    pub fn matches(&self, key: &str) -> bool {
        if self.prefix {
            key.starts_with(&self.text)
        } else {
            key == self.text
        }
    }
}

/// What a pattern's placeholders are filled from.
#[derive(Debug, Clone, Copy)]
pub struct RuleInputs<'a> {
    pub user: &'a str,
    pub claims: &'a Map<String, Value>,
}

/// The expansion of a caller's patterns went past this many; the caller is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooManyPatterns;

impl KeyTemplate {
    /// Parses `{user}`, `{claims.NAME}`, literal text, and an optional final `*`.
    pub(super) fn parse(pattern: &str) -> Result<KeyTemplate, String> {
        let (body, prefix) = match pattern.strip_suffix('*') {
            Some(body) => (body, true),
            None => (pattern, false),
        };
        if body.contains('*') {
            return Err(format!(
                "{pattern:?}: `*` may only end a pattern (a prefix), as in \"shared/*\""
            ));
        }
        let parts = parse_parts(pattern, body)?;
        check_placeholders_are_delimited(pattern, &parts, prefix)?;
        Ok(KeyTemplate { parts, prefix })
    }

    /// Adds this pattern's expansion for `inputs` to `out`: one pattern per combination of its
    /// placeholders' values. A placeholder with no usable value (a claim missing, empty, of
    /// another type, or holding the separator that follows it) yields nothing: fail closed.
    pub(super) fn expand_into(
        &self,
        inputs: RuleInputs<'_>,
        out: &mut Vec<KeyPattern>,
        max: usize,
    ) -> Result<(), TooManyPatterns> {
        let mut texts = vec![String::new()];
        for (index, part) in self.parts.iter().enumerate() {
            let values = match part {
                Part::Text(text) => {
                    for expanded in &mut texts {
                        expanded.push_str(text);
                    }
                    continue;
                }
                Part::User => vec![inputs.user.to_owned()],
                Part::Claim(name) => claim_values(inputs.claims.get(name)),
            };
            let separator = self.separator_after(index);
            let values: Vec<String> = values
                .into_iter()
                .filter(|value| usable(value, separator))
                .collect();
            if texts.len().saturating_mul(values.len()) > max {
                return Err(TooManyPatterns);
            }
            texts = texts
                .iter()
                .flat_map(|text| values.iter().map(move |value| format!("{text}{value}")))
                .collect();
        }
        if out.len() + texts.len() > max {
            return Err(TooManyPatterns);
        }
        out.extend(texts.into_iter().map(|text| KeyPattern {
            text,
            prefix: self.prefix,
        }));
        Ok(())
    }

    /// The first character after the placeholder at `index` (`None` at the pattern's end).
    fn separator_after(&self, index: usize) -> Option<char> {
        match self.parts.get(index + 1) {
            Some(Part::Text(text)) => text.chars().next(),
            _ => None,
        }
    }
}

fn parse_parts(pattern: &str, body: &str) -> Result<Vec<Part>, String> {
    let mut parts = Vec::new();
    let mut rest = body;
    while !rest.is_empty() {
        let Some(open) = rest.find(['{', '}']) else {
            parts.push(Part::Text(rest.to_owned()));
            break;
        };
        if rest[open..].starts_with('}') {
            return Err(format!("{pattern:?}: a `}}` closes no placeholder"));
        }
        if open > 0 {
            parts.push(Part::Text(rest[..open].to_owned()));
        }
        let Some(close) = rest[open..].find('}') else {
            return Err(format!(
                "{pattern:?}: a placeholder is not closed with `}}`"
            ));
        };
        let name = &rest[open + 1..open + close];
        parts.push(placeholder(pattern, name)?);
        rest = &rest[open + close + 1..];
    }
    Ok(parts)
}

fn placeholder(pattern: &str, name: &str) -> Result<Part, String> {
    if name == "user" {
        return Ok(Part::User);
    }
    match name.strip_prefix("claims.") {
        Some(claim) if !claim.is_empty() && !claim.contains('{') => Ok(Part::Claim(claim.into())),
        _ => Err(format!(
            "{pattern:?}: unknown placeholder {{{name}}}; use {{user}} or {{claims.NAME}} (a \
             top-level claim of the caller's token)"
        )),
    }
}

/// A placeholder must be followed by literal text (its separator) or end an exact pattern:
/// with `user/{user}*` alice's pattern would cover alicia's keys, and with `{user}{claims.team}`
/// no separator keeps one value from running into the next.
fn check_placeholders_are_delimited(
    pattern: &str,
    parts: &[Part],
    prefix: bool,
) -> Result<(), String> {
    for (index, part) in parts.iter().enumerate() {
        if matches!(part, Part::Text(_)) {
            continue;
        }
        let delimited = match parts.get(index + 1) {
            Some(Part::Text(_)) => true,
            Some(_) => false,
            None => !prefix,
        };
        if !delimited {
            return Err(format!(
                "{pattern:?}: a placeholder must be followed by a separator (as in \
                 \"user/{{user}}/*\") or end the pattern without `*`; otherwise one user's \
                 pattern would cover another's keys"
            ));
        }
    }
    Ok(())
}

/// A claim's values: a string, an integer, or a list of them; anything else has none.
fn claim_values(claim: Option<&Value>) -> Vec<String> {
    fn scalar(value: &Value) -> Option<String> {
        match value {
            Value::String(text) => Some(text.clone()),
            Value::Number(n) if n.is_i64() || n.is_u64() => Some(n.to_string()),
            _ => None,
        }
    }
    match claim {
        Some(Value::Array(items)) => items.iter().filter_map(scalar).collect(),
        Some(value) => scalar(value).into_iter().collect(),
        None => Vec::new(),
    }
}

/// A value fills a placeholder only when it is not empty and does not hold the separator that
/// follows the placeholder: "a/b" in `user/{user}/*` would make a pattern inside user a's.
fn usable(value: &str, separator: Option<char>) -> bool {
    !value.is_empty() && separator.is_none_or(|separator| !value.contains(separator))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn expand(pattern: &str, user: &str, claims: Value) -> Vec<KeyPattern> {
        let claims = claims.as_object().unwrap().clone();
        let mut out = Vec::new();
        KeyTemplate::parse(pattern)
            .unwrap()
            .expand_into(
                RuleInputs {
                    user,
                    claims: &claims,
                },
                &mut out,
                100,
            )
            .unwrap();
        out
    }

    fn prefix(text: &str) -> KeyPattern {
        KeyPattern {
            text: text.into(),
            prefix: true,
        }
    }

    #[test]
    fn placeholders_take_the_user_and_each_claim_value() {
        assert_eq!(
            expand("user/{user}/*", "alice", json!({})),
            [prefix("user/alice/")]
        );
        assert_eq!(
            expand(
                "team/{claims.teams}/*",
                "a",
                json!({"teams": ["red", 7, true, null]})
            ),
            [prefix("team/red/"), prefix("team/7/")]
        );
        assert_eq!(
            expand("config", "a", json!({})),
            [KeyPattern {
                text: "config".into(),
                prefix: false
            }]
        );
        assert_eq!(expand("*", "a", json!({})), [prefix("")]);
    }

    #[test]
    fn unusable_values_yield_nothing() {
        let claims = json!({"team": "", "bad": "red/../blue", "obj": {"a": 1}, "f": 1.5});
        for pattern in [
            "team/{claims.team}/*",
            "team/{claims.bad}/*",
            "team/{claims.obj}/*",
            "team/{claims.f}/*",
            "team/{claims.missing}/*",
        ] {
            assert_eq!(expand(pattern, "a", claims.clone()), [], "{pattern}");
        }
        assert_eq!(expand("user/{user}/*", "a/b", json!({})), []);
    }

    #[test]
    fn malformed_patterns_are_refused_with_the_reason() {
        for (pattern, says) in [
            ("a*/b", "may only end"),
            ("user/{user}*", "separator"),
            ("{user}{claims.team}/x", "separator"),
            ("user/{name}/*", "unknown placeholder"),
            ("user/{claims.}/*", "unknown placeholder"),
            ("user/{user/*", "not closed"),
            ("user/}/*", "closes no placeholder"),
        ] {
            let error = KeyTemplate::parse(pattern).unwrap_err();
            assert!(error.contains(says), "{pattern}: {error}");
        }
        assert!(KeyTemplate::parse("user/{user}").is_ok());
    }

    #[test]
    fn expansion_is_bounded() {
        let teams: Vec<String> = (0..50).map(|i| format!("t{i}")).collect();
        let claims = json!({ "teams": teams });
        let claims = claims.as_object().unwrap();
        let template = KeyTemplate::parse("{claims.teams}/{claims.teams}/*").unwrap();
        let inputs = RuleInputs { user: "u", claims };
        let mut out = Vec::new();
        assert_eq!(
            template.expand_into(inputs, &mut out, 100),
            Err(TooManyPatterns)
        );
    }
}
