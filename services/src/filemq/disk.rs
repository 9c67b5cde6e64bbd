//! Disk work for FILEMQ (scan, hash, read), run on worker threads (or inline
//! by `sim::Sim`). Everything here is blocking file-system work; nothing
//! here knows about sockets or the event loop.
//!
//! Rules the scan keeps (docs/protocol/FILEMQ.md "Mounts" and "Changes", plus our choices):
//! - Hidden entries (a name starting with `.`) and their subtrees are never
//!   published.
//! - Directories are published (with their attributes) and walked; a
//!   symlink is published as a link, never followed, when its target
//!   stays inside the root (`filemq_ext::link_target`, and its real
//!   target too), so what lies behind a symlinked directory is published
//!   once, under its real path. An absolute target inside the root is
//!   published as the equivalent relative one. A link to a file also
//!   carries that file's meta, for clients that take links as copies.
//! - A file is published once its mtime is at least `stable_age` old. A file
//!   still being written keeps the version clients already have.
//! - A file that exists but cannot be examined (permission denied, I/O
//!   error) keeps its previous entry: we do not know that it changed, and
//!   announcing a delete would make every client throw away a file the
//!   publisher still has. A file that has vanished is deleted.

use super::work::{
    Attrs, Change, Done, FileMeta, Job, Kind, LinkedFile, ReadError, ScanError, Scanned, Snapshot,
};
use bytes::Bytes;
use sha1::{Digest as _, Sha1};
use std::collections::BTreeMap;
use std::fs::{self, File, Metadata};
use std::io::{self, BufRead, BufReader, ErrorKind, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tracing::{debug, warn};
use zbroker_proto::digest::{CacheLine, Digest, CACHE_HEADER};
use zbroker_proto::filemq_ext::{link_digest, link_target, EMPTY_SHA1, PERMISSIONS};

/// Files are hashed through a buffer this large: big enough that reading a
/// large file costs few system calls, small enough to keep per scan.
const HASH_BUFFER: usize = 1 << 20;

/// An mtime this far in the future is still taken as "now": file-system
/// timestamps are coarser than the clock, and clocks of file servers drift.
/// Further in the future, the file is treated as being written.
const FUTURE_SLACK: Duration = Duration::from_secs(2);

/// Runs one job on the calling thread. `None` for the jobs only the
/// reactor can run (`Watch`, `Unwatch`).
pub fn run(job: Job) -> Option<Done> {
    match job {
        Job::Scan { mount, root, previous, stable_age, digest_cache } => {
            Some(Done::Scanned { mount, result: scan(&root, &previous, stable_age, digest_cache.as_deref()) })
        }
        Job::Read { root, rel, offset, len, expect } => {
            Some(Done::Read(read(&root, &rel, offset, len, &expect)))
        }
        Job::Icanhaz { frame, mounts } => Some(Done::Icanhaz(super::cache::prepare(frame, &mounts))),
        Job::Resync(walk) => Some(Done::Resynced(Ok(Box::new(super::scans::walk_job(*walk))))),
        Job::SaveMounts { path, contents } => Some(Done::Saved(super::mounts::save(&path, &contents))),
        Job::Watch { .. } | Job::Unwatch { .. } | Job::Discard(_) => None,
    }
}

/// Walks `root` and compares what it finds with `previous` (see
/// [`Job::Scan`]). `Err` only when the root itself cannot be read.
pub fn scan(
    root: &Path,
    previous: &Snapshot,
    stable_age: Duration,
    digest_cache: Option<&Path>,
) -> Result<Scanned, ScanError> {
    let unreadable = |source| ScanError::Root { root: root.to_path_buf(), source };
    let canonical_root = fs::canonicalize(root).map_err(unreadable)?;
    let root_meta = fs::metadata(&canonical_root).map_err(unreadable)?;
    if !root_meta.is_dir() {
        return Err(ScanError::NotADirectory(root.to_path_buf()));
    }
    let top = fs::read_dir(&canonical_root).map_err(unreadable)?;

    // The cache only matters when there is nothing better to reuse: after a
    // restart. Later scans reuse the previous snapshot's digests.
    let cache = match digest_cache {
        Some(path) if previous.files.is_empty() => load_cache(path),
        _ => BTreeMap::new(),
    };
    let given_root = std::path::absolute(root).unwrap_or_else(|_| root.to_path_buf());
    let mut walk = Walk {
        root: canonical_root.clone(),
        given_root,
        links: Vec::new(),
        now_ns: nanos_since_epoch(SystemTime::now()),
        stable_age_ns: u64::try_from(stable_age.as_nanos()).unwrap_or(u64::MAX),
        previous,
        cache: &cache,
        files: BTreeMap::new(),
        unstable: false,
        unstable_files: Vec::new(),
        unknown: Vec::new(),
        buffer: Vec::new(),
    };
    let mut ancestors = vec![(root_meta.dev(), root_meta.ino())];
    walk.dir(top, "", &canonical_root, &mut ancestors);
    walk.keep_unknown();
    walk.link_copies();

    let Walk { files, unstable, unstable_files, .. } = walk;
    if let Some(path) = digest_cache {
        // What the cache file holds now: what we loaded, or (when we did not
        // load it) what the previous scan saw, since every scan that changes
        // the snapshot rewrites it.
        let on_disk = if previous.files.is_empty() { &cache } else { &previous.files };
        if !same_files(&files, on_disk) {
            if let Err(e) = store_cache(path, &files) {
                warn!("cannot write the digest cache {}: {e}", path.display());
            }
        }
    }
    let changes = diff(&previous.files, &files);
    Ok(Scanned { snapshot: Arc::new(Snapshot { files }), changes, unstable, unstable_files })
}

/// The regular files of two maps are the same, as the digest cache holds
/// them (size, change time, digest).
fn same_files(a: &BTreeMap<String, FileMeta>, b: &BTreeMap<String, FileMeta>) -> bool {
    fn files(m: &BTreeMap<String, FileMeta>) -> impl Iterator<Item = (&String, u64, u64, &String)> {
        m.iter().filter(|(_, f)| f.is_file()).map(|(k, f)| (k, f.size, f.mtime_ns, &f.digest))
    }
    files(a).eq(files(b))
}

/// What changed from `before` to `after`, sorted by path.
fn diff(before: &BTreeMap<String, FileMeta>, after: &BTreeMap<String, FileMeta>) -> Vec<Change> {
    let created = after
        .iter()
        .filter(|(key, meta)| before.get(*key) != Some(meta))
        .map(|(key, _)| Change::Created(key.clone()));
    let deleted = before.iter().filter(|(key, _)| !after.contains_key(*key)).map(|(key, meta)| {
        match meta.as_copy(key) {
            Some(_) => Change::Deleted(key.clone()),
            None => Change::Removed { rel: key.clone(), dir: meta.kind == Kind::Dir },
        }
    });
    let mut changes: Vec<Change> = created.chain(deleted).collect();
    changes.sort_by(|a, b| change_path(a).cmp(change_path(b)));
    changes
}

fn change_path(change: &Change) -> &str {
    match change {
        Change::Created(path) | Change::Deleted(path) | Change::Removed { rel: path, .. } => path,
    }
}

/// One scan in progress.
struct Walk<'a> {
    /// The canonical root: everything published lies under it.
    root: PathBuf,
    /// The root as given, made absolute (absolute link targets may name
    /// it rather than the canonical one).
    given_root: PathBuf,
    /// Links to files: (the link's key, the file's key), whose copies are
    /// filled in once the walk has seen the files.
    links: Vec<(String, String)>,
    now_ns: u64,
    stable_age_ns: u64,
    previous: &'a Snapshot,
    cache: &'a BTreeMap<String, FileMeta>,
    /// The new snapshot being built.
    files: BTreeMap<String, FileMeta>,
    unstable: bool,
    unstable_files: Vec<String>,
    /// Keys (`"a/b"`) and key prefixes (`"a/"`, `""` for everything) that
    /// exist but could not be examined: their previous entries are kept.
    unknown: Vec<String>,
    /// The hashing buffer, allocated on the first hash.
    buffer: Vec<u8>,
}

impl Walk<'_> {
    /// Publishes the entries of one directory. `prefix` is its key with a
    /// trailing `/` (empty for the root), `real` its canonical path, and
    /// `ancestors` the (device, inode) of every directory from the root
    /// down to it, so that a symlink (or bind mount) back up the tree is
    /// not followed for ever.
    fn dir(&mut self, entries: fs::ReadDir, prefix: &str, real: &Path, ancestors: &mut Vec<(u64, u64)>) {
        for entry in entries {
            let entry = match entry {
                Ok(entry) => entry,
                Err(e) => {
                    warn!("cannot list {}: {e}", real.display());
                    self.unknown.push(prefix.to_owned());
                    return;
                }
            };
            let raw_name = entry.file_name();
            let Some(name) = raw_name.to_str() else {
                warn!("skipping {}: the name is not UTF-8", entry.path().display());
                continue;
            };
            if name.starts_with('.') {
                continue;
            }
            let key = format!("{prefix}{name}");
            let path = real.join(name);
            let file_type = match entry.file_type() {
                Ok(file_type) => file_type,
                Err(e) => {
                    self.cannot_examine(&key, &path, &e);
                    continue;
                }
            };
            if file_type.is_symlink() {
                self.link(key, &path);
                continue;
            }
            let meta = match entry.metadata() {
                Ok(meta) => meta,
                Err(e) => {
                    self.cannot_examine(&key, &path, &e);
                    continue;
                }
            };
            if meta.is_file() {
                self.file(key, &path, &meta);
            } else if meta.is_dir() {
                self.subdir(&key, &path, &meta, ancestors);
            } else {
                debug!("skipping {}: not a regular file, directory or symlink", path.display());
            }
        }
    }

    fn subdir(&mut self, key: &str, real: &Path, meta: &Metadata, ancestors: &mut Vec<(u64, u64)>) {
        let id = (meta.dev(), meta.ino());
        if ancestors.contains(&id) {
            debug!("skipping {}: it loops back to a directory above it", real.display());
            return;
        }
        let prefix = format!("{key}/");
        match fs::read_dir(real) {
            Ok(entries) => {
                let dir = FileMeta {
                    digest: EMPTY_SHA1.to_string(),
                    kind: Kind::Dir,
                    attrs: Attrs::of(meta),
                    ..FileMeta::default()
                };
                self.files.insert(key.to_string(), dir);
                ancestors.push(id);
                self.dir(entries, &prefix, real, ancestors);
                ancestors.pop();
            }
            Err(e) => self.cannot_examine(&prefix, real, &e),
        }
    }

    /// Publishes the symlink at `path` as a link if its target stays inside
    /// the root (as text, and as the file system resolves it).
    fn link(&mut self, key: String, path: &Path) {
        let text = match fs::read_link(path) {
            Ok(text) => text,
            Err(e) => return self.cannot_examine(&key, path, &e),
        };
        let Some(text) = text.to_str() else {
            debug!("skipping symlink {}: its target is not UTF-8", path.display());
            return;
        };
        let target = if text.starts_with('/') {
            match self.relative(&key, Path::new(text)) {
                Some(target) => target,
                None => {
                    debug!("skipping symlink {}: {text} is outside the root", path.display());
                    return;
                }
            }
        } else {
            text.to_string()
        };
        if let Err(why) = link_target(&key, &target) {
            debug!("skipping symlink {}: it {why}", path.display());
            return;
        }
        // What it really leads to (a symlink on the way may lead out); a
        // dangling link is published as it is.
        if let Ok(real) = fs::canonicalize(path) {
            if !inside(&self.root, &real) {
                debug!("skipping symlink {}: {} is outside the root", path.display(), real.display());
                return;
            }
            let is_file = fs::metadata(&real).is_ok_and(|m| m.is_file());
            let rel = real.strip_prefix(&self.root).ok().and_then(|r| r.to_str());
            if let (true, Some(rel)) = (is_file, rel) {
                self.links.push((key.clone(), rel.to_string()));
            }
        }
        let attrs = match fs::symlink_metadata(path) {
            Ok(meta) => Attrs { mode: PERMISSIONS, ..Attrs::of(&meta) },
            Err(e) => return self.cannot_examine(&key, path, &e),
        };
        let digest = link_digest(&target);
        self.files.insert(
            key,
            FileMeta { digest, kind: Kind::Link { target, copy: None }, attrs, ..FileMeta::default() },
        );
    }

    /// An absolute link target inside the root, relative to the link at
    /// `key` (`None` if it lies elsewhere or names the root itself).
    fn relative(&self, key: &str, target: &Path) -> Option<String> {
        let rest = target.strip_prefix(&self.root).or_else(|_| target.strip_prefix(&self.given_root)).ok()?;
        let rest: Vec<&str> = rest
            .components()
            .map(|c| match c {
                Component::Normal(name) => name.to_str(),
                _ => None,
            })
            .collect::<Option<_>>()?;
        if rest.is_empty() {
            return None;
        }
        let up = key.matches('/').count();
        Some(std::iter::repeat_n("..", up).chain(rest).collect::<Vec<_>>().join("/"))
    }

    /// Gives each link to a file the meta of the file it leads to, as this
    /// scan publishes it.
    fn link_copies(&mut self) {
        for (key, rel) in std::mem::take(&mut self.links) {
            let Some(file) = self.files.get(&rel).filter(|f| f.is_file()) else { continue };
            let copy =
                LinkedFile { rel, size: file.size, mtime_ns: file.mtime_ns, digest: file.digest.clone() };
            if let Some(FileMeta { kind: Kind::Link { copy: slot, .. }, .. }) = self.files.get_mut(&key) {
                *slot = Some(Box::new(copy));
            }
        }
    }

    fn file(&mut self, key: String, path: &Path, meta: &Metadata) {
        let size = meta.len();
        let mtime_ns = mtime_ns(meta);
        if !self.is_stable(mtime_ns) {
            self.keep_previous(key);
            return;
        }
        let known = |meta: &&FileMeta| meta.is_file() && meta.size == size && meta.mtime_ns == mtime_ns;
        let reused =
            self.previous.files.get(&key).filter(known).or_else(|| self.cache.get(&key).filter(known));
        let digest = match reused {
            Some(meta) => meta.digest.clone(),
            None => match self.hash(path, size, mtime_ns) {
                Ok(Some(digest)) => digest,
                Ok(None) => {
                    // Written to while we read it: not stable after all.
                    self.keep_previous(key);
                    return;
                }
                Err(e) if vanished(&e) => return,
                Err(e) => {
                    self.cannot_examine(&key, path, &e);
                    return;
                }
            },
        };
        let attrs = Attrs::of(meta);
        self.files.insert(key, FileMeta { size, mtime_ns, digest, attrs, ..FileMeta::default() });
    }

    fn is_stable(&self, mtime_ns: u64) -> bool {
        let slack = u64::try_from(FUTURE_SLACK.as_nanos()).unwrap_or(u64::MAX);
        if mtime_ns > self.now_ns.saturating_add(slack) {
            return false;
        }
        self.now_ns.saturating_sub(mtime_ns) >= self.stable_age_ns
    }

    /// A file that is being written keeps the version clients have.
    fn keep_previous(&mut self, key: String) {
        self.unstable = true;
        self.unstable_files.push(key.clone());
        if let Some(meta) = self.previous.files.get(&key) {
            self.files.insert(key, meta.clone());
        }
    }

    fn cannot_examine(&mut self, key: &str, path: &Path, error: &io::Error) {
        if vanished(error) {
            return;
        }
        warn!("skipping {}: {error}", path.display());
        self.unknown.push(key.to_owned());
    }

    /// Puts back the previous entries of everything that exists but could
    /// not be examined.
    fn keep_unknown(&mut self) {
        if self.unknown.is_empty() {
            return;
        }
        for (key, meta) in &self.previous.files {
            let unknown = self.unknown.iter().any(|u| {
                let is_prefix = u.is_empty() || u.ends_with('/');
                key == u || (is_prefix && key.starts_with(u.as_str()))
            });
            if unknown && !self.files.contains_key(key) {
                self.files.insert(key.clone(), meta.clone());
            }
        }
    }

    /// The SHA-1 of a file that should have `size` and `mtime_ns`, or
    /// `None` if it turns out not to (it is being written).
    fn hash(&mut self, path: &Path, size: u64, mtime_ns: u64) -> io::Result<Option<String>> {
        let mut file = open_nonblocking(path)?;
        let unchanged =
            |meta: &Metadata| meta.is_file() && meta.len() == size && self::mtime_ns(meta) == mtime_ns;
        if !unchanged(&file.metadata()?) {
            return Ok(None);
        }
        #[cfg(test)]
        tests::HASHED.with(|hashed| hashed.set(hashed.get() + 1));
        if self.buffer.is_empty() {
            self.buffer = vec![0; HASH_BUFFER];
        }
        let mut hasher = Sha1::new();
        let mut total = 0u64;
        loop {
            let n = match file.read(&mut self.buffer) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            hasher.update(&self.buffer[..n]);
            total += n as u64;
        }
        if total != size || !unchanged(&file.metadata()?) {
            return Ok(None);
        }
        Ok(Some(Digest::from_hasher(hasher).to_string()))
    }
}

/// The file or directory is gone (or a directory on its path was replaced
/// by a file): it no longer exists, as opposed to "cannot be examined".
fn vanished(error: &io::Error) -> bool {
    matches!(error.kind(), ErrorKind::NotFound | ErrorKind::NotADirectory)
}

/// Whether canonical `path` lies under canonical `root` without passing
/// through a hidden entry.
fn inside(root: &Path, path: &Path) -> bool {
    match path.strip_prefix(root) {
        Ok(rest) => rest.components().all(|c| match c {
            Component::Normal(name) => !name.as_encoded_bytes().starts_with(b"."),
            _ => false,
        }),
        Err(_) => false,
    }
}

/// When the file last changed, in nanoseconds since the Unix epoch (0
/// before it): the later of its mtime and its ctime. The ctime cannot be
/// set back, so content replaced with the same size and an mtime restored
/// (`rsync -a`, `cp -p`, `tar x`) still counts as changed and is hashed
/// again, and a file renamed into the tree settles like a new one.
pub fn mtime_ns(meta: &Metadata) -> u64 {
    let nanos = |secs: i64, nsec: i64| {
        let Ok(secs) = u64::try_from(secs) else { return 0 };
        secs.saturating_mul(1_000_000_000).saturating_add(u64::try_from(nsec).unwrap_or(0))
    };
    nanos(meta.mtime(), meta.mtime_nsec()).max(nanos(meta.ctime(), meta.ctime_nsec()))
}

/// Opens a file for reading without blocking on a FIFO swapped in after it
/// was examined (regular files ignore `O_NONBLOCK`).
fn open_nonblocking(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path)
}

fn nanos_since_epoch(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// Reads the digest cache: after the header, one line per file,
/// `SIZE MTIME_NS DIGEST PATH`, the path with `\` and newlines escaped.
/// A missing, unreadable or foreign file is an empty cache, and a line that
/// does not parse is skipped: the cache only saves work.
fn load_cache(path: &Path) -> BTreeMap<String, FileMeta> {
    let mut cache = BTreeMap::new();
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) => {
            if e.kind() != ErrorKind::NotFound {
                warn!("ignoring the digest cache {}: {e}", path.display());
            }
            return cache;
        }
    };
    let mut lines = BufReader::new(file).lines();
    match lines.next() {
        Some(Ok(header)) if header == CACHE_HEADER => {}
        _ => {
            warn!("ignoring the digest cache {}: not a digest cache", path.display());
            return cache;
        }
    }
    for line in lines {
        let Ok(line) = line else {
            warn!("the digest cache {} is damaged; using what was read", path.display());
            break;
        };
        if let Some((key, meta)) = parse_cache_line(&line) {
            cache.insert(key, meta);
        }
    }
    cache
}

fn parse_cache_line(line: &str) -> Option<(String, FileMeta)> {
    let CacheLine { size, mtime_ns, digest, path, .. } = CacheLine::parse(line.as_bytes())?;
    let mtime_ns = u64::try_from(mtime_ns).ok()?;
    Some((path, FileMeta { size, mtime_ns, digest: digest.to_string(), ..FileMeta::default() }))
}

/// Replaces the digest cache whole (`replace_file`): a crash leaves the old
/// cache or the new one, never half of one.
fn store_cache(path: &Path, files: &BTreeMap<String, FileMeta>) -> io::Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent)?;
    }
    crate::replace::replace_file(path, |out| {
        writeln!(out, "{CACHE_HEADER}")?;
        for (key, meta) in files.iter().filter(|(_, meta)| meta.is_file()) {
            let digest = Digest::parse(&meta.digest).unwrap_or_default();
            let (size, mtime_ns) = (meta.size, i128::from(meta.mtime_ns));
            // The broker keys its cache by path alone: no inode, no mark.
            let line = CacheLine { size, mtime_ns, inode: 0, digest, mark: '-', path: key.clone() };
            out.write_all(line.format().as_bytes())?;
        }
        Ok(())
    })
}

/// Reads `len` bytes at `offset` of `root/rel` (see [`Job::Read`]).
pub fn read(root: &Path, rel: &str, offset: u64, len: usize, expect: &FileMeta) -> Result<Bytes, ReadError> {
    // Snapshots only hold plain relative keys; anything else was not
    // announced by us.
    if zbroker_proto::vpath::check_relative(rel).is_err() {
        return Err(ReadError::Changed);
    }
    let fail =
        |e: io::Error| if vanished(&e) { ReadError::Changed } else { ReadError::Io(format!("{rel}: {e}")) };
    let canonical_root = fs::canonicalize(root).map_err(fail)?;
    let path = root.join(rel);
    // Refuse anything but a regular file before opening it: opening a FIFO
    // would block this thread until a writer shows up.
    if !fs::metadata(&path).map_err(fail)?.is_file() {
        return Err(ReadError::Changed);
    }
    let file = open_nonblocking(&path).map_err(fail)?;
    // Where the open file really is, symlinks resolved, without the race of
    // resolving the path separately from opening it.
    let real = fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))
        .or_else(|_| fs::canonicalize(&path))
        .map_err(fail)?;
    if !inside(&canonical_root, &real) {
        return Err(ReadError::Changed);
    }
    let as_announced =
        |meta: &Metadata| meta.is_file() && meta.len() == expect.size && mtime_ns(meta) == expect.mtime_ns;
    if !as_announced(&file.metadata().map_err(fail)?) {
        return Err(ReadError::Changed);
    }
    match offset.checked_add(len as u64) {
        Some(end) if end <= expect.size => {}
        _ => return Err(ReadError::Changed),
    }
    let mut buffer = vec![0; len];
    file.read_exact_at(&mut buffer, offset).map_err(|e| {
        if e.kind() == ErrorKind::UnexpectedEof {
            ReadError::Changed
        } else {
            fail(e)
        }
    })?;
    // Rewritten in place while we read (same size): the bytes may mix two
    // versions.
    if !as_announced(&file.metadata().map_err(fail)?) {
        return Err(ReadError::Changed);
    }
    Ok(Bytes::from(buffer))
}

#[cfg(test)]
#[path = "disk_tests.rs"]
mod tests;
