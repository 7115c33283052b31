//! `replisync export` and `replisync import`: spaces moved out of and into a database as
//! NDJSON, streamed both ways in constant memory (the format is in docs/export-import.md).
//!
//! A file holds one or more spaces, each as a header line, its live entries, and an end line
//! that counts them (so a cut file is refused). An imported space gets a new identity: its
//! version starts [`IMPORT_VERSION_GAP`] above the exported one with everything before it
//! compacted, so every cookie a client holds from the old database gets the whole space.

mod export;
mod import;

pub use export::{ExportArgs, Exported, Which, export, export_to};
pub use import::{ImportArgs, Imported, import, import_from};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;

/// The `format` of a header line.
pub const FORMAT: &str = "replisync-space/1";

/// How far above the exported version an imported space starts: more versions than the old
/// database's space could have gained since the export (a billion pushes), so no cookie of
/// the old database is at or above the new space's compacted version.
pub const IMPORT_VERSION_GAP: u64 = 1 << 30;

/// Highest version an import creates: cookies with visibility rules count `version × 1024`,
/// which must stay below 2^53.
pub const MAX_IMPORTED_VERSION: u64 = 1 << 42;

/// The first line of a space: its id, its version at the export, and the format.
#[derive(Debug, Serialize)]
struct Header<'a> {
    space: &'a str,
    version: u64,
    format: &'static str,
}

/// One live entry: its key and its value (JSON, as stored).
#[derive(Debug, Serialize)]
struct EntryLine<'a> {
    key: &'a str,
    value: &'a RawValue,
}

/// The last line of a space: its id again, and how many entries it had.
#[derive(Debug, Serialize)]
struct End<'a> {
    end: &'a str,
    entries: u64,
}

/// Any line, as read back: which kind it is follows from the fields it has.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    space: Option<String>,
    version: Option<u64>,
    format: Option<String>,
    key: Option<String>,
    /// Parsed as a push's values are (numbers in range, well-formed strings, at most 128
    /// levels deep), so that an import stores nothing a push could not. `null` is a value.
    #[serde(default, deserialize_with = "present")]
    value: Option<Value>,
    end: Option<String>,
    entries: Option<u64>,
}

/// A line read back, by kind.
#[derive(Debug)]
enum Read {
    Header { space: String, version: u64 },
    Entry { key: String, value: Value },
    End { space: String, entries: u64 },
}

/// A field that is there, whatever its value (`null` included).
fn present<'de, D: serde::Deserializer<'de>>(field: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(field).map(Some)
}

impl Line {
    fn parse(text: &str) -> Result<Read, String> {
        let line: Line = serde_json::from_str(text).map_err(|e| e.to_string())?;
        match line {
            Line {
                key: Some(key),
                value: Some(value),
                space: None,
                version: None,
                format: None,
                end: None,
                entries: None,
            } => Ok(Read::Entry { key, value }),
            Line {
                space: Some(space),
                version: Some(version),
                format: Some(format),
                key: None,
                value: None,
                end: None,
                entries: None,
            } => {
                if format != FORMAT {
                    return Err(format!(
                        "format {format:?} is not {FORMAT:?}: export it again with this replisync"
                    ));
                }
                Ok(Read::Header { space, version })
            }
            Line {
                end: Some(space),
                entries: Some(entries),
                space: None,
                version: None,
                format: None,
                key: None,
                value: None,
            } => Ok(Read::End { space, entries }),
            _ => Err(
                "not a line of an export: a header (space, version, format), an entry (key, value) or an end (end, entries)"
                    .to_owned(),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_told_apart_by_their_fields() {
        let header = Line::parse(r#"{"space":"doc","version":7,"format":"replisync-space/1"}"#);
        assert!(matches!(header, Ok(Read::Header { version: 7, .. })));
        let entry = Line::parse(r#"{"key":"a","value":{"n":[1,2]}}"#).unwrap();
        let Read::Entry { key, value } = entry else {
            panic!("an entry");
        };
        assert_eq!(
            (key.as_str(), value.to_string()),
            ("a", r#"{"n":[1,2]}"#.to_owned())
        );
        let null = Line::parse(r#"{"key":"a","value":null}"#);
        assert!(
            matches!(
                null,
                Ok(Read::Entry {
                    value: Value::Null,
                    ..
                })
            ),
            "{null:?}"
        );
        let end = Line::parse(r#"{"end":"doc","entries":1}"#);
        assert!(matches!(end, Ok(Read::End { entries: 1, .. })));
        let deep = format!(
            r#"{{"key":"a","value":{}1{}}}"#,
            "[".repeat(200),
            "]".repeat(200)
        );
        for bad in [
            r#"{"key":"a"}"#,
            r#"{"key":"a","value":1,"space":"doc"}"#,
            r#"{"space":"doc","version":7,"format":"other/9"}"#,
            r#"{"key":"a","value":1,"extra":true}"#,
            r#"{"key":"a","value":}"#,
            r#"{"key":"a","value":1e400}"#,
            r#"{"key":"a","value":"\ud800"}"#,
            deep.as_str(),
            "[]",
        ] {
            assert!(Line::parse(bad).is_err(), "{bad}");
        }
    }
}
