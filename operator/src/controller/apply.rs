//! Applying one pool's desired objects: what differs is applied, what is stale is deleted, and
//! every refused write becomes a [`Failure`] instead of ending the reconcile, so the status
//! names it and the rest of the pool is still served.
//!
//! Order, and why:
//! 1. the allocation record, created create-only or written with the live resourceVersion (a
//!    stale leader's write fails with 409); if it fails nothing else is written, since shards
//!    must never serve an allocation the record does not hold;
//! 2. shard ConfigMaps (a new Deployment must find its config), created create-only;
//! 3. Deployments; 4. Services: stale ones deleted first, and a Service is applied only once no
//!    other Service holds a node port it asks for, so a port moving between shards
//!    (`portsPerShard` change) converges in one pass; 5. PDBs; 6. stale objects, deleted with
//!    uid + resourceVersion preconditions.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions};
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tracing::warn;
use trackgate_api::conditions::reasons;
use trackgate_api::{TrackerPortPool, TrackerPortPoolSpec};

use crate::desired::{self, Desired, FIELD_MANAGER, POOL_LABEL};
use crate::error::Error;
use crate::record;
use crate::status::{Failure, Observed};

use super::Context;
pub use super::node_ports::{NodePortRange, foreign_node_ports, takes_node_ports};
use super::node_ports::{node_port_shortfall, node_ports};

// === children ===

/// The live children of one pool.
pub(super) struct Children {
    /// Parts of the allocation record found (by name: a part restored from a backup may carry
    /// the owner reference of an earlier pool object).
    pub record: Vec<ConfigMap>,
    pub config_maps: Vec<ConfigMap>,
    pub deployments: Vec<Deployment>,
    pub services: Vec<Service>,
    pub pdbs: Vec<PodDisruptionBudget>,
}

impl Children {
    /// Lists the pool's children: labelled with the pool AND owned by it, so an object a user
    /// labelled by hand (a `devicesFrom` ConfigMap, say) is never taken for a stale shard.
    pub async fn fetch(client: &Client, ns: &str, pool: &TrackerPortPool) -> Result<Self, Error> {
        let name = pool.name_any();
        let lp = ListParams::default().labels(&format!("{POOL_LABEL}={name}"));
        let uid = pool.uid().unwrap_or_default();
        let (record, config_maps): (Vec<ConfigMap>, Vec<ConfigMap>) =
            list_owned(client, ns, &lp, &uid)
                .await?
                .into_iter()
                .partition(|cm: &ConfigMap| record::is_record_name(&name, &cm.name_any()));
        let mut children = Self {
            record,
            config_maps,
            deployments: list_owned(client, ns, &lp, &uid).await?,
            services: list_owned(client, ns, &lp, &uid).await?,
            pdbs: list_owned(client, ns, &lp, &uid).await?,
        };
        // parts not owned by this pool object (restored from a backup) are read by name
        let api: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
        let head = record::record_name(&name, 0);
        if !children.record.iter().any(|c| c.name_any() == head)
            && let Some(cm) = api.get_opt(&head).await?
        {
            children.record.push(cm);
        }
        let parts = children
            .record
            .iter()
            .find(|c| c.name_any() == head)
            .and_then(|c| c.annotations().get(record::PARTS_ANNOTATION))
            .and_then(|n| n.parse::<usize>().ok())
            .unwrap_or(1);
        for k in 1..parts.min(record::MAX_PARTS) {
            let part = record::record_name(&name, k);
            if !children.record.iter().any(|c| c.name_any() == part)
                && let Some(cm) = api.get_opt(&part).await?
            {
                children.record.push(cm);
            }
        }
        Ok(children)
    }

    /// Number of listener objects (not ConfigMaps): evidence that the pool had an allocation.
    pub fn listener_objects(&self) -> usize {
        self.deployments.len() + self.services.len() + self.pdbs.len()
    }

    pub fn observed(&self) -> Observed<'_> {
        Observed {
            deployments: &self.deployments,
            services: &self.services,
        }
    }

    /// Applies what differs, then deletes what is no longer wanted. `cluster_services` is every
    /// Service of the cluster (for node-port checks; empty when the pool takes no node port).
    pub async fn converge(
        &self,
        ctx: &Context,
        ns: &str,
        pool: &TrackerPortPool,
        desired: &Desired,
        cluster_services: &[Service],
    ) -> Vec<Failure> {
        let c = &ctx.client;
        let mut failures = Vec::new();
        let cms: Api<ConfigMap> = Api::namespaced(c.clone(), ns);

        // 1. the record; parts before the head, which names how many there are
        for part in desired.record.iter().skip(1).chain(desired.record.first()) {
            let live = self.record.iter().find(|o| o.name_any() == part.name_any());
            if let Err(f) = apply_one(ctx, &cms, part, live, Guard::Versioned).await {
                failures.push(f);
            }
        }
        if !failures.is_empty() {
            return failures;
        }

        // 2. shard ConfigMaps, each within the API server's size limit
        for cm in &desired.config_maps {
            let bytes = desired::config_map_data_bytes(cm);
            if bytes > desired::MAX_CONFIG_MAP_DATA {
                failures.push(too_large(cm, bytes, &pool.spec));
                continue;
            }
            let live = self
                .config_maps
                .iter()
                .find(|o| o.name_any() == cm.name_any());
            if let Err(f) = apply_one(ctx, &cms, cm, live, Guard::CreateOnly).await {
                failures.push(f);
            }
        }
        // 3. Deployments
        let deps: Api<Deployment> = Api::namespaced(c.clone(), ns);
        failures.extend(apply_all(ctx, &deps, &desired.deployments, &self.deployments).await);

        // 4. Services
        failures.extend(
            self.converge_services(ctx, ns, pool, desired, cluster_services)
                .await,
        );

        // 5. PDBs
        let pdbs: Api<PodDisruptionBudget> = Api::namespaced(c.clone(), ns);
        failures.extend(apply_all(ctx, &pdbs, &desired.pdbs, &self.pdbs).await);

        // 6. stale children; a failed write above may leave a shard half-updated, so stale
        // objects are deleted only when everything else went through
        if failures.is_empty() {
            failures.extend(delete_stale(ctx, &cms, &desired.config_maps, &self.config_maps).await);
            failures
                .extend(delete_stale(ctx, &deps, &desired.deployments, &self.deployments).await);
            failures.extend(delete_stale(ctx, &pdbs, &desired.pdbs, &self.pdbs).await);
            failures.extend(delete_stale(ctx, &cms, &desired.record, &self.record).await);
        }
        failures
    }

    async fn converge_services(
        &self,
        ctx: &Context,
        ns: &str,
        pool: &TrackerPortPool,
        desired: &Desired,
        cluster_services: &[Service],
    ) -> Vec<Failure> {
        let api: Api<Service> = Api::namespaced(ctx.client.clone(), ns);
        let mut failures = delete_stale(ctx, &api, &desired.services, &self.services).await;
        let stale: BTreeSet<String> = self
            .services
            .iter()
            .filter(|s| {
                !desired
                    .services
                    .iter()
                    .any(|d| d.name_any() == s.name_any())
            })
            .map(ResourceExt::name_any)
            .collect();
        let uid = pool.uid().unwrap_or_default();
        let foreign = foreign_node_ports(cluster_services, &uid);

        // LoadBalancer node ports: refuse the Services that would take more than the range has
        let growing: BTreeSet<String> = match node_port_shortfall(
            &pool.spec,
            desired,
            &self.services,
            &foreign,
            ctx.node_ports,
        ) {
            Some((failure, growing)) => {
                failures.push(failure);
                growing
            }
            None => BTreeSet::new(),
        };

        // ports held by this pool's own live Services, by holder
        let mut own: BTreeMap<u16, String> = BTreeMap::new();
        for svc in self
            .services
            .iter()
            .filter(|s| !stale.contains(&s.name_any()))
        {
            for p in node_ports(svc) {
                own.insert(p, svc.name_any());
            }
        }
        let mut pending: Vec<&Service> = Vec::new();
        for want in desired
            .services
            .iter()
            .filter(|s| !growing.contains(&s.name_any()))
        {
            let taken: Vec<String> = node_ports(want)
                .filter_map(|p| foreign.get(&p).map(|who| format!("{p} (held by {who})")))
                .collect();
            if taken.is_empty() {
                pending.push(want);
            } else {
                failures.push(Failure {
                    reason: reasons::NODE_PORT_IN_USE,
                    object: format!("Service {}", want.name_any()),
                    message: format!(
                        "node ports {} are taken; this shard is not exposed until they are \
                         freed or excluded from the pool (spec.ports.exclude)",
                        taken.join(", ")
                    ),
                });
            }
        }
        // a Service goes when no other Service of the pool holds a port it asks for; each
        // applied one releases the ports it gave up, so a shifted layout converges in one pass
        loop {
            let (ready, blocked): (Vec<&Service>, Vec<&Service>) =
                pending.iter().partition(|want| {
                    node_ports(want)
                        .all(|p| own.get(&p).is_none_or(|holder| *holder == want.name_any()))
                });
            if ready.is_empty() {
                for want in blocked {
                    failures.push(Failure {
                        reason: reasons::NODE_PORT_IN_USE,
                        object: format!("Service {}", want.name_any()),
                        message: "node ports still held by another shard of this pool whose \
                                  update failed"
                            .to_owned(),
                    });
                }
                break;
            }
            for want in ready {
                let name = want.name_any();
                let live = self.services.iter().find(|o| o.name_any() == name);
                match apply_one(ctx, &api, want, live, Guard::None).await {
                    Ok(()) => {
                        own.retain(|_, holder| *holder != name);
                        for p in node_ports(want) {
                            own.insert(p, name.clone());
                        }
                    }
                    Err(f) => failures.push(f),
                }
            }
            pending = blocked;
            if pending.is_empty() {
                break;
            }
        }
        failures
    }
}

/// Objects matching `lp` that name `owner_uid` in their owner references.
async fn list_owned<K>(
    client: &Client,
    ns: &str,
    lp: &ListParams,
    owner_uid: &str,
) -> Result<Vec<K>, Error>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + Debug
        + DeserializeOwned,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    let items = api.list(lp).await?.items;
    Ok(items
        .into_iter()
        .filter(|o| {
            o.owner_references()
                .iter()
                .any(|r| !owner_uid.is_empty() && r.uid == owner_uid)
        })
        .collect())
}

// === writes ===

async fn apply_all<K>(ctx: &Context, api: &Api<K>, desired: &[K], live: &[K]) -> Vec<Failure>
where
    K: Resource<DynamicType = ()> + Clone + Debug + Serialize + DeserializeOwned,
{
    let mut failures = Vec::new();
    for want in desired {
        let current = live.iter().find(|o| o.name_any() == want.name_any());
        if let Err(f) = apply_one(ctx, api, want, current, Guard::None).await {
            failures.push(f);
        }
    }
    failures
}

/// How a write is guarded against a racing writer (a stale leader).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Guard {
    /// Server-side apply, creating the object if needed.
    None,
    /// A missing object is created with a POST, which fails with 409 if it exists by then.
    /// (Such an object's fields are managed as an `Update`, so only shard ConfigMaps and the
    /// record, whose set of fields never shrinks, are written this way.)
    CreateOnly,
    /// Create-only, and an apply carries the live resourceVersion (409 if it changed).
    Versioned,
}

/// Writes `want` when it differs from `live` in a field the operator sets (see [`Guard`]).
async fn apply_one<K>(
    ctx: &Context,
    api: &Api<K>,
    want: &K,
    live: Option<&K>,
    guard: Guard,
) -> Result<(), Failure>
where
    K: Resource<DynamicType = ()> + Clone + Debug + Serialize + DeserializeOwned,
{
    let name = want.name_any();
    let result = match live {
        Some(live) if is_applied(want, live) => return Ok(()),
        Some(live) => {
            let mut body = want.clone();
            if guard == Guard::Versioned {
                body.meta_mut().resource_version = live.resource_version();
            }
            let params = PatchParams::apply(FIELD_MANAGER).force();
            api.patch(&name, &params, &Patch::Apply(&body))
                .await
                .map(|_| "apply")
        }
        None if guard == Guard::None => {
            let params = PatchParams::apply(FIELD_MANAGER).force();
            api.patch(&name, &params, &Patch::Apply(want))
                .await
                .map(|_| "apply")
        }
        None => {
            let params = PostParams {
                field_manager: Some(FIELD_MANAGER.to_owned()),
                ..PostParams::default()
            };
            api.create(&params, want).await.map(|_| "create")
        }
    };
    match result {
        Ok(verb) => {
            ctx.metrics.writes.with_label_values(&[verb]).inc();
            Ok(())
        }
        Err(err) => Err(failure(K::kind(&()).as_ref(), &name, &err)),
    }
}

/// Deletes the `live` objects not in `desired`, each only if it is still the object that was
/// read (uid and resourceVersion preconditions): a stale leader cannot remove a shard that was
/// recreated or changed since.
async fn delete_stale<K>(ctx: &Context, api: &Api<K>, desired: &[K], live: &[K]) -> Vec<Failure>
where
    K: Resource<DynamicType = ()> + Clone + Debug + Serialize + DeserializeOwned,
{
    let mut failures = Vec::new();
    for gone in live
        .iter()
        .filter(|o| !desired.iter().any(|d| d.name_any() == o.name_any()))
    {
        let params = DeleteParams {
            preconditions: Some(Preconditions {
                uid: gone.uid(),
                resource_version: gone.resource_version(),
            }),
            ..DeleteParams::background()
        };
        match api.delete(&gone.name_any(), &params).await {
            Ok(_) => ctx.metrics.writes.with_label_values(&["delete"]).inc(),
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(err) => failures.push(failure(K::kind(&()).as_ref(), &gone.name_any(), &err)),
        }
    }
    failures
}

/// A refused write as a [`Failure`], logged once with the API server's message.
fn failure(kind: &str, name: &str, err: &kube::Error) -> Failure {
    let (reason, message) = match err {
        kube::Error::Api(s) => (classify(s.code, &s.message), s.message.clone()),
        other => (reasons::APPLY_FAILED, crate::error::message(other)),
    };
    let object = format!("{kind} {name}");
    warn!(%object, reason, %message, "write refused");
    Failure {
        reason,
        object,
        message,
    }
}

/// The `Degraded` reason of an API server refusal.
pub fn classify(code: u16, message: &str) -> &'static str {
    if code == 403 {
        reasons::FORBIDDEN
    } else if message.contains("provided port is already allocated") {
        reasons::NODE_PORT_IN_USE
    } else if message.contains("range is full") {
        reasons::NODE_PORT_RANGE_FULL
    } else if code == 413 || message.contains("Too long") || message.contains("too large") {
        reasons::TOO_LARGE
    } else {
        reasons::APPLY_FAILED
    }
}

fn too_large(cm: &ConfigMap, bytes: usize, spec: &TrackerPortPoolSpec) -> Failure {
    let knob = match spec.mode {
        trackgate_api::IdentificationMode::Dedicated => "spec.sharding.portsPerShard",
        // a shared pool's ConfigMap holds only the inline devices; the lists are mounted
        trackgate_api::IdentificationMode::Shared => {
            "spec.devices (move them to a devicesFrom ConfigMap)"
        }
    };
    Failure {
        reason: reasons::TOO_LARGE,
        object: format!("ConfigMap {}", cm.name_any()),
        message: format!(
            "its data would be {bytes} bytes, over the API server's limit of {} bytes; lower {knob}",
            desired::MAX_CONFIG_MAP_DATA
        ),
    }
}

// === drift ===

/// Whether `live` already holds every field `want` sets, with the same value: the fields the
/// operator owns. Fields others set (the API server's defaults, a nodePort it assigned,
/// another controller's annotation) do not count. Lists compare element by element and must
/// have the same length, so a removed port or container counts as drift.
pub fn is_applied<K: Serialize>(want: &K, live: &K) -> bool {
    match (serde_json::to_value(want), serde_json::to_value(live)) {
        (Ok(w), Ok(l)) => is_subset(&w, &l),
        _ => false,
    }
}

fn is_subset(want: &Value, live: &Value) -> bool {
    match (want, live) {
        (Value::Object(w), Value::Object(l)) => w
            .iter()
            .all(|(k, wv)| l.get(k).is_some_and(|lv| is_subset(wv, lv))),
        (Value::Array(w), Value::Array(l)) => {
            w.len() == l.len() && w.iter().zip(l).all(|(a, b)| is_subset(a, b))
        }
        (Value::Number(w), Value::Number(l)) => w.as_f64() == l.as_f64(),
        _ => want == live,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn drift_is_a_differing_owned_field_not_a_field_someone_else_set() {
        let want: Service = serde_json::from_value(json!({
            "metadata": {"name": "s", "labels": {"a": "1"}},
            "spec": {"type": "NodePort", "ports": [{"port": 30001, "nodePort": 30001}]}
        }))
        .unwrap();
        let mut live = want.clone();
        live.metadata.resource_version = Some("7".into());
        live.metadata
            .labels
            .as_mut()
            .unwrap()
            .insert("b".into(), "2".into());
        live.spec.as_mut().unwrap().cluster_ip = Some("10.0.0.1".into());
        assert!(is_applied(&want, &live));
        live.spec.as_mut().unwrap().type_ = Some("ClusterIP".into());
        assert!(!is_applied(&want, &live), "an edited field is drift");
        let mut shorter = want.clone();
        shorter.spec.as_mut().unwrap().ports = Some(vec![]);
        assert!(!is_applied(&want, &shorter), "a removed port is drift");
    }

    #[test]
    fn api_refusals_map_to_reasons() {
        assert_eq!(classify(403, "forbidden"), reasons::FORBIDDEN);
        assert_eq!(
            classify(
                422,
                "spec.ports[0].nodePort: Invalid value: 30152: provided port is already allocated"
            ),
            reasons::NODE_PORT_IN_USE
        );
        assert_eq!(
            classify(500, "failed to allocate a nodePort: range is full"),
            reasons::NODE_PORT_RANGE_FULL
        );
        assert_eq!(
            classify(422, "[]: Too long: must have at most 1048576 bytes"),
            reasons::TOO_LARGE
        );
        assert_eq!(classify(500, "etcd"), reasons::APPLY_FAILED);
    }
}
