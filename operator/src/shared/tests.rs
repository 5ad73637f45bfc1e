//! Shared pools: the pure objects and status, then reconciles against the fake API server.

use std::sync::Arc;

use http::Method;
use k8s_openapi::api::apps::v1::DeploymentStatus;
use k8s_openapi::api::core::v1::{LoadBalancerIngress, LoadBalancerStatus, Service, ServiceStatus};
use k8s_openapi::jiff::Timestamp;
use kube::runtime::controller::Action;
use prometheus::Registry;
use serde_json::json;
use trackgate_api::{DeviceSource, Scaling};

use super::*;
use crate::controller::{Context, RESYNC, reconcile};
use crate::fixtures::{FakeApiServer, PoolBuilder, imei};
use crate::metrics::Metrics;

fn with_sources(mut pool: TrackerPortPool, names: &[&str]) -> TrackerPortPool {
    pool.spec.devices_from = names
        .iter()
        .map(|n| DeviceSource {
            config_map: (*n).to_owned(),
            key: "imeis".to_owned(),
        })
        .collect();
    pool
}

fn list(from: u64, n: u64) -> String {
    imei_list::render(
        (from..from + n)
            .map(imei)
            .collect::<Vec<_>>()
            .iter()
            .map(String::as_str),
    )
}

fn at(secs: i64) -> Time {
    Time(Timestamp::from_second(secs).unwrap())
}

#[test]
fn one_service_one_deployment_mounting_every_device_list() {
    let mut pool = with_sources(
        PoolBuilder::shared(5027, 5029).with_devices(3).build(),
        &["fleet-a", "fleet-b"],
    );
    pool.spec.udp = true;
    pool.spec.ports.exclude = vec![5028];
    let d = desired_objects(&pool, "trackgate:test", None).unwrap();
    assert_eq!(
        (
            d.config_maps.len(),
            d.deployments.len(),
            d.services.len(),
            d.pdbs.len()
        ),
        (1, 1, 1, 1)
    );
    let names = [
        d.config_maps[0].name_any(),
        d.deployments[0].name_any(),
        d.services[0].name_any(),
        d.pdbs[0].name_any(),
    ];
    assert!(names.iter().all(|n| n == "fleet-shard-0"), "{names:?}");

    let data = d.config_maps[0].data.as_ref().unwrap();
    let cfg = ShardConfig::from_json(&data[SHARD_CONFIG_FILE]).unwrap();
    assert_eq!(
        cfg.ports.iter().map(|b| b.port).collect::<Vec<_>>(),
        [5027, 5029]
    );
    assert!(
        cfg.devices.is_empty(),
        "the IMEIs are in files, not in shard.json"
    );
    assert_eq!(
        cfg.device_files,
        ["inline.imeis", "devices/0.imeis", "devices/1.imeis"]
    );
    assert_eq!(data[INLINE_DEVICES_FILE].lines().count(), 3);

    let svc = json!(d.services[0]);
    let ports: Vec<String> = svc["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| format!("{}/{}", p["port"], p["protocol"].as_str().unwrap()))
        .collect();
    assert_eq!(ports, ["5027/TCP", "5027/UDP", "5029/TCP", "5029/UDP"]);

    let dep = json!(d.deployments[0]);
    assert_eq!(
        dep["spec"]["replicas"], 2,
        "replicasPerShard is the default count"
    );
    let sources = &dep["spec"]["template"]["spec"]["volumes"][0]["projected"]["sources"];
    assert_eq!(sources[0]["configMap"]["name"], "fleet-shard-0");
    assert_eq!(sources[1]["configMap"]["name"], "fleet-a");
    assert_eq!(sources[2]["configMap"]["items"][0]["key"], "imeis");
    assert_eq!(
        sources[2]["configMap"]["items"][0]["path"],
        "devices/1.imeis"
    );
    let mount = &dep["spec"]["template"]["spec"]["containers"][0]["volumeMounts"][0];
    assert_eq!(mount["mountPath"], desired::CONFIG_DIR);
}

/// The pod spec must not grow with the fleet: 64 lists of 60,000 IMEIs (~4 million devices)
/// are 64 small volume sources, and the operator's ConfigMap with 5,000 inline devices stays
/// far below the 1 MiB object limit.
#[test]
fn objects_stay_small_at_the_largest_pool() {
    let names: Vec<String> = (0..trackgate_api::pool::MAX_DEVICE_SOURCES)
        .map(|i| format!("fleet-imeis-{i:02}"))
        .collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let pool = with_sources(
        PoolBuilder::shared(5027, 5029)
            .with_devices(trackgate_api::pool::MAX_INLINE_DEVICES as u64)
            .build(),
        &names,
    );
    let d = desired_objects(&pool, "trackgate:test", None).unwrap();
    let deployment = serde_json::to_string(&d.deployments[0]).unwrap();
    let config_map = serde_json::to_string(&d.config_maps[0]).unwrap();
    assert!(deployment.len() < 24 * 1024, "{} bytes", deployment.len());
    assert!(config_map.len() < 128 * 1024, "{} bytes", config_map.len());
}

#[test]
fn replicas_are_the_users_or_left_to_the_autoscaler() {
    let mut pool = PoolBuilder::shared(5027, 5027).with_devices(1).build();
    pool.spec.scaling = Some(Scaling {
        replicas: Some(4),
        autoscaled: false,
    });
    let d = desired_objects(&pool, "img", Some(9)).unwrap();
    assert_eq!(d.deployments[0].spec.as_ref().unwrap().replicas, Some(4));

    pool.spec.scaling = Some(Scaling {
        replicas: Some(4),
        autoscaled: true,
    });
    let new = desired_objects(&pool, "img", None).unwrap();
    assert_eq!(
        new.deployments[0].spec.as_ref().unwrap().replicas,
        Some(4),
        "a new Deployment starts at the user's count"
    );
    let scaled = desired_objects(&pool, "img", Some(9)).unwrap();
    assert_eq!(
        scaled.deployments[0].spec.as_ref().unwrap().replicas,
        Some(9),
        "the HPA's count is kept, never scaled back"
    );
    let mut live = new.deployments[0].clone();
    live.spec.as_mut().unwrap().replicas = Some(9); // the HPA scaled it
    assert!(
        crate::controller::apply::is_applied(&scaled.deployments[0], &live),
        "the HPA scaling must not make the operator rewrite the Deployment"
    );
}

#[test]
fn admitted_counts_distinct_devices_and_names_a_bad_line() {
    let pool = with_sources(
        PoolBuilder::shared(5027, 5027).with_devices(10).build(),
        &["a", "b"],
    );
    let a = list(5, 100); // overlaps the 10 inline devices by 5
    let b = list(200, 50);
    let set = admitted(&pool.spec, |cm, _| Some(if cm == "a" { &a } else { &b })).unwrap();
    assert_eq!(set.len(), 105 + 50);

    let bad = format!("{a}12345\n");
    let err = admitted(&pool.spec, |cm, _| Some(if cm == "a" { &bad } else { &b })).unwrap_err();
    assert!(
        err.to_string().contains("ConfigMap a key imeis: line 101"),
        "{err}"
    );
    let err = admitted(&pool.spec, |cm, _| (cm == "a").then_some(a.as_str())).unwrap_err();
    assert!(
        matches!(err, SpecError::MissingDeviceSource { .. }),
        "{err}"
    );
}

#[test]
fn status_counts_devices_replicas_and_the_endpoint() {
    let mut pool = PoolBuilder::shared(5027, 5029).with_devices(7).build();
    pool.spec.sharding.devices_per_shard = 20_000;
    let mut dep = Deployment::default();
    dep.metadata.name = Some("fleet-shard-0".into());
    dep.spec = Some(Default::default());
    dep.spec.as_mut().unwrap().replicas = Some(2);
    dep.status = Some(DeploymentStatus {
        ready_replicas: Some(2),
        updated_replicas: Some(2),
        ..Default::default()
    });
    let mut svc = Service::default();
    svc.metadata.name = Some("fleet-shard-0".into());
    svc.status = Some(ServiceStatus {
        load_balancer: Some(LoadBalancerStatus {
            ingress: Some(vec![LoadBalancerIngress {
                hostname: Some("nlb.example.com".into()),
                ..Default::default()
            }]),
        }),
        ..Default::default()
    });
    let (deps, svcs) = (vec![dep], vec![svc]);
    let observed = Observed {
        deployments: &deps,
        services: &svcs,
    };
    let s = status_for(&pool, Ok(7), &[], observed, &at(100));
    assert_eq!((s.devices, s.allocated, s.unallocated), (7, 7, 0));
    assert_eq!(s.replicas_ready.as_deref(), Some("2/2"));
    assert_eq!(s.endpoint.as_deref(), Some("nlb.example.com:5027-5029"));
    assert_eq!(s.shards_ready, "1/1");
    let ready = s.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
    assert_eq!(ready.status, "True");
    let degraded = s.conditions.iter().find(|c| c.type_ == "Degraded").unwrap();
    assert!(
        degraded.message.contains("devicesPerShard is deprecated"),
        "{}",
        degraded.message
    );

    // the same observation again: an equal status, so the controller writes nothing
    pool.status = Some(s.clone());
    assert_eq!(status_for(&pool, Ok(7), &[], observed, &at(200)), s);

    let err = SpecError::MissingDeviceSource {
        config_map: "a".into(),
        key: "imeis".into(),
    };
    let s = status_for(&pool, Err(&err), &[], Observed::default(), &at(300));
    let degraded = s.conditions.iter().find(|c| c.type_ == "Degraded").unwrap();
    assert_eq!(
        (degraded.status.as_str(), degraded.reason.as_str()),
        ("True", reasons::DEVICE_SOURCE_UNAVAILABLE)
    );
}

#[test]
fn plan_local_writes_the_files_the_pod_would_mount() {
    let pool = with_sources(
        PoolBuilder::shared(7000, 7001).with_devices(2).build(),
        &["fleet"],
    );
    let text = list(100, 3);
    let plan = plan_local("laptop", &pool.spec, |_, _| Some(text.as_str())).unwrap();
    assert_eq!(plan.admitted, 5);
    let paths: Vec<&str> = plan.files.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(paths, plan.config.device_files);
    assert_eq!(plan.files[1].1, text);
}

// === against the fake API server ===

const NS: &str = "/namespaces/trackers";
const POOL_PATH: &str = "/apis/trackgate.dev/v1alpha1/namespaces/trackers/trackerportpools/fleet";

fn child_paths(name: &str) -> [String; 4] {
    [
        format!("/api/v1{NS}/configmaps/{name}"),
        format!("/apis/apps/v1{NS}/deployments/{name}"),
        format!("/api/v1{NS}/services/{name}"),
        format!("/apis/policy/v1{NS}/poddisruptionbudgets/{name}"),
    ]
}

fn context(fake: &FakeApiServer) -> (Arc<Context>, tokio::task::JoinHandle<()>) {
    let (client, server) = fake.client();
    let metrics = Metrics::register(&Registry::new()).unwrap();
    let ctx = Context::new(client, metrics, "trackgate:test".into(), None);
    (Arc::new(ctx), server)
}

fn stored_pool(fake: &FakeApiServer) -> TrackerPortPool {
    serde_json::from_value(fake.get(POOL_PATH).unwrap()).unwrap()
}

/// Migration from v1alpha1 sharded shared pools: the old shards' objects exist (shard 0 and
/// shard 1, each with its allocation table). One reconcile updates shard 0 in place into the
/// pool's one set of objects (same names, so the Service keeps its load balancer) and prunes
/// shard 1; a second reconcile writes nothing.
#[tokio::test]
async fn a_sharded_v1alpha1_shared_pool_becomes_one_deployment_and_service() {
    let mut pool = with_sources(
        PoolBuilder::shared(5027, 5032)
            .ports_per_shard(3)
            .with_devices(4)
            .build(),
        &["fleet-imeis"],
    );
    pool.spec.sharding.devices_per_shard = 2;
    let fake = FakeApiServer::default();
    fake.insert(POOL_PATH, json!(pool));
    fake.insert(
        &format!("/api/v1{NS}/configmaps/fleet-imeis"),
        json!({"apiVersion": "v1", "kind": "ConfigMap",
               "metadata": {"name": "fleet-imeis", "namespace": "trackers"},
               "data": {"imeis": list(1_000, 20_000)}}),
    );
    // what the v1alpha1 operator left: two shards of the sharded layout
    let mut inline_only = pool.clone();
    inline_only.spec.devices_from.clear();
    let old = crate::fixtures::allocate_for(&inline_only, &Default::default());
    let configs = desired::shard_configs(&pool.name_any(), &pool.spec, &old);
    let old_objects = desired::desired_objects(&pool, &old, configs, "trackgate:test").unwrap();
    assert_eq!(old_objects.deployments.len(), 2);
    for (i, obj) in old_objects
        .config_maps
        .iter()
        .map(|o| json!(o))
        .chain(old_objects.deployments.iter().map(|o| json!(o)))
        .chain(old_objects.services.iter().map(|o| json!(o)))
        .chain(old_objects.pdbs.iter().map(|o| json!(o)))
        .enumerate()
    {
        let name = obj["metadata"]["name"].as_str().unwrap().to_owned();
        let path = &child_paths(&name)[i / 2];
        fake.insert(path, obj);
    }
    let (ctx, _server) = context(&fake);

    let action = reconcile(Arc::new(stored_pool(&fake)), ctx.clone())
        .await
        .unwrap();
    assert_eq!(action, Action::requeue(RESYNC));
    let writes = fake.take_writes();
    let [cm_path, dep_path, svc_path, pdb_path] = child_paths("fleet-shard-0");
    for path in [&cm_path, &dep_path, &svc_path] {
        assert!(
            writes.contains(&(Method::PATCH, path.clone())),
            "{path}: {writes:?}"
        );
    }
    assert!(
        fake.get(&pdb_path).is_some(),
        "shard 0's PDB is already what is wanted"
    );
    for path in child_paths("fleet-shard-1") {
        assert!(
            writes.contains(&(Method::DELETE, path.clone())),
            "{path}: {writes:?}"
        );
        assert!(fake.get(&path).is_none());
    }
    let cm = fake.get(&cm_path).unwrap();
    // NB: the old allocation.txt key may stay (not this manager's apply); nothing mounts it
    assert!(
        cm["data"]["shard.json"]
            .as_str()
            .is_some_and(|c| c.contains("deviceFiles")),
        "shard 0's config is the shared one: {cm}"
    );
    let status = stored_pool(&fake).status.unwrap();
    assert_eq!(status.devices, 20_004);
    assert_eq!(status.shards.len(), 1);
    assert_eq!(status.shards[0].ports, "5027-5032");
    assert_eq!(status.replicas_ready.as_deref(), Some("0/2"));

    reconcile(Arc::new(stored_pool(&fake)), ctx.clone())
        .await
        .unwrap();
    assert_eq!(
        fake.take_writes(),
        vec![],
        "an unchanged pool must not write"
    );
}
