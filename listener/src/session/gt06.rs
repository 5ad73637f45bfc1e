//! The GT06 half of a session: login `0x01` → the same admission as Teltonika → locations
//! stored through the same store script → the packet's echo, written only after the store.
//!
//! A frame with a bad CRC, bad stop bits or a bad length is never answered: it is counted
//! and the connection closed, as Teltonika's malformed frames are. Packets with no stored
//! layout (information, LBS-only, unknown numbers) are counted and published raw to the events
//! stream; they do not end the session. Commands are Teltonika-only.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tracing::{Span, debug, info, warn};
use trackgate_protocol::Imei;
use trackgate_protocol::gt06::{self, Frame, FrameDecoder, Location, Packet, UtcOffset};

use super::{DEVICE_STATE_EVERY, Session, SessionLimits, hex, publish};
use crate::config::Admission;
use crate::error::CloseReason;
use crate::sink::{Event, now_ms};

/// Metric label of stored GT06 locations (the `codec` label of the frame and record counters).
const LABEL: &str = "gt06";
/// Metric label of GT06 packets kept raw.
const RAW_LABEL: &str = "gt06_raw";

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    pub(super) async fn drive_gt06(
        &mut self,
        limits: SessionLimits,
        utc_offset: UtcOffset,
    ) -> CloseReason {
        let mut decoder = FrameDecoder::new(limits.frame);
        let imei = match self.gt06_login(limits, utc_offset, &mut decoder).await {
            Ok(imei) => imei,
            Err(reason) => return reason,
        };
        self.imei = Some(imei);
        self.gt06_frames(limits, utc_offset, &mut decoder, &imei)
            .await
    }

    async fn gt06_login(
        &mut self,
        limits: SessionLimits,
        utc_offset: UtcOffset,
        decoder: &mut FrameDecoder,
    ) -> Result<Imei, CloseReason> {
        let deadline = Instant::now() + limits.login_timeout;
        let frame = loop {
            match decoder.decode(&mut self.buf) {
                Ok(Some(frame)) => break frame,
                Ok(None) => {}
                Err(err) => {
                    self.count_login("malformed");
                    return Err(self.gt06_malformed(err.reason(), &err));
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
        let imei = match Packet::decode(&frame, utc_offset) {
            Ok(Packet::Login(login)) => login.imei,
            Ok(_) => {
                self.count_login("malformed");
                return Err(self.gt06_malformed("not_login", &"first packet is not a login"));
            }
            Err(err) => {
                self.count_login("malformed");
                return Err(self.gt06_malformed(err.reason(), &err));
            }
        };
        let admission = self.view.borrow().admit(self.port, &imei);
        self.count_login(admission.label());
        self.event(Event::Login {
            imei: imei.as_str(),
            result: admission.label(),
        });
        // NB: a refused GT06 login gets no reply at all: the protocol has no "refused" answer,
        // and an echo would tell the device it is logged in.
        if admission != Admission::Accepted {
            info!(
                imei = imei.as_str(),
                result = admission.label(),
                "login refused"
            );
            return Err(CloseReason::LoginRefused);
        }
        self.write_reply(&frame).await?;
        Span::current().record("imei", imei.as_str());
        debug!("login accepted");
        self.ctx
            .sink
            .device_state(&self.keys, imei.as_str(), self.port, true);
        Ok(imei)
    }

    async fn gt06_frames(
        &mut self,
        limits: SessionLimits,
        utc_offset: UtcOffset,
        decoder: &mut FrameDecoder,
        imei: &Imei,
    ) -> CloseReason {
        let idle = limits.idle_timeout;
        let mut idle_deadline = Instant::now() + idle;
        let mut state_written = Instant::now();
        loop {
            // As for Teltonika: frames already buffered are handled before the next read and
            // before shutdown, so a location fully received is stored and answered.
            let before = self.buf.len();
            match decoder.decode(&mut self.buf) {
                Ok(Some(frame)) => {
                    let size = before.saturating_sub(self.buf.len());
                    if let Err(reason) = self.gt06_handle(frame, size, utc_offset, imei).await {
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
                Ok(None) => {}
                Err(err) => return self.gt06_malformed(err.reason(), &err),
            }
            if self.ctx.stop.is_cancelled() {
                return CloseReason::Shutdown;
            }
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
            }
        }
    }

    async fn gt06_handle(
        &mut self,
        frame: Frame,
        size: usize,
        utc_offset: UtcOffset,
        imei: &Imei,
    ) -> Result<(), CloseReason> {
        match Packet::decode(&frame, utc_offset) {
            Ok(Packet::Location(location) | Packet::Alarm(location)) => {
                Box::pin(self.gt06_store(&frame, location, size, imei)).await
            }
            // The keep-alive, and a repeated login of the same device: answered, nothing stored.
            Ok(Packet::Heartbeat(_) | Packet::Login(_)) => self.write_reply(&frame).await,
            Ok(_) => {
                self.count_frame(RAW_LABEL);
                let payload_hex = hex(&frame.content);
                self.event(Event::Gt06Packet {
                    imei: imei.as_str(),
                    protocol: frame.protocol,
                    payload_hex: &payload_hex,
                });
                debug!(protocol = frame.protocol, "gt06 packet kept raw");
                self.write_reply(&frame).await
            }
            Err(err) => Err(self.gt06_malformed(err.reason(), &err)),
        }
    }

    async fn gt06_store(
        &mut self,
        frame: &Frame,
        location: Location,
        size: usize,
        imei: &Imei,
    ) -> Result<(), CloseReason> {
        let read_at = Instant::now();
        let ctx = Arc::clone(&self.ctx);
        self.count_frame(LABEL);
        let _inflight = ctx.sink.reserve(size).await;
        let call = ctx
            .sink
            .prepare_gt06(&self.keys, imei, self.port, &location, now_ms());
        let new = publish(&ctx, &call).await?;
        self.write_reply(frame).await?;
        let pool = ctx.pool.as_str();
        ctx.metrics.records.with_label_values(&[pool, LABEL]).inc();
        ctx.metrics
            .duplicate_records
            .with_label_values(&[pool])
            .inc_by(u64::from(new == 0));
        ctx.metrics
            .ack_delay
            .with_label_values(&[pool])
            .observe(read_at.elapsed().as_secs_f64());
        debug!(new, "gt06 location stored");
        Ok(())
    }

    /// Writes the echo the packet asks for, if it asks for one.
    async fn write_reply(&mut self, frame: &Frame) -> Result<(), CloseReason> {
        match gt06::reply_to(frame) {
            Some(reply) => self
                .stream
                .write_all(&reply)
                .await
                .map_err(|_| CloseReason::Io),
            None => Ok(()),
        }
    }

    fn count_frame(&self, label: &'static str) {
        self.ctx
            .metrics
            .frames
            .with_label_values(&[self.ctx.pool.as_str(), label])
            .inc();
    }

    /// As [`Session::malformed`], for GT06's errors: counted, logged once, closed unanswered.
    fn gt06_malformed(&self, reason: &'static str, err: &dyn std::fmt::Display) -> CloseReason {
        self.ctx
            .metrics
            .decode_errors
            .with_label_values(&[self.ctx.pool.as_str(), reason])
            .inc();
        warn!(reason, %err, "malformed input: closing");
        let imei = self.imei.as_ref().map(|i| i.as_str().to_owned());
        self.event(Event::DecodeError {
            imei: imei.as_deref(),
            reason,
        });
        CloseReason::Malformed
    }
}

/// The device clock of a GT06 shard (validated when the config was read).
pub(super) fn utc_offset(settings: &trackgate_api::Gt06Settings) -> UtcOffset {
    UtcOffset::from_minutes(settings.utc_offset_minutes).unwrap_or_default()
}
