//! Durability modes against real servers: Valkey 8 (`WAITAOF`) SIGKILLed under load with the
//! `fsync` mode, and servers that cannot keep a mode's promise (no `WAITAOF`, AOF off, no
//! replica): the listener says why in `/readyz` and acks nothing.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus::Registry;
use trackgate_api::{AckMode, Durability, ShardConfig};
use trackgate_listener::{Listener, ListenerOptions, ShardSource};
use trackgate_protocol::Imei;
use trackgate_simulator::{
    DeviceSettings, LoadConfig, Stats, StreamLayout, run, run_with_stats, targets_from_shard,
    verify,
};
use trackgate_telemetry::Health;
use trackgate_tests::{RedisServer, free_ports};

const LOCAL: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

fn config(devices: u64, ack: AckMode) -> ShardConfig {
    let imeis = (0..devices).map(|i| (356_307_042_441_013u64 + i).to_string());
    let mut config = ShardConfig::shared("durable", 0, free_ports(1), imeis);
    config.redis.durability = Durability {
        ack,
        replicas: 1,
        timeout_ms: 1000,
    };
    config
}

async fn start_listener(url: String, config: &ShardConfig) -> (Listener, Health) {
    let health = Health::new();
    let options = ListenerOptions {
        redis_url: url,
        bind_ip: LOCAL,
        publish_retry_for: Duration::from_secs(3),
        redis_timeout: Duration::from_secs(1),
        shutdown_grace: Duration::from_millis(500),
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
    (listener, health)
}

async fn readiness_within(health: &Health, within: Duration) -> Result<(), String> {
    let deadline = Instant::now() + within;
    loop {
        let state = health.readiness();
        if state.is_ok() || Instant::now() > deadline {
            return state;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn imeis(config: &ShardConfig) -> Vec<Imei> {
    targets_from_shard(config, LOCAL)
        .expect("targets")
        .iter()
        .map(|t| t.imei)
        .collect()
}

/// Valkey with `appendonly yes` + `appendfsync everysec`, SIGKILLed mid-load and restarted
/// from its AOF; the pool acks only what `WAITAOF 1 0` says is fsynced. Every record acked
/// in the whole run, before and after the crash, is in the restarted server exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fsync_durability_loses_nothing_acked_when_valkey_is_killed() {
    let Some(mut valkey) = RedisServer::start_valkey(&[
        "--appendonly",
        "yes",
        "--appendfsync",
        "everysec",
        "--save",
        "",
    ]) else {
        return;
    };
    let config = config(20, AckMode::Fsync);
    let (listener, health) = start_listener(valkey.url(), &config).await;
    readiness_within(&health, Duration::from_secs(10))
        .await
        .expect("ready: valkey 8 with AOF can keep the fsync promise");

    let mut load = LoadConfig::new(targets_from_shard(&config, LOCAL).expect("targets"));
    load.device = DeviceSettings {
        records_per_frame: 4,
        response_timeout: Duration::from_secs(3),
        keep_acked: true,
        ..DeviceSettings::default()
    };
    load.rate = Some(300.0);
    load.duration = Some(Duration::from_secs(5));
    load.drain_timeout = Duration::from_secs(10);
    load.backoff_min = Duration::from_millis(50);
    load.backoff_max = Duration::from_millis(300);
    let stats = Arc::new(Stats::new());
    let run = tokio::spawn(run_with_stats(load, stats.clone()));

    tokio::time::sleep(Duration::from_millis(2000)).await;
    let before = stats.records_acked();
    assert!(before > 0, "nothing acked before the kill");
    valkey.kill();
    tokio::time::sleep(Duration::from_millis(500)).await;
    valkey.restart().expect("valkey restarts from its AOF");

    let outcome = run.await.expect("load task").expect("load runs");
    assert!(
        outcome.report.counts.records_acked > before,
        "records acked after the restart\n{}",
        outcome.report
    );
    let layout = StreamLayout {
        url: valkey.url(),
        pool: config.pool.clone(),
        prefix: config.redis.stream_prefix.clone(),
        partitions: config.redis.partitions,
    };
    let v = verify(&layout, &outcome.acked, &imeis(&config))
        .await
        .expect("read valkey");
    eprintln!("{}\n{v}", outcome.report);
    assert_eq!(v.missing, 0, "{v}\n{}", outcome.report);
    assert!(v.is_ok(), "{v}\n{}", outcome.report);
    assert!(listener.shutdown().await, "clean shutdown");
}

/// A mode the server cannot honour: `/readyz` names the server and the missing piece, and
/// no frame is acked (the device keeps its records).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promise_the_server_cannot_keep_is_reported_and_nothing_is_acked() {
    let Some(redis70) = RedisServer::start() else {
        return;
    };
    let Some(valkey_no_aof) = RedisServer::start_valkey(&["--appendonly", "no", "--save", ""])
    else {
        return;
    };
    let cases = [
        (redis70.url(), AckMode::Fsync, "needs WAITAOF"),
        (valkey_no_aof.url(), AckMode::Fsync, "needs appendonly yes"),
        (
            redis70.url(),
            AckMode::Replicas,
            "needs 1 connected replica(s)",
        ),
    ];
    for (url, ack, why) in cases {
        let config = config(2, ack);
        let (listener, health) = start_listener(url, &config).await;
        let state = readiness_within(&health, Duration::from_secs(2)).await;
        let reason = state.expect_err("not ready");
        assert!(
            reason.contains("redis-durability") && reason.contains(why),
            "{ack:?}: {reason}"
        );

        let mut load = LoadConfig::new(targets_from_shard(&config, LOCAL).expect("targets"));
        load.device = DeviceSettings {
            records_per_frame: 2,
            response_timeout: Duration::from_millis(2500),
            keep_acked: true,
            ..DeviceSettings::default()
        };
        load.duration = Some(Duration::from_secs(1));
        load.drain_timeout = Duration::from_millis(300);
        let outcome = run(load).await.expect("load runs");
        assert_eq!(
            outcome.report.counts.records_acked, 0,
            "{ack:?}: acked on a promise the server cannot keep\n{}",
            outcome.report
        );
        // Sessions still hold frames that will never be acked: not a clean shutdown.
        let _ = listener.shutdown().await;
    }
}
