//! FILEMQ's executor: **the one place the service does disk I/O** — scans,
//! hashing, chunk reads, ICANHAZ caches prepared off the loop, and the
//! file-system watches that say when to rescan. The host runs it on its
//! worker threads (lanes below); `sim::Sim` runs it inline, with watches
//! only recorded ([`DiskExecutor::recording`]).
//!
//! Three lanes keep chunk reads from waiting behind long work: one thread
//! runs scans (and sets watches up, since a recursive watch walks the
//! whole tree too; one thread, so an `Unwatch` never overtakes its
//! `Watch`), one prepares large ICANHAZ caches (and frees large holdings),
//! the others run reads.

use super::disk;
use super::work::{Done, Job, MountId, ReadError};
use crate::work::{self as host, Lane, Reporter};
use notify::event::{AccessKind, AccessMode};
use notify::{Event, EventKind, RecommendedWatcher, RecursiveMode, Watcher as _};
use std::collections::{BTreeMap, HashMap};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use tracing::{debug, error};

const SCAN_LANE: usize = 0;
const CACHE_LANE: usize = 1;
const READ_LANE: usize = 2;

/// Runs FILEMQ's [`Job`]s.
pub struct DiskExecutor {
    read_threads: usize,
    watches: Mutex<Watches>,
}

enum Watches {
    /// Real watches, dropped on `Unwatch` or at `stop`.
    Real(HashMap<MountId, RecommendedWatcher>),
    /// Watched mounts and the key each reports with (simulations).
    Recorded(BTreeMap<MountId, u64>),
}

impl DiskExecutor {
    /// With `read_threads` threads for chunk reads (at least one).
    pub fn new(read_threads: usize) -> DiskExecutor {
        DiskExecutor { read_threads: read_threads.max(1), watches: Mutex::new(Watches::Real(HashMap::new())) }
    }

    /// One that records watches instead of setting them up: a simulation
    /// delivers `Done::Dirty` itself, when it chooses.
    pub fn recording() -> DiskExecutor {
        DiskExecutor { read_threads: 1, watches: Mutex::new(Watches::Recorded(BTreeMap::new())) }
    }

    /// The mounts a recording executor was asked to watch, with their keys.
    pub fn watched(&self) -> BTreeMap<MountId, u64> {
        match &*self.watches.lock().unwrap_or_else(PoisonError::into_inner) {
            Watches::Recorded(watched) => watched.clone(),
            Watches::Real(watches) => watches.keys().map(|mount| (*mount, 0)).collect(),
        }
    }

    fn watch(&self, key: u64, mount: MountId, root: PathBuf, reporter: &Arc<dyn Reporter>) -> Option<Done> {
        let mut watches = self.watches.lock().unwrap_or_else(PoisonError::into_inner);
        match &mut *watches {
            Watches::Recorded(watched) => {
                watched.insert(mount, key);
                None
            }
            Watches::Real(watches) => {
                // A second watch of the same mount replaces the first.
                watches.remove(&mount);
                match watch(Arc::clone(reporter), key, mount, root) {
                    Ok(watcher) => {
                        watches.insert(mount, watcher);
                        None
                    }
                    Err(why) => Some(Done::WatchFailed { mount, why }),
                }
            }
        }
    }

    fn unwatch(&self, mount: MountId) {
        match &mut *self.watches.lock().unwrap_or_else(PoisonError::into_inner) {
            Watches::Recorded(watched) => {
                watched.remove(&mount);
            }
            Watches::Real(watches) => {
                watches.remove(&mount);
            }
        }
    }
}

impl host::Executor for DiskExecutor {
    fn lanes(&self) -> Vec<Lane> {
        vec![
            Lane { name: "scan", threads: 1 },
            Lane { name: "cache", threads: 1 },
            Lane { name: "read", threads: self.read_threads },
        ]
    }

    fn lane(&self, job: &host::Job) -> usize {
        match job.downcast_ref::<Job>() {
            // Small, and the operator waits for it: never behind a scan.
            Some(Job::Read { .. } | Job::SaveMounts { .. }) => READ_LANE,
            // A large cache takes a second or so: its own thread, so it
            // never waits behind a scan nor holds up a chunk read.
            Some(Job::Icanhaz { .. } | Job::Discard(_)) => CACHE_LANE,
            Some(Job::Scan { .. } | Job::Watch { .. } | Job::Unwatch { .. }) | None => SCAN_LANE,
        }
    }

    fn run(&self, key: u64, job: host::Job, reporter: &Arc<dyn Reporter>) -> Option<host::Done> {
        let Ok(job) = job.downcast::<Job>() else {
            error!("filemq executor: a job of another service");
            return None;
        };
        let done = match *job {
            Job::Watch { mount, root } => self.watch(key, mount, root, reporter),
            Job::Unwatch { mount } => {
                self.unwatch(mount);
                None
            }
            job => run_caught(job, disk::run),
        };
        done.map(|done| Box::new(done) as host::Done)
    }

    fn stop(&self) {
        if let Watches::Real(watches) = &mut *self.watches.lock().unwrap_or_else(PoisonError::into_inner) {
            watches.clear();
        }
    }
}

/// Runs a job with `run`, turning a panic into the job's failure so that a
/// bug in disk work costs one answer, not the broker.
fn run_caught(job: Job, run: impl FnOnce(Job) -> Option<Done>) -> Option<Done> {
    let scanned_mount = match &job {
        Job::Scan { mount, .. } => Some(*mount),
        _ => None,
    };
    let icanhaz = matches!(job, Job::Icanhaz { .. });
    let save = matches!(job, Job::SaveMounts { .. });
    let panic = match catch_unwind(AssertUnwindSafe(|| run(job))) {
        Ok(done) => return done,
        Err(panic) => panic,
    };
    let why = host::panic_message(&*panic);
    error!("disk job panicked: {why}");
    Some(match scanned_mount {
        Some(mount) => Done::Scanned { mount, result: Err(format!("scan failed: {why}")) },
        None if icanhaz => Done::Icanhaz(Err(format!("preparing the cache failed: {why}"))),
        None if save => Done::Saved(Err(format!("saving the mounts failed: {why}"))),
        None => Done::Read(Err(ReadError::Io(format!("read failed: {why}")))),
    })
}

/// Watches `root` recursively; each change becomes (at most one waiting)
/// `Done::Dirty` for `mount`, reported with `key`.
fn watch(
    reporter: Arc<dyn Reporter>,
    key: u64,
    mount: MountId,
    root: PathBuf,
) -> Result<RecommendedWatcher, String> {
    let events_root = root.clone();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<Event>| {
        if calls_for_rescan(&event, &events_root) {
            reporter.report_once(key, mount as u64, Box::new(Done::Dirty { mount }));
        }
    })
    .map_err(|e| format!("cannot watch {}: {e}", root.display()))?;
    watcher
        .watch(&root, RecursiveMode::Recursive)
        .map_err(|e| format!("cannot watch {}: {e}", root.display()))?;
    debug!("watching {} for mount {mount}", root.display());
    Ok(watcher)
}

/// Whether a watch event may change what the mount publishes.
fn calls_for_rescan(event: &notify::Result<Event>, root: &Path) -> bool {
    let event = match event {
        Ok(event) => event,
        // Typically the kernel's event queue overflowed: changes were lost.
        Err(e) => {
            debug!("watch error under {}: {e}", root.display());
            return true;
        }
    };
    if event.need_rescan() {
        return true;
    }
    match event.kind {
        // A writer closing a file: it may be complete (stable) now.
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => {}
        // Opens and reads, our own scans and reads included: nothing
        // changed, and reacting would make every scan trigger the next.
        EventKind::Access(_) => return false,
        _ => {}
    }
    // Only hidden entries (such as a relay's own `.filemq` area) changed:
    // they are never published.
    event.paths.is_empty() || event.paths.iter().any(|path| !is_hidden(path, root))
}

fn is_hidden(path: &Path, root: &Path) -> bool {
    path.strip_prefix(root).is_ok_and(|rest| {
        rest.components()
            .any(|c| matches!(c, Component::Normal(name) if name.as_encoded_bytes().starts_with(b".")))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::filemq::work::FileMeta;

    #[test]
    fn a_panicking_job_fails_instead_of_killing_the_thread() {
        let dir = tempfile::tempdir().expect("tempdir");
        let boom = |_: Job| -> Option<Done> { panic!("boom") };
        let scan = Job::Scan {
            mount: 6,
            root: dir.path().to_owned(),
            previous: Arc::default(),
            stable_age: std::time::Duration::ZERO,
            digest_cache: None,
        };
        let scan = run_caught(scan, boom);
        assert!(
            matches!(&scan, Some(Done::Scanned { mount: 6, result: Err(why) }) if why.contains("boom")),
            "{scan:?}"
        );
        let expect = FileMeta::default();
        let read = Job::Read { root: dir.path().to_owned(), rel: "f".into(), offset: 0, len: 0, expect };
        let read = run_caught(read, |_| panic!("{}", String::from("bang")));
        assert!(
            matches!(&read, Some(Done::Read(Err(ReadError::Io(why)))) if why.contains("bang")),
            "{read:?}"
        );
    }
}
