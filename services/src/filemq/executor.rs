//! FILEMQ's executor: **the one place the service does disk I/O** — scans,
//! hashing, chunk reads, ICANHAZ caches prepared off the loop, and the
//! file-system watches that say when to rescan. The host runs it on its
//! worker threads (lanes below); `sim::Sim` runs it inline, with watches
//! only recorded ([`DiskExecutor::recording`]).
//!
//! Four lanes keep chunk reads from waiting behind long work: one thread
//! runs scans (and sets watches up, since a recursive watch walks the
//! whole tree too; one thread, so an `Unwatch` never overtakes its
//! `Watch`), one prepares large ICANHAZ caches (and frees large holdings),
//! one walks large RESYNCs, the others run reads.

use super::disk;
use super::mounts::SaveError;
use super::work::{Done, Job, MountId, PrepareError, ReadError, ScanError, WalkError, WatchError};
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
const RESYNC_LANE: usize = 3;

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
            Lane { name: "resync", threads: 1 },
        ]
    }

    fn lane(&self, job: &host::Job) -> usize {
        match job.downcast_ref::<Job>() {
            // Small, and the operator waits for it: never behind a scan.
            Some(Job::Read { .. } | Job::SaveMounts { .. }) => READ_LANE,
            // A large cache takes a second or so: its own thread, so it
            // never waits behind a scan nor holds up a chunk read.
            Some(Job::Icanhaz { .. } | Job::Discard(_)) => CACHE_LANE,
            // Every RESYNC of a large tree walks it (a `filemq --once` of
            // an unchanged tree too): its own thread, so walks never queue
            // ahead of the capped cache preparations (which would then
            // answer "busy") nor of scans, and take one core at most.
            Some(Job::Resync(_)) => RESYNC_LANE,
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
    let resync = matches!(job, Job::Resync(_));
    let save = matches!(job, Job::SaveMounts { .. });
    let panic = match catch_unwind(AssertUnwindSafe(|| run(job))) {
        Ok(done) => return done,
        Err(panic) => panic,
    };
    let why = host::panic_message(&*panic);
    error!("disk job panicked: {why}");
    Some(match scanned_mount {
        Some(mount) => Done::Scanned { mount, result: Err(ScanError::Panicked(why)) },
        None if icanhaz => Done::Icanhaz(Err(PrepareError::Panicked(why))),
        None if resync => Done::Resynced(Err(WalkError::Panicked(why))),
        None if save => Done::Saved(Err(SaveError::Panicked(why))),
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
) -> Result<RecommendedWatcher, WatchError> {
    let events_root = root.clone();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<Event>| {
        if calls_for_rescan(&event, &events_root) {
            reporter.report_once(key, mount as u64, Box::new(Done::Dirty { mount }));
        }
    })
    .map_err(|source| WatchError { root: root.clone(), source })?;
    watcher
        .watch(&root, RecursiveMode::Recursive)
        .map_err(|source| WatchError { root: root.clone(), source })?;
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
    use crate::filemq::work::{FileMeta, Snapshot};
    use std::collections::HashSet;
    use std::time::{Duration, Instant};

    /// Reports kept until taken, at most one waiting per tag, as the
    /// host's worker keeps them.
    #[derive(Default)]
    struct Reports(Mutex<Waiting>);

    /// Reports `(key, mount)` waiting, and their tags.
    type Waiting = (Vec<(u64, MountId)>, HashSet<u64>);

    impl Reporter for Reports {
        fn report(&self, _: u64, _: host::Done) {
            panic!("FILEMQ reports only once per mount");
        }
        fn report_once(&self, key: u64, tag: u64, done: host::Done) {
            let Ok(done) = done.downcast::<Done>() else { panic!("not a FILEMQ outcome") };
            let Done::Dirty { mount } = *done else { panic!("only Dirty is reported") };
            let mut waiting = self.0.lock().unwrap();
            if waiting.1.insert(tag) {
                waiting.0.push((key, mount));
            }
        }
    }

    impl Reports {
        fn take(&self) -> Vec<(u64, MountId)> {
            let mut waiting = self.0.lock().unwrap();
            waiting.1.clear();
            std::mem::take(&mut waiting.0)
        }

        /// What arrives within `limit`, waiting for at least one.
        fn wait(&self, limit: Duration) -> Vec<(u64, MountId)> {
            let deadline = Instant::now() + limit;
            loop {
                let got = self.take();
                if !got.is_empty() || Instant::now() >= deadline {
                    return got;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }

    fn run(executor: &DiskExecutor, reports: &Arc<Reports>, key: u64, job: Job) -> Option<Done> {
        let reporter: Arc<dyn Reporter> = Arc::clone(reports) as Arc<dyn Reporter>;
        host::Executor::run(executor, key, Box::new(job), &reporter).map(|d| *d.downcast::<Done>().unwrap())
    }

    fn scan_job(mount: MountId, root: &Path) -> Job {
        Job::Scan {
            mount,
            root: root.to_owned(),
            previous: Arc::new(Snapshot::default()),
            stable_age: Duration::ZERO,
            digest_cache: None,
        }
    }

    #[test]
    fn scans_and_reads_answer_and_take_their_lanes() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("f.txt"), b"hello world").expect("write");
        let meta = std::fs::metadata(dir.path().join("f.txt")).expect("stat");
        let expect = FileMeta { size: meta.len(), mtime_ns: disk::mtime_ns(&meta), ..FileMeta::default() };
        let (executor, reports) = (DiskExecutor::new(2), Arc::new(Reports::default()));
        let read = Job::Read { root: dir.path().to_owned(), rel: "f.txt".into(), offset: 6, len: 5, expect };
        assert_eq!(host::Executor::lane(&executor, &(Box::new(read.clone()) as host::Job)), READ_LANE);
        assert_eq!(
            host::Executor::lane(&executor, &(Box::new(scan_job(5, dir.path())) as host::Job)),
            SCAN_LANE
        );
        match run(&executor, &reports, 10, scan_job(5, dir.path())) {
            Some(Done::Scanned { mount: 5, result: Ok(scanned) }) => {
                assert!(scanned.snapshot.files.contains_key("f.txt"))
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(
            matches!(run(&executor, &reports, 20, read), Some(Done::Read(Ok(bytes))) if &bytes[..] == b"world")
        );
    }

    #[test]
    fn a_watch_reports_changes_once_until_taken() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (executor, reports) = (DiskExecutor::new(2), Arc::new(Reports::default()));
        assert!(run(&executor, &reports, 42, Job::Watch { mount: 3, root: dir.path().to_owned() }).is_none());
        for name in ["a", "b", "c"] {
            std::fs::write(dir.path().join(name), b"x").expect("write");
        }
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(reports.take(), [(42, 3)], "a burst is one waiting report");
        std::fs::create_dir(dir.path().join("sub")).expect("mkdir");
        assert_eq!(reports.wait(Duration::from_secs(5)), [(42, 3)], "reported again once taken");
        host::Executor::stop(&executor);
    }

    #[test]
    fn reads_and_hidden_changes_do_not_dirty_a_watch() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("f"), b"content").expect("write");
        std::fs::create_dir(dir.path().join(".filemq")).expect("mkdir");
        let (executor, reports) = (DiskExecutor::new(2), Arc::new(Reports::default()));
        run(&executor, &reports, 1, Job::Watch { mount: 1, root: dir.path().to_owned() });
        std::thread::sleep(Duration::from_millis(100));
        reports.take();
        std::fs::write(dir.path().join(".filemq/partial"), b"x").expect("write");
        std::fs::write(dir.path().join(".hidden"), b"x").expect("write");
        // Our own scan reads (and hashes) every file.
        run(&executor, &reports, 2, scan_job(1, dir.path()));
        assert_eq!(reports.wait(Duration::from_millis(300)), []);
    }

    #[test]
    fn unwatch_stops_the_reports() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (executor, reports) = (DiskExecutor::new(2), Arc::new(Reports::default()));
        run(&executor, &reports, 1, Job::Watch { mount: 1, root: dir.path().to_owned() });
        run(&executor, &reports, 1, Job::Unwatch { mount: 1 });
        std::fs::write(dir.path().join("f"), b"x").expect("write");
        assert_eq!(reports.wait(Duration::from_millis(300)), []);
    }

    #[test]
    fn a_watch_that_cannot_be_set_up_says_so() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (executor, reports) = (DiskExecutor::new(2), Arc::new(Reports::default()));
        let done = run(&executor, &reports, 8, Job::Watch { mount: 4, root: dir.path().join("missing") });
        assert!(matches!(done, Some(Done::WatchFailed { mount: 4, .. })), "{done:?}");
    }

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
            matches!(&scan, Some(Done::Scanned { mount: 6, result: Err(why) }) if why.to_string().contains("boom")),
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
