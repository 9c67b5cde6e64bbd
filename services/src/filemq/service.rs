//! What the host sees of FILEMQ: the `Service` implementation (frames sized
//! by their header before decoding, timers, work outcomes, commands,
//! shutdown, status and counters).

use super::*;

impl Service for Filemq {
    fn name(&self) -> &'static str {
        NAME
    }

    fn signature(&self) -> u16 {
        FilemqMsg::SIGNATURE
    }

    fn local_endpoint(&self, broker: &str) -> String {
        filemq::local_endpoint(broker)
    }

    fn max_frame(&self) -> usize {
        filemq::MAX_CLIENT_MESSAGE
    }

    fn max_parked(&self) -> usize {
        // The most credit a subscriber may hold, plus a chunk.
        self.config.max_credit as usize + self.config.chunk_size
    }

    fn executor(&self) -> Option<Arc<dyn crate::work::Executor>> {
        Some(Arc::new(executor::DiskExecutor::new(READ_THREADS)))
    }

    fn start(&mut self, _now: Instant, out: &mut Vec<Action>) {
        out.append(&mut self.startup);
    }

    fn handle(&mut self, conn: ConnId, frame: Bytes, now: Instant, out: &mut Vec<Action>) {
        self.now = Some(now);
        // Sized by its header before anything else: a frame larger than its
        // message can be is dropped unread.
        if frame.len() > frame.get(2).map_or(usize::MAX, |id| filemq::max_client_len(*id)) {
            self.malformed += 1;
            tracing::debug!(conn = conn.0, len = frame.len(), "filemq dropped an oversized frame");
            return;
        }
        if self.defer(conn, &frame, now, out) {
            return;
        }
        match FilemqMsg::decode(frame.clone()) {
            Ok(msg) => {
                // Capabilities offered after an OHAI's fields.
                let offered = match &msg {
                    FilemqMsg::Ohai { .. } => filemq_ext::trailer_bits(&frame, &msg),
                    _ => 0,
                };
                self.receive(conn, msg, offered, now, out)
            }
            Err(error) => match Generation::of_ohai(&frame) {
                // An older client: tell it what we speak (docs/protocol/FILEMQ.md "Generations").
                Some(generation) => {
                    tracing::debug!(conn = conn.0, ?generation, "filemq OHAI of an older generation");
                    send(out, conn, &FilemqMsg::Rtfm { reason: ShortStr::lossy("FILEMQ version 2 only") });
                    self.terminate(conn, out);
                }
                None => {
                    // Dropped: one bad peer must not stop the broker (docs/protocol/FILEMQ.md "Codec").
                    self.malformed += 1;
                    tracing::debug!(conn = conn.0, %error, "filemq dropped a malformed frame");
                }
            },
        }
    }

    fn on_timer(&mut self, key: TimerKey, now: Instant, out: &mut Vec<Action>) {
        self.now = Some(now);
        if key & 1 == 1 {
            let id = (key >> 1) as MountId;
            let Some(mount) = self.mounts.get_mut(&id) else { return };
            mount.next_scan = None;
            if mount.scanning {
                mount.dirty = true;
            } else {
                self.start_scan(id, now, out);
            }
            return;
        }
        let id = ConnId(key >> 1);
        let Some(conn) = self.conns.get(&id) else { return };
        if now < conn.expires_at {
            out.push(Action::SetTimer { key, at: conn.expires_at });
            // Early: the pump left work for this pass.
            self.pump(id, out);
        } else {
            tracing::debug!(conn = id.0, "filemq connection expired");
            self.terminate(id, out);
        }
    }

    fn on_work(&mut self, key: u64, done: crate::work::Done, now: Instant, out: &mut Vec<Action>) {
        self.now = Some(now);
        let Ok(done) = done.downcast::<Done>() else {
            tracing::error!("filemq: the outcome of another service's work");
            return;
        };
        let done = *done;
        let Some(what) = self.work.get(&key).copied() else { return };
        if !matches!(what, WorkFor::Watch { .. }) {
            self.work.remove(&key);
        }
        match (what, done) {
            (WorkFor::Read { conn, len }, Done::Read(result)) => {
                // The chunk is in the reply now (or dropped), which the
                // host counts.
                self.config.budget.give(len);
                self.read_done(key, conn, result, now, out);
                self.budget_freed(now, out);
            }
            (WorkFor::Scan { mount }, Done::Scanned { result, .. }) => self.scanned(mount, result, now, out),
            (WorkFor::Watch { mount }, Done::Dirty { .. }) => {
                let Some(m) = self.mounts.get_mut(&mount) else { return };
                if m.scanning {
                    m.dirty = true;
                } else {
                    self.scan_at(mount, now + self.config.settle, out);
                }
            }
            (WorkFor::Watch { mount }, Done::WatchFailed { why, .. }) => {
                let Some(m) = self.mounts.get_mut(&mount) else { return };
                tracing::warn!(alias = %m.alias, "filemq cannot watch {} ({why}); rescanning every {:?}", m.root.display(), self.config.poll_rescan);
                m.watching = false;
                self.scan_at(mount, now + self.config.poll_rescan, out);
            }
            (WorkFor::SaveMounts, Done::Saved(result)) => self.mounts_saved(result, now, out),
            (WorkFor::Icanhaz { conn, bytes }, done) => {
                self.preparing.jobs -= 1;
                self.preparing.bytes -= bytes;
                self.prepared(key, conn, done, now, out)
            }
            (WorkFor::Resync { conn }, done) => self.walked(key, conn, done, now, out),
            (what, done) => tracing::error!(?what, ?done, "filemq work outcome of the wrong kind"),
        }
    }

    fn parse_command(&self, words: &[String]) -> Option<Result<crate::Command, CommandError>> {
        let parsed = command::parse(words)?;
        Some(parsed.map(|c| Box::new(c) as crate::Command).map_err(CommandError::new))
    }

    fn command(
        &mut self,
        request: u64,
        command: crate::Command,
        now: Instant,
        out: &mut Vec<Action>,
    ) -> Answer {
        use command::Command;
        match crate::command::downcast::<Command>(NAME, command) {
            Ok(Command::Publish { dir, alias }) => {
                self.runtime_command(request, mounts::Change::Publish { root: dir, alias }, now, out)
            }
            Ok(Command::Unpublish { alias }) => {
                self.runtime_command(request, mounts::Change::Unpublish { alias }, now, out)
            }
            Ok(Command::ReplaceMounts(list)) => {
                Answer::Now(self.replace_mounts(list, now, out).map_err(CommandError::new))
            }
            Err(foreign) => Answer::Now(Err(foreign)),
        }
    }

    fn shutdown(&mut self, _now: Instant, out: &mut Vec<Action>) {
        // Nothing a subscriber was promised is lost: it resumes or resyncs
        // with the next broker. Say goodbye (spec: KTHXBAI either way).
        for (id, conn) in &self.conns {
            if conn.state == State::Ready {
                send(out, *id, &FilemqMsg::Kthxbai {});
            }
        }
    }

    fn budget_freed(&mut self, now: Instant, out: &mut Vec<Action>) {
        self.now = Some(now);
        if self.budget_blocked.is_empty() || self.config.budget.free() == 0 {
            return;
        }
        // Each tries again; one still short of room registers anew.
        for id in std::mem::take(&mut self.budget_blocked) {
            self.config.budget.set_waiting(false);
            self.pump(id, out);
        }
    }

    fn holders(&self) -> Vec<(ConnId, usize, String)> {
        self.work
            .values()
            .filter_map(|w| match w {
                WorkFor::Read { conn, len } => Some((*conn, *len, "FILEMQ subscriber".to_string())),
                _ => None,
            })
            .collect()
    }

    fn refusal(&self, _frame: &[u8], why: &str) -> Option<Vec<u8>> {
        Some(FilemqMsg::Srsly { reason: ShortStr::lossy(why) }.encode())
    }

    fn on_disconnect(&mut self, conn: ConnId, _now: Instant, out: &mut Vec<Action>) {
        if self.conns.contains_key(&conn) {
            tracing::debug!(conn = conn.0, "filemq peer disconnected");
            self.terminate(conn, out);
        }
    }

    fn status(&self) -> serde_json::Value {
        let mounts: Vec<_> = self.mounts.iter().map(|(id, m)| self.mount_status(*id, m)).collect();
        let mut subscribers: Vec<_> = self
            .conns
            .iter()
            .filter(|(_, c)| c.state == State::Ready)
            .map(|(id, c)| {
                serde_json::json!({
                    "connection": id.0,
                    "subscriptions": c.subscriptions,
                    "extended": c.extended,
                    "capabilities": c.caps,
                    "listing": c.listing,
                    "excluding": c.excludes.values().map(|e| e.patterns().len()).sum::<usize>(),
                    "credit": c.credit.available(),
                    "queued": c.queue.len(),
                    "sending": c.current.as_ref().map(|t| t.vpath.clone()),
                    "bytes_sent": c.bytes_sent,
                })
            })
            .collect();
        subscribers.sort_by_key(|s| s["connection"].as_u64());
        serde_json::json!({
            "mounts": mounts,
            "subscribers": subscribers,
        })
    }

    fn counters(&self) -> Vec<Counter> {
        vec![
            Counter::gauge("connections", "peers connected", self.conns.len() as u64),
            Counter::total("bytes_sent", "chunk bytes sent to subscribers", self.bytes_sent),
            Counter::total("files_sent", "files sent whole", self.files_sent),
            Counter::total(
                "entries_sent",
                "directories, links, attributes alone and listed files sent",
                self.entries_sent,
            ),
            Counter::total("deletes_sent", "deletes sent", self.deletes_sent),
            Counter::total("read_errors", "chunk reads that failed", self.read_errors),
            Counter::total("malformed_frames", "frames dropped as malformed", self.malformed),
            Counter::setting(
                "expiry_ms",
                "silence after which a peer is forgotten",
                self.config.expiry.as_millis() as u64,
            ),
        ]
    }
}
