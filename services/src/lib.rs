//! The broker's services as deterministic state machines.
//!
//! A service never touches a socket or a clock. The reactor (in the `zbroker`
//! crate) hands it a frame from a connection together with the current time,
//! timer expiries and disconnect notices; the service answers with
//! [`Action`]s that the reactor carries out. That makes every service
//! testable with a simulated clock ([`sim`]), and lets one reactor host any
//! number of services, each reached by its protocol signature.

use bytes::Bytes;
use std::time::Instant;

pub mod budget;
pub mod filemq;
pub mod sim;
pub mod zpipes;

/// One peer connection, as numbered by the reactor. Never reused while the
/// broker runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct ConnId(pub u64);

/// A timer owned by one service; the service chooses what the key means.
pub type TimerKey = u64;

/// What a service asks the reactor to do.
#[derive(Debug, Clone)]
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
    Reply { request: u64, result: Result<String, String> },
    /// Run `job` off the event loop; its outcome comes back through
    /// [`Service::on_work`] with the same `key`.
    Work { key: u64, job: filemq::work::Job },
}

/// What a service says to a control command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// The reply (`Err` is shown to the operator as the failure).
    Now(Result<String, String>),
    /// The reply comes later as an [`Action::Reply`] with the request's
    /// number: the command waits for work off the loop (a file saved).
    Later,
}

/// A protocol service hosted by the reactor.
pub trait Service {
    /// Name for logs and status ("zpipes").
    fn name(&self) -> &'static str;
    /// The protocol signature that opens every frame meant for this service.
    fn signature(&self) -> u16;
    /// A frame from `conn` whose first two bytes are [`Service::signature`].
    fn handle(&mut self, conn: ConnId, frame: Bytes, now: Instant, out: &mut Vec<Action>);
    /// A timer set by this service has come due.
    fn on_timer(&mut self, key: TimerKey, now: Instant, out: &mut Vec<Action>);
    /// The outcome of an [`Action::Work`] this service asked for (or, for a
    /// watch, a change it reports).
    fn on_work(&mut self, key: u64, done: filemq::work::Done, now: Instant, out: &mut Vec<Action>) {
        let _ = (key, done, now, out);
    }
    /// A command from the control endpoint (`zbroker publish …`), split into
    /// words, numbered `request` by the host. `None` if this service does
    /// not know it; otherwise its answer, now or later.
    fn command(
        &mut self,
        request: u64,
        words: &[String],
        now: Instant,
        out: &mut Vec<Action>,
    ) -> Option<Answer> {
        let _ = (request, words, now, out);
        None
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
    /// A snapshot for `zbroker status`.
    fn status(&self) -> serde_json::Value;
}
