//! Mutators: the named functions a push runs, one per mutation, against the space's data.
//! `Mutator` is the seam for your own; `set`, `delete` and `increment` come built in.
//!
//! A mutator reads and writes through a [`WriteTx`]. Its writes stay in memory until the
//! mutator returns: an `Err` discards them (the mutation still counts as processed, as the
//! Replicache protocol requires), an `Ok` keeps them for the push's single commit.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use async_trait::async_trait;
use serde_json::{Map, Number, Value};

use crate::protocol::{SpaceId, check_key};
use crate::store::{EntryChange, PushTx, StoreError};

/// Why a mutation was not applied.
#[derive(Debug, thiserror::Error)]
pub enum MutationError {
    /// The arguments do not have the shape the mutator needs.
    #[error("invalid arguments: {0}")]
    InvalidArgs(String),
    /// A business rule refused the mutation.
    #[error("rejected: {0}")]
    Rejected(String),
    /// The database failed: the whole push is rolled back and answered 5xx.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A named server-side mutation. Register your own with [`Mutators::register`].
///
/// ```
/// use replisync::mutators::{MutationError, Mutator, Mutators, WriteTx};
/// use serde_json::Value;
///
/// struct Rename;
///
/// #[async_trait::async_trait]
/// impl Mutator for Rename {
///     async fn apply(&self, tx: &mut WriteTx<'_>, args: &Value) -> Result<(), MutationError> {
///         let title = args["title"]
///             .as_str()
///             .ok_or_else(|| MutationError::InvalidArgs("`title` must be a string".into()))?;
///         tx.put("title", Value::from(title))
///     }
/// }
///
/// let mutators = Mutators::builtin().register("rename", Rename);
/// assert!(mutators.get("rename").is_some());
/// ```
#[async_trait]
pub trait Mutator: Send + Sync + 'static {
    async fn apply(&self, tx: &mut WriteTx<'_>, args: &Value) -> Result<(), MutationError>;
}

/// The mutators a server knows, by name.
#[derive(Clone, Default)]
pub struct Mutators {
    by_name: HashMap<String, Arc<dyn Mutator>>,
}

impl Mutators {
    /// No mutators at all.
    pub fn empty() -> Self {
        Self::default()
    }

    /// `set`, `delete` and `increment`.
    pub fn builtin() -> Self {
        Self::empty()
            .register("set", Set)
            .register("delete", Delete)
            .register("increment", Increment)
    }

    /// Adds (or replaces) the mutator called `name`.
    pub fn register(mut self, name: impl Into<String>, mutator: impl Mutator) -> Self {
        self.by_name.insert(name.into(), Arc::new(mutator));
        self
    }

    pub fn get(&self, name: &str) -> Option<&Arc<dyn Mutator>> {
        self.by_name.get(name)
    }
}

/// The state of one push's data: what it read from the store and what its successful
/// mutations wrote. Values are parsed JSON; `None` means absent or deleted.
#[derive(Default)]
pub struct PushOverlay {
    known: HashMap<String, Option<Value>>,
    written: BTreeSet<String>,
}

impl PushOverlay {
    /// The writes to commit, in key order.
    pub fn into_changes(self) -> Vec<EntryChange> {
        let PushOverlay { mut known, written } = self;
        written
            .into_iter()
            .map(|key| {
                let value = known.remove(&key).flatten().map(|v| v.to_string());
                EntryChange { key, value }
            })
            .collect()
    }
}

/// What a mutator sees: reads through to the store, writes buffered until it returns.
pub struct WriteTx<'a> {
    store: &'a mut dyn PushTx,
    overlay: &'a mut PushOverlay,
    mutation_writes: HashMap<String, Option<Value>>,
    space: &'a SpaceId,
    user_id: &'a str,
    client_id: &'a str,
}

impl<'a> WriteTx<'a> {
    pub(crate) fn new(
        store: &'a mut dyn PushTx,
        overlay: &'a mut PushOverlay,
        space: &'a SpaceId,
        user_id: &'a str,
        client_id: &'a str,
    ) -> Self {
        WriteTx {
            store,
            overlay,
            mutation_writes: HashMap::new(),
            space,
            user_id,
            client_id,
        }
    }

    pub fn space(&self) -> &SpaceId {
        self.space
    }

    /// The user the authenticator found for this request.
    pub fn user_id(&self) -> &str {
        self.user_id
    }

    /// The Replicache client that made the mutation.
    pub fn client_id(&self) -> &str {
        self.client_id
    }

    /// The value of `key` as this mutation sees it: its own writes, then earlier mutations'
    /// writes in the same push, then the database.
    pub async fn get(&mut self, key: &str) -> Result<Option<Value>, MutationError> {
        if let Some(value) = self.mutation_writes.get(key) {
            return Ok(value.clone());
        }
        if let Some(value) = self.overlay.known.get(key) {
            return Ok(value.clone());
        }
        let stored =
            match self.store.entry(key).await? {
                Some(text) => Some(serde_json::from_str(&text).map_err(|e| {
                    StoreError::Corrupt(format!("value of {key:?} is not JSON: {e}"))
                })?),
                None => None,
            };
        self.overlay.known.insert(key.to_owned(), stored.clone());
        Ok(stored)
    }

    /// Writes `value` at `key`. Fails (failing the mutation) for a key no store can hold.
    pub fn put(&mut self, key: impl Into<String>, value: Value) -> Result<(), MutationError> {
        let key = checked_key(key.into())?;
        self.mutation_writes.insert(key, Some(value));
        Ok(())
    }

    /// Deletes `key`. Fails (failing the mutation) for a key no store can hold.
    pub fn del(&mut self, key: impl Into<String>) -> Result<(), MutationError> {
        let key = checked_key(key.into())?;
        self.mutation_writes.insert(key, None);
        Ok(())
    }

    /// Keeps this mutation's writes for the push's commit.
    pub(crate) fn keep_writes(self) {
        for (key, value) in self.mutation_writes {
            self.overlay.written.insert(key.clone());
            self.overlay.known.insert(key, value);
        }
    }
}

/// A key no store can hold fails the mutation, not the push.
fn checked_key(key: String) -> Result<String, MutationError> {
    check_key(&key).map_err(MutationError::InvalidArgs)?;
    Ok(key)
}

/// `set {key: string, value: any JSON}`
struct Set;
/// `delete {key: string}`
struct Delete;
/// `increment {key: string, delta: number}`; a missing key counts as 0.
struct Increment;

#[async_trait]
impl Mutator for Set {
    async fn apply(&self, tx: &mut WriteTx<'_>, args: &Value) -> Result<(), MutationError> {
        let args = object_args(args)?;
        let key = string_arg(args, "key")?;
        let value = args
            .get("value")
            .ok_or_else(|| MutationError::InvalidArgs("`value` is missing".into()))?;
        tx.put(key, value.clone())
    }
}

#[async_trait]
impl Mutator for Delete {
    async fn apply(&self, tx: &mut WriteTx<'_>, args: &Value) -> Result<(), MutationError> {
        let key = string_arg(object_args(args)?, "key")?;
        tx.del(key)
    }
}

#[async_trait]
impl Mutator for Increment {
    async fn apply(&self, tx: &mut WriteTx<'_>, args: &Value) -> Result<(), MutationError> {
        let args = object_args(args)?;
        let key = string_arg(args, "key")?;
        let delta = match args.get("delta") {
            Some(Value::Number(n)) => n.clone(),
            _ => {
                return Err(MutationError::InvalidArgs(
                    "`delta` must be a number".into(),
                ));
            }
        };
        let current = match tx.get(key).await? {
            None => Number::from(0),
            Some(Value::Number(n)) => n,
            Some(other) => {
                return Err(MutationError::Rejected(format!(
                    "cannot increment {key:?}: it holds {other}, not a number"
                )));
            }
        };
        tx.put(key, Value::Number(add_numbers(&current, &delta)?))
    }
}

/// Adds exactly when both are integers and the sum fits; otherwise as 64-bit floats.
fn add_numbers(a: &Number, b: &Number) -> Result<Number, MutationError> {
    if let (Some(x), Some(y)) = (a.as_i64(), b.as_i64())
        && let Some(sum) = x.checked_add(y)
    {
        return Ok(Number::from(sum));
    }
    let sum = a.as_f64().unwrap_or(f64::NAN) + b.as_f64().unwrap_or(f64::NAN);
    Number::from_f64(sum).ok_or_else(|| {
        MutationError::Rejected("increment overflowed to a non-finite number".into())
    })
}

fn object_args(args: &Value) -> Result<&Map<String, Value>, MutationError> {
    args.as_object().ok_or_else(|| {
        MutationError::InvalidArgs(format!("arguments must be an object, got {args}"))
    })
}

fn string_arg<'v>(args: &'v Map<String, Value>, name: &str) -> Result<&'v str, MutationError> {
    args.get(name)
        .and_then(Value::as_str)
        .ok_or_else(|| MutationError::InvalidArgs(format!("`{name}` must be a string")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_add_exactly_and_overflow_to_floats() {
        let n = |v: Value| match v {
            Value::Number(n) => n,
            _ => unreachable!(),
        };
        assert_eq!(
            add_numbers(&n(2.into()), &n(3.into())).unwrap(),
            Number::from(5)
        );
        assert_eq!(
            add_numbers(&n(i64::MAX.into()), &n(1.into())).unwrap(),
            Number::from_f64(i64::MAX as f64 + 1.0).unwrap()
        );
        assert_eq!(
            add_numbers(&n(1.into()), &n(serde_json::json!(0.5))).unwrap(),
            Number::from_f64(1.5).unwrap()
        );
    }
}
