//! GT06 pools through the real `trackgate run` binary and a real `redis-server`, from the pool
//! YAML to the Redis entry: simulated GT06 devices' acked locations stored exactly once with
//! their exact fields (the simulator's verifier is the judge), a Teltonika pool and a GT06
//! pool served by one process, and `gt06.utcOffsetMinutes` shifting the stored `ts`.
//!
//! The binary is found by `trackgate_tests::trackgate_binary` (`make test` builds it first).

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use trackgate_api::ShardConfig;
use trackgate_api::redis_layout::{partition_of, readings_key};
use trackgate_protocol::Imei;
use trackgate_protocol::gt06::{self, UtcOffset};
use trackgate_simulator::{
    DeviceSettings, LoadConfig, LoadOutcome, Protocol, StreamLayout, Target, Verification, run,
    targets_from_shard, verify,
};
use trackgate_tests::gt06::{IMEI, LOCATION, LOGIN, heartbeat, hex};
use trackgate_tests::{
    PoolRun, RedisServer, assert_every_record_stored_once, free_port_range, stream_entries,
};

const LOCAL: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const PARTITIONS: u32 = 4;

// === Harness ===

/// A dedicated pool of `devices` IMEIs counting up from `first_imei`, on as many ports from
/// `first_port`; `gt06_offset` makes it a GT06 pool with that `utcOffsetMinutes`.
fn pool_yaml(
    name: &str,
    gt06_offset: Option<i16>,
    first_port: u16,
    first_imei: u64,
    devices: u16,
) -> String {
    let protocol = gt06_offset.map_or(String::new(), |minutes| {
        format!("  protocol: gt06\n  gt06: {{utcOffsetMinutes: {minutes}}}\n")
    });
    let imeis: String = (0..u64::from(devices))
        .map(|i| format!("    - imei: \"{}\"\n", first_imei + i))
        .collect();
    format!(
        "apiVersion: trackgate.dev/v1alpha1
kind: TrackerPortPool
metadata: {{name: {name}}}
spec:
{protocol}  mode: dedicated
  ports: {{start: {first_port}, end: {last}}}
  devices:
{imeis}  redis:
    urlSecretRef: {{name: redis, key: url}}
    partitions: {PARTITIONS}
",
        last = first_port + devices - 1,
    )
}

/// A pool's devices as `trackgate run` allocated them (from the shard configs it wrote), and
/// where its readings are.
fn planned(run: &PoolRun, pool: &str, redis: &RedisServer) -> (Vec<Target>, StreamLayout) {
    let shards: Vec<ShardConfig> = run
        .shard_configs(pool)
        .iter()
        .map(|json| ShardConfig::from_json(json).expect("shard config"))
        .collect();
    assert!(!shards.is_empty(), "no shard planned for {pool}");
    let targets = shards
        .iter()
        .flat_map(|s| targets_from_shard(s, LOCAL).expect("targets"))
        .collect();
    let layout = StreamLayout {
        url: redis.url(),
        pool: pool.to_owned(),
        prefix: shards[0].redis.stream_prefix.clone(),
        partitions: shards[0].redis.partitions,
    };
    (targets, layout)
}

/// `records` records over the devices, each sent as soon as the last is acked.
fn load(targets: Vec<Target>, protocol: Protocol, records: u64) -> LoadConfig {
    let mut load = LoadConfig::new(targets);
    load.device = DeviceSettings {
        protocol,
        records_per_frame: 2,
        frame_interval: None,
        response_timeout: Duration::from_secs(3),
        keep_acked: true,
        ..DeviceSettings::default()
    };
    load.duration = None;
    load.records = Some(records);
    load
}

/// Runs the load and has the verifier judge the pool's streams.
async fn run_and_verify(config: LoadConfig, layout: &StreamLayout) -> (LoadOutcome, Verification) {
    let imeis: Vec<Imei> = config.targets.iter().map(|t| t.imei).collect();
    let outcome = run(config).await.expect("load runs");
    let v = verify(layout, &outcome.acked, &imeis)
        .await
        .expect("read redis");
    (outcome, v)
}

fn assert_all_stored_once(label: &str, records: u64, outcome: &LoadOutcome, v: &Verification) {
    assert_every_record_stored_once(label, records, outcome, v);
    assert_eq!(v.stored_unacked, 0, "{label}: {v}");
}

fn gt06(minutes: i16) -> Protocol {
    Protocol::Gt06 {
        utc_offset: UtcOffset::from_minutes(minutes).expect("offset in range"),
    }
}

// === Tests ===

/// Simulated GT06 devices through `trackgate run` on a `protocol: gt06` pool: every location
/// the devices saw acked is in Redis exactly once with the fields they sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gt06_devices_through_trackgate_run_are_stored_exactly_once() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let first = free_port_range(4);
    let yaml = pool_yaml("fleet-gt06", Some(0), first, 864_717_003_283_581, 4);
    let ports: Vec<u16> = (first..first + 4).collect();
    let run = PoolRun::start(&[("fleet-gt06", &yaml)], &redis.url(), &ports);
    let (targets, layout) = planned(&run, "fleet-gt06", &redis);
    assert_eq!(targets.len(), 4);

    let (outcome, v) = run_and_verify(load(targets, gt06(0), 60), &layout).await;
    eprintln!("{}{v}", outcome.report);
    assert_all_stored_once("gt06", 60, &outcome, &v);
}

/// A Teltonika pool and a GT06 pool served by one `trackgate run` process, both fleets
/// driven at once: each pool's streams hold its own devices' records exactly once, labelled
/// with their protocol (the verifier's key covers `protocol`). The GT06 devices run on UTC+8
/// clocks, as the pool says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn teltonika_and_gt06_pools_in_one_trackgate_run() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let (tel_first, gt_first) = (free_port_range(3), free_port_range(3));
    let tel = pool_yaml("mixed-tel", None, tel_first, 356_307_042_441_013, 3);
    let gt = pool_yaml("mixed-gt06", Some(480), gt_first, 864_717_003_283_581, 3);
    let ports: Vec<u16> = (tel_first..tel_first + 3)
        .chain(gt_first..gt_first + 3)
        .collect();
    let run = PoolRun::start(
        &[("mixed-tel", &tel), ("mixed-gt06", &gt)],
        &redis.url(),
        &ports,
    );
    let (tel_targets, tel_layout) = planned(&run, "mixed-tel", &redis);
    let (gt_targets, gt_layout) = planned(&run, "mixed-gt06", &redis);

    let ((tel_outcome, tel_v), (gt_outcome, gt_v)) = tokio::join!(
        run_and_verify(load(tel_targets, Protocol::Teltonika, 60), &tel_layout),
        run_and_verify(load(gt_targets, gt06(480), 45), &gt_layout),
    );
    eprintln!("{}{tel_v}\n{}{gt_v}", tel_outcome.report, gt_outcome.report);
    assert_all_stored_once("teltonika", 60, &tel_outcome, &tel_v);
    assert_all_stored_once("gt06", 45, &gt_outcome, &gt_v);
}

/// [`LOCATION`]'s clock reading, 2015-08-27 18:29:55, taken as UTC: ms since the epoch.
const CLOCK_AS_UTC_MS: u64 = 1_440_700_195_000;

/// The same location, sent to three GT06 pools of one `trackgate run` whose devices' clocks are
/// UTC, UTC+8 and UTC-5: the stored `ts` is the clock reading minus the pool's offset, to the
/// millisecond.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn utc_offset_minutes_shifts_the_stored_ts() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let imei: u64 = IMEI.parse().unwrap();
    let pools = [
        ("clock-utc", 0i16, CLOCK_AS_UTC_MS),
        ("clock-cst", 480, CLOCK_AS_UTC_MS - 8 * 3_600_000),
        ("clock-est", -300, CLOCK_AS_UTC_MS + 5 * 3_600_000),
    ];
    let ports: Vec<u16> = pools.iter().map(|_| free_port_range(1)).collect();
    let yamls: Vec<String> = pools
        .iter()
        .zip(&ports)
        .map(|((name, minutes, _), port)| pool_yaml(name, Some(*minutes), *port, imei, 1))
        .collect();
    let files: Vec<(&str, &str)> = pools
        .iter()
        .zip(&yamls)
        .map(|((name, _, _), yaml)| (*name, yaml.as_str()))
        .collect();
    let _run = PoolRun::start(&files, &redis.url(), &ports);

    let partition = partition_of(&Imei::parse(IMEI).unwrap(), PARTITIONS);
    for ((pool, minutes, ts), port) in pools.iter().zip(&ports) {
        let mut device = TcpStream::connect((LOCAL, *port)).await.unwrap();
        device.write_all(&hex(LOGIN)).await.unwrap();
        let mut echo = [0u8; gt06::REPLY_LEN];
        tokio::time::timeout(Duration::from_secs(5), device.read_exact(&mut echo))
            .await
            .expect("login echo in time")
            .unwrap();
        assert_eq!(echo, gt06::reply(0x01, 9), "{pool}");
        // A heartbeat behind the location: its echo comes once the location is stored.
        device.write_all(&hex(LOCATION)).await.unwrap();
        device.write_all(&heartbeat(7)).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), device.read_exact(&mut echo))
            .await
            .expect("heartbeat echo in time")
            .unwrap();
        assert_eq!(echo, gt06::reply(0x13, 7), "{pool}");

        let entries =
            stream_entries(&redis.url(), &readings_key("trackgate", pool, partition)).await;
        assert_eq!(entries.len(), 1, "{pool}: {entries:?}");
        let entry = &entries[0];
        assert_eq!(entry["imei"], IMEI, "{pool}");
        assert_eq!(entry["protocol"], "gt06", "{pool}");
        assert_eq!(entry["ts"], ts.to_string(), "{pool} at {minutes} minutes");
        // Only the time moves: the position is the same in every pool.
        assert_eq!(
            (entry["lat"].as_str(), entry["lon"].as_str()),
            ("16.6347089", "80.9670756"),
            "{pool}"
        );
    }
}

/// `trackgate simulate --config <a GT06 shard> --verify`, the command the demo and the
/// benchmarks use, speaks GT06 because the shard says so: its devices' locations are acked
/// and the verifier finds each exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_simulate_command_speaks_gt06_from_the_shard_config() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let first = free_port_range(3);
    let yaml = pool_yaml("cli-gt06", Some(480), first, 864_717_003_284_000, 3);
    let ports: Vec<u16> = (first..first + 3).collect();
    let run = PoolRun::start(&[("cli-gt06", &yaml)], &redis.url(), &ports);
    let shard = &run.shard_files("cli-gt06")[0];
    let out = tokio::process::Command::new(trackgate_tests::trackgate_binary())
        .arg("simulate")
        .arg("--config")
        .arg(shard)
        .args(["--records", "30", "--drain", "5s", "--verify"])
        .env("TRACKGATE_REDIS_URL", redis.url())
        .output()
        .await
        .expect("run trackgate simulate");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "simulate failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("30 acked, 30 found, 0 missing, 0 duplicated"),
        "{stdout}"
    );
}
