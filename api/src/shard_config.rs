//! The listener shard config: what one listener process serves.
//!
//! The operator writes it as `shard.json` into the shard's ConfigMap; the listener mounts it,
//! reads it at start and reloads it when the file changes. `trackgate run` writes the same file
//! for a pool run on a laptop. Wire names are camelCase; durations are integer seconds at this
//! edge and typed [`Duration`]s inside the programs.

use std::collections::BTreeSet;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// File name of the shard config inside the shard's ConfigMap and the listener's mount.
pub const SHARD_CONFIG_FILE: &str = "shard.json";

/// Environment variable that carries the Redis URL into a listener (from the pool's Secret).
pub const REDIS_URL_ENV: &str = "TRACKGATE_REDIS_URL";
/// Env var: seconds a listener keeps accepting after SIGTERM with `/readyz` failing, so load
/// balancers stop sending before the ports close. Unset or 0: drain at once.
pub const DRAIN_DELAY_ENV: &str = "TRACKGATE_DRAIN_DELAY_SECONDS";

/// Environment variable naming the PEM file of the CA a `rediss://` server's certificate must
/// chain to (mounted from the pool's `redis.tls` Secret).
pub const REDIS_CA_FILE_ENV: &str = "TRACKGATE_REDIS_CA_FILE";
/// Environment variable naming the PEM client certificate for mutual TLS.
pub const REDIS_CLIENT_CERT_FILE_ENV: &str = "TRACKGATE_REDIS_CLIENT_CERT_FILE";
/// Environment variable naming the PEM key of the client certificate.
pub const REDIS_CLIENT_KEY_FILE_ENV: &str = "TRACKGATE_REDIS_CLIENT_KEY_FILE";

/// How a device is identified on a port.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum IdentificationMode {
    /// Every device owns one port; a login with any other IMEI on that port is refused.
    #[default]
    Dedicated,
    /// A few ports shared by many devices; identity is the login IMEI, checked against the pool.
    Shared,
}

/// Which IMEIs a shared pool admits.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum AdmissionMode {
    /// Only the pool's devices (inline and `devicesFrom`).
    #[default]
    Listed,
    /// Any well-formed IMEI. Anyone who learns the address can then write records into the
    /// pool's streams under an IMEI of their choosing, including a real device's.
    Open,
}

/// Wire protocol a shard's devices speak.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum Protocol {
    /// Teltonika Codec 8 / 8E / 16 over TCP (and UDP when `udp` is set).
    #[default]
    Teltonika,
    /// GT06 (Concox, Jimi IoT and clones) over TCP. Commands are Teltonika-only.
    Gt06,
}

/// GT06 settings of a pool (and of its shards).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub struct Gt06Settings {
    /// Minutes east of UTC of the time the devices send (GT06 packets carry device time, UTC
    /// or local depending on the model and its settings; the wire does not say which).
    /// 0 (default): the devices send UTC. -840 to 840.
    #[serde(default)]
    #[schemars(range(min = -840, max = 840))]
    pub utc_offset_minutes: i16,
}

/// One listener shard's whole configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ShardConfig {
    /// Name of the `TrackerPortPool`; used in metric labels, Redis keys and logs.
    pub pool: String,
    /// Shard index within the pool.
    pub shard: u32,
    /// Identification mode of the pool.
    pub mode: IdentificationMode,
    /// Wire protocol of the shard's devices.
    #[serde(default, skip_serializing_if = "is_default")]
    pub protocol: Protocol,
    /// `protocol: gt06`: how the devices' clocks are read.
    #[serde(default, skip_serializing_if = "is_default")]
    pub gt06: Gt06Settings,
    /// Ports to bind. In dedicated mode each carries the IMEI of the device that owns it.
    pub ports: Vec<PortBinding>,
    /// Shared mode: the IMEIs admitted on any port of this shard. Empty in dedicated mode.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<String>,
    /// Shared mode: files of more admitted IMEIs in the `devicesFrom` list format (one per
    /// line), relative to the directory of this config file. A shared pool's pod mounts its
    /// `devicesFrom` ConfigMaps there; the listener reloads when any of them changes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub device_files: Vec<String>,
    /// Shared mode: `listed` admits only `devices` and `deviceFiles`; `open` any IMEI.
    #[serde(default, skip_serializing_if = "is_default")]
    pub admission: AdmissionMode,
    /// Also serve Teltonika UDP datagrams on the same port numbers.
    #[serde(default)]
    pub udp: bool,
    /// Connection and frame limits.
    #[serde(default)]
    pub limits: ListenerLimits,
    /// Where records go.
    #[serde(default)]
    pub redis: RedisSink,
}

fn is_default<T: Default + PartialEq>(value: &T) -> bool {
    *value == T::default()
}

/// A port this shard binds and, in dedicated mode, the device that owns it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortBinding {
    /// TCP (and UDP, when enabled) port number.
    pub port: u16,
    /// Dedicated mode: the only IMEI accepted on this port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub imei: Option<String>,
}

/// Listener limits. Every field has a default chosen for Teltonika devices on a mobile network.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct ListenerLimits {
    /// Most open device connections one listener process holds.
    pub max_connections: u32,
    /// Largest TCP frame accepted, in bytes. Teltonika caps AVL packets at 1280 bytes and
    /// Codec 12 responses can reach a few KiB; 32 KiB is traccar's ceiling too.
    pub max_frame_bytes: u32,
    /// Seconds a logged-in connection may stay silent. Devices ping with `0xFF` below their
    /// own open-link timeout, so a connection silent for this long is dead.
    pub idle_timeout_seconds: u32,
    /// Seconds a new connection has to send its IMEI.
    pub login_timeout_seconds: u32,
    /// New connections accepted per second per process; a reconnect storm after an outage is
    /// spread out instead of stampeding Redis.
    pub accept_rate_per_second: u32,
}

impl Default for ListenerLimits {
    fn default() -> Self {
        Self {
            max_connections: 10_000,
            max_frame_bytes: 32 * 1024,
            idle_timeout_seconds: 600,
            login_timeout_seconds: 30,
            accept_rate_per_second: 1_000,
        }
    }
}

impl ListenerLimits {
    /// The idle timeout as a [`Duration`].
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(u64::from(self.idle_timeout_seconds))
    }

    /// The login timeout as a [`Duration`].
    pub fn login_timeout(&self) -> Duration {
        Duration::from_secs(u64::from(self.login_timeout_seconds))
    }
}

/// Redis Streams sink settings. The URL itself comes from the environment
/// ([`REDIS_URL_ENV`]), never from the config file, because it may carry a password.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct RedisSink {
    /// Prefix of every key: `<prefix>:{<pool>:<n>}:readings`.
    pub stream_prefix: String,
    /// Number of readings streams per pool; a device always lands in the same one.
    pub partitions: u32,
    /// Approximate `MAXLEN ~` of each readings stream.
    pub max_len: u64,
    /// What a device's ack promises about its records (see docs/operations.md).
    pub durability: Durability,
}

impl Default for RedisSink {
    fn default() -> Self {
        Self {
            stream_prefix: "trackgate".to_owned(),
            partitions: 4,
            max_len: 1_000_000,
            durability: Durability::default(),
        }
    }
}

/// When a frame is acked: after Redis has its records in memory, or only once they are
/// fsynced and/or on replicas. One wait per pipeline, so the cost is shared by its frames.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    schemars::JsonSchema,
)]
#[serde(rename_all = "camelCase", default)]
pub struct Durability {
    /// `memory` (default), `fsync` (`WAITAOF 1 0`), `replicas` (`WAIT <replicas>`) or
    /// `fsyncReplicas` (`WAITAOF 1 <replicas>`: fsynced on the primary and on that many
    /// replicas).
    pub ack: AckMode,
    /// Replicas that must have the records (`replicas` and `fsyncReplicas`).
    #[schemars(range(min = 1, max = 16))]
    pub replicas: u32,
    /// Longest wait for the fsync or the replicas, in milliseconds; a wait that times out is a
    /// failed store (no ack: the device resends and dedup absorbs the copy).
    #[schemars(range(min = 1, max = 60000))]
    pub timeout_ms: u32,
}

impl Default for Durability {
    fn default() -> Self {
        Self {
            ack: AckMode::Memory,
            replicas: 1,
            timeout_ms: 1000,
        }
    }
}

impl Durability {
    /// The wait as `(command, numlocal, numreplicas)`: `None` for [`AckMode::Memory`].
    pub fn wait(&self) -> Option<(&'static str, u32, u32)> {
        match self.ack {
            AckMode::Memory => None,
            AckMode::Fsync => Some(("WAITAOF", 1, 0)),
            AckMode::Replicas => Some(("WAIT", 0, self.replicas.max(1))),
            AckMode::FsyncReplicas => Some(("WAITAOF", 1, self.replicas.max(1))),
        }
    }

    /// The wait's timeout.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(u64::from(self.timeout_ms.max(1)))
    }
}

/// See [`Durability::ack`].
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    schemars::JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum AckMode {
    /// Acked when the primary has the records in memory.
    #[default]
    Memory,
    /// Acked when the primary has fsynced them to its AOF (`WAITAOF 1 0`).
    Fsync,
    /// Acked when `replicas` replicas have them in memory (`WAIT`).
    Replicas,
    /// Acked when the primary and `replicas` replicas have fsynced them (`WAITAOF 1 N`).
    FsyncReplicas,
}

/// Why a shard config is unusable.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum ShardConfigError {
    /// The file is not valid JSON of this shape.
    #[error("shard config is not valid JSON: {0}")]
    Json(String),
    /// A port appears twice.
    #[error("port {0} is listed twice")]
    DuplicatePort(u16),
    /// Port 0 cannot be served.
    #[error("port 0 is not a valid port")]
    ZeroPort,
    /// Dedicated mode needs an IMEI on every port.
    #[error("dedicated mode: port {0} has no IMEI")]
    MissingImei(u16),
    /// An IMEI owns two ports.
    #[error("IMEI {0} owns more than one port")]
    DuplicateImei(String),
    /// Partitions must be at least one.
    #[error("redis.partitions must be at least 1")]
    NoPartitions,
    /// An inline device is not 15 digits.
    #[error("devices: {0:?} is not a 15-digit IMEI")]
    BadImei(String),
    /// `open` admission or device files in dedicated mode, where the port is the identity.
    #[error("admission and deviceFiles apply to shared mode only")]
    SharedOnly,
    /// UDP or GT06 settings on a shard of the other protocol.
    #[error("udp applies to teltonika shards only, gt06 settings to gt06 shards only")]
    ProtocolMismatch,
    /// A device clock offset beyond ±14 h.
    #[error("gt06.utcOffsetMinutes {0} is outside -840..=840")]
    UtcOffset(i16),
}

impl ShardConfig {
    /// A dedicated-mode shard: each `(port, imei)` binds a port to the one device it admits.
    /// TCP only, default limits and sink; set the other fields with struct update syntax.
    pub fn dedicated(
        pool: impl Into<String>,
        shard: u32,
        owners: impl IntoIterator<Item = (u16, String)>,
    ) -> Self {
        let ports = owners
            .into_iter()
            .map(|(port, imei)| PortBinding {
                port,
                imei: Some(imei),
            })
            .collect();
        Self::with_ports(
            pool.into(),
            shard,
            IdentificationMode::Dedicated,
            ports,
            Vec::new(),
        )
    }

    /// A shared-mode shard: every port admits every IMEI of `devices`.
    /// TCP only, default limits and sink; set the other fields with struct update syntax.
    pub fn shared(
        pool: impl Into<String>,
        shard: u32,
        ports: impl IntoIterator<Item = u16>,
        devices: impl IntoIterator<Item = String>,
    ) -> Self {
        let ports = ports
            .into_iter()
            .map(|port| PortBinding { port, imei: None })
            .collect();
        let devices = devices.into_iter().collect();
        Self::with_ports(
            pool.into(),
            shard,
            IdentificationMode::Shared,
            ports,
            devices,
        )
    }

    fn with_ports(
        pool: String,
        shard: u32,
        mode: IdentificationMode,
        ports: Vec<PortBinding>,
        devices: Vec<String>,
    ) -> Self {
        Self {
            pool,
            shard,
            mode,
            protocol: Protocol::Teltonika,
            gt06: Gt06Settings::default(),
            ports,
            devices,
            device_files: Vec::new(),
            admission: AdmissionMode::Listed,
            udp: false,
            limits: ListenerLimits::default(),
            redis: RedisSink::default(),
        }
    }

    /// Parses and validates a shard config from JSON text.
    ///
    /// # Errors
    /// [`ShardConfigError`] when the JSON does not parse or breaks a rule of [`Self::validate`].
    pub fn from_json(text: &str) -> Result<Self, ShardConfigError> {
        let cfg: Self =
            serde_json::from_str(text).map_err(|e| ShardConfigError::Json(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Serialises to pretty JSON, ports sorted, so that the ConfigMap is stable across
    /// reconciles and a diff shows what changed.
    pub fn to_json(&self) -> String {
        let mut cfg = self.clone();
        cfg.ports.sort();
        cfg.devices.sort();
        // NB: serialising plain data with string keys cannot fail.
        serde_json::to_string_pretty(&cfg).unwrap_or_default()
    }

    /// Checks the rules the types cannot express.
    ///
    /// # Errors
    /// The first rule broken.
    pub fn validate(&self) -> Result<(), ShardConfigError> {
        let mut ports = BTreeSet::new();
        let mut imeis = BTreeSet::new();
        for binding in &self.ports {
            if binding.port == 0 {
                return Err(ShardConfigError::ZeroPort);
            }
            if !ports.insert(binding.port) {
                return Err(ShardConfigError::DuplicatePort(binding.port));
            }
            match (&binding.imei, self.mode) {
                (None, IdentificationMode::Dedicated) => {
                    return Err(ShardConfigError::MissingImei(binding.port));
                }
                (Some(imei), _) if !imeis.insert(imei.as_str()) => {
                    return Err(ShardConfigError::DuplicateImei(imei.clone()));
                }
                _ => {}
            }
        }
        if self.redis.partitions == 0 {
            return Err(ShardConfigError::NoPartitions);
        }
        let gt06 = self.protocol == Protocol::Gt06;
        if (gt06 && self.udp) || (!gt06 && self.gt06 != Gt06Settings::default()) {
            return Err(ShardConfigError::ProtocolMismatch);
        }
        if trackgate_protocol::gt06::UtcOffset::from_minutes(self.gt06.utc_offset_minutes).is_none()
        {
            return Err(ShardConfigError::UtcOffset(self.gt06.utc_offset_minutes));
        }
        if let Some(bad) = self
            .devices
            .iter()
            .find(|d| trackgate_protocol::Imei::parse(d).is_err())
        {
            return Err(ShardConfigError::BadImei(bad.clone()));
        }
        if self.mode == IdentificationMode::Dedicated
            && (self.admission != AdmissionMode::Listed || !self.device_files.is_empty())
        {
            return Err(ShardConfigError::SharedOnly);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dedicated() -> ShardConfig {
        ShardConfig::dedicated(
            "fleet",
            0,
            [
                (5001, "356307042441013".to_owned()),
                (5000, "352093086403655".to_owned()),
            ],
        )
    }

    #[test]
    fn round_trips_through_json_with_sorted_ports() {
        let cfg = dedicated();
        let text = cfg.to_json();
        let back = ShardConfig::from_json(&text).unwrap();
        assert_eq!(back.ports[0].port, 5000);
        assert_eq!(back.pool, "fleet");
        assert!(text.contains("\"maxFrameBytes\": 32768"), "{text}");
    }

    #[test]
    fn defaults_fill_missing_sections() {
        let cfg = ShardConfig::from_json(
            r#"{"pool":"p","shard":1,"mode":"shared","ports":[{"port":7000}],"devices":["123456789012345"]}"#,
        )
        .unwrap();
        assert_eq!(cfg.limits, ListenerLimits::default());
        assert_eq!(cfg.redis.partitions, 4);
    }

    #[test]
    fn rejects_broken_configs() {
        let mut cfg = dedicated();
        cfg.ports[1].port = 5001;
        assert_eq!(cfg.validate(), Err(ShardConfigError::DuplicatePort(5001)));

        let mut cfg = dedicated();
        cfg.ports[0].imei = None;
        assert_eq!(cfg.validate(), Err(ShardConfigError::MissingImei(5001)));

        let mut cfg = dedicated();
        cfg.ports[0].imei = cfg.ports[1].imei.clone();
        assert!(matches!(
            cfg.validate(),
            Err(ShardConfigError::DuplicateImei(_))
        ));

        let mut cfg = dedicated();
        cfg.redis.partitions = 0;
        assert_eq!(cfg.validate(), Err(ShardConfigError::NoPartitions));

        let mut cfg = dedicated();
        cfg.admission = AdmissionMode::Open;
        assert_eq!(cfg.validate(), Err(ShardConfigError::SharedOnly));

        let cfg = ShardConfig::shared("p", 0, [7000], ["12345".to_owned()]);
        assert_eq!(
            cfg.validate(),
            Err(ShardConfigError::BadImei("12345".into()))
        );

        assert!(matches!(
            ShardConfig::from_json("{"),
            Err(ShardConfigError::Json(_))
        ));
    }

    #[test]
    fn protocol_settings_belong_to_their_protocol() {
        let mut cfg = dedicated();
        cfg.gt06.utc_offset_minutes = 480;
        assert_eq!(cfg.validate(), Err(ShardConfigError::ProtocolMismatch));
        cfg.protocol = Protocol::Gt06;
        assert_eq!(cfg.validate(), Ok(()));
        cfg.udp = true;
        assert_eq!(cfg.validate(), Err(ShardConfigError::ProtocolMismatch));
        cfg.udp = false;
        cfg.gt06.utc_offset_minutes = 841;
        assert_eq!(cfg.validate(), Err(ShardConfigError::UtcOffset(841)));

        let cfg = ShardConfig::from_json(
            r#"{"pool":"p","shard":0,"mode":"dedicated","protocol":"gt06",
               "gt06":{"utcOffsetMinutes":-300},
               "ports":[{"port":5023,"imei":"864717003283581"}]}"#,
        )
        .unwrap();
        assert_eq!(
            (cfg.protocol, cfg.gt06.utc_offset_minutes),
            (Protocol::Gt06, -300)
        );
        // A Teltonika shard's JSON is what it was before the protocol field existed.
        assert!(!dedicated().to_json().contains("protocol"));
    }
}
