//! What one caller may read and write in one space, once its rules are filled in: a set of
//! exact keys and key prefixes, checked per key, with a fingerprint that changes when it does.

use std::borrow::Cow;

use sha2::{Digest, Sha256};

use super::template::KeyPattern;

/// The keys a caller may read, or write.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum KeySet {
    /// Every key: a space without rules.
    All,
    /// Only keys matching one of these, sorted and without repeats (so equal sets compare
    /// equal, and callers whose patterns are equal may share an answer).
    Only(Vec<KeyPattern>),
}

impl KeySet {
    pub(super) fn only(mut patterns: Vec<KeyPattern>) -> KeySet {
        patterns.sort();
        patterns.dedup();
        KeySet::Only(patterns)
    }

    pub fn allows(&self, key: &str) -> bool {
        match self {
            KeySet::All => true,
            KeySet::Only(patterns) => patterns.iter().any(|pattern| pattern.matches(key)),
        }
    }

    pub fn is_all(&self) -> bool {
        matches!(self, KeySet::All)
    }

    /// A short text that changes when the set does (32 hex digits of a SHA-256 of its
    /// patterns; `all` for every key). A pull's cookie carries it, so the next pull knows
    /// whether what the caller may read changed since.
    pub fn fingerprint(&self) -> String {
        let KeySet::Only(patterns) = self else {
            return ALL_KEYS.to_owned();
        };
        let mut hash = Sha256::new();
        for pattern in patterns {
            hash.update((pattern.text.len() as u64).to_be_bytes());
            hash.update(pattern.text.as_bytes());
            hash.update([u8::from(pattern.prefix)]);
        }
        hex::encode(&hash.finalize()[..16])
    }
}

/// The fingerprint of [`KeySet::All`].
pub const ALL_KEYS: &str = "all";

/// What a caller may do in a space, with the fingerprint of its read set (computed once here;
/// in a space with rules, its pull cookies carry it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallerKeys {
    pub read: KeySet,
    pub write: KeySet,
    read_fingerprint: Cow<'static, str>,
}

impl CallerKeys {
    /// A space without rules: everything.
    pub fn unruled() -> CallerKeys {
        CallerKeys {
            read: KeySet::All,
            write: KeySet::All,
            read_fingerprint: Cow::Borrowed(ALL_KEYS),
        }
    }

    /// A space with rules, which give the caller these keys to read and to write.
    pub fn ruled(read: KeySet, write: KeySet) -> CallerKeys {
        CallerKeys {
            read_fingerprint: read.fingerprint().into(),
            read,
            write,
        }
    }

    /// Whether the space has rules for this caller (rules always name the keys it may read).
    pub fn is_ruled(&self) -> bool {
        !self.read.is_all()
    }

    /// [`KeySet::fingerprint`] of the read set.
    pub fn read_fingerprint(&self) -> &str {
        &self.read_fingerprint
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(text: &str, prefix: bool) -> KeyPattern {
        KeyPattern {
            text: text.into(),
            prefix,
        }
    }

    #[test]
    fn a_set_allows_its_exact_keys_and_prefixes_only() {
        let set = KeySet::only(vec![pattern("shared/", true), pattern("config", false)]);
        assert!(set.allows("shared/a"));
        assert!(set.allows("config"));
        assert!(!set.allows("config/x"));
        assert!(!set.allows("shared"));
        assert!(!set.allows("user/bob/x"));
        assert!(KeySet::only(Vec::new()) != KeySet::All);
        assert!(!KeySet::only(Vec::new()).allows(""));
    }

    #[test]
    fn fingerprints_follow_the_set_not_its_order() {
        let a = KeySet::only(vec![pattern("a/", true), pattern("b/", true)]);
        let b = KeySet::only(vec![
            pattern("b/", true),
            pattern("a/", true),
            pattern("a/", true),
        ]);
        assert_eq!(a.fingerprint(), b.fingerprint());
        assert_eq!(a.fingerprint().len(), 32);
        let exact = KeySet::only(vec![pattern("a/", false), pattern("b/", true)]);
        assert_ne!(a.fingerprint(), exact.fingerprint());
        // Lengths are hashed too: ["ab", "c"] is not ["a", "bc"].
        let split = |x: &str, y: &str| KeySet::only(vec![pattern(x, true), pattern(y, true)]);
        assert_ne!(
            split("ab", "c").fingerprint(),
            split("a", "bc").fingerprint()
        );
        assert_eq!(KeySet::All.fingerprint(), ALL_KEYS);
        assert_ne!(KeySet::only(Vec::new()).fingerprint(), ALL_KEYS);
    }
}
