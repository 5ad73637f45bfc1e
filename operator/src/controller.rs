//! The reconcile loop: a thin IO shell around the pure [`crate::allocate`], [`crate::desired`]
//! and [`crate::status`].
//!
//! RBAC the operator needs (the chart's ClusterRole / Role):
//!
//! | apiGroup | resources | verbs |
//! |---|---|---|
//! | `trackgate.dev` | `trackerportpools` | get, list, watch |
//! | `trackgate.dev` | `trackerportpools/status` | get, patch |
//! | `""` (core) | `configmaps` | get, list, watch, create, patch, delete |
//! | `""` (core) | `services` | get, list, watch, create, patch, delete |
//! | `apps` | `deployments` | get, list, watch, create, patch, delete |
//! | `policy` | `poddisruptionbudgets` | get, list, watch, create, patch, delete |
//! | `events.k8s.io` | `events` | create, patch |
//! | `coordination.k8s.io` | `leases` | get, create, patch (Lease `trackgate-operator` in `$POD_NAMESPACE`) |
//!
//! Every write is a server-side apply or merge patch (`patch`; an apply that creates an object
//! is authorized as `create`), never `update`. ConfigMaps are watched cluster-wide (metadata
//! only) so that editing a `devicesFrom` list reaches its pool.
//!
//! The listener pods need no RBAC (they read a mounted ConfigMap) and no service account
//! token; the Secret holding the Redis URL is read by the kubelet, not by the operator.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, HashMap};
use std::fmt::Debug;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{Controller, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;
use tracing::{Instrument, info, info_span, warn};
use trackgate_api::conditions::reasons;
use trackgate_api::{IdentificationMode, TrackerPortPool};

use crate::allocate::{self, ALLOCATION_TABLE_FILE, Allocation, Layout, Previous, Unallocated};
use crate::desired::{self, Desired, FIELD_MANAGER, POOL_LABEL, SpecError};
use crate::error::Error;
use crate::metrics::{CONTROLLER, Metrics};
use crate::shared;
use crate::status::{self, Observed, Outcome};

/// How often a healthy pool is looked at again with no event (drift repair).
pub const RESYNC: Duration = Duration::from_secs(300);
/// First retry delay after a failed reconcile; doubles per consecutive failure.
pub const BACKOFF_BASE: Duration = Duration::from_secs(2);
/// Longest retry delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(300);
/// Quiet time before a triggered reconcile runs.
pub const DEBOUNCE: Duration = Duration::from_secs(1);
/// Pools reconciled at once. Each is sequential inside; pools are independent.
pub const CONCURRENCY: u16 = 4;

/// Shared state of the reconciles.
pub struct Context {
    /// Kubernetes client.
    pub client: Client,
    /// Publishes Events on pools.
    pub recorder: Recorder,
    /// Metrics.
    pub metrics: Metrics,
    /// Default listener image (the operator's own).
    pub image: String,
    /// Consecutive failures per pool, for backoff.
    failures: Mutex<HashMap<ObjectRef<TrackerPortPool>, u32>>,
}

impl Context {
    /// A context; `instance` names this replica in Events.
    pub fn new(client: Client, metrics: Metrics, image: String, instance: Option<String>) -> Self {
        let reporter = Reporter {
            controller: FIELD_MANAGER.to_owned(),
            instance,
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            image,
            failures: Mutex::default(),
        }
    }
}

// === reconcile ===

/// Reconciles one pool: read, compute (pure), apply what differs, prune, write status if changed.
///
/// # Errors
/// Kubernetes API failures; they are retried by [`error_policy`].
pub async fn reconcile(pool: Arc<TrackerPortPool>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile_started();
    let ns = pool.namespace().ok_or(Error::NotNamespaced)?;
    let span = info_span!("reconcile", pool = %pool.name_any(), namespace = %ns);
    async {
        let children = Children::fetch(&ctx.client, &ns, &pool).await?;
        let sources = fetch_sources(&ctx.client, &ns, &pool).await?;
        // Shared pools (issue 10): one Deployment and Service for the whole fleet, no allocation.
        if pool.spec.mode == IdentificationMode::Shared {
            return reconcile_shared(&pool, &ctx, &ns, &children, &sources).await;
        }
        let previous = children.previous();
        let planned = plan(&pool, &sources, &previous, &ctx.image);
        let outcome = match &planned {
            Ok((allocation, desired)) => {
                children.converge(&ctx, &ns, desired).await?;
                Outcome::Allocated {
                    allocation,
                    max_listeners: desired::max_listeners(desired),
                }
            }
            Err(err) => Outcome::Invalid(err),
        };
        let new = status::status_for(&pool, outcome, children.observed(), &Time(Timestamp::now()));
        if status::is_changed(&pool, &new) {
            let api: Api<TrackerPortPool> = Api::namespaced(ctx.client.clone(), &ns);
            // apply, not merge: a field we stop setting (the last shard gone) is removed too
            let patch = Patch::Apply(json!({
                "apiVersion": TrackerPortPool::api_version(&()),
                "kind": TrackerPortPool::kind(&()),
                "status": new,
            }));
            let params = PatchParams::apply(FIELD_MANAGER).force();
            api.patch_status(&pool.name_any(), &params, &patch).await?;
            ctx.metrics.writes.with_label_values(&["status"]).inc();
        }
        record(&ctx, &pool, &previous, outcome).await;
        Ok(match planned {
            Ok(_) => Action::requeue(RESYNC),
            Err(_) => Action::await_change(), // a spec error waits for the user
        })
    }
    .instrument(span)
    .await
    .inspect(|_| reset_failures(&ctx, &pool))
}

/// The shared-pool reconcile: plan (pure), apply what differs, write the status if changed.
async fn reconcile_shared(
    pool: &TrackerPortPool,
    ctx: &Context,
    ns: &str,
    children: &Children,
    sources: &BTreeMap<(String, String), String>,
) -> Result<Action, Error> {
    let live = shared::live_replicas(pool, &children.deployments);
    let planned = shared::plan(pool, sources, live, &ctx.image);
    if let Ok((_, desired)) = &planned {
        children.converge(ctx, ns, desired).await?;
    }
    let admitted = planned.as_ref().map(|(n, _)| *n);
    if let Ok(n) = admitted {
        ctx.metrics
            .pool_devices
            .with_label_values(&[&pool.name_any(), "allocated"])
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }
    let new = shared::status_for(pool, admitted, children.observed(), &Time(Timestamp::now()));
    if status::is_changed(pool, &new) {
        patch_status(ctx, ns, pool, &new).await?;
    }
    Ok(match planned {
        Ok(_) => Action::requeue(RESYNC),
        Err(_) => Action::await_change(),
    })
}

/// Writes the status by server-side apply, so a field no longer set is removed.
async fn patch_status(
    ctx: &Context,
    ns: &str,
    pool: &TrackerPortPool,
    new: &trackgate_api::TrackerPortPoolStatus,
) -> Result<(), Error> {
    let api: Api<TrackerPortPool> = Api::namespaced(ctx.client.clone(), ns);
    let patch = Patch::Apply(json!({
        "apiVersion": TrackerPortPool::api_version(&()),
        "kind": TrackerPortPool::kind(&()),
        "status": new,
    }));
    let params = PatchParams::apply(FIELD_MANAGER).force();
    api.patch_status(&pool.name_any(), &params, &patch).await?;
    ctx.metrics.writes.with_label_values(&["status"]).inc();
    Ok(())
}

/// Retries a failed reconcile with per-pool exponential backoff and jitter.
pub fn error_policy(pool: Arc<TrackerPortPool>, error: &Error, ctx: Arc<Context>) -> Action {
    warn!(pool = %pool.name_any(), reason = error.reason(), %error, "reconcile failed");
    ctx.metrics
        .reconcile_errors
        .with_label_values(&[CONTROLLER, error.reason()])
        .inc();
    let attempt = {
        let mut failures = ctx.failures.lock().unwrap_or_else(|e| e.into_inner());
        let n = failures.entry(ObjectRef::from_obj(&*pool)).or_insert(0);
        *n = n.saturating_add(1);
        *n
    };
    Action::requeue(backoff(attempt, &pool.name_any()))
}

fn reset_failures(ctx: &Context, pool: &TrackerPortPool) {
    let mut failures = ctx.failures.lock().unwrap_or_else(|e| e.into_inner());
    failures.remove(&ObjectRef::from_obj(pool));
}

/// `BACKOFF_BASE * 2^(attempt-1)`, capped, plus up to 25 % jitter so pools that failed
/// together (API server restart) do not retry together.
pub fn backoff(attempt: u32, seed: &str) -> Duration {
    let exp = BACKOFF_BASE.saturating_mul(1 << attempt.saturating_sub(1).min(16));
    let base = exp.min(BACKOFF_MAX);
    let mut h = DefaultHasher::new();
    (seed, attempt, Timestamp::now().subsec_nanosecond()).hash(&mut h);
    let jitter = base.mul_f64((h.finish() % 1000) as f64 / 4000.0);
    base + jitter
}

/// PURE: the allocation and children of a pool, or why it cannot be served.
///
/// # Errors
/// A spec error.
pub fn plan(
    pool: &TrackerPortPool,
    sources: &BTreeMap<(String, String), String>,
    previous: &Previous,
    image: &str,
) -> Result<(Allocation, Desired), SpecError> {
    desired::validate(&pool.spec)?;
    let devices = desired::pool_devices(&pool.spec, |cm, key| {
        sources
            .get(&(cm.to_owned(), key.to_owned()))
            .map(String::as_str)
    })?;
    let allocation = allocate::allocate(&Layout::from_spec(&pool.spec), &devices, previous);
    let desired = desired::desired_objects(pool, &allocation, image)?;
    Ok((allocation, desired))
}

/// Reads the `devicesFrom` ConfigMaps: (name, key) → text. A missing one is left out; the
/// plan turns that into a spec error.
async fn fetch_sources(
    client: &Client,
    ns: &str,
    pool: &TrackerPortPool,
) -> Result<BTreeMap<(String, String), String>, Error> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let mut out = BTreeMap::new();
    for src in &pool.spec.devices_from {
        if let Some(cm) = api.get_opt(&src.config_map).await?
            && let Some(text) = cm.data.as_ref().and_then(|d| d.get(&src.key))
        {
            out.insert((src.config_map.clone(), src.key.clone()), text.clone());
        }
    }
    Ok(out)
}

/// Events: allocation changes and exhaustion. Best effort: a failed Event is logged, never
/// retried (it must not fail the reconcile).
async fn record(ctx: &Context, pool: &TrackerPortPool, previous: &Previous, outcome: Outcome<'_>) {
    let Outcome::Allocated { allocation, .. } = outcome else {
        return;
    };
    let now = allocation.to_previous();
    let added = now.keys().filter(|i| !previous.contains_key(*i)).count();
    let freed = previous.keys().filter(|i| !now.contains_key(*i)).count();
    let moved = now
        .iter()
        .filter(|(i, p)| previous.get(*i).is_some_and(|q| q != *p))
        .count();
    let mut events = Vec::new();
    if added + freed + moved > 0 {
        events.push(Event {
            type_: EventType::Normal,
            reason: reasons::ALLOCATION_CHANGED.to_owned(),
            note: Some(format!(
                "{added} devices got a port, {freed} ports freed, {moved} devices moved"
            )),
            action: "Allocate".to_owned(),
            secondary: None,
        });
    }
    let waiting = allocation.unallocated.len();
    let was_waiting = pool.status.as_ref().map_or(0, |s| s.unallocated as usize);
    if waiting > 0 && waiting != was_waiting {
        let full = allocation
            .unallocated
            .iter()
            .filter(|(_, w)| *w == Unallocated::RangeFull)
            .count();
        events.push(Event {
            type_: EventType::Warning,
            reason: reasons::PORTS_EXHAUSTED.to_owned(),
            note: Some(format!(
                "{waiting} devices hold no port ({full} because the range is full)"
            )),
            action: "Allocate".to_owned(),
            secondary: None,
        });
    }
    let name = pool.name_any();
    ctx.metrics
        .pool_devices
        .with_label_values(&[&name, "allocated"])
        .set(i64::try_from(allocation.allocated()).unwrap_or(i64::MAX));
    ctx.metrics
        .pool_devices
        .with_label_values(&[&name, "unallocated"])
        .set(i64::try_from(waiting).unwrap_or(i64::MAX));
    ctx.metrics
        .pool_ports
        .with_label_values(&[&name, "free"])
        .set(i64::from(allocation.free_ports));
    ctx.metrics
        .pool_ports
        .with_label_values(&[&name, "allocated"])
        .set(i64::try_from(allocation.allocated()).unwrap_or(i64::MAX));
    for event in events {
        info!(reason = %event.reason, note = ?event.note, "event");
        match ctx.recorder.publish(&event, &pool.object_ref(&())).await {
            Ok(()) => ctx.metrics.writes.with_label_values(&["event"]).inc(),
            Err(err) => warn!(%err, "publishing event failed"),
        }
    }
}

// === children ===

/// The live children of one pool.
struct Children {
    config_maps: Vec<ConfigMap>,
    deployments: Vec<Deployment>,
    services: Vec<Service>,
    pdbs: Vec<PodDisruptionBudget>,
}

impl Children {
    /// Lists the pool's children: labelled with the pool AND owned by it, so an object a user
    /// labelled by hand (a `devicesFrom` ConfigMap, say) is never taken for a stale shard.
    async fn fetch(client: &Client, ns: &str, pool: &TrackerPortPool) -> Result<Self, Error> {
        let lp = ListParams::default().labels(&format!("{POOL_LABEL}={}", pool.name_any()));
        let uid = pool.uid().unwrap_or_default();
        Ok(Self {
            config_maps: list_owned(client, ns, &lp, &uid).await?,
            deployments: list_owned(client, ns, &lp, &uid).await?,
            services: list_owned(client, ns, &lp, &uid).await?,
            pdbs: list_owned(client, ns, &lp, &uid).await?,
        })
    }

    /// The allocation persisted in the shard ConfigMaps.
    fn previous(&self) -> Previous {
        let mut previous = Previous::new();
        for cm in &self.config_maps {
            let table = cm.data.as_ref().and_then(|d| d.get(ALLOCATION_TABLE_FILE));
            if let Some(Err(err)) = table.map(|t| allocate::parse_table(t, &mut previous)) {
                // the devices of this shard get new ports: loud, but not a reason to stop
                warn!(configmap = %cm.name_any(), %err, "unreadable allocation table");
            }
        }
        previous
    }

    fn observed(&self) -> Observed<'_> {
        Observed {
            deployments: &self.deployments,
            services: &self.services,
        }
    }

    /// Applies what differs, then deletes shards no longer wanted.
    async fn converge(&self, ctx: &Context, ns: &str, desired: &Desired) -> Result<(), Error> {
        let c = &ctx.client;
        // ConfigMaps first: a new Deployment must find its config mounted
        sync(
            ctx,
            &Api::namespaced(c.clone(), ns),
            &desired.config_maps,
            &self.config_maps,
            true,
        )
        .await?;
        sync(
            ctx,
            &Api::namespaced(c.clone(), ns),
            &desired.deployments,
            &self.deployments,
            false,
        )
        .await?;
        sync(
            ctx,
            &Api::namespaced(c.clone(), ns),
            &desired.services,
            &self.services,
            false,
        )
        .await?;
        sync(
            ctx,
            &Api::namespaced(c.clone(), ns),
            &desired.pdbs,
            &self.pdbs,
            false,
        )
        .await?;
        Ok(())
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

/// Server-side applies each desired object whose content hash differs from the live one and
/// deletes live objects that are not desired. With `precondition`, the apply carries the live
/// resourceVersion, so a stale leader's write of the persisted allocation fails with a conflict.
async fn sync<K>(
    ctx: &Context,
    api: &Api<K>,
    desired: &[K],
    live: &[K],
    precondition: bool,
) -> Result<(), Error>
where
    K: Resource<DynamicType = ()> + Clone + Debug + Serialize + DeserializeOwned,
{
    let params = PatchParams::apply(FIELD_MANAGER).force();
    for want in desired {
        let name = want.name_any();
        let current = live.iter().find(|o| o.name_any() == name);
        if current
            .is_some_and(|c| desired::applied_hash(c.meta()) == desired::applied_hash(want.meta()))
        {
            continue;
        }
        let mut body = want.clone();
        if precondition {
            body.meta_mut().resource_version = current.and_then(|c| c.resource_version());
        }
        api.patch(&name, &params, &Patch::Apply(&body)).await?;
        ctx.metrics.writes.with_label_values(&["apply"]).inc();
    }
    for gone in live
        .iter()
        .filter(|o| !desired.iter().any(|d| d.name_any() == o.name_any()))
    {
        api.delete(&gone.name_any(), &DeleteParams::background())
            .await?;
        ctx.metrics.writes.with_label_values(&["delete"]).inc();
    }
    Ok(())
}

// === run ===

/// Runs the controller until `shutdown` completes. Watches pools, their children, and every
/// ConfigMap's metadata (so editing a `devicesFrom` list triggers its pool).
pub async fn run(ctx: Arc<Context>, shutdown: impl Future<Output = ()> + Send + Sync + 'static) {
    let client = ctx.client.clone();
    let pools: Api<TrackerPortPool> = Api::all(client.clone());
    let owned = watcher::Config::default().labels(POOL_LABEL);
    let controller = Controller::new(pools, watcher::Config::default());
    let store = controller.store();
    let live = controller.store();
    let metrics = ctx.metrics.clone();
    // metadata only: the mapper needs names, the reconcile reads the content
    let sources = Api::<PartialObjectMeta<ConfigMap>>::all(client.clone());
    // A first reconcile of a big pool applies thousands of children, each echoed back by a
    // watch event; the debounce folds that echo into one follow-up reconcile.
    let config = kube::runtime::controller::Config::default()
        .debounce(DEBOUNCE)
        .concurrency(CONCURRENCY);
    controller
        .with_config(config)
        .owns(Api::<ConfigMap>::all(client.clone()), owned.clone())
        .owns(Api::<Deployment>::all(client.clone()), owned.clone())
        .owns(Api::<Service>::all(client.clone()), owned)
        .watches(sources, watcher::Config::default(), move |cm| {
            pools_reading(
                &cm.namespace().unwrap_or_default(),
                &cm.name_any(),
                &store.state(),
            )
        })
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| {
            if let Err(err) = result {
                warn!(%err, "controller");
            }
            metrics.forget_pools_except(
                live.state()
                    .iter()
                    .map(|p| p.metadata.name.as_deref().unwrap_or_default()),
            );
            async {}
        })
        .await;
}

/// The pools that read ConfigMap `ns/name` through `devicesFrom`: the ones an edit of it
/// must reconcile.
pub fn pools_reading(
    ns: &str,
    name: &str,
    pools: &[Arc<TrackerPortPool>],
) -> Vec<ObjectRef<TrackerPortPool>> {
    pools
        .iter()
        .filter(|p| p.namespace().as_deref() == Some(ns))
        .filter(|p| p.spec.devices_from.iter().any(|s| s.config_map == name))
        .map(|p| ObjectRef::from_obj(&**p))
        .collect()
}

#[cfg(test)]
mod tests;
