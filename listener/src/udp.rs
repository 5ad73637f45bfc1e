//! Teltonika UDP on the same port numbers: one datagram = one AVL packet with the IMEI inside.
//!
//! Same ack rule as TCP: `udp_ack` is sent only after Redis stored every record. The IMEI is
//! checked against the port (dedicated) or the pool (shared) for every datagram; a refused or
//! malformed datagram gets no reply, and the device resends it.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::UdpSocket;
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};
use trackgate_protocol::{decode_udp, udp_ack};
use trackgate_telemetry::Heartbeat;

use crate::config::Admission;
use crate::session::{ShardContext, publish};
use crate::sink::{Event, Sink};

/// Largest UDP payload over IPv4.
const MAX_DATAGRAM: usize = 65_507;
/// Datagrams being stored at once per port; beyond this the loop stops reading and the kernel
/// buffer (then the network) absorbs the burst.
const MAX_DATAGRAM_TASKS: usize = 512;

/// Receives datagrams until `stop`; each is stored and acked on its own task.
pub(crate) async fn serve(
    socket: UdpSocket,
    port: u16,
    ctx: Arc<ShardContext>,
    stop: CancellationToken,
    heartbeat: Arc<Heartbeat>,
    mut freeze: watch::Receiver<bool>,
    tracker: TaskTracker,
) {
    let socket = Arc::new(socket);
    let tasks = Arc::new(Semaphore::new(MAX_DATAGRAM_TASKS));
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut tick = tokio::time::interval(crate::server::BEAT_EVERY);
    loop {
        heartbeat.beat();
        tokio::select! {
            () = stop.cancelled() => break,
            _ = tick.tick() => {}
            Ok(()) = async { freeze.wait_for(|frozen| *frozen).await.map(|_| ()) } => {
                crate::server::stall(&mut freeze, &stop).await;
            }
            received = socket.recv_from(&mut buf) => match received {
                Ok((n, peer)) => {
                    let Ok(permit) = Arc::clone(&tasks).acquire_owned().await else { break };
                    let datagram = buf.get(..n).unwrap_or_default().to_vec();
                    let socket = Arc::clone(&socket);
                    let ctx = Arc::clone(&ctx);
                    tracker.spawn(async move {
                        handle(&socket, &datagram, peer, port, &ctx).await;
                        drop(permit);
                    });
                }
                Err(err) => {
                    // ICMP errors from earlier sends surface here on some systems; not fatal.
                    debug!(%err, port, "udp receive failed");
                }
            }
        }
    }
}

async fn handle(
    socket: &UdpSocket,
    datagram: &[u8],
    peer: SocketAddr,
    port: u16,
    ctx: &ShardContext,
) {
    let pool = ctx.pool.as_str();
    ctx.metrics
        .received_bytes
        .with_label_values(&[pool])
        .inc_by(datagram.len() as u64);
    let view = Arc::clone(&ctx.view.borrow());
    let keys = Arc::clone(&view.keys);
    let parsed = match decode_udp(datagram, &view.frame_limits()) {
        Ok(parsed) => parsed,
        Err(err) => {
            ctx.metrics
                .decode_errors
                .with_label_values(&[pool, err.reason()])
                .inc();
            warn!(pool, port, peer = %peer, reason = err.reason(), %err, "malformed datagram");
            ctx.sink.event(
                &keys,
                port,
                peer,
                Event::DecodeError {
                    imei: None,
                    reason: err.reason(),
                },
            );
            return;
        }
    };
    let imei = &parsed.imei;
    let admission = view.admit(port, imei);
    ctx.metrics
        .logins
        .with_label_values(&[pool, admission.label()])
        .inc();
    if admission != Admission::Accepted {
        debug!(
            pool,
            port,
            imei = imei.as_str(),
            result = admission.label(),
            "datagram refused"
        );
        ctx.sink.event(
            &keys,
            port,
            peer,
            Event::Login {
                imei: imei.as_str(),
                result: admission.label(),
            },
        );
        return;
    }
    let codec = parsed.packet.codec;
    ctx.metrics
        .frames
        .with_label_values(&[pool, codec.label()])
        .inc();
    let count = parsed.packet.records.len();
    let _inflight = ctx.sink.reserve(datagram.len()).await;
    let call = ctx.sink.prepare(
        &keys,
        &Sink::device_keys(&keys, imei),
        imei,
        codec,
        port,
        &parsed.packet.records,
    );
    let Ok(new) = publish(ctx, &call).await else {
        return;
    };
    let accepted = u8::try_from(count).unwrap_or(u8::MAX);
    if let Err(err) = socket
        .send_to(
            &udp_ack(parsed.packet_id, parsed.avl_packet_id, accepted),
            peer,
        )
        .await
    {
        debug!(%err, "udp ack not sent");
        return;
    }
    ctx.metrics
        .records
        .with_label_values(&[pool, codec.label()])
        .inc_by(count as u64);
    ctx.metrics
        .duplicate_records
        .with_label_values(&[pool])
        .inc_by((count as u64).saturating_sub(u64::from(new)));
    ctx.sink.device_state(&keys, imei.as_str(), port, false);
}
