//! `viewkeeper wait`: asks a running worker's `/v1/wait` whether a position is durable in
//! every read model, and waits for it ([`crate::wait`] has the rules).
//!
//! Exit codes: 0 reached, [`TIMED_OUT`] when the timeout passed first, 1 for every other
//! failure (unknown source, bad position, no worker answering). The server's answer is
//! printed on stdout as one JSON line (`position` is where the source is durable now).

use serde_json::Value;
use std::time::Duration;

/// Exit code of a wait that timed out.
pub const TIMED_OUT: u8 = 3;

/// What `viewkeeper wait` asks.
#[derive(Clone, Debug, clap::Args)]
pub struct WaitArgs {
    /// The worker's HTTP listener.
    #[arg(long, default_value = "http://127.0.0.1:9464", env = "VIEWKEEPER_URL")]
    pub url: String,
    #[arg(long)]
    pub source: String,
    /// Postgres: an LSN (`pg_current_wal_insert_lsn()` after the commit, or the commit's LSN).
    #[arg(long, required_unless_present = "topic", conflicts_with = "topic")]
    pub lsn: Option<String>,
    /// Debezium: the record's topic, partition and offset.
    #[arg(long, requires_all = ["partition", "offset"])]
    pub topic: Option<String>,
    #[arg(long)]
    pub partition: Option<i32>,
    #[arg(long)]
    pub offset: Option<i64>,
    /// Give up after this long (the worker caps it at 60000).
    #[arg(long, default_value_t = 5000)]
    pub timeout_ms: u64,
}

/// A wait that did not get an answer.
#[derive(Debug, thiserror::Error)]
pub enum WaitCommandError {
    #[error("cannot ask the worker at {url}: {source}")]
    Request {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("the worker refused the wait ({status}): {message}")]
    Refused { status: u16, message: String },
}

/// Asks the worker; `Ok((reached, answer))`.
pub async fn wait(a: &WaitArgs) -> Result<(bool, Value), WaitCommandError> {
    let url = format!("{}/v1/wait", a.url.trim_end_matches('/'));
    let mut q: Vec<(&str, String)> = vec![("source", a.source.clone()), ("timeout_ms", a.timeout_ms.to_string())];
    if let Some(l) = &a.lsn {
        q.push(("lsn", l.clone()));
    }
    if let Some(t) = &a.topic {
        q.push(("topic", t.clone()));
    }
    if let Some(p) = a.partition {
        q.push(("partition", p.to_string()));
    }
    if let Some(o) = a.offset {
        q.push(("offset", o.to_string()));
    }
    let err = |source| WaitCommandError::Request {
        url: url.clone(),
        source,
    };
    let client = reqwest::Client::builder()
        // The server answers by the (capped) timeout; this only bounds a hung worker.
        .timeout(Duration::from_millis(a.timeout_ms.min(crate::wait::MAX_TIMEOUT_MS)) + Duration::from_secs(10))
        .build()
        .map_err(err)?;
    let r = client.get(&url).query(&q).send().await.map_err(err)?;
    let status = r.status().as_u16();
    let body: Value = r.json().await.map_err(err)?;
    match status {
        200 => Ok((true, body)),
        408 => Ok((false, body)),
        _ => Err(WaitCommandError::Refused {
            status,
            message: body["error"].as_str().unwrap_or("no reason given").to_string(),
        }),
    }
}
