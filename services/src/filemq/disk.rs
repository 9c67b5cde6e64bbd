//! Disk work for FILEMQ (scan, hash, read), run on worker threads (or inline
//! by `sim::Sim`). Everything here is blocking file-system work; nothing
//! here knows about sockets or the event loop.
//!
//! Rules the scan keeps (spec §9–§10, plus our choices):
//! - Hidden entries (a name starting with `.`) and their subtrees are never
//!   published, and neither is anything reached through a symlink whose
//!   target lies outside the root or in a hidden part of it.
//! - A file is published once its mtime is at least `stable_age` old. A file
//!   still being written keeps the version clients already have.
//! - A file that exists but cannot be examined (permission denied, I/O
//!   error) keeps its previous entry: we do not know that it changed, and
//!   announcing a delete would make every client throw away a file the
//!   publisher still has. A file that has vanished is deleted.

use super::work::{Change, Done, FileMeta, Job, ReadError, Scanned, Snapshot};
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
) -> Result<Scanned, String> {
    let canonical_root = fs::canonicalize(root).map_err(|e| format!("{}: {e}", root.display()))?;
    let root_meta = fs::metadata(&canonical_root).map_err(|e| format!("{}: {e}", root.display()))?;
    if !root_meta.is_dir() {
        return Err(format!("{}: not a directory", root.display()));
    }
    let top = fs::read_dir(&canonical_root).map_err(|e| format!("{}: {e}", root.display()))?;

    // The cache only matters when there is nothing better to reuse: after a
    // restart. Later scans reuse the previous snapshot's digests.
    let cache = match digest_cache {
        Some(path) if previous.files.is_empty() => load_cache(path),
        _ => BTreeMap::new(),
    };
    let mut walk = Walk {
        root: canonical_root.clone(),
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

    let Walk { files, unstable, unstable_files, .. } = walk;
    if let Some(path) = digest_cache {
        // What the cache file holds now: what we loaded, or (when we did not
        // load it) what the previous scan saw, since every scan that changes
        // the snapshot rewrites it.
        let on_disk = if previous.files.is_empty() { &cache } else { &previous.files };
        if files != *on_disk {
            if let Err(e) = store_cache(path, &files) {
                warn!("cannot write the digest cache {}: {e}", path.display());
            }
        }
    }
    let changes = diff(&previous.files, &files);
    Ok(Scanned { snapshot: Arc::new(Snapshot { files }), changes, unstable, unstable_files })
}

/// What changed from `before` to `after`, sorted by path.
fn diff(before: &BTreeMap<String, FileMeta>, after: &BTreeMap<String, FileMeta>) -> Vec<Change> {
    let created = after
        .iter()
        .filter(|(key, meta)| before.get(*key) != Some(meta))
        .map(|(key, _)| Change::Created(key.clone()));
    let deleted =
        before.keys().filter(|key| !after.contains_key(*key)).map(|key| Change::Deleted(key.clone()));
    let mut changes: Vec<Change> = created.chain(deleted).collect();
    changes.sort_by(|a, b| change_path(a).cmp(change_path(b)));
    changes
}

fn change_path(change: &Change) -> &str {
    match change {
        Change::Created(path) | Change::Deleted(path) => path,
    }
}

/// One scan in progress.
struct Walk<'a> {
    /// The canonical root: everything published lies under it.
    root: PathBuf,
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
            let (target, meta) = if file_type.is_symlink() {
                match self.follow(&path) {
                    Some(followed) => followed,
                    None => continue,
                }
            } else {
                match entry.metadata() {
                    Ok(meta) => (path, meta),
                    Err(e) => {
                        self.cannot_examine(&key, &path, &e);
                        continue;
                    }
                }
            };
            if meta.is_file() {
                self.file(key, &target, &meta);
            } else if meta.is_dir() {
                self.subdir(&key, &target, &meta, ancestors);
            } else {
                debug!("skipping {}: not a regular file or directory", target.display());
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
                ancestors.push(id);
                self.dir(entries, &prefix, real, ancestors);
                ancestors.pop();
            }
            Err(e) => self.cannot_examine(&prefix, real, &e),
        }
    }

    /// Resolves a symlink found at `path`: its canonical target and that
    /// target's metadata, or `None` when it must not be published (it
    /// dangles, or leads out of the root or into a hidden part of it).
    fn follow(&self, path: &Path) -> Option<(PathBuf, Metadata)> {
        let target = match fs::canonicalize(path) {
            Ok(target) => target,
            Err(e) => {
                debug!("skipping symlink {}: {e}", path.display());
                return None;
            }
        };
        if !inside(&self.root, &target) {
            debug!("skipping symlink {}: {} is outside the root", path.display(), target.display());
            return None;
        }
        match fs::metadata(&target) {
            Ok(meta) => Some((target, meta)),
            Err(e) => {
                debug!("skipping symlink {}: {e}", path.display());
                None
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
        let known = |meta: &&FileMeta| meta.size == size && meta.mtime_ns == mtime_ns;
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
        self.files.insert(key, FileMeta { size, mtime_ns, digest });
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
    Some((path, FileMeta { size, mtime_ns: u64::try_from(mtime_ns).ok()?, digest: digest.to_string() }))
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
    for (key, meta) in files {
        let digest = Digest::parse(&meta.digest).unwrap_or_default();
        let (size, mtime_ns) = (meta.size, i128::from(meta.mtime_ns));
        // The broker keys its cache by path alone: no inode, no mark.
        let line = CacheLine { size, mtime_ns, inode: 0, digest, delivered: false, path: key.clone() };
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

    fn keys(scanned: &Scanned) -> Vec<&str> {
        scanned.snapshot.files.keys().map(String::as_str).collect()
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
        assert_eq!(keys(&scanned), ["shown.txt"]);
    }

    #[test]
    fn nested_folders_use_slash_keys() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_old(dir.path(), "a/b/c.txt", b"c");
        write_old(dir.path(), "a/d.txt", b"d");
        write_old(dir.path(), "z.txt", b"z");
        fs::create_dir_all(dir.path().join("empty/folder")).expect("mkdir");
        let scanned = scan_ok(dir.path(), &Snapshot::default(), Duration::ZERO, None);
        assert_eq!(keys(&scanned), ["a/b/c.txt", "a/d.txt", "z.txt"]);
        assert_eq!(scanned.changes, [created("a/b/c.txt"), created("a/d.txt"), created("z.txt")]);
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
        assert_eq!(second.changes, [deleted("folder/a"), deleted("folder/sub/b"), deleted("gone.txt")]);
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

    #[test]
    fn symlinks_inside_the_root_are_followed() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_old(dir.path(), "data/a.txt", b"a");
        symlink("data/a.txt", dir.path().join("alias.txt")).expect("symlink");
        symlink("data", dir.path().join("mirror")).expect("symlink");
        let scanned = scan_ok(dir.path(), &Snapshot::default(), Duration::ZERO, None);
        assert_eq!(keys(&scanned), ["alias.txt", "data/a.txt", "mirror/a.txt"]);
        assert_eq!(scanned.snapshot.files["alias.txt"].digest, sha1_hex(b"a"));
    }

    #[test]
    fn symlink_loops_end() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_old(dir.path(), "a/b/f", b"f");
        symlink("..", dir.path().join("a/b/up")).expect("symlink");
        symlink(dir.path(), dir.path().join("a/root")).expect("symlink");
        symlink("self", dir.path().join("self")).expect("symlink");
        let scanned = scan_ok(dir.path(), &Snapshot::default(), Duration::ZERO, None);
        assert_eq!(keys(&scanned), ["a/b/f"]);
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
        assert_eq!(second.changes.len(), 2, "a restart announces everything again");
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
        FileMeta { size: meta.len(), mtime_ns: mtime_ns(&meta), digest: String::new() }
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
