//! ringblk's command line: qemu-storage-daemon's, for the part ringblk supports.
//!
//! Options are read by clap (long options may be abbreviated, `--opt value` and `--opt=value`
//! both work, as with QSD's getopt_long) and then processed **in order**, as QSD does: an
//! `--export` may only name a node and an iothread defined by earlier options, a `--monitor`
//! only an earlier chardev. Each `--blockdev`, `--export`, `--object` and `--monitor` argument is
//! keyval syntax or, when it starts with `{`, JSON ([`crate::keyval`]); `--chardev` is QemuOpts
//! syntax. The typed result is a list of [`CliItem`]s in command-line order; checks that need
//! the running daemon (does the image file exist, can the socket be bound) are left to it.

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::path::PathBuf;

use clap::error::{ContextKind, ContextValue, ErrorKind as ClapErrorKind};
use clap::{Arg, ArgAction, ArgMatches, Command};
use serde_json::Value;

use crate::keyval::{self, KeyvalError, QemuOpt};
use crate::options::{
    BlockdevOptions, CHARDEV_HELP, CHARDEV_SOCKET_HELP, ChardevOptions, ExportKind, ExportOptions,
    Form, IOTHREAD_HELP, MonitorOptions, NbdServerOptions, OBJECT_HELP, ObjectOptions,
    OptionsError,
};

/// The qemu-storage-daemon release whose command line and messages ringblk follows.
pub const QSD_VERSION: &str = "10.0.2";

/// What `--help` prints.
pub const HELP: &str = "\
Usage: ringblk [options]
       ringblk demo [demo arguments]
A vhost-user-blk storage daemon on io_uring. Its options are those of
qemu-storage-daemon, for the subset below.

  -h, --help             display this help and exit
  -V, --version          output version information and exit

  --blockdev [driver=]file,node-name=<N>,filename=<file>
             [,aio=threads|native|io_uring][,locking=auto|off]
             [,discard=ignore|unmap][,cache.direct=on|off]
             [,cache.no-flush=on|off][,read-only=on|off][,force-share=on|off]
             [,drop-cache=on|off][,aio-max-batch=<n>]
                         a raw image file or block device. ringblk does all
                         I/O with io_uring: aio= is accepted and recorded
                         (aio=native still needs cache.direct=on, as in QEMU);
                         ringblk takes no image locks, so locking=on is refused
  --blockdev [driver=]null-co,node-name=<N>[,size=<bytes>][,latency-ns=<ns>]
             [,read-zeroes=on|off][,discard=ignore|unmap][,read-only=on|off]
             [,cache.direct=on|off][,cache.no-flush=on|off]
                         a node without storage: writes are dropped; reads
                         return zeroes with read-zeroes=on, undefined data
                         otherwise (the default); size defaults to 1 GiB
  --blockdev [driver=]nbd,node-name=<N>,server.type=unix,server.path=<path>
             |server.type=inet,server.host=<host>,server.port=<port>
             [,export=<name>][,open-timeout=<seconds>][,read-only=on|off]
                         an export on an NBD server (qemu-nbd, QSD, ringblk):
                         a mirror target for live storage migration

  --chardev socket,id=<id>,path=<socket-path>,server=on,wait=off
                         a UNIX socket listening for QMP clients, for --monitor

  --export [type=]vhost-user-blk,id=<id>,node-name=<node-name>,
           addr.type=unix,addr.path=<socket-path>[,writable=on|off]
           [,logical-block-size=<block-size>][,num-queues=<num-queues>]
           [,iothread=<iothread-id>|iothread.0=<id>,iothread.1=<id>...]
                         export the specified block node as a vhost-user-blk
                         device over a UNIX domain socket. writable defaults to
                         off; logical-block-size is a power of 2 from 512 to 2M
                         (default 512); num-queues defaults to 1. Queue i is
                         served by the i-th iothread listed, round robin (a list
                         is ringblk's extension; QSD 10.0 takes one iothread)

  --export [type=]nbd,id=<id>,node-name=<node-name>[,name=<export-name>]
           [,description=<text>][,writable=on|off][,iothread=<id>]
                         export the node on the --nbd-server (name defaults to
                         the node name)

  --nbd-server addr.type=unix,addr.path=<path>[,max-connections=<n>]
  --nbd-server addr.type=inet,addr.host=<host>,addr.port=<port>[,max-...]
                         the NBD server that serves the nbd exports

  --monitor [chardev=]<id>[,mode=control][,pretty=on|off]
                         configure a QMP monitor. QSD serves one client at a
                         time per monitor (a second waits, unanswered, until
                         the first disconnects); ringblk serves several at
                         once, each with its own negotiation, all getting the
                         events (ringblk's extension)

  --object help          list object types that can be added
  --object <type>,help   list properties for the given object type
  --object [qom-type=]iothread,id=<id>[,poll-max-ns=<ns>][,poll-grow=<n>]
           [,poll-shrink=<n>][,aio-max-batch=<n>][,thread-pool-min=<n>]
           [,thread-pool-max=<n>]
                         an I/O thread with its own io_uring, for --export
                         iothread=; its tuning properties are checked and
                         recorded as QEMU does, not used

  --pidfile <path>       write process ID to a file after startup

Options are processed in order: a node, iothread or chardev must come before
the --export or --monitor that uses it. --blockdev, --export, --object and
--monitor also take a JSON object: --blockdev '{\"driver\":\"null-co\",...}'.
Booleans are on|off (also yes|no, true|false, y|n); numbers are C integers;
sizes take k, M, G... suffixes.

Refused with an error, although qemu-storage-daemon has them:
  --daemonize, -T/--trace; block drivers other than file, null-co and nbd;
  export types other than vhost-user-blk and nbd; object types other than
  iothread; chardev backends other than socket, and server=off or wait=on;
  auto-read-only=on, detect-zeroes=on|unmap, active=off, pr-manager,
  locking=on; export writethrough=on, fixed-iothread=on, allow-inactive=on,
  addr.type=fd|inet|vsock, addr.abstract=on; monitor mode=readline.
";

/// What `--version` prints.
pub fn version_text() -> String {
    format!(
        "ringblk {}\ncompatible with qemu-storage-daemon {QSD_VERSION} (the options in --help)\n",
        env!("CARGO_PKG_VERSION")
    )
}

/// One option of the command line that defines something, in command-line order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CliItem {
    /// `--blockdev`.
    Blockdev(BlockdevOptions),
    /// `--chardev`.
    Chardev(ChardevOptions),
    /// `--export`.
    Export(ExportOptions),
    /// `--monitor`.
    Monitor(MonitorOptions),
    /// `--nbd-server`.
    NbdServer(NbdServerOptions),
    /// `--object`.
    Object(ObjectOptions),
}

/// What the daemon is asked to run.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Config {
    /// The defining options, in command-line order, each with the text it was given as
    /// (`--blockdev ARG`, for error messages); references between them are resolved.
    pub items: Vec<(CliItem, String)>,
    /// `--pidfile` (the last one given).
    pub pidfile: Option<PathBuf>,
}

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invocation {
    /// Run the daemon.
    Run(Config),
    /// Print this to stdout and exit successfully (`--help`, `--version`, `--object help`).
    Print(String),
    /// `ringblk demo ...`: the demo mode, with the arguments after `demo`, unparsed.
    Demo(Vec<OsString>),
}

/// A command line that cannot be run. Displayed as one line, without the program name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CliError {
    /// An argument that is not an option ringblk knows, or lacks its value.
    #[error("{0}")]
    Usage(String),
    /// A qemu-storage-daemon option ringblk does not implement.
    #[error("{0} is not supported by ringblk")]
    Unsupported(&'static str),
    /// A defining option whose argument is wrong.
    #[error("{option} {arg}: {error}")]
    Item {
        /// The option, as `--blockdev`.
        option: &'static str,
        /// Its argument, as given.
        arg: String,
        /// What is wrong with it.
        error: ItemError,
    },
}

/// What is wrong with one option's argument.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ItemError {
    /// A reference to something not defined before, or an id defined twice.
    #[error("{0}")]
    Conflict(String),
    /// `help` given to an option that has none.
    #[error("Help is not available for this option")]
    NoHelp,
    /// The argument's members are wrong.
    #[error(transparent)]
    Options(#[from] OptionsError),
    /// The argument is not well-formed keyval or JSON.
    #[error(transparent)]
    Syntax(#[from] KeyvalError),
}

/// The options that define items.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ItemOption {
    Blockdev,
    Chardev,
    Export,
    Monitor,
    NbdServer,
    Object,
}

impl ItemOption {
    const ALL: [ItemOption; 6] = [
        ItemOption::Blockdev,
        ItemOption::Chardev,
        ItemOption::Export,
        ItemOption::Monitor,
        ItemOption::NbdServer,
        ItemOption::Object,
    ];

    fn name(self) -> &'static str {
        match self {
            ItemOption::Blockdev => "blockdev",
            ItemOption::Chardev => "chardev",
            ItemOption::Export => "export",
            ItemOption::Monitor => "monitor",
            ItemOption::NbdServer => "nbd-server",
            ItemOption::Object => "object",
        }
    }

    fn flag(self) -> &'static str {
        match self {
            ItemOption::Blockdev => "--blockdev",
            ItemOption::Chardev => "--chardev",
            ItemOption::Export => "--export",
            ItemOption::Monitor => "--monitor",
            ItemOption::NbdServer => "--nbd-server",
            ItemOption::Object => "--object",
        }
    }

    /// The key a first value without `=` stands for (QSD's implied keys).
    fn implied_key(self) -> Option<&'static str> {
        match self {
            ItemOption::Blockdev => Some("driver"),
            ItemOption::Chardev => Some("backend"),
            ItemOption::Export => Some("type"),
            ItemOption::Monitor => Some("chardev"),
            ItemOption::NbdServer => None,
            ItemOption::Object => Some("qom-type"),
        }
    }
}

/// Options QSD has that ringblk refuses; each entry is (clap id, as written).
const REFUSED: [(&str, &str); 2] = [("daemonize", "--daemonize"), ("trace", "-T/--trace")];

fn command() -> Command {
    let flag = |id: &'static str| Arg::new(id).long(id).action(ArgAction::SetTrue);
    let repeated = |id: &'static str| {
        Arg::new(id)
            .long(id)
            .action(ArgAction::Append)
            .num_args(1)
            .allow_hyphen_values(true)
    };
    let mut command = Command::new("ringblk")
        .disable_help_flag(true)
        .disable_version_flag(true)
        .disable_help_subcommand(true)
        .infer_long_args(true)
        .args_conflicts_with_subcommands(true)
        .arg(flag("help").short('h'))
        .arg(flag("version").short('V'))
        .arg(
            Arg::new("pidfile")
                .long("pidfile")
                .num_args(1)
                .allow_hyphen_values(true)
                .overrides_with("pidfile")
                .value_parser(clap::value_parser!(PathBuf)),
        )
        .arg(flag("daemonize"))
        .arg(repeated("trace").short('T'))
        .subcommand(
            Command::new("demo").disable_help_flag(true).arg(
                Arg::new("args")
                    .num_args(0..)
                    .trailing_var_arg(true)
                    .allow_hyphen_values(true)
                    .action(ArgAction::Append)
                    .value_parser(clap::value_parser!(OsString)),
            ),
        );
    for option in ItemOption::ALL {
        command = command.arg(repeated(option.name()));
    }
    command
}

/// Parses the process arguments, program name first (as `std::env::args_os()` gives them).
pub fn parse<I, T>(args: I) -> Result<Invocation, CliError>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let matches = command().try_get_matches_from(args).map_err(usage_error)?;
    if let Some(("demo", demo)) = matches.subcommand() {
        let args = demo
            .get_many::<OsString>("args")
            .into_iter()
            .flatten()
            .cloned()
            .collect();
        return Ok(Invocation::Demo(args));
    }
    // As in QSD, --help and --version win over everything else; the first one given counts.
    let first_index = |id: &str| matches.get_flag(id).then(|| matches.index_of(id)).flatten();
    match (first_index("help"), first_index("version")) {
        (Some(help), Some(version)) if version < help => {
            return Ok(Invocation::Print(version_text()));
        }
        (Some(_), _) => return Ok(Invocation::Print(HELP.to_owned())),
        (None, Some(_)) => return Ok(Invocation::Print(version_text())),
        (None, None) => {}
    }
    for (id, written) in REFUSED {
        if matches.value_source(id) == Some(clap::parser::ValueSource::CommandLine) {
            return Err(CliError::Unsupported(written));
        }
    }
    let mut registry = Registry::default();
    let mut items = Vec::new();
    for (option, arg) in ordered_items(&matches) {
        let item_error = |error: ItemError| CliError::Item {
            option: option.flag(),
            arg: arg.clone(),
            error,
        };
        match parse_item(option, &arg).map_err(item_error)? {
            Parsed::Item(item) => {
                registry
                    .add(&item)
                    .map_err(|e| item_error(ItemError::Conflict(e)))?;
                items.push((item, format!("{} {arg}", option.flag())));
            }
            Parsed::Print(text) => return Ok(Invocation::Print(text)),
        }
    }
    Ok(Invocation::Run(Config {
        items,
        pidfile: matches.get_one::<PathBuf>("pidfile").cloned(),
    }))
}

/// The defining options with their arguments, in command-line order.
fn ordered_items(matches: &ArgMatches) -> Vec<(ItemOption, String)> {
    let mut items: Vec<(usize, ItemOption, String)> = Vec::new();
    for option in ItemOption::ALL {
        let (Some(indices), Some(values)) = (
            matches.indices_of(option.name()),
            matches.get_many::<String>(option.name()),
        ) else {
            continue;
        };
        items.extend(
            indices
                .zip(values)
                .map(|(index, value)| (index, option, value.clone())),
        );
    }
    items.sort_by_key(|(index, _, _)| *index);
    items
        .into_iter()
        .map(|(_, option, value)| (option, value))
        .collect()
}

/// The result of one option: a definition, or text to print instead of running.
enum Parsed {
    Item(CliItem),
    Print(String),
}

fn parse_item(option: ItemOption, arg: &str) -> Result<Parsed, ItemError> {
    if option == ItemOption::Chardev {
        let opts = keyval::parse_qemu_opts(arg, "backend");
        if opts.help {
            let socket = opts
                .opts
                .iter()
                .any(|opt| *opt == QemuOpt::Pair("backend".into(), "socket".into()));
            let text = if socket {
                CHARDEV_SOCKET_HELP
            } else {
                CHARDEV_HELP
            };
            return Ok(Parsed::Print(text.to_owned()));
        }
        return Ok(Parsed::Item(CliItem::Chardev(
            ChardevOptions::from_qemu_opts(&opts.opts)?,
        )));
    }
    let (value, form) = if arg.starts_with('{') {
        (Value::Object(keyval::parse_json(arg)?), Form::Json)
    } else {
        let parsed = keyval::parse(arg, option.implied_key())?;
        if parsed.help {
            if option != ItemOption::Object {
                return Err(ItemError::NoHelp);
            }
            let iothread = parsed.value.get("qom-type") == Some(&Value::from("iothread"));
            let text = if iothread { IOTHREAD_HELP } else { OBJECT_HELP };
            return Ok(Parsed::Print(text.to_owned()));
        }
        (Value::Object(parsed.value), Form::Keyval)
    };
    let item = match option {
        ItemOption::Blockdev => CliItem::Blockdev(BlockdevOptions::from_value(&value, form)?),
        ItemOption::Export => CliItem::Export(ExportOptions::from_value(&value, form)?),
        ItemOption::Monitor => CliItem::Monitor(MonitorOptions::from_value(&value, form)?),
        ItemOption::Object => CliItem::Object(ObjectOptions::from_value(&value, form)?),
        ItemOption::NbdServer => {
            CliItem::NbdServer(NbdServerOptions::from_value(&value, form, false)?)
        }
        ItemOption::Chardev => unreachable!("handled above"),
    };
    Ok(Parsed::Item(item))
}

/// What the options so far have defined, to check each new one against.
#[derive(Default)]
struct Registry {
    /// Node name → read-only.
    nodes: HashMap<String, bool>,
    exports: HashSet<String>,
    iothreads: HashSet<String>,
    chardevs: HashSet<String>,
    /// Chardevs a monitor already uses.
    monitored: HashSet<String>,
    nbd_server: bool,
}

impl Registry {
    /// Checks `item` against what came before it (QSD's wording where it has one), then
    /// records it.
    fn add(&mut self, item: &CliItem) -> Result<(), String> {
        match item {
            CliItem::Blockdev(blockdev) => {
                if self.nodes.contains_key(&blockdev.node_name) {
                    return Err(format!(
                        "Duplicate nodes with node-name='{}'",
                        blockdev.node_name
                    ));
                }
                self.nodes
                    .insert(blockdev.node_name.clone(), blockdev.read_only);
            }
            CliItem::Export(export) => {
                if self.exports.contains(&export.id) {
                    return Err(format!("Block export id '{}' is already in use", export.id));
                }
                let Some(&read_only) = self.nodes.get(&export.node_name) else {
                    return Err(format!(
                        "Cannot find node-name='{}' (a --blockdev must define it before the --export)",
                        export.node_name
                    ));
                };
                let unknown_iothread = export
                    .iothread
                    .iter()
                    .find(|iothread| !self.iothreads.contains(*iothread));
                if let Some(iothread) = unknown_iothread {
                    return Err(format!("iothread \"{iothread}\" not found"));
                }
                if export.writable && read_only {
                    return Err("Cannot export read-only node as writable".to_owned());
                }
                if matches!(export.kind, ExportKind::Nbd(_)) && !self.nbd_server {
                    return Err("NBD server not running".to_owned());
                }
                self.exports.insert(export.id.clone());
            }
            CliItem::NbdServer(_) => {
                if std::mem::replace(&mut self.nbd_server, true) {
                    return Err("NBD server already running".to_owned());
                }
            }
            CliItem::Object(object) => {
                if !self.iothreads.insert(object.id.clone()) {
                    return Err(format!("Object id '{}' is already in use", object.id));
                }
            }
            CliItem::Chardev(chardev) => {
                if !self.chardevs.insert(chardev.id.clone()) {
                    return Err(format!("Chardev '{}' already exists", chardev.id));
                }
            }
            CliItem::Monitor(monitor) => {
                if !self.chardevs.contains(&monitor.chardev) {
                    return Err(format!("chardev \"{}\" not found", monitor.chardev));
                }
                if !self.monitored.insert(monitor.chardev.clone()) {
                    return Err(format!("chardev '{}' is already in use", monitor.chardev));
                }
            }
        }
        Ok(())
    }
}

/// clap's error as one line in getopt's wording where QSD prints that.
fn usage_error(error: clap::Error) -> CliError {
    let context = |kind| match error.get(kind) {
        Some(ContextValue::String(s)) => Some(s.clone()),
        _ => None,
    };
    let invalid_arg = context(ContextKind::InvalidArg);
    let message = match (error.kind(), invalid_arg) {
        (ClapErrorKind::UnknownArgument, Some(arg)) if arg.starts_with("--") => {
            format!("unrecognized option '{arg}'")
        }
        (ClapErrorKind::UnknownArgument, Some(arg)) if arg.starts_with('-') && arg.len() > 1 => {
            format!("invalid option -- '{}'", &arg[1..])
        }
        (ClapErrorKind::UnknownArgument, Some(arg)) => format!("{arg}: Unexpected argument"),
        (ClapErrorKind::InvalidValue, Some(arg)) => {
            format!("option '{}' requires an argument", option_name(&arg))
        }
        (ClapErrorKind::TooManyValues, Some(arg)) => {
            format!("option '{}' doesn't allow an argument", option_name(&arg))
        }
        // A word that is not an option: clap reads it as a subcommand.
        (ClapErrorKind::InvalidSubcommand | ClapErrorKind::ArgumentConflict, _) => {
            match context(ContextKind::InvalidSubcommand) {
                Some(arg) => format!("{arg}: Unexpected argument"),
                None => first_line(&error),
            }
        }
        _ => first_line(&error),
    };
    CliError::Usage(message)
}

/// `--blockdev <blockdev>` → `--blockdev`.
fn option_name(arg: &str) -> &str {
    arg.split([' ', '=']).next().unwrap_or(arg)
}

/// clap's own message, first line, without its "error: " prefix.
fn first_line(error: &clap::Error) -> String {
    let rendered = error.render().to_string();
    let line = rendered.lines().next().unwrap_or_default();
    line.strip_prefix("error: ").unwrap_or(line).to_owned()
}

#[cfg(test)]
mod tests {
    //! Expectations marked "QSD:" were checked by running qemu-storage-daemon 10.0.2 with the
    //! same arguments.
    use super::*;
    use crate::options::{BlockdevDriver, ObjectProperties};

    fn run(args: &[&str]) -> Result<Invocation, String> {
        parse(std::iter::once("ringblk").chain(args.iter().copied())).map_err(|e| e.to_string())
    }

    fn items(args: &[&str]) -> Vec<CliItem> {
        match run(args).unwrap() {
            Invocation::Run(config) => config.items.into_iter().map(|(item, _)| item).collect(),
            other => panic!("{other:?}"),
        }
    }

    fn error(args: &[&str]) -> String {
        run(args).unwrap_err()
    }

    const NODE: &str = "null-co,node-name=n";
    const EXPORT: &str = "vhost-user-blk,id=e,node-name=n,addr.type=unix,addr.path=/tmp/s";
    const CHARDEV: &str = "socket,id=m,path=/tmp/m,server=on,wait=off";

    #[test]
    fn items_keep_command_line_order() {
        let items = items(&[
            "--object",
            "iothread,id=io0",
            "--blockdev",
            NODE,
            "--chardev",
            CHARDEV,
            "--export",
            &format!("{EXPORT},iothread=io0"),
            "--monitor",
            "m",
        ]);
        let kinds: Vec<&str> = items
            .iter()
            .map(|item| match item {
                CliItem::Object(_) => "object",
                CliItem::Blockdev(_) => "blockdev",
                CliItem::Chardev(_) => "chardev",
                CliItem::Export(_) => "export",
                CliItem::Monitor(_) => "monitor",
                CliItem::NbdServer(_) => "nbd-server",
            })
            .collect();
        assert_eq!(
            kinds,
            ["object", "blockdev", "chardev", "export", "monitor"]
        );
    }

    #[test]
    fn equals_form_and_abbreviations_are_accepted() {
        // QSD: `--blockdev=driver=null-co,node-name=a` and `--block null-co,...` start.
        let expected = items(&["--blockdev", NODE]);
        assert_eq!(items(&[&format!("--blockdev={NODE}")]), expected);
        assert_eq!(items(&["--block", NODE]), expected);
        assert_eq!(items(&["--blockdev", &format!("driver={NODE}")]), expected);
    }

    #[test]
    fn json_form_is_accepted_for_keyval_options() {
        // QSD: JSON works for --blockdev, --export, --object and --monitor.
        let items = items(&[
            "--blockdev",
            r#"{"driver":"null-co","node-name":"n","size":4096}"#,
            "--object",
            r#"{"qom-type":"iothread","id":"io0"}"#,
            "--export",
            r#"{"type":"vhost-user-blk","id":"e","node-name":"n","addr":{"type":"unix","path":"/s"}}"#,
            "--chardev",
            CHARDEV,
            "--monitor",
            r#"{"chardev":"m"}"#,
        ]);
        assert_eq!(items.len(), 5);
        let CliItem::Blockdev(blockdev) = &items[0] else {
            panic!()
        };
        assert!(matches!(&blockdev.driver, BlockdevDriver::NullCo(null) if null.size == 4096));
        let CliItem::Object(object) = &items[1] else {
            panic!()
        };
        assert!(matches!(object.properties, ObjectProperties::Iothread(_)));
    }

    #[test]
    fn chardev_does_not_take_json() {
        // QSD: `--chardev {"backend":"socket","id":"m"}` → "Invalid parameter '"id":"m"}'".
        assert_eq!(
            error(&["--chardev", r#"{"backend":"socket","id":"m"}"#]),
            r#"--chardev {"backend":"socket","id":"m"}: Invalid parameter '"id":"m"}'"#
        );
    }

    #[test]
    fn errors_are_one_line_naming_the_option_and_argument() {
        // QSD: "--blockdev driver=foo,node-name=a: Parameter 'driver' does not accept value 'foo'".
        let message = error(&["--blockdev", "driver=foo,node-name=a"]);
        assert_eq!(
            message,
            "--blockdev driver=foo,node-name=a: Parameter 'driver' does not accept value 'foo'"
        );
        assert!(!message.contains('\n'));
        assert_eq!(
            error(&[&format!("--blockdev={NODE},foo=1")]),
            format!("--blockdev {NODE},foo=1: Parameter 'foo' is unexpected")
        );
    }

    #[test]
    fn keyval_syntax_errors_name_the_argument() {
        // QSD: the messages below.
        assert_eq!(
            error(&["--blockdev", "null-co,node-name=a,read-only"]),
            "--blockdev null-co,node-name=a,read-only: Expected '=' after parameter 'read-only'"
        );
        assert_eq!(
            error(&["--blockdev", r#"{"driver":"null-co""#]),
            r#"--blockdev {"driver":"null-co": JSON parse error, premature EOI"#
        );
        assert_eq!(
            error(&[
                "--export",
                "vhost-user-blk,id=e,node-name=n,addr.type=unix,addr=1"
            ]),
            "--export vhost-user-blk,id=e,node-name=n,addr.type=unix,addr=1: Parameters 'addr.*' used inconsistently"
        );
        // QSD: a leading space makes it keyval, whose implied value then runs to the comma.
        assert_eq!(
            error(&["--blockdev", r#" {"driver":"null-co","node-name":"a"}"#]),
            r#"--blockdev  {"driver":"null-co","node-name":"a"}: Invalid parameter '"node-name":"a"}'"#
        );
    }

    #[test]
    fn unknown_options_and_arguments() {
        // QSD: getopt's messages, and "foo: Unexpected argument".
        assert_eq!(error(&["--foo"]), "unrecognized option '--foo'");
        assert_eq!(error(&["-x"]), "invalid option -- 'x'");
        assert_eq!(error(&["foo"]), "foo: Unexpected argument");
        assert_eq!(
            error(&["--blockdev", NODE, "extra"]),
            "extra: Unexpected argument"
        );
        assert_eq!(
            error(&["--blockdev"]),
            "option '--blockdev' requires an argument"
        );
        assert_eq!(
            error(&["--pidfile"]),
            "option '--pidfile' requires an argument"
        );
        assert_eq!(
            error(&["--help=x"]),
            "option '--help' doesn't allow an argument"
        );
    }

    #[test]
    fn refused_qsd_options_say_so() {
        assert_eq!(
            error(&["--daemonize"]),
            "--daemonize is not supported by ringblk"
        );
        assert_eq!(
            error(&["-T", "foo"]),
            "-T/--trace is not supported by ringblk"
        );
    }

    #[test]
    fn help_and_version_win_and_the_first_counts() {
        // QSD: `--blockdev foo -h` prints help; `-V -h` prints the version.
        assert_eq!(
            run(&["--blockdev", "foo", "-h"]).unwrap(),
            Invocation::Print(HELP.to_owned())
        );
        assert_eq!(
            run(&["--help"]).unwrap(),
            Invocation::Print(HELP.to_owned())
        );
        assert_eq!(
            run(&["-V", "-h"]).unwrap(),
            Invocation::Print(version_text())
        );
        assert_eq!(
            run(&["-h", "-V"]).unwrap(),
            Invocation::Print(HELP.to_owned())
        );
        assert_eq!(
            run(&["--version"]).unwrap(),
            Invocation::Print(version_text())
        );
        assert!(version_text().starts_with(&format!("ringblk {}\n", env!("CARGO_PKG_VERSION"))));
        assert!(version_text().contains("qemu-storage-daemon 10.0.2"));
    }

    #[test]
    fn object_and_chardev_help_print_and_others_refuse() {
        // QSD: `--object help` lists types, `--object iothread,help` its properties (also with
        // `?` and other members), and --blockdev/--export/--monitor have no help.
        assert_eq!(
            run(&["--object", "help"]).unwrap(),
            Invocation::Print(OBJECT_HELP.to_owned())
        );
        assert_eq!(
            run(&["--object", "foo,help"]).unwrap(),
            Invocation::Print(OBJECT_HELP.to_owned())
        );
        assert_eq!(
            run(&["--object", "iothread,id=x,?"]).unwrap(),
            Invocation::Print(IOTHREAD_HELP.to_owned())
        );
        assert_eq!(
            run(&["--chardev", "help"]).unwrap(),
            Invocation::Print(CHARDEV_HELP.to_owned())
        );
        assert_eq!(
            run(&["--chardev", "socket,help"]).unwrap(),
            Invocation::Print(CHARDEV_SOCKET_HELP.to_owned())
        );
        for option in ["--blockdev", "--export", "--monitor"] {
            assert_eq!(
                error(&[option, "help"]),
                format!("{option} help: Help is not available for this option")
            );
        }
        assert_eq!(
            error(&["--blockdev", "null-co,node-name=a,?"]),
            "--blockdev null-co,node-name=a,?: Help is not available for this option"
        );
    }

    #[test]
    fn duplicate_ids_are_refused() {
        // QSD: the node and export messages; the object and chardev messages are ringblk's.
        assert_eq!(
            error(&[
                "--blockdev",
                "null-co,node-name=a",
                "--blockdev",
                "null-co,node-name=a,size=512"
            ]),
            "--blockdev null-co,node-name=a,size=512: Duplicate nodes with node-name='a'"
        );
        assert_eq!(
            error(&[
                "--blockdev",
                NODE,
                "--export",
                EXPORT,
                "--export",
                &EXPORT.replace("/tmp/s", "/tmp/t")
            ]),
            "--export vhost-user-blk,id=e,node-name=n,addr.type=unix,addr.path=/tmp/t: Block export id 'e' is already in use"
        );
        assert_eq!(
            error(&["--object", "iothread,id=io0", "--object", "iothread,id=io0"]),
            "--object iothread,id=io0: Object id 'io0' is already in use"
        );
        assert_eq!(
            error(&[
                "--chardev",
                CHARDEV,
                "--chardev",
                "socket,id=m,path=/tmp/n,server=on,wait=off"
            ]),
            "--chardev socket,id=m,path=/tmp/n,server=on,wait=off: Chardev 'm' already exists"
        );
        // Two exports of one node are fine (QSD starts).
        assert_eq!(
            items(&[
                "--blockdev",
                NODE,
                "--export",
                EXPORT,
                "--export",
                &EXPORT.replace("id=e", "id=f")
            ])
            .len(),
            3
        );
    }

    #[test]
    fn references_must_point_backwards() {
        // QSD: an export before its node fails ("Cannot find device='' nor node-name='n'"),
        // an iothread after its export fails, a monitor before its chardev fails.
        assert_eq!(
            error(&["--export", EXPORT, "--blockdev", NODE]),
            format!(
                "--export {EXPORT}: Cannot find node-name='n' (a --blockdev must define it before the --export)"
            )
        );
        assert_eq!(
            error(&[
                "--blockdev",
                NODE,
                "--export",
                &format!("{EXPORT},iothread=io0"),
                "--object",
                "iothread,id=io0"
            ]),
            format!("--export {EXPORT},iothread=io0: iothread \"io0\" not found")
        );
        assert_eq!(
            error(&["--monitor", "m", "--chardev", CHARDEV]),
            "--monitor m: chardev \"m\" not found"
        );
        assert_eq!(
            error(&[
                "--chardev",
                CHARDEV,
                "--monitor",
                "m",
                "--monitor",
                "chardev=m"
            ]),
            "--monitor chardev=m: chardev 'm' is already in use"
        );
    }

    #[test]
    fn writable_export_of_read_only_node_is_refused() {
        // QSD: "Cannot export read-only node as writable".
        assert_eq!(
            error(&[
                "--blockdev",
                "null-co,node-name=n,read-only=on",
                "--export",
                &format!("{EXPORT},writable=on")
            ]),
            format!("--export {EXPORT},writable=on: Cannot export read-only node as writable")
        );
        assert_eq!(
            items(&[
                "--blockdev",
                "null-co,node-name=n,read-only=on",
                "--export",
                EXPORT
            ])
            .len(),
            2
        );
    }

    #[test]
    fn pidfile_last_one_wins() {
        // QSD: with two --pidfile options only the second file is written.
        let Invocation::Run(config) = run(&["--pidfile", "/tmp/a", "--pidfile=/tmp/b"]).unwrap()
        else {
            panic!()
        };
        assert_eq!(config.pidfile, Some(PathBuf::from("/tmp/b")));
        assert!(config.items.is_empty());
    }

    #[test]
    fn option_values_may_start_with_a_dash() {
        // getopt takes the next argument whatever it is.
        let Invocation::Run(config) = run(&["--pidfile", "-p"]).unwrap() else {
            panic!()
        };
        assert_eq!(config.pidfile, Some(PathBuf::from("-p")));
        assert_eq!(
            error(&["--blockdev", "-h"]),
            "--blockdev -h: Parameter 'driver' does not accept value '-h'"
        );
    }

    #[test]
    fn demo_is_recognised_first_with_its_arguments_kept() {
        assert_eq!(
            run(&["demo", "--seconds", "5", "x"]).unwrap(),
            Invocation::Demo(vec!["--seconds".into(), "5".into(), "x".into()])
        );
        assert_eq!(run(&["demo"]).unwrap(), Invocation::Demo(vec![]));
        assert!(run(&["--blockdev", NODE, "demo"]).is_err());
    }

    #[test]
    fn help_text_lists_every_supported_option() {
        for option in [
            "--blockdev",
            "--chardev",
            "--export",
            "--monitor",
            "--nbd-server",
            "--object",
            "--pidfile",
            "--help",
            "--version",
        ] {
            assert!(HELP.contains(option), "{option}");
        }
        assert!(HELP.lines().all(|line| line.len() <= 80));
    }

    /// Runs qemu-storage-daemon with `args`; returns its one-line error, `None` if it is not
    /// installed. Panics if it starts instead of failing.
    fn qsd_error(args: &[&str]) -> Option<String> {
        use std::io::Read;
        use std::process::{Command, Stdio};
        use std::time::{Duration, Instant};
        let mut child = Command::new("qemu-storage-daemon")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .ok()?;
        let deadline = Instant::now() + Duration::from_secs(5);
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                child.kill().unwrap();
                child.wait().unwrap();
                panic!("qemu-storage-daemon started with {args:?}");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut stderr = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut stderr)
            .unwrap();
        let line = stderr.lines().next().unwrap_or_default();
        Some(
            line.strip_prefix("qemu-storage-daemon: ")
                .unwrap_or(line)
                .to_owned(),
        )
    }

    /// Every command line here fails in qemu-storage-daemon and in ringblk with the same
    /// message. Skipped when qemu-storage-daemon is not installed.
    #[test]
    fn qsd_fails_with_the_same_messages() {
        // Sockets QSD binds before it meets the failing option.
        let dir = tempfile::tempdir().unwrap();
        let dir = dir.path().to_str().unwrap();
        let export =
            format!("vhost-user-blk,id=e,node-name=n,addr.type=unix,addr.path={dir}/vhost.sock");
        let chardev = format!("socket,id=m,path={dir}/qmp.sock,server=on,wait=off");
        let chardev = chardev.as_str();
        let long_name = format!("null-co,node-name={}", "a".repeat(32));
        // QSD opens the image before it checks the file driver's option combinations.
        let image = tempfile::NamedTempFile::new().unwrap();
        let image = image.path().to_str().unwrap();
        let aio_native = format!("file,node-name=f,filename={image},aio=native");
        let force_share = format!("file,node-name=f,filename={image},force-share=on");
        let cases: Vec<Vec<&str>> = vec![
            vec!["--foo"],
            vec!["-x"],
            vec!["foo"],
            vec!["--blockdev"],
            vec!["--help=x"],
            vec!["--blockdev", "help"],
            vec!["--blockdev", "driver=foo,node-name=a"],
            vec!["--blockdev", "null-co,node-name=a,foo=1"],
            vec!["--blockdev", "null-co,node-name=a,read-only=1"],
            vec!["--blockdev", "null-co,node-name=a,read-only"],
            vec!["--blockdev", "null-co,node-name=a,size=1G"],
            vec!["--blockdev", "null-co,node-name=a,size=0x"],
            vec!["--blockdev", "null-co,node-name=a,latency-ns=-1"],
            vec!["--blockdev", "null-co"],
            vec!["--blockdev", "node-name=a"],
            vec!["--blockdev", "null-co,node-name=9a"],
            vec!["--blockdev", &long_name],
            vec![
                "--blockdev",
                "null-co,node-name=a",
                "--blockdev",
                "null-co,node-name=a",
            ],
            vec!["--blockdev", "null-co,node-name=a,cache.direct.x=on"],
            vec!["--blockdev", "null-co,node-name=a,cache=1"],
            vec!["--blockdev", "null-co,node-name=a,cache.foo=on"],
            vec!["--blockdev", "null-co,node-name=a,x.1=a"],
            vec!["--blockdev", "null-co,node-name=a,9x=1"],
            vec!["--blockdev", "null-co,,node-name=a"],
            vec![
                "--blockdev",
                r#"{"driver":"null-co","node-name":"a","size":"1G"}"#,
            ],
            vec![
                "--blockdev",
                r#"{"driver":"null-co","node-name":"a","node-name":"b"}"#,
            ],
            vec!["--blockdev", r#"{"driver":"null-co""#],
            vec!["--blockdev", r#"{"driver":"null-co"} x"#],
            vec!["--blockdev", &aio_native],
            vec!["--blockdev", "file,node-name=f"],
            vec!["--blockdev", "file,node-name=f,filename="],
            vec!["--blockdev", &force_share],
            vec![
                "--blockdev",
                "null-co,node-name=n",
                "--export",
                "vhost-user-blk,id=e,node-name=n",
            ],
            vec![
                "--blockdev",
                "null-co,node-name=n",
                "--export",
                "vhost-user-blk,id=e,node-name=n,addr.path=/s",
            ],
            vec![
                "--blockdev",
                "null-co,node-name=n",
                "--export",
                &export,
                "--export",
                &export,
            ],
            vec![
                "--blockdev",
                "null-co,node-name=n",
                "--export",
                "foo,id=e,node-name=n",
            ],
            vec![
                "--blockdev",
                "null-co,node-name=n,read-only=on",
                "--export",
                "vhost-user-blk,id=e,node-name=n,writable=on,addr.type=unix,addr.path=/s",
            ],
            vec![
                "--blockdev",
                "null-co,node-name=n",
                "--export",
                "vhost-user-blk,id=e,node-name=n,num-queues=0,addr.type=unix,addr.path=/s",
            ],
            vec![
                "--blockdev",
                "null-co,node-name=n",
                "--export",
                "vhost-user-blk,id=e,node-name=n,num-queues=65536,addr.type=unix,addr.path=/s",
            ],
            vec![
                "--blockdev",
                "null-co,node-name=n",
                "--export",
                "vhost-user-blk,id=e,node-name=n,logical-block-size=256,addr.type=unix,addr.path=/s",
            ],
            vec![
                "--blockdev",
                "null-co,node-name=n",
                "--export",
                "vhost-user-blk,id=e,node-name=n,logical-block-size=4kB,addr.type=unix,addr.path=/s",
            ],
            vec![
                "--blockdev",
                "null-co,node-name=n",
                "--export",
                "vhost-user-blk,id=e,node-name=n,iothread=io0,addr.type=unix,addr.path=/s",
            ],
            // Not `iothread.0=io0`: QSD 10.0 refuses a list of iothreads, ringblk takes one (its
            // extension for spreading queues), so there the messages differ on purpose.
            vec![
                "--blockdev",
                "null-co,node-name=n",
                "--export",
                "vhost-user-blk,id=9e,node-name=n,addr.type=unix,addr.path=/s",
            ],
            vec!["--export", "help"],
            vec!["--object", "iothread"],
            vec!["--object", "foo,id=x"],
            vec!["--object", "iothread,id=x,poll-max-ns=-1"],
            vec!["--object", "iothread,id=x,poll-max-ns=1k"],
            vec![
                "--object",
                "iothread,id=x,thread-pool-min=5,thread-pool-max=2",
            ],
            vec!["--monitor", "chardev=m"],
            vec!["--monitor", "mode=control"],
            vec!["--chardev", chardev, "--monitor", "chardev=m,mode=readline"],
            vec!["--chardev", chardev, "--monitor", "chardev=m,mode=foo"],
            vec!["--chardev", chardev, "--monitor", "m", "--monitor", "m"],
            vec!["--chardev", "socket,id=m,path=/s,server=on,wait=off,foo=1"],
            vec!["--chardev", "socket,path=/s,server=on,wait=off"],
            vec!["--chardev", "id=m,path=/s,server=on,wait=off"],
            vec!["--chardev", "foo,id=m"],
            vec!["--chardev", "socket,id=m,path=/s,server=on,wait=1"],
        ];
        for args in cases {
            let Some(expected) = qsd_error(&args) else {
                eprintln!("qemu-storage-daemon is not installed: skipped");
                return;
            };
            assert_eq!(error(&args), expected, "{args:?}");
        }
    }

    /// Every command line here starts qemu-storage-daemon (it is still running after a second)
    /// and parses in ringblk. Skipped when qemu-storage-daemon is not installed.
    #[test]
    fn qsd_starts_with_what_ringblk_accepts() {
        use std::io::Read;
        use std::process::{Command, Stdio};
        use std::time::Duration;
        let dir = tempfile::tempdir().unwrap();
        let dir = dir.path().to_str().unwrap();
        let image = tempfile::NamedTempFile::new().unwrap();
        let image = image.path().to_str().unwrap();
        let cases: Vec<Vec<String>> = [
            vec!["--blockdev", "null-co,node-name=n,read-only=y,size=01000,latency-ns=0x10"],
            vec!["--blockdev", "driver=null-co,node-name=n,size= +4096,read-zeroes=yes"],
            vec!["--block", "null-co,node-name=a.b,cache.direct=on,cache.no-flush=on"],
            vec!["--blockdev=null-co,node-name=n,discard=unmap,read-only=on,force-share=on"],
            vec!["--blockdev", r#"{"driver":"null-co","node-name":"n","size":4096}"#],
            vec!["--blockdev", "file,node-name=f,filename=IMAGE,aio=threads,locking=off"],
            vec!["--blockdev", "file,node-name=f,filename=IMAGE,aio=io_uring,drop-cache=off"],
            vec!["--blockdev", "file,node-name=f,filename=IMAGE,aio=native,cache.direct=on"],
            vec!["--blockdev", "file,node-name=f,filename=IMAGE,aio-max-batch=-1"],
            vec![
                "--blockdev", "null-co,node-name=n",
                "--export",
                "vhost-user-blk,id=e,node-name=n,addr.type=unix,addr.path=DIR/a.sock,\
                 logical-block-size=0.5k,num-queues=65535",
            ],
            vec![
                "--blockdev", "null-co,node-name=n",
                "--export",
                "type=vhost-user-blk,id=e,node-name=n,addr.type=unix,addr.path=DIR/b.sock,\
                 logical-block-size=4K,writable=on",
            ],
            vec![
                "--object", "iothread,id=io0,poll-max-ns=0x10,poll-grow=010,poll-shrink=2",
                "--blockdev", "null-co,node-name=n",
                "--export",
                "vhost-user-blk,id=e,node-name=n,addr.type=unix,addr.path=DIR/c.sock,\
                 iothread=io0,logical-block-size=0x1000",
            ],
            vec![
                "--object", r#"{"qom-type":"iothread","id":"io0","poll-max-ns":5}"#,
                "--blockdev", "null-co,node-name=n",
                "--export",
                r#"{"type":"vhost-user-blk","id":"e","node-name":"n","iothread":"io0","addr":{"type":"unix","path":"DIR/d.sock"}}"#,
            ],
            vec![
                "--chardev", "socket,id=m,path=DIR/m1.sock,server=on,wait=off",
                "--monitor", "m",
            ],
            vec![
                "--chardev", "backend=socket,id=m,path=DIR/m2.sock,server=yes,wait=no",
                "--monitor", "chardev=m,mode=control,pretty=yes,id=mon",
            ],
            vec![
                "--chardev", "socket,id=m,path=DIR/m3.sock,server=on,wait=off",
                "--monitor", r#"{"chardev":"m"}"#,
                "--pidfile", "DIR/a.pid", "--pidfile=DIR/b.pid",
            ],
        ]
        .into_iter()
        .map(|args| {
            args.into_iter()
                .map(|arg| arg.replace("DIR", dir).replace("IMAGE", image))
                .collect()
        })
        .collect();
        for args in &cases {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            assert!(
                matches!(run(&args), Ok(Invocation::Run(_))),
                "{args:?}: {:?}",
                run(&args)
            );
        }
        let Ok(mut children) = cases
            .iter()
            .map(|args| {
                Command::new("qemu-storage-daemon")
                    .args(args)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped())
                    .spawn()
            })
            .collect::<Result<Vec<_>, _>>()
        else {
            eprintln!("qemu-storage-daemon is not installed: skipped");
            return;
        };
        std::thread::sleep(Duration::from_secs(1));
        let mut failures = Vec::new();
        for (child, args) in children.iter_mut().zip(&cases) {
            if child.try_wait().unwrap().is_some() {
                let mut stderr = String::new();
                child
                    .stderr
                    .take()
                    .unwrap()
                    .read_to_string(&mut stderr)
                    .unwrap();
                failures.push(format!("{args:?}: {stderr}"));
            } else {
                child.kill().unwrap();
            }
            child.wait().unwrap();
        }
        assert!(
            failures.is_empty(),
            "qemu-storage-daemon refused: {failures:#?}"
        );
    }

    #[test]
    fn export_takes_one_iothread_or_a_list_of_them() {
        let export = "vhost-user-blk,id=e,node-name=n,addr.type=unix,addr.path=/tmp/s";
        let base = [
            "--object",
            "iothread,id=a",
            "--object",
            "iothread,id=b",
            "--blockdev",
            "null-co,node-name=n",
        ];
        for (extra, want) in [
            ("iothread=a", vec!["a"]),
            ("iothread.0=a,iothread.1=b", vec!["a", "b"]),
            ("num-queues=1", vec![]),
        ] {
            let arg = format!("{export},{extra}");
            let args: Vec<&str> = base
                .iter()
                .copied()
                .chain(["--export", arg.as_str()])
                .collect();
            match &items(&args)[3] {
                CliItem::Export(e) => assert_eq!(e.iothread, want, "{extra}"),
                other => panic!("{other:?}"),
            }
        }
        let arg = format!("{export},iothread.0=a,iothread.1=zz");
        let args: Vec<&str> = base
            .iter()
            .copied()
            .chain(["--export", arg.as_str()])
            .collect();
        assert!(
            run(&args)
                .unwrap_err()
                .contains("iothread \"zz\" not found")
        );
    }
}
