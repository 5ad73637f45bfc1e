//! The typed Kubernetes objects of a pool: record, and per shard ConfigMap, Deployment,
//! Service and PDB.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServicePort, ServiceSpec};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};
use serde_json::json;
use trackgate_api::shard_config::{DRAIN_DELAY_ENV, REDIS_URL_ENV, SHARD_CONFIG_FILE};
use trackgate_api::{ExposureType, ShardConfig, TrackerPortPool, TrackerPortPoolSpec};

use crate::allocate::{self, ALLOCATION_TABLE_FILE, Allocation};
use crate::record;

use super::{
    ADMIN_PORT, CONFIG_CHECKSUM_ANNOTATION, CONFIG_DIR, DRAIN_DELAY, FIELD_MANAGER, POOL_LABEL,
    SHARD_LABEL, SpecError, TERMINATION_GRACE,
};

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
/// [`super::plan_local`]); `image` is the default listener image (the operator's own).
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
        if let Some(svc) = service(meta("listener"), spec, &name, &cfg) {
            out.services.push(svc);
        }
        out.pdbs.push(pdb(meta("listener"), &name, index));
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
) -> Option<Service> {
    let kind = match spec.exposure.type_ {
        ExposureType::HostNetwork => return None,
        ExposureType::LoadBalancer => "LoadBalancer",
        ExposureType::NodePort => "NodePort",
    };
    let load_balancer = spec.exposure.type_ == ExposureType::LoadBalancer;
    let node_port = spec.exposure.type_ == ExposureType::NodePort;
    let protocols: &[&str] = if spec.udp { &["TCP", "UDP"] } else { &["TCP"] };
    let ports = cfg
        .ports
        .iter()
        .flat_map(|b| {
            protocols.iter().map(move |proto| ServicePort {
                name: Some(format!("{}-{}", proto.to_ascii_lowercase(), b.port)),
                port: i32::from(b.port),
                target_port: Some(IntOrString::Int(i32::from(b.port))),
                protocol: Some((*proto).to_owned()),
                node_port: node_port.then_some(i32::from(b.port)),
                ..ServicePort::default()
            })
        })
        .collect();
    let mut meta = meta;
    if !spec.exposure.annotations.is_empty() {
        meta.annotations = Some(spec.exposure.annotations.clone());
    }
    Some(Service {
        metadata: meta,
        spec: Some(ServiceSpec {
            type_: Some(kind.to_owned()),
            selector: Some(selector_labels(pool, cfg.shard)),
            ports: Some(ports),
            external_traffic_policy: Some(
                spec.exposure.external_traffic_policy.as_str().to_owned(),
            ),
            load_balancer_source_ranges: (load_balancer && !spec.exposure.source_ranges.is_empty())
                .then(|| spec.exposure.source_ranges.clone()),
            allocate_load_balancer_node_ports: spec
                .exposure
                .allocate_load_balancer_node_ports
                .filter(|_| load_balancer),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    })
}

fn pdb(meta: ObjectMeta, pool: &str, index: u32) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata: meta,
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(selector_labels(pool, index)),
                ..LabelSelector::default()
            }),
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    }
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
