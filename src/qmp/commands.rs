//! The QMP commands ringblk implements: one table, one handler each.
//!
//! A handler takes the command state and the request's `arguments` object (empty when the
//! request had none) and returns the `return` value or an error. Adding a command is one line
//! in [`COMMANDS`]; `query-commands` lists exactly that table. `qmp_capabilities` is in the
//! table for the command mode, where it is refused; during negotiation the monitor handles it
//! (see [`super::monitor`]).

use std::cell::RefCell;
use std::rc::Rc;

use ringblk_ring::Remote;
use serde_json::{Map, Value, json};

use super::QmpError;
use super::args::Arguments;
use super::events::{self, Events};
use super::jobs;
use crate::cli::QSD_VERSION;
use crate::daemon::Daemon;
use crate::options::{BlockdevOptions, ExportOptions, Form, NbdServerOptions, ObjectOptions};

/// What commands act on. One per daemon, shared by every monitor; borrowed by one handler at a
/// time (QMP sockets are muted while a command runs).
pub struct State {
    /// The nodes, iothreads and exports.
    pub daemon: Rc<RefCell<Daemon>>,
    /// The event bus.
    pub events: Rc<Events>,
    /// The main context, which `quit` stops.
    pub main: Remote,
}

/// A command's implementation.
pub type Handler = fn(&mut State, Map<String, Value>) -> Result<Value, QmpError>;

/// Every command ringblk implements, by QAPI name.
pub const COMMANDS: &[(&str, Handler)] = &[
    ("qmp_capabilities", qmp_capabilities),
    ("query-version", query_version),
    ("query-commands", query_commands),
    ("quit", quit),
    ("blockdev-add", blockdev_add),
    ("blockdev-del", blockdev_del),
    ("query-named-block-nodes", query_named_block_nodes),
    ("block_resize", block_resize),
    ("block-set-write-threshold", block_set_write_threshold),
    ("block-export-add", block_export_add),
    ("block-export-del", block_export_del),
    ("query-block-exports", query_block_exports),
    ("nbd-server-start", nbd_server_start),
    ("nbd-server-stop", nbd_server_stop),
    ("x-debug-query-block-graph", x_debug_query_block_graph),
    ("object-add", object_add),
    ("object-del", object_del),
    ("blockdev-mirror", jobs::blockdev_mirror),
    ("query-block-jobs", jobs::query_block_jobs),
    ("query-jobs", jobs::query_jobs),
    ("block-job-complete", jobs::block_job_complete),
    ("block-job-cancel", jobs::block_job_cancel),
    ("block-job-pause", jobs::block_job_pause),
    ("block-job-resume", jobs::block_job_resume),
    ("block-job-finalize", jobs::block_job_finalize),
    ("block-job-dismiss", jobs::block_job_dismiss),
    ("block-job-set-speed", jobs::block_job_set_speed),
    ("block-job-change", jobs::block_job_change),
    ("job-complete", jobs::job_complete),
    ("job-cancel", jobs::job_cancel),
    ("job-pause", jobs::job_pause),
    ("job-resume", jobs::job_resume),
    ("job-finalize", jobs::job_finalize),
    ("job-dismiss", jobs::job_dismiss),
];

/// The handler of command `name`.
pub fn find(name: &str) -> Option<Handler> {
    COMMANDS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|&(_, handler)| handler)
}

/// QAPI's `QMPCapability` values ringblk offers (in the greeting too).
pub const CAPABILITIES: &[&str] = &["oob"];

/// Reads `qmp_capabilities`' arguments; returns whether out-of-band execution is enabled.
pub fn capabilities_enabled(arguments: Map<String, Value>) -> Result<bool, QmpError> {
    let mut args = Arguments::new(arguments);
    let enable = args.optional_enum_list("enable", CAPABILITIES)?;
    args.finish()?;
    Ok(enable.iter().any(|c| c == "oob"))
}

/// The QEMU version ringblk follows, as (major, minor, micro).
pub fn qemu_version() -> (u64, u64, u64) {
    let mut parts = QSD_VERSION.split('.').map(|p| p.parse().unwrap_or(0));
    let mut next = || parts.next().unwrap_or(0);
    (next(), next(), next())
}

/// The `package` member of the version: what this build is.
pub fn package() -> String {
    format!("ringblk {}", env!("CARGO_PKG_VERSION"))
}

fn no_arguments(arguments: Map<String, Value>) -> Result<(), QmpError> {
    Arguments::new(arguments).finish()
}

fn qmp_capabilities(_: &mut State, arguments: Map<String, Value>) -> Result<Value, QmpError> {
    capabilities_enabled(arguments)?;
    Err(QmpError::command_not_found(
        "Capabilities negotiation is already complete, command ignored",
    ))
}

fn query_version(_: &mut State, arguments: Map<String, Value>) -> Result<Value, QmpError> {
    no_arguments(arguments)?;
    let (major, minor, micro) = qemu_version();
    Ok(json!({
        "qemu": { "major": major, "minor": minor, "micro": micro },
        "package": package(),
    }))
}

fn query_commands(_: &mut State, arguments: Map<String, Value>) -> Result<Value, QmpError> {
    no_arguments(arguments)?;
    Ok(COMMANDS
        .iter()
        .map(|(name, _)| json!({ "name": name }))
        .collect())
}

/// Stops every export (each with its `BLOCK_EXPORT_DELETED`, before the reply, as in QSD),
/// then asks the main loop to return; the daemon then shuts down in order.
fn quit(state: &mut State, arguments: Map<String, Value>) -> Result<Value, QmpError> {
    no_arguments(arguments)?;
    let ids = state.daemon.borrow().export_ids();
    for id in ids {
        delete_export(state, &id)?;
    }
    state.main.stop();
    Ok(json!({}))
}

fn blockdev_add(state: &mut State, arguments: Map<String, Value>) -> Result<Value, QmpError> {
    let options = BlockdevOptions::from_value(&Value::Object(arguments), Form::Json)?;
    state.daemon.borrow_mut().add_blockdev(&options)?;
    Ok(json!({}))
}

fn blockdev_del(state: &mut State, arguments: Map<String, Value>) -> Result<Value, QmpError> {
    let mut args = Arguments::new(arguments);
    let node_name = args.string("node-name")?;
    args.finish()?;
    state.daemon.borrow_mut().del_blockdev(&node_name)?;
    Ok(json!({}))
}

fn query_named_block_nodes(
    state: &mut State,
    arguments: Map<String, Value>,
) -> Result<Value, QmpError> {
    let mut args = Arguments::new(arguments);
    // Nodes have no children to leave out, so `flat` changes nothing.
    args.optional_bool("flat")?;
    args.finish()?;
    Ok(state.daemon.borrow().query_named_block_nodes())
}

/// `block_resize`: the node grows or shrinks and every export serving it tells its frontend,
/// so a vhost-user-blk guest sees the new capacity at once. QSD has no block backends, so a
/// `device` never names anything and only `node-name` finds a node; the checks come in QSD's
/// order and words.
fn block_resize(state: &mut State, arguments: Map<String, Value>) -> Result<Value, QmpError> {
    let mut args = Arguments::new(arguments);
    let device = args.optional_string("device")?;
    let node_name = args.optional_string("node-name")?;
    let size = args.i64("size")?;
    args.finish()?;
    let mut daemon = state.daemon.borrow_mut();
    let name = node_name
        .as_deref()
        .filter(|name| daemon.node(name).is_ok())
        .ok_or_else(|| {
            QmpError::generic(format!(
                "Cannot find device='{}' nor node-name='{}'",
                device.as_deref().unwrap_or_default(),
                node_name.as_deref().unwrap_or_default()
            ))
        })?;
    let size =
        u64::try_from(size).map_err(|_| QmpError::generic("Parameter 'size' expects a >0 size"))?;
    daemon.resize_node(name, size)?;
    Ok(json!({}))
}

/// `block-set-write-threshold`: the first write to the node that ends past the threshold
/// sends BLOCK_WRITE_THRESHOLD and disarms it; 0 disarms.
fn block_set_write_threshold(
    state: &mut State,
    arguments: Map<String, Value>,
) -> Result<Value, QmpError> {
    let mut args = Arguments::new(arguments);
    let node_name = args.string("node-name")?;
    let threshold = args.uint64("write-threshold")?;
    args.finish()?;
    let daemon = state.daemon.borrow();
    let node = daemon
        .node(&node_name)
        .map_err(|_| QmpError::generic(format!("Device '{node_name}' not found")))?;
    let main = state.main.clone();
    let name = node_name.clone();
    let hit = move |amount_exceeded: u64, threshold: u64| {
        let data = json!({
            "node-name": name,
            "amount-exceeded": amount_exceeded,
            "write-threshold": threshold,
        });
        events::post(&main, "BLOCK_WRITE_THRESHOLD", data);
    };
    node.set_write_threshold(threshold, Box::new(hit));
    Ok(json!({}))
}

/// The checks QSD makes before the daemon's own, with QSD's wording: the id is free, the node
/// exists, a writable export is not of a read-only node.
fn block_export_add(state: &mut State, arguments: Map<String, Value>) -> Result<Value, QmpError> {
    let options = ExportOptions::from_value(&Value::Object(arguments), Form::Json)?;
    let mut daemon = state.daemon.borrow_mut();
    if !daemon.export_ids().contains(&options.id) {
        let node = daemon.node(&options.node_name).map_err(|_| {
            QmpError::generic(format!(
                "Cannot find device='' nor node-name='{}'",
                options.node_name
            ))
        })?;
        if options.writable && node.read_only() {
            return Err(QmpError::generic(
                "Cannot export read-only node as writable",
            ));
        }
    }
    daemon.add_export(&options)?;
    Ok(json!({}))
}

/// `mode` is accepted but both modes behave alike: the frontend is disconnected once its
/// in-flight requests have completed.
fn block_export_del(state: &mut State, arguments: Map<String, Value>) -> Result<Value, QmpError> {
    let mut args = Arguments::new(arguments);
    let id = args.string("id")?;
    args.optional_enum("mode", &["safe", "hard"])?;
    args.finish()?;
    delete_export(state, &id)?;
    Ok(json!({}))
}

fn delete_export(state: &mut State, id: &str) -> Result<(), QmpError> {
    state.daemon.borrow_mut().del_export(id)?;
    state
        .events
        .emit("BLOCK_EXPORT_DELETED", json!({ "id": id }));
    Ok(())
}

fn query_block_exports(
    state: &mut State,
    arguments: Map<String, Value>,
) -> Result<Value, QmpError> {
    no_arguments(arguments)?;
    Ok(state.daemon.borrow().query_block_exports())
}

fn nbd_server_start(state: &mut State, arguments: Map<String, Value>) -> Result<Value, QmpError> {
    let options = NbdServerOptions::from_value(&Value::Object(arguments), Form::Json, true)?;
    state.daemon.borrow_mut().nbd_server_start(&options)?;
    Ok(json!({}))
}

/// Stops the server; its exports go away with it, each with its `BLOCK_EXPORT_DELETED`.
fn nbd_server_stop(state: &mut State, arguments: Map<String, Value>) -> Result<Value, QmpError> {
    no_arguments(arguments)?;
    let ids = state.daemon.borrow_mut().nbd_server_stop()?;
    for id in ids {
        state
            .events
            .emit("BLOCK_EXPORT_DELETED", json!({ "id": id }));
    }
    Ok(json!({}))
}

fn x_debug_query_block_graph(
    state: &mut State,
    arguments: Map<String, Value>,
) -> Result<Value, QmpError> {
    no_arguments(arguments)?;
    Ok(state.daemon.borrow().block_graph())
}

fn object_add(state: &mut State, arguments: Map<String, Value>) -> Result<Value, QmpError> {
    let options = ObjectOptions::from_value(&Value::Object(arguments), Form::Json)?;
    state.daemon.borrow_mut().add_object(&options)?;
    Ok(json!({}))
}

fn object_del(state: &mut State, arguments: Map<String, Value>) -> Result<Value, QmpError> {
    let mut args = Arguments::new(arguments);
    let id = args.string("id")?;
    args.finish()?;
    state.daemon.borrow_mut().del_object(&id)?;
    Ok(json!({}))
}
