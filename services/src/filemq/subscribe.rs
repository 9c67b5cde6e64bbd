//! A subscriber's requests: OHAI, ICANHAZ (checked, its cache installed
//! as what the client holds, inline or prepared off the loop), NOM, HUGZ
//! and KTHXBAI.

use super::*;

impl Filemq {
    pub(super) fn receive(
        &mut self,
        id: ConnId,
        msg: FilemqMsg,
        offered: u8,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        let (expiry, max_credit) = (self.config.expiry, self.config.max_credit);
        if !self.conns.contains_key(&id) {
            out.push(Action::SetTimer { key: expiry_key(id), at: now + expiry });
        }
        let conn = self.conns.entry(id).or_insert_with(|| Conn::new(now, expiry, max_credit));
        conn.expires_at = now + expiry;
        match (conn.state, msg) {
            (_, FilemqMsg::Ohai { protocol, version }) => {
                if protocol.as_bytes() != b"FILEMQ" || version != 2 {
                    send(out, id, &FilemqMsg::Rtfm { reason: ShortStr::lossy("FILEMQ version 2 only") });
                    return self.terminate(id, out);
                }
                // A second OHAI starts the session over (docs/protocol/FILEMQ.md "States").
                let mut fresh = Conn::new(now, expiry, max_credit);
                fresh.state = State::Ready;
                // What it offers that we have; a client that offers
                // nothing (the original) gets the original OHAI-OK.
                fresh.caps = offered & ext::ALL;
                // Frames held behind a cache being prepared stay held.
                fresh.held = std::mem::take(&mut conn.held);
                let old = std::mem::replace(conn, fresh);
                cache::discard(old.known, out);
                let reply = FilemqMsg::OhaiOk {};
                tracing::trace!(conn = id.0, reply = reply.name(), caps = offered & ext::ALL, "filemq send");
                out.push(Action::Send {
                    to: id,
                    frame: filemq_ext::encode_with_bits(&reply, offered & ext::ALL),
                });
            }
            (State::Start, other) => {
                tracing::debug!(conn = id.0, msg = other.name(), "filemq message before OHAI");
                send(out, id, &FilemqMsg::Rtfm { reason: ShortStr::lossy("OHAI first") });
                self.terminate(id, out);
            }
            (State::Ready, FilemqMsg::Icanhaz { path, options, cache }) => {
                self.subscribe(id, &path, &options, &cache, now, out);
            }
            (State::Ready, FilemqMsg::Nom { credit, .. }) => {
                conn.credit.grant(credit);
                self.pump(id, out);
            }
            (State::Ready, FilemqMsg::Hugz {}) => send(out, id, &FilemqMsg::HugzOk {}),
            (State::Ready, FilemqMsg::HugzOk {}) => {}
            (State::Ready, FilemqMsg::Kthxbai {}) => self.terminate(id, out),
            (State::Ready, other) => {
                tracing::debug!(conn = id.0, msg = other.name(), "filemq message a client may not send");
                send(out, id, &FilemqMsg::Rtfm { reason: ShortStr::lossy("not a client message") });
                self.terminate(id, out);
            }
        }
    }

    pub(super) fn subscribe(
        &mut self,
        id: ConnId,
        path: &LongStr,
        options: &Hash,
        cache: &Hash,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        let Some(path) = self.begin_subscription(id, path, options, out) else { return };
        let known = cache::normalise(&path, cache);
        self.install_known(id, &path, known, out);
        self.finish_subscription(id, path, options, None, now, out);
    }

    /// A subscription whose cache was prepared off the loop.
    pub(super) fn subscribe_prepared(
        &mut self,
        id: ConnId,
        prepared: work::Prepared,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        let work::Prepared { path, options, known, stale } = prepared;
        let Some(path) = self.begin_subscription(id, &path, &options, out) else {
            // Refused: the prepared cache is freed off the loop.
            cache::discard_prepared(work::Prepared { path, options, known, stale }, out);
            return;
        };
        self.install_known(id, &path, known, out);
        self.finish_subscription(id, path, &options, stale, now, out);
    }

    /// The cache says what the client holds under `path` now. A first
    /// subscription takes the prepared map as it is (no pass over it).
    pub(super) fn install_known(
        &mut self,
        id: ConnId,
        path: &str,
        known: BTreeMap<String, cache::Holding>,
        out: &mut Vec<Action>,
    ) {
        let Some(conn) = self.conns.get_mut(&id) else { return };
        // Everything known lies under a subscription: if each one is under
        // `path`, the new map replaces the old whole (a re-subscription),
        // and the old one is freed off the loop.
        if conn.subscriptions.iter().all(|s| covers(path, s)) {
            let old = std::mem::replace(&mut conn.known, known);
            cache::discard(old, out);
            return;
        }
        // Only the entries under `path` are touched (by key range).
        let gone = cache::remove_under(&mut conn.known, path);
        cache::discard_names(gone, out);
        cache::merge(&mut conn.known, known);
    }

    /// Checks the path and options of an ICANHAZ and records the
    /// subscription; `None` (and SRSLY sent) if it is refused.
    pub(super) fn begin_subscription(
        &mut self,
        id: ConnId,
        path: &LongStr,
        options: &Hash,
        out: &mut Vec<Action>,
    ) -> Option<String> {
        let refuse = |out: &mut Vec<Action>, why: &str| {
            tracing::debug!(conn = id.0, why, "filemq refuses a subscription");
            send(out, id, &FilemqMsg::Srsly { reason: ShortStr::lossy(why) });
        };
        let Ok(text) = std::str::from_utf8(path.as_bytes()) else {
            refuse(out, "the path is not UTF-8");
            return None;
        };
        let path = match vpath::normalise(text) {
            Ok(path) => path,
            Err(why) => {
                refuse(out, &format!("the path {why}"));
                return None;
            }
        };
        let max = self.config.max_subscriptions;
        let conn = self.conns.get_mut(&id)?;
        // Patterns are checked (and bounded) before anything is kept; an
        // option the client was not granted is ignored, as the original
        // would.
        let excludes = match options.get(ext::EXCLUDE_OPTION).filter(|_| conn.caps & ext::EXCLUDE != 0) {
            None => None,
            Some(value) => match Excludes::from_option(value.as_bytes()) {
                Ok(excludes) => Some(excludes),
                Err(e) => {
                    refuse(out, &e.to_string());
                    return None;
                }
            },
        };
        if !conn.subscriptions.contains(&path) {
            if conn.subscriptions.len() >= max {
                refuse(out, "too many subscriptions on one connection");
                return None;
            }
            conn.subscriptions.push(path.clone());
        }
        if options.get(ext::ZBROKER).is_some_and(|v| v.as_bytes() == b"1") {
            conn.extended = true;
        }
        if conn.caps & ext::LIST != 0 && options.get(ext::LIST_OPTION).is_some_and(|v| v.as_bytes() == b"1") {
            conn.listing = true;
        }
        match excludes.filter(|e| !e.is_empty()) {
            Some(excludes) => conn.excludes.insert(path.clone(), Arc::new(excludes)),
            None => conn.excludes.remove(&path),
        };
        if let Some(value) = options.get(ext::RESUME) {
            // The client lists every partial file it holds: this replaces
            // any earlier list.
            conn.resume = ext::parse_resume(value.as_bytes()).into_iter().take(MAX_RESUME).collect();
        }
        // The client re-subscribes when it lost or refused a file: the one
        // in transfer under this path may be the one, so the cache below,
        // not the end of that transfer, says whether it has it.
        if conn.current.as_ref().is_some_and(|t| covers(&path, &t.vpath)) {
            conn.current = None;
        }
        Some(path)
    }

    /// ICANHAZ-OK, then the RESYNC (now, or once the mounts are scanned;
    /// `stale`, if known, lists the cached files no longer published).
    pub(super) fn finish_subscription(
        &mut self,
        id: ConnId,
        path: String,
        options: &Hash,
        stale: Option<Vec<String>>,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        send(out, id, &FilemqMsg::IcanhazOk {});
        let resync = options.get(ext::RESYNC).is_some_and(|v| v.as_bytes() == b"1");
        if resync {
            if self.scanned_for(&path) {
                self.resync_with(id, &path, stale, now, out);
            } else if let Some(conn) = self.conns.get_mut(&id) {
                if !conn.pending_resync.contains(&path) {
                    conn.pending_resync.push(path);
                }
            }
        }
        self.pump(id, out);
    }
}
