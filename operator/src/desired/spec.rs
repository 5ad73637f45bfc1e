//! Spec validation the schema cannot do, and the pool's devices from inline entries and
//! `devicesFrom` ConfigMaps.

use std::collections::HashSet;

use trackgate_api::{ExposureType, TrackerPortPoolSpec};

use crate::allocate::{self, PoolDevice};

/// Why a pool cannot be turned into objects. These are spec errors: the pool gets `Degraded`
/// and the operator waits for a change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SpecError {
    /// A `devicesFrom` ConfigMap or key is missing.
    #[error("devicesFrom: ConfigMap {config_map} has no key {key}")]
    MissingDeviceSource {
        /// ConfigMap name.
        config_map: String,
        /// Key.
        key: String,
    },
    /// A `devicesFrom` list holds something that is not an IMEI.
    #[error("devicesFrom: ConfigMap {config_map} key {key}: {source}")]
    BadDeviceSource {
        /// ConfigMap name.
        config_map: String,
        /// Key.
        key: String,
        /// The bad line.
        source: allocate::LineError,
    },
    /// A rule the schema does not check (older CRD installed, or `trackgate run` on a file).
    #[error("{0}")]
    Invalid(String),
}

impl SpecError {
    /// The condition reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::MissingDeviceSource { .. } | Self::BadDeviceSource { .. } => {
                trackgate_api::conditions::reasons::DEVICE_SOURCE_UNAVAILABLE
            }
            Self::Invalid(_) => trackgate_api::conditions::reasons::INVALID_SPEC,
        }
    }
}

/// Checks what the CRD schema checks, for pools that did not come through the API server
/// (`trackgate run`) or an older CRD.
///
/// # Errors
/// [`SpecError::Invalid`] naming the first broken rule.
pub fn validate(spec: &TrackerPortPoolSpec) -> Result<(), SpecError> {
    let bad = |m: &str| Err(SpecError::Invalid(m.to_owned()));
    if spec.ports.start == 0 || spec.ports.start > spec.ports.end {
        return bad("spec.ports: start must be between 1 and end");
    }
    if spec.sharding.ports_per_shard == 0 || spec.sharding.replicas_per_shard == 0 {
        return bad("spec.sharding: portsPerShard and replicasPerShard must be at least 1");
    }
    if spec.exposure.type_ == ExposureType::NodePort
        && (spec.ports.start < 30000 || spec.ports.end > 32767)
    {
        return bad("exposure.type NodePort needs spec.ports inside 30000-32767");
    }
    if spec.redis.sink.partitions == 0 {
        return bad("spec.redis.partitions must be at least 1");
    }
    let mut seen = HashSet::new();
    for d in &spec.devices {
        if !allocate::is_imei(&d.imei) {
            return Err(SpecError::Invalid(format!(
                "device {:?} is not a 15-digit IMEI",
                d.imei
            )));
        }
        if !seen.insert(d.imei.as_str()) {
            return Err(SpecError::Invalid(format!(
                "device {} is listed twice",
                d.imei
            )));
        }
    }
    Ok(())
}

/// The pool's devices: inline entries first (so an inline pin wins), then each `devicesFrom`
/// source in order. `source` returns the text of a ConfigMap key, `None` when missing.
///
/// # Errors
/// A missing or malformed source.
pub fn pool_devices<'a>(
    spec: &TrackerPortPoolSpec,
    source: impl Fn(&str, &str) -> Option<&'a str>,
) -> Result<Vec<PoolDevice>, SpecError> {
    let mut out: Vec<PoolDevice> = spec
        .devices
        .iter()
        .map(|d| PoolDevice {
            imei: d.imei.clone(),
            pinned: d.port,
        })
        .collect();
    for src in &spec.devices_from {
        let text =
            source(&src.config_map, &src.key).ok_or_else(|| SpecError::MissingDeviceSource {
                config_map: src.config_map.clone(),
                key: src.key.clone(),
            })?;
        let imeis =
            allocate::parse_imei_list(text).map_err(|source| SpecError::BadDeviceSource {
                config_map: src.config_map.clone(),
                key: src.key.clone(),
                source,
            })?;
        out.extend(
            imeis
                .into_iter()
                .map(|imei| PoolDevice { imei, pinned: None }),
        );
    }
    Ok(out)
}
