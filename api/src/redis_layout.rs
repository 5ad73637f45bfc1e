//! The Redis layout: key names, stream fields and the values consumers read.
//!
//! Every key of a pool carries the pool's hash tag `{<pool>}` (readings: `{<pool>:<n>}`), so a
//! script touching several of them runs on one Redis Cluster node.

// === commands ===
//
// The cloud-to-device path. A service `XADD`s to the pool's command stream; a listener of the
// pool routes each entry (consumer group [`COMMANDS_GROUP`]) to the device's queue; the
// listener holding the device's session sends it and records the answer in the responses
// stream and the command's status hash. docs/architecture.md "Commands to devices" has the
// state machine, docs/operations.md the consumer's view.

/// `<prefix>:{<pool>}:commands`: the stream services `XADD` commands to
/// (fields in [`command_field`]).
pub fn commands_key(prefix: &str, pool: &str) -> String {
    format!("{prefix}:{{{pool}}}:commands")
}

/// `<prefix>:{<pool>}:responses`: the durable stream of every status change of every command
/// (`queued`, `sent`, then one final status), with the device's answer.
pub fn command_responses_key(prefix: &str, pool: &str) -> String {
    format!("{prefix}:{{{pool}}}:responses")
}

/// `<prefix>:{<pool>}:command:<id>`: a hash with the command's current status, for lookup by
/// id; it expires [`COMMAND_STATUS_RETENTION_SECONDS`] after the command's final status.
pub fn command_status_key(prefix: &str, pool: &str, id: &str) -> String {
    format!("{prefix}:{{{pool}}}:command:{id}")
}

/// `<prefix>:{<pool>}:cmdqueue:<imei>`: a list, the device's commands not yet taken, oldest
/// first (each a JSON object `{"id","codec","payload","expires"}`, payload in hex).
pub fn command_queue_key(prefix: &str, pool: &str, imei: &str) -> String {
    format!("{prefix}:{{{pool}}}:cmdqueue:{imei}")
}

/// `<prefix>:{<pool>}:cmdinflight:<imei>`: a hash, the device's one outstanding command and
/// the lease of the listener that took it (`id`, `body`, `owner`, `deadline`, `sent`).
pub fn command_inflight_key(prefix: &str, pool: &str, imei: &str) -> String {
    format!("{prefix}:{{{pool}}}:cmdinflight:{imei}")
}

/// `<prefix>:{<pool>}:cmddeadlines`: a sorted set of every command without a final status,
/// scored by its expiry (ms since the epoch): the sweeper's index and the queue depth.
pub fn command_deadlines_key(prefix: &str, pool: &str) -> String {
    format!("{prefix}:{{{pool}}}:cmddeadlines")
}

/// `<prefix>:{<pool>}:members`: a hash, IMEI → shard index, of every device in the pool's
/// shard configs (written by the listeners): how a command for an unknown IMEI fails at once.
pub fn pool_members_key(prefix: &str, pool: &str) -> String {
    format!("{prefix}:{{{pool}}}:members")
}

/// The members field of a pool with open admission: every well-formed IMEI is a member.
pub const ANY_MEMBER: &str = "*";

/// `<prefix>:{<pool>}:cmdready`: the Pub/Sub channel on which an IMEI is published when it has
/// a command to take (routed, or the previous one resolved). A wake-up only: listeners also
/// look at every device they hold after (re)subscribing, so a lost message delays nothing
/// beyond that.
pub fn command_ready_channel(prefix: &str, pool: &str) -> String {
    format!("{prefix}:{{{pool}}}:cmdready")
}

/// `<prefix>:{<pool>}:cmdrouter`: the routing lease, a string holding the listener that routes
/// the pool's commands now. One router per pool keeps each device's commands in stream order.
pub fn command_router_key(prefix: &str, pool: &str) -> String {
    format!("{prefix}:{{{pool}}}:cmdrouter")
}

/// The consumer group of the command stream (one per pool; its consumer is the router of the
/// moment, and a new router claims what the last one left unrouted).
pub const COMMANDS_GROUP: &str = "trackgate-router";

/// A command's time to live when its entry gives none.
pub const DEFAULT_COMMAND_TTL_SECONDS: u64 = 3600;
/// The longest time to live accepted (a week: longer is a configuration, not a command).
pub const MAX_COMMAND_TTL_SECONDS: u64 = 7 * 24 * 3600;
/// How long a command's status hash outlives its final status.
pub const COMMAND_STATUS_RETENTION_SECONDS: u64 = 24 * 3600;
/// Largest command payload accepted. NB: Teltonika documents no limit for GPRS commands; the
/// longest in use (`setparam` lists) stay well under 1 KB, and the device's answer frame must
/// fit the listener's frame limit anyway.
pub const MAX_COMMAND_BYTES: usize = 1024;
/// Longest command id accepted (ids are part of a key name).
pub const MAX_COMMAND_ID_LEN: usize = 128;

/// Field names of the command stream, the responses stream and the status hash.
pub mod command_field {
    /// The command's id, chosen by the producer (the stream entry id when absent).
    pub const ID: &str = "id";
    /// The device's IMEI (15 digits).
    pub const IMEI: &str = "imei";
    /// The command as text, e.g. `getinfo` (sent as its bytes).
    pub const COMMAND: &str = "command";
    /// Or the raw payload in hex (exactly one of `command` and `payload`).
    pub const PAYLOAD: &str = "payload";
    /// `12` (default) or `14` (the device refuses a command carrying another IMEI).
    pub const CODEC: &str = "codec";
    /// Time to live in seconds (default [`super::DEFAULT_COMMAND_TTL_SECONDS`]).
    pub const TTL: &str = "ttl";
    /// One of [`super::CommandStatus`].
    pub const STATUS: &str = "status";
    /// Why a command `failed` or `expired` (one of [`super::CommandReason`]).
    pub const REASON: &str = "reason";
    /// The device's answer as text (when it is UTF-8).
    pub const ANSWER: &str = "answer";
    /// The device's answer in hex (always, when answered).
    pub const ANSWER_HEX: &str = "answer_hex";
    /// When the status was recorded (ms since the epoch, Redis time).
    pub const TS: &str = "ts";
}

/// A command's status. `queued` and `sent` are transient; the others are final.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandStatus {
    /// Routed to the device's queue.
    Queued,
    /// Written to the device's connection; waiting for the answer.
    Sent,
    /// The device answered (Codec 12/14 type 0x06).
    Answered,
    /// The time to live passed before it could be sent.
    Expired,
    /// Not delivered or not answered; see [`CommandReason`].
    Failed,
}

impl CommandStatus {
    /// Every status, for metrics and parsing.
    pub const ALL: [CommandStatus; 5] = [
        CommandStatus::Queued,
        CommandStatus::Sent,
        CommandStatus::Answered,
        CommandStatus::Expired,
        CommandStatus::Failed,
    ];

    /// The wire value.
    pub fn as_str(self) -> &'static str {
        match self {
            CommandStatus::Queued => "queued",
            CommandStatus::Sent => "sent",
            CommandStatus::Answered => "answered",
            CommandStatus::Expired => "expired",
            CommandStatus::Failed => "failed",
        }
    }

    /// Parses a wire value.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|status| status.as_str() == s)
    }

    /// True for `answered`, `expired` and `failed`.
    pub fn is_final(self) -> bool {
        !matches!(self, CommandStatus::Queued | CommandStatus::Sent)
    }
}

/// Why a command failed or expired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandReason {
    /// Codec 14: the device answered 0x11 (the command carried another IMEI).
    Refused,
    /// Sent, and no answer within the listener's response timeout.
    Timeout,
    /// The device was offline (or busy) until the time to live passed (status `expired`).
    Ttl,
    /// The entry or the device's answer could not be read.
    Malformed,
    /// The payload is longer than [`MAX_COMMAND_BYTES`].
    TooLarge,
    /// The IMEI is not a device of the pool.
    UnknownImei,
}

impl CommandReason {
    /// The wire value.
    pub fn as_str(self) -> &'static str {
        match self {
            CommandReason::Refused => "refused",
            CommandReason::Timeout => "timeout",
            CommandReason::Ttl => "ttl",
            CommandReason::Malformed => "malformed",
            CommandReason::TooLarge => "too_large",
            CommandReason::UnknownImei => "unknown_imei",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_keys_share_the_pool_hash_tag() {
        assert_eq!(commands_key("tg", "fleet"), "tg:{fleet}:commands");
        assert_eq!(command_responses_key("tg", "fleet"), "tg:{fleet}:responses");
        assert_eq!(
            command_status_key("tg", "fleet", "c1"),
            "tg:{fleet}:command:c1"
        );
        assert_eq!(
            command_queue_key("tg", "fleet", "356307042441013"),
            "tg:{fleet}:cmdqueue:356307042441013"
        );
        assert_eq!(
            command_inflight_key("tg", "fleet", "356307042441013"),
            "tg:{fleet}:cmdinflight:356307042441013"
        );
        assert_eq!(
            command_deadlines_key("tg", "fleet"),
            "tg:{fleet}:cmddeadlines"
        );
        assert_eq!(pool_members_key("tg", "fleet"), "tg:{fleet}:members");
        assert_eq!(command_router_key("tg", "fleet"), "tg:{fleet}:cmdrouter");
        assert_eq!(command_ready_channel("tg", "fleet"), "tg:{fleet}:cmdready");
    }

    #[test]
    fn statuses_round_trip() {
        for status in CommandStatus::ALL {
            assert_eq!(CommandStatus::parse(status.as_str()), Some(status));
        }
        assert!(CommandStatus::Answered.is_final());
        assert!(!CommandStatus::Sent.is_final());
        assert_eq!(CommandStatus::parse("done"), None);
    }
}
