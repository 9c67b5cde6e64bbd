//! The integration-test harness: starts the real `zbroker` binary under a
//! name of its own (tests run in parallel), finds the `zpipes` and `filemq`
//! programs, speaks raw ZPIPES bytes over real DEALER sockets, and compares
//! directory trees by digest.
//!
//! The binaries are the ones `cargo test --workspace` builds into the same
//! target directory as the test executables (built on demand when a test
//! runs alone); `ZBROKER_BIN_DIR` overrides.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use zbroker_proto::ZpipesMsg;

/// Path of one of the workspace's programs (`zbroker`, `zpipes`, `filemq`).
/// A test run alone (`cargo test -p zbroker-tests --test NAME`) does not
/// build them, so the first test that finds one missing builds them all
/// into the same target directory and profile, once per test process.
pub fn bin(name: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os("ZBROKER_BIN_DIR") {
        return PathBuf::from(dir).join(name);
    }
    // target/<profile>/deps/<test exe> → target/<profile>/<name>
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe.parent().and_then(|deps| deps.parent()).expect("target/<profile>");
    let path = profile_dir.join(name);
    if !path.exists() {
        build_programs(profile_dir);
    }
    assert!(path.exists(), "{} is missing and `cargo build` did not make it", path.display());
    path
}

/// Builds the workspace's programs into `profile_dir` (`target/debug` or
/// `target/release`).
fn build_programs(profile_dir: &Path) {
    static BUILT: std::sync::Once = std::sync::Once::new();
    BUILT.call_once(|| {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let target_dir = profile_dir.parent().expect("target directory");
        let mut command = Command::new(cargo);
        command
            .args(["build", "--bins", "-p", "zbroker", "-p", "zbroker-client", "--target-dir"])
            .arg(target_dir)
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        if profile_dir.file_name().is_some_and(|p| p == "release") {
            command.arg("--release");
        }
        eprintln!("building the programs the tests start: {command:?}");
        let status = command.status().expect("run cargo build");
        assert!(status.success(), "cargo build of the programs failed: {status}");
    });
}

/// A broker name no other test uses.
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    format!("{prefix}-{}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed))
}

/// Polls `cond` every 10 ms until it holds or `limit` passes.
pub fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    cond()
}

/// The STATUS reply of the broker called `name` (a process or one embedded
/// with `zbroker::reactor::spawn`), or `None` if it does not answer within
/// `timeout`.
pub fn status_of(name: &str, timeout: Duration) -> Option<serde_json::Value> {
    let context = zmq::Context::new();
    let socket = context.socket(zmq::DEALER).ok()?;
    socket.set_linger(0).ok()?;
    socket.connect(&zbroker_client::endpoint::control(name)).ok()?;
    socket.send("STATUS", 0).ok()?;
    if socket.poll(zmq::POLLIN, timeout.as_millis() as i64).ok()? == 0 {
        return None;
    }
    serde_json::from_slice(&socket.recv_bytes(0).ok()?).ok()
}

/// A running `zbroker` process, stopped (SIGTERM, then SIGKILL) on drop.
pub struct Broker {
    pub name: String,
    pub child: Child,
    /// Digests kept between runs, unless the test passed `--state-dir`.
    _state: Option<tempfile::TempDir>,
}

impl Broker {
    /// Starts `zbroker NAME ARGS...` and waits until it answers status.
    pub fn start(args: &[&str]) -> Broker {
        Self::start_named(&unique_name("t"), args)
    }

    pub fn start_named(name: &str, args: &[&str]) -> Broker {
        Self::start_with(name, args, |_| {})
    }

    /// `start_named`, with `configure` applied to the command last (to
    /// capture its standard error, say).
    pub fn start_with(name: &str, args: &[&str], configure: impl FnOnce(&mut Command)) -> Broker {
        Self::spawn(name, args, !args.contains(&"--state-dir"), configure)
    }

    /// `start_with`, without a `--state-dir` of the harness's: the test's
    /// config file (or the default) says where the state goes.
    pub fn start_as_configured(name: &str, args: &[&str], configure: impl FnOnce(&mut Command)) -> Broker {
        Self::spawn(name, args, false, configure)
    }

    fn spawn(name: &str, args: &[&str], own_state: bool, configure: impl FnOnce(&mut Command)) -> Broker {
        let mut command = Command::new(bin("zbroker"));
        command.arg(name).args(args);
        let state = if !own_state {
            None
        } else {
            let dir = tempfile::tempdir().expect("a state directory");
            command.arg("--state-dir").arg(dir.path());
            Some(dir)
        };
        command
            // ZBROKER_TEST_LOG=debug shows the broker's side of a test.
            .env("RUST_LOG", std::env::var("ZBROKER_TEST_LOG").unwrap_or_else(|_| "warn".into()))
            .stdin(Stdio::null());
        configure(&mut command);
        let child = command.spawn().expect("start zbroker");
        let mut broker = Broker { name: name.to_string(), child, _state: state };
        let up = wait_until(Duration::from_secs(10), || {
            broker.try_status().is_some() || broker.child.try_wait().ok().flatten().is_some()
        });
        assert!(up, "zbroker {name} did not come up");
        assert!(broker.child.try_wait().unwrap().is_none(), "zbroker {name} exited at start");
        broker
    }

    /// The ZPIPES endpoint clients use for this broker by name.
    pub fn endpoint(&self) -> String {
        zbroker_client::endpoint::zpipes(&self.name)
    }

    /// The broker's own status report, or `None` if it does not answer.
    pub fn try_status(&self) -> Option<serde_json::Value> {
        status_of(&self.name, Duration::from_secs(1))
    }

    pub fn status(&self) -> serde_json::Value {
        self.try_status().expect("broker answers status")
    }

    /// The state directory the harness gave the broker (its control token
    /// is there), unless the test passed its own `--state-dir`.
    pub fn state_dir(&self) -> Option<&Path> {
        self._state.as_ref().map(|d| d.path())
    }

    /// The FILEMQ endpoint clients use for this broker by name.
    pub fn filemq_endpoint(&self) -> String {
        zbroker_client::endpoint::filemq(&self.name)
    }

    /// The first TCP endpoint the broker bound (with `--bind tcp://127.0.0.1:*`).
    pub fn tcp_endpoint(&self) -> String {
        let status = self.status();
        let endpoints = status["endpoints"].as_array().cloned().unwrap_or_default();
        endpoints
            .iter()
            .filter_map(|e| e.as_str())
            .find(|e| e.starts_with("tcp://"))
            .expect("the broker was started with a TCP --bind")
            .to_string()
    }

    /// The FILEMQ part of the status.
    pub fn filemq(&self) -> serde_json::Value {
        self.status()["services"]["filemq"].clone()
    }

    /// Chunk payload bytes the broker has sent to FILEMQ subscribers.
    pub fn filemq_bytes_sent(&self) -> u64 {
        self.filemq()["bytes_sent"].as_u64().expect("bytes_sent in the status")
    }

    /// Waits until every mount has finished its first scan.
    pub fn wait_scanned(&self) {
        let done = wait_until(Duration::from_secs(60), || {
            let mounts = self.filemq()["mounts"].as_array().cloned().unwrap_or_default();
            mounts.iter().all(|m| m["scanned"].as_bool() == Some(true))
        });
        assert!(done, "the broker's mounts were not scanned within 60 s");
    }

    /// The ZPIPES part of the status.
    pub fn zpipes(&self) -> serde_json::Value {
        self.status()["services"]["zpipes"].clone()
    }

    /// Resident memory of the broker process, in bytes (Linux).
    pub fn rss(&self) -> u64 {
        let statm = std::fs::read_to_string(format!("/proc/{}/statm", self.child.id())).unwrap_or_default();
        let pages: u64 = statm.split_whitespace().nth(1).and_then(|p| p.parse().ok()).unwrap_or(0);
        pages * 4096
    }

    /// Peak resident memory of the broker process so far (VmHWM), in bytes.
    pub fn peak_rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap_or("");
        let kib: u64 = line.split_whitespace().nth(1).and_then(|k| k.parse().ok()).unwrap_or(0);
        kib * 1024
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        signal(&self.child, libc::SIGTERM);
        wait_timeout(&mut self.child, Duration::from_secs(10)).expect("broker stops within 10 s")
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            signal(&self.child, libc::SIGTERM);
            if wait_timeout(&mut self.child, Duration::from_secs(5)).is_none() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
    }
}

pub fn signal(child: &Child, sig: i32) {
    // SAFETY: kill(2) on a child we own; no memory is touched.
    unsafe {
        libc::kill(child.id() as i32, sig);
    }
}

pub fn wait_timeout(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let mut status = None;
    wait_until(limit, || {
        status = child.try_wait().ok().flatten();
        status.is_some()
    });
    status
}

/// A raw DEALER speaking ZPIPES bytes, to pin the wire.
pub struct Raw {
    pub socket: zmq::Socket,
    _context: zmq::Context,
}

impl Raw {
    pub fn connect(endpoint: &str) -> Raw {
        Self::connect_with_rcvhwm(endpoint, 1000)
    }

    /// With a receive queue of at most `hwm` frames, so what the test does
    /// not read stays at the broker.
    pub fn connect_with_rcvhwm(endpoint: &str, hwm: i32) -> Raw {
        let context = zmq::Context::new();
        let socket = context.socket(zmq::DEALER).unwrap();
        socket.set_rcvhwm(hwm).unwrap();
        socket.set_linger(0).unwrap();
        socket.connect(endpoint).unwrap();
        Raw { socket, _context: context }
    }

    pub fn send_bytes(&self, bytes: &[u8]) {
        self.socket.send(bytes, 0).unwrap();
    }

    pub fn send(&self, msg: ZpipesMsg) {
        self.send_bytes(&msg.encode());
    }

    /// The next frame within `ms`, raw.
    pub fn recv_bytes(&self, ms: i64) -> Option<Vec<u8>> {
        if self.socket.poll(zmq::POLLIN, ms).unwrap() == 0 {
            return None;
        }
        Some(self.socket.recv_bytes(0).unwrap())
    }

    /// The next message within `ms`, decoded.
    pub fn recv(&self, ms: i64) -> Option<ZpipesMsg> {
        self.recv_bytes(ms).map(|f| ZpipesMsg::decode(f).expect("the broker sends well-formed frames"))
    }

    /// Sends and expects a reply within 2 s.
    pub fn ask(&self, msg: ZpipesMsg) -> ZpipesMsg {
        self.send(msg);
        self.recv(2000).expect("a reply within 2 s")
    }
}

/// A xorshift generator: tests that pick at random stay reproducible from
/// their seed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// A number below `n` (which must not be 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    /// An index below `len` (which must not be 0).
    pub fn index(&mut self, len: usize) -> usize {
        self.below(len as u64) as usize
    }
}

/// Deterministic pseudo-random bytes (xorshift), so a failure reproduces.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        out.extend_from_slice(&rng.next().to_le_bytes());
    }
    out.truncate(len);
    out
}

pub use zbroker_proto::codec::testing::{hex, sha1_hex};

/// SHA-1 (upper-case hex) of every file under `root`, by path relative to
/// it, skipping hidden entries as a publisher does.
pub fn tree_digests(root: &Path) -> BTreeMap<String, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for entry in entries.flatten() {
            let name = entry.file_name();
            if name.to_string_lossy().starts_with('.') {
                continue;
            }
            let path = entry.path();
            if path.is_dir() {
                walk(root, &path, out);
            } else if let Ok(data) = std::fs::read(&path) {
                let rel = path.strip_prefix(root).unwrap_or(&path).to_string_lossy().into_owned();
                out.insert(rel, sha1_hex(&data));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// Waits until the two trees hold the same files with the same digests.
pub fn wait_converged(publisher: &Path, inbox: &Path, limit: Duration) -> bool {
    wait_until(limit, || tree_digests(publisher) == tree_digests(inbox))
}

/// Writes `data` to `root/rel`, creating folders.
pub fn put(root: &Path, rel: &str, data: &[u8]) {
    let path = root.join(rel);
    std::fs::create_dir_all(path.parent().expect("a parent")).expect("create folders");
    std::fs::write(path, data).expect("write a file");
}

/// A running `filemq subscribe` process; its stdout lines arrive on
/// `lines`. Killed on drop.
pub struct Subscriber {
    pub child: Child,
    pub lines: mpsc::Receiver<String>,
}

impl Subscriber {
    /// Starts `filemq subscribe ARGS...` (give it the paths, `--inbox` and
    /// `--broker`/`--endpoint`).
    pub fn start(args: &[&str]) -> Subscriber {
        let mut child = Command::new(bin("filemq"))
            .arg("subscribe")
            .args(args)
            .env("RUST_LOG", std::env::var("ZBROKER_TEST_LOG").unwrap_or_else(|_| "warn".into()))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start filemq");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Subscriber { child, lines }
    }

    /// Waits for a stdout line equal to `want`; returns the lines seen.
    pub fn expect_line(&self, want: &str, limit: Duration) -> Vec<String> {
        let deadline = Instant::now() + limit;
        let mut seen = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let done = line == want;
                    seen.push(line);
                    if done {
                        return seen;
                    }
                }
                Err(_) => break,
            }
        }
        panic!("no line {want:?} within {limit:?}; saw {seen:?}");
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.kill();
        }
    }
}

/// Asserts that two trees hold the same files with the same digests,
/// naming (a few of) the differences rather than printing both trees.
pub fn assert_same_tree(publisher: &Path, inbox: &Path) {
    let want = tree_digests(publisher);
    let got = tree_digests(inbox);
    let missing: Vec<&String> = want.keys().filter(|k| !got.contains_key(*k)).take(5).collect();
    let extra: Vec<&String> = got.keys().filter(|k| !want.contains_key(*k)).take(5).collect();
    let differ: Vec<&String> =
        want.keys().filter(|k| got.get(*k).is_some_and(|d| d != &want[*k])).take(5).collect();
    assert!(
        missing.is_empty() && extra.is_empty() && differ.is_empty(),
        "trees differ ({} vs {} files): missing {missing:?}, extra {extra:?}, different {differ:?}",
        want.len(),
        got.len()
    );
}

/// The ICANHAZ frames of the "one client freezes the loop" attack, for the
/// test (`tests/loop_bound.rs`) and the bench (`benches/loop_bound.rs`).
pub mod bomb {
    use zbroker_proto::codec::{Hash, LongStr};
    use zbroker_proto::filemq::{ceiling, FilemqMsg};

    /// ICANHAZ header: path, then an options hash with RESYNC (if asked).
    pub fn icanhaz_head(path: &str, resync: bool) -> Vec<u8> {
        let mut options = Hash::default();
        if resync {
            options.insert("RESYNC", "1").unwrap();
        }
        let mut frame =
            FilemqMsg::Icanhaz { path: LongStr::from(path), options, cache: Hash::default() }.encode();
        frame.truncate(frame.len() - 4); // the empty cache's count
        frame
    }

    /// The bomb: a cache hash of 12,000,000 empty entries.
    pub fn bomb() -> Vec<u8> {
        let mut frame = icanhaz_head("/bomb", true);
        frame.extend(12_000_000u32.to_be_bytes());
        frame.resize(frame.len() + 12_000_000 * 5, 0);
        frame
    }

    /// A legitimate cache at the entry ceiling: real names, 40-hex digests.
    pub fn million_files(path: &str) -> Vec<u8> {
        let mut frame = icanhaz_head(path, false);
        frame.extend((ceiling::CACHE_ENTRIES as u32).to_be_bytes());
        for i in 0..ceiling::CACHE_ENTRIES {
            let name = format!("photos/{:03}/img-{i:07}.jpg", i % 1000);
            frame.push(name.len() as u8);
            frame.extend(name.as_bytes());
            frame.extend(40u32.to_be_bytes());
            frame.extend(format!("{:040X}", (i as u128).wrapping_mul(0x9E37_79B9_7F4A_7C15)).as_bytes());
        }
        frame
    }
}
