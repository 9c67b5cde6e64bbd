//! Replies on their way out: sent at once when libzmq has room, else
//! parked per peer (bounded in bytes: a peer past the bound has stopped
//! reading and is dropped), counted in the memory budget until libzmq
//! frees them, flushed at shutdown.

use super::*;

/// Replies waiting for a peer that cannot take them now.
#[derive(Default)]
pub(super) struct Parked {
    pub(super) frames: VecDeque<Vec<u8>>,
    pub(super) bytes: usize,
}

impl Reactor {
    pub(super) fn send(&mut self, to: ConnId, frame: Vec<u8>) {
        if self.dropping.contains(&to) {
            return; // nothing more, so nothing after a lost reply
        }
        // Counted from here until libzmq frees it, or it is dropped.
        self.budget.take(frame.len());
        let frame = match self.parked.get(&to) {
            Some(_) => frame,
            None => match self.try_send(to, frame) {
                Ok(()) => return,
                Err(frame) => frame,
            },
        };
        let parked = self.parked.entry(to).or_default();
        let cost = frame.len() + PARKED_OVERHEAD;
        if parked.bytes + cost > self.max_parked_bytes {
            tracing::warn!(conn = to.0, "peer stopped reading its replies: dropping it");
            self.budget.give(frame.len());
            self.unpark(to);
            self.dropping.insert(to);
            self.gone.push(to);
            return;
        }
        parked.bytes += cost;
        parked.frames.push_back(frame);
    }

    /// Forgets the replies parked for a peer.
    pub(super) fn unpark(&mut self, conn: ConnId) {
        if let Some(parked) = self.parked.remove(&conn) {
            self.budget.give(parked.frames.iter().map(Vec::len).sum());
        }
    }

    /// Sends one frame, or gives it back if the peer cannot take it now.
    /// A frame not given back leaves the budget when libzmq is done with
    /// it, or now if it is dropped.
    pub(super) fn try_send(&mut self, to: ConnId, frame: Vec<u8>) -> Result<(), Vec<u8>> {
        let Some(routing_id) = self.peers.routing_id(to) else {
            self.budget.give(frame.len());
            return Ok(());
        };
        // The routing id goes first as a slice, so that an EAGAIN does not
        // consume the payload.
        match retry(|| self.front.send(routing_id, zmq::SNDMORE | zmq::DONTWAIT)) {
            Ok(()) => {}
            Err(zmq::Error::EAGAIN) => return Err(frame),
            Err(zmq::Error::EHOSTUNREACH) => {
                self.budget.give(frame.len());
                self.gone.push(to);
                return Ok(());
            }
            Err(e) => {
                tracing::warn!(conn = to.0, error = %e, "send failed: dropping the peer");
                self.budget.give(frame.len());
                self.gone.push(to);
                return Ok(());
            }
        }
        if let Err(e) = crate::memory::send_counted(&mut self.front, frame, &self.budget, zmq::DONTWAIT) {
            tracing::warn!(conn = to.0, error = %e, "send of a frame body failed");
        }
        Ok(())
    }

    /// Retries parked replies; true if any left.
    pub(super) fn flush_parked(&mut self) -> Result<bool, ReactorError> {
        let mut sent = false;
        let conns: Vec<ConnId> = self.parked.keys().copied().collect();
        for conn in conns {
            while let Some(frame) = self.parked.get_mut(&conn).and_then(|p| p.frames.pop_front()) {
                let cost = frame.len() + PARKED_OVERHEAD;
                if let Err(frame) = self.try_send(conn, frame) {
                    if let Some(parked) = self.parked.get_mut(&conn) {
                        parked.frames.push_front(frame);
                    }
                    break;
                }
                if let Some(parked) = self.parked.get_mut(&conn) {
                    parked.bytes -= cost;
                }
                sent = true;
            }
            if self.parked.get(&conn).is_some_and(|p| p.frames.is_empty()) {
                self.parked.remove(&conn);
            }
        }
        Ok(sent)
    }

    /// Tells every service about peers found gone (unreachable, or not
    /// reading their replies), and forgets them.
    pub(super) fn forget_gone(&mut self) {
        self.gone.sort_unstable();
        self.gone.dedup();
        while let Some(conn) = self.gone.pop() {
            self.dropping.remove(&conn);
            self.disconnect(conn);
            self.peers.remove(conn);
        }
    }

    pub(super) fn disconnect(&mut self, conn: ConnId) {
        self.unpark(conn);
        let now = Instant::now();
        for service in 0..self.services.len() {
            self.services[service].on_disconnect(conn, now, &mut self.actions);
            self.apply(service);
        }
        self.passes.note(now.elapsed(), || format!("the disconnect of connection {}", conn.0));
    }

    /// Room came back to the memory budget: requests waiting for it may
    /// move.
    pub(super) fn budget_freed(&mut self) {
        if !self.budget.take_freed() || self.budget.waiting() == 0 {
            return;
        }
        let now = Instant::now();
        for service in 0..self.services.len() {
            self.services[service].budget_freed(now, &mut self.actions);
            self.apply(service);
        }
    }

    /// Who holds the most of the memory budget: services' holdings plus
    /// replies parked here, largest first.
    pub(super) fn budget_holders(&self, n: usize) -> Vec<(ConnId, usize, String)> {
        let mut held: HashMap<ConnId, (usize, String)> = HashMap::new();
        let parked = self
            .parked
            .iter()
            .map(|(c, p)| (*c, p.frames.iter().map(Vec::len).sum(), "replies parked".to_string()));
        for (conn, bytes, what) in self.services.iter().flat_map(|s| s.holders()).chain(parked) {
            let entry = held.entry(conn).or_default();
            entry.0 += bytes;
            if !entry.1.is_empty() {
                entry.1.push_str(", ");
            }
            entry.1.push_str(&what);
        }
        let mut held: Vec<_> = held.into_iter().map(|(c, (b, w))| (c, b, w)).collect();
        held.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        held.truncate(n);
        held
    }

    /// Logs reaching the memory budget (with who holds most, at most every
    /// `BUDGET_LOG_INTERVAL`) and leaving it.
    pub(super) fn log_budget(&mut self) {
        let at = self.budget.at_limit();
        if at == self.at_budget {
            return;
        }
        self.at_budget = at;
        let (used, limit) = (self.budget.used(), self.budget.limit());
        if !at {
            if std::mem::take(&mut self.budget_warned) {
                tracing::info!(used, limit, "below the memory budget again");
            }
            return;
        }
        let now = Instant::now();
        if self.budget_logged.is_some_and(|t| now.duration_since(t) < BUDGET_LOG_INTERVAL) {
            return;
        }
        self.budget_logged = Some(now);
        self.budget_warned = true;
        let holders: Vec<String> = self
            .budget_holders(5)
            .iter()
            .map(|(c, b, w)| format!("connection {} ({w}) {b} bytes", c.0))
            .collect();
        tracing::warn!(
            used,
            limit,
            waiting = self.budget.waiting(),
            "at the memory budget (--memory-limit): writes and file chunks wait; holding most: {}",
            holders.join(", ")
        );
    }

    /// Gives parked replies a last chance to leave.
    pub(super) fn flush_at_shutdown(&mut self) {
        let deadline = Instant::now() + Duration::from_millis(LINGER_MS as u64);
        while !self.parked.is_empty() && Instant::now() < deadline {
            if !matches!(self.flush_parked(), Ok(true)) {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
}
