//! `trackgate operator` and `trackgate crd`: the process around the controller — admin
//! endpoints, leader election, graceful shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use kube::{Client, CustomResourceExt};
use kube_lease_manager::LeaseManagerBuilder;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{info, warn};
use trackgate_api::TrackerPortPool;
use trackgate_telemetry::Health;

use crate::controller::{self, Context};
use crate::metrics::Metrics;

/// Name of the Lease the replicas compete for.
pub const LEASE_NAME: &str = "trackgate-operator";
/// Env var with the listener image (set by the chart to the operator's own image).
pub const IMAGE_ENV: &str = "TRACKGATE_IMAGE";
/// Env var with the cluster's node-port range, as the API server's `--service-node-port-range`
/// (default `30000-32767`); the operator counts the node ports a pool takes against it.
pub const NODE_PORT_RANGE_ENV: &str = "TRACKGATE_NODE_PORT_RANGE";
/// Listener image when [`IMAGE_ENV`] is unset (local runs).
pub const DEFAULT_IMAGE: &str = concat!("ghcr.io/trackgate/trackgate:", env!("CARGO_PKG_VERSION"));
/// How long a leader holds the lease without renewing it; a crashed leader is replaced
/// within this time.
pub const LEASE_DURATION_SECONDS: u64 = 15;
/// Renew this long before the lease expires (also the clock skew tolerated between nodes).
pub const LEASE_GRACE_SECONDS: u64 = 5;

/// Why the operator stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// No usable kubeconfig or in-cluster config.
    #[error("no usable Kubernetes configuration (KUBECONFIG, ~/.kube/config or in-cluster)")]
    Client(#[source] kube::Error),
    /// The admin address could not be bound.
    #[error("cannot bind the admin address {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// Metrics could not be registered.
    #[error("registering metrics")]
    Metrics(#[from] prometheus::Error),
    /// [`NODE_PORT_RANGE_ENV`] is not a port range.
    #[error("{NODE_PORT_RANGE_ENV}: {0}")]
    NodePortRange(String),
    /// Leader election failed to start.
    #[error("starting leader election")]
    Lease(#[from] kube_lease_manager::LeaseManagerError),
}

/// The CRD as YAML, exactly what `crds/trackerportpools.trackgate.dev.yaml` holds.
pub fn crd_yaml() -> String {
    // NB: serialising a CRD (plain data, string keys) cannot fail.
    serde_yaml::to_string(&TrackerPortPool::crd()).unwrap_or_default()
}

/// Runs the operator until SIGTERM or Ctrl-C: admin endpoints on `admin_addr`, the controller
/// while this replica holds the lease `trackgate-operator` in `$POD_NAMESPACE`.
///
/// # Errors
/// Start-up failures; once running, API errors are retried, not returned.
pub async fn run(admin_addr: SocketAddr) -> Result<(), ServeError> {
    trackgate_telemetry::init_logging(trackgate_telemetry::LogFormat::from_env());
    let registry = prometheus::Registry::new();
    trackgate_telemetry::register_build_info(&registry, env!("CARGO_PKG_VERSION"))?;
    let metrics = Metrics::register(&registry)?;
    let health = Health::new();
    health.set_ready("kubernetes", false);

    let (stop_tx, stop_rx) = watch::channel(false);
    let listener = TcpListener::bind(admin_addr)
        .await
        .map_err(|source| ServeError::Bind {
            addr: admin_addr,
            source,
        })?;
    let admin = tokio::spawn(trackgate_telemetry::serve(
        listener,
        registry,
        health.clone(),
        stopped(stop_rx.clone()),
    ));
    tokio::spawn(signals(stop_tx));

    // the runtime itself must keep making progress for /livez to pass
    let beat = health.heartbeat("runtime", Duration::from_secs(30));
    tokio::spawn(async move {
        loop {
            beat.beat();
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
    });

    let node_ports = match std::env::var(NODE_PORT_RANGE_ENV) {
        Ok(text) => text.parse().map_err(ServeError::NodePortRange)?,
        Err(_) => controller::apply::NodePortRange::default(),
    };
    let client = Client::try_default().await.map_err(ServeError::Client)?;
    let namespace = std::env::var("POD_NAMESPACE").unwrap_or_else(|_| "default".to_owned());
    let pod = std::env::var("POD_NAME").ok();
    let image = std::env::var(IMAGE_ENV).unwrap_or_else(|_| DEFAULT_IMAGE.to_owned());
    let mut lease = LeaseManagerBuilder::new(client.clone(), LEASE_NAME)
        .with_namespace(&namespace)
        .with_duration(LEASE_DURATION_SECONDS)
        .with_grace(LEASE_GRACE_SECONDS)
        .with_field_manager(format!(
            "trackgate-operator-lease-{}",
            pod.as_deref().unwrap_or("local")
        ));
    if let Some(pod) = &pod {
        lease = lease.with_identity(pod);
    }
    let (mut leader, lease_task) = lease.build().await?.watch().await;
    health.set_ready("kubernetes", true);
    info!(%namespace, lease = LEASE_NAME, %image, "operator started; waiting for the lease");

    let ctx =
        Arc::new(Context::new(client, metrics.clone(), image, pod).with_node_ports(node_ports));
    let mut stop = stop_rx.clone();
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            got = leader.wait_for(|l| *l) => if got.is_err() { break },
        }
        info!("leading: controller started");
        metrics.leader.set(1);
        let mut lost = leader.clone();
        let mut stop_inner = stop_rx.clone();
        controller::run(ctx.clone(), async move {
            tokio::select! {
                _ = lost.wait_for(|l| !*l) => warn!("lost the lease: controller stopping"),
                _ = stop_inner.wait_for(|s| *s) => {}
            }
        })
        .await;
        metrics.leader.set(0);
        if *stop_rx.borrow() {
            break;
        }
    }
    // closing the channel makes the lease task release the lease for the next replica
    drop(leader);
    match lease_task.await {
        Ok(Ok(_)) => info!("lease released"),
        Ok(Err(err)) => warn!(%err, "releasing the lease"),
        Err(err) => warn!(%err, "lease task"),
    }
    if let Ok(Err(err)) = admin.await {
        warn!(%err, "admin server");
    }
    Ok(())
}

async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

async fn signals(stop: watch::Sender<bool>) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {},
                    _ = tokio::signal::ctrl_c() => {},
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
    info!("shutdown requested");
    let _ = stop.send(true);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The drift check compares this to the committed file; a stale file is a CRD the API
    /// server would validate differently from the code.
    #[test]
    fn committed_crd_matches_the_types() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../crds/trackerportpools.trackgate.dev.yaml"
        );
        let committed = std::fs::read_to_string(path).unwrap();
        assert!(
            committed == crd_yaml(),
            "crds/ drifted: run `cargo run -p trackgate -- crd > crds/trackerportpools.trackgate.dev.yaml`"
        );
    }
}
