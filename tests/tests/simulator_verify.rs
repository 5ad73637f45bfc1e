//! The simulator's verifier against a real `redis-server`: it is the judge of the resilience
//! tests, so it must itself fail on a lost, duplicated or altered record.

use std::time::Duration;

use trackgate_api::redis_layout;
use trackgate_protocol::{Codec, Imei};
use trackgate_simulator::{
    AckedLog, AckedRecord, StreamLayout, Track, teltonika_entry_key, verify,
};
use trackgate_tests::RedisServer;

const IMEI: &str = "356307042441013";

/// Writes one readings entry the way the listener does (DESIGN.md field names and order).
async fn xadd(conn: &mut redis::aio::MultiplexedConnection, key: &str, fields: &[(&str, String)]) {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(key).arg("*");
    for (name, value) in fields {
        cmd.arg(*name).arg(value);
    }
    let _: String = cmd.query_async(conn).await.expect("XADD");
}

/// Guards against a verifier that passes everything: each kind of fault is detected and
/// counted, and a clean stream passes.
#[tokio::test]
async fn verifier_counts_missing_duplicated_and_altered_records() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let layout = StreamLayout {
        url: redis.url(),
        pool: "verify".into(),
        prefix: "trackgate".into(),
        partitions: 2,
    };
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;

    let mut track = Track::new(3, 0, 1_700_000_000_000);
    let records: Vec<_> = (0..6)
        .map(|_| track.next_record(Codec::Codec8Ext))
        .collect();
    let acked = AckedLog::new(
        records
            .iter()
            .map(|r| AckedRecord {
                imei: IMEI.parse().unwrap(),
                ts_ms: r.timestamp_ms,
                key: teltonika_entry_key(r),
                acked_at: Duration::ZERO,
            })
            .collect(),
        started,
    );
    let entry = |i: usize| {
        let mut fields = vec![("imei", IMEI.to_owned())];
        fields.extend(redis_layout::record_fields(&records[i]));
        fields.extend([
            ("codec", "8e".to_owned()),
            ("protocol", "teltonika".to_owned()),
            ("port", "5000".to_owned()),
            ("recv", (started + 1).to_string()),
        ]);
        fields
    };
    let devices = [Imei::parse(IMEI).unwrap()];
    let key = layout.readings_key(1);

    // Clean: every record once (spread over the streams the verifier must all read).
    for i in 0..6 {
        xadd(&mut conn, &layout.readings_key((i % 2) as u32), &entry(i)).await;
    }
    let clean = verify(&layout, &acked, &devices).await.unwrap();
    assert!(clean.is_ok(), "{clean}");
    assert_eq!((clean.acked, clean.found, clean.entries_read), (6, 6, 6));

    // Duplicated: record 2 twice.
    xadd(&mut conn, &key, &entry(2)).await;
    let dup = verify(&layout, &acked, &devices).await.unwrap();
    assert_eq!(dup.duplicated, 1, "{dup}");
    assert!(!dup.is_ok());

    // Missing and altered: start over with record 4 absent and record 5's latitude changed.
    let _: () = redis::cmd("FLUSHALL").query_async(&mut conn).await.unwrap();
    for i in 0..4 {
        xadd(&mut conn, &key, &entry(i)).await;
    }
    let mut altered = entry(5);
    altered[2].1 = "-0.0000001".into();
    xadd(&mut conn, &key, &altered).await;
    // Another device's entries are none of the verifier's business.
    let mut other = entry(4);
    other[0].1 = "356307042441099".into();
    xadd(&mut conn, &key, &other).await;
    let lost = verify(&layout, &acked, &devices).await.unwrap();
    assert_eq!((lost.found, lost.missing), (4, 2), "{lost}");
    assert_eq!(
        lost.stored_unacked, 1,
        "the altered entry is not an acked record: {lost}"
    );
    assert!(!lost.is_ok());
}
