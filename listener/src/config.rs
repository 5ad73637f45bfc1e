//! Shard config loading and the per-config lookup tables sessions check admission against.
//!
//! Reload is a new [`ShardView`] published on a `watch` channel: the shard's port set is diffed
//! by the server (bind new ports, close removed ones) and every live session re-checks its own
//! `(port, imei)` against the new view, so devices still in the config keep their connection.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use trackgate_api::{IdentificationMode, ShardConfig};
use trackgate_protocol::Limits;

use crate::error::StartError;
use crate::sink::ShardKeys;

/// Reads and validates a shard config file.
///
/// # Errors
/// [`StartError::ReadConfig`] or [`StartError::Config`].
pub fn load(path: &Path) -> Result<(ShardConfig, String), StartError> {
    let text = std::fs::read_to_string(path).map_err(|source| StartError::ReadConfig {
        path: path.to_owned(),
        source,
    })?;
    let config = ShardConfig::from_json(&text).map_err(|source| StartError::Config {
        origin: path.display().to_string(),
        source,
    })?;
    Ok((config, text))
}

/// The outcome of checking a login (or a UDP datagram's IMEI) against the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admission {
    Accepted,
    /// The IMEI is not in this shard.
    UnknownImei,
    /// Dedicated mode: the IMEI belongs to another port of this shard.
    PortMismatch,
    /// The port is no longer served.
    PortRemoved,
}

impl Admission {
    /// The `result` label of `trackgate_listener_logins_total`.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Admission::Accepted => "accepted",
            Admission::UnknownImei => "unknown_imei",
            Admission::PortMismatch => "port_mismatch",
            Admission::PortRemoved => "port_removed",
        }
    }
}

/// One version of a shard config with its lookup tables.
#[derive(Debug)]
pub(crate) struct ShardView {
    pub(crate) config: ShardConfig,
    /// Dedicated mode: port → owner IMEI; shared mode: ports with no owner.
    port_owner: HashMap<u16, Option<String>>,
    /// Dedicated mode: every owner; shared mode: the admitted devices.
    imeis: HashSet<String>,
    /// Redis key parts, shared by every session of this version.
    pub(crate) keys: Arc<ShardKeys>,
}

impl ShardView {
    pub(crate) fn new(config: ShardConfig) -> Self {
        let port_owner: HashMap<u16, Option<String>> = config
            .ports
            .iter()
            .map(|b| (b.port, b.imei.clone()))
            .collect();
        let imeis = match config.mode {
            IdentificationMode::Dedicated => {
                config.ports.iter().filter_map(|b| b.imei.clone()).collect()
            }
            IdentificationMode::Shared => config.devices.iter().cloned().collect(),
        };
        Self {
            keys: Arc::new(ShardKeys::new(&config)),
            config,
            port_owner,
            imeis,
        }
    }

    /// May `imei` talk on `port`?
    pub(crate) fn admit(&self, port: u16, imei: &str) -> Admission {
        let Some(owner) = self.port_owner.get(&port) else {
            return Admission::PortRemoved;
        };
        match (self.config.mode, owner) {
            (IdentificationMode::Dedicated, Some(owner)) if owner == imei => Admission::Accepted,
            (IdentificationMode::Dedicated, _) if self.imeis.contains(imei) => {
                Admission::PortMismatch
            }
            (IdentificationMode::Shared, _) if self.imeis.contains(imei) => Admission::Accepted,
            _ => Admission::UnknownImei,
        }
    }

    /// Every device this version admits.
    pub(crate) fn imeis(&self) -> &HashSet<String> {
        &self.imeis
    }

    pub(crate) fn ports(&self) -> impl Iterator<Item = u16> + '_ {
        self.port_owner.keys().copied()
    }

    pub(crate) fn frame_limits(&self) -> Limits {
        Limits::new(usize::try_from(self.config.limits.max_frame_bytes).unwrap_or(usize::MAX))
    }

    pub(crate) fn login_timeout(&self) -> Duration {
        self.config.limits.login_timeout()
    }

    pub(crate) fn idle_timeout(&self) -> Duration {
        self.config.limits.idle_timeout()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trackgate_api::PortBinding;

    fn view(mode: IdentificationMode) -> ShardView {
        let mut cfg = ShardConfig::from_json(
            r#"{"pool":"p","shard":0,"mode":"dedicated","ports":[
                {"port":5000,"imei":"111111111111111"},{"port":5001,"imei":"222222222222222"}]}"#,
        )
        .unwrap();
        if mode == IdentificationMode::Shared {
            cfg.mode = mode;
            cfg.ports = vec![PortBinding {
                port: 6000,
                imei: None,
            }];
            cfg.devices = vec!["333333333333333".into()];
        }
        ShardView::new(cfg)
    }

    #[test]
    fn dedicated_mode_binds_port_and_imei() {
        let v = view(IdentificationMode::Dedicated);
        assert_eq!(v.admit(5000, "111111111111111"), Admission::Accepted);
        assert_eq!(v.admit(5000, "222222222222222"), Admission::PortMismatch);
        assert_eq!(v.admit(5000, "999999999999999"), Admission::UnknownImei);
        assert_eq!(v.admit(5002, "111111111111111"), Admission::PortRemoved);
    }

    #[test]
    fn shared_mode_admits_the_pool_devices_on_any_port() {
        let v = view(IdentificationMode::Shared);
        assert_eq!(v.admit(6000, "333333333333333"), Admission::Accepted);
        assert_eq!(v.admit(6000, "111111111111111"), Admission::UnknownImei);
        assert_eq!(v.admit(6001, "333333333333333"), Admission::PortRemoved);
    }
}
