//! One client must not stall the broker's loop. ICANHAZ frames of
//! 12,000,000 empty cache entries (60 MB each) and a legitimate cache of a
//! million files, from one connection, while a pipe streams: the stream
//! completes, a concurrent pipe round trip stays under a second, and the
//! broker's peak memory stays under 256 MB. A RESYNC of a large tree with
//! 64 exclude patterns: walked off the loop, no pass longer than before.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use zbroker_client::zpipes::{Options, Reader, Writer};
use zbroker_proto::codec::{Hash, ShortStr};
use zbroker_proto::filemq::FilemqMsg;
use zbroker_proto::filemq_ext;
use zbroker_tests::bomb::{bomb, million_files};
use zbroker_tests::{pseudo_random, Broker};

fn recv(socket: &zmq::Socket, ms: i64) -> Option<FilemqMsg> {
    (socket.poll(zmq::POLLIN, ms).ok()? > 0).then(|| FilemqMsg::decode(socket.recv_bytes(0).ok()?).ok())?
}

/// The probe: a round trip through a pipe of its own every 10 ms until
/// `stop`; the worst round trip and how many.
fn probe(opts: &Options, stop: &Arc<AtomicBool>) -> std::thread::JoinHandle<(Duration, u32)> {
    let (stop, opts) = (stop.clone(), opts.clone());
    std::thread::spawn(move || {
        let mut writer = Writer::open("probe", &opts).expect("open the probe writer");
        let mut reader = Reader::open("probe", &opts).expect("open the probe reader");
        let (mut worst, mut trips) = (Duration::ZERO, 0);
        while !stop.load(Ordering::Relaxed) {
            let started = Instant::now();
            writer.write_all(b"ping").and_then(|()| writer.flush()).expect("probe write");
            let mut back = [0u8; 4];
            reader.read_exact(&mut back).expect("probe read");
            worst = worst.max(started.elapsed());
            trips += 1;
            std::thread::sleep(Duration::from_millis(10));
        }
        (worst, trips)
    })
}

#[test]
fn an_icanhaz_bomb_from_one_client_does_not_stall_the_loop() {
    let published = tempfile::tempdir().unwrap();
    let broker = Broker::start(&["--publish", published.path().to_str().unwrap()]);
    broker.wait_scanned();
    let opts = Options::endpoint(&broker.endpoint());

    // The stream: 32 MiB through a pipe, start to end.
    let data = pseudo_random(32 << 20, 3);
    let (sent, writer_opts, reader_opts) = (data.clone(), opts.clone(), opts.clone());
    let writer = std::thread::spawn(move || {
        let mut writer = Writer::open("stream", &writer_opts).expect("open the writer");
        writer.write_all(&sent).expect("write");
        writer.close().expect("close");
    });
    let reader = std::thread::spawn(move || {
        let mut reader = Reader::open("stream", &reader_opts).expect("open the reader");
        let mut got = Vec::new();
        reader.read_to_end(&mut got).expect("read");
        got
    });

    let stop = Arc::new(AtomicBool::new(false));
    let probe = probe(&opts, &stop);

    // The bomb, from one connection: three 60 MB frames of empty entries,
    // then a legitimate cache of a million files.
    let before = broker.status();
    let context = zmq::Context::new();
    let client = context.socket(zmq::DEALER).unwrap();
    client.set_linger(0).unwrap();
    client.connect(&broker.filemq_endpoint()).unwrap();
    client.send(FilemqMsg::Ohai { protocol: ShortStr::lossy("FILEMQ"), version: 2 }.encode(), 0).unwrap();
    assert_eq!(recv(&client, 5000), Some(FilemqMsg::OhaiOk {}));
    let frame = bomb();
    for _ in 0..3 {
        client.send(&frame[..], 0).unwrap();
    }
    drop(frame);
    let legit = million_files("/bomb");
    eprintln!("a million-file cache: {} bytes", legit.len());
    client.send(legit, 0).unwrap();
    client.send(FilemqMsg::Hugz {}.encode(), 0).unwrap();
    // The legitimate cache is taken (ICANHAZ-OK), and the HUGZ that waited
    // behind it is answered after it.
    assert_eq!(recv(&client, 60_000), Some(FilemqMsg::IcanhazOk {}));
    assert_eq!(recv(&client, 10_000), Some(FilemqMsg::HugzOk {}));
    // Gone: the million names it held are freed too, and not on the loop.
    drop(client);
    assert!(
        zbroker_tests::wait_until(Duration::from_secs(10), || {
            broker.status()["services"]["filemq"]["connections"] == 0
        }),
        "the bomber is forgotten"
    );

    writer.join().expect("the writer finished");
    let got = reader.join().expect("the reader finished");
    assert!(got == data, "the stream arrived whole");
    stop.store(true, Ordering::Relaxed);
    let (worst, trips) = probe.join().expect("the probe finished");

    let after = broker.status();
    let peak = broker.peak_rss();
    eprintln!(
        "round trips: {trips}, worst {worst:?}; longest loop pass {} ms before the bomb, {} ms after ({}); \
         peak RSS {} MiB",
        before["longest_pass_ms"],
        after["longest_pass_ms"],
        after["longest_pass_cause"],
        peak >> 20
    );
    assert_eq!(after["services"]["filemq"]["malformed_frames"], 3, "the three bombs refused");
    assert!(trips > 0);
    assert!(worst < Duration::from_secs(1), "a pipe round trip took {worst:?} under the bomb");
    let longest = after["longest_pass_ms"].as_f64().expect("the status shows the longest pass");
    assert!(longest < 1000.0, "a loop pass took {longest} ms: {}", after["longest_pass_cause"]);
    assert!(peak <= 256 << 20, "peak RSS {} MiB", peak >> 20);
}

/// Files in the RESYNC test's tree: a walk of them with 64 patterns on
/// the loop takes about 200 ms in a debug build (README "Performance").
const TREE_DIRS: usize = 25;
const TREE_FILES: usize = 1000;
/// The longest pass allowed: 1,024 entries sent in one pass take up to
/// 130 ms in a debug build, over 300 ms on a loaded machine.
const PASS_BOUND_MS: f64 = 500.0;

#[test]
fn a_resync_of_a_large_tree_is_walked_off_the_loop() {
    // Made in memory where there is a tmpfs: 25,000 files on a busy disk
    // can take 20 s.
    let shm = std::path::Path::new("/dev/shm");
    let published = if shm.is_dir() { tempfile::tempdir_in(shm) } else { tempfile::tempdir() }.unwrap();
    let made = Instant::now();
    for d in 0..TREE_DIRS {
        let dir = published.path().join(format!("d{d:02}"));
        std::fs::create_dir(&dir).unwrap();
        for f in 0..TREE_FILES {
            // Empty: sent without credit, so the test grants none.
            std::fs::File::create(dir.join(format!("f{f:04}"))).unwrap();
        }
    }
    let broker = Broker::start(&["--publish", published.path().to_str().unwrap()]);
    // Files younger than the stable age (1 s) wait for a rescan: the
    // RESYNC must find them all in the snapshot.
    let all = (TREE_DIRS * TREE_FILES) as u64;
    let scanned = zbroker_tests::wait_until(Duration::from_secs(30), || {
        broker.filemq()["mounts"][0]["files"].as_u64() == Some(all)
    });
    assert!(scanned, "the tree was not published within 30 s");
    eprintln!("tree made and scanned in {:?}", made.elapsed());
    let before = broker.status();
    let stop = Arc::new(AtomicBool::new(false));
    let probe = probe(&Options::endpoint(&broker.endpoint()), &stop);
    // Its pipe open, round trips under way before the RESYNC.
    std::thread::sleep(Duration::from_millis(300));

    let context = zmq::Context::new();
    let client = context.socket(zmq::DEALER).unwrap();
    client.set_linger(0).unwrap();
    client.connect(&broker.filemq_endpoint()).unwrap();
    let ohai = FilemqMsg::Ohai { protocol: ShortStr::lossy("FILEMQ"), version: 2 };
    client.send(filemq_ext::encode_with_bits(&ohai, filemq_ext::EXCLUDE), 0).unwrap();
    let greeting = client.poll(zmq::POLLIN, 5000).unwrap() > 0;
    assert!(
        greeting && client.recv_bytes(0).unwrap() == filemq_ext::encode_with_bits(&FilemqMsg::OhaiOk {}, 2)
    );
    // 64 patterns that match nothing here: each costs its whole match.
    let mut patterns: Vec<String> = (0..63).map(|i| format!("/n{i}/**/x?y*.z")).collect();
    patterns.push("*.log".into());
    let mut options = Hash::default();
    for (key, value) in
        [("RESYNC", "1".to_string()), ("X-ZBROKER", "1".into()), ("X-EXCLUDE", patterns.join("\n"))]
    {
        options.insert(key, value).unwrap();
    }
    let icanhaz = FilemqMsg::Icanhaz { path: "/".into(), options, cache: Hash::default() };
    client.send(icanhaz.encode(), 0).unwrap();
    assert_eq!(recv(&client, 10_000), Some(FilemqMsg::IcanhazOk {}));
    let (mut files, started) = (0, Instant::now());
    loop {
        match recv(&client, 30_000) {
            Some(FilemqMsg::Cheezburger { headers, .. }) if headers.get("X-SYNCED").is_some() => break,
            Some(FilemqMsg::Cheezburger { eof: 1, .. }) => files += 1,
            other => panic!("after {files} files: {other:?}"),
        }
    }
    let took = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let (worst, trips) = probe.join().expect("the probe finished");
    let after = broker.status();
    eprintln!(
        "{files} files in {took:?}; round trips: {trips}, worst {worst:?}; longest loop pass {} ms before \
         the RESYNC ({}), {} ms after ({})",
        before["longest_pass_ms"],
        before["longest_pass_cause"],
        after["longest_pass_ms"],
        after["longest_pass_cause"]
    );
    assert_eq!(files, TREE_DIRS * TREE_FILES, "every file, then the marker");
    assert!(trips > 0 && worst < Duration::from_secs(1), "a pipe round trip took {worst:?}");
    let (before, longest) =
        (before["longest_pass_ms"].as_f64().unwrap(), after["longest_pass_ms"].as_f64().unwrap());
    let cause = after["longest_pass_cause"].as_str().unwrap_or_default();
    assert!(longest <= before.max(PASS_BOUND_MS), "a loop pass took {longest} ms during the RESYNC: {cause}");
    // Walked on the loop, the ICANHAZ's pass would be the walk plus the
    // first 1,024 entries sent: longer than any pass sending entries.
    assert!(!cause.starts_with("filemq message 5 "), "the ICANHAZ took the longest pass: {longest} ms");
}
