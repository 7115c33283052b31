//! A mutation's writes until it returns, and the two bounds on them: the keys the caller may
//! write, and the bytes the push may put. The push's `WriteTx` holds them; a JavaScript engine
//! borrows them for a mutation, so its writes are checked where they are made.

use std::collections::BTreeMap;

use serde_json::Value;

use super::error::MutationError;
use crate::protocol::check_key;
use crate::rules::KeySet;

/// What one mutation wrote (`None`: deleted), by key, and what it may still write.
#[derive(Debug, Clone)]
pub(crate) struct MutationWrites {
    pub(super) by_key: BTreeMap<String, Option<Value>>,
    /// Bytes of keys and values the mutation put, and whether it was refused a write for going
    /// past the push's limit (which fails it, whatever it returns).
    pub(super) bytes: usize,
    over_write_limit: bool,
    /// The first key it tried to write outside the caller's (which fails it, whatever it
    /// returns).
    forbidden_key: Option<String>,
    /// Bytes the push's earlier mutations put, and what the push may put in all.
    push_bytes_before: usize,
    max_push_write_bytes: usize,
}

impl MutationWrites {
    /// No writes yet, in a push whose earlier mutations put `push_bytes_before` of its
    /// `max_push_write_bytes`.
    pub(super) fn new(push_bytes_before: usize, max_push_write_bytes: usize) -> MutationWrites {
        MutationWrites {
            by_key: BTreeMap::new(),
            bytes: 0,
            over_write_limit: false,
            forbidden_key: None,
            push_bytes_before,
            max_push_write_bytes,
        }
    }

    /// No writes, under the same limits.
    pub(super) fn none_yet(&self) -> MutationWrites {
        MutationWrites::new(self.push_bytes_before, self.max_push_write_bytes)
    }

    /// What the mutation wrote at `key`: `Some(None)` when it deleted it, `None` when it did
    /// not write it.
    pub(crate) fn get(&self, key: &str) -> Option<Option<&Value>> {
        self.by_key.get(key).map(Option::as_ref)
    }

    /// Writes `value`, whose JSON text is `value_bytes` long, at `key`. Fails (failing the
    /// mutation) for a key no store can hold or outside `writable` (the caller's), or past the
    /// push's write limit.
    pub(super) fn put(
        &mut self,
        writable: &KeySet,
        key: String,
        value: Value,
        value_bytes: usize,
    ) -> Result<(), MutationError> {
        let key = self.writable_key(writable, key)?;
        self.count_write(&key, value_bytes)?;
        self.by_key.insert(key, Some(value));
        Ok(())
    }

    /// Writes the value whose JSON text is `text` at `key`, counting the text against the
    /// push's write limit before parsing it.
    pub(crate) fn put_json_text(
        &mut self,
        writable: &KeySet,
        key: String,
        text: &str,
    ) -> Result<(), MutationError> {
        let key = self.writable_key(writable, key)?;
        self.count_write(&key, text.len())?;
        let value = serde_json::from_str(text).map_err(|error| {
            MutationError::InvalidArgs(format!("the value for {key:?} is not JSON: {error}"))
        })?;
        self.by_key.insert(key, Some(value));
        Ok(())
    }

    /// Deletes `key`, with the same checks as a write.
    pub(crate) fn del(&mut self, writable: &KeySet, key: String) -> Result<(), MutationError> {
        let key = self.writable_key(writable, key)?;
        self.count_write(&key, 0)?;
        self.by_key.insert(key, None);
        Ok(())
    }

    /// `key`, if a store can hold it and the caller may write it; a key the caller may not
    /// write is remembered, and fails the mutation whatever the mutator does next.
    fn writable_key(&mut self, writable: &KeySet, key: String) -> Result<String, MutationError> {
        check_key(&key).map_err(MutationError::InvalidArgs)?;
        if !writable.allows(&key) {
            let error = MutationError::ForbiddenKey { key: key.clone() };
            self.forbidden_key.get_or_insert(key);
            return Err(error);
        }
        Ok(key)
    }

    /// Counts a write of `key` with `value_bytes` against the push's limit; refuses it (and
    /// marks the mutation failed) past the limit.
    fn count_write(&mut self, key: &str, value_bytes: usize) -> Result<(), MutationError> {
        let limit = self.max_push_write_bytes;
        let bytes = key.len().saturating_add(value_bytes);
        let total = self
            .push_bytes_before
            .saturating_add(self.bytes)
            .saturating_add(bytes);
        if total > limit {
            self.over_write_limit = true;
            return Err(MutationError::TooMuchWritten { limit });
        }
        self.bytes += bytes;
        Ok(())
    }

    /// The mutator's `result`, unless a write of its went past the push's limit or to a key
    /// the caller may not write: then the mutation fails, even if the mutator caught that
    /// write's error.
    pub(super) fn within_limits(
        &self,
        result: Result<(), MutationError>,
    ) -> Result<(), MutationError> {
        match result {
            Err(MutationError::Store(error)) => Err(MutationError::Store(error)),
            _ if self.over_write_limit => Err(MutationError::TooMuchWritten {
                limit: self.max_push_write_bytes,
            }),
            _ if self.forbidden_key.is_some() => Err(MutationError::ForbiddenKey {
                key: self.forbidden_key.clone().unwrap_or_default(),
            }),
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_write_is_remembered_and_fails_the_mutation_even_if_caught() {
        let mut writes = MutationWrites::new(90, 100);
        assert!(writes.put_json_text(&KeySet::All, "a".into(), "1").is_ok());
        assert!(matches!(
            writes.put_json_text(&KeySet::All, "b".into(), "\"0123456789\""),
            Err(MutationError::TooMuchWritten { limit: 100 })
        ));
        assert_eq!(writes.get("a"), Some(Some(&Value::from(1))));
        assert_eq!(writes.get("b"), None, "the refused write is not kept");
        assert!(matches!(
            writes.within_limits(Ok(())),
            Err(MutationError::TooMuchWritten { limit: 100 })
        ));
    }

    #[test]
    fn a_delete_is_a_write_of_nothing() {
        let mut writes = MutationWrites::new(0, 100);
        assert!(writes.del(&KeySet::All, "gone".into()).is_ok());
        assert_eq!(writes.get("gone"), Some(None));
        assert_eq!(writes.bytes, 4);
        assert!(writes.within_limits(Ok(())).is_ok());
    }
}
