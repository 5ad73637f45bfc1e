//! The simulator against the real listener (in-process) and a real `redis-server`: every codec
//! the simulator speaks, over TCP and UDP, lands in Redis field for field, as the verifier
//! checks. A regression here means the simulator (the benchmark and resilience load) no longer
//! exercises what real devices send.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use prometheus::Registry;
use trackgate_api::ShardConfig;
use trackgate_listener::{Listener, ListenerOptions, ShardSource};
use trackgate_protocol::Codec;
use trackgate_simulator::{
    DeviceSettings, LoadConfig, StreamLayout, Transport, run, targets_from_shard, verify,
};
use trackgate_telemetry::Health;
use trackgate_tests::{RedisServer, assert_every_record_stored_once, free_ports};

const LOCAL: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

#[tokio::test]
async fn every_codec_over_tcp_and_udp_is_stored_exactly_as_sent() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let devices = (0..4).map(|i| (356_307_042_441_013u64 + i).to_string());
    let config = ShardConfig {
        udp: true,
        ..ShardConfig::shared("sim", 0, free_ports(2), devices)
    };
    let options = ListenerOptions {
        redis_url: redis.url(),
        bind_ip: LOCAL,
        ..ListenerOptions::default()
    };
    let listener = Listener::start(
        options,
        vec![ShardSource::Config(config.clone())],
        &Registry::new(),
        Health::new(),
    )
    .await
    .expect("listener starts");
    let layout = StreamLayout {
        url: redis.url(),
        pool: config.pool.clone(),
        prefix: config.redis.stream_prefix.clone(),
        partitions: config.redis.partitions,
    };
    let targets = targets_from_shard(&config, LOCAL).expect("targets");
    let imeis: Vec<_> = targets.iter().map(|t| t.imei).collect();

    for (transport, codec) in [
        (Transport::Tcp, Codec::Codec8),
        (Transport::Tcp, Codec::Codec8Ext),
        (Transport::Tcp, Codec::Codec16),
        (Transport::Udp, Codec::Codec8Ext),
    ] {
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
        load.records = Some(60);
        let outcome = run(load).await.expect("load runs");
        let v = verify(&layout, &outcome.acked, &imeis)
            .await
            .expect("read redis");
        let label = format!("{} codec {}", transport.label(), codec.label());
        assert_every_record_stored_once(&label, 60, &outcome, &v);
    }
    assert!(listener.shutdown().await, "clean shutdown");
}
