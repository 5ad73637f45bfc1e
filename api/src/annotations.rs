//! Annotations a user sets on a `TrackerPortPool`.

/// Asks for a fresh allocation when the pool's allocation record is missing or unreadable.
///
/// Without it the operator changes nothing for such a pool (`Degraded`, reason
/// `AllocationRecordMissing` or `AllocationRecordUnreadable`), because guessing would move
/// devices to other ports. With it, devices whose port a readable shard ConfigMap still names
/// keep that port and the others get new ones. The operator removes the annotation once it has
/// acted on it, so a later loss is not silently reallocated again.
/// `kubectl annotate tpp <pool> trackgate.dev/reallocate=true`
pub const REALLOCATE: &str = "trackgate.dev/reallocate";
