//! The worker's HTTP listener (default `127.0.0.1:9464`, loopback by default):
//! `/metrics` (Prometheus text, metrics named `viewkeeper_…`), `/healthz` (the process
//! answers), `/readyz` (every source is streaming, the last sink write succeeded and no
//! source lags more than `http.max_lag_ms`; 503 with the reasons otherwise),
//! `/v1/wait` (read-your-writes, [`crate::wait`]), `/` and `/v1/status` (the live status
//! page, [`crate::status_page`]).

use crate::status_page::StatusPage;
use crate::wait::{WaitQuery, Waits};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// What `/readyz` looks at. Sources and the engine flip the flags.
#[derive(Debug, Default)]
pub struct Health {
    /// Per source: streaming from its slot right now.
    pub sources: BTreeMap<String, Arc<AtomicBool>>,
    /// The last sink write succeeded (false while a sink is failing).
    pub sinks_ok: AtomicBool,
    /// Per source: seconds between the commit of the newest change applied and its
    /// apply (0 when caught up), as set by the engine.
    pub lag_seconds: std::sync::Mutex<BTreeMap<String, f64>>,
    /// `/readyz` fails while a source lags more than this (`http.max_lag_ms`).
    pub max_lag: std::time::Duration,
    /// What the status page shows beyond the metrics.
    pub board: crate::status_page::Board,
}

impl Health {
    /// Ready, and the reasons when not.
    pub fn ready(&self) -> (bool, Vec<String>) {
        let mut why = Vec::new();
        for (name, s) in &self.sources {
            if !s.load(Ordering::Relaxed) {
                why.push(format!("source {name} is not streaming"));
            }
        }
        if !self.sinks_ok.load(Ordering::Relaxed) {
            why.push("the last sink write failed (or none succeeded yet)".into());
        }
        for (name, lag) in self.lag_seconds.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            if *lag > self.max_lag.as_secs_f64() {
                why.push(format!(
                    "source {name} lags {lag:.1} s (bound http.max_lag_ms = {})",
                    self.max_lag.as_millis()
                ));
            }
        }
        (why.is_empty(), why)
    }
}

#[derive(Clone)]
struct AppState {
    health: Arc<Health>,
    metrics: PrometheusHandle,
    waits: Arc<Waits>,
    page: Arc<StatusPage>,
}

/// What the listener serves beside the metrics.
pub struct Served {
    pub health: Arc<Health>,
    pub metrics: PrometheusHandle,
    pub waits: Waits,
    pub page: Arc<StatusPage>,
}

fn json_response(code: StatusCode, body: &serde_json::Value) -> Response {
    (code, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}

async fn wait_handler(State(s): State<AppState>, q: Result<Query<WaitQuery>, QueryRejection>) -> Response {
    let q = match q {
        Ok(Query(q)) => q,
        Err(e) => return json_response(StatusCode::BAD_REQUEST, &json!({ "error": e.body_text() })),
    };
    match s.waits.wait(&q).await {
        Ok(o) if o.reached => json_response(StatusCode::OK, &o.body),
        Ok(o) => json_response(StatusCode::REQUEST_TIMEOUT, &o.body),
        Err(e) => json_response(
            StatusCode::from_u16(e.status()).unwrap_or(StatusCode::BAD_REQUEST),
            &json!({ "error": e.to_string() }),
        ),
    }
}

/// Installs the Prometheus recorder (once per process) and returns its handle.
pub fn install_metrics() -> anyhow::Result<PrometheusHandle> {
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets(&[
            0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
        ])?
        .install_recorder()
        .map_err(|e| anyhow::anyhow!("cannot install the metrics recorder: {e}"))
}

/// Binds `listen` (fails when the address is taken) and serves until `shutdown`.
pub async fn serve(
    listen: &str,
    served: Served,
    shutdown: CancellationToken,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("http.listen {listen}: cannot listen ({e}); set http.listen to a free address"))?;
    let addr = listener.local_addr()?;
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(|State(s): State<AppState>| async move {
                let (ok, why) = s.health.ready();
                let code = if ok {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                (code, json!({ "ready": ok, "reasons": why }).to_string())
            }),
        )
        .route(
            "/metrics",
            get(|State(s): State<AppState>| async move { s.metrics.render() }),
        )
        .route("/v1/wait", get(wait_handler))
        .route(
            "/v1/status",
            get(|State(s): State<AppState>| async move { json_response(StatusCode::OK, &s.page.status()) }),
        )
        .route(
            "/",
            get(|| async {
                (
                    [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
                    crate::status_page::PAGE,
                )
            }),
        )
        .with_state(AppState {
            health: served.health,
            metrics: served.metrics,
            waits: Arc::new(served.waits),
            page: served.page,
        });
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
    });
    Ok((addr, task))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_names_every_reason() {
        let h = Health {
            max_lag: std::time::Duration::from_secs(30),
            ..Default::default()
        };
        h.sinks_ok.store(true, Ordering::Relaxed);
        assert_eq!(h.ready(), (true, vec![]));
        h.lag_seconds.lock().unwrap().insert("catalog".into(), 45.5);
        let (ok, why) = h.ready();
        assert!(!ok);
        assert_eq!(
            why,
            vec!["source catalog lags 45.5 s (bound http.max_lag_ms = 30000)".to_string()]
        );
        h.lag_seconds.lock().unwrap().insert("catalog".into(), 0.0);
        h.sinks_ok.store(false, Ordering::Relaxed);
        let mut with_source = Health {
            max_lag: std::time::Duration::from_secs(30),
            ..Default::default()
        };
        with_source
            .sources
            .insert("identity".into(), Arc::new(AtomicBool::new(false)));
        let (ok, why) = with_source.ready();
        assert!(!ok);
        assert_eq!(why.len(), 2, "{why:?}");
        assert!(why[0].contains("identity is not streaming"));
        assert!(!h.ready().0);
    }
}
