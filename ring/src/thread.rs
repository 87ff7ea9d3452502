//! I/O threads: a context running on a thread of its own.

use std::io;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::{Context, Remote};

/// A thread running one context until stopped (QSD's `--object iothread`).
pub struct IoThread {
    remote: Remote,
    thread: Option<JoinHandle<()>>,
}

impl IoThread {
    /// Starts a thread named `name` with a fresh context that busy-polls up to `poll_max`.
    pub fn spawn(name: &str, poll_max: Duration) -> io::Result<IoThread> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        let thread = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                let ctx = match Context::new(256) {
                    Ok(ctx) => ctx,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                ctx.set_poll_max(poll_max);
                let _ = tx.send(Ok(ctx.remote()));
                ctx.run();
                ctx.shutdown();
            })?;
        let remote = rx
            .recv()
            .map_err(|_| io::Error::other("iothread died while starting"))??;
        Ok(IoThread {
            remote,
            thread: Some(thread),
        })
    }

    /// The handle for posting work to the thread.
    pub fn remote(&self) -> &Remote {
        &self.remote
    }
}

impl Drop for IoThread {
    /// Stops the loop and joins the thread; its context's teardown waits for in-flight ops.
    fn drop(&mut self) {
        self.remote.stop();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
