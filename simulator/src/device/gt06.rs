//! The session a GT06 device runs: login (`0x01`) and wait for its echo, then one `0x22`
//! location per frame, each followed by a `0x13` heartbeat, and a heartbeat alone when idle.
//! Every packet is built with `trackgate_protocol::gt06`'s encoders.
//!
//! GT06 has no login refusal: a server that refuses a device closes the connection, which
//! shows as [`SessionError::Closed`]. Locations have no acknowledgement in the Concox documents
//! (trackgate sends none; traccar echoes them anyway), but heartbeats do, and a store-then-ack
//! server answers a connection's packets in order: the echo of the heartbeat sent after a
//! location says the location was stored. The device counts a location acked on that echo, or
//! on the location's own echo from a server that sends one, and resends it on the next link
//! otherwise.

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::{Instant, timeout};
use tokio_util::sync::CancellationToken;
use trackgate_protocol::gt06::{
    self, FrameDecoder, Gps, Heartbeat, Lbs, Location, Login, Packet, Status, UNITS_PER_DEGREE,
    UtcOffset,
};
use trackgate_protocol::{AvlPacket, AvlRecord, Codec};

use super::{Device, Pending, SessionError, Wake};
use crate::stats::{Stats, gt06_entry_key};

/// The location type the simulator sends: GPS, LBS and the ACC/upload-mode/re-upload bytes.
const LOCATION: u8 = 0x22;
/// The status heartbeat.
const HEARTBEAT: u8 = 0x13;
/// A fixed serving cell (MCC 460, MNC 0): the simulator has no radio.
const CELL: Lbs = Lbs {
    length: None,
    mcc: 460,
    mnc: 0,
    lac: 0x287D,
    cell_id: 0x1F71,
};

/// A track record as a GT06 location, and the record as a GT06 listener will read it back
/// (second resolution, coordinates in 1/1,800,000°, speed and satellites capped by their
/// fields): the acked log must hold what the server can store.
pub(crate) fn location_from(rec: &AvlRecord) -> (Location, AvlRecord) {
    let units = |e7: i32| (u64::from(e7.unsigned_abs()) * 9 + 25) / 50;
    // |lat| <= 90° and |lon| <= 180° in the track, so both fit their u32 fields.
    let latitude = u32::try_from(units(rec.latitude)).unwrap_or(90 * UNITS_PER_DEGREE);
    let longitude = u32::try_from(units(rec.longitude)).unwrap_or(180 * UNITS_PER_DEGREE);
    let north = if rec.latitude >= 0 { 0x0400 } else { 0 };
    let west = if rec.longitude < 0 { 0x0800 } else { 0 };
    let fixed = if rec.satellites > 0 { 0x1000 } else { 0 };
    let satellites = rec.satellites.min(15);
    let gps = Gps {
        timestamp_ms: rec.timestamp_ms / 1000 * 1000,
        info: 0xC0 | satellites,
        latitude,
        longitude,
        speed: u8::try_from(rec.speed).unwrap_or(u8::MAX),
        course_status: fixed | north | west | (rec.angle % 360),
    };
    let loc = Location {
        protocol: LOCATION,
        gps,
        lbs: Some(CELL),
        status: None,
        // ACC on, upload mode 0 (timed), real-time (not a re-upload).
        extra: bytes::Bytes::from_static(&[0x01, 0x00, 0x00]),
    };
    let stored = AvlRecord {
        timestamp_ms: gps.timestamp_ms,
        latitude: gps.latitude_e7(),
        longitude: gps.longitude_e7(),
        altitude: 0,
        angle: gps.course(),
        satellites: gps.satellites(),
        speed: u16::from(gps.speed),
        priority: 0,
        event_id: 0,
        generation_type: None,
        io: Vec::new(),
    };
    (loc, stored)
}

impl Device {
    /// Builds the next location from the track as the pending packet, with serial `serial`.
    fn next_gt06_packet(&mut self, serial: u16, offset: UtcOffset) -> Result<(), SessionError> {
        let rec = self.track.next_record(Codec::Codec8);
        let (loc, stored) = location_from(&rec);
        let keys = vec![gt06_entry_key(&loc)];
        let mut frame = BytesMut::new();
        gt06::encode_packet(&Packet::Location(loc), serial, offset, &mut frame)?;
        self.records_left = self.records_left.saturating_sub(1);
        let now = Instant::now();
        self.next_frame_at = match self.settings.frame_interval {
            Some(interval) => (self.next_frame_at + interval).max(now),
            None => now,
        };
        self.pending = Some(Pending {
            packet: AvlPacket {
                codec: Codec::Codec8,
                records: vec![stored],
            },
            frame: frame.freeze(),
            keys,
            wrong_acks: 0,
            sent: false,
        });
        Ok(())
    }

    /// [`Device::run_session`] for a GT06 device whose clock runs at `offset` from UTC.
    pub(super) async fn run_gt06_session<S>(
        &mut self,
        io: S,
        stats: &Stats,
        stop: &CancellationToken,
        offset: UtcOffset,
    ) -> Result<(), SessionError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        self.logged_in = false;
        let (mut rd, mut wr) = tokio::io::split(io);
        let mut replies = Replies::default();
        let timeout_after = self.settings.response_timeout;
        let mut serial: u16 = 1;

        let login = Packet::Login(Login {
            imei: self.imei,
            type_id: None,
            time_zone_language: None,
        });
        let mut out = BytesMut::new();
        gt06::encode_packet(&login, serial, offset, &mut out)?;
        wr.write_all(&out).await?;
        match timeout(timeout_after, replies.next(&mut rd)).await {
            Err(_) => return Err(SessionError::LoginTimeout(timeout_after)),
            Ok(reply) => match reply? {
                (0x01, s) if s == serial => {}
                (p, _) => return Err(SessionError::BadLoginReply(p)),
            },
        }
        self.logged_in = true;
        let _connected = stats.connected_guard();
        let mut last_write = Instant::now();

        loop {
            while self.pending.is_none() {
                match self
                    .wait_for_frame(stop, last_write, replies.next(&mut rd))
                    .await
                {
                    Wake::Finished => return Ok(()),
                    Wake::Stopped => {}
                    Wake::KeepAlive => {
                        serial = serial.wrapping_add(1);
                        out.clear();
                        gt06::encode_packet(&heartbeat(), serial, offset, &mut out)?;
                        wr.write_all(&out).await?;
                        last_write = Instant::now();
                        stats.on_keepalive();
                    }
                    Wake::FrameDue => {
                        serial = serial.wrapping_add(1);
                        self.next_gt06_packet(serial, offset)?;
                    }
                    // Heartbeat echoes (and anything unsolicited) while idle.
                    Wake::Read(reply) => {
                        if reply?.0 != HEARTBEAT {
                            stats.on_unsolicited(1);
                        }
                    }
                }
            }

            let Some(pending) = self.pending.as_mut() else {
                continue;
            };
            pending.mark_sent(stats);
            // The serial sits 6 bytes from the end (serial, CRC, stop bits).
            let at = pending.frame.len() - 6;
            let want = u16::from_be_bytes([pending.frame[at], pending.frame[at + 1]]);
            serial = serial.wrapping_add(1);
            let barrier = serial;
            out.clear();
            out.extend_from_slice(&pending.frame);
            gt06::encode_packet(&heartbeat(), barrier, offset, &mut out)?;
            wr.write_all(&out).await?;
            let sent_at = Instant::now();
            last_write = sent_at;
            stats.on_frame_sent();

            let echoed = loop {
                let reply = match timeout(timeout_after, replies.next(&mut rd)).await {
                    Err(_) => return Err(SessionError::AckTimeout(timeout_after)),
                    Ok(reply) => reply?,
                };
                match reply {
                    (HEARTBEAT, s) if s == barrier => break true,
                    (LOCATION, s) if s == want => break true,
                    // Late echoes of earlier packets (an idle heartbeat, a barrier whose
                    // location was already echoed).
                    (HEARTBEAT, _) | (LOCATION, _) => continue,
                    _ => break false,
                }
            };
            self.settle(echoed, sent_at, stats, || SessionError::WrongEcho {
                expected: want,
            })?;
        }
    }
}

/// The heartbeat an idle device sends: ACC on, GPS tracking on, voltage level 6, GSM 4.
fn heartbeat() -> Packet {
    Packet::Heartbeat(Heartbeat {
        protocol: HEARTBEAT,
        status: Status {
            terminal_info: 0x46,
            voltage: 6,
            gsm_signal: 4,
            alarm_language: 0x0002,
        },
        extra: bytes::Bytes::new(),
    })
}

/// The server's replies as (protocol, serial), read with the real frame decoder.
#[derive(Default)]
struct Replies {
    buf: BytesMut,
    frames: FrameDecoder,
}

impl Replies {
    async fn next<R: AsyncRead + Unpin>(&mut self, rd: &mut R) -> Result<(u8, u16), SessionError> {
        loop {
            match self.frames.decode(&mut self.buf) {
                Ok(Some(f)) => return Ok((f.protocol, f.serial)),
                Ok(None) => {}
                Err(e) => return Err(SessionError::Reply(e)),
            }
            if rd.read_buf(&mut self.buf).await? == 0 {
                return Err(SessionError::Closed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use tokio::io::DuplexStream;
    use trackgate_protocol::gt06::{Frame, REPLY_LEN, reply, reply_to};
    use trackgate_protocol::{Imei, Limits};

    use super::*;
    use crate::device::{DeviceSettings, Protocol};

    fn device(records: u64, idle: bool) -> Device {
        let settings = DeviceSettings {
            protocol: Protocol::Gt06 {
                utc_offset: UtcOffset::UTC,
            },
            frame_interval: None,
            response_timeout: Duration::from_millis(300),
            keepalive_interval: Duration::from_millis(20),
            idle,
            keep_acked: true,
            ..DeviceSettings::default()
        };
        Device::new(
            Imei::parse("864717003283581").unwrap(),
            0,
            1,
            1_700_000_000_000,
            records,
            Arc::new(settings),
            Instant::now(),
        )
    }

    /// The server end: frames through the real GT06 decoder.
    struct Peer {
        io: DuplexStream,
        buf: BytesMut,
        frames: FrameDecoder,
    }

    impl Peer {
        fn new(io: DuplexStream) -> Self {
            Peer {
                io,
                buf: BytesMut::new(),
                frames: FrameDecoder::new(Limits::default()),
            }
        }

        async fn frame(&mut self) -> Option<Frame> {
            loop {
                if let Some(f) = self.frames.decode(&mut self.buf).unwrap() {
                    return Some(f);
                }
                if self.io.read_buf(&mut self.buf).await.unwrap() == 0 {
                    return None;
                }
            }
        }

        async fn send(&mut self, bytes: &[u8]) {
            self.io.write_all(bytes).await.unwrap();
        }

        /// Answers each frame with what `answer` gives until the device closes; returns the
        /// frames.
        async fn serve(mut self, answer: fn(&Frame) -> Option<[u8; REPLY_LEN]>) -> Vec<Frame> {
            let mut frames = Vec::new();
            while let Some(f) = self.frame().await {
                if let Some(r) = answer(&f) {
                    self.send(&r).await;
                }
                frames.push(f);
            }
            frames
        }
    }

    /// A traccar-like server: every frame echoed, locations included.
    fn echo_all(f: &Frame) -> Option<[u8; REPLY_LEN]> {
        Some(reply(f.protocol, f.serial))
    }

    #[tokio::test]
    async fn logs_in_and_every_location_is_echoed_once() {
        let stats = Stats::new();
        let stop = CancellationToken::new();
        let (client, server) = tokio::io::duplex(4096);
        let mut dev = device(3, false);
        let server = tokio::spawn(Peer::new(server).serve(echo_all));
        dev.run_session(client, &stats, &stop).await.unwrap();
        let acked = std::mem::take(&mut dev.acked);
        drop(dev);
        let packets: Vec<_> = server
            .await
            .unwrap()
            .iter()
            .map(|f| Packet::decode(f, UtcOffset::UTC).unwrap())
            .collect();
        let Packet::Login(login) = &packets[0] else {
            panic!("{:?}", packets[0])
        };
        assert_eq!(login.imei.as_str(), "864717003283581");
        let locations: Vec<_> = packets[1..]
            .iter()
            .filter_map(|p| match p {
                Packet::Location(l) => Some(l.clone()),
                Packet::Heartbeat(_) => None,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(locations.len(), 3);
        // What the device logged as acked is what the server decoded.
        for (l, a) in locations.iter().zip(&acked) {
            assert_eq!(l.gps.timestamp_ms, a.ts_ms);
        }
        assert_eq!(acked.len(), 3);
        assert_eq!(stats.report_counts().records_acked, 3);
    }

    #[tokio::test]
    async fn unechoed_location_is_resent_on_the_next_link() {
        let stats = Stats::new();
        let stop = CancellationToken::new();
        let mut dev = device(1, false);
        let (client, server) = tokio::io::duplex(4096);
        let silent = tokio::spawn(async move {
            let mut peer = Peer::new(server);
            let login = peer.frame().await.unwrap();
            peer.send(&reply_to(&login).unwrap()).await;
            let loc = peer.frame().await.unwrap();
            assert_eq!(peer.frame().await.unwrap().protocol, HEARTBEAT);
            assert!(
                peer.frame().await.is_none(),
                "the device closes after the timeout"
            );
            loc
        });
        let err = dev.run_session(client, &stats, &stop).await.unwrap_err();
        assert_eq!(err.reason(), "ack_timeout");
        let first = silent.await.unwrap();

        let (client, server) = tokio::io::duplex(4096);
        let acking = tokio::spawn(async move {
            let mut peer = Peer::new(server);
            let login = peer.frame().await.unwrap();
            peer.send(&reply_to(&login).unwrap()).await;
            let loc = peer.frame().await.unwrap();
            peer.send(&reply(loc.protocol, loc.serial)).await;
            loc
        });
        dev.run_session(client, &stats, &stop).await.unwrap();
        assert_eq!(
            acking.await.unwrap(),
            first,
            "the same bytes, serial included"
        );
        assert_eq!(stats.report_counts().resends, 1);
    }

    /// A server that, like trackgate's listener, echoes heartbeats but not locations: the
    /// heartbeat sent behind each location is its ack, since the server answers in order.
    #[tokio::test]
    async fn heartbeat_echo_behind_a_location_acks_it() {
        let stats = Stats::new();
        let stop = CancellationToken::new();
        let (client, server) = tokio::io::duplex(4096);
        let mut dev = device(3, false);
        let server = tokio::spawn(Peer::new(server).serve(reply_to));
        dev.run_session(client, &stats, &stop).await.unwrap();
        assert_eq!(dev.acked.len(), 3);
        drop(dev);
        let frames = server.await.unwrap();
        let locations = frames.iter().filter(|f| f.protocol == LOCATION).count();
        assert_eq!(locations, 3, "each location sent once");
        assert_eq!(stats.report_counts().resends, 0);
    }

    #[tokio::test]
    async fn idle_device_sends_heartbeats() {
        let stats = Stats::new();
        let stop = CancellationToken::new();
        let (client, server) = tokio::io::duplex(4096);
        let mut dev = device(u64::MAX, true);
        let server = tokio::spawn(Peer::new(server).serve(echo_all));
        let stopper = stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(150)).await;
            stopper.cancel();
        });
        dev.run_session(client, &stats, &stop).await.unwrap();
        drop(dev);
        let frames = server.await.unwrap();
        // After the login, nothing but heartbeats.
        for f in &frames[1..] {
            let packet = Packet::decode(f, UtcOffset::UTC).unwrap();
            assert!(matches!(packet, Packet::Heartbeat(_)), "{packet:?}");
        }
        let n = frames.len() - 1;
        assert!((3..=10).contains(&n), "{n} heartbeats in 150 ms");
    }

    /// No login echo (a server that refuses closes): reported as closed, nothing sent.
    #[tokio::test]
    async fn refused_login_is_a_close() {
        let stats = Stats::new();
        let stop = CancellationToken::new();
        let (client, server) = tokio::io::duplex(4096);
        let mut dev = device(2, false);
        tokio::spawn(async move {
            let mut peer = Peer::new(server);
            peer.frame().await.unwrap();
            drop(peer);
        });
        let err = dev.run_session(client, &stats, &stop).await.unwrap_err();
        assert!(matches!(err, SessionError::Closed), "{err}");
        assert!(dev.pending.is_none());
    }

    /// Coordinates survive the trip through GT06 units to within the 7th decimal.
    #[test]
    fn track_record_to_location() {
        let rec = AvlRecord {
            timestamp_ms: 1_700_000_000_500,
            latitude: -337_000_000,
            longitude: 1_512_000_001,
            altitude: 10,
            angle: 359,
            satellites: 20,
            speed: 300,
            priority: 0,
            event_id: 0,
            generation_type: None,
            io: Vec::new(),
        };
        let (loc, stored) = location_from(&rec);
        assert_eq!(stored.timestamp_ms, 1_700_000_000_000);
        assert!((stored.latitude - rec.latitude).abs() <= 3);
        assert!((stored.longitude - rec.longitude).abs() <= 3);
        assert_eq!(
            (stored.angle, stored.satellites, stored.speed),
            (359, 15, 255)
        );
        assert_eq!(loc.gps.latitude_e7(), stored.latitude);
        let mut out = BytesMut::new();
        Packet::Location(loc)
            .encode_content(UtcOffset::UTC, &mut out)
            .unwrap();
    }
}
