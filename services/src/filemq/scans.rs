//! What the mounts publish: scan outcomes applied to the snapshots, the
//! mount serving a path, and RESYNCs (the files a subscriber lacks or holds
//! stale, the in-sync markers).

use super::*;

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
        self.run_pending_resyncs(now);
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

    pub(super) fn run_pending_resyncs(&mut self, now: Instant) {
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
                conn.pending_resync.retain(|p| *p != path);
            }
            self.resync(id, &path, now);
        }
    }

    /// The published entries under subscription `path` that `conn` does
    /// not exclude, as (virtual path, what the client would hold there:
    /// `None` for what it never sees), by a range over each overlapping
    /// mount's sorted snapshot.
    pub(super) fn published_under(&self, path: &str, conn: &Conn) -> Vec<(String, Option<cache::Holding>)> {
        let mut found = Vec::new();
        let nested = self.mounts.len() > 1;
        let excludes = conn.excludes.get(path);
        let mut filter = excludes.map(|e| e.filter());
        for (id, mount) in &self.mounts {
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
                let vpath = join(&mount.alias, rel);
                // With nested mounts, a file shadowed by a longer alias is
                // not what that virtual path serves.
                if nested && self.resolve(&vpath).map(|(m, _)| m) != Some(*id) {
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
                found.push((vpath, conn.held_form(meta)));
            }
        }
        found
    }

    /// Queues what the client lacks under `path`, deletes for what it
    /// holds that is no longer published (unless nothing at all is
    /// published there), then the in-sync marker.
    pub(super) fn resync(&mut self, id: ConnId, path: &str, now: Instant) {
        let Some(conn) = self.conns.get(&id) else { return };
        let held: Vec<String> = cache::under(&conn.known, path).map(|(v, _)| v.clone()).collect();
        self.resync_with(id, path, held, false, now);
    }

    /// `resync`, given the cached files under `path` that may no longer be
    /// published: `checked` if they were found unpublished already (off the
    /// loop, against the snapshots in force), else each is checked here.
    /// Under a path where nothing at all is published (a misspelling), the
    /// client's files are not "no longer published": no deletes; the
    /// in-sync marker says so (`X-PUBLISHED` 0).
    pub(super) fn resync_with(
        &mut self,
        id: ConnId,
        path: &str,
        candidates: Vec<String>,
        checked: bool,
        now: Instant,
    ) {
        let Some(conn) = self.conns.get(&id) else { return };
        let creates = self.published_under(path, conn);
        let stale: Vec<String> = if !publishes(&self.mounts, path) || self.unread_under(path) {
            Vec::new()
        } else if checked {
            candidates
        } else {
            candidates.into_iter().filter(|v| self.published(v).is_none() && conn.wants(v, None)).collect()
        };
        let Some(conn) = self.conns.get_mut(&id) else { return };
        for (vpath, want) in creates {
            let held = conn.known.get(&vpath);
            // What it cannot see but holds there is deleted when reached.
            let lacks = match want {
                Some(want) => held != Some(&want),
                None => held.is_some(),
            };
            if lacks {
                conn.enqueue(&vpath, Op::Create);
            }
        }
        if checked {
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
