//! The ZPIPES service's state machine, driven by `sim::Sim`: arbitrary
//! sequences of requests (well-formed, any message, or garbage frames)
//! from four connections, a simulated clock, disconnects and shutdown.
//!
//! Invariants, after every step:
//! - no panic (overflow checks and debug assertions are on);
//! - every frame the service sends decodes with `ZpipesMsg`, re-encodes to
//!   the same bytes, and is a reply (never a request);
//! - no unsolicited replies: a connection never has more replies than it
//!   sent frames that decode;
//! - a PING is answered at once with PING_OK, whatever is pending;
//! - memory is bounded: `queued_bytes() <= pipe_limit * readers()`, and no
//!   more connections have state than peers exist;
//! - the memory budget (smaller than the readers' queues together) counts
//!   exactly the queues and mailboxes, and queues hold at most the budget
//!   plus what the pending READs ask for (the room they get outside it);
//! - `refusal` (the reply to a connection the broker will not take) is a
//!   frame that decodes.
//!
//! At the end every peer disconnects: no connection, pipe, queued byte,
//! budgeted byte, request waiting for the budget or armed timer is left.

#![no_main]

use arbitrary::Arbitrary;
use bytes::Bytes;
// Without cargo-fuzz, `tests/tests/fuzz_corpus.rs` supplies the macro.
#[cfg(fuzzing)]
use libfuzzer_sys::fuzz_target;
use std::time::Duration;
use zbroker_proto::codec::{Chunk, ShortStr};
use zbroker_proto::ZpipesMsg as M;
use zbroker_services::budget::Budget;
use zbroker_services::sim::Sim;
use zbroker_services::zpipes::{Config, Zpipes};
use zbroker_services::Service;

const CONNS: u64 = 4;
const PIPE_LIMIT: usize = 64;
/// Less than the four connections' queues could hold.
const BUDGET: usize = 96;

#[derive(Arbitrary, Debug)]
enum Step {
    Input {
        conn: u8,
        pipe: u8,
    },
    Output {
        conn: u8,
        pipe: u8,
    },
    Read {
        conn: u8,
        size: u8,
        timeout: u8,
    },
    Write {
        conn: u8,
        len: u8,
        timeout: u8,
    },
    Close {
        conn: u8,
    },
    Ping {
        conn: u8,
    },
    /// Any message, replies included, with arbitrary fields.
    Msg {
        conn: u8,
        id: u8,
        text: Vec<u8>,
        a: u32,
        b: u32,
    },
    /// Bytes behind a ZPIPES signature (as the reactor routes them).
    Raw {
        conn: u8,
        bytes: Vec<u8>,
    },
    Advance {
        ms: u16,
    },
    Disconnect {
        conn: u8,
    },
    Shutdown,
}

fn conn(c: u8) -> u64 {
    c as u64 % CONNS
}

fn pipe(p: u8) -> ShortStr {
    ShortStr::lossy(["a", "b", "c"][p as usize % 3])
}

/// 0 (no limit) or 1..=1020 ms.
fn timeout(t: u8) -> u32 {
    t as u32 * 4
}

fn any_msg(id: u8, text: Vec<u8>, a: u32, b: u32) -> M {
    let short = |mut t: Vec<u8>| {
        t.truncate(ShortStr::MAX);
        ShortStr::new(t).expect("at most 255 bytes")
    };
    let chunk = |t: Vec<u8>| Chunk(Bytes::from(t));
    match id % 21 + 1 {
        1 => M::Input { pipename: short(text) },
        2 => M::InputOk {},
        3 => M::InputFailed { reason: short(text) },
        4 => M::Output { pipename: short(text) },
        5 => M::OutputOk {},
        6 => M::OutputFailed { reason: short(text) },
        7 => M::Read { size: a, timeout: b },
        8 => M::ReadOk { chunk: chunk(text) },
        9 => M::ReadEnd {},
        10 => M::ReadTimeout {},
        11 => M::ReadFailed { reason: short(text) },
        12 => M::Write { chunk: chunk(text), timeout: b },
        13 => M::WriteOk {},
        14 => M::WriteTimeout {},
        15 => M::WriteFailed { reason: short(text) },
        16 => M::Close {},
        17 => M::CloseOk {},
        18 => M::CloseFailed { reason: short(text) },
        19 => M::Ping {},
        20 => M::PingOk {},
        _ => M::Invalid {},
    }
}

struct World {
    sim: Sim<Zpipes>,
    budget: Budget,
    /// Frames sent by each connection that decode (so may be answered).
    requests: [u64; CONNS as usize],
    replies: [u64; CONNS as usize],
    written: u64,
}

impl World {
    fn send_frame(&mut self, c: u64, frame: Vec<u8>) {
        if M::decode(frame.clone()).is_ok() {
            self.requests[c as usize] += 1;
        }
        let refusal = self.sim.service.refusal(&frame, "the broker is at its connection limit");
        if let Some(refusal) = refusal {
            let reply = M::decode(refusal).expect("a refusal decodes");
            assert!(!reply.sender().client_may_send(), "{reply:?}");
        }
        self.sim.send_raw(c, frame);
    }

    fn send(&mut self, c: u64, msg: M) {
        self.send_frame(c, msg.encode());
    }

    /// Takes and checks every frame sent so far.
    fn drain(&mut self) -> Vec<(u64, M)> {
        let mut all = Vec::new();
        for c in 0..CONNS {
            for frame in self.sim.take_raw(c) {
                let msg =
                    M::decode(frame.clone()).unwrap_or_else(|e| panic!("a sent frame does not decode: {e}"));
                assert_eq!(msg.encode(), frame, "not canonical: {msg:?}");
                assert!(!msg.sender().client_may_send(), "the service sent a request: {msg:?}");
                self.replies[c as usize] += 1;
                assert!(
                    self.replies[c as usize] <= self.requests[c as usize],
                    "connection {c} has more replies than requests"
                );
                all.push((c, msg));
            }
        }
        all
    }

    fn check_bounds(&self) {
        let s = &self.sim.service;
        assert!(
            s.queued_bytes() <= s.pipe_limit() * s.readers(),
            "queued {} bytes for {} readers",
            s.queued_bytes(),
            s.readers()
        );
        assert!(s.peak_queued_bytes() <= s.pipe_limit() * CONNS as usize);
        let used = self.budget.used();
        assert_eq!(used, s.queued_bytes() + s.mailbox_bytes(), "the budget miscounts");
        assert!(
            s.queued_bytes() <= BUDGET + s.pending_read_bytes(),
            "queued {} bytes, beyond the budget of {BUDGET} and {} asked for by pending READs",
            s.queued_bytes(),
            s.pending_read_bytes()
        );
        let (conns, pipes) = s.counts();
        assert!(conns <= CONNS as usize, "{conns} connections");
        // Each pipe has an end, and each connection is at most one end.
        assert!(pipes <= conns, "{pipes} pipes for {conns} connections");
    }
}

fuzz_target!(|steps: Vec<Step>| {
    let config = Config {
        expiry: Duration::from_millis(1000),
        pipe_limit: PIPE_LIMIT,
        mailbox_limit: 8,
        mailbox_bytes: 64,
        budget: Budget::new(BUDGET),
    };
    let mut w = World {
        budget: config.budget.clone(),
        sim: Sim::new(Zpipes::new(config)),
        requests: [0; CONNS as usize],
        replies: [0; CONNS as usize],
        written: 0,
    };
    for step in steps.into_iter().take(400) {
        let mut pinged = None;
        match step {
            Step::Input { conn: c, pipe: p } => w.send(conn(c), M::Input { pipename: pipe(p) }),
            Step::Output { conn: c, pipe: p } => w.send(conn(c), M::Output { pipename: pipe(p) }),
            Step::Read { conn: c, size, timeout: t } => {
                w.send(conn(c), M::Read { size: size as u32 % 80, timeout: timeout(t) })
            }
            Step::Write { conn: c, len, timeout: t } => {
                // Numbered bytes, so a chunk never looks like another.
                let data: Vec<u8> = (0..len as u64 % 80).map(|i| (w.written + i) as u8).collect();
                w.written += data.len() as u64;
                w.send(conn(c), M::Write { chunk: Chunk(Bytes::from(data)), timeout: timeout(t) })
            }
            Step::Close { conn: c } => w.send(conn(c), M::Close {}),
            Step::Ping { conn: c } => {
                w.send(conn(c), M::Ping {});
                pinged = Some(conn(c));
            }
            Step::Msg { conn: c, id, text, a, b } => w.send(conn(c), any_msg(id, text, a, b)),
            Step::Raw { conn: c, bytes } => {
                let mut frame = vec![0xAA, 0xA0];
                frame.extend(bytes);
                w.send_frame(conn(c), frame)
            }
            Step::Advance { ms } => w.sim.advance(Duration::from_millis(ms as u64)),
            Step::Disconnect { conn: c } => w.sim.disconnect(conn(c)),
            Step::Shutdown => w.sim.shutdown(),
        }
        let got = w.drain();
        if let Some(c) = pinged {
            assert!(
                got.iter().any(|(to, m)| *to == c && *m == M::PingOk {}),
                "PING on {c} not answered at once: {got:?}"
            );
        }
        w.check_bounds();
    }
    for c in 0..CONNS {
        w.sim.disconnect(c);
    }
    w.drain();
    assert_eq!(w.sim.service.counts(), (0, 0), "connections or pipes leaked");
    assert_eq!(w.sim.service.queued_bytes(), 0, "bytes leaked");
    assert_eq!((w.budget.used(), w.budget.waiting()), (0, 0), "the budget leaked");
    assert_eq!(w.sim.armed_timers(), 0, "timers leaked");
});
