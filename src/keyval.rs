//! The two option syntaxes of QEMU's command line, reduced to JSON.
//!
//! - **keyval** (`--blockdev`, `--export`, `--object`, `--monitor`): `key=value,key2=value2`.
//!   `,,` in a value is a literal comma; dotted keys (`cache.direct=on`) build nested objects;
//!   keys whose last fragments are all numbers (`x.0=a,x.1=b`) build arrays. Option types may
//!   have an *implied key*: a first parameter without `=` is its value (`null-co,node-name=n`
//!   means `driver=null-co,node-name=n`). The result is a JSON object whose leaves are all
//!   strings; [`crate::options`] gives the strings their types. A parameter `help` or `?` asks
//!   for help instead.
//! - **QemuOpts** (`--chardev`): the older syntax. Keys are flat, any characters but `=` and `,`;
//!   a parameter without `=` is a short-form boolean; the implied value may contain `,,` too.
//!
//! An argument that starts with `{` is the **JSON form** of a keyval option ([`parse_json`]):
//! one JSON object with real numbers and booleans.
//!
//! Every rule here was checked against qemu-storage-daemon 10.0.2; the error messages are its
//! wording.

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, Visitor};
use serde_json::{Map, Value};

/// A keyval or JSON argument that is not well-formed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyvalError {
    /// A parameter with no `=` after its key (other than the implied first one).
    #[error("Expected '=' after parameter '{0}'")]
    ExpectedEquals(String),
    /// The same key prefix is used both as a value and as an object (or array).
    #[error("Parameters '{0}.*' used inconsistently")]
    Inconsistent(String),
    /// A key that is empty or has a malformed fragment.
    #[error("Invalid parameter '{0}'")]
    InvalidKey(String),
    /// `{0}` names the JSON syntax problem.
    #[error("JSON parse error, {0}")]
    Json(String),
    /// Text after the JSON object.
    #[error("Expecting at most one JSON value")]
    JsonTrailing,
    /// An array key set with a gap: `x.1=a` without `x.0`.
    #[error("Parameter '{0}' missing")]
    MissingIndex(String),
    /// A key fragment longer than 127 characters.
    #[error("Parameter '{0}' is too long")]
    TooLong(String),
}

/// A parsed keyval argument.
#[derive(Debug, Clone, PartialEq)]
pub struct Keyval {
    /// The parameters as a JSON object of strings, objects and arrays.
    pub value: Map<String, Value>,
    /// The argument contained a `help` or `?` parameter.
    pub help: bool,
}

/// Longest key fragment QEMU accepts.
const KEY_FRAGMENT_LEN_MAX: usize = 127;

/// Parses `input` in keyval syntax; `implied_key` names the key of a first parameter given
/// without `=`.
pub fn parse(input: &str, implied_key: Option<&str>) -> Result<Keyval, KeyvalError> {
    let mut root = Map::new();
    let mut help = false;
    let mut rest = input;
    let mut first = true;
    while !rest.is_empty() {
        let key_len = rest.find(['=', ',']).unwrap_or(rest.len());
        let key = &rest[..key_len];
        let followed_by_equals = rest[key_len..].starts_with('=');
        if !followed_by_equals && (key == "help" || key == "?") {
            help = true;
            rest = skip_separator(&rest[key_len..]);
        } else if let (true, Some(implied), false, false) =
            (first, implied_key, followed_by_equals, key.is_empty())
        {
            // The implied value stops at the first ',': it has no ',,' escape.
            put(&mut root, &[implied], key.to_owned())?;
            rest = skip_separator(&rest[key_len..]);
        } else {
            let fragments = key_fragments(key)?;
            if !followed_by_equals {
                return Err(KeyvalError::ExpectedEquals(key.to_owned()));
            }
            let (value, after) = take_value(&rest[key_len + 1..]);
            put(&mut root, &fragments, value)?;
            rest = after;
        }
        first = false;
    }
    listify_children(&mut root, "")?;
    Ok(Keyval { value: root, help })
}

/// Parses the JSON form of an option: exactly one JSON object.
pub fn parse_json(input: &str) -> Result<Map<String, Value>, KeyvalError> {
    let mut stream = serde_json::Deserializer::from_str(input).into_iter::<StrictValue>();
    let value = match stream.next() {
        Some(Ok(StrictValue(value))) => value,
        Some(Err(e)) if e.is_eof() => return Err(KeyvalError::Json("premature EOI".into())),
        Some(Err(e)) => return Err(KeyvalError::Json(json_message(&e))),
        None => return Err(KeyvalError::Json("premature EOI".into())),
    };
    if !input[stream.byte_offset()..].trim().is_empty() {
        return Err(KeyvalError::JsonTrailing);
    }
    match value {
        Value::Object(map) => Ok(map),
        // Only reachable when the caller did not check for a leading '{'.
        _ => Err(KeyvalError::Json("expected a JSON object".into())),
    }
}

/// A JSON value whose objects have no repeated member, as QEMU's JSON parser demands.
struct StrictValue(Value);

impl<'de> Deserialize<'de> for StrictValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(StrictVisitor).map(StrictValue)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(StrictValue(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: de::MapAccess<'de>>(self, mut access: A) -> Result<Value, A::Error> {
        let mut map = Map::new();
        while let Some(key) = access.next_key::<String>()? {
            if map.contains_key(&key) {
                return Err(de::Error::custom("duplicate key"));
            }
            let StrictValue(value) = access.next_value()?;
            map.insert(key, value);
        }
        Ok(Value::Object(map))
    }
}

/// serde_json's message without its " at line 1 column 5" suffix.
fn json_message(e: &serde_json::Error) -> String {
    let message = e.to_string();
    match message.rfind(" at line ") {
        Some(at) => message[..at].to_owned(),
        None => message,
    }
}

/// One parameter of a QemuOpts argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QemuOpt {
    /// `key=value`, or the implied first value under its implied key.
    Pair(String, String),
    /// `key` alone: QEMU's deprecated short-form boolean (`server`, `nowait`).
    Bare(String),
}

/// A parsed QemuOpts argument, in input order (a repeated key: the last one counts).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuOpts {
    /// The parameters, in input order.
    pub opts: Vec<QemuOpt>,
    /// The argument contained a `help` or `?` parameter.
    pub help: bool,
}

/// Parses `input` in QemuOpts syntax (used by `--chardev`).
pub fn parse_qemu_opts(input: &str, implied_key: &str) -> QemuOpts {
    let mut opts = Vec::new();
    let mut help = false;
    let mut rest = input;
    let mut first = true;
    while !rest.is_empty() {
        let key_len = rest.find(['=', ',']).unwrap_or(rest.len());
        let key = &rest[..key_len];
        if rest[key_len..].starts_with('=') {
            let (value, after) = take_value(&rest[key_len + 1..]);
            opts.push(QemuOpt::Pair(key.to_owned(), value));
            rest = after;
        } else if key == "help" || key == "?" {
            help = true;
            rest = skip_separator(&rest[key_len..]);
        } else if first {
            let (value, after) = take_value(rest);
            opts.push(QemuOpt::Pair(implied_key.to_owned(), value));
            rest = after;
        } else {
            opts.push(QemuOpt::Bare(key.to_owned()));
            rest = skip_separator(&rest[key_len..]);
        }
        first = false;
    }
    QemuOpts { opts, help }
}

/// Drops the ',' that ends a parameter, if there is one.
fn skip_separator(rest: &str) -> &str {
    rest.strip_prefix(',').unwrap_or(rest)
}

/// Reads a value up to a lone ',' (",," is a literal comma); returns it and what follows the
/// separator.
fn take_value(input: &str) -> (String, &str) {
    let mut value = String::new();
    let mut rest = input;
    loop {
        match rest.find(',') {
            None => {
                value.push_str(rest);
                return (value, "");
            }
            Some(comma) => {
                value.push_str(&rest[..comma]);
                if rest[comma + 1..].starts_with(',') {
                    value.push(',');
                    rest = &rest[comma + 2..];
                } else {
                    return (value, &rest[comma + 1..]);
                }
            }
        }
    }
}

/// Splits a key into its fragments: the first is a name (a letter, then letters, digits, '-'
/// or '_'), each later one a name or an array index (digits).
fn key_fragments(key: &str) -> Result<Vec<&str>, KeyvalError> {
    let fragments: Vec<&str> = key.split('.').collect();
    for (i, fragment) in fragments.iter().enumerate() {
        let is_name = fragment.starts_with(|c: char| c.is_ascii_alphabetic())
            && fragment
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        let is_index =
            i > 0 && !fragment.is_empty() && fragment.chars().all(|c| c.is_ascii_digit());
        if !is_name && !is_index {
            return Err(KeyvalError::InvalidKey(key.to_owned()));
        }
        if fragment.len() > KEY_FRAGMENT_LEN_MAX {
            return Err(KeyvalError::TooLong(key.to_owned()));
        }
    }
    Ok(fragments)
}

/// Stores `value` under the path `fragments`, creating objects on the way. A repeated key
/// replaces the earlier value.
fn put(
    root: &mut Map<String, Value>,
    fragments: &[&str],
    value: String,
) -> Result<(), KeyvalError> {
    let (leaf, parents) = fragments
        .split_last()
        .expect("a key has at least one fragment");
    let mut node = root;
    for (depth, fragment) in parents.iter().enumerate() {
        let entry = node
            .entry(fragment.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
        node = match entry {
            Value::Object(map) => map,
            _ => return Err(KeyvalError::Inconsistent(fragments[..=depth].join("."))),
        };
    }
    if let Some(Value::Object(_)) = node.get(*leaf) {
        return Err(KeyvalError::Inconsistent(fragments.join(".")));
    }
    node.insert(leaf.to_string(), Value::String(value));
    Ok(())
}

/// Turns every object below `map` whose keys are all indices into an array.
fn listify_children(map: &mut Map<String, Value>, prefix: &str) -> Result<(), KeyvalError> {
    for (key, child) in map.iter_mut() {
        let Value::Object(object) = child else {
            continue;
        };
        let path = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        listify_children(object, &path)?;
        let indices = object
            .keys()
            .filter(|k| k.chars().all(|c| c.is_ascii_digit()))
            .count();
        if indices == 0 {
            continue;
        }
        if indices != object.len() {
            return Err(KeyvalError::Inconsistent(path));
        }
        let mut items: Vec<(u64, Value)> = Vec::with_capacity(object.len());
        for (index, item) in std::mem::take(object) {
            // An index too large for u64 cannot be contiguous from 0 anyway.
            let index = index.parse::<u64>().unwrap_or(u64::MAX);
            items.push((index, item));
        }
        items.sort_by_key(|(index, _)| *index);
        for (expected, (index, _)) in (0u64..).zip(&items) {
            if *index != expected {
                return Err(KeyvalError::MissingIndex(format!("{path}.{expected}")));
            }
        }
        *child = Value::Array(items.into_iter().map(|(_, item)| item).collect());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    //! Expectations marked "QSD:" were checked by running qemu-storage-daemon 10.0.2 with the
    //! same argument.
    use super::*;
    use serde_json::json;

    fn kv(input: &str, implied: Option<&str>) -> Value {
        Value::Object(parse(input, implied).unwrap().value)
    }

    fn kv_err(input: &str, implied: Option<&str>) -> String {
        parse(input, implied).unwrap_err().to_string()
    }

    #[test]
    fn pairs_become_an_object_of_strings() {
        assert_eq!(
            kv("driver=null-co,node-name=n,size=1024", None),
            json!({"driver": "null-co", "node-name": "n", "size": "1024"})
        );
    }

    #[test]
    fn double_comma_is_a_literal_comma() {
        // QSD: `node-name=a,,` reports "Invalid node-name: 'a,'".
        assert_eq!(
            kv("filename=a,,b,,,x=1", None),
            json!({"filename": "a,b,", "x": "1"})
        );
        assert_eq!(kv("filename=,,", None), json!({"filename": ","}));
    }

    #[test]
    fn dotted_keys_build_nested_objects() {
        assert_eq!(
            kv("addr.type=unix,addr.path=/s,cache.direct=on", None),
            json!({"addr": {"type": "unix", "path": "/s"}, "cache": {"direct": "on"}})
        );
    }

    #[test]
    fn repeated_key_last_one_wins() {
        // QSD: `read-only=on,read-only=off` starts.
        assert_eq!(kv("a=1,a=2", None), json!({"a": "2"}));
    }

    #[test]
    fn implied_key_takes_a_first_value_without_equals() {
        assert_eq!(
            kv("null-co,node-name=n", Some("driver")),
            json!({"driver": "null-co", "node-name": "n"})
        );
        // QSD: `--blockdev null-co,driver=file,...` uses file.
        assert_eq!(
            kv("null-co,driver=file", Some("driver")),
            json!({"driver": "file"})
        );
        assert_eq!(kv("driver=file", Some("driver")), json!({"driver": "file"}));
    }

    #[test]
    fn implied_value_has_no_comma_escape() {
        // QSD: `--blockdev null-co,,node-name=a` → "Invalid parameter ''".
        assert_eq!(
            kv_err("null-co,,node-name=a", Some("driver")),
            "Invalid parameter ''"
        );
    }

    #[test]
    fn implied_key_only_applies_to_the_first_parameter() {
        // QSD: `--blockdev node-name=a,null-co`.
        assert_eq!(
            kv_err("node-name=a,null-co", Some("driver")),
            "Expected '=' after parameter 'null-co'"
        );
        assert_eq!(
            kv_err("null-co", None),
            "Expected '=' after parameter 'null-co'"
        );
    }

    #[test]
    fn trailing_comma_and_empty_input_are_accepted() {
        assert_eq!(kv("a=1,", None), json!({"a": "1"}));
        assert_eq!(kv("", Some("driver")), json!({}));
    }

    #[test]
    fn empty_and_malformed_keys_are_invalid() {
        // QSD: each of these reports "Invalid parameter '<key>'".
        for (input, key) in [
            ("=1", ""),
            (",a=1", ""),
            ("9x=1", "9x"),
            ("_x=1", "_x"),
            ("x@y=1", "x@y"),
            ("a..b=1", "a..b"),
            ("cache.=1", "cache."),
            ("cache.0x=1", "cache.0x"),
            ("cache.-x=1", "cache.-x"),
            ("0=1", "0"),
            ("9x", "9x"),
        ] {
            assert_eq!(
                kv_err(input, None),
                format!("Invalid parameter '{key}'"),
                "{input}"
            );
        }
        assert_eq!(kv_err("=null-co", Some("driver")), "Invalid parameter ''");
    }

    #[test]
    fn key_syntax_allows_dashes_underscores_and_inner_indices() {
        assert_eq!(
            kv("x_y=1,x-=2,xY=3", None),
            json!({"x_y": "1", "x-": "2", "xY": "3"})
        );
    }

    #[test]
    fn value_after_first_equals_may_contain_equals() {
        assert_eq!(kv("x=1=2", None), json!({"x": "1=2"}));
    }

    #[test]
    fn overlong_key_fragment_is_refused() {
        let key = "a".repeat(128);
        assert_eq!(
            kv_err(&format!("{key}=1"), None),
            format!("Parameter '{key}' is too long")
        );
        let key = "a".repeat(127);
        assert!(parse(&format!("{key}=1"), None).is_ok());
    }

    #[test]
    fn scalar_and_object_under_one_key_are_inconsistent() {
        // QSD: "Parameters 'cache.*' used inconsistently" either way round.
        assert_eq!(
            kv_err("cache.direct=on,cache=1", None),
            "Parameters 'cache.*' used inconsistently"
        );
        assert_eq!(
            kv_err("cache=1,cache.direct=on", None),
            "Parameters 'cache.*' used inconsistently"
        );
        assert_eq!(
            kv_err("x.y.z=1,x.y=2", None),
            "Parameters 'x.y.*' used inconsistently"
        );
        assert_eq!(
            kv_err("x.y=2,x.y.z=1", None),
            "Parameters 'x.y.*' used inconsistently"
        );
    }

    #[test]
    fn index_keys_build_arrays() {
        assert_eq!(kv("x.1=b,x.0=a", None), json!({"x": ["a", "b"]}));
        // QSD: `x.1=a` → "Parameter 'x.0' missing"; `x.0=a,x.b=c` → inconsistent.
        assert_eq!(kv_err("x.1=a", None), "Parameter 'x.0' missing");
        assert_eq!(
            kv_err("x.0=a,x.b=c", None),
            "Parameters 'x.*' used inconsistently"
        );
    }

    #[test]
    fn help_is_a_flag_anywhere() {
        // QSD: `--object iothread,help`, `--object id=x,help`, `--blockdev help` all ask for help.
        for input in ["help", "?", "iothread,help", "id=x,?", "help,id=x"] {
            assert!(parse(input, Some("qom-type")).unwrap().help, "{input}");
        }
        // `help=1` is an ordinary key.
        let parsed = parse("help=1", None).unwrap();
        assert!(!parsed.help);
        assert_eq!(Value::Object(parsed.value), json!({"help": "1"}));
    }

    #[test]
    fn json_form_is_one_object() {
        assert_eq!(
            Value::Object(parse_json(r#"{"driver":"null-co","size":1024}"#).unwrap()),
            json!({"driver": "null-co", "size": 1024})
        );
    }

    #[test]
    fn json_form_errors() {
        // QSD: "JSON parse error, premature EOI" and "Expecting at most one JSON value".
        assert_eq!(
            parse_json(r#"{"driver":"null-co""#)
                .unwrap_err()
                .to_string(),
            "JSON parse error, premature EOI"
        );
        assert_eq!(
            parse_json(r#"{"driver":"null-co"} x"#)
                .unwrap_err()
                .to_string(),
            "Expecting at most one JSON value"
        );
        assert!(
            parse_json(r#"{"driver":}"#)
                .unwrap_err()
                .to_string()
                .starts_with("JSON parse error, ")
        );
        // QSD: "JSON parse error, duplicate key".
        assert_eq!(
            parse_json(r#"{"node-name":"a","node-name":"b"}"#)
                .unwrap_err()
                .to_string(),
            "JSON parse error, duplicate key"
        );
        assert_eq!(
            parse_json(r#"{"cache":{"direct":true,"direct":false}}"#)
                .unwrap_err()
                .to_string(),
            "JSON parse error, duplicate key"
        );
    }

    #[test]
    fn qemu_opts_implied_value_may_escape_commas() {
        // QSD: `--chardev socket,,x,id=m` → "'socket,x' is not a valid char driver name".
        let parsed = parse_qemu_opts("socket,,x,id=m", "backend");
        assert_eq!(
            parsed.opts,
            vec![
                QemuOpt::Pair("backend".into(), "socket,x".into()),
                QemuOpt::Pair("id".into(), "m".into())
            ]
        );
    }

    #[test]
    fn qemu_opts_keys_are_flat_and_bare_keys_are_short_booleans() {
        let parsed = parse_qemu_opts("socket,id=m,path.a=1,server,nowait", "backend");
        assert_eq!(
            parsed.opts,
            vec![
                QemuOpt::Pair("backend".into(), "socket".into()),
                QemuOpt::Pair("id".into(), "m".into()),
                QemuOpt::Pair("path.a".into(), "1".into()),
                QemuOpt::Bare("server".into()),
                QemuOpt::Bare("nowait".into()),
            ]
        );
        assert!(!parsed.help);
        assert!(parse_qemu_opts("socket,help", "backend").help);
        assert!(parse_qemu_opts("help", "backend").help);
    }
}
