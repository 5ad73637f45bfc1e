//! Node ports, refused writes and size limits: every failure lands in the status.

use super::recovery::table_of;
use super::*;

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

/// A first reconcile whose record write is refused reports no allocation, so the next one
/// does not take the pool for one whose record was lost.
#[tokio::test]
async fn a_refused_first_record_write_is_not_taken_for_a_lost_record() {
    let pool = PoolBuilder::dedicated(5000, 5099).with_devices(3).build();
    let s = Scenario::new(&pool);
    s.fake.refuse("/configmaps", 403, "configmaps is forbidden");
    s.reconcile().await;
    let st = s.status();
    assert_eq!(cond(&st, "Degraded"), ("True".into(), "Forbidden".into()));
    assert_eq!(st.allocated, 0);
    s.fake.allow_all();
    s.reconcile().await;
    let st = s.status();
    assert_eq!(cond(&st, "Degraded").0, "False", "{:?}", st.conditions);
    assert_eq!(st.allocated, 3);
}

/// A shard ConfigMap over the 1 MiB limit is not sent; the status says which and what to lower.
#[tokio::test]
async fn a_shard_config_map_over_one_mib_is_refused_with_a_reason() {
    let mut pool = PoolBuilder::dedicated(2000, 62000)
        .ports_per_shard(60_000)
        .build();
    pool.spec.devices_from.push(DeviceSource {
        config_map: "fleet-list".into(),
        key: "imeis".into(),
    });
    let s = Scenario::new(&pool);
    let list: String = (0..45_000).map(|k| format!("{}\n", imei(k))).collect();
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
        msg.contains("fleet-shard-0") && msg.contains("portsPerShard"),
        "{msg}"
    );
    assert!(s.fake.get(&format!("{CMS}/fleet-shard-0")).is_none());
    assert!(
        s.fake.get(&format!("{CMS}/fleet-allocation-1")).is_some(),
        "record in two parts"
    );
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
