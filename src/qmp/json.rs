//! JSON as QMP puts it on the wire: parsing one text a client sent (see [`super::stream`] for
//! how texts are cut out of the byte stream) and rendering replies and events the way
//! qemu-storage-daemon prints them.
//!
//! Rendering follows QSD's output byte for byte where it is observable: `": "` and `", "`
//! separators, every character outside printable ASCII written as a `\uXXXX` escape with
//! upper-case hex (UTF-16 surrogate pairs above the BMP), and in pretty mode four spaces of
//! indentation with CRLF line ends. Member order: QSD prints an object in the order of its
//! hash table, which is fixed for a given set of keys but follows no rule; the envelopes
//! (greeting, `return`/`id`, `id`/`error`, `class`/`desc`, `timestamp`/`event`/`data`) are
//! built as [`Ordered`] objects in QSD's order, objects inside a command's result are written
//! sorted by key (`serde_json::Map` order).

use std::fmt::Write as _;

use serde_json::Value;

/// What a message is made of: JSON values, and objects whose members keep the order given
/// (the envelopes QMP defines).
pub enum Ordered<'a> {
    /// A value; its objects are written in `Map` order.
    Value(&'a Value),
    /// An object with members in this order.
    Object(Vec<(&'a str, Ordered<'a>)>),
}

/// Renders JSON texts, compact or pretty.
struct Writer {
    out: String,
    pretty: bool,
    level: usize,
}

impl Writer {
    /// An empty text; `pretty` as `--monitor pretty=on` asks.
    fn new(pretty: bool) -> Writer {
        Writer {
            out: String::new(),
            pretty,
            level: 0,
        }
    }

    /// The text, ending with the CRLF that ends every QMP message.
    fn finish(mut self) -> String {
        self.out.push_str("\r\n");
        self.out
    }

    /// Writes an object whose members come in the given order.
    fn members<'a>(&mut self, members: impl IntoIterator<Item = (&'a str, Ordered<'a>)>) {
        self.out.push('{');
        self.level += 1;
        for (i, (key, value)) in members.into_iter().enumerate() {
            self.separator(i == 0);
            self.string(key);
            self.out.push_str(": ");
            match value {
                Ordered::Value(v) => self.value(v),
                Ordered::Object(inner) => self.members(inner),
            }
        }
        self.close('}');
    }

    /// Writes any value.
    fn value(&mut self, value: &Value) {
        match value {
            Value::Null => self.out.push_str("null"),
            Value::Bool(b) => self.out.push_str(if *b { "true" } else { "false" }),
            Value::Number(n) => self.number(n),
            Value::String(s) => self.string(s),
            Value::Array(items) => {
                self.out.push('[');
                self.level += 1;
                for (i, item) in items.iter().enumerate() {
                    self.separator(i == 0);
                    self.value(item);
                }
                self.close(']');
            }
            Value::Object(map) => {
                self.members(map.iter().map(|(k, v)| (k.as_str(), Ordered::Value(v))))
            }
        }
    }

    /// Before a member or an item: a comma unless it is the first, then a space (compact) or a
    /// new line (pretty).
    fn separator(&mut self, first: bool) {
        if !first {
            self.out.push(',');
        }
        if self.pretty {
            self.new_line();
        } else if !first {
            self.out.push(' ');
        }
    }

    /// Ends a container. Pretty: on a line of its own, also when empty (QSD's pretty printer
    /// writes an empty object as `{`, line break, `}`).
    fn close(&mut self, bracket: char) {
        self.level -= 1;
        if self.pretty {
            self.new_line();
        }
        self.out.push(bracket);
    }

    fn new_line(&mut self) {
        self.out.push_str("\r\n");
        for _ in 0..self.level {
            self.out.push_str("    ");
        }
    }

    /// Integers as they are; other numbers without a fractional part as integers (QSD prints
    /// `1.5e3` as `1500`), the rest in Rust's shortest round-trip form.
    fn number(&mut self, n: &serde_json::Number) {
        match n.as_f64() {
            Some(f) if n.is_f64() && f.fract() == 0.0 && f.abs() < 1e17 => {
                let _ = write!(self.out, "{f:.0}");
            }
            _ => {
                let _ = write!(self.out, "{n}");
            }
        }
    }

    fn string(&mut self, s: &str) {
        self.out.push('"');
        for c in s.chars() {
            match c {
                '"' => self.out.push_str("\\\""),
                '\\' => self.out.push_str("\\\\"),
                '\u{8}' => self.out.push_str("\\b"),
                '\u{c}' => self.out.push_str("\\f"),
                '\n' => self.out.push_str("\\n"),
                '\r' => self.out.push_str("\\r"),
                '\t' => self.out.push_str("\\t"),
                ' '..='~' => self.out.push(c),
                _ => {
                    let mut units = [0u16; 2];
                    for unit in c.encode_utf16(&mut units) {
                        let _ = write!(self.out, "\\u{unit:04X}");
                    }
                }
            }
        }
        self.out.push('"');
    }
}

/// Renders an object whose members come in the given order, as one QMP message.
pub fn render<'a>(pretty: bool, members: Vec<(&'a str, Ordered<'a>)>) -> String {
    let mut writer = Writer::new(pretty);
    writer.members(members);
    writer.finish()
}

/// Parses one text cut out by the stream splitter. The error is QSD's reply text.
pub fn parse(text: &[u8]) -> Result<Value, String> {
    serde_json::from_slice(text).map_err(|e| parse_error(text, &e))
}

/// QSD's wording for the common mistakes; serde's own message (without its position) for the
/// rest.
fn parse_error(text: &[u8], error: &serde_json::Error) -> String {
    let message = error.to_string();
    let message = message
        .rsplit_once(" at line ")
        .map_or(message.as_str(), |(m, _)| m);
    let reason = match message {
        "expected value" | "trailing comma" | "EOF while parsing a value" => {
            keyword_at(text, error).map_or_else(
                || "expecting value".to_owned(),
                |word| format!("invalid keyword '{word}'"),
            )
        }
        "expected ident" => keyword_at(text, error).map_or_else(
            || "expecting value".to_owned(),
            |word| format!("invalid keyword '{word}'"),
        ),
        "expected `:`" => "missing : in object pair".to_owned(),
        "key must be a string" if byte_at(text, error) == Some(b']') => {
            "expecting value".to_owned()
        }
        "key must be a string" => "key is not a string in object".to_owned(),
        "expected `,` or `}`" => "expected separator in dict".to_owned(),
        "expected `,` or `]`" => "expected separator in list".to_owned(),
        "invalid escape" => "invalid escape sequence in string".to_owned(),
        "recursion limit exceeded" => return "JSON nesting depth limit exceeded".to_owned(),
        other => other.to_owned(),
    };
    format!("JSON parse error, {reason}")
}

/// The byte serde stopped at.
fn byte_at(text: &[u8], error: &serde_json::Error) -> Option<u8> {
    offset_of(text, error.line(), error.column()).map(|offset| text[offset])
}

/// The run of letters and digits around the position of `error`, if it starts with a letter:
/// the misspelt keyword (`tru`, `garbage`) that QSD names in its message.
fn keyword_at(text: &[u8], error: &serde_json::Error) -> Option<String> {
    let offset = offset_of(text, error.line(), error.column())?;
    let is_word = |b: &u8| b.is_ascii_alphanumeric();
    let start = text[..offset]
        .iter()
        .rposition(|b| !is_word(b))
        .map_or(0, |i| i + 1);
    let end = text[start..]
        .iter()
        .position(|b| !is_word(b))
        .map_or(text.len(), |i| start + i);
    let word = &text[start..end];
    word.first()
        .filter(|b| b.is_ascii_alphabetic())
        .map(|_| String::from_utf8_lossy(word).into_owned())
}

/// The byte offset of serde's 1-based line and column (the column of the last byte read).
fn offset_of(text: &[u8], line: usize, column: usize) -> Option<usize> {
    let line_start = if line <= 1 {
        0
    } else {
        text.iter()
            .enumerate()
            .filter(|(_, b)| **b == b'\n')
            .nth(line - 2)?
            .0
            + 1
    };
    let offset = line_start + column.checked_sub(1)?;
    (offset < text.len()).then_some(offset)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn compact_rendering_uses_qsd_separators_and_crlf() {
        let ret = json!({"a": [1, {}], "b": []});
        let id = json!(7);
        let text = render(
            false,
            vec![
                ("return", Ordered::Value(&ret)),
                ("id", Ordered::Value(&id)),
            ],
        );
        assert_eq!(
            text,
            "{\"return\": {\"a\": [1, {}], \"b\": []}, \"id\": 7}\r\n"
        );
    }

    #[test]
    fn strings_escape_everything_outside_printable_ascii_in_upper_case() {
        let id = json!("a/b\u{7f}\u{1}é😀\"\\\n");
        let text = render(false, vec![("id", Ordered::Value(&id))]);
        assert_eq!(
            text,
            "{\"id\": \"a/b\\u007F\\u0001\\u00E9\\uD83D\\uDE00\\\"\\\\\\n\"}\r\n"
        );
    }

    #[test]
    fn pretty_rendering_puts_empty_objects_on_two_lines() {
        let (ret, id) = (json!({}), json!([1]));
        let text = render(
            true,
            vec![
                ("return", Ordered::Value(&ret)),
                ("id", Ordered::Value(&id)),
            ],
        );
        assert_eq!(
            text,
            "{\r\n    \"return\": {\r\n    },\r\n    \"id\": [\r\n        1\r\n    ]\r\n}\r\n"
        );
    }

    #[test]
    fn whole_floats_render_as_integers() {
        let (id, x) = (json!(1.5e3), json!(0.5));
        let text = render(
            false,
            vec![("id", Ordered::Value(&id)), ("x", Ordered::Value(&x))],
        );
        assert_eq!(text, "{\"id\": 1500, \"x\": 0.5}\r\n");
    }

    #[test]
    fn parse_errors_use_qsd_wording() {
        let cases: [(&str, &str); 9] = [
            ("{\"a\" 1}", "missing : in object pair"),
            ("{1:2}", "key is not a string in object"),
            ("{\"a\":1 \"b\":2}", "expected separator in dict"),
            ("[1 2]", "expected separator in list"),
            ("{\"a\":1,}", "expecting value"),
            ("[1,]", "expecting value"),
            ("{\"a\":tru}", "invalid keyword 'tru'"),
            ("garbage", "invalid keyword 'garbage'"),
            ("{\"a\":\"\\x\"}", "invalid escape sequence in string"),
        ];
        for (text, reason) in cases {
            assert_eq!(
                parse(text.as_bytes()).unwrap_err(),
                format!("JSON parse error, {reason}"),
                "{text}"
            );
        }
        for stray in ["}", "]", "{]"] {
            assert_eq!(
                parse(stray.as_bytes()).unwrap_err(),
                "JSON parse error, expecting value",
                "{stray}"
            );
        }
    }
}
