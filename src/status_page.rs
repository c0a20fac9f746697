//! The live status page at `/` of the worker's HTTP listener, and its data at
//! `/v1/status`.
//!
//! Every number that `/metrics` exports is taken from the same Prometheus recorder at the
//! moment of the request (the exporter's own text, parsed), so the page and `/metrics`
//! never disagree; each such value travels as `{"m": "<metric as /metrics names it>",
//! "v": value}` and the page shows it with the metric's name in `data-metric`. Beside
//! them: what metrics do not say (durable positions, per-sink reachability, the last
//! write per projection, the latest dead letters), kept in [`Board`] by the engine.
//!
//! History: a sampler keeps, every `http.sample_interval_ms` (default 2 s) for
//! `http.history_ms` (default 10 minutes), each source's lag and the throughput, in
//! memory; the page draws them as small SVG plots. The page is one HTML file with its CSS
//! and JS inline, embedded in the binary (`include_str!`): no CDN, nothing fetched but
//! `/v1/status`.

use crate::http::Health;
use crate::wait::{Kind, Waits};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use viewkeeper_core::{Checkpoint, DeadLetter};

/// The page (HTML with inline CSS and JS).
pub const PAGE: &str = include_str!("status_page.html");

/// Dead letters the page lists.
const LATEST_LETTERS: usize = 5;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What the engine tells the page beyond the metrics.
#[derive(Debug, Default)]
pub struct Board {
    /// Per sink: whether its last write succeeded.
    sinks: Mutex<BTreeMap<String, bool>>,
    /// Per projection: when a write of its documents last succeeded (ms since the epoch).
    last_write_ms: Mutex<BTreeMap<String, i64>>,
    /// The newest dead letters, newest first.
    letters: Mutex<VecDeque<Value>>,
    /// Dead letters in the state store when the worker started.
    stored_at_start: AtomicU64,
}

fn letter_json(d: &DeadLetter, at_ms: i64) -> Value {
    json!({
        "at": viewkeeper_core::model::format_ms(if d.at_ms == 0 { at_ms } else { d.at_ms }),
        "source": d.source,
        "table": d.table,
        "key": d.key,
        "stage": d.stage.to_string(),
        "reason": d.reason,
    })
}

impl Board {
    /// A sink write's outcome.
    pub fn wrote(&self, projection: &str, sink: &str, ok: bool, now_ms: i64) {
        lock(&self.sinks).insert(sink.to_string(), ok);
        if ok {
            lock(&self.last_write_ms).insert(projection.to_string(), now_ms);
        }
    }

    /// Dead letters just stored.
    pub fn dead_letters(&self, letters: &[DeadLetter], now_ms: i64) {
        let mut l = lock(&self.letters);
        for d in letters {
            l.push_front(letter_json(d, now_ms));
        }
        l.truncate(LATEST_LETTERS);
    }

    /// What the state store held at start: the count and the newest letters (newest first).
    pub fn stored(&self, count: u64, newest: &[DeadLetter]) {
        self.stored_at_start.store(count, Ordering::Relaxed);
        let mut l = lock(&self.letters);
        l.clear();
        l.extend(newest.iter().take(LATEST_LETTERS).map(|d| letter_json(d, 0)));
    }
}

/// `/metrics` text → metric (`name{labels}`, as printed) → value.
pub fn parse_metrics(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.trim().to_string(), v.trim().parse::<f64>().ok()?))
        })
        .collect()
}

/// A metric's name as `/metrics` prints it, with one label.
pub fn metric_key(name: &str, label: &str, value: &str) -> String {
    format!("{name}{{{label}=\"{value}\"}}")
}

/// One sample of the history.
#[derive(Clone, Debug)]
struct Sample {
    t_ms: i64,
    lag_seconds: BTreeMap<String, f64>,
    changes: f64,
    documents: f64,
    per_projection: BTreeMap<String, f64>,
}

/// What the page shows of the config.
#[derive(Clone, Debug, Default)]
pub struct Layout {
    /// Source → Postgres or Kafka.
    pub sources: BTreeMap<String, Kind>,
    /// Projection → its sink.
    pub projections: BTreeMap<String, String>,
    pub sinks: Vec<String>,
}

/// The page's state: the recorder, the flags, the positions and the history.
pub struct StatusPage {
    metrics: PrometheusHandle,
    health: Arc<Health>,
    waits: Waits,
    layout: Layout,
    interval: Duration,
    capacity: usize,
    samples: Mutex<VecDeque<Sample>>,
    started_ms: i64,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// `{"m": key, "v": value}` of one metric (`v` null when not exported yet).
fn m(metrics: &BTreeMap<String, f64>, key: String) -> Value {
    let v = metrics.get(&key).copied();
    json!({"m": key, "v": v})
}

impl StatusPage {
    pub fn new(
        metrics: PrometheusHandle,
        health: Arc<Health>,
        waits: Waits,
        layout: Layout,
        interval: Duration,
        history: Duration,
    ) -> Arc<StatusPage> {
        let interval = interval.max(Duration::from_millis(1));
        let capacity = (history.as_millis() / interval.as_millis()).clamp(2, 100_000) as usize;
        Arc::new(StatusPage {
            metrics,
            health,
            waits,
            layout,
            interval,
            capacity,
            samples: Mutex::new(VecDeque::with_capacity(capacity)),
            started_ms: now_ms(),
        })
    }

    fn sample_of(&self, metrics: &BTreeMap<String, f64>) -> Sample {
        let get = |k: String| metrics.get(&k).copied().unwrap_or(0.0);
        Sample {
            t_ms: now_ms(),
            lag_seconds: self
                .layout
                .sources
                .keys()
                .map(|s| {
                    (
                        s.clone(),
                        get(metric_key("viewkeeper_replication_lag_seconds", "source", s)),
                    )
                })
                .collect(),
            changes: get("viewkeeper_changes_applied_total".into()),
            documents: self
                .layout
                .projections
                .keys()
                .map(|p| get(metric_key("viewkeeper_documents_written_total", "projection", p)))
                .sum(),
            per_projection: self
                .layout
                .projections
                .keys()
                .map(|p| {
                    (
                        p.clone(),
                        get(metric_key("viewkeeper_documents_written_total", "projection", p)),
                    )
                })
                .collect(),
        }
    }

    /// Takes one sample now.
    pub fn sample(&self) {
        let s = self.sample_of(&parse_metrics(&self.metrics.render()));
        let mut q = lock(&self.samples);
        if q.len() == self.capacity {
            q.pop_front();
        }
        q.push_back(s);
    }

    /// Samples every interval until `shutdown`.
    pub fn spawn_sampler(self: &Arc<Self>, shutdown: CancellationToken) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(me.interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => me.sample(),
                }
            }
        })
    }

    /// The history as the plots need it: times, lag per source, rates between samples.
    fn history(&self) -> Value {
        let q = lock(&self.samples);
        let mut t = Vec::new();
        let mut lag: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
        let (mut changes, mut documents) = (Vec::new(), Vec::new());
        for (i, s) in q.iter().enumerate() {
            t.push(s.t_ms);
            for (src, v) in &s.lag_seconds {
                lag.entry(src).or_default().push(*v);
            }
            let rate = |now: f64, before: Option<(f64, i64)>| match before {
                Some((b, bt)) if s.t_ms > bt => {
                    ((now - b).max(0.0) * 1000.0 / (s.t_ms - bt) as f64 * 10.0).round() / 10.0
                }
                _ => 0.0,
            };
            let prev = i.checked_sub(1).and_then(|j| q.get(j));
            changes.push(rate(s.changes, prev.map(|p| (p.changes, p.t_ms))));
            documents.push(rate(s.documents, prev.map(|p| (p.documents, p.t_ms))));
        }
        json!({
            "interval_ms": self.interval.as_millis() as u64,
            "t": t,
            "lag_seconds": lag,
            "changes_per_s": changes,
            "documents_per_s": documents,
        })
    }

    /// Documents written per second over the last sample interval, per projection.
    fn writes_per_s(&self) -> BTreeMap<String, f64> {
        let q = lock(&self.samples);
        let mut out = BTreeMap::new();
        if let (Some(a), Some(b)) = (q.len().checked_sub(2).and_then(|i| q.get(i)), q.back()) {
            let dt = (b.t_ms - a.t_ms).max(1) as f64 / 1000.0;
            for (p, v) in &b.per_projection {
                let before = a.per_projection.get(p).copied().unwrap_or(0.0);
                out.insert(p.clone(), ((v - before).max(0.0) / dt * 10.0).round() / 10.0);
            }
        }
        out
    }

    /// The body of `/v1/status`.
    pub fn status(&self) -> Value {
        let metrics = parse_metrics(&self.metrics.render());
        let (ready, reasons) = self.health.ready();
        let mut sources = Vec::new();
        for (name, kind) in &self.layout.sources {
            let durable = self.waits.sources.get(name).map(|(_, rx)| rx.borrow().clone());
            let position = match (kind, &durable) {
                (Kind::Postgres, Some(d)) => json!(d.lsn.map(|l| Checkpoint::Lsn(l).to_string())),
                (Kind::Kafka, Some(d)) => Value::Array(
                    d.offsets
                        .iter()
                        .map(|((t, p), o)| json!({"topic": t, "partition": p, "next_offset": o}))
                        .collect(),
                ),
                (_, None) => Value::Null,
            };
            let streaming = self.health.sources.get(name).is_some_and(|f| f.load(Ordering::Relaxed));
            let mut o = Map::new();
            o.insert("name".into(), json!(name));
            o.insert(
                "kind".into(),
                json!(match kind {
                    Kind::Postgres => "postgres",
                    Kind::Kafka => "debezium",
                }),
            );
            o.insert("streaming".into(), json!(streaming));
            o.insert("durable_position".into(), position);
            for (field, metric) in [
                ("lag_seconds", "viewkeeper_replication_lag_seconds"),
                ("lag_bytes", "viewkeeper_replication_lag_bytes"),
                ("retained_wal_bytes", "viewkeeper_slot_retained_wal_bytes"),
                ("checkpoint", "viewkeeper_checkpoint_lsn"),
                ("heartbeats", "viewkeeper_heartbeats_total"),
            ] {
                o.insert(field.into(), m(&metrics, metric_key(metric, "source", name)));
            }
            sources.push(Value::Object(o));
        }
        let rates = self.writes_per_s();
        let last_writes = lock(&self.health.board.last_write_ms).clone();
        let projections: Vec<Value> = self
            .layout
            .projections
            .iter()
            .map(|(name, sink)| {
                json!({
                    "name": name,
                    "sink": sink,
                    "documents_written": m(&metrics, metric_key("viewkeeper_documents_written_total", "projection", name)),
                    "last_write_at": last_writes.get(name).map(|t| viewkeeper_core::model::format_ms(*t)),
                    "writes_per_s": rates.get(name).copied().unwrap_or(0.0),
                })
            })
            .collect();
        let sink_ok = lock(&self.health.board.sinks).clone();
        let sinks: Vec<Value> = self
            .layout
            .sinks
            .iter()
            .map(|name| {
                json!({
                    "name": name,
                    // No write yet: the worker checked every sink before it started.
                    "reachable": sink_ok.get(name).copied().unwrap_or(true),
                    "retries": m(&metrics, metric_key("viewkeeper_sink_retries_total", "sink", name)),
                    "writes": m(&metrics, metric_key("viewkeeper_sink_write_seconds_count", "sink", name)),
                })
            })
            .collect();
        let letters: Vec<Value> = lock(&self.health.board.letters).iter().cloned().collect();
        let dead_total = metrics.get("viewkeeper_dead_letters_total").copied().unwrap_or(0.0);
        json!({
            "now": viewkeeper_core::model::format_ms(now_ms()),
            "started_at": viewkeeper_core::model::format_ms(self.started_ms),
            "ready": ready,
            "reasons": reasons,
            "totals": {
                "changes_applied": m(&metrics, "viewkeeper_changes_applied_total".into()),
                "batches": m(&metrics, "viewkeeper_batches_total".into()),
                "state_store_bytes": m(&metrics, "viewkeeper_state_store_bytes".into()),
            },
            "sources": sources,
            "projections": projections,
            "sinks": sinks,
            "dead_letters": {
                "count": m(&metrics, "viewkeeper_dead_letters_total".into()),
                "stored": self.health.board.stored_at_start.load(Ordering::Relaxed) + dead_total as u64,
                "latest": letters,
            },
            "history": self.history(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_exporters_text() {
        let text = "# TYPE viewkeeper_batches_total counter\nviewkeeper_batches_total 12\n\
                    viewkeeper_replication_lag_seconds{source=\"catalog\"} 0.25\n\
                    viewkeeper_sink_write_seconds_bucket{sink=\"cache\",le=\"0.1\"} 3\n\n";
        let m = parse_metrics(text);
        assert_eq!(m["viewkeeper_batches_total"], 12.0);
        assert_eq!(
            m[&metric_key("viewkeeper_replication_lag_seconds", "source", "catalog")],
            0.25
        );
        assert_eq!(m.len(), 3);
    }

    #[test]
    fn board_keeps_the_newest_letters_first() {
        let b = Board::default();
        let letter = |r: &str| DeadLetter {
            reason: r.into(),
            ..Default::default()
        };
        b.stored(7, &[letter("old")]);
        b.dead_letters(&(0..6).map(|i| letter(&format!("r{i}"))).collect::<Vec<_>>(), 1);
        let l = lock(&b.letters);
        assert_eq!(l.len(), LATEST_LETTERS);
        assert_eq!(l[0]["reason"], "r5");
        assert_eq!(l[4]["reason"], "r1");
    }
}
