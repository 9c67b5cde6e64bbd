//! A subscriber's ICANHAZ cache, bounded per pass of the event loop.
//!
//! A legitimate cache lists every file the client holds: up to a million
//! entries (`ceiling::CACHE_ENTRIES`), a frame of 60 MB or more. Decoding
//! it, normalising a million names and finding which of them are no
//! longer published takes about a second, which must not be one pass of
//! the loop (every pipe would stall with it). So a large ICANHAZ becomes a
//! [`Job::Icanhaz`] run on a worker thread ([`prepare`]); the connection's
//! later frames wait in order behind it (bounded) and are handled once its
//! outcome is in — zproto's "queue it if it cannot be handled now". Small
//! ones are handled at once, as before.

use super::work::{Done, Job, MountView, PrepareError, Prepared};
use super::{ConnId, Filemq, WorkFor};
use crate::Action;
use bytes::Bytes;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;
use zbroker_proto::codec::{Ceiling, Field as _, FieldError, Hash, LongStr, Reader, ShortStr};
use zbroker_proto::digest::Digest;
use zbroker_proto::filemq::{self, ceiling, FilemqMsg};
use zbroker_proto::filemq_ext::{parse_cache_value, Attrs, EntryKind, PERMISSIONS};
use zbroker_proto::vpath::{self, covers, join};

/// ICANHAZ frames up to this size are handled on the loop (a few hundred
/// entries: tens of microseconds, so even a full pass of such frames is
/// a few megabytes of decoding); larger ones off it.
pub const INLINE_BYTES: usize = 16 << 10;
/// Service-wide, caches being prepared off the loop at once: the read
/// threads also serve every subscriber's chunks.
pub const MAX_PREPARING_JOBS: usize = 2;
/// Service-wide, bytes of ICANHAZ frames being prepared plus frames held
/// behind them. Past this or `MAX_PREPARING_JOBS`, a large ICANHAZ (or a
/// frame to hold) is answered RTFM "busy" and its connection forgotten:
/// the client reconnects with backoff and subscribes again.
pub const MAX_PREPARING_BYTES: usize = 256 << 20;
const BUSY: &str = "busy: subscribe again later";
/// Frames a connection may send while its cache is prepared, and their
/// bytes (one more ICANHAZ of the largest size): past either, it is
/// refused (SRSLY) and forgotten.
pub const MAX_HELD_FRAMES: usize = 64;
pub const MAX_HELD_BYTES: usize = filemq::MAX_CLIENT_MESSAGE;

/// What a client holds at a path: a digest and, from a client with
/// attributes (`filemq_ext::META`), what the entry is and its
/// attributes. Packed (32 bytes): a million of them are a client's cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Holding {
    pub digest: Digest,
    mtime_ns: i64,
    mode: u16,
    /// 0: no attributes known; else 1 + `EntryKind` as listed.
    kind: u8,
}

impl Holding {
    /// A digest alone, as the original wire's cache says it.
    pub fn plain(digest: Digest) -> Holding {
        Holding { digest, mtime_ns: 0, mode: 0, kind: 0 }
    }

    pub fn with(digest: Digest, kind: EntryKind, attrs: Attrs) -> Holding {
        let kind = match kind {
            EntryKind::File => 1,
            EntryKind::Dir => 2,
            EntryKind::Link => 3,
        };
        let mode = (attrs.mode & PERMISSIONS) as u16;
        Holding { digest, mtime_ns: attrs.mtime_ns, mode, kind }
    }

    /// What the entry is and its attributes, if the client said.
    pub fn attrs(&self) -> Option<(EntryKind, Attrs)> {
        let kind = match self.kind {
            1 => EntryKind::File,
            2 => EntryKind::Dir,
            3 => EntryKind::Link,
            _ => return None,
        };
        Some((kind, Attrs { mode: u32::from(self.mode), mtime_ns: self.mtime_ns }))
    }
}

/// One cache entry as what the client holds under `path`: its virtual
/// path and what it holds there, unless its name or value is bad or it
/// lies outside.
fn entry(path: &str, key: &ShortStr, value: &LongStr) -> Option<(String, Holding)> {
    let key = std::str::from_utf8(key.as_bytes()).ok()?;
    let (digest, attrs) = parse_cache_value(value.as_bytes())?;
    let digest = match attrs {
        Some((kind, attrs)) => Holding::with(digest, kind, attrs),
        None => Holding::plain(digest),
    };
    let vpath = if key.starts_with('/') { key.to_string() } else { join(path, key) };
    let vpath = vpath::normalise(&vpath).ok().filter(|v| covers(path, v))?;
    Some((vpath, digest))
}

/// The client's cache as what it holds under `path`.
pub fn normalise(path: &str, cache: &Hash) -> BTreeMap<String, Holding> {
    cache.0.iter().filter_map(|(key, value)| entry(path, key, value)).collect()
}

/// Is `vpath` published by `mounts` (the longest alias covering it
/// serves it)? The same rule as `Filemq::published`, over a copy.
pub(super) fn served(mounts: &[MountView], vpath: &str) -> bool {
    let Some(mount) =
        mounts.iter().filter(|m| covers(&m.alias, vpath) && vpath != m.alias).max_by_key(|m| m.alias.len())
    else {
        return false;
    };
    let rel = if mount.alias == "/" { &vpath[1..] } else { &vpath[mount.alias.len() + 1..] };
    mount.snapshot.files.contains_key(rel)
}

/// The work of [`Job::Icanhaz`]: decode the frame, normalise its cache
/// and, with RESYNC, list the cached files `mounts` do not publish. The
/// cache is read entry by entry into the service's own form, never held
/// whole as a decoded `Hash` as well.
pub fn prepare(frame: Bytes, mounts: &[MountView]) -> Result<Box<Prepared>, PrepareError> {
    let malformed = |field: &'static str, error: FieldError| PrepareError::Malformed { field, error };
    // The fields and ceilings of `FilemqMsg::Icanhaz`, in order (the
    // tests check that this agrees with `FilemqMsg::decode`).
    let mut r = Reader::new(frame.slice(3..));
    let path = LongStr::get_within(&mut r, Ceiling::NONE).map_err(|e| malformed("path", e))?;
    let options =
        Hash::get_within(&mut r, Ceiling::NONE.with(ceiling::OPTIONS_ENTRIES, ceiling::OPTIONS_BYTES))
            .map_err(|e| malformed("options", e))?;
    let normal = std::str::from_utf8(path.as_bytes()).ok().and_then(|p| vpath::normalise(p).ok());
    let cache_ceiling = Ceiling::NONE.with(ceiling::CACHE_ENTRIES, ceiling::CACHE_BYTES);
    let known = Hash::visit_within(
        &mut r,
        cache_ceiling,
        |_| BTreeMap::new(),
        |known, key, value| {
            if let Some((vpath, digest)) = normal.as_deref().and_then(|p| entry(p, &key, &value)) {
                known.insert(vpath, digest);
            }
        },
    )
    .map_err(|e| malformed("cache", e))?;
    drop(frame);
    let resync = options.get(zbroker_proto::filemq::ext::RESYNC).is_some_and(|v| v.as_bytes() == b"1");
    let stale = match &normal {
        Some(p) if resync => {
            let ready = mounts.iter().filter(|m| covers(p, &m.alias) || covers(&m.alias, p)).all(|m| m.ready);
            ready.then(|| known.keys().filter(|v| !served(mounts, v)).cloned().collect())
        }
        _ => None,
    };
    Ok(Box::new(Prepared { path, options, known, stale }))
}

#[cfg(test)]
thread_local! {
    /// Entries of a connection's `known` map walked on this thread (tests
    /// count the loop's work with it).
    pub static WALKED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

fn walked(_n: usize) {
    #[cfg(test)]
    WALKED.with(|w| w.set(w.get() + _n));
}

/// The entries of `known` under subscription path `path` (the ones
/// `covers(path, _)`), found by key range: the cost is that of the
/// entries under the path, never of the whole map. Keys that share the
/// path's characters but not its directory ("/a-b" beside "/a/x") sort
/// outside `[path/, path0)`, '0' being the character after '/'.
pub(super) fn under<'a>(
    known: &'a BTreeMap<String, Holding>,
    path: &str,
) -> impl Iterator<Item = (&'a String, &'a Holding)> + 'a {
    use std::ops::Bound::{Excluded, Included};
    let (exact, lo, hi) = if path == "/" {
        (None, "/".to_string(), "0".to_string())
    } else {
        (known.get_key_value(path), format!("{path}/"), format!("{path}0"))
    };
    let range = known.range::<str, _>((Included(lo.as_str()), Excluded(hi.as_str())));
    exact.into_iter().chain(range).inspect(|_| walked(1))
}

/// Removes the entries of `known` under `path` (at the cost of those).
pub(super) fn remove_under(known: &mut BTreeMap<String, Holding>, path: &str) -> Vec<String> {
    let keys: Vec<String> = under(known, path).map(|(k, _)| k.clone()).collect();
    for key in &keys {
        known.remove(key);
    }
    keys
}

/// Adds `new` to `known` (replacing equal keys), inserting the smaller
/// map into the larger: a small cache costs its own entries, not a pass
/// over a large one. (Two large maps still cost the smaller on the loop.)
pub(super) fn merge(known: &mut BTreeMap<String, Holding>, mut new: BTreeMap<String, Holding>) {
    if new.len() > known.len() {
        // The new entries win: the old ones go in only where absent.
        std::mem::swap(known, &mut new);
        walked(new.len());
        for (k, v) in std::mem::take(&mut new) {
            known.entry(k).or_insert(v);
        }
    } else {
        walked(new.len());
        known.extend(new);
    }
}

/// Holdings this large are freed on a worker thread, not on the loop.
const DISCARD_OFF_LOOP: usize = 10_000;

/// Frees what a connection knew: a large map off the loop.
pub(super) fn discard(known: BTreeMap<String, Holding>, out: &mut Vec<Action>) {
    if known.len() >= DISCARD_OFF_LOOP {
        // Nobody waits for its outcome: any key will do.
        out.push(Action::Work {
            key: u64::MAX,
            job: Box::new(Job::Discard(super::work::Garbage(known, Vec::new()))),
        });
    }
}

/// Frees a prepared cache that will not be used (its connection is gone,
/// the outcome is stale, or the subscription was refused): off the loop
/// if large.
pub(super) fn discard_prepared(prepared: Prepared, out: &mut Vec<Action>) {
    let stale = prepared.stale.unwrap_or_default();
    if prepared.known.len() + stale.len() >= DISCARD_OFF_LOOP {
        let garbage = super::work::Garbage(prepared.known, stale);
        out.push(Action::Work { key: u64::MAX, job: Box::new(Job::Discard(garbage)) });
    }
}

/// Frees a stale list off the loop if large.
pub(super) fn discard_names(names: Vec<String>, out: &mut Vec<Action>) {
    if names.len() >= DISCARD_OFF_LOOP {
        out.push(Action::Work {
            key: u64::MAX,
            job: Box::new(Job::Discard(super::work::Garbage(BTreeMap::new(), names))),
        });
    }
}

/// Service-wide count of ICANHAZ preparation: jobs in flight, and bytes of
/// their frames plus the frames held behind them.
#[derive(Default, Debug)]
pub(super) struct Preparing {
    pub jobs: usize,
    pub bytes: usize,
}

/// A connection's frames held while its cache is prepared, or a RESYNC of
/// it walked, off the loop.
#[derive(Default)]
pub(super) struct Held {
    /// The work key of the job preparing this connection's cache (or
    /// walking its RESYNC), and the snapshots it works from (to tell
    /// whether they moved). An outcome under another key is stale (from a
    /// session since forgotten).
    pub preparing: Option<(u64, Vec<Arc<super::Snapshot>>)>,
    /// The path of the RESYNC being walked: the connection's `known` map
    /// is with the job, so nothing is sent to it (the pump waits) and
    /// nothing reads what it holds until the outcome is in.
    pub walking: Option<String>,
    /// Mount changes announced while `known` was away, to announce to
    /// this connection once it is back, in order.
    pub owed: Vec<Owed>,
    pub frames: std::collections::VecDeque<Bytes>,
    pub bytes: usize,
}

/// A mount change a walking connection is told of once its walk is in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Owed {
    /// A mount at this alias was scanned: it hides what lies under it.
    Hidden(String),
    /// The mount at this alias is gone: what it hid is published again.
    Revealed(String),
}

impl Filemq {
    /// Takes `frame` aside if the connection waits for a prepared cache,
    /// or sends a large ICANHAZ off the loop. True if it was taken.
    pub(super) fn defer(&mut self, id: ConnId, frame: &Bytes, now: Instant, out: &mut Vec<Action>) -> bool {
        let expiry = self.config.expiry;
        let large_icanhaz = frame.get(2) == Some(&5) && frame.len() > INLINE_BYTES;
        let ready = self.conns.get(&id).is_some_and(|c| c.state == super::State::Ready);
        if large_icanhaz && !ready {
            // Whatever its cache holds, the answer is the same: not worth
            // decoding a million entries for.
            tracing::debug!(conn = id.0, "filemq ICANHAZ before OHAI");
            super::send(out, id, &FilemqMsg::Rtfm { reason: ShortStr::lossy("OHAI first") });
            self.terminate(id, out);
            return true;
        }
        let Some(conn) = self.conns.get_mut(&id) else { return false };
        if conn.held.preparing.is_some() {
            conn.expires_at = now + expiry;
            if conn.held.frames.len() >= MAX_HELD_FRAMES || conn.held.bytes + frame.len() > MAX_HELD_BYTES {
                tracing::debug!(conn = id.0, "filemq: too much sent while a cache is prepared");
                let why = "too much sent while a cache is being processed";
                super::send(out, id, &FilemqMsg::Srsly { reason: ShortStr::lossy(why) });
                self.terminate(id, out);
                return true;
            }
            if self.preparing.bytes + frame.len() > MAX_PREPARING_BYTES {
                return self.busy(id, out);
            }
            conn.held.bytes += frame.len();
            conn.held.frames.push_back(frame.clone());
            self.preparing.bytes += frame.len();
            return true;
        }
        if !large_icanhaz {
            return false;
        }
        if self.preparing.jobs >= MAX_PREPARING_JOBS
            || self.preparing.bytes + frame.len() > MAX_PREPARING_BYTES
        {
            return self.busy(id, out);
        }
        conn.expires_at = now + expiry;
        let mounts = self.views();
        let used = mounts.iter().map(|m| m.snapshot.clone()).collect();
        self.preparing.jobs += 1;
        self.preparing.bytes += frame.len();
        let what = WorkFor::Icanhaz { conn: id, bytes: frame.len() };
        let key = self.work(out, what, Job::Icanhaz { frame: frame.clone(), mounts });
        if let Some(conn) = self.conns.get_mut(&id) {
            conn.held.preparing = Some((key, used));
        }
        true
    }

    /// Too much ICANHAZ preparation service-wide: the connection is told
    /// to come back later and forgotten. True (the frame was taken).
    fn busy(&mut self, id: ConnId, out: &mut Vec<Action>) -> bool {
        tracing::debug!(conn = id.0, "filemq: too many caches being prepared");
        super::send(out, id, &FilemqMsg::Rtfm { reason: ShortStr::lossy(BUSY) });
        self.terminate(id, out);
        true
    }

    /// The outcome of [`Job::Icanhaz`]: subscribe, then handle the frames
    /// that waited behind it, in order.
    pub(super) fn prepared(&mut self, key: u64, id: ConnId, done: Done, now: Instant, out: &mut Vec<Action>) {
        let current =
            self.conns.get(&id).and_then(|c| c.held.preparing.as_ref()).is_some_and(|(k, _)| *k == key);
        if !current {
            // The connection is gone, or this is a job of a session since
            // forgotten: nobody wants it, and it is freed off the loop.
            if let Done::Icanhaz(Ok(prepared)) = done {
                discard_prepared(*prepared, out);
            }
            return;
        }
        let Some((_, used)) = self.conns.get_mut(&id).and_then(|c| c.held.preparing.take()) else { return };
        match done {
            Done::Icanhaz(Ok(mut prepared)) => {
                // The stale list holds only if no snapshot moved since (a
                // file deleted meanwhile would otherwise keep its copy).
                let same = used.len() == self.mounts.len()
                    && self.mounts.values().zip(&used).all(|(m, s)| Arc::ptr_eq(&m.snapshot, s));
                if !same {
                    prepared.stale = None;
                }
                self.subscribe_prepared(id, *prepared, now, out);
            }
            Done::Icanhaz(Err(error)) => {
                self.malformed += 1;
                tracing::debug!(conn = id.0, %error, "filemq dropped a malformed frame");
            }
            other => tracing::error!(?other, "filemq work outcome of the wrong kind"),
        }
        self.release_held(id, now, out);
        // RESYNCs put off while the cache was prepared.
        self.run_pending_resyncs(now, out);
    }

    /// Handles the frames that waited behind a job, in order, until one
    /// of them starts another.
    pub(super) fn release_held(&mut self, id: ConnId, now: Instant, out: &mut Vec<Action>) {
        loop {
            let Some(conn) = self.conns.get_mut(&id) else { return };
            if conn.held.preparing.is_some() {
                return;
            }
            let Some(frame) = conn.held.frames.pop_front() else { return };
            conn.held.bytes -= frame.len();
            self.preparing.bytes -= frame.len();
            super::Service::handle(self, id, frame, now, out);
        }
    }
}
