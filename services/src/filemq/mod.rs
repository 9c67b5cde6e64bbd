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
//! Divergences from the original, all on the same wire (docs/protocol/FILEMQ.md
//! "Divergences"):
//! - malformed frames are dropped (the original stopped serving everyone),
//!   and an OHAI of an older generation gets RTFM;
//! - a chunk is `min(chunk_size, credit, bytes left)`, so a small credit
//!   never sends the previous chunk again for ever;
//! - patches are filtered by each subscription's path, and a connection may
//!   hold many subscriptions;
//! - RESYNC works: a subscriber gets what it lacks under the path, nothing
//!   its cache already lists, and deletes for cached files no longer
//!   published;
//! - deletes carry clean fields; deletes and eof markers cost no
//!   credit and are sent whatever the credit;
//! - a file that changed since it was announced is abandoned (the rescan
//!   announces the new version) instead of sending a torn mixture;
//! - the wire extensions of ARCHITECTURE.md ("FILEMQ: how we extend the
//!   wire") go to clients that ask for them with the `X-ZBROKER` option.

pub mod cache;
pub mod command;
mod delivery;
pub mod disk;
pub mod executor;
pub mod mounts;
mod scans;
mod service;
mod subscribe;
pub mod work;

#[cfg(test)]
mod cache_tests;
#[cfg(test)]
mod mirror_tests;
#[cfg(test)]
mod mounts_tests;
#[cfg(test)]
mod resync_tests;
#[cfg(test)]
mod tests;

use crate::{Action, Answer, CommandError, ConnId, Counter, Service, TimerKey};
use bytes::Bytes;
use command::MountError;
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
use zbroker_proto::transfer::{Credit, Outflow};
use zbroker_proto::vpath::{self, covers, join};

/// The service's name (in logs, the status, and commands addressed to it).
pub const NAME: &str = "filemq";

/// Settings of the FILEMQ service.
#[derive(Debug, Clone)]
pub struct Config {
    /// A connection silent for this long is forgotten (docs/protocol/FILEMQ.md "Expiry").
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
    /// Most credit a connection may hold; grants beyond it are dropped
    /// (`transfer::Credit`).
    /// Bounds what the broker may have in flight to one subscriber.
    pub max_credit: u64,
    /// Where digests are kept between runs (one file per mount).
    pub state_dir: Option<PathBuf>,
    /// The broker-wide memory budget, shared with the host: a chunk read
    /// counts from the moment it is asked for until its CHEEZBURGER is
    /// handed to the host (which counts it on).
    pub budget: crate::budget::Budget,
    /// A RESYNC looking at more entries than this (published under its
    /// path, plus held there) is walked off the loop (`Job::Resync`).
    pub resync_inline: usize,
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
            resync_inline: RESYNC_INLINE,
        }
    }
}

/// Entries a RESYNC may look at on the loop (README "Performance":
/// about a millisecond in a release build, a few in a debug one).
pub const RESYNC_INLINE: usize = 2048;
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
    /// What a RESYNC walked off the loop found the client lacks, handed
    /// over whole. Each is sent as if queued alone: with a newer op
    /// queued for the file since, that op goes here instead.
    Creates(VecDeque<String>),
}

struct Transfer {
    vpath: String,
    mount: MountId,
    rel: String,
    meta: FileMeta,
    /// Where the file is, and the chunk being read (`zbroker_proto::transfer`).
    outflow: Outflow,
    /// The read job in flight, if any: its outcome is matched by key.
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
    credit: Credit,
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
    fn new(now: Instant, expiry: Duration, max_credit: u64) -> Conn {
        Conn {
            state: State::Start,
            extended: false,
            caps: 0,
            listing: false,
            excludes: HashMap::new(),
            credit: Credit::new(max_credit),
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
        scans::held_form(self.meta(), meta)
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
    Resync { conn: ConnId },
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
    ) -> Result<(), MountError> {
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
    ) -> Result<(), MountError> {
        let alias = vpath::normalise(alias).map_err(|_| MountError::BadAlias(alias.to_string()))?;
        if let Some(m) = self.mounts.values().find(|m| m.alias == alias) {
            return Err(MountError::AliasTaken { alias, root: m.root.clone() });
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
    ) -> Result<(), MountError> {
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

    /// Stops publishing the mount at `alias`: its watch and scans end, and
    /// subscribers get a delete for each of its files they were sent.
    pub fn unpublish(&mut self, alias: &str, out: &mut Vec<Action>) -> Result<(), MountError> {
        let Some(id) = self.mounts.iter().find(|(_, m)| m.alias == alias).map(|(id, _)| *id) else {
            return Err(MountError::UnknownAlias(alias.to_string()));
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

    /// Connections with state (for leak checks).
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// Per connection: (connection, queued patches, subscriptions, credit),
    /// for the fuzzers' bounds on memory.
    pub fn queue_lengths(&self) -> Vec<(ConnId, usize, usize, u64)> {
        self.conns
            .iter()
            .map(|(id, c)| (*id, c.queue.len(), c.subscriptions.len(), c.credit.available()))
            .collect()
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
