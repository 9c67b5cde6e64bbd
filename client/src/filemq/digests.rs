//! The inbox's digest cache, `.filemq/digests`: what each file held is
//! known to contain (so a restart does not rehash the tree) and whether
//! this subscriber wrote it (so that deletes and replacements touch only
//! our own files).
//!
//! ```text
//! filemq-digests 2
//! SIZE MTIME_NS INODE DIGEST MARK PATH
//! ```
//!
//! `MARK` is `d` for a file we delivered, `-` for one we only found in the
//! inbox; `l` for a symlink we made (`DIGEST` that of its target); `D` for
//! a directory the publisher has that we made or took its attributes for
//! (`SIZE` and `MTIME_NS` are the mode and mtime it was published with),
//! `p` for one we made only as a parent of something (removed once
//! emptied by deletes), `x` for one the publisher deleted while it still
//! held something (removed, and reported, once emptied). A mark belongs to the file, not the path: a file put at that
//! path since (a new inode: the user saved their own, or an editor
//! replaced it) is the user's. Each delivery is also appended at once to
//! `.filemq/digests.log` (lines of the same form), which the next load
//! replays and the next save empties: a subscriber killed between two
//! saves still knows which files it wrote. `PATH` is inbox-relative and
//! written with [`zbroker_proto::escape`], so that no name (a newline, a carriage
//! return, a backslash in it) can break, forge or shadow a line: a line
//! that does not read back exactly is dropped, and that file is simply
//! hashed again. A cache in the first format (no header line) is dropped
//! whole: it did not say which files were ours, and it could be confused
//! by names ending in CR.

use super::dirfd::Dir;
use std::collections::{HashMap, HashSet};
use std::io::{self, Read, Write};
use zbroker_proto::digest::{CacheLine, Digest, CACHE_HEADER};

const FILE: &str = "digests";
const NEW_FILE: &str = "digests.new";
const JOURNAL: &str = "digests.log";

/// What identifies a file's version on disk: a digest is believed while
/// all three hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stamp {
    pub size: u64,
    pub mtime_ns: i128,
    pub inode: u64,
}

impl Stamp {
    pub fn of(meta: &std::fs::Metadata) -> Stamp {
        use std::os::unix::fs::MetadataExt;
        Stamp {
            size: meta.len(),
            mtime_ns: meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128,
            inode: meta.ino(),
        }
    }
}

/// A digest known for a file of a given stamp, or a link or directory we
/// made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Known {
    pub stamp: Stamp,
    /// Upper-case hex SHA-1.
    pub digest: String,
    /// This subscriber delivered the file (the one with `stamp.inode`).
    pub ours: bool,
    pub what: What,
}

/// What a cache entry is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum What {
    #[default]
    File,
    /// A symlink we made (always ours).
    Link,
    /// A directory we made or took the publisher's attributes for (always
    /// ours).
    Dir(DirMark),
}

/// What became of a directory of ours.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DirMark {
    /// The publisher has it: kept even when emptied.
    Published,
    /// Made only as a parent of something: goes once emptied.
    Parent,
    /// The publisher deleted it while it still held something: goes once
    /// emptied, and that is reported as its delete.
    Deleted,
}

#[derive(Debug, Default)]
pub(crate) struct DigestCache {
    entries: HashMap<String, Known>,
    census: Census,
    dirty: bool,
    /// `digests.log`, open for appending once a delivery is recorded.
    journal: Option<std::fs::File>,
}

/// What a census of the inbox met: a pruning save drops only entries under
/// a directory it walked that it neither met nor failed to read.
#[derive(Debug, Default)]
struct Census {
    seen: HashSet<String>,
    walked: Vec<String>,
    unreadable: Vec<String>,
}

/// True if inbox-relative `rel` is `dir` or below it (`""` is the inbox).
fn under(dir: &str, rel: &str) -> bool {
    dir.is_empty() || rel == dir || (rel.starts_with(dir) && rel.as_bytes().get(dir.len()) == Some(&b'/'))
}

impl DigestCache {
    /// Reads the cache from our private directory; a missing or unreadable
    /// one is an empty cache (it only spares hashing).
    pub fn load(private: &Dir) -> DigestCache {
        let mut text = Vec::new();
        let read = private.open_file(FILE, libc::O_RDONLY, 0).and_then(|mut f| f.read_to_end(&mut text));
        match read {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!("ignoring the digest cache: {e}"),
        }
        let mut entries = parse(&text);
        let mut journal = Vec::new();
        if let Ok(mut file) = private.open_file(JOURNAL, libc::O_RDONLY, 0) {
            let _ = file.read_to_end(&mut journal);
        }
        // Only whole lines: a line cut by a kill mid-write could otherwise
        // read as a shorter path.
        let whole = journal.iter().rposition(|&b| b == b'\n').map_or(&journal[..0], |end| &journal[..end]);
        let mut replayed = false;
        for (rel, known) in whole.split(|&b| b == b'\n').filter_map(parse_line) {
            entries.insert(rel, known);
            replayed = true;
        }
        DigestCache { entries, dirty: replayed, ..DigestCache::default() }
    }

    /// Records a file we delivered, durably: the journal line is written
    /// before this returns.
    pub fn delivered(&mut self, private: &Dir, rel: &str, stamp: Stamp, digest: String) -> io::Result<()> {
        self.mark(private, rel, Known { stamp, digest, ours: true, what: What::File })
    }

    /// Records a link or directory we made (or a file we delivered),
    /// durably, as [`DigestCache::delivered`].
    pub fn mark(&mut self, private: &Dir, rel: &str, known: Known) -> io::Result<()> {
        let line = line(rel, &known);
        self.entries.insert(rel.to_string(), known);
        self.census.seen.insert(rel.to_string());
        self.dirty = true;
        if self.journal.is_none() {
            self.journal =
                Some(private.open_file(JOURNAL, libc::O_WRONLY | libc::O_APPEND | libc::O_CREAT, 0o600)?);
        }
        if let Some(journal) = &mut self.journal {
            journal.write_all(line.as_bytes())?;
        }
        Ok(())
    }

    /// The digest of `rel` if the cache knows it for this stamp; counts
    /// `rel` as met by the census.
    pub fn lookup(&mut self, rel: &str, stamp: Stamp) -> Option<String> {
        let known = self.entries.get(rel).filter(|k| k.stamp == stamp && k.what == What::File)?;
        self.census.seen.insert(rel.to_string());
        Some(known.digest.clone())
    }

    /// Records what `rel` holds. `ours` marks a delivery; a file found in
    /// the inbox keeps the mark it had if it is the same file (a mirrored
    /// file edited in place is still the mirror's; one saved anew at that
    /// path is not).
    pub fn remember(&mut self, rel: &str, stamp: Stamp, digest: String, ours: bool) {
        let ours = ours || self.is_ours(rel, stamp.inode);
        self.entries.insert(rel.to_string(), Known { stamp, digest, ours, what: What::File });
        self.census.seen.insert(rel.to_string());
        self.dirty = true;
    }

    /// True if this subscriber delivered the file now at `rel` (inode
    /// `inode`).
    pub fn is_ours(&self, rel: &str, inode: u64) -> bool {
        self.entries.get(rel).is_some_and(|k| k.ours && k.stamp.inode == inode)
    }

    /// What the cache says of `rel`, if anything.
    pub fn get(&self, rel: &str) -> Option<&Known> {
        self.entries.get(rel)
    }

    /// The census met `rel` (a link or directory whose mark is kept).
    pub fn met(&mut self, rel: &str) {
        if self.entries.contains_key(rel) {
            self.census.seen.insert(rel.to_string());
        }
    }

    pub fn forget(&mut self, rel: &str) {
        if self.entries.remove(rel).is_some() {
            self.dirty = true;
        }
    }

    /// Starts a census: see [`DigestCache::walked`] and
    /// [`DigestCache::unreadable`].
    pub fn start_census(&mut self) {
        self.census = Census::default();
    }

    /// The census walked inbox-relative directory `dir` (`""`: the inbox):
    /// entries under it that it did not meet are files no longer there.
    pub fn walked(&mut self, dir: &str) {
        self.census.walked.push(dir.to_string());
    }

    /// The census could not read `rel`: entries under it are kept.
    pub fn unreadable(&mut self, rel: &str) {
        self.census.unreadable.push(rel.to_string());
    }

    /// Writes the cache if it changed (a new file, then a rename over the
    /// old one; neither follows a symlink). With `prune`, entries the
    /// census shows gone are dropped.
    pub fn save(&mut self, private: &Dir, prune: bool) -> io::Result<()> {
        if prune {
            let before = self.entries.len();
            let census = &self.census;
            self.entries.retain(|rel, _| {
                census.seen.contains(rel)
                    || !census.walked.iter().any(|dir| under(dir, rel))
                    || census.unreadable.iter().any(|dir| under(dir, rel))
            });
            self.dirty |= self.entries.len() != before;
        }
        if !self.dirty {
            return Ok(());
        }
        private.remove_file(NEW_FILE)?;
        let mut file = private.create_new(NEW_FILE, 0o600)?;
        file.write_all(render(&self.entries).as_bytes())?;
        drop(file);
        private.rename(NEW_FILE, private, FILE)?;
        self.dirty = false;
        // Everything the journal said is in the cache now.
        self.journal = None;
        private.remove_file(JOURNAL)?;
        Ok(())
    }
}

fn render(entries: &HashMap<String, Known>) -> String {
    let mut sorted: Vec<_> = entries.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    let mut text = format!("{CACHE_HEADER}\n");
    for (rel, k) in sorted {
        text.push_str(&line(rel, k));
    }
    text
}

/// One entry as a line of the cache or the journal.
fn line(rel: &str, k: &Known) -> String {
    let mark = match k.what {
        What::File if k.ours => 'd',
        What::File => '-',
        What::Link => 'l',
        What::Dir(DirMark::Published) => 'D',
        What::Dir(DirMark::Parent) => 'p',
        What::Dir(DirMark::Deleted) => 'x',
    };
    let Stamp { size, mtime_ns, inode } = k.stamp;
    let digest = Digest::parse(&k.digest).unwrap_or_default();
    CacheLine { size, mtime_ns, inode, digest, mark, path: rel.to_string() }.format()
}

fn parse(text: &[u8]) -> HashMap<String, Known> {
    let mut entries = HashMap::new();
    let mut lines = text.split(|&b| b == b'\n');
    if lines.next() != Some(CACHE_HEADER.as_bytes()) {
        return entries;
    }
    for line in lines {
        if let Some((rel, known)) = parse_line(line) {
            entries.insert(rel, known);
        }
    }
    entries
}

fn parse_line(line: &[u8]) -> Option<(String, Known)> {
    let CacheLine { size, mtime_ns, inode, digest, mark, path } = CacheLine::parse(line)?;
    let (ours, what) = match mark {
        'd' => (true, What::File),
        'l' => (true, What::Link),
        'D' => (true, What::Dir(DirMark::Published)),
        'p' => (true, What::Dir(DirMark::Parent)),
        'x' => (true, What::Dir(DirMark::Deleted)),
        _ => (false, What::File),
    };
    let stamp = Stamp { size, mtime_ns, inode };
    Some((path, Known { stamp, digest: digest.to_string(), ours, what }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const X: &str = "0123456789ABCDEF0123456789ABCDEF01234567";
    const Y: &str = "89ABCDEF0123456789ABCDEF0123456789ABCDEF";

    fn stamp(n: u64) -> Stamp {
        Stamp { size: 64, mtime_ns: n as i128, inode: n }
    }

    fn known(digest: &str, ours: bool) -> Known {
        Known { stamp: stamp(1), digest: digest.into(), ours, what: What::File }
    }

    #[test]
    fn no_name_can_confuse_another() {
        let mut entries = HashMap::new();
        entries.insert("dup".to_string(), known(X, true));
        entries.insert("dup\r".to_string(), known(Y, false));
        entries.insert(
            "x\n1 1 1 89ABCDEF0123456789ABCDEF0123456789ABCDEF d forged".to_string(),
            known(Y, false),
        );
        entries.insert("back\\slash and space".to_string(), known(X, false));
        entries.insert("link".to_string(), Known { what: What::Link, ..known(X, true) });
        entries.insert("dir".to_string(), Known { what: What::Dir(DirMark::Published), ..known(X, true) });
        entries.insert("gone".to_string(), Known { what: What::Dir(DirMark::Deleted), ..known(X, true) });
        entries.insert("parent".to_string(), Known { what: What::Dir(DirMark::Parent), ..known(X, true) });
        let text = render(&entries);
        assert_eq!(text.lines().count(), 9, "{text}");
        assert_eq!(parse(text.as_bytes()), entries);
    }

    #[test]
    fn a_first_format_cache_and_bad_lines_are_dropped() {
        let legacy = format!("64 1 {X} dup\r\n");
        assert!(parse(legacy.as_bytes()).is_empty());
        let text = format!(
            "{CACHE_HEADER}\n64 1 1 {X} d ok\n64 1 1 {X} d raw\rcr\n64 1 1 {X} ? what\n64 1 1 nothex d f\n64 1 1 {X} d \n"
        );
        let parsed = parse(text.as_bytes());
        assert_eq!(parsed.len(), 1);
        assert_eq!(parsed["ok"], known(X, true));
    }

    #[test]
    fn the_mark_belongs_to_the_file_not_the_path() {
        let mut cache = DigestCache::default();
        cache.remember("f", stamp(1), X.into(), true);
        // Edited in place: the same inode, still ours.
        cache.remember("f", Stamp { size: 2, ..stamp(1) }, Y.into(), false);
        assert!(cache.is_ours("f", 1));
        assert_eq!(cache.lookup("f", Stamp { size: 2, ..stamp(1) }), Some(Y.to_string()));
        assert_eq!(cache.lookup("f", stamp(1)), None, "the whole stamp must hold");
        // Saved anew by the user: another inode, theirs.
        assert!(!cache.is_ours("f", 2));
        cache.remember("f", stamp(2), X.into(), false);
        assert!(!cache.is_ours("f", 2));
        cache.remember("g", stamp(3), X.into(), false);
        assert!(!cache.is_ours("g", 3));
    }

    #[test]
    fn a_pruning_save_drops_only_what_the_census_shows_gone() {
        let dir = tempfile::tempdir().unwrap();
        let private = Dir::open(dir.path()).unwrap();
        let mut cache = DigestCache::default();
        for rel in ["a/gone", "a/kept", "a/locked/f", "b/other"] {
            cache.remember(rel, stamp(1), X.into(), true);
        }
        cache.start_census();
        cache.walked("a");
        assert!(cache.lookup("a/kept", stamp(1)).is_some());
        cache.unreadable("a/locked");
        cache.save(&private, true).unwrap();
        let text = std::fs::read_to_string(dir.path().join(FILE)).unwrap();
        let kept: Vec<&str> = text.lines().skip(1).map(|l| l.rsplit(' ').next().unwrap()).collect();
        assert_eq!(kept, ["a/kept", "a/locked/f", "b/other"], "{text}");
    }

    #[test]
    fn the_journal_replays_whole_lines_only() {
        let dir = tempfile::tempdir().unwrap();
        let private = Dir::open(dir.path()).unwrap();
        let mut cache = DigestCache::default();
        cache.delivered(&private, "whole", stamp(1), X.into()).unwrap();
        cache.delivered(&private, "longer-name", stamp(2), X.into()).unwrap();
        // A kill in the middle of the second line.
        let journal = dir.path().join(JOURNAL);
        let text = std::fs::read(&journal).unwrap();
        std::fs::write(&journal, &text[..text.len() - 6]).unwrap();
        let loaded = DigestCache::load(&private);
        assert!(loaded.is_ours("whole", 1));
        assert_eq!(loaded.entries.len(), 1, "no shortened path: {:?}", loaded.entries.keys());
    }
}
