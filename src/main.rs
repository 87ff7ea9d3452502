//! ringblk: a vhost-user-blk storage daemon on io_uring with qemu-storage-daemon's command line.
//!
//! The main thread runs the main ring context: vhost-user sockets, QMP, job completions, and
//! the signalfd through which SIGTERM/SIGINT arrive. Each `--object iothread` is a ring context
//! on a thread of its own. Shutdown is orderly: exports stop after their in-flight requests
//! complete, nodes are flushed, then the threads stop.

mod cli;
mod daemon;
mod demo;
mod keyval;
mod options;
mod qmp;

use std::cell::RefCell;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::ExitCode;
use std::rc::Rc;

use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use ringblk_ring::{Context, Group};

use crate::cli::{CliItem, Config, Invocation};
use crate::daemon::Daemon;
use crate::qmp::{Events, QmpServer};

fn main() -> ExitCode {
    match cli::parse(std::env::args_os()) {
        Ok(Invocation::Print(text)) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Ok(Invocation::Demo(args)) => demo::run(&args),
        Ok(Invocation::Run(config)) => run(config),
        Err(e) => {
            eprintln!("ringblk: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(config: Config) -> ExitCode {
    // Block the stop signals before any thread exists, so every thread inherits the mask and
    // they reach the process only through the signalfd on the main context.
    let mut stop_signals = SigSet::empty();
    for signal in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        stop_signals.add(signal);
    }
    if let Err(e) = stop_signals.thread_block() {
        eprintln!("ringblk: cannot block signals: {e}");
        return ExitCode::FAILURE;
    }
    let ctx = match Context::new(256) {
        Ok(ctx) => ctx,
        Err(e) => {
            eprintln!("ringblk: cannot set up io_uring: {e}");
            return ExitCode::FAILURE;
        }
    };
    let daemon = Rc::new(RefCell::new(Daemon::new()));
    let qmp = QmpServer::new(daemon.clone(), Rc::new(Events::default()));
    let started = start(&daemon, &qmp, &config);
    let code = match started {
        Ok(()) => serve(&ctx, &stop_signals, config.pidfile.as_deref()),
        Err(message) => {
            eprintln!("ringblk: {message}");
            ExitCode::FAILURE
        }
    };
    drop(qmp);
    daemon.replace(Daemon::new()).shutdown();
    ctx.shutdown();
    code
}

/// Creates what the command line defines, in order. The error names the option it came from.
fn start(daemon: &RefCell<Daemon>, qmp: &QmpServer, config: &Config) -> Result<(), String> {
    for (item, given) in &config.items {
        let result = match item {
            CliItem::Blockdev(options) => daemon.borrow_mut().add_blockdev(options),
            CliItem::Object(options) => daemon.borrow_mut().add_object(options),
            CliItem::Export(options) => daemon.borrow_mut().add_export(options),
            CliItem::Chardev(options) => qmp.add_chardev(options),
            CliItem::Monitor(options) => qmp.add_monitor(options),
            CliItem::NbdServer(options) => daemon.borrow_mut().nbd_server_start(options),
        };
        result.map_err(|e| format!("{given}: {e}"))?;
    }
    Ok(())
}

/// Runs the main context until a stop signal arrives.
fn serve(ctx: &Context, stop_signals: &SigSet, pidfile: Option<&Path>) -> ExitCode {
    let signals =
        match SignalFd::with_flags(stop_signals, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC) {
            Ok(fd) => fd,
            Err(e) => {
                eprintln!("ringblk: cannot create a signalfd: {e}");
                return ExitCode::FAILURE;
            }
        };
    if let Some(path) = pidfile
        && let Err(e) = std::fs::write(path, format!("{}\n", std::process::id()))
    {
        eprintln!("ringblk: cannot write pid file '{}': {e}", path.display());
        return ExitCode::FAILURE;
    }
    let remote = ctx.remote();
    let fd = signals.as_raw_fd();
    ctx.add_fd_source(Group::new(), fd, move || {
        if let Ok(Some(_)) = signals.read_signal() {
            remote.stop();
        }
    });
    ctx.run();
    if let Some(path) = pidfile {
        let _ = std::fs::remove_file(path);
    }
    ExitCode::SUCCESS
}
