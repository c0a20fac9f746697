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

pub mod bulk;
pub mod config;

pub use config::SearchConfig;

use bulk::{action_lines, truncate, Item};
use elasticsearch::auth::Credentials;
use elasticsearch::cert::{Certificate, CertificateValidation};
use elasticsearch::http::headers::{HeaderMap, HeaderValue, CONTENT_TYPE};
use elasticsearch::http::transport::{SingleNodeConnectionPool, TransportBuilder};
use elasticsearch::http::{Method, Url};
use elasticsearch::Elasticsearch;
use futures_util::future::BoxFuture;
use serde_json::{json, Value};
use std::time::Duration;
use viewkeeper_core::sink::{IndexLayout, Lost, Rejection, Sink, SinkDoc, SinkError, Target};
use viewkeeper_core::ErrorKind;

#[derive(Clone)]
pub struct SearchSink {
    name: String,
    client: Elasticsearch,
    max_bulk_bytes: usize,
    retry_min: Duration,
    retry_max: Duration,
    item_retries: usize,
}

impl SearchSink {
    /// The client of sink `name` (no request made yet); `retry_min`/`retry_max`: the
    /// backoff of items retried inside one write.
    pub fn new(name: &str, s: &SearchConfig, retry_min: Duration, retry_max: Duration) -> Result<Self, SinkError> {
        let err = |m: String| SinkError::of(name, ErrorKind::Unfit, m);
        let mut url = Url::parse(s.url.expose()).map_err(|e| err(format!("bad url: {e}")))?;
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
            .timeout(Duration::from_millis(s.request_timeout_ms));
        match (&s.api_key, basic) {
            (Some(key), _) => builder = builder.auth(Credentials::EncodedApiKey(key.expose().to_string())),
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
            retry_min,
            retry_max,
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

    /// Creates the layout's index with the alias when the alias does not exist yet.
    /// Returns the name of an index behind the alias, and whether it was just created.
    pub async fn ensure_index(&self, spec: &IndexLayout) -> Result<(String, bool), SinkError> {
        if let Some(existing) = self.alias_target(&spec.alias).await? {
            return Ok((existing, false));
        }
        let index = spec.index.clone();
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
        let mut backoff = viewkeeper_core::retry::backoff(self.retry_min, self.retry_max);
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
                for (d, answer) in chunk.iter().zip(items) {
                    match bulk::item(d, alias, answer) {
                        Item::Done => {}
                        Item::Retry => retry.push(*d),
                        Item::Rejected(reason) => rejections.push(Rejection {
                            id: d.id.clone(),
                            reason,
                        }),
                        Item::AliasGone(why) => {
                            return Err(SinkError::lost(
                                &self.name,
                                Lost::Projection,
                                format!("alias {index} is gone: {why}"),
                            ))
                        }
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
            let delay = backoff.delay();
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
    pub async fn create_index(&self, index: &str, spec: &IndexLayout) -> Result<(), SinkError> {
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

impl SearchSink {
    /// A write as the [`Sink`] contract has it: through the alias (and into a rebuild's
    /// index beside it), or into one concrete index.
    async fn write_for(&self, target: &Target, docs: &[SinkDoc]) -> Result<Vec<Rejection>, SinkError> {
        if let Some(ix) = &target.into {
            return self.write_target(ix, false, docs).await;
        }
        let layout = target.layout.as_ref().ok_or_else(|| {
            SinkError::of(
                &self.name,
                ErrorKind::Unfit,
                format!("projection {} has no index", target.projection),
            )
        })?;
        let mut r = self.write(&layout.alias, docs).await?;
        if let Some(ix) = &target.also_into {
            r.extend(self.write_target(ix, false, docs).await?);
        }
        Ok(r)
    }
}

impl Sink for SearchSink {
    fn name(&self) -> &str {
        &self.name
    }

    fn prepare<'a>(&'a self, target: &'a Target) -> BoxFuture<'a, Result<bool, SinkError>> {
        Box::pin(async move {
            match (&target.layout, &target.into) {
                (Some(layout), None) => Ok(self.ensure_index(layout).await?.1),
                _ => Ok(false),
            }
        })
    }

    fn write<'a>(
        &'a self,
        target: &'a Target,
        docs: &'a [SinkDoc],
    ) -> BoxFuture<'a, Result<Vec<Rejection>, SinkError>> {
        Box::pin(self.write_for(target, docs))
    }

    fn max_version<'a>(
        &'a self,
        target: &'a Target,
        ids: &'a [String],
    ) -> BoxFuture<'a, Result<Option<u64>, SinkError>> {
        Box::pin(async move {
            let Some(layout) = &target.layout else { return Ok(None) };
            let mut max = None;
            for chunk in ids.chunks(1000) {
                let body = serde_json::to_vec(&json!({ "ids": chunk })).expect("JSON");
                let (status, v) = self
                    .call(
                        Method::Post,
                        &format!("/{}/_mget?_source=false", layout.alias),
                        Some(body),
                    )
                    .await?;
                if status != 200 {
                    return Err(self.fail(format!("_mget of versions answered {status}: {v}")));
                }
                let found = v["docs"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|d| d["_version"].as_u64());
                max = max.max(found.max());
            }
            Ok(max)
        })
    }
}
