//! Faults and load found by review: disconnects under a busy front socket,
//! descriptors reused at once, replies dropped at the parking bound, a
//! client process outliving its broker, and bytes received before a
//! broker's death.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use zbroker_proto::codec::{Chunk, ShortStr};
use zbroker_proto::ZpipesMsg as M;
use zbroker_tests::{Broker, Raw};

fn name(s: &str) -> ShortStr {
    ShortStr::new(s.as_bytes().to_vec()).unwrap()
}

/// Flooders: DEALERs sending frames of an unknown signature as fast as
/// they can (no replies come back).
fn flood(
    endpoint: &str,
    threads: usize,
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
) -> Vec<std::thread::JoinHandle<()>> {
    (0..threads)
        .map(|_| {
            let (endpoint, stop, sent) = (endpoint.to_string(), stop.clone(), sent.clone());
            std::thread::spawn(move || {
                let raw = Raw::connect(&endpoint);
                raw.socket.set_sndhwm(100_000).unwrap();
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    for _ in 0..1000 {
                        let _ = raw.socket.send(&[0xAAu8, 0xA0, 0x63][..], 0);
                    }
                    n += 1000;
                }
                sent.fetch_add(n, Ordering::Relaxed);
            })
        })
        .collect()
}

/// A writer vanishes (socket closed) while its reader waits on a READ with
/// no timeout, and other peers keep the front socket busy without pause:
/// the disconnect must still reach the reader (it waits at most a turn,
/// not for a read-dry pass that may never come).
#[test]
fn disconnect_is_applied_while_the_front_socket_stays_busy() {
    let broker = Broker::start(&[]);
    let endpoint = broker.endpoint();
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let threads: usize = 2;
    let flooders = flood(&endpoint, threads, stop.clone(), sent.clone());
    std::thread::sleep(Duration::from_millis(500));

    let reader = Raw::connect(&endpoint);
    reader.send(M::Input { pipename: name("victim") });
    assert_eq!(reader.recv(10_000), Some(M::InputOk {}), "reader opened");
    {
        let context = zmq::Context::new();
        let w = context.socket(zmq::DEALER).unwrap();
        w.set_linger(0).unwrap();
        w.connect(&endpoint).unwrap();
        w.send(M::Output { pipename: name("victim") }.encode(), 0).unwrap();
        assert!(w.poll(zmq::POLLIN, 10_000).unwrap() > 0, "writer opened");
        assert_eq!(M::decode(w.recv_bytes(0).unwrap()).unwrap(), M::OutputOk {});
        // writer goes away here (socket and context dropped)
    }
    for _ in 0..3 {
        let t = Instant::now();
        assert_eq!(reader.ask(M::Ping {}), M::PingOk {});
        eprintln!("PING round trip under the flood: {:?}", t.elapsed());
    }
    reader.send(M::Read { size: 10, timeout: 0 });
    let started = Instant::now();
    let got = reader.recv(20_000);
    let waited = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    for f in flooders {
        f.join().unwrap();
    }
    let after = if got.is_none() { reader.recv(5_000) } else { None };
    eprintln!(
        "flood sent {} frames; reply under load: {got:?} after {waited:?}; after the flood stopped: {after:?}",
        sent.load(Ordering::Relaxed)
    );
    assert_eq!(
        got,
        Some(M::ReadEnd {}),
        "the writer's disconnect must reach the reader while others are busy"
    );
}

/// Control: same without the flood.
#[test]
fn disconnect_is_applied_when_idle() {
    let broker = Broker::start(&[]);
    let endpoint = broker.endpoint();
    let reader = Raw::connect(&endpoint);
    assert_eq!(reader.ask(M::Input { pipename: name("victim") }), M::InputOk {});
    {
        let context = zmq::Context::new();
        let w = context.socket(zmq::DEALER).unwrap();
        w.set_linger(0).unwrap();
        w.connect(&endpoint).unwrap();
        w.send(M::Output { pipename: name("victim") }.encode(), 0).unwrap();
        assert!(w.poll(zmq::POLLIN, 2000).unwrap() > 0);
        let _ = w.recv_bytes(0);
    }
    reader.send(M::Read { size: 10, timeout: 0 });
    let started = Instant::now();
    assert_eq!(reader.recv(5_000), Some(M::ReadEnd {}));
    eprintln!("idle: READ_END after {:?}", started.elapsed());
    let _ = Chunk(bytes::Bytes::new());
}

/// A fire-and-forget writer: OUTPUT, many PINGs, WRITE, close. A second
/// client connects right after (the broker reuses the descriptor) and
/// speaks while the first one's frames are still being read.
#[test]
fn a_write_is_not_lost_when_the_descriptor_is_reused_at_once() {
    let broker = Broker::start(&[]);
    let endpoint = broker.endpoint();
    let pings: usize = 900;
    let reader = Raw::connect(&endpoint);
    let mut lost = 0;
    let rounds = 10;
    for round in 0..rounds {
        let pipe = format!("reuse-{round}");
        assert_eq!(reader.ask(M::Input { pipename: name(&pipe) }), M::InputOk {});
        {
            let context = zmq::Context::new();
            let a = context.socket(zmq::DEALER).unwrap();
            a.set_linger(1000).unwrap();
            a.set_sndhwm(100_000).unwrap();
            a.connect(&endpoint).unwrap();
            a.send(M::Output { pipename: name(&pipe) }.encode(), 0).unwrap();
            for _ in 0..pings {
                a.send(M::Ping {}.encode(), 0).unwrap();
            }
            a.send(
                M::Write { chunk: Chunk(bytes::Bytes::from_static(b"last words")), timeout: 0 }.encode(),
                0,
            )
            .unwrap();
        }
        // B: a new client at once, on the descriptor A just left.
        let b = Raw::connect(&endpoint);
        b.send(M::Ping {});
        let _ = b.recv(5000);
        reader.send(M::Read { size: 10, timeout: 3000 });
        let got = reader.recv(10_000);
        if got != Some(M::ReadOk { chunk: Chunk(bytes::Bytes::from_static(b"last words")) }) {
            eprintln!("round {round}: {got:?}");
            lost += 1;
        }
        // Finish the round: READ_END (or whatever), CLOSE.
        loop {
            match reader.ask(M::Read { size: 10, timeout: 3000 }) {
                M::ReadEnd {} | M::Invalid {} => break,
                M::ReadTimeout {} => break,
                _ => {}
            }
        }
        let _ = reader.ask(M::Close {});
    }
    assert_eq!(lost, 0, "{lost} of {rounds} WRITEs sent before a close were lost");
}

/// A pipelining reader that is slow (not dead): when one big reply passes
/// the parking bound it is dropped, but a later small reply still fits and
/// is delivered: the reader sees a stream with a hole in it.
#[test]
fn a_reply_dropped_at_the_parking_bound_leaves_no_hole() {
    let broker = Broker::start(&["--pipe-limit", "1MiB"]);
    let endpoint = broker.endpoint();
    let context = zmq::Context::new();
    let slow = context.socket(zmq::DEALER).unwrap();
    slow.set_rcvhwm(1).unwrap();
    slow.set_linger(0).unwrap();
    slow.connect(&endpoint).unwrap();
    slow.send(M::Input { pipename: name("holes") }.encode(), 0).unwrap();
    assert_eq!(M::decode(slow.recv_bytes(0).unwrap()).unwrap(), M::InputOk {});
    const BLOCKS: u8 = 12;
    for _ in 0..BLOCKS {
        slow.send(M::Read { size: 1 << 20, timeout: 0 }.encode(), 0).unwrap();
    }
    slow.send(M::Read { size: 10, timeout: 0 }.encode(), 0).unwrap();
    let writer = Raw::connect(&endpoint);
    assert_eq!(writer.ask(M::Output { pipename: name("holes") }), M::OutputOk {});
    // Pipelined: all WRITEs reach the broker in one go.
    for i in 0..BLOCKS {
        writer.send(M::Write { chunk: Chunk(bytes::Bytes::from(vec![i; 1 << 20])), timeout: 0 });
    }
    writer.send(M::Write { chunk: Chunk(bytes::Bytes::from(vec![b'!'; 10])), timeout: 0 });
    let mut acks = Vec::new();
    while let Some(m) = writer.recv(1000) {
        acks.push(format!("{m:?}").chars().take(12).collect::<String>());
    }
    eprintln!("writer got: {acks:?}");
    std::thread::sleep(Duration::from_millis(300));
    // The slow reader now reads what it was sent.
    let mut seen = Vec::new();
    while slow.poll(zmq::POLLIN, 1000).unwrap() > 0 {
        match M::decode(slow.recv_bytes(0).unwrap()).unwrap() {
            M::ReadOk { chunk } => seen.push((chunk.0[0], chunk.0.len())),
            other => seen.push((0xFF, format!("{other:?}").len())),
        }
    }
    eprintln!("replies seen (first byte, length): {seen:?}");
    let st = broker.status();
    eprintln!(
        "status: peers {} parked {} parked_bytes {} conns {}",
        st["peers"], st["parked_replies"], st["parked_bytes"], st["services"]["zpipes"]["connections"]
    );
    let firsts: Vec<u8> = seen.iter().map(|(b, _)| *b).collect();
    for w in firsts.windows(2) {
        if w[0] < BLOCKS && w[1] < BLOCKS {
            assert_eq!(w[1], w[0] + 1, "a block is missing between {} and {}: {seen:?}", w[0], w[1]);
        }
        if w[0] < BLOCKS && w[1] == b'!' {
            assert_eq!(w[0], BLOCKS - 1, "the stream goes on after a dropped block: {seen:?}");
        }
    }
}

/// Dropping a Reader, then losing the broker, must not wedge the process's
/// shared ZeroMQ context.
#[test]
fn a_dropped_link_never_wedges_the_shared_context() {
    use zbroker_client::zpipes::{Options, Reader};
    for round in 0..40 {
        let mut broker = Broker::start(&[]);
        let opts = Options::broker(&broker.name);
        let reader = Reader::open("wedge", &opts).unwrap_or_else(|e| panic!("round {round}: {e}"));
        drop(reader);
        zbroker_tests::signal(&broker.child, libc::SIGKILL);
        let _ = broker.child.wait();
    }
    let broker = Broker::start(&[]);
    let started = Instant::now();
    let opened = Reader::open("after", &Options::broker(&broker.name));
    assert!(opened.is_ok(), "{:?} after {:?}", opened.err(), started.elapsed());
}

/// `zpipes read` received bytes from the broker, then the broker dies: the
/// bytes already received should still reach standard output.
#[test]
fn received_bytes_reach_stdout_even_when_the_broker_dies() {
    use std::io::Read;
    use std::process::{Command, Stdio};
    use zbroker_client::zpipes::{Options, Writer};
    let mut broker = Broker::start(&[]);
    let mut reader = Command::new(zbroker_tests::bin("zpipes"))
        .args(["--broker", &broker.name, "read", "doomed"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut writer = Writer::open("doomed", &Options::broker(&broker.name)).unwrap();
    for _ in 0..8 {
        writer.write_chunk(&vec![7u8; 1 << 20], None).unwrap();
    }
    // Until the reader has taken 6 MiB from the broker (its stdout is not
    // read) and stopped asking: the count is of replies handed to libzmq,
    // so only once it has stood still is every one of them received (a
    // SIGKILL loses what is still in the broker's send queue).
    let mut last = (0, Instant::now());
    assert!(zbroker_tests::wait_until(Duration::from_secs(10), || {
        let moved = broker.zpipes()["bytes_moved"].as_u64().unwrap_or(0);
        if moved != last.0 {
            last = (moved, Instant::now());
        }
        moved >= 6 << 20 && last.1.elapsed() >= Duration::from_millis(500)
    }));
    let moved = last.0;
    std::mem::forget(writer);
    zbroker_tests::signal(&broker.child, libc::SIGKILL);
    let _ = broker.child.wait();
    // The consumer is slow: it comes back after the reader noticed.
    std::thread::sleep(Duration::from_millis(2500));
    let mut out = Vec::new();
    reader.stdout.take().unwrap().read_to_end(&mut out).unwrap();
    let status = reader.wait().unwrap();
    eprintln!("broker handed the reader {moved} bytes; its stdout got {}; exit {status}", out.len());
    assert_eq!(out.len() as u64, moved, "bytes the reader received were never written");
}
