//! Elasticsearch / OpenSearch sink: bulk writes of whole documents through an alias.
//!
//! * Every action carries `version` and `version_type: external_gte` in its action
//!   line (on the URL it is a 400 in OpenSearch), so an older version never overwrites
//!   a newer one; a 409 answer is such a stale write and counts as success.
//! * Per-item outcome decides: 2xx and 409 (and 404 for deletes) are done; 429 and 5xx
//!   items are retried alone, with backoff and jitter; any other 4xx (mapping errors)
//!   is a [`Rejection`] with the server's reason, dead-lettered by the engine.
//! * Requests are cut at `max_bulk_bytes` and sent one at a time: that bounds the bytes
//!   in flight.
//! * Plain `application/json` headers, so the same code speaks to Elasticsearch 8 and
//!   OpenSearch 2.
//! * The index is created on start when the alias is missing: `{alias}_v{version}` with
//!   the projection's settings and mappings, and the alias, in one request.

use crate::sink::{Rejection, SinkDoc, SinkError};
use backon::BackoffBuilder;
use elasticsearch::auth::Credentials;
use elasticsearch::cert::{Certificate, CertificateValidation};
use elasticsearch::http::headers::{HeaderMap, HeaderValue, CONTENT_TYPE};
use elasticsearch::http::transport::{SingleNodeConnectionPool, TransportBuilder};
use elasticsearch::http::{Method, Url};
use elasticsearch::Elasticsearch;
use serde_json::{json, Value};
use std::time::Duration;
use viewkeeper_projections::spec::IndexSpec;

#[derive(Clone)]
pub struct SearchSink {
    name: String,
    client: Elasticsearch,
    max_bulk_bytes: usize,
    retry_min: Duration,
    retry_max: Duration,
    item_retries: usize,
}

/// Settings of a search sink.
#[derive(Clone, Debug)]
pub struct SearchSettings {
    /// `http(s)://[user:password@]host:port`; a user and password go as basic auth.
    pub url: String,
    /// An API key (the base64 `encoded` form), sent as `Authorization: ApiKey …`.
    pub api_key: Option<String>,
    /// CA certificates (PEM) that sign the server's, for HTTPS; the host name is checked.
    pub ca_file: Option<std::path::PathBuf>,
    pub max_bulk_bytes: usize,
    pub retry_min: Duration,
    pub retry_max: Duration,
    /// Rounds of per-item retries inside one write before the engine's backoff takes over.
    pub item_retries: usize,
    pub request_timeout: Duration,
}

fn is_ok_status(status: u16, delete: bool) -> bool {
    (200..300).contains(&status) || status == 409 || (delete && status == 404)
}

fn is_retryable(status: u16) -> bool {
    status == 429 || status >= 500
}

/// The NDJSON of one document's bulk action.
fn action_lines(index: &str, alias: bool, d: &SinkDoc, out: &mut Vec<u8>) {
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

impl SearchSink {
    pub fn new(name: &str, s: &SearchSettings) -> Result<Self, SinkError> {
        let err = |m: String| SinkError::new(name, m);
        let mut url = Url::parse(&s.url).map_err(|e| err(format!("bad url: {e}")))?;
        // Credentials in the URL become basic auth (left in the URL, reqwest would send
        // a second Authorization header).
        let basic = (!url.username().is_empty()).then(|| {
            let decode = |v: &str| crate::tls::percent_decode(v).unwrap_or_else(|_| v.to_string());
            (decode(url.username()), decode(url.password().unwrap_or("")))
        });
        let _ = url.set_username("");
        let _ = url.set_password(None);
        let mut builder = TransportBuilder::new(SingleNodeConnectionPool::new(url))
            .disable_proxy()
            .timeout(s.request_timeout);
        match (&s.api_key, basic) {
            (Some(key), _) => builder = builder.auth(Credentials::EncodedApiKey(key.clone())),
            (None, Some((user, password))) => builder = builder.auth(Credentials::Basic(user, password)),
            (None, None) => {}
        }
        if let Some(ca) = &s.ca_file {
            let pem = std::fs::read(ca).map_err(|e| err(format!("cannot read the CA file {}: {e}", ca.display())))?;
            let cert = Certificate::from_pem(&pem)
                .map_err(|e| err(format!("cannot parse the CA file {}: {e}", ca.display())))?;
            builder = builder.cert_validation(CertificateValidation::Full(cert));
        }
        let transport = builder
            .build()
            .map_err(|e| err(format!("cannot build the HTTP client: {e}")))?;
        Ok(SearchSink {
            name: name.to_string(),
            client: Elasticsearch::new(transport),
            max_bulk_bytes: s.max_bulk_bytes.max(1024),
            retry_min: s.retry_min,
            retry_max: s.retry_max,
            item_retries: s.item_retries,
        })
    }

    fn fail(&self, m: impl std::fmt::Display) -> SinkError {
        SinkError::new(&self.name, m.to_string())
    }

    /// Sends a JSON request; returns status and parsed body (Null when empty).
    async fn call(&self, method: Method, path: &str, body: Option<Vec<u8>>) -> Result<(u16, Value), SinkError> {
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        let resp = self
            .client
            .send(method, path, headers, None::<&()>, body, None)
            .await
            .map_err(|e| self.fail(format!("{path}: {e}")))?;
        let status = resp.status_code().as_u16();
        let text = resp
            .text()
            .await
            .map_err(|e| self.fail(format!("{path}: reading the answer: {e}")))?;
        let v = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        Ok((status, v))
    }

    /// Sends a JSON body; `Ok` only for a 2xx answer, else an error naming `what`.
    async fn call_ok(&self, method: Method, path: &str, body: &Value, what: &str) -> Result<Value, SinkError> {
        let (status, v) = self
            .call(method, path, Some(serde_json::to_vec(body).expect("JSON")))
            .await?;
        if (200..300).contains(&status) {
            Ok(v)
        } else {
            Err(self.fail(format!("{what}: {status} {v}")))
        }
    }

    /// Creates `{alias}_v{version}` with the alias when the alias does not exist yet.
    /// Returns the name of an index behind the alias, and whether it was just created.
    pub async fn ensure_index(&self, spec: &IndexSpec) -> Result<(String, bool), SinkError> {
        if let Some(existing) = self.alias_target(&spec.alias).await? {
            return Ok((existing, false));
        }
        let index = spec.index_name();
        let body = json!({
            "settings": spec.settings,
            "mappings": spec.mappings,
            "aliases": { &spec.alias: { "is_write_index": true } },
        });
        let (status, v) = self
            .call(
                Method::Put,
                &format!("/{index}"),
                Some(serde_json::to_vec(&body).expect("JSON")),
            )
            .await?;
        match status {
            200..=299 => Ok((index, true)),
            400 if v.to_string().contains("already_exists") => {
                // The index exists without the alias (e.g. created by hand): attach it.
                self.swap_alias(&spec.alias, None, &index).await?;
                Ok((index, true))
            }
            _ => Err(self.fail(format!("cannot create index {index}: {status} {v}"))),
        }
    }

    /// Writes documents into `index` (an alias or index name). See the module docs for
    /// the per-item rules.
    pub async fn write(&self, index: &str, docs: &[SinkDoc]) -> Result<Vec<Rejection>, SinkError> {
        self.write_target(index, true, docs).await
    }

    /// Writes into `index`: an alias (`alias = true`: a missing alias is an error, never
    /// an auto-created index) or a concrete index (a rebuild's new index).
    pub async fn write_target(&self, index: &str, alias: bool, docs: &[SinkDoc]) -> Result<Vec<Rejection>, SinkError> {
        let mut rejections = Vec::new();
        let mut pending: Vec<&SinkDoc> = docs.iter().collect();
        let mut backoff = backon::ExponentialBuilder::default()
            .with_min_delay(self.retry_min)
            .with_max_delay(self.retry_max)
            .with_jitter()
            .without_max_times()
            .build();
        for round in 0..=self.item_retries {
            let mut retry = Vec::new();
            let mut start = 0;
            while start < pending.len() {
                let mut body = Vec::new();
                let mut end = start;
                while end < pending.len() && (end == start || body.len() < self.max_bulk_bytes) {
                    action_lines(index, alias, pending[end], &mut body);
                    end += 1;
                }
                let chunk = &pending[start..end];
                start = end;
                let (status, v) = self.call(Method::Post, "/_bulk", Some(body)).await?;
                if !(200..300).contains(&status) {
                    return Err(self.fail(format!(
                        "bulk request answered {status}: {}",
                        truncate(&v.to_string(), 300)
                    )));
                }
                let items = v
                    .get("items")
                    .and_then(Value::as_array)
                    .ok_or_else(|| self.fail("bulk answer without items"))?;
                if items.len() != chunk.len() {
                    return Err(self.fail(format!(
                        "bulk answer has {} items for {} actions",
                        items.len(),
                        chunk.len()
                    )));
                }
                for (d, item) in chunk.iter().zip(items) {
                    let res = item
                        .as_object()
                        .and_then(|m| m.values().next())
                        .cloned()
                        .unwrap_or(Value::Null);
                    let st = res.get("status").and_then(Value::as_u64).unwrap_or(0) as u16;
                    if st == 404 && d.body.is_some() && alias {
                        return Err(SinkError::lost(
                            &self.name,
                            crate::sink::Lost::Projection,
                            format!("alias {index} is gone: {}", res.get("error").unwrap_or(&Value::Null)),
                        ));
                    }
                    if is_ok_status(st, d.body.is_none()) {
                        continue;
                    }
                    if is_retryable(st) {
                        retry.push(*d);
                    } else {
                        let reason = res
                            .get("error")
                            .map_or_else(|| format!("status {st}"), |e| format!("status {st}: {e}"));
                        rejections.push(Rejection {
                            id: d.id.clone(),
                            reason,
                        });
                    }
                }
            }
            if retry.is_empty() {
                return Ok(rejections);
            }
            if round == self.item_retries {
                return Err(self.fail(format!(
                    "{} documents still refused with 429/5xx after {} rounds",
                    retry.len(),
                    round + 1
                )));
            }
            let delay = backoff.next().unwrap_or(self.retry_max);
            tracing::warn!(sink = %self.name, items = retry.len(), retry_in_ms = delay.as_millis() as u64, "bulk items refused with 429/5xx; retrying them");
            tokio::time::sleep(delay).await;
            pending = retry;
        }
        Ok(rejections)
    }

    /// The index behind `alias`, if any.
    pub async fn alias_target(&self, alias: &str) -> Result<Option<String>, SinkError> {
        let (status, v) = self.call(Method::Get, &format!("/_alias/{alias}"), None).await?;
        match status {
            200 => Ok(v.as_object().and_then(|m| m.keys().next()).cloned()),
            404 => Ok(None),
            _ => Err(self.fail(format!("alias lookup answered {status}: {v}"))),
        }
    }

    /// Creates `index` (without alias) from the spec's settings and mappings.
    pub async fn create_index(&self, index: &str, spec: &IndexSpec) -> Result<(), SinkError> {
        let body = json!({"settings": spec.settings, "mappings": spec.mappings});
        self.call_ok(
            Method::Put,
            &format!("/{index}"),
            &body,
            &format!("cannot create index {index}"),
        )
        .await
        .map(|_| ())
    }

    pub async fn refresh(&self, index: &str) -> Result<(), SinkError> {
        self.call(Method::Post, &format!("/{index}/_refresh"), None)
            .await
            .map(|_| ())
    }

    pub async fn count(&self, index: &str) -> Result<u64, SinkError> {
        let (status, v) = self.call(Method::Get, &format!("/{index}/_count"), None).await?;
        v.get("count")
            .and_then(Value::as_u64)
            .ok_or_else(|| self.fail(format!("_count answered {status}: {v}")))
    }

    /// Points `alias` at `new` instead of `old`, in one `_aliases` call (atomic for
    /// readers: they see the old index or the new one, never neither).
    pub async fn swap_alias(&self, alias: &str, old: Option<&str>, new: &str) -> Result<(), SinkError> {
        let mut actions = vec![];
        if let Some(old) = old {
            actions.push(json!({"remove": {"index": old, "alias": alias}}));
        }
        actions.push(json!({"add": {"index": new, "alias": alias, "is_write_index": true}}));
        self.call_ok(Method::Post, "/_aliases", &json!({ "actions": actions }), "alias swap")
            .await
            .map(|_| ())
    }

    /// Every document behind `alias` as `(id, _source)`, through a scroll (`verify`).
    pub async fn scan(&self, alias: &str) -> Result<Vec<(String, Value)>, SinkError> {
        let mut out = Vec::new();
        let mut v = self
            .call_ok(
                Method::Post,
                &format!("/{alias}/_search?scroll=2m"),
                &json!({"size": 1000, "sort": ["_doc"], "query": {"match_all": {}}}),
                "scroll",
            )
            .await?;
        loop {
            let hits = v["hits"]["hits"].as_array().cloned().unwrap_or_default();
            let id = v["_scroll_id"].as_str().map(str::to_string);
            for h in &hits {
                if let Some(i) = h["_id"].as_str() {
                    out.push((i.to_string(), h["_source"].clone()));
                }
            }
            match id {
                Some(id) if !hits.is_empty() => {
                    v = self
                        .call_ok(
                            Method::Post,
                            "/_search/scroll",
                            &json!({"scroll": "2m", "scroll_id": id}),
                            "scroll",
                        )
                        .await?;
                }
                Some(id) => {
                    let _ = self
                        .call(
                            Method::Delete,
                            "/_search/scroll",
                            Some(serde_json::to_vec(&json!({"scroll_id": id})).expect("JSON")),
                        )
                        .await;
                    return Ok(out);
                }
                None => return Ok(out),
            }
        }
    }

    /// One document's `_source` through `alias`, `None` when missing.
    pub async fn get(&self, alias: &str, id: &str) -> Result<Option<Value>, SinkError> {
        let (status, v) = self.call(Method::Get, &format!("/{alias}/_doc/{id}"), None).await?;
        match status {
            200 if v["found"] != json!(false) => Ok(Some(v["_source"].clone())),
            200 | 404 => Ok(None),
            _ => Err(self.fail(format!("get {id} answered {status}: {v}"))),
        }
    }

    pub async fn delete_index(&self, index: &str) -> Result<(), SinkError> {
        self.call(Method::Delete, &format!("/{index}"), None).await.map(|_| ())
    }
}

fn truncate(s: &str, n: usize) -> &str {
    match s.char_indices().nth(n) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use viewkeeper_projections::model::Row;

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
