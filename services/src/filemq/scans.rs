//! What the mounts publish: scan outcomes applied to the snapshots, the
//! mount serving a path, and RESYNCs (the files a subscriber lacks or holds
//! stale, the in-sync markers).

use super::*;
use work::MountView;

impl Filemq {
    pub(super) fn scanned(
        &mut self,
        id: MountId,
        result: Result<work::Scanned, work::ScanError>,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        let Some(mount) = self.mounts.get_mut(&id) else { return };
        mount.scanning = false;
        let interval = if mount.watching { self.config.rescan } else { self.config.poll_rescan };
        let mut next = now + interval;
        match result {
            Err(why) => {
                let why = why.to_string();
                if mount.error.as_ref() != Some(&why) {
                    tracing::warn!(alias = %mount.alias, "filemq cannot scan {}: {why}", mount.root.display());
                }
                mount.error = Some(why);
            }
            Ok(scan) => {
                mount.error = None;
                let first = !mount.scanned;
                mount.scanned = true;
                // An unchanged tree keeps its snapshot (the same Arc), so
                // work prepared from it off the loop still holds.
                if first || !scan.changes.is_empty() {
                    mount.snapshot = scan.snapshot;
                }
                mount.unstable = scan.unstable_files.into_iter().collect();
                mount.total_bytes = mount.snapshot.files.values().map(|f| f.size).sum();
                mount.counts = mount.snapshot.files.values().fold((0, 0, 0), |(f, d, l), e| match e.kind {
                    Kind::File => (f + 1, d, l),
                    Kind::Dir => (f, d + 1, l),
                    Kind::Link { .. } => (f, d, l + 1),
                });
                if scan.unstable {
                    next = next.min(now + self.config.stable_age);
                }
                if first {
                    tracing::info!(alias = %mount.alias, files = mount.counts.0, "filemq mount scanned");
                }
                let alias = mount.alias.clone();
                self.apply_changes(id, &alias, &scan.changes);
                if first {
                    self.announce_hidden(id);
                }
                self.warn_of_overlaps(id);
            }
        }
        if self.mounts.get(&id).is_some_and(|m| m.dirty) {
            next = now + self.config.settle;
        }
        self.scan_at(id, next, out);
        self.run_pending_resyncs(now, out);
        self.release_markers(now);
        self.pump_all(out);
    }

    pub(super) fn apply_changes(&mut self, id: MountId, alias: &str, changes: &[Change]) {
        // A file a longer alias hides is not what its path serves (the
        // rule of `resolve`): its delete must not reach the file that is.
        let inner = self.nested_in(id);
        let Some(snapshot) = self.mounts.get(&id).map(|m| m.snapshot.clone()) else { return };
        for change in changes {
            // A delete of what only clients with attributes see goes to
            // them alone (the original client never hears of directories).
            let (rel, op, is_dir, all) = match change {
                Change::Created(rel) => {
                    let is_dir = snapshot.files.get(rel).is_some_and(|m| m.kind == Kind::Dir);
                    (rel, Op::Create, is_dir, true)
                }
                Change::Deleted(rel) => (rel, Op::Delete, false, true),
                Change::Removed { rel, dir } => (rel, Op::Delete, *dir, false),
            };
            let vpath = join(alias, rel);
            if inner.iter().any(|a| covers(a, &vpath) && vpath != *a) {
                continue;
            }
            for conn in self.conns.values_mut() {
                if conn.state == State::Ready && (all || conn.meta()) && conn.wants(&vpath, Some(is_dir)) {
                    // The version in transfer is stale: stop sending it (a
                    // read in flight is ignored when it returns).
                    if conn.current.as_ref().is_some_and(|t| t.vpath == vpath) {
                        conn.current = None;
                    }
                    conn.enqueue(&vpath, op);
                }
            }
        }
    }

    /// The mount serving `vpath` (the longest alias covering it) and the
    /// path relative to its root.
    pub(super) fn resolve(&self, vpath: &str) -> Option<(MountId, String)> {
        self.mounts
            .iter()
            .filter(|(_, m)| covers(&m.alias, vpath) && vpath != m.alias)
            .max_by_key(|(_, m)| m.alias.len())
            .map(|(id, m)| {
                let rel = if m.alias == "/" { &vpath[1..] } else { &vpath[m.alias.len() + 1..] };
                (*id, rel.to_string())
            })
    }

    pub(super) fn published(&self, vpath: &str) -> Option<(MountId, String, &FileMeta)> {
        let (id, rel) = self.resolve(vpath)?;
        let meta = self.mounts.get(&id)?.snapshot.files.get(&rel)?;
        Some((id, rel, meta))
    }

    /// The mounts whose files may lie under `path` (or that lie under it).
    pub(super) fn overlapping<'a>(&'a self, path: &'a str) -> impl Iterator<Item = &'a Mount> + 'a {
        self.mounts.values().filter(move |m| covers(path, &m.alias) || covers(&m.alias, path))
    }

    /// Every mount that may hold files under `path` has been scanned once:
    /// a RESYNC can tell what is published there (and what is not).
    pub(super) fn scanned_for(&self, path: &str) -> bool {
        self.overlapping(path).all(|m| m.scanned || m.error.is_some())
    }

    pub(super) fn run_pending_resyncs(&mut self, now: Instant, out: &mut Vec<Action>) {
        let mut ready = Vec::new();
        for (id, conn) in &self.conns {
            for path in &conn.pending_resync {
                if self.scanned_for(path) {
                    ready.push((*id, path.clone()));
                }
            }
        }
        for (id, path) in ready {
            if let Some(conn) = self.conns.get_mut(&id) {
                // One at a time: a RESYNC put off twice comes back twice.
                match conn.pending_resync.iter().position(|p| *p == path) {
                    Some(at) => conn.pending_resync.remove(at),
                    None => continue,
                };
            }
            self.resync(id, &path, now, out);
        }
    }

    /// The mounts as an off-loop job sees them (aliases and `Arc`s of
    /// their snapshots, no entry copied).
    pub(super) fn views(&self) -> Vec<MountView> {
        self.mounts
            .values()
            .map(|m| MountView {
                alias: m.alias.clone(),
                snapshot: m.snapshot.clone(),
                ready: m.scanned || m.error.is_some(),
            })
            .collect()
    }

    /// The published entries under subscription `path` that `conn` does
    /// not exclude, as (virtual path, what the client would hold there:
    /// `None` for what it never sees).
    pub(super) fn published_under(&self, path: &str, conn: &Conn) -> Vec<(String, Option<cache::Holding>)> {
        let mut found = Vec::new();
        let excludes = conn.excludes.get(path).map(|e| &**e);
        let mut budget = usize::MAX;
        visit_published(path, &self.views(), excludes, &mut budget, |vpath, meta| {
            found.push((vpath, conn.held_form(meta)))
        });
        found
    }

    /// Queues what the client lacks under `path`, deletes for what it
    /// holds that is no longer published (unless nothing at all is
    /// published there), then the in-sync marker.
    pub(super) fn resync(&mut self, id: ConnId, path: &str, now: Instant, out: &mut Vec<Action>) {
        self.resync_with(id, path, None, now, out);
    }

    /// `resync`, given (`checked`) the cached files under `path` found no
    /// longer published off the loop, against the snapshots in force;
    /// else they are found here. Under a path where nothing at all is
    /// published (a misspelling), the client's files are not "no longer
    /// published": no deletes; the in-sync marker says so (`X-PUBLISHED`
    /// 0). A walk of more than `Config::resync_inline` entries (published
    /// under the path, plus held there) runs off the loop
    /// ([`Job::Resync`]); until its outcome is in, the connection's frames
    /// wait and nothing is sent to it.
    pub(super) fn resync_with(
        &mut self,
        id: ConnId,
        path: &str,
        checked: Option<Vec<String>>,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        let Some(conn) = self.conns.get(&id) else { return };
        let limit = self.config.resync_inline;
        let views = self.views();
        let excludes = conn.excludes.get(path).map(|e| &**e);
        // A mount under the path larger than the limit: no point trying.
        let large = self.mounts.values().any(|m| covers(path, &m.alias) && m.snapshot.files.len() > limit);
        let inline = match conn.held.walking {
            // What it holds is away with another walk: after it.
            Some(_) => None,
            None if large => None,
            None => walk(path, &views, excludes, conn.meta(), &conn.known, checked.is_none(), limit),
        };
        let Some(found) = inline else {
            if let Some(names) = checked {
                cache::discard_names(names, out);
            }
            if conn.held.preparing.is_some() {
                if let Some(conn) = self.conns.get_mut(&id) {
                    conn.pending_resync.push(path.to_string());
                }
                return;
            }
            return self.walk_off_loop(id, path, views, out);
        };
        let prepared = checked.is_some();
        let stale: Vec<String> = if !publishes(&self.mounts, path) || self.unread_under(path) {
            Vec::new()
        } else if let Some(checked) = checked {
            checked
        } else {
            found.stale.into_iter().filter(|v| conn.wants(v, None)).collect()
        };
        let Some(conn) = self.conns.get_mut(&id) else { return };
        for vpath in found.creates {
            conn.enqueue(&vpath, Op::Create);
        }
        if prepared {
            // Prepared off the loop: queued as one entry, however long
            // (exclusions are checked as each is sent).
            if !stale.is_empty() {
                conn.queue.push_back(Entry::Deletes(stale.into()));
            }
        } else {
            for vpath in stale {
                conn.enqueue(&vpath, Op::Delete);
            }
        }
        self.resynced(id, path, now);
    }

    /// Starts [`Job::Resync`], the connection's `known` moved into it.
    fn walk_off_loop(&mut self, id: ConnId, path: &str, mounts: Vec<MountView>, out: &mut Vec<Action>) {
        let Some(conn) = self.conns.get_mut(&id) else { return };
        let used = mounts.iter().map(|m| m.snapshot.clone()).collect();
        let walk = work::Walk {
            path: path.to_string(),
            mounts,
            excludes: conn.excludes.get(path).cloned(),
            meta: conn.meta(),
            known: std::mem::take(&mut conn.known),
        };
        tracing::debug!(conn = id.0, path, "filemq walks a RESYNC off the loop");
        let key = self.work(out, WorkFor::Resync { conn: id }, Job::Resync(Box::new(walk)));
        if let Some(conn) = self.conns.get_mut(&id) {
            conn.held.preparing = Some((key, used));
            conn.held.walking = Some(path.to_string());
        }
    }

    /// The outcome of [`Job::Resync`]: what the client holds is back, what
    /// it lacks and what it holds unpublished are queued as one entry each
    /// (each checked as it is sent, against the snapshots then in force),
    /// then the marker; then the frames that waited, in order.
    pub(super) fn walked(&mut self, key: u64, id: ConnId, done: Done, now: Instant, out: &mut Vec<Action>) {
        let Done::Resynced(result) = done else {
            return tracing::error!(?done, "filemq work outcome of the wrong kind");
        };
        let current = self.conns.get(&id).is_some_and(|c| {
            c.held.walking.is_some() && c.held.preparing.as_ref().is_some_and(|(k, _)| *k == key)
        });
        if !current {
            // Its connection is gone: freed off the loop.
            if let Ok(walked) = result {
                let work::Walked { known, found } = *walked;
                cache::discard(known, out);
                cache::discard_names(found.creates, out);
                cache::discard_names(found.stale, out);
            }
            return;
        }
        let Some(conn) = self.conns.get_mut(&id) else { return };
        conn.held.preparing = None;
        let path = conn.held.walking.take().unwrap_or_default();
        let walked = match result {
            Ok(walked) => walked,
            Err(error) => {
                // What the client held went with the walk: it starts over.
                tracing::error!(conn = id.0, %error, "filemq");
                send(
                    out,
                    id,
                    &FilemqMsg::Rtfm { reason: ShortStr::lossy("internal error: subscribe again") },
                );
                return self.terminate(id, out);
            }
        };
        let work::Walked { known, found } = *walked;
        conn.known = known;
        // Changes to the mounts announced meanwhile, as they would have been.
        for owed in std::mem::take(&mut conn.held.owed) {
            match owed {
                cache::Owed::Hidden(alias) => self.announce_hidden_to(id, &alias),
                cache::Owed::Revealed(alias) => self.announce_revealed_to(id, &alias),
            }
        }
        let deletes = publishes(&self.mounts, &path) && !self.unread_under(&path);
        let Some(conn) = self.conns.get_mut(&id) else { return };
        if !found.creates.is_empty() {
            conn.queue.push_back(Entry::Creates(found.creates.into()));
        }
        if deletes && !found.stale.is_empty() {
            conn.queue.push_back(Entry::Deletes(found.stale.into()));
        } else {
            cache::discard_names(found.stale, out);
        }
        self.resynced(id, &path, now);
        self.release_held(id, now, out);
        self.run_pending_resyncs(now, out);
        self.pump(id, out);
    }

    /// A RESYNC of `path` is queued: its in-sync marker is owed.
    fn resynced(&mut self, id: ConnId, path: &str, now: Instant) {
        let Some(conn) = self.conns.get_mut(&id) else { return };
        let awaiting = conn.awaiting_marker.entry(path.to_string()).or_insert((0, now));
        awaiting.0 = awaiting.0.saturating_add(1);
        self.release_markers(now);
    }

    /// Queues the in-sync markers of subscriptions whose mounts hold no
    /// file still changing: what those mounts publish is all queued.
    pub(super) fn release_markers(&mut self, now: Instant) {
        let settled = |path: &str| {
            self.overlapping(path).all(|m| {
                let changing = m.unstable.iter().any(|rel| covers(path, &join(&m.alias, rel)));
                (m.scanned && !changing) || m.error.is_some()
            })
        };
        let mut release = Vec::new();
        for (id, conn) in &self.conns {
            for (path, (_, since)) in &conn.awaiting_marker {
                if now >= *since + MARKER_WAIT || settled(path) {
                    release.push((*id, path.clone()));
                }
            }
        }
        for (id, path) in release {
            if let Some(conn) = self.conns.get_mut(&id) {
                let count = conn.awaiting_marker.remove(&path).map_or(1, |(count, _)| count);
                conn.enqueue_marker(&path, count);
            }
        }
    }
}

/// What a client with attributes (`with_meta`) or without would hold
/// where `meta` is published: `None` if it never sees such an entry (a
/// client without attributes and a directory, or a link to no file).
pub(super) fn held_form(with_meta: bool, meta: &FileMeta) -> Option<cache::Holding> {
    if with_meta {
        return Some(cache::Holding::with(Digest::parse(&meta.digest)?, meta.entry_kind(), meta.attrs));
    }
    let (_, copy) = meta.as_copy("")?;
    Digest::parse(&copy.digest).map(cache::Holding::plain)
}

/// Hands `visit` the published entries under subscription `path` that
/// `excludes` leaves in, as (virtual path, entry), by a range over each
/// overlapping mount's sorted snapshot. Every entry looked at (shadowed
/// and excluded ones too) spends one of `budget`; false if it ran out.
fn visit_published(
    path: &str,
    mounts: &[MountView],
    excludes: Option<&Excludes>,
    budget: &mut usize,
    mut visit: impl FnMut(String, &FileMeta),
) -> bool {
    let nested = mounts.len() > 1;
    let mut filter = excludes.map(|e| e.filter());
    for (index, mount) in mounts.iter().enumerate() {
        let prefix = if covers(path, &mount.alias) {
            String::new()
        } else if covers(&mount.alias, path) {
            let rest = if mount.alias == "/" { &path[1..] } else { &path[mount.alias.len()..] };
            rest.trim_start_matches('/').to_string()
        } else {
            continue;
        };
        for (rel, meta) in mount.snapshot.files.range(prefix.clone()..) {
            let under = prefix.is_empty()
                || rel == &prefix
                || (rel.starts_with(&prefix) && rel.as_bytes().get(prefix.len()) == Some(&b'/'));
            if !under {
                // Keys sharing the prefix's characters ("a-b", "a0"
                // beside "a/x") sort among those under it.
                if rel.starts_with(&prefix) {
                    continue;
                }
                break;
            }
            if *budget == 0 {
                return false;
            }
            *budget -= 1;
            let vpath = join(&mount.alias, rel);
            // With nested mounts, a file shadowed by a longer alias is
            // not what that virtual path serves.
            if nested && serving(mounts, &vpath) != Some(index) {
                continue;
            }
            // The subscribed directory is the client's mirror root.
            if vpath == path && meta.kind == Kind::Dir {
                continue;
            }
            if let Some(filter) = filter.as_mut() {
                if filter.excludes(vpath::relative(path, &vpath), meta.kind == Kind::Dir) {
                    continue;
                }
            }
            visit(vpath, meta);
        }
    }
    true
}

/// The mount serving `vpath` (the longest alias covering it): the rule of
/// `Filemq::resolve`, over views.
fn serving(mounts: &[MountView], vpath: &str) -> Option<usize> {
    mounts
        .iter()
        .enumerate()
        .filter(|(_, m)| covers(&m.alias, vpath) && vpath != m.alias)
        .max_by_key(|(_, m)| m.alias.len())
        .map(|(index, _)| index)
}

/// A RESYNC's walk, the same on the loop and off it: the published
/// entries under `path` that the client (`with_meta` or not, holding
/// `known`) lacks or holds in another form, and (with `stale`) what it
/// holds under `path` that `mounts` do not publish. `None` once more than
/// `limit` entries have been looked at.
pub(super) fn walk(
    path: &str,
    mounts: &[MountView],
    excludes: Option<&Excludes>,
    with_meta: bool,
    known: &BTreeMap<String, cache::Holding>,
    stale: bool,
    limit: usize,
) -> Option<work::Found> {
    let mut budget = limit;
    let mut found = work::Found::default();
    let complete = visit_published(path, mounts, excludes, &mut budget, |vpath, meta| {
        let held = known.get(&vpath);
        // What it cannot see but holds there is deleted when reached.
        let lacks = match held_form(with_meta, meta) {
            Some(want) => held != Some(&want),
            None => held.is_some(),
        };
        if lacks {
            found.creates.push(vpath);
        }
    });
    if !complete {
        return None;
    }
    if stale {
        for (vpath, _) in cache::under(known, path) {
            budget = budget.checked_sub(1)?;
            if !cache::served(mounts, vpath) {
                found.stale.push(vpath.clone());
            }
        }
    }
    Some(found)
}

/// The work of [`Job::Resync`], on a worker thread.
pub(super) fn walk_job(job: work::Walk) -> work::Walked {
    let work::Walk { path, mounts, excludes, meta, known } = job;
    let found = walk(&path, &mounts, excludes.as_deref(), meta, &known, true, usize::MAX).unwrap_or_default();
    work::Walked { known, found }
}
