//! Port allocation: PURE. (pool layout, devices, previous allocation) → allocation per shard +
//! unallocated devices.
//!
//! Rules (DESIGN.md), in the order they are applied:
//! 1. pinned ports win: a device that pins a valid port gets it, even over a device that held it
//!    before (the displaced device gets a new port). Two pins on one dedicated port: the lower
//!    IMEI wins, the other is reported.
//! 2. a device keeps its previous port for as long as it stays in the pool and the port stays in
//!    the range (previous = what the shard ConfigMaps hold, so this survives restarts);
//! 3. new devices go, in IMEI order, to the least-loaded open shard; a shard opens only when the
//!    open ones cannot hold the pool, so a small pool runs few pods;
//! 4. no port is given twice (dedicated); when the range is full the rest are reported as
//!    unallocated, never dropped. A removed device simply is not carried over: its port is free.
//!
//! Shard `n` covers the port numbers `start + n*portsPerShard ..` up to the next boundary, a
//! function of the range only, so excluding a port never moves another device to a new shard.
//!
//! The allocation table (`imei port` per line) in each shard ConfigMap is the persisted state;
//! [`render_table`] and [`parse_table`] are its codec.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::fmt::Write as _;

use trackgate_api::{IdentificationMode, TrackerPortPoolSpec};

/// Name of the allocation table inside a shard ConfigMap.
pub const ALLOCATION_TABLE_FILE: &str = "allocation.txt";

/// The shape of a pool's port space, from its spec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Identification mode.
    pub mode: IdentificationMode,
    /// First port (inclusive).
    pub start: u16,
    /// Last port (inclusive).
    pub end: u16,
    /// Ports never allocated.
    pub exclude: Vec<u16>,
    /// Port numbers per shard.
    pub ports_per_shard: u16,
    /// Shared mode: devices admitted per shard.
    pub devices_per_shard: u32,
}

impl Layout {
    /// The layout of a pool spec.
    pub fn from_spec(spec: &TrackerPortPoolSpec) -> Self {
        Self {
            mode: spec.mode,
            start: spec.ports.start,
            end: spec.ports.end,
            exclude: spec.ports.exclude.clone(),
            ports_per_shard: spec.sharding.ports_per_shard.max(1),
            devices_per_shard: spec.sharding.devices_per_shard.max(1),
        }
    }

    /// Number of port numbers in the range (0 when the range is inverted).
    fn span(&self) -> usize {
        if self.end < self.start {
            0
        } else {
            usize::from(self.end - self.start) + 1
        }
    }

    /// Number of shards the range is cut into.
    pub fn shard_count(&self) -> u32 {
        let pps = usize::from(self.ports_per_shard.max(1));
        u32::try_from(self.span().div_ceil(pps)).unwrap_or(u32::MAX)
    }

    /// The shard that serves `port`, when the port is inside the range.
    pub fn shard_of(&self, port: u16) -> Option<u32> {
        (port >= self.start && port <= self.end)
            .then(|| u32::from((port - self.start) / self.ports_per_shard.max(1)))
    }

    /// First and last port number of shard `index` (exclusions not removed).
    pub fn shard_ports(&self, index: u32) -> (u16, u16) {
        let pps = u32::from(self.ports_per_shard.max(1));
        let first = u32::from(self.start).saturating_add(index.saturating_mul(pps));
        let last = first.saturating_add(pps - 1).min(u32::from(self.end));
        (
            u16::try_from(first).unwrap_or(u16::MAX),
            u16::try_from(last).unwrap_or(u16::MAX),
        )
    }

    /// Ports of the range that may be allocated, per port offset from `start`.
    fn available(&self) -> Vec<bool> {
        let mut ok = vec![true; self.span()];
        for &p in &self.exclude {
            if let Some(slot) = self.offset(p).and_then(|o| ok.get_mut(o)) {
                *slot = false;
            }
        }
        ok
    }

    fn offset(&self, port: u16) -> Option<usize> {
        (port >= self.start && port <= self.end).then(|| usize::from(port - self.start))
    }

    /// Ports of shard `index` that may be allocated.
    pub fn available_ports(&self, index: u32) -> impl Iterator<Item = u16> + '_ {
        let (first, last) = self.shard_ports(index);
        (first..=last).filter(|p| !self.exclude.contains(p))
    }
}

/// One device of the pool as allocation sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolDevice {
    /// 15-digit IMEI.
    pub imei: String,
    /// Port pinned in the spec.
    pub pinned: Option<u16>,
}

/// Previous allocation: IMEI → port, as persisted in the shard ConfigMaps.
pub type Previous = HashMap<String, u16>;

/// Why a device holds no port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Unallocated {
    /// Every port (dedicated) or every shard slot (shared) is taken.
    RangeFull,
    /// The pinned port is outside the range or excluded.
    PinnedPortUnavailable(u16),
    /// Another device (lower IMEI) pins the same dedicated port.
    PinnedPortTaken(u16),
}

impl Unallocated {
    /// Stable label.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::RangeFull => "range_full",
            Self::PinnedPortUnavailable(_) => "pinned_port_unavailable",
            Self::PinnedPortTaken(_) => "pinned_port_taken",
        }
    }
}

/// The result of [`allocate`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Allocation {
    /// Per shard index (only shards holding devices): `(port, imei)` sorted by port then IMEI.
    pub shards: BTreeMap<u32, Vec<(u16, String)>>,
    /// Devices holding no port, in IMEI order, with the reason.
    pub unallocated: Vec<(String, Unallocated)>,
    /// Allocatable ports that hold no device.
    pub free_ports: u32,
}

impl Allocation {
    /// Number of devices holding a port.
    pub fn allocated(&self) -> usize {
        self.shards.values().map(Vec::len).sum()
    }

    /// IMEI → port of every allocated device: the `previous` of the next run.
    pub fn to_previous(&self) -> Previous {
        self.shards
            .values()
            .flatten()
            .map(|(port, imei)| (imei.clone(), *port))
            .collect()
    }
}

// === allocate ===

/// Allocates ports to `devices` following the rules of the module docs. Devices are identified
/// by IMEI; a duplicate IMEI after the first is ignored (inline entries come first, so an inline
/// pin wins over the same IMEI in a ConfigMap).
pub fn allocate(layout: &Layout, devices: &[PoolDevice], previous: &Previous) -> Allocation {
    let dedicated = layout.mode == IdentificationMode::Dedicated;
    let available = layout.available();
    let shard_count = layout.shard_count() as usize;
    let shard_cap = if dedicated {
        usize::MAX // bounded by free ports instead
    } else {
        layout.devices_per_shard as usize
    };

    let mut order: Vec<&PoolDevice> = devices.iter().collect();
    order.sort_by(|a, b| a.imei.cmp(&b.imei));
    order.dedup_by(|b, a| a.imei == b.imei);

    let mut load = vec![0u32; available.len()]; // devices per port offset
    let mut shard_load = vec![0usize; shard_count];
    let mut assigned: Vec<Option<u16>> = vec![None; order.len()];
    let mut unallocated = Vec::new();
    let shard_of_offset = |o: usize| o / usize::from(layout.ports_per_shard.max(1));

    // 1. pinned ports win
    for (i, dev) in order.iter().enumerate() {
        let Some(port) = dev.pinned else { continue };
        match layout.offset(port).filter(|&o| available[o]) {
            None => unallocated.push((i, Unallocated::PinnedPortUnavailable(port))),
            Some(o) if dedicated && load[o] > 0 => {
                unallocated.push((i, Unallocated::PinnedPortTaken(port)));
            }
            Some(o) => {
                load[o] += 1;
                shard_load[shard_of_offset(o)] += 1;
                assigned[i] = Some(port);
            }
        }
    }

    // 2. keep previous ports
    for (i, dev) in order.iter().enumerate() {
        if dev.pinned.is_some() {
            continue;
        }
        let Some(o) = previous
            .get(&dev.imei)
            .and_then(|&p| layout.offset(p))
            .filter(|&o| available[o])
        else {
            continue;
        };
        let s = shard_of_offset(o);
        if (dedicated && load[o] > 0) || shard_load[s] >= shard_cap {
            continue;
        }
        load[o] += 1;
        shard_load[s] += 1;
        assigned[i] = Some(layout.start + o as u16);
    }

    // 3. new devices to the least-loaded open shard
    let waiting: Vec<usize> = (0..order.len())
        .filter(|&i| assigned[i].is_none() && order[i].pinned.is_none())
        .collect();
    let nominal = if dedicated {
        usize::from(layout.ports_per_shard.max(1))
    } else {
        shard_cap
    };
    let needed = order.len().div_ceil(nominal.max(1));
    let mut placer = Placer {
        layout,
        available: &available,
        load: &mut load,
        shard_load: &mut shard_load,
        shard_cap,
        dedicated,
        open: BinaryHeap::new(),
        ports: HashMap::new(),
        next_closed: 0,
    };
    let mut open_count = 0;
    for s in 0..shard_count {
        if placer.shard_load[s] > 0 && placer.open_shard(s) {
            open_count += 1;
        }
    }
    while open_count < needed && placer.open_next() {
        open_count += 1;
    }
    for i in waiting {
        match placer.place() {
            Some(port) => assigned[i] = Some(port),
            None => unallocated.push((i, Unallocated::RangeFull)),
        }
    }

    // collect
    let mut shards: BTreeMap<u32, Vec<(u16, String)>> = BTreeMap::new();
    for (i, port) in assigned.iter().enumerate() {
        if let Some(port) = *port {
            let s = u32::try_from(shard_of_offset(usize::from(port - layout.start)))
                .unwrap_or(u32::MAX);
            shards
                .entry(s)
                .or_default()
                .push((port, order[i].imei.clone()));
        }
    }
    for v in shards.values_mut() {
        v.sort_unstable();
    }
    unallocated.sort_by_key(|(i, _)| *i);
    let free_ports = available
        .iter()
        .zip(&load)
        .filter(|&(&ok, &l)| ok && l == 0)
        .count();
    Allocation {
        shards,
        unallocated: unallocated
            .into_iter()
            .map(|(i, why)| (order[i].imei.clone(), why))
            .collect(),
        free_ports: u32::try_from(free_ports).unwrap_or(u32::MAX),
    }
}

/// Places new devices: a min-heap of open shards by load, and per open shard a min-heap of its
/// ports by load (dedicated ports leave the heap once taken).
struct Placer<'a> {
    layout: &'a Layout,
    available: &'a [bool],
    load: &'a mut [u32],
    shard_load: &'a mut [usize],
    shard_cap: usize,
    dedicated: bool,
    open: BinaryHeap<Reverse<(usize, usize)>>,
    ports: HashMap<usize, BinaryHeap<Reverse<(u32, usize)>>>,
    next_closed: usize,
}

impl Placer<'_> {
    /// Opens shard `s`; false when it has no room.
    fn open_shard(&mut self, s: usize) -> bool {
        if self.ports.contains_key(&s) {
            return false;
        }
        let pps = usize::from(self.layout.ports_per_shard.max(1));
        let end = ((s + 1) * pps).min(self.available.len());
        let heap: BinaryHeap<_> = (s * pps..end)
            .filter(|&o| self.available[o] && !(self.dedicated && self.load[o] > 0))
            .map(|o| Reverse((self.load[o], o)))
            .collect();
        let has_room = !heap.is_empty() && self.shard_load[s] < self.shard_cap;
        self.ports.insert(s, heap);
        if has_room {
            self.open.push(Reverse((self.shard_load[s], s)));
        }
        has_room
    }

    /// Opens the lowest-index shard not yet open that has room.
    fn open_next(&mut self) -> bool {
        while self.next_closed < self.shard_load.len() {
            let s = self.next_closed;
            self.next_closed += 1;
            if self.open_shard(s) {
                return true;
            }
        }
        false
    }

    fn place(&mut self) -> Option<u16> {
        loop {
            let Some(Reverse((_, s))) = self.open.pop() else {
                if self.open_next() {
                    continue;
                }
                return None;
            };
            let heap = self.ports.get_mut(&s)?;
            let Some(Reverse((l, o))) = heap.pop() else {
                continue; // full: stays closed
            };
            self.load[o] = l + 1;
            self.shard_load[s] += 1;
            if !self.dedicated {
                heap.push(Reverse((l + 1, o)));
            }
            if !heap.is_empty() && self.shard_load[s] < self.shard_cap {
                self.open.push(Reverse((self.shard_load[s], s)));
            }
            return Some(self.layout.start + o as u16);
        }
    }
}

// === allocation table ===

/// Renders a shard's allocation table: `imei port` per line, sorted by port.
pub fn render_table(entries: &[(u16, String)]) -> String {
    let mut out = String::with_capacity(entries.len() * 22);
    for (port, imei) in entries {
        let _ = writeln!(out, "{imei} {port}");
    }
    out
}

/// A line of an allocation table or IMEI list that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {text:?} is not {expected}")]
pub struct LineError {
    /// 1-based line number.
    pub line: usize,
    /// The offending text (truncated).
    pub text: String,
    /// What was expected.
    pub expected: &'static str,
}

fn line_error(line: usize, text: &str, expected: &'static str) -> LineError {
    LineError {
        line: line + 1,
        text: text.chars().take(40).collect(),
        expected,
    }
}

/// Parses an allocation table written by [`render_table`] into `previous`.
///
/// # Errors
/// The first line that is not `<15-digit imei> <port>`.
pub fn parse_table(text: &str, previous: &mut Previous) -> Result<(), LineError> {
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let (imei, port) = line
            .split_once(' ')
            .ok_or_else(|| line_error(n, line, "`imei port`"))?;
        let port: u16 = port
            .trim()
            .parse()
            .map_err(|_| line_error(n, line, "`imei port`"))?;
        if !is_imei(imei) {
            return Err(line_error(n, line, "`imei port`"));
        }
        previous.insert(imei.to_owned(), port);
    }
    Ok(())
}

/// Whether `s` is 15 ASCII digits.
pub fn is_imei(s: &str) -> bool {
    s.len() == 15 && s.bytes().all(|b| b.is_ascii_digit())
}

/// Parses an IMEI list from a `devicesFrom` ConfigMap: one IMEI per line; blank lines and `#`
/// comments ignored.
///
/// # Errors
/// The first line that is not an IMEI.
pub fn parse_imei_list(text: &str) -> Result<Vec<String>, LineError> {
    // NB: the format's one home is `trackgate_api::imei_list`, which the listeners read too.
    let mut out = Vec::new();
    trackgate_api::imei_list::parse(text, |imei| out.push(imei.to_string())).map_err(|e| {
        LineError {
            line: e.line,
            text: e.text,
            expected: "a 15-digit IMEI",
        }
    })?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeSet, HashSet};

    use proptest::prelude::*;

    use super::*;

    fn layout(mode: IdentificationMode, start: u16, end: u16, pps: u16) -> Layout {
        Layout {
            mode,
            start,
            end,
            exclude: vec![],
            ports_per_shard: pps,
            devices_per_shard: 4,
        }
    }

    fn imei(n: u64) -> String {
        format!("{:015}", 350_000_000_000_000 + n)
    }

    fn devs(ns: impl IntoIterator<Item = u64>) -> Vec<PoolDevice> {
        ns.into_iter()
            .map(|n| PoolDevice {
                imei: imei(n),
                pinned: None,
            })
            .collect()
    }

    fn port_of(a: &Allocation, imei: &str) -> Option<u16> {
        a.to_previous().get(imei).copied()
    }

    fn restart(a: &Allocation) -> Previous {
        let mut prev = Previous::new();
        for entries in a.shards.values() {
            parse_table(&render_table(entries), &mut prev).unwrap();
        }
        prev
    }

    #[test]
    fn small_pool_fills_one_shard_then_opens_the_next() {
        let l = layout(IdentificationMode::Dedicated, 5000, 5099, 10);
        let a = allocate(&l, &devs(0..3), &Previous::new());
        assert_eq!(a.shards.len(), 1);
        assert_eq!(a.shards[&0][0].0, 5000);
        let a = allocate(&l, &devs(0..15), &a.to_previous());
        assert_eq!(a.shards.len(), 2);
        assert_eq!(a.free_ports, 100 - 15);
    }

    #[test]
    fn pinned_port_displaces_a_previous_holder() {
        let l = layout(IdentificationMode::Dedicated, 5000, 5009, 10);
        let a = allocate(&l, &devs(0..2), &Previous::new());
        let holder = &a.shards[&0][0];
        assert_eq!(holder.0, 5000);
        let mut d = devs(0..2);
        d.push(PoolDevice {
            imei: imei(9),
            pinned: Some(5000),
        });
        let b = allocate(&l, &d, &a.to_previous());
        assert_eq!(port_of(&b, &imei(9)), Some(5000));
        assert!(port_of(&b, &holder.1).is_some_and(|p| p != 5000));
    }

    #[test]
    fn two_pins_on_one_port_report_the_second() {
        let l = layout(IdentificationMode::Dedicated, 5000, 5009, 10);
        let d = vec![
            PoolDevice {
                imei: imei(2),
                pinned: Some(5003),
            },
            PoolDevice {
                imei: imei(1),
                pinned: Some(5003),
            },
            PoolDevice {
                imei: imei(3),
                pinned: Some(6000),
            },
        ];
        let a = allocate(&l, &d, &Previous::new());
        assert_eq!(port_of(&a, &imei(1)), Some(5003));
        assert_eq!(
            a.unallocated,
            vec![
                (imei(2), Unallocated::PinnedPortTaken(5003)),
                (imei(3), Unallocated::PinnedPortUnavailable(6000))
            ]
        );
    }

    #[test]
    fn shared_mode_balances_ports_and_caps_shards() {
        let l = layout(IdentificationMode::Shared, 7000, 7003, 2); // 2 shards × 4 devices
        let a = allocate(&l, &devs(0..10), &Previous::new());
        assert_eq!(a.allocated(), 8);
        assert_eq!(a.unallocated.len(), 2);
        assert!(
            a.unallocated
                .iter()
                .all(|(_, w)| *w == Unallocated::RangeFull)
        );
        for entries in a.shards.values() {
            let ports: BTreeSet<u16> = entries.iter().map(|e| e.0).collect();
            assert_eq!(ports.len(), 2, "both ports of the shard used: {entries:?}");
        }
    }

    #[test]
    fn tables_and_imei_lists_refuse_garbage() {
        let mut prev = Previous::new();
        assert!(parse_table("356307042441013 5000\n\n", &mut prev).is_ok());
        assert_eq!(prev["356307042441013"], 5000);
        assert_eq!(parse_table("x 5000", &mut prev).unwrap_err().line, 1);
        assert!(parse_table("356307042441013 99999", &mut prev).is_err());
        assert_eq!(
            parse_imei_list("# fleet A\n356307042441013\n\n352093086403655\n").unwrap(),
            vec!["356307042441013", "352093086403655"]
        );
        assert_eq!(
            parse_imei_list("1\n").unwrap_err().expected,
            "a 15-digit IMEI"
        );
    }

    // === properties ===

    fn arb_case() -> impl Strategy<Value = (Layout, Vec<PoolDevice>)> {
        (
            prop_oneof![
                Just(IdentificationMode::Dedicated),
                Just(IdentificationMode::Shared)
            ],
            1000u16..1010,
            1u16..60,
            1u16..12,
            proptest::collection::vec(0u16..70, 0..6),
            proptest::collection::vec(
                (0u64..200, proptest::option::weighted(0.15, 0u16..70)),
                0..90,
            ),
        )
            .prop_map(|(mode, start, len, pps, excl, ds)| {
                let end = start + len - 1;
                let l = Layout {
                    mode,
                    start,
                    end,
                    exclude: excl.into_iter().map(|o| start + o).collect(),
                    ports_per_shard: pps,
                    devices_per_shard: 5,
                };
                let mut seen = HashSet::new();
                let d = ds
                    .into_iter()
                    .filter(|(n, _)| seen.insert(*n))
                    .map(|(n, pin)| PoolDevice {
                        imei: imei(n),
                        pinned: pin.map(|o| start + o),
                    })
                    .collect();
                (l, d)
            })
    }

    fn unique_imeis(d: &[PoolDevice]) -> usize {
        d.iter().map(|d| &d.imei).collect::<HashSet<_>>().len()
    }

    fn check_invariants(l: &Layout, d: &[PoolDevice], a: &Allocation) -> Result<(), TestCaseError> {
        // every device accounted for exactly once: overflow reported, never dropped
        let mut seen = HashSet::new();
        for (_, imei) in a.shards.values().flatten() {
            prop_assert!(seen.insert(imei.clone()), "{imei} allocated twice");
        }
        for (imei, _) in &a.unallocated {
            prop_assert!(seen.insert(imei.clone()), "{imei} both allocated and not");
        }
        prop_assert_eq!(seen.len(), unique_imeis(d));
        // ports valid, in their shard, never twice in dedicated mode
        let mut ports = HashSet::new();
        for (s, entries) in &a.shards {
            for (port, _) in entries {
                prop_assert_eq!(l.shard_of(*port), Some(*s));
                prop_assert!(!l.exclude.contains(port));
                if l.mode == IdentificationMode::Dedicated {
                    prop_assert!(ports.insert(*port), "port {} twice", port);
                }
            }
            if l.mode == IdentificationMode::Shared {
                // pinned devices win even over the shard's cap
                let pinned = entries
                    .iter()
                    .filter(|(_, i)| d.iter().any(|x| &x.imei == i && x.pinned.is_some()))
                    .count();
                prop_assert!(entries.len() <= (l.devices_per_shard as usize).max(pinned));
            }
        }
        // range full is only reported when there really is no room
        if a.unallocated
            .iter()
            .any(|(_, w)| *w == Unallocated::RangeFull)
            && l.mode == IdentificationMode::Dedicated
        {
            prop_assert_eq!(a.free_ports, 0);
        }
        Ok(())
    }

    proptest! {
        #[test]
        fn invariants_hold((l, d) in arb_case()) {
            let a = allocate(&l, &d, &Previous::new());
            check_invariants(&l, &d, &a)?;
        }

        #[test]
        fn pinned_ports_win((l, d) in arb_case(), prev_seed in 0u64..3) {
            // any previous allocation, even one that gave pinned ports to others
            let shuffled: Vec<PoolDevice> = d.iter().rev().cloned()
                .map(|mut x| { x.pinned = None; x }).collect();
            let mut other = l.clone();
            other.exclude.clear();
            let prev = allocate(&other, &shuffled, &Previous::new()).to_previous();
            let prev = if prev_seed == 0 { Previous::new() } else { prev };
            let a = allocate(&l, &d, &prev);
            check_invariants(&l, &d, &a)?;
            let mut first_pin: HashMap<u16, &str> = HashMap::new();
            let mut sorted: Vec<&PoolDevice> = d.iter().collect();
            sorted.sort_by(|a, b| a.imei.cmp(&b.imei));
            sorted.dedup_by(|b, a| a.imei == b.imei);
            for dev in sorted {
                let Some(p) = dev.pinned else { continue };
                let valid = l.shard_of(p).is_some() && !l.exclude.contains(&p);
                let winner = *first_pin.entry(p).or_insert(&dev.imei) == dev.imei.as_str()
                    || l.mode == IdentificationMode::Shared;
                if valid && winner {
                    prop_assert_eq!(port_of(&a, &dev.imei), Some(p));
                }
            }
        }

        #[test]
        fn rerun_and_restart_give_the_same_answer((l, d) in arb_case()) {
            let a = allocate(&l, &d, &Previous::new());
            prop_assert_eq!(&allocate(&l, &d, &a.to_previous()), &a);
            // restart: the only memory is the shard ConfigMaps' tables
            prop_assert_eq!(&allocate(&l, &d, &restart(&a)), &a);
        }

        #[test]
        fn devices_keep_ports_when_others_come_and_go((l, d) in arb_case(), more in 0u64..30, drop in 0usize..10) {
            let a = allocate(&l, &d, &Previous::new());
            let mut next: Vec<PoolDevice> = d.iter().skip(drop).cloned().collect();
            let removed: HashSet<&str> = d.iter().take(drop).map(|x| x.imei.as_str())
                .filter(|i| !next.iter().any(|n| n.imei == *i)).collect();
            next.extend(devs(1000..1000 + more)); // new devices, unpinned
            let b = allocate(&l, &next, &a.to_previous());
            check_invariants(&l, &next, &b)?;
            let pb = b.to_previous();
            for (imei, port) in a.to_previous() {
                if removed.contains(imei.as_str()) {
                    prop_assert!(!pb.contains_key(&imei), "removed device still holds a port");
                } else {
                    prop_assert_eq!(pb.get(&imei), Some(&port), "{} moved", imei);
                }
            }
            if more == 0 && l.mode == IdentificationMode::Dedicated {
                // a removed device frees its port (unless a waiting device took it)
                let held = a.to_previous();
                let freed = removed.iter().filter(|i| held.contains_key(**i)).count();
                if a.unallocated.is_empty() {
                    prop_assert_eq!(b.free_ports as usize, a.free_ports as usize + freed);
                }
            }
        }

        #[test]
        fn new_pool_fills_open_shards_evenly(n in 0u64..200, pps in 1u16..20, shards in 1u16..10) {
            let l = layout(IdentificationMode::Dedicated, 2000, 2000 + pps * shards - 1, pps);
            let a = allocate(&l, &devs(0..n), &Previous::new());
            let loads: Vec<usize> = a.shards.values().map(Vec::len).collect();
            if let (Some(max), Some(min)) = (loads.iter().max(), loads.iter().min()) {
                prop_assert!(max - min <= 1, "{:?}", loads);
            }
            let needed = (n as usize).div_ceil(usize::from(pps)).min(usize::from(shards));
            prop_assert_eq!(a.shards.len(), needed);
        }
    }
}
