//! What an inbox holds, listed for ICANHAZ caches and dry runs: files with
//! their digests (from the cache when size, mtime and inode still match),
//! directories and links with their attributes.

use super::*;

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
    pub(super) fn entries(
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
    pub(super) fn dir_attrs(&self, rel: &str, meta: &fs::Metadata) -> Attrs {
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

    pub(super) fn digest_of(&mut self, rel: &str, meta: &fs::Metadata) -> io::Result<String> {
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
    pub(super) fn unreadable(&mut self, rel: &str, path: &Path, e: &io::Error) {
        tracing::warn!("skipping {}, which cannot be read: {e}", escape(path.as_os_str().as_encoded_bytes()));
        self.digests.unreadable(rel);
    }
}
