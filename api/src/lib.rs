//! Types shared by the trackgate operator and listener.
//!
//! - [`shard_config`]: the file the operator writes into each shard's ConfigMap and the
//!   listener reads (and reloads) — the contract between control plane and data plane.
//!
//! This crate does no IO: no sockets, no files, no Kubernetes client. `kube` may appear here
//! only with its `derive` feature, for the `TrackerPortPool` custom resource.
#![warn(missing_docs)]

pub mod shard_config;

pub use shard_config::{IdentificationMode, ListenerLimits, PortBinding, RedisSink, ShardConfig};
