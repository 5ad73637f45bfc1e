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

use std::time::Duration;

use trackgate_api::{IdentificationMode, ShardConfig, TrackerPortPoolSpec};

use crate::allocate::{self, Allocation, Layout, Previous};

mod objects;
mod spec;

pub use objects::{
    Desired, config_checksum, config_map_data_bytes, desired_objects, max_listeners,
    selector_labels, shard_name,
};
pub(crate) use objects::{deployment, meta, pdb, service};
pub use spec::{SpecError, pool_devices, validate};

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
/// Where the pool's `redis.tls` Secret is mounted in a listener pod.
pub const REDIS_TLS_DIR: &str = "/etc/trackgate-redis-tls";
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
                protocol: spec.protocol,
                gt06: spec.gt06.unwrap_or_default(),
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
#[cfg(test)]
mod tests {
    use kube::ResourceExt;
    use trackgate_api::shard_config::{
        DRAIN_DELAY_ENV, REDIS_CA_FILE_ENV, REDIS_CLIENT_KEY_FILE_ENV, SHARD_CONFIG_FILE,
    };
    use trackgate_api::{ExposureType, RedisTls, TrackerPortPool};

    use super::*;
    use crate::fixtures::PoolBuilder;
    use crate::record;

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
                    // The protocol and its clock setting reach the listener.
                    assert_eq!(cfg.protocol, pool.spec.protocol);
                    assert_eq!(cfg.gt06, pool.spec.gt06.unwrap_or_default());
                }
                planned += 1;
            }
        }
        assert!(planned >= 4, "examples not found or not parsed: {planned}");
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

    #[test]
    fn a_redis_tls_secret_is_mounted_and_named_to_the_listener() {
        let mut pool = PoolBuilder::dedicated(5000, 5009).with_devices(2).build();
        pool.spec.redis.tls = Some(RedisTls {
            secret_name: "redis-tls".into(),
            client_certificate: true,
        });
        let a = crate::fixtures::allocate_for(&pool, &Previous::new());
        let d = objects(&pool, &a);
        let pod = d.deployments[0]
            .spec
            .as_ref()
            .unwrap()
            .template
            .spec
            .as_ref()
            .unwrap();
        let volume = pod
            .volumes
            .as_ref()
            .unwrap()
            .iter()
            .find(|v| v.name == "redis-tls");
        assert_eq!(
            volume
                .unwrap()
                .secret
                .as_ref()
                .unwrap()
                .secret_name
                .as_deref(),
            Some("redis-tls")
        );
        let c = &pod.containers[0];
        let mount = c
            .volume_mounts
            .as_ref()
            .unwrap()
            .iter()
            .find(|m| m.name == "redis-tls");
        assert_eq!(mount.unwrap().mount_path, REDIS_TLS_DIR);
        let env: Vec<_> = c
            .env
            .as_ref()
            .unwrap()
            .iter()
            .map(|e| (e.name.as_str(), e.value.as_deref()))
            .collect();
        assert!(env.contains(&(REDIS_CA_FILE_ENV, Some("/etc/trackgate-redis-tls/ca.crt"))));
        assert!(env.contains(&(
            REDIS_CLIENT_KEY_FILE_ENV,
            Some("/etc/trackgate-redis-tls/tls.key")
        )));
    }
}
