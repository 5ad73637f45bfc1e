//! One device's driver: takes its commands one at a time and sees each to its outcome.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::{debug, warn};
use trackgate_api::redis_layout::{CommandReason, CommandStatus};
use trackgate_protocol::Imei;

use super::entry::QueuedCommand;
use super::store::{Outcome, PoolKeys, Taken};
use super::{Commands, DriverMsg, Outgoing, RETRY_AFTER, Reply, WRITE_LEASE, command_frame};

/// Sends one device its commands, one at a time, while it is connected here.
pub(super) struct Driver {
    pub(super) commands: Commands,
    pub(super) keys: Arc<PoolKeys>,
    pub(super) imei: Imei,
    pub(super) inbox: mpsc::Receiver<DriverMsg>,
}

impl Driver {
    pub(super) async fn run(mut self) {
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
