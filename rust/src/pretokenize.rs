//! Pre-tokenization: cutting text into the pieces that BPE merges never cross.
//!
//! Three patterns are built in: GPT-4's cl100k_base, GPT-4o's o200k_base, and nanochat's own
//! training default (cl100k with numbers cut into runs of at most two digits). Each has a
//! hand-written scanner that follows the regex's backtracking semantics step by step, about ten
//! times faster than the regex engine. Any other pattern runs on `fancy_regex`, which is also
//! the oracle the scanners are tested against (tiktoken matches with fancy-regex too).
use crate::classes::{Classes, LETTER, LOWER, NEWLINE, NUMBER, SPACE, UPPER};
use fancy_regex::Regex;

/// The GPT-4 / cl100k_base split pattern, as published with tiktoken.
pub const CL100K_PATTERN: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s";

/// The GPT-4o / o200k_base split pattern, as published with tiktoken.
pub const O200K_PATTERN: &str = concat!(
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"|\p{N}{1,3}",
    r"| ?[^\s\p{L}\p{N}]+[\r\n/]*",
    r"|\s*[\r\n]+",
    r"|\s+(?!\S)",
    r"|\s+",
);

/// nanochat's training default: cl100k_base with numbers split into 1-2 digit pieces, which
/// spends fewer tokens of a small vocabulary on numbers.
pub const NANOCHAT_PATTERN: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,2}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s";

/// The built-in patterns by name.
pub const NAMED_PATTERNS: [(&str, &str); 3] = [
    ("cl100k", CL100K_PATTERN),
    ("o200k", O200K_PATTERN),
    ("nanochat", NANOCHAT_PATTERN),
];

/// A compiled split pattern.
pub enum Splitter {
    /// cl100k-shaped patterns, which differ only in the longest digit run.
    Cl100k {
        max_digits: usize,
    },
    O200k,
    Regex(Box<Regex>),
}

impl Splitter {
    /// A pattern by name ("cl100k"/"gpt4", "o200k", "nanochat") or regex. A regex that is
    /// literally one of the built-in patterns gets that pattern's scanner.
    pub fn new(pattern: &str) -> Result<Self, String> {
        Ok(match resolve(pattern) {
            CL100K_PATTERN => Splitter::Cl100k { max_digits: 3 },
            NANOCHAT_PATTERN => Splitter::Cl100k { max_digits: 2 },
            O200K_PATTERN => Splitter::O200k,
            other => Self::regex(other)?,
        })
    }

    /// Always the regex engine, even for a built-in pattern (the oracle in tests).
    pub fn regex(pattern: &str) -> Result<Self, String> {
        Regex::new(resolve(pattern))
            .map(|r| Splitter::Regex(Box::new(r)))
            .map_err(|e| format!("invalid split pattern {pattern:?}: {e}"))
    }

    /// Call `f` with each piece of `text`, in order. Text a user regex does not match is
    /// skipped, as in tiktoken; the built-in patterns match every character.
    #[inline]
    pub fn for_each<'t>(&self, text: &'t str, mut f: impl FnMut(&'t str)) -> Result<(), String> {
        match self {
            Splitter::Cl100k { max_digits } => {
                let (classes, mut pos) = (Classes::get(), 0);
                while pos < text.len() {
                    let end = cl100k_piece(classes, text.as_bytes(), pos, *max_digits);
                    f(&text[pos..end]);
                    pos = end;
                }
            }
            Splitter::O200k => {
                let (classes, mut pos) = (Classes::get(), 0);
                while pos < text.len() {
                    let end = o200k_piece(classes, text.as_bytes(), pos);
                    f(&text[pos..end]);
                    pos = end;
                }
            }
            Splitter::Regex(re) => {
                for m in re.find_iter(text) {
                    let m = m.map_err(|e| format!("split pattern failed on the input: {e}"))?;
                    f(m.as_str());
                }
            }
        }
        Ok(())
    }

    /// The pieces of `text` as a vector.
    pub fn split<'t>(&self, text: &'t str) -> Result<Vec<&'t str>, String> {
        let mut out = Vec::new();
        self.for_each(text, |p| out.push(p))?;
        Ok(out)
    }
}

/// A name ("gpt4" is an alias of "cl100k") to its regex; anything else is already a regex.
pub fn resolve(pattern: &str) -> &str {
    let name = if pattern == "gpt4" { "cl100k" } else { pattern };
    NAMED_PATTERNS
        .iter()
        .find(|(n, _)| *n == name)
        .map_or(pattern, |(_, p)| p)
}

/// Decode the scalar value starting at byte `i` of valid UTF-8: (code point, byte length).
#[inline(always)]
fn char_at(b: &[u8], i: usize) -> (u32, usize) {
    let b0 = b[i] as u32;
    if b0 < 0x80 {
        (b0, 1)
    } else if b0 < 0xE0 {
        (((b0 & 0x1F) << 6) | (b[i + 1] as u32 & 0x3F), 2)
    } else if b0 < 0xF0 {
        (
            ((b0 & 0x0F) << 12) | ((b[i + 1] as u32 & 0x3F) << 6) | (b[i + 2] as u32 & 0x3F),
            3,
        )
    } else {
        let cp = ((b0 & 0x07) << 18)
            | ((b[i + 1] as u32 & 0x3F) << 12)
            | ((b[i + 2] as u32 & 0x3F) << 6)
            | (b[i + 3] as u32 & 0x3F);
        (cp, 4)
    }
}

/// Flags and length of the character at `i`, or (0, 0) at the end of the text.
#[inline(always)]
fn class_at(c: &Classes, b: &[u8], i: usize) -> (u8, usize) {
    if i >= b.len() {
        return (0, 0);
    }
    let (cp, len) = char_at(b, i);
    (c.of(cp), len)
}

/// End of the run of characters whose flags satisfy `keep`, from `i`.
#[inline(always)]
fn run(c: &Classes, b: &[u8], mut i: usize, keep: impl Fn(u8) -> bool) -> usize {
    while i < b.len() {
        // ASCII fast path: most runs are ASCII letters, digits or spaces.
        let (f, len) = if b[i] < 0x80 {
            (c.of(b[i] as u32), 1)
        } else {
            class_at(c, b, i)
        };
        if !keep(f) {
            break;
        }
        i += len;
    }
    i
}

/// Neither \s, \p{L} nor \p{N}: punctuation, symbols, marks, controls.
#[inline(always)]
fn other(f: u8) -> bool {
    f & (SPACE | LETTER | NUMBER) == 0
}

/// The case-folded contraction letter at `i`, and the position after it.
#[inline]
fn folded(c: &Classes, b: &[u8], i: usize) -> Option<(u8, usize)> {
    if i >= b.len() {
        return None;
    }
    let (cp, len) = char_at(b, i);
    c.fold(char::from_u32(cp)?).map(|l| (l, i + len))
}

/// Length-end of a contraction suffix `'s 't 're 've 'm 'll 'd` (any case) at `i`, if any.
#[inline]
fn contraction(c: &Classes, b: &[u8], i: usize) -> Option<usize> {
    if b.get(i) != Some(&b'\'') {
        return None;
    }
    let (first, j) = folded(c, b, i + 1)?;
    match first {
        b's' | b'd' | b'm' | b't' => Some(j),
        b'l' | b'v' | b'r' => {
            let want = match first {
                b'l' => b'l',
                _ => b'e',
            };
            match folded(c, b, j) {
                Some((second, k)) if second == want => Some(k),
                _ => None,
            }
        }
        _ => None,
    }
}

/// The whitespace branches shared by both patterns, for a run of \s starting at `i`:
/// returns (end of run, end after its last \r or \n, start of its last character).
#[inline]
fn space_run(c: &Classes, b: &[u8], mut i: usize) -> (usize, Option<usize>, usize) {
    let (mut after_newline, mut last) = (None, i);
    while i < b.len() {
        let (f, len) = class_at(c, b, i);
        if f & SPACE == 0 {
            break;
        }
        last = i;
        i += len;
        if f & NEWLINE != 0 {
            after_newline = Some(i);
        }
    }
    (i, after_newline, last)
}

/// End of a number piece whose first digit ends at `end`: up to `max` digits in all.
fn digits(c: &Classes, b: &[u8], mut end: usize, max: usize) -> usize {
    for _ in 1..max {
        let (f, len) = class_at(c, b, end);
        if f & NUMBER == 0 {
            break;
        }
        end += len;
    }
    end
}

/// End of the cl100k piece starting at `p` (`max_digits` is 3 for cl100k, 2 for nanochat).
#[inline]
fn cl100k_piece(c: &Classes, b: &[u8], p: usize, max_digits: usize) -> usize {
    // '(?i:[sdmt]|ll|ve|re)
    if b[p] == b'\'' {
        if let Some(end) = contraction(c, b, p) {
            return end;
        }
    }
    let (f, len) = class_at(c, b, p);
    // [^\r\n\p{L}\p{N}]?+\p{L}++
    if f & LETTER != 0 {
        return run(c, b, p + len, |f| f & LETTER != 0);
    }
    if f & (NUMBER | NEWLINE) == 0 {
        let (f2, len2) = class_at(c, b, p + len);
        if f2 & LETTER != 0 {
            return run(c, b, p + len + len2, |f| f & LETTER != 0);
        }
    }
    // \p{N}{1,3}+
    if f & NUMBER != 0 {
        return digits(c, b, p + len, max_digits);
    }
    //  ?[^\s\p{L}\p{N}]++[\r\n]*+
    let start = if b[p] == b' ' && other(class_at(c, b, p + 1).0) {
        p + 1
    } else {
        p
    };
    if other(class_at(c, b, start).0) {
        let end = run(c, b, start, other);
        return run(c, b, end, |f| f & NEWLINE != 0);
    }
    // \s++$ | \s*[\r\n] | \s+(?!\S) | \s
    let (end, after_newline, last) = space_run(c, b, p);
    if end == b.len() {
        end
    } else if let Some(e) = after_newline {
        e
    } else if last > p {
        last
    } else {
        p + len
    }
}

/// o200k's first two branches from `s`: `[UPPER]*[LOWER]+` (when `lower_first`) or
/// `[UPPER]+[LOWER]*`, each followed by an optional contraction; None if it cannot match.
#[inline]
fn o200k_word(c: &Classes, b: &[u8], s: usize, lower_first: bool) -> Option<usize> {
    // Greedy [UPPER]*, remembering the last character that is also LOWER, where the regex
    // lands when it backtracks to find [LOWER]+.
    let (mut i, mut last_lower_end) = (s, None);
    loop {
        let (f, len) = class_at(c, b, i);
        if f & UPPER == 0 {
            break;
        }
        i += len;
        if f & LOWER != 0 {
            last_lower_end = Some(i);
        }
    }
    let next_is_lower = class_at(c, b, i).0 & LOWER != 0;
    let end = if lower_first {
        if next_is_lower {
            // [LOWER]+ runs on from the end of the upper run.
            run(c, b, i, |f| f & LOWER != 0)
        } else {
            // Backtrack into the upper run: [LOWER]+ is its last LOWER character alone, as
            // the characters after that one are not LOWER.
            last_lower_end?
        }
    } else if i == s {
        return None;
    } else if next_is_lower {
        run(c, b, i, |f| f & LOWER != 0)
    } else {
        i
    };
    Some(contraction(c, b, end).unwrap_or(end))
}

/// End of the o200k piece starting at `p`.
#[inline]
fn o200k_piece(c: &Classes, b: &[u8], p: usize) -> usize {
    let (f, len) = class_at(c, b, p);
    // Branches 1 and 2: each first with the optional [^\r\n\p{L}\p{N}] taken, then without;
    // a start can only match if its character is UPPER or LOWER.
    let prefixed =
        f & (LETTER | NUMBER | NEWLINE) == 0 && class_at(c, b, p + len).0 & (UPPER | LOWER) != 0;
    let bare = f & (UPPER | LOWER) != 0;
    if prefixed || bare {
        for lower_first in [true, false] {
            if prefixed {
                if let Some(end) = o200k_word(c, b, p + len, lower_first) {
                    return end;
                }
            }
            if bare {
                if let Some(end) = o200k_word(c, b, p, lower_first) {
                    return end;
                }
            }
        }
    }
    // \p{N}{1,3}
    if f & NUMBER != 0 {
        return digits(c, b, p + len, 3);
    }
    //  ?[^\s\p{L}\p{N}]+[\r\n/]*
    let start = if b[p] == b' ' && other(class_at(c, b, p + 1).0) {
        p + 1
    } else {
        p
    };
    if other(class_at(c, b, start).0) {
        let mut end = run(c, b, start, other);
        while end < b.len() && matches!(b[end], b'\r' | b'\n' | b'/') {
            end += 1;
        }
        return end;
    }
    // \s*[\r\n]+ | \s+(?!\S) | \s+
    let (end, after_newline, last) = space_run(c, b, p);
    if let Some(e) = after_newline {
        e
    } else if end == b.len() {
        end
    } else if last > p {
        last
    } else {
        p + len
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(pattern: &str, text: &str) -> Vec<String> {
        let s = Splitter::new(pattern).unwrap();
        s.split(text)
            .unwrap()
            .into_iter()
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn contractions_words_numbers_and_spaces() {
        assert_eq!(
            split("cl100k", "Hello world's 12345  !!\n\n  x"),
            vec!["Hello", " world", "'s", " ", "123", "45", " ", " !!\n\n", " ", " x"]
        );
        assert_eq!(split("nanochat", "12345"), vec!["12", "34", "5"]);
        assert_eq!(
            split("o200k", "HELLO's WORLDs don'T 12345"),
            vec!["HELLO's", " WORLDs", " don'T", " ", "123", "45"]
        );
    }

    #[test]
    fn trailing_whitespace_and_unicode_letters() {
        assert_eq!(split("cl100k", "héllo  "), vec!["héllo", "  "]);
        assert_eq!(split("cl100k", "日本語 text"), vec!["日本語", " text"]);
        assert_eq!(split("o200k", "a \n  "), vec!["a", " \n", "  "]);
    }

    #[test]
    fn bad_regex_is_an_error() {
        assert!(Splitter::new("(unclosed").is_err());
    }

    #[test]
    fn named_regex_text_gets_the_scanner() {
        assert!(matches!(
            Splitter::new(CL100K_PATTERN).unwrap(),
            Splitter::Cl100k { max_digits: 3 }
        ));
        assert!(matches!(
            Splitter::new(O200K_PATTERN).unwrap(),
            Splitter::O200k
        ));
        assert!(matches!(Splitter::new(r"\w+").unwrap(), Splitter::Regex(_)));
    }

    /// Every scalar value in contexts that exercise each branch of each pattern: the scanner
    /// cuts exactly where the regex engine does.
    #[test]
    fn scanners_equal_regex_for_every_scalar_value() {
        const CONTEXTS: [&str; 14] = [
            "x", "X", "a", "1", " ", "  ", "!", "\n", "'", "'s", "'LL", "/", "\u{301}", "ǅ",
        ];
        for name in ["cl100k", "o200k", "nanochat"] {
            let (fast, slow) = (Splitter::new(name).unwrap(), Splitter::regex(name).unwrap());
            let mut text = String::new();
            for (n, c) in (0..0x110000u32).filter_map(char::from_u32).enumerate() {
                for ctx in CONTEXTS {
                    text.push(c);
                    text.push_str(ctx);
                }
                text.push(c);
                if n % 64 == 63 {
                    assert_eq!(
                        fast.split(&text).unwrap(),
                        slow.split(&text).unwrap(),
                        "{name}"
                    );
                    text.clear();
                }
            }
            assert_eq!(
                fast.split(&text).unwrap(),
                slow.split(&text).unwrap(),
                "{name}"
            );
        }
    }

    /// Random strings over an alphabet of one character per class combination, with runs.
    #[test]
    fn scanners_equal_regex_on_random_strings() {
        let alphabet: Vec<char> =
            "aZǅʰ中\u{301}\u{903}1²Ⅻ٣ \t\n\r\u{a0}\u{3000}\u{2028}'!/.😀-sStTlLvVeErRdDmMſK"
                .chars()
                .collect();
        let mut state = 0x2545F4914F6CDD1Du64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for name in ["cl100k", "o200k", "nanochat"] {
            let (fast, slow) = (Splitter::new(name).unwrap(), Splitter::regex(name).unwrap());
            for _ in 0..20_000 {
                let len = (next() % 24) as usize;
                let text: String = (0..len)
                    .map(|_| alphabet[(next() % alphabet.len() as u64) as usize])
                    .collect();
                assert_eq!(
                    fast.split(&text).unwrap(),
                    slow.split(&text).unwrap(),
                    "{name} on {text:?}"
                );
            }
        }
    }

    #[test]
    fn pieces_cover_the_whole_text() {
        let text = "a\u{3000}b\t\tc \u{0301}é 🙂🙂 I'LL";
        for name in ["cl100k", "o200k", "nanochat"] {
            assert_eq!(split(name, text).concat(), text);
        }
    }
}
