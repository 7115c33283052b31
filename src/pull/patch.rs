//! The pull response's JSON, written by hand: stored values are JSON text already, so they are
//! copied into the patch, never parsed and serialized again.

use super::cookie::AnswerCookie;
use crate::store::EntryChange;

/// `{"cookie":..,"lastMutationIDChanges":{..},"patch":[` with `clear` first on a first pull.
pub(super) fn response_head(
    cookie: &AnswerCookie,
    changed_clients: &[(String, u64)],
    first_pull: bool,
) -> Vec<u8> {
    let mut head = String::from("{\"cookie\":");
    cookie.write_json(&mut head);
    head.push_str(",\"lastMutationIDChanges\":{");
    for (index, (client, last_mutation_id)) in changed_clients.iter().enumerate() {
        if index > 0 {
            head.push(',');
        }
        push_json_string(&mut head, client);
        head.push(':');
        head.push_str(&last_mutation_id.to_string());
    }
    head.push_str("},\"patch\":[");
    if first_pull {
        head.push_str(r#"{"op":"clear"}"#);
    }
    head.into_bytes()
}

/// `{"op":"put","key":..,"value":..}` or `{"op":"del","key":..}`; stored values are JSON text
/// already, so they are copied, not parsed.
pub(super) fn write_patch_op(out: &mut Vec<u8>, entry: &EntryChange) {
    let mut key = String::with_capacity(entry.key.len() + 2);
    push_json_string(&mut key, &entry.key);
    match &entry.value {
        Some(value) => {
            out.extend_from_slice(br#"{"op":"put","key":"#);
            out.extend_from_slice(key.as_bytes());
            out.extend_from_slice(br#","value":"#);
            out.extend_from_slice(value.as_bytes());
            out.push(b'}');
        }
        None => {
            out.extend_from_slice(br#"{"op":"del","key":"#);
            out.extend_from_slice(key.as_bytes());
            out.push(b'}');
        }
    }
}

fn push_json_string(out: &mut String, text: &str) {
    // Serializing a &str cannot fail.
    out.push_str(&serde_json::to_string(text).unwrap_or_default());
}
