//! The publisher's Redis connection: one server or a Redis Cluster, picked by the URL's scheme,
//! and the check that the servers can keep the pool's durability promise.
//!
//! - `redis://` / `rediss://`: one server, through a [`ConnectionManager`] (reconnects in the
//!   background with backoff; calls in between fail fast).
//! - `redis+cluster://` / `rediss+cluster://`: a Redis Cluster. The URL names one or more seed
//!   nodes (`redis+cluster://user:pass@10.0.0.1:6379,10.0.0.2:6379/`); the topology is read
//!   from them and refreshed on `MOVED`. The cluster client reconnects to each node and
//!   rebuilds its slot map on its own, as the connection manager does for one server.

use std::path::PathBuf;
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{MultipleNodeRoutingInfo, RoutingInfo};
use redis::{Cmd, Pipeline, RedisError, RedisFuture, RedisResult, Value};
use trackgate_api::redis_layout;
use trackgate_api::{AckMode, Durability};

/// TLS material for `rediss://` URLs, as PEM files (mounted from the pool's Secret). Without
/// a CA file the system's roots are trusted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RedisTlsFiles {
    /// CA certificate(s) the server's certificate must chain to
    /// (`TRACKGATE_REDIS_CA_FILE`).
    pub ca_file: Option<PathBuf>,
    /// Client certificate for mutual TLS (`TRACKGATE_REDIS_CLIENT_CERT_FILE`).
    pub client_cert_file: Option<PathBuf>,
    /// Its private key (`TRACKGATE_REDIS_CLIENT_KEY_FILE`).
    pub client_key_file: Option<PathBuf>,
}

impl RedisTlsFiles {
    /// Reads the files: `None` when none is set.
    fn load(&self) -> RedisResult<Option<redis::TlsCertificates>> {
        let read = |path: &PathBuf, what: &'static str| {
            std::fs::read(path).map_err(|err| {
                RedisError::from((
                    redis::ErrorKind::InvalidClientConfig,
                    what,
                    format!("{}: {err}", path.display()),
                ))
            })
        };
        let root_cert = self
            .ca_file
            .as_ref()
            .map(|p| read(p, "reading the Redis CA file"))
            .transpose()?;
        let client_tls = match (&self.client_cert_file, &self.client_key_file) {
            (Some(cert), Some(key)) => Some(redis::ClientTlsConfig {
                client_cert: read(cert, "reading the Redis client certificate")?,
                client_key: read(key, "reading the Redis client key")?,
            }),
            (None, None) => None,
            _ => {
                return Err(RedisError::from((
                    redis::ErrorKind::InvalidClientConfig,
                    "a Redis client certificate needs both its certificate and key files",
                )));
            }
        };
        if root_cert.is_none() && client_tls.is_none() {
            return Ok(None);
        }
        Ok(Some(redis::TlsCertificates {
            client_tls,
            root_cert,
        }))
    }
}

/// A client for one server with the pool's TLS files, or `None` for a cluster URL (the command
/// path's Pub/Sub and blocking reads need one server; see docs/operations.md).
///
/// # Errors
/// A malformed URL or unreadable TLS files.
pub(crate) fn single_client(url: &str, tls: &RedisTlsFiles) -> RedisResult<Option<redis::Client>> {
    let is_cluster = redis_layout::cluster_nodes(url)
        .map_err(|why| {
            RedisError::from((redis::ErrorKind::InvalidClientConfig, "cluster URL", why))
        })?
        .is_some();
    if is_cluster {
        return Ok(None);
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    Ok(Some(match tls.load()? {
        Some(certs) => redis::Client::build_with_tls(url, certs)?,
        None => redis::Client::open(url)?,
    }))
}

/// A multiplexed connection to one server or to a cluster; cheap to clone.
#[derive(Clone)]
pub(crate) enum RedisConn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl RedisConn {
    /// Connects lazily: nothing is dialled until the first command, so a listener starts (and
    /// reports not ready) while Redis is down.
    pub(crate) fn open(url: &str, timeout: Duration, tls: &RedisTlsFiles) -> RedisResult<Self> {
        // rustls needs one process-wide crypto provider; a second install is a no-op error.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let certs = tls.load()?;
        let nodes = redis_layout::cluster_nodes(url).map_err(|why| {
            RedisError::from((redis::ErrorKind::InvalidClientConfig, "cluster URL", why))
        })?;
        if let Some(nodes) = nodes {
            let mut builder = ClusterClientBuilder::new(nodes);
            if let Some(certs) = certs {
                builder = builder.certs(certs);
            }
            let client = builder
                .connection_timeout(timeout)
                .response_timeout(timeout)
                // Redirects (MOVED/ASK/TRYAGAIN) during a resharding or a failover are retried
                // a few times with short waits; past that the frame fails and the session's
                // own retry takes over.
                .retries(6)
                .min_retry_wait(10)
                .max_retry_wait(200)
                .build()?;
            let conn = client.get_pending_async_connection_with_config(
                redis::cluster::ClusterConfig::new()
                    .set_connection_timeout(timeout)
                    .set_response_timeout(timeout),
            );
            return Ok(RedisConn::Cluster(conn));
        }
        let client = match certs {
            Some(certs) => redis::Client::build_with_tls(url, certs)?,
            None => redis::Client::open(url)?,
        };
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(100))
            .set_max_delay(Duration::from_secs(2));
        Ok(RedisConn::Single(ConnectionManager::new_lazy_with_config(
            client, config,
        )?))
    }

    pub(crate) fn is_cluster(&self) -> bool {
        matches!(self, RedisConn::Cluster(_))
    }

    /// Runs `cmd` on every primary (the one server, or each cluster primary) and returns each
    /// node's answer.
    pub(crate) async fn on_primaries(&mut self, cmd: Cmd) -> RedisResult<Vec<(String, Value)>> {
        match self {
            RedisConn::Single(conn) => {
                let value: Value = cmd.query_async(conn).await?;
                Ok(vec![("server".to_owned(), value)])
            }
            RedisConn::Cluster(conn) => {
                let routing = RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, None));
                match conn.route_command(cmd, routing).await? {
                    Value::Map(nodes) => Ok(nodes
                        .into_iter()
                        .map(|(node, value)| (text(&node), value))
                        .collect()),
                    other => Ok(vec![("cluster".to_owned(), other)]),
                }
            }
        }
    }
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            RedisConn::Single(conn) => conn.req_packed_command(cmd),
            RedisConn::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            RedisConn::Single(conn) => conn.req_packed_commands(pipeline, offset, count),
            RedisConn::Cluster(conn) => conn.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConn::Single(conn) => conn.get_db(),
            RedisConn::Cluster(conn) => conn.get_db(),
        }
    }
}

fn text(value: &Value) -> String {
    match value {
        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        Value::SimpleString(s) | Value::VerbatimString { text: s, .. } => s.clone(),
        other => format!("{other:?}"),
    }
}

// === Durability check ===

/// What one primary reports about itself (from `INFO`).
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct ServerFacts {
    /// `valkey 8.1.1` or `redis 7.0.15`.
    pub(crate) server: String,
    /// `WAITAOF` exists (Redis >= 7.2, every Valkey).
    pub(crate) waitaof: bool,
    /// `aof_enabled:1`.
    pub(crate) aof: bool,
    /// `connected_slaves`.
    pub(crate) replicas: u32,
}

impl ServerFacts {
    /// Reads the facts from the text of `INFO server persistence replication`.
    pub(crate) fn parse(info: &str) -> Self {
        let mut facts = ServerFacts::default();
        let (mut redis_version, mut valkey_version) = (None, None);
        for line in info.lines() {
            let Some((name, value)) = line.trim_end().split_once(':') else {
                continue;
            };
            match name {
                "redis_version" => redis_version = Some(value.to_owned()),
                "valkey_version" => valkey_version = Some(value.to_owned()),
                "aof_enabled" => facts.aof = value == "1",
                "connected_slaves" => facts.replicas = value.parse().unwrap_or(0),
                _ => {}
            }
        }
        let version = |v: &str| -> (u32, u32) {
            let mut parts = v.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
            (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
        };
        match (valkey_version, redis_version) {
            (Some(v), _) => {
                facts.waitaof = version(&v) >= (7, 2);
                facts.server = format!("valkey {v}");
            }
            (None, Some(v)) => {
                facts.waitaof = version(&v) >= (7, 2);
                facts.server = format!("redis {v}");
            }
            (None, None) => facts.server = "unknown server".to_owned(),
        }
        facts
    }

    /// `Err(why)` when this primary cannot keep `durability`'s promise.
    pub(crate) fn honours(&self, durability: &Durability) -> Result<(), String> {
        let needs_fsync = matches!(durability.ack, AckMode::Fsync | AckMode::FsyncReplicas);
        if needs_fsync && !self.waitaof {
            return Err(format!(
                "{:?} durability needs WAITAOF (Redis >= 7.2 or Valkey), the server is {}",
                durability.ack, self.server
            ));
        }
        if needs_fsync && !self.aof {
            return Err(format!(
                "{:?} durability needs appendonly yes, {} has it off",
                durability.ack, self.server
            ));
        }
        let replicas = match durability.ack {
            AckMode::Replicas | AckMode::FsyncReplicas => durability.replicas.max(1),
            AckMode::Memory | AckMode::Fsync => 0,
        };
        if self.replicas < replicas {
            return Err(format!(
                "{:?} durability needs {replicas} connected replica(s), {} has {}",
                durability.ack, self.server, self.replicas
            ));
        }
        Ok(())
    }
}

/// Checks every primary against every durability in use: `Err` names the first node and
/// promise that cannot be kept.
pub(crate) async fn check_durability(
    conn: &mut RedisConn,
    modes: &[Durability],
) -> Result<(), String> {
    if modes.iter().all(|d| d.ack == AckMode::Memory) {
        return Ok(());
    }
    let mut info = redis::cmd("INFO");
    info.arg("server").arg("persistence").arg("replication");
    let nodes = conn
        .on_primaries(info)
        .await
        .map_err(|err| format!("INFO: {err}"))?;
    for (node, value) in nodes {
        let facts = match &value {
            Value::ServerError(err) => return Err(format!("{node}: INFO: {err:?}")),
            other => ServerFacts::parse(&text(other)),
        };
        for mode in modes {
            facts
                .honours(mode)
                .map_err(|why| format!("{node}: {why}"))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn facts_decide_which_promises_can_be_kept() {
        let redis70 = ServerFacts::parse(
            "# Server\r\nredis_version:7.0.15\r\n# Persistence\r\naof_enabled:1\r\n# Replication\r\nrole:master\r\nconnected_slaves:1\r\n",
        );
        assert_eq!(redis70.server, "redis 7.0.15");
        assert!(!redis70.waitaof);
        let fsync = Durability {
            ack: AckMode::Fsync,
            ..Durability::default()
        };
        let replicas = Durability {
            ack: AckMode::Replicas,
            replicas: 1,
            ..Durability::default()
        };
        assert!(redis70.honours(&fsync).unwrap_err().contains("WAITAOF"));
        assert_eq!(redis70.honours(&replicas), Ok(()));
        assert!(
            redis70
                .honours(&Durability {
                    replicas: 2,
                    ..replicas
                })
                .unwrap_err()
                .contains("needs 2 connected replica(s), redis 7.0.15 has 1")
        );

        let valkey = ServerFacts::parse(
            "redis_version:7.2.4\r\nvalkey_version:8.1.1\r\naof_enabled:0\r\nconnected_slaves:0\r\n",
        );
        assert_eq!(valkey.server, "valkey 8.1.1");
        assert!(valkey.waitaof);
        assert!(valkey.honours(&fsync).unwrap_err().contains("appendonly"));
        assert_eq!(valkey.honours(&Durability::default()), Ok(()));
    }
}
