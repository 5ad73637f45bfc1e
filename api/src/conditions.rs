//! Condition types and reasons of a `TrackerPortPool`'s status, as constants.
//!
//! Conditions follow the Kubernetes API conventions: `type` is a CamelCase noun or adjective,
//! `status` is `"True"`, `"False"` or `"Unknown"`, `reason` is a CamelCase word a program can
//! match on, `message` is for people.

/// All is well: ports allocated, every listener shard available, no spec error.
pub const READY: &str = "Ready";
/// Every device of the pool holds a port.
pub const PORTS_ALLOCATED: &str = "PortsAllocated";
/// Every shard has all its listener replicas ready.
pub const LISTENERS_AVAILABLE: &str = "ListenersAvailable";
/// The pool cannot be served as written; the operator waits for a change.
pub const DEGRADED: &str = "Degraded";
/// The exposure stays within the known limits of cloud load balancers.
pub const EXPOSURE_WITHIN_LIMITS: &str = "ExposureWithinLimits";

/// Reasons, `&'static str` so they can also label metrics and Events.
pub mod reasons {
    /// Every device holds a port.
    pub const ALL_ALLOCATED: &str = "AllAllocated";
    /// The port range is full: some devices hold no port.
    pub const PORTS_EXHAUSTED: &str = "PortsExhausted";
    /// A device pins a port that it cannot have.
    pub const PINNED_PORT_UNAVAILABLE: &str = "PinnedPortUnavailable";
    /// Every replica of every shard is ready.
    pub const ALL_REPLICAS_READY: &str = "AllReplicasReady";
    /// Some replicas are not ready yet.
    pub const REPLICAS_NOT_READY: &str = "ReplicasNotReady";
    /// The pool has no devices, so no shard runs.
    pub const NO_DEVICES: &str = "NoDevices";
    /// The spec is valid.
    pub const SPEC_VALID: &str = "SpecValid";
    /// The spec breaks a rule the schema could not check.
    pub const INVALID_SPEC: &str = "InvalidSpec";
    /// A ConfigMap named in `devicesFrom` is missing or malformed.
    pub const DEVICE_SOURCE_UNAVAILABLE: &str = "DeviceSourceUnavailable";
    /// The pool is fully served.
    pub const POOL_READY: &str = "PoolReady";
    /// The pool is not fully served yet; see the other conditions.
    pub const POOL_NOT_READY: &str = "PoolNotReady";
    /// Exposure is within limits.
    pub const WITHIN_LIMITS: &str = "WithinLimits";
    /// A shard's Service has more listeners than an AWS Network Load Balancer accepts.
    pub const AWS_NLB_LISTENER_LIMIT: &str = "AwsNlbListenerLimit";
    /// The allocation changed (Event reason).
    pub const ALLOCATION_CHANGED: &str = "AllocationChanged";
    /// The allocation record ConfigMap is gone while shards exist (Degraded reason).
    pub const ALLOCATION_RECORD_MISSING: &str = "AllocationRecordMissing";
    /// The allocation record cannot be read (Degraded reason).
    pub const ALLOCATION_RECORD_UNREADABLE: &str = "AllocationRecordUnreadable";
    /// A fresh allocation was made on request (Event reason).
    pub const REALLOCATED: &str = "Reallocated";
    /// A node port the pool needs is held by another Service (Degraded reason).
    pub const NODE_PORT_IN_USE: &str = "NodePortInUse";
    /// The node-port range cannot hold the node ports the pool needs (Degraded reason).
    pub const NODE_PORT_RANGE_FULL: &str = "NodePortRangeFull";
    /// An object is larger than the API server accepts (Degraded reason).
    pub const TOO_LARGE: &str = "TooLarge";
    /// The operator's ServiceAccount may not write an object (Degraded reason).
    pub const FORBIDDEN: &str = "Forbidden";
    /// The API server refused a write for another reason (Degraded reason).
    pub const APPLY_FAILED: &str = "ApplyFailed";
    /// Not known yet: the reconcile stopped before it could tell.
    pub const UNKNOWN: &str = "Unknown";
    /// A Deployment is still rolling out.
    pub const ROLLOUT_IN_PROGRESS: &str = "RolloutInProgress";
}
