//! PURE: (pool, allocation) → the objects that should exist. No client, no clock.
//!
//! Per pool `p`: the allocation record ([`crate::record`], `p-allocation`), and per shard `n`
//! (all named `p-shard-n`, owned by the pool):
//! - a ConfigMap: `shard.json` (the listener's config) and `allocation.txt` (this shard's part
//!   of the record, derived from it; never read back while the record exists);
//! - a Deployment: the listener, its ConfigMap mounted at `/etc/trackgate/`. Device ports are
//!   deliberately NOT listed as container ports, so adding a device only changes the ConfigMap
//!   (which the listener reloads) and never rolls the pods. What the listener cannot reload
//!   (limits, Redis settings, UDP) is hashed into [`CONFIG_CHECKSUM_ANNOTATION`] on the pod
//!   template, so changing it rolls the pods;
//! - a Service of the exposure type (none for `HostNetwork`);
//! - a PodDisruptionBudget of one unavailable replica.
//!
//! The controller compares each object with the live one field by field
//! ([`crate::controller::apply::is_applied`]) and applies only what differs.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::{Resource, ResourceExt};
use serde_json::json;
use trackgate_api::shard_config::{DRAIN_DELAY_ENV, REDIS_URL_ENV, SHARD_CONFIG_FILE};
use trackgate_api::{
    ExposureType, IdentificationMode, ShardConfig, TrackerPortPool, TrackerPortPoolSpec,
};

use crate::allocate::{self, ALLOCATION_TABLE_FILE, Allocation, Layout, PoolDevice, Previous};
use crate::record;

/// Field manager of every server-side apply.
pub const FIELD_MANAGER: &str = "trackgate-operator";
/// Label naming the pool on every child.
pub const POOL_LABEL: &str = "trackgate.dev/pool";
/// Label naming the shard index on every child.
pub const SHARD_LABEL: &str = "trackgate.dev/shard";
/// Pod-template annotation: SHA-256 of the shard settings the listener cannot reload.
pub const CONFIG_CHECKSUM_ANNOTATION: &str = "trackgate.dev/config-checksum";
/// Largest ConfigMap `data` the API server accepts (keys + values): 1 MiB.
pub const MAX_CONFIG_MAP_DATA: usize = 1 << 20;
/// Listener admin port (`/metrics`, `/livez`, `/readyz`).
pub const ADMIN_PORT: i32 = 9090;
/// Where the shard ConfigMap is mounted.
pub const CONFIG_DIR: &str = "/etc/trackgate";
/// Time a listener gets after SIGTERM: it stops accepting, finishes the packets in flight
/// (each bounded by the Redis publish timeout) and closes. 45 s covers a slow Redis twice.
pub const TERMINATION_GRACE: Duration = Duration::from_secs(45);
/// After SIGTERM a listener fails `/readyz` but keeps accepting this long, so the load
/// balancer's health checks (AWS NLB: 2 × 5 s at the fastest) take it out before its ports
/// close; the pod's `terminationGracePeriodSeconds` is this plus [`TERMINATION_GRACE`].
pub const DRAIN_DELAY: Duration = Duration::from_secs(15);
/// Listeners an AWS Network Load Balancer accepts; past it the Service never gets an address.
pub const NLB_LISTENER_LIMIT: usize = 50;

/// Why a pool cannot be turned into objects. These are spec errors: the pool gets `Degraded`
/// and the operator waits for a change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SpecError {
    /// A `devicesFrom` ConfigMap or key is missing.
    #[error("devicesFrom: ConfigMap {config_map} has no key {key}")]
    MissingDeviceSource {
        /// ConfigMap name.
        config_map: String,
        /// Key.
        key: String,
    },
    /// A `devicesFrom` list holds something that is not an IMEI.
    #[error("devicesFrom: ConfigMap {config_map} key {key}: {source}")]
    BadDeviceSource {
        /// ConfigMap name.
        config_map: String,
        /// Key.
        key: String,
        /// The bad line.
        source: allocate::LineError,
    },
    /// A rule the schema does not check (older CRD installed, or `trackgate run` on a file).
    #[error("{0}")]
    Invalid(String),
}

impl SpecError {
    /// The condition reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::MissingDeviceSource { .. } | Self::BadDeviceSource { .. } => {
                trackgate_api::conditions::reasons::DEVICE_SOURCE_UNAVAILABLE
            }
            Self::Invalid(_) => trackgate_api::conditions::reasons::INVALID_SPEC,
        }
    }
}

/// Checks what the CRD schema checks, for pools that did not come through the API server
/// (`trackgate run`) or an older CRD.
///
/// # Errors
/// [`SpecError::Invalid`] naming the first broken rule.
pub fn validate(spec: &TrackerPortPoolSpec) -> Result<(), SpecError> {
    let bad = |m: &str| Err(SpecError::Invalid(m.to_owned()));
    if spec.ports.start == 0 || spec.ports.start > spec.ports.end {
        return bad("spec.ports: start must be between 1 and end");
    }
    if spec.sharding.ports_per_shard == 0 || spec.sharding.replicas_per_shard == 0 {
        return bad("spec.sharding: portsPerShard and replicasPerShard must be at least 1");
    }
    if spec.exposure.type_ == ExposureType::NodePort
        && (spec.ports.start < 30000 || spec.ports.end > 32767)
    {
        return bad("exposure.type NodePort needs spec.ports inside 30000-32767");
    }
    if spec.redis.sink.partitions == 0 {
        return bad("spec.redis.partitions must be at least 1");
    }
    let mut seen = HashSet::new();
    for d in &spec.devices {
        if !allocate::is_imei(&d.imei) {
            return Err(SpecError::Invalid(format!(
                "device {:?} is not a 15-digit IMEI",
                d.imei
            )));
        }
        if !seen.insert(d.imei.as_str()) {
            return Err(SpecError::Invalid(format!(
                "device {} is listed twice",
                d.imei
            )));
        }
    }
    Ok(())
}

/// The pool's devices: inline entries first (so an inline pin wins), then each `devicesFrom`
/// source in order. `source` returns the text of a ConfigMap key, `None` when missing.
///
/// # Errors
/// A missing or malformed source.
pub fn pool_devices<'a>(
    spec: &TrackerPortPoolSpec,
    source: impl Fn(&str, &str) -> Option<&'a str>,
) -> Result<Vec<PoolDevice>, SpecError> {
    let mut out: Vec<PoolDevice> = spec
        .devices
        .iter()
        .map(|d| PoolDevice {
            imei: d.imei.clone(),
            pinned: d.port,
        })
        .collect();
    for src in &spec.devices_from {
        let text =
            source(&src.config_map, &src.key).ok_or_else(|| SpecError::MissingDeviceSource {
                config_map: src.config_map.clone(),
                key: src.key.clone(),
            })?;
        let imeis =
            allocate::parse_imei_list(text).map_err(|source| SpecError::BadDeviceSource {
                config_map: src.config_map.clone(),
                key: src.key.clone(),
                source,
            })?;
        out.extend(
            imeis
                .into_iter()
                .map(|imei| PoolDevice { imei, pinned: None }),
        );
    }
    Ok(out)
}

/// One listener shard config per shard holding devices, in shard order. This is what
/// `trackgate run <pool.yaml>` serves and what the operator writes into `shard.json`.
pub fn shard_configs(
    pool: &str,
    spec: &TrackerPortPoolSpec,
    allocation: &Allocation,
) -> Vec<ShardConfig> {
    let layout = Layout::from_spec(spec);
    allocation
        .shards
        .iter()
        .map(|(&index, entries)| {
            let config = match spec.mode {
                IdentificationMode::Dedicated => {
                    ShardConfig::dedicated(pool, index, entries.iter().cloned())
                }
                // shared: every port of the shard is served; any admitted IMEI may use any
                IdentificationMode::Shared => ShardConfig::shared(
                    pool,
                    index,
                    layout.available_ports(index),
                    entries.iter().map(|(_, imei)| imei.clone()),
                ),
            };
            ShardConfig {
                udp: spec.udp,
                limits: spec.limits.clone(),
                redis: spec.redis.sink.clone(),
                ..config
            }
        })
        .collect()
}

/// Everything `trackgate run <pool.yaml>` needs, with no cluster: validate, gather devices,
/// allocate (from `previous`, empty on a first run), and build the shard configs.
///
/// # Errors
/// A spec error.
pub fn plan_local<'a>(
    pool: &str,
    spec: &TrackerPortPoolSpec,
    source: impl Fn(&str, &str) -> Option<&'a str>,
    previous: &Previous,
) -> Result<(Allocation, Vec<ShardConfig>), SpecError> {
    validate(spec)?;
    let devices = pool_devices(spec, source)?;
    let allocation = allocate::allocate(&Layout::from_spec(spec), &devices, previous);
    let configs = shard_configs(pool, spec, &allocation);
    Ok((allocation, configs))
}

/// The children one pool should have.
#[derive(Clone, Debug, Default)]
pub struct Desired {
    /// The allocation record (head first).
    pub record: Vec<ConfigMap>,
    /// Per shard: config + allocation table.
    pub config_maps: Vec<ConfigMap>,
    /// Per shard: the listener.
    pub deployments: Vec<Deployment>,
    /// Per shard, unless `HostNetwork`.
    pub services: Vec<Service>,
    /// Per shard.
    pub pdbs: Vec<PodDisruptionBudget>,
}

impl Desired {
    /// Number of objects.
    pub fn len(&self) -> usize {
        self.record.len()
            + self.config_maps.len()
            + self.deployments.len()
            + self.services.len()
            + self.pdbs.len()
    }

    /// Whether there is nothing to run.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Name of shard `index` of `pool` (ConfigMap, Deployment, Service, PDB).
pub fn shard_name(pool: &str, index: u32) -> String {
    format!("{pool}-shard-{index}")
}

/// Labels selecting the pods of one shard.
pub fn selector_labels(pool: &str, index: u32) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "app.kubernetes.io/name".to_owned(),
            "trackgate-listener".to_owned(),
        ),
        (POOL_LABEL.to_owned(), pool.to_owned()),
        (SHARD_LABEL.to_owned(), index.to_string()),
    ])
}

/// The desired children of `pool` for `allocation` and its shard `configs` (both from
/// [`plan_local`]); `image` is the default listener image (the operator's own).
///
/// # Errors
/// [`SpecError::Invalid`] when the pool has no uid (not read from the API server) or a built
/// object does not fit its type.
pub fn desired_objects(
    pool: &TrackerPortPool,
    allocation: &Allocation,
    configs: Vec<ShardConfig>,
    image: &str,
) -> Result<Desired, SpecError> {
    let name = pool.name_any();
    let owner = pool
        .controller_owner_ref(&())
        .ok_or_else(|| SpecError::Invalid("pool has no uid".to_owned()))?;
    let spec = &pool.spec;
    let mut out = Desired {
        record: record::record_objects(&name, pool.namespace(), &owner, allocation),
        ..Desired::default()
    };
    let checksum = config_checksum(spec);
    for cfg in configs {
        let index = cfg.shard;
        let entries = allocation
            .shards
            .get(&index)
            .map(Vec::as_slice)
            .unwrap_or_default();
        let meta = |kind: &str| meta(&name, pool.namespace(), index, &owner, kind);
        let mut cm_meta = meta("config");
        cm_meta.annotations = Some(BTreeMap::from([(
            record::RECORD_ANNOTATION.to_owned(),
            record::record_name(&name, 0),
        )]));
        let cm = ConfigMap {
            metadata: cm_meta,
            data: Some(BTreeMap::from([
                (SHARD_CONFIG_FILE.to_owned(), cfg.to_json()),
                (
                    ALLOCATION_TABLE_FILE.to_owned(),
                    allocate::render_table(entries),
                ),
            ])),
            ..ConfigMap::default()
        };
        out.config_maps.push(cm);
        out.deployments.push(deployment(
            meta("listener"),
            spec,
            &name,
            index,
            image,
            &checksum,
        )?);
        if let Some(svc) = service(meta("listener"), spec, &name, &cfg)? {
            out.services.push(svc);
        }
        out.pdbs.push(typed(
            meta("listener"),
            json!({"spec": {
                "maxUnavailable": 1,
                "selector": {"matchLabels": selector_labels(&name, index)},
            }}),
        )?);
    }
    Ok(out)
}

fn meta(
    pool: &str,
    namespace: Option<String>,
    index: u32,
    owner: &OwnerReference,
    component: &str,
) -> ObjectMeta {
    let mut labels = selector_labels(pool, index);
    labels.insert(
        "app.kubernetes.io/component".to_owned(),
        component.to_owned(),
    );
    labels.insert(
        "app.kubernetes.io/managed-by".to_owned(),
        FIELD_MANAGER.to_owned(),
    );
    ObjectMeta {
        name: Some(shard_name(pool, index)),
        namespace,
        labels: Some(labels),
        owner_references: Some(vec![owner.clone()]),
        ..ObjectMeta::default()
    }
}

/// Builds a typed object from metadata and a JSON body.
fn typed<K: serde::de::DeserializeOwned + Resource<DynamicType = ()>>(
    metadata: ObjectMeta,
    body: serde_json::Value,
) -> Result<K, SpecError> {
    let mut value = body;
    value["apiVersion"] = K::api_version(&()).into();
    value["kind"] = K::kind(&()).into();
    let mut obj: K = serde_json::from_value(value)
        .map_err(|e| SpecError::Invalid(format!("building {}: {e}", K::kind(&()))))?;
    *obj.meta_mut() = metadata;
    Ok(obj)
}

/// SHA-256 (hex) of the canonical JSON of the settings a listener reads only at start. serde
/// writes struct fields in declaration order and maps sorted, so equal settings give equal
/// bytes on every build.
pub fn config_checksum(spec: &TrackerPortPoolSpec) -> String {
    let settings = json!({"limits": spec.limits, "redis": spec.redis, "udp": spec.udp});
    let digest = ring::digest::digest(&ring::digest::SHA256, settings.to_string().as_bytes());
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// Bytes of a ConfigMap's `data` as the API server counts them against its 1 MiB limit.
pub fn config_map_data_bytes(cm: &ConfigMap) -> usize {
    cm.data
        .iter()
        .flatten()
        .map(|(k, v)| k.len() + v.len())
        .sum()
}

fn deployment(
    meta: ObjectMeta,
    spec: &TrackerPortPoolSpec,
    pool: &str,
    index: u32,
    image: &str,
    checksum: &str,
) -> Result<Deployment, SpecError> {
    let selector = selector_labels(pool, index);
    let host_network = spec.exposure.type_ == ExposureType::HostNetwork;
    let low_ports = spec.ports.start < 1024;
    let probe = |path: &str, period: u32| json!({"httpGet": {"path": path, "port": "admin"}, "periodSeconds": period, "failureThreshold": 3});
    let mut pod_spec = json!({
        "terminationGracePeriodSeconds": (DRAIN_DELAY + TERMINATION_GRACE).as_secs(),
        // the listener never talks to the API server
        "automountServiceAccountToken": false,
        "securityContext": {
            "runAsNonRoot": true,
            "runAsUser": 65532,
            "runAsGroup": 65532,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [{
            "name": "listener",
            "image": spec.listener.image.as_deref().unwrap_or(image),
            "args": ["listen", "--config", format!("{CONFIG_DIR}/{SHARD_CONFIG_FILE}"),
                     "--admin-addr", format!("0.0.0.0:{ADMIN_PORT}")],
            "ports": [{"name": "admin", "containerPort": ADMIN_PORT, "protocol": "TCP"}],
            "env": [
                {"name": REDIS_URL_ENV, "valueFrom": {"secretKeyRef": {
                    "name": spec.redis.url_secret_ref.name, "key": spec.redis.url_secret_ref.key}}},
                {"name": DRAIN_DELAY_ENV, "value": DRAIN_DELAY.as_secs().to_string()},
                {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            ],
            "livenessProbe": probe("/livez", 10),
            "readinessProbe": probe("/readyz", 5),
            "securityContext": {
                "allowPrivilegeEscalation": false,
                "readOnlyRootFilesystem": true,
                // ports below 1024 need the one capability the restricted profile allows
                "capabilities": if low_ports {
                    json!({"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]})
                } else {
                    json!({"drop": ["ALL"]})
                },
            },
            "volumeMounts": [{"name": "shard-config", "mountPath": CONFIG_DIR, "readOnly": true}],
        }],
        "volumes": [{"name": "shard-config", "configMap": {"name": shard_name(pool, index)}}],
        "topologySpreadConstraints": [
            {"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone",
             "whenUnsatisfiable": "ScheduleAnyway", "labelSelector": {"matchLabels": selector}},
            {"maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
             "whenUnsatisfiable": "ScheduleAnyway", "labelSelector": {"matchLabels": selector}},
        ],
    });
    let container = &mut pod_spec["containers"][0];
    if let Some(policy) = &spec.listener.image_pull_policy {
        container["imagePullPolicy"] = json!(policy);
    }
    if let Some(resources) = &spec.listener.resources {
        container["resources"] = json!(resources);
    }
    if !spec.listener.node_selector.is_empty() {
        pod_spec["nodeSelector"] = json!(spec.listener.node_selector);
    }
    if !spec.listener.tolerations.is_empty() {
        pod_spec["tolerations"] = json!(spec.listener.tolerations);
    }
    if let Some(class) = &spec.listener.priority_class_name {
        pod_spec["priorityClassName"] = json!(class);
    }
    let mut affinity = json!(spec.listener.affinity.clone().unwrap_or_default());
    if host_network {
        pod_spec["hostNetwork"] = json!(true);
        pod_spec["dnsPolicy"] = json!("ClusterFirstWithHostNet");
        // two replicas of a shard on one node would bind the same ports
        affinity["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"] = json!([
            {"topologyKey": "kubernetes.io/hostname", "labelSelector": {"matchLabels": selector}}
        ]);
    }
    if affinity.as_object().is_some_and(|a| !a.is_empty()) {
        pod_spec["affinity"] = affinity;
    }
    // Surge first so a shard never loses a replica during a rollout; with hostNetwork a surge
    // pod would need a node without a replica (anti-affinity), so replace in place instead.
    let rolling = if host_network {
        json!({"maxUnavailable": 1, "maxSurge": 0})
    } else {
        json!({"maxUnavailable": 0, "maxSurge": 1})
    };
    let mut pod_labels = selector.clone();
    pod_labels.insert(
        "app.kubernetes.io/component".to_owned(),
        "listener".to_owned(),
    );
    typed(
        meta,
        json!({"spec": {
            "replicas": spec.sharding.replicas_per_shard,
            "selector": {"matchLabels": selector},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": rolling},
            "template": {
                "metadata": {
                    "labels": pod_labels,
                    "annotations": {CONFIG_CHECKSUM_ANNOTATION: checksum},
                },
                "spec": pod_spec,
            },
        }}),
    )
}

fn service(
    meta: ObjectMeta,
    spec: &TrackerPortPoolSpec,
    pool: &str,
    cfg: &ShardConfig,
) -> Result<Option<Service>, SpecError> {
    let kind = match spec.exposure.type_ {
        ExposureType::HostNetwork => return Ok(None),
        ExposureType::LoadBalancer => "LoadBalancer",
        ExposureType::NodePort => "NodePort",
    };
    let node_port = spec.exposure.type_ == ExposureType::NodePort;
    let protocols: &[&str] = if spec.udp { &["TCP", "UDP"] } else { &["TCP"] };
    let ports: Vec<_> = cfg
        .ports
        .iter()
        .flat_map(|b| {
            protocols.iter().map(move |proto| {
                let mut p = json!({
                    "name": format!("{}-{}", proto.to_ascii_lowercase(), b.port),
                    "port": b.port, "targetPort": b.port, "protocol": proto,
                });
                if node_port {
                    p["nodePort"] = json!(b.port);
                }
                p
            })
        })
        .collect();
    let mut body = json!({"spec": {
        "type": kind,
        "selector": selector_labels(pool, cfg.shard),
        "ports": ports,
        "externalTrafficPolicy": spec.exposure.external_traffic_policy.as_str(),
    }});
    if kind == "LoadBalancer" && !spec.exposure.source_ranges.is_empty() {
        body["spec"]["loadBalancerSourceRanges"] = json!(spec.exposure.source_ranges);
    }
    if kind == "LoadBalancer"
        && let Some(allocate) = spec.exposure.allocate_load_balancer_node_ports
    {
        body["spec"]["allocateLoadBalancerNodePorts"] = json!(allocate);
    }
    let mut meta = meta;
    if !spec.exposure.annotations.is_empty() {
        meta.annotations = Some(spec.exposure.annotations.clone());
    }
    typed(meta, body).map(Some)
}

/// Number of load-balancer listeners (port × protocol) of the largest shard Service.
pub fn max_listeners(desired: &Desired) -> usize {
    desired
        .services
        .iter()
        .filter(|s| s.spec.as_ref().and_then(|s| s.type_.as_deref()) == Some("LoadBalancer"))
        .map(|s| {
            s.spec
                .as_ref()
                .and_then(|s| s.ports.as_ref())
                .map_or(0, Vec::len)
        })
        .max()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::PoolBuilder;

    fn objects(pool: &TrackerPortPool, a: &Allocation) -> Desired {
        let configs = shard_configs(&pool.name_any(), &pool.spec, a);
        desired_objects(pool, a, configs, "img").unwrap()
    }

    #[test]
    fn one_set_of_children_per_shard_with_owner_and_labels() {
        let pool = PoolBuilder::dedicated(5000, 5099)
            .ports_per_shard(10)
            .with_devices(25)
            .build();
        let a = crate::fixtures::allocate_for(&pool, &Previous::new());
        let configs = shard_configs("fleet", &pool.spec, &a);
        let d = desired_objects(&pool, &a, configs, "ghcr.io/trackgate/trackgate:1.0").unwrap();
        assert_eq!(d.config_maps.len(), 3);
        assert_eq!(d.len(), 13, "a record and 4 objects per shard");
        let dep = &d.deployments[0];
        assert_eq!(dep.metadata.name.as_deref(), Some("fleet-shard-0"));
        assert_eq!(
            dep.metadata.owner_references.as_ref().unwrap()[0].kind,
            "TrackerPortPool"
        );
        let pod = dep.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
        let c = &pod.containers[0];
        assert_eq!(c.image.as_deref(), Some("ghcr.io/trackgate/trackgate:1.0"));
        assert_eq!(c.args.as_ref().unwrap()[2], "/etc/trackgate/shard.json");
        let env = c.env.as_ref().unwrap();
        assert_eq!(env[0].name, "TRACKGATE_REDIS_URL");
        assert_eq!(
            env[0]
                .value_from
                .as_ref()
                .unwrap()
                .secret_key_ref
                .as_ref()
                .unwrap()
                .name,
            "redis"
        );
        assert_eq!(
            pod.termination_grace_period_seconds,
            Some(60),
            "drain + grace"
        );
        assert_eq!(env[1].name, DRAIN_DELAY_ENV);
        let sc = c.security_context.as_ref().unwrap();
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(pod.topology_spread_constraints.as_ref().unwrap().len(), 2);
        assert_eq!(
            c.liveness_probe
                .as_ref()
                .unwrap()
                .http_get
                .as_ref()
                .unwrap()
                .path
                .as_deref(),
            Some("/livez")
        );
        // the device ports are on the Service, not the pod, so adding a device never rolls pods
        assert_eq!(c.ports.as_ref().unwrap().len(), 1);
        let svc = d.services[0].spec.as_ref().unwrap();
        assert_eq!(svc.type_.as_deref(), Some("LoadBalancer"));
        assert_eq!(svc.external_traffic_policy.as_deref(), Some("Local"));
        // 25 devices over 3 open shards, filled evenly: 9, 8, 8
        assert_eq!(svc.ports.as_ref().unwrap().len(), 9);
        let cfg =
            ShardConfig::from_json(&d.config_maps[0].data.as_ref().unwrap()[SHARD_CONFIG_FILE])
                .unwrap();
        assert_eq!(cfg.ports.len(), 9);
    }

    /// Limits the listener reads only at start roll the pods (through the checksum); a new
    /// device never does.
    #[test]
    fn pod_template_checksum_changes_with_restart_only_settings() {
        let pool = PoolBuilder::dedicated(5000, 5099)
            .ports_per_shard(10)
            .with_devices(15)
            .build();
        let a = crate::fixtures::allocate_for(&pool, &Previous::new());
        let d1 = objects(&pool, &a);
        let more = PoolBuilder::dedicated(5000, 5099)
            .ports_per_shard(10)
            .with_devices(16)
            .build();
        let b = crate::fixtures::allocate_for(&more, &a.to_previous());
        let d2 = objects(&more, &b);
        let template = |d: &Desired| d.deployments[1].spec.clone().unwrap().template;
        assert_eq!(
            template(&d1),
            template(&d2),
            "a new device never rolls pods"
        );
        let mut limited = pool.clone();
        limited.spec.limits.max_connections += 1;
        let d3 = objects(&limited, &a);
        let sum = |d: &Desired| {
            template(d).metadata.unwrap().annotations.unwrap()[CONFIG_CHECKSUM_ANNOTATION].clone()
        };
        assert_ne!(sum(&d1), sum(&d3));
        assert_eq!(sum(&d1).len(), 64, "sha-256 hex");
        // fixed input, fixed output: the checksum does not depend on the Rust release
        assert_eq!(
            config_checksum(&pool.spec),
            config_checksum(&pool.clone().spec)
        );
    }

    #[test]
    fn record_and_shards_name_each_other() {
        let pool = PoolBuilder::dedicated(5000, 5099).with_devices(3).build();
        let a = crate::fixtures::allocate_for(&pool, &Previous::new());
        let d = objects(&pool, &a);
        assert_eq!(d.record.len(), 1);
        assert_eq!(
            d.record[0].metadata.name.as_deref(),
            Some("fleet-allocation")
        );
        assert_eq!(
            d.config_maps[0].metadata.annotations.as_ref().unwrap()[record::RECORD_ANNOTATION],
            "fleet-allocation"
        );
    }

    #[test]
    fn node_port_udp_and_host_network_exposures() {
        let mut pool = PoolBuilder::dedicated(31000, 31009).with_devices(2).build();
        pool.spec.exposure.type_ = ExposureType::NodePort;
        pool.spec.udp = true;
        let a = crate::fixtures::allocate_for(&pool, &Previous::new());
        let d = objects(&pool, &a);
        let ports = d.services[0].spec.as_ref().unwrap().ports.clone().unwrap();
        assert_eq!(ports.len(), 4);
        assert_eq!(ports[0].node_port, Some(31000));
        assert_eq!(ports[1].protocol.as_deref(), Some("UDP"));

        pool.spec.exposure.type_ = ExposureType::HostNetwork;
        let d = objects(&pool, &a);
        assert!(d.services.is_empty());
        let pod = d.deployments[0]
            .spec
            .as_ref()
            .unwrap()
            .template
            .spec
            .clone()
            .unwrap();
        assert_eq!(pod.host_network, Some(true));
        assert!(pod.affinity.unwrap().pod_anti_affinity.is_some());
        let strategy = d.deployments[0]
            .spec
            .as_ref()
            .unwrap()
            .strategy
            .clone()
            .unwrap();
        assert_eq!(
            strategy.rolling_update.unwrap().max_surge,
            Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(0))
        );
    }

    #[test]
    fn shared_mode_serves_every_port_and_admits_imeis() {
        let pool = PoolBuilder::shared(7000, 7003).with_devices(6).build();
        let a = crate::fixtures::allocate_for(&pool, &Previous::new());
        let cfgs = shard_configs("fleet", &pool.spec, &a);
        assert_eq!(cfgs.len(), 1);
        assert_eq!(cfgs[0].ports.len(), 4);
        assert_eq!(cfgs[0].devices.len(), 6);
        cfgs[0].validate().unwrap();
    }

    #[test]
    fn spec_errors_name_the_problem() {
        let mut pool = PoolBuilder::dedicated(5000, 5009).build();
        pool.spec.devices_from.push(trackgate_api::DeviceSource {
            config_map: "more".into(),
            key: "imeis".into(),
        });
        let err = pool_devices(&pool.spec, |_, _| None).unwrap_err();
        assert_eq!(err.reason(), "DeviceSourceUnavailable");
        let err = pool_devices(&pool.spec, |_, _| Some("12\n")).unwrap_err();
        assert!(err.to_string().contains("line 1"), "{err}");
        pool.spec.ports.start = 6000;
        assert!(validate(&pool.spec).is_err());
    }

    /// An IMEI both inline (pinned) and in a ConfigMap is one device, and the inline pin holds.
    #[test]
    fn inline_entry_wins_over_the_same_imei_in_a_config_map() {
        let mut pool = PoolBuilder::dedicated(5000, 5009)
            .pinned("356307042441013", 5007)
            .build();
        pool.spec.devices_from.push(trackgate_api::DeviceSource {
            config_map: "more".into(),
            key: "imeis".into(),
        });
        let list = "356307042441013\n352093086403655\n";
        let (a, _) = plan_local("fleet", &pool.spec, |_, _| Some(list), &Previous::new()).unwrap();
        assert_eq!(a.allocated(), 2);
        assert_eq!(a.to_previous()["356307042441013"], 5007);
    }

    /// What `trackgate run deploy/examples/<pool>.yaml` would serve: every example plans
    /// without a spec error into valid shard configs.
    #[test]
    fn example_pools_plan_into_valid_shard_configs() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/examples");
        let mut planned = 0;
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let text = std::fs::read_to_string(entry.path()).unwrap();
            for doc in serde_yaml::Deserializer::from_str(&text) {
                let value: serde_json::Value = serde::Deserialize::deserialize(doc).unwrap();
                if value["kind"] != "TrackerPortPool" {
                    continue;
                }
                let pool: TrackerPortPool = serde_json::from_value(value).unwrap();
                let list = "359000000000000\n359000000000001\n";
                let (a, cfgs) = plan_local(
                    &pool.name_any(),
                    &pool.spec,
                    |_, _| Some(list),
                    &Previous::new(),
                )
                .unwrap_or_else(|e| panic!("{}: {e}", entry.path().display()));
                assert!(a.allocated() > 0 && !cfgs.is_empty());
                for cfg in cfgs {
                    cfg.validate().unwrap();
                }
                planned += 1;
            }
        }
        assert!(planned >= 3, "examples not found or not parsed: {planned}");
    }

    #[test]
    fn plan_local_serves_a_pool_file() {
        let pool = PoolBuilder::dedicated(5000, 5009)
            .with_devices(3)
            .pinned("356307042441013", 5009)
            .build();
        let (a, cfgs) = plan_local("fleet", &pool.spec, |_, _| None, &Previous::new()).unwrap();
        assert_eq!(a.allocated(), 4);
        assert!(cfgs[0].ports.iter().any(|b| b.port == 5009));
    }
}
