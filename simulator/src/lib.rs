//! A device simulator (Teltonika, and GT06 at the device level) and load generator for
//! trackgate.
//!
//! What it is: simulated devices that speak the real protocol (through `trackgate-protocol`'s
//! encoders) to any listener: log in with their IMEI, send Codec 8 / 8E / 16 frames of
//! deterministic GPS tracks over TCP (or UDP), wait for each ack, resend the same unacked
//! records on a wrong or missing ack, reconnect with backoff, ping with `0xFF` when idle. A
//! run reports records/s and ack latency percentiles, and [`verify`] checks afterwards that
//! every acked record is in Redis exactly once.
//!
//! What it is not: a listener test double. It never decides what the server should do; it
//! does what a device does and counts what happened.
//!
//! ```text
//!  LoadConfig ──▶ run ──▶ N × Device ──TCP/UDP──▶ listener ──▶ Redis
//!                  │        (Track → AvlPacket → frame, pending until acked)
//!                  └──▶ LoadOutcome { LoadReport, AckedLog } ──▶ verify(StreamLayout) ──▶ Verification
//! ```

pub mod commands;
mod device;
mod load;
mod report;
mod stats;
mod track;
mod verify;

pub use device::{Device, DeviceSettings, Pending, Protocol, SessionError};
pub use load::{
    LoadConfig, LoadError, LoadOutcome, Target, Transport, run, run_with_stats, targets_from_range,
    targets_from_shard,
};
pub use report::{AckedLog, LoadReport};
pub use stats::{
    AckedRecord, Counts, FIELD_PROTOCOL, LatencySummary, Stats, TELTONIKA, gt06_entry_key,
    record_key, teltonika_entry_key,
};
pub use track::{LOG_PERIOD_MS, SplitMix64, Track};
pub use verify::{StreamLayout, Verification, VerifyError, verify};
