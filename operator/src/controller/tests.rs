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

/// A stale leader (one that read the record before another leader rewrote it) must not
/// overwrite the record, nor delete a shard that changed since it read it.
#[tokio::test]
async fn a_stale_record_write_or_delete_fails_with_a_conflict() {
    let pool = PoolBuilder::dedicated(5000, 5099).with_devices(2).build();
    let s = Scenario::new(&pool);
    s.reconcile().await;
    let stale = Children::fetch(&s.ctx.client, "trackers", &s.pool())
        .await
        .unwrap();
    s.edit(|p| {
        p.spec.devices.push(trackgate_api::Device {
            imei: imei(100),
            port: None,
        })
    });
    s.reconcile().await; // another leader wrote the record meanwhile
    let (_, desired) = plan(&s.pool(), &BTreeMap::new(), &stale_previous(&stale), "img").unwrap();
    let mut changed = desired.clone();
    changed.record[0]
        .data
        .as_mut()
        .unwrap()
        .insert("x".into(), "y".into());
    let failures = stale
        .converge(&s.ctx, "trackers", &s.pool(), &changed, &[])
        .await;
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert!(failures[0].message.contains("modified"), "{failures:?}");
    assert_eq!(failures[0].object, "ConfigMap fleet-allocation");

    // a delete carries the uid and resourceVersion read: a changed shard is not removed
    let stale = Children::fetch(&s.ctx.client, "trackers", &s.pool())
        .await
        .unwrap();
    let (_, mut none) = plan(
        &s.pool(),
        &BTreeMap::new(),
        &stale_previous(&stale),
        "trackgate:test",
    )
    .unwrap();
    none.config_maps.clear();
    s.fake.edit(&format!("{CMS}/fleet-shard-0"), |cm| {
        cm["metadata"]["labels"]["x"] = json!("y");
    });
    let failures = stale
        .converge(&s.ctx, "trackers", &s.pool(), &none, &[])
        .await;
    assert!(
        failures
            .iter()
            .any(|f| f.message.contains("Precondition failed")),
        "{failures:?}"
    );
    assert!(s.fake.get(&format!("{CMS}/fleet-shard-0")).is_some());
}

fn stale_previous(c: &Children) -> Previous {
    record::recover(Evidence {
        pool: "fleet",
        record: &c.record,
        shards: &c.config_maps,
        other_children: 0,
        allocated_in_status: 0,
        reallocate: false,
    })
    .unwrap()
    .previous
}

fn table_of(s: &Scenario, name: &str) -> Previous {
    let cm: ConfigMap =
        serde_json::from_value(s.fake.get(&format!("{CMS}/{name}")).unwrap()).unwrap();
    let mut prev = Previous::new();
    crate::allocate::parse_table(
        &cm.data.unwrap()[crate::allocate::ALLOCATION_TABLE_FILE],
        &mut prev,
    )
    .unwrap();
    prev
}

/// A pool with history (devices added, one removed): a deleted or hand-edited shard ConfigMap
/// comes back from the record, and no device changes port (issue 8, case 1).
#[tokio::test]
async fn a_deleted_or_edited_shard_config_map_is_rebuilt_with_no_port_change() {
    let pool = PoolBuilder::dedicated(5000, 5099)
        .ports_per_shard(10)
        .with_devices(12)
        .build();
    let s = Scenario::new(&pool);
    s.reconcile().await;
    s.edit(|p| {
        p.spec.devices.remove(3);
        p.spec.devices.push(trackgate_api::Device {
            imei: imei(200),
            port: None,
        });
        p.spec.devices.push(trackgate_api::Device {
            imei: imei(201),
            port: None,
        });
    });
    s.reconcile().await;
    let before = table_of(&s, "fleet-allocation");
    let shard0 = s.fake.get(&format!("{CMS}/fleet-shard-0")).unwrap();

    s.fake.remove(&format!("{CMS}/fleet-shard-0"));
    let (_, writes) = s.reconcile().await;
    assert_eq!(
        paths(&writes, Method::POST),
        vec![CMS.to_owned()],
        "recreated, create-only"
    );
    assert_eq!(table_of(&s, "fleet-allocation"), before, "no port changed");
    let again = s.fake.get(&format!("{CMS}/fleet-shard-0")).unwrap();
    assert_eq!(again["data"], shard0["data"]);

    // an edited shard.json (a port handed to another IMEI) is put back
    s.fake.edit(&format!("{CMS}/fleet-shard-0"), |cm| {
        cm["data"]["shard.json"] = json!("{}");
        cm["data"]["allocation.txt"] = json!(format!("{} 5000\n", imei(999)));
    });
    let (_, writes) = s.reconcile().await;
    assert_eq!(
        paths(&writes, Method::PATCH),
        vec![format!("{CMS}/fleet-shard-0")]
    );
    assert_eq!(
        s.fake.get(&format!("{CMS}/fleet-shard-0")).unwrap()["data"],
        shard0["data"]
    );

    // an operator restart (a new context, nothing cached) keeps every port and writes nothing
    let (client, _server) = s.fake.client();
    let metrics = Metrics::register(&Registry::new()).unwrap();
    let ctx = Arc::new(Context::new(client, metrics, "trackgate:test".into(), None));
    reconcile(Arc::new(s.pool()), ctx).await.unwrap();
    assert_eq!(s.fake.take_writes(), vec![]);
    assert_eq!(table_of(&s, "fleet-allocation"), before);
}

/// The record itself lost: nothing is changed, Degraded says what is missing and how to
/// restore it, one Warning Event; restoring it (even without the owner reference of this pool
/// object) or asking for a fresh allocation recovers.
#[tokio::test]
async fn a_lost_record_changes_nothing_until_restored_or_reallocation_is_asked_for() {
    let pool = PoolBuilder::dedicated(5000, 5099)
        .ports_per_shard(10)
        .with_devices(15)
        .build();
    let s = Scenario::new(&pool);
    s.reconcile().await;
    let before = table_of(&s, "fleet-allocation");
    let record = s.fake.remove(&format!("{CMS}/fleet-allocation")).unwrap();
    s.fake.remove(&format!("{CMS}/fleet-shard-1"));
    s.edit(|p| {
        p.spec.devices.push(trackgate_api::Device {
            imei: imei(300),
            port: None,
        })
    });

    let (action, writes) = s.reconcile().await;
    assert_eq!(action, Action::requeue(RESYNC));
    assert_eq!(
        paths(&writes, Method::PATCH),
        vec![format!("{POOL}/status")],
        "only the status"
    );
    assert!(paths(&writes, Method::POST).is_empty() && paths(&writes, Method::DELETE).is_empty());
    assert_eq!(events(&writes), 1, "one Warning");
    let st = s.status();
    assert_eq!(
        cond(&st, "Degraded"),
        ("True".into(), "AllocationRecordMissing".into())
    );
    let msg = &st
        .conditions
        .iter()
        .find(|c| c.type_ == "Degraded")
        .unwrap()
        .message;
    assert!(
        msg.contains("fleet-allocation") && msg.contains("trackgate.dev/reallocate"),
        "{msg}"
    );
    assert_eq!(cond(&st, "PortsAllocated").0, "Unknown");
    assert_eq!(cond(&st, "Ready").0, "False");
    let (_, writes) = s.reconcile().await;
    assert_eq!(writes, vec![], "no event per retry");

    // restored from a backup that names an older pool object as owner
    let mut restored = record.clone();
    restored["metadata"]["ownerReferences"][0]["uid"] = json!("an-older-uid");
    s.fake.insert(&format!("{CMS}/fleet-allocation"), restored);
    s.reconcile().await;
    assert_eq!(cond(&s.status(), "Degraded").0, "False");
    let after = table_of(&s, "fleet-allocation");
    for (imei, port) in &before {
        assert_eq!(after.get(imei), Some(port), "{imei} moved");
    }
    assert!(after.contains_key(&imei(300)));
    assert!(
        s.fake.get(&format!("{CMS}/fleet-shard-1")).is_some(),
        "shard rebuilt"
    );

    // lost again, then a fresh allocation on request: the annotation is consumed
    s.fake.remove(&format!("{CMS}/fleet-allocation"));
    s.reconcile().await;
    s.edit(|p| {
        p.metadata
            .annotations
            .get_or_insert_default()
            .insert(REALLOCATE.into(), "true".into());
    });
    let (_, writes) = s.reconcile().await;
    assert!(s.fake.get(&format!("{CMS}/fleet-allocation")).is_some());
    assert!(
        paths(&writes, Method::PATCH).contains(&POOL.to_owned()),
        "annotation removed"
    );
    assert!(
        !s.pool()
            .metadata
            .annotations
            .unwrap_or_default()
            .contains_key(REALLOCATE)
    );
    assert_eq!(cond(&s.status(), "Degraded").0, "False");
    assert_eq!(
        table_of(&s, "fleet-allocation"),
        after,
        "the shards still named every port"
    );
}

/// A pool written by the version without a record (tables only in shard ConfigMaps) adopts
/// them into a record without moving anybody.
#[tokio::test]
async fn a_pool_from_the_previous_version_adopts_its_shard_tables() {
    let pool = PoolBuilder::dedicated(5000, 5099)
        .ports_per_shard(10)
        .with_devices(15)
        .build();
    let s = Scenario::new(&pool);
    // the old layout, with an allocation no fresh run would make (reversed ports)
    for (shard, range) in [(0u32, 0u64..8), (1, 8..15)] {
        let table: String = range
            .clone()
            .map(|k| {
                format!(
                    "{} {}\n",
                    imei(k),
                    5000 + 10 * u64::from(shard) + (9 - (k % 10))
                )
            })
            .collect();
        s.fake.insert(
            &format!("{CMS}/fleet-shard-{shard}"),
            json!({"apiVersion": "v1", "kind": "ConfigMap",
                   "metadata": {"name": format!("fleet-shard-{shard}"), "namespace": "trackers",
                                "labels": {"trackgate.dev/pool": "fleet"},
                                "annotations": {"trackgate.dev/applied-hash": "0123456789abcdef"},
                                "ownerReferences": [{"apiVersion": "trackgate.dev/v1alpha1", "kind": "TrackerPortPool",
                                    "name": "fleet", "uid": pool.metadata.uid.clone().unwrap(), "controller": true}]},
                   "data": {"allocation.txt": table, "shard.json": "{}"}}),
        );
    }
    let old: Previous = (0..2)
        .flat_map(|n| table_of(&s, &format!("fleet-shard-{n}")))
        .collect();
    let (_, writes) = s.reconcile().await;
    assert_eq!(
        table_of(&s, "fleet-allocation"),
        old,
        "adopted, nobody moved"
    );
    assert!(events(&writes) >= 1);
    assert_eq!(cond(&s.status(), "Degraded").0, "False");
}

/// `kubectl scale` or an edited Service is drift: put back within one reconcile.
#[tokio::test]
async fn a_scaled_deployment_and_an_edited_service_are_put_back() {
    let pool = PoolBuilder::dedicated(5000, 5099).with_devices(3).build();
    let s = Scenario::new(&pool);
    s.reconcile().await;
    let dep = "/apis/apps/v1/namespaces/trackers/deployments/fleet-shard-0";
    let svc = "/api/v1/namespaces/trackers/services/fleet-shard-0";
    s.fake.edit(dep, |d| d["spec"]["replicas"] = json!(5));
    s.fake.edit(svc, |d| {
        d["spec"]["externalTrafficPolicy"] = json!("Cluster");
        d["metadata"]["annotations"]["someone-else"] = json!("kept");
    });
    let (_, writes) = s.reconcile().await;
    assert_eq!(
        paths(&writes, Method::PATCH),
        vec![dep.to_owned(), svc.to_owned()]
    );
    assert_eq!(s.fake.get(dep).unwrap()["spec"]["replicas"], 2);
    let live = s.fake.get(svc).unwrap();
    assert_eq!(live["spec"]["externalTrafficPolicy"], "Local");
    assert_eq!(
        live["metadata"]["annotations"]["someone-else"], "kept",
        "apply merges"
    );
    let (_, writes) = s.reconcile().await;
    assert_eq!(writes, vec![]);
}

fn node_port_pool(pps: u16) -> TrackerPortPool {
    let mut pool = PoolBuilder::dedicated(30100, 30199)
        .ports_per_shard(pps)
        .with_devices(30)
        .build();
    pool.spec.exposure.type_ = trackgate_api::ExposureType::NodePort;
    pool
}

/// Issue 8, case 3: a node port held by another Service. The colliding shard is named in the
/// status with its holder and one Warning Event; every other shard is served.
#[tokio::test]
async fn a_node_port_collision_is_reported_and_the_rest_of_the_pool_is_served() {
    let s = Scenario::new(&node_port_pool(10));
    s.fake.insert(
        "/api/v1/namespaces/other/services/intruder",
        json!({"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": "intruder", "namespace": "other"},
               "spec": {"type": "LoadBalancer", "ports": [{"port": 80, "nodePort": 30112}]}}),
    );
    let (_, writes) = s.reconcile().await;
    let st = s.status();
    assert_eq!(
        cond(&st, "Degraded"),
        ("True".into(), "NodePortInUse".into())
    );
    let msg = &st
        .conditions
        .iter()
        .find(|c| c.type_ == "Degraded")
        .unwrap()
        .message;
    assert!(
        msg.contains("fleet-shard-1") && msg.contains("30112") && msg.contains("other/intruder"),
        "{msg}"
    );
    assert_eq!(events(&writes), 2, "AllocationChanged + one NodePortInUse");
    for shard in [0, 2] {
        assert!(
            s.fake
                .get(&format!(
                    "/api/v1/namespaces/trackers/services/fleet-shard-{shard}"
                ))
                .is_some()
        );
    }
    assert!(
        s.fake
            .get("/api/v1/namespaces/trackers/services/fleet-shard-1")
            .is_none()
    );
    let (_, writes) = s.reconcile().await;
    assert_eq!(events(&writes), 0, "not one per retry");

    s.fake.remove("/api/v1/namespaces/other/services/intruder");
    s.reconcile().await;
    assert_eq!(cond(&s.status(), "Degraded").0, "False");
}

/// A `portsPerShard` change moves ports between shard Services; the fake refuses a node port
/// held by another Service as the real one does, and the pool still converges in one reconcile.
#[tokio::test]
async fn a_ports_per_shard_change_on_a_node_port_pool_converges() {
    let s = Scenario::new(&node_port_pool(10));
    s.reconcile().await;
    let before = table_of(&s, "fleet-allocation");
    s.edit(|p| p.spec.sharding.ports_per_shard = 15);
    s.reconcile().await;
    assert_eq!(
        cond(&s.status(), "Degraded").0,
        "False",
        "{:?}",
        s.status().conditions
    );
    assert_eq!(table_of(&s, "fleet-allocation"), before, "no port changed");
    s.edit(|p| p.spec.sharding.ports_per_shard = 5);
    s.reconcile().await;
    assert_eq!(
        cond(&s.status(), "Degraded").0,
        "False",
        "{:?}",
        s.status().conditions
    );
    assert_eq!(table_of(&s, "fleet-allocation"), before);
}

/// Issue 8, case 4: a LoadBalancer pool that needs more node ports than the range has is
/// refused as a whole (status + Event), not half applied; `allocateLoadBalancerNodePorts:
/// false` serves it.
#[tokio::test]
async fn a_load_balancer_pool_past_the_node_port_range_is_refused_not_half_applied() {
    let pool = PoolBuilder::dedicated(10000, 10099)
        .ports_per_shard(10)
        .with_devices(40)
        .build();
    let s = Scenario::new(&pool);
    *s.fake.node_ports.lock().unwrap() = (30000, 30019);
    let (client, _server) = s.fake.client();
    let metrics = Metrics::register(&Registry::new()).unwrap();
    let ctx = Arc::new(
        Context::new(client, metrics, "trackgate:test".into(), None).with_node_ports(
            NodePortRange {
                start: 30000,
                end: 30019,
            },
        ),
    );
    reconcile(Arc::new(s.pool()), ctx.clone()).await.unwrap();
    let writes = s.fake.take_writes();
    assert!(
        !paths(&writes, Method::PATCH)
            .iter()
            .any(|p| p.contains("/services/")),
        "no Service applied"
    );
    let st = s.status();
    assert_eq!(
        cond(&st, "Degraded"),
        ("True".into(), "NodePortRangeFull".into())
    );
    assert!(events(&writes) >= 2);

    s.edit(|p| p.spec.exposure.allocate_load_balancer_node_ports = Some(false));
    reconcile(Arc::new(s.pool()), ctx).await.unwrap();
    assert_eq!(
        cond(&s.status(), "Degraded").0,
        "False",
        "{:?}",
        s.status().conditions
    );
    let svc = s
        .fake
        .get("/api/v1/namespaces/trackers/services/fleet-shard-3")
        .unwrap();
    assert_eq!(svc["spec"]["allocateLoadBalancerNodePorts"], false);
}

/// Forbidden writes (RBAC, an admission webhook) land in the status with the API message.
#[tokio::test]
async fn a_forbidden_write_is_in_the_status_and_retried_with_backoff() {
    let pool = PoolBuilder::dedicated(5000, 5099).with_devices(3).build();
    let s = Scenario::new(&pool);
    s.fake.refuse(
        "/deployments/",
        403,
        "deployments.apps \"fleet-shard-0\" is forbidden: User \"system:serviceaccount:x:y\" cannot patch resource",
    );
    let (action, _) = s.reconcile().await;
    assert_ne!(action, Action::requeue(RESYNC));
    let st = s.status();
    assert_eq!(cond(&st, "Degraded"), ("True".into(), "Forbidden".into()));
    let msg = &st
        .conditions
        .iter()
        .find(|c| c.type_ == "Degraded")
        .unwrap()
        .message;
    assert!(
        msg.contains("Deployment fleet-shard-0") && msg.contains("cannot patch"),
        "{msg}"
    );
    assert_eq!(cond(&st, "Ready").0, "False");
    s.fake.allow_all();
    s.reconcile().await;
    assert_eq!(cond(&s.status(), "Degraded").0, "False");
}

/// A shard ConfigMap over the 1 MiB limit is not sent; the status says which and what to lower.
#[tokio::test]
async fn a_shard_config_map_over_one_mib_is_refused_with_a_reason() {
    let mut pool = PoolBuilder::shared(7000, 7003).build();
    pool.spec.sharding.devices_per_shard = 100_000;
    pool.spec.devices_from.push(DeviceSource {
        config_map: "fleet-list".into(),
        key: "imeis".into(),
    });
    let s = Scenario::new(&pool);
    let list: String = (0..60_000).map(|k| format!("{}\n", imei(k))).collect();
    s.fake.insert(
        &format!("{CMS}/fleet-list"),
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "fleet-list", "namespace": "trackers"},
               "data": {"imeis": list}}),
    );
    s.reconcile().await;
    let st = s.status();
    assert_eq!(cond(&st, "Degraded"), ("True".into(), "TooLarge".into()));
    let msg = &st
        .conditions
        .iter()
        .find(|c| c.type_ == "Degraded")
        .unwrap()
        .message;
    assert!(
        msg.contains("fleet-shard-0") && msg.contains("devicesPerShard"),
        "{msg}"
    );
    assert!(s.fake.get(&format!("{CMS}/fleet-shard-0")).is_none());
    assert!(
        s.fake.get(&format!("{CMS}/fleet-allocation-1")).is_some(),
        "record in two parts"
    );
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

/// Figures for docs/benchmarks.md, not a check: a 10,000- and a 50,000-device dedicated
/// LoadBalancer pool through the pure planning and the fake API server (first reconcile, an
/// unchanged resync, one shard ConfigMap deleted). Run with
/// `cargo nextest run --release -p trackgate-operator --run-ignored only -E 'test(measure_)' --no-capture`.
#[tokio::test]
#[ignore = "a measurement; prints figures"]
async fn measure_large_dedicated_pools() {
    for n in [10_000u64, 50_000] {
        let mut pool = PoolBuilder::dedicated(10000, 10000 + n as u16 - 1)
            .ports_per_shard(50)
            .with_devices(n)
            .build();
        pool.spec.exposure.allocate_load_balancer_node_ports = Some(false);
        let s = Scenario::new(&pool);
        let t = std::time::Instant::now();
        let (allocation, desired) =
            plan(&s.pool(), &BTreeMap::new(), &Previous::new(), "img").unwrap();
        let plan_time = t.elapsed();
        let bytes: usize = desired
            .record
            .iter()
            .chain(&desired.config_maps)
            .map(|o| serde_json::to_vec(o).unwrap().len())
            .sum::<usize>()
            + desired
                .deployments
                .iter()
                .map(|o| serde_json::to_vec(o).unwrap().len())
                .sum::<usize>()
            + desired
                .services
                .iter()
                .map(|o| serde_json::to_vec(o).unwrap().len())
                .sum::<usize>()
            + desired
                .pdbs
                .iter()
                .map(|o| serde_json::to_vec(o).unwrap().len())
                .sum::<usize>();
        let record_bytes: Vec<usize> = desired
            .record
            .iter()
            .map(|o| serde_json::to_vec(o).unwrap().len())
            .collect();
        let t = std::time::Instant::now();
        let (_, writes) = s.reconcile().await;
        let first = t.elapsed();
        assert_eq!(cond(&s.status(), "Degraded").0, "False");
        let t = std::time::Instant::now();
        let (_, steady_writes) = s.reconcile().await;
        let steady = t.elapsed();
        s.fake.remove(&format!("{CMS}/fleet-shard-7"));
        let t = std::time::Instant::now();
        let (_, heal_writes) = s.reconcile().await;
        let heal = t.elapsed();
        println!(
            "{n} devices: {} shards, {} objects, {:.1} MB JSON, record parts {record_bytes:?} bytes; \
             plan {plan_time:?}; first reconcile {first:?} ({} writes); unchanged resync {steady:?} \
             ({} writes); one shard ConfigMap deleted {heal:?} ({} writes)",
            allocation.shards.len(),
            desired.len(),
            bytes as f64 / 1e6,
            writes.len(),
            steady_writes.len(),
            heal_writes.len(),
        );
    }
}
