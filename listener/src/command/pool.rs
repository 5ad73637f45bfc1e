//! The pool tasks, one of each per pool and process: the router (while it holds the pool's
//! router lease), the wake-up subscription, and the sweeper.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tracing::{debug, warn};
use trackgate_api::redis_layout::CommandReason;

use super::entry::parse_entry;
use super::store::{PoolKeys, ROUTER_LEASE, Router, Swept};
use super::{Commands, RETRY_AFTER, SWEEP_EVERY};

impl Commands {
    pub(super) async fn route(self, keys: Arc<PoolKeys>) {
        let inner = &self.inner;
        // The blocking read has a connection of its own, so it delays no other call.
        let conn = redis::aio::ConnectionManager::new_lazy_with_config(
            inner.client.clone(),
            super::store::connection_config(inner.options.redis_timeout + Duration::from_secs(2)),
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
            lead: super::store::lead_script(),
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
    pub(super) async fn wake_ups(self, keys: Arc<PoolKeys>) {
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

    pub(super) async fn sweep(self, keys: Arc<PoolKeys>) {
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
