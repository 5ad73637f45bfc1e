//! The admin HTTP server: `/metrics`, `/livez`, `/readyz`.

use std::future::Future;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus::{Encoder, Registry, TextEncoder};
use tokio::net::TcpListener;

use crate::Health;

/// Why the admin server stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdminError {
    /// Serving failed.
    #[error("admin server: {0}")]
    Io(#[from] std::io::Error),
}

#[derive(Clone)]
struct AdminState {
    registry: Registry,
    health: Health,
}

/// Serves the admin endpoints on `listener` until `shutdown` completes.
///
/// # Errors
/// [`AdminError::Io`] when the listener fails.
pub async fn serve(
    listener: TcpListener,
    registry: Registry,
    health: Health,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), AdminError> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .with_state(AdminState { registry, health });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await?;
    Ok(())
}

async fn metrics(State(state): State<AdminState>) -> Response {
    let encoder = TextEncoder::new();
    let mut body = Vec::new();
    match encoder.encode(&state.registry.gather(), &mut body) {
        Ok(()) => (
            [(header::CONTENT_TYPE, encoder.format_type().to_owned())],
            body,
        )
            .into_response(),
        Err(err) => (StatusCode::INTERNAL_SERVER_ERROR, err.to_string()).into_response(),
    }
}

async fn livez(State(state): State<AdminState>) -> Response {
    probe(state.health.liveness())
}

async fn readyz(State(state): State<AdminState>) -> Response {
    probe(state.health.readiness())
}

fn probe(result: Result<(), String>) -> Response {
    match result {
        Ok(()) => (StatusCode::OK, "ok\n").into_response(),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn serves_metrics_and_probes_over_real_http() {
        let registry = Registry::new();
        crate::register_build_info(&registry, "1.2.3").unwrap();
        let health = Health::new();
        health.set_ready("redis", false);
        let beat = health.heartbeat("accept", Duration::from_millis(50));

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, registry, health.clone(), async {
            let _ = stopped.await;
        }));
        let client = reqwest::Client::new();
        let get = |path: &str| client.get(format!("{base}{path}")).send();

        let metrics = get("/metrics").await.unwrap().text().await.unwrap();
        assert!(
            metrics.contains("trackgate_build_info{version=\"1.2.3\"} 1"),
            "{metrics}"
        );
        assert_eq!(get("/livez").await.unwrap().status(), 200);
        let ready = get("/readyz").await.unwrap();
        assert_eq!(ready.status(), 503);
        assert_eq!(ready.text().await.unwrap(), "not ready: redis\n");
        health.set_ready("redis", true);
        assert_eq!(get("/readyz").await.unwrap().status(), 200);

        tokio::time::sleep(Duration::from_millis(100)).await;
        let live = get("/livez").await.unwrap();
        assert_eq!(live.status(), 503);
        assert!(live.text().await.unwrap().starts_with("stale: accept"));
        drop(beat);

        stop.send(()).unwrap();
        server.await.unwrap().unwrap();
    }
}
