//! One device connection: login → frames → publish → ack.
//!
//! Generic over the byte stream, so a unit test can drive it through `tokio::io::duplex`, and
//! over the protocol ([`protocol::DeviceProtocol`]: Teltonika in `teltonika.rs`, GT06 in
//! `gt06.rs`), which only reads bytes and says what to store and answer.
//! The ack (record count) is written only after the sink reports every record of the frame
//! stored; a frame Redis would not take within the retry bound closes the connection without
//! an ack, and the device resends it on its next connection.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::future::Either;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Span, debug, field, info, instrument, warn};
use trackgate_protocol::{Command, Imei, Limits};

use trackgate_api::Protocol;

use crate::command::{CommandLink, Commands, Outgoing};
use crate::config::{Admission, ShardView};
use crate::error::{CloseReason, PublishError};
use crate::metrics::Metrics;
use crate::sink::{Event, ShardKeys, Sink, StoreCall};

mod gt06;
mod protocol;
mod teltonika;

use gt06::Gt06;
use protocol::{DeviceProtocol, Malformed, Records, Reply, Step};
use teltonika::Teltonika;

/// First retry delay after a failed publish; doubles up to [`MAX_RETRY_DELAY`].
const FIRST_RETRY_DELAY: Duration = Duration::from_millis(50);
const MAX_RETRY_DELAY: Duration = Duration::from_secs(1);
/// The device-state hash is refreshed at most this often per session: a device sending every
/// second should not double the Redis write rate just to say "still here".
const DEVICE_STATE_EVERY: Duration = Duration::from_secs(10);

/// Room at the end of the buffer below which a read first takes back the front: about a frame.
const READ_ROOM: usize = 1024;

/// Takes back, without allocating, the room that frames already handled left at the front of
/// the buffer. Otherwise the next read gets only the few bytes left at its end and a second
/// read the rest: two reads a frame where one will do (`strace` at full load: 17 bytes, then
/// 958). A buffer never filled (an idle device's) stays unallocated.
fn take_back_room(buf: &mut BytesMut) {
    let room = buf.capacity() - buf.len();
    if room < READ_ROOM {
        // Asking for one byte more than the end has moves the data to the front, if it fits.
        let _ = buf.try_reclaim(room + 1);
    }
}

/// What every session of one shard shares.
pub(crate) struct ShardContext {
    pub(crate) pool: String,
    pub(crate) shard: String,
    pub(crate) view: watch::Receiver<Arc<ShardView>>,
    pub(crate) sink: Sink,
    /// Commands to devices (`None` in unit tests without Redis).
    pub(crate) commands: Option<Commands>,
    pub(crate) metrics: Metrics,
    /// Cancelled at shutdown: a session finishes the frame it is storing, then closes.
    pub(crate) stop: CancellationToken,
    /// How long one frame may keep failing to store before the connection is closed.
    pub(crate) publish_retry_for: Duration,
}

/// Runs one session to its end and accounts for it; returns why it ended.
#[instrument(name = "session", skip_all, fields(pool = %ctx.pool, shard = %ctx.shard, port, peer = %peer, imei = field::Empty))]
pub(crate) async fn run<S>(
    stream: S,
    peer: SocketAddr,
    port: u16,
    ctx: Arc<ShardContext>,
) -> CloseReason
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    // NB: only what the session needs is copied out of the current view; holding the view
    // itself would keep every config version alive for as long as its oldest session.
    let (limits, keys) = {
        let view = ctx.view.borrow();
        (SessionLimits::of(&view), Arc::clone(&view.keys))
    };
    let mut session = Session {
        stream,
        buf: BytesMut::new(),
        keys,
        view: ctx.view.clone(),
        peer,
        port,
        imei: None,
        device_keys: None,
        ctx,
    };
    session.event(Event::Connect);
    let reason = session.drive(limits).await;
    let ctx = &session.ctx;
    ctx.metrics
        .sessions_closed
        .with_label_values(&[ctx.pool.as_str(), reason.as_str()])
        .inc();
    let imei = session.imei.as_ref().map(|i| i.as_str().to_owned());
    session.event(Event::Disconnect {
        imei: imei.as_deref(),
        reason: reason.as_str(),
    });
    if let Some(imei) = &imei {
        ctx.sink.device_state(&session.keys, imei, port, false);
    }
    let _ = session.stream.shutdown().await;
    debug!(reason = reason.as_str(), "session closed");
    reason
}

/// The limits a session applies, fixed when it starts.
#[derive(Clone, Copy)]
struct SessionLimits {
    frame: Limits,
    login_timeout: Duration,
    idle_timeout: Duration,
}

impl SessionLimits {
    fn of(view: &ShardView) -> Self {
        Self {
            frame: view.frame_limits(),
            login_timeout: view.login_timeout(),
            idle_timeout: view.idle_timeout(),
        }
    }
}

struct Session<S> {
    stream: S,
    buf: BytesMut,
    keys: Arc<ShardKeys>,
    view: watch::Receiver<Arc<ShardView>>,
    peer: SocketAddr,
    port: u16,
    imei: Option<Imei>,
    /// The device's store keys, made at its first frame.
    device_keys: Option<Arc<[String; 3]>>,
    ctx: Arc<ShardContext>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    /// The session's protocol and its run: login, then frames.
    // NB: a plain fn returning either future, rather than an async fn awaiting one, so that no
    // extra state machine wraps the Teltonika one; the GT06 one is boxed so that it does not
    // grow every Teltonika session.
    fn drive(&mut self, limits: SessionLimits) -> impl Future<Output = CloseReason> + '_ {
        let gt06 = {
            let view = self.view.borrow();
            (view.config.protocol == Protocol::Gt06)
                .then(|| Gt06::new(limits.frame, &view.config.gt06))
        };
        let (login_timeout, idle) = (limits.login_timeout, limits.idle_timeout);
        match gt06 {
            Some(gt06) => Either::Left(Box::pin(self.drive_protocol(login_timeout, idle, gt06))),
            None => Either::Right(self.drive_protocol(
                login_timeout,
                idle,
                Teltonika::new(limits.frame),
            )),
        }
    }

    async fn drive_protocol<P: DeviceProtocol>(
        &mut self,
        login_timeout: Duration,
        idle: Duration,
        mut protocol: P,
    ) -> CloseReason {
        let imei = match self.login(login_timeout, &mut protocol).await {
            Ok(imei) => imei,
            Err(reason) => return reason,
        };
        self.imei = Some(imei);
        self.frames(idle, &mut protocol, &imei).await
    }

    // === Login ===

    async fn login<P: DeviceProtocol>(
        &mut self,
        timeout: Duration,
        protocol: &mut P,
    ) -> Result<Imei, CloseReason> {
        let deadline = Instant::now() + timeout;
        // NB: only the identity and the one reply to write outlive this block, which keeps
        // the login out of an idle session's state machine.
        let (imei, accepted, reply) = {
            let login = loop {
                match protocol.login(&mut self.buf) {
                    Ok(Some(login)) => break login,
                    Ok(None) => {}
                    Err(err) => {
                        self.count_login("malformed");
                        return Err(self.malformed(&err));
                    }
                }
                tokio::select! {
                    read = self.stream.read_buf(&mut self.buf) => self.on_read(read)?,
                    () = tokio::time::sleep_until(deadline) => {
                        self.count_login("timeout");
                        debug!("no login within the timeout");
                        return Err(CloseReason::LoginTimeout);
                    }
                    () = self.ctx.stop.cancelled() => return Err(CloseReason::Shutdown),
                }
            };
            let admission = self.view.borrow().admit(self.port, &login.imei);
            self.count_login(admission.label());
            self.event(Event::Login {
                imei: login.imei.as_str(),
                result: admission.label(),
            });
            if admission != Admission::Accepted {
                info!(
                    imei = login.imei.as_str(),
                    result = admission.label(),
                    "login refused"
                );
                (login.imei, false, login.refused)
            } else {
                (login.imei, true, login.accepted)
            }
        };
        self.write(&reply).await?;
        if !accepted {
            return Err(CloseReason::LoginRefused);
        }
        Span::current().record("imei", imei.as_str());
        debug!("login accepted");
        self.ctx
            .sink
            .device_state(&self.keys, imei.as_str(), self.port, true);
        Ok(imei)
    }

    fn count_login(&self, result: &'static str) {
        self.ctx
            .metrics
            .logins
            .with_label_values(&[self.ctx.pool.as_str(), result])
            .inc();
    }

    // === Frames ===

    async fn frames<P: DeviceProtocol>(
        &mut self,
        idle: Duration,
        protocol: &mut P,
        imei: &Imei,
    ) -> CloseReason {
        // Dropped when the session ends, which detaches the device from the command side.
        let mut link = self
            .ctx
            .commands
            .as_ref()
            .filter(|_| P::COMMANDS)
            .map(|c| c.attach(&self.keys.commands, *imei));
        let mut idle_deadline = Instant::now() + idle;
        let mut state_written = Instant::now();
        loop {
            // Frames already buffered are handled before the next read, and before shutdown
            // closes the connection: a frame fully received is stored and acked.
            let before = self.buf.len();
            // NB: the step is handled in a boxed future built inside this statement, so that
            // neither the decoded step nor the store path takes room in an idle session's
            // state machine (what a listener holds most of); one allocation per frame.
            let handled = {
                let handling = match protocol.frame(&mut self.buf) {
                    Ok(Some(step)) => {
                        let size = before.saturating_sub(self.buf.len());
                        if let (Step::Command(command), Some(link)) = (&step, &link) {
                            link.on_frame(command);
                        }
                        Some(Box::pin(self.handle(step, size, imei)))
                    }
                    Ok(None) => None,
                    Err(err) => {
                        if let Some(link) = &link {
                            link.on_malformed();
                        }
                        return self.malformed(&err);
                    }
                };
                match handling {
                    Some(handling) => Some(handling.await),
                    None => None,
                }
            };
            if let Some(handled) = handled {
                if let Err(reason) = handled {
                    return reason;
                }
                if state_written.elapsed() >= DEVICE_STATE_EVERY {
                    state_written = Instant::now();
                    self.ctx
                        .sink
                        .device_state(&self.keys, imei.as_str(), self.port, true);
                }
                continue;
            }
            if self.ctx.stop.is_cancelled() {
                return CloseReason::Shutdown;
            }
            take_back_room(&mut self.buf);
            tokio::select! {
                biased;
                () = self.ctx.stop.cancelled() => return CloseReason::Shutdown,
                changed = self.view.changed() => {
                    if let Err(reason) = self.recheck_admission(changed, imei) {
                        return reason;
                    }
                }
                read = self.stream.read_buf(&mut self.buf) => {
                    if let Err(reason) = self.on_read(read) {
                        return reason;
                    }
                    idle_deadline = Instant::now() + idle;
                }
                () = tokio::time::sleep_until(idle_deadline) => {
                    debug!(?idle, "idle timeout");
                    return CloseReason::IdleTimeout;
                }
                out = next_command(&mut link) => {
                    let written = self.stream.write_all(&out.frame).await.is_ok();
                    let _ = out.written.send(written);
                    if !written {
                        return CloseReason::Io;
                    }
                }
            }
        }
    }

    async fn handle(&mut self, step: Step, size: usize, imei: &Imei) -> Result<(), CloseReason> {
        match step {
            Step::Answer(reply) => self.write(&reply).await,
            Step::Command(command) => {
                self.on_command(&command, imei);
                Ok(())
            }
            Step::Raw {
                protocol,
                payload,
                reply,
                label,
            } => {
                self.count_frame(label);
                let payload_hex = hex(&payload);
                self.event(Event::Gt06Packet {
                    imei: imei.as_str(),
                    protocol,
                    payload_hex: &payload_hex,
                });
                debug!(protocol, "packet kept raw");
                self.write(&reply).await
            }
            Step::Store {
                records,
                ack,
                label,
            } => self.store_and_ack(records, ack, label, size, imei).await,
        }
    }

    /// Codec 12/13/14/15 frames are never acked; they go to the events stream
    /// (`kind=command_response`, payload hex) for the command path to pick up.
    fn on_command(&self, command: &Command, imei: &Imei) {
        let ctx = &self.ctx;
        ctx.metrics
            .frames
            .with_label_values(&[ctx.pool.as_str(), command.codec.label()])
            .inc();
        let payload_hex = hex(&command.payload);
        self.event(Event::Command {
            imei: imei.as_str(),
            codec: command.codec.label(),
            kind: command.kind,
            payload_hex: &payload_hex,
        });
        debug!(codec = %command.codec, kind = command.kind, "command frame published as event");
    }

    async fn store_and_ack(
        &mut self,
        records: Records,
        ack: Reply,
        label: &'static str,
        size: usize,
        imei: &Imei,
    ) -> Result<(), CloseReason> {
        let read_at = Instant::now();
        let ctx = Arc::clone(&self.ctx);
        self.count_frame(label);
        let count = records.count();
        let _inflight = ctx.sink.reserve(size).await;
        let device = self
            .device_keys
            .get_or_insert_with(|| Sink::device_keys(&self.keys, imei));
        let call = match &records {
            Records::Teltonika(packet) => ctx.sink.prepare(
                &self.keys,
                device,
                imei,
                packet.codec,
                self.port,
                &packet.records,
            ),
            Records::Gt06(location) => ctx
                .sink
                .prepare_gt06(&self.keys, device, imei, self.port, location),
        };
        drop(records);
        let new = publish(&ctx, &call).await?;
        self.write(&ack).await?;
        let pool = ctx.pool.as_str();
        ctx.metrics
            .records
            .with_label_values(&[pool, label])
            .inc_by(u64::from(count));
        ctx.metrics
            .duplicate_records
            .with_label_values(&[pool])
            .inc_by(u64::from(count.saturating_sub(new)));
        ctx.metrics
            .ack_delay
            .with_label_values(&[pool])
            .observe(read_at.elapsed().as_secs_f64());
        debug!(records = count, new, codec = label, "acked");
        Ok(())
    }

    /// Writes a reply (nothing for an empty one).
    async fn write(&mut self, reply: &Reply) -> Result<(), CloseReason> {
        self.stream
            .write_all(reply.as_bytes())
            .await
            .map_err(|_| CloseReason::Io)
    }

    fn count_frame(&self, label: &'static str) {
        self.ctx
            .metrics
            .frames
            .with_label_values(&[self.ctx.pool.as_str(), label])
            .inc();
    }

    // === Shared ===

    /// After a config reload: is this device still admitted on this port? Both protocols'
    /// frame loops ask it, so a removed device is closed the same way.
    fn recheck_admission(
        &mut self,
        changed: Result<(), watch::error::RecvError>,
        imei: &Imei,
    ) -> Result<(), CloseReason> {
        if changed.is_err() {
            return Err(CloseReason::Shutdown);
        }
        let admission = self.view.borrow_and_update().admit(self.port, imei);
        if admission != Admission::Accepted {
            info!(
                result = admission.label(),
                "device or port removed from the config"
            );
            return Err(CloseReason::ConfigRemoved);
        }
        Ok(())
    }

    fn on_read(&self, read: std::io::Result<usize>) -> Result<(), CloseReason> {
        match read {
            Ok(0) => Err(CloseReason::PeerClosed),
            Ok(n) => {
                self.ctx
                    .metrics
                    .received_bytes
                    .with_label_values(&[self.ctx.pool.as_str()])
                    .inc_by(n as u64);
                Ok(())
            }
            Err(err) => {
                debug!(%err, "read failed");
                Err(CloseReason::Io)
            }
        }
    }

    /// Malformed input is final for this connection only: counted by reason, logged once,
    /// closed without an ack.
    fn malformed(&self, err: &Malformed) -> CloseReason {
        let reason = err.reason;
        self.ctx
            .metrics
            .decode_errors
            .with_label_values(&[self.ctx.pool.as_str(), reason])
            .inc();
        warn!(reason, offset = ?err.offset, err = %err.detail, "malformed input: closing");
        let imei = self.imei.as_ref().map(|i| i.as_str().to_owned());
        self.event(Event::DecodeError {
            imei: imei.as_deref(),
            reason,
        });
        CloseReason::Malformed
    }

    fn event(&self, event: Event<'_>) {
        self.ctx.sink.event(&self.keys, self.port, self.peer, event);
    }
}

/// The next command frame for the device; never ready without a command side.
async fn next_command(link: &mut Option<CommandLink>) -> Outgoing {
    match link {
        Some(link) => link.next().await,
        None => std::future::pending().await,
    }
}

/// Stores one frame, retrying with backoff within the shard's bound; `Err` means "do not ack,
/// close": the device keeps the records and resends them later.
pub(crate) async fn publish(ctx: &ShardContext, call: &Arc<StoreCall>) -> Result<u32, CloseReason> {
    let pool = ctx.pool.as_str();
    let give_up = Instant::now() + ctx.publish_retry_for;
    let mut delay = FIRST_RETRY_DELAY;
    loop {
        let started = Instant::now();
        match ctx.sink.store(call).await {
            Ok(new) => {
                ctx.metrics
                    .publish_duration
                    .with_label_values(&[pool])
                    .observe(started.elapsed().as_secs_f64());
                return Ok(new);
            }
            Err(err) => {
                ctx.metrics
                    .publish_errors
                    .with_label_values(&[pool, err.reason()])
                    .inc();
                if Instant::now() + delay > give_up || err == PublishError::Stopped {
                    warn!(reason = err.reason(), %err, "frame not stored: no ack");
                    return Err(CloseReason::PublishFailed);
                }
                debug!(reason = err.reason(), %err, ?delay, "publish failed: retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(MAX_RETRY_DELAY);
            }
        }
    }
}

/// Lowercase hex of a payload, for the events stream.
pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::error::PublishError;
    use tokio::io::DuplexStream;
    use tokio::sync::mpsc;
    use trackgate_protocol::{AvlPacket, AvlRecord, Codec, encode_ack, encode_avl, encode_login};

    #[test]
    fn the_room_a_handled_frame_left_is_taken_back_for_the_next_read() {
        let mut buf = BytesMut::with_capacity(992);
        buf.extend_from_slice(&[7; 975]);
        drop(buf.split_to(975));
        assert_eq!(buf.capacity(), 17);
        take_back_room(&mut buf);
        assert_eq!(buf.capacity(), 992);
        // Never filled: nothing is allocated for it.
        let mut idle = BytesMut::new();
        take_back_room(&mut idle);
        assert_eq!(idle.capacity(), 0);
    }

    const IMEI: &str = "356307042441013";

    type ViewSender = watch::Sender<Arc<ShardView>>;

    fn context(sink: Sink, metrics: Metrics) -> (Arc<ShardContext>, ViewSender) {
        let config = trackgate_api::ShardConfig::from_json(&format!(
            r#"{{"pool":"p","shard":0,"mode":"dedicated","ports":[{{"port":5000,"imei":"{IMEI}"}}],
               "limits":{{"idleTimeoutSeconds":30}}}}"#
        ))
        .unwrap();
        // The sender stays with the test: a session reads a closed view channel as shutdown.
        let (tx, view) = watch::channel(Arc::new(ShardView::new(config, Arc::default())));
        let ctx = Arc::new(ShardContext {
            pool: "p".into(),
            shard: "0".into(),
            view,
            sink,
            commands: None,
            metrics,
            stop: CancellationToken::new(),
            publish_retry_for: Duration::from_secs(1),
        });
        (ctx, tx)
    }

    async fn logged_in(
        ctx: Arc<ShardContext>,
    ) -> (DuplexStream, tokio::task::JoinHandle<CloseReason>) {
        let (mut device, server) = tokio::io::duplex(64 * 1024);
        let peer: SocketAddr = "10.0.0.1:40000".parse().unwrap();
        let task = tokio::spawn(run(server, peer, 5000, ctx));
        let mut login = BytesMut::new();
        encode_login(&Imei::parse(IMEI).unwrap(), &mut login);
        device.write_all(&login).await.unwrap();
        let mut reply = [0u8; 1];
        device.read_exact(&mut reply).await.unwrap();
        assert_eq!(reply, [1]);
        (device, task)
    }

    fn frame(records: usize) -> BytesMut {
        let record = AvlRecord {
            timestamp_ms: 1_700_000_000_000,
            priority: 0,
            longitude: 1,
            latitude: -1,
            altitude: 0,
            angle: 0,
            satellites: 4,
            speed: 0,
            event_id: 0,
            generation_type: None,
            io: vec![],
        };
        let packet = AvlPacket {
            codec: Codec::Codec8,
            records: (0..records)
                .map(|i| AvlRecord {
                    timestamp_ms: record.timestamp_ms + i as u64 * 1000,
                    ..record.clone()
                })
                .collect(),
        };
        let mut buf = BytesMut::new();
        encode_avl(&packet, &mut buf).unwrap();
        buf
    }

    fn setup() -> (
        Arc<ShardContext>,
        mpsc::Receiver<crate::sink::Job>,
        ViewSender,
    ) {
        let metrics = Metrics::register(&prometheus::Registry::new()).unwrap();
        let (sink, jobs) = Sink::for_test(metrics.clone());
        let (ctx, view) = context(sink, metrics);
        (ctx, jobs, view)
    }

    /// Regression guard for the no-loss rule: nothing is written back before the sink answers.
    #[tokio::test]
    async fn the_ack_waits_for_the_store() {
        let (ctx, mut jobs, _view) = setup();
        let (mut device, _task) = logged_in(ctx).await;
        device.write_all(&frame(2)).await.unwrap();
        let job = jobs.recv().await.unwrap();
        assert_eq!(job.call.records(), 2);
        let mut ack = [0u8; 4];
        let early = tokio::time::timeout(Duration::from_millis(100), device.read(&mut ack)).await;
        assert!(early.is_err(), "acked before the store finished");
        job.reply.send(Ok(2)).unwrap();
        device.read_exact(&mut ack).await.unwrap();
        assert_eq!(ack, encode_ack(2));
    }

    /// A frame Redis keeps refusing is retried within the bound, then the session closes with
    /// no ack at all.
    #[tokio::test(start_paused = true)]
    async fn a_frame_never_stored_is_never_acked() {
        let (ctx, mut jobs, _view) = setup();
        let (mut device, task) = logged_in(ctx).await;
        device.write_all(&frame(1)).await.unwrap();
        let mut attempts = 0;
        while let Some(job) = jobs.recv().await {
            attempts += 1;
            let _ = job.reply.send(Err(PublishError::Timeout));
            if task.is_finished() {
                break;
            }
        }
        assert_eq!(task.await.unwrap(), CloseReason::PublishFailed);
        assert!(attempts > 1, "no retry before giving up");
        let mut rest = Vec::new();
        device.read_to_end(&mut rest).await.unwrap();
        assert!(
            rest.is_empty(),
            "bytes written after a failed store: {rest:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn keep_alives_are_absorbed_and_silence_ends_the_session() {
        let (ctx, _jobs, _view) = setup();
        let (mut device, task) = logged_in(ctx).await;
        device.write_all(&[0xFF]).await.unwrap();
        assert_eq!(task.await.unwrap(), CloseReason::IdleTimeout);
        let mut rest = Vec::new();
        device.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
    }

    /// Guards the memory per idle connection (goal ≤ 3 KB in all): the session's state
    /// machine must not reserve room for the publish path, which is boxed (1.5 KB before).
    #[tokio::test]
    async fn an_idle_session_state_machine_stays_small() {
        let (ctx, _jobs, _view) = setup();
        let (_device, server) = tokio::io::duplex(64);
        let session = run(server, "10.0.0.1:40000".parse().unwrap(), 5000, ctx);
        let size = std::mem::size_of_val(&session);
        assert!(size <= 1200, "session future is {size} bytes");
    }

    #[tokio::test]
    async fn hex_is_lowercase_and_padded() {
        assert_eq!(hex(&[0x00, 0xAB, 0x0f]), "00ab0f");
    }
}
