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
//!
//! From a server that grants attributes, entries keep their permission
//! bits and mtime, and symlinks and directories are made as such: a link
//! only if its target stays inside the inbox (`filemq_ext::link_target`),
//! created aside and renamed into place; a directory's mtime is put back
//! after every change inside it. Links and directories carry marks in the
//! digest cache as delivered files do, under the same rules: what is not
//! ours is replaced (or given other attributes) only with `overwrite`,
//! and removed only with `delete`.

use super::digests::{DigestCache, DirMark, Known, Stamp, What};
use super::dirfd::{self, Dir, Kind};
use sha1::{Digest as _, Sha1};
use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use zbroker_proto::digest::Digest;
use zbroker_proto::escape::escape;
use zbroker_proto::exclude::Excludes;
use zbroker_proto::filemq_ext::{link_digest, link_target, Attrs, EntryKind, EMPTY_SHA1, PERMISSIONS};
use zbroker_proto::transfer::{Inflow, Prefix};

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
fn hash_reader(reader: impl Read, limit: u64) -> io::Result<(Sha1, u64)> {
    let mut hasher = Sha1::new();
    let total = read_blocks(reader, limit, |block| hasher.update(block))?;
    Ok((hasher, total))
}

/// Hands `each` what `reader` yields, up to `limit` bytes, block by
/// block; returns how many bytes that was.
fn read_blocks(mut reader: impl Read, limit: u64, mut each: impl FnMut(&[u8])) -> io::Result<u64> {
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
        each(&buf[..n]);
        total += n as u64;
    }
    Ok(total)
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
    /// `X-SHA1`, when the server said; also the temporary file's name.
    pub expected_digest: Option<String>,
    /// `X-MODE` and `X-MTIME`, given to the file before it is renamed
    /// into place.
    pub attrs: Option<Attrs>,
    /// Its name in `.filemq/partial/`.
    temp_name: String,
    #[cfg(test)]
    temp: PathBuf,
    file: File,
    /// The transfer's rules: the next offset, `X-SIZE` (when the server
    /// said), the digest of what was taken (`zbroker_proto::transfer`).
    inflow: Inflow,
}

impl Incoming {
    /// Writes `chunk`, sent as the bytes at `offset`: the next ones, and
    /// within `X-SIZE`. A file that would overrun it is refused as soon as
    /// it does, not once the disk is full.
    pub fn write_at(&mut self, offset: u64, chunk: &[u8]) -> Result<(), FileError> {
        self.inflow.accept(offset, chunk).map_err(|e| FileError::Integrity(e.to_string()))?;
        Ok(self.file.write_all(chunk)?)
    }

    /// Appends the next chunk.
    #[cfg(test)]
    pub fn write(&mut self, chunk: &[u8]) -> Result<(), FileError> {
        self.write_at(self.written(), chunk)
    }

    /// Bytes held so far (resumed ones included).
    pub fn written(&self) -> u64 {
        self.inflow.offset()
    }

    /// `X-SIZE`, when the server said.
    pub fn expected_size(&self) -> Option<u64> {
        self.inflow.size()
    }

    /// The temporary file.
    #[cfg(test)]
    pub fn temp(&self) -> &Path {
        &self.temp
    }
}

/// An entry the inbox holds, as a server granted attributes is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Holding {
    /// Inbox-relative.
    pub rel: String,
    pub kind: EntryKind,
    /// A file's SHA-1, a link's `link_digest`, a directory's
    /// `EMPTY_SHA1`.
    pub digest: String,
    pub attrs: Attrs,
}

/// What applying a file's new attributes did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Applied {
    Done,
    /// The file is not there, or not with the content announced: it must
    /// be fetched again.
    Lacking,
}

/// The mode a directory is given: the publisher's, but searchable and
/// writable by us unless we are root, so that the mirror can still be
/// changed inside it.
pub(crate) fn dir_mode(mode: u32) -> u32 {
    if dirfd::euid() == 0 {
        mode & PERMISSIONS
    } else {
        (mode & PERMISSIONS) | 0o700
    }
}

/// What a delete did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Deleted {
    Removed,
    /// There was nothing to remove (or a directory we made still holds
    /// something: it goes once emptied).
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
    /// Directories the publisher had deleted that a delete since emptied
    /// and removed: reported as deletes by the session
    /// ([`Inbox::take_removed_dirs`]).
    removed_dirs: Vec<String>,
    /// Held open for its `flock`: one subscriber per inbox.
    _lock: File,
}

/// Directories removed by one delete that are reported (a delete removes
/// at most as many as it has parents).
const MAX_REMOVED_REPORTED: usize = 256;

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
            removed_dirs: Vec::new(),
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
            Some(e) => {
                let ours = self.digests.is_ours(rel, e.inode);
                match e.kind {
                    // A link we made is replaced (renamed over, never
                    // written through); anyone else's is refused.
                    Kind::Symlink if ours => Ok(()),
                    Kind::Symlink => Err(FileError::Refused(format!("{} is a symlink", shown(rel)))),
                    Kind::Other => Err(FileError::Refused(format!("{} is not a regular file", shown(rel)))),
                    // A directory goes only if empty (see `place`).
                    Kind::File | Kind::Dir if !replace_any && !ours => Err(FileError::NotOurs),
                    Kind::File | Kind::Dir => Ok(()),
                }
            }
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
        let (file, inflow) = if offset == 0 {
            // Whatever had that name goes; the new file must be new, so
            // nothing planted there can be written through.
            self.partial.remove_file(&temp_name)?;
            (self.partial.create_new(&temp_name, 0o600)?, Inflow::new(expected_size))
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
            let mut prefix = Prefix::new();
            read_blocks(&mut file, offset, |block| prefix.feed(block))?;
            // A prefix that shrank while being read is refused here; one
            // that is not what the server has fails the digest at the end.
            let inflow = Inflow::resume(expected_size, offset, prefix)
                .map_err(|e| FileError::Integrity(e.to_string()))?;
            file.seek(SeekFrom::Start(offset))?;
            (file, inflow)
        };
        Ok(Incoming {
            name,
            rel: placed.rel,
            subscription: placed.subscription,
            expected_digest,
            attrs: None,
            #[cfg(test)]
            temp: self.partial_path.join(&temp_name),
            temp_name,
            file,
            inflow,
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
        let Incoming { rel, expected_digest, temp_name, file, inflow, attrs, .. } = incoming;
        // Before the rename, so that the file appears with them.
        if let Some(attrs) = attrs {
            if let Err(e) = dirfd::set_file_attrs(&file, attrs.mode & PERMISSIONS, attrs.mtime_ns) {
                let _ = self.partial.remove_file(&temp_name);
                return Err(e.into());
            }
        }
        let meta = file.metadata();
        drop(file);
        let written = inflow.offset();
        // `expected_digest` passed `Digest::normalise`: it parses.
        let expected = expected_digest.as_deref().and_then(Digest::parse);
        let digest = match inflow.finish(expected.as_ref()) {
            Ok(digest) => digest.to_string(),
            Err(e) => {
                let _ = self.partial.remove_file(&temp_name);
                return Err(FileError::Integrity(e.to_string()));
            }
        };
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

    /// Renames partial file (or link) `temp_name` to `rel`, making its
    /// parents.
    fn place(&mut self, rel: &str, temp_name: &str, replace_any: bool) -> Result<(), FileError> {
        self.check_target_inner(rel, replace_any)?;
        let Some(walk) = self.walk(rel, true)? else {
            return Err(FileError::Refused(format!("a directory above {} vanished", shown(rel))));
        };
        let result = self.check_leaf(&walk, rel, replace_any).and_then(|()| {
            let (parent, leaf) = (self.parent(&walk), walk.leaf());
            self.clear_dir(parent, leaf, rel)?;
            Ok(self.partial.rename(temp_name, parent, leaf)?)
        });
        match &result {
            Ok(()) => self.settle_dirs(&walk, rel),
            Err(_) => self.undo(walk),
        }
        result
    }

    /// Removes an empty directory at `leaf` of `parent`, where something
    /// else is to go (the publisher replaced it; a directory's files have
    /// deletes of their own).
    fn clear_dir(&self, parent: &Dir, leaf: &str, rel: &str) -> Result<(), FileError> {
        if parent.entry(leaf)?.is_some_and(|e| e.kind == Kind::Dir) {
            parent
                .remove_dir(leaf)
                .map_err(|_| FileError::Refused(format!("a directory is in the way of {}", shown(rel))))?;
        }
        Ok(())
    }

    /// The path length rule alone.
    fn check_length(&self, rel: &str) -> Result<(), FileError> {
        let length = self.root_len + 1 + rel.len();
        if length > MAX_PATH {
            return Err(FileError::Refused(format!(
                "its path in the inbox would be {length} bytes long, more than the system's {MAX_PATH}"
            )));
        }
        Ok(())
    }

    /// The files held under inbox-relative directory `dir` (empty: the
    /// whole inbox), as `(inbox-relative path, upper-case SHA-1)`: see
    /// [`Inbox::entries`].
    #[cfg(test)]
    pub fn holdings(&mut self, dir: &str) -> io::Result<Vec<(String, String)>> {
        Ok(self.entries(dir, false, None)?.into_iter().map(|h| (h.rel, h.digest)).collect())
    }

    /// What is held under inbox-relative directory `dir`: see [`list`].
    pub fn entries(
        &mut self,
        dir: &str,
        all_kinds: bool,
        exclude: Option<&Excludes>,
    ) -> io::Result<Vec<Holding>> {
        list(&self.root_path, &mut self.digests, dir, all_kinds, exclude)
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

mod listing;
mod tree;

pub(crate) use listing::list;

#[cfg(test)]
mod tests;
