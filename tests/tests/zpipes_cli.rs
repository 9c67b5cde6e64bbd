//! The `zpipes` programs against the real broker: streams, exit statuses,
//! hostile neighbours and slow readers.

use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use zbroker_client::zpipes::{Options, ReadOutcome, Reader};
use zbroker_tests::{bin, pseudo_random, wait_timeout, Broker, Raw};

fn zpipes(broker: &Broker, args: &[&str]) -> Command {
    let mut command = Command::new(bin("zpipes"));
    command.arg("--broker").arg(&broker.name).args(args);
    command
}

fn spawn_writer(broker: &Broker, pipe: &str, data: Vec<u8>) -> (Child, std::thread::JoinHandle<()>) {
    let mut writer = zpipes(broker, &["write", pipe]).stdin(Stdio::piped()).spawn().unwrap();
    let mut stdin = writer.stdin.take().unwrap();
    // A writer that exits early (as some tests intend) closes the pipe:
    // its exit status, checked by the test, says why.
    let feeder = std::thread::spawn(move || {
        let _ = stdin.write_all(&data);
    });
    (writer, feeder)
}

fn stream_through(broker: &Broker, pipe: &str, data: &[u8]) {
    let (mut writer, feeder) = spawn_writer(broker, pipe, data.to_vec());
    let reader = zpipes(broker, &["read", pipe]).stdout(Stdio::piped()).spawn().unwrap();
    let out = reader.wait_with_output().unwrap();
    feeder.join().unwrap();
    assert!(writer.wait().unwrap().success(), "zpipes write failed");
    assert!(out.status.success(), "zpipes read failed");
    assert_eq!(out.stdout.len(), data.len());
    assert!(out.stdout == data, "bytes differ");
}

#[test]
fn sixty_four_mib_arrive_byte_identical() {
    let broker = Broker::start(&[]);
    stream_through(&broker, "big", &pseudo_random(64 << 20, 64));
}

#[test]
fn empty_input_is_an_empty_stream() {
    let broker = Broker::start(&[]);
    stream_through(&broker, "empty", &[]);
}

#[test]
fn the_reader_may_start_first() {
    let broker = Broker::start(&[]);
    let reader = zpipes(&broker, &["read", "early"]).stdout(Stdio::piped()).spawn().unwrap();
    let attached = zbroker_tests::wait_until(Duration::from_secs(5), || {
        broker.zpipes()["pipes"].as_array().is_some_and(|pipes| {
            pipes.iter().any(|p| p["name"] == "early" && p["reader"] == true && p["writer"] == false)
        })
    });
    assert!(attached, "the reader is there before any writer");
    let (mut writer, feeder) = spawn_writer(&broker, "early", b"hello\n".to_vec());
    let out = reader.wait_with_output().unwrap();
    feeder.join().unwrap();
    assert!(writer.wait().unwrap().success());
    assert_eq!(out.stdout, b"hello\n");
}

#[test]
fn exit_statuses_say_what_happened() {
    let broker = Broker::start(&[]);
    // 3: timed out waiting for a reader, or for data.
    let out =
        zpipes(&broker, &["write", "lonely", "--timeout", "200"]).stdin(Stdio::null()).output().unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));
    let out = zpipes(&broker, &["read", "lonely", "--timeout", "200"]).output().unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(String::from_utf8_lossy(&out.stderr).trim(), "zpipes: no data on pipe \"lonely\" in time");

    // 5: the pipe already has a reader.
    let _holder = Reader::open("taken", &Options::broker(&broker.name)).unwrap();
    let out = zpipes(&broker, &["read", "taken"]).output().unwrap();
    assert_eq!(out.status.code(), Some(5));
    assert_eq!(String::from_utf8_lossy(&out.stderr).trim(), "zpipes: pipe \"taken\" already has a reader");

    // 6: the reader went away while the writer still had data.
    let mut reader = Reader::open("short", &Options::broker(&broker.name)).unwrap();
    let (mut writer, feeder) = spawn_writer(&broker, "short", pseudo_random(32 << 20, 1));
    assert!(matches!(reader.read_chunk(1000, None).unwrap(), ReadOutcome::Data(_)));
    reader.close().unwrap();
    let status = wait_timeout(&mut writer, Duration::from_secs(10)).expect("the writer gives up");
    assert_eq!(status.code(), Some(6));
    drop(feeder); // its write fails with EPIPE once the writer has exited
}

#[test]
fn garbage_from_one_connection_does_not_disturb_a_stream() {
    let broker = Broker::start(&[]);
    let stop = Arc::new(AtomicBool::new(false));
    let vandal = {
        let (endpoint, stop) = (broker.endpoint(), stop.clone());
        std::thread::spawn(move || {
            let raw = Raw::connect(&endpoint);
            let vectors = [
                &b"garbage"[..],
                &[0xAA, 0xA0, 0x07, 0, 0, 0],
                &[0xAA, 0xA0, 0x63],
                &[0xAA, 0xA0, 0x0C, 0xFF, 0xFF, 0xFF, 0xFF],
                &[0xAA, 0xA0, 0x02], // a server id from a client
            ];
            let mut sent = 0u64;
            while !stop.load(Ordering::Relaxed) {
                raw.send_bytes(vectors[(sent % vectors.len() as u64) as usize]);
                sent += 1;
                while raw.recv_bytes(0).is_some() {}
            }
            sent
        })
    };
    stream_through(&broker, "steady", &pseudo_random(16 << 20, 16));
    stop.store(true, Ordering::Relaxed);
    let sent = vandal.join().unwrap();
    assert!(sent > 100, "the vandal was busy: {sent} frames");
    assert!(broker.zpipes()["malformed_frames"].as_u64().unwrap() > 0);
}

#[test]
fn a_slow_reader_keeps_broker_memory_bounded() {
    const LIMIT: u64 = 1 << 20;
    let broker = Broker::start(&["--pipe-limit", "1MiB"]);
    let total = 48 << 20;
    let (mut writer, feeder) = spawn_writer(&broker, "slow", pseudo_random(total, 5));
    let mut reader = Reader::open("slow", &Options::broker(&broker.name)).unwrap();
    let rss_before = broker.rss();
    let mut got = 0usize;
    let mut max_queued = 0u64;
    let mut buf = vec![0u8; 64 << 10];
    while got < total {
        let n = reader.read(&mut buf).unwrap();
        assert!(n > 0, "stream ended early at {got}");
        got += n;
        // Slow: about 20 MiB/s, far below what the writer could do.
        std::thread::sleep(Duration::from_millis(3));
        if got.is_multiple_of(4 << 20) {
            let queued = broker.zpipes()["queued_bytes"].as_u64().unwrap();
            max_queued = max_queued.max(queued);
        }
    }
    assert_eq!(reader.read(&mut buf).unwrap(), 0);
    feeder.join().unwrap();
    assert!(writer.wait().unwrap().success());
    let z = broker.zpipes();
    let peak = z["peak_queued_bytes"].as_u64().unwrap();
    assert!(peak <= LIMIT, "peak queued {peak} exceeds the {LIMIT} bound");
    assert!(max_queued > LIMIT / 2, "the pipe did fill up ({max_queued}): the bound was exercised");
    let rss_growth = broker.rss().saturating_sub(rss_before);
    assert!(rss_growth < 32 << 20, "broker RSS grew by {rss_growth} bytes for a {total}-byte stream");
}

#[test]
fn zpipes_reads_through_a_tcp_endpoint() {
    let broker = Broker::start(&["--bind", "tcp://127.0.0.1:*"]);
    let tcp = broker.status()["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e.as_str())
        .find(|e| e.starts_with("tcp://"))
        .unwrap()
        .to_string();
    let (mut writer, feeder) = spawn_writer(&broker, "net", pseudo_random(1 << 20, 9));
    let mut reader = Command::new(bin("zpipes"))
        .args(["--endpoint", &tcp, "read", "net"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut got = Vec::new();
    reader.stdout.take().unwrap().read_to_end(&mut got).unwrap();
    assert!(reader.wait().unwrap().success());
    feeder.join().unwrap();
    assert!(writer.wait().unwrap().success());
    assert!(got == pseudo_random(1 << 20, 9));
}

#[test]
fn a_quiet_writer_is_kept_alive_and_the_stream_is_whole() {
    // Expiry shorter than the writer's pause: only its pings keep it.
    let broker = Broker::start(&["--expiry", "2500"]);
    let mut writer = zpipes(&broker, &["write", "pause"]).stdin(Stdio::piped()).spawn().unwrap();
    let reader = zpipes(&broker, &["read", "pause"]).stdout(Stdio::piped()).spawn().unwrap();
    let mut stdin = writer.stdin.take().unwrap();
    stdin.write_all(b"first\n").unwrap();
    std::thread::sleep(Duration::from_millis(5000));
    stdin.write_all(b"second\n").unwrap();
    drop(stdin);
    let out = reader.wait_with_output().unwrap();
    assert!(writer.wait().unwrap().success());
    assert!(out.status.success());
    assert_eq!(out.stdout, b"first\nsecond\n");
}

#[test]
fn a_trickle_reaches_the_reader_without_waiting_for_a_block() {
    let broker = Broker::start(&[]);
    let mut reader = zpipes(&broker, &["read", "trickle"]).stdout(Stdio::piped()).spawn().unwrap();
    let mut writer = zbroker_client::zpipes::Writer::open("trickle", &Options::broker(&broker.name)).unwrap();
    let mut out = reader.stdout.take().unwrap();
    for line in [&b"hello\n"[..], b"world\n"] {
        let started = std::time::Instant::now();
        writer.write_chunk(line, None).unwrap();
        let mut got = vec![0u8; line.len()];
        out.read_exact(&mut got).unwrap();
        assert_eq!(got, line);
        assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
    }
    writer.close().unwrap();
    assert!(reader.wait().unwrap().success());
}
