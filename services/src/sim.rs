//! A simulated world for driving a [`Service`] without sockets: a clock
//! that moves only when told, a timer table, and per-connection inboxes of
//! the frames the service sent. Unit tests, property tests and fuzz targets
//! share it.

use crate::{Action, ConnId, Service, TimerKey};
use bytes::Bytes;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

pub struct Sim<S: Service> {
    pub service: S,
    pub now: Instant,
    timers: HashMap<TimerKey, Instant>,
    inboxes: BTreeMap<ConnId, VecDeque<Vec<u8>>>,
}

impl<S: Service> Sim<S> {
    pub fn new(service: S) -> Self {
        Sim { service, now: Instant::now(), timers: HashMap::new(), inboxes: BTreeMap::new() }
    }

    fn apply(&mut self, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::Send { to, frame } => self.inboxes.entry(to).or_default().push_back(frame),
                Action::SetTimer { key, at } => {
                    self.timers.insert(key, at);
                }
                Action::CancelTimer { key } => {
                    self.timers.remove(&key);
                }
            }
        }
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
        loop {
            let next = self
                .timers
                .iter()
                .filter(|(_, at)| **at <= end)
                .min_by_key(|(key, at)| (**at, **key))
                .map(|(key, at)| (*key, *at));
            let Some((key, at)) = next else { break };
            self.timers.remove(&key);
            self.now = self.now.max(at);
            let mut out = Vec::new();
            self.service.on_timer(key, self.now, &mut out);
            self.apply(out);
        }
        self.now = end;
    }

    /// Takes every frame sent to `conn` so far.
    pub fn take_raw(&mut self, conn: u64) -> Vec<Vec<u8>> {
        self.inboxes.get_mut(&ConnId(conn)).map(|q| q.drain(..).collect()).unwrap_or_default()
    }

    /// Number of armed timers (for leak checks).
    pub fn armed_timers(&self) -> usize {
        self.timers.len()
    }
}
