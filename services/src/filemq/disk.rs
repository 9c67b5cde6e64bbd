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
use std::io::{self, BufRead, BufReader, BufWriter, ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
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

/// Replaces the digest cache atomically (temporary file, then rename), so
/// that a crash leaves the old cache or the new one, never half of one.
fn store_cache(path: &Path, files: &BTreeMap<String, FileMeta>) -> io::Result<()> {
    // Unique per process and per call: two mounts could share a cache
    // directory, and scans of different mounts run concurrently.
    static NEXT_TEMP: AtomicU64 = AtomicU64::new(0);
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent)?;
    }
    let name = path.file_name().ok_or_else(|| io::Error::other("the cache path has no file name"))?;
    let mut temp_name = std::ffi::OsString::from(".");
    temp_name.push(name);
    temp_name.push(format!(".{}.{}.tmp", std::process::id(), NEXT_TEMP.fetch_add(1, Ordering::Relaxed)));
    let temp = path.with_file_name(temp_name);
    let written = write_cache(&temp, files).and_then(|()| fs::rename(&temp, path));
    if written.is_err() {
        // Best effort: the temporary name is ours alone.
        let _ = fs::remove_file(&temp);
    }
    written
}

fn write_cache(temp: &Path, files: &BTreeMap<String, FileMeta>) -> io::Result<()> {
    let mut out = BufWriter::new(File::create(temp)?);
    writeln!(out, "{CACHE_HEADER}")?;
    for (key, meta) in files.iter().filter(|(_, meta)| meta.is_file()) {
        let digest = Digest::parse(&meta.digest).unwrap_or_default();
        let (size, mtime_ns) = (meta.size, i128::from(meta.mtime_ns));
        // The broker keys its cache by path alone: no inode, no mark.
        let line = CacheLine { size, mtime_ns, inode: 0, digest, mark: '-', path: key.clone() };
        out.write_all(line.format().as_bytes())?;
    }
    let file = out.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()
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
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::os::unix::fs::symlink;

    thread_local! {
        /// Files hashed on this thread (each test runs on its own thread).
        pub(super) static HASHED: Cell<usize> = const { Cell::new(0) };
    }

    const LONG: Duration = Duration::from_secs(3600);

    fn hashed() -> usize {
        HASHED.with(Cell::get)
    }

    fn write(root: &Path, rel: &str, content: &[u8]) {
        let path = root.join(rel);
        fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        fs::write(&path, content).expect("write");
    }

    /// Writes a file whose mtime is an hour old: stable for any test.
    fn write_old(root: &Path, rel: &str, content: &[u8]) {
        write(root, rel, content);
        set_age(root, rel, Duration::from_secs(7200));
    }

    fn set_age(root: &Path, rel: &str, age: Duration) {
        let file = File::options().write(true).open(root.join(rel)).expect("open");
        file.set_modified(SystemTime::now() - age).expect("set mtime");
    }

    fn scan_ok(root: &Path, previous: &Snapshot, stable_age: Duration, cache: Option<&Path>) -> Scanned {
        scan(root, previous, stable_age, cache).expect("scan")
    }

    use zbroker_proto::codec::testing::sha1_hex;

    /// Every entry's key.
    fn keys(scanned: &Scanned) -> Vec<&str> {
        scanned.snapshot.files.keys().map(String::as_str).collect()
    }

    /// The regular files' keys.
    fn files(scanned: &Scanned) -> Vec<&str> {
        scanned.snapshot.files.iter().filter(|(_, m)| m.is_file()).map(|(k, _)| k.as_str()).collect()
    }

    /// The links: key, target, and the file a copy would be of.
    fn links(scanned: &Scanned) -> Vec<(&str, &str, Option<&str>)> {
        scanned
            .snapshot
            .files
            .iter()
            .filter_map(|(k, m)| match &m.kind {
                Kind::Link { target, copy } => {
                    Some((k.as_str(), target.as_str(), copy.as_ref().map(|c| c.rel.as_str())))
                }
                _ => None,
            })
            .collect()
    }

    fn removed(path: &str, dir: bool) -> Change {
        Change::Removed { rel: path.to_owned(), dir }
    }

    fn created(path: &str) -> Change {
        Change::Created(path.to_owned())
    }

    fn deleted(path: &str) -> Change {
        Change::Deleted(path.to_owned())
    }

    /// `rsync -a`, `cp -p` and `tar x` put back the old mtime: the ctime
    /// still tells that the content changed.
    #[test]
    fn content_replaced_with_its_old_mtime_is_hashed_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_old(dir.path(), "f", b"aaaa");
        let first = scan_ok(dir.path(), &Snapshot::default(), Duration::ZERO, None);
        let mtime = fs::metadata(dir.path().join("f")).expect("stat").modified().expect("mtime");
        std::thread::sleep(Duration::from_millis(20));
        write(dir.path(), "f", b"bbbb");
        File::options()
            .write(true)
            .open(dir.path().join("f"))
            .expect("open")
            .set_modified(mtime)
            .expect("mtime");
        let second = scan_ok(dir.path(), &first.snapshot, Duration::ZERO, None);
        assert_eq!(second.changes, [created("f")]);
        assert_eq!(second.snapshot.files["f"].digest, sha1_hex(b"bbbb"));
    }

    #[test]
    fn new_files_appear_once_stable() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), "a.txt", b"hello");
        let young = scan_ok(dir.path(), &Snapshot::default(), LONG, None);
        assert!(young.snapshot.files.is_empty());
        assert!(young.changes.is_empty());
        assert!(young.unstable);

        let stable = scan_ok(dir.path(), &young.snapshot, Duration::ZERO, None);
        assert_eq!(keys(&stable), ["a.txt"]);
        assert_eq!(stable.changes, [created("a.txt")]);
        assert!(!stable.unstable);
        let meta = &stable.snapshot.files["a.txt"];
        assert_eq!(meta.size, 5);
        assert_eq!(meta.digest, sha1_hex(b"hello"));
    }

    #[test]
    fn a_file_in_the_far_future_is_unstable() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), "later.txt", b"x");
        let file = File::options().write(true).open(dir.path().join("later.txt")).expect("open");
        file.set_modified(SystemTime::now() + LONG).expect("set mtime");
        let scanned = scan_ok(dir.path(), &Snapshot::default(), Duration::ZERO, None);
        assert!(scanned.snapshot.files.is_empty());
        assert!(scanned.unstable);
    }

    #[test]
    fn digests_are_upper_case_sha1() {
        let dir = tempfile::tempdir().expect("tempdir");
        let big: Vec<u8> = (0..3 * HASH_BUFFER + 17).map(|i| (i % 251) as u8).collect();
        write_old(dir.path(), "big.bin", &big);
        write_old(dir.path(), "empty", b"");
        let scanned = scan_ok(dir.path(), &Snapshot::default(), Duration::ZERO, None);
        assert_eq!(scanned.snapshot.files["big.bin"].digest, sha1_hex(&big));
        assert_eq!(scanned.snapshot.files["empty"].digest, "DA39A3EE5E6B4B0D3255BFEF95601890AFD80709");
        assert_eq!(sha1_hex(b"abc"), "A9993E364706816ABA3E25717850C26C9CD0D89D");
    }

    #[test]
    fn hidden_entries_and_their_subtrees_are_skipped() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_old(dir.path(), "shown.txt", b"1");
        write_old(dir.path(), ".hidden.txt", b"2");
        write_old(dir.path(), ".filemq/partial", b"3");
        write_old(dir.path(), "sub/.secret", b"4");
        write_old(dir.path(), "sub/.git/config", b"5");
        let scanned = scan_ok(dir.path(), &Snapshot::default(), Duration::ZERO, None);
        assert_eq!(keys(&scanned), ["shown.txt", "sub"]);
    }

    #[test]
    fn nested_folders_use_slash_keys() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_old(dir.path(), "a/b/c.txt", b"c");
        write_old(dir.path(), "a/d.txt", b"d");
        write_old(dir.path(), "z.txt", b"z");
        fs::create_dir_all(dir.path().join("empty/folder")).expect("mkdir");
        let scanned = scan_ok(dir.path(), &Snapshot::default(), Duration::ZERO, None);
        assert_eq!(files(&scanned), ["a/b/c.txt", "a/d.txt", "z.txt"]);
        let all = ["a", "a/b", "a/b/c.txt", "a/d.txt", "empty", "empty/folder", "z.txt"];
        assert_eq!(keys(&scanned), all, "directories, empty ones too, are entries");
        assert_eq!(scanned.changes, all.map(created));
        assert_eq!(scanned.snapshot.files["empty"].kind, Kind::Dir);
        assert_eq!(scanned.snapshot.files["empty"].digest, EMPTY_SHA1);
    }

    #[test]
    fn unchanged_files_are_not_announced_or_rehashed() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_old(dir.path(), "a.txt", b"a");
        let first = scan_ok(dir.path(), &Snapshot::default(), Duration::ZERO, None);
        let before = hashed();
        let second = scan_ok(dir.path(), &first.snapshot, Duration::ZERO, None);
        assert_eq!(hashed(), before);
        assert!(second.changes.is_empty());
        assert_eq!(second.snapshot, first.snapshot);
    }

    #[test]
    fn a_file_rewritten_shorter_is_created_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_old(dir.path(), "f.txt", b"a long first version");
        let first = scan_ok(dir.path(), &Snapshot::default(), Duration::ZERO, None);
        write(dir.path(), "f.txt", b"short");
        set_age(dir.path(), "f.txt", Duration::from_secs(60));
        let second = scan_ok(dir.path(), &first.snapshot, Duration::ZERO, None);
        assert_eq!(second.changes, [created("f.txt")]);
        let meta = &second.snapshot.files["f.txt"];
        assert_eq!(meta.size, 5);
        assert_eq!(meta.digest, sha1_hex(b"short"));
    }

    #[test]
    fn a_file_being_rewritten_keeps_its_previous_version() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_old(dir.path(), "f.txt", b"old");
        let first = scan_ok(dir.path(), &Snapshot::default(), Duration::from_secs(60), None);
        write(dir.path(), "f.txt", b"new and still growing");
        let second = scan_ok(dir.path(), &first.snapshot, Duration::from_secs(60), None);
        assert!(second.unstable);
        assert!(second.changes.is_empty(), "not deleted, not created: {:?}", second.changes);
        assert_eq!(second.snapshot, first.snapshot);
    }

    #[test]
    fn deleting_files_and_folders_announces_each_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_old(dir.path(), "keep.txt", b"k");
        write_old(dir.path(), "gone.txt", b"g");
        write_old(dir.path(), "folder/a", b"a");
        write_old(dir.path(), "folder/sub/b", b"b");
        let first = scan_ok(dir.path(), &Snapshot::default(), Duration::ZERO, None);
        fs::remove_file(dir.path().join("gone.txt")).expect("rm");
        fs::remove_dir_all(dir.path().join("folder")).expect("rm -r");
        let second = scan_ok(dir.path(), &first.snapshot, Duration::ZERO, None);
        assert_eq!(
            second.changes,
            [
                removed("folder", true),
                deleted("folder/a"),
                removed("folder/sub", true),
                deleted("folder/sub/b"),
                deleted("gone.txt")
            ]
        );
        assert_eq!(keys(&second), ["keep.txt"]);
    }

    #[test]
    fn symlinks_out_of_the_root_are_skipped() {
        let outside = tempfile::tempdir().expect("tempdir");
        write_old(outside.path(), "secret.txt", b"s");
        fs::create_dir(outside.path().join("secrets")).expect("mkdir");
        write_old(outside.path(), "secrets/x", b"x");
        let dir = tempfile::tempdir().expect("tempdir");
        write_old(dir.path(), "real.txt", b"r");
        symlink(outside.path().join("secret.txt"), dir.path().join("file-link")).expect("symlink");
        symlink(outside.path().join("secrets"), dir.path().join("dir-link")).expect("symlink");
        symlink("../../nowhere", dir.path().join("dangling")).expect("symlink");
        symlink(".hidden", dir.path().join("into-hidden")).expect("symlink");
        write_old(dir.path(), ".hidden", b"h");
        let scanned = scan_ok(dir.path(), &Snapshot::default(), Duration::ZERO, None);
        assert_eq!(keys(&scanned), ["real.txt"]);
    }

    /// A link inside is published as a link, never followed: what lies
    /// behind a symlinked directory is published once, under its real
    /// path. A link to a file knows that file, for copies.
    #[test]
    fn symlinks_inside_the_root_are_links() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_old(dir.path(), "data/a.txt", b"a");
        symlink("data/a.txt", dir.path().join("alias.txt")).expect("symlink");
        symlink("data", dir.path().join("mirror")).expect("symlink");
        symlink(dir.path().join("data/a.txt"), dir.path().join("data/absolute")).expect("symlink");
        symlink("missing", dir.path().join("dangling")).expect("symlink");
        let scanned = scan_ok(dir.path(), &Snapshot::default(), Duration::ZERO, None);
        assert_eq!(files(&scanned), ["data/a.txt"]);
        assert_eq!(
            links(&scanned),
            [
                ("alias.txt", "data/a.txt", Some("data/a.txt")),
                ("dangling", "missing", None),
                ("data/absolute", "../data/a.txt", Some("data/a.txt")),
                ("mirror", "data", None),
            ]
        );
        let alias = &scanned.snapshot.files["alias.txt"];
        assert_eq!(alias.digest, link_digest("data/a.txt"));
        let (read, copy) = alias.as_copy("alias.txt").expect("a copy");
        assert_eq!((read, copy.digest.as_str()), ("data/a.txt", sha1_hex(b"a").as_str()));
        assert_eq!(alias.attrs.mode, 0o777);

        // The file it leads to changes: so does the link (for copies).
        write(dir.path(), "data/a.txt", b"new");
        set_age(dir.path(), "data/a.txt", Duration::from_secs(60));
        let second = scan_ok(dir.path(), &scanned.snapshot, Duration::ZERO, None);
        assert_eq!(second.changes, [created("alias.txt"), created("data/a.txt"), created("data/absolute")]);
    }

    #[test]
    fn modes_and_mtimes_are_kept_and_a_chmod_is_a_change() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        write_old(dir.path(), "d/x", b"x");
        fs::set_permissions(dir.path().join("d/x"), fs::Permissions::from_mode(0o4751)).expect("chmod");
        let first = scan_ok(dir.path(), &Snapshot::default(), Duration::ZERO, None);
        let x = &first.snapshot.files["d/x"];
        assert_eq!(x.attrs.mode, 0o751, "permission bits only, never setuid");
        let on_disk = fs::metadata(dir.path().join("d/x")).expect("stat");
        assert_eq!(x.attrs, Attrs { mode: 0o751, ..Attrs::of(&on_disk) });
        assert_eq!(
            first.snapshot.files["d"].attrs.mode,
            fs::metadata(dir.path().join("d")).unwrap().permissions().mode() & 0o777
        );
        fs::set_permissions(dir.path().join("d/x"), fs::Permissions::from_mode(0o600)).expect("chmod");
        let second = scan_ok(dir.path(), &first.snapshot, Duration::ZERO, None);
        assert_eq!(second.changes, [created("d/x")]);
        assert_eq!(second.snapshot.files["d/x"].digest, x.digest);
        assert_eq!(second.snapshot.files["d/x"].attrs.mode, 0o600);
    }

    #[test]
    fn symlink_loops_end() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_old(dir.path(), "a/b/f", b"f");
        symlink("..", dir.path().join("a/b/up")).expect("symlink");
        symlink(dir.path(), dir.path().join("a/root")).expect("symlink");
        symlink("self", dir.path().join("self")).expect("symlink");
        let scanned = scan_ok(dir.path(), &Snapshot::default(), Duration::ZERO, None);
        assert_eq!(files(&scanned), ["a/b/f"]);
        // Never followed: ".." is a link, a link to the root itself is not
        // published, and a loop is a (dangling) link.
        assert_eq!(links(&scanned), [("a/b/up", "..", None), ("self", "self", None)]);
    }

    #[test]
    fn non_utf8_names_are_skipped() {
        use std::os::unix::ffi::OsStrExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let name = std::ffi::OsStr::from_bytes(b"bad-\xff");
        fs::write(dir.path().join(name), b"x").expect("write");
        write_old(dir.path(), "good", b"g");
        let scanned = scan_ok(dir.path(), &Snapshot::default(), Duration::ZERO, None);
        assert_eq!(keys(&scanned), ["good"]);
    }

    #[test]
    fn fifos_are_skipped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let made = std::process::Command::new("mkfifo").arg(dir.path().join("pipe")).status();
        if !made.is_ok_and(|status| status.success()) {
            return; // no mkfifo here: nothing to test
        }
        write_old(dir.path(), "good", b"g");
        let scanned = scan_ok(dir.path(), &Snapshot::default(), Duration::ZERO, None);
        assert_eq!(keys(&scanned), ["good"]);
    }

    #[test]
    fn an_unreadable_root_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("missing");
        assert!(scan(&missing, &Snapshot::default(), Duration::ZERO, None).is_err());
        write_old(dir.path(), "file", b"f");
        assert!(scan(&dir.path().join("file"), &Snapshot::default(), Duration::ZERO, None).is_err());
    }

    #[test]
    fn an_unreadable_folder_keeps_its_previous_entries() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        write_old(dir.path(), "locked/a", b"a");
        write_old(dir.path(), "open/b", b"b");
        let first = scan_ok(dir.path(), &Snapshot::default(), Duration::ZERO, None);
        let locked = dir.path().join("locked");
        fs::set_permissions(&locked, fs::Permissions::from_mode(0o000)).expect("chmod");
        let still_readable = fs::read_dir(&locked).is_ok(); // running as root
        let second = scan_ok(dir.path(), &first.snapshot, Duration::ZERO, None);
        fs::set_permissions(&locked, fs::Permissions::from_mode(0o755)).expect("chmod");
        if still_readable {
            return;
        }
        assert!(second.changes.is_empty(), "{:?}", second.changes);
        assert_eq!(second.snapshot, first.snapshot);
    }

    #[test]
    fn the_digest_cache_saves_rehashing_after_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = tempfile::tempdir().expect("tempdir");
        let cache = state.path().join("nested/mount.digests");
        write_old(dir.path(), "a.txt", b"a");
        write_old(dir.path(), "b/c.txt", b"c");
        let before = hashed();
        let first = scan_ok(dir.path(), &Snapshot::default(), Duration::ZERO, Some(&cache));
        assert_eq!(hashed(), before + 2);
        assert!(cache.exists());

        // A restart: no previous snapshot, the cache is all we have.
        let second = scan_ok(dir.path(), &Snapshot::default(), Duration::ZERO, Some(&cache));
        assert_eq!(hashed(), before + 2, "nothing rehashed");
        assert_eq!(second.snapshot, first.snapshot);
        assert_eq!(second.changes.len(), 3, "a restart announces everything again (b/ too)");
    }

    #[test]
    fn the_digest_cache_is_trusted_for_unchanged_files_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = tempfile::tempdir().expect("tempdir");
        let cache = state.path().join("mount.digests");
        write_old(dir.path(), "same.txt", b"same");
        write_old(dir.path(), "edited.txt", b"before");
        scan_ok(dir.path(), &Snapshot::default(), Duration::ZERO, Some(&cache));
        let fake = "0123456789ABCDEF0123456789ABCDEF01234567";
        let text = fs::read_to_string(&cache).expect("read cache");
        let real = sha1_hex(b"same");
        fs::write(&cache, text.replace(&real, fake)).expect("write cache");
        write(dir.path(), "edited.txt", b"after!");
        set_age(dir.path(), "edited.txt", Duration::from_secs(60));

        let scanned = scan_ok(dir.path(), &Snapshot::default(), Duration::ZERO, Some(&cache));
        assert_eq!(scanned.snapshot.files["same.txt"].digest, fake, "the cached digest is reused");
        assert_eq!(scanned.snapshot.files["edited.txt"].digest, sha1_hex(b"after!"));
        let rewritten = fs::read_to_string(&cache).expect("read cache");
        assert!(rewritten.contains(&sha1_hex(b"after!")));
    }

    #[test]
    fn a_damaged_or_foreign_digest_cache_is_ignored() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = tempfile::tempdir().expect("tempdir");
        let cache = state.path().join("mount.digests");
        write_old(dir.path(), "a.txt", b"a");
        for garbage in [&b"\xff\xfe not text"[..], b"something else\n1 2 3 a.txt\n", b""] {
            fs::write(&cache, garbage).expect("write cache");
            let scanned = scan_ok(dir.path(), &Snapshot::default(), Duration::ZERO, Some(&cache));
            assert_eq!(scanned.snapshot.files["a.txt"].digest, sha1_hex(b"a"));
        }
        let text = fs::read_to_string(&cache).expect("read cache");
        fs::write(&cache, format!("{text}junk line\n12 x {} broken\n", sha1_hex(b"a"))).expect("write");
        let scanned = scan_ok(dir.path(), &Snapshot::default(), Duration::ZERO, Some(&cache));
        assert_eq!(scanned.snapshot.files["a.txt"].digest, sha1_hex(b"a"));
    }

    #[test]
    fn the_digest_cache_is_rewritten_when_files_are_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = tempfile::tempdir().expect("tempdir");
        let cache = state.path().join("mount.digests");
        write_old(dir.path(), "a.txt", b"a");
        write_old(dir.path(), "b.txt", b"b");
        let first = scan_ok(dir.path(), &Snapshot::default(), Duration::ZERO, Some(&cache));
        fs::remove_file(dir.path().join("b.txt")).expect("rm");
        scan_ok(dir.path(), &first.snapshot, Duration::ZERO, Some(&cache));
        let text = fs::read_to_string(&cache).expect("read cache");
        assert!(text.contains("a.txt") && !text.contains("b.txt"), "{text}");
    }

    fn meta_of(root: &Path, rel: &str) -> FileMeta {
        let meta = fs::metadata(root.join(rel)).expect("stat");
        FileMeta { size: meta.len(), mtime_ns: mtime_ns(&meta), ..FileMeta::default() }
    }

    #[test]
    fn read_returns_the_bytes_asked_for() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_old(dir.path(), "sub/f.txt", b"0123456789");
        let expect = meta_of(dir.path(), "sub/f.txt");
        assert_eq!(read(dir.path(), "sub/f.txt", 3, 4, &expect), Ok(Bytes::from_static(b"3456")));
        assert_eq!(read(dir.path(), "sub/f.txt", 0, 10, &expect), Ok(Bytes::from_static(b"0123456789")));
        assert_eq!(read(dir.path(), "sub/f.txt", 10, 0, &expect), Ok(Bytes::new()));
        assert_eq!(read(dir.path(), "sub/f.txt", 8, 4, &expect), Err(ReadError::Changed));
        assert_eq!(read(dir.path(), "sub/f.txt", u64::MAX, 4, &expect), Err(ReadError::Changed));
    }

    #[test]
    fn read_refuses_a_file_that_changed() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_old(dir.path(), "f.txt", b"0123456789");
        let expect = meta_of(dir.path(), "f.txt");
        let other_size = FileMeta { size: 11, ..expect.clone() };
        assert_eq!(read(dir.path(), "f.txt", 0, 1, &other_size), Err(ReadError::Changed));
        let other_mtime = FileMeta { mtime_ns: expect.mtime_ns + 1, ..expect.clone() };
        assert_eq!(read(dir.path(), "f.txt", 0, 1, &other_mtime), Err(ReadError::Changed));
        fs::remove_file(dir.path().join("f.txt")).expect("rm");
        assert_eq!(read(dir.path(), "f.txt", 0, 1, &expect), Err(ReadError::Changed));
    }

    #[test]
    fn read_refuses_paths_that_leave_the_root() {
        let outside = tempfile::tempdir().expect("tempdir");
        write_old(outside.path(), "secret", b"secret");
        let dir = tempfile::tempdir().expect("tempdir");
        fs::create_dir(dir.path().join("sub")).expect("mkdir");
        symlink(outside.path().join("secret"), dir.path().join("escape")).expect("symlink");
        let expect = meta_of(outside.path(), "secret");
        let name = outside.path().file_name().and_then(|n| n.to_str()).expect("name");
        for rel in [
            "escape".to_owned(),
            format!("../{name}/secret"),
            format!("sub/../../{name}/secret"),
            outside.path().join("secret").to_string_lossy().into_owned(),
            "sub//x".to_owned(),
            String::new(),
            "./escape".to_owned(),
        ] {
            assert_eq!(read(dir.path(), &rel, 0, 1, &expect), Err(ReadError::Changed), "{rel}");
        }
    }

    #[test]
    fn run_answers_scan_and_read_but_not_watch() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_old(dir.path(), "f", b"abc");
        let scan = Job::Scan {
            mount: 7,
            root: dir.path().to_owned(),
            previous: Arc::default(),
            stable_age: Duration::ZERO,
            digest_cache: None,
        };
        let Some(Done::Scanned { mount: 7, result: Ok(scanned) }) = run(scan) else { panic!("scan") };
        let expect = scanned.snapshot.files["f"].clone();
        let read = Job::Read { root: dir.path().to_owned(), rel: "f".into(), offset: 1, len: 2, expect };
        let Some(Done::Read(Ok(bytes))) = run(read) else { panic!("read") };
        assert_eq!(bytes, Bytes::from_static(b"bc"));
        assert!(run(Job::Watch { mount: 1, root: dir.path().to_owned() }).is_none());
        assert!(run(Job::Unwatch { mount: 1 }).is_none());
    }
}
