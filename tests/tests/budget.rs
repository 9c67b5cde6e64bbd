//! The broker-wide memory budget (`--memory-limit`) against the real
//! broker: a thousand pipes whose readers read nothing keep its memory
//! within the budget plus a stated overhead; a new pipe still moves; every
//! byte arrives once the readers read.

use std::io::{Read, Write};
use std::time::{Duration, Instant};
use zbroker_client::zpipes::{Options, Reader, Writer};
use zbroker_proto::codec::{Chunk, ShortStr};
use zbroker_proto::ZpipesMsg as M;
use zbroker_tests::{pseudo_random, Broker};

const PIPES: usize = 1000;
const PIPE_LIMIT: usize = 1 << 20;
const BUDGET: usize = 32 << 20;
/// Each writer keeps one WRITE of this size in flight.
const CHUNK: usize = 64 << 10;

/// Resident memory of a process, in bytes (Linux).
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    kib << 10
}

fn dealer(context: &zmq::Context, endpoint: &str) -> zmq::Socket {
    let socket = context.socket(zmq::DEALER).expect("socket");
    socket.set_linger(0).expect("linger");
    socket.connect(endpoint).expect("connect");
    socket
}

fn recv(socket: &zmq::Socket, ms: i64) -> Option<M> {
    if socket.poll(zmq::POLLIN, ms).expect("poll") == 0 {
        return None;
    }
    Some(M::decode(socket.recv_bytes(0).expect("recv")).expect("the broker sends well-formed frames"))
}

/// Pipe `pipe`'s stream: a window of one shared random block, different
/// for each pipe, so making and checking a gigabyte costs only copies.
fn stream_chunk(base: &[u8], pipe: usize, offset: usize, len: usize) -> &[u8] {
    let start = pipe * 4099 % (base.len() - PIPE_LIMIT);
    &base[start + offset..start + offset + len]
}

struct Pipe {
    writer: zmq::Socket,
    reader: zmq::Socket,
    written: usize,
    in_flight: Option<usize>,
    read: usize,
}

impl Pipe {
    fn write_next(&mut self, base: &[u8], pipe: usize) {
        if self.in_flight.is_some() || self.written >= PIPE_LIMIT {
            return;
        }
        let len = CHUNK.min(PIPE_LIMIT - self.written);
        let chunk = Chunk(stream_chunk(base, pipe, self.written, len).to_vec().into());
        self.writer.send(M::Write { chunk, timeout: 0 }.encode(), 0).unwrap();
        self.in_flight = Some(len);
    }

    /// Takes a WRITE_OK if one is there; true if it did.
    fn take_write_ok(&mut self, base: &[u8], pipe: usize, ms: i64) -> bool {
        match recv(&self.writer, ms) {
            None => false,
            Some(M::WriteOk {}) => {
                self.written += self.in_flight.take().expect("a WRITE in flight");
                self.write_next(base, pipe);
                true
            }
            Some(other) => panic!("pipe {pipe}: writer got {other:?}"),
        }
    }
}

#[test]
fn a_thousand_full_pipes_stay_within_the_budget_and_a_new_pipe_still_moves() {
    let broker = Broker::start(&[
        "--pipe-limit",
        &PIPE_LIMIT.to_string(),
        "--memory-limit",
        &BUDGET.to_string(),
        "--expiry",
        "600000",
    ]);
    let pid = broker.child.id();
    let endpoint = broker.endpoint();
    // A context holds at most 1023 sockets by default: one for each side.
    let (writers, readers) = (zmq::Context::new(), zmq::Context::new());
    let mut pipes: Vec<Pipe> = (0..PIPES)
        .map(|_| Pipe {
            writer: dealer(&writers, &endpoint),
            reader: dealer(&readers, &endpoint),
            written: 0,
            in_flight: None,
            read: 0,
        })
        .collect();
    for (i, p) in pipes.iter().enumerate() {
        let pipename = ShortStr::lossy(&format!("budget-{i}"));
        p.writer.send(M::Output { pipename: pipename.clone() }.encode(), 0).unwrap();
        p.reader.send(M::Input { pipename }.encode(), 0).unwrap();
    }
    for p in &pipes {
        assert_eq!(recv(&p.writer, 30_000), Some(M::OutputOk {}));
        assert_eq!(recv(&p.reader, 30_000), Some(M::InputOk {}));
    }
    let baseline = rss(pid);
    let base = pseudo_random(PIPE_LIMIT + (1 << 20), 3);

    // Every writer writes until its WRITE waits: the budget is full.
    for (i, p) in pipes.iter_mut().enumerate() {
        p.write_next(&base, i);
    }
    let mut quiet_since = Instant::now();
    while quiet_since.elapsed() < Duration::from_millis(1500) {
        let mut any = false;
        for (i, p) in pipes.iter_mut().enumerate() {
            while p.take_write_ok(&base, i, 0) {
                any = true;
            }
        }
        if any {
            quiet_since = Instant::now();
        } else {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let full_rss = rss(pid);
    let status = broker.status();
    let memory = &status["memory"];
    let queued = status["services"]["zpipes"]["queued_bytes"].as_u64().unwrap() as usize;
    let written: usize = pipes.iter().map(|p| p.written).sum();
    assert_eq!(queued, written, "every acknowledged byte is queued");
    assert!(memory["used"].as_u64().unwrap() as usize <= BUDGET, "{memory}");
    assert_eq!(memory["at_limit"], true, "{memory}");
    assert!(!memory["holders"].as_array().unwrap().is_empty(), "{memory}");
    // Stated overhead: the WRITE each writer has pending (the frame has
    // arrived; it waits for room) and allocator slack.
    let overhead = PIPES * CHUNK + (32 << 20);
    let growth = full_rss.saturating_sub(baseline) as usize;
    eprintln!(
        "budget {BUDGET} bytes; {queued} bytes queued in {PIPES} pipes; broker RSS {baseline} bytes with the pipes \
         open, {full_rss} bytes full (+{growth}); without a budget the pipes would queue {} bytes",
        PIPES * PIPE_LIMIT
    );
    assert!(growth <= BUDGET + overhead, "RSS grew by {growth} bytes, over {BUDGET} + {overhead}");

    // A new pipe moves 64 MiB through the full budget.
    let data = pseudo_random(64 << 20, 7);
    let opts = Options::endpoint(&endpoint);
    let started = Instant::now();
    let sender = {
        let (data, opts) = (data.clone(), opts.clone());
        std::thread::spawn(move || {
            let mut writer = Writer::open("budget-new", &opts).expect("open the new pipe's writer");
            writer.write_all(&data).expect("write 64 MiB");
            writer.close().expect("close the writer");
        })
    };
    let mut reader = Reader::open("budget-new", &opts).expect("open the new pipe's reader");
    let mut got = Vec::with_capacity(data.len());
    reader.read_to_end(&mut got).expect("read 64 MiB");
    sender.join().unwrap();
    assert!(got == data, "the new pipe's 64 MiB arrived intact");
    eprintln!("64 MiB through a new pipe with the budget full: {:?}", started.elapsed());

    // The readers read: every byte of every pipe arrives, in order.
    for (i, p) in pipes.iter_mut().enumerate() {
        while p.read < PIPE_LIMIT {
            let size = CHUNK.min(PIPE_LIMIT - p.read);
            p.reader.send(M::Read { size: size as u32, timeout: 0 }.encode(), 0).unwrap();
            let deadline = Instant::now() + Duration::from_secs(30);
            let chunk = loop {
                assert!(Instant::now() < deadline, "pipe {i}: no READ_OK within 30 s");
                p.take_write_ok(&base, i, 0);
                match recv(&p.reader, 5) {
                    None => continue,
                    Some(M::ReadOk { chunk }) => break chunk.0,
                    Some(other) => panic!("pipe {i}: reader got {other:?}"),
                }
            };
            assert!(
                chunk[..] == stream_chunk(&base, i, p.read, size)[..],
                "pipe {i}: bytes at {} differ",
                p.read
            );
            p.read += size;
        }
        while p.in_flight.is_some() {
            assert!(p.take_write_ok(&base, i, 30_000), "pipe {i}: the last WRITE was never acknowledged");
        }
    }
    let status = broker.status();
    assert_eq!(status["services"]["zpipes"]["queued_bytes"], 0);
    assert_eq!(status["memory"]["at_limit"], false, "{}", status["memory"]);
}
