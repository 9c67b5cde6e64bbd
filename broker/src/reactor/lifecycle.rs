//! How the loop starts and stops, and what it does between frames:
//! signals (SIGINT/SIGTERM begin a drain, a second one stops at once), the
//! drain that lets acknowledged data be delivered, services' work
//! outcomes and due timers.

use super::*;

impl Reactor {
    /// While stopping: stop once nothing is owed, or at the deadline.
    pub(super) fn check_drain(&mut self) {
        let Some(deadline) = self.draining else { return };
        // Control requests waiting for work off the loop (a mounts file
        // being saved) are owed an answer too.
        let delivered = self.services.iter().all(|s| s.drained()) && self.parked.is_empty();
        let answered = self.control_waiting.is_empty();
        if (delivered && answered) || Instant::now() >= deadline {
            if !delivered {
                tracing::warn!("stopping with acknowledged data undelivered (its readers did not read it)");
            }
            self.stop = true;
        }
    }

    /// At the very end: a control request still waiting is told the broker
    /// stopped first, rather than left to time out.
    pub(super) fn answer_waiting_at_stop(&mut self) {
        if self.control_waiting.values().any(Option::is_some) {
            // The socket closes right after: let these answers leave first.
            let _ = self.control.set_linger(LINGER_MS);
        }
        for (_, requester) in std::mem::take(&mut self.control_waiting) {
            let Some(routing_id) = requester else {
                tracing::warn!("SIGHUP: stopped before a reloaded change was finished");
                continue;
            };
            let reply = serde_json::json!({
                "error": "the broker stopped before this finished: check `zbroker status` once it runs again"
            });
            // A control client that vanished is no loss.
            let _ = self.control.send_multipart([routing_id, reply.to_string().into_bytes()], zmq::DONTWAIT);
        }
    }

    /// The first SIGINT/SIGTERM: stop accepting, let each service tell its
    /// clients and deliver what it acknowledged, for at most `DRAIN_TIME`.
    pub(super) fn begin_drain(&mut self) {
        tracing::info!("signal received: stopping (a second signal stops at once)");
        let now = Instant::now();
        self.draining = Some(now + DRAIN_TIME);
        // New peers are refused from now on (`recv_front`). The endpoints
        // stay bound: unbinding would also close the connections accepted
        // through them, and with them what they are still owed.
        for service in 0..self.services.len() {
            self.services[service].shutdown(now, &mut self.actions);
            self.apply(service);
        }
    }

    pub(super) fn check_signals(&mut self) {
        let mut buf = [0u8; 64];
        let mut any = false;
        while matches!(self.signals.read(&mut buf), Ok(n) if n > 0) {
            any = true;
        }
        if !any {
            return;
        }
        if self.draining.is_some() {
            tracing::info!("second signal: stopping now");
            self.stop = true;
        } else {
            self.begin_drain();
        }
    }

    /// Hands finished disk work back to the services that asked for it.
    pub(super) fn deliver_work(&mut self) -> bool {
        let done = self.worker.take_done();
        if done.is_empty() {
            return false;
        }
        let now = Instant::now();
        for (service, key, outcome) in done {
            let began = Instant::now();
            self.services[service].on_work(key, outcome, now, &mut self.actions);
            self.apply(service);
            let name = self.services[service].name();
            self.passes.note(began.elapsed(), || format!("{name} work outcome {key}"));
        }
        true
    }

    pub(super) fn fire_timers(&mut self) {
        let now = Instant::now();
        let mark = self.timers.mark();
        while let Some((service, key)) = self.timers.pop_due(now, mark) {
            let began = Instant::now();
            self.services[service].on_timer(key, now, &mut self.actions);
            self.apply(service);
            let name = self.services[service].name();
            self.passes.note(began.elapsed(), || format!("{name} timer {key}"));
        }
    }
}
