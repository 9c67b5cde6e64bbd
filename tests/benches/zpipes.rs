//! ZPIPES throughput and latency against raw libzmq on the same machine.
//!
//! Runs the broker in-process (its reactor on a thread of its own), then:
//! - stream: a `Writer` (64 KiB `write_all`s) feeding a `Reader` (1 MiB
//!   reads) on two threads, beside a raw DEALER→ROUTER one hop moving the
//!   same bytes in 64 KiB messages;
//! - trickle: 100 lines 50 ms apart, each line's delay to the reader
//!   (`zpipes_parts/trickle.rs`);
//! - round trip: `write_chunk(16 B)` + `read_chunk(16)` (the typed API)
//!   from one thread, beside a raw DEALER→ROUTER echo of 16 bytes, and a
//!   raw PING→PING_OK through the broker (what the broker alone costs).
//!
//! Steal time on a small VM swings throughput by 2x within a minute, so
//! the two sides of each comparison run interleaved (the stream in
//! segments, the round trips in blocks) and both see the same machine.
//!
//! `cargo bench -p zbroker-tests --bench zpipes`. Environment:
//! - `ZPIPES_BENCH_BYTES`: stream size, e.g. `256MiB` (default 1 GiB);
//!   rounded up to whole 64 KiB writes;
//! - `ZPIPES_BENCH_ROUNDS`: timed round trips (default 100000);
//! - `ZPIPES_BENCH_ONLY`: `stream` or `rtt` to run one half; `zpipes` or
//!   `raw` for that stream alone (no trickle: for a profiler);
//! - `ZPIPES_BENCH_TIMEOUT`: seconds before the run gives up (default 600);
//! - `ZPIPES_BENCH_EXACT=1`: readers without partial reads (the stream as
//!   before them; the trickle is then skipped).
//!
//! Without `--bench` (as under `cargo test --all-targets`) it makes a short
//! smoke run instead: 4 MiB and 200 round trips.

use anyhow::{bail, ensure, Context as _};
use std::io::{Read, Write};
use std::sync::{mpsc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};
use zbroker::reactor::Settings;
use zbroker_client::endpoint;
use zbroker_client::zpipes::{Options, ReadOutcome, Reader, WriteOutcome, Writer};
use zbroker_proto::ZpipesMsg;
use zbroker_services::zpipes::{self, Zpipes};

#[path = "zpipes_parts/rtt.rs"]
mod rtt;
#[path = "zpipes_parts/trickle.rs"]
mod trickle;
use rtt::round_trips;

const WRITE_SIZE: usize = 64 << 10;
const READ_BUF: usize = 1 << 20;
const SMALL: usize = 16;
/// Segments per stream; zpipes and raw segments alternate (16 segments of
/// 64 MiB keep each under ~0.1 s, shorter than the steal bursts).
const SEGMENTS: u64 = 16;
/// Blocks per round-trip run; the kinds of round trip alternate by block.
const RTT_BLOCKS: u64 = 10;

/// What the bench is doing, for the watchdog's message.
static PHASE: Mutex<&str> = Mutex::new("starting");

fn phase(name: &'static str) {
    *PHASE.lock().unwrap_or_else(|e| e.into_inner()) = name;
}

struct Args {
    bytes: u64,
    rounds: u64,
    stream: bool,
    rtt: bool,
    /// One stream without the other (for a profiler): "zpipes" or "raw".
    alone: Option<&'static str>,
    timeout: Duration,
}

impl Args {
    fn from_env() -> anyhow::Result<Args> {
        let var = |name| std::env::var(name).ok().filter(|v: &String| !v.is_empty());
        let bytes = match var("ZPIPES_BENCH_BYTES") {
            Some(v) => zbroker_client::size::parse(&v).context("ZPIPES_BENCH_BYTES")?,
            None => 1 << 30,
        };
        // Whole writes only, so both sides of the stream move the same bytes.
        let bytes = bytes.max(1).div_ceil(WRITE_SIZE as u64) * WRITE_SIZE as u64;
        let number = |name, default| -> anyhow::Result<u64> {
            var(name).map_or(Ok(default), |v| v.parse().with_context(|| format!("{name}={v:?}")))
        };
        let rounds = number("ZPIPES_BENCH_ROUNDS", 100_000)?.max(1);
        let timeout = Duration::from_secs(number("ZPIPES_BENCH_TIMEOUT", 600)?);
        let only = var("ZPIPES_BENCH_ONLY");
        let (stream, rtt) = match only.as_deref() {
            None => (true, true),
            Some("stream" | "zpipes" | "raw") => (true, false),
            Some("rtt") => (false, true),
            Some(other) => bail!("ZPIPES_BENCH_ONLY={other:?}: use stream, rtt, zpipes or raw"),
        };
        let alone = match only.as_deref() {
            Some("zpipes") => Some("zpipes"),
            Some("raw") => Some("raw"),
            _ => None,
        };
        Ok(Args { bytes, rounds, stream, rtt, alone, timeout })
    }
}

fn main() {
    if let Err(e) = run() {
        eprintln!("zpipes bench: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> anyhow::Result<()> {
    // As the zbroker and zpipes programs do; the raw side shares the process.
    zbroker_client::allocator::keep_freed_buffers();
    let mut args = Args::from_env()?;
    // `cargo bench` passes --bench; `cargo test --all-targets` does not, and
    // then a small smoke run checks that the harness works.
    if !std::env::args().any(|a| a == "--bench") {
        check_checksum()?;
        args.bytes = args.bytes.min(4 << 20);
        args.rounds = args.rounds.min(200);
    }
    start_watchdog(args.timeout);

    let name = zbroker_tests::unique_name("bench");
    start_broker(&name)?;
    // ZPIPES_BENCH_EXACT=1: readers without partial reads (the wire and
    // the reader as they were before them), for comparison.
    let exact = std::env::var("ZPIPES_BENCH_EXACT").is_ok_and(|v| v == "1");
    let opts = Options { partial_reads: !exact, ..Options::broker(&name) };
    let mut lines = Vec::new();

    if let Some(what) = args.alone {
        eprintln!("zpipes bench: streaming {} through {what} alone", human_bytes(args.bytes));
        let expected = expected_checksum(args.bytes);
        phase("stream alone");
        let mut stream = match what {
            "zpipes" => zpipes_stream(&opts)?,
            _ => raw_stream(&format!("ipc://@/zpipes-bench-raw/{name}"))?,
        };
        for bytes in segment_sizes(args.bytes) {
            stream = stream.segment(bytes)?;
        }
        let (sum, elapsed, cpu) = stream.finish()?;
        ensure!(sum.finish() == expected.finish(), "{what} stream: checksum mismatch");
        println!(
            "\nstream {} {what} alone: {:.0} MiB/s, {:.2} cpu-s per GiB",
            human_bytes(args.bytes),
            mib_per_s(args.bytes, elapsed),
            cpu.as_secs_f64() * (1u64 << 30) as f64 / args.bytes as f64
        );
        return Ok(());
    }

    if args.stream {
        eprintln!(
            "zpipes bench: streaming {} each way (zpipes and raw, interleaved)",
            human_bytes(args.bytes)
        );
        let raw_endpoint = format!("ipc://@/zpipes-bench-raw/{name}");
        let s = streams(&opts, &raw_endpoint, args.bytes)?;
        let (zpipes, raw) = (mib_per_s(args.bytes, s.zpipes.elapsed), mib_per_s(args.bytes, s.raw.elapsed));
        let ratio = two_places(zpipes / raw);
        lines.push(format!(
            "stream {} 64 KiB writes: zpipes {zpipes:.0} MiB/s | raw DEALER->ROUTER {raw:.0} MiB/s | ratio {ratio:.2} (target >= 0.7: {})",
            human_bytes(args.bytes),
            verdict(ratio >= 0.7)
        ));
        let per_gib = |cpu: Duration| cpu.as_secs_f64() * (1u64 << 30) as f64 / args.bytes as f64;
        lines.push(format!(
            "  cpu per GiB (all threads): zpipes {:.2} s | raw {:.2} s",
            per_gib(s.zpipes.cpu),
            per_gib(s.raw.cpu)
        ));
        phase("broker status");
        let status = zbroker_tests::status_of(&name, Duration::from_secs(2))
            .context("no STATUS reply from the broker")?;
        let z = &status["services"]["zpipes"];
        lines.push(format!(
            "broker peak queued bytes: {} (pipe limit {}, {} bytes moved)",
            z["peak_queued_bytes"], z["pipe_limit"], z["bytes_moved"]
        ));
    }

    if args.stream && !exact {
        eprintln!("zpipes bench: a trickle of 100 lines, 50 ms apart");
        phase("trickle");
        let count = if std::env::args().any(|a| a == "--bench") { 100 } else { 10 };
        let t = trickle::trickle(&opts, count, Duration::from_millis(50))?;
        let (median, worst) = (t.median.as_secs_f64() * 1e3, t.worst.as_secs_f64() * 1e3);
        lines.push(format!(
            "trickle {count} lines 50 ms apart: median {median:.1} ms, worst {worst:.1} ms (partial reads {}; target median <= 20 ms: {})",
            if t.partial { "granted" } else { "not granted" },
            verdict(t.median <= Duration::from_millis(20))
        ));
    }

    if args.rtt {
        eprintln!("zpipes bench: {} round trips of each kind (interleaved)", args.rounds);
        let echo_endpoint = format!("ipc://@/zpipes-bench-echo/{name}");
        let r = round_trips(&opts, &echo_endpoint, args.rounds)?;
        let mean = |total: Duration| micros(total) / args.rounds as f64;
        let (write, read, raw, ping) = (mean(r.zpipes_write), mean(r.zpipes_read), mean(r.raw), mean(r.ping));
        let zpipes = write + read;
        let ratio = two_places(zpipes / raw);
        lines.push(format!(
            "round trip 16 B write+read: zpipes {zpipes:.1} us | raw req/rep {raw:.1} us | ratio {ratio:.2} (target <= 2: {}) [{} rounds]",
            verdict(ratio <= 2.0),
            args.rounds
        ));
        lines.push(format!(
            "  zpipes write {write:.1} us + read {read:.1} us; raw PING->PING_OK through the broker {ping:.1} us"
        ));
    }

    phase("done");
    println!();
    for line in lines {
        println!("{line}");
    }
    Ok(())
}

/// A hung broker or client must not hang CI: exit with a message instead.
fn start_watchdog(limit: Duration) {
    thread::spawn(move || {
        thread::sleep(limit);
        let phase = *PHASE.lock().unwrap_or_else(|e| e.into_inner());
        eprintln!("zpipes bench: gave up after {} s during {phase}", limit.as_secs());
        std::process::exit(2);
    });
}

/// Binds the broker and runs it on its own thread until the process exits.
fn start_broker(name: &str) -> anyhow::Result<()> {
    let settings = Settings {
        name: name.to_string(),
        binds: Vec::new(),
        control_endpoint: endpoint::control(name),
        control_token: None,
        state_dir: None,
        max_connections: 100_000,
        budget: Default::default(),
    };
    zbroker::reactor::spawn(settings, || vec![Box::new(Zpipes::new(zpipes::Config::default()))])?;
    Ok(())
}

/// CPU time of the whole process (every thread, the broker's included).
fn cpu_time() -> Duration {
    // SAFETY: getrusage only writes the struct it is given.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let time = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    time(usage.ru_utime) + time(usage.ru_stime)
}

// ---- the stream ----

/// Fletcher-style sum over little-endian u64 words: order-sensitive and
/// cheap enough (two adds a word) not to slow the receiving thread.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Checksum {
    a: u64,
    b: u64,
    len: u64,
    tail: [u8; 8],
    tail_len: usize,
}

impl Checksum {
    fn update(&mut self, mut data: &[u8]) {
        self.len += data.len() as u64;
        if self.tail_len > 0 {
            let n = (8 - self.tail_len).min(data.len());
            self.tail[self.tail_len..self.tail_len + n].copy_from_slice(&data[..n]);
            self.tail_len += n;
            data = &data[n..];
            if self.tail_len < 8 {
                return;
            }
            self.tail_len = 0;
            self.words(&self.tail.clone());
        }
        let whole = data.len() & !7;
        self.words(&data[..whole]);
        let rest = &data[whole..];
        self.tail[..rest.len()].copy_from_slice(rest);
        self.tail_len = rest.len();
    }

    fn words(&mut self, data: &[u8]) {
        let (mut a, mut b) = (self.a, self.b);
        for word in data.chunks_exact(8) {
            a = a.wrapping_add(u64::from_le_bytes(word.try_into().expect("8 bytes")));
            b = b.wrapping_add(a);
        }
        (self.a, self.b) = (a, b);
    }

    /// Sums and length, with any last partial word zero-padded.
    fn finish(mut self) -> (u64, u64, u64) {
        if self.tail_len > 0 {
            self.tail[self.tail_len..].fill(0);
            self.words(&self.tail.clone());
        }
        (self.a, self.b, self.len)
    }
}

/// The checksum must not depend on how the stream was cut into reads,
/// and must notice reordering.
fn check_checksum() -> anyhow::Result<()> {
    let data = zbroker_tests::pseudo_random(1000, 7);
    let mut whole = Checksum::default();
    whole.update(&data);
    let mut pieces = Checksum::default();
    for piece in data.chunks(13) {
        pieces.update(piece);
    }
    ensure!(whole.finish() == pieces.finish(), "checksum depends on cuts");
    let mut swapped = data;
    swapped.swap(0, 8);
    let mut other = Checksum::default();
    other.update(&swapped);
    ensure!(whole.finish() != other.finish(), "checksum misses a swap");
    Ok(())
}

/// The stream's bytes: one pseudo-random 64 KiB block, stamped with its
/// sequence number so lost, repeated or swapped blocks change the sum.
struct Blocks {
    block: Vec<u8>,
    next: u64,
}

impl Blocks {
    fn new() -> Blocks {
        Blocks { block: zbroker_tests::pseudo_random(WRITE_SIZE, 0x5eed), next: 0 }
    }

    fn next_block(&mut self) -> &[u8] {
        self.block[..8].copy_from_slice(&self.next.to_le_bytes());
        self.next += 1;
        &self.block
    }
}

/// Computed before timing, so the sender does no checksum work.
fn expected_checksum(total: u64) -> Checksum {
    let mut blocks = Blocks::new();
    let mut sum = Checksum::default();
    for _ in 0..total / WRITE_SIZE as u64 {
        sum.update(blocks.next_block());
    }
    sum
}

/// A stream thread's side of the segment protocol: it marks once when set
/// up, then waits for each segment's byte count and marks again (the
/// sender when it starts, the receiver when it has every byte).
struct Segments {
    go: mpsc::Receiver<u64>,
    mark: mpsc::Sender<Instant>,
}

impl Segments {
    fn next(&self) -> Option<u64> {
        self.go.recv().ok()
    }

    fn mark(&self) {
        let _ = self.mark.send(Instant::now());
    }
}

/// One kind of stream: a sender and a receiver thread driven segment by
/// segment, with the time and CPU its segments took.
struct Stream {
    what: &'static str,
    send_go: mpsc::Sender<u64>,
    receive_go: mpsc::Sender<u64>,
    started: mpsc::Receiver<Instant>,
    ended: mpsc::Receiver<Instant>,
    sender: JoinHandle<anyhow::Result<()>>,
    receiver: JoinHandle<anyhow::Result<Checksum>>,
    elapsed: Duration,
    cpu: Duration,
}

impl Stream {
    /// Starts both threads; returns once both are connected.
    fn start(
        what: &'static str,
        receive: impl FnOnce(Segments) -> anyhow::Result<Checksum> + Send + 'static,
        send: impl FnOnce(Segments) -> anyhow::Result<()> + Send + 'static,
    ) -> anyhow::Result<Stream> {
        let (receive_go, go) = mpsc::channel();
        let (mark, ended) = mpsc::channel();
        let receiver = thread::Builder::new()
            .name(format!("{what}-receiver"))
            .spawn(move || receive(Segments { go, mark }))?;
        let (send_go, go) = mpsc::channel();
        let (mark, started) = mpsc::channel();
        let sender = thread::Builder::new()
            .name(format!("{what}-sender"))
            .spawn(move || send(Segments { go, mark }))?;
        let stream = Stream {
            what,
            send_go,
            receive_go,
            started,
            ended,
            sender,
            receiver,
            elapsed: Duration::ZERO,
            cpu: Duration::ZERO,
        };
        if stream.ended.recv().is_err() || stream.started.recv().is_err() {
            return Err(stream.fail());
        }
        Ok(stream)
    }

    /// Moves the next `bytes` of the stream, timed from the sender's start
    /// to the receiver's last byte.
    fn segment(mut self, bytes: u64) -> anyhow::Result<Stream> {
        let cpu = cpu_time();
        let _ = self.receive_go.send(bytes);
        let _ = self.send_go.send(bytes);
        match (self.started.recv(), self.ended.recv()) {
            (Ok(start), Ok(end)) => {
                self.elapsed += end - start;
                self.cpu += cpu_time() - cpu;
                Ok(self)
            }
            _ => Err(self.fail()),
        }
    }

    /// Ends the stream; returns what the receiver summed.
    fn finish(self) -> anyhow::Result<(Checksum, Duration, Duration)> {
        let (elapsed, cpu) = (self.elapsed, self.cpu);
        drop((self.send_go, self.receive_go));
        let what = self.what;
        // When one side fails the other usually fails as a consequence:
        // report both.
        match (join(self.sender, &format!("{what} sender")), join(self.receiver, &format!("{what} receiver")))
        {
            (Ok(()), Ok(sum)) => Ok((sum, elapsed, cpu)),
            (Ok(()), Err(e)) | (Err(e), Ok(_)) => Err(e),
            (Err(send), Err(receive)) => bail!("{receive:#}; and {send:#}"),
        }
    }

    /// A thread stopped early: its error.
    fn fail(self) -> anyhow::Error {
        let what = self.what;
        match self.finish() {
            Err(e) => e,
            Ok(_) => anyhow::anyhow!("{what} stream stopped early"),
        }
    }
}

/// Time and CPU one kind of stream took over all its segments.
struct Measured {
    elapsed: Duration,
    cpu: Duration,
}

struct Streams {
    zpipes: Measured,
    raw: Measured,
}

/// Both streams, interleaved segment by segment, each checked at the end.
fn streams(opts: &Options, raw_endpoint: &str, total: u64) -> anyhow::Result<Streams> {
    let expected = expected_checksum(total);
    phase("stream setup");
    let mut zpipes = zpipes_stream(opts)?;
    let mut raw = raw_stream(raw_endpoint)?;
    for bytes in segment_sizes(total) {
        phase("zpipes stream");
        zpipes = zpipes.segment(bytes)?;
        phase("raw stream");
        raw = raw.segment(bytes)?;
    }
    phase("stream end");
    let mut measured = Vec::new();
    for stream in [zpipes, raw] {
        let what = stream.what;
        let (sum, elapsed, cpu) = stream.finish()?;
        let (got, want) = (sum.finish(), expected.finish());
        ensure!(got.2 == want.2, "{what} stream: received {} bytes, sent {}", got.2, want.2);
        ensure!(got == want, "{what} stream: checksum mismatch");
        measured.push(Measured { elapsed, cpu });
    }
    let raw = measured.pop().expect("two streams");
    let zpipes = measured.pop().expect("two streams");
    Ok(Streams { zpipes, raw })
}

/// `total` cut into `SEGMENTS` runs of whole writes.
fn segment_sizes(total: u64) -> impl Iterator<Item = u64> {
    let blocks = total / WRITE_SIZE as u64;
    let segments = SEGMENTS.min(blocks);
    (0..segments).map(move |i| (blocks / segments + u64::from(i < blocks % segments)) * WRITE_SIZE as u64)
}

/// Writer thread → broker → reader thread.
fn zpipes_stream(opts: &Options) -> anyhow::Result<Stream> {
    const PIPE: &str = "bench-stream";
    let (reader_opts, writer_opts) = (opts.clone(), opts.clone());
    Stream::start(
        "zpipes",
        move |segments| {
            let mut reader = Reader::open(PIPE, &reader_opts)?;
            segments.mark();
            let mut buf = vec![0u8; READ_BUF];
            let mut sum = Checksum::default();
            while let Some(bytes) = segments.next() {
                let mut left = bytes;
                while left > 0 {
                    // A READ waits for all it asks for: never ask past the segment.
                    let want = left.min(READ_BUF as u64) as usize;
                    let n = reader.read(&mut buf[..want])?;
                    ensure!(n > 0, "the stream ended {left} bytes early");
                    sum.update(&buf[..n]);
                    left -= n as u64;
                }
                segments.mark();
            }
            ensure!(reader.read(&mut buf)? == 0, "bytes past the end");
            reader.close()?;
            Ok(sum)
        },
        move |segments| {
            let mut writer = Writer::open(PIPE, &writer_opts)?;
            segments.mark();
            let mut blocks = Blocks::new();
            while let Some(bytes) = segments.next() {
                segments.mark();
                for _ in 0..bytes / WRITE_SIZE as u64 {
                    writer.write_all(blocks.next_block())?;
                }
                // The segment's last bytes must not wait in the gathering
                // buffer while the other stream runs.
                writer.send_gathered()?;
            }
            writer.close()?;
            Ok(())
        },
    )
}

/// The same bytes in 64 KiB messages over one raw ipc hop. Each side has
/// its own context (its own I/O thread), as two processes would; a socket
/// keeps its context alive.
fn raw_stream(endpoint: &str) -> anyhow::Result<Stream> {
    let router_context = zmq::Context::new();
    let router = router_context.socket(zmq::ROUTER)?;
    router.bind(endpoint)?;
    let endpoint = endpoint.to_string();
    Stream::start(
        "raw",
        move |segments| {
            segments.mark();
            let mut routing_id = zmq::Message::new();
            let mut body = zmq::Message::new();
            let mut sum = Checksum::default();
            while let Some(bytes) = segments.next() {
                let end = sum.len + bytes;
                while sum.len < end {
                    router.recv(&mut routing_id, 0)?;
                    ensure!(router.get_rcvmore()?, "a ROUTER message without a body");
                    router.recv(&mut body, 0)?;
                    sum.update(&body);
                }
                segments.mark();
            }
            Ok(sum)
        },
        move |segments| {
            let context = zmq::Context::new();
            let dealer = context.socket(zmq::DEALER)?;
            dealer.connect(&endpoint)?;
            segments.mark();
            let mut blocks = Blocks::new();
            while let Some(bytes) = segments.next() {
                segments.mark();
                for _ in 0..bytes / WRITE_SIZE as u64 {
                    // Copies into a new message, as the ZPIPES client does.
                    dealer.send(blocks.next_block(), 0)?;
                }
            }
            Ok(())
        },
    )
}

fn join<T>(handle: JoinHandle<anyhow::Result<T>>, what: &str) -> anyhow::Result<T> {
    match handle.join() {
        Ok(result) => result.with_context(|| what.to_string()),
        Err(_) => bail!("{what} thread panicked"),
    }
}

/// Ratios are judged as printed, so "0.60" never reads as a miss.
fn two_places(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "MISSED"
    }
}

fn mib_per_s(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 / (1 << 20) as f64 / elapsed.as_secs_f64()
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn human_bytes(n: u64) -> String {
    for (unit, shift) in [("GiB", 30), ("MiB", 20), ("KiB", 10)] {
        if n >= 1 << shift && n.trailing_zeros() >= shift {
            return format!("{} {unit}", n >> shift);
        }
    }
    format!("{n} B")
}
