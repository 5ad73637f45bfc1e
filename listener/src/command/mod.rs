//! Commands to devices, the listener's side: which sessions this process holds, one driver
//! task per device with work, and the pool tasks (router, wake-ups, sweeper).
//!
//! ```text
//!  Redis ─(cmdready <imei>)─► wake-up task ─► kick ─► driver(imei): TAKE ─► Outgoing ─► session
//!                                                        ▲          writes the frame ─┘
//!  session: Codec 12/14 answer ─► Reply ─────────────────┘ RESOLVE (answer | refused | timeout)
//! ```
//!
//! The session only forwards: it writes the frames a driver hands it and passes the device's
//! answers back, never awaiting Redis, so data acks are never held by a command. A driver runs
//! only while its device has work (idle devices cost one map entry). Redis holds the truth — the
//! device's lease says which command is outstanding — so a driver that dies with its listener
//! loses nothing: the lease runs out and whoever holds the device next carries on.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info_span, warn};
use trackgate_api::redis_layout::{CommandReason, CommandStatus};
use trackgate_protocol::{Codec, Command, Imei, encode_command};

use crate::metrics::Metrics;

mod driver;
mod entry;
mod pool;
mod scripts;
mod store;

pub(crate) use store::PoolKeys;

use driver::Driver;
use entry::QueuedCommand;
use store::{CommandStore, Outcome};

/// How long a taken command may wait to be written before its lease lapses (its session is
/// stuck or its listener died): then the next TAKE, anywhere, puts it back in the queue.
const WRITE_LEASE: Duration = Duration::from_secs(10);
/// Pause after a Redis error before the driver or a pool task tries again.
const RETRY_AFTER: Duration = Duration::from_millis(500);
/// How often each listener sweeps its pools (expiry, abandoned leases, the depth gauge).
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// Messages a driver holds: kicks are idempotent and dropped when full; more replies than
/// this while one Redis call runs are not answers to one command anyway.
const DRIVER_INBOX: usize = 8;

/// What a device sent back that concerns its outstanding command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Reply {
    Answer(Vec<u8>),
    Refused,
    /// A frame that cannot be the answer (a Codec 14 answer for another IMEI, a Codec 12
    /// frame that is not a response), or a frame that did not decode.
    Malformed,
}

impl Reply {
    fn outcome(self) -> Outcome {
        match self {
            Reply::Answer(bytes) => Outcome::Answered(bytes),
            Reply::Refused => Outcome::Failed(CommandReason::Refused),
            Reply::Malformed => Outcome::Failed(CommandReason::Malformed),
        }
    }
}

/// Which command frames answer a command: Codec 12 type 0x06; Codec 14 type 0x06 for this
/// device, 0x11 its refusal. Codec 13 and 15 are device-initiated messages, not answers.
pub(crate) fn classify(frame: &Command, device: &Imei) -> Option<Reply> {
    match (frame.codec, frame.kind) {
        (Codec::Codec12, 0x06) => Some(Reply::Answer(frame.payload.to_vec())),
        (Codec::Codec14, 0x06) if frame.imei.as_ref() == Some(device) => {
            Some(Reply::Answer(frame.payload.to_vec()))
        }
        (Codec::Codec14, 0x11) => Some(Reply::Refused),
        (Codec::Codec12 | Codec::Codec14, _) => Some(Reply::Malformed),
        _ => None,
    }
}

/// The frame for a queued command: Codec 12, or Codec 14 carrying the device's IMEI.
fn command_frame(command: &QueuedCommand, imei: &Imei) -> Option<Bytes> {
    let payload = Bytes::from(command.payload()?);
    let frame = match command.codec {
        14 => Command {
            codec: Codec::Codec14,
            imei: Some(*imei),
            ..Command::codec12(payload)
        },
        12 => Command::codec12(payload),
        _ => return None,
    };
    let mut buf = BytesMut::new();
    encode_command(&frame, &mut buf).ok()?;
    Some(buf.freeze())
}

/// A frame for the session to write; `written` says whether it went out.
pub(crate) struct Outgoing {
    pub(crate) frame: Bytes,
    pub(crate) written: oneshot::Sender<bool>,
}

enum DriverMsg {
    Kick,
    Reply(Reply),
}

type DeviceKey = (Arc<str>, String);

struct Slot {
    /// The session holding the device here, if any: its id and its frame channel.
    session: Option<(u64, mpsc::Sender<Outgoing>)>,
    /// The device's running driver, if any.
    driver: Option<mpsc::Sender<DriverMsg>>,
}

/// Settings of the command side.
#[derive(Clone, Debug)]
pub(crate) struct CommandOptions {
    pub(crate) redis_timeout: Duration,
    /// Identifies this listener process in device leases (pod name and start time).
    pub(crate) owner: String,
    /// How long a device has to answer a command.
    pub(crate) response_timeout: Duration,
}

/// The process's command side; cheap to clone.
#[derive(Clone)]
pub(crate) struct Commands {
    inner: Arc<Inner>,
}

struct Inner {
    client: redis::Client,
    store: CommandStore,
    options: CommandOptions,
    metrics: Metrics,
    devices: Mutex<HashMap<DeviceKey, Slot>>,
    pools: Mutex<HashMap<String, Arc<PoolKeys>>>,
    next_session: AtomicU64,
    stop: CancellationToken,
}

impl Commands {
    pub(crate) fn start(
        client: redis::Client,
        options: CommandOptions,
        metrics: Metrics,
        stop: CancellationToken,
    ) -> redis::RedisResult<Self> {
        let store = CommandStore::new(client.clone(), options.redis_timeout)?;
        Ok(Self {
            inner: Arc::new(Inner {
                client,
                store,
                options,
                metrics,
                devices: Mutex::new(HashMap::new()),
                pools: Mutex::new(HashMap::new()),
                next_session: AtomicU64::new(1),
                stop,
            }),
        })
    }

    /// Serves a shard's pool (router, wake-ups, sweeper: once per pool and process) and records
    /// the shard's devices as pool members, retrying until Redis takes them. The router starts
    /// only after this process's members are registered, so it never fails a command for one
    /// of them as unknown.
    pub(crate) fn serve_shard(
        &self,
        keys: &Arc<PoolKeys>,
        shard: u32,
        added: Vec<String>,
        removed: Vec<String>,
    ) {
        let first = lock(&self.inner.pools)
            .insert(keys.pool.clone(), Arc::clone(keys))
            .is_none();
        let this = self.clone();
        let keys = Arc::clone(keys);
        tokio::spawn(async move {
            let store = &this.inner.store;
            while let Err(err) = store.register_members(&keys, shard, &added, &removed).await {
                warn!(pool = %keys.pool, %err, "registering pool members for commands; retrying");
                if this.pause(RETRY_AFTER).await {
                    return;
                }
            }
            if first {
                tokio::spawn(this.clone().route(Arc::clone(&keys)));
                tokio::spawn(this.clone().wake_ups(Arc::clone(&keys)));
                tokio::spawn(this.sweep(keys));
            }
        });
    }

    /// Registers a logged-in session; the device's queued commands start flowing to it.
    pub(crate) fn attach(&self, keys: &Arc<PoolKeys>, imei: Imei) -> CommandLink {
        let session = self.inner.next_session.fetch_add(1, Ordering::Relaxed);
        // NB: one frame at a time is all a device takes.
        let (tx, rx) = mpsc::channel(1);
        let key: DeviceKey = (keys.pool.as_str().into(), imei.as_str().to_owned());
        lock(&self.inner.devices)
            .entry(key)
            .or_insert(Slot {
                session: None,
                driver: None,
            })
            .session = Some((session, tx));
        self.kick(keys, imei.as_str());
        CommandLink {
            commands: self.clone(),
            keys: Arc::clone(keys),
            imei,
            session,
            rx,
        }
    }

    /// Wakes the device's driver, starting one if there is none and a session is here.
    fn kick(&self, keys: &Arc<PoolKeys>, imei: &str) {
        let key: DeviceKey = (keys.pool.as_str().into(), imei.to_owned());
        let mut devices = lock(&self.inner.devices);
        let Some(slot) = devices.get_mut(&key) else {
            return;
        };
        if let Some(driver) = &slot.driver {
            let _ = driver.try_send(DriverMsg::Kick);
            return;
        }
        if slot.session.is_none() {
            return;
        }
        let Ok(imei) = Imei::parse(imei) else {
            return;
        };
        let (tx, rx) = mpsc::channel(DRIVER_INBOX);
        slot.driver = Some(tx);
        let span =
            info_span!(parent: None, "command_driver", pool = %keys.pool, imei = imei.as_str());
        tokio::spawn(
            Driver {
                commands: self.clone(),
                keys: Arc::clone(keys),
                imei,
                inbox: rx,
            }
            .run()
            .instrument(span),
        );
    }

    fn kick_all(&self, keys: &Arc<PoolKeys>) {
        let imeis: Vec<String> = lock(&self.inner.devices)
            .keys()
            .filter(|(pool, _)| **pool == *keys.pool)
            .map(|(_, imei)| imei.clone())
            .collect();
        for imei in imeis {
            self.kick(keys, &imei);
        }
    }

    /// A device's answer: to its driver here, or, when none runs here (the command went out
    /// on an earlier connection, perhaps through another listener), straight to Redis.
    fn reply(&self, keys: &Arc<PoolKeys>, imei: &Imei, reply: Reply) {
        let key: DeviceKey = (keys.pool.as_str().into(), imei.as_str().to_owned());
        let driver = lock(&self.inner.devices)
            .get(&key)
            .and_then(|slot| slot.driver.clone());
        if let Some(driver) = driver
            && driver.try_send(DriverMsg::Reply(reply.clone())).is_ok()
        {
            return;
        }
        let this = self.clone();
        let keys = Arc::clone(keys);
        let imei = *imei;
        tokio::spawn(async move {
            match this.inner.store.outstanding(&keys, imei.as_str()).await {
                Ok(Some(id)) => {
                    this.resolve(&keys, imei.as_str(), &id, reply.outcome(), None)
                        .await
                }
                Ok(None) => debug!(imei = imei.as_str(), "answer with no command outstanding"),
                Err(err) => warn!(imei = imei.as_str(), %err, "answer not recorded: redis"),
            }
        });
    }

    fn detach(&self, pool: &str, imei: &str, session: u64) {
        let key: DeviceKey = (pool.into(), imei.to_owned());
        let mut devices = lock(&self.inner.devices);
        if let Some(slot) = devices.get_mut(&key) {
            if slot.session.as_ref().is_some_and(|(id, _)| *id == session) {
                slot.session = None;
            }
            if slot.session.is_none() && slot.driver.is_none() {
                devices.remove(&key);
            }
        }
    }

    /// The device's session channel here, if it has one.
    fn session(&self, pool: &str, imei: &str) -> Option<mpsc::Sender<Outgoing>> {
        let key: DeviceKey = (pool.into(), imei.to_owned());
        lock(&self.inner.devices)
            .get(&key)
            .and_then(|slot| slot.session.as_ref().map(|(_, tx)| tx.clone()))
    }

    /// Ends a driver unless a message arrived meanwhile (then it carries on): checked under
    /// the map's lock, which every kick takes, so no kick falls between the two.
    fn finish_driver(
        &self,
        pool: &str,
        imei: &str,
        inbox: &mut mpsc::Receiver<DriverMsg>,
    ) -> Option<DriverMsg> {
        let key: DeviceKey = (pool.into(), imei.to_owned());
        let mut devices = lock(&self.inner.devices);
        if let Ok(msg) = inbox.try_recv() {
            return Some(msg);
        }
        if let Some(slot) = devices.get_mut(&key) {
            slot.driver = None;
            if slot.session.is_none() {
                devices.remove(&key);
            }
        }
        None
    }

    async fn resolve(
        &self,
        keys: &PoolKeys,
        imei: &str,
        id: &str,
        outcome: Outcome,
        sent_at: Option<Instant>,
    ) {
        match self.inner.store.resolve(keys, imei, id, &outcome).await {
            Ok(true) => {
                self.count(&keys.pool, outcome.status(), outcome.reason());
                if let (Some(at), Outcome::Answered(_) | Outcome::Failed(CommandReason::Refused)) =
                    (sent_at, &outcome)
                {
                    self.inner
                        .metrics
                        .command_response
                        .with_label_values(&[keys.pool.as_str()])
                        .observe(at.elapsed().as_secs_f64());
                }
                debug!(id, status = outcome.status().as_str(), "command resolved");
            }
            Ok(false) => debug!(id, "command resolved elsewhere already"),
            // Left to its lease: the sweeper or the next TAKE resolves it as timed out.
            Err(err) => warn!(id, %err, "command outcome not recorded: redis"),
        }
    }

    fn count(&self, pool: &str, status: CommandStatus, reason: Option<CommandReason>) {
        let metrics = &self.inner.metrics;
        metrics
            .commands
            .with_label_values(&[pool, status.as_str()])
            .inc();
        if let (CommandStatus::Failed, Some(reason)) = (status, reason) {
            metrics
                .command_failures
                .with_label_values(&[pool, reason.as_str()])
                .inc();
        }
    }

    /// Sleeps; `true` when the listener is stopping instead.
    async fn pause(&self, d: Duration) -> bool {
        tokio::select! {
            () = self.inner.stop.cancelled() => true,
            () = tokio::time::sleep(d) => false,
        }
    }
}

// === Session side ===

/// A logged-in session's end of the command path; dropping it detaches the session.
pub(crate) struct CommandLink {
    commands: Commands,
    keys: Arc<PoolKeys>,
    imei: Imei,
    session: u64,
    rx: mpsc::Receiver<Outgoing>,
}

impl CommandLink {
    /// The next command frame to write (pending forever when there is none).
    pub(crate) async fn next(&mut self) -> Outgoing {
        match self.rx.recv().await {
            Some(out) => out,
            None => std::future::pending().await,
        }
    }

    /// A Codec 12/13/14/15 frame from the device.
    pub(crate) fn on_frame(&self, frame: &Command) {
        if let Some(reply) = classify(frame, &self.imei) {
            self.commands.reply(&self.keys, &self.imei, reply);
        }
    }

    /// The device sent a frame that did not decode: if a command is outstanding, that was its
    /// answer as far as anyone can tell.
    pub(crate) fn on_malformed(&self) {
        self.commands
            .reply(&self.keys, &self.imei, Reply::Malformed);
    }
}

impl Drop for CommandLink {
    fn drop(&mut self) {
        self.commands
            .detach(&self.keys.pool, self.imei.as_str(), self.session);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Held for map updates only; a poisoned map is still consistent.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn imei() -> Imei {
        Imei::parse("352093081452251").unwrap()
    }

    fn frame(codec: Codec, kind: u8, imei: Option<Imei>) -> Command {
        Command {
            codec,
            kind,
            imei,
            timestamp: None,
            payload: Bytes::from_static(b"Ver:03.18.14"),
        }
    }

    #[test]
    fn answers_are_matched_by_codec_type_and_imei() {
        let me = imei();
        let other = Imei::parse("356307042441013").unwrap();
        let answer = Some(Reply::Answer(b"Ver:03.18.14".to_vec()));
        assert_eq!(classify(&frame(Codec::Codec12, 0x06, None), &me), answer);
        assert_eq!(
            classify(&frame(Codec::Codec14, 0x06, Some(me)), &me),
            answer
        );
        assert_eq!(
            classify(&frame(Codec::Codec14, 0x11, Some(me)), &me),
            Some(Reply::Refused)
        );
        assert_eq!(
            classify(&frame(Codec::Codec14, 0x06, Some(other)), &me),
            Some(Reply::Malformed)
        );
        assert_eq!(
            classify(&frame(Codec::Codec12, 0x05, None), &me),
            Some(Reply::Malformed)
        );
        assert_eq!(classify(&frame(Codec::Codec13, 0x06, None), &me), None);
    }

    #[test]
    fn codec_14_frames_carry_the_device_imei() {
        let body = format!(
            r#"{{"id":"c1","codec":14,"payload":"{}","expires":"1"}}"#,
            crate::session::hex(b"getver")
        );
        let command: QueuedCommand = serde_json::from_str(&body).unwrap();
        let frame = command_frame(&command, &imei()).unwrap();
        // PROTOCOL.md §1.6, the wiki's Codec 14 "getver" example.
        assert_eq!(
            crate::session::hex(&frame),
            "00000000000000160e01050000000e0352093081452251676574766572010000d2c1"
        );
        assert!(command.is_expired(1));
        assert!(!command.is_expired(0));
    }
}
