//! `filemq subscribe` against a scripted hostile server: each attack that
//! once cost memory, wrote outside the inbox or confused the inbox's own
//! state, replayed against the real program, with its memory read from
//! /proc.

use bytes::Bytes;
use std::fs;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use zbroker_proto::codec::{Chunk, Hash, LongStr};
use zbroker_proto::filemq::Operation::Create;
use zbroker_proto::FilemqMsg;

/// The credit window the subscriber is run with.
const WINDOW: u64 = 8_000_000;
/// What the subscriber may hold at its peak: the issue's bound.
const MEMORY_BOUND: u64 = (64 << 20) + WINDOW;

fn unique_endpoint() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    format!("ipc://@/filemq-hostile/{}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed))
}

use zbroker_proto::codec::testing::sha1_hex;

fn header(entries: &[(&str, &str)]) -> Hash {
    let mut h = Hash::default();
    for (k, v) in entries {
        h.insert(k, Bytes::copy_from_slice(v.as_bytes())).unwrap();
    }
    h
}

fn burger(sequence: u64, name: &[u8], offset: u64, eof: u8, headers: Hash, data: &[u8]) -> Vec<u8> {
    FilemqMsg::Cheezburger {
        sequence,
        operation: Create,
        filename: LongStr(Bytes::copy_from_slice(name)),
        offset,
        eof,
        headers,
        chunk: Chunk(Bytes::copy_from_slice(data)),
    }
    .encode()
}

fn marker(sequence: u64) -> Vec<u8> {
    burger(sequence, b"", 0, 1, header(&[("X-SYNCED", "/data")]), b"")
}

/// A server that greets one subscriber at a time and then sends whatever
/// the test says, as fast as the subscriber takes it (never dropping a
/// frame: it waits for room, so a subscriber that buffers without bound
/// would show it).
struct Server {
    socket: zmq::Socket,
    peer: Vec<u8>,
    _context: zmq::Context,
}

impl Server {
    fn bind(endpoint: &str) -> Server {
        let context = zmq::Context::new();
        let socket = context.socket(zmq::ROUTER).unwrap();
        socket.set_linger(0).unwrap();
        socket.set_router_mandatory(true).unwrap();
        socket.set_sndhwm(4).unwrap();
        socket.bind(endpoint).unwrap();
        Server { socket, peer: Vec::new(), _context: context }
    }

    fn recv(&mut self, timeout: Duration) -> Option<FilemqMsg> {
        if self.socket.poll(zmq::POLLIN, timeout.as_millis() as i64).unwrap() == 0 {
            return None;
        }
        let frames = self.socket.recv_multipart(0).unwrap();
        self.peer = frames[0].clone();
        FilemqMsg::decode(frames[1].clone()).ok()
    }

    /// Waits for OHAI, answers, waits for ICANHAZ (returned), answers,
    /// and waits for the first NOM.
    fn greet(&mut self) -> FilemqMsg {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut icanhaz = None;
        while Instant::now() < deadline {
            match self.recv(Duration::from_millis(200)) {
                Some(FilemqMsg::Ohai { .. }) => {
                    self.send(&FilemqMsg::OhaiOk {}.encode());
                }
                Some(msg @ FilemqMsg::Icanhaz { .. }) => {
                    self.send(&FilemqMsg::IcanhazOk {}.encode());
                    icanhaz = Some(msg);
                }
                Some(FilemqMsg::Nom { .. }) if icanhaz.is_some() => return icanhaz.unwrap(),
                _ => {}
            }
        }
        panic!("no subscriber came");
    }

    /// Sends one frame, waiting (up to 10 s) while the subscriber's queue
    /// is full. False if the subscriber is gone.
    fn send(&self, frame: &[u8]) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let sent = self
                .socket
                .send(self.peer.as_slice(), zmq::SNDMORE | zmq::DONTWAIT)
                .and_then(|()| self.socket.send(frame, zmq::DONTWAIT));
            match sent {
                Ok(()) => return true,
                Err(zmq::Error::EAGAIN) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(_) => return false,
            }
        }
    }
}

fn filemq(endpoint: &str, inbox: &Path, extra: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_filemq"))
        .args(["subscribe", "/data", "--inbox", inbox.to_str().unwrap(), "--endpoint", endpoint])
        .args(["--window", &WINDOW.to_string()])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Peak resident memory of a process, from /proc.
fn peak_rss(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn assert_bounded(child: &Child, what: &str) {
    let peak = peak_rss(child.id());
    assert!(peak > 0, "cannot read the subscriber's memory");
    assert!(peak < MEMORY_BOUND, "{what}: the subscriber peaked at {} MB", peak >> 20);
    println!("{what}: subscriber peak RSS {} MB (bound {} MB)", peak >> 20, MEMORY_BOUND >> 20);
}

/// Ends the child and returns (status, stdout, stderr).
fn finish(child: Child) -> (Option<i32>, String, String) {
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn refused_names_are_counted_not_remembered() {
    let endpoint = unique_endpoint();
    let mut server = Server::bind(&endpoint);
    let dir = tempfile::tempdir().unwrap();
    let child = filemq(&endpoint, dir.path(), &["--once", "--timeout", "60000"]);
    server.greet();
    let long = format!("/.h{}", "x".repeat(1_000_000));
    let count = 300u64;
    for i in 0..count {
        let name = format!("{long}{i}");
        assert!(server.send(&burger(i, name.as_bytes(), 0, 1, Hash::default(), b"")), "frame {i}");
    }
    assert!(server.send(&marker(count)));
    assert_bounded(&child, "300 refused names of 1 MB");
    let (code, _, err) = finish(child);
    assert_eq!(code, Some(5), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.len() < 2000, "names are cut for display: {} bytes", err.len());
    assert!(err.contains(&format!("{count} file(s) could not be fetched")), "{err}");
}

#[test]
fn frames_beyond_the_credit_or_the_ceilings_cost_no_memory() {
    let endpoint = unique_endpoint();
    let mut server = Server::bind(&endpoint);
    let dir = tempfile::tempdir().unwrap();
    let child = filemq(&endpoint, dir.path(), &[]);
    server.greet();
    // A header hash of a million empty entries in a frame the window allows.
    let mut frame = burger(0, b"/data/h", 0, 0, Hash::default(), b"");
    let at = frame.len() - 4 - 4; // the headers' count, then an empty chunk
    frame[at..at + 4].copy_from_slice(&1_500_000u32.to_be_bytes());
    let mut entries = vec![0u8; 1_500_000 * 5];
    entries.extend_from_slice(&[0, 0, 0, 0]);
    frame.truncate(at + 4);
    frame.extend_from_slice(&entries);
    for _ in 0..20 {
        if !server.send(&frame) {
            break;
        }
    }
    // Frames of 60 MB: libzmq refuses them before buffering them (the
    // connection drops), and the subscriber comes back.
    let huge = burger(0, b"/data/huge", 0, 0, Hash::default(), &vec![7u8; 60_000_000]);
    for _ in 0..5 {
        if !server.send(&huge) {
            break;
        }
    }
    server.greet();
    // A chunk beyond the credit granted: the session is left at once.
    let beyond = vec![7u8; WINDOW as usize + 10_000];
    for sequence in 0..10 {
        if !server.send(&burger(
            sequence,
            b"/data/big",
            sequence * beyond.len() as u64,
            0,
            Hash::default(),
            &beyond,
        )) {
            break;
        }
    }
    server.greet();
    assert_bounded(&child, "huge header hashes and chunks beyond the credit");
    let mut child = child;
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!dir.path().join("big").exists());
}

#[test]
fn no_name_can_poison_the_digest_cache() {
    let endpoint = unique_endpoint();
    let mut server = Server::bind(&endpoint);
    let dir = tempfile::tempdir().unwrap();
    let (x, y) = (vec![b'X'; 64], vec![b'Y'; 64]);
    let announce = |data: &[u8]| header(&[("X-SHA1", &sha1_hex(data)), ("X-SIZE", "64")]);
    let child = filemq(&endpoint, dir.path(), &["--once", "--timeout", "20000"]);
    server.greet();
    assert!(server.send(&burger(0, b"/data/dup", 0, 1, announce(&x), &x)));
    assert!(server.send(&burger(1, b"/data/dup\r", 0, 1, announce(&y), &y)));
    assert!(server.send(&marker(2)));
    let (code, out, err) = finish(child);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out, "updated dup\nupdated dup\\r\n");
    // After a restart, what the cache says of each is what each holds.
    let child = filemq(&endpoint, dir.path(), &["--once", "--timeout", "20000"]);
    let FilemqMsg::Icanhaz { cache, .. } = server.greet() else { unreachable!() };
    assert!(server.send(&marker(0)));
    let (code, _, err) = finish(child);
    assert_eq!(code, Some(0), "{err}");
    let digest = |key: &str| cache.get(key).map(|v| v.to_string_lossy());
    assert_eq!(digest("dup"), Some(sha1_hex(&x)));
    assert_eq!(digest("dup\r"), Some(sha1_hex(&y)));
    assert_eq!(fs::read(dir.path().join("dup")).unwrap(), x);
}

#[test]
fn a_refused_path_creates_nothing() {
    let endpoint = unique_endpoint();
    let mut server = Server::bind(&endpoint);
    let dir = tempfile::tempdir().unwrap();
    let child = filemq(&endpoint, dir.path(), &["--once", "--timeout", "20000"]);
    server.greet();
    let deep = format!("/data/{}z", "a/".repeat(2600));
    assert!(server.send(&burger(0, deep.as_bytes(), 0, 1, Hash::default(), b"deep")));
    assert!(server.send(&marker(1)));
    let (code, _, err) = finish(child);
    assert_eq!(code, Some(5), "{err}");
    let left: Vec<_> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left, [".filemq"], "nothing but our private area");
}

#[test]
fn links_planted_in_the_private_area_are_not_followed() {
    let endpoint = unique_endpoint();
    let mut server = Server::bind(&endpoint);
    let dir = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let victim = outside.path().join("victim");
    fs::write(&victim, b"precious").unwrap();
    let data = b"from the server".to_vec();
    let digest = sha1_hex(&data);
    fs::create_dir_all(dir.path().join(".filemq/partial")).unwrap();
    std::os::unix::fs::symlink(&victim, dir.path().join(".filemq/partial").join(&digest)).unwrap();
    std::os::unix::fs::symlink(&victim, dir.path().join(".filemq/digests.new")).unwrap();
    let child = filemq(&endpoint, dir.path(), &["--once", "--timeout", "20000"]);
    let FilemqMsg::Icanhaz { options, .. } = server.greet() else { unreachable!() };
    assert!(options.get("X-RESUME").is_none(), "a planted link is no partial file");
    let announce = header(&[("X-SHA1", &digest), ("X-SIZE", &data.len().to_string())]);
    // A resume of the planted "part" at offset 3, then the whole file.
    assert!(server.send(&burger(0, b"/data/r", 3, 1, announce.clone(), &data[3..])));
    assert!(server.send(&burger(1, b"/data/f", 0, 1, announce, &data)));
    assert!(server.send(&marker(2)));
    let (code, _, err) = finish(child);
    assert_eq!(code, Some(5), "the resume is refused: {err}");
    assert_eq!(fs::read(&victim).unwrap(), b"precious");
    assert!(fs::symlink_metadata(dir.path().join("f")).unwrap().is_file());
    assert_eq!(fs::read(dir.path().join("f")).unwrap(), data);
}
