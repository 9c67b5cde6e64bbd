//! Off-loop work, as the host sees it: opaque jobs a service asks for, run
//! by that service's own [`Executor`] on worker threads the host owns, and
//! opaque outcomes handed back to the service. The host never looks inside
//! a job; a service downcasts its own outcomes (`Done::downcast`).
//!
//! An executor is the one place a service does blocking I/O (disk, hashing,
//! watches). It names the lanes its jobs run on — each lane is a FIFO queue
//! with threads of its own, so a quick job never waits behind a long one of
//! another lane — and may keep reporting after a job has returned (a watch
//! reports each change through its [`Reporter`]).

use std::any::Any;
use std::sync::Arc;

/// A piece of work a service asks for (`Action::Work`).
pub type Job = Box<dyn Any + Send>;
/// What came of it (or a later report), handed to `Service::on_work`.
pub type Done = Box<dyn Any + Send>;

/// One queue of an executor's jobs and the threads that take from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lane {
    /// For thread names (`NAME-LANE-N`) and logs.
    pub name: &'static str,
    /// Threads taking jobs from this lane (at least one); a lane with one
    /// thread runs its jobs in the order they were asked for.
    pub threads: usize,
}

/// Where outcomes that arrive outside a job's return go.
pub trait Reporter: Send + Sync {
    /// Hands `done` to the service, with the key of the job that set up
    /// the report.
    fn report(&self, key: u64, done: Done);
    /// As [`Reporter::report`], unless a report with the same `tag` is
    /// still waiting to be taken: a busy watch costs one waiting report,
    /// not one per event.
    fn report_once(&self, key: u64, tag: u64, done: Done);
}

/// Runs one service's jobs. Shared by the host's worker threads.
pub trait Executor: Send + Sync {
    /// The lanes this executor's jobs run on; [`Executor::lane`] indexes it.
    fn lanes(&self) -> Vec<Lane>;
    /// Which lane runs `job`.
    fn lane(&self, job: &Job) -> usize;
    /// Runs `job` (on a worker thread); its outcome, if it has one, goes
    /// back to the service with `key`. A panic costs the job's answer: an
    /// executor that wants the service told turns its own panics into
    /// outcomes.
    fn run(&self, key: u64, job: Job, reporter: &Arc<dyn Reporter>) -> Option<Done>;
    /// The host is stopping: let go of anything kept between jobs (watches).
    fn stop(&self) {}
}

/// The message of a caught panic, for the outcome that reports it.
pub fn panic_message(panic: &(dyn Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown cause".to_owned())
}
