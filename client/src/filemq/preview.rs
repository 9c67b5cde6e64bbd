//! A dry run's look at an inbox (`Options::dry_run`): what it holds (for
//! the cache sent to the server) and what the subscriber would do with
//! each entry the server lists, by the inbox's own rules, without changing
//! anything: no file, no directory, not even `.filemq/`, is created,
//! written or removed, and nothing is locked. Everything goes through the
//! same directory handles as the inbox (`dirfd`: one component at a time,
//! never following a symlink), read-only.

use super::digests::DigestCache;
use super::dirfd::{Dir, Entry, Kind};
use super::inbox::{self, Holding, MAX_PATH, PRIVATE_DIR};
use super::{Kept, Plan};
use std::io;
use std::path::{Path, PathBuf};
use zbroker_proto::escape::escape;
use zbroker_proto::exclude::Excludes;
use zbroker_proto::filemq_ext::{link_target, Attrs, PERMISSIONS};

/// What a dry run says of one entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Planned {
    Do(Plan),
    /// A file (link, directory) of the user's would be kept.
    Keep(Kept),
    /// The name would be refused for safety.
    Refused(String),
    /// Nothing would change (nothing to delete, say).
    Nothing,
}

/// An inbox looked at, never touched.
pub(crate) struct Preview {
    root_path: PathBuf,
    root_len: usize,
    /// `None`: the inbox does not exist (yet); everything would be made.
    root: Option<Dir>,
    digests: DigestCache,
}

fn shown(rel: &str) -> String {
    escape(rel.as_bytes())
}

impl Preview {
    /// Opens the inbox read-only if it exists, and its digest cache (and
    /// journal) if they do.
    pub fn open(root_path: &Path) -> io::Result<Preview> {
        let root = match Dir::open(root_path) {
            Ok(root) => Some(root),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        let root_len = match &root {
            Some(_) => std::fs::canonicalize(root_path)?.as_os_str().len(),
            None => std::path::absolute(root_path)?.as_os_str().len(),
        };
        let digests = match root.as_ref().map(|r| r.open_dir(PRIVATE_DIR)) {
            Some(Ok(private)) => DigestCache::load(&private),
            _ => DigestCache::default(),
        };
        Ok(Preview { root_path: root_path.to_path_buf(), root_len, root, digests })
    }

    /// What the inbox holds under `dir`, as [`inbox::list`] says (hashing
    /// files the digest cache does not know; the cache is not saved).
    pub fn entries(
        &mut self,
        dir: &str,
        all_kinds: bool,
        exclude: Option<&Excludes>,
    ) -> io::Result<Vec<Holding>> {
        if self.root.is_none() {
            return Ok(Vec::new());
        }
        inbox::list(&self.root_path, &mut self.digests, dir, all_kinds, exclude)
    }

    /// What is at `rel`: `Ok(None)` if nothing (or a directory above it
    /// is missing); `Err` with what a real run would refuse on the way.
    fn look(&self, rel: &str) -> Result<Option<(Entry, bool)>, Planned> {
        let length = self.root_len + 1 + rel.len();
        if length > MAX_PATH {
            return Err(Planned::Refused(format!(
                "its path in the inbox would be {length} bytes long, more than the system's {MAX_PATH}"
            )));
        }
        let Some(root) = &self.root else { return Ok(None) };
        let parts: Vec<&str> = rel.split('/').collect();
        let mut chain: Vec<Dir> = Vec::new();
        for (i, name) in parts[..parts.len() - 1].iter().enumerate() {
            let parent = chain.last().unwrap_or(root);
            match parent.open_dir(name) {
                Ok(dir) => chain.push(dir),
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(e) => {
                    let on_the_way = shown(&parts[..=i].join("/"));
                    return Err(Planned::Refused(if super::dirfd::is_symlink_error(&e) {
                        format!("{on_the_way} is a symlink")
                    } else if e.raw_os_error() == Some(libc::ENOTDIR) {
                        format!("a file is in the way of {}", shown(rel))
                    } else {
                        format!("{on_the_way}: {e}")
                    }));
                }
            }
        }
        let parent = chain.last().unwrap_or(root);
        let leaf = parts[parts.len() - 1];
        let entry = parent.entry(leaf).map_err(|e| Planned::Refused(format!("{}: {e}", shown(rel))))?;
        Ok(entry.map(|e| {
            // Only a directory's emptiness matters (it may go, or not).
            let empty = e.kind == Kind::Dir
                && parent
                    .open_dir(leaf)
                    .and_then(|d| std::fs::read_dir(d.proc_path()).map(|mut it| it.next().is_none()))
                    .unwrap_or(false);
            (e, empty)
        }))
    }

    fn ours(&self, rel: &str, entry: &Entry) -> bool {
        self.digests.is_ours(rel, entry.inode)
    }

    /// A file's content would arrive at `rel`.
    pub fn file(&self, rel: &str, overwrite: bool) -> Planned {
        let (entry, empty) = match self.look(rel) {
            Ok(None) => return Planned::Do(Plan::Create),
            Ok(Some(found)) => found,
            Err(planned) => return planned,
        };
        let ours = self.ours(rel, &entry);
        match entry.kind {
            Kind::Symlink if ours => Planned::Do(Plan::Update),
            Kind::Symlink => Planned::Refused(format!("{} is a symlink", shown(rel))),
            Kind::Other => Planned::Refused(format!("{} is not a regular file", shown(rel))),
            _ if !ours && !overwrite => Planned::Keep(Kept::Differs),
            Kind::Dir if !empty => Planned::Refused(format!("a directory is in the way of {}", shown(rel))),
            _ => Planned::Do(Plan::Update),
        }
    }

    /// The directory `rel` would be made, or given `attrs`.
    pub fn dir(&self, rel: &str, attrs: Attrs, overwrite: bool) -> Planned {
        let (entry, _) = match self.look(rel) {
            Ok(None) => return Planned::Do(Plan::Create),
            Ok(Some(found)) => found,
            Err(planned) => return planned,
        };
        let ours = self.ours(rel, &entry) || overwrite;
        match entry.kind {
            Kind::Other => Planned::Refused(format!("{} is not a regular file or directory", shown(rel))),
            Kind::Dir if ours || entry.mode & PERMISSIONS == inbox::dir_mode(attrs.mode) => {
                Planned::Do(Plan::Update)
            }
            _ if ours => Planned::Do(Plan::Update),
            _ => Planned::Keep(Kept::Differs),
        }
    }

    /// A symlink leading to `target` would be made at `rel`.
    pub fn link(&self, rel: &str, target: &str, overwrite: bool) -> Planned {
        if let Err(why) = link_target(rel, target) {
            return Planned::Refused(why.to_string());
        }
        let (entry, empty) = match self.look(rel) {
            Ok(None) => return Planned::Do(Plan::Create),
            Ok(Some(found)) => found,
            Err(planned) => return planned,
        };
        match entry.kind {
            Kind::Other => Planned::Refused(format!("{} is not a regular file", shown(rel))),
            _ if !self.ours(rel, &entry) && !overwrite => Planned::Keep(Kept::Differs),
            Kind::Dir if !empty => Planned::Refused(format!("a directory is in the way of {}", shown(rel))),
            _ => Planned::Do(Plan::Update),
        }
    }

    /// A file at `rel` would get new attributes (or, not held as the
    /// server believes, be fetched again).
    pub fn attrs(&self, rel: &str, overwrite: bool) -> Planned {
        match self.look(rel) {
            Ok(Some((entry, _))) if entry.kind == Kind::File && !self.ours(rel, &entry) && !overwrite => {
                Planned::Keep(Kept::Differs)
            }
            Ok(_) => Planned::Do(Plan::Update),
            Err(planned) => planned,
        }
    }

    /// What the publisher no longer has at `rel` would go (`any`: even if
    /// the subscriber did not make it).
    pub fn delete(&self, rel: &str, any: bool) -> Planned {
        let (entry, empty) = match self.look(rel) {
            Ok(None) => return Planned::Nothing,
            Ok(Some(found)) => found,
            Err(planned) => return planned,
        };
        let ours = self.ours(rel, &entry);
        match entry.kind {
            Kind::Other => Planned::Refused(format!("{} is not a file", shown(rel))),
            Kind::Symlink if !ours => Planned::Refused(format!("{} is a symlink", shown(rel))),
            _ if !any && !ours => Planned::Keep(Kept::NotPublished),
            // Ours, or any: it goes once emptied (its files' deletes come
            // on their own, and so is a file of the user's in it kept).
            Kind::Dir if !empty && !ours => Planned::Nothing,
            _ => Planned::Do(Plan::Delete),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::filemq::inbox::Inbox;
    use crate::filemq::layout::Placed;
    use std::fs;

    /// Everything the preview says, and that it changed nothing: the same
    /// tree, byte for byte and mtime for mtime, before and after.
    fn snapshot(root: &Path) -> Vec<(String, u64, i64)> {
        use std::os::unix::fs::MetadataExt;
        let mut found = Vec::new();
        let mut pending = vec![root.to_path_buf()];
        while let Some(dir) = pending.pop() {
            let Ok(entries) = fs::read_dir(&dir) else { continue };
            for entry in entries.flatten() {
                let meta = fs::symlink_metadata(entry.path()).unwrap();
                found.push((
                    entry.path().display().to_string(),
                    meta.len(),
                    meta.mtime_nsec() + meta.mtime() * 1_000_000_000,
                ));
                if meta.is_dir() {
                    pending.push(entry.path());
                }
            }
        }
        found.sort();
        found
    }

    #[test]
    fn a_missing_inbox_would_be_made_and_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let inbox = dir.path().join("inbox");
        let preview = Preview::open(&inbox).unwrap();
        assert_eq!(preview.file("a/b", false), Planned::Do(Plan::Create));
        assert_eq!(preview.dir("a", Attrs::default(), false), Planned::Do(Plan::Create));
        assert_eq!(preview.delete("a/b", true), Planned::Nothing);
        assert_eq!(
            preview.link("l", "../x", false),
            Planned::Refused("is a symlink that leads out of the tree".into())
        );
        assert!(!inbox.exists());
    }

    #[test]
    fn the_inbox_rules_without_touching_the_inbox() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let outside = tempfile::tempdir().unwrap();
        {
            let mut inbox = Inbox::open(root).unwrap();
            let mut inc = inbox
                .begin(b"/ours".to_vec(), Placed { subscription: 0, rel: "ours".into() }, None, None, 0)
                .unwrap();
            inc.write(b"ours").unwrap();
            inbox.deliver(inc, false).unwrap();
            inbox.make_dir("pub", Attrs { mode: 0o755, mtime_ns: 1 }, false).unwrap();
            inbox.save_digests(false).unwrap();
        }
        fs::write(root.join("mine"), b"mine").unwrap();
        fs::create_dir(root.join("full")).unwrap();
        fs::write(root.join("full/f"), b"f").unwrap();
        std::os::unix::fs::symlink(outside.path(), root.join("planted")).unwrap();
        let before = snapshot(root);
        let mut preview = Preview::open(root).unwrap();
        assert_eq!(preview.file("new", false), Planned::Do(Plan::Create));
        assert_eq!(preview.file("ours", false), Planned::Do(Plan::Update));
        assert_eq!(preview.file("mine", false), Planned::Keep(Kept::Differs));
        assert_eq!(preview.file("mine", true), Planned::Do(Plan::Update));
        assert_eq!(preview.file("planted/x", true), Planned::Refused("planted is a symlink".into()));
        assert_eq!(preview.file("full", true), Planned::Refused("a directory is in the way of full".into()));
        assert_eq!(preview.delete("ours", false), Planned::Do(Plan::Delete));
        assert_eq!(preview.delete("mine", false), Planned::Keep(Kept::NotPublished));
        assert_eq!(preview.delete("mine", true), Planned::Do(Plan::Delete));
        assert_eq!(preview.delete("full", true), Planned::Nothing, "not ours, and not empty");
        assert_eq!(preview.delete("pub", false), Planned::Do(Plan::Delete));
        assert_eq!(preview.delete("planted", true), Planned::Refused("planted is a symlink".into()));
        assert_eq!(preview.attrs("ours", false), Planned::Do(Plan::Update));
        assert_eq!(preview.attrs("mine", false), Planned::Keep(Kept::Differs));
        let held: Vec<String> = preview.entries("", true, None).unwrap().into_iter().map(|h| h.rel).collect();
        assert_eq!(held, ["full", "full/f", "mine", "ours", "planted", "pub"]);
        assert_eq!(snapshot(root), before, "nothing changed, not even .filemq");
    }
}
