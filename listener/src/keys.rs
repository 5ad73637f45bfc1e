//! Redis key names (DESIGN.md's Redis layout), shared with the simulator and tests so that
//! everyone reads the data where the listener writes it.
//!
//! Every key of one readings call carries the partition's hash tag `{<pool>:<n>}`, so a script
//! touching the stream and its dedup keys stays in one Redis Cluster slot.

use trackgate_protocol::Imei;

/// The readings partition of a device: the IMEI's numeric value modulo `partitions`.
///
/// Plain arithmetic on purpose: a consumer in any language can compute it, and it never changes
/// between versions (a hash function from a crate could).
pub fn partition_of(imei: &Imei, partitions: u32) -> u32 {
    let value: u64 = imei.as_str().parse().unwrap_or(0);
    let partitions = u64::from(partitions.max(1));
    u32::try_from(value % partitions).unwrap_or(0)
}

/// `<prefix>:{<pool>:<n>}:readings`.
pub fn readings_key(prefix: &str, pool: &str, partition: u32) -> String {
    format!("{prefix}:{{{pool}:{partition}}}:readings")
}

/// `<prefix>:{<pool>:<n>}:seen:<imei>`: the device's recent record fingerprints (a sorted
/// set, the dedup window), in the same hash slot as the device's readings stream.
pub fn seen_key(prefix: &str, pool: &str, partition: u32, imei: &str) -> String {
    format!("{prefix}:{{{pool}:{partition}}}:seen:{imei}")
}

/// A fingerprint as the member of [`seen_key`]'s set: 16 lowercase hex digits.
pub fn fingerprint_member(fingerprint: u64) -> String {
    format!("{fingerprint:016x}")
}

/// `<prefix>:{<pool>}:events`: connect, login accepted/refused, disconnect, decode error,
/// command responses.
pub fn events_key(prefix: &str, pool: &str) -> String {
    format!("{prefix}:{{{pool}}}:events")
}

/// `<prefix>:{<pool>}:devices`: a hash, field = IMEI, value = JSON device state.
pub fn devices_key(prefix: &str, pool: &str) -> String {
    format!("{prefix}:{{{pool}}}:devices")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_carry_the_partition_hash_tag() {
        assert_eq!(
            readings_key("trackgate", "fleet", 3),
            "trackgate:{fleet:3}:readings"
        );
        assert_eq!(
            seen_key("trackgate", "fleet", 3, "356307042441013"),
            "trackgate:{fleet:3}:seen:356307042441013"
        );
        assert_eq!(fingerprint_member(0xab), "00000000000000ab");
        assert_eq!(events_key("tg", "fleet"), "tg:{fleet}:events");
        assert_eq!(devices_key("tg", "fleet"), "tg:{fleet}:devices");
    }

    #[test]
    fn partition_is_the_imei_modulo_partitions() {
        let imei = Imei::parse("356307042441013").unwrap();
        assert_eq!(partition_of(&imei, 4), (356_307_042_441_013u64 % 4) as u32);
        assert_eq!(partition_of(&imei, 1), 0);
        assert_eq!(partition_of(&imei, 0), 0);
    }
}
