//! Block-job commands: `blockdev-mirror`, the `block-job-*` and `job-*` verbs, the queries, and
//! the job events, in QSD's shapes. The jobs themselves are `ringblk_mirror::Mirror`s kept by
//! the daemon under their id; a job that reached NULL is forgotten at the next job command.

use std::rc::Rc;

use ringblk_mirror::{
    CopyMode, JobEvent, JobInfo, JobProgress, JobStatus, Mirror, MirrorError, MirrorOptions,
    OnError,
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
    let on_source_error = args.optional_enum("on-source-error", ON_ERROR)?;
    let on_target_error = args.optional_enum("on-target-error", ON_ERROR)?;
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
    // QSD's checks, in its order and words: both nodes exist, neither is held by a running job
    // (a source or target of one is not a root node; a node in use is busy), the id is free.
    let lookup = |name: &str| {
        daemon
            .node(name)
            .cloned()
            .map_err(|e| QmpError::generic(e.to_string()))
    };
    let source = lookup(&device)?;
    let target_name = target;
    let target = lookup(&target_name)?;
    if daemon.job_role(&source).is_some() {
        return Err(QmpError::generic("Need a root block node"));
    }
    if daemon.job_role(&target).is_some() {
        return Err(QmpError::generic(format!(
            "Node '{target_name}' is busy: block device is in use by block job: mirror"
        )));
    }
    let job_id = job_id.unwrap_or_else(|| device.clone());
    if daemon.job(&job_id).is_ok() {
        return Err(QmpError::generic(format!(
            "Job ID '{job_id}' already in use"
        )));
    }
    let defaults = MirrorOptions::new(job_id.clone());
    let options = MirrorOptions {
        granularity: granularity.unwrap_or(defaults.granularity),
        buf_size: buf_size.unwrap_or(defaults.buf_size),
        speed: speed.unwrap_or(0),
        copy_mode: mode.as_deref().map_or(CopyMode::Background, copy_mode),
        on_source_error: on_error(on_source_error)?,
        on_target_error: on_error(on_target_error)?,
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

/// How a verb names its job: `job-*` by `id`, `block-job-*` by `device` (or `id` for
/// finalize, dismiss and change), with their different not-found errors.
#[derive(Clone, Copy)]
enum Lookup {
    Job,
    BlockJob(&'static str),
}

impl Lookup {
    /// The member that names the job.
    fn member(self) -> &'static str {
        match self {
            Lookup::Job => "id",
            Lookup::BlockJob(member) => member,
        }
    }

    /// The job named `id`. Called once every argument has been read: QSD checks the arguments
    /// against the schema before the command looks anything up.
    fn find(self, state: &State, id: &str) -> Result<Mirror, QmpError> {
        let mut daemon = state.daemon.borrow_mut();
        daemon.forget_finished_jobs();
        daemon.job(id).cloned().map_err(|_| match self {
            Lookup::Job => QmpError::generic("Job not found"),
            Lookup::BlockJob(_) => QmpError {
                class: "DeviceNotActive",
                desc: format!("Block job '{id}' not found"),
            },
        })
    }
}

/// A verb taking only the job's name.
fn verb(
    state: &mut State,
    arguments: Map<String, Value>,
    lookup: Lookup,
    act: impl FnOnce(&Mirror) -> Result<(), MirrorError>,
) -> Result<Value, QmpError> {
    let mut args = Arguments::new(arguments);
    let id = args.string(lookup.member())?;
    args.finish()?;
    act(&lookup.find(state, &id)?)?;
    Ok(json!({}))
}

pub fn job_complete(state: &mut State, arguments: Map<String, Value>) -> Result<Value, QmpError> {
    verb(state, arguments, Lookup::Job, Mirror::complete)
}

pub fn block_job_complete(
    state: &mut State,
    arguments: Map<String, Value>,
) -> Result<Value, QmpError> {
    verb(
        state,
        arguments,
        Lookup::BlockJob("device"),
        Mirror::complete,
    )
}

pub fn job_pause(state: &mut State, arguments: Map<String, Value>) -> Result<Value, QmpError> {
    verb(state, arguments, Lookup::Job, Mirror::pause)
}

pub fn block_job_pause(
    state: &mut State,
    arguments: Map<String, Value>,
) -> Result<Value, QmpError> {
    verb(state, arguments, Lookup::BlockJob("device"), Mirror::pause)
}

pub fn job_resume(state: &mut State, arguments: Map<String, Value>) -> Result<Value, QmpError> {
    verb(state, arguments, Lookup::Job, Mirror::resume)
}

pub fn block_job_resume(
    state: &mut State,
    arguments: Map<String, Value>,
) -> Result<Value, QmpError> {
    verb(state, arguments, Lookup::BlockJob("device"), Mirror::resume)
}

pub fn job_finalize(state: &mut State, arguments: Map<String, Value>) -> Result<Value, QmpError> {
    verb(state, arguments, Lookup::Job, Mirror::finalize)
}

pub fn block_job_finalize(
    state: &mut State,
    arguments: Map<String, Value>,
) -> Result<Value, QmpError> {
    verb(state, arguments, Lookup::BlockJob("id"), Mirror::finalize)
}

pub fn job_dismiss(state: &mut State, arguments: Map<String, Value>) -> Result<Value, QmpError> {
    verb(state, arguments, Lookup::Job, Mirror::dismiss)
}

pub fn block_job_dismiss(
    state: &mut State,
    arguments: Map<String, Value>,
) -> Result<Value, QmpError> {
    verb(state, arguments, Lookup::BlockJob("id"), Mirror::dismiss)
}

/// `job-cancel`: always a forced cancel (after READY too: BLOCK_JOB_CANCELLED, no final sync).
pub fn job_cancel(state: &mut State, arguments: Map<String, Value>) -> Result<Value, QmpError> {
    verb(state, arguments, Lookup::Job, |m| m.cancel(true))
}

/// `block-job-cancel device [force]`: without `force`, refused while the job is paused (by
/// the user or by an error with the `stop` policy), as in QSD.
pub fn block_job_cancel(
    state: &mut State,
    arguments: Map<String, Value>,
) -> Result<Value, QmpError> {
    let mut args = Arguments::new(arguments);
    let device = args.string("device")?;
    let force = args.optional_bool("force")?.unwrap_or(false);
    args.finish()?;
    let mirror = Lookup::BlockJob("device").find(state, &device)?;
    if !force && mirror.query().paused {
        return Err(QmpError::generic(format!(
            "The block job for device '{}' is currently paused",
            mirror.id()
        )));
    }
    mirror.cancel(force)?;
    Ok(json!({}))
}

/// `block-job-set-speed device speed`.
pub fn block_job_set_speed(
    state: &mut State,
    arguments: Map<String, Value>,
) -> Result<Value, QmpError> {
    let mut args = Arguments::new(arguments);
    let device = args.string("device")?;
    let speed = args.u64("speed")?;
    args.finish()?;
    Lookup::BlockJob("device")
        .find(state, &device)?
        .set_speed(speed)?;
    Ok(json!({}))
}

/// `block-job-change id type=mirror copy-mode`.
pub fn block_job_change(
    state: &mut State,
    arguments: Map<String, Value>,
) -> Result<Value, QmpError> {
    let mut args = Arguments::new(arguments);
    let id = args.string("id")?;
    let _type = args.enumeration("type", &["mirror"])?;
    let mode = args.enumeration("copy-mode", COPY_MODES)?;
    args.finish()?;
    Lookup::BlockJob("id")
        .find(state, &id)?
        .change_copy_mode(copy_mode(&mode))?;
    Ok(json!({}))
}

fn block_job_info(info: &JobInfo) -> Value {
    // QEMU's `paused` is "paused by anyone": a mirror that waits for its finalize keeps its
    // source drained, and that drain pauses the job, so QSD says `paused: true` there.
    let paused = info.paused || matches!(info.status, JobStatus::Waiting | JobStatus::Pending);
    let mut v = json!({
        "type": info.job_type,
        "device": info.device,
        "len": info.len,
        "offset": info.offset,
        "busy": info.busy,
        "paused": paused,
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
        JobEvent::Pending { id } => json!({"type": "mirror", "id": id}),
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
