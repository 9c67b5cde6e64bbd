//! Requests waiting on a connection: the FIFO mailbox moved along
//! (`advance`), a READ or WRITE made pending with its timer, and completed
//! when the pipe can satisfy it (`try_complete`), within the pipe bound and
//! the memory budget.

use super::*;

impl Zpipes {
    /// Takes the next request a connection can act on; false when it must
    /// wait.
    pub(super) fn advance(&mut self, id: ConnId, now: Instant, out: &mut Vec<Action>) -> bool {
        let Some(conn) = self.conns.get_mut(&id) else {
            return false;
        };
        if conn.pending.is_some() {
            if self.try_complete(id, out) {
                return true;
            }
            // Only CLOSE and PING may pass a pending request.
            let conn = self.conns.get_mut(&id).expect("checked above");
            let Some(at) =
                conn.mailbox.iter().position(|(m, _)| matches!(m, ZpipesMsg::Close {} | ZpipesMsg::Ping {}))
            else {
                return false;
            };
            let (msg, bits) = conn.mailbox.remove(at).expect("position is in range");
            if let ZpipesMsg::Ping {} = msg {
                let granted = grant(conn, bits);
                pong_frame(out, id, granted);
                return true;
            }
            self.unwait_budget(id);
            let conn = self.conns.get_mut(&id).expect("checked above");
            let reason = ShortStr::lossy("closed while the request was pending");
            match conn.pending.take() {
                Some(Pending::Read { .. }) => reply(out, id, ZpipesMsg::ReadFailed { reason }),
                Some(Pending::Write { .. }) => reply(out, id, ZpipesMsg::WriteFailed { reason }),
                None => {}
            }
            self.cancel_request_timer(id, out);
            self.close(id, out);
            return true;
        }
        let Some((msg, bits)) = conn.mailbox.pop_front() else {
            return false;
        };
        if let ZpipesMsg::Write { chunk, .. } = &msg {
            conn.mailbox_bytes -= chunk.0.len();
            self.config.budget.give(chunk.0.len());
        }
        let role = conn.role;
        tracing::debug!(conn = id.0, ?role, request = msg.name(), "zpipes request");
        match (role, msg) {
            (_, ZpipesMsg::Ping {}) => {
                let granted = grant(conn, bits);
                pong_frame(out, id, granted);
            }
            (Role::Idle, ZpipesMsg::Input { .. }) if self.shutting_down => {
                reply(out, id, ZpipesMsg::InputFailed { reason: ShortStr::lossy(SHUTTING_DOWN) })
            }
            (Role::Idle, ZpipesMsg::Output { .. }) if self.shutting_down => {
                reply(out, id, ZpipesMsg::OutputFailed { reason: ShortStr::lossy(SHUTTING_DOWN) })
            }
            (Role::Idle, ZpipesMsg::Input { pipename }) => self.open(id, pipename, Role::Reader, out),
            (Role::Idle, ZpipesMsg::Output { pipename }) => self.open(id, pipename, Role::Writer, out),
            (Role::Reader, ZpipesMsg::Read { size, timeout }) => {
                let size = size as usize;
                if size == 0 {
                    // Pinned by the original selftest: "end of pipe".
                    reply(out, id, ZpipesMsg::ReadEnd {});
                } else if size > self.config.pipe_limit {
                    let reason = self.too_big("read", size);
                    reply(out, id, ZpipesMsg::ReadFailed { reason });
                } else {
                    // The flag counts only once granted: a client that never
                    // asked gets exactly the original's READ.
                    let partial = conn.partial_reads && bits & PARTIAL_READ != 0;
                    self.start_pending(id, Pending::Read { size, partial }, timeout, now, out);
                }
            }
            (Role::Writer, ZpipesMsg::Write { chunk, timeout }) => {
                if chunk.0.len() > self.config.pipe_limit {
                    // Refused, and the writer is cut off from its pipe: a
                    // smaller WRITE after it must not go through and leave
                    // a hole in the stream.
                    let reason = self.too_big("write", chunk.0.len());
                    reply(out, id, ZpipesMsg::WriteFailed { reason });
                    self.detach(id);
                } else {
                    self.start_pending(
                        id,
                        Pending::Write { chunk: chunk.0, partly_queued: false },
                        timeout,
                        now,
                        out,
                    );
                }
            }
            // The wrong half of a pipe: refused, but the connection lives.
            (Role::Writer, ZpipesMsg::Read { .. }) | (Role::Reader, ZpipesMsg::Write { .. }) => {
                reply(out, id, ZpipesMsg::Invalid {})
            }
            (Role::Reader | Role::Writer, ZpipesMsg::Close {}) => {
                self.close(id, out);
            }
            // Anything else is not valid here: INVALID, and the
            // connection's state (pipe end included) is gone.
            (_, _) => {
                reply(out, id, ZpipesMsg::Invalid {});
                self.terminate(id, out);
            }
        }
        true
    }

    pub(super) fn start_pending(
        &mut self,
        id: ConnId,
        pending: Pending,
        timeout: u32,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        let conn = self.conns.get_mut(&id).expect("caller holds a live connection");
        conn.pending = Some(pending);
        if !self.try_complete(id, out) && timeout > 0 {
            let conn = self.conns.get_mut(&id).expect("still live");
            if let Some(Pending::Write { partly_queued: true, .. }) = conn.pending {
                return;
            }
            conn.request_timer = true;
            let at = now + Duration::from_millis(timeout.into());
            out.push(Action::SetTimer { key: request_key(id), at });
        }
    }

    /// Completes the pending request if it can be now.
    pub(super) fn try_complete(&mut self, id: ConnId, out: &mut Vec<Action>) -> bool {
        let limit = self.config.pipe_limit;
        // Decided anew below: waiting again re-registers.
        self.unwait_budget(id);
        let conn = self.conns.get_mut(&id).expect("caller holds a live connection");
        match conn.pending {
            None => false,
            // Stopping: what was acknowledged goes out (even short of the
            // size asked for: no more is coming), then the reader is told.
            Some(Pending::Read { .. }) if self.shutting_down && conn.queue.is_empty() => {
                conn.pending = None;
                reply(out, id, ZpipesMsg::ReadFailed { reason: ShortStr::lossy(SHUTTING_DOWN) });
                self.cancel_request_timer(id, out);
                true
            }
            Some(Pending::Write { .. }) if self.shutting_down => {
                conn.pending = None;
                reply(out, id, ZpipesMsg::WriteFailed { reason: ShortStr::lossy(SHUTTING_DOWN) });
                self.cancel_request_timer(id, out);
                true
            }
            Some(Pending::Read { size, partial }) => {
                let detached = conn.pipe.is_none() || self.shutting_down;
                let enough = conn.queue.len() >= size || (partial && !conn.queue.is_empty());
                if !enough && !detached {
                    // This READ may be filled outside the budget: a writer
                    // waiting for room can go on.
                    let writer = conn.pipe.as_ref().and_then(|p| self.pipes.get(p)).and_then(|p| p.writer);
                    if let Some(w) =
                        writer.filter(|w| self.conns.get(w).is_some_and(|c| c.budget_wait.is_some()))
                    {
                        self.ready.push_back(w);
                    }
                    return false;
                }
                conn.pending = None;
                if conn.queue.is_empty() {
                    reply(out, id, ZpipesMsg::ReadEnd {});
                } else {
                    let chunk = conn.queue.take(size);
                    self.bytes_moved += chunk.len() as u64;
                    self.queued_bytes -= chunk.len();
                    self.config.budget.give(chunk.len());
                    reply(out, id, ZpipesMsg::ReadOk { chunk: Chunk(chunk) });
                    // The writer may be waiting for room.
                    if let Some(writer) =
                        conn.pipe.as_ref().and_then(|p| self.pipes.get(p)).and_then(|p| p.writer)
                    {
                        self.ready.push_back(writer);
                    }
                }
                self.cancel_request_timer(id, out);
                true
            }
            Some(Pending::Write { ref chunk, .. }) => {
                let Some(name) = &conn.pipe else {
                    conn.pending = None;
                    let reason = ShortStr::lossy("the reader has gone before reading everything");
                    reply(out, id, ZpipesMsg::WriteFailed { reason });
                    self.cancel_request_timer(id, out);
                    return true;
                };
                let Some(reader_id) = self.pipes.get(name).and_then(|p| p.reader) else {
                    return false;
                };
                let len = chunk.len();
                let reader = self.conns.get(&reader_id).expect("a pipe's reader is live");
                let queued = reader.queue.len();
                let pipe_room = limit.saturating_sub(queued);
                // Room in the budget (the pipe's whole share, or nothing),
                // or else what the reader's pending READ still lacks.
                let need = len.min(pipe_room);
                let room = if self.config.budget.admits(queued, need) {
                    pipe_room
                } else {
                    match reader.pending {
                        Some(Pending::Read { size, .. }) => size.saturating_sub(queued).min(pipe_room),
                        _ => 0,
                    }
                };
                if len > room {
                    if room == 0 {
                        if pipe_room > 0 {
                            self.wait_budget(id, queued, need);
                        }
                        return false;
                    }
                    // Fill the queue to the bound and keep the rest pending:
                    // a reader waiting for more than is queued could
                    // otherwise wait for ever on a writer waiting for room.
                    // Part of the chunk is now delivered, so the write can
                    // no longer time out; it ends in WRITE_OK, or
                    // WRITE_FAILED if the reader leaves.
                    let conn = self.conns.get_mut(&id).expect("still live");
                    let Some(Pending::Write { chunk, partly_queued }) = conn.pending.as_mut() else {
                        unreachable!()
                    };
                    *partly_queued = true;
                    let part = chunk.split_to(room);
                    let reader = self.conns.get_mut(&reader_id).expect("a pipe's reader is live");
                    reader.queue.push(part);
                    self.queue_in(room);
                    self.ready.push_back(reader_id);
                    self.cancel_request_timer(id, out);
                    return false;
                }
                let conn = self.conns.get_mut(&id).expect("still live");
                let Some(Pending::Write { chunk, .. }) = conn.pending.take() else { unreachable!() };
                let reader = self.conns.get_mut(&reader_id).expect("a pipe's reader is live");
                reader.queue.push(chunk);
                self.queue_in(len);
                // The data is queued before anything else happens; the
                // reader is marked ready and answered once this
                // connection's turn ends (no state machine runs re-entrantly:
                // docs/protocol/ZPIPES.md "States").
                self.ready.push_back(reader_id);
                reply(out, id, ZpipesMsg::WriteOk {});
                self.cancel_request_timer(id, out);
                true
            }
        }
    }
}
