//! The built-in mutators every server knows: `set`, `delete` and `increment`, written against
//! the same `Mutator` seam as your own.

use async_trait::async_trait;
use serde_json::{Map, Number, Value};

use super::{MutationError, Mutator, WriteTx};

/// `set {key: string, value: any JSON}`
pub(super) struct Set;
/// `delete {key: string}`
pub(super) struct Delete;
/// `increment {key: string, delta: number}`; a missing key counts as 0.
pub(super) struct Increment;

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

    fn kind(&self) -> &'static str {
        "builtin"
    }
}

#[async_trait]
impl Mutator for Delete {
    async fn apply(&self, tx: &mut WriteTx<'_>, args: &Value) -> Result<(), MutationError> {
        let key = string_arg(object_args(args)?, "key")?;
        tx.del(key)
    }

    fn kind(&self) -> &'static str {
        "builtin"
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

    fn kind(&self) -> &'static str {
        "builtin"
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
