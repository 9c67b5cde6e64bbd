//! The inbox's tree beside file deliveries: directories made with the
//! publisher's attributes, links (only ones that stay inside), attributes
//! set on what is there, deletes, and directories settled once emptied;
//! every step through directory handles, never through a link.

use super::*;

impl Inbox {
    /// After a change at `rel`: the directories the walk made are marked
    /// ours (made as parents), and the directories above `rel` that the
    /// publisher has get their mtime back (the change moved it).
    pub(super) fn settle_dirs(&mut self, walk: &Walk<'_>, rel: &str) {
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
    pub(super) fn published_mtime(&self, rel: &str, inode: u64) -> Option<i64> {
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

    pub(super) fn make_dir_inner(
        &mut self,
        rel: &str,
        attrs: Attrs,
        replace_any: bool,
    ) -> Result<bool, FileError> {
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

    pub(super) fn make_dir_at(
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

    pub(super) fn place_link(&mut self, rel: &str, temp: &str, replace_any: bool) -> Result<(), FileError> {
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

    pub(super) fn set_attrs_inner(
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

    pub(super) fn delete_file(&mut self, rel: &str, any: bool) -> Result<Deleted, FileError> {
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
}
