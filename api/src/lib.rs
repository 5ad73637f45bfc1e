//! Types shared by the trackgate operator and listener.
//!
//! - [`pool`]: the `TrackerPortPool` custom resource (spec, status, CEL rules).
//! - [`annotations`]: annotations a user sets on a pool to ask the operator for something.
//! - [`conditions`]: condition types and reasons of the pool status.
//! - [`redis_layout`]: the Redis contract — key names, partition function, entry fields,
//!   fingerprint, the store script and the command keys — shared by the listener, the simulator, the CLI and the
//!   tests.
//! - [`imei_list`]: the `devicesFrom` IMEI list format and the compact set listeners admit from.
//! - [`shard_config`]: the file the operator writes into each shard's ConfigMap and the
//!   listener reads (and reloads) — the contract between control plane and data plane.
//!
//! This crate does no IO (it depends only on the sans-io protocol crate): no sockets, no files, no Kubernetes client. `kube` may appear here
//! only with its `derive` feature, for the `TrackerPortPool` custom resource.
#![warn(missing_docs)]

pub mod annotations;
pub mod conditions;
pub mod imei_list;
pub mod pool;
pub mod redis_layout;
pub mod shard_config;

pub use pool::{
    Device, DeviceSource, Exposure, ExposureType, ExternalTrafficPolicy, ListenerPod, PortRange,
    RedisSpec, RedisTls, Scaling, SecretKeyRef, ShardStatus, Sharding, TrackerPortPool,
    TrackerPortPoolSpec, TrackerPortPoolStatus,
};
pub use shard_config::{
    AckMode, AdmissionMode, Durability, Gt06Settings, IdentificationMode, ListenerLimits,
    PortBinding, Protocol, RedisSink, ShardConfig,
};
