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
    /// `X-MODE` and `X-MTIME`, given to the file before it is renamed
    /// into place.
    pub attrs: Option<Attrs>,
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
            attrs: None,
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
        let Incoming { rel, expected_size, expected_digest, written, temp_name, file, hasher, attrs, .. } =
            incoming;
        // Before the rename, so that the file appears with them.
        if let Some(attrs) = attrs {
            if let Err(e) = dirfd::set_file_attrs(&file, attrs.mode & PERMISSIONS, attrs.mtime_ns) {
                let _ = self.partial.remove_file(&temp_name);
                return Err(e.into());
            }
        }
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

    /// After a change at `rel`: the directories the walk made are marked
    /// ours (made as parents), and the directories above `rel` that the
    /// publisher has get their mtime back (the change moved it).
    fn settle_dirs(&mut self, walk: &Walk<'_>, rel: &str) {
        let made = walk.chain.len() - walk.created;
        for (depth, dir) in walk.chain.iter().enumerate() {
            let dir_rel = walk.components[..=depth].join("/");
            let Ok(entry) = dir.stat() else { continue };
            if depth >= made {
                let known = Known {
                    stamp: Stamp { size: 0, mtime_ns: 0, inode: entry.inode },
                    digest: EMPTY_SHA1.to_string(),
                    ours: true,
                    what: What::Dir(DirMark::Parent),
                };
                if let Err(e) = self.digests.mark(&self.private, &dir_rel, known) {
                    tracing::warn!("cannot record {}: {e}", shown(&dir_rel));
                }
                continue;
            }
            if let Some(mtime_ns) = self.published_mtime(&dir_rel, entry.inode) {
                if let Err(e) = dir.set_mtime(mtime_ns) {
                    tracing::debug!(
                        "cannot put back the mtime of {} after {}: {e}",
                        shown(&dir_rel),
                        shown(rel)
                    );
                }
            }
        }
    }

    /// The mtime the directory at `rel` (inode `inode`) was published
    /// with, if it is ours and the publisher has it.
    fn published_mtime(&self, rel: &str, inode: u64) -> Option<i64> {
        let known = self.digests.get(rel)?;
        (known.what == What::Dir(DirMark::Published) && known.stamp.inode == inode)
            .then_some(known.stamp.mtime_ns as i64)
    }

    /// Makes the directory `rel` with the publisher's attributes (or gives
    /// them to the one there, if ours or `replace_any`); a file or link of
    /// ours in the way goes. True if it was created.
    pub fn make_dir(&mut self, rel: &str, attrs: Attrs, replace_any: bool) -> Result<bool, FileError> {
        self.make_dir_inner(rel, attrs, replace_any).map_err(|e| below_root(rel, e))
    }

    fn make_dir_inner(&mut self, rel: &str, attrs: Attrs, replace_any: bool) -> Result<bool, FileError> {
        self.check_length(rel)?;
        let Some(walk) = self.walk(rel, true)? else {
            return Err(FileError::Refused(format!("a directory above {} vanished", shown(rel))));
        };
        let result = self.make_dir_at(&walk, rel, attrs, replace_any);
        match &result {
            Ok(_) => self.settle_dirs(&walk, rel),
            Err(_) => self.undo(walk),
        }
        result
    }

    fn make_dir_at(
        &mut self,
        walk: &Walk<'_>,
        rel: &str,
        attrs: Attrs,
        replace_any: bool,
    ) -> Result<bool, FileError> {
        let (parent, leaf) = (walk.chain.last().unwrap_or(&self.root), walk.leaf());
        let existing = parent.entry(leaf)?;
        let ours = existing.is_some_and(|e| self.digests.is_ours(rel, e.inode));
        let mut created = false;
        match existing {
            Some(e) if e.kind == Kind::Other => {
                return Err(FileError::Refused(format!("{} is not a regular file or directory", shown(rel))))
            }
            // A directory with the publisher's mode is taken as the
            // mirror's (older versions made them unmarked); it only takes
            // the mtime. One with another mode is the user's.
            Some(e)
                if e.kind == Kind::Dir
                    && !ours
                    && !replace_any
                    && e.mode & PERMISSIONS != dir_mode(attrs.mode) =>
            {
                return Err(FileError::NotOurs)
            }
            Some(e) if e.kind == Kind::Dir => {}
            Some(_) if !ours && !replace_any => return Err(FileError::NotOurs),
            Some(_) => {
                parent.remove_file(leaf)?;
                self.digests.forget(rel);
                created = true;
            }
            None => created = true,
        }
        if created && !parent.make_dir(leaf, 0o700)? {
            return Err(FileError::Refused(format!("something appeared at {} meanwhile", shown(rel))));
        }
        let dir = parent.open_dir(leaf).map_err(|e| {
            if dirfd::is_symlink_error(&e) {
                FileError::Refused(format!("{} is a symlink", shown(rel)))
            } else {
                e.into()
            }
        })?;
        dir.set_mode(dir_mode(attrs.mode))?;
        dir.set_mtime(attrs.mtime_ns)?;
        let inode = dir.stat()?.inode;
        let known = Known {
            stamp: Stamp {
                size: u64::from(attrs.mode & PERMISSIONS),
                mtime_ns: i128::from(attrs.mtime_ns),
                inode,
            },
            digest: EMPTY_SHA1.to_string(),
            ours: true,
            what: What::Dir(DirMark::Published),
        };
        self.digests.mark(&self.private, rel, known)?;
        Ok(created)
    }

    /// Makes the symlink `rel` leading to `target` (checked: it must stay
    /// inside the inbox), with mtime `mtime_ns`: made in our private area
    /// and renamed into place, replacing a link or file of ours (or any,
    /// with `replace_any`), or an empty directory.
    pub fn make_link(
        &mut self,
        rel: &str,
        target: &str,
        mtime_ns: i64,
        replace_any: bool,
    ) -> Result<(), FileError> {
        link_target(rel, target).map_err(|why| FileError::Refused(why.to_string()))?;
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let temp = format!("link-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        let made =
            self.partial.symlink(target, &temp).and_then(|()| self.partial.set_mtime_of(&temp, mtime_ns));
        let result = match made {
            Ok(()) => self.place_link(rel, &temp, replace_any),
            Err(e) => Err(e.into()),
        };
        if result.is_err() {
            let _ = self.partial.remove_file(&temp);
        }
        result.map_err(|e| below_root(rel, e))?;
        let inode = self
            .walk(rel, false)?
            .and_then(|w| self.parent(&w).entry(w.leaf()).ok().flatten())
            .map(|e| e.inode);
        if let Some(inode) = inode {
            let known = Known {
                stamp: Stamp { size: 0, mtime_ns: i128::from(mtime_ns), inode },
                digest: link_digest(target),
                ours: true,
                what: What::Link,
            };
            self.digests.mark(&self.private, rel, known)?;
        }
        Ok(())
    }

    fn place_link(&mut self, rel: &str, temp: &str, replace_any: bool) -> Result<(), FileError> {
        self.check_length(rel)?;
        let Some(walk) = self.walk(rel, true)? else {
            return Err(FileError::Refused(format!("a directory above {} vanished", shown(rel))));
        };
        let result = (|| {
            let (parent, leaf) = (self.parent(&walk), walk.leaf());
            if let Some(e) = parent.entry(leaf)? {
                let ours = self.digests.is_ours(rel, e.inode);
                match e.kind {
                    Kind::Other => {
                        return Err(FileError::Refused(format!("{} is not a regular file", shown(rel))))
                    }
                    _ if !ours && !replace_any => return Err(FileError::NotOurs),
                    _ => self.clear_dir(parent, leaf, rel)?,
                }
            }
            Ok(self.partial.rename(temp, parent, leaf)?)
        })();
        match &result {
            Ok(()) => self.settle_dirs(&walk, rel),
            Err(_) => self.undo(walk),
        }
        result
    }

    /// Gives the file at `rel` new attributes, if it holds the content
    /// `digest` and is ours (or `replace_any`).
    pub fn set_attrs(
        &mut self,
        rel: &str,
        digest: &str,
        attrs: Attrs,
        replace_any: bool,
    ) -> Result<Applied, FileError> {
        self.set_attrs_inner(rel, digest, attrs, replace_any).map_err(|e| below_root(rel, e))
    }

    fn set_attrs_inner(
        &mut self,
        rel: &str,
        digest: &str,
        attrs: Attrs,
        replace_any: bool,
    ) -> Result<Applied, FileError> {
        let Some(walk) = self.walk(rel, false)? else { return Ok(Applied::Lacking) };
        let (parent, leaf) = (walk.chain.last().unwrap_or(&self.root), walk.leaf());
        let Some(entry) = parent.entry(leaf)?.filter(|e| e.kind == Kind::File) else {
            return Ok(Applied::Lacking);
        };
        let stamp = Stamp { size: entry.size, mtime_ns: entry.mtime_ns, inode: entry.inode };
        let held = match self.digests.lookup(rel, stamp) {
            Some(held) => held,
            None => {
                let file = parent.open_file(leaf, libc::O_RDONLY | libc::O_NONBLOCK, 0)?;
                Digest::from_hasher(hash_reader(file, u64::MAX)?.0).to_string()
            }
        };
        if held != digest {
            return Ok(Applied::Lacking);
        }
        if !replace_any && !self.digests.is_ours(rel, entry.inode) {
            return Err(FileError::NotOurs);
        }
        parent.set_file_mode(leaf, attrs.mode & PERMISSIONS)?;
        parent.set_mtime_of(leaf, attrs.mtime_ns)?;
        if let Some(after) = parent.entry(leaf)? {
            let stamp = Stamp { size: after.size, mtime_ns: after.mtime_ns, inode: after.inode };
            self.digests.remember(rel, stamp, held, false);
        }
        Ok(Applied::Done)
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

    /// Directories the publisher deleted that the last deletes removed
    /// once they emptied them.
    pub fn take_removed_dirs(&mut self) -> Vec<String> {
        std::mem::take(&mut self.removed_dirs)
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
        let Some(entry) = parent.entry(walk.leaf())? else { return Ok(Deleted::Absent) };
        let ours = self.digests.is_ours(rel, entry.inode);
        match entry.kind {
            Kind::Other => return Err(FileError::Refused(format!("{} is not a file", shown(rel)))),
            // Removing a link never touches its target, but one we did not
            // make is refused as any link in the way is.
            Kind::Symlink if !ours => return Err(FileError::Refused(format!("{} is a symlink", shown(rel)))),
            _ if !any && !ours => return Ok(Deleted::Kept),
            Kind::File | Kind::Symlink => {
                parent.remove_file(walk.leaf())?;
            }
            Kind::Dir => match parent.remove_dir(walk.leaf()) {
                Ok(()) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTEMPTY | libc::EEXIST)) => {
                    // Not published any more, but something is still in
                    // it: it goes once emptied, as a parent does.
                    if let Some(known) = self.digests.get(rel).filter(|_| ours).cloned() {
                        let known = Known { what: What::Dir(DirMark::Deleted), ..known };
                        self.digests.mark(&self.private, rel, known)?;
                    }
                    tracing::debug!("{} is not empty: kept until it is", shown(rel));
                    return Ok(Deleted::Absent);
                }
                Err(e) => return Err(e.into()),
            },
        }
        self.digests.forget(rel);
        // Directories emptied by the delete go, up to (not including) the
        // inbox root, unless the publisher has them.
        while let Some(dir) = walk.chain.last() {
            let depth = walk.chain.len() - 1;
            let dir_rel = walk.components[..=depth].join("/");
            let inode = dir.stat()?.inode;
            if self.published_mtime(&dir_rel, inode).is_some() {
                break;
            }
            drop(walk.chain.pop());
            let parent = walk.chain.last().unwrap_or(&self.root);
            if parent.remove_dir(walk.components[depth]).is_err() {
                break;
            }
            let deleted = self.digests.get(&dir_rel).is_some_and(|k| k.what == What::Dir(DirMark::Deleted));
            if deleted && self.removed_dirs.len() < MAX_REMOVED_REPORTED {
                self.removed_dirs.push(dir_rel.clone());
            }
            self.digests.forget(&dir_rel);
        }
        self.settle_dirs(&walk, rel);
        Ok(Deleted::Removed)
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

/// What is held under inbox-relative directory `dir` (empty: the
/// whole inbox): the files, and with `all_kinds` the directories (not
/// `dir` itself) and symlinks, sorted. Hidden entries (our `.filemq`
/// among them) and what `exclude` leaves out (matched relative to
/// `dir`; an excluded directory with all it holds) are left out;
/// digests come from the cache
/// when size and mtime are unchanged. An entry that cannot be read
/// (no permission, a path too long, an I/O error) is left out with a
/// warning: we do not hold it as far as the server is told. Only an
/// unreadable inbox root is an error.
pub(crate) fn list(
    root_path: &Path,
    digests: &mut DigestCache,
    dir: &str,
    all_kinds: bool,
    exclude: Option<&Excludes>,
) -> io::Result<Vec<Holding>> {
    Lister { root_path, digests }.entries(dir, all_kinds, exclude)
}

/// The walk of [`list`]: what it needs of an inbox (its path and digest
/// cache), so that a real inbox and a dry run's look at one share it.
struct Lister<'a> {
    root_path: &'a Path,
    digests: &'a mut DigestCache,
}

impl Lister<'_> {
    fn entries(
        &mut self,
        dir: &str,
        all_kinds: bool,
        exclude: Option<&Excludes>,
    ) -> io::Result<Vec<Holding>> {
        let skip = dir.len() + usize::from(!dir.is_empty());
        let mut found = Vec::new();
        self.digests.walked(dir);
        let start = if dir.is_empty() { self.root_path.to_path_buf() } else { self.root_path.join(dir) };
        match fs::symlink_metadata(&start) {
            Ok(meta) if meta.is_file() => {
                match self.digest_of(dir, &meta) {
                    Ok(digest) => found.push(Holding {
                        rel: dir.to_string(),
                        kind: EntryKind::File,
                        digest,
                        attrs: Attrs::of(&meta),
                    }),
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
                if exclude.is_some_and(|e| e.excludes(child.get(skip..).unwrap_or_default(), meta.is_dir())) {
                    continue;
                }
                if meta.is_dir() {
                    // Its mark is kept whoever asks.
                    self.digests.met(&child);
                    if all_kinds {
                        let attrs = self.dir_attrs(&child, &meta);
                        found.push(Holding {
                            rel: child.clone(),
                            kind: EntryKind::Dir,
                            digest: EMPTY_SHA1.into(),
                            attrs,
                        });
                    }
                    pending.push((entry.path(), child));
                } else if meta.is_file() {
                    match self.digest_of(&child, &meta) {
                        Ok(digest) => found.push(Holding {
                            rel: child,
                            kind: EntryKind::File,
                            digest,
                            attrs: Attrs::of(&meta),
                        }),
                        // Gone while we walked: not held.
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                        Err(e) => self.unreadable(&child, &entry.path(), &e),
                    }
                } else if meta.file_type().is_symlink() {
                    self.digests.met(&child);
                    if !all_kinds {
                        continue;
                    }
                    match fs::read_link(entry.path()).map(|t| t.into_os_string().into_string()) {
                        Ok(Ok(target)) => {
                            let attrs = Attrs { mode: PERMISSIONS, ..Attrs::of(&meta) };
                            found.push(Holding {
                                rel: child,
                                kind: EntryKind::Link,
                                digest: link_digest(&target),
                                attrs,
                            });
                        }
                        // A target that is not UTF-8 is none of the publisher's.
                        Ok(Err(_)) => {}
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                        Err(e) => self.unreadable(&child, &entry.path(), &e),
                    }
                }
            }
        }
        found.sort_by(|a, b| a.rel.cmp(&b.rel));
        Ok(found)
    }

    /// A directory's attributes as the publisher would say them: a
    /// directory of ours whose mode we widened for ourselves (`dir_mode`)
    /// reports the mode it was published with.
    fn dir_attrs(&self, rel: &str, meta: &fs::Metadata) -> Attrs {
        use std::os::unix::fs::MetadataExt;
        let attrs = Attrs::of(meta);
        match self.digests.get(rel) {
            Some(known)
                if known.what == What::Dir(DirMark::Published)
                    && known.stamp.inode == meta.ino()
                    && dir_mode(known.stamp.size as u32) == attrs.mode =>
            {
                Attrs { mode: known.stamp.size as u32 & PERMISSIONS, ..attrs }
            }
            _ => attrs,
        }
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

    fn attrs(mode: u32, secs: i64) -> Attrs {
        Attrs { mode, mtime_ns: secs * 1_000_000_000 }
    }

    fn stat(root: &Path, rel: &str) -> (u32, i64) {
        use std::os::unix::fs::MetadataExt;
        let meta = fs::symlink_metadata(root.join(rel)).unwrap();
        (meta.mode() & 0o7777, meta.mtime())
    }

    fn deliver(inbox: &mut Inbox, rel: &str, data: &[u8], attrs: Option<Attrs>) -> Result<u64, FileError> {
        let mut inc = inbox.begin(rel.as_bytes().to_vec(), placed(rel), None, None, 0).unwrap();
        inc.attrs = attrs;
        inc.write(data).unwrap();
        inbox.deliver(inc, false)
    }

    #[test]
    fn files_arrive_with_their_attributes_and_directories_keep_their_mtime() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let mut inbox = Inbox::open(root).unwrap();
        // The file before its directory: the directory is made as a parent,
        // then given the publisher's attributes.
        deliver(&mut inbox, "d/f", b"x", Some(attrs(0o751, 1_000))).unwrap();
        assert_eq!(stat(root, "d/f"), (0o751, 1_000));
        assert!(!inbox.make_dir("d", attrs(0o750, 2_000), false).unwrap(), "it was there");
        assert_eq!(stat(root, "d"), (dir_mode(0o750), 2_000));
        // A change inside moves the directory's mtime: it is put back.
        deliver(&mut inbox, "d/g", b"y", None).unwrap();
        assert_eq!(stat(root, "d").1, 2_000);
        inbox.make_link("d/l", "g", 3_000_000_000_123, false).unwrap();
        assert_eq!(fs::read_link(root.join("d/l")).unwrap(), Path::new("g"));
        assert_eq!(stat(root, "d/l").1, 3_000);
        assert_eq!(stat(root, "d").1, 2_000);
        assert_eq!(inbox.delete("d/g", false).unwrap(), Deleted::Removed);
        assert_eq!(stat(root, "d").1, 2_000);
        // Empty, but published: kept.
        assert_eq!(inbox.delete("d/f", false).unwrap(), Deleted::Removed);
        assert_eq!(inbox.delete("d/l", false).unwrap(), Deleted::Removed);
        assert!(root.join("d").is_dir());
        assert!(inbox.make_dir("e/mpty", attrs(0o700, 4_000), false).unwrap());
        let held: Vec<(String, EntryKind)> =
            inbox.entries("", true, None).unwrap().into_iter().map(|h| (h.rel, h.kind)).collect();
        let expect = [("d", EntryKind::Dir), ("e", EntryKind::Dir), ("e/mpty", EntryKind::Dir)];
        assert_eq!(held, expect.map(|(r, k)| (r.to_string(), k)));
        // The publisher's own attributes are what is reported, even where
        // we keep a directory writable for ourselves.
        let d = inbox.entries("", true, None).unwrap().remove(0);
        assert_eq!(d.attrs, attrs(0o750, 2_000));
        // Deleted by the publisher: removed once empty.
        assert_eq!(inbox.delete("e/mpty", false).unwrap(), Deleted::Removed);
        assert!(!root.join("e").exists(), "its parent, made only as a parent, goes with it");
        assert!(inbox.take_removed_dirs().is_empty(), "and that is no delete of the publisher's");
        assert_eq!(inbox.delete("d", false).unwrap(), Deleted::Removed);
        assert!(!root.join("d").exists());
    }

    #[test]
    fn a_directory_still_holding_something_goes_once_emptied() {
        let dir = tempfile::tempdir().unwrap();
        let mut inbox = Inbox::open(dir.path()).unwrap();
        inbox.make_dir("d", attrs(0o755, 1_000), false).unwrap();
        deliver(&mut inbox, "d/f", b"x", None).unwrap();
        // The publisher deletes the directory before its file.
        assert_eq!(inbox.delete("d", false).unwrap(), Deleted::Absent);
        assert!(dir.path().join("d/f").exists());
        assert_eq!(inbox.delete("d/f", false).unwrap(), Deleted::Removed);
        assert!(!dir.path().join("d").exists());
        assert_eq!(inbox.take_removed_dirs(), ["d"], "its delete is reported then");
    }

    #[test]
    fn links_and_directories_of_the_users_are_theirs() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let mut inbox = Inbox::open(root).unwrap();
        fs::create_dir(root.join("mine")).unwrap();
        fs::set_permissions(root.join("mine"), std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
        fs::write(root.join("file"), b"mine").unwrap();
        std::os::unix::fs::symlink("file", root.join("link")).unwrap();
        assert!(matches!(inbox.make_dir("mine", attrs(0o777, 1), false), Err(FileError::NotOurs)));
        assert_eq!(stat(root, "mine").0, 0o700, "a directory of yours keeps its mode");
        // One with the publisher's mode (as an older filemq made them) is
        // taken as the mirror's.
        fs::create_dir(root.join("old")).unwrap();
        fs::set_permissions(root.join("old"), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        assert!(!inbox.make_dir("old", attrs(0o755, 3), false).unwrap());
        assert_eq!(stat(root, "old"), (0o755, 3));
        assert!(matches!(inbox.make_dir("file", attrs(0o755, 1), false), Err(FileError::NotOurs)));
        assert!(matches!(inbox.make_link("file", "mine", 1, false), Err(FileError::NotOurs)));
        assert!(matches!(inbox.make_link("link", "mine", 1, false), Err(FileError::NotOurs)));
        assert_eq!(fs::read(root.join("file")).unwrap(), b"mine");
        assert_eq!(fs::read_link(root.join("link")).unwrap(), Path::new("file"));
        assert_eq!(inbox.delete("mine", false).unwrap(), Deleted::Kept);
        assert!(matches!(inbox.delete("link", true), Err(FileError::Refused(_))), "a link of yours stays");
        assert!(matches!(
            inbox.set_attrs("file", &sha1_hex(b"mine"), attrs(0o600, 1), false),
            Err(FileError::NotOurs)
        ));
        // With the user's word, they are taken over.
        assert!(!inbox.make_dir("mine", attrs(0o755, 5), true).unwrap());
        assert_eq!(stat(root, "mine"), (dir_mode(0o755), 5));
        assert_eq!(
            inbox.set_attrs("file", &sha1_hex(b"mine"), attrs(0o640, 6), true).unwrap(),
            Applied::Done
        );
        assert_eq!(stat(root, "file"), (0o640, 6));
        assert_eq!(
            inbox.set_attrs("file", &sha1_hex(b"other"), attrs(0o600, 7), true).unwrap(),
            Applied::Lacking
        );
        assert_eq!(
            inbox.set_attrs("absent", &sha1_hex(b"x"), attrs(0o600, 7), true).unwrap(),
            Applied::Lacking
        );
        inbox.make_link("link", "mine", 8, true).unwrap();
        assert_eq!(fs::read_link(root.join("link")).unwrap(), Path::new("mine"));
        // Ours now: replaced or removed without a word.
        inbox.make_link("link", "file", 9, false).unwrap();
        assert_eq!(inbox.delete("link", false).unwrap(), Deleted::Removed);
    }

    #[test]
    fn no_link_leads_out_and_none_is_written_through() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        fs::write(outside.path().join("victim"), b"keep").unwrap();
        let root = dir.path();
        let mut inbox = Inbox::open(root).unwrap();
        for target in ["../x", "/etc/passwd", "a/../../x", ".filemq/digests", "a/./b", ""] {
            assert!(matches!(inbox.make_link("l", target, 1, true), Err(FileError::Refused(_))), "{target}");
        }
        assert!(matches!(inbox.make_link("d/l", "../../x", 1, true), Err(FileError::Refused(_))));
        assert!(!root.join("d").exists(), "nothing made for a refused link");
        // A link of ours is replaced by a file, never written through.
        inbox.make_link("l", "d", 1, false).unwrap();
        std::fs::remove_file(root.join("l")).unwrap();
        std::os::unix::fs::symlink(outside.path().join("victim"), root.join("l")).unwrap();
        // Refused, or (its inode reused) replaced: never written through.
        let _ = deliver(&mut inbox, "l", b"evil", None);
        assert_eq!(fs::read(outside.path().join("victim")).unwrap(), b"keep");
        inbox.make_link("m", "d", 1, false).unwrap();
        deliver(&mut inbox, "m", b"file", None).unwrap();
        assert!(fs::symlink_metadata(root.join("m")).unwrap().is_file());
        // Attributes never go through a link.
        assert_eq!(
            inbox.set_attrs("l", &sha1_hex(b"keep"), attrs(0o777, 1), true).unwrap(),
            Applied::Lacking
        );
        use std::os::unix::fs::PermissionsExt;
        assert_ne!(fs::metadata(outside.path().join("victim")).unwrap().permissions().mode() & 0o777, 0o777);
    }

    #[test]
    fn marks_of_links_and_directories_survive_a_kill() {
        let dir = tempfile::tempdir().unwrap();
        let mut inbox = Inbox::open(dir.path()).unwrap();
        inbox.make_dir("d", attrs(0o755, 1), false).unwrap();
        inbox.make_link("d/l", "x", 1, false).unwrap();
        drop(inbox); // as SIGKILL would: no save
        let mut inbox = Inbox::open(dir.path()).unwrap();
        assert_eq!(inbox.delete("d/l", false).unwrap(), Deleted::Removed);
        assert!(dir.path().join("d").is_dir(), "still known as published");
        assert_eq!(inbox.delete("d", false).unwrap(), Deleted::Removed);
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
