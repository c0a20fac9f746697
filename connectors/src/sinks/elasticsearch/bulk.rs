//! The pure half of bulk writes: the NDJSON of one document's action, and what one
//! item's answer means (done, retry it alone, refused for good, or the alias is gone).

use serde_json::{json, Value};
use viewkeeper_core::sink::SinkDoc;

pub(super) fn is_ok_status(status: u16, delete: bool) -> bool {
    (200..300).contains(&status) || status == 409 || (delete && status == 404)
}

pub(super) fn is_retryable(status: u16) -> bool {
    status == 429 || status >= 500
}

/// The NDJSON of one document's bulk action.
pub(super) fn action_lines(index: &str, alias: bool, d: &SinkDoc, out: &mut Vec<u8>) {
    // require_alias: never let a bulk write auto-create a plain index named like the alias
    // (after the search server lost its data); a 404 tells the engine to recreate it.
    let mut meta = json!({"_index": index, "_id": d.id, "version": d.version, "version_type": "external_gte"});
    if alias {
        meta["require_alias"] = json!(true);
    }
    match &d.body {
        Some(body) => {
            serde_json::to_writer(&mut *out, &json!({ "index": meta })).expect("JSON");
            out.push(b'\n');
            serde_json::to_writer(&mut *out, body).expect("JSON");
        }
        None => serde_json::to_writer(&mut *out, &json!({ "delete": meta })).expect("JSON"),
    }
    out.push(b'\n');
}

/// What one bulk item's answer means for its document.
#[derive(Debug, PartialEq)]
pub(super) enum Item {
    /// Durable, or a stale write refused by its version (a newer one is there).
    Done,
    /// 429 or 5xx: send it again.
    Retry,
    /// Refused for good (a mapping error): dead-lettered with the server's reason.
    Rejected(String),
    /// Written through an alias that no longer exists: the index is gone.
    AliasGone(String),
}

/// Reads one item of a bulk answer for document `d`, written through an alias or not.
pub(super) fn item(d: &SinkDoc, alias: bool, item: &Value) -> Item {
    let res = item
        .as_object()
        .and_then(|m| m.values().next())
        .cloned()
        .unwrap_or(Value::Null);
    let st = res.get("status").and_then(Value::as_u64).unwrap_or(0) as u16;
    if st == 404 && d.body.is_some() && alias {
        return Item::AliasGone(res.get("error").unwrap_or(&Value::Null).to_string());
    }
    if is_ok_status(st, d.body.is_none()) {
        Item::Done
    } else if is_retryable(st) {
        Item::Retry
    } else {
        Item::Rejected(
            res.get("error")
                .map_or_else(|| format!("status {st}"), |e| format!("status {st}: {e}")),
        )
    }
}

pub(super) fn truncate(s: &str, n: usize) -> &str {
    match s.char_indices().nth(n) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use viewkeeper_core::model::Row;

    #[test]
    fn action_lines_carry_external_versions() {
        let mut body = Row::new();
        body.insert("a".into(), json!(1));
        let d = SinkDoc {
            root: "[7]".into(),
            id: "7".into(),
            member: "7".into(),
            body: Some(body),
            version: 1882522659926835200,
            tombstoned: false,
            active: false,
        };
        let mut out = Vec::new();
        action_lines("orders_view", true, &d, &mut out);
        let text = String::from_utf8(out).unwrap();
        assert_eq!(
            text,
            "{\"index\":{\"_index\":\"orders_view\",\"_id\":\"7\",\"version\":1882522659926835200,\"version_type\":\"external_gte\",\"require_alias\":true}}\n{\"a\":1}\n"
        );
        let mut out = Vec::new();
        action_lines("x", false, &SinkDoc { body: None, ..d }, &mut out);
        assert!(String::from_utf8(out).unwrap().starts_with("{\"delete\":"));
    }

    #[test]
    fn item_status_rules() {
        assert!(is_ok_status(201, false) && is_ok_status(409, false) && is_ok_status(404, true));
        assert!(!is_ok_status(404, false) && !is_ok_status(400, false));
        assert!(is_retryable(429) && is_retryable(503) && !is_retryable(400));
    }
}

#[cfg(test)]
mod item_tests {
    use super::*;

    #[test]
    fn items_decide_per_document() {
        let d = SinkDoc {
            id: "1".into(),
            member: "1".into(),
            root: "[1]".into(),
            body: Some(Default::default()),
            version: 1,
            tombstoned: false,
            active: false,
        };
        let ans = |st: u64| json!({"index": {"status": st, "error": {"type": "x"}}});
        assert_eq!(item(&d, true, &ans(201)), Item::Done);
        assert_eq!(item(&d, true, &ans(409)), Item::Done);
        assert_eq!(item(&d, true, &ans(503)), Item::Retry);
        assert!(matches!(item(&d, true, &ans(404)), Item::AliasGone(_)));
        assert!(matches!(item(&d, false, &ans(404)), Item::Rejected(_)));
        assert!(matches!(item(&d, true, &ans(400)), Item::Rejected(r) if r.contains("status 400")));
    }
}
