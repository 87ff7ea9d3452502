//! Cutting the byte stream of a QMP client into JSON texts.
//!
//! QMP is not line-based: a client may send `{"execute": "x"}` with no newline after it
//! (`qemu.qmp` does), several texts in one write, or one text across many. As in QEMU, a text
//! ends where its braces and brackets balance; a top-level scalar (`1`, `true`, `garbage`) ends
//! at the next delimiter; a stray `}` or `]` is a text of its own, which then fails to parse.
//! Strings may be single-quoted (QEMU's JSON dialect); they are rewritten to double quotes here
//! so the texts handed on are standard JSON.
//!
//! Bounds: a text longer than [`TEXT_LEN_MAX`] bytes or nested deeper than [`NESTING_MAX`]
//! ends the stream with an error. Both are far beyond any command ringblk implements; they keep
//! a client that never closes its braces from growing the daemon's memory.

/// Longest text a client may send, in bytes.
pub const TEXT_LEN_MAX: usize = 1 << 20;

/// Deepest nesting of objects and arrays a text may have (serde_json's recursion limit).
pub const NESTING_MAX: usize = 127;

/// A stream that cannot go on: the client is to be told and disconnected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    /// A text grew past [`TEXT_LEN_MAX`].
    #[error("JSON text longer than {} bytes", TEXT_LEN_MAX)]
    TooLong,
    /// A text nested past [`NESTING_MAX`].
    #[error("JSON nesting depth limit exceeded")]
    TooDeep,
}

/// Splits bytes into texts; keeps the unfinished text between reads.
#[derive(Default)]
pub struct Splitter {
    text: Vec<u8>,
    braces: isize,
    brackets: isize,
    /// The quote of the string being read.
    quote: Option<u8>,
    /// The previous byte was a backslash inside a string.
    escape: bool,
    /// A top-level scalar is being read.
    scalar: bool,
}

impl Splitter {
    /// Feeds `bytes`; every text they complete is appended to `texts`.
    pub fn push(&mut self, bytes: &[u8], texts: &mut Vec<Vec<u8>>) -> Result<(), StreamError> {
        for &byte in bytes {
            self.byte(byte, texts);
            if self.text.len() > TEXT_LEN_MAX {
                return Err(StreamError::TooLong);
            }
            if self.braces.max(0) + self.brackets.max(0) > NESTING_MAX as isize {
                return Err(StreamError::TooDeep);
            }
        }
        Ok(())
    }

    fn byte(&mut self, byte: u8, texts: &mut Vec<Vec<u8>>) {
        if let Some(quote) = self.quote {
            self.string_byte(quote, byte, texts);
            return;
        }
        let delimiter = matches!(
            byte,
            b' ' | b'\t' | b'\r' | b'\n' | b'{' | b'}' | b'[' | b']' | b',' | b':' | b'"' | b'\''
        );
        if self.scalar && delimiter {
            self.scalar = false;
            self.end_text(texts);
        }
        match byte {
            b' ' | b'\t' | b'\r' | b'\n' => {
                if !self.text.is_empty() {
                    self.text.push(byte);
                }
            }
            b'"' | b'\'' => {
                self.text.push(b'"');
                self.quote = Some(byte);
            }
            b'{' | b'}' | b'[' | b']' => {
                self.text.push(byte);
                match byte {
                    b'{' => self.braces += 1,
                    b'}' => self.braces -= 1,
                    b'[' => self.brackets += 1,
                    _ => self.brackets -= 1,
                }
                if self.braces < 0 || self.brackets < 0 || self.at_top() {
                    self.end_text(texts);
                }
            }
            _ => {
                self.text.push(byte);
                if self.at_top() {
                    // `,` and `:` are complete (invalid) texts; anything else starts a scalar.
                    self.scalar = !matches!(byte, b',' | b':');
                    if !self.scalar {
                        self.end_text(texts);
                    }
                }
            }
        }
    }

    fn string_byte(&mut self, quote: u8, byte: u8, texts: &mut Vec<Vec<u8>>) {
        if self.escape {
            self.escape = false;
            if quote == b'\'' && byte == b'\'' {
                // `\'` is a quote character, which needs no escape between double quotes.
                self.text.pop();
            }
            self.text.push(byte);
        } else if byte == b'\\' {
            self.escape = true;
            self.text.push(byte);
        } else if byte == quote {
            self.text.push(b'"');
            self.quote = None;
            if self.at_top() {
                self.end_text(texts);
            }
        } else if byte == b'"' {
            self.text.extend_from_slice(b"\\\"");
        } else {
            self.text.push(byte);
        }
    }

    fn at_top(&self) -> bool {
        self.braces == 0 && self.brackets == 0
    }

    fn end_text(&mut self, texts: &mut Vec<Vec<u8>>) {
        let mut text = std::mem::take(&mut self.text);
        while text.last().is_some_and(u8::is_ascii_whitespace) {
            text.pop();
        }
        texts.push(text);
        self.braces = 0;
        self.brackets = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(chunks: &[&str]) -> Vec<String> {
        let mut splitter = Splitter::default();
        let mut texts = Vec::new();
        for chunk in chunks {
            splitter.push(chunk.as_bytes(), &mut texts).unwrap();
        }
        texts
            .into_iter()
            .map(|t| String::from_utf8(t).unwrap())
            .collect()
    }

    #[test]
    fn texts_end_where_braces_balance_without_newlines() {
        assert_eq!(
            split(&["{\"a\": {\"b\": [1]}}{\"c\": 2}\n {}"]),
            ["{\"a\": {\"b\": [1]}}", "{\"c\": 2}", "{}"]
        );
    }

    #[test]
    fn a_text_split_across_reads_is_joined() {
        assert_eq!(
            split(&["{\"exec", "ute\": \"x", "\"", "}"]),
            ["{\"execute\": \"x\"}"]
        );
    }

    #[test]
    fn braces_inside_strings_do_not_count() {
        assert_eq!(split(&["{\"a\": \"}]\\\"{\"}"]), ["{\"a\": \"}]\\\"{\"}"]);
    }

    #[test]
    fn single_quoted_strings_become_double_quoted() {
        assert_eq!(
            split(&["{'a': 'it\\'s \"x\"'}"]),
            ["{\"a\": \"it's \\\"x\\\"\"}"]
        );
    }

    #[test]
    fn top_level_scalars_end_at_a_delimiter() {
        assert_eq!(split(&["garbage\n1"]), ["garbage"]);
        assert_eq!(split(&["true {}"]), ["true", "{}"]);
        assert_eq!(split(&["\"x\""]), ["\"x\""]);
    }

    #[test]
    fn stray_closers_are_texts_of_their_own() {
        assert_eq!(split(&["}]"]), ["}", "]"]);
        assert_eq!(split(&["{]"]), ["{]"]);
    }

    #[test]
    fn an_endless_text_is_refused() {
        let mut splitter = Splitter::default();
        let mut texts = Vec::new();
        splitter.push(b"{\"a\": \"", &mut texts).unwrap();
        let chunk = vec![b'x'; 64 * 1024];
        let error =
            (0..=TEXT_LEN_MAX / chunk.len()).find_map(|_| splitter.push(&chunk, &mut texts).err());
        assert_eq!(error, Some(StreamError::TooLong));
        assert!(texts.is_empty());
    }

    #[test]
    fn nesting_is_bounded() {
        let mut splitter = Splitter::default();
        let deep = vec![b'['; NESTING_MAX + 1];
        assert_eq!(
            splitter.push(&deep, &mut Vec::new()),
            Err(StreamError::TooDeep)
        );
    }

    #[test]
    fn the_deepest_allowed_text_parses() {
        let text = format!("{}{}", "[".repeat(NESTING_MAX), "]".repeat(NESTING_MAX));
        let texts = split(&[&text]);
        assert!(crate::qmp::json::parse(texts[0].as_bytes()).is_ok());
    }
}
