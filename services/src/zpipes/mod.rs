//! ZPIPES: named pipes joining one writer to one reader (spec
//! `docs/protocol/ZPIPES.md`), with the fixes the README lists and a bound on
//! memory.
//!
//! Each connection has a FIFO mailbox of requests. With no request pending,
//! the connection takes the oldest one; while a READ or WRITE is pending it
//! takes only CLOSE and PING, so clients may pipeline. Effects on another
//! connection (data arrived, peer left, room freed) never run that
//! connection's machine re-entrantly: they mark it ready, and
//! [`Zpipes::run_ready`] advances ready connections one at a time.
//!
//! Divergences from the original, all on the same wire:
//! - malformed frames are dropped (the original stopped serving everyone);
//! - PING never touches a pending request or its timer;
//! - a READ's timer stays armed while part of the data has arrived, and no
//!   unrelated event cancels a timer;
//! - INVALID that ends a connection also detaches its pipe end;
//! - CLOSE clears the reader's queue;
//! - each reader's queue is bounded (`pipe_limit`): a WRITE that does not
//!   fit fills the queue to the bound and waits for room for the rest (once
//!   part of it is queued it can no longer time out); a WRITE with no room
//!   at all waits as if no reader were there; a READ or WRITE larger than
//!   the bound fails with a reason naming it;
//! - a pending WRITE whose reader leaves fails at once (the original waited
//!   for its timeout);
//! - the broker-wide memory budget ([`crate::budget`]) counts queues and
//!   mailboxes; a WRITE the budget does not admit waits for room exactly as
//!   at the pipe bound, except that a reader's pending READ may always be
//!   filled (outside the budget), so an exact-size READ can complete;
//! - a peer that disconnects is forgotten at once, like an expiry.

mod requests;
mod service;

#[cfg(test)]
mod budget_tests;
#[cfg(test)]
mod partial_tests;
#[cfg(test)]
mod tests;

use crate::budget::Budget;
use crate::{Action, ConnId, Counter, Service, TimerKey};
use bytes::Bytes;
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::time::{Duration, Instant};
use zbroker_proto::byte_queue::ByteQueue;
use zbroker_proto::codec::{Chunk, ShortStr};
use zbroker_proto::zpipes::PARTIAL_READ;
use zbroker_proto::ZpipesMsg;

/// Settings of the ZPIPES service.
#[derive(Debug, Clone)]
pub struct Config {
    /// A connection silent for this long is forgotten (docs/protocol/ZPIPES.md "Expiry").
    pub expiry: Duration,
    /// Most bytes queued for one reader.
    pub pipe_limit: usize,
    /// Most requests waiting behind a pending one on one connection.
    pub mailbox_limit: usize,
    /// Most WRITE bytes waiting behind a pending request on one connection.
    pub mailbox_bytes: usize,
    /// The broker-wide memory budget, shared with the host.
    pub budget: Budget,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            expiry: Duration::from_millis(60_000),
            pipe_limit: 8 << 20,
            mailbox_limit: 1024,
            mailbox_bytes: 4 << 20,
            budget: Budget::unlimited(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// `start`: no pipe end open.
    Idle,
    Reader,
    Writer,
}

#[derive(Debug)]
enum Pending {
    Read {
        size: usize,
        /// Our extension: answer with what is queued, at least one byte.
        partial: bool,
    },
    /// `partly_queued`: part of the chunk is already in the reader's
    /// queue, so the write can no longer time out.
    Write { chunk: Bytes, partly_queued: bool },
}

#[derive(Debug)]
struct Conn {
    role: Role,
    /// The pipe this end is attached to; `None` once the other end left.
    pipe: Option<ShortStr>,
    /// Requests with their extension bits (`ZpipesMsg::decode_ext`).
    mailbox: VecDeque<(ZpipesMsg, u8)>,
    /// The client was granted partial READs (a PING offering them).
    partial_reads: bool,
    /// Chunk bytes held in the mailbox (bounded by `mailbox_bytes`).
    mailbox_bytes: usize,
    pending: Option<Pending>,
    request_timer: bool,
    /// Data written to this connection as a reader.
    queue: ByteQueue,
    expires_at: Instant,
    /// As a writer waiting for the memory budget: the key it waits under
    /// in `Zpipes::budget_waiters`.
    budget_wait: Option<(usize, usize)>,
}

#[derive(Debug, Default)]
struct Pipe {
    reader: Option<ConnId>,
    writer: Option<ConnId>,
}

/// The ZPIPES service.
pub struct Zpipes {
    config: Config,
    conns: HashMap<ConnId, Conn>,
    pipes: HashMap<ShortStr, Pipe>,
    ready: VecDeque<ConnId>,
    /// Writers waiting for the memory budget, by (bytes their pipe holds,
    /// bytes they need, connection): the smallest holders move first.
    budget_waiters: BTreeSet<(usize, usize, ConnId)>,
    queued_bytes: usize,
    peak_queued_bytes: usize,
    bytes_moved: u64,
    malformed: u64,
    /// The broker is stopping: no new pipe ends or writes; readers get
    /// what was acknowledged, then READ_FAILED.
    shutting_down: bool,
}

/// The reason given to requests refused or failed while the broker stops.
const SHUTTING_DOWN: &str = "the broker is shutting down";

// Each connection owns two timers: its expiry and its pending request.
fn expiry_key(conn: ConnId) -> TimerKey {
    conn.0 << 1
}
fn request_key(conn: ConnId) -> TimerKey {
    conn.0 << 1 | 1
}

fn reply(out: &mut Vec<Action>, to: ConnId, msg: ZpipesMsg) {
    tracing::trace!(conn = to.0, reply = msg.name(), "zpipes reply");
    out.push(Action::Send { to, frame: msg.encode() });
}

/// What a PING's offered capabilities earn: those we have, remembered
/// for the connection (a plain PING grants nothing: the original wire).
fn grant(conn: &mut Conn, offered: u8) -> u8 {
    let granted = offered & PARTIAL_READ;
    conn.partial_reads |= granted & PARTIAL_READ != 0;
    granted
}

fn pong_frame(out: &mut Vec<Action>, to: ConnId, granted: u8) {
    tracing::trace!(conn = to.0, granted, "zpipes reply PingOk");
    out.push(Action::Send { to, frame: ZpipesMsg::PingOk {}.encode_ext(granted) });
}

impl Zpipes {
    pub fn new(config: Config) -> Self {
        Zpipes {
            config,
            conns: HashMap::new(),
            pipes: HashMap::new(),
            ready: VecDeque::new(),
            budget_waiters: BTreeSet::new(),
            queued_bytes: 0,
            peak_queued_bytes: 0,
            bytes_moved: 0,
            malformed: 0,
            shutting_down: false,
        }
    }

    /// Bytes queued for all readers now.
    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes
    }

    /// The most bytes ever queued at once.
    pub fn peak_queued_bytes(&self) -> usize {
        self.peak_queued_bytes
    }

    /// Bytes entered into readers' queues (counted in the budget).
    fn queue_in(&mut self, n: usize) {
        self.queued_bytes += n;
        self.peak_queued_bytes = self.peak_queued_bytes.max(self.queued_bytes);
        self.config.budget.take(n);
    }

    /// Bytes gone from readers' queues (read, cleared).
    fn queue_out(&mut self, n: usize) {
        self.queued_bytes -= n;
        self.config.budget.give(n);
    }

    /// A writer starts waiting for the budget: its pipe holds `held` and it
    /// needs `need` more.
    fn wait_budget(&mut self, id: ConnId, held: usize, need: usize) {
        let Some(conn) = self.conns.get_mut(&id) else { return };
        if conn.budget_wait.is_none() {
            self.config.budget.set_waiting(true);
        } else if let Some((h, n)) = conn.budget_wait {
            self.budget_waiters.remove(&(h, n, id));
        }
        conn.budget_wait = Some((held, need));
        self.budget_waiters.insert((held, need, id));
    }

    /// The writer no longer waits for the budget (it moved, or its WRITE
    /// ended).
    fn unwait_budget(&mut self, id: ConnId) {
        let Some(conn) = self.conns.get_mut(&id) else { return };
        if let Some((held, need)) = conn.budget_wait.take() {
            self.budget_waiters.remove(&(held, need, id));
            self.config.budget.set_waiting(false);
        }
    }

    /// The waiter holding least, if the budget now admits what it needs.
    fn budget_waiter_due(&self) -> Option<ConnId> {
        let &(held, need, id) = self.budget_waiters.first()?;
        self.config.budget.admits(held, need).then_some(id)
    }

    /// Connections with state, and open pipes.
    pub fn counts(&self) -> (usize, usize) {
        (self.conns.len(), self.pipes.len())
    }

    fn too_big(&self, what: &str, n: usize) -> ShortStr {
        ShortStr::lossy(&format!(
            "{what} of {n} bytes exceeds the pipe limit of {} bytes",
            self.config.pipe_limit
        ))
    }

    fn open(&mut self, id: ConnId, name: ShortStr, role: Role, out: &mut Vec<Action>) {
        let pipe = self.pipes.entry(name.clone()).or_default();
        let (end, other) = match role {
            Role::Reader => (&mut pipe.reader, pipe.writer),
            _ => (&mut pipe.writer, pipe.reader),
        };
        if end.is_some() {
            let reason = ShortStr::lossy(match role {
                Role::Reader => "the pipe already has a reader",
                _ => "the pipe already has a writer",
            });
            match role {
                Role::Reader => reply(out, id, ZpipesMsg::InputFailed { reason }),
                _ => reply(out, id, ZpipesMsg::OutputFailed { reason }),
            }
            self.terminate(id, out);
            return;
        }
        *end = Some(id);
        if let Some(other) = other {
            self.ready.push_back(other);
        }
        let conn = self.conns.get_mut(&id).expect("caller holds a live connection");
        conn.role = role;
        conn.pipe = Some(name);
        match role {
            Role::Reader => reply(out, id, ZpipesMsg::InputOk {}),
            _ => reply(out, id, ZpipesMsg::OutputOk {}),
        }
    }

    fn cancel_request_timer(&mut self, id: ConnId, out: &mut Vec<Action>) {
        if let Some(conn) = self.conns.get_mut(&id) {
            if std::mem::take(&mut conn.request_timer) {
                out.push(Action::CancelTimer { key: request_key(id) });
            }
        }
    }

    /// CLOSE of an open end: detach, clear the queue, back to `start`.
    fn close(&mut self, id: ConnId, out: &mut Vec<Action>) {
        self.detach(id);
        let conn = self.conns.get_mut(&id).expect("caller holds a live connection");
        conn.role = Role::Idle;
        let cleared = conn.queue.clear();
        self.queue_out(cleared);
        reply(out, id, ZpipesMsg::CloseOk {});
    }

    /// Detaches a connection's pipe end; the other end detaches too and the
    /// pipe is gone, so a new end on that name makes a new pipe.
    fn detach(&mut self, id: ConnId) {
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        let Some(name) = conn.pipe.take() else { return };
        let Some(pipe) = self.pipes.remove(&name) else {
            return;
        };
        let other = if pipe.reader == Some(id) { pipe.writer } else { pipe.reader };
        if let Some(other) = other {
            if let Some(peer) = self.conns.get_mut(&other) {
                peer.pipe = None;
                self.ready.push_back(other);
            }
        }
        tracing::debug!(conn = id.0, pipe = ?name, "zpipes pipe end detached");
    }

    /// Forgets a connection entirely; nothing is sent.
    fn terminate(&mut self, id: ConnId, out: &mut Vec<Action>) {
        self.detach(id);
        self.unwait_budget(id);
        if let Some(mut conn) = self.conns.remove(&id) {
            self.queue_out(conn.queue.clear());
            self.config.budget.give(conn.mailbox_bytes);
            if conn.request_timer {
                out.push(Action::CancelTimer { key: request_key(id) });
            }
            out.push(Action::CancelTimer { key: expiry_key(id) });
        }
    }

    /// Advances ready connections until none can move.
    fn run_ready(&mut self, now: Instant, out: &mut Vec<Action>) {
        loop {
            while let Some(id) = self.ready.pop_front() {
                while self.advance(id, now, out) {}
            }
            // Room in the budget goes to the waiter holding least, one at a
            // time (each either moves or finds the room taken).
            let Some(id) = self.budget_waiter_due() else { return };
            self.unwait_budget(id);
            self.ready.push_back(id);
        }
    }

    fn receive(&mut self, id: ConnId, msg: ZpipesMsg, bits: u8, now: Instant, out: &mut Vec<Action>) {
        let expires_at = now + self.config.expiry;
        let conn = self.conns.entry(id).or_insert_with(|| {
            // The expiry timer is armed once and pushed back lazily when it
            // fires, so a busy connection costs no timer work per message.
            out.push(Action::SetTimer { key: expiry_key(id), at: expires_at });
            Conn {
                role: Role::Idle,
                pipe: None,
                mailbox: VecDeque::new(),
                partial_reads: false,
                mailbox_bytes: 0,
                pending: None,
                request_timer: false,
                queue: ByteQueue::default(),
                expires_at,
                budget_wait: None,
            }
        });
        conn.expires_at = expires_at;
        let chunk_len = match &msg {
            ZpipesMsg::Write { chunk, .. } => chunk.0.len(),
            _ => 0,
        };
        // A pending request holds the mailbox: bound what may wait behind it.
        let passes = matches!(msg, ZpipesMsg::Ping {} | ZpipesMsg::Close {});
        let full = conn.mailbox.len() >= self.config.mailbox_limit
            || conn.mailbox_bytes + chunk_len > self.config.mailbox_bytes;
        if conn.pending.is_some() && !passes && full {
            let reason = ShortStr::lossy("too many requests pipelined behind a pending one");
            tracing::warn!(conn = id.0, "zpipes mailbox full; refusing {}", msg.name());
            match msg {
                // A refused READ loses nothing: the data stays queued.
                ZpipesMsg::Read { .. } => reply(out, id, ZpipesMsg::ReadFailed { reason }),
                // A refused WRITE would leave a hole if later ones went
                // through: the writer is cut off from the pipe instead, so
                // this and every later WRITE fail, in order: those queued
                // before it first, then this one.
                ZpipesMsg::Write { .. } if conn.role == Role::Writer => {
                    self.detach(id);
                    self.ready.push_back(id);
                    self.run_ready(now, out);
                    reply(out, id, ZpipesMsg::WriteFailed { reason });
                }
                ZpipesMsg::Write { .. } => reply(out, id, ZpipesMsg::WriteFailed { reason }),
                // Terminating here would leave the pending request and the
                // ones queued behind it without replies.
                _ => reply(out, id, ZpipesMsg::Invalid {}),
            }
            return;
        }
        conn.mailbox_bytes += chunk_len;
        self.config.budget.take(chunk_len);
        conn.mailbox.push_back((msg, bits));
        self.ready.push_back(id);
        self.run_ready(now, out);
    }

    /// Connections open as readers (each may hold up to `pipe_limit`
    /// queued bytes): the bound on `queued_bytes` checked by the fuzzers.
    pub fn readers(&self) -> usize {
        self.conns.values().filter(|c| c.role == Role::Reader).count()
    }

    /// WRITE bytes held in mailboxes (counted in the budget with the
    /// queues: the fuzzers check the sum).
    pub fn mailbox_bytes(&self) -> usize {
        self.conns.values().map(|c| c.mailbox_bytes).sum()
    }

    /// Bytes asked for by the READs pending now: what queues may hold
    /// beyond the budget (the fuzzers' bound).
    pub fn pending_read_bytes(&self) -> usize {
        self.conns
            .values()
            .map(|c| match c.pending {
                Some(Pending::Read { size, .. }) => size,
                _ => 0,
            })
            .sum()
    }

    /// The pipe limit in force.
    pub fn pipe_limit(&self) -> usize {
        self.config.pipe_limit
    }
}
