//! Shard config loading and the per-config lookup tables sessions check admission against.
//!
//! Reload is a new [`ShardView`] published on a `watch` channel: the shard's port set is diffed
//! by the server (bind new ports, close removed ones) and every live session re-checks its own
//! `(port, imei)` against the new view, so devices still in the config keep their connection.
//!
//! A shared pool's admitted devices come from the config's inline `devices` plus its
//! `deviceFiles` (the pool's `devicesFrom` ConfigMaps mounted into the pod), held as one
//! [`ImeiSet`] of integers that every view of the same device files shares.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use trackgate_api::imei_list::{ImeiSet, ImeiSetBuilder};
use trackgate_api::{AdmissionMode, IdentificationMode, ShardConfig};
use trackgate_protocol::{Imei, Limits};

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

/// Where a config's relative `deviceFiles` are found: beside the config file (the pod's
/// ConfigMap mount), or the working directory for a config given in memory.
pub(crate) fn base_dir(config_file: Option<&Path>) -> PathBuf {
    config_file
        .and_then(Path::parent)
        .map(Path::to_owned)
        .unwrap_or_default()
}

/// Reads the admitted devices of a shared-mode config: inline `devices` and every
/// `deviceFiles` entry (resolved against `base`). Empty for dedicated mode.
///
/// # Errors
/// [`StartError::ReadDevices`] for a file that cannot be read, [`StartError::Devices`] naming
/// the file and line of the first entry that is not an IMEI.
pub(crate) fn load_devices(config: &ShardConfig, base: &Path) -> Result<ImeiSet, StartError> {
    let mut builder = ImeiSetBuilder::default();
    if config.mode == IdentificationMode::Dedicated {
        return Ok(builder.build());
    }
    for imei in &config.devices {
        // validate() has checked every inline IMEI; a bad one is skipped, never admitted
        if let Ok(imei) = Imei::parse(imei) {
            builder.add(&imei);
        }
    }
    for file in &config.device_files {
        let path = base.join(file);
        let text = std::fs::read_to_string(&path).map_err(|source| StartError::ReadDevices {
            path: path.clone(),
            source,
        })?;
        builder
            .add_list(&text)
            .map_err(|source| StartError::Devices { path, source })?;
    }
    Ok(builder.build())
}

/// What identifies one version of a device file. The kubelet updates a ConfigMap volume by
/// swapping the `..data` symlink to a new directory, so the resolved file changes inode and
/// mtime even when its size stays; metadata follows the symlink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FileStamp {
    len: u64,
    modified: Option<SystemTime>,
    inode: u64,
}

/// One stamp per `deviceFiles` entry; `None` for a file that cannot be read now.
pub(crate) fn device_stamps(config: &ShardConfig, base: &Path) -> Vec<Option<FileStamp>> {
    config
        .device_files
        .iter()
        .map(|file| {
            let meta = std::fs::metadata(base.join(file)).ok()?;
            #[cfg(unix)]
            let inode = std::os::unix::fs::MetadataExt::ino(&meta);
            #[cfg(not(unix))]
            let inode = 0;
            Some(FileStamp {
                len: meta.len(),
                modified: meta.modified().ok(),
                inode,
            })
        })
        .collect()
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
    /// Dedicated mode: every owner.
    owners: HashSet<String>,
    /// Shared mode: the admitted devices (inline and device files).
    devices: Arc<ImeiSet>,
    /// Redis key parts, shared by every session of this version.
    pub(crate) keys: Arc<ShardKeys>,
}

impl ShardView {
    /// `devices` is what [`load_devices`] read for `config` (ignored in dedicated mode).
    pub(crate) fn new(config: ShardConfig, devices: Arc<ImeiSet>) -> Self {
        let port_owner: HashMap<u16, Option<String>> = config
            .ports
            .iter()
            .map(|b| (b.port, b.imei.clone()))
            .collect();
        let owners = match config.mode {
            IdentificationMode::Dedicated => {
                config.ports.iter().filter_map(|b| b.imei.clone()).collect()
            }
            IdentificationMode::Shared => HashSet::new(),
        };
        Self {
            keys: Arc::new(ShardKeys::new(&config)),
            config,
            port_owner,
            owners,
            devices,
        }
    }

    /// May `imei` talk on `port`?
    pub(crate) fn admit(&self, port: u16, imei: &Imei) -> Admission {
        let Some(owner) = self.port_owner.get(&port) else {
            return Admission::PortRemoved;
        };
        let imei_str = imei.as_str();
        match (self.config.mode, owner) {
            (IdentificationMode::Dedicated, Some(owner)) if owner == imei_str => {
                Admission::Accepted
            }
            (IdentificationMode::Dedicated, _) if self.owners.contains(imei_str) => {
                Admission::PortMismatch
            }
            (IdentificationMode::Shared, _)
                if self.config.admission == AdmissionMode::Open || self.devices.contains(imei) =>
            {
                Admission::Accepted
            }
            _ => Admission::UnknownImei,
        }
    }

    /// The admitted device set of this version (shared with later versions of the same files).
    pub(crate) fn devices(&self) -> &Arc<ImeiSet> {
        &self.devices
    }

    /// The pool members this version serves, as sorted IMEI integers: the port owners in
    /// dedicated mode, the admitted set in shared mode (empty under open admission, where any
    /// IMEI is a member: see [`Self::admits_any`]).
    pub(crate) fn members(&self) -> Vec<u64> {
        let mut out: Vec<u64> = match self.config.mode {
            IdentificationMode::Dedicated => self
                .owners
                .iter()
                .filter_map(|i| Imei::parse(i).ok())
                .map(|i| i.to_u64())
                .collect(),
            IdentificationMode::Shared => self.devices.as_sorted().to_vec(),
        };
        out.sort_unstable();
        out
    }

    /// Open admission: every well-formed IMEI is a member.
    pub(crate) fn admits_any(&self) -> bool {
        self.config.mode == IdentificationMode::Shared
            && self.config.admission == AdmissionMode::Open
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
        let devices = load_devices(&cfg, Path::new("")).unwrap();
        ShardView::new(cfg, Arc::new(devices))
    }

    fn imei(s: &str) -> Imei {
        Imei::parse(s).unwrap()
    }

    #[test]
    fn dedicated_mode_binds_port_and_imei() {
        let v = view(IdentificationMode::Dedicated);
        assert_eq!(v.admit(5000, &imei("111111111111111")), Admission::Accepted);
        assert_eq!(
            v.admit(5000, &imei("222222222222222")),
            Admission::PortMismatch
        );
        assert_eq!(
            v.admit(5000, &imei("999999999999999")),
            Admission::UnknownImei
        );
        assert_eq!(
            v.admit(5002, &imei("111111111111111")),
            Admission::PortRemoved
        );
    }

    #[test]
    fn shared_mode_admits_the_pool_devices_on_any_port() {
        let v = view(IdentificationMode::Shared);
        assert_eq!(v.admit(6000, &imei("333333333333333")), Admission::Accepted);
        assert_eq!(
            v.admit(6000, &imei("111111111111111")),
            Admission::UnknownImei
        );
        assert_eq!(
            v.admit(6001, &imei("333333333333333")),
            Admission::PortRemoved
        );
    }

    #[test]
    fn open_admission_takes_any_imei_on_a_served_port() {
        let mut cfg = ShardConfig::shared("p", 0, [6000], []);
        cfg.admission = AdmissionMode::Open;
        let v = ShardView::new(cfg, Arc::default());
        assert_eq!(v.admit(6000, &imei("123456789012345")), Admission::Accepted);
        assert_eq!(
            v.admit(6001, &imei("123456789012345")),
            Admission::PortRemoved
        );
    }

    #[test]
    fn device_files_are_read_beside_the_config_with_file_and_line_in_errors() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("devices")).unwrap();
        std::fs::write(
            dir.path().join("devices/0.imeis"),
            "# fleet\n352093086403655\n",
        )
        .unwrap();
        let mut cfg = ShardConfig::shared("p", 0, [6000], ["333333333333333".to_owned()]);
        cfg.device_files = vec!["devices/0.imeis".into()];
        let set = load_devices(&cfg, dir.path()).unwrap();
        assert_eq!(set.len(), 2);
        let v = ShardView::new(cfg.clone(), Arc::new(set));
        assert_eq!(v.admit(6000, &imei("352093086403655")), Admission::Accepted);
        assert_eq!(v.admit(6000, &imei("333333333333333")), Admission::Accepted);

        std::fs::write(
            dir.path().join("devices/0.imeis"),
            "352093086403655\nnot-an-imei\n",
        )
        .unwrap();
        let err = load_devices(&cfg, dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("devices/0.imeis")
                && err.contains("line 2")
                && err.contains("not-an-imei"),
            "{err}"
        );

        cfg.device_files = vec!["devices/missing.imeis".into()];
        let err = load_devices(&cfg, dir.path()).unwrap_err().to_string();
        assert!(err.contains("devices/missing.imeis"), "{err}");
        assert_eq!(device_stamps(&cfg, dir.path()), vec![None]);
    }

    /// The kubelet's update of a ConfigMap volume: the file is reached through a `..data`
    /// symlink that is swapped to a new directory. The stamp must change although the path
    /// and even the size stay the same.
    #[cfg(unix)]
    #[test]
    fn a_symlink_swap_changes_the_stamp() {
        use std::os::unix::fs::symlink;
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir(d.join("..2026_01")).unwrap();
        std::fs::create_dir(d.join("..2026_02")).unwrap();
        std::fs::write(d.join("..2026_01/imeis"), "352093086403655\n").unwrap();
        std::fs::write(d.join("..2026_02/imeis"), "356307042441013\n").unwrap();
        symlink("..2026_01", d.join("..data")).unwrap();
        symlink("..data/imeis", d.join("imeis")).unwrap();
        let mut cfg = ShardConfig::shared("p", 0, [6000], []);
        cfg.device_files = vec!["imeis".into()];
        let before = device_stamps(&cfg, d);
        assert!(before[0].is_some());
        symlink("..2026_02", d.join("..data_tmp")).unwrap();
        std::fs::rename(d.join("..data_tmp"), d.join("..data")).unwrap();
        assert_ne!(device_stamps(&cfg, d), before);
        let set = load_devices(&cfg, d).unwrap();
        assert!(set.contains(&imei("356307042441013")));
    }
}
