//! Types shared by the trackgate operator and listener.
//!
//! - [`pool`]: the `TrackerPortPool` custom resource (spec, status, CEL rules).
//! - [`annotations`]: annotations a user sets on a pool to ask the operator for something.
//! - [`conditions`]: condition types and reasons of the pool status.
//! - [`shard_config`]: the file the operator writes into each shard's ConfigMap and the
//!   listener reads (and reloads) — the contract between control plane and data plane.
//!
//! This crate does no IO: no sockets, no files, no Kubernetes client. `kube` may appear here
//! only with its `derive` feature, for the `TrackerPortPool` custom resource.
#![warn(missing_docs)]

pub mod annotations;
pub mod conditions;
pub mod pool;
pub mod shard_config;

pub use pool::{
    Device, DeviceSource, Exposure, ExposureType, ExternalTrafficPolicy, ListenerPod, PortRange,
    Protocol, RedisSpec, SecretKeyRef, ShardStatus, Sharding, TrackerPortPool, TrackerPortPoolSpec,
    TrackerPortPoolStatus,
};
pub use shard_config::{IdentificationMode, ListenerLimits, PortBinding, RedisSink, ShardConfig};
