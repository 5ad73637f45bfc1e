//! PURE: a shared pool → its children and status. No client, no clock.
//!
//! A shared pool is one address for the whole fleet: one Service (the pool's ports, TCP and
//! UDP) in front of one Deployment whose replicas all admit every device. Nothing is cut into
//! shards, so nothing here grows with the fleet except the `devicesFrom` ConfigMaps the user
//! already keeps:
//!
//! ```text
//!  <pool>-shard-0 ConfigMap: shard.json + inline.imeis ─┐ projected volume at /etc/trackgate
//!  devicesFrom ConfigMaps (key → devices/<i>.imeis) ────┘   (the kubelet swaps ..data on edits)
//!  <pool>-shard-0 Deployment (replicas: user or HPA) · Service · PodDisruptionBudget
//! ```
//!
//! The objects keep the name of a v1alpha1 shared pool's first shard, so upgrading the
//! operator updates that shard's Deployment in place (same selector) and its Service keeps its
//! load balancer address; the other shards' objects are pruned (docs/operations.md, migration).

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Volume};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{Resource, ResourceExt};
use serde_json::json;
use trackgate_api::conditions::{self, reasons};
use trackgate_api::imei_list::{self, ImeiSet, ImeiSetBuilder};
use trackgate_api::shard_config::SHARD_CONFIG_FILE;
use trackgate_api::{
    AdmissionMode, ExposureType, ShardConfig, ShardStatus, TrackerPortPool, TrackerPortPoolSpec,
    TrackerPortPoolStatus,
};

use crate::allocate::LineError;
use crate::desired::{self, Desired, NLB_LISTENER_LIMIT, SpecError, shard_name};
use crate::status::{
    Failure, Observed, degraded_message, is_rolled_out, load_balancer_host, merge_conditions,
};

/// The one shard index of a shared pool (its objects are `<pool>-shard-0`).
pub const SHARED_INDEX: u32 = 0;
/// Key (and file) of the operator-written ConfigMap holding the pool's inline devices.
pub const INLINE_DEVICES_FILE: &str = "inline.imeis";
/// Default of `sharding.devicesPerShard`, which shared pools no longer use.
const LEGACY_DEVICES_PER_SHARD: u32 = 5_000;

/// Where `devicesFrom[index]` is mounted, relative to the config directory.
pub fn device_file(index: usize) -> String {
    format!("devices/{index}.imeis")
}

/// The listener config every replica runs: all ports of the range (minus exclusions), the
/// inline list and every `devicesFrom` file.
pub fn shard_config(pool: &str, spec: &TrackerPortPoolSpec) -> ShardConfig {
    let ports = (spec.ports.start..=spec.ports.end).filter(|p| !spec.ports.exclude.contains(p));
    let config = ShardConfig::shared(pool, SHARED_INDEX, ports, []);
    ShardConfig {
        device_files: std::iter::once(INLINE_DEVICES_FILE.to_owned())
            .chain((0..spec.devices_from.len()).map(device_file))
            .collect(),
        admission: spec.admission,
        udp: spec.udp,
        protocol: spec.protocol,
        gt06: spec.gt06.unwrap_or_default(),
        limits: spec.limits.clone(),
        redis: spec.redis.sink.clone(),
        ..config
    }
}

/// The inline devices in the list format (pinned ports mean nothing here: every port admits
/// every device).
pub fn inline_list(spec: &TrackerPortPoolSpec) -> String {
    imei_list::render(spec.devices.iter().map(|d| d.imei.as_str()))
}

/// The distinct devices the pool admits. `source` returns a ConfigMap key's text.
///
/// # Errors
/// A missing source, or a line that is not an IMEI (named with its ConfigMap and key).
pub fn admitted<'a>(
    spec: &TrackerPortPoolSpec,
    source: impl Fn(&str, &str) -> Option<&'a str>,
) -> Result<ImeiSet, SpecError> {
    let mut builder = ImeiSetBuilder::default();
    builder
        .add_list(&inline_list(spec))
        .map_err(|e| SpecError::Invalid(format!("spec.devices: {e}")))?;
    for src in &spec.devices_from {
        let text =
            source(&src.config_map, &src.key).ok_or_else(|| SpecError::MissingDeviceSource {
                config_map: src.config_map.clone(),
                key: src.key.clone(),
            })?;
        builder
            .add_list(text)
            .map_err(|e| SpecError::BadDeviceSource {
                config_map: src.config_map.clone(),
                key: src.key.clone(),
                source: LineError {
                    line: e.line,
                    text: e.text,
                    expected: "a 15-digit IMEI",
                },
            })?;
    }
    Ok(builder.build())
}

/// The replica count the Deployment should have. Autoscaled: whatever it has now (`live`), so
/// the operator never undoes the HPA, or the starting count for a new Deployment.
pub fn replicas(spec: &TrackerPortPoolSpec, live: Option<i32>) -> i32 {
    let scaling = spec.scaling.clone().unwrap_or_default();
    let wanted = i32::from(
        scaling
            .replicas
            .unwrap_or(spec.sharding.replicas_per_shard)
            .max(1),
    );
    match (scaling.autoscaled, live) {
        (true, Some(live)) => live,
        _ => wanted,
    }
}

/// The children of a shared pool. `live_replicas` is the Deployment's current
/// `spec.replicas` (read by the controller), used only when the pool is autoscaled.
///
/// # Errors
/// [`SpecError::Invalid`] when the pool has no uid or a built object does not fit its type.
pub fn desired_objects(
    pool: &TrackerPortPool,
    image: &str,
    live_replicas: Option<i32>,
) -> Result<Desired, SpecError> {
    let name = pool.name_any();
    let owner = pool
        .controller_owner_ref(&())
        .ok_or_else(|| SpecError::Invalid("pool has no uid".to_owned()))?;
    let spec = &pool.spec;
    let meta = |kind: &str| desired::meta(&name, pool.namespace(), SHARED_INDEX, &owner, kind);
    let cfg = shard_config(&name, spec);

    let cm = ConfigMap {
        metadata: meta("config"),
        data: Some(BTreeMap::from([
            (SHARD_CONFIG_FILE.to_owned(), cfg.to_json()),
            (INLINE_DEVICES_FILE.to_owned(), inline_list(spec)),
        ])),
        ..ConfigMap::default()
    };

    let checksum = desired::config_checksum(spec);
    let mut deployment = desired::deployment(
        meta("listener"),
        spec,
        &name,
        SHARED_INDEX,
        image,
        &checksum,
    );
    mount_device_lists(&mut deployment, &name, spec)?;
    if let Some(dep) = deployment.spec.as_mut() {
        // NB: with an HPA this is the live count, so the field comparison finds no drift and
        // the operator never undoes the HPA's scaling.
        dep.replicas = Some(replicas(spec, live_replicas));
    }

    let mut out = Desired::default();
    if let Some(svc) = desired::service(meta("listener"), spec, &name, &cfg) {
        out.services.push(svc);
    }
    out.pdbs
        .push(desired::pdb(meta("listener"), &name, SHARED_INDEX));
    out.config_maps.push(cm);
    out.deployments.push(deployment);
    Ok(out)
}

/// Replaces the shard ConfigMap volume with a projected volume: the operator's ConfigMap
/// (config and inline devices) plus every `devicesFrom` ConfigMap, one file each, so the pod
/// spec stays the same size whatever the fleet and an edit of a list never rolls the pods.
fn mount_device_lists(
    deployment: &mut Deployment,
    pool: &str,
    spec: &TrackerPortPoolSpec,
) -> Result<(), SpecError> {
    let own = json!({"configMap": {"name": shard_name(pool, SHARED_INDEX), "items": [
        {"key": SHARD_CONFIG_FILE, "path": SHARD_CONFIG_FILE},
        {"key": INLINE_DEVICES_FILE, "path": INLINE_DEVICES_FILE},
    ]}});
    let lists = spec.devices_from.iter().enumerate().map(|(i, src)| {
        json!({"configMap": {"name": src.config_map, "items": [
            {"key": src.key, "path": device_file(i)},
        ]}})
    });
    let volume: Volume = serde_json::from_value(json!({
        "name": "shard-config",
        "projected": {"sources": std::iter::once(own).chain(lists).collect::<Vec<_>>()},
    }))
    .map_err(|e| SpecError::Invalid(format!("building the projected volume: {e}")))?;
    if let Some(pod) = deployment
        .spec
        .as_mut()
        .and_then(|d| d.template.spec.as_mut())
    {
        // in place of the shard ConfigMap volume; others (the Redis TLS Secret) stay
        let volumes = pod.volumes.get_or_insert_with(Vec::new);
        volumes.retain(|v| v.name != volume.name);
        volumes.insert(0, volume);
    }
    Ok(())
}

/// PURE: what the controller applies for a shared pool: the admitted count and the children.
///
/// # Errors
/// A spec error.
pub fn plan(
    pool: &TrackerPortPool,
    sources: &BTreeMap<(String, String), String>,
    live_replicas: Option<i32>,
    image: &str,
) -> Result<(usize, Desired), SpecError> {
    desired::validate(&pool.spec)?;
    let set = admitted(&pool.spec, |cm, key| {
        sources
            .get(&(cm.to_owned(), key.to_owned()))
            .map(String::as_str)
    })?;
    Ok((set.len(), desired_objects(pool, image, live_replicas)?))
}

/// The files `trackgate run` writes for a shared pool, as the pod sees them mounted.
#[derive(Clone, Debug)]
pub struct LocalPlan {
    /// `shard.json`.
    pub config: ShardConfig,
    /// Relative path → contents: the inline list and every `devicesFrom` list.
    pub files: Vec<(String, String)>,
    /// Distinct devices admitted.
    pub admitted: usize,
}

/// What `trackgate run <pool.yaml>` serves for a shared pool.
///
/// # Errors
/// A spec error.
pub fn plan_local<'a>(
    pool: &str,
    spec: &TrackerPortPoolSpec,
    source: impl Fn(&str, &str) -> Option<&'a str> + Copy,
) -> Result<LocalPlan, SpecError> {
    desired::validate(spec)?;
    let admitted = admitted(spec, source)?.len();
    let mut files = vec![(INLINE_DEVICES_FILE.to_owned(), inline_list(spec))];
    for (i, src) in spec.devices_from.iter().enumerate() {
        // admitted() has checked that every source exists
        let text = source(&src.config_map, &src.key).unwrap_or_default();
        files.push((device_file(i), text.to_owned()));
    }
    Ok(LocalPlan {
        config: shard_config(pool, spec),
        files,
        admitted,
    })
}

// === status ===

/// The live replica count of the pool's Deployment.
pub fn live_replicas(pool: &TrackerPortPool, deployments: &[Deployment]) -> Option<i32> {
    let name = shard_name(&pool.name_any(), SHARED_INDEX);
    deployments
        .iter()
        .find(|d| d.name_any() == name)
        .and_then(|d| d.spec.as_ref()?.replicas)
}

/// The status of a shared pool: `admitted` devices (or why it cannot be served), the
/// Deployment's replicas and the Service's address.
pub fn status_for(
    pool: &TrackerPortPool,
    admitted: Result<usize, &SpecError>,
    failures: &[Failure],
    observed: Observed<'_>,
    now: &Time,
) -> TrackerPortPoolStatus {
    let old = pool.status.clone().unwrap_or_default();
    let mut conds: Vec<(&'static str, bool, &'static str, String)> = Vec::new();
    let mut new = TrackerPortPoolStatus {
        observed_generation: pool.metadata.generation,
        conditions: Vec::new(),
        ..old.clone()
    };
    match admitted {
        Err(err) => {
            conds.push((conditions::DEGRADED, true, err.reason(), err.to_string()));
            conds.push((
                conditions::READY,
                false,
                reasons::POOL_NOT_READY,
                "the spec cannot be served; see Degraded".to_owned(),
            ));
        }
        Ok(admitted) => {
            let spec = &pool.spec;
            let name = shard_name(&pool.name_any(), SHARED_INDEX);
            let ports = shard_config(&pool.name_any(), spec).ports.len();
            let dep = observed.deployments.iter().find(|d| d.name_any() == name);
            let want = replicas(spec, live_replicas(pool, observed.deployments));
            let ready = dep
                .and_then(|d| d.status.as_ref()?.ready_replicas)
                .unwrap_or(0);
            let endpoint = endpoint(pool, observed);
            let range = format!("{}-{}", spec.ports.start, spec.ports.end);
            new.devices = count(admitted);
            new.allocated = count(admitted);
            new.unallocated = 0;
            new.free_ports = 0;
            new.shards = vec![ShardStatus {
                index: SHARED_INDEX,
                ports: range,
                devices: count(admitted),
                replicas: want,
                ready_replicas: ready,
                endpoint: endpoint.clone(),
            }];
            let available = want > 0 && dep.is_some_and(|d| is_rolled_out(d, want));
            new.shards_ready = format!("{}/1", u8::from(available));
            new.replicas_ready = Some(format!("{ready}/{want}"));
            new.endpoint = endpoint;

            let who = match spec.admission {
                AdmissionMode::Open => "any well-formed IMEI (admission: open)".to_owned(),
                AdmissionMode::Listed => format!("{admitted} devices"),
            };
            conds.push((
                conditions::PORTS_ALLOCATED,
                true,
                reasons::ALL_ALLOCATED,
                format!("shared pool: {who} admitted on every one of {ports} ports"),
            ));
            conds.push(if available {
                (
                    conditions::LISTENERS_AVAILABLE,
                    true,
                    reasons::ALL_REPLICAS_READY,
                    format!("{ready}/{want} replicas ready, each serving every device"),
                )
            } else {
                (
                    conditions::LISTENERS_AVAILABLE,
                    false,
                    reasons::REPLICAS_NOT_READY,
                    format!("{ready}/{want} replicas ready"),
                )
            });
            let listeners = ports * if spec.udp { 2 } else { 1 };
            conds.push(
                if spec.exposure.type_ != ExposureType::LoadBalancer
                    || listeners <= NLB_LISTENER_LIMIT
                {
                    (
                        conditions::EXPOSURE_WITHIN_LIMITS,
                        true,
                        reasons::WITHIN_LIMITS,
                        "within known load balancer limits".to_owned(),
                    )
                } else {
                    (
                        conditions::EXPOSURE_WITHIN_LIMITS,
                        false,
                        reasons::AWS_NLB_LISTENER_LIMIT,
                        format!(
                            "the Service has {listeners} listeners; an AWS NLB takes at most \
                             {NLB_LISTENER_LIMIT}: narrow spec.ports"
                        ),
                    )
                },
            );
            let mut valid = "the spec is valid".to_owned();
            if spec.sharding.devices_per_shard != LEGACY_DEVICES_PER_SHARD {
                valid.push_str(
                    "; spec.sharding.devicesPerShard is deprecated and ignored: every replica \
                     admits every device",
                );
            }
            conds.push(match failures {
                [] => (conditions::DEGRADED, false, reasons::SPEC_VALID, valid),
                [first, ..] => (
                    conditions::DEGRADED,
                    true,
                    first.reason,
                    degraded_message(failures),
                ),
            });
            conds.push(if available && failures.is_empty() {
                (
                    conditions::READY,
                    true,
                    reasons::POOL_READY,
                    "every replica serves every device of the pool".to_owned(),
                )
            } else {
                (
                    conditions::READY,
                    false,
                    reasons::POOL_NOT_READY,
                    "see ListenersAvailable and Degraded".to_owned(),
                )
            });
        }
    }
    let conds = conds
        .into_iter()
        .map(|(t, on, r, m)| (t, if on { "True" } else { "False" }, r, m))
        .collect();
    new.conditions = merge_conditions(&old.conditions, conds, pool.metadata.generation, now);
    new
}

/// Where devices connect: `<lb address>:<ports>`, a node hint, or `hostNetwork`.
fn endpoint(pool: &TrackerPortPool, observed: Observed<'_>) -> Option<String> {
    let spec = &pool.spec;
    let ports = if spec.ports.start == spec.ports.end {
        spec.ports.start.to_string()
    } else {
        format!("{}-{}", spec.ports.start, spec.ports.end)
    };
    let name = shard_name(&pool.name_any(), SHARED_INDEX);
    match spec.exposure.type_ {
        ExposureType::HostNetwork => Some(format!("hostNetwork: any listener node:{ports}")),
        ExposureType::NodePort => Some(format!("any node:{ports}")),
        ExposureType::LoadBalancer => {
            load_balancer_host(observed.services, &name).map(|host| format!("{host}:{ports}"))
        }
    }
}

fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests;
