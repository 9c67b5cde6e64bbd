//! Hostile peers against a running broker: a flood of random and mutated
//! frames from several connections while a legitimate pipe and a
//! legitimate subscription stream. The legitimate transfers must complete
//! byte-identical, and the broker's memory must come back down.

use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;
use zbroker_client::zpipes::{Options, Reader, Writer};
use zbroker_tests::{assert_same_tree, bin, hex, pseudo_random, put, wait_timeout, wait_until, Broker, Rng};

/// Frames the spec pins for both protocols: the seeds of the mutations.
const SEEDS: &[&str] = &[
    "AA A0 01 09 74 65 73 74 20 70 69 70 65",
    "AA A0 04 09 74 65 73 74 20 70 69 70 65",
    "AA A0 07 00 00 00 64 00 00 00 0A",
    "AA A0 0B 00 00 00 05 48 65 6C 6C 6F 00 00 00 64",
    "AA A0 13",
    "AA A0 0E",
    "AA A3 01 06 46 49 4C 45 4D 51 00 02",
    "AA A3 05 00 00 00 01 2F 00 00 00 00 00 00 00 00",
    "AA A3 07 00 00 00 00 00 4C 4B 40 00 00 00 00 00 00 00 00",
    "AA A3 09",
    "AA A3 0B",
    "AA A3 01 06 46 49 4C 45 4D 51 01",
];

/// A random frame, or a spec vector mutated: bytes flipped, cut short,
/// lengthened, or with a lying length field.
fn hostile_frame(rng: &mut Rng, seeds: &[Vec<u8>]) -> Vec<u8> {
    let mut frame = seeds[rng.index(seeds.len())].clone();
    match rng.index(6) {
        0 => frame = (0..rng.index(64)).map(|_| rng.next() as u8).collect(),
        1 => {
            for _ in 0..=rng.index(4) {
                let at = rng.index(frame.len());
                frame[at] = rng.next() as u8;
            }
        }
        2 => frame.truncate(rng.index(frame.len() + 1)),
        3 => frame.extend((0..rng.index(200)).map(|_| rng.next() as u8)),
        4 if frame.len() > 7 => {
            // A length field claiming far more than the frame holds.
            let at = 3 + rng.index(frame.len() - 6);
            frame[at..at + 4].copy_from_slice(&[0xFF, 0xFF, 0xFF, 0xF0]);
        }
        _ => {
            // Keep the signature, random message id and body.
            frame.truncate(2);
            frame.extend((0..rng.index(40)).map(|_| rng.next() as u8));
        }
    }
    frame
}

fn flood(endpoint: String, seed: u64, frames: usize) {
    let context = zmq::Context::new();
    let socket = context.socket(zmq::DEALER).expect("socket");
    socket.set_linger(0).expect("linger");
    // It never reads its replies: the broker must bound what it keeps for it.
    socket.set_rcvhwm(1).expect("rcvhwm");
    socket.connect(&endpoint).expect("connect");
    let seeds: Vec<Vec<u8>> = SEEDS.iter().map(|s| hex(s)).collect();
    let mut rng = Rng::new(seed);
    for _ in 0..frames {
        let frame = hostile_frame(&mut rng, &seeds);
        if socket.send(frame, 0).is_err() {
            break;
        }
    }
}

fn tree(root: &Path) {
    for i in 0..50 {
        put(root, &format!("d{}/f{i}", i % 5), &pseudo_random(20_000 + i * 777, i as u64));
    }
    put(root, "big.bin", &pseudo_random(24 << 20, 11));
}

#[test]
fn a_flood_of_hostile_frames_leaves_legitimate_transfers_intact() {
    let publisher = tempfile::tempdir().unwrap();
    let inbox = tempfile::tempdir().unwrap();
    tree(publisher.path());
    let root = publisher.path().to_str().unwrap();
    let broker = Broker::start(&["--publish", root, "--bind", "tcp://127.0.0.1:*"]);
    broker.wait_scanned();
    let baseline = broker.rss();
    let tcp = broker.tcp_endpoint();

    // The legitimate pipe: 32 MiB through the client library.
    let data = pseudo_random(32 << 20, 5);
    let opts = Options::endpoint(&tcp);
    let writer_opts = opts.clone();
    let sent = data.clone();
    let writer = std::thread::spawn(move || {
        let mut writer = Writer::open("legit", &writer_opts).expect("open the writer");
        writer.write_all(&sent).expect("write");
        writer.close().expect("close");
    });
    let reader = std::thread::spawn(move || {
        let mut reader = Reader::open("legit", &opts).expect("open the reader");
        let mut got = Vec::new();
        reader.read_to_end(&mut got).expect("read");
        got
    });
    // The legitimate subscription, over the same TCP endpoint.
    let mut subscriber = std::process::Command::new(bin("filemq"))
        .args(["subscribe", "/", "--inbox", inbox.path().to_str().unwrap(), "--endpoint", &tcp, "--once"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();

    // The flood: 100,000 frames from eight connections, half over ipc.
    let floods: Vec<_> = (0..8u64)
        .map(|i| {
            let endpoint = match i % 3 {
                0 => broker.endpoint(),
                1 => broker.filemq_endpoint(),
                _ => tcp.clone(),
            };
            std::thread::spawn(move || flood(endpoint, 0x9E37_79B9 + i, 12_500))
        })
        .collect();
    for f in floods {
        f.join().unwrap();
    }

    writer.join().expect("the writer finished");
    let got = reader.join().expect("the reader finished");
    assert_eq!(got.len(), data.len());
    assert!(got == data, "the pipe's bytes arrived identical");
    let status = wait_timeout(&mut subscriber, Duration::from_secs(120)).expect("filemq --once finished");
    assert!(status.success(), "{status:?}");
    assert_same_tree(publisher.path(), inbox.path());

    let st = broker.status();
    let malformed = st["services"]["zpipes"]["malformed_frames"].as_u64().unwrap()
        + st["services"]["filemq"]["malformed_frames"].as_u64().unwrap()
        + st["dropped_frames"].as_u64().unwrap();
    assert!(malformed > 10_000, "the flood reached the broker ({malformed} frames dropped)");
    // Once the hostile peers have gone, the broker lets go of them.
    assert!(
        wait_until(Duration::from_secs(10), || broker.status()["peers"] == 0),
        "peers left: {:#}",
        broker.status()
    );
    let settled = broker.rss();
    eprintln!("broker RSS: {} MiB at rest before, {} MiB after", baseline >> 20, settled >> 20);
    // The allocator keeps some freed memory; what matters is that nothing
    // grows with the flood (100,000 frames, about 8 MB).
    assert!(settled < baseline + (24 << 20), "memory did not come back: {baseline} -> {settled} bytes");
}
