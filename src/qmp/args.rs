//! Reading the `arguments` of commands whose arguments are a plain struct, with the messages
//! of QEMU's input visitor: members are read in declaration order (a missing one is reported
//! first), and whatever is left over is unexpected. Commands whose arguments are the typed
//! options of [`crate::options`] (`blockdev-add`, ...) go through those instead.

use serde_json::{Map, Value};

use super::QmpError;

/// The arguments of one command, consumed member by member.
pub struct Arguments(Map<String, Value>);

/// QAPI's name for a JSON type in "expected: ..." messages.
fn type_error(name: &str, expected: &str) -> QmpError {
    QmpError::generic(format!(
        "Invalid parameter type for '{name}', expected: {expected}"
    ))
}

fn bad_value(name: &str, value: &str) -> QmpError {
    QmpError::generic(format!(
        "Parameter '{name}' does not accept value '{value}'"
    ))
}

/// A list element's name in QSD 10.0's messages.
const LIST_ELEMENT: &str = "null";

impl Arguments {
    /// Wraps the `arguments` object of a request.
    pub fn new(map: Map<String, Value>) -> Arguments {
        Arguments(map)
    }

    /// A mandatory string member.
    pub fn string(&mut self, name: &str) -> Result<String, QmpError> {
        self.optional_string(name)?
            .ok_or_else(|| QmpError::generic(format!("Parameter '{name}' is missing")))
    }

    /// An optional string member.
    pub fn optional_string(&mut self, name: &str) -> Result<Option<String>, QmpError> {
        match self.0.remove(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(type_error(name, "string")),
        }
    }

    /// An optional boolean member.
    pub fn optional_bool(&mut self, name: &str) -> Result<Option<bool>, QmpError> {
        match self.0.remove(name) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(b)),
            Some(_) => Err(type_error(name, "boolean")),
        }
    }

    /// An optional member of an enum type whose values are `values`.
    pub fn optional_enum(
        &mut self,
        name: &str,
        values: &[&str],
    ) -> Result<Option<String>, QmpError> {
        let value = self.optional_string(name)?;
        match value {
            Some(v) if !values.contains(&v.as_str()) => Err(bad_value(name, &v)),
            other => Ok(other),
        }
    }

    /// A mandatory member of an enum type whose values are `values`.
    pub fn enumeration(&mut self, name: &str, values: &[&str]) -> Result<String, QmpError> {
        self.optional_enum(name, values)?
            .ok_or_else(|| QmpError::generic(format!("Parameter '{name}' is missing")))
    }

    /// An optional unsigned integer member (QAPI `int`/`size` that must not be negative).
    pub fn optional_u64(&mut self, name: &str) -> Result<Option<u64>, QmpError> {
        match self.0.remove(name) {
            None => Ok(None),
            Some(Value::Number(n)) => match n.as_u64() {
                Some(v) => Ok(Some(v)),
                None if n.is_i64() => Err(QmpError::generic(format!(
                    "Parameter '{name}' expects a non-negative value"
                ))),
                None => Err(type_error(name, "integer")),
            },
            Some(_) => Err(type_error(name, "integer")),
        }
    }

    /// A mandatory unsigned integer member.
    pub fn u64(&mut self, name: &str) -> Result<u64, QmpError> {
        self.optional_u64(name)?
            .ok_or_else(|| QmpError::generic(format!("Parameter '{name}' is missing")))
    }

    /// A mandatory QAPI `uint64` member, read as QEMU's input visitor reads one: a negative
    /// integer wraps around (-1 is 2^64 - 1), anything else not an integer "expects uint64".
    pub fn uint64(&mut self, name: &str) -> Result<u64, QmpError> {
        match self.0.remove(name) {
            None => Err(QmpError::generic(format!("Parameter '{name}' is missing"))),
            Some(Value::Number(n)) if n.is_u64() => Ok(n.as_u64().unwrap_or_default()),
            Some(Value::Number(n)) if n.is_i64() => {
                Ok(n.as_i64().unwrap_or_default().cast_unsigned())
            }
            Some(_) => Err(QmpError::generic(format!(
                "Parameter '{name}' expects uint64"
            ))),
        }
    }

    /// A mandatory signed integer member (QAPI `int`).
    pub fn i64(&mut self, name: &str) -> Result<i64, QmpError> {
        match self.0.remove(name) {
            None => Err(QmpError::generic(format!("Parameter '{name}' is missing"))),
            Some(Value::Number(n)) => n.as_i64().ok_or_else(|| type_error(name, "integer")),
            Some(_) => Err(type_error(name, "integer")),
        }
    }

    /// An optional list of an enum type whose values are `values`; absent is empty.
    pub fn optional_enum_list(
        &mut self,
        name: &str,
        values: &[&str],
    ) -> Result<Vec<String>, QmpError> {
        let items = match self.0.remove(name) {
            None => return Ok(Vec::new()),
            Some(Value::Array(items)) => items,
            Some(_) => return Err(type_error(name, "array")),
        };
        items
            .into_iter()
            .map(|item| match item {
                Value::String(v) if values.contains(&v.as_str()) => Ok(v),
                Value::String(v) => Err(bad_value(LIST_ELEMENT, &v)),
                _ => Err(type_error(LIST_ELEMENT, "string")),
            })
            .collect()
    }

    /// Ends reading: any member not read is unexpected.
    pub fn finish(self) -> Result<(), QmpError> {
        match self.0.keys().next() {
            None => Ok(()),
            Some(name) => Err(QmpError::generic(format!(
                "Parameter '{name}' is unexpected"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn args(value: Value) -> Arguments {
        let Value::Object(map) = value else {
            panic!("arguments are an object")
        };
        Arguments::new(map)
    }

    #[test]
    fn a_missing_member_is_reported_before_an_unexpected_one() {
        let mut a = args(json!({"x": 1}));
        assert_eq!(
            a.string("node-name").unwrap_err().desc,
            "Parameter 'node-name' is missing"
        );
        assert_eq!(a.finish().unwrap_err().desc, "Parameter 'x' is unexpected");
    }

    #[test]
    fn wrong_types_name_the_expected_type() {
        let mut a = args(json!({"id": 1, "flat": "yes", "enable": "oob"}));
        assert_eq!(
            a.string("id").unwrap_err().desc,
            "Invalid parameter type for 'id', expected: string"
        );
        assert_eq!(
            a.optional_bool("flat").unwrap_err().desc,
            "Invalid parameter type for 'flat', expected: boolean"
        );
        assert_eq!(
            a.optional_enum_list("enable", &["oob"]).unwrap_err().desc,
            "Invalid parameter type for 'enable', expected: array"
        );
    }

    #[test]
    fn enum_values_outside_the_type_are_refused() {
        let mut a = args(json!({"mode": "x", "enable": ["foo"]}));
        assert_eq!(
            a.optional_enum("mode", &["safe", "hard"]).unwrap_err().desc,
            "Parameter 'mode' does not accept value 'x'"
        );
        assert_eq!(
            a.optional_enum_list("enable", &["oob"]).unwrap_err().desc,
            "Parameter 'null' does not accept value 'foo'"
        );
    }

    #[test]
    fn members_read_are_not_unexpected() {
        let mut a = args(json!({"id": "e", "mode": "hard"}));
        assert_eq!(a.string("id").unwrap(), "e");
        assert_eq!(
            a.optional_enum("mode", &["safe", "hard"])
                .unwrap()
                .as_deref(),
            Some("hard")
        );
        assert!(a.finish().is_ok());
    }
}
