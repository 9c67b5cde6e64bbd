//! Sending to a subscriber: the pump that moves its patch queue within
//! credit and per-pass bounds, deletes, entries with their headers, chunk
//! reads and what comes of them.

use super::*;

impl Filemq {
    pub(super) fn pump_all(&mut self, out: &mut Vec<Action>) {
        let ids: Vec<ConnId> = self.conns.keys().copied().collect();
        for id in ids {
            self.pump(id, out);
        }
    }

    /// Sends what the connection's credit allows: deletes, markers and eof
    /// markers freely, file bytes within credit, one read in flight.
    pub(super) fn pump(&mut self, id: ConnId, out: &mut Vec<Action>) {
        let mut budget = PUMP_BATCH;
        loop {
            let Some(conn) = self.conns.get_mut(&id) else { return };
            // While a RESYNC is walked off the loop, what the client
            // holds is with the walk: nothing is sent until it is back.
            if conn.state != State::Ready || conn.held.walking.is_some() {
                return;
            }
            if let Some(transfer) = &conn.current {
                if transfer.reading.is_some() {
                    return;
                }
                if transfer.outflow.is_done() {
                    self.finish_file(id, out);
                    continue;
                }
                let chunk_size = self.config.chunk_size as u64;
                let Some(chunk) = transfer.outflow.next_chunk(chunk_size, &conn.credit) else { return };
                let len = (chunk.end - chunk.start) as usize;
                let Some(mount) = self.mounts.get(&transfer.mount) else {
                    conn.current = None;
                    continue;
                };
                // A subscriber holds one chunk at most: it waits for room
                // like a newcomer.
                if !self.config.budget.admits(0, len) {
                    if self.budget_blocked.insert(id) {
                        self.config.budget.set_waiting(true);
                    }
                    return;
                }
                if self.budget_blocked.remove(&id) {
                    self.config.budget.set_waiting(false);
                }
                let Some(transfer) = conn.current.as_mut() else { return };
                if transfer.outflow.begin(chunk.clone(), &conn.credit).is_err() {
                    // `next_chunk` gave it: unreachable, but never a read
                    // the rules refuse.
                    conn.current = None;
                    continue;
                }
                self.config.budget.take(len);
                let job = Job::Read {
                    root: mount.root.clone(),
                    rel: transfer.rel.clone(),
                    offset: chunk.start,
                    len,
                    expect: transfer.meta.clone(),
                };
                let key = self.work(out, WorkFor::Read { conn: id, len }, job);
                if let Some(t) = self.conns.get_mut(&id).and_then(|c| c.current.as_mut()) {
                    t.reading = Some(key);
                }
                return;
            }
            if budget == 0 {
                // The rest on the next pass: the connection's timer, due
                // now, pumps again (and re-arms its expiry).
                if let Some(now) = self.now {
                    out.push(Action::SetTimer { key: expiry_key(id), at: now });
                }
                return;
            }
            budget -= 1;
            let Some(entry) = conn.queue.pop_front() else { return };
            match entry {
                Entry::Synced(path) => {
                    let count = conn.markers_owed.remove(&path).unwrap_or(1);
                    if conn.extended {
                        let published = publishes(&self.mounts, &path);
                        let mut headers = Hash::default();
                        let _ = headers.insert(ext::SYNCED, Bytes::from(path.into_bytes()));
                        let _ = headers.insert(ext::PUBLISHED, if published { "1" } else { "0" });
                        for _ in 0..count {
                            let msg = FilemqMsg::Cheezburger {
                                sequence: conn.next_sequence(),
                                operation: Operation::Create,
                                filename: LongStr::default(),
                                offset: 0,
                                eof: 1,
                                headers: headers.clone(),
                                chunk: Chunk::default(),
                            };
                            send(out, id, &msg);
                        }
                    }
                }
                Entry::Deletes(mut list) => {
                    let Some(vpath) = list.pop_front() else { continue };
                    if !list.is_empty() {
                        conn.queue.push_front(Entry::Deletes(list));
                    }
                    let skip = conn.ops.contains_key(&vpath) || !conn.wants(&vpath, None);
                    if skip || self.published(&vpath).is_some() {
                        continue;
                    }
                    self.send_delete(id, &vpath, out);
                }
                Entry::Creates(mut list) => {
                    let Some(vpath) = list.pop_front() else { continue };
                    if !list.is_empty() {
                        conn.queue.push_front(Entry::Creates(list));
                    }
                    // A change queued since goes out here, before the
                    // RESYNC's marker, as if merged into this entry.
                    match conn.ops.remove(&vpath).unwrap_or(Op::Create) {
                        Op::Delete => self.send_delete(id, &vpath, out),
                        Op::Create => self.start_entry(id, vpath, out),
                    }
                }
                Entry::File(vpath) => {
                    let Some(op) = conn.ops.remove(&vpath) else { continue };
                    match op {
                        Op::Delete => self.send_delete(id, &vpath, out),
                        Op::Create => self.start_entry(id, vpath, out),
                    }
                }
            }
        }
    }

    pub(super) fn send_delete(&mut self, id: ConnId, vpath: &str, out: &mut Vec<Action>) {
        let Some(conn) = self.conns.get_mut(&id) else { return };
        conn.known.remove(vpath);
        let msg = FilemqMsg::Cheezburger {
            sequence: conn.next_sequence(),
            operation: Operation::Delete,
            filename: LongStr::from(vpath),
            offset: 0,
            eof: 0,
            headers: Hash::default(),
            chunk: Chunk::default(),
        };
        send(out, id, &msg);
        self.deletes_sent += 1;
    }

    /// Sends what the client lacks at `vpath`: nothing if it holds what
    /// is published there; a delete if it holds something there that it
    /// can no longer see (a client without attributes, a directory); a
    /// directory or a link whole; a file's new attributes if it holds its
    /// content; to a listing client, the file announced alone; else the
    /// file, as the connection's current transfer.
    pub(super) fn start_entry(&mut self, id: ConnId, vpath: String, out: &mut Vec<Action>) {
        let Some((mount, rel, meta)) = self.published(&vpath).map(|(m, r, meta)| (m, r, meta.clone())) else {
            return;
        };
        let Some(conn) = self.conns.get_mut(&id) else { return };
        let held = conn.known.get(&vpath).copied();
        let Some(want) = conn.held_form(&meta) else {
            if held.is_some() {
                self.send_delete(id, &vpath, out);
            }
            return;
        };
        if held == Some(want) {
            return;
        }
        if conn.meta() {
            let same_content = || {
                held.is_some_and(|h| {
                    h.digest == want.digest && h.attrs().is_none_or(|(kind, _)| kind == EntryKind::File)
                })
            };
            match meta.kind {
                Kind::Dir | Kind::Link { .. } => return self.send_entry(id, &vpath, &meta, want, out),
                Kind::File if same_content() => return self.send_entry(id, &vpath, &meta, want, out),
                Kind::File => {}
            }
        }
        if conn.listing {
            return self.send_entry(id, &vpath, &meta, want, out);
        }
        let Some((read, file)) = meta.as_copy(&rel).map(|(read, file)| (read.to_string(), file)) else {
            return;
        };
        let outflow = match conn.resume.remove(&file.digest) {
            Some(offset) if conn.extended => Outflow::resume(file.size, offset),
            _ => Outflow::new(file.size),
        };
        if outflow.offset() > 0 {
            tracing::debug!(conn = id.0, %vpath, offset = outflow.offset(), "filemq resuming a partial file");
        }
        let file = FileMeta { attrs: meta.attrs, ..file };
        conn.current = Some(Transfer { vpath, mount, rel: read, meta: file, outflow, reading: None });
    }

    /// Sends an entry that has no content to send, in one CHEEZBURGER
    /// (eof 1, empty chunk: no credit): a directory, a link, new attributes
    /// of a file the client holds, or (to a listing client) a file
    /// announced by its headers. The client then holds `want`.
    pub(super) fn send_entry(
        &mut self,
        id: ConnId,
        vpath: &str,
        meta: &FileMeta,
        want: cache::Holding,
        out: &mut Vec<Action>,
    ) {
        let Some(conn) = self.conns.get_mut(&id) else { return };
        let mut headers = Self::headers(conn, meta);
        let kind = match &meta.kind {
            Kind::Dir => Some(ext::TYPE_DIR),
            Kind::Link { target, .. } => {
                let _ = headers.insert(ext::TARGET, Bytes::from(target.clone().into_bytes()));
                Some(ext::TYPE_LINK)
            }
            Kind::File if conn.meta() && !conn.listing => Some(ext::TYPE_ATTRS),
            Kind::File => None,
        };
        if let Some(kind) = kind {
            let _ = headers.insert(ext::TYPE, kind);
        }
        let msg = FilemqMsg::Cheezburger {
            sequence: conn.next_sequence(),
            operation: Operation::Create,
            filename: LongStr::from(vpath),
            offset: 0,
            eof: 1,
            headers,
            chunk: Chunk::default(),
        };
        send(out, id, &msg);
        conn.known.insert(vpath.to_string(), want);
        self.entries_sent += 1;
    }

    /// The headers of a file's CHEEZBURGERs (and of entries without
    /// content): digest and size for clients with the extensions, the
    /// entry's attributes for clients that keep them.
    pub(super) fn headers(conn: &Conn, meta: &FileMeta) -> Hash {
        let mut headers = Hash::default();
        if conn.extended && meta.is_file() {
            let _ = headers.insert(ext::SHA1, Bytes::from(meta.digest.clone().into_bytes()));
            let _ = headers.insert(ext::SIZE, Bytes::from(meta.size.to_string().into_bytes()));
        }
        if conn.meta() {
            // A link's own permission bits mean nothing (always 777).
            if !matches!(meta.kind, Kind::Link { .. }) {
                let _ = headers.insert(ext::MODE, Bytes::from(meta.attrs.mode_text().into_bytes()));
            }
            let _ = headers.insert(ext::MTIME, Bytes::from(meta.attrs.mtime_ns.to_string().into_bytes()));
        }
        headers
    }

    /// Sends the eof marker of the current file and forgets the transfer.
    pub(super) fn finish_file(&mut self, id: ConnId, out: &mut Vec<Action>) {
        let Some(conn) = self.conns.get_mut(&id) else { return };
        let Some(transfer) = conn.current.take() else { return };
        let msg = FilemqMsg::Cheezburger {
            sequence: conn.next_sequence(),
            operation: Operation::Create,
            filename: LongStr::from(transfer.vpath.as_str()),
            offset: transfer.meta.size,
            eof: 1,
            headers: Self::headers(conn, &transfer.meta),
            chunk: Chunk::default(),
        };
        send(out, id, &msg);
        if let Some(held) = conn.held_form(&transfer.meta) {
            conn.known.insert(transfer.vpath, held);
        }
        self.files_sent += 1;
    }

    pub(super) fn read_done(
        &mut self,
        key: u64,
        id: ConnId,
        result: Result<Bytes, ReadError>,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        let Some(conn) = self.conns.get_mut(&id) else { return };
        let Some(headers) =
            conn.current.as_ref().filter(|t| t.reading == Some(key)).map(|t| Self::headers(conn, &t.meta))
        else {
            return;
        };
        let Some(transfer) = conn.current.as_mut() else { return };
        transfer.reading = None;
        match result {
            Ok(data) => {
                let len = data.len() as u64;
                // A read answers with the bytes asked for, or fails.
                let Ok(chunk) = transfer.outflow.sent(len, &mut conn.credit) else {
                    conn.current = None;
                    return self.pump(id, out);
                };
                let msg = FilemqMsg::Cheezburger {
                    sequence: conn.sequence,
                    operation: Operation::Create,
                    filename: LongStr::from(transfer.vpath.as_str()),
                    offset: chunk.start,
                    eof: 0,
                    headers,
                    chunk: Chunk(data),
                };
                conn.sequence += 1;
                conn.bytes_sent += len;
                self.bytes_sent += len;
                send(out, id, &msg);
            }
            Err(error) => {
                // The rescan announces the file's new state; the client
                // discards the partial copy when that arrives. A file that
                // cannot be read is, to subscribers, not published.
                let mount = transfer.mount;
                match &error {
                    ReadError::Changed => {
                        tracing::debug!(conn = id.0, vpath = %transfer.vpath, "filemq abandons a changed file")
                    }
                    ReadError::Io(why) => {
                        self.read_errors += 1;
                        tracing::warn!(vpath = %transfer.vpath, "filemq cannot read a published file: {why}");
                    }
                }
                conn.current = None;
                if let Some(m) = self.mounts.get_mut(&mount) {
                    m.dirty = true;
                }
                self.scan_at(mount, now + self.config.settle, out);
            }
        }
        self.pump(id, out);
    }
}
