//! JSON log lines with JSON types: numbers and booleans as such, and a list logged with `?` as a
//! JSON array (tracing's own JSON output writes every `?` value as a string of Rust debug text).

use std::fmt;

use serde_json::{Map, Number, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

/// One JSON object per line, shaped as tracing-subscriber's: `timestamp`, `level`, `fields`,
/// `target`, and `span` and `spans` (outermost first) inside a span. Formats span fields too.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct JsonLines;

impl<S> FormatEvent<S, JsonLines> for JsonLines
where
    S: Subscriber + for<'span> LookupSpan<'span>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, JsonLines>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut timestamp = String::new();
        SystemTime.format_time(&mut Writer::new(&mut timestamp))?;
        let mut fields = Map::new();
        event.record(&mut Fields(&mut fields));
        let metadata = event.metadata();
        write!(
            writer,
            "{{\"timestamp\":{},\"level\":{},\"fields\":{},\"target\":{}",
            Value::String(timestamp),
            Value::from(metadata.level().as_str()),
            message_first(fields),
            Value::from(metadata.target()),
        )?;
        if let Some(scope) = ctx.event_scope() {
            let spans: Vec<Value> = scope.from_root().map(|span| span_object(&span)).collect();
            if let Some(current) = spans.last() {
                write!(writer, ",\"span\":{current}")?;
            }
            write!(writer, ",\"spans\":{}", Value::Array(spans))?;
        }
        writeln!(writer, "}}")
    }
}

/// An event's fields as a JSON object, its message first (the others in name order).
fn message_first(mut fields: Map<String, Value>) -> String {
    let Some(message) = fields.remove("message") else {
        return Value::Object(fields).to_string();
    };
    let rest = Value::Object(fields).to_string();
    let rest = rest.strip_prefix('{').unwrap_or("}");
    let comma = if rest == "}" { "" } else { "," };
    format!("{{\"message\":{message}{comma}{rest}")
}

/// A span's fields (as [`JsonLines`] formatted them) and its name.
fn span_object<S>(span: &tracing_subscriber::registry::SpanRef<'_, S>) -> Value
where
    S: for<'span> LookupSpan<'span>,
{
    let extensions = span.extensions();
    let mut object = extensions
        .get::<FormattedFields<JsonLines>>()
        .and_then(|formatted| serde_json::from_str::<Map<String, Value>>(formatted).ok())
        .unwrap_or_default();
    object.insert("name".into(), span.name().into());
    Value::Object(object)
}

impl<'writer> FormatFields<'writer> for JsonLines {
    fn format_fields<R: RecordFields>(
        &self,
        mut writer: Writer<'writer>,
        fields: R,
    ) -> fmt::Result {
        let mut object = Map::new();
        fields.record(&mut Fields(&mut object));
        write!(writer, "{}", Value::Object(object))
    }

    /// Fields recorded later (`Span::record`) join the span's object.
    fn add_fields(
        &self,
        current: &'writer mut FormattedFields<Self>,
        fields: &tracing::span::Record<'_>,
    ) -> fmt::Result {
        let mut object: Map<String, Value> = serde_json::from_str(current).unwrap_or_default();
        fields.record(&mut Fields(&mut object));
        current.fields = Value::Object(object).to_string();
        Ok(())
    }
}

/// Records fields into a JSON object with their JSON types.
struct Fields<'a>(&'a mut Map<String, Value>);

impl Fields<'_> {
    fn put(&mut self, field: &Field, value: Value) {
        self.0.insert(field.name().to_owned(), value);
    }
}

impl Visit for Fields<'_> {
    fn record_f64(&mut self, field: &Field, value: f64) {
        let number =
            Number::from_f64(value).map_or_else(|| value.to_string().into(), Value::Number);
        self.put(field, number);
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, value.into());
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, value.into());
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, value.into());
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, value.into());
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.put(field, value.to_string().into());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let text = format!("{value:?}");
        self.put(field, as_list(&text).unwrap_or(Value::String(text)));
    }
}

/// `text` as a JSON array when it is one whose items are numbers or strings (the debug text of
/// a `Vec<u64>` or `Vec<String>`); `None` otherwise, and for a string that needs Rust escapes.
fn as_list(text: &str) -> Option<Value> {
    if !(text.starts_with('[') && text.ends_with(']')) {
        return None;
    }
    let list: Vec<Value> = serde_json::from_str(text).ok()?;
    list.iter()
        .all(|item| item.is_number() || item.is_string())
        .then_some(Value::Array(list))
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::{as_list, message_first};

    #[test]
    fn the_message_comes_first_in_valid_json() {
        let fields = json!({"b": 1, "message": "hi \"x\"", "a": [2]});
        let text = message_first(fields.as_object().unwrap().clone());
        assert!(text.starts_with(r#"{"message":"hi \"x\"","#), "{text}");
        assert_eq!(serde_json::from_str::<Value>(&text).unwrap(), fields);
        let alone = json!({"message": "m"});
        assert_eq!(
            message_first(alone.as_object().unwrap().clone()),
            r#"{"message":"m"}"#
        );
        assert_eq!(message_first(serde_json::Map::new()), "{}");
    }

    #[test]
    fn lists_of_numbers_or_strings_become_arrays_and_nothing_else_does() {
        assert_eq!(as_list(&format!("{:?}", vec![1, 2])), Some(json!([1, 2])));
        let names = vec!["a \"b\"".to_owned(), "ç".to_owned()];
        assert_eq!(
            as_list(&format!("{names:?}")),
            Some(json!(["a \"b\"", "ç"]))
        );
        assert_eq!(as_list("[]"), Some(json!([])));
        for not_a_list in [
            "[1, [2]]",
            "[\"\\u{1b}\"]",
            "Some([1])",
            "[oops]",
            "\"[1]\"",
        ] {
            assert_eq!(as_list(not_a_list), None::<Value>, "{not_a_list}");
        }
    }
}
