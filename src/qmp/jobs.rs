//! Block-job commands: `blockdev-mirror`, the `block-job-*` and `job-*` verbs, the queries, and
//! the job events, in QSD's shapes. The jobs themselves are `ringblk_mirror::Mirror`s kept by
//! the daemon under their id; a job that reached NULL is forgotten at the next job command.

use std::rc::Rc;

use ringblk_mirror::{
    CopyMode, JobEvent, JobInfo, JobProgress, Mirror, MirrorError, MirrorOptions, OnError,
};
use serde_json::{Map, Value, json};

use super::QmpError;
use super::args::Arguments;
use super::commands::State;
use super::events::Events;

impl From<MirrorError> for QmpError {
    fn from(e: MirrorError) -> QmpError {
        QmpError::generic(e.to_string())
    }
}

const SYNC_MODES: &[&str] = &["top", "full", "none", "incremental", "bitmap"];
const ON_ERROR: &[&str] = &["report", "ignore", "enospc", "stop", "auto"];
const COPY_MODES: &[&str] = &["background", "write-blocking"];

fn on_error(value: Option<String>) -> Result<OnError, QmpError> {
    Ok(match value.as_deref() {
        None | Some("report") => OnError::Report,
        Some("ignore") => OnError::Ignore,
        Some("stop") => OnError::Stop,
        Some("enospc") => OnError::Enospc,
        Some(other) => {
            return Err(QmpError::generic(format!(
                "on-error={other} is not supported by ringblk"
            )));
        }
    })
}

fn copy_mode(value: &str) -> CopyMode {
    if value == "write-blocking" {
        CopyMode::WriteBlocking
    } else {
        CopyMode::Background
    }
}

/// `blockdev-mirror`.
pub fn blockdev_mirror(
    state: &mut State,
    arguments: Map<String, Value>,
) -> Result<Value, QmpError> {
    let mut args = Arguments::new(arguments);
    let job_id = args.optional_string("job-id")?;
    let device = args.string("device")?;
    let target = args.string("target")?;
    let replaces = args.optional_string("replaces")?;
    let sync = args.enumeration("sync", SYNC_MODES)?;
    let speed = args.optional_u64("speed")?;
    let granularity = args.optional_u64("granularity")?;
    let buf_size = args.optional_u64("buf-size")?;
    let on_source_error = on_error(args.optional_enum("on-source-error", ON_ERROR)?)?;
    let on_target_error = on_error(args.optional_enum("on-target-error", ON_ERROR)?)?;
    let filter_node_name = args.optional_string("filter-node-name")?;
    let mode = args.optional_enum("copy-mode", COPY_MODES)?;
    let auto_finalize = args.optional_bool("auto-finalize")?;
    let auto_dismiss = args.optional_bool("auto-dismiss")?;
    let unmap = args.optional_bool("unmap")?;
    args.finish()?;
    if sync != "full" {
        return Err(QmpError::generic(format!(
            "sync={sync} is not supported by ringblk (only full)"
        )));
    }
    if replaces.is_some() || filter_node_name.is_some() {
        return Err(QmpError::generic(
            "replaces and filter-node-name are not supported by ringblk",
        ));
    }
    let mut daemon = state.daemon.borrow_mut();
    daemon.forget_finished_jobs();
    let job_id = job_id.unwrap_or_else(|| device.clone());
    if daemon.job(&job_id).is_ok() {
        return Err(QmpError::generic(format!(
            "Job ID '{job_id}' already in use"
        )));
    }
    let source = daemon.node(&device)?.clone();
    let target = daemon.node(&target)?.clone();
    let defaults = MirrorOptions::new(job_id.clone());
    let options = MirrorOptions {
        granularity: granularity.unwrap_or(defaults.granularity),
        buf_size: buf_size.unwrap_or(defaults.buf_size),
        speed: speed.unwrap_or(0),
        copy_mode: mode.as_deref().map_or(CopyMode::Background, copy_mode),
        on_source_error,
        on_target_error,
        auto_finalize: auto_finalize.unwrap_or(true),
        auto_dismiss: auto_dismiss.unwrap_or(true),
        unmap: unmap.unwrap_or(true),
        ..defaults
    };
    let events = Rc::downgrade(&state.events);
    let sink = Box::new(move |event: JobEvent| {
        if let Some(events) = events.upgrade() {
            emit(&events, &event);
        }
    });
    let mirror = Mirror::create(&source, &target, options, Some(sink))?;
    mirror.start()?;
    daemon.add_job(mirror);
    Ok(json!({}))
}

/// The job a `block-job-*` command names (QEMU: DeviceNotFound).
fn block_job(state: &State, args: &mut Arguments, member: &str) -> Result<Mirror, QmpError> {
    let id = args.string(member)?;
    let mut daemon = state.daemon.borrow_mut();
    daemon.forget_finished_jobs();
    daemon.job(&id).cloned().map_err(|_| QmpError {
        class: "DeviceNotFound",
        desc: format!("Block job '{id}' not found"),
    })
}

/// The job a `job-*` command names (QEMU: GenericError).
fn job(state: &State, args: &mut Arguments) -> Result<Mirror, QmpError> {
    let id = args.string("id")?;
    let mut daemon = state.daemon.borrow_mut();
    daemon.forget_finished_jobs();
    daemon
        .job(&id)
        .cloned()
        .map_err(|_| QmpError::generic(format!("Job '{id}' not found")))
}

/// A verb taking only the job's name.
fn verb(
    state: &mut State,
    arguments: Map<String, Value>,
    block: bool,
    act: impl FnOnce(&Mirror) -> Result<(), MirrorError>,
) -> Result<Value, QmpError> {
    let mut args = Arguments::new(arguments);
    let mirror = if block {
        block_job(state, &mut args, "device")?
    } else {
        job(state, &mut args)?
    };
    args.finish()?;
    act(&mirror)?;
    Ok(json!({}))
}

pub fn job_complete(state: &mut State, arguments: Map<String, Value>) -> Result<Value, QmpError> {
    verb(state, arguments, false, Mirror::complete)
}

pub fn block_job_complete(
    state: &mut State,
    arguments: Map<String, Value>,
) -> Result<Value, QmpError> {
    verb(state, arguments, true, Mirror::complete)
}

pub fn job_pause(state: &mut State, arguments: Map<String, Value>) -> Result<Value, QmpError> {
    verb(state, arguments, false, Mirror::pause)
}

pub fn block_job_pause(
    state: &mut State,
    arguments: Map<String, Value>,
) -> Result<Value, QmpError> {
    verb(state, arguments, true, Mirror::pause)
}

pub fn job_resume(state: &mut State, arguments: Map<String, Value>) -> Result<Value, QmpError> {
    verb(state, arguments, false, Mirror::resume)
}

pub fn block_job_resume(
    state: &mut State,
    arguments: Map<String, Value>,
) -> Result<Value, QmpError> {
    verb(state, arguments, true, Mirror::resume)
}

pub fn job_finalize(state: &mut State, arguments: Map<String, Value>) -> Result<Value, QmpError> {
    verb(state, arguments, false, Mirror::finalize)
}

pub fn block_job_finalize(
    state: &mut State,
    arguments: Map<String, Value>,
) -> Result<Value, QmpError> {
    verb(state, arguments, false, Mirror::finalize)
}

pub fn job_dismiss(state: &mut State, arguments: Map<String, Value>) -> Result<Value, QmpError> {
    verb(state, arguments, false, Mirror::dismiss)
}

pub fn block_job_dismiss(
    state: &mut State,
    arguments: Map<String, Value>,
) -> Result<Value, QmpError> {
    verb(state, arguments, false, Mirror::dismiss)
}

pub fn job_cancel(state: &mut State, arguments: Map<String, Value>) -> Result<Value, QmpError> {
    verb(state, arguments, false, |m| m.cancel(false))
}

/// `block-job-cancel device [force]`.
pub fn block_job_cancel(
    state: &mut State,
    arguments: Map<String, Value>,
) -> Result<Value, QmpError> {
    let mut args = Arguments::new(arguments);
    let mirror = block_job(state, &mut args, "device")?;
    let force = args.optional_bool("force")?.unwrap_or(false);
    args.finish()?;
    mirror.cancel(force)?;
    Ok(json!({}))
}

/// `block-job-set-speed device speed`.
pub fn block_job_set_speed(
    state: &mut State,
    arguments: Map<String, Value>,
) -> Result<Value, QmpError> {
    let mut args = Arguments::new(arguments);
    let mirror = block_job(state, &mut args, "device")?;
    let speed = args.u64("speed")?;
    args.finish()?;
    mirror.set_speed(speed)?;
    Ok(json!({}))
}

/// `block-job-change id type=mirror copy-mode`.
pub fn block_job_change(
    state: &mut State,
    arguments: Map<String, Value>,
) -> Result<Value, QmpError> {
    let mut args = Arguments::new(arguments);
    let mirror = block_job(state, &mut args, "id")?;
    let _type = args.enumeration("type", &["mirror"])?;
    let mode = args.enumeration("copy-mode", COPY_MODES)?;
    args.finish()?;
    mirror.change_copy_mode(copy_mode(&mode))?;
    Ok(json!({}))
}

fn block_job_info(info: &JobInfo) -> Value {
    let mut v = json!({
        "type": info.job_type,
        "device": info.device,
        "len": info.len,
        "offset": info.offset,
        "busy": info.busy,
        "paused": info.paused,
        "speed": info.speed,
        "io-status": info.io_status.as_str(),
        "ready": info.ready,
        "status": info.status.as_str(),
        "auto-finalize": info.auto_finalize,
        "auto-dismiss": info.auto_dismiss,
        "actively-synced": info.actively_synced,
    });
    if let Some(error) = &info.error {
        v["error"] = json!(error);
    }
    v
}

/// `query-block-jobs`.
pub fn query_block_jobs(
    state: &mut State,
    arguments: Map<String, Value>,
) -> Result<Value, QmpError> {
    Arguments::new(arguments).finish()?;
    let mut daemon = state.daemon.borrow_mut();
    daemon.forget_finished_jobs();
    Ok(Value::Array(
        daemon.jobs().map(|m| block_job_info(&m.query())).collect(),
    ))
}

/// `query-jobs`.
pub fn query_jobs(state: &mut State, arguments: Map<String, Value>) -> Result<Value, QmpError> {
    Arguments::new(arguments).finish()?;
    let mut daemon = state.daemon.borrow_mut();
    daemon.forget_finished_jobs();
    let jobs = daemon
        .jobs()
        .map(|m| {
            let info = m.query();
            let mut v = json!({
                "id": info.device,
                "type": info.job_type,
                "status": info.status.as_str(),
                "current-progress": info.offset,
                "total-progress": info.len,
            });
            if let Some(error) = &info.error {
                v["error"] = json!(error);
            }
            v
        })
        .collect();
    Ok(Value::Array(jobs))
}

fn progress(p: &JobProgress) -> Value {
    json!({"type": p.job_type, "device": p.device, "len": p.len, "offset": p.offset, "speed": p.speed})
}

/// Turns a job event into its QMP event, in QEMU's shape.
fn emit(events: &Events, event: &JobEvent) {
    let data = match event {
        JobEvent::StatusChange { id, status } => json!({"id": id, "status": status.as_str()}),
        JobEvent::Ready(p) | JobEvent::Cancelled(p) => progress(p),
        JobEvent::Completed { progress: p, error } => {
            let mut v = progress(p);
            if let Some(error) = error {
                v["error"] = json!(error);
            }
            v
        }
        JobEvent::Error {
            device,
            operation,
            action,
        } => {
            json!({"device": device, "operation": operation.as_str(), "action": action.as_str()})
        }
    };
    events.emit(event.qmp_name(), data);
}
