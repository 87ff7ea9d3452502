//! One client's side of the protocol: the greeting, capabilities negotiation, the checks on
//! each request, and the reply envelope. Knows nothing of sockets; the server feeds it texts
//! and sends what it returns.
//!
//! A request is a JSON object with `execute` (or `exec-oob`, once out-of-band execution is
//! enabled), optional `arguments` (an object) and optional `id` (any value, echoed in the
//! reply, errors included). Until `qmp_capabilities` succeeds, every other command is refused
//! with `CommandNotFound`.

use std::cell::Cell;

use serde_json::{Map, Value};

use super::QmpError;
use super::commands::{self, Handler};
use super::json::{self, Ordered};
use super::stream::StreamError;

/// The protocol state of one client.
pub struct Session {
    pretty: bool,
    negotiated: Cell<bool>,
    oob: Cell<bool>,
}

/// A request that passed the envelope checks.
struct Request {
    command: String,
    arguments: Map<String, Value>,
    /// Sent as `exec-oob`.
    oob: bool,
}

impl Session {
    /// A client that has just connected; `pretty` as its monitor's `pretty=on`.
    pub fn new(pretty: bool) -> Session {
        Session {
            pretty,
            negotiated: Cell::new(false),
            oob: Cell::new(false),
        }
    }

    /// Whether capabilities negotiation is complete (the client receives events).
    pub fn negotiated(&self) -> bool {
        self.negotiated.get()
    }

    /// Whether messages to this client are pretty-printed.
    pub fn pretty(&self) -> bool {
        self.pretty
    }

    /// The greeting, members in QSD's order.
    pub fn greeting(&self) -> String {
        let (major, minor, micro) = commands::qemu_version();
        let (major, minor, micro) = (Value::from(major), Value::from(minor), Value::from(micro));
        let package = Value::String(commands::package());
        let capabilities = Value::from(commands::CAPABILITIES.to_vec());
        let qemu = Ordered::Object(vec![
            ("micro", Ordered::Value(&micro)),
            ("minor", Ordered::Value(&minor)),
            ("major", Ordered::Value(&major)),
        ]);
        let version = Ordered::Object(vec![("qemu", qemu), ("package", Ordered::Value(&package))]);
        let qmp = Ordered::Object(vec![
            ("version", version),
            ("capabilities", Ordered::Value(&capabilities)),
        ]);
        json::render(self.pretty, vec![("QMP", qmp)])
    }

    /// The reply to one text: parses and checks it, runs its command through `execute` (which
    /// calls the handler with the command state) and renders the result.
    pub fn handle(
        &self,
        text: &[u8],
        execute: impl FnOnce(Handler, Map<String, Value>) -> Result<Value, QmpError>,
    ) -> String {
        let value = match json::parse(text) {
            Ok(value) => value,
            Err(desc) => return self.reply(Err(QmpError::generic(desc)), None),
        };
        let Value::Object(mut object) = value else {
            return self.reply(
                Err(QmpError::generic("QMP input must be a JSON object")),
                None,
            );
        };
        let id = object.remove("id");
        let result = self
            .request(object)
            .and_then(|request| self.dispatch(request, execute));
        self.reply(result, id.as_ref())
    }

    /// The error that ends a stream the client cannot continue.
    pub fn stream_error(&self, error: StreamError) -> String {
        self.reply(Err(QmpError::generic(error.to_string())), None)
    }

    /// Checks the members of a request (without its `id`).
    fn request(&self, object: Map<String, Value>) -> Result<Request, QmpError> {
        let (mut execute, mut exec_oob, mut arguments) = (None, None, None);
        for (key, value) in object {
            match key.as_str() {
                "execute" => execute = Some(command_name(&key, value)?),
                "exec-oob" if self.oob.get() => exec_oob = Some(command_name(&key, value)?),
                "arguments" => match value {
                    Value::Object(map) => arguments = Some(map),
                    _ => {
                        return Err(QmpError::generic(
                            "QMP input member 'arguments' must be an object",
                        ));
                    }
                },
                _ => {
                    return Err(QmpError::generic(format!(
                        "QMP input member '{key}' is unexpected"
                    )));
                }
            }
        }
        let (command, oob) = match (execute, exec_oob) {
            (Some(_), Some(_)) => {
                return Err(QmpError::generic(
                    "QMP input member 'execute' clashes with 'exec-oob'",
                ));
            }
            (Some(command), None) => (command, false),
            (None, Some(command)) => (command, true),
            (None, None) => return Err(QmpError::generic("QMP input lacks member 'execute'")),
        };
        Ok(Request {
            command,
            arguments: arguments.unwrap_or_default(),
            oob,
        })
    }

    fn dispatch(
        &self,
        request: Request,
        execute: impl FnOnce(Handler, Map<String, Value>) -> Result<Value, QmpError>,
    ) -> Result<Value, QmpError> {
        let Request {
            command,
            arguments,
            oob,
        } = request;
        if !self.negotiated.get() {
            if command != "qmp_capabilities" {
                return Err(QmpError::command_not_found(
                    "Expecting capabilities negotiation with 'qmp_capabilities'",
                ));
            }
            let oob = commands::capabilities_enabled(arguments)?;
            self.oob.set(oob);
            self.negotiated.set(true);
            return Ok(Value::Object(Map::new()));
        }
        let Some(handler) = commands::find(&command) else {
            return Err(QmpError::command_not_found(format!(
                "The command {command} has not been found"
            )));
        };
        if oob {
            return Err(QmpError::generic(format!(
                "The command {command} does not support OOB"
            )));
        }
        execute(handler, arguments)
    }

    /// `{"return": ..., "id": ...}` or `{"id": ..., "error": ...}`, `id` only if the request
    /// had one: the member order QSD prints.
    fn reply(&self, result: Result<Value, QmpError>, id: Option<&Value>) -> String {
        let (class, desc);
        let mut members = match &result {
            Ok(value) => vec![("return", Ordered::Value(value))],
            Err(error) => {
                class = Value::String(error.class.to_owned());
                desc = Value::String(error.desc.clone());
                let error = Ordered::Object(vec![
                    ("class", Ordered::Value(&class)),
                    ("desc", Ordered::Value(&desc)),
                ]);
                match id {
                    Some(id) => vec![("id", Ordered::Value(id)), ("error", error)],
                    None => vec![("error", error)],
                }
            }
        };
        if let (Ok(_), Some(id)) = (&result, id) {
            members.push(("id", Ordered::Value(id)));
        }
        json::render(self.pretty, members)
    }
}

/// The command named by `execute` or `exec-oob`.
fn command_name(key: &str, value: Value) -> Result<String, QmpError> {
    match value {
        Value::String(name) => Ok(name),
        _ => Err(QmpError::generic(format!(
            "QMP input member '{key}' must be a string"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn never(_: Handler, _: Map<String, Value>) -> Result<Value, QmpError> {
        panic!("no command may run here")
    }

    fn reply(session: &Session, text: &str) -> Value {
        serde_json::from_str(&session.handle(text.as_bytes(), never)).unwrap()
    }

    fn negotiated(oob: bool) -> Session {
        let session = Session::new(false);
        let enable = if oob { r#"{"enable": ["oob"]}"# } else { "{}" };
        let text = format!(r#"{{"execute": "qmp_capabilities", "arguments": {enable}}}"#);
        assert_eq!(reply(&session, &text), json!({"return": {}}));
        session
    }

    #[test]
    fn before_negotiation_no_command_runs() {
        let session = Session::new(false);
        for text in [
            r#"{"execute": "query-version"}"#,
            r#"{"execute": "nope", "id": 1}"#,
        ] {
            let desc = reply(&session, text)["error"]["desc"].clone();
            assert_eq!(
                desc,
                "Expecting capabilities negotiation with 'qmp_capabilities'"
            );
        }
        assert!(!session.negotiated());
    }

    #[test]
    fn negotiation_with_bad_arguments_leaves_the_client_negotiating() {
        let session = Session::new(false);
        let text = r#"{"execute": "qmp_capabilities", "arguments": {"enable": ["x"]}}"#;
        assert_eq!(
            reply(&session, text)["error"]["desc"],
            "Parameter 'null' does not accept value 'x'"
        );
        assert!(!session.negotiated());
    }

    #[test]
    fn after_negotiation_commands_run_with_their_arguments() {
        let session = negotiated(false);
        let text = r#"{"execute": "query-version", "arguments": {"a": 1}, "id": "x"}"#;
        let out = session.handle(text.as_bytes(), |_, args| Ok(Value::Object(args)));
        assert_eq!(out, "{\"return\": {\"a\": 1}, \"id\": \"x\"}\r\n");
    }

    #[test]
    fn exec_oob_is_unexpected_until_oob_is_enabled() {
        let session = negotiated(false);
        assert_eq!(
            reply(&session, r#"{"exec-oob": "query-version"}"#)["error"]["desc"],
            "QMP input member 'exec-oob' is unexpected"
        );
    }

    #[test]
    fn with_oob_enabled_no_command_supports_it() {
        let session = negotiated(true);
        assert_eq!(
            reply(&session, r#"{"exec-oob": "query-version"}"#)["error"]["desc"],
            "The command query-version does not support OOB"
        );
        assert_eq!(
            reply(
                &session,
                r#"{"exec-oob": "query-version", "execute": "query-version"}"#
            )["error"]["desc"],
            "QMP input member 'execute' clashes with 'exec-oob'"
        );
    }

    #[test]
    fn errors_carry_the_id_first() {
        let session = negotiated(false);
        let out = session.handle(br#"{"execute": "nope", "id": 2}"#, never);
        assert_eq!(
            out,
            "{\"id\": 2, \"error\": {\"class\": \"CommandNotFound\", \
             \"desc\": \"The command nope has not been found\"}}\r\n"
        );
    }

    #[test]
    fn greeting_matches_qsd_layout() {
        assert_eq!(
            Session::new(false).greeting(),
            format!(
                "{{\"QMP\": {{\"version\": {{\"qemu\": {{\"micro\": 2, \"minor\": 0, \
                 \"major\": 10}}, \"package\": \"ringblk {}\"}}, \"capabilities\": [\"oob\"]}}}}\r\n",
                env!("CARGO_PKG_VERSION")
            )
        );
    }
}
