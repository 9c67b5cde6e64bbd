//! The inbox's digest cache, `.filemq/digests`: what each file held is
//! known to contain (so a restart does not rehash the tree) and whether
//! this subscriber wrote it (so that deletes touch only our own files).
//!
//! ```text
//! filemq-digests 2
//! SIZE MTIME_NS DIGEST MARK PATH
//! ```
//!
//! `MARK` is `d` for a file we delivered, `-` for one we only found in the
//! inbox. Each delivery is also appended at once to `.filemq/digests.log`
//! (lines of the same form), which the next load replays and the next save
//! empties: a subscriber killed between two saves still knows which files
//! it wrote. `PATH` is inbox-relative and written with [`crate::escape`], so
//! that no name (a newline, a carriage return, a backslash in it) can
//! break, forge or shadow a line: a line that does not read back exactly
//! is dropped, and that file is simply hashed again. A cache in the first
//! format (no header line) is dropped whole: it did not say which files
//! were ours, and it could be confused by names ending in CR.

use super::dirfd::Dir;
use super::inbox::parse_digest;
use crate::escape::{escape, unescape};
use std::collections::{HashMap, HashSet};
use std::io::{self, Read, Write};

const HEADER: &str = "filemq-digests 2";
const FILE: &str = "digests";
const NEW_FILE: &str = "digests.new";
const JOURNAL: &str = "digests.log";

/// A digest known for a file of a given size and modification time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Known {
    pub size: u64,
    pub mtime_ns: i128,
    /// Upper-case hex SHA-1.
    pub digest: String,
    /// This subscriber delivered the file at this path.
    pub ours: bool,
}

#[derive(Debug, Default)]
pub(crate) struct DigestCache {
    entries: HashMap<String, Known>,
    /// Paths met since the census started.
    seen: HashSet<String>,
    dirty: bool,
    /// `digests.log`, open for appending once a delivery is recorded.
    journal: Option<std::fs::File>,
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
        // A torn last line (a kill mid-write) simply does not parse.
        let replayed = journal.split(|&b| b == b'\n').filter_map(parse_line).count();
        for (rel, known) in journal.split(|&b| b == b'\n').filter_map(parse_line) {
            entries.insert(rel, known);
        }
        DigestCache { entries, dirty: replayed > 0, ..DigestCache::default() }
    }

    /// Records a file we delivered, durably: the journal line is written
    /// before this returns.
    pub fn delivered(
        &mut self,
        private: &Dir,
        rel: &str,
        size: u64,
        mtime_ns: i128,
        digest: String,
    ) -> io::Result<()> {
        let line = line(rel, &Known { size, mtime_ns, digest: digest.clone(), ours: true });
        self.remember(rel, size, mtime_ns, digest, true);
        if self.journal.is_none() {
            self.journal =
                Some(private.open_file(JOURNAL, libc::O_WRONLY | libc::O_APPEND | libc::O_CREAT, 0o600)?);
        }
        if let Some(journal) = &mut self.journal {
            journal.write_all(line.as_bytes())?;
        }
        Ok(())
    }

    /// The digest of `rel` if the cache knows it for this size and mtime;
    /// counts `rel` as met by the census.
    pub fn lookup(&mut self, rel: &str, size: u64, mtime_ns: i128) -> Option<String> {
        let known = self.entries.get(rel).filter(|k| k.size == size && k.mtime_ns == mtime_ns)?;
        self.seen.insert(rel.to_string());
        Some(known.digest.clone())
    }

    /// Records what `rel` holds. `ours` marks a delivery; a file found in
    /// the inbox keeps the mark it had (a mirrored file edited in place is
    /// still the mirror's).
    pub fn remember(&mut self, rel: &str, size: u64, mtime_ns: i128, digest: String, ours: bool) {
        let ours = ours || self.is_ours(rel);
        self.entries.insert(rel.to_string(), Known { size, mtime_ns, digest, ours });
        self.seen.insert(rel.to_string());
        self.dirty = true;
    }

    /// True if this subscriber delivered the file at `rel`.
    pub fn is_ours(&self, rel: &str) -> bool {
        self.entries.get(rel).is_some_and(|k| k.ours)
    }

    pub fn forget(&mut self, rel: &str) {
        if self.entries.remove(rel).is_some() {
            self.dirty = true;
        }
    }

    /// Starts a census: entries that [`DigestCache::lookup`] or
    /// [`DigestCache::remember`] meet from now on are the ones a pruning
    /// save keeps.
    pub fn start_census(&mut self) {
        self.seen.clear();
    }

    /// Writes the cache if it changed (a new file, then a rename over the
    /// old one; neither follows a symlink). With `prune`, entries not met
    /// since the census started (files no longer there) go.
    pub fn save(&mut self, private: &Dir, prune: bool) -> io::Result<()> {
        if prune {
            let before = self.entries.len();
            let seen = &self.seen;
            self.entries.retain(|rel, _| seen.contains(rel));
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
    let mut text = format!("{HEADER}\n");
    for (rel, k) in sorted {
        text.push_str(&line(rel, k));
    }
    text
}

/// One entry as a line of the cache or the journal.
fn line(rel: &str, k: &Known) -> String {
    let mark = if k.ours { 'd' } else { '-' };
    format!("{} {} {} {mark} {}\n", k.size, k.mtime_ns, k.digest, escape(rel.as_bytes()))
}

fn parse(text: &[u8]) -> HashMap<String, Known> {
    let mut entries = HashMap::new();
    let mut lines = text.split(|&b| b == b'\n');
    if lines.next() != Some(HEADER.as_bytes()) {
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
    let line = std::str::from_utf8(line).ok()?;
    let mut fields = line.splitn(5, ' ');
    let size = fields.next()?.parse().ok()?;
    let mtime_ns = fields.next()?.parse().ok()?;
    let digest = parse_digest(fields.next()?.as_bytes())?;
    let ours = match fields.next()? {
        "d" => true,
        "-" => false,
        _ => return None,
    };
    let rel = String::from_utf8(unescape(fields.next()?)?).ok()?;
    (!rel.is_empty()).then_some((rel, Known { size, mtime_ns, digest, ours }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const X: &str = "0123456789ABCDEF0123456789ABCDEF01234567";
    const Y: &str = "89ABCDEF0123456789ABCDEF0123456789ABCDEF";

    fn known(digest: &str, ours: bool) -> Known {
        Known { size: 64, mtime_ns: 1, digest: digest.into(), ours }
    }

    #[test]
    fn no_name_can_confuse_another() {
        let mut entries = HashMap::new();
        entries.insert("dup".to_string(), known(X, true));
        entries.insert("dup\r".to_string(), known(Y, false));
        entries
            .insert("x\n1 1 89ABCDEF0123456789ABCDEF0123456789ABCDEF d forged".to_string(), known(Y, false));
        entries.insert("back\\slash and space".to_string(), known(X, false));
        let text = render(&entries);
        assert_eq!(text.lines().count(), 5, "{text}");
        assert_eq!(parse(text.as_bytes()), entries);
    }

    #[test]
    fn a_first_format_cache_and_bad_lines_are_dropped() {
        let legacy = format!("64 1 {X} dup\r\n");
        assert!(parse(legacy.as_bytes()).is_empty());
        let text = format!(
            "{HEADER}\n64 1 {X} d ok\n64 1 {X} d raw\rcr\n64 1 {X} ? what\n64 1 nothex d f\n64 1 {X} d \n"
        );
        let parsed = parse(text.as_bytes());
        assert_eq!(parsed.len(), 1);
        assert_eq!(parsed["ok"], known(X, true));
    }

    #[test]
    fn the_mark_survives_a_rehash_of_an_edited_file() {
        let mut cache = DigestCache::default();
        cache.remember("f", 1, 1, X.into(), true);
        cache.remember("f", 2, 2, Y.into(), false);
        assert!(cache.is_ours("f"));
        cache.remember("g", 1, 1, X.into(), false);
        assert!(!cache.is_ours("g"));
        assert_eq!(cache.lookup("f", 2, 2), Some(Y.to_string()));
        assert_eq!(cache.lookup("f", 1, 1), None, "size and mtime must both hold");
    }
}
