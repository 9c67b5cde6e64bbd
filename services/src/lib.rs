//! The broker's services as deterministic state machines.
//!
//! A service never touches a socket or a clock. The reactor (in the `zbroker`
//! crate) hands it a frame from a connection together with the current time,
//! timer expiries and disconnect notices; the service answers with
//! [`Action`]s that the reactor carries out. That makes every service
//! testable with a simulated clock ([`sim`]), and lets one reactor host any
//! number of services, each reached by its protocol signature.

use bytes::Bytes;
use std::sync::Arc;
use std::time::Instant;

pub use command::{Command, CommandError, CommandFor, Success};

pub mod budget;
pub mod command;
pub mod filemq;
pub mod link;
pub mod replace;
pub mod sim;
pub mod work;
pub mod zpipes;

/// One peer connection, as numbered by the reactor. Never reused while the
/// broker runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct ConnId(pub u64);

/// A number a service keeps, typed for `zbroker status` (where it appears
/// under the service, beside [`Service::status`]) and later for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counter {
    /// `snake_case`, unique within the service.
    pub name: &'static str,
    /// One line for an operator.
    pub help: &'static str,
    pub kind: CounterKind,
    pub value: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CounterKind {
    /// Only ever grows (bytes sent since start).
    Total,
    /// Goes up and down (connections now).
    Gauge,
    /// A setting, constant while the broker runs.
    Setting,
}

impl Counter {
    pub const fn total(name: &'static str, help: &'static str, value: u64) -> Counter {
        Counter { name, help, kind: CounterKind::Total, value }
    }
    pub const fn gauge(name: &'static str, help: &'static str, value: u64) -> Counter {
        Counter { name, help, kind: CounterKind::Gauge, value }
    }
    pub const fn setting(name: &'static str, help: &'static str, value: u64) -> Counter {
        Counter { name, help, kind: CounterKind::Setting, value }
    }
}

/// A service's part of `zbroker status`: what its `status` shows, and its
/// counters by name.
pub fn status_of(service: &dyn Service) -> serde_json::Value {
    let mut status = service.status();
    if let Some(fields) = status.as_object_mut() {
        for counter in service.counters() {
            fields.insert(counter.name.to_string(), counter.value.into());
        }
    }
    status
}

/// A timer owned by one service; the service chooses what the key means.
pub type TimerKey = u64;

pub use link::{LinkDown, LinkEvent, LinkKey, LinkOptions};

/// What a service asks the reactor to do.
#[derive(Debug)]
pub enum Action {
    /// Send one frame to a connection. If the peer has gone, the frame is
    /// dropped and the service gets [`Service::on_disconnect`].
    Send { to: ConnId, frame: Vec<u8> },
    /// Call [`Service::on_timer`] with `key` at `at`; replaces any timer
    /// with the same key.
    SetTimer { key: TimerKey, at: Instant },
    /// Forget the timer with this key, if any.
    CancelTimer { key: TimerKey },
    /// The answer to control request `request`, which
    /// [`Service::command`] left open ([`Answer::Later`]).
    Reply { request: u64, result: Result<Success, CommandError> },
    /// Run `job` off the event loop, on the service's [`Service::executor`];
    /// its outcome comes back through [`Service::on_work`] with the same
    /// `key`.
    Work { key: u64, job: work::Job },

    // Outbound links (`link.rs`): opened, used and closed by the host.
    /// Open a link to `endpoint` (replacing the service's link `key`, if
    /// any); its events come to [`Service::on_link`].
    Connect { key: LinkKey, endpoint: String, options: LinkOptions },
    /// Send one frame on link `key` (dropped, and counted, unless the link
    /// is up).
    LinkSend { key: LinkKey, frame: Vec<u8> },
    /// Close link `key`, if open; no event follows.
    Disconnect { key: LinkKey },
}

/// What a service says to a control command.
#[derive(Debug)]
pub enum Answer {
    /// The reply (`Err` is shown to the operator as the failure).
    Now(Result<Success, CommandError>),
    /// The reply comes later as an [`Action::Reply`] with the request's
    /// number: the command waits for work off the loop (a file saved).
    Later,
}

/// A protocol service hosted by the reactor.
pub trait Service {
    /// Name for logs and status ("zpipes").
    fn name(&self) -> &'static str;
    /// The protocol signature that opens every frame meant for this service
    /// (two services with one signature are refused at start-up).
    fn signature(&self) -> u16;
    /// The service's well-known local endpoint on the broker called
    /// `broker` (`ipc://@/zpipes/NAME`), bound besides every `--bind`.
    fn local_endpoint(&self, broker: &str) -> String;
    /// The largest frame a client may legitimately send it: the front
    /// socket refuses larger ones before buffering them.
    fn max_frame(&self) -> usize;
    /// Reply bytes the host may hold for one peer that is slow to read
    /// (the largest reply or two, or the most a peer may have asked for);
    /// a peer past it has stopped reading and is dropped.
    fn max_parked(&self) -> usize;
    /// What runs this service's [`Action::Work`]: the one place it does
    /// blocking I/O. `None` for a service that asks for none.
    fn executor(&self) -> Option<Arc<dyn work::Executor>> {
        None
    }
    /// The host is up: work to start with (first scans of the mounts
    /// given on the command line).
    fn start(&mut self, now: Instant, out: &mut Vec<Action>) {
        let _ = (now, out);
    }
    /// A frame from `conn` whose first two bytes are [`Service::signature`].
    fn handle(&mut self, conn: ConnId, frame: Bytes, now: Instant, out: &mut Vec<Action>);
    /// A timer set by this service has come due.
    fn on_timer(&mut self, key: TimerKey, now: Instant, out: &mut Vec<Action>);
    /// The outcome of an [`Action::Work`] this service asked for (or, for a
    /// watch, a change it reports).
    fn on_work(&mut self, key: u64, done: work::Done, now: Instant, out: &mut Vec<Action>) {
        let _ = (key, done, now, out);
    }
    /// The words of a control command (`zbroker publish …`: the verb
    /// first, no token), parsed into this service's own [`Command`] type.
    /// `None` if the verb is not this service's; a [`CommandError`] saying
    /// what is wrong (usage) if the words are not a command.
    fn parse_command(&self, words: &[String]) -> Option<Result<Command, CommandError>> {
        let _ = words;
        None
    }
    /// Carries out a command this service parsed (or the host built for it
    /// by name, as SIGHUP's reload does), numbered `request` by the host:
    /// answered now, or later by an [`Action::Reply`].
    fn command(&mut self, request: u64, command: Command, now: Instant, out: &mut Vec<Action>) -> Answer {
        let _ = (request, command, now, out);
        Answer::Now(Err(CommandError::new(crate::command::ForeignCommand { service: self.name() })))
    }
    /// The protocol's "no" to the first frame of a connection the broker
    /// will not take (it is at its connection limit), if the protocol has
    /// one; the connection is then not tracked.
    fn refusal(&self, frame: &[u8], why: &str) -> Option<Vec<u8>> {
        let _ = (frame, why);
        None
    }
    /// The broker is stopping: refuse new work, tell clients what will not
    /// be done, and let what was acknowledged be delivered.
    fn shutdown(&mut self, now: Instant, out: &mut Vec<Action>) {
        let _ = (now, out);
    }
    /// Nothing acknowledged is still waiting to be delivered (checked while
    /// the broker stops, until a deadline).
    fn drained(&self) -> bool {
        true
    }
    /// Room was given back to the memory budget by someone else (the host
    /// sent parked replies, libzmq freed sent ones): requests waiting for
    /// room may move.
    fn budget_freed(&mut self, now: Instant, out: &mut Vec<Action>) {
        let _ = (now, out);
    }
    /// The connections holding bytes of the memory budget: how many, and
    /// what they are to an operator (for status and logs; any order).
    fn holders(&self) -> Vec<(ConnId, usize, String)> {
        Vec::new()
    }
    /// The peer behind `conn` has disconnected; forget it.
    fn on_disconnect(&mut self, conn: ConnId, now: Instant, out: &mut Vec<Action>);
    /// What `zbroker status` shows of the service beyond its
    /// [`Service::counters`] (lists, names: structure that is no number).
    fn status(&self) -> serde_json::Value;
    /// The numbers the service keeps.
    fn counters(&self) -> Vec<Counter> {
        Vec::new()
    }

    // Outbound links (`link.rs`).
    /// Links the service may hold open at once (a `Connect` beyond it gets
    /// a final `Down`); 0, the default, for a service that opens none.
    fn max_links(&self) -> usize {
        0
    }
    /// Something happened to the service's link `key`.
    fn on_link(&mut self, key: LinkKey, event: LinkEvent, now: Instant, out: &mut Vec<Action>) {
        let _ = (key, event, now, out);
    }
}
