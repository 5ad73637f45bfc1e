//! The typed Kubernetes objects of a pool: record, and per shard ConfigMap, Deployment,
//! Service and PDB.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EnvVar,
    EnvVarSource, HTTPGetAction, ObjectFieldSelector, PodAffinityTerm, PodSecurityContext, PodSpec,
    PodTemplateSpec, Probe, SeccompProfile, SecretKeySelector, SecretVolumeSource, SecurityContext,
    Service, ServicePort, ServiceSpec, TopologySpreadConstraint, Volume, VolumeMount,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};
use serde_json::json;
use trackgate_api::shard_config::{
    DRAIN_DELAY_ENV, REDIS_CA_FILE_ENV, REDIS_CLIENT_CERT_FILE_ENV, REDIS_CLIENT_KEY_FILE_ENV,
    REDIS_URL_ENV, SHARD_CONFIG_FILE,
};
use trackgate_api::{ExposureType, RedisTls, ShardConfig, TrackerPortPool, TrackerPortPoolSpec};

use crate::allocate::{self, ALLOCATION_TABLE_FILE, Allocation};
use crate::record;

use super::{
    ADMIN_PORT, CONFIG_CHECKSUM_ANNOTATION, CONFIG_DIR, DRAIN_DELAY, FIELD_MANAGER, POOL_LABEL,
    REDIS_TLS_DIR, SHARD_LABEL, SpecError, TERMINATION_GRACE,
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
        ));
        if let Some(svc) = service(meta("listener"), spec, &name, &cfg) {
            out.services.push(svc);
        }
        out.pdbs.push(pdb(meta("listener"), &name, index));
    }
    Ok(out)
}

pub(crate) fn meta(
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

pub(crate) fn deployment(
    meta: ObjectMeta,
    spec: &TrackerPortPoolSpec,
    pool: &str,
    index: u32,
    image: &str,
    checksum: &str,
) -> Deployment {
    let selector = selector_labels(pool, index);
    let match_selector = || LabelSelector {
        match_labels: Some(selector.clone()),
        ..LabelSelector::default()
    };
    let host_network = spec.exposure.type_ == ExposureType::HostNetwork;
    let low_ports = spec.ports.start < 1024;
    let probe = |path: &str, period: i32| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::String("admin".to_owned()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(3),
        ..Probe::default()
    };
    let field_env = |name: &str, path: &str| EnvVar {
        name: name.to_owned(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.to_owned(),
                ..ObjectFieldSelector::default()
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    };
    let container = Container {
        name: "listener".to_owned(),
        image: Some(spec.listener.image.as_deref().unwrap_or(image).to_owned()),
        image_pull_policy: spec.listener.image_pull_policy.clone(),
        args: Some(vec![
            "listen".to_owned(),
            "--config".to_owned(),
            format!("{CONFIG_DIR}/{SHARD_CONFIG_FILE}"),
            "--admin-addr".to_owned(),
            format!("0.0.0.0:{ADMIN_PORT}"),
        ]),
        ports: Some(vec![ContainerPort {
            name: Some("admin".to_owned()),
            container_port: ADMIN_PORT,
            protocol: Some("TCP".to_owned()),
            ..ContainerPort::default()
        }]),
        env: Some(vec![
            EnvVar {
                name: REDIS_URL_ENV.to_owned(),
                value_from: Some(EnvVarSource {
                    secret_key_ref: Some(SecretKeySelector {
                        name: spec.redis.url_secret_ref.name.clone(),
                        key: spec.redis.url_secret_ref.key.clone(),
                        ..SecretKeySelector::default()
                    }),
                    ..EnvVarSource::default()
                }),
                ..EnvVar::default()
            },
            EnvVar {
                name: DRAIN_DELAY_ENV.to_owned(),
                value: Some(DRAIN_DELAY.as_secs().to_string()),
                ..EnvVar::default()
            },
            field_env("POD_NAME", "metadata.name"),
            field_env("POD_NAMESPACE", "metadata.namespace"),
        ]),
        liveness_probe: Some(probe("/livez", 10)),
        readiness_probe: Some(probe("/readyz", 5)),
        resources: spec.listener.resources.clone(),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".to_owned()]),
                // ports below 1024 need the one capability the restricted profile allows
                add: low_ports.then(|| vec!["NET_BIND_SERVICE".to_owned()]),
            }),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(vec![VolumeMount {
            name: "shard-config".to_owned(),
            mount_path: CONFIG_DIR.to_owned(),
            read_only: Some(true),
            ..VolumeMount::default()
        }]),
        ..Container::default()
    };
    let spread = |key: &str| TopologySpreadConstraint {
        max_skew: 1,
        topology_key: key.to_owned(),
        when_unsatisfiable: "ScheduleAnyway".to_owned(),
        label_selector: Some(match_selector()),
        ..TopologySpreadConstraint::default()
    };
    let mut affinity = spec.listener.affinity.clone().unwrap_or_default();
    if host_network {
        // two replicas of a shard on one node would bind the same ports
        affinity
            .pod_anti_affinity
            .get_or_insert_default()
            .required_during_scheduling_ignored_during_execution = Some(vec![PodAffinityTerm {
            topology_key: "kubernetes.io/hostname".to_owned(),
            label_selector: Some(match_selector()),
            ..PodAffinityTerm::default()
        }]);
    }
    let mut pod_spec = PodSpec {
        termination_grace_period_seconds: i64::try_from(
            (DRAIN_DELAY + TERMINATION_GRACE).as_secs(),
        )
        .ok(),
        // the listener never talks to the API server
        automount_service_account_token: Some(false),
        security_context: Some(PodSecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(65532),
            run_as_group: Some(65532),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".to_owned(),
                ..SeccompProfile::default()
            }),
            ..PodSecurityContext::default()
        }),
        containers: vec![container],
        volumes: Some(vec![Volume {
            name: "shard-config".to_owned(),
            config_map: Some(ConfigMapVolumeSource {
                name: shard_name(pool, index),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        }]),
        topology_spread_constraints: Some(vec![
            spread("topology.kubernetes.io/zone"),
            spread("kubernetes.io/hostname"),
        ]),
        node_selector: (!spec.listener.node_selector.is_empty())
            .then(|| spec.listener.node_selector.clone()),
        tolerations: (!spec.listener.tolerations.is_empty())
            .then(|| spec.listener.tolerations.clone()),
        priority_class_name: spec.listener.priority_class_name.clone(),
        host_network: host_network.then_some(true),
        dns_policy: host_network.then(|| "ClusterFirstWithHostNet".to_owned()),
        affinity: (affinity != Affinity::default()).then_some(affinity),
        ..PodSpec::default()
    };
    if let Some(tls) = &spec.redis.tls {
        mount_redis_tls(&mut pod_spec, tls);
    }
    // Surge first so a shard never loses a replica during a rollout; with hostNetwork a surge
    // pod would need a node without a replica (anti-affinity), so replace in place instead.
    let (unavailable, surge) = if host_network { (1, 0) } else { (0, 1) };
    let mut pod_labels = selector.clone();
    pod_labels.insert(
        "app.kubernetes.io/component".to_owned(),
        "listener".to_owned(),
    );
    Deployment {
        metadata: meta,
        spec: Some(DeploymentSpec {
            replicas: Some(i32::from(spec.sharding.replicas_per_shard)),
            selector: match_selector(),
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".to_owned()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_unavailable: Some(IntOrString::Int(unavailable)),
                    max_surge: Some(IntOrString::Int(surge)),
                }),
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    annotations: Some(BTreeMap::from([(
                        CONFIG_CHECKSUM_ANNOTATION.to_owned(),
                        checksum.to_owned(),
                    )])),
                    ..ObjectMeta::default()
                }),
                spec: Some(pod_spec),
            },
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    }
}

/// The pool's Redis TLS Secret as a read-only volume, and the listener's file variables
/// pointing into it.
fn mount_redis_tls(pod: &mut PodSpec, tls: &RedisTls) {
    let file = |name: &str, file: &str| EnvVar {
        name: name.to_owned(),
        value: Some(format!("{REDIS_TLS_DIR}/{file}")),
        ..EnvVar::default()
    };
    let mut env = vec![file(REDIS_CA_FILE_ENV, "ca.crt")];
    if tls.client_certificate {
        env.push(file(REDIS_CLIENT_CERT_FILE_ENV, "tls.crt"));
        env.push(file(REDIS_CLIENT_KEY_FILE_ENV, "tls.key"));
    }
    if let Some(container) = pod.containers.first_mut() {
        container.env.get_or_insert_with(Vec::new).extend(env);
        container
            .volume_mounts
            .get_or_insert_with(Vec::new)
            .push(VolumeMount {
                name: "redis-tls".to_owned(),
                mount_path: REDIS_TLS_DIR.to_owned(),
                read_only: Some(true),
                ..VolumeMount::default()
            });
    }
    pod.volumes.get_or_insert_with(Vec::new).push(Volume {
        name: "redis-tls".to_owned(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(tls.secret_name.clone()),
            ..SecretVolumeSource::default()
        }),
        ..Volume::default()
    });
}

pub(crate) fn service(
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

pub(crate) fn pdb(meta: ObjectMeta, pool: &str, index: u32) -> PodDisruptionBudget {
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
