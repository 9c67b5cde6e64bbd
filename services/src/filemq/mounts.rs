//! The mount table's two origins and how mounts share the virtual paths.
//!
//! Mounts come from the command line or config file (`Origin::Config`,
//! replaced as a whole by a reload) or from `zbroker publish` at run time
//! (`Origin::Runtime`). Run-time mounts are kept in the state directory's
//! `mounts` file ([`format`], [`parse`]), so a reload or a restart keeps
//! them; `PUBLISH` and `UNPUBLISH` change the table only once the new file
//! is saved (off the loop, `Job::SaveMounts`), one change at a time, and
//! answer the operator then.
//!
//! Overlaps: the longest alias covering a virtual path serves it, so a
//! mount whose alias lies inside another's tree (`/extra` over the `/`
//! mount's `outbox/extra/`) hides that directory. The table says so once
//! per pair (a warning naming the hidden directory) and in the status;
//! when a mount comes or goes, subscribers are told what it hid or
//! revealed at once, not at their next RESYNC.

use super::command::MountError;
use super::{cache, Filemq, Mount, Op, State, WorkFor};
use crate::{Action, Answer, CommandError, Success};
use std::collections::{HashSet, VecDeque};
use std::os::unix::ffi::{OsStrExt as _, OsStringExt as _};
use std::path::{Path, PathBuf};
use std::time::Instant;
use zbroker_proto::escape::{escape, unescape};
use zbroker_proto::vpath::{self, covers};

use super::work::{Job, MountId};

/// The file in the state directory holding the run-time mounts.
pub const FILE_NAME: &str = "mounts";
/// The format [`format`] writes and [`parse`] reads (the first line).
pub const VERSION: u32 = 1;
/// Most run-time mounts. Each watches its tree with an inotify instance of
/// its own (Linux allows 128 per user by default; beyond them a mount is
/// polled), so thousands would cost far more than they could be worth.
pub const MAX_RUNTIME: usize = 256;
/// Largest mounts file read: 256 lines of two escaped paths of 4 KiB.
const MAX_FILE_BYTES: u64 = 8 << 20;
const MAGIC: &str = "zbroker-mounts";

/// Where a mount came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// `--publish` or the config file's `publish`: a reload replaces these.
    Config,
    /// `zbroker publish`: kept in the state directory until unpublished.
    Runtime,
}

/// One run-time mount as the mounts file keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Saved {
    pub alias: String,
    pub root: PathBuf,
}

/// The mounts file's text: a version line, a comment, then one line per
/// mount, `ALIAS<TAB>DIRECTORY`, each escaped (`escape.rs`: `\\`, `\t`,
/// `\n`, `\xNN` for bytes that are not UTF-8), so any directory name
/// round-trips.
pub fn format(mounts: &[Saved]) -> Vec<u8> {
    let mut out = format!(
        "{MAGIC} {VERSION}\n\
         # Mounts added by `zbroker publish`, kept across reloads and restarts.\n\
         # The broker rewrites this file when one is published or unpublished.\n\
         # ALIAS<TAB>DIRECTORY, each escaped: \\\\ \\t \\n \\r, \\xNN for bytes that are not UTF-8.\n"
    );
    for m in mounts {
        out.push_str(&escape(m.alias.as_bytes()));
        out.push('\t');
        out.push_str(&escape(m.root.as_os_str().as_bytes()));
        out.push('\n');
    }
    out.into_bytes()
}

/// Why a mounts file's text cannot be read; one line, naming the line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FileError {
    #[error("not UTF-8 text")]
    NotUtf8,
    #[error("line {line}: expected \"{MAGIC} {VERSION}\", not {found:?}")]
    NoMagic { line: usize, found: String },
    #[error("format {0}, written by another version of zbroker (this one reads format {VERSION})")]
    Version(u32),
    #[error("line {0}: expected ALIAS<TAB>DIRECTORY")]
    NoTab(usize),
    #[error("line {line}: {text:?} is not an alias such as /photos")]
    BadAlias { line: usize, text: String },
    #[error("line {line}: {text:?} is not an absolute directory")]
    BadDirectory { line: usize, text: String },
    #[error("line {line}: {alias} is listed twice")]
    Twice { line: usize, alias: String },
    #[error("line {0}: more than {MAX_RUNTIME} mounts")]
    TooMany(usize),
}

/// Why the mounts file could not be loaded (the path shown escaped).
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{}: {source}", shown(.path))]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{}: larger than {MAX_FILE_BYTES} bytes", shown(.0))]
    TooLarge(PathBuf),
    #[error("{}: {source}", shown(.path))]
    Format { path: PathBuf, source: FileError },
}

/// Why the mounts file could not be saved.
#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    #[error("cannot save {}: {source}", shown(.path))]
    Io { path: PathBuf, source: std::io::Error },
    /// The save job panicked (a bug, answered rather than fatal).
    #[error("saving the mounts failed: {0}")]
    Panicked(String),
}

/// Reads what [`format`] wrote.
pub fn parse(bytes: &[u8]) -> Result<Vec<Saved>, FileError> {
    let text = std::str::from_utf8(bytes).map_err(|_| FileError::NotUtf8)?;
    let mut lines = text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty() && !l.starts_with('#'));
    let version = match lines.next() {
        None => return Ok(Vec::new()),
        Some((index, first)) => first
            .strip_prefix(MAGIC)
            .and_then(|v| v.trim().parse::<u32>().ok())
            .ok_or_else(|| FileError::NoMagic { line: index + 1, found: first.to_string() })?,
    };
    if version != VERSION {
        return Err(FileError::Version(version));
    }
    let mut mounts: Vec<Saved> = Vec::new();
    for (index, line) in lines {
        let line_no = index + 1;
        let (alias, root) = line.split_once('\t').ok_or(FileError::NoTab(line_no))?;
        let alias = unescape(alias)
            .and_then(|a| String::from_utf8(a).ok())
            .and_then(|a| vpath::normalise(&a).ok().filter(|n| *n == a))
            .ok_or_else(|| FileError::BadAlias { line: line_no, text: alias.to_string() })?;
        let root = unescape(root)
            .map(|r| PathBuf::from(std::ffi::OsString::from_vec(r)))
            .filter(|r| r.is_absolute())
            .ok_or_else(|| FileError::BadDirectory { line: line_no, text: root.to_string() })?;
        if mounts.iter().any(|m| m.alias == alias) {
            return Err(FileError::Twice { line: line_no, alias });
        }
        if mounts.len() == MAX_RUNTIME {
            return Err(FileError::TooMany(line_no));
        }
        mounts.push(Saved { alias, root });
    }
    Ok(mounts)
}

/// The run-time mounts kept at `path` (none if there is no file yet).
pub fn load(path: &Path) -> Result<Vec<Saved>, LoadError> {
    use std::io::Read as _;
    let io = |source| LoadError::Io { path: path.to_path_buf(), source };
    let file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(e)),
    };
    let mut bytes = Vec::new();
    file.take(MAX_FILE_BYTES + 1).read_to_end(&mut bytes).map_err(io)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(LoadError::TooLarge(path.to_path_buf()));
    }
    parse(&bytes).map_err(|source| LoadError::Format { path: path.to_path_buf(), source })
}

/// Replaces the file at `path` with `contents`, whole
/// (`replace::replace_file`).
pub fn save(path: &Path, contents: &[u8]) -> Result<(), SaveError> {
    crate::replace::replace_file(path, |out| out.write_all(contents))
        .map_err(|source| SaveError::Io { path: path.to_path_buf(), source })
}

/// A change to the run-time mounts an operator asked for.
#[derive(Debug, Clone)]
pub(super) enum Change {
    Publish { root: PathBuf, alias: String },
    Unpublish { alias: String },
}

/// Run-time changes waiting for their turn, the one being saved, and the
/// overlaps already warned of.
#[derive(Default)]
pub(super) struct Runtime {
    queue: VecDeque<(u64, Change)>,
    saving: Option<(u64, Change)>,
    /// (outer, inner) mounts whose overlap has been logged.
    warned: HashSet<(MountId, MountId)>,
}

/// A directory as the operator reads it (escaped, as the mounts file has it).
pub(super) fn shown(path: &Path) -> String {
    escape(path.as_os_str().as_bytes())
}

impl Filemq {
    /// `PUBLISH` and `UNPUBLISH` from the control endpoint: queued, then
    /// carried out one at a time, each once the mounts file says so.
    pub(super) fn runtime_command(
        &mut self,
        request: u64,
        change: Change,
        now: Instant,
        out: &mut Vec<Action>,
    ) -> Answer {
        self.runtime.queue.push_back((request, change));
        self.next_change(now, out);
        Answer::Later
    }

    /// Starts the next queued change: refused at once if it cannot be
    /// done, else the new mounts file is saved and the change waits for it.
    fn next_change(&mut self, now: Instant, out: &mut Vec<Action>) {
        while self.runtime.saving.is_none() {
            let Some((request, change)) = self.runtime.queue.pop_front() else { return };
            let change = match self.check_change(&change) {
                Ok(change) => change,
                Err(why) => {
                    out.push(Action::Reply { request, result: Err(CommandError::new(why)) });
                    continue;
                }
            };
            let mut list = self.runtime_mounts();
            match &change {
                Change::Publish { root, alias } => {
                    list.push(Saved { alias: alias.clone(), root: root.clone() })
                }
                Change::Unpublish { alias } => list.retain(|m| m.alias != *alias),
            }
            let Some(path) = self.mounts_file() else {
                // Only a host without a state directory (a test) gets here:
                // the broker takes no control command without one.
                let result = self
                    .carry_out(change, now, out)
                    .map(|done| Success {
                        text: format!("{} (not kept: no state directory)", done.text),
                        ..done
                    })
                    .map_err(CommandError::new);
                out.push(Action::Reply { request, result });
                continue;
            };
            self.runtime.saving = Some((request, change));
            self.work(out, WorkFor::SaveMounts, Job::SaveMounts { path, contents: format(&list) });
        }
    }

    /// The change, normalised, if it can be carried out on the table as
    /// it is; else why not.
    fn check_change(&self, change: &Change) -> Result<Change, MountError> {
        match change {
            Change::Publish { root, alias } => {
                let normal = vpath::normalise(alias).map_err(|_| MountError::BadAlias(alias.clone()))?;
                if !root.is_absolute() {
                    return Err(MountError::NotAbsolute(root.clone()));
                }
                if let Some(m) = self.mounts.values().find(|m| m.alias == normal) {
                    return Err(MountError::AliasTaken { alias: normal, root: m.root.clone() });
                }
                if self.mounts.values().filter(|m| m.origin == Origin::Runtime).count() >= MAX_RUNTIME {
                    return Err(MountError::TooManyRuntime);
                }
                Ok(Change::Publish { root: root.clone(), alias: normal })
            }
            Change::Unpublish { alias } => {
                let normal = vpath::normalise(alias).ok().unwrap_or_else(|| alias.clone());
                match self.mounts.values().find(|m| m.alias == normal) {
                    None => Err(MountError::UnknownAlias(alias.clone())),
                    Some(m) if m.origin == Origin::Config => {
                        Err(MountError::NotRuntime { alias: normal, root: m.root.clone() })
                    }
                    Some(_) => Ok(Change::Unpublish { alias: normal }),
                }
            }
        }
    }

    /// Applies a checked change to the table.
    fn carry_out(
        &mut self,
        change: Change,
        now: Instant,
        out: &mut Vec<Action>,
    ) -> Result<Success, MountError> {
        match change {
            Change::Publish { root, alias } => {
                let text = format!("publishing {} as {alias}", shown(&root));
                let details = serde_json::json!({ "alias": alias, "root": shown(&root) });
                self.publish_as(root, &alias, Origin::Runtime, now, out)?;
                Ok(Success::text(text).with_details(details))
            }
            Change::Unpublish { alias } => {
                let root = self.mounts.values().find(|m| m.alias == alias).map(|m| shown(&m.root));
                self.unpublish(&alias, out)?;
                let root = root.unwrap_or_default();
                let text = format!("no longer publishing {root} as {alias}");
                Ok(Success::text(text).with_details(serde_json::json!({ "alias": alias, "root": root })))
            }
        }
    }

    /// The outcome of `Job::SaveMounts`: the change is carried out (or
    /// not) and answered, and the next one starts.
    pub(super) fn mounts_saved(
        &mut self,
        result: Result<(), SaveError>,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        let Some((request, change)) = self.runtime.saving.take() else { return };
        let result = match result {
            // Checked when the save began; nothing else changes the
            // run-time mounts meanwhile.
            Ok(()) => self.carry_out(change, now, out).map(|done| {
                let file = self.mounts_file().map(|f| shown(&f)).unwrap_or_default();
                Success { text: format!("{} (kept in {file})", done.text), ..done }
            }),
            Err(why) => {
                tracing::error!("filemq: {why}");
                Err(MountError::SaveFailed(why))
            }
        };
        out.push(Action::Reply { request, result: result.map_err(CommandError::new) });
        self.next_change(now, out);
    }

    /// The directory of the run-time mount at `alias`, or of the one being
    /// saved there: a reloaded config may not take its alias.
    pub(super) fn runtime_holder(&self, alias: &str) -> Option<PathBuf> {
        if let Some((_, Change::Publish { root, alias: saving })) = &self.runtime.saving {
            if saving == alias {
                return Some(root.clone());
            }
        }
        self.mounts.values().find(|m| m.origin == Origin::Runtime && m.alias == alias).map(|m| m.root.clone())
    }

    /// Where the run-time mounts are kept.
    fn mounts_file(&self) -> Option<PathBuf> {
        self.config.state_dir.as_ref().map(|dir| dir.join(FILE_NAME))
    }

    /// The run-time mounts now, in the order they were published.
    pub fn runtime_mounts(&self) -> Vec<Saved> {
        self.mounts
            .values()
            .filter(|m| m.origin == Origin::Runtime)
            .map(|m| Saved { alias: m.alias.clone(), root: m.root.clone() })
            .collect()
    }

    /// The aliases of the mounts that lie inside mount `id`'s tree: under
    /// them, `id` serves nothing (usually none, so a scan's changes are
    /// checked against a short list, not every mount).
    pub(super) fn nested_in(&self, id: MountId) -> Vec<String> {
        let Some(alias) = self.mounts.get(&id).map(|m| &m.alias) else { return Vec::new() };
        self.mounts
            .iter()
            .filter(|(other, m)| **other != id && covers(alias, &m.alias))
            .map(|(_, m)| m.alias.clone())
            .collect()
    }

    /// Logs, once per pair, each mount of which `id` hides files (or that
    /// hides files of `id`): the longest alias wins, and an operator who
    /// published `/extra` over a tree holding `extra/` should know.
    pub(super) fn warn_of_overlaps(&mut self, id: MountId) {
        let Some(this) = self.mounts.get(&id) else { return };
        let mut found = Vec::new();
        for (other_id, other) in &self.mounts {
            let (outer_id, outer, inner_id, inner) = if covers(&other.alias, &this.alias) {
                (*other_id, other, id, this)
            } else if covers(&this.alias, &other.alias) {
                (id, this, *other_id, other)
            } else {
                continue;
            };
            if outer_id == inner_id || self.runtime.warned.contains(&(outer_id, inner_id)) {
                continue;
            }
            let rel = vpath::relative(&outer.alias, &inner.alias).to_string();
            if !outer.snapshot.has_under(&rel) {
                continue;
            }
            let files = hidden_count(outer, &rel);
            tracing::warn!(
                "filemq: {} ({}) hides {} of the mount {}: {files} file(s) there are not published \
                 (the longest alias serves the paths under it)",
                inner.alias,
                shown(&inner.root),
                shown(&outer.root.join(&rel)),
                outer.alias
            );
            found.push((outer_id, inner_id));
        }
        self.runtime.warned.extend(found);
    }

    /// Forgets the warnings about a mount that is gone.
    pub(super) fn forget_overlaps(&mut self, id: MountId) {
        self.runtime.warned.retain(|(outer, inner)| *outer != id && *inner != id);
    }

    /// A mount that may serve files under `path` has not been read since
    /// the broker started (a kept run-time mount whose directory is
    /// missing): what it publishes is unknown, so no file there may be
    /// taken as deleted. Its deletes wait for a RESYNC once it is read.
    pub(super) fn unread_under(&self, path: &str) -> bool {
        self.overlapping(path).any(|m| !m.scanned && m.error.is_some())
    }

    /// A mount's first scan is in: what it hides of the mounts around it
    /// is no longer published, so subscribers holding those files are sent
    /// deletes now (a zbroker client deletes only what it delivered).
    pub(super) fn announce_hidden(&mut self, id: MountId) {
        let Some(alias) = self.mounts.get(&id).map(|m| m.alias.clone()) else { return };
        if !self.mounts.iter().any(|(other, m)| *other != id && covers(&m.alias, &alias))
            || self.unread_under(&alias)
        {
            return;
        }
        let ids: Vec<_> = self.conns.keys().copied().collect();
        for conn_id in ids {
            self.announce_hidden_to(conn_id, &alias);
        }
    }

    /// `announce_hidden` for one connection (later, if a RESYNC of it is
    /// being walked: what it holds is with the walk).
    pub(super) fn announce_hidden_to(&mut self, conn_id: crate::ConnId, alias: &str) {
        let Some(conn) = self.conns.get_mut(&conn_id) else { return };
        if conn.state != State::Ready {
            return;
        }
        if conn.held.walking.is_some() {
            return conn.held.owed.push(cache::Owed::Hidden(alias.to_string()));
        }
        let Some(conn) = self.conns.get(&conn_id) else { return };
        let gone: Vec<String> = cache::under(&conn.known, alias)
            .map(|(vpath, _)| vpath)
            .filter(|vpath| conn.wants(vpath, None) && !conn.ops.contains_key(*vpath))
            .filter(|vpath| self.published(vpath).is_none())
            .cloned()
            .collect();
        if let Some(conn) = self.conns.get_mut(&conn_id) {
            for vpath in gone {
                conn.enqueue(&vpath, Op::Delete);
            }
        }
    }

    /// A mount at `alias` is gone: what it hid of the mounts around it is
    /// published again, and subscribers are sent it now.
    pub(super) fn announce_revealed(&mut self, alias: &str) {
        if !self.mounts.values().any(|m| covers(&m.alias, alias)) {
            return;
        }
        let ids: Vec<_> = self.conns.keys().copied().collect();
        for conn_id in ids {
            self.announce_revealed_to(conn_id, alias);
        }
    }

    /// `announce_revealed` for one connection (later, if a RESYNC of it
    /// is being walked).
    pub(super) fn announce_revealed_to(&mut self, conn_id: crate::ConnId, alias: &str) {
        let Some(conn) = self.conns.get_mut(&conn_id).filter(|c| c.state == State::Ready) else { return };
        if conn.held.walking.is_some() {
            return conn.held.owed.push(cache::Owed::Revealed(alias.to_string()));
        }
        let Some(conn) = self.conns.get(&conn_id) else { return };
        // What this connection sees of it, as a RESYNC would say.
        let revealed = self.published_under(alias, conn);
        let Some(conn) = self.conns.get_mut(&conn_id) else { return };
        for (vpath, want) in revealed {
            let held = conn.known.get(&vpath);
            let lacks = match want {
                Some(want) => held != Some(&want),
                None => held.is_some(),
            };
            if lacks && conn.wants(&vpath, None) {
                conn.enqueue(&vpath, Op::Create);
            }
        }
    }

    /// A mount for the status: where it comes from and what it hides.
    pub(super) fn mount_status(&self, id: MountId, m: &Mount) -> serde_json::Value {
        let hides: Vec<_> = self
            .mounts
            .iter()
            .filter(|(other, o)| **other != id && covers(&o.alias, &m.alias))
            .map(|(_, outer)| {
                let rel = vpath::relative(&outer.alias, &m.alias).to_string();
                serde_json::json!({
                    "alias": outer.alias,
                    "dir": shown(&outer.root.join(&rel)),
                    "files": hidden_count(outer, &rel),
                })
            })
            .collect();
        serde_json::json!({
            "alias": m.alias,
            "root": shown(&m.root),
            "origin": match m.origin { Origin::Config => "config", Origin::Runtime => "runtime" },
            "files": m.counts.0,
            "directories": m.counts.1,
            "links": m.counts.2,
            "bytes": m.total_bytes,
            "scanned": m.scanned,
            "watching": m.watching,
            "error": m.error,
            "hides": hides,
        })
    }
}

/// How many of `outer`'s files lie under its relative directory `rel`.
fn hidden_count(outer: &Mount, rel: &str) -> usize {
    let dir = format!("{rel}/");
    let under = outer
        .snapshot
        .files
        .range(dir.clone()..)
        .take_while(|(k, _)| k.starts_with(&dir))
        .filter(|(_, m)| m.is_file());
    under.count() + usize::from(outer.snapshot.files.get(rel).is_some_and(|m| m.is_file()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_file_round_trips_any_directory_name() {
        let odd = PathBuf::from(std::ffi::OsString::from_vec(b"/srv/caf\xe9\tx\n\\y".to_vec()));
        let mounts = vec![
            Saved { alias: "/photos".into(), root: "/srv/photos".into() },
            Saved { alias: "/odd".into(), root: odd },
        ];
        let bytes = format(&mounts);
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert!(text.starts_with("zbroker-mounts 1\n"), "{text}");
        assert!(text.contains("/odd\t/srv/caf\\xe9\\tx\\n\\\\y\n"), "{text}");
        assert_eq!(parse(&bytes).unwrap(), mounts);
        assert_eq!(parse(b"").unwrap(), Vec::new());
    }

    #[test]
    fn a_bad_file_is_one_line_naming_the_line() {
        let bad = |text: &str| parse(text.as_bytes()).unwrap_err().to_string();
        assert_eq!(
            bad("zbroker-mounts 2\n"),
            "format 2, written by another version of zbroker (this one reads format 1)"
        );
        assert!(bad("hello\n").starts_with("line 1: expected \"zbroker-mounts 1\""));
        assert!(bad("zbroker-mounts 1\n/a /srv/a\n").starts_with("line 2: expected ALIAS<TAB>DIRECTORY"));
        assert!(bad("zbroker-mounts 1\nphotos\t/srv\n").contains("is not an alias"));
        assert!(bad("zbroker-mounts 1\n/a/../b\t/srv\n").contains("is not an alias"));
        assert!(bad("zbroker-mounts 1\n/a\tsrv/a\n").contains("is not an absolute directory"));
        assert!(bad("zbroker-mounts 1\n/a\t/srv/\\q\n").contains("is not an absolute directory"));
        assert_eq!(bad("zbroker-mounts 1\n/a\t/x\n# c\n/a\t/y\n"), "line 4: /a is listed twice");
        let many: String = (0..=MAX_RUNTIME).map(|i| format!("/m{i}\t/srv/{i}\n")).collect();
        assert!(bad(&format!("zbroker-mounts 1\n{many}")).contains("more than 256 mounts"));
        for e in [bad("zbroker-mounts 1\n/a\t/x\n\n/a\t/y\n"), bad("\u{1}")] {
            assert!(!e.contains('\n'), "{e}");
        }
    }

    #[test]
    fn save_replaces_the_file_whole_and_load_reads_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        assert_eq!(load(&path).unwrap(), Vec::new(), "no file yet: no mounts");
        let one = vec![Saved { alias: "/a".into(), root: "/srv/a".into() }];
        save(&path, &format(&one)).unwrap();
        assert_eq!(load(&path).unwrap(), one);
        save(&path, &format(&[])).unwrap();
        assert_eq!(load(&path).unwrap(), Vec::new());
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from(FILE_NAME)], "no temporary file left");
        let e = save(&dir.path().join("missing/mounts"), b"x").unwrap_err().to_string();
        assert!(e.starts_with("cannot save ") && e.contains("missing/mounts"), "{e}");
    }

    proptest! {
        #[test]
        fn any_list_round_trips(
            entries in proptest::collection::btree_map(
                "/[a-z]{1,8}(/[a-z=]{1,4})?",
                proptest::collection::vec(any::<u8>().prop_filter("no NUL", |b| *b != 0), 1..24),
                0..8,
            )
        ) {
            let mounts: Vec<Saved> = entries
                .into_iter()
                .map(|(alias, mut root)| {
                    root.insert(0, b'/');
                    Saved { alias, root: PathBuf::from(std::ffi::OsString::from_vec(root)) }
                })
                .collect();
            prop_assert_eq!(parse(&format(&mounts)).unwrap(), mounts);
        }
    }
}
