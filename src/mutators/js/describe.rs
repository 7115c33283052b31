//! What a failed mutation threw, as one bounded line for its error and the log:
//! `TypeError: message (at file:line:column)`, cut to at most a thousand bytes.

use rquickjs::CaughtError;

/// Most bytes of a failure's description (what was thrown can be megabytes long).
const MAX_DESCRIPTION_BYTES: usize = 1000;

/// What was thrown, for a log line: `TypeError: message (at file:line:column)`, at most
/// [`MAX_DESCRIPTION_BYTES`]. Reading it may run the code's getters: call it before the deadline
/// is cleared.
pub(super) fn describe(caught: &CaughtError<'_>) -> String {
    let text = match caught {
        CaughtError::Exception(exception) => {
            let name: Option<String> = exception.get("name").ok();
            let message = exception.message().unwrap_or_default();
            let mut text = match name {
                Some(name) if !name.is_empty() => format!("{name}: {message}"),
                _ => message,
            };
            if let Some(place) = exception.stack().as_deref().and_then(first_frame) {
                text.push_str(&format!(" ({place})"));
            }
            text
        }
        CaughtError::Value(value) => {
            let ctx = value.ctx();
            match ctx.json_stringify(value.clone()) {
                Ok(Some(text)) => format!(
                    "threw {}",
                    text.to_string().unwrap_or_else(|_| "a value".into())
                ),
                _ => format!("threw {}", value.type_name()),
            }
        }
        CaughtError::Error(error) => error.to_string(),
    };
    bounded(text)
}

/// `text` cut to [`MAX_DESCRIPTION_BYTES`] (at a character boundary, marked with `…`).
fn bounded(mut text: String) -> String {
    if text.len() > MAX_DESCRIPTION_BYTES {
        let mut end = MAX_DESCRIPTION_BYTES;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
    text
}

/// `at name (file:line:column)` → `at file:line:column`, from the first frame of a stack.
fn first_frame(stack: &str) -> Option<String> {
    let line = stack
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("at "))?;
    let place = match (line.find('('), line.rfind(')')) {
        (Some(open), Some(close)) if open < close => &line[open + 1..close],
        _ => line.trim_start_matches("at ").trim(),
    };
    Some(format!("at {place}"))
}
