//! Liveness from heartbeats, readiness from named conditions.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

/// Shared health state; cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Health {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    // NB: std Mutex: held for microseconds, never across an await (mini-redis's reasoning).
    heartbeats: Mutex<Vec<Weak<Heartbeat>>>,
    /// Condition name → `Err(why)` while it does not hold (`why` may be empty).
    ready: Mutex<BTreeMap<String, Result<(), String>>>,
}

/// A component's proof of progress. The component calls [`Heartbeat::beat`] each time round its
/// loop (and on a timer inside that loop, so an idle but healthy loop still beats). Dropping the
/// last `Arc` retires it: a port that is closed on purpose no longer counts.
#[derive(Debug)]
pub struct Heartbeat {
    name: String,
    origin: Instant,
    last_ms: AtomicU64,
    max_silence: Duration,
}

impl Heartbeat {
    /// Records progress now.
    pub fn beat(&self) {
        self.last_ms
            .store(millis_since(self.origin), Ordering::Relaxed);
    }

    /// Name given at registration.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn silence(&self) -> Duration {
        let last = self.last_ms.load(Ordering::Relaxed);
        Duration::from_millis(millis_since(self.origin).saturating_sub(last))
    }
}

fn millis_since(origin: Instant) -> u64 {
    u64::try_from(origin.elapsed().as_millis()).unwrap_or(u64::MAX)
}

impl Health {
    /// A new, empty health state: live, and ready until a readiness condition is declared.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a heartbeat that fails liveness when silent for longer than `max_silence`.
    /// It starts beaten.
    pub fn heartbeat(&self, name: impl Into<String>, max_silence: Duration) -> Arc<Heartbeat> {
        let heartbeat = Arc::new(Heartbeat {
            name: name.into(),
            origin: Instant::now(),
            last_ms: AtomicU64::new(0),
            max_silence,
        });
        let mut beats = lock(&self.inner.heartbeats);
        beats.retain(|b| b.strong_count() > 0);
        beats.push(Arc::downgrade(&heartbeat));
        heartbeat
    }

    /// Declares or updates a readiness condition.
    pub fn set_ready(&self, condition: impl Into<String>, ready: bool) {
        let state = if ready { Ok(()) } else { Err(String::new()) };
        lock(&self.inner.ready).insert(condition.into(), state);
    }

    /// Declares or updates a readiness condition with the reason it does not hold, which
    /// `/readyz` shows next to its name.
    pub fn set_condition(&self, condition: impl Into<String>, state: Result<(), String>) {
        lock(&self.inner.ready).insert(condition.into(), state);
    }

    /// `Ok` while every live heartbeat is fresh; otherwise the stale ones and their silence.
    ///
    /// # Errors
    /// A human-readable list of stale heartbeats.
    pub fn liveness(&self) -> Result<(), String> {
        let stale: Vec<String> = lock(&self.inner.heartbeats)
            .iter()
            .filter_map(Weak::upgrade)
            .filter(|b| b.silence() > b.max_silence)
            .map(|b| format!("{} ({}s)", b.name, b.silence().as_secs()))
            .collect();
        if stale.is_empty() {
            Ok(())
        } else {
            Err(format!("stale: {}", stale.join(", ")))
        }
    }

    /// `Ok` when every declared readiness condition holds.
    ///
    /// # Errors
    /// The names of the conditions that do not hold.
    pub fn readiness(&self) -> Result<(), String> {
        let missing: Vec<String> = lock(&self.inner.ready)
            .iter()
            .filter_map(|(name, state)| match state {
                Ok(()) => None,
                Err(why) if why.is_empty() => Some(name.clone()),
                Err(why) => Some(format!("{name} ({why})")),
            })
            .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(format!("not ready: {}", missing.join(", ")))
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding this lock cannot leave the data half-written (single inserts and
    // retains), so a poisoned lock is still safe to use.
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_silent_heartbeat_fails_liveness_and_a_dropped_one_is_forgotten() {
        let health = Health::new();
        let fast = health.heartbeat("accept:5000", Duration::from_millis(30));
        let _slow = health.heartbeat("publisher", Duration::from_secs(60));
        assert_eq!(health.liveness(), Ok(()));
        std::thread::sleep(Duration::from_millis(60));
        let err = health.liveness().unwrap_err();
        assert!(
            err.contains("accept:5000") && !err.contains("publisher"),
            "{err}"
        );
        fast.beat();
        assert_eq!(health.liveness(), Ok(()));
        std::thread::sleep(Duration::from_millis(60));
        drop(fast);
        assert_eq!(health.liveness(), Ok(()));
    }

    #[test]
    fn readiness_needs_every_condition() {
        let health = Health::new();
        assert_eq!(health.readiness(), Ok(()));
        health.set_ready("config", true);
        health.set_ready("redis", false);
        assert_eq!(health.readiness(), Err("not ready: redis".to_owned()));
        health.set_ready("redis", true);
        assert_eq!(health.readiness(), Ok(()));
        health.set_condition("redis", Err("WRONGPASS".to_owned()));
        assert_eq!(
            health.readiness(),
            Err("not ready: redis (WRONGPASS)".to_owned())
        );
    }
}
