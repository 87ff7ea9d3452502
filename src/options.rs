//! Typed options for block nodes, exports, objects, chardevs and monitors.
//!
//! One set of types serves the command line (`--blockdev`, `--export`, ...) and QMP
//! (`blockdev-add`, `block-export-add`, `object-add`): member names are QAPI's, and the
//! accepted values and error messages are qemu-storage-daemon 10.0.2's.
//!
//! ## Two forms of input
//! Options arrive as a JSON object in one of two [`Form`]s:
//! - [`Form::Keyval`], from [`crate::keyval::parse`]: every leaf is a string and gets its type
//!   here, as QEMU's keyval input visitor does: booleans are `on|yes|true|y` / `off|no|false|n`,
//!   integers are C literals (`010` is octal, `0x10` hex), sizes take `k|M|G|T|P|E` suffixes
//!   and fractions (`1.5k`), but only where QAPI types the member as a size.
//! - [`Form::Json`], from QMP or a `{...}` argument: real JSON types; a string where a number
//!   or boolean belongs is an error, as in QEMU.
//!
//! The struct layouts are `serde` derives. A small private [`Deserializer`] over
//! `serde_json::Value` supplies the form-dependent scalar parsing and names the offending
//! parameter by its full dotted path (`addr.type`) in every error. QAPI's flat unions (a base
//! struct, a tag, a struct per tag value) are split by hand: the base struct's members are
//! taken out first, the rest must belong to the variant.
//!
//! ## Validation
//! `from_value` also performs the checks that need nothing but the option itself (well-formed
//! ids, value ranges, combinations QEMU refuses) and refuses, with an error saying so, every
//! QAPI member value that QEMU accepts but ringblk does not implement. The public structs hold
//! only what ringblk implements or records. Checks between options (duplicate ids, references
//! to nodes, iothreads and chardevs) belong to the caller: [`crate::cli`] for the command line.

use std::fmt;
use std::marker::PhantomData;
use std::path::PathBuf;

use serde::de::value::StrDeserializer;
use serde::de::{self, DeserializeOwned, IntoDeserializer, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::{Map, Value};

use crate::keyval::QemuOpt;

mod nbd;
pub use nbd::{BlockExportOptionsNbd, BlockdevOptionsNbd, NbdServerOptions};

/// Where an option's JSON object came from; decides how scalars are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    /// From keyval syntax: every scalar is a string.
    Keyval,
    /// From JSON: scalars have their JSON types.
    Json,
}

/// An option that cannot be used; the message is one line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct OptionsError {
    message: String,
}

impl OptionsError {
    fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
        }
    }

    fn missing(param: &str) -> Self {
        Self::new(format!("Parameter '{param}' is missing"))
    }

    fn unexpected(param: &str) -> Self {
        Self::new(format!("Parameter '{param}' is unexpected"))
    }

    /// A keyval scalar member given as a nested key (`iothread.0=x`).
    fn nested_unexpected(param: &str) -> Self {
        Self::new(format!("Parameters '{param}.*' are unexpected"))
    }

    fn bad_value(param: &str, value: &str) -> Self {
        Self::new(format!(
            "Parameter '{param}' does not accept value '{value}'"
        ))
    }

    fn bad_char_driver(backend: &str) -> Self {
        Self::new(format!("'{backend}' is not a valid char driver name"))
    }

    fn invalid_type(param: &str, expected: &str) -> Self {
        Self::new(format!(
            "Invalid parameter type for '{param}', expected: {expected}"
        ))
    }

    fn expects(param: &str, what: &str) -> Self {
        Self::new(format!("Parameter '{param}' expects {what}"))
    }

    fn invalid(message: impl Into<String>) -> Self {
        Self::new(message)
    }

    /// `setting` is what the user wrote, `key=value`.
    fn unsupported(setting: &str, hint: &str) -> Self {
        let hint = if hint.is_empty() {
            String::new()
        } else {
            format!(" ({hint})")
        };
        Self::new(format!("'{setting}' is not supported by ringblk{hint}"))
    }
}

/// QEMU's well-formed id: a letter, then letters, digits, '-', '.' or '_'.
pub fn id_wellformed(id: &str) -> bool {
    id.starts_with(|c: char| c.is_ascii_alphabetic())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

fn check_identifier(param: &str, id: &str) -> Result<(), OptionsError> {
    if id_wellformed(id) {
        Ok(())
    } else {
        Err(OptionsError::expects(
            param,
            "an identifier (letters, digits, '-', '.', '_', starting with a letter)",
        ))
    }
}

/// Longest UNIX socket path, including its terminating NUL (`sun_path`).
const UNIX_PATH_LEN_MAX: usize = 108;

fn check_unix_path(param: &str, path: &str) -> Result<(), OptionsError> {
    if path.is_empty() {
        return Err(OptionsError::invalid(format!(
            "Parameter '{param}' must not be empty"
        )));
    }
    if path.len() >= UNIX_PATH_LEN_MAX {
        return Err(OptionsError::invalid(format!(
            "UNIX socket path '{path}' is too long: it must be less than {UNIX_PATH_LEN_MAX} bytes"
        )));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// --blockdev / blockdev-add

/// Default size of a `null-co` node (QEMU's default too: 1 GiB).
pub const NULL_CO_SIZE_DEFAULT: u64 = 1 << 30;

/// Longest node name QEMU accepts, in bytes.
const NODE_NAME_LEN_MAX: usize = 31;

/// Every block driver QAPI knows in QEMU 10.0; those other than `file` and `null-co` are
/// refused as unsupported rather than unknown.
#[rustfmt::skip]
const QAPI_BLOCKDEV_DRIVERS: &[&str] = &[
    "blkdebug", "blklogwrites", "blkreplay", "blkverify", "bochs", "cloop", "compress",
    "copy-before-write", "copy-on-read", "dmg", "file", "snapshot-access", "ftp", "ftps",
    "gluster", "host_cdrom", "host_device", "http", "https", "iscsi", "luks", "nbd", "nfs",
    "null-aio", "null-co", "nvme", "parallels", "preallocate", "qcow", "qcow2", "qed", "quorum",
    "raw", "rbd", "replication", "ssh", "throttle", "vdi", "vhdx", "vmdk", "vpc", "vvfat",
];

/// A root block node (`--blockdev`, `blockdev-add`): QAPI's `BlockdevOptions`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockdevOptions {
    /// The node's name; mandatory for a root node.
    pub node_name: String,
    /// Whether discard requests reach the driver.
    pub discard: BlockdevDiscardOptions,
    /// `cache.direct` (O_DIRECT) and `cache.no-flush` (flushes complete without effect).
    pub cache: BlockdevCacheOptions,
    /// The node refuses writes.
    pub read_only: bool,
    /// Do not take or check image locks; only with `read_only`, as in QEMU.
    pub force_share: bool,
    /// The driver and its own options (QAPI's tag `driver`).
    pub driver: BlockdevDriver,
}

/// QAPI's `BlockdevDiscardOptions`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BlockdevDiscardOptions {
    /// Discard requests complete without reaching the driver (QEMU's default).
    #[default]
    Ignore,
    /// Discard requests are passed to the driver.
    Unmap,
}

/// QAPI's `BlockdevCacheOptions`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct BlockdevCacheOptions {
    /// Bypass the host page cache (O_DIRECT).
    #[serde(default)]
    pub direct: bool,
    /// Ignore flush requests.
    #[serde(default)]
    pub no_flush: bool,
}

/// QAPI's `BlockdevDetectZeroesOptions`; ringblk accepts only `off`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum BlockdevDetectZeroesOptions {
    #[default]
    Off,
    On,
    Unmap,
}

/// The driver of a block node, with its options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlockdevDriver {
    /// `file`: a POSIX file or block device.
    File(BlockdevOptionsFile),
    /// `null-co`: no storage; reads return nothing useful unless `read_zeroes`.
    NullCo(BlockdevOptionsNull),
    /// `nbd`: an export on an NBD server.
    Nbd(BlockdevOptionsNbd),
}

/// QAPI's `BlockdevAioOptions`. ringblk always does I/O with io_uring; the requested mode is
/// recorded only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BlockdevAioOptions {
    /// QEMU's default, a thread pool.
    Threads,
    /// Linux AIO; QEMU requires `cache.direct=on` with it, and so does ringblk.
    Native,
    /// io_uring.
    IoUring,
}

/// QAPI's `OnOffAuto`, for `locking`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnOffAuto {
    /// Lock if the host supports it (QEMU's default).
    #[default]
    Auto,
    /// Always lock.
    On,
    /// Never lock.
    Off,
}

/// The `file` driver's options: QAPI's `BlockdevOptionsFile`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockdevOptionsFile {
    /// The image file or block device; its existence is checked when the node opens.
    pub filename: PathBuf,
    /// The requested AIO mode, `None` if not given. Recorded only: ringblk uses io_uring.
    pub aio: Option<BlockdevAioOptions>,
    /// Image locking: `auto` or `off` (ringblk refuses `on`).
    pub locking: OnOffAuto,
    /// Recorded only: the io_uring engine sizes its own batches.
    pub aio_max_batch: i64,
    /// Drop the host page cache on incoming migration (QEMU's default: true). Recorded only.
    pub drop_cache: bool,
}

/// The `null-co` driver's options: QAPI's `BlockdevOptionsNull`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockdevOptionsNull {
    /// Size in bytes (default [`NULL_CO_SIZE_DEFAULT`]).
    pub size: u64,
    /// Delay before each request completes, at most `i64::MAX`.
    pub latency_ns: u64,
    /// Reads return zeroes; otherwise the read buffer is left as it is (QEMU's default: off).
    pub read_zeroes: bool,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct BlockdevBaseWire {
    node_name: Option<String>,
    #[serde(default)]
    discard: BlockdevDiscardOptions,
    #[serde(default)]
    cache: BlockdevCacheOptions,
    active: Option<bool>,
    #[serde(default)]
    read_only: bool,
    #[serde(default)]
    auto_read_only: bool,
    #[serde(default)]
    force_share: bool,
    #[serde(default)]
    detect_zeroes: BlockdevDetectZeroesOptions,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct BlockdevFileWire {
    filename: String,
    pr_manager: Option<String>,
    #[serde(default)]
    locking: OnOffAuto,
    aio: Option<BlockdevAioOptions>,
    #[serde(default)]
    aio_max_batch: i64,
    #[serde(default = "yes")]
    drop_cache: bool,
    #[serde(default)]
    x_check_cache_dropped: bool,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct BlockdevNullWire {
    size: Option<i64>,
    #[serde(default)]
    latency_ns: u64,
    #[serde(default)]
    read_zeroes: bool,
}

fn yes() -> bool {
    true
}

impl BlockdevOptions {
    /// Reads and checks a `--blockdev` / `blockdev-add` object.
    pub fn from_value(value: &Value, form: Form) -> Result<Self, OptionsError> {
        let input = Input::root(value, form);
        let union = split_union::<BlockdevBaseWire>(&input, "driver")?;
        match union.tag.as_str() {
            "file" | "null-co" | "nbd" => {}
            other if QAPI_BLOCKDEV_DRIVERS.contains(&other) => {
                return Err(OptionsError::unsupported(
                    &format!("driver={other}"),
                    "supported: file, null-co, nbd",
                ));
            }
            other => return Err(OptionsError::bad_value("driver", other)),
        }
        let base = union.base()?;
        let driver = match union.tag.as_str() {
            "file" => BlockdevDriver::File(union.variant::<BlockdevFileWire>()?.check(&base)?),
            "nbd" => BlockdevDriver::Nbd(union.variant::<nbd::BlockdevNbdWire>()?.check(&input)?),
            _ => BlockdevDriver::NullCo(union.variant::<BlockdevNullWire>()?.check()?),
        };
        let Some(node_name) = base.node_name else {
            return Err(OptionsError::new(
                "'node-name' must be specified for the root node",
            ));
        };
        if !id_wellformed(&node_name) {
            return Err(OptionsError::invalid(format!(
                "Invalid node-name: '{node_name}'"
            )));
        }
        if node_name.len() > NODE_NAME_LEN_MAX {
            return Err(OptionsError::invalid("Node name too long"));
        }
        if base.force_share && !base.read_only {
            return Err(OptionsError::invalid(
                "force-share=on can only be used with read-only images",
            ));
        }
        if base.auto_read_only {
            return Err(OptionsError::unsupported("auto-read-only=on", ""));
        }
        if base.active == Some(false) {
            return Err(OptionsError::unsupported("active=off", ""));
        }
        match base.detect_zeroes {
            BlockdevDetectZeroesOptions::Off => {}
            BlockdevDetectZeroesOptions::On => {
                return Err(OptionsError::unsupported("detect-zeroes=on", ""));
            }
            BlockdevDetectZeroesOptions::Unmap => {
                return Err(OptionsError::unsupported("detect-zeroes=unmap", ""));
            }
        }
        Ok(Self {
            node_name,
            discard: base.discard,
            cache: base.cache,
            read_only: base.read_only,
            force_share: base.force_share,
            driver,
        })
    }
}

impl BlockdevFileWire {
    fn check(self, base: &BlockdevBaseWire) -> Result<BlockdevOptionsFile, OptionsError> {
        if self.filename.is_empty() {
            return Err(OptionsError::invalid(
                "The 'file' block driver requires a file name",
            ));
        }
        if self.aio == Some(BlockdevAioOptions::Native) && !base.cache.direct {
            return Err(OptionsError::invalid(
                "aio=native was specified, but it requires cache.direct=on, which was not specified.",
            ));
        }
        if let Some(manager) = self.pr_manager {
            return Err(OptionsError::unsupported(
                &format!("pr-manager={manager}"),
                "",
            ));
        }
        if self.locking == OnOffAuto::On {
            return Err(OptionsError::unsupported(
                "locking=on",
                "ringblk takes no image locks",
            ));
        }
        if self.x_check_cache_dropped {
            return Err(OptionsError::unsupported("x-check-cache-dropped=on", ""));
        }
        Ok(BlockdevOptionsFile {
            filename: PathBuf::from(self.filename),
            aio: self.aio,
            locking: self.locking,
            aio_max_batch: self.aio_max_batch,
            drop_cache: self.drop_cache,
        })
    }
}

impl BlockdevNullWire {
    fn check(self) -> Result<BlockdevOptionsNull, OptionsError> {
        let size = match self.size {
            None => NULL_CO_SIZE_DEFAULT,
            Some(size) => u64::try_from(size).map_err(|_| {
                OptionsError::invalid(format!(
                    "Value '{size}' is out of range for parameter 'size'"
                ))
            })?,
        };
        if i64::try_from(self.latency_ns).is_err() {
            return Err(OptionsError::invalid("latency-ns is invalid"));
        }
        Ok(BlockdevOptionsNull {
            size,
            latency_ns: self.latency_ns,
            read_zeroes: self.read_zeroes,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// --export / block-export-add

/// Default `logical-block-size` of a vhost-user-blk export.
pub const LOGICAL_BLOCK_SIZE_DEFAULT: u64 = 512;
/// Smallest and largest `logical-block-size` QEMU accepts (powers of two in between).
pub const LOGICAL_BLOCK_SIZE_MIN: u64 = 512;
/// See [`LOGICAL_BLOCK_SIZE_MIN`].
pub const LOGICAL_BLOCK_SIZE_MAX: u64 = 2 << 20;

/// A block export (`--export`, `block-export-add`): QAPI's `BlockExportOptions`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportOptions {
    /// The export's id.
    pub id: String,
    /// The exported node.
    pub node_name: String,
    /// The export accepts writes (default: read-only, as in QEMU).
    pub writable: bool,
    /// The iothreads that serve the export's queues, queue `i` on `iothread[i % len]`; empty:
    /// the main context. QSD 10.0 takes one id (a string); a list is ringblk's extension.
    pub iothread: Vec<String>,
    /// The export type and its options (QAPI's tag `type`).
    pub kind: ExportKind,
}

/// The type of an export, with its options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExportKind {
    /// `vhost-user-blk`.
    VhostUserBlk(BlockExportOptionsVhostUserBlk),
    /// `nbd`, on the daemon's NBD server.
    Nbd(BlockExportOptionsNbd),
}

/// QAPI's `BlockExportOptionsVhostUserBlk`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockExportOptionsVhostUserBlk {
    /// Where the vhost-user server listens.
    pub addr: SocketAddress,
    /// A power of two from [`LOGICAL_BLOCK_SIZE_MIN`] to [`LOGICAL_BLOCK_SIZE_MAX`]
    /// (default [`LOGICAL_BLOCK_SIZE_DEFAULT`]).
    pub logical_block_size: u64,
    /// At least 1 (default 1).
    pub num_queues: u16,
}

/// QAPI's `SocketAddress`, tagged by `type`; ringblk supports `unix` only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SocketAddress {
    /// A UNIX domain socket.
    Unix(UnixSocketAddress),
}

/// QAPI's `UnixSocketAddress`, without the abstract namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnixSocketAddress {
    /// Non-empty, shorter than 108 bytes.
    pub path: PathBuf,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct ExportBaseWire {
    id: String,
    #[serde(default)]
    fixed_iothread: bool,
    /// One id (QSD) or a list of ids (ringblk's extension), checked in `iothreads`.
    iothread: Option<Value>,
    node_name: String,
    #[serde(default)]
    writable: bool,
    #[serde(default)]
    writethrough: bool,
    #[serde(default)]
    allow_inactive: bool,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct VhostUserBlkWire {
    /// A nested union: read by [`SocketAddress::from_input`].
    addr: Value,
    #[serde(default = "logical_block_size_default", deserialize_with = "size")]
    logical_block_size: u64,
    #[serde(default = "num_queues_default")]
    num_queues: u16,
}

fn logical_block_size_default() -> u64 {
    LOGICAL_BLOCK_SIZE_DEFAULT
}

fn num_queues_default() -> u16 {
    1
}

/// `SocketAddress` has no members besides its tag.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoBase {}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct UnixSocketAddressWire {
    path: String,
    #[serde(default, rename = "abstract")]
    is_abstract: bool,
    #[serde(default)]
    #[allow(
        dead_code,
        reason = "accepted as in QEMU; it only matters with abstract=on"
    )]
    tight: Option<bool>,
}

impl ExportOptions {
    /// Reads and checks an `--export` / `block-export-add` object.
    pub fn from_value(value: &Value, form: Form) -> Result<Self, OptionsError> {
        let input = Input::root(value, form);
        let union = split_union::<ExportBaseWire>(&input, "type")?;
        match union.tag.as_str() {
            "vhost-user-blk" | "nbd" => {}
            other @ ("fuse" | "vduse-blk") => {
                return Err(OptionsError::unsupported(
                    &format!("type={other}"),
                    "supported: vhost-user-blk, nbd",
                ));
            }
            other => return Err(OptionsError::bad_value("type", other)),
        }
        let base = union.base()?;
        let kind = if union.tag == "nbd" {
            ExportKind::Nbd(union.variant::<nbd::ExportNbdWire>()?.check()?)
        } else {
            Self::vhost_user_blk(&input, &union)?
        };
        if base.allow_inactive {
            return Err(OptionsError::unsupported(
                "allow-inactive=on",
                "Export type does not support inactive exports",
            ));
        }
        if !id_wellformed(&base.id) {
            return Err(OptionsError::invalid("Invalid block export id"));
        }
        if base.writethrough {
            return Err(OptionsError::unsupported("writethrough=on", ""));
        }
        if base.fixed_iothread {
            return Err(OptionsError::unsupported("fixed-iothread=on", ""));
        }
        Ok(Self {
            id: base.id,
            node_name: base.node_name,
            writable: base.writable,
            iothread: iothreads(base.iothread)?,
            kind,
        })
    }

    fn vhost_user_blk(
        input: &Input<'_>,
        union: &Union<ExportBaseWire>,
    ) -> Result<ExportKind, OptionsError> {
        let wire = union.variant::<VhostUserBlkWire>()?;
        let addr = SocketAddress::from_input(&input.child("addr", &wire.addr))?;
        if wire.num_queues == 0 {
            return Err(OptionsError::invalid("num-queues must be greater than 0"));
        }
        let size = wire.logical_block_size;
        if !size.is_power_of_two()
            || !(LOGICAL_BLOCK_SIZE_MIN..=LOGICAL_BLOCK_SIZE_MAX).contains(&size)
        {
            return Err(OptionsError::invalid(format!(
                "parameter logical-block-size must be a power of 2 between \
                 {LOGICAL_BLOCK_SIZE_MIN} and {LOGICAL_BLOCK_SIZE_MAX}"
            )));
        }
        Ok(ExportKind::VhostUserBlk(BlockExportOptionsVhostUserBlk {
            addr,
            logical_block_size: size,
            num_queues: wire.num_queues,
        }))
    }
}

/// `iothread`: absent, one id (as in QSD), or a list of ids (`iothread.0=a,iothread.1=b`).
fn iothreads(value: Option<Value>) -> Result<Vec<String>, OptionsError> {
    let bad = || OptionsError::invalid_type("iothread", "string");
    match value {
        None => Ok(Vec::new()),
        Some(Value::String(id)) => Ok(vec![id]),
        Some(Value::Array(ids)) => ids
            .into_iter()
            .map(|id| match id {
                Value::String(id) => Ok(id),
                _ => Err(bad()),
            })
            .collect(),
        Some(_) => Err(bad()),
    }
}

impl SocketAddress {
    fn from_input(input: &Input<'_>) -> Result<Self, OptionsError> {
        let union = split_union::<NoBase>(input, "type")?;
        match union.tag.as_str() {
            "unix" => {}
            other @ ("inet" | "vsock" | "fd") => {
                return Err(OptionsError::unsupported(
                    &format!("{}={other}", input.join("type")),
                    "supported: unix",
                ));
            }
            other => return Err(OptionsError::bad_value(&input.join("type"), other)),
        }
        let NoBase {} = union.base()?;
        let wire = union.variant::<UnixSocketAddressWire>()?;
        check_unix_path(&input.join("path"), &wire.path)?;
        if wire.is_abstract {
            return Err(OptionsError::unsupported(
                &format!("{}=on", input.join("abstract")),
                "",
            ));
        }
        Ok(Self::Unix(UnixSocketAddress {
            path: PathBuf::from(wire.path),
        }))
    }
}

// ---------------------------------------------------------------------------------------------
// --object / object-add

/// Every QOM type `object-add` knows in QEMU 10.0; those other than `iothread` are refused
/// as unsupported rather than unknown.
#[rustfmt::skip]
const QAPI_OBJECT_TYPES: &[&str] = &[
    "acpi-generic-initiator", "acpi-generic-port", "authz-list", "authz-listfile", "authz-pam",
    "authz-simple", "can-bus", "can-host-socketcan", "colo-compare", "cryptodev-backend",
    "cryptodev-backend-builtin", "cryptodev-backend-lkcf", "cryptodev-vhost-user",
    "dbus-vmstate", "filter-buffer", "filter-dump", "filter-mirror", "filter-redirector",
    "filter-replay", "filter-rewriter", "input-barrier", "input-linux", "iommufd", "iothread",
    "main-loop", "memory-backend-epc", "memory-backend-file", "memory-backend-memfd",
    "memory-backend-ram", "memory-backend-shm", "pef-guest", "pr-manager-helper", "qtest",
    "rng-builtin", "rng-egd", "rng-random", "secret", "secret_keyring", "sev-guest",
    "sev-snp-guest", "thread-context", "s390-pv-guest", "throttle-group", "tls-creds-anon",
    "tls-creds-psk", "tls-creds-x509", "tls-cipher-suites", "x-remote-object",
    "x-vfio-user-server",
];

/// A user-created object (`--object`, `object-add`): QAPI's `ObjectOptions`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectOptions {
    /// The object's id.
    pub id: String,
    /// The object's type and properties (QAPI's tag `qom-type`).
    pub properties: ObjectProperties,
}

/// The type of an object, with its properties.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ObjectProperties {
    /// `iothread`: an I/O context with its own thread.
    Iothread(IothreadProperties),
}

/// QAPI's `IothreadProperties`: tuning knobs, accepted and recorded. All are at most
/// `i64::MAX`, as in QEMU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IothreadProperties {
    /// Longest busy-poll before sleeping (QEMU's default 32768).
    pub poll_max_ns: u64,
    /// Factor to grow the polling time by; 0: QEMU's choice.
    pub poll_grow: u64,
    /// Divisor to shrink the polling time by; 0: QEMU's choice.
    pub poll_shrink: u64,
    /// Most requests to batch per submission; 0: the engine's choice.
    pub aio_max_batch: u64,
    /// Thread pool bounds (QEMU's defaults 0 and 64); ringblk has no thread pool.
    pub thread_pool_min: u64,
    /// See `thread_pool_min`.
    pub thread_pool_max: u64,
}

/// QEMU's default `poll-max-ns`.
pub const POLL_MAX_NS_DEFAULT: u64 = 32768;
/// QEMU's default `thread-pool-max`.
pub const THREAD_POOL_MAX_DEFAULT: u64 = 64;

impl Default for IothreadProperties {
    fn default() -> Self {
        Self {
            poll_max_ns: POLL_MAX_NS_DEFAULT,
            poll_grow: 0,
            poll_shrink: 0,
            aio_max_batch: 0,
            thread_pool_min: 0,
            thread_pool_max: THREAD_POOL_MAX_DEFAULT,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ObjectBaseWire {
    id: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct IothreadWire {
    aio_max_batch: Option<i64>,
    thread_pool_min: Option<i64>,
    thread_pool_max: Option<i64>,
    poll_max_ns: Option<i64>,
    poll_grow: Option<i64>,
    poll_shrink: Option<i64>,
}

/// Lines printed for `--object help`.
pub const OBJECT_HELP: &str = "List of user creatable objects:\n  iothread\n";
/// Lines printed for `--object iothread,help`.
pub const IOTHREAD_HELP: &str = "iothread options:\n  aio-max-batch=<int>\n  poll-grow=<int>\n  \
    poll-max-ns=<int>\n  poll-shrink=<int>\n  thread-pool-max=<int>\n  thread-pool-min=<int>\n";

impl ObjectOptions {
    /// Reads and checks an `--object` / `object-add` object.
    pub fn from_value(value: &Value, form: Form) -> Result<Self, OptionsError> {
        let input = Input::root(value, form);
        let union = split_union::<ObjectBaseWire>(&input, "qom-type")?;
        match union.tag.as_str() {
            "iothread" => {}
            other if QAPI_OBJECT_TYPES.contains(&other) => {
                return Err(OptionsError::unsupported(
                    &format!("qom-type={other}"),
                    "supported: iothread",
                ));
            }
            other => return Err(OptionsError::bad_value("qom-type", other)),
        }
        let base = union.base()?;
        let properties = ObjectProperties::Iothread(union.variant::<IothreadWire>()?.check()?);
        check_identifier("id", &base.id)?;
        Ok(Self {
            id: base.id,
            properties,
        })
    }
}

impl IothreadWire {
    fn check(self) -> Result<IothreadProperties, OptionsError> {
        let defaults = IothreadProperties::default();
        let non_negative = |name: &str, value: Option<i64>, default: u64| match value {
            None => Ok(default),
            Some(value) => u64::try_from(value).map_err(|_| {
                OptionsError::invalid(format!("{name} value must be in range [0, {}]", i64::MAX))
            }),
        };
        let properties = IothreadProperties {
            poll_max_ns: non_negative("poll-max-ns", self.poll_max_ns, defaults.poll_max_ns)?,
            poll_grow: non_negative("poll-grow", self.poll_grow, defaults.poll_grow)?,
            poll_shrink: non_negative("poll-shrink", self.poll_shrink, defaults.poll_shrink)?,
            aio_max_batch: non_negative(
                "aio-max-batch",
                self.aio_max_batch,
                defaults.aio_max_batch,
            )?,
            thread_pool_min: non_negative(
                "thread-pool-min",
                self.thread_pool_min,
                defaults.thread_pool_min,
            )?,
            thread_pool_max: non_negative(
                "thread-pool-max",
                self.thread_pool_max,
                defaults.thread_pool_max,
            )?,
        };
        if properties.thread_pool_min > properties.thread_pool_max {
            return Err(OptionsError::invalid(
                "bad thread-pool-min/thread-pool-max values",
            ));
        }
        Ok(properties)
    }
}

// ---------------------------------------------------------------------------------------------
// --monitor

/// A QMP monitor (`--monitor`): QAPI's `MonitorOptions`, in control mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MonitorOptions {
    /// The monitor's id, if given.
    pub id: Option<String>,
    /// The chardev it talks over.
    pub chardev: String,
    /// Pretty-print the JSON replies.
    pub pretty: bool,
}

/// QAPI's `MonitorMode`.
#[derive(Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
enum MonitorMode {
    Readline,
    Control,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct MonitorWire {
    id: Option<String>,
    mode: Option<MonitorMode>,
    #[serde(default)]
    pretty: bool,
    chardev: String,
}

impl MonitorOptions {
    /// Reads and checks a `--monitor` object.
    pub fn from_value(value: &Value, form: Form) -> Result<Self, OptionsError> {
        let wire: MonitorWire = Input::root(value, form).parse()?;
        if wire.mode == Some(MonitorMode::Readline) {
            // QSD's wording: it has no human monitor either.
            return Err(OptionsError::new("Only QMP is supported"));
        }
        Ok(Self {
            id: wire.id,
            chardev: wire.chardev,
            pretty: wire.pretty,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// --chardev

/// A character device (`--chardev`, QemuOpts syntax): what a `--monitor` talks over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChardevOptions {
    /// The chardev's id.
    pub id: String,
    /// The backend and its options.
    pub backend: ChardevBackend,
}

/// A chardev backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChardevBackend {
    /// `socket` on a UNIX path.
    Socket(ChardevSocket),
}

/// A `socket` chardev. ringblk supports a listening socket that does not wait for its first
/// client, so `server` is always true and `wait` always false for now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChardevSocket {
    /// The UNIX socket path: non-empty, shorter than 108 bytes.
    pub path: PathBuf,
    /// Listen for connections (`server=on`).
    pub server: bool,
    /// Block startup until the first client connects (`wait=on`, QEMU's default).
    pub wait: bool,
}

/// Chardev backends QEMU 10.0's qemu-storage-daemon knows; all but `socket` are refused as
/// unsupported rather than unknown.
#[rustfmt::skip]
const QEMU_CHARDEV_BACKENDS: &[&str] = &[
    "pty", "file", "udp", "memory", "stdio", "socket", "ringbuf", "null", "parallel", "pipe",
    "mux", "serial", "hub",
];

/// Boolean chardev options of QEMU, for short forms (`server`, `nowait`).
#[rustfmt::skip]
const QEMU_CHARDEV_BOOL_OPTS: &[&str] = &[
    "abstract", "append", "clipboard", "delay", "ipv4", "ipv6", "logappend", "mouse", "mux",
    "nodelay", "server", "signal", "telnet", "tight", "tn3270", "wait", "websocket",
];

/// Every other chardev option QEMU knows; refused as unsupported rather than invalid.
#[rustfmt::skip]
const QEMU_CHARDEV_OTHER_OPTS: &[&str] = &[
    "chardev", "chardevs", "cols", "debug", "fd", "height", "host", "input-path", "localaddr",
    "localport", "logfile", "name", "port", "reconnect-ms", "reconnect", "rows", "size",
    "tls-authz", "tls-creds", "to", "width",
];

/// Lines printed for `--chardev help`.
pub const CHARDEV_HELP: &str = "Available chardev backend types:\n  socket\n";
/// Lines printed for `--chardev socket,help`.
pub const CHARDEV_SOCKET_HELP: &str = "chardev options:\n  backend=<str>\n  id=<str>\n  \
    path=<str>\n  server=<bool (on/off)>\n  wait=<bool (on/off)>\n";

impl ChardevOptions {
    /// Reads and checks a `--chardev` argument parsed by [`crate::keyval::parse_qemu_opts`].
    pub fn from_qemu_opts(opts: &[QemuOpt]) -> Result<Self, OptionsError> {
        let (mut backend, mut id, mut path, mut server, mut wait) = (None, None, None, None, None);
        for opt in opts {
            match opt {
                QemuOpt::Pair(key, value) => {
                    let slot = match key.as_str() {
                        "backend" => &mut backend,
                        "id" => &mut id,
                        "path" => &mut path,
                        "server" => &mut server,
                        "wait" => &mut wait,
                        other
                            if QEMU_CHARDEV_BOOL_OPTS.contains(&other)
                                || QEMU_CHARDEV_OTHER_OPTS.contains(&other)
                                || other.starts_with("chardevs.") =>
                        {
                            return Err(OptionsError::unsupported(&format!("{key}={value}"), ""));
                        }
                        _ => {
                            return Err(OptionsError::new(format!("Invalid parameter '{key}'")));
                        }
                    };
                    *slot = Some(value.as_str());
                }
                QemuOpt::Bare(key) => {
                    let (name, value) = match key.strip_prefix("no") {
                        Some(name) if QEMU_CHARDEV_BOOL_OPTS.contains(&name) => (name, "off"),
                        _ => (key.as_str(), "on"),
                    };
                    if !QEMU_CHARDEV_BOOL_OPTS.contains(&name) {
                        return Err(OptionsError::new(format!("Invalid parameter '{key}'")));
                    }
                    return Err(OptionsError::unsupported(
                        key,
                        &format!("short-form booleans are deprecated; write {name}={value}"),
                    ));
                }
            }
        }
        let Some(id) = id else {
            return Err(OptionsError::new("chardev: no id specified"));
        };
        let Some(backend) = backend else {
            return Err(OptionsError::new(format!(
                "chardev: \"{id}\" missing backend"
            )));
        };
        if backend != "socket" {
            return Err(if QEMU_CHARDEV_BACKENDS.contains(&backend) {
                OptionsError::unsupported(&format!("backend={backend}"), "supported: socket")
            } else {
                OptionsError::bad_char_driver(backend)
            });
        }
        check_identifier("id", id)?;
        let server = server.map_or(Ok(false), |v| parse_bool("server", v))?;
        let wait = wait.map_or(Ok(true), |v| parse_bool("wait", v))?;
        let Some(path) = path else {
            return Err(OptionsError::new(
                "Parameter 'path' is missing (ringblk supports UNIX socket chardevs only)",
            ));
        };
        check_unix_path("path", path)?;
        if !server {
            return Err(OptionsError::unsupported(
                "server=off",
                "the socket must listen",
            ));
        }
        if wait {
            return Err(OptionsError::unsupported(
                "wait=on",
                "the default with server=on; add wait=off",
            ));
        }
        Ok(Self {
            id: id.to_owned(),
            backend: ChardevBackend::Socket(ChardevSocket {
                path: PathBuf::from(path),
                server,
                wait,
            }),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// JSON-form Deserialize impls, for QMP arguments.

macro_rules! deserialize_via_value {
    ($($ty:ty),*) => {$(
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let value = Value::deserialize(deserializer)?;
                Self::from_value(&value, Form::Json).map_err(de::Error::custom)
            }
        }
    )*};
}

deserialize_via_value!(
    BlockdevOptions,
    ExportOptions,
    ObjectOptions,
    MonitorOptions
);

// ---------------------------------------------------------------------------------------------
// Scalar syntax of QEMU's keyval input visitor.

/// Booleans as QEMU spells them (case matters: `ON` is refused).
fn parse_bool_str(s: &str) -> Option<bool> {
    match s {
        "on" | "yes" | "true" | "y" => Some(true),
        "off" | "no" | "false" | "n" => Some(false),
        _ => None,
    }
}

fn parse_bool(param: &str, s: &str) -> Result<bool, OptionsError> {
    parse_bool_str(s).ok_or_else(|| OptionsError::expects(param, "'on' or 'off'"))
}

/// Characters C's `isspace` accepts before a number.
const C_SPACE: [char; 6] = [' ', '\t', '\n', '\x0b', '\x0c', '\r'];

/// A C integer literal as `strtoull(s, .., 0)` reads it, but all of `s` must be used: leading
/// white space, a sign, then `0x` hex, `0` octal or decimal. Returns (negative, magnitude).
fn parse_c_integer(s: &str) -> Option<(bool, u64)> {
    let s = s.trim_start_matches(C_SPACE);
    let (negative, s) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    let (radix, digits) = if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        (16, hex)
    } else if s.len() > 1 && s.starts_with('0') {
        (8, &s[1..])
    } else {
        (10, s)
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    u64::from_str_radix(digits, radix)
        .ok()
        .map(|magnitude| (negative, magnitude))
}

/// QEMU's `int64` from keyval.
fn parse_i64(s: &str) -> Option<i64> {
    match parse_c_integer(s)? {
        (false, magnitude) => i64::try_from(magnitude).ok(),
        (true, magnitude) => 0i64.checked_sub_unsigned(magnitude),
    }
}

/// QEMU's `uint64` from keyval: like `strtoull`, a minus sign wraps (`-1` is `u64::MAX`).
fn parse_u64(s: &str) -> Option<u64> {
    match parse_c_integer(s)? {
        (false, magnitude) => Some(magnitude),
        (true, magnitude) => Some(magnitude.wrapping_neg()),
    }
}

/// QEMU's `size` from keyval: white space, an optional '+', then hex without a suffix, or a
/// decimal with an optional fraction and an optional suffix `B|K|M|G|T|P|E` (any case,
/// powers of 1024). A fraction needs a suffix other than `B`; it is truncated to whole bytes.
fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim_start_matches(C_SPACE);
    let s = s.strip_prefix('+').unwrap_or(s);
    if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        if hex.is_empty() || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
            return None;
        }
        return u64::from_str_radix(hex, 16).ok();
    }
    let int_end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (int_digits, rest) = s.split_at(int_end);
    let (frac_digits, suffix) = match rest.strip_prefix('.') {
        Some(after_dot) => {
            let frac_end = after_dot
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(after_dot.len());
            after_dot.split_at(frac_end)
        }
        None => ("", rest),
    };
    if int_digits.is_empty() && frac_digits.is_empty() {
        return None;
    }
    let shift = match suffix {
        "" | "b" | "B" => 0,
        "k" | "K" => 10,
        "m" | "M" => 20,
        "g" | "G" => 30,
        "t" | "T" => 40,
        "p" | "P" => 50,
        "e" | "E" => 60,
        _ => return None,
    };
    let multiplier = 1u64 << shift;
    let int: u64 = if int_digits.is_empty() {
        0
    } else {
        int_digits.parse().ok()?
    };
    // Digits beyond 18 cannot change a truncated result of at most 2^64.
    let frac_digits = &frac_digits[..frac_digits.len().min(18)];
    let frac_bytes = if frac_digits.is_empty() {
        0
    } else {
        let numerator: u128 = frac_digits.parse().ok()?;
        let denominator = 10u128.pow(u32::try_from(frac_digits.len()).ok()?);
        if multiplier == 1 && numerator != 0 {
            return None;
        }
        u64::try_from(numerator * u128::from(multiplier) / denominator).ok()?
    };
    int.checked_mul(multiplier)?.checked_add(frac_bytes)
}

/// The newtype name by which a `size` member asks the deserializer for QEMU size syntax.
const SIZE_NEWTYPE: &str = "$ringblk::options::size";

/// `deserialize_with` for QAPI `size` members: suffixed sizes from keyval, plain unsigned
/// integers from JSON (and from any other deserializer).
fn size<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    struct SizeVisitor;
    impl<'de> Visitor<'de> for SizeVisitor {
        type Value = u64;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a size in bytes")
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
            Ok(v)
        }
        fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<u64, D::Error> {
            u64::deserialize(d)
        }
    }
    deserializer.deserialize_newtype_struct(SIZE_NEWTYPE, SizeVisitor)
}

// ---------------------------------------------------------------------------------------------
// The deserializer: QEMU's QObject input visitor, over serde_json::Value.

/// An error on its way up from a visit. Errors raised by derived code know only a member
/// name; the struct or scalar being visited completes them with its path.
#[derive(Debug)]
enum VisitError {
    Done(OptionsError),
    MissingField(&'static str),
    UnknownField(String),
    UnknownVariant(String),
    Other(String),
}

impl fmt::Display for VisitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VisitError::Done(e) => e.fmt(f),
            VisitError::MissingField(field) => write!(f, "Parameter '{field}' is missing"),
            VisitError::UnknownField(field) => write!(f, "Parameter '{field}' is unexpected"),
            VisitError::UnknownVariant(value) => write!(f, "Invalid value '{value}'"),
            VisitError::Other(message) => f.write_str(message),
        }
    }
}

impl std::error::Error for VisitError {}

impl de::Error for VisitError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        VisitError::Other(msg.to_string())
    }
    fn missing_field(field: &'static str) -> Self {
        VisitError::MissingField(field)
    }
    fn unknown_field(field: &str, _expected: &'static [&'static str]) -> Self {
        VisitError::UnknownField(field.to_owned())
    }
    fn unknown_variant(variant: &str, _expected: &'static [&'static str]) -> Self {
        VisitError::UnknownVariant(variant.to_owned())
    }
}

impl From<OptionsError> for VisitError {
    fn from(e: OptionsError) -> Self {
        VisitError::Done(e)
    }
}

impl From<VisitError> for OptionsError {
    fn from(e: VisitError) -> Self {
        match e {
            VisitError::Done(e) => e,
            VisitError::MissingField(field) => OptionsError::missing(field),
            VisitError::UnknownField(field) => OptionsError::unexpected(&field),
            other => OptionsError::invalid(other.to_string()),
        }
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

/// A value being visited, with its form and its dotted path from the root.
struct Input<'a> {
    value: &'a Value,
    form: Form,
    path: String,
}

impl<'a> Input<'a> {
    fn root(value: &'a Value, form: Form) -> Self {
        Self {
            value,
            form,
            path: String::new(),
        }
    }

    fn child<'b>(&self, key: &str, value: &'b Value) -> Input<'b> {
        Input {
            value,
            form: self.form,
            path: self.join(key),
        }
    }

    fn join(&self, key: &str) -> String {
        join(&self.path, key)
    }

    fn parse<T: DeserializeOwned>(&self) -> Result<T, OptionsError> {
        let input = Input {
            value: self.value,
            form: self.form,
            path: self.path.clone(),
        };
        T::deserialize(input).map_err(OptionsError::from)
    }

    /// The error for a value that is not the scalar a member needs. In keyval form the value
    /// can only be a nested object or array (`iothread.0=x`).
    fn not_scalar(&self, json_type: &str) -> VisitError {
        match (self.form, self.value) {
            (Form::Keyval, Value::Object(_) | Value::Array(_)) => {
                OptionsError::nested_unexpected(&self.path).into()
            }
            _ => OptionsError::invalid_type(&self.path, json_type).into(),
        }
    }

    /// An unsigned integer: keyval as `strtoull`, JSON as QEMU's `uint64` visitor (negative
    /// numbers wrap). `bits` and `c_type` name the member's type for the range error.
    fn unsigned(&self, bits: u32, c_type: &str) -> Result<u64, VisitError> {
        let value = match (self.form, self.value) {
            (Form::Keyval, Value::String(s)) => {
                parse_u64(s).ok_or_else(|| OptionsError::expects(&self.path, "integer"))?
            }
            (Form::Keyval, _) => return Err(self.not_scalar("integer")),
            (Form::Json, Value::Number(n)) => match (n.as_u64(), n.as_i64()) {
                (Some(v), _) => v,
                (None, Some(v)) => v as u64,
                (None, None) => return Err(OptionsError::expects(&self.path, "uint64").into()),
            },
            (Form::Json, _) => return Err(OptionsError::expects(&self.path, "uint64").into()),
        };
        if bits < 64 && value >> bits != 0 {
            return Err(OptionsError::expects(&self.path, c_type).into());
        }
        Ok(value)
    }
}

/// Iterates an object's members, handing each value on with its path.
struct ObjectAccess<'a, 'p> {
    iter: serde_json::map::Iter<'a>,
    pending: Option<(&'a str, &'a Value)>,
    form: Form,
    path: &'p str,
}

impl<'de> de::MapAccess<'de> for ObjectAccess<'de, '_> {
    type Error = VisitError;

    fn next_key_seed<K: de::DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, VisitError> {
        let Some((key, value)) = self.iter.next() else {
            return Ok(None);
        };
        self.pending = Some((key, value));
        seed.deserialize(de::value::BorrowedStrDeserializer::new(key))
            .map(Some)
    }

    fn next_value_seed<V: de::DeserializeSeed<'de>>(
        &mut self,
        seed: V,
    ) -> Result<V::Value, VisitError> {
        let (key, value) = self
            .pending
            .take()
            .expect("next_value_seed after next_key_seed");
        seed.deserialize(Input {
            value,
            form: self.form,
            path: join(self.path, key),
        })
    }
}

/// Iterates an array's items; their paths end in the index.
struct ArrayAccess<'a, 'p> {
    iter: std::iter::Enumerate<std::slice::Iter<'a, Value>>,
    form: Form,
    path: &'p str,
}

impl<'de> de::SeqAccess<'de> for ArrayAccess<'de, '_> {
    type Error = VisitError;

    fn next_element_seed<T: de::DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, VisitError> {
        let Some((index, value)) = self.iter.next() else {
            return Ok(None);
        };
        seed.deserialize(Input {
            value,
            form: self.form,
            path: join(self.path, &index.to_string()),
        })
        .map(Some)
    }
}

impl<'de> Deserializer<'de> for Input<'de> {
    type Error = VisitError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, VisitError> {
        match self.value {
            Value::Null => visitor.visit_unit(),
            Value::Bool(b) => visitor.visit_bool(*b),
            Value::Number(n) => match (n.as_u64(), n.as_i64(), n.as_f64()) {
                (Some(v), _, _) => visitor.visit_u64(v),
                (None, Some(v), _) => visitor.visit_i64(v),
                (None, None, Some(v)) => visitor.visit_f64(v),
                (None, None, None) => Err(OptionsError::invalid_type(&self.path, "number").into()),
            },
            Value::String(s) => visitor.visit_borrowed_str(s),
            Value::Array(items) => visitor.visit_seq(ArrayAccess {
                iter: items.iter().enumerate(),
                form: self.form,
                path: &self.path,
            }),
            Value::Object(map) => visitor.visit_map(ObjectAccess {
                iter: map.iter(),
                pending: None,
                form: self.form,
                path: &self.path,
            }),
        }
    }

    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, VisitError> {
        match (self.form, self.value) {
            (Form::Keyval, Value::String(s)) => visitor.visit_bool(parse_bool(&self.path, s)?),
            (Form::Json, Value::Bool(b)) => visitor.visit_bool(*b),
            _ => Err(self.not_scalar("boolean")),
        }
    }

    fn deserialize_i64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, VisitError> {
        match (self.form, self.value) {
            (Form::Keyval, Value::String(s)) => match parse_i64(s) {
                Some(v) => visitor.visit_i64(v),
                None => Err(OptionsError::expects(&self.path, "integer").into()),
            },
            (Form::Json, Value::Number(n)) if n.is_i64() => {
                visitor.visit_i64(n.as_i64().expect("is_i64"))
            }
            _ => Err(self.not_scalar("integer")),
        }
    }

    fn deserialize_u64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, VisitError> {
        visitor.visit_u64(self.unsigned(64, "uint64")?)
    }

    fn deserialize_u32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, VisitError> {
        let value = self.unsigned(32, "uint32_t")?;
        visitor.visit_u32(u32::try_from(value).expect("range checked"))
    }

    fn deserialize_u16<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, VisitError> {
        let value = self.unsigned(16, "uint16_t")?;
        visitor.visit_u16(u16::try_from(value).expect("range checked"))
    }

    fn deserialize_u8<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, VisitError> {
        let value = self.unsigned(8, "uint8_t")?;
        visitor.visit_u8(u8::try_from(value).expect("range checked"))
    }

    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, VisitError> {
        match self.value {
            Value::String(s) => visitor.visit_borrowed_str(s),
            _ => Err(self.not_scalar("string")),
        }
    }

    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, VisitError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_identifier<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, VisitError> {
        self.deserialize_str(visitor)
    }

    /// A present member is `Some`, even JSON `null` (an error for the inner type, as in QEMU).
    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, VisitError> {
        visitor.visit_some(self)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        visitor: V,
    ) -> Result<V::Value, VisitError> {
        if name != SIZE_NEWTYPE {
            return visitor.visit_newtype_struct(self);
        }
        match (self.form, self.value) {
            (Form::Keyval, Value::String(s)) => match parse_size(s) {
                Some(v) => visitor.visit_u64(v),
                None => Err(OptionsError::expects(&self.path, "size").into()),
            },
            _ => visitor.visit_u64(self.unsigned(64, "uint64")?),
        }
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, VisitError> {
        let Value::Object(map) = self.value else {
            return Err(OptionsError::invalid_type(&self.path, "object").into());
        };
        let access = ObjectAccess {
            iter: map.iter(),
            pending: None,
            form: self.form,
            path: &self.path,
        };
        visitor.visit_map(access).map_err(|e| match e {
            VisitError::MissingField(field) => {
                OptionsError::missing(&join(&self.path, field)).into()
            }
            VisitError::UnknownField(field) => {
                OptionsError::unexpected(&join(&self.path, &field)).into()
            }
            other => other,
        })
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, VisitError> {
        let Value::String(s) = self.value else {
            return Err(self.not_scalar("string"));
        };
        let access: StrDeserializer<'_, VisitError> = s.as_str().into_deserializer();
        visitor.visit_enum(access).map_err(|e| match e {
            VisitError::UnknownVariant(value) => OptionsError::bad_value(&self.path, &value).into(),
            other => other,
        })
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, VisitError> {
        visitor.visit_unit()
    }

    serde::forward_to_deserialize_any! {
        i8 i16 i32 i128 u128 f32 f64 char bytes byte_buf unit unit_struct seq tuple
        tuple_struct map
    }
}

// ---------------------------------------------------------------------------------------------
// QAPI flat unions.

/// A flat union split into its tag, its base members (those `B` declares) and the members
/// left for the variant. Nothing but the tag is read until [`Union::base`] and
/// [`Union::variant`], so that an unknown tag value is reported first, as in QEMU.
struct Union<B> {
    tag: String,
    base: Value,
    rest: Value,
    form: Form,
    path: String,
    _base: PhantomData<B>,
}

impl<B: DeserializeOwned> Union<B> {
    fn base(&self) -> Result<B, OptionsError> {
        self.read(&self.base)
    }

    /// Reads the members left over as the variant struct `V`; a member neither base nor
    /// variant knows is unexpected.
    fn variant<V: DeserializeOwned>(&self) -> Result<V, OptionsError> {
        self.read(&self.rest)
    }

    fn read<T: DeserializeOwned>(&self, value: &Value) -> Result<T, OptionsError> {
        Input {
            value,
            form: self.form,
            path: self.path.clone(),
        }
        .parse()
    }
}

/// Splits the object at `input` by the union tag `tag` (a string, mandatory).
fn split_union<B: DeserializeOwned>(
    input: &Input<'_>,
    tag: &str,
) -> Result<Union<B>, OptionsError> {
    let Value::Object(map) = input.value else {
        return Err(OptionsError::invalid_type(&input.path, "object"));
    };
    let tag_value = match map.get(tag) {
        None => return Err(OptionsError::missing(&input.join(tag))),
        Some(Value::String(s)) => s.clone(),
        Some(other) => {
            return Err(OptionsError::from(
                input.child(tag, other).not_scalar("string"),
            ));
        }
    };
    let base_fields = struct_fields::<B>();
    let mut base = Map::new();
    let mut rest = Map::new();
    for (key, value) in map {
        if key == tag {
            continue;
        }
        let part = if base_fields.contains(&key.as_str()) {
            &mut base
        } else {
            &mut rest
        };
        part.insert(key.clone(), value.clone());
    }
    Ok(Union {
        tag: tag_value,
        base: Value::Object(base),
        rest: Value::Object(rest),
        form: input.form,
        path: input.path.clone(),
        _base: PhantomData,
    })
}

/// The member names a derived struct declares, found by asking its `Deserialize` impl.
fn struct_fields<T: DeserializeOwned>() -> &'static [&'static str] {
    #[derive(Debug)]
    struct Probe(Option<&'static [&'static str]>);

    impl fmt::Display for Probe {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("struct probe")
        }
    }

    impl std::error::Error for Probe {}

    impl de::Error for Probe {
        fn custom<M: fmt::Display>(_msg: M) -> Self {
            Probe(None)
        }
    }

    struct Prober;

    impl<'de> Deserializer<'de> for Prober {
        type Error = Probe;

        fn deserialize_any<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, Probe> {
            Err(Probe(None))
        }

        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _name: &'static str,
            fields: &'static [&'static str],
            _visitor: V,
        ) -> Result<V::Value, Probe> {
            Err(Probe(Some(fields)))
        }

        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
            byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map enum
            identifier ignored_any
        }
    }

    match T::deserialize(Prober) {
        Err(Probe(Some(fields))) => fields,
        _ => panic!("struct_fields needs a derived struct"),
    }
}

#[cfg(test)]
mod tests {
    //! Expectations marked "QSD:" were checked by running qemu-storage-daemon 10.0.2 with the
    //! same option (`timeout 1 qemu-storage-daemon --blockdev ...`): it either starts or prints
    //! the quoted message.
    use super::*;
    use crate::keyval;
    use serde_json::json;

    fn keyval(input: &str, implied: &str) -> Value {
        Value::Object(keyval::parse(input, Some(implied)).unwrap().value)
    }

    fn blockdev(input: &str) -> Result<BlockdevOptions, String> {
        BlockdevOptions::from_value(&keyval(input, "driver"), Form::Keyval)
            .map_err(|e| e.to_string())
    }

    fn blockdev_json(value: Value) -> Result<BlockdevOptions, String> {
        BlockdevOptions::from_value(&value, Form::Json).map_err(|e| e.to_string())
    }

    fn export(input: &str) -> Result<ExportOptions, String> {
        ExportOptions::from_value(&keyval(input, "type"), Form::Keyval).map_err(|e| e.to_string())
    }

    fn export_json(value: Value) -> Result<ExportOptions, String> {
        ExportOptions::from_value(&value, Form::Json).map_err(|e| e.to_string())
    }

    fn object(input: &str) -> Result<ObjectOptions, String> {
        ObjectOptions::from_value(&keyval(input, "qom-type"), Form::Keyval)
            .map_err(|e| e.to_string())
    }

    fn monitor(input: &str) -> Result<MonitorOptions, String> {
        MonitorOptions::from_value(&keyval(input, "chardev"), Form::Keyval)
            .map_err(|e| e.to_string())
    }

    fn chardev(input: &str) -> Result<ChardevOptions, String> {
        ChardevOptions::from_qemu_opts(&keyval::parse_qemu_opts(input, "backend").opts)
            .map_err(|e| e.to_string())
    }

    fn null_co(input: &str) -> BlockdevOptionsNull {
        match blockdev(input).unwrap().driver {
            BlockdevDriver::NullCo(null) => null,
            other => panic!("{other:?}"),
        }
    }

    fn file(input: &str) -> BlockdevOptionsFile {
        match blockdev(input).unwrap().driver {
            BlockdevDriver::File(file) => file,
            other => panic!("{other:?}"),
        }
    }

    fn vhost_user_blk(input: &str) -> BlockExportOptionsVhostUserBlk {
        match export(input).unwrap().kind {
            ExportKind::VhostUserBlk(options) => options,
            other => panic!("not vhost-user-blk: {other:?}"),
        }
    }

    const EXPORT: &str = "vhost-user-blk,id=e,node-name=n,addr.type=unix,addr.path=/tmp/s";

    fn err<T: fmt::Debug>(result: Result<T, String>) -> String {
        result.unwrap_err()
    }

    #[test]
    fn null_co_defaults() {
        // QSD: query-named-block-nodes shows virtual-size 1073741824, ro false, direct and
        // no-flush false; qemu-io reads garbage, not zeroes, without read-zeroes.
        let options = blockdev("null-co,node-name=n").unwrap();
        assert_eq!(
            options,
            BlockdevOptions {
                node_name: "n".into(),
                discard: BlockdevDiscardOptions::Ignore,
                cache: BlockdevCacheOptions::default(),
                read_only: false,
                force_share: false,
                driver: BlockdevDriver::NullCo(BlockdevOptionsNull {
                    size: 1 << 30,
                    latency_ns: 0,
                    read_zeroes: false,
                }),
            }
        );
    }

    #[test]
    fn null_co_all_options() {
        let options = blockdev(
            "driver=null-co,node-name=n,size=4096,latency-ns=1000,read-zeroes=on,read-only=on,\
             cache.direct=on,cache.no-flush=on,discard=unmap",
        )
        .unwrap();
        assert!(options.read_only);
        assert_eq!(options.discard, BlockdevDiscardOptions::Unmap);
        assert_eq!(
            options.cache,
            BlockdevCacheOptions {
                direct: true,
                no_flush: true
            }
        );
        assert_eq!(
            options.driver,
            BlockdevDriver::NullCo(BlockdevOptionsNull {
                size: 4096,
                latency_ns: 1000,
                read_zeroes: true
            })
        );
    }

    #[test]
    fn integers_are_c_literals_without_size_suffixes() {
        // QSD: size=01000 gives virtual-size 512 (octal), 0x1000 and ' +4096' give 4096.
        assert_eq!(null_co("null-co,node-name=n,size=01000").size, 512);
        assert_eq!(null_co("null-co,node-name=n,size=0x1000").size, 4096);
        assert_eq!(null_co("null-co,node-name=n,size= +4096").size, 4096);
        assert_eq!(null_co("null-co,node-name=n,size=-0").size, 0);
        assert_eq!(
            null_co("null-co,node-name=n,latency-ns=0x10").latency_ns,
            16
        );
        // QSD: "Parameter 'size' expects integer" for each of these (`size` of null-co is an
        // int in QAPI, not a size).
        for bad in ["1G", "1x", "5.0", "", "1e3", "9223372036854775808", "08"] {
            assert_eq!(
                blockdev(&format!("null-co,node-name=n,size={bad}")).unwrap_err(),
                "Parameter 'size' expects integer",
                "{bad}"
            );
        }
        assert_eq!(
            blockdev("null-co,node-name=n,latency-ns=1k").unwrap_err(),
            "Parameter 'latency-ns' expects integer"
        );
        assert_eq!(
            blockdev("null-co,node-name=n,latency-ns=18446744073709551616").unwrap_err(),
            "Parameter 'latency-ns' expects integer"
        );
    }

    #[test]
    fn null_co_range_errors() {
        // QSD: "latency-ns is invalid" for -1 (it wraps) and for 2^63; size -1 aborts QSD
        // after printing "Value '-1' is out of range for parameter 'size'".
        assert_eq!(
            blockdev("null-co,node-name=n,latency-ns=-1").unwrap_err(),
            "latency-ns is invalid"
        );
        assert_eq!(
            blockdev("null-co,node-name=n,latency-ns=9223372036854775808").unwrap_err(),
            "latency-ns is invalid"
        );
        assert_eq!(
            blockdev("null-co,node-name=n,size=-1").unwrap_err(),
            "Value '-1' is out of range for parameter 'size'"
        );
    }

    #[test]
    fn booleans_accept_qemu_spellings_only() {
        // QSD: on/yes/true/y and off/no/false/n start; ON, Yes, TRUE, 1 and '' are refused.
        for (spelling, expected) in [
            ("on", true),
            ("yes", true),
            ("true", true),
            ("y", true),
            ("off", false),
            ("no", false),
            ("false", false),
            ("n", false),
        ] {
            let options = blockdev(&format!("null-co,node-name=n,read-only={spelling}")).unwrap();
            assert_eq!(options.read_only, expected, "{spelling}");
        }
        for spelling in ["ON", "Yes", "TRUE", "1", ""] {
            assert_eq!(
                blockdev(&format!("null-co,node-name=n,read-only={spelling}")).unwrap_err(),
                "Parameter 'read-only' expects 'on' or 'off'",
                "{spelling}"
            );
        }
        assert_eq!(
            blockdev("null-co,node-name=n,cache.direct=maybe").unwrap_err(),
            "Parameter 'cache.direct' expects 'on' or 'off'"
        );
    }

    #[test]
    fn unknown_members_are_unexpected_with_their_path() {
        // QSD: each message below.
        assert_eq!(
            blockdev("null-co,node-name=n,foo=1").unwrap_err(),
            "Parameter 'foo' is unexpected"
        );
        assert_eq!(
            blockdev("null-co,node-name=n,foo.bar=1").unwrap_err(),
            "Parameter 'foo' is unexpected"
        );
        assert_eq!(
            blockdev("null-co,node-name=n,cache.writeback=on").unwrap_err(),
            "Parameter 'cache.writeback' is unexpected"
        );
        assert_eq!(
            blockdev("null-co,node-name=n,filename=/x").unwrap_err(),
            "Parameter 'filename' is unexpected"
        );
        assert_eq!(
            export(&format!("{EXPORT},addr.foo=1")).unwrap_err(),
            "Parameter 'addr.foo' is unexpected"
        );
        assert_eq!(
            object("iothread,id=x,foo=1").unwrap_err(),
            "Parameter 'foo' is unexpected"
        );
        assert_eq!(
            monitor("chardev=m,foo=1").unwrap_err(),
            "Parameter 'foo' is unexpected"
        );
    }

    #[test]
    fn missing_members_are_named_with_their_path() {
        // QSD: each message below.
        assert_eq!(
            blockdev("node-name=n").unwrap_err(),
            "Parameter 'driver' is missing"
        );
        assert_eq!(blockdev("").unwrap_err(), "Parameter 'driver' is missing");
        assert_eq!(
            blockdev("file,node-name=f").unwrap_err(),
            "Parameter 'filename' is missing"
        );
        assert_eq!(
            blockdev("null-co").unwrap_err(),
            "'node-name' must be specified for the root node"
        );
        assert_eq!(
            export("vhost-user-blk,id=e,node-name=n").unwrap_err(),
            "Parameter 'addr' is missing"
        );
        assert_eq!(
            export("vhost-user-blk,id=e,node-name=n,addr.path=/s").unwrap_err(),
            "Parameter 'addr.type' is missing"
        );
        assert_eq!(
            export("vhost-user-blk,node-name=n,addr.type=unix,addr.path=/s").unwrap_err(),
            "Parameter 'id' is missing"
        );
        assert_eq!(
            export("vhost-user-blk,id=e,addr.type=unix,addr.path=/s").unwrap_err(),
            "Parameter 'node-name' is missing"
        );
        assert_eq!(object("iothread").unwrap_err(), "Parameter 'id' is missing");
        assert_eq!(
            monitor("mode=control").unwrap_err(),
            "Parameter 'chardev' is missing"
        );
    }

    #[test]
    fn unknown_tag_and_enum_values_are_refused() {
        // QSD: "Parameter '<name>' does not accept value '<value>'".
        assert_eq!(
            blockdev("driver=foo,node-name=n").unwrap_err(),
            "Parameter 'driver' does not accept value 'foo'"
        );
        assert_eq!(
            blockdev("driver=,node-name=n").unwrap_err(),
            "Parameter 'driver' does not accept value ''"
        );
        assert_eq!(
            blockdev("file,node-name=f,filename=/x,aio=foo").unwrap_err(),
            "Parameter 'aio' does not accept value 'foo'"
        );
        assert_eq!(
            blockdev("file,node-name=f,filename=/x,discard=on").unwrap_err(),
            "Parameter 'discard' does not accept value 'on'"
        );
        assert_eq!(
            export("foo,id=e,node-name=n").unwrap_err(),
            "Parameter 'type' does not accept value 'foo'"
        );
        assert_eq!(
            object("foo,id=x").unwrap_err(),
            "Parameter 'qom-type' does not accept value 'foo'"
        );
        assert_eq!(
            monitor("chardev=m,mode=foo").unwrap_err(),
            "Parameter 'mode' does not accept value 'foo'"
        );
        assert_eq!(
            export("vhost-user-blk,id=e,node-name=n,addr.type=foo").unwrap_err(),
            "Parameter 'addr.type' does not accept value 'foo'"
        );
    }

    #[test]
    fn what_qemu_knows_but_ringblk_lacks_is_unsupported() {
        let unsupported = [
            (
                err(blockdev("qcow2,node-name=n")),
                "'driver=qcow2' is not supported by ringblk (supported: file, null-co, nbd)",
            ),
            (
                err(blockdev("null-co,node-name=n,detect-zeroes=on")),
                "'detect-zeroes=on' is not supported by ringblk",
            ),
            (
                err(blockdev("null-co,node-name=n,auto-read-only=on")),
                "'auto-read-only=on' is not supported by ringblk",
            ),
            (
                err(blockdev("null-co,node-name=n,active=off")),
                "'active=off' is not supported by ringblk",
            ),
            (
                err(blockdev("file,node-name=f,filename=/x,locking=on")),
                "'locking=on' is not supported by ringblk (ringblk takes no image locks)",
            ),
            (
                err(blockdev("file,node-name=f,filename=/x,pr-manager=p")),
                "'pr-manager=p' is not supported by ringblk",
            ),
            (
                err(export("fuse,id=e,node-name=n")),
                "'type=fuse' is not supported by ringblk (supported: vhost-user-blk, nbd)",
            ),
            (
                err(export(&format!("{EXPORT},writethrough=on"))),
                "'writethrough=on' is not supported by ringblk",
            ),
            (
                err(export(&format!("{EXPORT},fixed-iothread=on"))),
                "'fixed-iothread=on' is not supported by ringblk",
            ),
            (
                err(export(
                    "vhost-user-blk,id=e,node-name=n,addr.type=fd,addr.str=5",
                )),
                "'addr.type=fd' is not supported by ringblk (supported: unix)",
            ),
            (
                err(export(&format!("{EXPORT},addr.abstract=on"))),
                "'addr.abstract=on' is not supported by ringblk",
            ),
            (
                err(object("secret,id=s")),
                "'qom-type=secret' is not supported by ringblk (supported: iothread)",
            ),
            (
                err(monitor("chardev=m,mode=readline")),
                "Only QMP is supported",
            ),
        ];
        for (error, message) in unsupported {
            assert_eq!(error, message);
        }
        let error =
            BlockdevOptions::from_value(&keyval("qcow2,node-name=n", "driver"), Form::Keyval)
                .unwrap_err();
        assert!(
            error.to_string().contains("not supported by ringblk"),
            "{error}"
        );
    }

    #[test]
    fn file_options_and_qemu_combination_rules() {
        let options = file(
            "file,node-name=f,filename=/img,aio=io_uring,locking=off,aio-max-batch=-1,drop-cache=off",
        );
        assert_eq!(
            options,
            BlockdevOptionsFile {
                filename: "/img".into(),
                aio: Some(BlockdevAioOptions::IoUring),
                locking: OnOffAuto::Off,
                aio_max_batch: -1,
                drop_cache: false,
            }
        );
        let defaults = file("file,node-name=f,filename=/img");
        assert_eq!(
            (defaults.aio, defaults.locking, defaults.drop_cache),
            (None, OnOffAuto::Auto, true)
        );
        // aio=threads (QSD's default) is accepted: ringblk uses io_uring whatever the mode.
        assert_eq!(
            file("file,node-name=f,filename=/img,aio=threads").aio,
            Some(BlockdevAioOptions::Threads)
        );
        // QSD: the messages below.
        assert_eq!(
            blockdev("file,node-name=f,filename=/img,aio=native").unwrap_err(),
            "aio=native was specified, but it requires cache.direct=on, which was not specified."
        );
        assert!(blockdev("file,node-name=f,filename=/img,aio=native,cache.direct=on").is_ok());
        assert_eq!(
            blockdev("file,node-name=f,filename=").unwrap_err(),
            "The 'file' block driver requires a file name"
        );
        assert_eq!(
            blockdev("file,node-name=f,filename=/img,force-share=on").unwrap_err(),
            "force-share=on can only be used with read-only images"
        );
        assert!(
            blockdev("file,node-name=f,filename=/img,read-only=on,force-share=on")
                .unwrap()
                .force_share
        );
    }

    #[test]
    fn node_names_follow_qemu_rules() {
        // QSD: the messages below; a.b is accepted, 31 characters are, 32 are not.
        assert_eq!(
            blockdev("null-co,node-name=9a").unwrap_err(),
            "Invalid node-name: '9a'"
        );
        assert_eq!(
            blockdev("null-co,node-name=a,,b").unwrap_err(),
            "Invalid node-name: 'a,b'"
        );
        assert!(blockdev("null-co,node-name=a.b").is_ok());
        assert!(blockdev(&format!("null-co,node-name={}", "a".repeat(31))).is_ok());
        assert_eq!(
            blockdev(&format!("null-co,node-name={}", "a".repeat(32))).unwrap_err(),
            "Node name too long"
        );
    }

    #[test]
    fn nested_keys_where_values_belong() {
        // QSD: these messages.
        assert_eq!(
            blockdev("null-co,node-name=n,cache=1").unwrap_err(),
            "Invalid parameter type for 'cache', expected: object"
        );
        assert_eq!(
            blockdev("null-co,node-name=n,cache.0=1").unwrap_err(),
            "Invalid parameter type for 'cache', expected: object"
        );
        assert_eq!(
            blockdev("null-co,node-name=n,cache.direct.x=on").unwrap_err(),
            "Parameters 'cache.direct.*' are unexpected"
        );
        // QSD: "Parameters 'iothread.*' are unexpected"; ringblk takes a list of iothreads.
        assert_eq!(
            export(&format!("{EXPORT},iothread.0=io0"))
                .unwrap()
                .iothread,
            ["io0"]
        );
    }

    #[test]
    fn json_form_takes_real_types() {
        let options = blockdev_json(json!({
            "driver": "null-co", "node-name": "n", "size": 1024, "read-only": true,
            "cache": {"direct": true}
        }))
        .unwrap();
        assert!(options.read_only && options.cache.direct);
        assert!(matches!(
            options.driver,
            BlockdevDriver::NullCo(BlockdevOptionsNull { size: 1024, .. })
        ));
        // QSD: a string where a number or boolean belongs is a type error in JSON.
        assert_eq!(
            blockdev_json(json!({"driver": "null-co", "node-name": "n", "size": "1G"}))
                .unwrap_err(),
            "Invalid parameter type for 'size', expected: integer"
        );
        assert_eq!(
            blockdev_json(json!({"driver": "null-co", "node-name": "n", "read-only": "on"}))
                .unwrap_err(),
            "Invalid parameter type for 'read-only', expected: boolean"
        );
        assert_eq!(
            blockdev_json(json!({"driver": "null-co", "node-name": "n", "size": 1e3})).unwrap_err(),
            "Invalid parameter type for 'size', expected: integer"
        );
        assert_eq!(
            blockdev_json(
                json!({"driver": "null-co", "node-name": "n", "cache": {"direct": true, "x": 1}})
            )
            .unwrap_err(),
            "Parameter 'cache.x' is unexpected"
        );
        // Dotted keys are keyval syntax, not JSON.
        assert_eq!(
            blockdev_json(json!({"driver": "null-co", "node-name": "n", "cache.direct": true}))
                .unwrap_err(),
            "Parameter 'cache.direct' is unexpected"
        );
        assert_eq!(
            blockdev_json(json!({"driver": "null-co", "node-name": "n", "latency-ns": -1}))
                .unwrap_err(),
            "latency-ns is invalid"
        );
        assert_eq!(
            blockdev_json(json!({"driver": "null-co", "node-name": "n", "latency-ns": 18446744073709551615u64})).unwrap_err(),
            "latency-ns is invalid"
        );
    }

    #[test]
    fn json_form_type_errors_for_exports() {
        let with = |extra: Value| {
            let mut value = json!({"type": "vhost-user-blk", "id": "e", "node-name": "n",
                                   "addr": {"type": "unix", "path": "/s"}});
            value
                .as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            export_json(value)
        };
        // QSD: the messages below.
        assert_eq!(
            with(json!({"num-queues": 70000})).unwrap_err(),
            "Parameter 'num-queues' expects uint16_t"
        );
        assert_eq!(
            with(json!({"num-queues": -1})).unwrap_err(),
            "Parameter 'num-queues' expects uint16_t"
        );
        assert_eq!(
            with(json!({"num-queues": 1.0})).unwrap_err(),
            "Parameter 'num-queues' expects uint64"
        );
        assert_eq!(
            with(json!({"num-queues": "1"})).unwrap_err(),
            "Parameter 'num-queues' expects uint64"
        );
        assert_eq!(
            with(json!({"logical-block-size": "4k"})).unwrap_err(),
            "Parameter 'logical-block-size' expects uint64"
        );
        assert_eq!(
            with(json!({"logical-block-size": -1})).unwrap_err(),
            "parameter logical-block-size must be a power of 2 between 512 and 2097152"
        );
        assert_eq!(
            with(json!({"writable": 1})).unwrap_err(),
            "Invalid parameter type for 'writable', expected: boolean"
        );
        // A list of ids is ringblk's extension (QSD 10.0 refuses it); anything else is refused.
        assert_eq!(
            with(json!({"iothread": ["a", "b"]})).unwrap().iothread,
            ["a", "b"]
        );
        for iothread in [json!({"a": 1}), json!(null), json!([1])] {
            assert_eq!(
                with(json!({"iothread": iothread})).unwrap_err(),
                "Invalid parameter type for 'iothread', expected: string"
            );
        }
        assert_eq!(
            with(json!({"addr": "x"})).unwrap_err(),
            "Invalid parameter type for 'addr', expected: object"
        );
        assert_eq!(
            with(json!({"id": 5})).unwrap_err(),
            "Invalid parameter type for 'id', expected: string"
        );
        assert_eq!(
            export_json(json!({"type": 5})).unwrap_err(),
            "Invalid parameter type for 'type', expected: string"
        );
        assert!(
            with(json!({"num-queues": 4, "logical-block-size": 4096, "writable": true})).is_ok()
        );
    }

    #[test]
    fn vhost_user_blk_defaults() {
        // QSD: writable defaults to off (read-only export), one queue, 512-byte blocks.
        let options = export(EXPORT).unwrap();
        assert_eq!(
            options,
            ExportOptions {
                id: "e".into(),
                node_name: "n".into(),
                writable: false,
                iothread: Vec::new(),
                kind: ExportKind::VhostUserBlk(BlockExportOptionsVhostUserBlk {
                    addr: SocketAddress::Unix(UnixSocketAddress {
                        path: "/tmp/s".into()
                    }),
                    logical_block_size: 512,
                    num_queues: 1,
                }),
            }
        );
        let options = export(&format!(
            "type={EXPORT},writable=on,iothread=io0,num-queues=4"
        ))
        .unwrap();
        assert!(options.writable);
        assert_eq!(options.iothread, ["io0"]);
    }

    #[test]
    fn logical_block_size_is_a_qemu_size() {
        // QSD: these start (0.5k is 512, 4K is 4096, 0x1000 is 4096, 0512 is decimal 512).
        for (spelling, bytes) in [
            ("4k", 4096),
            ("4K", 4096),
            ("0.5k", 512),
            (".5k", 512),
            ("4096b", 4096),
            ("4096B", 4096),
            ("+4k", 4096),
            ("4.0k", 4096),
            ("4096.", 4096),
            ("4096.0", 4096),
            ("0x1000", 4096),
            (" 4096", 4096),
            ("0512", 512),
            ("00000512", 512),
            ("1024", 1024),
            ("8192", 8192),
            ("2M", 2 << 20),
        ] {
            let options = vhost_user_blk(&format!("{EXPORT},logical-block-size={spelling}"));
            assert_eq!(options.logical_block_size, bytes, "{spelling}");
        }
        // QSD: "Parameter 'logical-block-size' expects size".
        for spelling in [
            "-1", "4096.5", "4kB", "4KiB", "0x1k", "0x1K", "4k ", "1e3", "0x1.8k", "",
        ] {
            assert_eq!(
                export(&format!("{EXPORT},logical-block-size={spelling}")).unwrap_err(),
                "Parameter 'logical-block-size' expects size",
                "{spelling}"
            );
        }
        // QSD: sizes that parse but are not a power of two in range.
        for spelling in ["256", "1.5k", "5.k", "0.0005M", "4M"] {
            assert_eq!(
                export(&format!("{EXPORT},logical-block-size={spelling}")).unwrap_err(),
                "parameter logical-block-size must be a power of 2 between 512 and 2097152",
                "{spelling}"
            );
        }
    }

    #[test]
    fn num_queues_is_a_uint16_of_at_least_one() {
        // QSD: 65535 starts; the messages below.
        assert_eq!(
            vhost_user_blk(&format!("{EXPORT},num-queues=65535")).num_queues,
            65535
        );
        assert_eq!(
            export(&format!("{EXPORT},num-queues=65536")).unwrap_err(),
            "Parameter 'num-queues' expects uint16_t"
        );
        assert_eq!(
            export(&format!("{EXPORT},num-queues=-1")).unwrap_err(),
            "Parameter 'num-queues' expects uint16_t"
        );
        assert_eq!(
            export(&format!("{EXPORT},num-queues=1k")).unwrap_err(),
            "Parameter 'num-queues' expects integer"
        );
        assert_eq!(
            export(&format!("{EXPORT},num-queues=0")).unwrap_err(),
            "num-queues must be greater than 0"
        );
    }

    #[test]
    fn export_address_and_id_rules() {
        // QSD: "Invalid block export id"; inet → QSD's own refusal, ours says unix only.
        assert_eq!(
            export(&EXPORT.replace("id=e", "id=9e")).unwrap_err(),
            "Invalid block export id"
        );
        assert_eq!(
            export(&EXPORT.replace("id=e", "id=")).unwrap_err(),
            "Invalid block export id"
        );
        assert_eq!(
            export("vhost-user-blk,id=e,node-name=n,addr.type=inet,addr.host=x,addr.port=1")
                .unwrap_err(),
            "'addr.type=inet' is not supported by ringblk (supported: unix)"
        );
        let long = format!("/tmp/{}", "a".repeat(110));
        assert_eq!(
            export(&EXPORT.replace("/tmp/s", &long)).unwrap_err(),
            format!("UNIX socket path '{long}' is too long: it must be less than 108 bytes")
        );
        // QSD accepts an empty path; ringblk refuses it rather than bind nowhere.
        assert_eq!(
            export(&EXPORT.replace("/tmp/s", "")).unwrap_err(),
            "Parameter 'addr.path' must not be empty"
        );
        // QSD: "Export type does not support inactive exports".
        assert_eq!(
            export(&format!("{EXPORT},allow-inactive=on")).unwrap_err(),
            "'allow-inactive=on' is not supported by ringblk (Export type does not support inactive exports)"
        );
        // A repeated key: the last one counts (QSD starts).
        assert!(export(&format!("{EXPORT},addr.type=unix,addr.path=/tmp/s")).is_ok());
    }

    #[test]
    fn iothread_properties_defaults_and_ranges() {
        // QSD: qom-get on a default iothread: poll-max-ns 32768, thread-pool-max 64, poll-grow 0.
        assert_eq!(
            object("iothread,id=io0").unwrap(),
            ObjectOptions {
                id: "io0".into(),
                properties: ObjectProperties::Iothread(IothreadProperties::default()),
            }
        );
        let ObjectProperties::Iothread(properties) = object(
            "qom-type=iothread,id=io0,poll-max-ns=0x10,poll-grow=010,poll-shrink=2,aio-max-batch=1,\
             thread-pool-min=1,thread-pool-max=2",
        )
        .unwrap()
        .properties;
        assert_eq!(
            properties,
            IothreadProperties {
                poll_max_ns: 16,
                poll_grow: 8,
                poll_shrink: 2,
                aio_max_batch: 1,
                thread_pool_min: 1,
                thread_pool_max: 2,
            }
        );
        // QSD: the messages below.
        for name in [
            "poll-max-ns",
            "poll-grow",
            "poll-shrink",
            "aio-max-batch",
            "thread-pool-min",
            "thread-pool-max",
        ] {
            assert_eq!(
                object(&format!("iothread,id=io0,{name}=-1")).unwrap_err(),
                format!("{name} value must be in range [0, 9223372036854775807]")
            );
        }
        assert_eq!(
            object("iothread,id=io0,poll-max-ns=9223372036854775808").unwrap_err(),
            "Parameter 'poll-max-ns' expects integer"
        );
        assert_eq!(
            object("iothread,id=io0,thread-pool-min=5,thread-pool-max=2").unwrap_err(),
            "bad thread-pool-min/thread-pool-max values"
        );
        let ObjectOptions {
            properties: ObjectProperties::Iothread(json),
            ..
        } = ObjectOptions::from_value(
            &json!({"qom-type": "iothread", "id": "io0", "poll-max-ns": 5}),
            Form::Json,
        )
        .unwrap();
        assert_eq!(json.poll_max_ns, 5);
        assert_eq!(
            ObjectOptions::from_value(
                &json!({"qom-type": "iothread", "id": "io0", "poll-max-ns": "5"}),
                Form::Json
            )
            .unwrap_err()
            .to_string(),
            "Invalid parameter type for 'poll-max-ns', expected: integer"
        );
    }

    #[test]
    fn object_ids_must_be_identifiers() {
        // QSD: "Parameter 'id' expects an identifier" (plus a second line that lists the rule).
        for id in ["9a", "", "a,b"] {
            assert_eq!(
                ObjectOptions::from_value(&json!({"qom-type": "iothread", "id": id}), Form::Json)
                    .unwrap_err()
                    .to_string(),
                "Parameter 'id' expects an identifier (letters, digits, '-', '.', '_', starting with a letter)"
            );
        }
        assert!(object("iothread,id=a.b").is_ok());
    }

    #[test]
    fn monitor_options() {
        // QSD: implied key chardev; pretty=yes accepted; id accepted.
        assert_eq!(
            monitor("m").unwrap(),
            MonitorOptions {
                id: None,
                chardev: "m".into(),
                pretty: false
            }
        );
        assert_eq!(
            monitor("chardev=m,mode=control,pretty=yes,id=mon").unwrap(),
            MonitorOptions {
                id: Some("mon".into()),
                chardev: "m".into(),
                pretty: true
            }
        );
        assert!(MonitorOptions::from_value(&json!({"chardev": "m"}), Form::Json).is_ok());
    }

    #[test]
    fn chardev_socket_options() {
        // QSD: implied key backend; server=yes, wait=no are booleans too.
        let expected = ChardevOptions {
            id: "m".into(),
            backend: ChardevBackend::Socket(ChardevSocket {
                path: "/tmp/m".into(),
                server: true,
                wait: false,
            }),
        };
        assert_eq!(
            chardev("socket,id=m,path=/tmp/m,server=on,wait=off").unwrap(),
            expected
        );
        assert_eq!(
            chardev("backend=socket,id=m,path=/tmp/m,server=yes,wait=no").unwrap(),
            expected
        );
        // A repeated key: the last one counts.
        assert_eq!(
            chardev("socket,id=m,path=/x,server=on,wait=off,path=/tmp/m").unwrap(),
            expected
        );
    }

    #[test]
    fn chardev_errors() {
        // QSD: the first five messages; the rest are ringblk's refusals.
        let cases = [
            (
                "socket,id=m,path=/m,server=on,wait=off,foo=1",
                "Invalid parameter 'foo'",
            ),
            (
                "socket,path=/m,server=on,wait=off",
                "chardev: no id specified",
            ),
            (
                "id=m,path=/m,server=on,wait=off",
                "chardev: \"m\" missing backend",
            ),
            ("foo,id=m", "'foo' is not a valid char driver name"),
            (
                "socket,id=m,path=/m,server=on,wait=1",
                "Parameter 'wait' expects 'on' or 'off'",
            ),
            (
                "socket,id=9m,path=/m,server=on,wait=off",
                "Parameter 'id' expects an identifier (letters, digits, '-', '.', '_', starting with a letter)",
            ),
            (
                "stdio,id=m",
                "'backend=stdio' is not supported by ringblk (supported: socket)",
            ),
            (
                "socket,id=m,path=/m,server=off",
                "'server=off' is not supported by ringblk (the socket must listen)",
            ),
            (
                "socket,id=m,path=/m",
                "'server=off' is not supported by ringblk (the socket must listen)",
            ),
            (
                "socket,id=m,path=/m,server=on",
                "'wait=on' is not supported by ringblk (the default with server=on; add wait=off)",
            ),
            (
                "socket,id=m,server=on,wait=off",
                "Parameter 'path' is missing (ringblk supports UNIX socket chardevs only)",
            ),
            (
                "socket,id=m,path=/m,server=on,wait=off,mux=on",
                "'mux=on' is not supported by ringblk",
            ),
            (
                "socket,id=m,path=/m,server,nowait",
                "'server' is not supported by ringblk (short-form booleans are deprecated; write server=on)",
            ),
            (
                "socket,id=m,path=/m,server=on,nowait",
                "'nowait' is not supported by ringblk (short-form booleans are deprecated; write wait=off)",
            ),
            (
                "socket,id=m,path=/m,server=on,wait=off,bogus",
                "Invalid parameter 'bogus'",
            ),
        ];
        for (input, message) in cases {
            assert_eq!(chardev(input).unwrap_err(), message, "{input}");
        }
    }

    #[test]
    fn qmp_arguments_deserialize_from_json() {
        let options: BlockdevOptions =
            serde_json::from_value(json!({"driver": "null-co", "node-name": "n"})).unwrap();
        assert_eq!(options.node_name, "n");
        let error =
            serde_json::from_value::<ExportOptions>(json!({"type": "vhost-user-blk"})).unwrap_err();
        assert_eq!(error.to_string(), "Parameter 'id' is missing");
    }

    #[test]
    fn size_parser_edges() {
        assert_eq!(parse_size("16E"), None, "2^64 overflows");
        assert_eq!(parse_size("15E"), Some(15 << 60));
        assert_eq!(parse_size("1.5k"), Some(1536));
        assert_eq!(parse_size("."), None);
        assert_eq!(parse_size("k"), None);
        assert_eq!(parse_size("-0"), None);
    }

    #[test]
    fn integer_parser_edges() {
        assert_eq!(parse_i64("-9223372036854775808"), Some(i64::MIN));
        assert_eq!(parse_i64("9223372036854775807"), Some(i64::MAX));
        assert_eq!(parse_i64("0"), Some(0));
        assert_eq!(parse_i64("-0x10"), Some(-16));
        assert_eq!(parse_i64("0x"), None);
        assert_eq!(parse_i64("++1"), None);
        assert_eq!(parse_u64("-1"), Some(u64::MAX));
        assert_eq!(parse_u64("18446744073709551615"), Some(u64::MAX));
    }

    #[test]
    fn union_base_fields_are_found_by_probing() {
        assert_eq!(
            struct_fields::<ExportBaseWire>(),
            [
                "id",
                "fixed-iothread",
                "iothread",
                "node-name",
                "writable",
                "writethrough",
                "allow-inactive"
            ]
        );
        assert!(struct_fields::<NoBase>().is_empty());
    }
}
