//! One simulated device: its records, its unacked packet, and the TCP session a Teltonika
//! device runs (login, frames, wait for the ack, resend, keep-alive).
//!
//! The session is generic over the byte stream so that tests drive it against a scripted
//! in-memory server (`tokio::io::duplex`); the load runner gives it a `TcpStream`.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::{Instant, sleep_until, timeout};
use tokio_util::sync::CancellationToken;
use trackgate_protocol::gt06::{Gt06EncodeError, Gt06Error, UtcOffset};
use trackgate_protocol::{
    AvlPacket, AvlRecord, Codec, EncodeError, FrameDecoder, FrameError, Imei, Limits, encode_avl,
    encode_login,
};

use crate::commands::{Head, answer_commands, head};

/// How long four zero bytes wait for the rest of a frame before they count as an ack of 0.
const ZERO_ACK_WAIT: Duration = Duration::from_millis(50);

use crate::stats::{AckedRecord, Stats, teltonika_entry_key};
use crate::track::Track;

pub(crate) mod gt06;

/// The protocol a device speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Protocol {
    /// Teltonika: IMEI login, AVL frames of [`DeviceSettings::codec`], 4-byte acks.
    #[default]
    Teltonika,
    /// GT06: `0x01` login, one `0x22` location per frame, `0x13` heartbeats; the device clock
    /// runs at `utc_offset` from UTC. [`DeviceSettings::codec`] and `records_per_frame` do
    /// not apply.
    Gt06 {
        /// Offset of the device clock from UTC.
        utc_offset: UtcOffset,
    },
}

// === Settings ===

/// How every device of a run behaves.
#[derive(Debug, Clone)]
pub struct DeviceSettings {
    /// The protocol (Teltonika by default).
    pub protocol: Protocol,
    /// Codec of the AVL frames (8, 8E or 16).
    pub codec: Codec,
    /// Records per frame, 1..=255 (the record count is one byte on the wire).
    pub records_per_frame: u8,
    /// Time between two frames of one device; `None` sends the next frame as soon as the
    /// previous one is acked (the load generator's "as fast as the server acks" mode).
    pub frame_interval: Option<Duration>,
    /// How long to wait for the login reply or an ack before closing the link and resending
    /// the same packet on a new one (the device's "Response timeout" parameter).
    pub response_timeout: Duration,
    /// Silence after which a `0xFF` keep-alive is sent (the device's "Keep-alive ping
    /// timeout"); it must stay below the listener's idle timeout.
    pub keepalive_interval: Duration,
    /// Wrong acks in a row for one packet before the device gives up on the link (it resends
    /// the same packet after reconnecting). Teltonika devices resend on any count mismatch.
    pub max_wrong_acks: u32,
    /// Log in and only send keep-alives: the idle-connection benchmark.
    pub idle: bool,
    /// Keep every acked record's identity for [`crate::verify`].
    pub keep_acked: bool,
}

impl Default for DeviceSettings {
    fn default() -> Self {
        Self {
            protocol: Protocol::Teltonika,
            codec: Codec::Codec8Ext,
            records_per_frame: 1,
            frame_interval: Some(Duration::from_secs(1)),
            response_timeout: Duration::from_secs(5),
            keepalive_interval: Duration::from_secs(60),
            max_wrong_acks: 3,
            idle: false,
            keep_acked: false,
        }
    }
}

// === Errors ===

/// Why a device session ended early. The device reconnects (with backoff) after any of them
/// and resends its unacked packet.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    /// TCP connect failed (nothing listening, refused, unreachable).
    #[error("connect failed: {0}")]
    Connect(#[source] std::io::Error),
    /// TCP connect did not complete in time.
    #[error("connect timed out")]
    ConnectTimeout,
    /// The server answered the login with `0x00`.
    #[error("login refused")]
    Refused,
    /// The login reply was neither `0x00` nor `0x01`.
    #[error("unexpected login reply {0:#04x}")]
    BadLoginReply(u8),
    /// No login reply within the response timeout.
    #[error("no login reply within {0:?}")]
    LoginTimeout(Duration),
    /// No ack within the response timeout.
    #[error("no ack within {0:?}")]
    AckTimeout(Duration),
    /// The server kept acking another record count than the packet held.
    #[error("ack for {got} records, expected {expected}")]
    WrongAck {
        /// Count the server acked.
        got: u32,
        /// Records in the packet.
        expected: u32,
    },
    /// The server closed the connection.
    #[error("connection closed by the server")]
    Closed,
    /// A socket error after connecting.
    #[error("socket error: {0}")]
    Io(#[from] std::io::Error),
    /// The packet could not be encoded (a simulator bug, never a server fault).
    #[error("encode: {0}")]
    Encode(#[from] EncodeError),
    /// A GT06 packet could not be encoded (a simulator bug, never a server fault).
    #[error("encode: {0}")]
    EncodeGt06(#[from] Gt06EncodeError),
    /// The GT06 server kept echoing another packet than the location sent.
    #[error("reply does not echo the location with serial {expected}")]
    WrongEcho {
        /// The serial number of the location sent.
        expected: u16,
    },
    /// A GT06 server reply that is not a valid frame.
    #[error("bad reply: {0}")]
    Reply(Gt06Error),
    /// The server sent a frame that does not decode.
    #[error("bad frame from the server: {0}")]
    BadFrame(#[source] FrameError),
}

impl SessionError {
    /// A short, bounded name for counting.
    pub fn reason(&self) -> &'static str {
        match self {
            SessionError::Connect(_) => "connect",
            SessionError::ConnectTimeout => "connect_timeout",
            SessionError::Refused => "refused",
            SessionError::BadLoginReply(_) => "bad_login_reply",
            SessionError::LoginTimeout(_) => "login_timeout",
            SessionError::AckTimeout(_) => "ack_timeout",
            SessionError::WrongAck { .. } | SessionError::WrongEcho { .. } => "wrong_ack",
            SessionError::Closed => "closed",
            SessionError::Io(_) => "io",
            SessionError::Encode(_) | SessionError::EncodeGt06(_) => "encode",
            SessionError::Reply(_) => "bad_reply",
            SessionError::BadFrame(_) => "bad_frame",
        }
    }
}

// === Device ===

/// A packet sent (at least once) and not yet acked. A device keeps it until the server acks
/// exactly its record count, across reconnects, as a Teltonika device keeps unsent records
/// in its memory.
#[derive(Debug, Clone)]
pub struct Pending {
    /// The records, for the ack log and for UDP re-encoding.
    pub packet: AvlPacket,
    /// The encoded TCP frame, resent byte for byte.
    pub frame: Bytes,
    /// The entry key of each record ([`crate::AckedRecord::key`]), computed by the protocol
    /// that encoded them, since each stores other fields.
    pub keys: Vec<u64>,
    /// Wrong acks received for it on the current link.
    pub wrong_acks: u32,
    /// Whether it has been written at least once (so the next write is a resend).
    pub sent: bool,
}

impl Pending {
    /// Notes a write of it, counting the resend when it went out before.
    pub(crate) fn mark_sent(&mut self, stats: &Stats) {
        if self.sent {
            stats.on_resend();
        }
        self.sent = true;
    }
}

/// Why a device's idle wait ended ([`Device::wait_for_frame`]).
pub(crate) enum Wake<T> {
    /// Nothing left to send: the session is done.
    Finished,
    /// The run was stopped; look again.
    Stopped,
    /// Silent for the keep-alive interval: send the protocol's keep-alive.
    KeepAlive,
    /// The next frame is due: build it.
    FrameDue,
    /// The server wrote something.
    Read(T),
}

/// One simulated device.
#[derive(Debug)]
pub struct Device {
    /// Its identity.
    pub imei: Imei,
    imei_number: u64,
    track: Track,
    settings: Arc<DeviceSettings>,
    /// The unacked packet, if any.
    pub pending: Option<Pending>,
    /// Records still to generate; `u64::MAX` when the run is bounded by time only.
    pub records_left: u64,
    next_frame_at: Instant,
    /// Every acked record (when [`DeviceSettings::keep_acked`]).
    pub acked: Vec<AckedRecord>,
    /// Set when the current session got past login; the runner resets its backoff on it.
    pub logged_in: bool,
}

impl Device {
    /// A device with its own deterministic track (`seed`, `index`) starting at device time
    /// `start_ms`, that generates `records` records in all, the first frame due at `first_frame_at`.
    pub fn new(
        imei: Imei,
        index: u64,
        seed: u64,
        start_ms: u64,
        records: u64,
        settings: Arc<DeviceSettings>,
        first_frame_at: Instant,
    ) -> Self {
        // NB: Imei is 15 ASCII digits, which always fit in a u64; 0 is never a real IMEI.
        let imei_number = imei.as_str().parse().unwrap_or(0);
        Self {
            imei,
            imei_number,
            track: Track::new(seed, index, start_ms),
            settings,
            pending: None,
            records_left: records,
            next_frame_at: first_frame_at,
            acked: Vec::new(),
            logged_in: false,
        }
    }

    /// The settings it runs with.
    pub fn settings(&self) -> &DeviceSettings {
        &self.settings
    }

    /// True when it has nothing left to send: stopped (or out of records) and nothing unacked.
    pub fn is_finished(&self, stop: &CancellationToken) -> bool {
        self.pending.is_none() && (stop.is_cancelled() || self.records_left == 0)
    }

    /// When the next new frame is due (`None` in idle mode).
    pub fn next_frame_at(&self) -> Option<Instant> {
        (!self.settings.idle).then_some(self.next_frame_at)
    }

    /// Builds the next packet from the track and makes it the pending one.
    ///
    /// # Errors
    /// [`EncodeError`] when the protocol encoder refuses the packet (a simulator bug).
    pub fn next_packet(&mut self) -> Result<&mut Pending, EncodeError> {
        let count = u64::from(self.settings.records_per_frame.max(1)).min(self.records_left);
        let codec = self.settings.codec;
        let records: Vec<AvlRecord> = (0..count).map(|_| self.track.next_record(codec)).collect();
        let keys = records.iter().map(teltonika_entry_key).collect();
        let packet = AvlPacket { codec, records };
        let mut buf = BytesMut::new();
        encode_avl(&packet, &mut buf)?;
        self.records_left -= count;
        let now = Instant::now();
        self.next_frame_at = match self.settings.frame_interval {
            // Falling behind (a slow ack) delays the schedule rather than bursting to catch
            // up: a device sends its next packet only after the previous one is acked.
            Some(interval) => (self.next_frame_at + interval).max(now),
            None => now,
        };
        Ok(self.pending.insert(Pending {
            packet,
            frame: buf.freeze(),
            keys,
            wrong_acks: 0,
            sent: false,
        }))
    }

    /// The pending packet was acked: log its records and forget it.
    pub fn ack_pending(&mut self, stats: &Stats) {
        let Some(pending) = self.pending.take() else {
            return;
        };
        let n = pending.packet.records.len() as u64;
        stats.on_acked(n);
        if self.settings.keep_acked {
            let acked_at = stats.since_start();
            let records = pending.packet.records.iter().zip(&pending.keys);
            self.acked.extend(records.map(|(r, &key)| AckedRecord {
                imei: self.imei_number,
                ts_ms: r.timestamp_ms,
                key,
                acked_at,
            }));
        }
    }

    /// Waits, with nothing pending, for what comes first: the stop, the keep-alive time
    /// (`last_write` + the interval), the next frame's time, or `read` (the protocol's read of
    /// server bytes, dropped unfinished otherwise, so it must be cancel-safe).
    pub(crate) async fn wait_for_frame<T>(
        &self,
        stop: &CancellationToken,
        last_write: Instant,
        read: impl std::future::Future<Output = T>,
    ) -> Wake<T> {
        if self.is_finished(stop) {
            return Wake::Finished;
        }
        let keepalive_at = last_write + self.settings.keepalive_interval;
        let frame_at = self.next_frame_at();
        tokio::select! {
            _ = stop.cancelled(), if !stop.is_cancelled() => Wake::Stopped,
            _ = sleep_until(keepalive_at) => Wake::KeepAlive,
            _ = sleep_until(frame_at.unwrap_or(keepalive_at)), if frame_at.is_some() => Wake::FrameDue,
            got = read => Wake::Read(got),
        }
    }

    /// Settles the pending packet on the server's answer, `acked` or not: an ack logs it; a
    /// wrong answer is counted, and the streak ends the link with `give_up`'s error once it
    /// reaches `max_wrong_acks` (the packet stays pending for the next link).
    pub(crate) fn settle(
        &mut self,
        acked: bool,
        sent_at: Instant,
        stats: &Stats,
        give_up: impl FnOnce() -> SessionError,
    ) -> Result<(), SessionError> {
        if acked {
            stats.on_latency(sent_at.elapsed());
            self.ack_pending(stats);
            return Ok(());
        }
        stats.on_wrong_ack();
        let max = self.settings.max_wrong_acks;
        if let Some(pending) = self.pending.as_mut() {
            pending.wrong_acks += 1;
            if pending.wrong_acks >= max {
                pending.wrong_acks = 0;
                return Err(give_up());
            }
        }
        Ok(())
    }

    // === Session ===

    /// Runs one TCP session on `io`: login, then frames until the device is finished (returns
    /// `Ok`) or the link fails (returns why; the unacked packet stays pending for the next
    /// session). `stop` ends the generation of new frames; the pending one is still sent.
    ///
    /// # Errors
    /// [`SessionError`] for a refusal, a timeout, a wrong ack streak, a close or a socket error.
    pub async fn run_session<S>(
        &mut self,
        io: S,
        stats: &Stats,
        stop: &CancellationToken,
    ) -> Result<(), SessionError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        if let Protocol::Gt06 { utc_offset } = self.settings.protocol {
            return self.run_gt06_session(io, stats, stop, utc_offset).await;
        }
        self.logged_in = false;
        let (mut rd, mut wr) = tokio::io::split(io);
        let mut inbox = BytesMut::with_capacity(16);
        let timeout_after = self.settings.response_timeout;

        let mut login = BytesMut::new();
        encode_login(&self.imei, &mut login);
        wr.write_all(&login).await?;
        match timeout(timeout_after, read_at_least(&mut rd, &mut inbox, 1)).await {
            Err(_) => return Err(SessionError::LoginTimeout(timeout_after)),
            Ok(read) => read?,
        }
        match inbox.split_to(1)[0] {
            0x01 => {}
            0x00 => return Err(SessionError::Refused),
            other => return Err(SessionError::BadLoginReply(other)),
        }
        self.logged_in = true;
        let _connected = stats.connected_guard();
        let mut commands = FrameDecoder::new(Limits::default());
        let imei = self.imei;
        let mut last_write = Instant::now();

        loop {
            // Wait for the next frame to be due, pinging when idle and noticing a close.
            while self.pending.is_none() {
                match self
                    .wait_for_frame(stop, last_write, rd.read_buf(&mut inbox))
                    .await
                {
                    Wake::Finished => return Ok(()),
                    Wake::Stopped => {}
                    Wake::KeepAlive => {
                        wr.write_all(&[0xFF]).await?;
                        last_write = Instant::now();
                        stats.on_keepalive();
                    }
                    Wake::FrameDue => {
                        self.next_packet()?;
                    }
                    Wake::Read(read) => {
                        if read? == 0 {
                            return Err(SessionError::Closed);
                        }
                        answer_commands(&imei, &mut inbox, &mut commands, &mut wr).await?;
                        if head(&inbox) == Head::Ack {
                            // Anything else unsolicited is dropped, never mistaken for an ack.
                            stats.on_unsolicited(inbox.len());
                            inbox.clear();
                        }
                    }
                }
            }

            let Some(pending) = self.pending.as_mut() else {
                continue;
            };
            pending.mark_sent(stats);
            let expected = pending.packet.records.len() as u32;
            wr.write_all(&pending.frame).await?;
            let sent_at = Instant::now();
            last_write = sent_at;
            stats.on_frame_sent();

            // A command may arrive before the ack: it is answered, and the wait goes on.
            let ack_by = sent_at + timeout_after;
            loop {
                answer_commands(&imei, &mut inbox, &mut commands, &mut wr).await?;
                if head(&inbox) == Head::Ack {
                    break;
                }
                // Four zero bytes and nothing after them: an ack of 0, not a frame.
                let zero_ack = inbox.len() == 4;
                let until = if zero_ack {
                    ack_by.min(Instant::now() + ZERO_ACK_WAIT)
                } else {
                    ack_by
                };
                match tokio::time::timeout_at(until, rd.read_buf(&mut inbox)).await {
                    Err(_) if zero_ack => break,
                    Err(_) => return Err(SessionError::AckTimeout(timeout_after)),
                    Ok(read) => {
                        if read? == 0 {
                            return Err(SessionError::Closed);
                        }
                    }
                }
            }
            let ack = inbox.split_to(4);
            let got = u32::from_be_bytes([ack[0], ack[1], ack[2], ack[3]]);
            // On a wrong count the loop sends the same packet again, as the device does.
            self.settle(got == expected, sent_at, stats, || SessionError::WrongAck {
                got,
                expected,
            })?;
        }
    }
}

/// Reads until `inbox` holds at least `n` bytes.
async fn read_at_least<R: AsyncRead + Unpin>(
    rd: &mut R,
    inbox: &mut BytesMut,
    n: usize,
) -> Result<(), SessionError> {
    while inbox.len() < n {
        if rd.read_buf(inbox).await? == 0 {
            return Err(SessionError::Closed);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::DuplexStream;
    use trackgate_protocol::{Frame, FrameDecoder, Limits, LoginDecoder, encode_ack};

    fn imei() -> Imei {
        Imei::parse("356307042441013").unwrap()
    }

    fn device(settings: DeviceSettings, records: u64) -> Device {
        Device::new(
            imei(),
            0,
            1,
            1_700_000_000_000,
            records,
            Arc::new(settings),
            Instant::now(),
        )
    }

    fn fast() -> DeviceSettings {
        DeviceSettings {
            codec: Codec::Codec8,
            records_per_frame: 2,
            frame_interval: None,
            response_timeout: Duration::from_millis(300),
            keep_acked: true,
            ..DeviceSettings::default()
        }
    }

    /// A scripted server end: reads the login and frames the device writes.
    struct Peer {
        io: DuplexStream,
        buf: BytesMut,
        frames: FrameDecoder,
    }

    impl Peer {
        async fn login(io: DuplexStream, reply: u8) -> (Self, Imei) {
            let mut peer = Self {
                io,
                buf: BytesMut::new(),
                frames: FrameDecoder::new(Limits::default()),
            };
            let mut login = LoginDecoder::default();
            let imei = loop {
                if let Some(imei) = login.decode(&mut peer.buf).unwrap() {
                    break imei;
                }
                assert!(peer.io.read_buf(&mut peer.buf).await.unwrap() > 0);
            };
            peer.io.write_all(&[reply]).await.unwrap();
            (peer, imei)
        }

        async fn frame(&mut self) -> Option<Frame> {
            loop {
                if let Some(frame) = self.frames.decode(&mut self.buf).unwrap() {
                    return Some(frame);
                }
                if self.io.read_buf(&mut self.buf).await.unwrap() == 0 {
                    return None;
                }
            }
        }

        async fn packet(&mut self) -> AvlPacket {
            loop {
                match self.frame().await {
                    Some(Frame::Avl(p)) => return p,
                    Some(Frame::KeepAlive) => {}
                    other => panic!("expected an AVL frame, got {other:?}"),
                }
            }
        }

        async fn ack(&mut self, n: u32) {
            self.io.write_all(&encode_ack(n)).await.unwrap();
        }
    }

    #[tokio::test]
    async fn logs_in_sends_every_record_once_and_finishes() {
        let stats = Stats::new();
        let stop = CancellationToken::new();
        let (client, server) = tokio::io::duplex(4096);
        let mut dev = device(fast(), 5);
        let server = tokio::spawn(async move {
            let (mut peer, imei) = Peer::login(server, 1).await;
            let mut counts = Vec::new();
            while let Some(Frame::Avl(p)) = peer.frame().await {
                counts.push(p.records.len());
                peer.ack(p.records.len() as u32).await;
            }
            (imei, counts)
        });
        dev.run_session(client, &stats, &stop).await.unwrap();
        drop(dev.pending.take());
        let acked = dev.acked.clone();
        drop(dev);
        let (imei_seen, counts) = server.await.unwrap();
        assert_eq!(imei_seen, imei());
        assert_eq!(counts, vec![2, 2, 1]);
        assert_eq!(acked.len(), 5);
        let report = stats.report_counts();
        assert_eq!(report.records_acked, 5);
        assert_eq!(report.resends, 0);
    }

    #[tokio::test]
    async fn wrong_ack_resends_the_same_records() {
        let stats = Stats::new();
        let stop = CancellationToken::new();
        let (client, server) = tokio::io::duplex(4096);
        let mut dev = device(fast(), 2);
        let server = tokio::spawn(async move {
            let (mut peer, _) = Peer::login(server, 1).await;
            let first = peer.packet().await;
            peer.ack(0).await; // the nack nom-teltonika sends
            let second = peer.packet().await;
            peer.ack(2).await;
            (first, second)
        });
        dev.run_session(client, &stats, &stop).await.unwrap();
        let (first, second) = server.await.unwrap();
        assert_eq!(first, second);
        let counts = stats.report_counts();
        assert_eq!((counts.wrong_acks, counts.resends), (1, 1));
        assert_eq!(dev.acked.len(), 2);
    }

    #[tokio::test]
    async fn missing_ack_closes_the_link_and_the_next_session_resends() {
        let stats = Stats::new();
        let stop = CancellationToken::new();
        let mut dev = device(fast(), 2);

        let (client, server) = tokio::io::duplex(4096);
        let silent = tokio::spawn(async move {
            let (mut peer, _) = Peer::login(server, 1).await;
            let p = peer.packet().await;
            // Never ack; wait for the device to give up and close.
            assert!(peer.frame().await.is_none());
            p
        });
        let err = dev.run_session(client, &stats, &stop).await.unwrap_err();
        assert_eq!(err.reason(), "ack_timeout");
        assert!(dev.pending.is_some());
        assert!(dev.acked.is_empty());
        let unacked = silent.await.unwrap();

        let (client, server) = tokio::io::duplex(4096);
        let acking = tokio::spawn(async move {
            let (mut peer, _) = Peer::login(server, 1).await;
            let p = peer.packet().await;
            peer.ack(2).await;
            p
        });
        dev.run_session(client, &stats, &stop).await.unwrap();
        assert_eq!(acking.await.unwrap(), unacked);
        assert_eq!(stats.report_counts().resends, 1);
        assert_eq!(dev.acked.len(), 2);
    }

    #[tokio::test]
    async fn refusal_is_reported_and_nothing_is_sent() {
        let stats = Stats::new();
        let stop = CancellationToken::new();
        let (client, server) = tokio::io::duplex(4096);
        let mut dev = device(fast(), 2);
        let server = tokio::spawn(async move {
            let (mut peer, _) = Peer::login(server, 0).await;
            peer.frame().await
        });
        let err = dev.run_session(client, &stats, &stop).await.unwrap_err();
        assert!(matches!(err, SessionError::Refused));
        drop(dev);
        assert_eq!(server.await.unwrap(), None);
    }

    #[tokio::test]
    async fn idle_device_sends_keepalives_until_stopped() {
        let stats = Stats::new();
        let stop = CancellationToken::new();
        let (client, server) = tokio::io::duplex(4096);
        let settings = DeviceSettings {
            idle: true,
            keepalive_interval: Duration::from_millis(20),
            ..fast()
        };
        let mut dev = device(settings, u64::MAX);
        let server = tokio::spawn(async move {
            let (mut peer, _) = Peer::login(server, 1).await;
            let mut pings = 0;
            while let Some(frame) = peer.frame().await {
                assert_eq!(frame, Frame::KeepAlive);
                pings += 1;
            }
            pings
        });
        let stopper = stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(150)).await;
            stopper.cancel();
        });
        dev.run_session(client, &stats, &stop).await.unwrap();
        drop(dev);
        let pings = server.await.unwrap();
        assert!((3..=10).contains(&pings), "{pings} keep-alives in 150 ms");
    }

    #[tokio::test]
    async fn server_close_while_idle_is_noticed() {
        let stats = Stats::new();
        let stop = CancellationToken::new();
        let (client, server) = tokio::io::duplex(4096);
        let settings = DeviceSettings {
            idle: true,
            ..fast()
        };
        let mut dev = device(settings, u64::MAX);
        tokio::spawn(async move {
            let (peer, _) = Peer::login(server, 1).await;
            drop(peer);
        });
        let err = dev.run_session(client, &stats, &stop).await.unwrap_err();
        assert!(matches!(err, SessionError::Closed), "{err}");
    }
}
