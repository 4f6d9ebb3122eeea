//! Pre-tokenization: cutting text into the chunks that BPE merges never cross.
//!
//! The split patterns are the published GPT-4 (cl100k_base) one and any user-supplied regex.
//! `fancy_regex` is used because these patterns need look-ahead (`\s+(?!\S)`) and possessive
//! quantifiers, which the plain `regex` crate does not support.
use fancy_regex::Regex;

/// The GPT-4 / cl100k_base split pattern, as published with tiktoken.
pub const CL100K_PATTERN: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s";

/// A compiled split pattern.
pub struct Splitter {
    regex: Regex,
}

impl Splitter {
    /// Compile an arbitrary regex as a split pattern.
    pub fn from_regex(pattern: &str) -> Result<Self, String> {
        Regex::new(pattern)
            .map(|regex| Splitter { regex })
            .map_err(|e| format!("invalid split pattern {pattern:?}: {e}"))
    }

    /// A named pattern ("cl100k" or its alias "gpt4"), or else the argument as a regex.
    pub fn by_name(name: &str) -> Result<Self, String> {
        match name {
            "cl100k" | "gpt4" => Self::from_regex(CL100K_PATTERN),
            other => Self::from_regex(other),
        }
    }

    /// The pre-tokens of `text`, in order. Text the pattern does not match is skipped, as in
    /// tiktoken; the built-in patterns match every character, so for them nothing is lost.
    pub fn split<'t>(&'t self, text: &'t str) -> impl Iterator<Item = &'t str> + 't {
        // A match error can only be a backtrack-limit overflow; the built-in patterns use
        // possessive quantifiers and never backtrack that far.
        self.regex
            .find_iter(text)
            .map(|m| m.expect("split pattern exceeded the regex backtrack limit").as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(text: &str) -> Vec<String> {
        let s = Splitter::by_name("cl100k").unwrap();
        s.split(text).map(str::to_owned).collect()
    }

    #[test]
    fn contractions_words_numbers_and_spaces() {
        assert_eq!(
            split("Hello world's 12345  !!\n\n  x"),
            vec!["Hello", " world", "'s", " ", "123", "45", " ", " !!\n\n", " ", " x"]
        );
    }

    #[test]
    fn trailing_whitespace_and_unicode_letters() {
        assert_eq!(split("héllo  "), vec!["héllo", "  "]);
        assert_eq!(split("日本語 text"), vec!["日本語", " text"]);
    }

    #[test]
    fn pieces_cover_the_whole_text() {
        let text = "a\u{3000}b\t\tc \u{0301}é 🙂🙂 I'LL";
        assert_eq!(split(text).concat(), text);
    }

    #[test]
    fn bad_regex_is_an_error() {
        assert!(Splitter::by_name("(unclosed").is_err());
    }
}
