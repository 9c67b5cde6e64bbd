//! Load: many pipes at once through one broker, every byte verified; many
//! FILEMQ subscribers of one tree at once, all converging. Prints the
//! broker's peak RSS and CPU time.
//!
//! CI runs a reduced load; `ZBROKER_LOAD_FULL=1` runs the full one (1,000
//! pipes of 1 MiB; 100 subscribers of a 100 MiB tree), best with a release
//! build (`cargo test --release -p zbroker-tests --test load`).

use std::collections::HashMap;
use std::time::{Duration, Instant};
use zbroker_client::filemq::{Event, Options, Subscriber};
use zbroker_proto::codec::{Chunk, ShortStr};
use zbroker_proto::ZpipesMsg as M;
use zbroker_tests::{assert_same_tree, pseudo_random, put, Broker};

fn full() -> bool {
    std::env::var_os("ZBROKER_LOAD_FULL").is_some()
}

/// Peak resident memory and CPU seconds of a process (Linux /proc).
fn usage(pid: u32) -> (u64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let peak_kib: u64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) end with ')'.
    let fields: Vec<&str> =
        stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
    let ticks: u64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    (peak_kib << 10, ticks as f64 / hz)
}

fn dealer(context: &zmq::Context, endpoint: &str) -> zmq::Socket {
    let socket = context.socket(zmq::DEALER).expect("socket");
    socket.set_linger(0).expect("linger");
    socket.set_sndhwm(0).expect("sndhwm");
    socket.set_rcvhwm(0).expect("rcvhwm");
    socket.connect(endpoint).expect("connect");
    socket
}

fn recv(socket: &zmq::Socket) -> M {
    assert!(socket.poll(zmq::POLLIN, 30_000).expect("poll") > 0, "no reply within 30 s");
    M::decode(socket.recv_bytes(0).expect("recv")).expect("the broker sends well-formed frames")
}

#[test]
fn many_pipes_at_once_every_byte_verified() {
    let (pipes, size) = if full() { (1000, 1 << 20) } else { (200, 256 << 10) };
    let chunk = 64 << 10;
    let broker = Broker::start(&[]);
    // A context holds at most 1023 sockets by default: one for each side.
    let (writer_context, reader_context) = (zmq::Context::new(), zmq::Context::new());
    let endpoint = broker.endpoint();
    let writers: Vec<zmq::Socket> = (0..pipes).map(|_| dealer(&writer_context, &endpoint)).collect();
    let readers: Vec<zmq::Socket> = (0..pipes).map(|_| dealer(&reader_context, &endpoint)).collect();
    let data: Vec<Vec<u8>> = (0..pipes).map(|i| pseudo_random(size, i as u64 + 1)).collect();
    let started = Instant::now();
    for (i, (w, r)) in writers.iter().zip(&readers).enumerate() {
        let name = ShortStr::lossy(&format!("load-{i}"));
        w.send(M::Output { pipename: name.clone() }.encode(), 0).unwrap();
        r.send(M::Input { pipename: name }.encode(), 0).unwrap();
    }
    for (w, r) in writers.iter().zip(&readers) {
        assert_eq!(recv(w), M::OutputOk {});
        assert_eq!(recv(r), M::InputOk {});
    }
    // Every pipe at once: all WRITEs and READs pipelined.
    for (i, (w, r)) in writers.iter().zip(&readers).enumerate() {
        for part in data[i].chunks(chunk) {
            w.send(M::Write { chunk: Chunk(part.to_vec().into()), timeout: 0 }.encode(), 0).unwrap();
            r.send(M::Read { size: part.len() as u32, timeout: 0 }.encode(), 0).unwrap();
        }
    }
    let mut received: HashMap<usize, Vec<u8>> = HashMap::new();
    for (i, r) in readers.iter().enumerate() {
        let got = received.entry(i).or_default();
        while got.len() < size {
            match recv(r) {
                M::ReadOk { chunk } => got.extend_from_slice(&chunk.0),
                other => panic!("pipe {i}: unexpected {other:?}"),
            }
        }
        assert!(*got == data[i], "pipe {i}: the bytes differ");
    }
    for (i, w) in writers.iter().enumerate() {
        for _ in data[i].chunks(chunk) {
            assert_eq!(recv(w), M::WriteOk {}, "pipe {i}");
        }
    }
    let elapsed = started.elapsed();
    let (peak, cpu) = usage(broker.child.id());
    eprintln!(
        "{pipes} pipes x {} KiB: {:.2} s, broker peak RSS {} MiB, broker CPU {cpu:.2} s",
        size >> 10,
        elapsed.as_secs_f64(),
        peak >> 20
    );
    assert_eq!(broker.zpipes()["pipes"].as_array().map(Vec::len), Some(pipes));
}

#[test]
fn many_subscribers_at_once_all_converge() {
    let (subscribers, files, file_size) = if full() { (100, 100, 1 << 20) } else { (10, 40, 256 << 10) };
    let publisher = tempfile::tempdir().unwrap();
    for i in 0..files {
        put(publisher.path(), &format!("d{}/f{i}", i % 10), &pseudo_random(file_size, i as u64));
    }
    let broker = Broker::start(&["--publish", publisher.path().to_str().unwrap()]);
    broker.wait_scanned();
    let started = Instant::now();
    let inboxes: Vec<tempfile::TempDir> = (0..subscribers).map(|_| tempfile::tempdir().unwrap()).collect();
    let running: Vec<Subscriber> = inboxes
        .iter()
        .map(|inbox| {
            Subscriber::start(Options::broker(&broker.name, vec!["/".into()], inbox.path().to_path_buf()))
                .expect("start a subscriber")
        })
        .collect();
    for (i, subscriber) in running.iter().enumerate() {
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            let left = deadline.checked_duration_since(Instant::now()).expect("in sync within 300 s");
            match subscriber.recv_timeout(left) {
                Ok(Event::InSync { .. }) => break,
                Ok(Event::Refused { why }) | Ok(Event::Failed { why }) => panic!("subscriber {i}: {why}"),
                Ok(_) => {}
                Err(e) => panic!("subscriber {i}: {e}"),
            }
        }
    }
    let elapsed = started.elapsed();
    for inbox in &inboxes {
        assert_same_tree(publisher.path(), inbox.path());
    }
    let (peak, cpu) = usage(broker.child.id());
    let total = (subscribers * files * file_size) as f64 / 1e6;
    eprintln!(
        "{subscribers} subscribers x {files} files of {} KiB ({total:.0} MB): {:.2} s, broker peak RSS {} MiB, broker CPU {cpu:.2} s",
        file_size >> 10,
        elapsed.as_secs_f64(),
        peak >> 20
    );
    assert_eq!(broker.filemq()["subscribers"].as_array().map(Vec::len), Some(subscribers));
    drop(running);
}
