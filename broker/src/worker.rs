//! Disk work off the event loop: the threads that run the FILEMQ service's
//! [`Job`]s, and the file-system watches that tell it when to rescan.
//!
//! The reactor submits jobs and, when woken through its `mio::Waker`,
//! takes the outcomes back and hands them to the services. Three queues
//! keep chunk reads from waiting behind long work: one thread runs scans
//! (and sets watches up, since a recursive watch walks the whole tree
//! too), one prepares large ICANHAZ caches (and frees large holdings), the
//! others run reads.
//!
//! Memory stays bounded without limits of our own: the service keeps at
//! most one read in flight per connection and one scan per mount, and a
//! watch has at most one `Dirty` waiting per mount, however busy the tree.

use mio::Waker;
use notify::event::{AccessKind, AccessMode};
use notify::{Event, EventKind, RecommendedWatcher, RecursiveMode, Watcher as _};
use std::collections::{HashMap, HashSet, VecDeque};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tracing::{debug, error, warn};
use zbroker_services::filemq::disk;
use zbroker_services::filemq::work::{Done, Job, MountId, ReadError};

/// How long shutdown waits for a job in progress (a scan may be hashing a
/// large file) before leaving its thread to end with the process.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

/// A finished job or a watch event: the service number, the key the
/// service gave the job, and the outcome.
pub type Outcome = (usize, u64, Done);

/// Runs the FILEMQ service's disk work on its own threads.
pub struct Worker {
    shared: Arc<Shared>,
    /// Scans, watches and unwatches, in the order submitted: an `Unwatch`
    /// can never overtake the `Watch` it undoes.
    scans: Arc<Queue>,
    reads: Arc<Queue>,
    /// ICANHAZ caches to prepare and holdings to free: a second or so each,
    /// never in front of a chunk read.
    caches: Arc<Queue>,
    threads: Vec<JoinHandle<()>>,
    /// Scans and reads submitted whose outcome has not been taken yet.
    in_flight: AtomicUsize,
}

impl Worker {
    /// Starts one thread for scans and watches, one for ICANHAZ caches, and
    /// `threads - 1` (at least one) for reads; `waker` is woken whenever
    /// outcomes are ready.
    pub fn start(waker: Arc<Waker>, threads: usize) -> anyhow::Result<Worker> {
        let shared = Arc::new(Shared {
            waker,
            results: Mutex::default(),
            running: Mutex::new(0),
            stopped: Condvar::new(),
        });
        // Built before the threads, so that if one cannot be spawned,
        // dropping it stops those already running.
        let mut worker = Worker {
            shared,
            scans: Arc::default(),
            reads: Arc::default(),
            caches: Arc::default(),
            threads: Vec::new(),
            in_flight: AtomicUsize::new(0),
        };
        let (shared, scans) = (Arc::clone(&worker.shared), Arc::clone(&worker.scans));
        worker.spawn("filemq-scan".to_owned(), move || scan_thread(&scans, &shared))?;
        let (shared, caches) = (Arc::clone(&worker.shared), Arc::clone(&worker.caches));
        worker.spawn("filemq-cache".to_owned(), move || read_thread(&caches, &shared))?;
        for n in 1..threads.max(2) {
            let (shared, reads) = (Arc::clone(&worker.shared), Arc::clone(&worker.reads));
            worker.spawn(format!("filemq-read-{n}"), move || read_thread(&reads, &shared))?;
        }
        Ok(worker)
    }

    fn spawn(&mut self, name: String, body: impl FnOnce() + Send + 'static) -> anyhow::Result<()> {
        *lock(&self.shared.running) += 1;
        let shared = Arc::clone(&self.shared);
        let spawned = std::thread::Builder::new().name(name).spawn(move || {
            let _running = Running(shared);
            body();
        });
        match spawned {
            Ok(handle) => {
                self.threads.push(handle);
                Ok(())
            }
            Err(e) => {
                *lock(&self.shared.running) -= 1;
                Err(e.into())
            }
        }
    }

    /// Queues a job on behalf of service number `service`; its outcome (or,
    /// for a `Watch`, each change) comes back from [`Worker::take_done`]
    /// with `key`.
    pub fn submit(&mut self, service: usize, key: u64, job: Job) {
        let queue = match job {
            Job::Read { .. } => &self.reads,
            // A large cache takes a second or so: its own thread, so it
            // never waits behind a scan nor holds up a chunk read.
            Job::Icanhaz { .. } | Job::Discard(_) => &self.caches,
            Job::Scan { .. } | Job::Watch { .. } | Job::Unwatch { .. } => &self.scans,
        };
        if matches!(job, Job::Read { .. } | Job::Scan { .. } | Job::Icanhaz { .. }) {
            self.in_flight.fetch_add(1, Ordering::Relaxed);
        }
        queue.push(Task { service, key, job });
    }

    /// Takes every outcome ready so far, in the order they became ready.
    pub fn take_done(&self) -> Vec<Outcome> {
        let done = {
            let mut results = lock(&self.shared.results);
            results.dirty.clear();
            std::mem::take(&mut results.done)
        };
        let jobs = done
            .iter()
            .filter(|(_, _, done)| matches!(done, Done::Scanned { .. } | Done::Read(_) | Done::Icanhaz(_)))
            .count();
        self.in_flight.fetch_sub(jobs, Ordering::Relaxed);
        done
    }

    /// Scans and reads submitted whose outcome has not been taken yet.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }
}

impl Drop for Worker {
    /// Drops queued jobs, stops the threads (the scan thread drops the
    /// watches as it ends) and joins them, unless a job still running
    /// outlasts [`SHUTDOWN_GRACE`].
    fn drop(&mut self) {
        self.scans.close();
        self.reads.close();
        self.caches.close();
        let deadline = Instant::now() + SHUTDOWN_GRACE;
        let mut running = lock(&self.shared.running);
        while *running > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            running =
                self.shared.stopped.wait_timeout(running, left).unwrap_or_else(PoisonError::into_inner).0;
        }
        let busy = *running;
        drop(running);
        if busy > 0 {
            warn!("{busy} disk worker thread(s) still busy at shutdown: not waiting for them");
            return;
        }
        for thread in self.threads.drain(..) {
            if thread.join().is_err() {
                error!("a disk worker thread panicked");
            }
        }
    }
}

/// One job and whom its outcome goes to.
struct Task {
    service: usize,
    key: u64,
    job: Job,
}

/// Tasks waiting for a thread; any number of threads take from it.
#[derive(Default)]
struct Queue {
    state: Mutex<QueueState>,
    ready: Condvar,
}

#[derive(Default)]
struct QueueState {
    tasks: VecDeque<Task>,
    closed: bool,
}

impl Queue {
    fn push(&self, task: Task) {
        lock(&self.state).tasks.push_back(task);
        self.ready.notify_one();
    }

    /// The next task, waiting for one; `None` once the queue is closed.
    fn pop(&self) -> Option<Task> {
        let mut state = lock(&self.state);
        loop {
            if state.closed {
                return None;
            }
            if let Some(task) = state.tasks.pop_front() {
                return Some(task);
            }
            state = self.ready.wait(state).unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Ends every `pop`, now and later; queued tasks are dropped (the
    /// broker is stopping, nobody wants their outcome).
    fn close(&self) {
        let mut state = lock(&self.state);
        state.closed = true;
        state.tasks.clear();
        drop(state);
        self.ready.notify_all();
    }
}

/// What the threads (and the watches' own threads) share with the reactor.
struct Shared {
    waker: Arc<Waker>,
    results: Mutex<Results>,
    /// Worker threads not yet ended, so that shutdown can wait for them
    /// with a deadline (a `JoinHandle` has none).
    running: Mutex<usize>,
    stopped: Condvar,
}

#[derive(Default)]
struct Results {
    done: Vec<Outcome>,
    /// Watches with a `Dirty` in `done`, which later events need not repeat.
    dirty: HashSet<(usize, MountId)>,
}

impl Shared {
    fn deliver(&self, outcome: Outcome) {
        lock(&self.results).done.push(outcome);
        self.wake();
    }

    fn mark_dirty(&self, service: usize, key: u64, mount: MountId) {
        let mut results = lock(&self.results);
        if results.dirty.insert((service, mount)) {
            results.done.push((service, key, Done::Dirty { mount }));
            drop(results);
            self.wake();
        }
    }

    fn wake(&self) {
        if let Err(e) = self.waker.wake() {
            // Outcomes are still taken on the reactor's next wake-up.
            warn!("cannot wake the reactor: {e}");
        }
    }
}

/// Counts a worker thread as running until it ends, however it ends.
struct Running(Arc<Shared>);

impl Drop for Running {
    fn drop(&mut self) {
        *lock(&self.0.running) -= 1;
        self.0.stopped.notify_all();
    }
}

/// Locks a mutex, even one poisoned by a panic: the data behind each of
/// ours stays consistent at every point a panic could occur.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn read_thread(queue: &Queue, shared: &Shared) {
    while let Some(Task { service, key, job }) = queue.pop() {
        if let Some(done) = run_caught(job, disk::run) {
            shared.deliver((service, key, done));
        }
    }
}

/// Runs scans and keeps the watches, which end with this thread.
fn scan_thread(queue: &Queue, shared: &Arc<Shared>) {
    let mut watches: HashMap<(usize, MountId), RecommendedWatcher> = HashMap::new();
    while let Some(Task { service, key, job }) = queue.pop() {
        match job {
            Job::Watch { mount, root } => {
                // A second watch of the same mount replaces the first.
                watches.remove(&(service, mount));
                match watch(shared, service, key, mount, root) {
                    Ok(watcher) => {
                        watches.insert((service, mount), watcher);
                    }
                    Err(why) => shared.deliver((service, key, Done::WatchFailed { mount, why })),
                }
            }
            Job::Unwatch { mount } => {
                watches.remove(&(service, mount));
            }
            job => {
                if let Some(done) = run_caught(job, disk::run) {
                    shared.deliver((service, key, done));
                }
            }
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
    let panic = match catch_unwind(AssertUnwindSafe(|| run(job))) {
        Ok(done) => return done,
        Err(panic) => panic,
    };
    let why = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown cause".to_owned());
    error!("disk job panicked: {why}");
    Some(match scanned_mount {
        Some(mount) => Done::Scanned { mount, result: Err(format!("scan failed: {why}")) },
        None if icanhaz => Done::Icanhaz(Err(format!("preparing the cache failed: {why}"))),
        None => Done::Read(Err(ReadError::Io(format!("read failed: {why}")))),
    })
}

/// Watches `root` recursively; each change becomes (at most one waiting)
/// `Done::Dirty` for `mount`, delivered with `key`.
fn watch(
    shared: &Arc<Shared>,
    service: usize,
    key: u64,
    mount: MountId,
    root: PathBuf,
) -> Result<RecommendedWatcher, String> {
    let events_shared = Arc::clone(shared);
    let events_root = root.clone();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<Event>| {
        if calls_for_rescan(&event, &events_root) {
            events_shared.mark_dirty(service, key, mount);
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
    use mio::{Events, Poll, Token};
    use std::sync::Arc;
    use zbroker_services::filemq::work::{FileMeta, Snapshot};

    const WAKE: Token = Token(7);

    struct Harness {
        poll: Poll,
        events: Events,
        worker: Worker,
    }

    impl Harness {
        fn new() -> Harness {
            let poll = Poll::new().expect("poll");
            let waker = Arc::new(Waker::new(poll.registry(), WAKE).expect("waker"));
            let worker = Worker::start(waker, 3).expect("worker");
            Harness { poll, events: Events::with_capacity(8), worker }
        }

        /// Collects outcomes until `count` have arrived (or panics after a
        /// while).
        fn wait_for(&mut self, count: usize) -> Vec<Outcome> {
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut outcomes = Vec::new();
            while outcomes.len() < count {
                let left = deadline.saturating_duration_since(Instant::now());
                assert!(!left.is_zero(), "only {outcomes:?} after 10 s");
                self.poll.poll(&mut self.events, Some(left)).expect("poll");
                outcomes.extend(self.worker.take_done());
            }
            outcomes
        }

        /// Whatever arrives within `quiet`.
        fn collect_for(&mut self, quiet: Duration) -> Vec<Outcome> {
            let deadline = Instant::now() + quiet;
            let mut outcomes = Vec::new();
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return outcomes;
                }
                self.poll.poll(&mut self.events, Some(left)).expect("poll");
                outcomes.extend(self.worker.take_done());
            }
        }

        /// A scan of `root` waits for the `Watch`/`Unwatch` submitted
        /// before it: once its outcome is back, they have taken effect.
        fn settle(&mut self, root: &Path) {
            self.worker.submit(0, 999, scan_job(99, root));
            let outcomes = self.wait_for(1);
            assert!(matches!(outcomes[..], [(0, 999, Done::Scanned { .. })]), "{outcomes:?}");
        }
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

    fn dirty_mounts(outcomes: &[Outcome]) -> Vec<(u64, MountId)> {
        outcomes
            .iter()
            .filter_map(|(_, key, done)| match done {
                Done::Dirty { mount } => Some((*key, *mount)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn scans_and_reads_come_back_to_whoever_asked() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("f.txt"), b"hello world").expect("write");
        let meta = std::fs::metadata(dir.path().join("f.txt")).expect("stat");
        let expect = FileMeta { size: meta.len(), mtime_ns: disk::mtime_ns(&meta), ..FileMeta::default() };
        let mut harness = Harness::new();
        harness.worker.submit(1, 10, scan_job(5, dir.path()));
        let read = Job::Read { root: dir.path().to_owned(), rel: "f.txt".into(), offset: 6, len: 5, expect };
        harness.worker.submit(2, 20, read);
        assert_eq!(harness.worker.in_flight(), 2);

        let mut outcomes = harness.wait_for(2);
        outcomes.sort_by_key(|(service, _, _)| *service);
        match &outcomes[..] {
            [(1, 10, Done::Scanned { mount: 5, result: Ok(scanned) }), (2, 20, Done::Read(Ok(bytes)))] => {
                assert!(scanned.snapshot.files.contains_key("f.txt"));
                assert_eq!(&bytes[..], b"world");
            }
            other => panic!("unexpected outcomes {other:?}"),
        }
        assert_eq!(harness.worker.in_flight(), 0);
    }

    #[test]
    fn a_watch_reports_changes_once_until_taken() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut harness = Harness::new();
        harness.worker.submit(1, 42, Job::Watch { mount: 3, root: dir.path().to_owned() });
        harness.settle(dir.path());
        assert_eq!(harness.worker.in_flight(), 0, "a watch is not a job in flight");

        for name in ["a", "b", "c"] {
            std::fs::write(dir.path().join(name), b"x").expect("write");
        }
        // The whole burst arrives while the reactor is not taking outcomes.
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(dirty_mounts(&harness.worker.take_done()), [(42, 3)]);

        // Once taken, the next change is reported again.
        let _ = harness.collect_for(Duration::from_millis(100));
        std::fs::create_dir(dir.path().join("sub")).expect("mkdir");
        assert_eq!(dirty_mounts(&harness.wait_for(1)), [(42, 3)]);
    }

    #[test]
    fn reads_and_hidden_changes_do_not_dirty_a_watch() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("f"), b"content").expect("write");
        std::fs::create_dir(dir.path().join(".filemq")).expect("mkdir");
        let mut harness = Harness::new();
        harness.worker.submit(0, 1, Job::Watch { mount: 1, root: dir.path().to_owned() });
        harness.settle(dir.path());
        let _ = harness.collect_for(Duration::from_millis(100));

        std::fs::write(dir.path().join(".filemq/partial"), b"x").expect("write");
        std::fs::write(dir.path().join(".hidden"), b"x").expect("write");
        // Our own scan reads (and hashes) every file.
        harness.worker.submit(0, 2, scan_job(1, dir.path()));
        let outcomes = harness.collect_for(Duration::from_millis(300));
        assert_eq!(dirty_mounts(&outcomes), [], "{outcomes:?}");
    }

    #[test]
    fn unwatch_stops_the_reports() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut harness = Harness::new();
        harness.worker.submit(0, 1, Job::Watch { mount: 1, root: dir.path().to_owned() });
        harness.worker.submit(0, 1, Job::Unwatch { mount: 1 });
        harness.settle(dir.path());
        std::fs::write(dir.path().join("f"), b"x").expect("write");
        let outcomes = harness.collect_for(Duration::from_millis(300));
        assert_eq!(dirty_mounts(&outcomes), [], "{outcomes:?}");
    }

    #[test]
    fn a_watch_that_cannot_be_set_up_says_so() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut harness = Harness::new();
        harness.worker.submit(0, 8, Job::Watch { mount: 4, root: dir.path().join("missing") });
        let outcomes = harness.wait_for(1);
        assert!(matches!(outcomes[..], [(0, 8, Done::WatchFailed { mount: 4, .. })]), "{outcomes:?}");
    }

    #[test]
    fn a_panicking_job_fails_instead_of_killing_the_thread() {
        let dir = tempfile::tempdir().expect("tempdir");
        let boom = |_: Job| -> Option<Done> { panic!("boom") };
        let scan = run_caught(scan_job(6, dir.path()), boom);
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

    #[test]
    fn dropping_the_worker_stops_its_threads() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut harness = Harness::new();
        harness.worker.submit(0, 1, Job::Watch { mount: 1, root: dir.path().to_owned() });
        harness.settle(dir.path());
        let shared = Arc::clone(&harness.worker.shared);
        let started = Instant::now();
        drop(harness);
        assert!(started.elapsed() < SHUTDOWN_GRACE);
        assert_eq!(*lock(&shared.running), 0);
    }
}
