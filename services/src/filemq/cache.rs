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

use super::work::{Done, Job, MountView, Prepared};
use super::{covers, join, normalise_vpath, ConnId, Filemq, WorkFor};
use crate::Action;
use bytes::Bytes;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;
use zbroker_client::codec::{Ceiling, Field as _, FieldError, Hash, LongStr, Reader, ShortStr};
use zbroker_client::filemq_msg::{self, ceiling, FilemqMsg};

/// ICANHAZ frames up to this size are handled on the loop (a few thousand
/// entries: well under a millisecond); larger ones off it.
pub const INLINE_BYTES: usize = 256 << 10;
/// Frames a connection may send while its cache is prepared, and their
/// bytes (one more ICANHAZ of the largest size): past either, it is
/// refused (SRSLY) and forgotten.
pub const MAX_HELD_FRAMES: usize = 64;
pub const MAX_HELD_BYTES: usize = filemq_msg::MAX_CLIENT_MESSAGE;

/// SHA-1 digest, binary: half the memory of its hex form.
pub type Digest = [u8; 20];

/// A digest from 40 hex digits (either case).
pub fn digest(hex: &str) -> Option<Digest> {
    let hex = hex.as_bytes();
    if hex.len() != 40 {
        return None;
    }
    let nibble = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = [0u8; 20];
    for (byte, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
        *byte = nibble(pair[0])? << 4 | nibble(pair[1])?;
    }
    Some(out)
}

/// One cache entry as what the client holds under `path`: its virtual
/// path and digest, unless its name or digest is bad or it lies outside.
fn entry(path: &str, key: &ShortStr, value: &LongStr) -> Option<(String, Digest)> {
    let key = std::str::from_utf8(key.as_bytes()).ok()?;
    let digest = digest(std::str::from_utf8(value.as_bytes()).ok()?)?;
    let vpath = if key.starts_with('/') { key.to_string() } else { join(path, key) };
    let vpath = normalise_vpath(&vpath).filter(|v| covers(path, v))?;
    Some((vpath, digest))
}

/// The client's cache as what it holds under `path`.
pub fn normalise(path: &str, cache: &Hash) -> BTreeMap<String, Digest> {
    cache.0.iter().filter_map(|(key, value)| entry(path, key, value)).collect()
}

/// Is `vpath` published by `mounts` (the longest alias covering it
/// serves it)? The same rule as `Filemq::published`, over a copy.
fn served(mounts: &[MountView], vpath: &str) -> bool {
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
pub fn prepare(frame: Bytes, mounts: &[MountView]) -> Result<Box<Prepared>, String> {
    let malformed = |field: &str, e: FieldError| format!("ICANHAZ {field}: {e:?}");
    // The fields and ceilings of `FilemqMsg::Icanhaz`, in order (the
    // tests check that this agrees with `FilemqMsg::decode`).
    let mut r = Reader::new(frame.slice(3..));
    let path = LongStr::get_within(&mut r, Ceiling::NONE).map_err(|e| malformed("path", e))?;
    let options =
        Hash::get_within(&mut r, Ceiling::NONE.with(ceiling::OPTIONS_ENTRIES, ceiling::OPTIONS_BYTES))
            .map_err(|e| malformed("options", e))?;
    let normal = std::str::from_utf8(path.as_bytes()).ok().and_then(normalise_vpath);
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
    let resync = options.get(super::ext::RESYNC).is_some_and(|v| v.as_bytes() == b"1");
    let stale = match &normal {
        Some(p) if resync => {
            let ready = mounts.iter().filter(|m| covers(p, &m.alias) || covers(&m.alias, p)).all(|m| m.ready);
            ready.then(|| known.keys().filter(|v| !served(mounts, v)).cloned().collect())
        }
        _ => None,
    };
    Ok(Box::new(Prepared { path, options, known, stale }))
}

/// Holdings this large are freed on a worker thread, not on the loop.
const DISCARD_OFF_LOOP: usize = 10_000;

/// Frees what a connection knew: a large map off the loop.
pub(super) fn discard(known: BTreeMap<String, Digest>, out: &mut Vec<Action>) {
    if known.len() >= DISCARD_OFF_LOOP {
        // Nobody waits for its outcome: any key will do.
        out.push(Action::Work { key: u64::MAX, job: Job::Discard(super::work::Garbage(known)) });
    }
}

/// A connection's frames held while its cache is prepared off the loop.
#[derive(Default)]
pub(super) struct Held {
    /// The snapshots the job works from (to tell whether they moved).
    pub preparing: Option<Vec<Arc<super::Snapshot>>>,
    pub frames: std::collections::VecDeque<Bytes>,
    pub bytes: usize,
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
            conn.held.bytes += frame.len();
            conn.held.frames.push_back(frame.clone());
            return true;
        }
        if !large_icanhaz {
            return false;
        }
        conn.expires_at = now + expiry;
        let mounts: Vec<MountView> = self
            .mounts
            .values()
            .map(|m| MountView {
                alias: m.alias.clone(),
                snapshot: m.snapshot.clone(),
                ready: m.scanned || m.error.is_some(),
            })
            .collect();
        conn.held.preparing = Some(mounts.iter().map(|m| m.snapshot.clone()).collect());
        self.work(out, WorkFor::Icanhaz { conn: id }, Job::Icanhaz { frame: frame.clone(), mounts });
        true
    }

    /// The outcome of [`Job::Icanhaz`]: subscribe, then handle the frames
    /// that waited behind it, in order.
    pub(super) fn prepared(&mut self, id: ConnId, done: Done, now: Instant, out: &mut Vec<Action>) {
        let Some(conn) = self.conns.get_mut(&id) else { return };
        let Some(used) = conn.held.preparing.take() else { return };
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
        loop {
            let Some(conn) = self.conns.get_mut(&id) else { return };
            if conn.held.preparing.is_some() {
                return;
            }
            let Some(frame) = conn.held.frames.pop_front() else { return };
            conn.held.bytes -= frame.len();
            super::Service::handle(self, id, frame, now, out);
        }
    }
}
