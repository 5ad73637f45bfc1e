//! The IMEI list format of `devicesFrom` ConfigMaps, and the compact set a listener admits
//! devices from.
//!
//! Text: one IMEI per line; surrounding blanks, blank lines and lines starting with `#` are
//! ignored. The same text is what a user writes into a ConfigMap, what the operator counts and
//! what a shared-pool listener reads from the ConfigMap mounted into its pod.
//!
//! [`ImeiSet`] keeps IMEIs as integers in one sorted `Vec<u64>`: 8 bytes per device (a
//! `HashSet<String>` costs ~60), looked up by binary search (20 steps for a million), and
//! rebuilt whole on reload, which a million-device fleet changes far less often than it logs in.

use trackgate_protocol::{IMEI_LEN, Imei};

/// A line of an IMEI list that is not an IMEI.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {text:?} is not a 15-digit IMEI")]
pub struct ImeiLineError {
    /// 1-based line number.
    pub line: usize,
    /// The offending text, cut to 40 characters.
    pub text: String,
}

/// Parses an IMEI list, calling `each` with every IMEI in order (duplicates included).
///
/// # Errors
/// The first line that is neither blank, a `#` comment nor a 15-digit IMEI.
pub fn parse(text: &str, mut each: impl FnMut(Imei)) -> Result<(), ImeiLineError> {
    parse_integers(text, |n| {
        if let Some(imei) = Imei::from_u64(n) {
            each(imei);
        }
    })
}

/// [`parse`] straight to the integer form: a plain loop over bytes, so that a million lines
/// load in well under a second even in a debug build.
fn parse_integers(text: &str, mut each: impl FnMut(u64)) -> Result<(), ImeiLineError> {
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bytes = line.as_bytes();
        let mut value = 0u64;
        let mut ok = bytes.len() == IMEI_LEN;
        for &b in bytes {
            ok &= b.is_ascii_digit();
            value = value
                .wrapping_mul(10)
                .wrapping_add(u64::from(b.wrapping_sub(b'0')));
        }
        if !ok {
            return Err(ImeiLineError {
                line: n + 1,
                text: line.chars().take(40).collect(),
            });
        }
        each(value);
    }
    Ok(())
}

/// Renders IMEIs in the list format, one per line.
pub fn render<'a>(imeis: impl IntoIterator<Item = &'a str>) -> String {
    let mut out = String::new();
    for imei in imeis {
        out.push_str(imei);
        out.push('\n');
    }
    out
}

/// A set of IMEIs held as sorted integers: 8 bytes per device.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImeiSet {
    sorted: Vec<u64>,
}

impl ImeiSet {
    /// The set of `imeis` (any order, duplicates dropped).
    pub fn from_integers(mut imeis: Vec<u64>) -> Self {
        imeis.sort_unstable();
        imeis.dedup();
        imeis.shrink_to_fit();
        Self { sorted: imeis }
    }

    /// Whether `imei` is in the set.
    pub fn contains(&self, imei: &Imei) -> bool {
        self.sorted.binary_search(&imei.to_u64()).is_ok()
    }

    /// Number of distinct IMEIs.
    pub fn len(&self) -> usize {
        self.sorted.len()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.sorted.is_empty()
    }

    /// The IMEIs as integers, ascending.
    pub fn as_sorted(&self) -> &[u64] {
        &self.sorted
    }

    /// Heap bytes the set holds.
    pub fn heap_bytes(&self) -> usize {
        self.sorted.capacity() * std::mem::size_of::<u64>()
    }
}

/// Collects IMEIs from several lists into one [`ImeiSet`].
#[derive(Debug, Default)]
pub struct ImeiSetBuilder {
    imeis: Vec<u64>,
}

impl ImeiSetBuilder {
    /// Adds every IMEI of one list.
    ///
    /// # Errors
    /// The first bad line of `text`; the IMEIs before it stay added.
    pub fn add_list(&mut self, text: &str) -> Result<(), ImeiLineError> {
        // ~16 bytes of text per line: reserving up front avoids regrowing a 1M-entry vector.
        self.imeis.reserve(text.len() / 16);
        parse_integers(text, |n| self.imeis.push(n))
    }

    /// Adds one IMEI.
    pub fn add(&mut self, imei: &Imei) {
        self.imeis.push(imei.to_u64());
    }

    /// The finished set.
    pub fn build(self) -> ImeiSet {
        ImeiSet::from_integers(self.imeis)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn imei(s: &str) -> Imei {
        Imei::parse(s).unwrap()
    }

    #[test]
    fn parses_lists_with_blanks_and_comments() {
        let mut b = ImeiSetBuilder::default();
        b.add_list("# fleet A\n356307042441013\n\n  352093086403655  \r\n356307042441013\n")
            .unwrap();
        let set = b.build();
        assert_eq!(set.len(), 2);
        assert!(set.contains(&imei("352093086403655")));
        assert!(!set.contains(&imei("123456789012345")));
    }

    #[test]
    fn a_bad_line_names_its_number_and_text() {
        let err = parse("356307042441013\n35630704244101\n", |_| {}).unwrap_err();
        assert_eq!(err.line, 2);
        assert_eq!(
            err.to_string(),
            "line 2: \"35630704244101\" is not a 15-digit IMEI"
        );
        let err = parse("35630704244101x\n", |_| {}).unwrap_err();
        assert_eq!(err.line, 1);
        let mut b = ImeiSetBuilder::default();
        let err = b.add_list("\n\n3563070424410133\n").unwrap_err();
        assert_eq!(err.line, 3);
    }

    #[test]
    fn render_is_parsed_back() {
        let text = render(["356307042441013", "000000000000007"]);
        let mut b = ImeiSetBuilder::default();
        b.add_list(&text).unwrap();
        let set = b.build();
        assert!(set.contains(&imei("000000000000007")));
        assert_eq!(set.len(), 2);
    }

    /// The memory budget of issue 10: at most 16 bytes per admitted IMEI, measured on a million.
    #[test]
    fn a_million_imeis_take_eight_bytes_each() {
        let mut text = String::with_capacity(16_000_000);
        for n in 0..1_000_000u64 {
            text.push_str(&format!("{:015}\n", 350_000_000_000_000 + n * 7));
        }
        let mut b = ImeiSetBuilder::default();
        b.add_list(&text).unwrap();
        let set = b.build();
        assert_eq!(set.len(), 1_000_000);
        assert_eq!(set.heap_bytes(), 8_000_000);
        assert!(set.contains(&imei("350000000006993")));
        assert!(!set.contains(&imei("350000000006994")));
    }
}
