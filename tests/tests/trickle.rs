//! A trickle through the `zpipes` programs arrives at once, and the same
//! reader still moves bulk in large reads ("what is there, up to n": our
//! READ extension, granted by PING). A reader whose broker does not grant
//! it (the original's wire, played by a raw ROUTER here) reads as before.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use zbroker_client::zpipes::{Options, ReadOutcome, Reader};
use zbroker_proto::codec::Chunk;
use zbroker_proto::ZpipesMsg;
use zbroker_tests::{bin, pseudo_random, wait_timeout, Broker};

const LINES: usize = 20;
const BULK: usize = 64 << 20;
/// The bulk floor: far below what the programs reach (hundreds of MiB/s in
/// release, tens in debug on a busy 2-core CI), far above the crawl of a
/// reader stuck at one-byte blocks (~16 KB/s).
const BULK_FLOOR_MIB_S: f64 = 16.0;

fn zpipes(args: &[&str]) -> Command {
    let mut command = Command::new(bin("zpipes"));
    command.args(args);
    command
}

#[test]
fn a_trickle_arrives_within_milliseconds_and_bulk_then_flows() {
    let broker = Broker::start(&[]);
    let b = ["--broker", broker.name.as_str()];
    let mut writer = zpipes(&[&b[..], &["write", "t"]].concat()).stdin(Stdio::piped()).spawn().unwrap();
    let mut reader = zpipes(&[&b[..], &["read", "t"]].concat()).stdout(Stdio::piped()).spawn().unwrap();
    let mut stdin = writer.stdin.take().unwrap();
    let stdout = reader.stdout.take().unwrap();
    let bulk = pseudo_random(BULK, 7);
    let sent: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let bulk_started: Arc<Mutex<Option<Instant>>> = Arc::default();
    let feeder = {
        let (sent, bulk_started, bulk) = (sent.clone(), bulk_started.clone(), bulk.clone());
        std::thread::spawn(move || {
            for i in 0..LINES {
                std::thread::sleep(Duration::from_millis(100));
                sent.lock().unwrap().push(Instant::now());
                stdin.write_all(format!("line {i}\n").as_bytes()).unwrap();
                stdin.flush().unwrap();
            }
            std::thread::sleep(Duration::from_millis(100));
            *bulk_started.lock().unwrap() = Some(Instant::now());
            stdin.write_all(&bulk).unwrap();
            // stdin drops: the writer closes the pipe.
        })
    };
    let mut out = BufReader::new(stdout);
    let mut latencies = Vec::new();
    for i in 0..LINES {
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        let arrived = Instant::now();
        assert_eq!(line, format!("line {i}\n"));
        latencies.push(arrived - sent.lock().unwrap()[i]);
    }
    let mut rest = Vec::with_capacity(BULK);
    out.read_to_end(&mut rest).unwrap();
    let bulk_time = bulk_started.lock().unwrap().expect("bulk started").elapsed();
    feeder.join().unwrap();
    assert!(writer.wait().unwrap().success());
    assert!(wait_timeout(&mut reader, Duration::from_secs(10)).is_some_and(|s| s.success()));
    assert!(rest == bulk, "bulk bytes differ ({} of {} arrived)", rest.len(), bulk.len());

    latencies.sort();
    let median = latencies[LINES / 2];
    let worst = latencies[LINES - 1];
    let rate = BULK as f64 / (1 << 20) as f64 / bulk_time.as_secs_f64();
    eprintln!("trickle: median {median:?}, worst {worst:?}; then 64 MiB at {rate:.1} MiB/s");
    assert!(median <= Duration::from_millis(100), "median line latency {median:?}");
    assert!(worst <= Duration::from_secs(1), "worst line latency {worst:?}");
    assert!(rate >= BULK_FLOOR_MIB_S, "bulk at {rate:.1} MiB/s, under {BULK_FLOOR_MIB_S} MiB/s");
}

/// A broker on the original wire: grants nothing, answers READ with
/// exactly `size` bytes (fewer only at the end, once the writer has gone),
/// and notes any READ carrying a trailer.
fn original_broker(data: Vec<u8>) -> (String, Arc<AtomicBool>, Arc<AtomicUsize>) {
    let context = zmq::Context::new();
    let router = context.socket(zmq::ROUTER).unwrap();
    router.bind("tcp://127.0.0.1:*").unwrap();
    let endpoint = router.get_last_endpoint().unwrap().unwrap();
    let trailer = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicUsize::new(0));
    let (seen, count) = (trailer.clone(), reads.clone());
    std::thread::spawn(move || {
        let _context = context;
        let mut at = 0;
        loop {
            let Ok(frames) = router.recv_multipart(0) else { return };
            let [id, frame] = &frames[..] else { continue };
            let answer = match ZpipesMsg::decode(frame.clone()).unwrap() {
                ZpipesMsg::Input { .. } => ZpipesMsg::InputOk {},
                ZpipesMsg::Ping {} => ZpipesMsg::PingOk {},
                ZpipesMsg::Read { size, .. } => {
                    count.fetch_add(1, Ordering::Relaxed);
                    if frame.len() != 11 {
                        seen.store(true, Ordering::Relaxed);
                    }
                    let n = (size as usize).min(data.len() - at);
                    if n == 0 {
                        ZpipesMsg::ReadEnd {}
                    } else {
                        at += n;
                        ZpipesMsg::ReadOk { chunk: Chunk(data[at - n..at].to_vec().into()) }
                    }
                }
                ZpipesMsg::Close {} => ZpipesMsg::CloseOk {},
                _ => ZpipesMsg::Invalid {},
            };
            router.send_multipart([id.clone(), answer.encode()], 0).unwrap();
        }
    });
    (endpoint, trailer, reads)
}

#[test]
fn a_reader_whose_broker_lacks_the_capability_reads_as_before() {
    let data = pseudo_random(3 << 20 | 12345, 9);
    let (endpoint, trailer, _) = original_broker(data.clone());
    let out = zpipes(&["--endpoint", &endpoint, "read", "p"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.stdout == data, "bytes differ ({} of {})", out.stdout.len(), data.len());
    assert!(!trailer.load(Ordering::Relaxed), "a READ carried our trailer to a broker that never granted it");

    // The library: not granted, so read_some is the protocol's exact READ.
    let (endpoint, trailer, reads) = original_broker(b"0123456789".to_vec());
    let mut reader = Reader::open("p", &Options::endpoint(&endpoint)).unwrap();
    assert!(!reader.partial_reads());
    assert_eq!(reader.read_some(4, None).unwrap(), ReadOutcome::Data("0123".into()));
    let mut rest = String::new();
    reader.read_to_string(&mut rest).unwrap();
    assert_eq!(rest, "456789");
    assert!(!trailer.load(Ordering::Relaxed));
    assert!(reads.load(Ordering::Relaxed) >= 2);
    reader.close().unwrap();
}

#[test]
fn our_broker_grants_the_capability_unless_the_client_declines() {
    let broker = Broker::start(&[]);
    let reader = Reader::open("g", &Options::broker(&broker.name)).unwrap();
    assert!(reader.partial_reads());
    let declined =
        Reader::open("h", &Options { partial_reads: false, ..Options::broker(&broker.name) }).unwrap();
    assert!(!declined.partial_reads());
}
