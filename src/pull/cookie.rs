//! A pull's cookie: where the client stands, and the one its answer carries. In a space without
//! rules it is the space's version, a number. In a space with rules it is an object,
//! `{"order": version × 1024 + resets, "rules": fingerprint}`: the fingerprint of what the
//! caller could read, so that a change of its claims or of the rules is seen at the next pull,
//! and a count of the resets that change caused at one version, so that the reset's answer
//! has a higher `order` than the cookie (Replicache ignores an answer whose cookie is not
//! higher) without moving the space.

use std::fmt::Write;

use crate::protocol::{Cookie, MAX_COOKIE_ORDER};
use crate::rules::{ALL_KEYS, CallerKeys};

/// Resets one version may count: `order` is version × 1024 + resets.
const RESETS_PER_VERSION: u64 = 1024;

/// Highest version an object cookie can carry (8.8 × 10^12): `order` stays exact in JavaScript.
const MAX_ORDERED_VERSION: u64 = MAX_COOKIE_ORDER / RESETS_PER_VERSION;

/// Where a client stands: the version it has, and what it could read then.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Position {
    pub version: u64,
    /// Visibility resets answered at `version` (0 for a number cookie).
    resets: u64,
    /// The fingerprint of the keys the caller could read; `None` for a number cookie, which
    /// was issued without rules (every key).
    rules: Option<String>,
}

impl Position {
    pub(super) fn of(cookie: Cookie) -> Position {
        match cookie {
            Cookie::Version(version) => Position {
                version,
                resets: 0,
                rules: None,
            },
            Cookie::Ordered { order, rules } => Position {
                version: order / RESETS_PER_VERSION,
                resets: order % RESETS_PER_VERSION,
                rules: Some(rules),
            },
        }
    }

    /// Whether the caller may now read other keys than when this cookie was issued: then its
    /// next answer starts from scratch (a `clear` and every key it may read now).
    pub(super) fn visibility_changed(&self, keys: &CallerKeys) -> bool {
        let then = self.rules.as_deref().unwrap_or(ALL_KEYS);
        then != keys.read_fingerprint()
    }

    fn order(&self) -> u64 {
        self.version * RESETS_PER_VERSION + self.resets
    }
}

/// The cookie an answer carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum AnswerCookie {
    Version(u64),
    Ordered { order: u64, rules: String },
}

/// The cookie of an answer holding the space at `version`, to a pull from `base`
/// (`None`: a first pull). It is never lower than `base`, and higher whenever the answer
/// changes what the client holds: a newer version, or a reset for a change of visibility
/// (`visibility_reset`). An object once the space has rules or the client had one.
pub(super) fn answer_cookie(
    version: u64,
    base: Option<&Position>,
    visibility_reset: bool,
    keys: &CallerKeys,
) -> AnswerCookie {
    let ordered = keys.is_ruled() || base.is_some_and(|base| base.rules.is_some());
    if !ordered {
        let floor = base.map_or(0, |base| base.version);
        return AnswerCookie::Version(version.max(floor));
    }
    let order = match base {
        Some(base) if version <= base.version => {
            let bump = u64::from(visibility_reset && version == base.version);
            if base.resets + bump >= RESETS_PER_VERSION {
                // A client whose visibility changed 1,024 times at one version: this answer has
                // its cookie's order, which the client ignores; the space's next write moves the
                // version, and that pull resets it.
                tracing::warn!(
                    version,
                    "visibility changed too often at one version; the reset waits for the space's next write"
                );
                base.order()
            } else {
                base.order() + bump
            }
        }
        _ => version.min(MAX_ORDERED_VERSION) * RESETS_PER_VERSION,
    };
    AnswerCookie::Ordered {
        order,
        rules: keys.read_fingerprint().to_owned(),
    }
}

impl AnswerCookie {
    /// The cookie's JSON, as the answer's `cookie` field.
    pub(super) fn write_json(&self, out: &mut String) {
        match self {
            // Writing to a String cannot fail. A fingerprint is hex digits or `all`: nothing to
            // escape.
            AnswerCookie::Version(version) => {
                let _ = write!(out, "{version}");
            }
            AnswerCookie::Ordered { order, rules } => {
                let _ = write!(out, "{{\"order\":{order},\"rules\":\"{rules}\"}}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::{KeyPattern, KeySet};

    fn ruled(prefix: &str) -> CallerKeys {
        let read = KeySet::Only(vec![KeyPattern {
            text: prefix.into(),
            prefix: true,
        }]);
        CallerKeys::ruled(read.clone(), read)
    }

    fn order_of(cookie: &AnswerCookie) -> u64 {
        match cookie {
            AnswerCookie::Version(version) => *version,
            AnswerCookie::Ordered { order, .. } => *order,
        }
    }

    fn position_of(cookie: AnswerCookie) -> Position {
        Position::of(match cookie {
            AnswerCookie::Version(version) => Cookie::Version(version),
            AnswerCookie::Ordered { order, rules } => Cookie::Ordered { order, rules },
        })
    }

    #[test]
    fn spaces_without_rules_keep_number_cookies() {
        let keys = CallerKeys::unruled();
        assert_eq!(
            answer_cookie(7, None, false, &keys),
            AnswerCookie::Version(7)
        );
        let base = Position::of(Cookie::Version(9));
        assert_eq!(
            answer_cookie(7, Some(&base), false, &keys),
            AnswerCookie::Version(9)
        );
        assert!(!base.visibility_changed(&keys));
    }

    #[test]
    fn a_visibility_reset_moves_the_order_without_moving_the_version() {
        let (alice, red) = (ruled("user/alice/"), ruled("team/red/"));
        let first = answer_cookie(5, None, false, &alice);
        assert_eq!(order_of(&first), 5 * 1024);
        let at_five = position_of(first);
        assert!(!at_five.visibility_changed(&alice));
        assert!(at_five.visibility_changed(&red));
        let reset = answer_cookie(5, Some(&at_five), true, &red);
        assert_eq!(order_of(&reset), 5 * 1024 + 1);
        let after_reset = position_of(reset);
        assert_eq!(after_reset.version, 5);
        assert!(!after_reset.visibility_changed(&red));
        // Nothing changed: the same order. A new version: above any reset count.
        let same = answer_cookie(5, Some(&after_reset), false, &red);
        assert_eq!(order_of(&same), 5 * 1024 + 1);
        assert_eq!(
            order_of(&answer_cookie(6, Some(&after_reset), false, &red)),
            6 * 1024
        );
    }

    #[test]
    fn cookies_never_go_backwards_when_rules_come_or_go() {
        let keys = ruled("shared/");
        for version in [0, 1, 40] {
            let number = Position::of(Cookie::Version(version));
            assert!(number.visibility_changed(&keys));
            let reset = answer_cookie(version, Some(&number), true, &keys);
            assert!(order_of(&reset) > version, "{reset:?}");
            // The rules go away: the client keeps an object cookie, and resets to all keys.
            let ruled_position = position_of(reset);
            let unruled = CallerKeys::unruled();
            assert!(ruled_position.visibility_changed(&unruled));
            let back = answer_cookie(version, Some(&ruled_position), true, &unruled);
            assert!(order_of(&back) > ruled_position.order());
            assert!(matches!(&back, AnswerCookie::Ordered { rules, .. } if rules == ALL_KEYS));
        }
    }

    #[test]
    fn resets_past_the_count_keep_the_order() {
        let keys = ruled("a/");
        let full = Position {
            version: 3,
            resets: RESETS_PER_VERSION - 1,
            rules: Some("x".into()),
        };
        assert_eq!(
            order_of(&answer_cookie(3, Some(&full), true, &keys)),
            full.order()
        );
        assert_eq!(
            order_of(&answer_cookie(4, Some(&full), true, &keys)),
            4 * 1024
        );
    }

    #[test]
    fn object_cookies_stay_exact_in_javascript() {
        let keys = ruled("a/");
        let order = order_of(&answer_cookie(u64::MAX / 2, None, false, &keys));
        assert!(order <= MAX_COOKIE_ORDER);
        let mut out = String::new();
        answer_cookie(2, None, false, &keys).write_json(&mut out);
        let parsed: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(parsed["order"], 2048);
    }
}
