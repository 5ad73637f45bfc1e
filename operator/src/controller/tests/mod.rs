//! Reconcile against a fake API server (controller-rs `ApiServerVerifier` scenarios).

use http::Method;
use prometheus::Registry;
use serde_json::json;
use trackgate_api::{DeviceSource, TrackerPortPool};

use super::*;
use crate::allocate::{self, ALLOCATION_TABLE_FILE};
use crate::fixtures::{FakeApiServer, PoolBuilder, Write, imei};
use crate::record::Evidence;

const POOL: &str = "/apis/trackgate.dev/v1alpha1/namespaces/trackers/trackerportpools/fleet";
const CMS: &str = "/api/v1/namespaces/trackers/configmaps";

struct Scenario {
    fake: FakeApiServer,
    ctx: Arc<Context>,
    _server: tokio::task::JoinHandle<()>,
}

impl Scenario {
    fn new(pool: &TrackerPortPool) -> Self {
        let fake = FakeApiServer::default();
        fake.insert(POOL, json!(pool));
        let (client, server) = fake.client();
        let metrics = Metrics::register(&Registry::new()).unwrap();
        let ctx = Arc::new(Context::new(client, metrics, "trackgate:test".into(), None));
        Self {
            fake,
            ctx,
            _server: server,
        }
    }

    /// The pool as the API server holds it now (with the status the last reconcile wrote).
    fn pool(&self) -> TrackerPortPool {
        serde_json::from_value(self.fake.get(POOL).unwrap()).unwrap()
    }

    /// Replaces the spec, as `kubectl apply` would, keeping the status.
    fn edit(&self, f: impl FnOnce(&mut TrackerPortPool)) {
        let mut pool = self.pool();
        f(&mut pool);
        pool.metadata.generation = pool.metadata.generation.map(|g| g + 1);
        self.fake.insert(POOL, json!(pool));
    }

    async fn reconcile(&self) -> (Action, Vec<Write>) {
        let action = reconcile(Arc::new(self.pool()), self.ctx.clone())
            .await
            .unwrap();
        (action, self.fake.take_writes())
    }

    fn status(&self) -> trackgate_api::TrackerPortPoolStatus {
        self.pool().status.unwrap()
    }
}

fn paths(writes: &[Write], method: Method) -> Vec<String> {
    // Events are best effort and checked separately
    writes
        .iter()
        .filter(|(m, p)| *m == method && !p.contains("/events"))
        .map(|(_, p)| p.clone())
        .collect()
}

fn events(writes: &[Write]) -> usize {
    writes
        .iter()
        .filter(|(m, p)| *m == Method::POST && p.contains("/events"))
        .count()
}

fn cond(s: &trackgate_api::TrackerPortPoolStatus, t: &str) -> (String, String) {
    let c = s.conditions.iter().find(|c| c.type_ == t).unwrap();
    (c.status.clone(), c.reason.clone())
}

#[tokio::test]
async fn first_apply_creates_every_child_then_an_unchanged_pool_writes_nothing() {
    let pool = PoolBuilder::dedicated(5000, 5099)
        .ports_per_shard(10)
        .with_devices(15)
        .build();
    let s = Scenario::new(&pool);

    let (action, writes) = s.reconcile().await;
    assert_eq!(action, Action::requeue(RESYNC));
    let patched = paths(&writes, Method::PATCH);
    for shard in ["fleet-shard-0", "fleet-shard-1"] {
        for collection in [
            "/apis/apps/v1/namespaces/trackers/deployments",
            "/api/v1/namespaces/trackers/services",
            "/apis/policy/v1/namespaces/trackers/poddisruptionbudgets",
        ] {
            let path = format!("{collection}/{shard}");
            assert!(patched.contains(&path), "{path} not applied: {patched:?}");
        }
    }
    assert!(patched.contains(&format!("{POOL}/status")));
    assert_eq!(patched.len(), 7, "{patched:?}");
    let created = paths(&writes, Method::POST);
    assert_eq!(
        created,
        vec![CMS.to_owned(), CMS.to_owned(), CMS.to_owned()],
        "the record and two shard ConfigMaps, create-only"
    );
    assert_eq!(events(&writes), 1, "one AllocationChanged event");
    let status = s.status();
    assert_eq!(
        (status.devices, status.allocated, status.free_ports),
        (15, 15, 85)
    );
    assert_eq!(status.shards_ready, "0/2");

    // nothing changed: no apply, no status write, no event
    let (_, writes) = s.reconcile().await;
    assert_eq!(writes, vec![], "an unchanged pool must not write");
}

#[tokio::test]
async fn adding_or_removing_a_device_changes_only_its_shard() {
    let pool = PoolBuilder::dedicated(5000, 5099)
        .ports_per_shard(10)
        .with_devices(15)
        .build();
    let s = Scenario::new(&pool);
    s.reconcile().await;
    let before: Vec<(u16, String)> =
        serde_json::from_value::<ConfigMap>(s.fake.get(&format!("{CMS}/fleet-shard-0")).unwrap())
            .map(|cm| {
                let mut prev = Previous::new();
                allocate::parse_table(&cm.data.unwrap()[ALLOCATION_TABLE_FILE], &mut prev).unwrap();
                prev.into_iter().map(|(i, p)| (p, i)).collect()
            })
            .unwrap();

    // shard 1 holds 7 devices, shard 0 holds 8: the new one goes to shard 1
    s.edit(|p| {
        p.spec.devices.push(trackgate_api::Device {
            imei: imei(100),
            port: None,
        })
    });
    let (_, writes) = s.reconcile().await;
    let patched = paths(&writes, Method::PATCH);
    assert_eq!(
        patched,
        vec![
            format!("{CMS}/fleet-allocation"),
            format!("{CMS}/fleet-shard-1"),
            "/api/v1/namespaces/trackers/services/fleet-shard-1".to_owned(),
            format!("{POOL}/status"),
        ]
    );

    // removing a device of shard 0 touches shard 0 only; the others keep their ports
    let (gone_port, gone) = before[0].clone();
    s.edit(|p| p.spec.devices.retain(|d| d.imei != gone));
    let (_, writes) = s.reconcile().await;
    let patched = paths(&writes, Method::PATCH);
    assert_eq!(patched[1], format!("{CMS}/fleet-shard-0"));
    assert!(
        patched.iter().all(|p| !p.contains("shard-1")),
        "{patched:?}"
    );
    let cm: ConfigMap =
        serde_json::from_value(s.fake.get(&format!("{CMS}/fleet-shard-0")).unwrap()).unwrap();
    let table = &cm.data.unwrap()[ALLOCATION_TABLE_FILE];
    assert!(!table.contains(&gone), "removed device still allocated");
    assert!(
        !table.contains(&format!(" {gone_port}\n")),
        "its port is free"
    );
    for (port, imei) in &before[1..] {
        assert!(table.contains(&format!("{imei} {port}\n")), "{imei} moved");
    }
    assert_eq!(s.status().free_ports, 85);
}

#[tokio::test]
async fn removing_every_device_of_a_shard_deletes_the_shard() {
    let pool = PoolBuilder::dedicated(5000, 5099)
        .ports_per_shard(10)
        .with_devices(15)
        .build();
    let s = Scenario::new(&pool);
    s.reconcile().await;
    let cm: ConfigMap =
        serde_json::from_value(s.fake.get(&format!("{CMS}/fleet-shard-1")).unwrap()).unwrap();
    let table = cm.data.unwrap()[ALLOCATION_TABLE_FILE].clone();
    s.edit(|p| p.spec.devices.retain(|d| !table.contains(&d.imei)));
    let (_, writes) = s.reconcile().await;
    let deleted = paths(&writes, Method::DELETE);
    assert_eq!(deleted.len(), 4, "{deleted:?}");
    assert!(deleted.iter().all(|p| p.ends_with("fleet-shard-1")));
    assert_eq!(s.status().shards.len(), 1);
}

#[tokio::test]
async fn invalid_pool_sets_degraded_and_waits_for_a_change() {
    let mut pool = PoolBuilder::dedicated(5000, 5099).with_devices(3).build();
    pool.spec.devices_from.push(DeviceSource {
        config_map: "missing".into(),
        key: "imeis".into(),
    });
    let s = Scenario::new(&pool);
    let (action, writes) = s.reconcile().await;
    assert_eq!(action, Action::await_change());
    assert_eq!(
        paths(&writes, Method::PATCH),
        vec![format!("{POOL}/status")],
        "no children"
    );
    let status = s.status();
    assert_eq!(
        cond(&status, "Degraded"),
        ("True".into(), "DeviceSourceUnavailable".into())
    );
    assert_eq!(cond(&status, "Ready").0, "False");

    // the ConfigMap appears: the pool recovers
    s.fake.insert(
        &format!("{CMS}/missing"),
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "missing", "namespace": "trackers"},
               "data": {"imeis": format!("{}\n{}\n", imei(50), imei(51))}}),
    );
    let (action, _) = s.reconcile().await;
    assert_eq!(action, Action::requeue(RESYNC));
    let status = s.status();
    assert_eq!(cond(&status, "Degraded").0, "False");
    assert_eq!(status.allocated, 5);
    assert!(
        s.fake.get(&format!("{CMS}/missing")).is_some(),
        "a device source is never pruned"
    );
}

/// A user may label their device list with the pool's label; it is not a shard and must
/// never be deleted as a stale one.
#[tokio::test]
async fn a_labelled_object_the_pool_does_not_own_is_left_alone() {
    let pool = PoolBuilder::dedicated(5000, 5099).with_devices(2).build();
    let s = Scenario::new(&pool);
    s.fake.insert(
        &format!("{CMS}/fleet-list"),
        json!({"apiVersion": "v1", "kind": "ConfigMap",
               "metadata": {"name": "fleet-list", "namespace": "trackers", "labels": {"trackgate.dev/pool": "fleet"}},
               "data": {"imeis": ""}}),
    );
    let (_, writes) = s.reconcile().await;
    assert!(paths(&writes, Method::DELETE).is_empty(), "{writes:?}");
    assert!(s.fake.get(&format!("{CMS}/fleet-list")).is_some());
}

#[tokio::test]
async fn full_range_reports_unallocated_devices_and_warns() {
    let pool = PoolBuilder::dedicated(5000, 5004).with_devices(8).build();
    let s = Scenario::new(&pool);
    let (_, writes) = s.reconcile().await;
    assert_eq!(events(&writes), 2, "AllocationChanged + PortsExhausted");
    let status = s.status();
    assert_eq!(
        (status.allocated, status.unallocated, status.free_ports),
        (5, 3, 0)
    );
    assert_eq!(
        cond(&status, "PortsAllocated"),
        ("False".into(), "PortsExhausted".into())
    );
    // not repeated while nothing changes
    let (_, writes) = s.reconcile().await;
    assert_eq!(writes, vec![]);
}

#[test]
fn editing_a_device_list_triggers_only_the_pools_that_read_it() {
    let mut reader = PoolBuilder::dedicated(5000, 5010).build();
    reader.spec.devices_from.push(DeviceSource {
        config_map: "vans".into(),
        key: "imeis".into(),
    });
    let mut elsewhere = reader.clone();
    elsewhere.metadata.namespace = Some("other".into());
    let mut other = PoolBuilder::dedicated(6000, 6010).build();
    other.metadata.name = Some("other".into());
    let pools = [reader, elsewhere, other].map(Arc::new);
    let hit = pools_reading("trackers", "vans", &pools);
    assert_eq!(hit, vec![ObjectRef::from_obj(&*pools[0])]);
    assert!(pools_reading("trackers", "trucks", &pools).is_empty());
}

#[test]
fn backoff_grows_with_jitter_and_is_capped() {
    let d1 = backoff(1, "fleet");
    assert!(
        d1 >= BACKOFF_BASE && d1 <= BACKOFF_BASE.mul_f64(1.25),
        "{d1:?}"
    );
    let d3 = backoff(3, "fleet");
    assert!(d3 >= BACKOFF_BASE * 4, "{d3:?}");
    assert!(backoff(40, "fleet") <= BACKOFF_MAX.mul_f64(1.25));
}

mod exposure;
mod recovery;
