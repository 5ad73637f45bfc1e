//! The `TrackerPortPool` custom resource (`trackgate.dev/v1alpha1`, namespaced).
//!
//! A pool is a port range, the devices that may use it, and how the listeners that serve it run
//! and are exposed. The operator allocates ports to devices, writes one shard config per group of
//! ports and runs each group as a Deployment behind a Service.
//!
//! Validation lives in the schema (CEL rules, list-map keys, bounds) so that `kubectl apply`
//! refuses a bad pool before the operator ever sees it. Every list a rule walks is bounded so
//! the estimated rule cost stays inside the API server's budget.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Affinity, ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::shard_config::{
    AdmissionMode, Gt06Settings, IdentificationMode, ListenerLimits, Protocol, RedisSink,
};

/// Most devices listed inline. Larger fleets go in ConfigMaps (`devicesFrom`); the bound keeps
/// the CEL rules that walk this list (pinned ports × excluded ports) inside the cost budget.
pub const MAX_INLINE_DEVICES: usize = 5_000;
/// Most excluded ports.
pub const MAX_EXCLUDED_PORTS: usize = 128;
/// Most ConfigMaps in `devicesFrom`.
pub const MAX_DEVICE_SOURCES: usize = 64;

/// A pool of TCP ports on which GPS trackers connect, and the listeners that serve them.
///
/// `dedicated` mode gives every device its own port (the port identifies the device);
/// `shared` mode lets many devices use a few ports and identifies them by their login IMEI.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "trackgate.dev",
    version = "v1alpha1",
    kind = "TrackerPortPool",
    plural = "trackerportpools",
    singular = "trackerportpool",
    shortname = "tpp",
    category = "trackgate",
    namespaced,
    status = "TrackerPortPoolStatus",
    printcolumn = r#"{"name":"Mode","type":"string","jsonPath":".spec.mode"}"#,
    printcolumn = r#"{"name":"Devices","type":"integer","jsonPath":".status.devices"}"#,
    printcolumn = r#"{"name":"Allocated","type":"integer","jsonPath":".status.allocated"}"#,
    printcolumn = r#"{"name":"Free","type":"integer","jsonPath":".status.freePorts"}"#,
    printcolumn = r#"{"name":"Shards Ready","type":"string","jsonPath":".status.shardsReady"}"#,
    printcolumn = r#"{"name":"Replicas","type":"string","jsonPath":".status.replicasReady"}"#,
    printcolumn = r#"{"name":"Endpoint","type":"string","jsonPath":".status.endpoint"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "!has(self.devices) || self.devices.all(d, !has(d.port) || (d.port >= self.ports.start && d.port <= self.ports.end))",
        "message": "a pinned port (devices[].port) must lie inside spec.ports.start..spec.ports.end"
    },
    {
        "rule": "!has(self.devices) || !has(self.ports.exclude) || self.devices.all(d, !has(d.port) || !(d.port in self.ports.exclude))",
        "message": "a pinned port (devices[].port) must not be listed in spec.ports.exclude"
    },
    {
        "rule": "!has(self.exposure) || !has(self.exposure.type) || self.exposure.type != 'NodePort' || (self.ports.start >= 30000 && self.ports.end <= 32767)",
        "message": "exposure.type NodePort needs spec.ports inside the node-port range 30000-32767"
    },
    {
        "rule": "!has(self.admission) || self.admission == 'listed' || (has(self.mode) && self.mode == 'shared')",
        "message": "admission: open needs mode: shared (in dedicated mode the port is the identity)"
    },
    {
        "rule": "!has(self.scaling) || (has(self.mode) && self.mode == 'shared')",
        "message": "spec.scaling applies to shared pools; dedicated pools use sharding.replicasPerShard"
    },
    {
        "rule": "!has(self.gt06) || (has(self.protocol) && self.protocol == 'gt06')",
        "message": "spec.gt06 applies to protocol: gt06 pools only"
    },
    {
        "rule": "!has(self.udp) || !self.udp || !has(self.protocol) || self.protocol == 'teltonika'",
        "message": "udp: true applies to protocol: teltonika pools only (GT06 is served over TCP)"
    }
]))]
pub struct TrackerPortPoolSpec {
    /// Wire protocol the devices speak: `teltonika` (default) or `gt06`.
    #[serde(default)]
    pub protocol: Protocol,
    /// `protocol: gt06` only: how the devices' clocks are read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gt06: Option<Gt06Settings>,
    /// How a device is identified: `dedicated` (one port per device; a login with another IMEI
    /// on that port is refused) or `shared` (few ports; identity is the login IMEI, checked
    /// against the pool's devices). Fixed once the pool exists: switching would move every
    /// device, so migrate by creating a second pool and moving devices over.
    #[serde(default)]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "self == oldSelf",
        "message": "spec.mode cannot change in place (it would move every device): create a new pool with the other mode, move the devices to it, then delete this one"
    }]))]
    pub mode: IdentificationMode,
    /// The port range the pool allocates from, and ports to leave out.
    pub ports: PortRange,
    /// Devices listed inline. A device may pin a port; otherwise the operator picks one and
    /// keeps it for as long as the device stays in the pool. IMEIs are unique.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 5000))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["imei"]))]
    pub devices: Vec<Device>,
    /// ConfigMaps in the pool's namespace holding more IMEIs, for fleets too large to inline.
    /// Each named key holds one IMEI per line; blank lines and lines starting with `#` are
    /// ignored. Editing such a ConfigMap updates the pool.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub devices_from: Vec<DeviceSource>,
    /// How ports are grouped into listener shards.
    #[serde(default)]
    pub sharding: Sharding,
    /// How devices reach the listeners.
    #[serde(default)]
    pub exposure: Exposure,
    /// The listener pods.
    #[serde(default)]
    pub listener: ListenerPod,
    /// Connection and frame limits of each listener process.
    #[serde(default)]
    pub limits: ListenerLimits,
    /// Shared mode: `listed` (default) admits only the pool's devices; `open` admits any
    /// well-formed IMEI, so anyone who learns the address can write records under any IMEI,
    /// a real device's included. Use `open` only behind `exposure.sourceRanges` or a private
    /// network.
    #[serde(default)]
    pub admission: AdmissionMode,
    /// Shared mode: how many listener replicas serve the pool, and whether a
    /// HorizontalPodAutoscaler sets that number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scaling: Option<Scaling>,
    /// Where records go: Redis Streams.
    pub redis: RedisSpec,
    /// Also serve Teltonika UDP datagrams on the same port numbers.
    #[serde(default)]
    pub udp: bool,
}

/// Replicas of a shared pool's one Deployment.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Scaling {
    /// Replicas of the Deployment; every replica serves every device of the pool. Defaults to
    /// `sharding.replicasPerShard`, so a v1alpha1 shared pool keeps its replica count. With
    /// `autoscaled` this is only the count the Deployment starts with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub replicas: Option<u16>,
    /// A HorizontalPodAutoscaler owns the replica count (target the Deployment
    /// `<pool>-shard-0`): the operator then keeps whatever count the Deployment has and never
    /// scales it back.
    #[serde(default)]
    pub autoscaled: bool,
}

/// A contiguous port range with exclusions.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self.start <= self.end", "message": "ports.start must not be greater than ports.end"}
]))]
pub struct PortRange {
    /// First port of the range (inclusive), 1-65535.
    #[schemars(range(min = 1))]
    pub start: u16,
    /// Last port of the range (inclusive), 1-65535.
    #[schemars(range(min = 1))]
    pub end: u16,
    /// Ports inside the range that are never allocated (for example taken by something else
    /// on the load balancer).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 128))]
    #[schemars(extend("x-kubernetes-list-type" = "set"))]
    pub exclude: Vec<u16>,
}

/// A device of the pool.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Device {
    /// The device's IMEI: 15 digits.
    #[schemars(regex(pattern = r"^[0-9]{15}$"), length(min = 15, max = 15))]
    pub imei: String,
    /// Pin the device to this port (dedicated mode: the port is the device's alone; shared
    /// mode: the device is told to dial this port). Must lie in the range and not be excluded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub port: Option<u16>,
}

/// A ConfigMap key holding IMEIs, one per line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeviceSource {
    /// Name of a ConfigMap in the pool's namespace.
    #[schemars(length(min = 1, max = 253))]
    pub config_map: String,
    /// Key inside the ConfigMap. Defaults to `imeis`.
    #[serde(default = "default_device_source_key")]
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

fn default_device_source_key() -> String {
    "imeis".to_owned()
}

/// How ports are grouped into listener shards.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct Sharding {
    /// Ports per shard: shard `n` serves ports `start + n*portsPerShard` up to the next
    /// boundary. Each shard is one Deployment and one Service; keep it at or below 50 for a
    /// LoadBalancer on AWS (an NLB takes at most 50 listeners).
    #[schemars(range(min = 1, max = 5000))]
    pub ports_per_shard: u16,
    /// Replicas per shard. Every replica serves every port of its shard, so one can die
    /// without a device losing its port. At least 1. In shared mode, the default of
    /// `scaling.replicas`.
    #[schemars(range(min = 1, max = 100))]
    pub replicas_per_shard: u16,
    /// Deprecated and ignored: a shared pool is now one Deployment whose replicas all admit
    /// every device, however many (see `spec.scaling`). Kept so that v1alpha1 pools still
    /// apply; the pool's Degraded condition message notes it when set.
    #[schemars(range(min = 1, max = 1000000))]
    pub devices_per_shard: u32,
}

impl Default for Sharding {
    fn default() -> Self {
        Self {
            ports_per_shard: 50,
            replicas_per_shard: 2,
            devices_per_shard: 5_000,
        }
    }
}

/// How devices reach the listeners.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Exposure {
    /// `LoadBalancer` (default), `NodePort` (node port = device port, so the range must lie
    /// in 30000-32767) or `HostNetwork` (listener pods bind the ports on their node; no
    /// Service is created).
    #[serde(default, rename = "type")]
    pub type_: ExposureType,
    /// Annotations copied onto each shard's Service (load balancer settings of your cloud).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 64))]
    pub annotations: BTreeMap<String, String>,
    /// CIDRs allowed to reach a LoadBalancer Service (`loadBalancerSourceRanges`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub source_ranges: Vec<String>,
    /// `Local` (default) keeps the device's source address and avoids a second hop;
    /// `Cluster` spreads load across nodes at the cost of both.
    #[serde(default)]
    pub external_traffic_policy: ExternalTrafficPolicy,
    /// LoadBalancer only: whether each Service port also takes a node port
    /// (`spec.allocateLoadBalancerNodePorts`). Unset keeps the Kubernetes default (true), which
    /// an instance-target load balancer needs. `false` is what IP-target load balancers use
    /// (AWS NLB with `ip` targets, MetalLB; see docs/operations.md) and what a dedicated pool
    /// larger than the node-port range (2,768 ports by default) needs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocate_load_balancer_node_ports: Option<bool>,
}

/// Kind of exposure.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ExposureType {
    /// A Service of type LoadBalancer per shard.
    #[default]
    LoadBalancer,
    /// A Service of type NodePort per shard; node port = device port.
    NodePort,
    /// Pods bind the ports on the node itself.
    HostNetwork,
}

/// `externalTrafficPolicy` of the shard Services.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ExternalTrafficPolicy {
    /// Only nodes running a listener receive traffic; the client address is preserved.
    #[default]
    Local,
    /// Any node receives traffic and forwards it.
    Cluster,
}

impl ExternalTrafficPolicy {
    /// The Kubernetes spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Local => "Local",
            Self::Cluster => "Cluster",
        }
    }
}

/// The listener pods of every shard.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ListenerPod {
    /// Container image. Defaults to the operator's own image, so operator and listener
    /// versions never drift.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 512))]
    pub image: Option<String>,
    /// Image pull policy (`Always`, `IfNotPresent`, `Never`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16))]
    pub image_pull_policy: Option<String>,
    /// CPU and memory requests and limits of the listener container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Node labels the pods must match.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Tolerations of the pods.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub tolerations: Vec<Toleration>,
    /// Affinity of the pods. The operator always adds a zone and node topology spread.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    /// PriorityClass of the pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub priority_class_name: Option<String>,
}

/// The Redis sink of the pool.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RedisSpec {
    /// Secret in the pool's namespace holding the Redis URL (it may carry a password, so it
    /// never appears in the pool or the shard config).
    pub url_secret_ref: SecretKeyRef,
    /// TLS material for a `rediss://` URL: the CA to trust and an optional client certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<RedisTls>,
    /// Stream key prefix, partitions, approximate max length and durability.
    #[serde(flatten)]
    pub sink: RedisSink,
}

/// A Secret in the pool's namespace, mounted into the listener pods, holding `ca.crt` and,
/// with `clientCertificate`, `tls.crt` and `tls.key` (the layout of a cert-manager
/// Certificate's Secret).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RedisTls {
    /// The Secret's name.
    #[schemars(length(min = 1, max = 253))]
    pub secret_name: String,
    /// Present `tls.crt`/`tls.key` to the server (mutual TLS).
    #[serde(default)]
    pub client_certificate: bool,
}

/// A key of a Secret.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Secret name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key inside the Secret. Defaults to `url`.
    #[serde(default = "default_secret_key")]
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

fn default_secret_key() -> String {
    "url".to_owned()
}

/// What the operator observed and did. Per-device data is not here: the allocation table
/// lives in each shard's ConfigMap.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TrackerPortPoolStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `PortsAllocated`, `ListenersAvailable`, `Degraded`, `ExposureWithinLimits`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// Devices in the pool (inline and from ConfigMaps).
    #[serde(default)]
    pub devices: u32,
    /// Devices holding a port.
    #[serde(default)]
    pub allocated: u32,
    /// Devices holding no port (range full or pinned port unavailable).
    #[serde(default)]
    pub unallocated: u32,
    /// Ports of the range nobody holds (dedicated mode).
    #[serde(default)]
    pub free_ports: u32,
    /// Shards with every replica ready, over shards: `2/3`.
    #[serde(default)]
    pub shards_ready: String,
    /// One entry per running shard.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shards: Vec<ShardStatus>,
    /// Shared mode: ready replicas over desired, `2/3`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas_ready: Option<String>,
    /// Shared mode: where every device of the pool connects (the load balancer's address,
    /// or how to reach a node), with the pool's ports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
}

/// One shard as observed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ShardStatus {
    /// Shard index.
    pub index: u32,
    /// The port numbers this shard covers, `first-last`.
    pub ports: String,
    /// Devices allocated to this shard.
    pub devices: u32,
    /// Desired replicas.
    pub replicas: i32,
    /// Ready replicas.
    pub ready_replicas: i32,
    /// Where devices connect: the load balancer's address, `<node>:<port>` hint, or
    /// `hostNetwork`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
}

#[cfg(test)]
mod tests {
    use kube::CustomResourceExt;

    use super::*;

    fn pool(yaml: &str) -> TrackerPortPool {
        serde_yaml::from_str(yaml).unwrap()
    }

    const GOOD: &str = r#"
apiVersion: trackgate.dev/v1alpha1
kind: TrackerPortPool
metadata: {name: fleet, namespace: trackers}
spec:
  mode: dedicated
  ports: {start: 5000, end: 5099, exclude: [5050]}
  devices:
    - imei: "356307042441013"
    - imei: "352093086403655"
      port: 5001
  devicesFrom:
    - configMap: fleet-imeis
  sharding: {portsPerShard: 50, replicasPerShard: 2}
  exposure:
    type: LoadBalancer
    annotations: {service.beta.kubernetes.io/aws-load-balancer-type: nlb}
  redis:
    urlSecretRef: {name: redis}
    streamPrefix: trackgate
    partitions: 8
"#;

    fn errors(p: &TrackerPortPool) -> String {
        match kube::core::cel::validate_cel(p) {
            Ok(()) => String::new(),
            Err(e) => format!("{e:?}"),
        }
    }

    #[test]
    fn good_pool_parses_with_defaults_and_passes_cel() {
        let p = pool(GOOD);
        assert_eq!(p.spec.devices_from[0].key, "imeis");
        assert_eq!(p.spec.redis.url_secret_ref.key, "url");
        assert_eq!(p.spec.redis.sink.partitions, 8);
        assert_eq!(p.spec.redis.sink.max_len, 1_000_000);
        assert_eq!(
            p.spec.exposure.external_traffic_policy,
            ExternalTrafficPolicy::Local
        );
        assert_eq!(p.spec.sharding.devices_per_shard, 5_000);
        assert_eq!(p.spec.admission, AdmissionMode::Listed);
        assert_eq!(errors(&p), "");
    }

    #[test]
    fn cel_keeps_open_admission_and_scaling_to_shared_pools() {
        let mut p = pool(GOOD);
        p.spec.admission = AdmissionMode::Open;
        assert!(
            errors(&p).contains("admission: open needs mode: shared"),
            "{}",
            errors(&p)
        );
        p.spec.scaling = Some(Scaling::default());
        assert!(
            errors(&p).contains("spec.scaling applies to shared"),
            "{}",
            errors(&p)
        );
        p.spec.mode = IdentificationMode::Shared;
        assert_eq!(errors(&p), "");
    }

    #[test]
    fn cel_refuses_inverted_range() {
        let mut p = pool(GOOD);
        p.spec.ports.start = 6000;
        assert!(
            errors(&p).contains("ports.start must not be greater"),
            "{}",
            errors(&p)
        );
    }

    #[test]
    fn cel_refuses_pinned_port_outside_range() {
        let mut p = pool(GOOD);
        p.spec.devices[1].port = Some(7000);
        assert!(
            errors(&p).contains("must lie inside spec.ports"),
            "{}",
            errors(&p)
        );
    }

    #[test]
    fn cel_refuses_pinned_port_that_is_excluded() {
        let mut p = pool(GOOD);
        p.spec.devices[1].port = Some(5050);
        assert!(
            errors(&p).contains("must not be listed in spec.ports.exclude"),
            "{}",
            errors(&p)
        );
    }

    #[test]
    fn cel_refuses_node_port_outside_node_port_range() {
        let mut p = pool(GOOD);
        p.spec.exposure.type_ = ExposureType::NodePort;
        assert!(errors(&p).contains("node-port range"), "{}", errors(&p));
        p.spec.ports = PortRange {
            start: 31000,
            end: 31099,
            exclude: vec![],
        };
        p.spec.devices[1].port = Some(31001);
        assert_eq!(errors(&p), "");
    }

    /// Switching `mode` in place would move every device: refused with how to migrate, while
    /// other fields (portsPerShard, the range) still change in place.
    #[test]
    fn cel_refuses_a_mode_change_in_place() {
        let old = pool(GOOD);
        let mut new = old.clone();
        new.spec.mode = IdentificationMode::Shared;
        let err = kube::core::cel::validate_cel_update(&new, &old)
            .map(|_| String::new())
            .unwrap_or_else(|e| e.to_string());
        assert!(err.contains("create a new pool"), "{err}");
        let mut resharded = old.clone();
        resharded.spec.sharding.ports_per_shard = 7;
        assert!(kube::core::cel::validate_cel_update(&resharded, &old).is_ok());
    }

    /// Keys of `original` that `typed` lacks: a misspelled or unknown field in an example
    /// would otherwise be dropped silently by serde and the example would mislead its reader.
    fn unknown_keys(
        original: &serde_json::Value,
        typed: &serde_json::Value,
        at: &str,
    ) -> Vec<String> {
        use serde_json::Value;
        match (original, typed) {
            (Value::Object(o), Value::Object(t)) => o
                .iter()
                .flat_map(|(k, v)| match t.get(k) {
                    Some(tv) => unknown_keys(v, tv, &format!("{at}.{k}")),
                    None => vec![format!("{at}.{k}")],
                })
                .collect(),
            (Value::Array(o), Value::Array(t)) => o
                .iter()
                .zip(t)
                .enumerate()
                .flat_map(|(i, (a, b))| unknown_keys(a, b, &format!("{at}[{i}]")))
                .collect(),
            _ => vec![],
        }
    }

    /// Every pool in `deploy/examples/` parses, has no unknown field and passes the CRD's CEL
    /// rules, so what the docs tell users to apply is what the API server accepts.
    #[test]
    fn example_pools_match_the_schema() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/examples");
        let mut seen = 0;
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let text = std::fs::read_to_string(entry.path()).unwrap();
            for doc in serde_yaml::Deserializer::from_str(&text) {
                let value: serde_json::Value = serde::Deserialize::deserialize(doc).unwrap();
                if value["kind"] != "TrackerPortPool" {
                    continue;
                }
                let pool: TrackerPortPool = serde_json::from_value(value.clone())
                    .unwrap_or_else(|e| panic!("{}: {e}", entry.path().display()));
                let typed = serde_json::to_value(&pool).unwrap();
                let unknown = unknown_keys(&value["spec"], &typed["spec"], "spec");
                assert!(
                    unknown.is_empty(),
                    "{}: unknown fields {unknown:?}",
                    entry.path().display()
                );
                assert_eq!(errors(&pool), "", "{}", entry.path().display());
                seen += 1;
            }
        }
        assert!(seen > 0, "no TrackerPortPool in deploy/examples");
    }

    /// The API server enforces these through the structural schema (not CEL); they must be
    /// present in the generated CRD or `kubectl apply` would accept duplicates and bad IMEIs.
    #[test]
    fn schema_keys_devices_by_imei_and_bounds_lists() {
        let crd = serde_json::to_value(TrackerPortPool::crd()).unwrap();
        let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
        let devices = &spec["properties"]["devices"];
        assert_eq!(devices["x-kubernetes-list-type"], "map");
        assert_eq!(devices["x-kubernetes-list-map-keys"][0], "imei");
        assert_eq!(devices["maxItems"], MAX_INLINE_DEVICES);
        assert_eq!(
            devices["items"]["properties"]["imei"]["pattern"],
            "^[0-9]{15}$"
        );
        assert_eq!(
            spec["properties"]["ports"]["properties"]["exclude"]["maxItems"],
            MAX_EXCLUDED_PORTS
        );
        assert_eq!(
            spec["properties"]["devicesFrom"]["maxItems"],
            MAX_DEVICE_SOURCES
        );
        assert_eq!(
            spec["properties"]["sharding"]["properties"]["replicasPerShard"]["minimum"].as_f64(),
            Some(1.0)
        );
        assert_eq!(crd["spec"]["names"]["shortNames"][0], "tpp");
        let columns: Vec<&str> = crd["spec"]["versions"][0]["additionalPrinterColumns"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|c| c["jsonPath"].as_str())
            .collect();
        for path in [
            ".status.devices",
            ".status.replicasReady",
            ".status.endpoint",
        ] {
            assert!(
                columns.contains(&path),
                "kubectl get tpp lacks {path}: {columns:?}"
            );
        }
        assert!(crd["spec"]["versions"][0]["subresources"]["status"].is_object());
    }
}
