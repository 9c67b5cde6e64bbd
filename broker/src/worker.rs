//! Off-loop work: the threads that run services' jobs. Each service with
//! an executor gets the lanes it names (a FIFO queue and threads of its
//! own); the host never looks inside a job or an outcome.
//!
//! The reactor submits jobs and, when woken through its `mio::Waker`,
//! takes the outcomes back and hands them to the services. Reports an
//! executor makes later (a watch's changes) come back the same way, at most
//! one waiting per tag.
//!
//! Memory stays bounded by the services: each keeps its own jobs in flight
//! bounded (one read per connection, one scan per mount, for instance).

use mio::Waker;
use std::collections::{HashSet, VecDeque};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tracing::{error, warn};
use zbroker_services::work::{self, Done, Executor, Job, Reporter};

/// How long shutdown waits for a job in progress (a scan may be hashing a
/// large file) before leaving its thread to end with the process.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

/// A finished job or a report: the service number, the key the service
/// gave the job, and the outcome.
pub type Outcome = (usize, u64, Done);

/// Runs services' jobs on their executors' lanes.
pub struct Worker {
    shared: Arc<Shared>,
    /// Per service (by number), if it has work.
    services: Vec<Option<Lanes>>,
    threads: Vec<JoinHandle<()>>,
}

impl Worker {
    /// Starts the lanes of every service's executor (`None` for a service
    /// with no work); `waker` is woken whenever outcomes are ready.
    pub fn start(
        waker: Arc<Waker>,
        executors: Vec<(&str, Option<Arc<dyn Executor>>)>,
    ) -> std::io::Result<Worker> {
        let shared = Arc::new(Shared {
            waker,
            results: Mutex::default(),
            running: Mutex::new(0),
            stopped: Condvar::new(),
            in_flight: AtomicUsize::new(0),
        });
        // Built before the threads, so that if one cannot be spawned,
        // dropping it stops those already running.
        let mut worker = Worker { shared, services: Vec::new(), threads: Vec::new() };
        for (service, (name, executor)) in executors.into_iter().enumerate() {
            let Some(executor) = executor else {
                worker.services.push(None);
                continue;
            };
            let mut queues = Vec::new();
            for lane in executor.lanes() {
                let queue = Arc::new(Queue::default());
                queues.push(Arc::clone(&queue));
                for n in 0..lane.threads.max(1) {
                    let (shared, queue, executor) =
                        (Arc::clone(&worker.shared), Arc::clone(&queue), Arc::clone(&executor));
                    let reporter: Arc<dyn Reporter> =
                        Arc::new(ServiceReporter { service, shared: Arc::clone(&shared) });
                    worker.spawn(format!("{name}-{}-{n}", lane.name), move || {
                        lane_thread(service, &queue, &*executor, &reporter, &shared)
                    })?;
                }
            }
            worker.services.push(Some(Lanes { executor, queues }));
        }
        Ok(worker)
    }

    fn spawn(&mut self, name: String, body: impl FnOnce() + Send + 'static) -> std::io::Result<()> {
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
                Err(e)
            }
        }
    }

    /// Queues a job on behalf of service number `service`; its outcome
    /// comes back from [`Worker::take_done`] with `key`.
    pub fn submit(&mut self, service: usize, key: u64, job: Job) {
        let Some(Some(Lanes { executor, queues })) = self.services.get(service) else {
            error!("service {service} asked for work but has no executor: dropped");
            return;
        };
        let Some(queue) = queues.get(executor.lane(&job)) else {
            error!("service {service} named a lane it does not have: job dropped");
            return;
        };
        self.shared.in_flight.fetch_add(1, Ordering::Relaxed);
        queue.push(Task { key, job });
    }

    /// Takes every outcome ready so far, in the order they became ready.
    pub fn take_done(&self) -> Vec<Outcome> {
        let mut results = lock(&self.shared.results);
        results.once.clear();
        std::mem::take(&mut results.done)
    }

    /// Jobs submitted that have not finished running.
    pub fn in_flight(&self) -> usize {
        self.shared.in_flight.load(Ordering::Relaxed)
    }
}

impl Drop for Worker {
    /// Drops queued jobs, stops the threads and the executors (watches end)
    /// and joins the threads, unless a job still running outlasts
    /// [`SHUTDOWN_GRACE`].
    fn drop(&mut self) {
        for Lanes { executor, queues } in self.services.iter().flatten() {
            queues.iter().for_each(|queue| queue.close());
            executor.stop();
        }
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
            warn!("{busy} worker thread(s) still busy at shutdown: not waiting for them");
            return;
        }
        for thread in self.threads.drain(..) {
            if thread.join().is_err() {
                error!("a worker thread panicked");
            }
        }
    }
}

/// A service's executor and the queues of its lanes.
struct Lanes {
    executor: Arc<dyn Executor>,
    queues: Vec<Arc<Queue>>,
}

/// One job and the key its outcome goes back with.
struct Task {
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

/// What the threads (and executors' own threads) share with the reactor.
struct Shared {
    waker: Arc<Waker>,
    results: Mutex<Results>,
    /// Worker threads not yet ended, so that shutdown can wait for them
    /// with a deadline (a `JoinHandle` has none).
    running: Mutex<usize>,
    stopped: Condvar,
    in_flight: AtomicUsize,
}

#[derive(Default)]
struct Results {
    done: Vec<Outcome>,
    /// `(service, tag)` of reports in `done` that later ones need not repeat.
    once: HashSet<(usize, u64)>,
}

impl Shared {
    fn deliver(&self, outcome: Outcome) {
        lock(&self.results).done.push(outcome);
        self.wake();
    }

    fn wake(&self) {
        if let Err(e) = self.waker.wake() {
            // Outcomes are still taken on the reactor's next wake-up.
            warn!("cannot wake the reactor: {e}");
        }
    }
}

/// A service's way to report outside a job's return.
struct ServiceReporter {
    service: usize,
    shared: Arc<Shared>,
}

impl Reporter for ServiceReporter {
    fn report(&self, key: u64, done: Done) {
        self.shared.deliver((self.service, key, done));
    }

    fn report_once(&self, key: u64, tag: u64, done: Done) {
        let mut results = lock(&self.shared.results);
        if results.once.insert((self.service, tag)) {
            results.done.push((self.service, key, done));
            drop(results);
            self.shared.wake();
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

fn lane_thread(
    service: usize,
    queue: &Queue,
    executor: &dyn Executor,
    reporter: &Arc<dyn Reporter>,
    shared: &Shared,
) {
    while let Some(Task { key, job }) = queue.pop() {
        // An executor turns the panics it cares about into outcomes; one it
        // lets through costs this job's answer, not the thread.
        let done =
            catch_unwind(AssertUnwindSafe(|| executor.run(key, job, reporter))).unwrap_or_else(|panic| {
                error!("a job of service {service} panicked: {}", work::panic_message(&*panic));
                None
            });
        shared.in_flight.fetch_sub(1, Ordering::Relaxed);
        if let Some(done) = done {
            shared.deliver((service, key, done));
        }
    }
}

#[cfg(test)]
mod tests {
    //! The host's worker with a toy executor: jobs come back to whoever
    //! asked, lanes keep their order, reports wait once per tag, a panic
    //! costs one answer, shutdown ends the threads. (FILEMQ's executor has
    //! its own tests in `services/src/filemq/executor.rs`.)
    use super::*;
    use mio::{Events, Poll, Token};
    use zbroker_services::work::Lane;

    const WAKE: Token = Token(7);

    /// Jobs of the toy executor.
    enum Toy {
        /// Answers `n * 2` after `ms` milliseconds.
        Double {
            n: u64,
            ms: u64,
        },
        /// Reports `n` three times with one tag, then answers nothing.
        Report {
            n: u64,
        },
        Panic,
    }

    struct ToyExecutor;

    impl Executor for ToyExecutor {
        fn lanes(&self) -> Vec<Lane> {
            vec![Lane { name: "slow", threads: 1 }, Lane { name: "quick", threads: 2 }]
        }
        fn lane(&self, job: &Job) -> usize {
            match job.downcast_ref::<Toy>() {
                Some(Toy::Double { ms, .. }) if *ms > 0 => 0,
                _ => 1,
            }
        }
        fn run(&self, key: u64, job: Job, reporter: &Arc<dyn Reporter>) -> Option<Done> {
            match *job.downcast::<Toy>().ok()? {
                Toy::Double { n, ms } => {
                    std::thread::sleep(Duration::from_millis(ms));
                    Some(Box::new(n * 2))
                }
                Toy::Report { n } => {
                    for _ in 0..3 {
                        reporter.report_once(key, 7, Box::new(n));
                    }
                    None
                }
                Toy::Panic => panic!("boom"),
            }
        }
    }

    struct Harness {
        poll: Poll,
        events: Events,
        worker: Worker,
    }

    impl Harness {
        /// Two services with the toy executor, and one without work.
        fn new() -> Harness {
            let poll = Poll::new().expect("poll");
            let waker = Arc::new(Waker::new(poll.registry(), WAKE).expect("waker"));
            let toy = || Some(Arc::new(ToyExecutor) as Arc<dyn Executor>);
            let worker =
                Worker::start(waker, vec![("a", toy()), ("b", toy()), ("none", None)]).expect("worker");
            Harness { poll, events: Events::with_capacity(8), worker }
        }

        fn submit(&mut self, service: usize, key: u64, job: Toy) {
            self.worker.submit(service, key, Box::new(job));
        }

        /// Waits (briefly) until no job is in flight: a job leaves the count
        /// just after its outcome is delivered.
        fn settled(&self) -> bool {
            let deadline = Instant::now() + Duration::from_secs(2);
            while self.worker.in_flight() > 0 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            self.worker.in_flight() == 0
        }

        /// Outcomes (as numbers) until `count` have arrived.
        fn wait_for(&mut self, count: usize) -> Vec<(usize, u64, u64)> {
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut outcomes = Vec::new();
            while outcomes.len() < count {
                let left = deadline.saturating_duration_since(Instant::now());
                assert!(!left.is_zero(), "only {outcomes:?} after 10 s");
                self.poll.poll(&mut self.events, Some(left)).expect("poll");
                outcomes.extend(
                    self.worker.take_done().into_iter().map(|(service, key, done)| {
                        (service, key, *done.downcast::<u64>().expect("a number"))
                    }),
                );
            }
            outcomes
        }
    }

    #[test]
    fn outcomes_come_back_to_whoever_asked() {
        let mut harness = Harness::new();
        harness.submit(0, 10, Toy::Double { n: 1, ms: 0 });
        harness.submit(1, 20, Toy::Double { n: 2, ms: 0 });
        let mut outcomes = harness.wait_for(2);
        outcomes.sort();
        assert_eq!(outcomes, [(0, 10, 2), (1, 20, 4)]);
        assert!(harness.settled());
    }

    #[test]
    fn a_quick_lane_does_not_wait_behind_a_slow_one() {
        let mut harness = Harness::new();
        harness.submit(0, 1, Toy::Double { n: 1, ms: 300 });
        harness.submit(0, 2, Toy::Double { n: 2, ms: 0 });
        assert_eq!(harness.wait_for(1), [(0, 2, 4)], "the quick job first");
        assert_eq!(harness.wait_for(1), [(0, 1, 2)]);
    }

    #[test]
    fn a_lane_of_one_thread_keeps_the_order_asked_for() {
        let mut harness = Harness::new();
        for (key, ms) in [(1, 50), (2, 1), (3, 20)] {
            harness.submit(0, key, Toy::Double { n: key, ms });
        }
        let keys: Vec<u64> = harness.wait_for(3).into_iter().map(|(_, key, _)| key).collect();
        assert_eq!(keys, [1, 2, 3]);
    }

    #[test]
    fn a_report_waits_once_per_tag_until_taken() {
        let mut harness = Harness::new();
        harness.submit(1, 5, Toy::Report { n: 9 });
        // Once the job has returned, all three reports were made.
        assert!(harness.settled());
        assert_eq!(harness.wait_for(1), [(1, 5, 9)], "three reports, one waiting");
        harness.submit(1, 5, Toy::Report { n: 8 });
        assert_eq!(harness.wait_for(1), [(1, 5, 8)], "reported again once taken");
        assert!(harness.settled(), "a report is not a job in flight");
    }

    #[test]
    fn a_panicking_job_costs_its_answer_not_the_thread() {
        let mut harness = Harness::new();
        harness.submit(0, 1, Toy::Panic);
        harness.submit(0, 2, Toy::Double { n: 3, ms: 0 });
        assert_eq!(harness.wait_for(1), [(0, 2, 6)]);
        assert!(harness.settled(), "the panicked job is no longer in flight");
    }

    #[test]
    fn work_of_a_service_without_an_executor_is_dropped() {
        let mut harness = Harness::new();
        harness.submit(2, 1, Toy::Double { n: 1, ms: 0 });
        harness.submit(7, 1, Toy::Double { n: 1, ms: 0 });
        assert_eq!(harness.worker.in_flight(), 0);
    }

    #[test]
    fn dropping_the_worker_stops_its_threads() {
        let mut harness = Harness::new();
        harness.submit(0, 1, Toy::Double { n: 1, ms: 0 });
        let _ = harness.wait_for(1);
        let shared = Arc::clone(&harness.worker.shared);
        let started = Instant::now();
        drop(harness);
        assert!(started.elapsed() < SHUTDOWN_GRACE);
        assert_eq!(*lock(&shared.running), 0);
    }
}
