//! The client library against the real broker: typed outcomes, std::io,
//! heartbeats, and what happens when a peer or the broker dies.

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use zbroker_client::zpipes::{Error, Options, ReadOutcome, Reader, WriteOutcome, Writer};
use zbroker_tests::{bin, pseudo_random, signal, wait_timeout, Broker};

fn ms(n: u64) -> Option<Duration> {
    Some(Duration::from_millis(n))
}

#[test]
fn typed_outcomes_follow_the_selftest() {
    let broker = Broker::start(&[]);
    let opts = Options::broker(&broker.name);
    let mut reader = Reader::open("selftest", &opts).unwrap();
    let mut writer = Writer::open("selftest", &opts).unwrap();
    assert_eq!(reader.read_chunk(6, ms(100)).unwrap(), ReadOutcome::Timeout);
    for _ in 0..3 {
        assert_eq!(writer.write_chunk(b"CHUNK1", ms(100)).unwrap(), WriteOutcome::Written);
    }
    assert_eq!(reader.read_chunk(1, None).unwrap(), ReadOutcome::Data("C".into()));
    assert_eq!(reader.read_chunk(10, None).unwrap(), ReadOutcome::Data("HUNK1CHUNK".into()));
    writer.close().unwrap();
    assert_eq!(reader.read_chunk(50, None).unwrap(), ReadOutcome::Data("1CHUNK1".into()));
    assert_eq!(reader.read_chunk(50, None).unwrap(), ReadOutcome::End);
    reader.close().unwrap();
}

#[test]
fn one_reader_and_one_writer_per_pipe() {
    let broker = Broker::start(&[]);
    let opts = Options::broker(&broker.name);
    let _reader = Reader::open("busy", &opts).unwrap();
    let _writer = Writer::open("busy", &opts).unwrap();
    assert!(matches!(Reader::open("busy", &opts), Err(Error::Busy { end: "reader", .. })));
    assert!(matches!(Writer::open("busy", &opts), Err(Error::Busy { end: "writer", .. })));
    assert!(matches!(Reader::open(&"x".repeat(256), &opts), Err(Error::BadName(_))));
}

#[test]
fn no_broker_is_reported_quickly() {
    let mut opts = Options::broker(&zbroker_tests::unique_name("absent"));
    opts.connect_timeout = Duration::from_millis(300);
    let started = Instant::now();
    assert!(matches!(Reader::open("p", &opts), Err(Error::NoBroker(_))));
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[test]
fn std_io_copy_moves_a_stream_intact() {
    let broker = Broker::start(&["--pipe-limit", "1MiB"]);
    let opts = Options::broker(&broker.name);
    let data = pseudo_random(5 << 20, 7);
    let expected = data.clone();
    let writer_opts = opts.clone();
    let writer = std::thread::spawn(move || {
        let mut writer = Writer::open("copy", &writer_opts).unwrap();
        std::io::copy(&mut &data[..], &mut writer).unwrap();
        writer.close().unwrap();
    });
    let mut reader = Reader::open("copy", &opts).unwrap();
    let mut got = Vec::new();
    let mut buf = vec![0u8; 100_000]; // not a divisor of anything
    loop {
        let n = reader.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    writer.join().unwrap();
    assert_eq!(got.len(), expected.len());
    assert!(got == expected, "bytes differ");
    assert!(broker.zpipes()["peak_queued_bytes"].as_u64().unwrap() <= 1 << 20);
}

#[test]
fn a_long_wait_is_kept_alive_by_pings() {
    let broker = Broker::start(&["--expiry", "300"]);
    let mut opts = Options::broker(&broker.name);
    opts.heartbeat = Duration::from_millis(100);
    let mut reader = Reader::open("patient", &opts).unwrap();
    let writer_opts = opts.clone();
    let writer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(1500));
        let mut writer = Writer::open("patient", &writer_opts).unwrap();
        assert_eq!(writer.write_chunk(b"late", None).unwrap(), WriteOutcome::Written);
        writer.close().unwrap();
    });
    assert_eq!(reader.read_chunk(4, None).unwrap(), ReadOutcome::Data("late".into()), "not expired");
    writer.join().unwrap();
    // Idle between calls: an explicit ping keeps the end alive.
    for _ in 0..6 {
        std::thread::sleep(Duration::from_millis(100));
        reader.ping().unwrap();
    }
    assert_eq!(reader.read_chunk(4, None).unwrap(), ReadOutcome::End);
}

#[test]
fn a_writer_learns_of_a_killed_reader_within_two_seconds() {
    let broker = Broker::start(&["--pipe-limit", "1MiB"]);
    let mut reader = Command::new(bin("zpipes"))
        .args(["--broker", &broker.name, "read", "victim", "--block-size", "4096"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut writer = Writer::open("victim", &Options::broker(&broker.name)).unwrap();
    let block = vec![0x5Au8; 64 << 10];
    // Stream until the reader is visibly consuming.
    let mut out = reader.stdout.take().unwrap();
    let mut first = [0u8; 4096];
    writer.write_all(&block).unwrap();
    writer.flush().unwrap();
    out.read_exact(&mut first).unwrap();
    signal(&reader, libc::SIGKILL);
    let killed = Instant::now();
    wait_timeout(&mut reader, Duration::from_secs(5)).unwrap();
    let error = loop {
        if let Err(e) = writer.write_all(&block).and_then(|()| writer.flush()) {
            break e;
        }
        assert!(killed.elapsed() < Duration::from_secs(2), "writes still succeed 2 s after the kill");
    };
    assert!(killed.elapsed() < Duration::from_secs(2), "noticed after {:?}", killed.elapsed());
    assert!(error.to_string().contains("reader has gone"), "{error}");
}

#[test]
fn a_killed_writer_leaves_its_data_then_end_of_stream() {
    let broker = Broker::start(&[]);
    let mut writer = Command::new(bin("zpipes"))
        .args(["--broker", &broker.name, "write", "orphan"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    let mut reader = Reader::open("orphan", &Options::broker(&broker.name)).unwrap();
    let payload = pseudo_random(100_000, 3);
    writer.stdin.as_mut().unwrap().write_all(&payload).unwrap();
    // Wait until the broker holds all of it, then kill the writer.
    let queued = zbroker_tests::wait_until(Duration::from_secs(5), || {
        broker.zpipes()["queued_bytes"].as_u64() == Some(payload.len() as u64)
    });
    assert!(queued, "{}", broker.zpipes());
    signal(&writer, libc::SIGKILL);
    wait_timeout(&mut writer, Duration::from_secs(5)).unwrap();
    let mut got = Vec::new();
    let started = Instant::now();
    loop {
        match reader.read_chunk(30_000, None).unwrap() {
            ReadOutcome::Data(d) => got.extend_from_slice(&d),
            ReadOutcome::End => break,
            ReadOutcome::Timeout => unreachable!("no timeout was asked"),
        }
    }
    assert!(got == payload, "the queued bytes arrive intact");
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[test]
fn a_dead_broker_ends_a_wait_instead_of_hanging() {
    let mut broker = Broker::start(&[]);
    let opts = Options::broker(&broker.name);
    let mut reader = Reader::open("doomed", &opts).unwrap();
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        signal(&broker.child, libc::SIGKILL);
        wait_timeout(&mut broker.child, Duration::from_secs(5)).unwrap();
    });
    let started = Instant::now();
    let result = reader.read_chunk(10, None);
    assert!(matches!(result, Err(Error::BrokerGone { .. })), "{result:?}");
    assert!(started.elapsed() < Duration::from_secs(3));
    killer.join().unwrap();
}

#[test]
fn read_ahead_keeps_the_stream_in_order_across_timeouts() {
    let broker = Broker::start(&[]);
    let opts = Options { read_ahead: true, ..Options::broker(&broker.name) };
    let mut reader = Reader::open("ahead", &opts).unwrap();
    let mut writer = Writer::open("ahead", &opts).unwrap();
    assert_eq!(writer.write_chunk(b"abcdef", None).unwrap(), WriteOutcome::Written);
    assert_eq!(reader.read_chunk(3, None).unwrap(), ReadOutcome::Data("abc".into()));
    // The read-ahead has fetched "def" meanwhile.
    assert!(zbroker_tests::wait_until(Duration::from_secs(2), || broker.zpipes()["queued_bytes"] == 0));
    assert_eq!(reader.read_chunk(2, ms(100)).unwrap(), ReadOutcome::Data("de".into()));
    assert_eq!(reader.read_chunk(5, ms(100)).unwrap(), ReadOutcome::Timeout, "only \"f\" is there");
    assert_eq!(writer.write_chunk(b"ghij", None).unwrap(), WriteOutcome::Written);
    assert_eq!(reader.read_chunk(5, ms(1000)).unwrap(), ReadOutcome::Data("fghij".into()));
    // std::io::Read hands out what is buffered without waiting for more.
    assert_eq!(writer.write_chunk(b"klm", None).unwrap(), WriteOutcome::Written);
    assert_eq!(reader.read_chunk(1, None).unwrap(), ReadOutcome::Data("k".into()));
    // The read-ahead asks for as much as the last read: one byte.
    assert!(zbroker_tests::wait_until(Duration::from_secs(2), || broker.zpipes()["queued_bytes"] == 1));
    let mut buf = [0u8; 100];
    let n = std::io::Read::read(&mut reader, &mut buf).unwrap();
    assert_eq!(&buf[..n], b"l");
    writer.close().unwrap();
    let n = std::io::Read::read(&mut reader, &mut buf).unwrap();
    assert_eq!(&buf[..n], b"m", "a short read once the writer has gone");
    assert_eq!(std::io::Read::read(&mut reader, &mut buf).unwrap(), 0);
    reader.close().unwrap();
}

#[test]
fn without_read_ahead_a_timed_read_gets_what_is_there() {
    let broker = Broker::start(&[]);
    let opts = Options::broker(&broker.name);
    let mut reader = Reader::open("plain", &opts).unwrap();
    let mut writer = Writer::open("plain", &opts).unwrap();
    assert_eq!(writer.write_chunk(b"0123456789", None).unwrap(), WriteOutcome::Written);
    assert_eq!(reader.read_chunk(6, None).unwrap(), ReadOutcome::Data("012345".into()));
    assert_eq!(reader.read_chunk(4, ms(500)).unwrap(), ReadOutcome::Data("6789".into()));
    assert_eq!(reader.read_chunk(4, ms(100)).unwrap(), ReadOutcome::Timeout);
    assert_eq!(writer.write_chunk(b"abcd", None).unwrap(), WriteOutcome::Written);
    assert_eq!(reader.read_chunk(4, None).unwrap(), ReadOutcome::Data("abcd".into()));
}

#[test]
fn a_full_chunk_goes_out_without_a_flush() {
    let broker = Broker::start(&[]);
    let opts = Options::broker(&broker.name);
    let mut reader = Reader::open("full", &opts).unwrap();
    let mut writer = Writer::open("full", &opts).unwrap();
    let data = pseudo_random(opts.max_chunk, 21);
    writer.write_all(&data).unwrap(); // no flush: the chunk is full
    assert_eq!(reader.read_chunk(data.len(), ms(5000)).unwrap(), ReadOutcome::Data(data.into()));
    writer.close().unwrap();
}
