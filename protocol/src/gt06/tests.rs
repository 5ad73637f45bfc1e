//! Packet decode and encode on hand-derived and traccar packets.

use bytes::{Bytes, BytesMut};

use super::*;
use crate::test_util::hex;

fn frame(h: &str) -> Frame {
    FrameDecoder::default()
        .decode(&mut BytesMut::from(&hex(h)[..]))
        .unwrap()
        .unwrap()
}

fn decode(h: &str) -> Packet {
    Packet::decode(&frame(h), UtcOffset::UTC).unwrap()
}

/// Re-encoding a decoded packet gives back its content byte for byte.
fn assert_canonical(h: &str) {
    let f = frame(h);
    let p = Packet::decode(&f, UtcOffset::UTC).unwrap();
    let mut out = BytesMut::new();
    p.encode_content(UtcOffset::UTC, &mut out).unwrap();
    assert_eq!(&out[..], &f.content[..], "{h}");
}

#[test]
fn login_with_time_zone_word() {
    // traccar vector 104: type 0x100F, time zone 0x190A = 400 (4:00), bit 3 west.
    let h = "787811010864717003664467100f190a0002c6d20d0a";
    let Packet::Login(l) = decode(h) else {
        panic!()
    };
    assert_eq!(l.imei.as_str(), "864717003664467");
    assert_eq!(
        (l.type_id, l.time_zone_language),
        (Some(0x100F), Some(0x190A))
    );
    assert_eq!(l.utc_offset(), UtcOffset::from_minutes(-240));
    assert_canonical(h);
}

#[test]
fn bad_logins_are_errors_with_offsets() {
    let f = |content: &[u8]| Frame {
        extended: false,
        protocol: 0x01,
        content: Bytes::copy_from_slice(content),
        serial: 1,
    };
    let err = Packet::decode(&f(&[0; 9]), UtcOffset::UTC).unwrap_err();
    assert_eq!((err.reason(), err.offset()), ("login_length", Some(4)));
    let err = Packet::decode(&f(&[0x08, 0x64, 0x7A, 0, 0, 0, 0, 0]), UtcOffset::UTC).unwrap_err();
    assert_eq!((err.reason(), err.offset()), ("bad_imei", Some(6)));
    let err = Packet::decode(&f(&[0x18, 0x64, 0, 0, 0, 0, 0, 0]), UtcOffset::UTC).unwrap_err();
    assert_eq!((err.reason(), err.offset()), ("bad_imei", Some(4)));
}

/// traccar vector 97, derived by hand: 2015-08-27 18:29:55, 11 satellites,
/// 0x01C8E2CC = 29942476 / 1.8e6 = 16.6347089° N,
/// 0x08AFD3C0 = 145740736 / 1.8e6 = 80.9670756° E, 32 km/h,
/// course 0x102 = 258°, positioned; LBS 404/7/470/41241; extra = mileage 0x0041EE10.
#[test]
fn location_0x12_by_hand() {
    let h = "787823120f081b121d37cb01c8e2cc08afd3c020d50201940701d600a1190041ee100576d1470d0a";
    let Packet::Location(l) = decode(h) else {
        panic!()
    };
    assert_eq!(l.gps.timestamp_ms, 1_440_700_195_000);
    assert_eq!(
        (l.gps.satellites(), l.gps.speed, l.gps.course()),
        (11, 32, 258)
    );
    assert_eq!(
        (l.gps.latitude_e7(), l.gps.longitude_e7()),
        (166_347_089, 809_670_756)
    );
    assert!(l.gps.is_positioned());
    let lbs = l.lbs.unwrap();
    assert_eq!(
        (lbs.country(), lbs.mnc, lbs.lac, lbs.cell_id),
        (404, 7, 470, 41_241)
    );
    assert_eq!(&l.extra[..], &[0x00, 0x41, 0xEE, 0x10]);
    assert_canonical(h);
}

#[test]
fn hemisphere_bits_sign_the_coordinates() {
    let g = Gps {
        timestamp_ms: 0,
        info: 0xC9,
        latitude: 90 * UNITS_PER_DEGREE,
        longitude: 9, // 5e-6°: 50 in e7
        speed: 0,
        course_status: 0x0800, // south (bit 10 clear), west
    };
    assert_eq!((g.latitude_e7(), g.longitude_e7()), (-900_000_000, -50));
}

#[test]
fn alarm_0x16_has_lbs_length_and_status() {
    // traccar vector 119: alarm 0x30 (harsh braking in traccar's table).
    let h = "787825161a011c141001cf00bc62e0043533a231113808028005006800124b470603300204baa49a0d0a";
    let f = frame(h);
    assert_eq!(f.protocol, 0x16);
    let Packet::Alarm(a) = Packet::decode(&f, UtcOffset::UTC).unwrap() else {
        panic!()
    };
    assert_eq!(a.lbs.unwrap().length, Some(8));
    let s = a.status.unwrap();
    assert_eq!((s.terminal_info, s.voltage, s.gsm_signal), (0x47, 6, 3));
    assert_eq!(s.alarm(0x16), Some(0x30));
    assert!(a.extra.is_empty());
}

#[test]
fn heartbeat_0x13_and_0x23_widths() {
    let f = |protocol: u8, content: &[u8]| Frame {
        extended: false,
        protocol,
        content: Bytes::copy_from_slice(content),
        serial: 7,
    };
    let Packet::Heartbeat(h) =
        Packet::decode(&f(0x13, &[0x44, 6, 4, 0, 2]), UtcOffset::UTC).unwrap()
    else {
        panic!()
    };
    assert_eq!(
        (h.status.voltage, h.status.gsm_signal, h.status.alarm(0x13)),
        (6, 4, Some(0))
    );
    assert!(!h.status.is_acc_on() && h.extra.is_empty()); // 0x44: bit 1 clear
    let Packet::Heartbeat(h) =
        Packet::decode(&f(0x23, &[0x06, 0x01, 0x9A, 4, 0, 2, 9]), UtcOffset::UTC).unwrap()
    else {
        panic!()
    };
    assert_eq!(
        (h.status.voltage, h.status.alarm(0x23), &h.extra[..]),
        (410, None, &[9][..])
    );
}

/// Content that does not fit its number's layout is kept, not refused.
#[test]
fn misfits_are_raw() {
    let f = |protocol: u8, content: &[u8]| Frame {
        extended: false,
        protocol,
        content: Bytes::copy_from_slice(content),
        serial: 7,
    };
    for (p, c) in [
        (0x12, &[][..]),        // empty (traccar vector 1)
        (0x13, &[1, 2, 3][..]), // short
        (0x12, &[0x08, 0x66, 0x70, 0x30, 0x66, 0x50, 0, 0, 0, 0][..]), // month 0x66
        (0x94, &[][..]),
        (0x8A, &[][..]), // time request: no layout here
    ] {
        let got = Packet::decode(&f(p, c), UtcOffset::UTC).unwrap();
        assert_eq!(
            got,
            Packet::Raw(RawPacket {
                protocol: p,
                content: Bytes::copy_from_slice(c)
            })
        );
        assert_eq!(got.protocol(), p);
    }
    // Latitude just past 90°.
    let mut c = vec![0x0F, 8, 27, 18, 29, 55, 0xCB];
    c.extend_from_slice(&(90 * UNITS_PER_DEGREE + 1).to_be_bytes());
    c.extend_from_slice(&[0, 0, 0, 0, 0, 0x14, 0x00]);
    assert!(matches!(
        Packet::decode(&f(0x10, &c), UtcOffset::UTC).unwrap(),
        Packet::Raw(_)
    ));
}

#[test]
fn info_accessors() {
    let i = Info {
        kind: 0x00,
        data: Bytes::from_static(&[0x02, 0xE3]),
    };
    assert_eq!(i.external_voltage(), Some(739));
    // traccar vector 43.
    let data = hex("035985708236675805200502187214018966051912408052452f");
    let i = Info {
        kind: 0x0A,
        data: Bytes::from(data),
    };
    assert_eq!(i.iccid().as_deref(), Some("8966051912408052452"));
}

#[test]
fn encode_refuses_fields_outside_the_layout() {
    let h = "787823120f081b121d37cb01c8e2cc08afd3c020d50201940701d600a1190041ee100576d1470d0a";
    let Packet::Location(mut l) = decode(h) else {
        panic!()
    };
    let mut out = BytesMut::from(&b"x"[..]);
    l.lbs.as_mut().unwrap().lac = 70_000;
    let err = Packet::Location(l.clone())
        .encode_content(UtcOffset::UTC, &mut out)
        .unwrap_err();
    assert_eq!(err, Gt06EncodeError::Field { field: "lac" });
    assert_eq!(&out[..], b"x");
    l.lbs = None;
    assert!(
        Packet::Location(l.clone())
            .encode_content(UtcOffset::UTC, &mut out)
            .is_err()
    );
    l.protocol = 0x10;
    l.gps.timestamp_ms += 1;
    assert_eq!(
        Packet::Location(l)
            .encode_content(UtcOffset::UTC, &mut out)
            .unwrap_err()
            .reason(),
        "time"
    );
}

#[test]
fn offset_changes_only_the_timestamp() {
    let h = "787823120f081b121d37cb01c8e2cc08afd3c020d50201940701d600a1190041ee100576d1470d0a";
    let f = frame(h);
    let plus8 = UtcOffset::from_minutes(480).unwrap();
    let (Packet::Location(utc), Packet::Location(local)) = (
        Packet::decode(&f, UtcOffset::UTC).unwrap(),
        Packet::decode(&f, plus8).unwrap(),
    ) else {
        panic!()
    };
    assert_eq!(utc.gps.timestamp_ms - local.gps.timestamp_ms, 8 * 3_600_000);
    let mut out = BytesMut::new();
    Packet::Location(local)
        .encode_content(plus8, &mut out)
        .unwrap();
    assert_eq!(&out[..], &f.content[..]);
}
