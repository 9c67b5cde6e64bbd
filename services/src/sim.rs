//! A simulated world for driving a [`Service`] without sockets: a clock
//! that moves only when told, a timer table, per-connection inboxes of the
//! frames the service sent, and an injected [`Executor`] that runs the
//! service's work inline. Unit tests, property tests and fuzz targets share
//! it.

use crate::link::{LimitOf, LinkDown, LinkEvent, LinkKey, LinkOptions};
use crate::work::{Done, Executor, Job, Reporter};
use crate::{Action, Command, CommandError, ConnId, Service, Success, TimerKey};
use bytes::Bytes;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Reports an executor makes outside a job's return, kept until the
/// simulation delivers them.
#[derive(Default)]
struct Reports {
    waiting: Mutex<Waiting>,
}

#[derive(Default)]
struct Waiting {
    reports: VecDeque<(u64, Done)>,
    /// Tags of `report_once` reports among them.
    tags: HashSet<u64>,
}

impl Reporter for Reports {
    fn report(&self, key: u64, done: Done) {
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner).reports.push_back((key, done));
    }

    fn report_once(&self, key: u64, tag: u64, done: Done) {
        let mut waiting = self.waiting.lock().unwrap_or_else(PoisonError::into_inner);
        if waiting.tags.insert(tag) {
            waiting.reports.push_back((key, done));
        }
    }
}

pub struct Sim<S: Service> {
    pub service: S,
    pub now: Instant,
    timers: HashMap<TimerKey, Instant>,
    /// Timers armed while timers fire, for a time already reached: like
    /// the reactor, they wait for the next pass (the next `advance`).
    next_pass: std::collections::HashSet<TimerKey>,
    /// Timers are firing (inside `advance`).
    firing: bool,
    inboxes: BTreeMap<ConnId, VecDeque<Vec<u8>>>,
    /// Work the service asked for, not yet run.
    work: VecDeque<(u64, Job)>,
    /// When set, work waits for [`Sim::run_work`]; otherwise it runs
    /// inline as soon as it is asked for.
    pub hold_work: bool,
    executor: Option<Arc<dyn Executor>>,
    /// The same executor, for tests that look into it.
    executor_any: Option<Arc<dyn std::any::Any + Send + Sync>>,
    reports: Arc<Reports>,
    /// Answers to control commands that came later, by request number.
    replies: HashMap<u64, Result<Success, CommandError>>,
    next_request: u64,
    // Outbound links.
    links: BTreeMap<LinkKey, SimLink>,
    /// Every `Connect` and `Disconnect` the service asked for, in order.
    pub link_history: Vec<LinkRecord>,
}

/// A link as the simulation keeps it: what the service asked for, what it
/// sent, and whether the events injected so far leave it up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimLink {
    pub endpoint: String,
    pub options: LinkOptions,
    pub up: bool,
    /// Frames sent while up, not yet taken ([`Sim::take_link_frames`]).
    pub sent: VecDeque<Vec<u8>>,
    /// Frames sent while not up: the host drops them.
    pub dropped: u64,
}

/// A link action the service took.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkRecord {
    Connect { key: LinkKey, endpoint: String },
    Disconnect { key: LinkKey },
}

impl<S: Service> Sim<S> {
    /// A simulation of a service that asks for no work.
    pub fn new(service: S) -> Self {
        Sim {
            service,
            now: Instant::now(),
            timers: HashMap::new(),
            next_pass: Default::default(),
            firing: false,
            inboxes: BTreeMap::new(),
            work: VecDeque::new(),
            hold_work: false,
            executor: None,
            executor_any: None,
            reports: Arc::default(),
            replies: HashMap::new(),
            next_request: 0,
            links: BTreeMap::new(),
            link_history: Vec::new(),
        }
    }

    /// A simulation whose work `executor` runs inline (FILEMQ's
    /// `DiskExecutor::recording()`: the real disk, watches only recorded).
    pub fn with_executor<E: Executor + 'static>(service: S, executor: Arc<E>) -> Self {
        let any: Arc<dyn std::any::Any + Send + Sync> = Arc::clone(&executor) as _;
        Sim { executor: Some(executor), executor_any: Some(any), ..Sim::new(service) }
    }

    /// The executor given to [`Sim::with_executor`], if it is an `E`.
    pub fn executor<E: Executor + 'static>(&self) -> Option<&E> {
        self.executor_any.as_ref()?.downcast_ref::<E>()
    }

    fn apply(&mut self, actions: Vec<Action>) {
        // Final `Down`s the host would give at once (a link limit), handed
        // over once these actions are applied, as the reactor does.
        let mut refused = Vec::new();
        for action in actions {
            match action {
                Action::Send { to, frame } => self.inboxes.entry(to).or_default().push_back(frame),
                Action::SetTimer { key, at } => {
                    self.timers.insert(key, at);
                    if self.firing && at <= self.now {
                        self.next_pass.insert(key);
                    } else {
                        self.next_pass.remove(&key);
                    }
                }
                Action::CancelTimer { key } => {
                    self.timers.remove(&key);
                    self.next_pass.remove(&key);
                }
                Action::Reply { request, result } => {
                    self.replies.insert(request, result);
                }
                Action::Work { key, job } => self.work.push_back((key, job)),
                Action::Connect { key, endpoint, options } => {
                    if let Some(down) = self.connect(key, endpoint, options) {
                        refused.push((key, down));
                    }
                }
                Action::LinkSend { key, frame } => match self.links.get_mut(&key) {
                    Some(link) if link.up => link.sent.push_back(frame),
                    Some(link) => link.dropped += 1,
                    None => {}
                },
                Action::Disconnect { key } => {
                    self.link_history.push(LinkRecord::Disconnect { key });
                    self.links.remove(&key);
                }
            }
        }
        for (key, why) in refused {
            self.link_event(key, LinkEvent::Down { why });
        }
        if !self.hold_work {
            self.run_work();
        }
    }

    /// Records a link (as the reactor would open it), or the `Down` the
    /// service's link limit gives.
    fn connect(&mut self, key: LinkKey, endpoint: String, options: LinkOptions) -> Option<LinkDown> {
        self.link_history.push(LinkRecord::Connect { key, endpoint: endpoint.clone() });
        if !self.links.contains_key(&key) && self.links.len() >= self.service.max_links() {
            return Some(LinkDown::LimitReached { limit: self.service.max_links(), whose: LimitOf::Service });
        }
        let link = SimLink { endpoint, options, up: false, sent: VecDeque::new(), dropped: 0 };
        self.links.insert(key, link);
        None
    }

    /// Hands the service an event of its link `key`, as the host would: an
    /// `Up` or a retrying `Down` moves the link's state, a final `Down`
    /// forgets it. An event for a link not open is delivered all the same
    /// (a test may mean it).
    pub fn link_event(&mut self, key: LinkKey, event: LinkEvent) {
        match (&event, self.links.get_mut(&key)) {
            (LinkEvent::Up, Some(link)) => link.up = true,
            (LinkEvent::Down { why }, Some(link)) if why.retrying() => link.up = false,
            (LinkEvent::Down { .. }, Some(_)) => {
                self.links.remove(&key);
            }
            _ => {}
        }
        let mut out = Vec::new();
        self.service.on_link(key, event, self.now, &mut out);
        self.apply(out);
    }

    /// The service's link `key`, if open.
    pub fn link(&self, key: LinkKey) -> Option<&SimLink> {
        self.links.get(&key)
    }

    /// The keys of the links open now.
    pub fn open_links(&self) -> Vec<LinkKey> {
        self.links.keys().copied().collect()
    }

    /// Takes every frame sent on link `key` so far.
    pub fn take_link_frames(&mut self, key: LinkKey) -> Vec<Vec<u8>> {
        self.links.get_mut(&key).map(|l| l.sent.drain(..).collect()).unwrap_or_default()
    }

    /// Runs every piece of work asked for so far (and any it leads to), in
    /// order, delivering each outcome before the next job starts.
    pub fn run_work(&mut self) {
        while let Some((key, job)) = self.work.pop_front() {
            let executor =
                self.executor.as_ref().expect("work asked for in a simulation without an executor");
            let reporter: Arc<dyn Reporter> = Arc::clone(&self.reports) as Arc<dyn Reporter>;
            if let Some(done) = executor.run(key, job, &reporter) {
                self.deliver(key, done);
            }
        }
    }

    /// Delivers what the executor reported outside a job's return.
    pub fn deliver_reports(&mut self) {
        let reports =
            std::mem::take(&mut *self.reports.waiting.lock().unwrap_or_else(PoisonError::into_inner));
        for (key, done) in reports.reports {
            self.deliver(key, done);
        }
    }

    /// Number of jobs waiting (with `hold_work`).
    pub fn pending_work(&self) -> usize {
        self.work.len()
    }

    /// Hands the service the outcome of a piece of work, or a watch event.
    pub fn deliver(&mut self, key: u64, done: Done) {
        let mut out = Vec::new();
        self.service.on_work(key, done, self.now, &mut out);
        let hold = std::mem::replace(&mut self.hold_work, true);
        self.apply(out);
        self.hold_work = hold;
    }

    /// Tells the service that the broker is stopping.
    pub fn shutdown(&mut self) {
        let mut out = Vec::new();
        self.service.shutdown(self.now, &mut out);
        self.apply(out);
    }

    /// Sends a control command's words, as `zbroker publish` does (verb
    /// first, no token), and returns its answer: `None` if the service
    /// does not know the verb, or (with `hold_work`) if the answer waits
    /// for work not run yet (then see [`Sim::reply`] with
    /// [`Sim::last_request`]). Words that are no command are answered
    /// with the service's parse error.
    pub fn command(&mut self, words: &[&str]) -> Option<Result<Success, CommandError>> {
        let words: Vec<String> = words.iter().map(|w| w.to_string()).collect();
        match self.service.parse_command(&words)? {
            Ok(command) => self.execute(command),
            Err(usage) => Some(Err(usage)),
        }
    }

    /// Hands the service a typed command, as SIGHUP's reload does; the
    /// answer as for [`Sim::command`].
    pub fn execute(&mut self, command: Command) -> Option<Result<Success, CommandError>> {
        let mut out = Vec::new();
        let request = self.next_request;
        self.next_request += 1;
        let answer = self.service.command(request, command, self.now, &mut out);
        self.apply(out);
        match answer {
            crate::Answer::Now(result) => Some(result),
            crate::Answer::Later => self.replies.remove(&request),
        }
    }

    /// The number of the last control command sent.
    pub fn last_request(&self) -> u64 {
        self.next_request.saturating_sub(1)
    }

    /// The answer that came later to control request `request`, if it has.
    pub fn reply(&mut self, request: u64) -> Option<Result<Success, CommandError>> {
        self.replies.remove(&request)
    }

    /// Delivers a raw frame from `conn`.
    pub fn send_raw(&mut self, conn: u64, frame: impl Into<Bytes>) {
        let mut out = Vec::new();
        self.service.handle(ConnId(conn), frame.into(), self.now, &mut out);
        self.apply(out);
    }

    /// Tells the service that `conn` has disconnected.
    pub fn disconnect(&mut self, conn: u64) {
        let mut out = Vec::new();
        self.service.on_disconnect(ConnId(conn), self.now, &mut out);
        self.apply(out);
    }

    /// Moves the clock forward, firing due timers in deadline order.
    pub fn advance(&mut self, by: Duration) {
        let end = self.now + by;
        // What the last pass put off is due in this one.
        let mut put_off = std::mem::take(&mut self.next_pass);
        self.firing = true;
        loop {
            let next = self
                .timers
                .iter()
                .filter(|(key, at)| **at <= end && (!self.next_pass.contains(key) || put_off.contains(key)))
                .min_by_key(|(key, at)| (**at, **key))
                .map(|(key, at)| (*key, *at));
            let Some((key, at)) = next else { break };
            self.timers.remove(&key);
            put_off.remove(&key);
            self.now = self.now.max(at);
            let mut out = Vec::new();
            self.service.on_timer(key, self.now, &mut out);
            self.apply(out);
        }
        self.firing = false;
        self.now = end;
    }

    /// Takes every frame sent to `conn` so far.
    pub fn take_raw(&mut self, conn: u64) -> Vec<Vec<u8>> {
        self.inboxes.get_mut(&ConnId(conn)).map(|q| q.drain(..).collect()).unwrap_or_default()
    }

    /// The service's part of `zbroker status`, counters included.
    pub fn status(&self) -> serde_json::Value {
        crate::status_of(&self.service)
    }

    /// Number of armed timers (for leak checks).
    pub fn armed_timers(&self) -> usize {
        self.timers.len()
    }
}
