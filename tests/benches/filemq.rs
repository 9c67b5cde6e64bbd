//! FILEMQ transfer times beside `cp -r` (and rsync, where installed) on
//! the same machine, in the same run.
//!
//! Runs the broker in-process (its reactor on a thread of its own, bound to
//! `tcp://127.0.0.1:*`) publishing two trees, and subscribes to them with
//! the client library over TCP loopback:
//! - `big`: one file of `FILEMQ_BENCH_BYTES` (1 GiB) to one subscriber;
//! - `small`: `FILEMQ_BENCH_FILES` files of 4 KiB, 100 to a folder, to one
//!   subscriber;
//! - `fanout`: the big file to `FILEMQ_BENCH_SUBSCRIBERS` (8) subscribers
//!   at once, until the last reports in sync (beside as many concurrent
//!   `cp -r`);
//! - `resync`: a second subscriber into an inbox that already holds each
//!   tree must be in sync without one file byte sent (the broker's
//!   `bytes_sent` counter, read over the control endpoint, must not move).
//!
//! A transfer is timed from `Subscriber::start` to its `InSync` event; the
//! broker has hashed the trees before (its first scan is waited for). The
//! page cache is flushed (`sync`) before each timed run, so no run pays for
//! the previous one's write-back. After each transfer the inbox is checked
//! file by file (size and SHA-1) against the published tree: a wrong
//! transfer panics.
//!
//! `cargo bench -p zbroker-tests --bench filemq`. Environment:
//! - `FILEMQ_BENCH_BYTES`: size of the big file, e.g. `256MiB` (default 1 GiB);
//! - `FILEMQ_BENCH_FILES`: number of small files (default 10000);
//! - `FILEMQ_BENCH_SUBSCRIBERS`: subscribers of the fan-out (default 8);
//! - `FILEMQ_BENCH_WINDOW`: the subscribers' credit window, e.g. `16MB`
//!   (default: the library's, `filemq::DEFAULT_WINDOW`);
//! - `FILEMQ_BENCH_ONLY`: `big`, `small`, `fanout` or `resync`;
//! - `FILEMQ_BENCH_DIR`: where the trees go (default the system temp
//!   directory; removed at the end);
//! - `FILEMQ_BENCH_TIMEOUT`: seconds before the run gives up (default 1800).
//!
//! Without `--bench` (as under `cargo test --all-targets`) it makes a short
//! smoke run instead: 4 MiB, 200 files, 2 subscribers.

use anyhow::{bail, ensure, Context as _};
use sha1::{Digest as _, Sha1};
use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime};
use zbroker::reactor::{Reactor, Settings};
use zbroker_client::endpoint;
use zbroker_client::filemq::{self as client, Event, Options, Subscriber};
use zbroker_services::filemq::{self, Filemq};

const SMALL_FILE: usize = 4 << 10;
const FILES_PER_FOLDER: u64 = 100;
const BLOCK: usize = 1 << 20;
/// Virtual paths the two trees are published under.
const BIG: &str = "/big";
const SMALL: &str = "/small";

/// What the bench is doing, for the watchdog's message.
static PHASE: Mutex<String> = Mutex::new(String::new());

fn phase(what: impl Into<String>) {
    *PHASE.lock().unwrap_or_else(|e| e.into_inner()) = what.into();
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Scenario {
    Big,
    Small,
    Fanout,
    Resync,
}

struct Args {
    bytes: u64,
    files: u64,
    subscribers: usize,
    window: u64,
    only: Option<Scenario>,
    dir: PathBuf,
    timeout: Duration,
}

impl Args {
    fn from_env() -> anyhow::Result<Args> {
        let var = |name| std::env::var(name).ok().filter(|v: &String| !v.is_empty());
        let size = |name, default| -> anyhow::Result<u64> {
            var(name).map_or(Ok(default), |v| zbroker_client::size::parse(&v).context(name))
        };
        let number = |name, default| -> anyhow::Result<u64> {
            var(name).map_or(Ok(default), |v| v.parse().with_context(|| format!("{name}={v:?}")))
        };
        let only = match var("FILEMQ_BENCH_ONLY").as_deref() {
            None => None,
            Some("big") => Some(Scenario::Big),
            Some("small") => Some(Scenario::Small),
            Some("fanout") => Some(Scenario::Fanout),
            Some("resync") => Some(Scenario::Resync),
            Some(other) => bail!("FILEMQ_BENCH_ONLY={other:?}: use big, small, fanout or resync"),
        };
        let window = size("FILEMQ_BENCH_WINDOW", client::DEFAULT_WINDOW)?;
        ensure!(window > 0, "FILEMQ_BENCH_WINDOW must be at least 1 byte");
        Ok(Args {
            bytes: size("FILEMQ_BENCH_BYTES", 1 << 30)?,
            files: number("FILEMQ_BENCH_FILES", 10_000)?,
            subscribers: number("FILEMQ_BENCH_SUBSCRIBERS", 8)?.max(1) as usize,
            window,
            only,
            dir: var("FILEMQ_BENCH_DIR").map_or_else(std::env::temp_dir, PathBuf::from),
            timeout: Duration::from_secs(number("FILEMQ_BENCH_TIMEOUT", 1800)?),
        })
    }

    fn runs(&self, scenario: Scenario) -> bool {
        self.only.is_none_or(|only| only == scenario)
    }
}

fn main() {
    // No `allocator::keep_freed_buffers()` here: the broker and the
    // subscribers share this process, and the `filemq` program does not set
    // the thresholds, so setting them would flatter the subscriber side.
    let mut args = match Args::from_env() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("filemq bench: {e:#}");
            std::process::exit(1);
        }
    };
    // `cargo bench` passes --bench; `cargo test --all-targets` does not, and
    // then a small smoke run checks that the harness works.
    if !std::env::args().any(|a| a == "--bench") {
        args.bytes = args.bytes.min(4 << 20);
        args.files = args.files.min(200);
        args.subscribers = args.subscribers.min(2);
    }
    start_watchdog(args.timeout);
    std::fs::create_dir_all(&args.dir).expect("FILEMQ_BENCH_DIR cannot be created");
    let work = tempfile::Builder::new()
        .prefix("filemq-bench-")
        .tempdir_in(&args.dir)
        .expect("cannot create the bench's directory");
    run(&args, work.path());
    // The broker has stopped (with `run`'s `Bench`); its disk work may
    // still be finishing.
    phase("cleaning up");
    let dir = work.keep();
    let mut result = Ok(());
    for _ in 0..50 {
        result = match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            other => other,
        };
        if result.is_ok() {
            break;
        }
        thread::sleep(Duration::from_millis(100));
    }
    if let Err(e) = result {
        eprintln!("filemq bench: cannot remove {}: {e}", dir.display());
    }
}

fn run(args: &Args, work: &Path) {
    let need_big = args.runs(Scenario::Big) || args.runs(Scenario::Fanout) || args.runs(Scenario::Resync);
    let need_small = args.runs(Scenario::Small) || args.runs(Scenario::Resync);
    eprintln!(
        "filemq bench in {}: big file {}, {} small files of 4 KiB, {} subscribers, window {} bytes",
        work.display(),
        human_bytes(args.bytes),
        args.files,
        args.subscribers,
        args.window
    );

    phase("writing the trees");
    let mut mounts = Vec::new();
    let big = need_big.then(|| {
        let tree = make_big(&work.join("pub-big"), args.bytes);
        mounts.push((tree.root.clone(), BIG));
        tree
    });
    let small = need_small.then(|| {
        let tree = make_small(&work.join("pub-small"), args.files);
        mounts.push((tree.root.clone(), SMALL));
        tree
    });

    phase("starting the broker");
    let broker = Broker::start(work, mounts);
    let scan = broker.wait_scanned(&[big.as_ref(), small.as_ref()]);
    eprintln!("broker {} at {}: first scan and hash took {:.2} s", broker.name, broker.endpoint, secs(scan));

    let rsync = Rsyncd::start(work);
    let mut bench = Bench {
        broker,
        window: args.window,
        work: work.to_path_buf(),
        rsync,
        rows: Vec::new(),
        runs: Default::default(),
    };
    // Inboxes kept for the resync scenario.
    let mut filled = BTreeMap::new();
    if let (true, Some(tree)) = (args.runs(Scenario::Big), &big) {
        let inbox = bench.single("big: 1 file", tree);
        filled.insert(BIG, inbox);
    }
    if let (true, Some(tree)) = (args.runs(Scenario::Small), &small) {
        let inbox = bench.single("small: 4 KiB files", tree);
        filled.insert(SMALL, inbox);
    }
    if let (true, Some(tree)) = (args.runs(Scenario::Fanout), &big) {
        bench.fanout(tree, args.subscribers);
    }
    if args.runs(Scenario::Resync) {
        for tree in [&big, &small].into_iter().flatten() {
            let inbox = match filled.remove(tree.alias) {
                Some(inbox) => inbox,
                None => bench.fill(tree),
            };
            bench.resync(tree, &inbox);
            remove(&inbox);
        }
    }
    for inbox in filled.values() {
        remove(inbox);
    }
    bench.report(args);
}

/// A hung broker or subscriber must not hang the run: exit with a message
/// instead.
fn start_watchdog(limit: Duration) {
    thread::spawn(move || {
        thread::sleep(limit);
        let phase = PHASE.lock().unwrap_or_else(|e| e.into_inner()).clone();
        eprintln!("filemq bench: gave up after {} s during {phase}", limit.as_secs());
        std::process::exit(2);
    });
}

// ---- the published trees ----

/// A published tree and what every file in it must be.
struct Tree {
    root: PathBuf,
    alias: &'static str,
    /// Relative path → (size, SHA-1).
    files: BTreeMap<String, (u64, [u8; 20])>,
    bytes: u64,
}

/// Files an hour old are stable at once for the broker: the first scan
/// publishes them all.
fn age(file: &std::fs::File) {
    file.set_modified(SystemTime::now() - Duration::from_secs(3600)).expect("cannot set a file's mtime");
}

/// Deterministic pseudo-random bytes (xorshift).
fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// One file of `bytes`: a pseudo-random 1 MiB block stamped with its
/// index, so every block differs.
fn make_big(root: &Path, bytes: u64) -> Tree {
    std::fs::create_dir_all(root).expect("cannot create the big tree");
    let path = root.join("big.bin");
    let mut file = std::fs::File::create(&path).expect("cannot create the big file");
    let mut block = pseudo_random(BLOCK, 0xb16);
    let mut sha = Sha1::new();
    let (mut left, mut index) = (bytes, 0u64);
    while left > 0 {
        block[..8].copy_from_slice(&index.to_le_bytes());
        let n = left.min(BLOCK as u64) as usize;
        file.write_all(&block[..n]).expect("cannot write the big file");
        sha.update(&block[..n]);
        left -= n as u64;
        index += 1;
    }
    age(&file);
    let files = BTreeMap::from([("big.bin".to_string(), (bytes, sha.finalize().into()))]);
    Tree { root: root.to_path_buf(), alias: BIG, files, bytes }
}

/// `count` files of 4 KiB, 100 to a folder, each different.
fn make_small(root: &Path, count: u64) -> Tree {
    let mut data = pseudo_random(SMALL_FILE, 0x5ea11);
    let mut files = BTreeMap::new();
    for i in 0..count {
        let rel = format!("d{:04}/f{:04}.bin", i / FILES_PER_FOLDER, i % FILES_PER_FOLDER);
        let path = root.join(&rel);
        if i % FILES_PER_FOLDER == 0 {
            std::fs::create_dir_all(path.parent().expect("a folder")).expect("cannot create a folder");
        }
        data[..8].copy_from_slice(&i.to_le_bytes());
        let mut file = std::fs::File::create(&path).expect("cannot create a small file");
        file.write_all(&data).expect("cannot write a small file");
        age(&file);
        files.insert(rel, (SMALL_FILE as u64, Sha1::digest(&data).into()));
    }
    std::fs::create_dir_all(root).expect("cannot create the small tree");
    Tree { root: root.to_path_buf(), alias: SMALL, files, bytes: count * SMALL_FILE as u64 }
}

/// Panics unless `dir` holds exactly the tree's files (hidden entries,
/// such as the subscriber's `.filemq/`, aside), each of the right size and
/// SHA-1.
fn verify(tree: &Tree, dir: &Path, what: &str) {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, PathBuf)>) {
        let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()));
        for entry in entries {
            let entry = entry.unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()));
            if entry.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            let path = entry.path();
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                walk(root, &path, out);
            } else {
                let rel = path.strip_prefix(root).unwrap_or(&path).to_string_lossy().into_owned();
                out.push((rel, path));
            }
        }
    }
    phase(format!("verifying {what}"));
    let mut found = Vec::new();
    walk(dir, dir, &mut found);
    let mut buf = vec![0u8; BLOCK];
    let mut seen = 0;
    for (rel, path) in found {
        let Some(&(size, digest)) = tree.files.get(&rel) else {
            panic!("{what}: {} holds {rel:?}, which was never published", dir.display());
        };
        let mut file =
            std::fs::File::open(&path).unwrap_or_else(|e| panic!("{what}: cannot open {rel}: {e}"));
        let (mut sha, mut len) = (Sha1::new(), 0u64);
        loop {
            let n = file.read(&mut buf).unwrap_or_else(|e| panic!("{what}: cannot read {rel}: {e}"));
            if n == 0 {
                break;
            }
            sha.update(&buf[..n]);
            len += n as u64;
        }
        assert_eq!(len, size, "{what}: {rel} has {len} bytes, published {size}");
        assert!(<[u8; 20]>::from(sha.finalize()) == digest, "{what}: {rel} differs from the published file");
        seen += 1;
    }
    assert_eq!(seen, tree.files.len(), "{what}: {seen} files arrived of {} published", tree.files.len());
}

// ---- the broker ----

/// The embedded broker; stopped on drop.
struct Broker {
    name: String,
    /// The TCP endpoint, port resolved.
    endpoint: String,
    /// Ends when the broker thread does.
    stopped: mpsc::Receiver<()>,
}

/// Set before the bench stops its own broker, so that the broker thread
/// does not take the stop for an interruption.
static STOPPING: AtomicBool = AtomicBool::new(false);

impl Broker {
    /// Publishes `mounts` and runs the reactor on a thread of its own
    /// until the process exits.
    fn start(work: &Path, mounts: Vec<(PathBuf, &'static str)>) -> Broker {
        let name = format!("bench-filemq-{}", std::process::id());
        let defaults = filemq::Config::default();
        let config = filemq::Config {
            stable_age: Duration::from_millis(100),
            state_dir: Some(work.join("state")),
            ..defaults.clone()
        };
        let settings = Settings {
            name: name.clone(),
            binds: vec!["tcp://127.0.0.1:*".to_string()],
            control_endpoint: endpoint::control(&name),
            // STATUS needs no token; the bench sends nothing else.
            control_token: None,
            state_dir: None,
            max_connections: 100_000,
            budget: Default::default(),
        };
        let (bound_tx, bound_rx) = mpsc::channel();
        let (stopped_tx, stopped) = mpsc::channel::<()>();
        let work = work.to_path_buf();
        // The reactor holds `Box<dyn Service>` (not `Send`): build it where it runs.
        thread::Builder::new()
            .name("broker".into())
            .spawn(move || {
                let _stopped = stopped_tx;
                let mut filemq = Filemq::new(config);
                let now = Instant::now();
                for (root, alias) in mounts {
                    let root = std::fs::canonicalize(&root).expect("a published tree is missing");
                    filemq
                        .publish_at_start(root, alias, zbroker_services::filemq::mounts::Origin::Config, now)
                        .expect("cannot publish a tree");
                }
                let mut reactor = match Reactor::bind(settings, vec![Box::new(filemq)]) {
                    Ok(reactor) => reactor,
                    Err(e) => {
                        let _ = bound_tx.send(Err(e));
                        return;
                    }
                };
                let _ = bound_tx.send(Ok(reactor.endpoints().to_vec()));
                let result = reactor.run();
                drop(reactor);
                if STOPPING.load(Ordering::SeqCst) {
                    return;
                }
                // The reactor catches SIGINT and SIGTERM: the run was
                // interrupted. Leave nothing behind.
                let _ = std::fs::remove_dir_all(&work);
                match result {
                    Ok(()) => eprintln!("filemq bench: interrupted"),
                    Err(e) => eprintln!("filemq bench: broker failed: {e:#}"),
                }
                std::process::exit(1);
            })
            .expect("cannot start the broker thread");
        let endpoints = match bound_rx.recv() {
            Ok(Ok(endpoints)) => endpoints,
            Ok(Err(e)) => panic!("the broker cannot bind: {e:#}"),
            Err(_) => panic!("the broker thread died"),
        };
        let endpoint = endpoints
            .into_iter()
            .find(|e| e.starts_with("tcp://"))
            .expect("the broker reports no TCP endpoint");
        Broker { name, endpoint, stopped }
    }

    /// The broker's STATUS reply from its control endpoint.
    fn status(&self) -> serde_json::Value {
        let context = zmq::Context::new();
        let socket = context.socket(zmq::DEALER).expect("a DEALER socket");
        socket.set_linger(0).expect("ZMQ_LINGER");
        socket.connect(&endpoint::control(&self.name)).expect("cannot connect to the control endpoint");
        socket.send("STATUS", 0).expect("cannot send STATUS");
        assert!(socket.poll(zmq::POLLIN, 5000).expect("poll") > 0, "no STATUS reply from the broker");
        let reply = socket.recv_bytes(0).expect("cannot receive the STATUS reply");
        serde_json::from_slice(&reply).expect("the STATUS reply is not JSON")
    }

    /// Stops the reactor the only way it stops, SIGTERM (caught by the
    /// reactor, not fatal), and waits for its thread, so that it writes no
    /// more digests into the state directory.
    fn stop(&self) {
        STOPPING.store(true, Ordering::SeqCst);
        // SAFETY: kill and getpid touch no memory; the reactor has a
        // handler for SIGTERM.
        unsafe { libc::kill(libc::getpid(), libc::SIGTERM) };
        let _ = self.stopped.recv_timeout(Duration::from_secs(10));
    }

    fn bytes_sent(&self) -> u64 {
        self.status()["services"]["filemq"]["bytes_sent"].as_u64().expect("no services.filemq.bytes_sent")
    }

    /// Waits until every mount has been scanned (every file hashed) and
    /// holds the whole tree; returns how long that took.
    fn wait_scanned(&self, trees: &[Option<&Tree>]) -> Duration {
        phase("the broker's first scan");
        let start = Instant::now();
        let want: BTreeMap<&str, usize> = trees.iter().flatten().map(|t| (t.alias, t.files.len())).collect();
        loop {
            let status = self.status();
            let mounts =
                status["services"]["filemq"]["mounts"].as_array().expect("no services.filemq.mounts");
            let mut ready = 0;
            for mount in mounts {
                if let Some(error) = mount["error"].as_str() {
                    panic!("mount {} failed: {error}", mount["alias"]);
                }
                let files = mount["files"].as_u64().unwrap_or(0) as usize;
                let alias = mount["alias"].as_str().unwrap_or("?");
                if mount["scanned"].as_bool() == Some(true) && want.get(alias) == Some(&files) {
                    ready += 1;
                }
            }
            if ready == want.len() && mounts.len() == want.len() {
                return start.elapsed();
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---- subscribing ----

/// What a subscriber reported on its way to being in sync.
#[derive(Default)]
struct Seen {
    updated: u64,
    disconnects: u64,
}

fn subscribe(endpoint: &str, alias: &str, inbox: &Path, window: u64) -> Subscriber {
    let opts =
        Options { window, ..Options::endpoint(endpoint, vec![alias.to_string()], inbox.to_path_buf()) };
    Subscriber::start(opts).unwrap_or_else(|e| panic!("cannot subscribe to {alias}: {e}"))
}

/// Reads events until the subscription is in sync; panics on any sign of
/// a wrong transfer.
fn wait_in_sync(subscriber: &Subscriber, what: &str) -> Seen {
    let mut seen = Seen::default();
    let path = subscriber.subscriptions().first().expect("one subscription").clone();
    loop {
        match subscriber.recv() {
            Some(Event::InSync { path: synced, .. }) if synced == path => return seen,
            Some(Event::Updated { .. }) => seen.updated += 1,
            Some(Event::Disconnected { why }) => {
                eprintln!("  {what}: disconnected ({why}); reconnecting");
                seen.disconnects += 1;
            }
            Some(Event::IntegrityFailed { path }) => panic!("{what}: {path} failed verification"),
            Some(Event::Rejected { name, why }) => {
                panic!("{what}: the broker sent {name:?}: refused ({why})")
            }
            Some(Event::Refused { why }) => panic!("{what}: refused by the broker: {why}"),
            Some(Event::Failed { why }) => panic!("{what}: the inbox failed: {why}"),
            Some(_) => {}
            None => panic!("{what}: the subscriber ended before it was in sync"),
        }
    }
}

// ---- the comparisons ----

/// `cp -r` of `src` into each of `dests` (which must not exist), all at
/// once; the time until the last one ends.
fn cp(src: &Path, dests: &[PathBuf]) -> Duration {
    let start = Instant::now();
    let children: Vec<Child> = dests
        .iter()
        .map(|dest| Command::new("cp").arg("-r").arg(src).arg(dest).spawn().expect("cannot run cp"))
        .collect();
    wait_all(children, "cp -r");
    start.elapsed()
}

fn wait_all(children: Vec<Child>, what: &str) {
    for mut child in children {
        let status = child.wait().unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(status.success(), "{what} failed: {status}");
    }
}

/// A local rsync daemon with one writable module, stopped on drop.
struct Rsyncd {
    child: Child,
    port: u16,
    module: PathBuf,
}

impl Rsyncd {
    /// `None` (and says so) when rsync is not installed.
    fn start(work: &Path) -> Option<Rsyncd> {
        let installed = Command::new("rsync")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !installed {
            eprintln!("rsync: not installed, skipped");
            return None;
        }
        let dir = work.join("rsyncd");
        let module = dir.join("module");
        std::fs::create_dir_all(&module).expect("cannot create the rsync module");
        // A free port: the kernel picks one, and the daemon takes it over.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("no free port for rsync")
            .port();
        // As root the daemon would switch to "nobody", who cannot write
        // into our directory: keep it as the current user.
        // SAFETY: getuid and getgid cannot fail and touch no memory.
        let ids = match unsafe { (libc::getuid(), libc::getgid()) } {
            (0, gid) => format!("uid = 0\ngid = {gid}\n"),
            _ => String::new(),
        };
        let config = dir.join("rsyncd.conf");
        std::fs::write(
            &config,
            format!(
                "pid file = {dir}/rsyncd.pid\nlock file = {dir}/rsyncd.lock\nlog file = {dir}/rsyncd.log\n\
                 use chroot = no\n{ids}\n[bench]\n    path = {module}\n    read only = no\n    use chroot = no\n",
                dir = dir.display(),
                module = module.display(),
            ),
        )
        .expect("cannot write the rsync daemon's configuration");
        let child = Command::new("rsync")
            .arg("--daemon")
            .arg("--no-detach")
            .arg("--address=127.0.0.1")
            .arg(format!("--port={port}"))
            .arg(format!("--config={}", config.display()))
            .stdout(Stdio::null())
            .spawn()
            .expect("cannot start the rsync daemon");
        let mut daemon = Rsyncd { child, port, module };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = daemon.child.try_wait() {
                panic!("the rsync daemon ended at once ({status}); see {}/rsyncd.log", dir.display());
            }
            assert!(Instant::now() < deadline, "the rsync daemon does not listen on port {port}");
            thread::sleep(Duration::from_millis(20));
        }
        eprintln!("rsync: daemon on port {port}");
        Some(daemon)
    }

    /// `rsync -a src/ rsync://…/bench/<dest>/` for each of `dests`, all at
    /// once; the time until the last one ends. Each destination is checked
    /// for the right file count and bytes.
    fn push(&self, tree: &Tree, dests: &[String]) -> Duration {
        let mut src = tree.root.as_os_str().to_owned();
        src.push("/");
        let start = Instant::now();
        let children: Vec<Child> = dests
            .iter()
            .map(|dest| {
                Command::new("rsync")
                    .arg("-a")
                    .arg(&src)
                    .arg(format!("rsync://127.0.0.1:{}/bench/{dest}/", self.port))
                    .spawn()
                    .expect("cannot run rsync")
            })
            .collect();
        wait_all(children, "rsync -a");
        let elapsed = start.elapsed();
        for dest in dests {
            let (files, bytes) = count(&self.module.join(dest));
            assert!(
                files == tree.files.len() as u64 && bytes == tree.bytes,
                "rsync copied {files} files, {bytes} bytes of {} files, {} bytes",
                tree.files.len(),
                tree.bytes
            );
        }
        elapsed
    }

    fn remove(&self, dests: &[String]) {
        for dest in dests {
            remove(&self.module.join(dest));
        }
    }
}

impl Drop for Rsyncd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Files and bytes under `dir`.
fn count(dir: &Path) -> (u64, u64) {
    let (mut files, mut bytes) = (0, 0);
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        match entry.metadata() {
            Ok(meta) if meta.is_dir() => {
                let (f, b) = count(&entry.path());
                files += f;
                bytes += b;
            }
            Ok(meta) => {
                files += 1;
                bytes += meta.len();
            }
            Err(_) => {}
        }
    }
    (files, bytes)
}

fn remove(dir: &Path) {
    if let Err(e) = std::fs::remove_dir_all(dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            panic!("cannot remove {}: {e}", dir.display());
        }
    }
}

/// Flushes dirty pages, so a timed run does not pay for the write-back of
/// the one before.
fn sync() {
    // SAFETY: sync takes no arguments and cannot fail.
    unsafe { libc::sync() };
}

/// CPU time of this process (broker and subscribers) and of the children
/// waited for (cp, rsync).
fn cpu_times() -> (Duration, Duration) {
    fn of(who: i32) -> Duration {
        // SAFETY: getrusage only writes the struct it is given.
        let usage = unsafe {
            let mut usage: libc::rusage = std::mem::zeroed();
            libc::getrusage(who, &mut usage);
            usage
        };
        let time = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
        time(usage.ru_utime) + time(usage.ru_stime)
    }
    (of(libc::RUSAGE_SELF), of(libc::RUSAGE_CHILDREN))
}

// ---- the scenarios ----

/// One line of the final table.
struct Row {
    what: String,
    /// Files and bytes delivered in all (every subscriber's).
    files: u64,
    bytes: u64,
    filemq: Duration,
    filemq_cpu: Duration,
    cp: Option<(Duration, Duration)>,
    rsync: Option<Duration>,
    note: String,
}

struct Bench {
    broker: Broker,
    window: u64,
    work: PathBuf,
    rsync: Option<Rsyncd>,
    rows: Vec<Row>,
    /// Directories made so far, for fresh names.
    runs: std::cell::Cell<u32>,
}

impl Bench {
    /// A name no directory of this run has had.
    fn fresh_name(&self, what: &str) -> String {
        self.runs.set(self.runs.get() + 1);
        format!("{what}-{}", self.runs.get())
    }

    fn fresh(&self, what: &str) -> PathBuf {
        let name = self.fresh_name(what);
        self.work.join(name)
    }

    /// Times `cp -r` into `n` fresh directories (at once), then removes them.
    fn cp(&mut self, tree: &Tree, n: usize) -> (Duration, Duration) {
        phase(format!("cp -r of {}", tree.alias));
        let dests: Vec<PathBuf> = (0..n).map(|_| self.fresh("cp")).collect();
        sync();
        let (_, children) = cpu_times();
        let elapsed = cp(&tree.root, &dests);
        let cpu = cpu_times().1 - children;
        for dest in &dests {
            remove(dest);
        }
        (elapsed, cpu)
    }

    /// Times rsync to the daemon into `n` fresh directories (at once), if
    /// rsync is installed.
    fn rsync(&mut self, tree: &Tree, n: usize) -> Option<Duration> {
        phase(format!("rsync of {}", tree.alias));
        let daemon = self.rsync.as_ref()?;
        let dests: Vec<String> = (0..n).map(|_| self.fresh_name("rsync")).collect();
        sync();
        let elapsed = daemon.push(tree, &dests);
        daemon.remove(&dests);
        Some(elapsed)
    }

    /// The tree to one subscriber; returns its inbox (kept for resync).
    fn single(&mut self, what: &str, tree: &Tree) -> PathBuf {
        let cp = self.cp(tree, 1);
        let rsync = self.rsync(tree, 1);
        let inbox = self.fresh("inbox");
        phase(format!("{what}: subscribing"));
        sync();
        let sent = self.broker.bytes_sent();
        let (cpu, _) = cpu_times();
        let start = Instant::now();
        let subscriber = subscribe(&self.broker.endpoint, tree.alias, &inbox, self.window);
        let seen = wait_in_sync(&subscriber, what);
        let elapsed = start.elapsed();
        let cpu = cpu_times().0 - cpu;
        subscriber.stop();
        verify(tree, &inbox, what);
        let sent = self.broker.bytes_sent() - sent;
        assert_eq!(sent, tree.bytes, "{what}: the broker sent {sent} bytes for a tree of {}", tree.bytes);
        let note = notes(&seen, tree);
        self.add(Row {
            what: what.to_string(),
            files: tree.files.len() as u64,
            bytes: tree.bytes,
            filemq: elapsed,
            filemq_cpu: cpu,
            cp: Some(cp),
            rsync,
            note,
        });
        inbox
    }

    /// The tree to `n` subscribers at once, until the last is in sync.
    fn fanout(&mut self, tree: &Tree, n: usize) {
        let what = format!("fanout: 1 file x {n} subscribers");
        let cp = self.cp(tree, n);
        let rsync = self.rsync(tree, n);
        let inboxes: Vec<PathBuf> = (0..n).map(|_| self.fresh("inbox")).collect();
        phase(format!("{what}: subscribing"));
        sync();
        let sent = self.broker.bytes_sent();
        let (cpu, _) = cpu_times();
        let start = Instant::now();
        let waiting: Vec<_> = inboxes
            .iter()
            .enumerate()
            .map(|(i, inbox)| {
                let subscriber = subscribe(&self.broker.endpoint, tree.alias, inbox, self.window);
                let what = format!("subscriber {i}");
                thread::Builder::new()
                    .name(what.clone())
                    .spawn(move || {
                        let seen = wait_in_sync(&subscriber, &what);
                        let done = Instant::now();
                        subscriber.stop();
                        (seen, done)
                    })
                    .expect("cannot start a subscriber's thread")
            })
            .collect();
        let mut done = Vec::new();
        let mut disconnects = 0;
        for handle in waiting {
            let (seen, at) = handle.join().unwrap_or_else(|_| panic!("{what}: a subscriber failed"));
            disconnects += seen.disconnects;
            done.push(at - start);
        }
        let elapsed = done.iter().max().copied().unwrap_or_default();
        let first = done.iter().min().copied().unwrap_or_default();
        let cpu = cpu_times().0 - cpu;
        for (i, inbox) in inboxes.iter().enumerate() {
            verify(tree, inbox, &format!("{what}, inbox {i}"));
            remove(inbox);
        }
        let sent = self.broker.bytes_sent() - sent;
        let total = tree.bytes * n as u64;
        assert_eq!(sent, total, "{what}: the broker sent {sent} bytes for {n} copies of {}", tree.bytes);
        let mut note = format!("first in sync after {:.2} s; cp and rsync: {n} at once", secs(first));
        if disconnects > 0 {
            note += &format!("; {disconnects} disconnects");
        }
        self.add(Row {
            what,
            files: (tree.files.len() * n) as u64,
            bytes: total,
            filemq: elapsed,
            filemq_cpu: cpu,
            cp: Some(cp),
            rsync,
            note,
        });
    }

    /// Fills an inbox with the tree, untimed (for a resync run on its own).
    fn fill(&mut self, tree: &Tree) -> PathBuf {
        let inbox = self.fresh("inbox");
        phase(format!("filling an inbox with {}", tree.alias));
        let subscriber = subscribe(&self.broker.endpoint, tree.alias, &inbox, self.window);
        wait_in_sync(&subscriber, "filling");
        subscriber.stop();
        verify(tree, &inbox, "filling");
        inbox
    }

    /// A second subscriber into an inbox holding the whole tree: in sync
    /// with no file byte sent.
    fn resync(&mut self, tree: &Tree, inbox: &Path) {
        let what = format!("resync: unchanged {}", tree.alias);
        // rsync's own "nothing to do" run, into a copy made untimed.
        let dest = vec![self.fresh_name("rsync")];
        let rsync = self.rsync.as_ref().map(|daemon| {
            daemon.push(tree, &dest);
            sync();
            let elapsed = daemon.push(tree, &dest);
            daemon.remove(&dest);
            elapsed
        });
        phase(format!("{what}: subscribing"));
        sync();
        let before = self.broker.bytes_sent();
        let (cpu, _) = cpu_times();
        let start = Instant::now();
        let subscriber = subscribe(&self.broker.endpoint, tree.alias, inbox, self.window);
        let seen = wait_in_sync(&subscriber, &what);
        let elapsed = start.elapsed();
        let cpu = cpu_times().0 - cpu;
        subscriber.stop();
        let after = self.broker.bytes_sent();
        println!("{what}: broker bytes_sent {before} before, {after} after");
        assert_eq!(
            after,
            before,
            "{what}: the broker sent {} file bytes for an unchanged tree",
            after - before
        );
        verify(tree, inbox, &what);
        self.add(Row {
            what,
            files: 0,
            bytes: 0,
            filemq: elapsed,
            filemq_cpu: cpu,
            cp: None,
            rsync,
            note: format!(
                "{} files verified, 0 bytes sent, {} Updated events",
                tree.files.len(),
                seen.updated
            ),
        });
    }

    fn add(&mut self, row: Row) {
        println!("{}", describe(&row));
        self.rows.push(row);
    }

    fn report(&self, args: &Args) {
        println!();
        println!(
            "FILEMQ over TCP loopback (window {} bytes; big file {}, {} small files)",
            args.window,
            human_bytes(args.bytes),
            args.files
        );
        println!(
            "{:<34} {:>6} {:>7} {:>9} {:>6} {:>8} {:>6} {:>6} {:>8} {:>6}",
            "transfer", "files", "MB", "filemq s", "MB/s", "cp -r s", "MB/s", "ratio", "rsync s", "ratio"
        );
        for row in &self.rows {
            let mb = row.bytes as f64 / 1e6;
            let rate =
                |d: Duration| if row.bytes == 0 { "-".to_string() } else { format!("{:.0}", mb / secs(d)) };
            let (cp, cp_rate, cp_ratio) = match row.cp {
                Some((cp, _)) => {
                    (format!("{:.3}", secs(cp)), rate(cp), format!("{:.2}", secs(row.filemq) / secs(cp)))
                }
                None => ("-".into(), "-".into(), "-".into()),
            };
            let (rsync, rsync_ratio) = match row.rsync {
                Some(rsync) => {
                    (format!("{:.2}", secs(rsync)), format!("{:.2}", secs(row.filemq) / secs(rsync)))
                }
                None => ("-".into(), "-".into()),
            };
            println!(
                "{:<34} {:>6} {:>7.0} {:>9.3} {:>6} {:>8} {:>6} {:>6} {:>8} {:>6}",
                row.what,
                row.files,
                mb,
                secs(row.filemq),
                rate(row.filemq),
                cp,
                cp_rate,
                cp_ratio,
                rsync,
                rsync_ratio
            );
        }
        println!("ratio = filemq time / comparison time (lower is better for filemq); MB = 10^6 bytes.");
        if self.rsync.is_none() {
            println!("rsync: not installed, skipped.");
        }
        println!(
            "Caveat: one machine with {} cores runs the broker, every subscriber and cp at once; \
             cp reads from and writes to the page cache like filemq does (sync before each run), \
             and never crosses a socket.",
            thread::available_parallelism().map_or(0, |n| n.get())
        );
    }
}

fn notes(seen: &Seen, tree: &Tree) -> String {
    let mut note = format!("{} files verified", tree.files.len());
    if seen.updated != tree.files.len() as u64 {
        note += &format!(" ({} Updated events)", seen.updated);
    }
    if seen.disconnects > 0 {
        note += &format!("; {} disconnects", seen.disconnects);
    }
    note
}

fn describe(row: &Row) -> String {
    let mb = row.bytes as f64 / 1e6;
    let rate =
        |d: Duration| if row.bytes == 0 { String::new() } else { format!("{:.0} MB/s, ", mb / secs(d)) };
    let mut line = format!(
        "{}: filemq {:.3} s ({}cpu {:.2} s)",
        row.what,
        secs(row.filemq),
        rate(row.filemq),
        secs(row.filemq_cpu)
    );
    if let Some((cp, cpu)) = row.cp {
        line += &format!(
            " | cp -r {:.3} s ({}cpu {:.2} s) | ratio {:.2}",
            secs(cp),
            rate(cp),
            secs(cpu),
            secs(row.filemq) / secs(cp)
        );
    }
    if let Some(rsync) = row.rsync {
        line += &format!(" | rsync {:.3} s | ratio {:.2}", secs(rsync), secs(row.filemq) / secs(rsync));
    }
    format!("{line} [{}]", row.note)
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64().max(1e-9)
}

fn human_bytes(n: u64) -> String {
    for (unit, shift) in [("GiB", 30), ("MiB", 20), ("KiB", 10)] {
        if n >= 1 << shift && n.trailing_zeros() >= shift {
            return format!("{} {unit}", n >> shift);
        }
    }
    format!("{n} B")
}
