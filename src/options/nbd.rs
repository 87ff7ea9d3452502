//! NBD's options: the `nbd` block driver (`BlockdevOptionsNbd`), the `nbd` export type
//! (`BlockExportOptionsNbd`) and the server (`--nbd-server` / `nbd-server-start`), with QAPI's
//! names. Their socket addresses may be `unix` or `inet`; `nbd-server-start` takes QAPI's
//! legacy form (`{"type": "inet", "data": {...}}`), as libvirt sends it.

use std::path::PathBuf;

use ringblk_nbd::Address;
use serde::Deserialize;
use serde_json::Value;

use super::{Form, Input, NoBase, OptionsError, UnixSocketAddressWire, check_unix_path};
use super::{Union, split_union};

/// The `nbd` driver's options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockdevOptionsNbd {
    /// The server.
    pub server: Address,
    /// The export's name (default: the empty name, as in QEMU).
    pub export: String,
    /// Seconds to keep trying to connect when the node opens (0: once).
    pub open_timeout: u32,
}

/// The `nbd` export type's options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockExportOptionsNbd {
    /// The name clients ask for (default: the node name).
    pub name: Option<String>,
    /// Shown to clients that ask.
    pub description: String,
}

/// `--nbd-server` / `nbd-server-start`: QAPI's `NbdServerOptions`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdServerOptions {
    /// Where it listens.
    pub addr: Address,
    /// Most clients at once (0: no limit, QEMU's default).
    pub max_connections: u32,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub(super) struct BlockdevNbdWire {
    /// A nested union: read by [`address`].
    server: Value,
    #[serde(default)]
    export: String,
    tls_creds: Option<String>,
    tls_hostname: Option<String>,
    x_dirty_bitmap: Option<String>,
    #[serde(default)]
    reconnect_delay: u32,
    #[serde(default)]
    open_timeout: u32,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub(super) struct ExportNbdWire {
    name: Option<String>,
    #[serde(default)]
    description: String,
    bitmaps: Option<Value>,
    #[serde(default)]
    allocation_depth: bool,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct ServerWire {
    /// A nested union: read by [`address`] or [`legacy_address`].
    addr: Value,
    tls_creds: Option<String>,
    tls_authz: Option<String>,
    #[serde(default)]
    max_connections: u32,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct InetSocketAddressWire {
    host: String,
    port: String,
    #[serde(default)]
    numeric: bool,
    #[serde(default)]
    ipv4: Option<bool>,
    #[serde(default)]
    ipv6: Option<bool>,
}

/// A `SocketAddress` of type `unix` or `inet`.
fn address(input: &Input<'_>) -> Result<Address, OptionsError> {
    let union: Union<NoBase> = split_union(input, "type")?;
    let NoBase {} = union.base()?;
    variant(input, &union.tag, &input.with_value(&union.rest))
}

/// QAPI's legacy `SocketAddressLegacy`: `{"type": T, "data": {...}}`.
fn legacy_address(input: &Input<'_>) -> Result<Address, OptionsError> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Legacy {
        #[serde(rename = "type")]
        kind: String,
        data: Value,
    }
    let legacy: Legacy = input.parse()?;
    variant(input, &legacy.kind, &input.child("data", &legacy.data))
}

/// Reads `members`, the members of an address of type `tag` at `input`.
fn variant(input: &Input<'_>, tag: &str, members: &Input<'_>) -> Result<Address, OptionsError> {
    match tag {
        "unix" => {
            let wire: UnixSocketAddressWire = members.parse()?;
            check_unix_path(&members.join("path"), &wire.path)?;
            if wire.is_abstract {
                let setting = format!("{}=on", members.join("abstract"));
                return Err(OptionsError::unsupported(&setting, ""));
            }
            Ok(Address::Unix(PathBuf::from(wire.path)))
        }
        "inet" => {
            let wire: InetSocketAddressWire = members.parse()?;
            if wire.ipv4 == Some(false) || wire.ipv6 == Some(true) || wire.numeric {
                let hint = "ringblk resolves the host as given";
                return Err(OptionsError::unsupported(
                    &members.join("ipv4/ipv6/numeric"),
                    hint,
                ));
            }
            Ok(Address::Inet {
                host: wire.host,
                port: wire.port,
            })
        }
        other @ ("vsock" | "fd") => Err(OptionsError::unsupported(
            &format!("{}={other}", input.join("type")),
            "supported: unix, inet",
        )),
        other => Err(OptionsError::bad_value(&input.join("type"), other)),
    }
}

impl Input<'_> {
    /// Another value at this input's path (the variant members of a union).
    fn with_value<'b>(&self, value: &'b Value) -> Input<'b> {
        Input {
            value,
            form: self.form,
            path: self.path.clone(),
        }
    }
}

impl BlockdevNbdWire {
    pub(super) fn check(self, input: &Input<'_>) -> Result<BlockdevOptionsNbd, OptionsError> {
        let server = address(&input.child("server", &self.server))?;
        let refused = [
            ("tls-creds", self.tls_creds),
            ("tls-hostname", self.tls_hostname),
            ("x-dirty-bitmap", self.x_dirty_bitmap),
        ];
        for (key, value) in refused {
            if let Some(value) = value {
                return Err(OptionsError::unsupported(&format!("{key}={value}"), ""));
            }
        }
        if self.reconnect_delay != 0 {
            return Err(OptionsError::unsupported(
                &format!("reconnect-delay={}", self.reconnect_delay),
                "requests fail as soon as the connection is lost",
            ));
        }
        Ok(BlockdevOptionsNbd {
            server,
            export: self.export,
            open_timeout: self.open_timeout,
        })
    }
}

impl ExportNbdWire {
    pub(super) fn check(self) -> Result<BlockExportOptionsNbd, OptionsError> {
        if self.bitmaps.is_some() {
            return Err(OptionsError::unsupported("bitmaps", ""));
        }
        if self.allocation_depth {
            return Err(OptionsError::unsupported("allocation-depth=on", ""));
        }
        if self.name.as_ref().is_some_and(|n| n.len() > 4096) {
            return Err(OptionsError::invalid("export name too long"));
        }
        if self.description.len() > 4096 {
            return Err(OptionsError::invalid("description too long"));
        }
        Ok(BlockExportOptionsNbd {
            name: self.name,
            description: self.description,
        })
    }
}

impl NbdServerOptions {
    /// Reads `--nbd-server` (flat `addr`) or, with `legacy`, `nbd-server-start`'s arguments.
    pub fn from_value(value: &Value, form: Form, legacy: bool) -> Result<Self, OptionsError> {
        let input = Input::root(value, form);
        let wire: ServerWire = input.parse()?;
        let addr_input = input.child("addr", &wire.addr);
        let addr = if legacy {
            legacy_address(&addr_input)?
        } else {
            address(&addr_input)?
        };
        if let Some(creds) = wire.tls_creds {
            return Err(OptionsError::unsupported(&format!("tls-creds={creds}"), ""));
        }
        if let Some(authz) = wire.tls_authz {
            return Err(OptionsError::unsupported(&format!("tls-authz={authz}"), ""));
        }
        Ok(Self {
            addr,
            max_connections: wire.max_connections,
        })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::options::{BlockdevDriver, BlockdevOptions, ExportKind, ExportOptions};

    fn keyval(input: &str, implied: Option<&str>) -> Value {
        Value::Object(crate::keyval::parse(input, implied).unwrap().value)
    }

    fn blockdev(input: &str) -> Result<BlockdevOptionsNbd, String> {
        let value = keyval(input, Some("driver"));
        match BlockdevOptions::from_value(&value, Form::Keyval).map_err(|e| e.to_string())? {
            BlockdevOptions {
                driver: BlockdevDriver::Nbd(nbd),
                ..
            } => Ok(nbd),
            other => panic!("not nbd: {other:?}"),
        }
    }

    #[test]
    fn nbd_node_takes_inet_and_unix_servers() {
        let inet = blockdev(
            "nbd,node-name=t,server.type=inet,server.host=10.0.0.2,server.port=10809,export=d",
        )
        .unwrap();
        assert_eq!(
            inet.server,
            Address::Inet {
                host: "10.0.0.2".into(),
                port: "10809".into()
            }
        );
        assert_eq!((inet.export.as_str(), inet.open_timeout), ("d", 0));
        let unix = blockdev("nbd,node-name=t,server.type=unix,server.path=/s,open-timeout=5");
        assert_eq!(unix.unwrap().server, Address::Unix("/s".into()));
    }

    #[test]
    fn nbd_node_refuses_what_it_does_not_do() {
        let err = |s| blockdev(s).unwrap_err();
        assert_eq!(
            err("nbd,node-name=t,server.type=unix,server.path=/s,reconnect-delay=5"),
            "'reconnect-delay=5' is not supported by ringblk \
             (requests fail as soon as the connection is lost)"
        );
        assert_eq!(
            err("nbd,node-name=t,server.type=vsock,server.cid=3,server.port=1"),
            "'server.type=vsock' is not supported by ringblk (supported: unix, inet)"
        );
        assert_eq!(
            err("nbd,node-name=t,server.type=inet,server.host=h"),
            "Parameter 'server.port' is missing"
        );
        assert_eq!(
            err("nbd,node-name=t,server.type=unix,server.path=/s,tls-creds=x"),
            "'tls-creds=x' is not supported by ringblk"
        );
    }

    #[test]
    fn nbd_server_start_takes_the_legacy_address_and_the_command_line_the_flat_one() {
        let qmp = json!({"addr": {"type": "inet", "data": {"host": "::", "port": "10809"}},
                         "max-connections": 2});
        let options = NbdServerOptions::from_value(&qmp, Form::Json, true).unwrap();
        assert_eq!(options.max_connections, 2);
        assert_eq!(
            options.addr,
            Address::Inet {
                host: "::".into(),
                port: "10809".into()
            }
        );
        let cli = keyval("addr.type=unix,addr.path=/run/nbd.sock", None);
        let options = NbdServerOptions::from_value(&cli, Form::Keyval, false).unwrap();
        assert_eq!(options.addr, Address::Unix("/run/nbd.sock".into()));
        let flat_in_qmp = json!({"addr": {"type": "unix", "path": "/s"}});
        assert!(NbdServerOptions::from_value(&flat_in_qmp, Form::Json, true).is_err());
    }

    #[test]
    fn nbd_export_name_defaults_to_none_and_bitmaps_are_refused() {
        let value = keyval("nbd,id=e,node-name=n,writable=on", Some("type"));
        let export = ExportOptions::from_value(&value, Form::Keyval).unwrap();
        assert_eq!(
            export.kind,
            ExportKind::Nbd(BlockExportOptionsNbd {
                name: None,
                description: String::new()
            })
        );
        let value = keyval("nbd,id=e,node-name=n,bitmaps.0=b", Some("type"));
        let err = ExportOptions::from_value(&value, Form::Keyval).unwrap_err();
        assert_eq!(err.to_string(), "'bitmaps' is not supported by ringblk");
    }
}
