//! The listener against a real Redis Cluster on loopback (3 primaries, and 3 primaries with a
//! replica each): every codec over TCP and UDP, a slot migration under load, and a primary
//! killed under load with the `replicas` durability. The simulator is the load and its
//! verifier reads every partition back from the cluster.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

use prometheus::Registry;
use trackgate_api::redis_layout::readings_key;
use trackgate_api::{AckMode, Durability, ShardConfig};
use trackgate_listener::{Listener, ListenerOptions, ShardSource};
use trackgate_protocol::{Codec, Imei};
use trackgate_simulator::{
    DeviceSettings, LoadConfig, Stats, StreamLayout, Transport, run, run_with_stats,
    targets_from_shard, verify,
};
use trackgate_telemetry::Health;
use trackgate_tests::{RedisCluster, assert_every_record_stored_once, free_ports};

const LOCAL: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

fn shared_config(pool: &str, devices: u64, durability: Durability) -> ShardConfig {
    let imeis = (0..devices).map(|i| (356_307_042_441_013u64 + i).to_string());
    let mut config = ShardConfig {
        udp: true,
        ..ShardConfig::shared(pool, 0, free_ports(2), imeis)
    };
    config.redis.durability = durability;
    config
}

async fn start_listener(url: &str, config: &ShardConfig) -> (Listener, Health) {
    let health = Health::new();
    let options = ListenerOptions {
        redis_url: url.to_owned(),
        bind_ip: LOCAL,
        publish_retry_for: Duration::from_secs(3),
        redis_timeout: Duration::from_secs(1),
        ..ListenerOptions::default()
    };
    let listener = Listener::start(
        options,
        vec![ShardSource::Config(config.clone())],
        &Registry::new(),
        health.clone(),
    )
    .await
    .expect("listener starts");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while let Err(why) = health.readiness() {
        assert!(
            std::time::Instant::now() < deadline,
            "listener not ready: {why}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (listener, health)
}

fn layout(url: &str, config: &ShardConfig) -> StreamLayout {
    StreamLayout {
        url: url.to_owned(),
        pool: config.pool.clone(),
        prefix: config.redis.stream_prefix.clone(),
        partitions: config.redis.partitions,
    }
}

/// Devices that fail fast and come back fast, so a redirect storm or a failover shows up as
/// resends within seconds.
fn load_config(config: &ShardConfig, duration: Duration) -> LoadConfig {
    let mut load = LoadConfig::new(targets_from_shard(config, LOCAL).expect("targets"));
    load.device = DeviceSettings {
        records_per_frame: 4,
        response_timeout: Duration::from_secs(2),
        keepalive_interval: Duration::from_secs(5),
        keep_acked: true,
        ..DeviceSettings::default()
    };
    load.rate = Some(300.0);
    load.duration = Some(duration);
    load.drain_timeout = Duration::from_secs(10);
    load.backoff_min = Duration::from_millis(50);
    load.backoff_max = Duration::from_millis(300);
    load
}

fn imeis(config: &ShardConfig) -> Vec<Imei> {
    targets_from_shard(config, LOCAL)
        .expect("targets")
        .iter()
        .map(|t| t.imei)
        .collect()
}

/// The partitions live on more than one primary: without a cluster client, the calls for
/// the other primaries' slots would all be refused with `MOVED`.
fn assert_spread(cluster: &RedisCluster, config: &ShardConfig) {
    let owners: std::collections::BTreeSet<usize> = (0..config.redis.partitions)
        .map(|n| {
            cluster
                .primary_of(&readings_key(&config.redis.stream_prefix, &config.pool, n))
                .expect("slot owner")
        })
        .collect();
    assert!(
        owners.len() > 1,
        "all partitions on one primary: {owners:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_codec_over_tcp_and_udp_lands_in_the_cluster_exactly_once() {
    let Some(cluster) = RedisCluster::start(3, 0) else {
        return;
    };
    let config = shared_config("sim", 8, Durability::default());
    assert_spread(&cluster, &config);
    let (listener, _health) = start_listener(&cluster.url(), &config).await;
    let layout = layout(&cluster.url(), &config);
    let targets = targets_from_shard(&config, LOCAL).expect("targets");
    let devices = imeis(&config);
    let mut total = 0;
    for transport in [Transport::Tcp, Transport::Udp] {
        for codec in [Codec::Codec8, Codec::Codec8Ext, Codec::Codec16] {
            let mut load = LoadConfig::new(targets.clone());
            load.transport = transport;
            load.device = DeviceSettings {
                codec,
                records_per_frame: 3,
                response_timeout: Duration::from_secs(2),
                keep_acked: true,
                ..DeviceSettings::default()
            };
            load.duration = None;
            load.records = Some(48);
            let outcome = run(load).await.expect("load runs");
            let label = format!("{} codec {}", transport.label(), codec.label());
            let v = verify(&layout, &outcome.acked, &devices)
                .await
                .expect("read the cluster");
            assert_every_record_stored_once(&label, 48, &outcome, &v);
            total += v.found;
        }
    }
    assert_eq!(total, 6 * 48);
    assert!(listener.shutdown().await, "clean shutdown");
}

/// A partition's slot moves to another primary while devices keep sending (IMPORTING /
/// MIGRATING, then MIGRATE of its keys two at a time, then SETSLOT NODE): calls are answered
/// with ASK/TRYAGAIN mid-migration and MOVED after it, and every acked record is in the
/// cluster exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slot_migration_under_load_loses_and_duplicates_nothing() {
    let Some(cluster) = RedisCluster::start(3, 0) else {
        return;
    };
    let cluster = Arc::new(cluster);
    let config = shared_config("reshard", 40, Durability::default());
    let (listener, _health) = start_listener(&cluster.url(), &config).await;
    let stats = Arc::new(Stats::new());
    let load = tokio::spawn(run_with_stats(
        load_config(&config, Duration::from_secs(6)),
        stats.clone(),
    ));

    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        stats.records_acked() > 0,
        "nothing acked before the migration"
    );
    let key = readings_key(&config.redis.stream_prefix, &config.pool, 0);
    let migration = {
        let cluster = Arc::clone(&cluster);
        tokio::task::spawn_blocking(move || {
            let slot = cluster.slot_of(&key)?;
            let from = cluster.primary_of(&key)?;
            let to = (from + 1) % 3;
            let moved = cluster.migrate_slot(slot, from, to, Duration::from_millis(100))?;
            anyhow::Ok((from, to, moved, cluster.primary_of(&key)?))
        })
    };
    let (from, to, moved, owner) = migration.await.expect("join").expect("migrate the slot");
    assert_eq!(owner, to, "the slot moved from {from} to {to}");
    assert!(
        moved > 1,
        "the slot held the stream and the devices' dedup sets"
    );
    let acked_at_move = stats.records_acked();

    let outcome = load.await.expect("load task").expect("load runs");
    assert!(
        outcome.report.counts.records_acked > acked_at_move,
        "records acked after the migration\n{}",
        outcome.report
    );
    let v = verify(
        &layout(&cluster.url(), &config),
        &outcome.acked,
        &imeis(&config),
    )
    .await
    .expect("read the cluster");
    eprintln!("{}\n{v}", outcome.report);
    assert!(v.is_ok(), "{v}\n{}", outcome.report);
    assert_eq!(v.found, v.acked, "{v}");
    assert!(listener.shutdown().await, "clean shutdown");
}

/// The primary of a partition is SIGKILLed under load with `durability: replicas 1`; its
/// replica takes over, the old primary comes back as a replica. Every record acked (before,
/// during and after) is in the cluster: a record is acked only once a replica has it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_killed_with_replica_durability_loses_nothing_acked() {
    let Some(mut cluster) = RedisCluster::start(3, 1) else {
        return;
    };
    let durability = Durability {
        ack: AckMode::Replicas,
        replicas: 1,
        timeout_ms: 500,
    };
    let config = shared_config("failover", 40, durability);
    let (listener, health) = start_listener(&cluster.url(), &config).await;
    let stats = Arc::new(Stats::new());
    let load = tokio::spawn(run_with_stats(
        load_config(&config, Duration::from_secs(8)),
        stats.clone(),
    ));

    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(stats.records_acked() > 0, "nothing acked before the kill");
    let key = readings_key(&config.redis.stream_prefix, &config.pool, 0);
    let victim = cluster.primary_of(&key).expect("primary");
    cluster.nodes[victim].server.kill();
    let recovery_stats = stats.clone();
    let (cluster, promoted_at) = tokio::task::spawn_blocking(move || {
        // The replica is promoted after cluster-node-timeout (1 s) plus an election.
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while cluster.primary_of(&key).is_err() || cluster.primary_of(&key).ok() == Some(victim) {
            assert!(std::time::Instant::now() < deadline, "no replica took over");
            std::thread::sleep(Duration::from_millis(100));
        }
        let promoted_at = recovery_stats.records_acked();
        // Back as a replica of the new primary (its nodes.conf says so): `replicas 1` can be
        // met again.
        cluster.nodes[victim].server.restart().expect("restart");
        cluster
            .wait_until_ok(Duration::from_secs(20))
            .expect("cluster ok again");
        (cluster, promoted_at)
    })
    .await
    .expect("join");

    let outcome = load.await.expect("load task").expect("load runs");
    assert!(
        outcome.report.counts.records_acked > promoted_at,
        "records acked after the failover\n{}",
        outcome.report
    );
    let v = verify(
        &layout(&cluster.url(), &config),
        &outcome.acked,
        &imeis(&config),
    )
    .await
    .expect("read the cluster");
    eprintln!("{}\n{v}", outcome.report);
    assert_eq!(v.missing, 0, "{v}\n{}", outcome.report);
    assert!(v.is_ok(), "{v}\n{}", outcome.report);
    // The durability check runs every 5 s: ready again once it sees a replica per primary.
    let deadline = std::time::Instant::now() + Duration::from_secs(12);
    while let Err(why) = health.readiness() {
        assert!(
            std::time::Instant::now() < deadline,
            "not ready again with a replica per primary: {why}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(listener.shutdown().await, "clean shutdown");
}
