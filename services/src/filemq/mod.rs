//! FILEMQ: publish directories under virtual paths; subscribers receive
//! every file, and every later change and delete, as credit-controlled
//! chunks (`docs/protocol/FILEMQ.md`, with fixes the README lists).
//!
//! The service holds each mount's latest [`Snapshot`] and, per connection,
//! its subscriptions, a queue of patches (one entry per virtual path: a
//! newer change replaces a queued one), what the client is known to hold
//! (its ICANHAZ cache plus what it was sent), its credit, and at most one
//! file in transfer. Scanning, hashing and reading happen off the event
//! loop as [`Job`]s; their outcomes come back through `on_work`.
//!
//! Divergences from the original, all on the same wire:
//! - malformed frames are dropped (the original stopped serving everyone),
//!   and an OHAI of an older generation gets RTFM;
//! - a chunk is `min(chunk_size, credit, bytes left)`, so a small credit
//!   never sends the previous chunk again for ever (§5.1);
//! - patches are filtered by each subscription's path, and a connection may
//!   hold many subscriptions (§6.1, §9);
//! - RESYNC works: a subscriber gets what it lacks under the path, nothing
//!   its cache already lists, and deletes for cached files no longer
//!   published (§12);
//! - deletes carry clean fields (§14); deletes and eof markers cost no
//!   credit and are sent whatever the credit;
//! - a file that changed since it was announced is abandoned (the rescan
//!   announces the new version) instead of sending a torn mixture;
//! - the wire extensions of ARCHITECTURE.md ("FILEMQ: how we extend the
//!   wire") go to clients that ask for them with the `X-ZBROKER` option.

pub mod cache;
pub mod disk;
pub mod executor;
pub mod mounts;
pub mod work;

#[cfg(test)]
mod cache_tests;
#[cfg(test)]
mod mirror_tests;
#[cfg(test)]
mod mounts_tests;
#[cfg(test)]
mod tests;

use crate::{Action, Answer, ConnId, Counter, Service, TimerKey};
use bytes::Bytes;
use mounts::Origin;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use work::{Change, Done, EntryKind, FileMeta, Job, Kind, MountId, ReadError, Snapshot};
use zbroker_proto::codec::{Chunk, Hash, LongStr, ShortStr};
use zbroker_proto::digest::Digest;
use zbroker_proto::exclude::Excludes;
use zbroker_proto::filemq::{self, ext, FilemqMsg, Generation, Operation};
use zbroker_proto::filemq_ext;
use zbroker_proto::vpath::{self, covers, join};

/// Settings of the FILEMQ service.
#[derive(Debug, Clone)]
pub struct Config {
    /// A connection silent for this long is forgotten (spec §15).
    pub expiry: Duration,
    /// Largest chunk sent (the original's CHUNK_SIZE).
    pub chunk_size: usize,
    /// A file is announced once unchanged for this long.
    pub stable_age: Duration,
    /// Safety-net rescan interval while change notification works.
    pub rescan: Duration,
    /// Rescan interval when change notification could not be set up.
    pub poll_rescan: Duration,
    /// Wait after a change notice before scanning, so a burst of changes
    /// costs one scan.
    pub settle: Duration,
    /// Most subscriptions one connection may hold.
    pub max_subscriptions: usize,
    /// Most credit a connection may hold; grants beyond it are ignored.
    /// Bounds what the broker may have in flight to one subscriber.
    pub max_credit: u64,
    /// Where digests are kept between runs (one file per mount).
    pub state_dir: Option<PathBuf>,
    /// The broker-wide memory budget, shared with the host: a chunk read
    /// counts from the moment it is asked for until its CHEEZBURGER is
    /// handed to the host (which counts it on).
    pub budget: crate::budget::Budget,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            expiry: Duration::from_millis(60_000),
            chunk_size: 1_000_000,
            stable_age: Duration::from_secs(1),
            rescan: Duration::from_secs(5),
            poll_rescan: Duration::from_secs(1),
            settle: Duration::from_millis(50),
            max_subscriptions: 64,
            max_credit: 32 << 20,
            state_dir: None,
            budget: crate::budget::Budget::unlimited(),
        }
    }
}

/// Longest subscription path accepted.
/// Most partial files a client may announce for resume.
const MAX_RESUME: usize = 10_000;
/// Longest an in-sync marker waits for files that keep changing under its
/// path: a log appended to for ever must not hold `filemq --once` for
/// ever. After it, the marker says "everything stable has been sent".
const MARKER_WAIT: Duration = Duration::from_secs(30);

struct Mount {
    alias: String,
    root: PathBuf,
    origin: Origin,
    snapshot: Arc<Snapshot>,
    /// Entries of the snapshot by kind, kept for the status: files,
    /// directories, links.
    counts: (usize, usize, usize),
    /// The first scan has completed: the snapshot is the tree, not empty.
    scanned: bool,
    scanning: bool,
    /// A change was noticed while scanning: scan again when it ends.
    dirty: bool,
    /// Files the last scan left out (or kept at their old version)
    /// because they were still changing: no in-sync marker for a path
    /// covering one of them, for a while (`MARKER_WAIT`).
    unstable: BTreeSet<String>,
    /// Bytes of all files in the snapshot, kept for the status.
    total_bytes: u64,
    /// When the next scan is due (the armed rescan timer).
    next_scan: Option<Instant>,
    watching: bool,
    error: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Create,
    Delete,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Entry {
    /// A file's latest op is in `Conn::ops`.
    File(String),
    /// The in-sync marker for a subscription path.
    Synced(String),
    /// Deletes for cached files a RESYNC found no longer published (off
    /// the loop), handed over whole: one entry, not one per file. Each is
    /// sent unless a newer op for the file is queued or it is published
    /// again by then.
    Deletes(VecDeque<String>),
}

struct Transfer {
    vpath: String,
    mount: MountId,
    rel: String,
    meta: FileMeta,
    offset: u64,
    /// The read job in flight, if any.
    reading: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Waiting for OHAI.
    Start,
    Ready,
}

struct Conn {
    state: State,
    /// Asked for the wire extensions.
    extended: bool,
    /// Capabilities granted in OHAI-OK (`ext::META`, `ext::EXCLUDE`,
    /// `ext::LIST`).
    caps: u8,
    /// Asked for a listing (`ext::LIST_OPTION`): never sent file content.
    listing: bool,
    /// Per subscription path with `ext::EXCLUDE_OPTION`: what is left out.
    excludes: HashMap<String, Arc<Excludes>>,
    credit: u64,
    sequence: u64,
    subscriptions: Vec<String>,
    /// Subscriptions whose RESYNC waits for every mount's first scan.
    pending_resync: Vec<String>,
    /// Subscriptions resynced whose in-sync markers (one per RESYNC) wait
    /// for files still changing under them to settle (and be queued).
    awaiting_marker: HashMap<String, (u32, Instant)>,
    /// Markers owed per path when its queued `Entry::Synced` is reached.
    markers_owed: HashMap<String, u32>,
    queue: VecDeque<Entry>,
    ops: HashMap<String, Op>,
    /// Virtual path → digest of what the client holds.
    /// Sorted and with binary digests: a million entries cost about a
    /// hundred megabytes, not twice that.
    known: BTreeMap<String, cache::Holding>,
    /// Digest → offset of partial files the client holds.
    resume: HashMap<String, u64>,
    current: Option<Transfer>,
    expires_at: Instant,
    bytes_sent: u64,
    /// A large ICANHAZ being prepared off the loop, and the frames that
    /// wait behind it.
    held: cache::Held,
}

impl Conn {
    fn new(now: Instant, expiry: Duration) -> Conn {
        Conn {
            state: State::Start,
            extended: false,
            caps: 0,
            listing: false,
            excludes: HashMap::new(),
            credit: 0,
            sequence: 0,
            subscriptions: Vec::new(),
            pending_resync: Vec::new(),
            awaiting_marker: HashMap::new(),
            markers_owed: HashMap::new(),
            queue: VecDeque::new(),
            ops: HashMap::new(),
            known: BTreeMap::new(),
            resume: HashMap::new(),
            current: None,
            expires_at: now + expiry,
            bytes_sent: 0,
            held: cache::Held::default(),
        }
    }

    /// Some subscription covers `vpath` and does not exclude it (as a
    /// directory if `is_dir`; `None`: whatever it was, as for a delete of
    /// something no longer known, which an exclusion of either kind
    /// protects).
    /// The directory a subscription names is the client's mirror root,
    /// not an entry of it.
    fn wants(&self, vpath: &str, is_dir: Option<bool>) -> bool {
        self.subscriptions.iter().any(|s| {
            covers(s, vpath)
                && !(is_dir == Some(true) && vpath == s)
                && self.excludes.get(s).is_none_or(|e| {
                    let rel = vpath::relative(s, vpath);
                    match is_dir {
                        Some(is_dir) => !e.excludes(rel, is_dir),
                        None => !e.excludes(rel, false) && !e.excludes(rel, true),
                    }
                })
        })
    }

    /// The client sees attributes, directories and links.
    fn meta(&self) -> bool {
        self.extended && self.caps & ext::META != 0
    }

    /// What this client would hold at a path where `meta` is published:
    /// `None` if it never sees such an entry (a client without attributes
    /// and a directory, or a link to no file).
    fn held_form(&self, meta: &FileMeta) -> Option<cache::Holding> {
        if self.meta() {
            return Some(cache::Holding::with(Digest::parse(&meta.digest)?, meta.entry_kind(), meta.attrs));
        }
        let (_, copy) = meta.as_copy("")?;
        Digest::parse(&copy.digest).map(cache::Holding::plain)
    }

    /// Queues `op` for `vpath`, replacing a queued op for the same file.
    fn enqueue(&mut self, vpath: &str, op: Op) {
        if self.ops.insert(vpath.to_string(), op).is_none() {
            self.queue.push_back(Entry::File(vpath.to_string()));
        }
    }

    /// Queues `count` in-sync markers for `path` behind everything queued
    /// now: a client counts one marker per RESYNC it sent.
    fn enqueue_marker(&mut self, path: &str, count: u32) {
        // One queue entry per path: a repeated ICANHAZ moves it to the back
        // and adds to its count rather than growing the queue.
        self.queue.retain(|e| !matches!(e, Entry::Synced(p) if p == path));
        self.queue.push_back(Entry::Synced(path.to_string()));
        let owed = self.markers_owed.entry(path.to_string()).or_default();
        *owed = owed.saturating_add(count);
    }

    fn next_sequence(&mut self) -> u64 {
        let s = self.sequence;
        self.sequence += 1;
        s
    }
}

/// What a work key stands for. `Icanhaz::bytes` is the frame's size,
/// counted in `Filemq::preparing` until the outcome is in.
#[derive(Debug, Clone, Copy)]
enum WorkFor {
    Read { conn: ConnId, len: usize },
    Scan { mount: MountId },
    Watch { mount: MountId },
    Icanhaz { conn: ConnId, bytes: usize },
    SaveMounts,
}

/// The FILEMQ service.
pub struct Filemq {
    config: Config,
    mounts: BTreeMap<MountId, Mount>,
    next_mount: MountId,
    conns: HashMap<ConnId, Conn>,
    work: HashMap<u64, WorkFor>,
    next_work: u64,
    bytes_sent: u64,
    files_sent: u64,
    /// Directories, links, attributes and listed files sent.
    entries_sent: u64,
    deletes_sent: u64,
    read_errors: u64,
    malformed: u64,
    /// Subscribers whose next chunk read waits for room in the budget.
    budget_blocked: BTreeSet<ConnId>,
    /// The `now` of the call being handled, for timers the pump sets.
    now: Option<Instant>,
    /// ICANHAZ caches being prepared off the loop, service-wide.
    preparing: cache::Preparing,
    /// Work for mounts published before the host started ([`Service::start`]).
    startup: Vec<Action>,
    /// Run-time mount changes being saved, and overlaps warned of.
    runtime: mounts::Runtime,
}

/// Threads the host gives chunk reads (scans and caches have one each).
const READ_THREADS: usize = 2;

/// Queue entries one pump call sends at most: a queue of a million deletes
/// (a RESYNC whose cache lists a million files no longer published) goes
/// out over many loop passes, never in one.
const PUMP_BATCH: usize = 1024;

// Timer keys: a connection's expiry, a mount's next scan.
fn expiry_key(conn: ConnId) -> TimerKey {
    conn.0 << 1
}
fn scan_key(mount: MountId) -> TimerKey {
    (mount as u64) << 1 | 1
}

fn send(out: &mut Vec<Action>, to: ConnId, msg: &FilemqMsg) {
    tracing::trace!(conn = to.0, reply = msg.name(), "filemq send");
    out.push(Action::Send { to, frame: msg.encode() });
}

/// True if anything is published under subscription path `path`: a mount
/// at or below it (even an empty one), or a file under it in the mount
/// that serves it (the longest alias covering it). A mount that could not
/// be scanned may publish anything there.
fn publishes(mounts: &BTreeMap<MountId, Mount>, path: &str) -> bool {
    if mounts.values().any(|m| covers(path, &m.alias)) {
        return true;
    }
    let serving = mounts.values().filter(|m| covers(&m.alias, path)).max_by_key(|m| m.alias.len());
    serving.is_some_and(|m| m.error.is_some() || m.snapshot.has_under(vpath::relative(&m.alias, path)))
}

impl Filemq {
    pub fn new(config: Config) -> Self {
        Filemq {
            config,
            mounts: BTreeMap::new(),
            next_mount: 0,
            conns: HashMap::new(),
            work: HashMap::new(),
            next_work: 0,
            startup: Vec::new(),
            bytes_sent: 0,
            files_sent: 0,
            entries_sent: 0,
            deletes_sent: 0,
            read_errors: 0,
            malformed: 0,
            budget_blocked: BTreeSet::new(),
            now: None,
            preparing: cache::Preparing::default(),
            runtime: mounts::Runtime::default(),
        }
    }

    /// Chunk payload bytes sent to all subscribers so far.
    pub fn bytes_sent(&self) -> u64 {
        self.bytes_sent
    }

    /// Work whose outcome nobody waits for (an unwatch).
    fn untracked_work(&mut self, out: &mut Vec<Action>, job: Job) {
        let key = self.next_work;
        self.next_work += 1;
        out.push(Action::Work { key, job: Box::new(job) });
    }

    fn work(&mut self, out: &mut Vec<Action>, what: WorkFor, job: Job) -> u64 {
        let key = self.next_work;
        self.next_work += 1;
        self.work.insert(key, what);
        out.push(Action::Work { key, job: Box::new(job) });
        key
    }

    /// Publishes `root` (an absolute directory path) as `alias`, as the
    /// command line or config file does. The first scan starts at once;
    /// subscribers that asked for RESYNC wait for it.
    pub fn publish(
        &mut self,
        root: PathBuf,
        alias: &str,
        now: Instant,
        out: &mut Vec<Action>,
    ) -> Result<(), String> {
        self.publish_as(root, alias, Origin::Config, now, out)
    }

    /// [`Filemq::publish`], saying where the mount comes from: a reload
    /// replaces only `Origin::Config` mounts.
    pub fn publish_as(
        &mut self,
        root: PathBuf,
        alias: &str,
        origin: Origin,
        now: Instant,
        out: &mut Vec<Action>,
    ) -> Result<(), String> {
        let alias = vpath::normalise(alias).ok().ok_or_else(|| {
            format!("alias {alias:?} must be an absolute virtual path such as / or /photos")
        })?;
        if let Some(m) = self.mounts.values().find(|m| m.alias == alias) {
            return Err(format!("{alias} is already published from {}", mounts::shown(&m.root)));
        }
        let id = self.next_mount;
        self.next_mount += 1;
        tracing::info!(alias = %alias, root = %mounts::shown(&root), ?origin, "filemq publishing");
        self.work(out, WorkFor::Watch { mount: id }, Job::Watch { mount: id, root: root.clone() });
        self.mounts.insert(
            id,
            Mount {
                alias,
                root,
                origin,
                snapshot: Arc::default(),
                counts: (0, 0, 0),
                scanned: false,
                scanning: false,
                dirty: false,
                unstable: BTreeSet::new(),
                total_bytes: 0,
                next_scan: None,
                watching: true,
                error: None,
            },
        );
        self.start_scan(id, now, out);
        self.warn_of_overlaps(id);
        Ok(())
    }

    /// [`Filemq::publish`] before the host runs: the first scan and the
    /// watch start with [`Service::start`].
    pub fn publish_at_start(
        &mut self,
        root: PathBuf,
        alias: &str,
        origin: Origin,
        now: Instant,
    ) -> Result<(), String> {
        let mut out = std::mem::take(&mut self.startup);
        let published = self.publish_as(root, alias, origin, now, &mut out);
        self.startup = out;
        published
    }

    fn digest_cache(&self, root: &std::path::Path) -> Option<PathBuf> {
        let dir = self.config.state_dir.as_ref()?;
        let name: String = Digest::of(root.as_os_str().as_encoded_bytes()).to_string();
        Some(dir.join(format!("{name}.digests")))
    }

    fn start_scan(&mut self, id: MountId, now: Instant, out: &mut Vec<Action>) {
        let Some(mount) = self.mounts.get(&id) else { return };
        if mount.scanning {
            return;
        }
        let job = Job::Scan {
            mount: id,
            root: mount.root.clone(),
            previous: mount.snapshot.clone(),
            stable_age: self.config.stable_age,
            digest_cache: self.digest_cache(&mount.root),
        };
        let _ = now;
        if let Some(mount) = self.mounts.get_mut(&id) {
            mount.scanning = true;
            mount.dirty = false;
        }
        self.work(out, WorkFor::Scan { mount: id }, job);
    }

    /// Arms the mount's scan timer for `at`, unless it is due sooner.
    fn scan_at(&mut self, id: MountId, at: Instant, out: &mut Vec<Action>) {
        let Some(mount) = self.mounts.get_mut(&id) else { return };
        if mount.next_scan.is_some_and(|due| due <= at) {
            return;
        }
        mount.next_scan = Some(at);
        out.push(Action::SetTimer { key: scan_key(id), at });
    }

    fn scanned(
        &mut self,
        id: MountId,
        result: Result<work::Scanned, String>,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        let Some(mount) = self.mounts.get_mut(&id) else { return };
        mount.scanning = false;
        let interval = if mount.watching { self.config.rescan } else { self.config.poll_rescan };
        let mut next = now + interval;
        match result {
            Err(why) => {
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

    fn apply_changes(&mut self, id: MountId, alias: &str, changes: &[Change]) {
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
    fn resolve(&self, vpath: &str) -> Option<(MountId, String)> {
        self.mounts
            .iter()
            .filter(|(_, m)| covers(&m.alias, vpath) && vpath != m.alias)
            .max_by_key(|(_, m)| m.alias.len())
            .map(|(id, m)| {
                let rel = if m.alias == "/" { &vpath[1..] } else { &vpath[m.alias.len() + 1..] };
                (*id, rel.to_string())
            })
    }

    fn published(&self, vpath: &str) -> Option<(MountId, String, &FileMeta)> {
        let (id, rel) = self.resolve(vpath)?;
        let meta = self.mounts.get(&id)?.snapshot.files.get(&rel)?;
        Some((id, rel, meta))
    }

    /// The mounts whose files may lie under `path` (or that lie under it).
    fn overlapping<'a>(&'a self, path: &'a str) -> impl Iterator<Item = &'a Mount> + 'a {
        self.mounts.values().filter(move |m| covers(path, &m.alias) || covers(&m.alias, path))
    }

    /// Every mount that may hold files under `path` has been scanned once:
    /// a RESYNC can tell what is published there (and what is not).
    fn scanned_for(&self, path: &str) -> bool {
        self.overlapping(path).all(|m| m.scanned || m.error.is_some())
    }

    fn run_pending_resyncs(&mut self, now: Instant) {
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
    fn published_under(&self, path: &str, conn: &Conn) -> Vec<(String, Option<cache::Holding>)> {
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
    fn resync(&mut self, id: ConnId, path: &str, now: Instant) {
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
    fn resync_with(&mut self, id: ConnId, path: &str, candidates: Vec<String>, checked: bool, now: Instant) {
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
    fn release_markers(&mut self, now: Instant) {
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

    fn pump_all(&mut self, out: &mut Vec<Action>) {
        let ids: Vec<ConnId> = self.conns.keys().copied().collect();
        for id in ids {
            self.pump(id, out);
        }
    }

    /// Sends what the connection's credit allows: deletes, markers and eof
    /// markers freely, file bytes within credit, one read in flight.
    fn pump(&mut self, id: ConnId, out: &mut Vec<Action>) {
        let mut budget = PUMP_BATCH;
        loop {
            let Some(conn) = self.conns.get_mut(&id) else { return };
            if conn.state != State::Ready {
                return;
            }
            if let Some(transfer) = &conn.current {
                if transfer.reading.is_some() {
                    return;
                }
                if transfer.offset >= transfer.meta.size {
                    self.finish_file(id, out);
                    continue;
                }
                if conn.credit == 0 {
                    return;
                }
                let left = transfer.meta.size - transfer.offset;
                let len = (self.config.chunk_size as u64).min(conn.credit).min(left) as usize;
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
                self.config.budget.take(len);
                let job = Job::Read {
                    root: mount.root.clone(),
                    rel: transfer.rel.clone(),
                    offset: transfer.offset,
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

    fn send_delete(&mut self, id: ConnId, vpath: &str, out: &mut Vec<Action>) {
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
    fn start_entry(&mut self, id: ConnId, vpath: String, out: &mut Vec<Action>) {
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
        let offset = match conn.resume.remove(&file.digest) {
            Some(offset) if conn.extended => offset.min(file.size),
            _ => 0,
        };
        if offset > 0 {
            tracing::debug!(conn = id.0, %vpath, offset, "filemq resuming a partial file");
        }
        let file = FileMeta { attrs: meta.attrs, ..file };
        conn.current = Some(Transfer { vpath, mount, rel: read, meta: file, offset, reading: None });
    }

    /// Sends an entry that has no content to send, in one CHEEZBURGER
    /// (eof 1, empty chunk: no credit): a directory, a link, new attributes
    /// of a file the client holds, or (to a listing client) a file
    /// announced by its headers. The client then holds `want`.
    fn send_entry(
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
    fn headers(conn: &Conn, meta: &FileMeta) -> Hash {
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
    fn finish_file(&mut self, id: ConnId, out: &mut Vec<Action>) {
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

    fn read_done(
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
                let msg = FilemqMsg::Cheezburger {
                    sequence: conn.sequence,
                    operation: Operation::Create,
                    filename: LongStr::from(transfer.vpath.as_str()),
                    offset: transfer.offset,
                    eof: 0,
                    headers,
                    chunk: Chunk(data),
                };
                transfer.offset += len;
                conn.sequence += 1;
                conn.credit = conn.credit.saturating_sub(len);
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

    fn terminate(&mut self, id: ConnId, out: &mut Vec<Action>) {
        if self.budget_blocked.remove(&id) {
            self.config.budget.set_waiting(false);
        }
        if let Some(conn) = self.conns.remove(&id) {
            out.push(Action::CancelTimer { key: expiry_key(id) });
            self.preparing.bytes -= conn.held.bytes;
            cache::discard(conn.known, out);
        }
    }

    fn subscribe(
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
    fn subscribe_prepared(
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
    fn install_known(
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
    fn begin_subscription(
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
    fn finish_subscription(
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
                match stale {
                    Some(stale) => self.resync_with(id, &path, stale, true, now),
                    None => self.resync(id, &path, now),
                }
            } else if let Some(conn) = self.conns.get_mut(&id) {
                if !conn.pending_resync.contains(&path) {
                    conn.pending_resync.push(path);
                }
            }
        }
        self.pump(id, out);
    }

    fn receive(&mut self, id: ConnId, msg: FilemqMsg, offered: u8, now: Instant, out: &mut Vec<Action>) {
        let expiry = self.config.expiry;
        if !self.conns.contains_key(&id) {
            out.push(Action::SetTimer { key: expiry_key(id), at: now + expiry });
        }
        let conn = self.conns.entry(id).or_insert_with(|| Conn::new(now, expiry));
        conn.expires_at = now + expiry;
        match (conn.state, msg) {
            (_, FilemqMsg::Ohai { protocol, version }) => {
                if protocol.as_bytes() != b"FILEMQ" || version != 2 {
                    send(out, id, &FilemqMsg::Rtfm { reason: ShortStr::lossy("FILEMQ version 2 only") });
                    return self.terminate(id, out);
                }
                // A second OHAI starts the session over (spec §5.1).
                let mut fresh = Conn::new(now, expiry);
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
                conn.credit = conn.credit.saturating_add(credit).min(self.config.max_credit);
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

    /// Stops publishing the mount at `alias`: its watch and scans end, and
    /// subscribers get a delete for each of its files they were sent.
    pub fn unpublish(&mut self, alias: &str, out: &mut Vec<Action>) -> Result<(), String> {
        let Some(id) = self.mounts.iter().find(|(_, m)| m.alias == alias).map(|(id, _)| *id) else {
            return Err(format!("nothing is published as {alias}"));
        };
        let Some(mount) = self.mounts.remove(&id) else { return Ok(()) };
        tracing::info!(alias = %mount.alias, root = %mounts::shown(&mount.root), "filemq no longer publishing");
        self.forget_overlaps(id);
        out.push(Action::CancelTimer { key: scan_key(id) });
        self.untracked_work(out, Job::Unwatch { mount: id });
        self.work
            .retain(|_, w| !matches!(w, WorkFor::Watch { mount } | WorkFor::Scan { mount } if *mount == id));
        // Deletes for what the mount served (unless another mount now
        // serves the same virtual path).
        let gone: Vec<(String, bool, bool)> = mount
            .snapshot
            .files
            .iter()
            .map(|(rel, meta)| (join(&mount.alias, rel), meta.kind == Kind::Dir, meta.as_copy(rel).is_some()))
            .filter(|(vpath, _, _)| self.published(vpath).is_none())
            .collect();
        for conn in self.conns.values_mut() {
            if conn.state != State::Ready {
                continue;
            }
            if conn.current.as_ref().is_some_and(|t| t.mount == id) {
                conn.current = None;
            }
            for (vpath, is_dir, all) in &gone {
                if (*all || conn.meta()) && conn.wants(vpath, Some(*is_dir)) {
                    conn.enqueue(vpath, Op::Delete);
                }
            }
        }
        self.announce_revealed(&mount.alias);
        self.pump_all(out);
        Ok(())
    }

    /// Serves the mount `id` from another directory: watch the new one and
    /// scan it against the snapshot subscribers were sent from.
    fn reroot(&mut self, id: MountId, root: PathBuf, now: Instant, out: &mut Vec<Action>) {
        let Some(mount) = self.mounts.get_mut(&id) else { return };
        tracing::info!(alias = %mount.alias, from = %mounts::shown(&mount.root), to = %mounts::shown(&root), "filemq mount moved");
        mount.root = root.clone();
        mount.error = None;
        let scanning = mount.scanning;
        if scanning {
            // The scan of the old directory must not be the last word.
            mount.dirty = true;
        }
        for conn in self.conns.values_mut() {
            if conn.current.as_ref().is_some_and(|t| t.mount == id) {
                if let Some(t) = conn.current.take() {
                    conn.enqueue(&t.vpath, Op::Create);
                }
            }
        }
        self.work.retain(|_, w| !matches!(w, WorkFor::Watch { mount } if *mount == id));
        self.untracked_work(out, Job::Unwatch { mount: id });
        self.work(out, WorkFor::Watch { mount: id }, Job::Watch { mount: id, root });
        if !scanning {
            self.start_scan(id, now, out);
        }
    }

    /// The command `MOUNTS DIR=/alias...` (a reloaded config file, `DIR`
    /// escaped): publish what is new, unpublish what is no longer listed,
    /// keep the rest. Only the config's own mounts are replaced: run-time
    /// ones stay, and an alias one of them holds is refused (the rest of
    /// the list is still applied).
    fn mounts_command(
        &mut self,
        words: &[String],
        now: Instant,
        out: &mut Vec<Action>,
    ) -> Result<String, String> {
        let mut wanted = Vec::new();
        for word in &words[1..] {
            let (root, alias) =
                word.rsplit_once("=/").ok_or_else(|| format!("{word:?} is not DIR=/alias"))?;
            let alias = vpath::normalise(&format!("/{alias}"))
                .ok()
                .ok_or_else(|| format!("bad alias in {word:?}"))?;
            let root = zbroker_proto::escape::unescape(root)
                .map(|r| PathBuf::from(<std::ffi::OsString as std::os::unix::ffi::OsStringExt>::from_vec(r)))
                .ok_or_else(|| format!("bad directory in {word:?}"))?;
            wanted.push((root, alias));
        }
        let mut refused = Vec::new();
        wanted.retain(|(root, alias)| match self.runtime_holder(alias) {
            Some(held) => {
                refused.push(format!(
                    "{alias} ({}) is published at run time from {held}: `zbroker unpublish` it first",
                    mounts::shown(root)
                ));
                false
            }
            None => true,
        });
        let config = |m: &&Mount| m.origin == Origin::Config;
        // An alias that stays but moves to another directory keeps its
        // mount: the next scan's diff says what changed, and subscribers
        // are not sent a delete for every file first.
        let mut moved = 0;
        for (root, alias) in &wanted {
            let Some(id) = self
                .mounts
                .iter()
                .find(|(_, m)| config(m) && m.alias == *alias && m.root != *root)
                .map(|(id, _)| *id)
            else {
                continue;
            };
            self.reroot(id, root.clone(), now, out);
            moved += 1;
        }
        let stale: Vec<String> = self
            .mounts
            .values()
            .filter(config)
            .filter(|m| !wanted.iter().any(|(root, alias)| *root == m.root && *alias == m.alias))
            .map(|m| m.alias.clone())
            .collect();
        for alias in &stale {
            self.unpublish(alias, out)?;
        }
        let mut added = 0;
        for (root, alias) in wanted {
            if !self.mounts.values().any(|m| m.root == root && m.alias == alias) {
                self.publish(root, &alias, now, out)?;
                added += 1;
            }
        }
        let done = format!(
            "mounts: {added} published, {moved} moved, {} unpublished, {} in all",
            stale.len(),
            self.mounts.len()
        );
        match refused.is_empty() {
            true => Ok(done),
            false => Err(format!("{done}; not published: {}", refused.join("; "))),
        }
    }

    /// Connections with state (for leak checks).
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// Per connection: (connection, queued patches, subscriptions, credit),
    /// for the fuzzers' bounds on memory.
    pub fn queue_lengths(&self) -> Vec<(ConnId, usize, usize, u64)> {
        self.conns.iter().map(|(id, c)| (*id, c.queue.len(), c.subscriptions.len(), c.credit)).collect()
    }

    /// Chunk reads asked for and not yet answered (for leak checks).
    pub fn reads_in_flight(&self) -> usize {
        self.work.values().filter(|w| matches!(w, WorkFor::Read { .. })).count()
    }

    /// Mounts published now.
    pub fn mount_count(&self) -> usize {
        self.mounts.len()
    }
}

impl Service for Filemq {
    fn name(&self) -> &'static str {
        "filemq"
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
                // An older client: tell it what we speak (spec §0, §20).
                Some(generation) => {
                    tracing::debug!(conn = conn.0, ?generation, "filemq OHAI of an older generation");
                    send(out, conn, &FilemqMsg::Rtfm { reason: ShortStr::lossy("FILEMQ version 2 only") });
                    self.terminate(conn, out);
                }
                None => {
                    // Dropped: one bad peer must not stop the broker (spec §2).
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
            (what, done) => tracing::error!(?what, ?done, "filemq work outcome of the wrong kind"),
        }
    }

    fn command(
        &mut self,
        request: u64,
        words: &[String],
        now: Instant,
        out: &mut Vec<Action>,
    ) -> Option<Answer> {
        match words.first().map(String::as_str) {
            Some("PUBLISH" | "UNPUBLISH") => Some(self.runtime_command(request, words, now, out)),
            Some("MOUNTS") => Some(Answer::Now(self.mounts_command(words, now, out))),
            _ => None,
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
                    "credit": c.credit,
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
