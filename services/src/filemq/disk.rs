//! Disk work for FILEMQ (scan, hash, read), run on worker threads.

use super::work::{Done, Job};

/// Runs one job on the calling thread. `None` for the jobs only the
/// reactor can run (`Watch`, `Unwatch`).
pub fn run(job: Job) -> Option<Done> {
    let _ = job;
    todo!("disk::run")
}
