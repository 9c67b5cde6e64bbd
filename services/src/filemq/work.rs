//! Work the FILEMQ service hands off the event loop: scanning a mount,
//! hashing files, reading chunks. The service asks with [`Job`]s (through
//! `Action::Work`) and is told the outcome with [`Done`] (through
//! `Service::on_work`). The state machine never runs a job itself; the
//! reactor runs them on worker threads (`disk::run`), and `sim::Sim` runs
//! them inline, so tests stay deterministic.

use bytes::Bytes;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use zbroker_proto::codec::{Hash, LongStr};
pub use zbroker_proto::filemq_ext::{Attrs, EntryKind};

/// A mount, numbered by the service. Never reused while the broker runs.
pub type MountId = u32;

/// One published entry as the last scan saw it: a file, or (for clients
/// granted `filemq_ext::META`) a directory or a symlink.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FileMeta {
    /// A file's size (0 for the rest).
    pub size: u64,
    /// When a file last changed (the later of mtime and ctime),
    /// nanoseconds since the Unix epoch (`disk::mtime_ns`); 0 for the rest.
    pub mtime_ns: u64,
    /// What clients with attributes compare: a file's SHA-1, 40 upper-case
    /// hex digits (CZMQ `zdigest`); a link's `filemq_ext::link_digest`; a
    /// directory's `filemq_ext::EMPTY_SHA1`.
    pub digest: String,
    pub kind: Kind,
    /// Permission bits and mtime of the entry itself.
    pub attrs: Attrs,
}

/// What an entry is, with what only that kind has.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Kind {
    #[default]
    File,
    Dir,
    /// A symlink whose target stays inside the root (`target` is
    /// relative: an absolute one inside the root is rewritten). `copy` is
    /// the file it leads to, when it leads to one: what a client without
    /// attributes (the original) is sent under the link's name.
    Link {
        target: String,
        copy: Option<Box<LinkedFile>>,
    },
}

/// The file a symlink leads to, as sent to clients that take links as
/// copies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkedFile {
    /// Its path relative to the root (its real path).
    pub rel: String,
    pub size: u64,
    pub mtime_ns: u64,
    pub digest: String,
}

impl FileMeta {
    pub fn entry_kind(&self) -> EntryKind {
        match self.kind {
            Kind::File => EntryKind::File,
            Kind::Dir => EntryKind::Dir,
            Kind::Link { .. } => EntryKind::Link,
        }
    }

    pub fn is_file(&self) -> bool {
        self.kind == Kind::File
    }

    /// What a client without attributes gets for this entry: the relative
    /// path to read and the file's meta, for a file or a link to one;
    /// `None` for directories and other links (it never sees them).
    pub fn as_copy<'a>(&'a self, rel: &'a str) -> Option<(&'a str, FileMeta)> {
        match &self.kind {
            Kind::File => Some((rel, self.clone())),
            Kind::Link { copy: Some(copy), .. } => Some((
                copy.rel.as_str(),
                FileMeta {
                    size: copy.size,
                    mtime_ns: copy.mtime_ns,
                    digest: copy.digest.clone(),
                    ..FileMeta::default()
                },
            )),
            _ => None,
        }
    }
}

/// The published entries of one mount, keyed by path relative to its root
/// with `/` separators and no leading `/` (`"a/b.txt"`). Hidden entries (a
/// component starting with `.`) and anything outside the root are never in
/// it, and the root itself is not an entry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub files: BTreeMap<String, FileMeta>,
}

impl Snapshot {
    /// True if an entry is at relative path `rel` or below it.
    pub fn has_under(&self, rel: &str) -> bool {
        if rel.is_empty() {
            return !self.files.is_empty();
        }
        // Keys sharing `rel`'s characters ("a-b" beside "a/x") sort among
        // those under it: look at the entry itself, then at the range of
        // `rel/`.
        let dir = format!("{rel}/");
        self.files.contains_key(rel)
            || self.files.range(dir.clone()..).next().is_some_and(|(k, _)| k.starts_with(&dir))
    }
}

/// What changed between two snapshots, by relative path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// New, or changed in any way (content, attributes, kind, a link's
    /// target or the file it leads to): the new meta is in the snapshot.
    Created(String),
    /// Gone: a file, or a link to one (which any client may hold).
    Deleted(String),
    /// Gone: a directory (`dir`), or a link to no file, which only
    /// clients with attributes ever see.
    Removed { rel: String, dir: bool },
}

/// Work to do off the event loop.
#[derive(Debug, Clone)]
pub enum Job {
    /// Walk `root`, compare with `previous`, and report the stable files.
    /// A file is stable once its mtime is at least `stable_age` old; an
    /// unstable file keeps its `previous` entry (or stays absent) and sets
    /// `Done::Scanned::unstable`. Digests are reused from `previous` when
    /// size and mtime are unchanged, else from `digest_cache` (a file kept
    /// between runs; read when `previous` is empty, rewritten when new
    /// digests were computed), else computed.
    Scan {
        mount: MountId,
        root: PathBuf,
        previous: Arc<Snapshot>,
        stable_age: Duration,
        digest_cache: Option<PathBuf>,
    },
    /// Read `len` bytes at `offset` of `root/rel`, provided the file still
    /// has the size and mtime in `expect` and still lies inside `root`.
    Read { root: PathBuf, rel: String, offset: u64, len: usize, expect: FileMeta },
    /// Watch `root` for changes (inotify); each burst of changes is
    /// reported as `Done::Dirty`. Run by the reactor, not by `disk::run`.
    Watch { mount: MountId, root: PathBuf },
    /// Stop watching (the mount was removed).
    Unwatch { mount: MountId },
    /// Decode a large ICANHAZ frame and turn its cache into what the
    /// service keeps (`cache::prepare`): a million entries take too long
    /// for one pass of the event loop.
    Icanhaz { frame: Bytes, mounts: Vec<MountView> },
    /// Walk the published entries under a RESYNC's path against what the
    /// client holds (`scans::walk`): a million entries take too long for
    /// one pass of the event loop.
    Resync(Box<Walk>),
    /// Free a connection's large holdings (a million names take a while
    /// to free); no outcome.
    Discard(Garbage),
    /// Replace the run-time mounts file at `path` with `contents`, whole
    /// (`mounts::save`): written, synced and renamed into place.
    SaveMounts { path: PathBuf, contents: Vec<u8> },
}

/// What a connection knew (and a prepared stale list), to be freed off
/// the loop.
#[derive(Clone)]
pub struct Garbage(pub BTreeMap<String, super::cache::Holding>, pub Vec<String>);

impl std::fmt::Debug for Garbage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Garbage({} entries, {} names)", self.0.len(), self.1.len())
    }
}

/// What an off-loop job needs to know of a mount.
#[derive(Debug, Clone)]
pub struct MountView {
    pub alias: String,
    pub snapshot: Arc<Snapshot>,
    /// Scanned once (or failing): its snapshot says what is published.
    pub ready: bool,
}

/// The outcome of a [`Job`].
#[derive(Debug)]
pub enum Done {
    Scanned {
        mount: MountId,
        /// `Err` when the root itself cannot be read (the previous snapshot
        /// stays in force).
        result: Result<Scanned, ScanError>,
    },
    Read(Result<Bytes, ReadError>),
    /// Something under the mount changed: scan it soon.
    Dirty {
        mount: MountId,
    },
    /// The watch could not be set up: rely on periodic rescans.
    WatchFailed {
        mount: MountId,
        why: WatchError,
    },
    /// A large ICANHAZ, decoded and prepared; `Err` if it is malformed.
    Icanhaz(Result<Box<Prepared>, PrepareError>),
    /// A RESYNC's walk: what the client held (handed back) and what it
    /// lacks; `Err` if the walk failed.
    Resynced(Result<Box<Walked>, WalkError>),
    /// The run-time mounts file was saved, or why not.
    Saved(Result<(), super::mounts::SaveError>),
}

/// Why a mount's root could not be scanned (the previous snapshot stays).
#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error("{}: {source}", .root.display())]
    Root { root: PathBuf, source: std::io::Error },
    #[error("{}: not a directory", .0.display())]
    NotADirectory(PathBuf),
    /// The scan panicked (a bug, answered rather than fatal).
    #[error("scan failed: {0}")]
    Panicked(String),
}

/// Why a mount's tree cannot be watched (it is rescanned periodically).
#[derive(Debug, thiserror::Error)]
#[error("cannot watch {}: {source}", .root.display())]
pub struct WatchError {
    pub root: PathBuf,
    pub source: notify::Error,
}

/// Why a large ICANHAZ was not prepared.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error("ICANHAZ {field}: {error:?}")]
    Malformed { field: &'static str, error: zbroker_proto::codec::FieldError },
    /// The preparation panicked (a bug, answered rather than fatal).
    #[error("preparing the cache failed: {0}")]
    Panicked(String),
}

/// A RESYNC walked off the loop: the client's `known` map is moved here
/// (not copied) for the walk's length, and handed back in [`Walked`].
#[derive(Clone)]
pub struct Walk {
    pub path: String,
    /// The mounts in force when the walk was asked for.
    pub mounts: Vec<MountView>,
    pub excludes: Option<Arc<zbroker_proto::exclude::Excludes>>,
    /// The client sees attributes, directories and links (`Conn::meta`).
    pub meta: bool,
    pub known: BTreeMap<String, super::cache::Holding>,
}

impl std::fmt::Debug for Walk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Walk({}, {} mounts, {} known)", self.path, self.mounts.len(), self.known.len())
    }
}

/// What a RESYNC finds: the virtual paths the client lacks (or holds and
/// can no longer see), in walk order, and what it holds under the path
/// that the mounts do not publish.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Found {
    pub creates: Vec<String>,
    pub stale: Vec<String>,
}

/// The outcome of [`Job::Resync`].
pub struct Walked {
    pub known: BTreeMap<String, super::cache::Holding>,
    pub found: Found,
}

impl std::fmt::Debug for Walked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (k, c, s) = (self.known.len(), self.found.creates.len(), self.found.stale.len());
        write!(f, "Walked({k} known, {c} creates, {s} stale)")
    }
}

/// Why a RESYNC's walk has no outcome.
#[derive(Debug, thiserror::Error)]
pub enum WalkError {
    /// The walk panicked (a bug, answered rather than fatal); what the
    /// client held went with it.
    #[error("walking a RESYNC failed: {0}")]
    Panicked(String),
}

/// A subscription request prepared off the loop.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// The path as sent (checked by the service).
    pub path: LongStr,
    pub options: Hash,
    /// Virtual path → upper-case digest of what the client holds under
    /// `path` (its cache, normalised; bad entries left out). Empty if the
    /// path is not acceptable.
    pub known: BTreeMap<String, super::cache::Holding>,
    /// With RESYNC, once every mount under the path has been scanned: the
    /// cached files that the mounts as they were did not publish
    /// (candidates for deletes, checked again on the loop).
    pub stale: Option<Vec<String>>,
}

#[derive(Debug, Clone)]
pub struct Scanned {
    pub snapshot: Arc<Snapshot>,
    pub changes: Vec<Change>,
    /// Some files were left out (or kept at their old version) because
    /// they changed within `stable_age`: scan again after it.
    pub unstable: bool,
    /// Which files those are (relative paths).
    pub unstable_files: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    /// The file is no longer what was announced (size or mtime differ,
    /// shorter than expected, or it left the root): a rescan will
    /// announce the new version.
    #[error("file changed since it was announced")]
    Changed,
    #[error("{0}")]
    Io(String),
}
