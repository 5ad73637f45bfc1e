//! Benchmark input: the store commands a listener sends, as RESP, for `redis-cli --pipe`.
//!
//! `DEVICES` simulated devices (the simulator's own tracks, Codec 8E) each send frames of
//! `RPF` records in turn; every frame becomes the command a listener would send for it:
//!
//! - `current`: `EVALSHA <sha>` of today's store script, built by the listener's own code
//!   (`redis_layout::store_keys`, `store_args` and `store_call_args`), with up to `FPC` frames
//!   (default 16) of one partition in a call, as the publisher puts the frames of one pipeline;
//! - `v1`: `EVALSHA` of trackgate 0.1.0's script (`tests/fixtures/store_readings_v1.lua`) with
//!   the arguments 0.1.0 sent;
//! - `xadd`: the same entries as plain `XADD`s (no dedup): the cost of storing alone.
//!
//! The first `WARM` frames go to `<out>/warm.resp` (they fill the dedup windows), the rest to
//! `<out>/measure.resp`. `simulator/bench/store.sh` replays them and times Redis.
//!
//! ```sh
//! SHA=$(redis-cli -x SCRIPT LOAD < api/src/store_readings.lua)
//! cargo run --release -p trackgate-simulator --example store_calls -- current 50000 10000 /tmp/store $SHA
//! ```

use std::io::Write;

use trackgate_api::redis_layout::{self as layout, StoreArgs, StoreFrame};
use trackgate_protocol::{Codec, Imei};
use trackgate_simulator::{SplitMix64, Track};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

const PREFIX: &str = "trackgate";
const POOL: &str = "bench";
const START_MS: u64 = 1_763_700_000_000;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (variant, frames, warm, out, sha) = match args.as_slice() {
        [v, f, w, o] => (v, f, w, o, String::new()),
        [v, f, w, o, sha] => (v, f, w, o, sha.clone()),
        _ => {
            return Err(
                "usage: store_calls <current|v1|xadd> <frames> <warm frames> <out dir> [script sha]"
                    .into(),
            );
        }
    };
    let frames: u64 = frames.parse()?;
    let warm: u64 = warm.parse()?;
    let devices = env("DEVICES", 200);
    let rpf = env("RPF", 10);
    let partitions = u32::try_from(env("PARTITIONS", 4))?;
    let frames_per_call = usize::try_from(env("FPC", 16))?.max(1);
    // `current`: the frames waiting for their partition's call.
    let mut pending: Vec<Vec<StoreFrame>> = (0..partitions).map(|_| Vec::new()).collect();
    if variant != "xadd" && sha.is_empty() {
        return Err("current and v1 need the script's sha (SCRIPT LOAD prints it)".into());
    }
    if !["current", "v1", "xadd"].contains(&variant.as_str()) {
        return Err(format!("unknown variant {variant}").into());
    }
    std::fs::create_dir_all(out)?;
    let mut warm_file = std::io::BufWriter::new(std::fs::File::create(format!("{out}/warm.resp"))?);
    let mut measure_file =
        std::io::BufWriter::new(std::fs::File::create(format!("{out}/measure.resp"))?);
    let mut tracks: Vec<(Imei, Track)> = (0..devices)
        .map(|d| {
            let imei = Imei::parse(&format!("{}", 356_000_000_000_000 + d))?;
            // Seed 1: `trackgate simulate`'s default, so the records are those its devices send.
            Ok((imei, Track::new(1, d, START_MS)))
        })
        .collect::<Result<_>>()?;
    let mut pick = SplitMix64::new(11);
    for frame in 0..frames {
        let (imei, track) = &mut tracks[usize::try_from(pick.below(devices))?];
        let records: Vec<_> = (0..rpf)
            .map(|_| track.next_record(Codec::Codec8Ext))
            .collect();
        let recv_ms = START_MS + frame;
        let fixed = StoreArgs {
            max_len: 10_000_000,
            dedup_records: 128,
            dedup_ttl_ms: 604_800_000,
            imei: imei.as_str(),
            codec: Codec::Codec8Ext.label(),
            port: 17100,
            recv_ms,
            protocol: "teltonika",
        };
        let keys = layout::store_keys(PREFIX, POOL, imei, partitions);
        let mut cmds = Vec::new();
        match variant.as_str() {
            "current" => {
                let partition = usize::try_from(layout::partition_of(imei, partitions))?;
                pending[partition].push(StoreFrame {
                    args: layout::store_args(&fixed, &records),
                    keys: keys.into(),
                });
                // Every partition's call is closed at the end of the warm-up and of the run.
                let last = frame + 1 == warm || frame + 1 == frames;
                for waiting in &mut pending {
                    if waiting.len() == frames_per_call || (last && !waiting.is_empty()) {
                        let mut cmd = redis::cmd("EVALSHA");
                        cmd.arg(&sha);
                        let call: Vec<&StoreFrame> = waiting.iter().collect();
                        layout::store_call_args(&fixed.settings(), &call, |arg| {
                            cmd.arg(arg);
                        });
                        cmds.push(cmd);
                        waiting.clear();
                    }
                }
            }
            "v1" => {
                let mut cmd = redis::cmd("EVALSHA");
                cmd.arg(&sha).arg(2).arg(&keys[0]).arg(&keys[2]);
                cmd.arg(layout::store_args_v1(&fixed, &records));
                cmds.push(cmd);
            }
            _ => {
                for r in &records {
                    let mut cmd = redis::cmd("XADD");
                    cmd.arg(&keys[0])
                        .arg("MAXLEN")
                        .arg("~")
                        .arg(fixed.max_len)
                        .arg("*")
                        .arg("imei")
                        .arg(fixed.imei);
                    for (name, value) in layout::record_fields(r) {
                        cmd.arg(name).arg(value);
                    }
                    cmd.arg("codec")
                        .arg(fixed.codec)
                        .arg("protocol")
                        .arg(fixed.protocol)
                        .arg("port")
                        .arg(fixed.port)
                        .arg("recv")
                        .arg(recv_ms);
                    cmds.push(cmd);
                }
            }
        }
        let file = if frame < warm {
            &mut warm_file
        } else {
            &mut measure_file
        };
        for cmd in cmds {
            file.write_all(&cmd.get_packed_command())?;
        }
    }
    warm_file.flush()?;
    measure_file.flush()?;
    Ok(())
}
