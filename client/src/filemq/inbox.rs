//! The inbox on disk: atomic delivery through temporary files, resumable
//! partial files, deletes, and the digests of what it holds.
//!
//! Layout of our private area (hidden, so never published nor mirrored):
//!
//! ```text
//! <inbox>/.filemq/lock           held (flock) while a subscriber uses the inbox
//! <inbox>/.filemq/digests        SIZE MTIME_NS DIGEST PATH per line
//! <inbox>/.filemq/partial/DIGEST a file being received, named by its SHA-1
//! <inbox>/.filemq/partial/tmp-…  one whose digest the server did not say
//! ```
//!
//! Every path handed in here has passed `layout::place`; this module adds
//! the checks only the disk can answer: no existing component on the way is
//! a symlink (one could lead out of the inbox), and nothing is in the way.

use sha1::{Digest, Sha1};
use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Our private directory inside the inbox.
pub(crate) const PRIVATE_DIR: &str = ".filemq";
/// Prefix of partial files that cannot be resumed (no digest known).
const UNNAMED_PREFIX: &str = "tmp-";
/// Read size when hashing.
const HASH_BLOCK: usize = 1 << 20;

/// Why one file could not be placed or removed; the subscriber goes on.
#[derive(Debug)]
pub(crate) enum FileError {
    /// The disk layout makes it unsafe or impossible (a symlink or a file
    /// in the way): the name is refused.
    Refused(String),
    /// The bytes received are not the file announced.
    Integrity(String),
    /// An I/O error.
    Io(io::Error),
}

impl From<io::Error> for FileError {
    fn from(e: io::Error) -> Self {
        FileError::Io(e)
    }
}

/// I/O errors that no retry or other file will fix: the inbox as a whole is
/// unusable, so the subscriber stops rather than drop every file.
pub(crate) fn is_fatal(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::PermissionDenied
            | io::ErrorKind::StorageFull
            | io::ErrorKind::ReadOnlyFilesystem
            | io::ErrorKind::QuotaExceeded
    )
}

/// Upper-case hex, as CZMQ's `zdigest` writes digests.
pub(crate) fn hex_upper(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789ABCDEF";
    bytes
        .iter()
        .flat_map(|b| [DIGITS[(b >> 4) as usize] as char, DIGITS[(b & 15) as usize] as char])
        .collect()
}

/// A server-sent digest, if it is one: 40 hex digits, returned upper-case.
/// It names a file in our private area, so nothing else may pass.
pub(crate) fn parse_digest(text: &[u8]) -> Option<String> {
    (text.len() == 40 && text.iter().all(u8::is_ascii_hexdigit))
        .then(|| String::from_utf8_lossy(text).to_ascii_uppercase())
}

/// SHA-1 of everything `reader` yields.
fn hash_reader(mut reader: impl Read, limit: u64) -> io::Result<(Sha1, u64)> {
    let mut hasher = Sha1::new();
    let mut buf = vec![0u8; HASH_BLOCK];
    let mut total = 0u64;
    while total < limit {
        let want = (limit - total).min(HASH_BLOCK as u64) as usize;
        let n = match reader.read(&mut buf[..want]) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
        total += n as u64;
    }
    Ok((hasher, total))
}

fn mtime_ns(meta: &fs::Metadata) -> i128 {
    meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128
}

/// A digest known for a file of a given size and modification time.
#[derive(Debug, Clone, PartialEq, Eq)]
struct KnownDigest {
    size: u64,
    mtime_ns: i128,
    digest: String,
}

/// A file being received into the private area.
#[derive(Debug)]
pub(crate) struct Incoming {
    /// The name as the server sent it (chunks of the same file repeat it).
    pub name: Vec<u8>,
    /// Where it will land, inbox-relative.
    pub rel: String,
    /// The subscription it came under.
    pub subscription: usize,
    /// `X-SIZE`, when the server said.
    pub expected_size: Option<u64>,
    /// `X-SHA1`, when the server said; also the temporary file's name.
    pub expected_digest: Option<String>,
    /// Bytes held so far (resumed ones included).
    pub written: u64,
    temp: PathBuf,
    file: File,
    hasher: Sha1,
}

impl Incoming {
    /// Appends the next chunk.
    pub fn write(&mut self, chunk: &[u8]) -> io::Result<()> {
        self.file.write_all(chunk)?;
        self.hasher.update(chunk);
        self.written += chunk.len() as u64;
        Ok(())
    }

    /// The temporary file, for tests and for "in use" checks.
    pub fn temp(&self) -> &Path {
        &self.temp
    }
}

/// The inbox a subscriber mirrors into.
pub(crate) struct Inbox {
    root: PathBuf,
    partial_dir: PathBuf,
    digests_path: PathBuf,
    digests: HashMap<String, KnownDigest>,
    /// Keys of `digests` met since the census started.
    seen: HashSet<String>,
    dirty: bool,
    /// Held open for its `flock`: one subscriber per inbox.
    _lock: File,
}

impl Inbox {
    /// Creates (if needed) and locks the inbox, clears partial files that
    /// can never be resumed, and loads the digest cache.
    pub fn open(root: &Path) -> io::Result<Inbox> {
        fs::create_dir_all(root)?;
        let private = root.join(PRIVATE_DIR);
        let partial_dir = private.join("partial");
        for dir in [&private, &partial_dir] {
            real_dir(dir)?;
        }
        let lock = OpenOptions::new().create(true).truncate(false).write(true).open(private.join("lock"))?;
        // SAFETY: flock on a descriptor we own; no memory is involved.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = io::Error::last_os_error();
            return Err(if e.kind() == io::ErrorKind::WouldBlock {
                io::Error::new(io::ErrorKind::WouldBlock, "another subscriber is using this inbox")
            } else {
                e
            });
        }
        let mut inbox = Inbox {
            root: root.to_path_buf(),
            digests_path: private.join("digests"),
            partial_dir,
            digests: HashMap::new(),
            seen: HashSet::new(),
            dirty: false,
            _lock: lock,
        };
        for entry in fs::read_dir(&inbox.partial_dir)? {
            let entry = entry?;
            if parse_digest(entry.file_name().as_encoded_bytes()).is_none() {
                let _ = fs::remove_file(entry.path());
            }
        }
        inbox.load_digests();
        Ok(inbox)
    }

    /// Refuses `rel` if any part of it that exists under the inbox is a
    /// symlink. Reading the disk is the only way to know, and it must be
    /// known before we create, write or delete there.
    pub fn check_no_symlink(&self, rel: &str) -> Result<(), FileError> {
        let mut path = self.root.clone();
        for component in rel.split('/') {
            path.push(component);
            match fs::symlink_metadata(&path) {
                Ok(meta) if meta.file_type().is_symlink() => {
                    return Err(FileError::Refused(format!("{} is a symlink", path.display())));
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotADirectory => {
                    return Err(FileError::Refused(format!("a file is in the way of {rel}")));
                }
                Err(e) => return Err(below_root(rel, e.into())),
            }
        }
        Ok(())
    }

    /// Partial files that can be resumed: `(digest, bytes held)`.
    pub fn resumable(&self) -> io::Result<Vec<(String, u64)>> {
        let mut found = Vec::new();
        for entry in fs::read_dir(&self.partial_dir)? {
            let entry = entry?;
            let Some(digest) = parse_digest(entry.file_name().as_encoded_bytes()) else { continue };
            let meta = entry.metadata()?;
            if meta.is_file() && meta.len() > 0 {
                found.push((digest, meta.len()));
            }
        }
        found.sort();
        Ok(found)
    }

    /// Removes every partial file but `in_use`: called once the server has
    /// sent all it had, when no offered resume can still come.
    pub fn remove_stale_partials(&self, in_use: Option<&Path>) {
        let Ok(entries) = fs::read_dir(&self.partial_dir) else { return };
        for entry in entries.flatten() {
            if Some(entry.path().as_path()) != in_use {
                tracing::debug!("removing stale partial file {}", entry.path().display());
                let _ = fs::remove_file(entry.path());
            }
        }
    }

    /// Starts receiving a file at `offset`. At 0 the temporary file starts
    /// afresh; beyond 0 it is a resume, which needs the partial file named
    /// by the digest holding at least `offset` bytes (cut back to it).
    pub fn begin(
        &self,
        name: Vec<u8>,
        placed: super::layout::Placed,
        expected_size: Option<u64>,
        expected_digest: Option<String>,
        offset: u64,
    ) -> Result<Incoming, FileError> {
        static UNNAMED: AtomicU64 = AtomicU64::new(0);
        let temp = match &expected_digest {
            Some(digest) => self.partial_dir.join(digest),
            None => self.partial_dir.join(format!(
                "{UNNAMED_PREFIX}{}-{}",
                std::process::id(),
                UNNAMED.fetch_add(1, Ordering::Relaxed)
            )),
        };
        let (file, hasher) = if offset == 0 {
            let file = OpenOptions::new().create(true).truncate(true).write(true).open(&temp)?;
            (file, Sha1::new())
        } else {
            if expected_digest.is_none() {
                return Err(FileError::Integrity(format!("starts at offset {offset} without an X-SHA1")));
            }
            let mut file = match OpenOptions::new().read(true).write(true).open(&temp) {
                Ok(file) => file,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    return Err(FileError::Integrity(format!("resumes at {offset}, but we hold no part")));
                }
                Err(e) => return Err(e.into()),
            };
            let held = file.metadata()?.len();
            if held < offset {
                return Err(FileError::Integrity(format!(
                    "resumes at {offset}, but we hold only {held} bytes"
                )));
            }
            file.set_len(offset)?;
            let (hasher, read) = hash_reader(&mut file, offset)?;
            if read != offset {
                return Err(FileError::Integrity("the partial file shrank while resuming".into()));
            }
            file.seek(SeekFrom::Start(offset))?;
            (file, hasher)
        };
        Ok(Incoming {
            name,
            rel: placed.rel,
            subscription: placed.subscription,
            expected_size,
            expected_digest,
            written: offset,
            temp,
            file,
            hasher,
        })
    }

    /// Drops a transfer that will not complete. A temporary file named by
    /// its digest is kept for a resume unless `keep_part` is false.
    pub fn abandon(&self, incoming: Incoming, keep_part: bool) {
        let named = incoming.expected_digest.is_some();
        drop(incoming.file);
        if !(keep_part && named) {
            let _ = fs::remove_file(&incoming.temp);
        }
    }

    /// Verifies a complete file against what the server announced and
    /// moves it over its final path in one rename, so that a reader of the
    /// inbox sees the old file or the new one, never a torn one. Returns
    /// the size.
    pub fn deliver(&mut self, incoming: Incoming) -> Result<u64, FileError> {
        let Incoming { rel, expected_size, expected_digest, written, temp, file, hasher, .. } = incoming;
        drop(file);
        let digest = hex_upper(&hasher.finalize());
        let mismatch = match (expected_size, &expected_digest) {
            (Some(size), _) if size != written => Some(format!("{written} bytes received, {size} announced")),
            (_, Some(expected)) if *expected != digest => {
                Some(format!("SHA-1 {digest} received, {expected} announced"))
            }
            _ => None,
        };
        if let Some(why) = mismatch {
            let _ = fs::remove_file(&temp);
            return Err(FileError::Integrity(why));
        }
        let result = self.check_no_symlink(&rel).and_then(|()| self.make_parents(&rel)).and_then(|()| {
            let target = self.root.join(&rel);
            if fs::symlink_metadata(&target).is_ok_and(|m| m.is_dir()) {
                // A directory where the publisher now has a file: only an
                // empty one may go (its files' deletes come separately).
                fs::remove_dir(&target)
                    .map_err(|_| FileError::Refused(format!("a directory is in the way of {rel}")))?;
            }
            fs::rename(&temp, &target)?;
            Ok(target)
        });
        let result = result.map_err(|e| below_root(&rel, e));
        match result {
            Ok(target) => {
                if let Ok(meta) = fs::metadata(&target) {
                    self.remember(&rel, &meta, digest);
                }
                Ok(written)
            }
            Err(e) => {
                let _ = fs::remove_file(&temp);
                Err(e)
            }
        }
    }

    /// Creates the directories above `rel`, one at a time, never through a
    /// symlink (`create_dir_all` would follow one made in the meantime).
    fn make_parents(&self, rel: &str) -> Result<(), FileError> {
        let mut path = self.root.clone();
        let components: Vec<&str> = rel.split('/').collect();
        for component in &components[..components.len() - 1] {
            path.push(component);
            match fs::create_dir(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    let meta = fs::symlink_metadata(&path)?;
                    if !meta.is_dir() {
                        return Err(FileError::Refused(format!("a file is in the way of {rel}")));
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Removes the file `rel` and the directories its removal left empty,
    /// up to but not including the inbox root. False if there was no file.
    pub fn delete(&mut self, rel: &str) -> Result<bool, FileError> {
        self.delete_file(rel).map_err(|e| below_root(rel, e))
    }

    fn delete_file(&mut self, rel: &str) -> Result<bool, FileError> {
        self.check_no_symlink(rel)?;
        let target = self.root.join(rel);
        match fs::symlink_metadata(&target) {
            Ok(meta) if meta.is_file() => {}
            Ok(_) => return Err(FileError::Refused(format!("{rel} is not a file"))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e.into()),
        }
        fs::remove_file(&target)?;
        if self.digests.remove(rel).is_some() {
            self.dirty = true;
        }
        let mut dir = target.parent();
        while let Some(d) = dir {
            if d == self.root || !d.starts_with(&self.root) || fs::remove_dir(d).is_err() {
                break;
            }
            dir = d.parent();
        }
        Ok(true)
    }

    /// The files held under inbox-relative directory `dir` (empty: the
    /// whole inbox), as `(inbox-relative path, upper-case SHA-1)`. Hidden
    /// entries (our `.filemq` among them) and symlinks are skipped; digests
    /// come from the cache when size and mtime are unchanged. An entry that
    /// cannot be read (no permission, a path too long, an I/O error) is
    /// left out with a warning: we do not hold it as far as the server is
    /// told. Only an unreadable inbox root is an error.
    pub fn holdings(&mut self, dir: &str) -> io::Result<Vec<(String, String)>> {
        let mut found = Vec::new();
        let start = if dir.is_empty() { self.root.clone() } else { self.root.join(dir) };
        match fs::symlink_metadata(&start) {
            Ok(meta) if meta.is_file() => {
                match self.digest_of(dir, &meta) {
                    Ok(digest) => found.push((dir.to_string(), digest)),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => unreadable(&start, &e),
                }
                return Ok(found);
            }
            Ok(meta) if meta.is_dir() => {}
            Err(e) if dir.is_empty() => return Err(e),
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                unreadable(&start, &e);
                return Ok(found);
            }
            // Absent, a symlink or something else: we hold nothing there.
            _ => return Ok(found),
        }
        let mut pending = vec![(start, dir.to_string())];
        while let Some((path, rel)) = pending.pop() {
            let entries = match fs::read_dir(&path) {
                Ok(entries) => entries,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) if rel.is_empty() => return Err(e),
                Err(e) => {
                    unreadable(&path, &e);
                    continue;
                }
            };
            for entry in entries {
                let entry = match entry {
                    Ok(entry) => entry,
                    Err(e) if rel.is_empty() => return Err(e),
                    Err(e) => {
                        unreadable(&path, &e);
                        break;
                    }
                };
                let Ok(name) = entry.file_name().into_string() else { continue };
                if name.starts_with('.') {
                    continue;
                }
                let child = if rel.is_empty() { name } else { format!("{rel}/{name}") };
                let meta = match fs::symlink_metadata(entry.path()) {
                    Ok(meta) => meta,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => {
                        unreadable(&entry.path(), &e);
                        continue;
                    }
                };
                if meta.is_dir() {
                    pending.push((entry.path(), child));
                } else if meta.is_file() {
                    match self.digest_of(&child, &meta) {
                        Ok(digest) => found.push((child, digest)),
                        // Gone while we walked: not held.
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                        Err(e) => unreadable(&entry.path(), &e),
                    }
                }
            }
        }
        found.sort();
        Ok(found)
    }

    fn digest_of(&mut self, rel: &str, meta: &fs::Metadata) -> io::Result<String> {
        let mtime = mtime_ns(meta);
        if let Some(known) = self.digests.get(rel) {
            if known.size == meta.len() && known.mtime_ns == mtime {
                self.seen.insert(rel.to_string());
                return Ok(known.digest.clone());
            }
        }
        let (hasher, _) = hash_reader(File::open(self.root.join(rel))?, u64::MAX)?;
        let digest = hex_upper(&hasher.finalize());
        self.remember(rel, meta, digest.clone());
        Ok(digest)
    }

    fn remember(&mut self, rel: &str, meta: &fs::Metadata, digest: String) {
        self.digests
            .insert(rel.to_string(), KnownDigest { size: meta.len(), mtime_ns: mtime_ns(meta), digest });
        self.seen.insert(rel.to_string());
        self.dirty = true;
    }

    fn load_digests(&mut self) {
        let Ok(text) = fs::read_to_string(&self.digests_path) else { return };
        for line in text.lines() {
            let mut fields = line.splitn(4, ' ');
            let (Some(size), Some(mtime), Some(digest), Some(rel)) =
                (fields.next(), fields.next(), fields.next(), fields.next())
            else {
                continue;
            };
            let (Ok(size), Ok(mtime_ns), Some(digest)) =
                (size.parse(), mtime.parse(), parse_digest(digest.as_bytes()))
            else {
                continue;
            };
            self.digests.insert(rel.to_string(), KnownDigest { size, mtime_ns, digest });
        }
    }

    /// Starts a census: the digests of files that [`Inbox::holdings`] (or a
    /// delivery) meets from now on are the ones a pruning save keeps.
    pub fn start_census(&mut self) {
        self.seen.clear();
    }

    /// Writes the digest cache if it changed. With `prune`, entries not
    /// met since [`Inbox::start_census`] (files no longer there) go.
    pub fn save_digests(&mut self, prune: bool) -> io::Result<()> {
        if prune {
            let before = self.digests.len();
            let seen = &self.seen;
            self.digests.retain(|rel, _| seen.contains(rel));
            self.dirty |= self.digests.len() != before;
        }
        if !self.dirty {
            return Ok(());
        }
        let mut text = String::new();
        let mut entries: Vec<_> = self.digests.iter().collect();
        entries.sort_by(|a, b| a.0.cmp(b.0));
        for (rel, known) in entries {
            // A name with a newline cannot be a line: it is rehashed instead.
            if !rel.contains('\n') {
                text.push_str(&format!("{} {} {} {rel}\n", known.size, known.mtime_ns, known.digest));
            }
        }
        let temp = self.digests_path.with_extension("new");
        fs::write(&temp, text)?;
        fs::rename(&temp, &self.digests_path)?;
        self.dirty = false;
        Ok(())
    }
}

/// Notes an inbox entry left out of the holdings.
fn unreadable(path: &Path, e: &io::Error) {
    tracing::warn!("skipping {}, which cannot be read: {e}", path.display());
}

/// A permission refused below the inbox root concerns that directory, not
/// the inbox: the file is refused and the subscriber goes on. (At the root,
/// or in our private area, it stays fatal: no file could be taken.)
fn below_root(rel: &str, e: FileError) -> FileError {
    match e {
        FileError::Io(e) if e.kind() == io::ErrorKind::PermissionDenied => match rel.rsplit_once('/') {
            Some((parent, _)) => FileError::Refused(format!("cannot write in {parent}: {e}")),
            None => FileError::Io(e),
        },
        e => e,
    }
}

/// Creates `dir` if missing; refuses it if it is anything but a real
/// directory (a symlink there would lead our private files out).
fn real_dir(dir: &Path) -> io::Result<()> {
    match fs::create_dir(dir) {
        Ok(()) => return Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    if fs::symlink_metadata(dir)?.is_dir() {
        Ok(())
    } else {
        Err(io::Error::other(format!("{} is not a directory", dir.display())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::filemq::layout::Placed;

    fn sha1_hex(data: &[u8]) -> String {
        hex_upper(&Sha1::digest(data))
    }

    fn placed(rel: &str) -> Placed {
        Placed { subscription: 0, rel: rel.to_string() }
    }

    #[test]
    fn digests_are_upper_case_hex_and_parsed_strictly() {
        assert_eq!(sha1_hex(b"abc"), "A9993E364706816ABA3E25717850C26C9CD0D89D");
        assert_eq!(parse_digest(b"a9993e364706816aba3e25717850c26c9cd0d89d").unwrap(), sha1_hex(b"abc"));
        assert!(parse_digest(b"../../../../../../../../../../../etc/x").is_none());
        assert!(parse_digest(b"A9993E36").is_none());
    }

    #[test]
    fn a_delivery_is_verified_then_renamed_into_place() {
        let dir = tempfile::tempdir().unwrap();
        let mut inbox = Inbox::open(dir.path()).unwrap();
        let digest = sha1_hex(b"hello world");
        let mut inc =
            inbox.begin(b"/x".to_vec(), placed("a/b/c.txt"), Some(11), Some(digest.clone()), 0).unwrap();
        assert_eq!(inc.temp(), dir.path().join(".filemq/partial").join(&digest));
        inc.write(b"hello ").unwrap();
        inc.write(b"world").unwrap();
        assert_eq!(inbox.deliver(inc).unwrap(), 11);
        assert_eq!(fs::read(dir.path().join("a/b/c.txt")).unwrap(), b"hello world");
        assert!(inbox.resumable().unwrap().is_empty());
        assert_eq!(inbox.holdings("").unwrap(), vec![("a/b/c.txt".to_string(), digest)]);

        let mut bad =
            inbox.begin(b"/x".to_vec(), placed("d.txt"), None, Some(sha1_hex(b"other")), 0).unwrap();
        bad.write(b"not it").unwrap();
        assert!(matches!(inbox.deliver(bad), Err(FileError::Integrity(_))));
        assert!(!dir.path().join("d.txt").exists());
        assert!(fs::read_dir(dir.path().join(".filemq/partial")).unwrap().next().is_none());
    }

    #[test]
    fn a_resume_cuts_the_part_back_and_hashes_what_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let inbox = Inbox::open(dir.path()).unwrap();
        let digest = sha1_hex(b"0123456789");
        fs::write(dir.path().join(".filemq/partial").join(&digest), b"0123456XYZ").unwrap();
        assert_eq!(inbox.resumable().unwrap(), vec![(digest.clone(), 10)]);
        let mut inbox = inbox;
        let mut inc = inbox.begin(b"/f".to_vec(), placed("f"), Some(10), Some(digest.clone()), 7).unwrap();
        inc.write(b"789").unwrap();
        inbox.deliver(inc).unwrap();
        assert_eq!(fs::read(dir.path().join("f")).unwrap(), b"0123456789");
        assert!(matches!(
            inbox.begin(b"/f".to_vec(), placed("f"), None, Some(digest), 3),
            Err(FileError::Integrity(_))
        ));
        assert!(matches!(
            inbox.begin(b"/f".to_vec(), placed("f"), None, None, 3),
            Err(FileError::Integrity(_))
        ));
    }

    #[test]
    fn deletes_remove_emptied_directories_but_not_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let mut inbox = Inbox::open(dir.path()).unwrap();
        fs::create_dir_all(dir.path().join("a/b")).unwrap();
        fs::write(dir.path().join("a/b/f"), b"x").unwrap();
        fs::write(dir.path().join("top"), b"x").unwrap();
        assert!(inbox.delete("a/b/f").unwrap());
        assert!(!dir.path().join("a").exists());
        assert!(inbox.delete("top").unwrap());
        assert!(dir.path().exists());
        assert!(!inbox.delete("never").unwrap());
    }

    #[test]
    fn symlinks_on_the_way_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        fs::write(outside.path().join("victim"), b"keep").unwrap();
        let mut inbox = Inbox::open(dir.path()).unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("link")).unwrap();
        std::os::unix::fs::symlink(outside.path().join("victim"), dir.path().join("file")).unwrap();
        assert!(matches!(inbox.check_no_symlink("link/victim"), Err(FileError::Refused(_))));
        assert!(matches!(inbox.delete("link/victim"), Err(FileError::Refused(_))));
        assert!(matches!(inbox.delete("file"), Err(FileError::Refused(_))));
        let mut inc = inbox.begin(b"/x".to_vec(), placed("link/new"), None, None, 0).unwrap();
        inc.write(b"evil").unwrap();
        assert!(matches!(inbox.deliver(inc), Err(FileError::Refused(_))));
        assert_eq!(fs::read(outside.path().join("victim")).unwrap(), b"keep");
        assert!(!outside.path().join("new").exists());
        assert!(inbox.holdings("").unwrap().is_empty(), "symlinks are not holdings");
    }

    #[test]
    fn the_digest_cache_spares_rehashing_and_forgets_removed_files() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("a"), b"abc").unwrap();
        fs::write(dir.path().join(".hidden"), b"abc").unwrap();
        {
            let mut inbox = Inbox::open(dir.path()).unwrap();
            assert_eq!(inbox.holdings("").unwrap(), vec![("a".to_string(), sha1_hex(b"abc"))]);
            inbox.save_digests(true).unwrap();
        }
        let saved = fs::read_to_string(dir.path().join(".filemq/digests")).unwrap();
        assert!(saved.ends_with(&format!(" {} a\n", sha1_hex(b"abc"))), "{saved}");
        // A cached digest is believed while size and mtime hold: plant a
        // wrong one to see that it is used.
        let planted = saved.replace(&sha1_hex(b"abc"), &sha1_hex(b"xyz"));
        fs::write(dir.path().join(".filemq/digests"), planted).unwrap();
        let mut inbox = Inbox::open(dir.path()).unwrap();
        assert_eq!(inbox.holdings("").unwrap()[0].1, sha1_hex(b"xyz"));
        fs::remove_file(dir.path().join("a")).unwrap();
        inbox.start_census();
        assert!(inbox.holdings("").unwrap().is_empty());
        inbox.save_digests(true).unwrap();
        assert_eq!(fs::read_to_string(dir.path().join(".filemq/digests")).unwrap(), "");
    }

    #[test]
    fn one_subscriber_per_inbox() {
        let dir = tempfile::tempdir().unwrap();
        let _first = Inbox::open(dir.path()).unwrap();
        let second = Inbox::open(dir.path()).err().unwrap();
        assert_eq!(second.kind(), io::ErrorKind::WouldBlock);
    }

    #[test]
    fn unnamed_partials_are_cleared_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let partial = dir.path().join(".filemq/partial");
        fs::create_dir_all(&partial).unwrap();
        fs::write(partial.join("tmp-1-2"), b"x").unwrap();
        fs::write(partial.join(sha1_hex(b"x")), b"x").unwrap();
        let inbox = Inbox::open(dir.path()).unwrap();
        assert!(!partial.join("tmp-1-2").exists());
        assert_eq!(inbox.resumable().unwrap(), vec![(sha1_hex(b"x"), 1)]);
    }
}
