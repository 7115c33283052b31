//! Which keys a push's mutations will read, learned from the mutations before them: for each
//! mutator, the top-level argument fields whose string value its mutations read as a key. A store
//! may read those keys with the push's first read, so that its mutations find them in memory.

use std::collections::HashMap;
use std::sync::{PoisonError, RwLock};

use serde_json::{Map, Value};

use crate::protocol::{Mutation, check_key};

/// Most keys one push group's first read asks for.
pub const MAX_KEYS_PER_READ: usize = 64;
/// Most mutators learned about, and argument fields learned per mutator.
const MAX_MUTATORS: usize = 256;
const MAX_FIELDS: usize = 4;
/// Arguments longer than this are not looked into (a large argument is rarely a key's source,
/// and parsing it twice would cost what the read saves).
const MAX_ARGS_BYTES: usize = 4 * 1024;

/// The argument fields each mutator reads as keys, shared by every push of a server.
#[derive(Debug, Default)]
pub struct ReadHints {
    fields: RwLock<HashMap<String, Vec<String>>>,
}

impl ReadHints {
    /// The keys `mutations` are likely to read: the values of their mutators' learned fields,
    /// distinct, each a key a store can hold, at most [`MAX_KEYS_PER_READ`].
    pub fn keys<'m>(&self, mutations: impl IntoIterator<Item = &'m Mutation>) -> Vec<String> {
        let fields = self.fields.read().unwrap_or_else(PoisonError::into_inner);
        if fields.is_empty() {
            return Vec::new();
        }
        let mut keys: Vec<String> = Vec::new();
        for mutation in mutations {
            let Some(learned) = fields.get(&mutation.name) else {
                continue;
            };
            let Some(args) = small_object(mutation.args.get()) else {
                continue;
            };
            if add_keys(learned, &args, &mut keys) {
                break;
            }
        }
        keys
    }

    /// The keys one mutation of the mutator `name`, called with `args`, is likely to read.
    pub fn keys_of(&self, name: &str, args: &Value) -> Vec<String> {
        let fields = self.fields.read().unwrap_or_else(PoisonError::into_inner);
        let mut keys = Vec::new();
        if let (Some(learned), Some(args)) = (fields.get(name), args.as_object()) {
            add_keys(learned, args, &mut keys);
        }
        keys
    }

    /// Learns from a mutation of the mutator `name`, called with `args`, that read `keys` from
    /// the store: for each of them, the one top-level field of `args` whose value it is. A key
    /// that several fields hold teaches nothing: a client cannot fill a mutator's few fields
    /// with others that merely repeat the key it reads.
    pub fn learn(&self, name: &str, args: &Value, keys: &[String]) {
        let Some(args) = args.as_object() else {
            return;
        };
        let naming = |key: &String| {
            let mut holding = args
                .iter()
                .filter(|(_, v)| v.as_str() == Some(key.as_str()));
            match (holding.next(), holding.next()) {
                (Some((field, _)), None) => Some(field),
                _ => None,
            }
        };
        let new: Vec<&String> = {
            let fields = self.fields.read().unwrap_or_else(PoisonError::into_inner);
            let known = fields.get(name);
            keys.iter()
                .filter_map(naming)
                .filter(|field| known.is_none_or(|known| !known.contains(field)))
                .collect()
        };
        if new.is_empty() {
            return;
        }
        let mut fields = self.fields.write().unwrap_or_else(PoisonError::into_inner);
        if !fields.contains_key(name) && fields.len() >= MAX_MUTATORS {
            return;
        }
        let learned = fields.entry(name.to_owned()).or_default();
        for field in new {
            if learned.len() < MAX_FIELDS && !learned.contains(field) {
                learned.push(field.clone());
            }
        }
    }
}

/// Adds to `keys` the values of `args`'s `fields` that are keys a store can hold, once each;
/// `true` once `keys` holds [`MAX_KEYS_PER_READ`].
fn add_keys(fields: &[String], args: &Map<String, Value>, keys: &mut Vec<String>) -> bool {
    for field in fields {
        let Some(key) = args.get(field).and_then(Value::as_str) else {
            continue;
        };
        if check_key(key).is_ok() && !keys.iter().any(|k| k == key) {
            keys.push(key.to_owned());
            if keys.len() == MAX_KEYS_PER_READ {
                return true;
            }
        }
    }
    false
}

/// `args` as an object, when it is a small one.
fn small_object(args: &str) -> Option<Map<String, Value>> {
    if args.len() > MAX_ARGS_BYTES {
        return None;
    }
    serde_json::from_str(args).ok()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn mutation(name: &str, args: Value) -> Mutation {
        serde_json::from_value(json!({
            "clientID": "c", "id": 1, "name": name, "args": args, "timestamp": 0
        }))
        .unwrap()
    }

    #[test]
    fn a_field_read_as_a_key_is_asked_for_in_the_next_mutations_of_that_mutator() {
        let hints = ReadHints::default();
        let first = json!({"key": "n", "delta": 1, "note": "m"});
        assert!(
            hints
                .keys([&mutation("increment", first.clone())])
                .is_empty()
        );
        hints.learn("increment", &first, &["n".to_owned()]);
        let next = [
            mutation("increment", json!({"key": "a", "delta": 2, "note": "x"})),
            mutation("increment", json!({"key": "a"})),
            mutation("increment", json!({"key": 5})),
            mutation("increment", json!({"key": "b\u{0}"})),
            mutation("set", json!({"key": "c"})),
            mutation("increment", json!({"key": "d"})),
        ];
        assert_eq!(hints.keys(&next), ["a", "d"]);
        assert_eq!(hints.keys_of("increment", &json!({"key": "e"})), ["e"]);
        assert!(hints.keys_of("set", &json!({"key": "e"})).is_empty());
    }

    #[test]
    fn fields_that_repeat_the_key_read_teach_nothing() {
        let hints = ReadHints::default();
        let read = ["k".to_owned()];
        let crowded = json!({"a": "k", "b": "k", "c": "k", "d": "k", "key": "k"});
        hints.learn("increment", &crowded, &read);
        assert!(hints.keys_of("increment", &crowded).is_empty());
        hints.learn("increment", &json!({"key": "k", "delta": 1}), &read);
        assert_eq!(hints.keys_of("increment", &crowded), ["k"]);
        assert_eq!(
            hints.keys_of("increment", &json!({"key": "j", "a": "i"})),
            ["j"]
        );
    }

    #[test]
    fn what_a_hint_asks_for_is_bounded() {
        let hints = ReadHints::default();
        let wide: Map<String, Value> = (0..10)
            .map(|i| (format!("f{i}"), json!(i.to_string())))
            .collect();
        let read: Vec<String> = (0..10).map(|i| i.to_string()).collect();
        hints.learn("m", &Value::Object(wide), &read);
        let mutations: Vec<Mutation> = (0..100)
            .map(|i| mutation("m", json!({"f0": format!("k{i}"), "f9": "other"})))
            .collect();
        let keys = hints.keys(&mutations);
        assert_eq!(keys.len(), MAX_KEYS_PER_READ);
        assert!(
            !keys.contains(&"other".to_owned()),
            "f9 is past the field bound"
        );
        let large = "x".repeat(MAX_ARGS_BYTES);
        assert!(
            hints
                .keys([&mutation("m", json!({"f0": large}))])
                .is_empty()
        );
        for i in 0..MAX_MUTATORS + 10 {
            hints.learn(&format!("n{i}"), &json!({"key": "k"}), &["k".to_owned()]);
        }
        let learned = hints.fields.read().unwrap().len();
        assert_eq!(learned, MAX_MUTATORS);
    }
}
