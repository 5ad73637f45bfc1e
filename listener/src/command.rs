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
use futures::StreamExt;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info_span, warn};
use trackgate_api::redis_layout::{CommandReason, CommandStatus};
use trackgate_protocol::{Codec, Command, Imei, encode_command};

use crate::command_store::{
    CommandStore, Outcome, PoolKeys, QueuedCommand, ROUTER_LEASE, Router, Swept, Taken, parse_entry,
};
use crate::metrics::Metrics;

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
    pub(crate) redis_url: String,
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
        options: CommandOptions,
        metrics: Metrics,
        stop: CancellationToken,
    ) -> redis::RedisResult<Self> {
        let client = redis::Client::open(options.redis_url.as_str())?;
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

    // === Pool tasks ===

    async fn route(self, keys: Arc<PoolKeys>) {
        let inner = &self.inner;
        // The blocking read has a connection of its own, so it delays no other call.
        let conn = redis::aio::ConnectionManager::new_lazy_with_config(
            inner.client.clone(),
            crate::command_store::connection_config(
                inner.options.redis_timeout + Duration::from_secs(2),
            ),
        );
        let conn = match conn {
            Ok(conn) => conn,
            Err(err) => {
                warn!(pool = %keys.pool, %err, "command router not started");
                return;
            }
        };
        let mut router = Router {
            conn,
            store: inner.store.clone(),
            keys: (*keys).clone(),
            consumer: inner.options.owner.clone(),
            lead: crate::command_store::lead_script(),
        };
        let mut grouped = false;
        let mut leading = false;
        while !inner.stop.is_cancelled() {
            if !grouped {
                if let Err(err) = router.ensure_group().await {
                    warn!(pool = %keys.pool, %err, "creating the command consumer group");
                    if self.pause(RETRY_AFTER).await {
                        break;
                    }
                    continue;
                }
                grouped = true;
            }
            // Renewed every read (a read blocks at most a second, a fifth of the lease).
            let was_leading = leading;
            leading = match router.lead().await {
                Ok(held) => held,
                Err(err) => {
                    warn!(pool = %keys.pool, %err, "renewing the command router lease");
                    false
                }
            };
            if !leading {
                if self.pause(ROUTER_LEASE / 5).await {
                    break;
                }
                continue;
            }
            let read = if was_leading {
                tokio::select! {
                    () = inner.stop.cancelled() => break,
                    read = router.read() => read,
                }
            } else {
                debug!(pool = %keys.pool, "routing the pool's commands");
                router.claim().await
            };
            let entries = match read {
                Ok(entries) => entries,
                Err(err) => {
                    grouped = !Router::is_missing_group(&err);
                    // Claim again on the next round: the failed read may have delivered.
                    leading = false;
                    warn!(pool = %keys.pool, %err, "reading the command stream");
                    if self.pause(RETRY_AFTER).await {
                        break;
                    }
                    continue;
                }
            };
            for entry in entries {
                let routed = parse_entry(&entry.id, &entry.map);
                // A failed ROUTE leaves the entry pending: the next router claims it.
                match router.store.route(&keys, &entry.id, &routed).await {
                    Ok(Some(status)) => {
                        let reason = routed.reject.or(Some(CommandReason::UnknownImei));
                        self.count(&keys.pool, status, reason);
                        debug!(id = %routed.id, status = status.as_str(), "command routed");
                    }
                    Ok(None) => debug!(id = %routed.id, "command id seen before: ignored"),
                    Err(err) => {
                        warn!(pool = %keys.pool, id = %routed.id, %err, "routing a command");
                        leading = false;
                        break;
                    }
                }
            }
        }
    }

    /// Subscribes to the pool's wake-up channel; after every (re)subscription every device
    /// held here is looked at once, so a message missed while disconnected delays nothing.
    async fn wake_ups(self, keys: Arc<PoolKeys>) {
        let inner = &self.inner;
        while !inner.stop.is_cancelled() {
            let subscribed = async {
                let mut pubsub = inner.client.get_async_pubsub().await?;
                pubsub.subscribe(&keys.channel).await?;
                Ok::<_, redis::RedisError>(pubsub)
            };
            let pubsub = tokio::select! {
                () = inner.stop.cancelled() => break,
                p = tokio::time::timeout(inner.options.redis_timeout, subscribed) => p,
            };
            match pubsub {
                Ok(Ok(pubsub)) => {
                    self.kick_all(&keys);
                    let mut messages = pubsub.into_on_message();
                    loop {
                        let message = tokio::select! {
                            () = inner.stop.cancelled() => return,
                            m = messages.next() => m,
                        };
                        let Some(message) = message else { break };
                        if let Ok(imei) = message.get_payload::<String>() {
                            self.kick(&keys, &imei);
                        }
                    }
                    warn!(pool = %keys.pool, "command wake-up subscription lost; resubscribing");
                }
                Ok(Err(err)) => warn!(pool = %keys.pool, %err, "subscribing to command wake-ups"),
                Err(_) => warn!(pool = %keys.pool, "subscribing to command wake-ups timed out"),
            }
            if self.pause(RETRY_AFTER).await {
                break;
            }
        }
    }

    async fn sweep(self, keys: Arc<PoolKeys>) {
        let inner = &self.inner;
        let mut tick = tokio::time::interval(SWEEP_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = inner.stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            match inner.store.sweep(&keys).await {
                Ok(Swept {
                    expired,
                    timed_out,
                    open,
                }) => {
                    let pool = keys.pool.as_str();
                    let m = &inner.metrics;
                    m.commands
                        .with_label_values(&[pool, "expired"])
                        .inc_by(expired);
                    m.commands
                        .with_label_values(&[pool, "failed"])
                        .inc_by(timed_out);
                    m.command_failures
                        .with_label_values(&[pool, "timeout"])
                        .inc_by(timed_out);
                    m.command_queue_depth.with_label_values(&[pool]).set(open);
                }
                Err(err) => debug!(pool = %keys.pool, %err, "command sweep failed"),
            }
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

// === Driver ===

/// Sends one device its commands, one at a time, while it is connected here.
struct Driver {
    commands: Commands,
    keys: Arc<PoolKeys>,
    imei: Imei,
    inbox: mpsc::Receiver<DriverMsg>,
}

impl Driver {
    async fn run(mut self) {
        loop {
            if !self.step().await {
                // Nothing to do: stop, unless a message came in meanwhile.
                match self.commands.finish_driver(
                    &self.keys.pool,
                    self.imei.as_str(),
                    &mut self.inbox,
                ) {
                    Some(DriverMsg::Reply(reply)) => self.stray(reply).await,
                    Some(DriverMsg::Kick) => {}
                    None => return,
                }
            }
            if self.commands.inner.stop.is_cancelled() {
                let _ = self.commands.finish_driver(
                    &self.keys.pool,
                    self.imei.as_str(),
                    &mut self.inbox,
                );
                return;
            }
        }
    }

    /// One TAKE and what follows; `false` when there is nothing (more) to do for now.
    async fn step(&mut self) -> bool {
        let commands = self.commands.clone();
        let inner = &commands.inner;
        let imei = self.imei.as_str();
        let Some(session) = commands.session(&self.keys.pool, imei) else {
            return false;
        };
        let taken = match inner
            .store
            .take(&self.keys, imei, &inner.options.owner, WRITE_LEASE)
            .await
        {
            Ok(taken) => taken,
            Err(err) => {
                warn!(%err, "taking the next command: redis");
                return !commands.pause(RETRY_AFTER).await;
            }
        };
        match taken {
            Taken::Empty => false,
            Taken::Busy { id, wait } => {
                // Another attempt holds the device (its previous connection, perhaps through
                // another listener): wait for its end, or for the answer on this connection.
                tokio::select! {
                    msg = self.inbox.recv() => match msg {
                        Some(DriverMsg::Reply(reply)) => {
                            commands.resolve(&self.keys, imei, &id, reply.outcome(), None).await;
                            true
                        }
                        Some(DriverMsg::Kick) => true,
                        None => false,
                    },
                    () = tokio::time::sleep(wait) => true,
                }
            }
            Taken::TimedOut { id } => {
                commands
                    .resolve(
                        &self.keys,
                        imei,
                        &id,
                        Outcome::Failed(CommandReason::Timeout),
                        None,
                    )
                    .await;
                true
            }
            Taken::Unreadable { id } => {
                commands
                    .resolve(
                        &self.keys,
                        imei,
                        &id,
                        Outcome::Failed(CommandReason::Malformed),
                        None,
                    )
                    .await;
                true
            }
            Taken::Command { command, now_ms } => {
                self.deliver(&session, command, now_ms).await;
                true
            }
        }
    }

    async fn deliver(
        &mut self,
        session: &mpsc::Sender<Outgoing>,
        command: QueuedCommand,
        now_ms: u64,
    ) {
        let commands = self.commands.clone();
        let inner = &commands.inner;
        let (keys, imei, id) = (&*self.keys, self.imei.as_str(), command.id.as_str());
        if command.is_expired(now_ms) {
            commands
                .resolve(keys, imei, id, Outcome::Expired, None)
                .await;
            return;
        }
        let Some(frame) = command_frame(&command, &self.imei) else {
            commands
                .resolve(
                    keys,
                    imei,
                    id,
                    Outcome::Failed(CommandReason::Malformed),
                    None,
                )
                .await;
            return;
        };
        let (written, was_written) = oneshot::channel();
        let handed = session.send(Outgoing { frame, written }).await.is_ok();
        let went_out = handed
            && tokio::time::timeout(WRITE_LEASE / 2, was_written)
                .await
                .is_ok_and(|w| w.unwrap_or(false));
        if !went_out {
            // The session closed first: back to the head for the device's next connection.
            if let Err(err) = inner
                .store
                .release(keys, imei, id, &inner.options.owner)
                .await
            {
                warn!(id, %err, "releasing an unsent command: its lease will lapse instead");
            }
            return;
        }
        let sent_at = Instant::now();
        let timeout = inner.options.response_timeout;
        match inner
            .store
            .mark_sent(keys, imei, id, &inner.options.owner, timeout)
            .await
        {
            Ok(true) => commands.count(&keys.pool, CommandStatus::Sent, None),
            Ok(false) => warn!(id, "command lease lost before it was marked sent"),
            // Sent but not marked: the write lease lapses first, and the command may go out
            // once more after it (an attempt per lease, never two at once).
            Err(err) => warn!(id, %err, "marking a command sent: redis"),
        }
        debug!(id, "command sent");
        let deadline = sent_at + timeout;
        let outcome = loop {
            tokio::select! {
                msg = self.inbox.recv() => match msg {
                    Some(DriverMsg::Reply(reply)) => break reply.outcome(),
                    Some(DriverMsg::Kick) => {}
                    None => return,
                },
                () = tokio::time::sleep_until(deadline) => break Outcome::Failed(CommandReason::Timeout),
            }
        };
        commands
            .resolve(keys, imei, id, outcome, Some(sent_at))
            .await;
    }

    /// A reply that reached the driver as it was stopping.
    async fn stray(&self, reply: Reply) {
        let store = &self.commands.inner.store;
        if let Ok(Some(id)) = store.outstanding(&self.keys, self.imei.as_str()).await {
            self.commands
                .resolve(&self.keys, self.imei.as_str(), &id, reply.outcome(), None)
                .await;
        }
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
