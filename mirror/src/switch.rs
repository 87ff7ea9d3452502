//! The end of a mirror that went well: the drained final sync and the deferred pivot.
//!
//! Order, each step starting only when the previous one is done:
//! 1. no new copies; wait until the copies in flight have completed (the guest still runs);
//! 2. from a deferred callback (never inside one of the job's own completions, which the node
//!    still counts in flight), `drained_begin(filter)`: mutes every device above the filter on
//!    every ring that serves it
//!    (acknowledged), raises the gates of filter and source and runs loop turns until nothing
//!    is in flight in them. From here no guest request can reach the filter;
//! 3. copy what is still dirty, past the gate (`submit_drained`: the job must not wait for its
//!    own drain), then flush the target;
//! 4. defer the pivot to a later turn of the main context, moving the drained guard into the
//!    callback. A kick that arrives now stays in its eventfd: its group is muted;
//! 5. the callback `replace`s every backend handle on the filter by the target (or, for a
//!    cancel after READY, by the source), then drops the guard: drained_end, then unmute with
//!    the self-kick, so the devices' next requests, and any kick that waited, go to the new root.
//!
//! An error in step 3 follows the policy: `report` takes the filter out (devices back on the
//! source) and fails the job; `ignore` and `stop` end the drained section, let the guest run and
//! retry the final sync after a short delay (a PENDING job cannot pause, so `stop` acts as
//! `ignore` there, and the BLOCK_JOB_ERROR event says `ignore`).

use std::rc::Rc;
use std::time::Instant;

use ringblk_blkgraph::{Drained, drained_begin};

use crate::copy::Gate;
use crate::job::{Goal, Job, Phase, RETRY_DELAY};
use crate::status::ErrorAction;

impl Job {
    /// Step 2. Deferred by the pump once no copy is in flight (see `Job::defer_drain`).
    pub(crate) fn begin_final_sync(self: &Rc<Self>) {
        let drained = drained_begin(&self.filter);
        {
            let mut st = self.st.borrow_mut();
            st.phase = Phase::FinalSync;
            st.drained = Some(drained);
            st.flushed = false;
            st.final_sync_error = None;
        }
        self.continue_final_sync();
    }

    /// Step 3, re-entered as each copy or the flush completes.
    pub(crate) fn continue_final_sync(self: &Rc<Self>) {
        let (ops, error, flushed) = {
            let st = self.st.borrow();
            (st.ops, st.final_sync_error.clone(), st.flushed)
        };
        if ops > 0 {
            return;
        }
        if let Some((action, text)) = error {
            return self.final_sync_failed(action, text);
        }
        if !self.shared.dirty.is_clean() {
            let issued = self.issue_copies(Gate::Drained);
            assert!(issued > 0, "drained: every dirty chunk can be claimed");
            return;
        }
        if !flushed {
            return self.flush_target();
        }
        self.defer_pivot();
    }

    /// Step 4.
    fn defer_pivot(self: &Rc<Self>) {
        let drained = {
            let mut st = self.st.borrow_mut();
            st.phase = Phase::PivotDeferred;
            st.drained
                .take()
                .expect("the final sync holds the drained section")
        };
        let hook = self.pivot_hook.borrow_mut().take();
        if let Some(hook) = hook {
            hook();
        }
        let job = self.clone();
        self.ctx.defer(move || job.pivot(drained));
    }

    /// Step 5, on the main context, a turn after step 4.
    fn pivot(self: &Rc<Self>, drained: Drained) {
        let to_target = {
            let st = self.st.borrow();
            st.goal == Some(Goal::Pivot) && !st.cancelled
        };
        let new_root = if to_target {
            &self.target
        } else {
            &self.source
        };
        for handle in self.filter.handles() {
            handle.replace(new_root);
        }
        drop(drained);
        self.finish();
    }

    fn final_sync_failed(self: &Rc<Self>, action: ErrorAction, text: String) {
        match action {
            // `begin_abort` reuses the drained section still held in the state.
            ErrorAction::Report => self.begin_abort(Some(text)),
            ErrorAction::Ignore | ErrorAction::Stop => {
                let drained = {
                    let mut st = self.st.borrow_mut();
                    st.phase = Phase::Copying;
                    st.retry_at = Some(Instant::now() + RETRY_DELAY);
                    st.drained.take()
                };
                drop(drained);
                self.pump();
            }
        }
    }
}
