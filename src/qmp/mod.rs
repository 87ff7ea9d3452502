//! QMP, the QEMU Machine Protocol, as qemu-storage-daemon 10.0 speaks it.
//!
//! A `--chardev socket,...,server=on,wait=off` is a listening UNIX socket; a `--monitor
//! chardev=ID` serves QMP on it. Every client gets the greeting, must negotiate capabilities
//! with `qmp_capabilities`, then sends commands and receives replies and events. Each client has
//! its own protocol state; all share the daemon.
//!
//! ## Parts
//! - [`stream`] cuts a client's bytes into JSON texts (QMP needs no newlines), with bounds;
//! - [`json`] parses texts and renders messages as QSD prints them;
//! - [`monitor`] is one client's protocol: greeting, negotiation, request checks, replies;
//! - [`args`] reads command arguments with QSD's error messages;
//! - [`commands`] is the command table and the handlers;
//! - [`events`] is the event bus every negotiated client listens to;
//! - [`server`] owns the sockets on the main context.
//!
//! ## Reentrancy
//! A command may run nested loop turns of the main context (stopping an export waits for its
//! in-flight requests). Every QMP socket is in one mute [`ringblk_ring::Group`], muted while a
//! command runs: no other QMP input is dispatched in the middle of a command, so commands never
//! overlap and the command state is borrowed by one handler at a time. (QEMU gets the same by
//! serving monitors from a context that nested polls do not run.) Events emitted during a
//! command are sent at once, so, as in QSD, `BLOCK_EXPORT_DELETED` precedes the reply to
//! `block-export-del`.

mod args;
mod commands;
mod events;
mod jobs;
mod json;
mod monitor;
mod server;
mod stream;

pub use events::Events;
pub use server::QmpServer;

use crate::daemon::DaemonError;
use crate::options::OptionsError;

/// A failed command, as QMP reports it: `{"error": {"class": ..., "desc": ...}}`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{desc}")]
pub struct QmpError {
    /// QAPI's `QapiErrorClass` name.
    pub class: &'static str,
    /// The message.
    pub desc: String,
}

impl QmpError {
    /// A `GenericError`.
    pub fn generic(desc: impl Into<String>) -> QmpError {
        QmpError {
            class: "GenericError",
            desc: desc.into(),
        }
    }

    /// A `CommandNotFound`.
    pub fn command_not_found(desc: impl Into<String>) -> QmpError {
        QmpError {
            class: "CommandNotFound",
            desc: desc.into(),
        }
    }
}

impl From<DaemonError> for QmpError {
    fn from(error: DaemonError) -> QmpError {
        QmpError {
            class: error.class(),
            desc: error.to_string(),
        }
    }
}

impl From<OptionsError> for QmpError {
    fn from(error: OptionsError) -> QmpError {
        QmpError::generic(error.to_string())
    }
}
