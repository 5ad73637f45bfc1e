//! The reconcile loop: a thin IO shell around the pure [`crate::allocate`], [`crate::desired`]
//! and [`crate::status`].
//!
//! RBAC the operator needs (the chart's ClusterRole / Role):
//!
//! | apiGroup | resources | verbs |
//! |---|---|---|
//! | `trackgate.dev` | `trackerportpools` | get, list, watch, patch (removes the one-shot `trackgate.dev/reallocate` annotation) |
//! | `trackgate.dev` | `trackerportpools/status` | get, patch |
//! | `""` (core) | `configmaps` | get, list, watch, create, patch, delete |
//! | `""` (core) | `services` | get, list, watch, create, patch, delete (listed cluster-wide: node ports held by other Services) |
//! | `apps` | `deployments` | get, list, watch, create, patch, delete |
//! | `policy` | `poddisruptionbudgets` | get, list, watch, create, patch, delete |
//! | `events.k8s.io` | `events` | create, patch |
//! | `coordination.k8s.io` | `leases` | get, create, patch (Lease `trackgate-operator` in `$POD_NAMESPACE`) |
//!
//! Every write is a create (create-only, for a new shard or record), a server-side apply, a
//! merge patch or a delete with preconditions, never `update`. ConfigMaps are watched cluster-wide (metadata
//! only) so that editing a `devicesFrom` list reaches its pool.
//!
//! The listener pods need no RBAC (they read a mounted ConfigMap) and no service account
//! token; the Secret holding the Redis URL is read by the kubelet, not by the operator.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ListParams, Patch, PatchParams};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{Controller, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;
use tracing::{Instrument, info, info_span, warn};
use trackgate_api::annotations::REALLOCATE;
use trackgate_api::conditions::{self, reasons};
use trackgate_api::{IdentificationMode, TrackerPortPool};

use crate::allocate::{Allocation, Previous, Unallocated};
use crate::desired::{self, Desired, FIELD_MANAGER, POOL_LABEL, SpecError};
use crate::error::Error;
use crate::metrics::{CONTROLLER, Metrics};
use crate::record::{self, Evidence, Origin};
use crate::shared;
use crate::status::{self, Failure, Outcome};

pub mod apply;
pub mod node_ports;

use apply::Children;
use node_ports::NodePortRange;

/// How often a healthy pool is looked at again with no event: drift in an unwatched field and
/// a record restored without its owner reference are repaired within this.
pub const RESYNC: Duration = Duration::from_secs(300);
/// First retry delay after a failed reconcile; doubles per consecutive failure.
pub const BACKOFF_BASE: Duration = Duration::from_secs(2);
/// Longest retry delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(300);
/// Quiet time before a triggered reconcile runs.
pub const DEBOUNCE: Duration = Duration::from_secs(1);
/// Pools reconciled at once. Each is sequential inside; pools are independent.
pub const CONCURRENCY: u16 = 4;
/// Failure Events published per reconcile; the status names them all (counted past 3).
const FAILURE_EVENTS: usize = 10;

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
    /// The cluster's node-port range.
    pub node_ports: NodePortRange,
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
            node_ports: NodePortRange::default(),
            failures: Mutex::default(),
        }
    }

    /// The same context for a cluster whose API server runs another node-port range.
    pub fn with_node_ports(mut self, range: NodePortRange) -> Self {
        self.node_ports = range;
        self
    }
}

// === reconcile ===

/// Reconciles one pool: read, recover the allocation record, compute (pure), apply what
/// differs, prune, and write the status on every outcome.
///
/// # Errors
/// Kubernetes API failures on reads and on the status write; they are retried by
/// [`error_policy`]. Refused writes of children are not errors: they land in the status.
pub async fn reconcile(pool: Arc<TrackerPortPool>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile_started();
    let ns = pool.namespace().ok_or(Error::NotNamespaced)?;
    let name = pool.name_any();
    let span = info_span!("reconcile", pool = %name, namespace = %ns);
    async {
        let children = Children::fetch(&ctx.client, &ns, &pool).await?;
        if pool.spec.mode == IdentificationMode::Shared {
            // one Deployment and Service for the whole fleet: no ports to allocate, no record
            let sources = fetch_sources(&ctx.client, &ns, &pool).await?;
            return reconcile_shared(&pool, &ctx, &ns, &children, &sources).await;
        }
        let recovered = record::recover(Evidence {
            pool: &name,
            record: &children.record,
            shards: &children.config_maps,
            other_children: children.listener_objects(),
            allocated_in_status: pool.status.as_ref().map_or(0, |s| s.allocated),
            reallocate: record::wants_reallocation(pool.annotations()),
        });
        let planned;
        let failures: Vec<Failure>;
        let outcome = match &recovered {
            Err(lost) => Outcome::RecordLost(lost),
            Ok(rec) => {
                let sources = fetch_sources(&ctx.client, &ns, &pool).await?;
                planned = plan(&pool, &sources, &rec.previous, &ctx.image);
                match &planned {
                    Err(err) => Outcome::Invalid(err),
                    Ok((allocation, desired)) => {
                        let cluster_services = if apply::takes_node_ports(&pool.spec) {
                            Api::<Service>::all(ctx.client.clone())
                                .list(&ListParams::default())
                                .await?
                                .items
                        } else {
                            Vec::new()
                        };
                        failures = children
                            .converge(&ctx, &ns, &pool, desired, &cluster_services)
                            .await;
                        Outcome::Allocated {
                            allocation,
                            max_listeners: desired::max_listeners(desired),
                            failures: &failures,
                        }
                    }
                }
            }
        };
        let new = status::status_for(&pool, outcome, children.observed(), &Time(Timestamp::now()));
        if status::is_changed(&pool, &new) {
            patch_status(&ctx, &ns, &pool, &new).await?;
        }
        let degraded_changed = degraded(&pool.status) != degraded(&Some(new.clone()));
        record_events(&ctx, &pool, &recovered, outcome, degraded_changed).await;
        Ok(match outcome {
            Outcome::Invalid(_) => Action::await_change(), // a spec error waits for the user
            Outcome::RecordLost(err) => {
                warn!(reason = err.reason(), %err, "allocation record lost; pool left as it is");
                Action::requeue(RESYNC)
            }
            Outcome::Allocated { failures, .. } if !failures.is_empty() => {
                Action::requeue(backoff(count_failure(&ctx, &pool), &name))
            }
            Outcome::Allocated { .. } => {
                reset_failures(&ctx, &pool);
                Action::requeue(RESYNC)
            }
        })
    }
    .instrument(span)
    .await
}

fn degraded(status: &Option<trackgate_api::TrackerPortPoolStatus>) -> Option<(String, String)> {
    status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == conditions::DEGRADED && c.status == "True")
        .map(|c| (c.reason.clone(), c.message.clone()))
}

/// The shared-pool reconcile: plan (pure), apply what differs, write the status on every
/// outcome, one Warning Event per distinct failure.
async fn reconcile_shared(
    pool: &TrackerPortPool,
    ctx: &Context,
    ns: &str,
    children: &Children,
    sources: &BTreeMap<(String, String), String>,
) -> Result<Action, Error> {
    let name = pool.name_any();
    let live = shared::live_replicas(pool, &children.deployments);
    let planned = shared::plan(pool, sources, live, &ctx.image);
    let mut failures = Vec::new();
    if let Ok((_, desired)) = &planned {
        let cluster_services = if apply::takes_node_ports(&pool.spec) {
            Api::<Service>::all(ctx.client.clone())
                .list(&ListParams::default())
                .await?
                .items
        } else {
            Vec::new()
        };
        failures = children
            .converge(ctx, ns, pool, desired, &cluster_services)
            .await;
    }
    let admitted = planned.as_ref().map(|(n, _)| *n);
    if let Ok(n) = admitted {
        ctx.metrics
            .pool_devices
            .with_label_values(&[&name, "allocated"])
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }
    let new = shared::status_for(
        pool,
        admitted,
        &failures,
        children.observed(),
        &Time(Timestamp::now()),
    );
    if status::is_changed(pool, &new) {
        patch_status(ctx, ns, pool, &new).await?;
    }
    if degraded(&pool.status) != degraded(&Some(new)) {
        for f in failures.iter().take(FAILURE_EVENTS) {
            let event = event(EventType::Warning, f.reason, f.to_string(), "Apply");
            match ctx.recorder.publish(&event, &pool.object_ref(&())).await {
                Ok(()) => ctx.metrics.writes.with_label_values(&["event"]).inc(),
                Err(err) => warn!(err = %crate::error::message(&err), "publishing event failed"),
            }
        }
    }
    Ok(match planned {
        Err(_) => Action::await_change(),
        Ok(_) if !failures.is_empty() => Action::requeue(backoff(count_failure(ctx, pool), &name)),
        Ok(_) => {
            reset_failures(ctx, pool);
            Action::requeue(RESYNC)
        }
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
    Action::requeue(backoff(count_failure(&ctx, &pool), &pool.name_any()))
}

fn count_failure(ctx: &Context, pool: &TrackerPortPool) -> u32 {
    let mut failures = ctx.failures.lock().unwrap_or_else(|e| e.into_inner());
    let n = failures.entry(ObjectRef::from_obj(pool)).or_insert(0);
    *n = n.saturating_add(1);
    *n
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

/// PURE: the allocation and children of a pool, or why it cannot be served. The planning is
/// [`desired::plan_local`], the one `trackgate run` uses; this only adds the objects.
///
/// # Errors
/// A spec error.
pub fn plan(
    pool: &TrackerPortPool,
    sources: &BTreeMap<(String, String), String>,
    previous: &Previous,
    image: &str,
) -> Result<(Allocation, Desired), SpecError> {
    let source = |cm: &str, key: &str| {
        sources
            .get(&(cm.to_owned(), key.to_owned()))
            .map(String::as_str)
    };
    let (allocation, configs) =
        desired::plan_local(&pool.name_any(), &pool.spec, source, previous)?;
    let desired = desired::desired_objects(pool, &allocation, configs, image)?;
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

// === events ===

fn event(type_: EventType, reason: &str, note: String, action: &str) -> Event {
    Event {
        type_,
        reason: reason.to_owned(),
        note: Some(note),
        action: action.to_owned(),
        secondary: None,
    }
}

/// Events: a lost record and refused writes (Warning, once per distinct Degraded message, not
/// per retry), adoption and reallocation, allocation changes and exhaustion. Best effort: a
/// failed Event is logged, never retried (it must not fail the reconcile).
async fn record_events(
    ctx: &Context,
    pool: &TrackerPortPool,
    recovered: &Result<record::Recovered, record::RecordError>,
    outcome: Outcome<'_>,
    degraded_changed: bool,
) {
    let mut events = Vec::new();
    match outcome {
        Outcome::RecordLost(err) if degraded_changed => {
            events.push(event(
                EventType::Warning,
                err.reason(),
                err.to_string(),
                "Recover",
            ));
        }
        Outcome::Allocated { failures, .. } if degraded_changed => {
            for f in failures.iter().take(FAILURE_EVENTS) {
                events.push(event(EventType::Warning, f.reason, f.to_string(), "Apply"));
            }
        }
        _ => {}
    }
    if let (Ok(rec), Outcome::Allocated { failures, .. }) = (recovered, outcome) {
        let record_written = !failures.iter().any(|f| f.is_record(&pool.name_any()));
        match rec.origin {
            Origin::Adopted if record_written => events.push(event(
                EventType::Normal,
                reasons::ALLOCATION_CHANGED,
                format!(
                    "adopted {} devices from the shard tables into allocation record {}; no port changed",
                    rec.previous.len(),
                    record::record_name(&pool.name_any(), 0)
                ),
                "Adopt",
            )),
            Origin::Reallocated if record_written => {
                events.push(event(
                    EventType::Warning,
                    reasons::REALLOCATED,
                    format!(
                        "fresh allocation on request ({REALLOCATE}): {} devices kept the port a \
                         shard ConfigMap still named",
                        rec.previous.len()
                    ),
                    "Reallocate",
                ));
                clear_reallocate(ctx, pool).await;
            }
            _ => {}
        }
    }
    let previous = recovered.as_ref().map(|r| &r.previous);
    if let (Ok(previous), Outcome::Allocated { allocation, .. }) = (previous, outcome) {
        events.extend(allocation_events(ctx, pool, previous, allocation));
    }
    for event in events {
        info!(reason = %event.reason, note = event.note.as_deref().unwrap_or(""), "event");
        match ctx.recorder.publish(&event, &pool.object_ref(&())).await {
            Ok(()) => ctx.metrics.writes.with_label_values(&["event"]).inc(),
            Err(err) => warn!(err = %crate::error::message(&err), "publishing event failed"),
        }
    }
}

/// Removes the one-shot reallocation annotation (merge patch: nothing else is touched).
async fn clear_reallocate(ctx: &Context, pool: &TrackerPortPool) {
    let Some(ns) = pool.namespace() else { return };
    let api: Api<TrackerPortPool> = Api::namespaced(ctx.client.clone(), &ns);
    let patch = Patch::Merge(json!({"metadata": {"annotations": {REALLOCATE: null}}}));
    match api
        .patch(&pool.name_any(), &PatchParams::default(), &patch)
        .await
    {
        Ok(_) => ctx.metrics.writes.with_label_values(&["patch"]).inc(),
        Err(err) => warn!(err = %crate::error::message(&err), "removing {REALLOCATE} failed"),
    }
}

/// Allocation changes and exhaustion, and the pool gauges.
fn allocation_events(
    ctx: &Context,
    pool: &TrackerPortPool,
    previous: &Previous,
    allocation: &Allocation,
) -> Vec<Event> {
    let now = allocation.to_previous();
    let added = now.keys().filter(|i| !previous.contains_key(*i)).count();
    let freed = previous.keys().filter(|i| !now.contains_key(*i)).count();
    let moved = now
        .iter()
        .filter(|(i, p)| previous.get(*i).is_some_and(|q| q != *p))
        .count();
    let mut events = Vec::new();
    if added + freed + moved > 0 {
        events.push(event(
            EventType::Normal,
            reasons::ALLOCATION_CHANGED,
            format!("{added} devices got a port, {freed} ports freed, {moved} devices moved"),
            "Allocate",
        ));
    }
    let waiting = allocation.unallocated.len();
    let was_waiting = pool.status.as_ref().map_or(0, |s| s.unallocated as usize);
    if waiting > 0 && waiting != was_waiting {
        let full = allocation
            .unallocated
            .iter()
            .filter(|(_, w)| *w == Unallocated::RangeFull)
            .count();
        events.push(event(
            EventType::Warning,
            reasons::PORTS_EXHAUSTED,
            format!("{waiting} devices hold no port ({full} because the range is full)"),
            "Allocate",
        ));
    }
    let name = pool.name_any();
    let gauge = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
    ctx.metrics
        .pool_devices
        .with_label_values(&[&name, "allocated"])
        .set(gauge(allocation.allocated()));
    ctx.metrics
        .pool_devices
        .with_label_values(&[&name, "unallocated"])
        .set(gauge(waiting));
    ctx.metrics
        .pool_ports
        .with_label_values(&[&name, "free"])
        .set(i64::from(allocation.free_ports));
    ctx.metrics
        .pool_ports
        .with_label_values(&[&name, "allocated"])
        .set(gauge(allocation.allocated()));
    events
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
        .owns(Api::<Service>::all(client.clone()), owned.clone())
        .owns(Api::<PodDisruptionBudget>::all(client.clone()), owned)
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
