//! Read-your-writes: `GET /v1/wait?source=S&lsn=L[&timeout_ms=N]` (Postgres) or
//! `…&topic=T&partition=P&offset=O` (Debezium) answers once every projection reading
//! source `S` made everything up to that position durable in its sinks.
//!
//! Each source's durable position ([`Durable`]) is published through a `watch` channel:
//! the engine raises a Postgres source's LSN with every checkpoint it stores (a commit's
//! end LSN, or the server's WAL end while the source is idle and caught up, so a position
//! from `pg_current_wal_insert_lsn()` taken after a commit is reached on a quiet database
//! too), a Kafka source raises its partitions' offsets when the engine acknowledges them.
//! A waiter subscribes and is woken on each advance; nothing polls.
//!
//! Answers: 200 `{"reached": true, …}`; 408 with the current position when `timeout_ms`
//! (default [`DEFAULT_TIMEOUT_MS`], at most [`MAX_TIMEOUT_MS`]) passes first; 404 for an
//! unknown source; 400 naming the parameter that is missing or malformed.

use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use viewkeeper_core::{Checkpoint, Durable};

/// `timeout_ms` when not given.
pub const DEFAULT_TIMEOUT_MS: u64 = 5_000;
/// Longest `timeout_ms` honoured (larger values are capped).
pub const MAX_TIMEOUT_MS: u64 = 60_000;

/// What kind of position a source has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Postgres,
    Kafka,
}

/// The sources waiters can wait on.
#[derive(Clone, Debug, Default)]
pub struct Waits {
    pub sources: BTreeMap<String, (Kind, watch::Receiver<Durable>)>,
}

/// The query of `/v1/wait` (and of `viewkeeper wait`).
#[derive(Clone, Debug, Default, Deserialize)]
pub struct WaitQuery {
    pub source: Option<String>,
    pub lsn: Option<String>,
    pub topic: Option<String>,
    pub partition: Option<String>,
    pub offset: Option<String>,
    pub timeout_ms: Option<String>,
}

/// A position to wait for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    Lsn(u64),
    Offset { topic: String, partition: i32, offset: i64 },
}

/// A wait that cannot start.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WaitError {
    #[error("unknown source '{source_name}' (sources: {known})")]
    UnknownSource { source_name: String, known: String },
    #[error("parameter {param}: {problem}")]
    BadParameter { param: &'static str, problem: String },
}

impl WaitError {
    /// The HTTP status it answers with.
    pub fn status(&self) -> u16 {
        match self {
            WaitError::UnknownSource { .. } => 404,
            WaitError::BadParameter { .. } => 400,
        }
    }
}

fn bad(param: &'static str, problem: impl Into<String>) -> WaitError {
    WaitError::BadParameter {
        param,
        problem: problem.into(),
    }
}

/// Parses a Postgres LSN as Postgres prints it (`16/B374D848`, hexadecimal halves).
pub fn parse_lsn(s: &str) -> Option<u64> {
    let (hi, lo) = s.trim().split_once('/')?;
    let (hi, lo) = (u32::from_str_radix(hi, 16).ok()?, u32::from_str_radix(lo, 16).ok()?);
    Some((u64::from(hi) << 32) | u64::from(lo))
}

/// The position `p` as text (`0/16B3748`).
fn lsn_text(v: u64) -> String {
    Checkpoint::Lsn(v).to_string()
}

impl WaitQuery {
    /// The source, the target and the timeout (capped), checked against `kind`.
    pub fn target(&self, kind: Kind) -> Result<(Target, Duration), WaitError> {
        let timeout = match &self.timeout_ms {
            None => DEFAULT_TIMEOUT_MS,
            Some(t) => t
                .parse::<u64>()
                .map_err(|_| bad("timeout_ms", format!("'{t}' is not a number of milliseconds")))?,
        }
        .min(MAX_TIMEOUT_MS);
        let target = match kind {
            Kind::Postgres => {
                let l = self
                    .lsn
                    .as_deref()
                    .ok_or_else(|| bad("lsn", "missing: a Postgres source waits for an LSN, e.g. lsn=0/16B3748"))?;
                Target::Lsn(parse_lsn(l).ok_or_else(|| {
                    bad(
                        "lsn",
                        format!("'{l}' is not an LSN (two hexadecimal halves, e.g. 0/16B3748)"),
                    )
                })?)
            }
            Kind::Kafka => {
                let topic = self.topic.clone().filter(|t| !t.is_empty()).ok_or_else(|| {
                    bad(
                        "topic",
                        "missing: a Debezium source waits for topic, partition and offset",
                    )
                })?;
                let partition = self.partition.as_deref().ok_or_else(|| bad("partition", "missing"))?;
                let partition = partition
                    .parse::<i32>()
                    .ok()
                    .filter(|p| *p >= 0)
                    .ok_or_else(|| bad("partition", format!("'{partition}' is not a partition number")))?;
                let offset = self.offset.as_deref().ok_or_else(|| bad("offset", "missing"))?;
                let offset = offset
                    .parse::<i64>()
                    .ok()
                    .filter(|o| *o >= 0)
                    .ok_or_else(|| bad("offset", format!("'{offset}' is not an offset")))?;
                Target::Offset {
                    topic,
                    partition,
                    offset,
                }
            }
        };
        Ok((target, Duration::from_millis(timeout)))
    }
}

/// How a wait ended.
#[derive(Debug)]
pub struct Outcome {
    pub reached: bool,
    /// The answer's body.
    pub body: Value,
}

fn covers(d: &Durable, t: &Target) -> bool {
    match t {
        Target::Lsn(l) => d.covers_lsn(*l),
        Target::Offset {
            topic,
            partition,
            offset,
        } => d.covers_offset(topic, *partition, *offset),
    }
}

/// The durable position as the answer shows it (for a Kafka target: its partition's).
fn position(d: &Durable, t: &Target) -> Value {
    match t {
        Target::Lsn(_) => json!(d.lsn.map(lsn_text)),
        Target::Offset { topic, partition, .. } => json!({
            "topic": topic,
            "partition": partition,
            "next_offset": d.offsets.get(&(topic.clone(), *partition)),
        }),
    }
}

impl Waits {
    /// Waits until `q`'s position is durable, or its timeout.
    pub async fn wait(&self, q: &WaitQuery) -> Result<Outcome, WaitError> {
        let Some(name) = q.source.as_deref().filter(|s| !s.is_empty()) else {
            return Err(bad("source", "missing: which source, e.g. source=ordering"));
        };
        let Some((kind, rx)) = self.sources.get(name) else {
            return Err(WaitError::UnknownSource {
                source_name: name.to_string(),
                known: self.sources.keys().cloned().collect::<Vec<_>>().join(", "),
            });
        };
        let (target, timeout) = q.target(*kind)?;
        let started = Instant::now();
        let mut rx = rx.clone();
        // `wait_for` checks the current value first, then each change.
        let reached = matches!(
            tokio::time::timeout(timeout, rx.wait_for(|d| covers(d, &target))).await,
            Ok(Ok(_))
        );
        let now = rx.borrow().clone();
        let asked = match &target {
            Target::Lsn(l) => json!(lsn_text(*l)),
            Target::Offset {
                topic,
                partition,
                offset,
            } => json!({"topic": topic, "partition": partition, "offset": offset}),
        };
        Ok(Outcome {
            reached,
            body: json!({
                "source": name,
                "reached": reached,
                "target": asked,
                "position": position(&now, &target),
                "waited_ms": started.elapsed().as_millis() as u64,
                "timeout_ms": timeout.as_millis() as u64,
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(pairs: &[(&str, &str)]) -> WaitQuery {
        let get = |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string());
        WaitQuery {
            source: get("source"),
            lsn: get("lsn"),
            topic: get("topic"),
            partition: get("partition"),
            offset: get("offset"),
            timeout_ms: get("timeout_ms"),
        }
    }

    #[test]
    fn parses_lsns_and_names_bad_parameters() {
        assert_eq!(parse_lsn("0/16B3748"), Some(0x16B3748));
        assert_eq!(parse_lsn("16/B374D848"), Some((0x16 << 32) | 0xB374D848));
        assert_eq!(parse_lsn("16B3748"), None);
        assert_eq!(parse_lsn("0/xyz"), None);
        let (t, d) = q(&[("lsn", "1/0"), ("timeout_ms", "999999")])
            .target(Kind::Postgres)
            .unwrap();
        assert_eq!((t, d), (Target::Lsn(1 << 32), Duration::from_millis(MAX_TIMEOUT_MS)));
        let (_, d) = q(&[("lsn", "1/0")]).target(Kind::Postgres).unwrap();
        assert_eq!(d, Duration::from_millis(DEFAULT_TIMEOUT_MS));
        let e = q(&[("lsn", "nope")]).target(Kind::Postgres).unwrap_err();
        assert!(matches!(e, WaitError::BadParameter { param: "lsn", .. }), "{e}");
        assert_eq!(e.status(), 400);
        let e = q(&[("topic", "t"), ("partition", "0")])
            .target(Kind::Kafka)
            .unwrap_err();
        assert!(matches!(e, WaitError::BadParameter { param: "offset", .. }), "{e}");
        let (t, _) = q(&[("topic", "t"), ("partition", "2"), ("offset", "41")])
            .target(Kind::Kafka)
            .unwrap();
        assert_eq!(
            t,
            Target::Offset {
                topic: "t".into(),
                partition: 2,
                offset: 41
            }
        );
    }

    #[tokio::test]
    async fn waits_until_published_or_times_out() {
        let tx = viewkeeper_core::durable::durable_channel();
        let mut w = Waits::default();
        w.sources.insert("ordering".into(), (Kind::Postgres, tx.subscribe()));
        let e = w.wait(&q(&[("source", "nope"), ("lsn", "0/1")])).await.unwrap_err();
        assert_eq!(e.status(), 404);
        assert!(
            e.to_string().contains("unknown source 'nope' (sources: ordering)"),
            "{e}"
        );
        let timed_out = w
            .wait(&q(&[("source", "ordering"), ("lsn", "0/10"), ("timeout_ms", "20")]))
            .await
            .unwrap();
        assert!(!timed_out.reached);
        assert_eq!(timed_out.body["position"], Value::Null);
        let waiter = {
            let w = w.clone();
            tokio::spawn(async move {
                w.wait(&q(&[("source", "ordering"), ("lsn", "0/10"), ("timeout_ms", "5000")]))
                    .await
            })
        };
        tx.send_modify(|d| {
            d.raise_lsn(0x8);
        });
        tx.send_modify(|d| {
            d.raise_lsn(0x20);
        });
        let done = waiter.await.unwrap().unwrap();
        assert!(done.reached, "{}", done.body);
        assert_eq!(done.body["position"], "0/20");
    }
}
