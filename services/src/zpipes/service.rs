//! What the host sees of ZPIPES: the `Service` implementation, the
//! oversized-frame check before decoding, timers, shutdown, and status.

use super::*;

impl Service for Zpipes {
    fn name(&self) -> &'static str {
        "zpipes"
    }

    fn signature(&self) -> u16 {
        ZpipesMsg::SIGNATURE
    }

    fn local_endpoint(&self, broker: &str) -> String {
        zbroker_proto::zpipes::local_endpoint(broker)
    }

    fn max_frame(&self) -> usize {
        // A WRITE of the whole pipe is the largest legitimate request.
        ZpipesMsg::Write { chunk: Chunk::default(), timeout: 0 }.encoded_len() + self.config.pipe_limit
    }

    fn max_parked(&self) -> usize {
        // Room for a couple of the largest replies (a READ_OK of the whole
        // pipe); more means the peer is not reading.
        2 * self.config.pipe_limit
    }

    fn handle(&mut self, conn: ConnId, frame: Bytes, now: Instant, out: &mut Vec<Action>) {
        // Every message but WRITE (bounded by the pipe limit, answered
        // WRITE_FAILED) has a size its fields bound: a larger frame is
        // dropped unread.
        let oversized = frame
            .get(2)
            .and_then(|id| ZpipesMsg::max_len(*id))
            .is_some_and(|max| frame.len() > max + zbroker_proto::codec::TRAILING_SLACK);
        if oversized {
            self.malformed += 1;
            tracing::debug!(conn = conn.0, len = frame.len(), "zpipes dropped an oversized frame");
            return;
        }
        match ZpipesMsg::decode_ext(frame) {
            Ok((msg, bits)) => self.receive(conn, msg, bits, now, out),
            Err(error) => {
                // Dropped: one bad peer must not stop the broker (docs/protocol/ZPIPES.md "Codec").
                self.malformed += 1;
                tracing::debug!(conn = conn.0, %error, "zpipes dropped a malformed frame");
            }
        }
    }

    fn on_timer(&mut self, key: TimerKey, now: Instant, out: &mut Vec<Action>) {
        let id = ConnId(key >> 1);
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        if key == expiry_key(id) {
            if now < conn.expires_at {
                let at = conn.expires_at;
                out.push(Action::SetTimer { key, at });
            } else {
                tracing::debug!(conn = id.0, "zpipes connection expired");
                self.terminate(id, out);
                self.run_ready(now, out);
            }
            return;
        }
        conn.request_timer = false;
        self.unwait_budget(id);
        let conn = self.conns.get_mut(&id).expect("checked above");
        match conn.pending.take() {
            Some(Pending::Read { .. }) => reply(out, id, ZpipesMsg::ReadTimeout {}),
            Some(Pending::Write { .. }) => reply(out, id, ZpipesMsg::WriteTimeout {}),
            None => return,
        }
        self.ready.push_back(id);
        self.run_ready(now, out);
    }

    fn shutdown(&mut self, now: Instant, out: &mut Vec<Action>) {
        self.shutting_down = true;
        // Every pending request is decided anew: writes fail, reads get
        // what is queued or fail.
        let pending: Vec<ConnId> =
            self.conns.iter().filter(|(_, c)| c.pending.is_some()).map(|(id, _)| *id).collect();
        self.ready.extend(pending);
        self.run_ready(now, out);
    }

    fn drained(&self) -> bool {
        self.queued_bytes == 0
    }

    fn refusal(&self, frame: &[u8], why: &str) -> Option<Vec<u8>> {
        let reason = ShortStr::lossy(why);
        let reply = match ZpipesMsg::decode(Bytes::copy_from_slice(frame)).ok()? {
            ZpipesMsg::Input { .. } => ZpipesMsg::InputFailed { reason },
            ZpipesMsg::Output { .. } => ZpipesMsg::OutputFailed { reason },
            ZpipesMsg::Read { .. } => ZpipesMsg::ReadFailed { reason },
            ZpipesMsg::Write { .. } => ZpipesMsg::WriteFailed { reason },
            _ => ZpipesMsg::Invalid {},
        };
        Some(reply.encode())
    }

    fn on_disconnect(&mut self, conn: ConnId, now: Instant, out: &mut Vec<Action>) {
        if self.conns.contains_key(&conn) {
            tracing::debug!(conn = conn.0, "zpipes peer disconnected");
            self.terminate(conn, out);
            self.run_ready(now, out);
        }
    }

    fn budget_freed(&mut self, now: Instant, out: &mut Vec<Action>) {
        self.run_ready(now, out);
    }

    fn holders(&self) -> Vec<(ConnId, usize, String)> {
        self.conns
            .iter()
            .filter_map(|(id, c)| {
                let pending = match &c.pending {
                    Some(Pending::Write { chunk, .. }) => chunk.len(),
                    _ => 0,
                };
                let held = c.queue.len() + c.mailbox_bytes + pending;
                let role = match c.role {
                    Role::Reader => "reader",
                    Role::Writer => "writer",
                    Role::Idle => "no end",
                };
                let pipe = c.pipe.as_ref().map_or("(none)".into(), |p| format!("{:?}", p.to_string_lossy()));
                (held > 0).then(|| (*id, held, format!("ZPIPES {role} of pipe {pipe}")))
            })
            .collect()
    }

    fn status(&self) -> serde_json::Value {
        let mut pipes: Vec<_> = self
            .pipes
            .iter()
            .map(|(name, pipe)| {
                let queued = pipe.reader.and_then(|r| self.conns.get(&r)).map_or(0, |c| c.queue.len());
                serde_json::json!({
                    "name": name.to_string_lossy(),
                    "reader": pipe.reader.is_some(),
                    "writer": pipe.writer.is_some(),
                    "queued_bytes": queued,
                })
            })
            .collect();
        pipes.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
        serde_json::json!({ "pipes": pipes })
    }

    fn counters(&self) -> Vec<Counter> {
        let n = |v: usize| v as u64;
        vec![
            Counter::gauge("connections", "peers connected", n(self.conns.len())),
            Counter::gauge("queued_bytes", "bytes queued for readers", n(self.queued_bytes)),
            Counter::gauge("peak_queued_bytes", "most bytes ever queued at once", n(self.peak_queued_bytes)),
            Counter::gauge(
                "waiting_for_memory",
                "WRITEs waiting for the memory budget",
                n(self.budget_waiters.len()),
            ),
            Counter::total("bytes_moved", "bytes delivered to readers", self.bytes_moved),
            Counter::total("malformed_frames", "frames dropped as malformed", self.malformed),
            Counter::setting("pipe_limit", "most bytes queued for one reader", n(self.config.pipe_limit)),
            Counter::setting(
                "expiry_ms",
                "silence after which a peer is forgotten",
                self.config.expiry.as_millis() as u64,
            ),
        ]
    }
}
