//! The event loop's longest pass with and without the ICANHAZ bomb, in the
//! same run: a broker (in-process, both services) streams a pipe while a
//! second pipe measures round trips; a second broker does the same while
//! one client sends three ICANHAZ frames of 12,000,000 empty cache entries
//! (60 MB each) and a legitimate cache of a million files. Reported: the
//! longest loop pass and what caused it (from `zbroker status`), the worst
//! round trip, and the stream's throughput.
//!
//! `cargo bench -p zbroker-tests --bench loop_bound`; `LOOP_BENCH_BYTES`
//! sets the stream (default 1 GiB). Without `--bench` (as under `cargo test
//! --all-targets`) a short smoke run with 8 MiB.

use anyhow::{ensure, Context as _};
use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};
use zbroker::reactor::Settings;
use zbroker_client::endpoint;
use zbroker_client::zpipes::{Options, Reader, Writer};
use zbroker_proto::codec::ShortStr;
use zbroker_proto::filemq::FilemqMsg;
use zbroker_services::filemq::{self, Filemq};
use zbroker_services::zpipes::{self, Zpipes};
use zbroker_tests::bomb::{bomb, million_files};

const BLOCK: usize = 1 << 20;

struct Figures {
    longest_pass_ms: f64,
    cause: String,
    worst_trip: Duration,
    trips: u64,
    mb_per_s: f64,
}

fn main() {
    // As the zbroker and zpipes programs do: broker and clients share it.
    zbroker_client::allocator::keep_freed_buffers();
    let bench = std::env::args().any(|a| a == "--bench");
    let default = if bench { 1 << 30 } else { 8 << 20 };
    let bytes = std::env::var("LOOP_BENCH_BYTES")
        .ok()
        .map(|v| zbroker_client::size::parse(&v).expect("LOOP_BENCH_BYTES: a size such as 256MiB"))
        .unwrap_or(default) as usize;
    thread::spawn(|| {
        thread::sleep(Duration::from_secs(600));
        eprintln!("loop_bound bench: gave up after 600 s");
        std::process::exit(2);
    });
    let frames = (bomb(), million_files("/bomb"));
    let without = run("calm", bytes, None).expect("the run without the bomb");
    let with = run("bomb", bytes, Some(&frames)).expect("the run under the bomb");
    println!("loop_bound bench: a {} MiB stream and pipe round trips every 10 ms", bytes >> 20);
    println!("| run | longest loop pass | its slowest call | worst round trip | round trips | stream |");
    println!("|---|---|---|---|---|---|");
    for (name, f) in [("without the bomb", &without), ("under the bomb", &with)] {
        println!(
            "| {name} | {:.1} ms | {} | {:.1} ms | {} | {:.0} MB/s |",
            f.longest_pass_ms,
            f.cause,
            f.worst_trip.as_secs_f64() * 1000.0,
            f.trips,
            f.mb_per_s
        );
    }
}

/// Starts a broker with both services on its own thread (for the rest of
/// the process), publishing an empty directory.
fn start_broker(name: &str, root: std::path::PathBuf) -> anyhow::Result<()> {
    let settings = Settings {
        name: name.to_string(),
        binds: Vec::new(),
        control_endpoint: endpoint::control(name),
        control_token: None,
        state_dir: None,
        max_connections: 100_000,
        budget: Default::default(),
    };
    zbroker::reactor::spawn(settings, move || {
        let mut filemq = Filemq::new(filemq::Config::default());
        filemq
            .publish_at_start(root, "/", zbroker_services::filemq::mounts::Origin::Config, Instant::now())
            .expect("cannot publish the bench's directory");
        vec![Box::new(Zpipes::new(zpipes::Config::default())), Box::new(filemq)]
    })?;
    Ok(())
}

fn recv(socket: &zmq::Socket, ms: i64) -> Option<FilemqMsg> {
    (socket.poll(zmq::POLLIN, ms).ok()? > 0).then(|| FilemqMsg::decode(socket.recv_bytes(0).ok()?).ok())?
}

/// The bomb from one connection (`frames`: the 60 MB one, then the
/// legitimate cache, built before the run so that building them does not
/// compete with the broker for the CPU); returns once the legitimate cache
/// and the HUGZ behind it are answered.
fn send_bomb(name: &str, frames: &(Vec<u8>, Vec<u8>)) -> anyhow::Result<()> {
    let context = zmq::Context::new();
    let client = context.socket(zmq::DEALER)?;
    client.set_linger(0)?;
    client.connect(&endpoint::filemq(name))?;
    client.send(FilemqMsg::Ohai { protocol: ShortStr::lossy("FILEMQ"), version: 2 }.encode(), 0)?;
    ensure!(recv(&client, 5000) == Some(FilemqMsg::OhaiOk {}), "no OHAI-OK");
    for _ in 0..3 {
        client.send(&frames.0[..], 0)?;
    }
    client.send(&frames.1[..], 0)?;
    client.send(FilemqMsg::Hugz {}.encode(), 0)?;
    ensure!(recv(&client, 60_000) == Some(FilemqMsg::IcanhazOk {}), "no ICANHAZ-OK");
    ensure!(recv(&client, 10_000) == Some(FilemqMsg::HugzOk {}), "no HUGZ-OK");
    Ok(())
}

fn run(label: &str, bytes: usize, bomb: Option<&(Vec<u8>, Vec<u8>)>) -> anyhow::Result<Figures> {
    let with_bomb = bomb.is_some();
    let name = format!("bench-loop-{label}-{}", std::process::id());
    let root = tempfile::tempdir()?;
    start_broker(&name, root.path().to_path_buf())?;
    let opts = Options::broker(&name);
    let done = Arc::new(AtomicBool::new(!with_bomb));

    // The stream: at least `bytes`, and on until the bomb is answered.
    let (writer_opts, reader_opts, writer_done) = (opts.clone(), opts.clone(), done.clone());
    let started = Instant::now();
    let writer = thread::spawn(move || -> anyhow::Result<()> {
        let mut writer = Writer::open("stream", &writer_opts)?;
        let block = vec![0x5Au8; BLOCK];
        let mut sent = 0;
        while sent < bytes || !writer_done.load(Ordering::Relaxed) {
            writer.write_all(&block)?;
            sent += BLOCK;
        }
        writer.close()?;
        Ok(())
    });
    let reader = thread::spawn(move || -> anyhow::Result<usize> {
        let mut reader = Reader::open("stream", &reader_opts)?;
        let mut buf = vec![0u8; BLOCK];
        let mut got = 0;
        loop {
            match reader.read(&mut buf)? {
                0 => return Ok(got),
                n => got += n,
            }
        }
    });
    let stop = Arc::new(AtomicBool::new(false));
    let probe = {
        let (stop, opts) = (stop.clone(), opts.clone());
        thread::spawn(move || -> anyhow::Result<(Duration, u64)> {
            let mut writer = Writer::open("probe", &opts)?;
            let mut reader = Reader::open("probe", &opts)?;
            let (mut worst, mut trips) = (Duration::ZERO, 0);
            while !stop.load(Ordering::Relaxed) {
                let began = Instant::now();
                writer.write_all(b"ping")?;
                writer.flush()?;
                let mut back = [0u8; 4];
                reader.read_exact(&mut back)?;
                worst = worst.max(began.elapsed());
                trips += 1;
                thread::sleep(Duration::from_millis(10));
            }
            Ok((worst, trips))
        })
    };
    if let Some(frames) = bomb {
        // Let the stream get going first.
        thread::sleep(Duration::from_millis(100));
        let result = send_bomb(&name, frames);
        done.store(true, Ordering::Relaxed);
        result?;
    }
    writer.join().map_err(|_| anyhow::anyhow!("the writer panicked"))??;
    let got = reader.join().map_err(|_| anyhow::anyhow!("the reader panicked"))??;
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let (worst_trip, trips) = probe.join().map_err(|_| anyhow::anyhow!("the probe panicked"))??;
    let st =
        zbroker_tests::status_of(&name, Duration::from_secs(5)).context("no STATUS reply from the broker")?;
    Ok(Figures {
        longest_pass_ms: st["longest_pass_ms"].as_f64().unwrap_or(f64::NAN),
        cause: st["longest_pass_cause"].as_str().unwrap_or("?").to_string(),
        worst_trip,
        trips,
        mb_per_s: got as f64 / 1e6 / elapsed.as_secs_f64(),
    })
}
