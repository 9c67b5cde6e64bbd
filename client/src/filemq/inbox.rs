//! The inbox on disk: atomic delivery through temporary files, resumable
//! partial files, deletes, and the digests of what it holds.
//!
//! Layout of our private area (hidden, so never published nor mirrored;
//! mode 0700, owned by us, checked at start):
//!
//! ```text
//! <inbox>/.filemq/lock           held (flock) while a subscriber uses the inbox
//! <inbox>/.filemq/digests        the digest cache (see `digests`)
//! <inbox>/.filemq/digests.log    deliveries since it was last written
//! <inbox>/.filemq/partial/DIGEST a file being received, named by its SHA-1
//! <inbox>/.filemq/partial/tmp-…  one whose digest the server did not say
//! ```
//!
//! Every path handed in here has passed `layout::place`; this module adds
//! the checks only the disk can answer, and does all its work through
//! directory handles that never follow a symlink (`dirfd`): a symlink
//! anywhere on the way (planted before or during our work) makes the
//! operation fail, never lead it out of the inbox. A path is checked whole
//! (length included) before anything is created for it, and directories
//! made for a delivery that then fails are removed again.

use super::digests::{DigestCache, Stamp};
use super::dirfd::{self, Dir, Kind};
use sha1::{Digest as _, Sha1};
use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use zbroker_proto::digest::Digest;
use zbroker_proto::escape::escape;

/// Our private directory inside the inbox.
pub(crate) const PRIVATE_DIR: &str = ".filemq";
const PARTIAL_DIR: &str = "partial";
const LOCK_FILE: &str = "lock";
/// Prefix of partial files that cannot be resumed (no digest known).
const UNNAMED_PREFIX: &str = "tmp-";
/// Read size when hashing.
const HASH_BLOCK: usize = 1 << 20;
/// Most partial files kept for a resume: past it, the oldest go.
pub(crate) const MAX_PARTIALS: usize = 16;
/// Longest path (the inbox's own included) we create a file at: the
/// system's `PATH_MAX` less its NUL, so every tool can open what we write.
pub(crate) const MAX_PATH: usize = libc::PATH_MAX as usize - 1;

/// Why one file could not be placed or removed; the subscriber goes on.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FileError {
    /// The disk layout makes it unsafe or impossible (a symlink or a file
    /// in the way, a path too long): the name is refused.
    #[error("{0}")]
    Refused(String),
    /// A file we did not write is in the way, and the user did not allow
    /// replacing it: it is kept.
    #[error("a file this subscriber did not write is in the way")]
    NotOurs,
    /// The bytes received are not the file announced.
    #[error("{0}")]
    Integrity(String),
    /// An I/O error.
    #[error(transparent)]
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

/// An inbox path as a message shows it: a server chose it.
fn shown(rel: &str) -> String {
    escape(rel.as_bytes())
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
    /// Its name in `.filemq/partial/`.
    temp_name: String,
    #[cfg(test)]
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

    /// The temporary file.
    #[cfg(test)]
    pub fn temp(&self) -> &Path {
        &self.temp
    }
}

/// What a delete did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Deleted {
    Removed,
    /// There was no file.
    Absent,
    /// The file is not one we delivered, and the user did not ask for
    /// deletes of every file: it is kept.
    Kept,
}

/// The directories from the inbox root down to a path's parent, opened
/// without following links.
struct Walk<'a> {
    components: Vec<&'a str>,
    /// The handle of each directory on the way, below the root.
    chain: Vec<Dir>,
    /// How many of the last directories of `chain` we created.
    created: usize,
}

impl Walk<'_> {
    fn leaf(&self) -> &str {
        self.components[self.components.len() - 1]
    }
}

/// The inbox a subscriber mirrors into.
pub(crate) struct Inbox {
    /// The inbox as the user named it, for messages.
    root_path: PathBuf,
    /// Its length once made absolute, for the path length rule.
    root_len: usize,
    root: Dir,
    private: Dir,
    partial: Dir,
    #[cfg(test)]
    partial_path: PathBuf,
    digests: DigestCache,
    /// Held open for its `flock`: one subscriber per inbox.
    _lock: File,
}

/// Creates (mode 0700) or opens one of our private directories, refusing a
/// symlink, a non-directory or one another user owns; tightens its mode.
fn private_dir(parent: &Dir, name: &str, shown: &Path) -> io::Result<Dir> {
    parent.make_dir(name, 0o700)?;
    let dir = parent.open_dir(name).map_err(|e| {
        if dirfd::is_symlink_error(&e) {
            io::Error::other(format!("{} is a symlink; it must be our own directory", shown.display()))
        } else {
            io::Error::new(e.kind(), format!("{}: {e}", shown.display()))
        }
    })?;
    let entry = dir.stat()?;
    if entry.uid != dirfd::euid() {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("{} belongs to another user (uid {})", shown.display(), entry.uid),
        ));
    }
    if entry.mode & 0o077 != 0 {
        dir.set_mode(0o700)?;
    }
    Ok(dir)
}

impl Inbox {
    /// Creates (if needed) and locks the inbox, checks our private area,
    /// clears partial files that can never be resumed, and loads the
    /// digest cache.
    pub fn open(root_path: &Path) -> io::Result<Inbox> {
        fs::create_dir_all(root_path)?;
        let root_len = fs::canonicalize(root_path)?.as_os_str().len();
        let root = Dir::open(root_path)?;
        let private_path = root_path.join(PRIVATE_DIR);
        let private = private_dir(&root, PRIVATE_DIR, &private_path)?;
        let partial_path = private_path.join(PARTIAL_DIR);
        let partial = private_dir(&private, PARTIAL_DIR, &partial_path)?;
        let lock = private.open_file(LOCK_FILE, libc::O_WRONLY | libc::O_CREAT, 0o600)?;
        if let Err(e) = Dir::lock_file(&lock) {
            return Err(if e.kind() == io::ErrorKind::WouldBlock {
                io::Error::new(io::ErrorKind::WouldBlock, "another subscriber is using this inbox")
            } else {
                e
            });
        }
        let digests = DigestCache::load(&private);
        let inbox = Inbox {
            root_path: root_path.to_path_buf(),
            root_len,
            root,
            private,
            partial,
            #[cfg(test)]
            partial_path,
            digests,
            _lock: lock,
        };
        for name in inbox.partial_names()? {
            if Digest::parse(&name).is_none() {
                let _ = inbox.partial.remove_file(&name);
            }
        }
        Ok(inbox)
    }

    /// The names in `.filemq/partial/`, read through our handle.
    fn partial_names(&self) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in fs::read_dir(self.partial.proc_path())? {
            if let Ok(name) = entry?.file_name().into_string() {
                names.push(name);
            }
        }
        Ok(names)
    }

    /// Opens the directories above `rel`, creating missing ones if
    /// `create`. `None` if one is missing and `create` is false.
    fn walk<'a>(&self, rel: &'a str, create: bool) -> Result<Option<Walk<'a>>, FileError> {
        let mut walk = Walk { components: rel.split('/').collect(), chain: Vec::new(), created: 0 };
        for i in 0..walk.components.len() - 1 {
            let name = walk.components[i];
            let parent = walk.chain.last().unwrap_or(&self.root);
            let mut made = false;
            let opened = match parent.open_dir(name) {
                Err(e) if e.kind() == io::ErrorKind::NotFound && create => match parent.make_dir(name, 0o777)
                {
                    Ok(new) => {
                        made = new;
                        parent.open_dir(name).inspect_err(|_| {
                            // Not on the chain, so `undo` cannot see it.
                            if new {
                                let _ = parent.remove_dir(name);
                            }
                        })
                    }
                    Err(e) => Err(e),
                },
                other => other,
            };
            let dir = match opened {
                Ok(dir) => {
                    walk.created += usize::from(made);
                    dir
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    self.undo(walk);
                    return Ok(None);
                }
                Err(e) => {
                    let on_the_way = shown(&walk.components[..=i].join("/"));
                    self.undo(walk);
                    return Err(if dirfd::is_symlink_error(&e) {
                        FileError::Refused(format!("{on_the_way} is a symlink"))
                    } else if e.raw_os_error() == Some(libc::ENOTDIR) {
                        FileError::Refused(format!("a file is in the way of {}", shown(rel)))
                    } else {
                        e.into()
                    });
                }
            };
            walk.chain.push(dir);
        }
        Ok(Some(walk))
    }

    /// Removes the directories a walk created (deepest first).
    fn undo(&self, mut walk: Walk<'_>) {
        while walk.created > 0 {
            let Some(dir) = walk.chain.pop() else { return };
            drop(dir);
            walk.created -= 1;
            let depth = walk.chain.len();
            let parent = walk.chain.last().unwrap_or(&self.root);
            let _ = parent.remove_dir(walk.components[depth]);
        }
    }

    fn parent<'a>(&'a self, walk: &'a Walk<'_>) -> &'a Dir {
        walk.chain.last().unwrap_or(&self.root)
    }

    /// Checks, before anything is received or created for it, that a file
    /// may land at `rel`: the whole path fits the system's limit, no
    /// existing part of it is a symlink or a file in the way, and a file
    /// already there is ours or may be replaced (`replace_any`).
    pub fn check_target(&self, rel: &str, replace_any: bool) -> Result<(), FileError> {
        self.check_target_inner(rel, replace_any).map_err(|e| below_root(rel, e))
    }

    fn check_target_inner(&self, rel: &str, replace_any: bool) -> Result<(), FileError> {
        let length = self.root_len + 1 + rel.len();
        if length > MAX_PATH {
            return Err(FileError::Refused(format!(
                "its path in the inbox would be {length} bytes long, more than the system's {MAX_PATH}"
            )));
        }
        let Some(walk) = self.walk(rel, false)? else { return Ok(()) };
        self.check_leaf(&walk, rel, replace_any)
    }

    fn check_leaf(&self, walk: &Walk<'_>, rel: &str, replace_any: bool) -> Result<(), FileError> {
        match self.parent(walk).entry(walk.leaf())? {
            None => Ok(()),
            Some(e) => match e.kind {
                Kind::Symlink => Err(FileError::Refused(format!("{} is a symlink", shown(rel)))),
                Kind::Other => Err(FileError::Refused(format!("{} is not a regular file", shown(rel)))),
                Kind::File if !replace_any && !self.digests.is_ours(rel, e.inode) => Err(FileError::NotOurs),
                // An (empty) directory where the file goes is never ours
                // to remove: we remove the directories we made as soon as
                // they are empty.
                Kind::Dir if !replace_any => Err(FileError::NotOurs),
                Kind::File | Kind::Dir => Ok(()),
            },
        }
    }

    /// Partial files that can be resumed: `(digest, bytes held)`.
    pub fn resumable(&self) -> io::Result<Vec<(String, u64)>> {
        let mut found = Vec::new();
        for name in self.partial_names()? {
            let Some(digest) = Digest::normalise(&name) else { continue };
            if let Some(entry) = self.partial.entry(&name)? {
                if entry.kind == Kind::File && entry.size > 0 {
                    found.push((digest, entry.size));
                }
            }
        }
        found.sort();
        Ok(found)
    }

    /// Removes every partial file but `in_use`: called once the server has
    /// sent all it had, when no offered resume can still come.
    pub fn remove_stale_partials(&self, in_use: Option<&Incoming>) {
        let Ok(names) = self.partial_names() else { return };
        for name in names {
            if in_use.is_none_or(|i| i.temp_name != name) {
                tracing::debug!("removing stale partial file {name}");
                let _ = self.partial.remove_file(&name);
            }
        }
    }

    /// Keeps at most [`MAX_PARTIALS`] partial files, removing the oldest.
    fn prune_partials(&self) {
        let Ok(names) = self.partial_names() else { return };
        if names.len() <= MAX_PARTIALS {
            return;
        }
        let mut aged: Vec<(i128, String)> = names
            .into_iter()
            .filter_map(|name| Some((self.partial.entry(&name).ok()??.mtime_ns, name)))
            .collect();
        aged.sort();
        let excess = aged.len().saturating_sub(MAX_PARTIALS);
        for (_, name) in aged.into_iter().take(excess) {
            tracing::debug!("removing partial file {name}: more than {MAX_PARTIALS} are kept");
            let _ = self.partial.remove_file(&name);
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
        let temp_name = match &expected_digest {
            Some(digest) => digest.clone(),
            None => {
                format!("{UNNAMED_PREFIX}{}-{}", std::process::id(), UNNAMED.fetch_add(1, Ordering::Relaxed))
            }
        };
        let (file, hasher) = if offset == 0 {
            // Whatever had that name goes; the new file must be new, so
            // nothing planted there can be written through.
            self.partial.remove_file(&temp_name)?;
            (self.partial.create_new(&temp_name, 0o600)?, Sha1::new())
        } else {
            if expected_digest.is_none() {
                return Err(FileError::Integrity(format!("starts at offset {offset} without an X-SHA1")));
            }
            let mut file = match self.partial.open_file(&temp_name, libc::O_RDWR, 0) {
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
            #[cfg(test)]
            temp: self.partial_path.join(&temp_name),
            temp_name,
            file,
            hasher,
        })
    }

    /// Drops a transfer that will not complete. A temporary file named by
    /// its digest is kept for a resume if `keep_part` (a transfer cut by a
    /// disconnect), within [`MAX_PARTIALS`]; one the server abandoned
    /// (deleted, or replaced by a new version) goes.
    pub fn abandon(&self, incoming: Incoming, keep_part: bool) {
        let named = incoming.expected_digest.is_some();
        drop(incoming.file);
        if keep_part && named {
            self.prune_partials();
        } else {
            let _ = self.partial.remove_file(&incoming.temp_name);
        }
    }

    /// Verifies a complete file against what the server announced and
    /// moves it over its final path in one rename, so that a reader of the
    /// inbox sees the old file or the new one, never a torn one. A file
    /// already there must be ours unless `replace_any`. Returns the size.
    pub fn deliver(&mut self, incoming: Incoming, replace_any: bool) -> Result<u64, FileError> {
        let Incoming { rel, expected_size, expected_digest, written, temp_name, file, hasher, .. } = incoming;
        let meta = file.metadata();
        drop(file);
        let digest = Digest::from_hasher(hasher).to_string();
        let mismatch = match (expected_size, &expected_digest) {
            (Some(size), _) if size != written => Some(format!("{written} bytes received, {size} announced")),
            (_, Some(expected)) if *expected != digest => {
                Some(format!("SHA-1 {digest} received, {expected} announced"))
            }
            _ => None,
        };
        if let Some(why) = mismatch {
            let _ = self.partial.remove_file(&temp_name);
            return Err(FileError::Integrity(why));
        }
        match self.place(&rel, &temp_name, replace_any).map_err(|e| below_root(&rel, e)) {
            Ok(()) => {
                // Renamed, not copied: the stamp of the part is the file's.
                self.digests.delivered(&self.private, &rel, Stamp::of(&meta?), digest)?;
                Ok(written)
            }
            Err(e) => {
                let _ = self.partial.remove_file(&temp_name);
                Err(e)
            }
        }
    }

    /// Renames partial file `temp_name` to `rel`, making its parents.
    fn place(&self, rel: &str, temp_name: &str, replace_any: bool) -> Result<(), FileError> {
        self.check_target_inner(rel, replace_any)?;
        let Some(walk) = self.walk(rel, true)? else {
            return Err(FileError::Refused(format!("a directory above {} vanished", shown(rel))));
        };
        let result = self.check_leaf(&walk, rel, replace_any).and_then(|()| {
            let (parent, leaf) = (self.parent(&walk), walk.leaf());
            if parent.entry(leaf)?.is_some_and(|e| e.kind == Kind::Dir) {
                // A directory where the publisher now has a file: only an
                // empty one may go (its files' deletes come separately).
                parent.remove_dir(leaf).map_err(|_| {
                    FileError::Refused(format!("a directory is in the way of {}", shown(rel)))
                })?;
            }
            Ok(self.partial.rename(temp_name, parent, leaf)?)
        });
        if result.is_err() {
            self.undo(walk);
        }
        result
    }

    /// Removes the file `rel` if we delivered it (or `any`), and the
    /// directories its removal left empty, up to but not including the
    /// inbox root.
    pub fn delete(&mut self, rel: &str, any: bool) -> Result<Deleted, FileError> {
        self.delete_file(rel, any).map_err(|e| below_root(rel, e))
    }

    fn delete_file(&mut self, rel: &str, any: bool) -> Result<Deleted, FileError> {
        let Some(mut walk) = self.walk(rel, false)? else { return Ok(Deleted::Absent) };
        let parent = self.parent(&walk);
        match parent.entry(walk.leaf())? {
            None => return Ok(Deleted::Absent),
            Some(e) if e.kind == Kind::File && (any || self.digests.is_ours(rel, e.inode)) => {}
            Some(e) if e.kind == Kind::File => return Ok(Deleted::Kept),
            Some(_) => return Err(FileError::Refused(format!("{} is not a file", shown(rel)))),
        }
        parent.remove_file(walk.leaf())?;
        self.digests.forget(rel);
        while let Some(dir) = walk.chain.pop() {
            drop(dir);
            let depth = walk.chain.len();
            let parent = walk.chain.last().unwrap_or(&self.root);
            if parent.remove_dir(walk.components[depth]).is_err() {
                break;
            }
        }
        Ok(Deleted::Removed)
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
        self.digests.walked(dir);
        let start = if dir.is_empty() { self.root_path.clone() } else { self.root_path.join(dir) };
        match fs::symlink_metadata(&start) {
            Ok(meta) if meta.is_file() => {
                match self.digest_of(dir, &meta) {
                    Ok(digest) => found.push((dir.to_string(), digest)),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => self.unreadable(dir, &start, &e),
                }
                return Ok(found);
            }
            Ok(meta) if meta.is_dir() => {}
            Err(e) if dir.is_empty() => return Err(e),
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                self.unreadable(dir, &start, &e);
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
                    self.unreadable(&rel, &path, &e);
                    continue;
                }
            };
            for entry in entries {
                let entry = match entry {
                    Ok(entry) => entry,
                    Err(e) if rel.is_empty() => return Err(e),
                    Err(e) => {
                        self.unreadable(&rel, &path, &e);
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
                        self.unreadable(&child, &entry.path(), &e);
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
                        Err(e) => self.unreadable(&child, &entry.path(), &e),
                    }
                }
            }
        }
        found.sort();
        Ok(found)
    }

    fn digest_of(&mut self, rel: &str, meta: &fs::Metadata) -> io::Result<String> {
        let stamp = Stamp::of(meta);
        if let Some(digest) = self.digests.lookup(rel, stamp) {
            return Ok(digest);
        }
        // Never through a symlink swapped in since we looked; never stuck
        // on a FIFO.
        let file = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(self.root_path.join(rel))?;
        let (hasher, _) = hash_reader(file, u64::MAX)?;
        let digest = Digest::from_hasher(hasher).to_string();
        self.digests.remember(rel, stamp, digest.clone(), false);
        Ok(digest)
    }

    /// Notes an inbox entry left out of the holdings: its cache entries are
    /// kept (it is still there, as far as we know).
    fn unreadable(&mut self, rel: &str, path: &Path, e: &io::Error) {
        tracing::warn!("skipping {}, which cannot be read: {e}", escape(path.as_os_str().as_encoded_bytes()));
        self.digests.unreadable(rel);
    }

    /// Starts a census: the digests of files that [`Inbox::holdings`] (or a
    /// delivery) meets from now on are the ones a pruning save keeps.
    pub fn start_census(&mut self) {
        self.digests.start_census();
    }

    /// Writes the digest cache if it changed. With `prune`, entries not
    /// met since [`Inbox::start_census`] (files no longer there) go.
    pub fn save_digests(&mut self, prune: bool) -> io::Result<()> {
        self.digests.save(&self.private, prune)
    }
}

/// A permission refused below the inbox root concerns that directory, not
/// the inbox: the file is refused and the subscriber goes on. (At the root,
/// or in our private area, it stays fatal: no file could be taken.)
fn below_root(rel: &str, e: FileError) -> FileError {
    match e {
        FileError::Io(e) if e.kind() == io::ErrorKind::PermissionDenied => match rel.rsplit_once('/') {
            Some((parent, _)) => FileError::Refused(format!("cannot write in {}: {e}", shown(parent))),
            None => FileError::Io(e),
        },
        e => e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::filemq::layout::Placed;

    use zbroker_proto::codec::testing::sha1_hex;

    fn placed(rel: &str) -> Placed {
        Placed { subscription: 0, rel: rel.to_string() }
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
        assert_eq!(inbox.deliver(inc, false).unwrap(), 11);
        assert_eq!(fs::read(dir.path().join("a/b/c.txt")).unwrap(), b"hello world");
        assert!(inbox.resumable().unwrap().is_empty());
        assert_eq!(inbox.holdings("").unwrap(), vec![("a/b/c.txt".to_string(), digest)]);

        let mut bad =
            inbox.begin(b"/x".to_vec(), placed("d.txt"), None, Some(sha1_hex(b"other")), 0).unwrap();
        bad.write(b"not it").unwrap();
        assert!(matches!(inbox.deliver(bad, false), Err(FileError::Integrity(_))));
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
        inbox.deliver(inc, false).unwrap();
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
        assert_eq!(inbox.delete("a/b/f", false).unwrap(), Deleted::Kept, "not ours");
        assert_eq!(inbox.delete("a/b/f", true).unwrap(), Deleted::Removed);
        assert!(!dir.path().join("a").exists());
        assert_eq!(inbox.delete("top", true).unwrap(), Deleted::Removed);
        assert!(dir.path().exists());
        assert_eq!(inbox.delete("never", true).unwrap(), Deleted::Absent);
    }

    #[test]
    fn symlinks_on_the_way_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        fs::write(outside.path().join("victim"), b"keep").unwrap();
        let mut inbox = Inbox::open(dir.path()).unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("link")).unwrap();
        std::os::unix::fs::symlink(outside.path().join("victim"), dir.path().join("file")).unwrap();
        assert!(matches!(inbox.check_target("link/victim", true), Err(FileError::Refused(_))));
        assert!(matches!(inbox.check_target("file", true), Err(FileError::Refused(_))));
        assert!(matches!(inbox.delete("link/victim", true), Err(FileError::Refused(_))));
        assert!(matches!(inbox.delete("file", true), Err(FileError::Refused(_))));
        let mut inc = inbox.begin(b"/x".to_vec(), placed("link/new"), None, None, 0).unwrap();
        inc.write(b"evil").unwrap();
        assert!(matches!(inbox.deliver(inc, true), Err(FileError::Refused(_))));
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
        assert!(saved.ends_with(&format!(" {} - a\n", sha1_hex(b"abc"))), "{saved}");
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
        assert_eq!(fs::read_to_string(dir.path().join(".filemq/digests")).unwrap(), "filemq-digests 2\n");
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

    #[test]
    fn a_file_we_did_not_write_is_neither_replaced_nor_deleted_unless_allowed() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("thesis.txt"), b"mine").unwrap();
        let mut inbox = Inbox::open(dir.path()).unwrap();
        assert!(matches!(inbox.check_target("thesis.txt", false), Err(FileError::NotOurs)));
        let mut inc = inbox.begin(b"/t".to_vec(), placed("thesis.txt"), None, None, 0).unwrap();
        inc.write(b"theirs").unwrap();
        assert!(matches!(inbox.deliver(inc, false), Err(FileError::NotOurs)));
        assert_eq!(fs::read(dir.path().join("thesis.txt")).unwrap(), b"mine");
        assert_eq!(inbox.delete("thesis.txt", false).unwrap(), Deleted::Kept);
        assert!(inbox.resumable().unwrap().is_empty(), "the refused part is gone");

        // What we deliver is ours: replaced and deleted without a flag.
        let mut inc = inbox.begin(b"/n".to_vec(), placed("new.txt"), None, None, 0).unwrap();
        inc.write(b"v1").unwrap();
        inbox.deliver(inc, false).unwrap();
        inbox.check_target("new.txt", false).unwrap();
        let mut inc = inbox.begin(b"/n".to_vec(), placed("new.txt"), None, None, 0).unwrap();
        inc.write(b"v2").unwrap();
        inbox.deliver(inc, false).unwrap();
        assert_eq!(fs::read(dir.path().join("new.txt")).unwrap(), b"v2");
        inbox.save_digests(false).unwrap();
        drop(inbox);
        // The mark lasts across a restart.
        let mut inbox = Inbox::open(dir.path()).unwrap();
        assert_eq!(inbox.delete("new.txt", false).unwrap(), Deleted::Removed);
        // With the user's word, theirs goes too.
        let mut inc = inbox.begin(b"/t".to_vec(), placed("thesis.txt"), None, None, 0).unwrap();
        inc.write(b"theirs").unwrap();
        inbox.deliver(inc, true).unwrap();
        assert_eq!(fs::read(dir.path().join("thesis.txt")).unwrap(), b"theirs");
    }

    #[test]
    fn a_kill_between_saves_does_not_lose_which_files_are_ours() {
        let dir = tempfile::tempdir().unwrap();
        let mut inbox = Inbox::open(dir.path()).unwrap();
        let mut inc = inbox.begin(b"/f".to_vec(), placed("f"), None, None, 0).unwrap();
        inc.write(b"v1").unwrap();
        inbox.deliver(inc, false).unwrap();
        drop(inbox); // as SIGKILL would: no save
        let mut inbox = Inbox::open(dir.path()).unwrap();
        inbox.check_target("f", false).unwrap();
        inbox.save_digests(false).unwrap();
        assert!(!dir.path().join(".filemq/digests.log").exists(), "the journal is emptied by a save");
        drop(inbox);
        let mut inbox = Inbox::open(dir.path()).unwrap();
        assert_eq!(inbox.delete("f", false).unwrap(), Deleted::Removed);
    }

    #[test]
    fn a_path_too_long_is_refused_before_any_directory_is_made() {
        let dir = tempfile::tempdir().unwrap();
        let inbox = Inbox::open(dir.path()).unwrap();
        let deep = format!("{}z", "a/".repeat(2600));
        assert!(matches!(inbox.check_target(&deep, false), Err(FileError::Refused(_))));
        assert!(!dir.path().join("a").exists());
    }

    #[test]
    fn directories_made_for_a_failed_delivery_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let mut inbox = Inbox::open(dir.path()).unwrap();
        fs::create_dir(dir.path().join("keep")).unwrap();
        let mut inc = inbox.begin(b"/f".to_vec(), placed("keep/made/for/it"), None, None, 0).unwrap();
        inc.write(b"x").unwrap();
        // The rename fails once the parents are made: its source is gone.
        fs::remove_file(inc.temp()).unwrap();
        assert!(matches!(inbox.deliver(inc, true), Err(FileError::Io(_))));
        assert!(!dir.path().join("keep/made").exists(), "the directories made for it are gone");
        assert!(dir.path().join("keep").is_dir(), "a directory we did not make stays");

        // A symlink planted where a directory is to be made: refused, and
        // nothing is made through it.
        let outside = tempfile::tempdir().unwrap();
        let mut inc = inbox.begin(b"/f".to_vec(), placed("keep/link/x"), None, None, 0).unwrap();
        inc.write(b"x").unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("keep/link")).unwrap();
        assert!(matches!(inbox.deliver(inc, true), Err(FileError::Refused(_))));
        assert!(fs::read_dir(outside.path()).unwrap().next().is_none());
    }

    #[test]
    fn a_directory_of_the_users_is_not_removed_without_leave_to() {
        let dir = tempfile::tempdir().unwrap();
        let mut inbox = Inbox::open(dir.path()).unwrap();
        fs::create_dir(dir.path().join("empty")).unwrap();
        let mut inc = inbox.begin(b"/e".to_vec(), placed("empty"), None, None, 0).unwrap();
        inc.write(b"file").unwrap();
        assert!(matches!(inbox.deliver(inc, false), Err(FileError::NotOurs)));
        assert!(dir.path().join("empty").is_dir());
        let mut inc = inbox.begin(b"/e".to_vec(), placed("empty"), None, None, 0).unwrap();
        inc.write(b"file").unwrap();
        inbox.deliver(inc, true).unwrap();
        assert_eq!(fs::read(dir.path().join("empty")).unwrap(), b"file");
    }

    #[test]
    fn a_file_saved_anew_at_a_delivered_path_is_the_users() {
        let dir = tempfile::tempdir().unwrap();
        let mut inbox = Inbox::open(dir.path()).unwrap();
        let mut inc = inbox.begin(b"/r".to_vec(), placed("report.txt"), None, None, 0).unwrap();
        inc.write(b"ours").unwrap();
        inbox.deliver(inc, false).unwrap();
        // The user replaces it (a new file renamed over it, as editors do).
        fs::write(dir.path().join("report.new"), b"theirs").unwrap();
        fs::rename(dir.path().join("report.new"), dir.path().join("report.txt")).unwrap();
        assert!(matches!(inbox.check_target("report.txt", false), Err(FileError::NotOurs)));
        assert_eq!(inbox.delete("report.txt", false).unwrap(), Deleted::Kept);
        assert_eq!(fs::read(dir.path().join("report.txt")).unwrap(), b"theirs");
    }

    #[test]
    fn our_private_area_is_ours_alone() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join(".filemq")).unwrap();
        let refused = Inbox::open(dir.path()).err().unwrap();
        assert!(refused.to_string().contains("symlink"), "{refused}");
        assert!(fs::read_dir(outside.path()).unwrap().next().is_none());

        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join(".filemq")).unwrap();
        fs::set_permissions(dir.path().join(".filemq"), std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let victim = outside.path().join("victim");
        fs::write(&victim, b"keep").unwrap();
        fs::create_dir(dir.path().join(".filemq/partial")).unwrap();
        let digest = sha1_hex(b"evil");
        std::os::unix::fs::symlink(&victim, dir.path().join(".filemq/partial").join(&digest)).unwrap();
        std::os::unix::fs::symlink(&victim, dir.path().join(".filemq/digests.new")).unwrap();
        let mut inbox = Inbox::open(dir.path()).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(fs::metadata(dir.path().join(".filemq")).unwrap().permissions().mode() & 0o777, 0o700);
        // A planted partial is neither written through nor resumed from.
        assert!(inbox.resumable().unwrap().is_empty());
        assert!(inbox.begin(b"/e".to_vec(), placed("e"), Some(4), Some(digest.clone()), 3).is_err());
        let mut inc = inbox.begin(b"/e".to_vec(), placed("e"), Some(4), Some(digest), 0).unwrap();
        inc.write(b"evil").unwrap();
        inbox.deliver(inc, false).unwrap();
        assert!(fs::symlink_metadata(dir.path().join("e")).unwrap().is_file());
        // The cache is written as a new file, not through the planted link.
        inbox.save_digests(false).unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"keep");
    }

    #[test]
    fn partial_files_kept_for_resume_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let inbox = Inbox::open(dir.path()).unwrap();
        for i in 0..MAX_PARTIALS + 5 {
            let digest = sha1_hex(format!("file {i}").as_bytes());
            let mut inc = inbox.begin(b"/p".to_vec(), placed("p"), None, Some(digest), 0).unwrap();
            inc.write(b"part").unwrap();
            inbox.abandon(inc, true);
        }
        assert_eq!(inbox.resumable().unwrap().len(), MAX_PARTIALS);
        let digest = sha1_hex(b"dropped");
        let inc = inbox.begin(b"/p".to_vec(), placed("p"), None, Some(digest), 0).unwrap();
        inbox.abandon(inc, false);
        assert_eq!(inbox.resumable().unwrap().len(), MAX_PARTIALS);
    }
}
