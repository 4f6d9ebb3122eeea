//! Character classes used by the split patterns, one byte of flags per Unicode scalar value.
//!
//! The tables are read at start-up from `regex-syntax`, the crate whose Unicode data
//! fancy-regex (and therefore tiktoken) matches `\p{L}`, `\s`, ... with. Scanner and regex so
//! agree by construction, and a Unicode upgrade of that crate moves both together.
use regex_syntax::hir::{Class, HirKind};
use std::sync::OnceLock;

/// `\p{L}`
pub const LETTER: u8 = 1;
/// `\p{N}`
pub const NUMBER: u8 = 2;
/// `\s`: the Unicode White_Space property.
pub const SPACE: u8 = 4;
/// `\r` or `\n`.
pub const NEWLINE: u8 = 8;
/// o200k's "upper" class `[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]`.
pub const UPPER: u8 = 16;
/// o200k's "lower" class `[\p{Ll}\p{Lm}\p{Lo}\p{M}]`.
pub const LOWER: u8 = 32;

/// The regex for each flag: the definition the table is built from and tested against.
pub const DEFINITIONS: [(u8, &str); 6] = [
    (LETTER, r"\p{L}"),
    (NUMBER, r"\p{N}"),
    (SPACE, r"\s"),
    (NEWLINE, r"[\r\n]"),
    (UPPER, r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]"),
    (LOWER, r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"),
];

/// Two-level lookup table: 256-entry blocks of flags, deduplicated (most blocks are alike).
pub struct Classes {
    ascii: [u8; 128],
    block_of: Vec<u16>,
    blocks: Vec<u8>,
    /// Characters that `(?i)` matches for each contraction letter, e.g. 's' -> s, S, ſ (U+017F).
    fold: Vec<(char, u8)>,
}

/// The code points of a one-class regex, as inclusive ranges.
fn class_ranges(regex: &str) -> Vec<(u32, u32)> {
    let hir = regex_syntax::parse(regex).expect("class definitions are valid regexes");
    match hir.kind() {
        HirKind::Class(Class::Unicode(class)) => class
            .ranges()
            .iter()
            .map(|r| (r.start() as u32, r.end() as u32))
            .collect(),
        other => panic!("{regex} is not a Unicode class: {other:?}"),
    }
}

impl Classes {
    fn build() -> Classes {
        let mut flags = vec![0u8; 0x110000];
        for (flag, regex) in DEFINITIONS {
            for (lo, hi) in class_ranges(regex) {
                for f in &mut flags[lo as usize..=hi as usize] {
                    *f |= flag;
                }
            }
        }
        let mut block_of = Vec::with_capacity(0x1100);
        let mut blocks: Vec<u8> = Vec::new();
        let mut seen = std::collections::HashMap::new();
        for chunk in flags.chunks(256) {
            let id = *seen.entry(chunk.to_vec()).or_insert_with(|| {
                blocks.extend_from_slice(chunk);
                (blocks.len() / 256 - 1) as u16
            });
            block_of.push(id);
        }
        let mut ascii = [0u8; 128];
        ascii.copy_from_slice(&flags[..128]);
        let mut fold = Vec::new();
        for letter in ['s', 'd', 'm', 't', 'l', 'v', 'r', 'e'] {
            for (lo, hi) in class_ranges(&format!("(?i:{letter})")) {
                for cp in lo..=hi {
                    fold.push((char::from_u32(cp).unwrap(), letter as u8));
                }
            }
        }
        Classes {
            ascii,
            block_of,
            blocks,
            fold,
        }
    }

    /// The shared table, built on first use (a few milliseconds).
    pub fn get() -> &'static Classes {
        static TABLE: OnceLock<Classes> = OnceLock::new();
        TABLE.get_or_init(Classes::build)
    }

    /// The flags of scalar value `cp`.
    #[inline(always)]
    pub fn of(&self, cp: u32) -> u8 {
        if cp < 128 {
            self.ascii[cp as usize]
        } else {
            let block = self.block_of[(cp >> 8) as usize] as usize;
            self.blocks[(block << 8) | (cp & 0xFF) as usize]
        }
    }

    /// The ASCII letter that `(?i)` equates `c` with, if `c` is one of the contraction letters
    /// in any case (the Unicode simple case folding includes e.g. U+017F ſ for 's').
    #[inline]
    pub fn fold(&self, c: char) -> Option<u8> {
        if c.is_ascii() {
            let l = c.to_ascii_lowercase() as u8;
            return b"sdmtlvre".contains(&l).then_some(l);
        }
        self.fold.iter().find(|(f, _)| *f == c).map(|&(_, l)| l)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fancy_regex::Regex;

    /// For every scalar value, each flag equals what the regex engine says about its definition.
    #[test]
    fn flags_equal_regex_engine_over_all_of_unicode() {
        let classes = Classes::get();
        for (flag, def) in DEFINITIONS {
            let re = Regex::new(&format!("^{def}$")).unwrap();
            let mut buf = [0u8; 4];
            for c in (0..0x110000u32).filter_map(char::from_u32) {
                let expect = re.is_match(c.encode_utf8(&mut buf)).unwrap();
                assert_eq!(
                    classes.of(c as u32) & flag != 0,
                    expect,
                    "{def} on U+{:04X}",
                    c as u32
                );
            }
        }
    }

    #[test]
    fn case_folding_of_contraction_letters() {
        let classes = Classes::get();
        for letter in "sdmtlvre".chars() {
            let re = Regex::new(&format!("^(?i:{letter})$")).unwrap();
            let mut buf = [0u8; 4];
            for c in (0..0x110000u32).filter_map(char::from_u32) {
                let expect = re.is_match(c.encode_utf8(&mut buf)).unwrap();
                assert_eq!(
                    classes.fold(c) == Some(letter as u8),
                    expect,
                    "(?i:{letter}) on {c:?}"
                );
            }
        }
    }
}
