//! The real broker driven by raw DEALER sockets sending the spec's bytes:
//! these pin the wire and the selftest behaviour of docs/protocol/ZPIPES.md "Selftests".

use zbroker_proto::codec::{Chunk, ShortStr};
use zbroker_proto::ZpipesMsg as M;
use zbroker_tests::{wait_until, Broker, Raw};

use zbroker_proto::codec::testing::hex;

fn name(s: &str) -> ShortStr {
    ShortStr::new(s.as_bytes().to_vec()).unwrap()
}

fn input(pipe: &str) -> M {
    M::Input { pipename: name(pipe) }
}

fn output(pipe: &str) -> M {
    M::Output { pipename: name(pipe) }
}

fn read_ok(s: &[u8]) -> M {
    M::ReadOk { chunk: Chunk(bytes_of(s)) }
}

fn bytes_of(s: &[u8]) -> bytes::Bytes {
    bytes::Bytes::copy_from_slice(s)
}

#[test]
fn spec_vectors_on_the_wire() {
    let broker = Broker::start(&[]);
    let writer = Raw::connect(&broker.endpoint());
    let reader = Raw::connect(&broker.endpoint());
    // OUTPUT "test pipe" → OUTPUT_OK
    writer.send_bytes(&hex("AA A0 04 09 74 65 73 74 20 70 69 70 65"));
    assert_eq!(writer.recv_bytes(2000).unwrap(), hex("AA A0 05"));
    // WRITE "Hello, World" timeout 100 with no reader → WRITE_TIMEOUT
    writer.send_bytes(&hex("AA A0 0C 00 00 00 0C 48 65 6C 6C 6F 2C 20 57 6F 72 6C 64 00 00 00 64"));
    assert_eq!(writer.recv_bytes(2000).unwrap(), hex("AA A0 0E"));
    // INPUT "test pipe" → INPUT_OK
    reader.send_bytes(&hex("AA A0 01 09 74 65 73 74 20 70 69 70 65"));
    assert_eq!(reader.recv_bytes(2000).unwrap(), hex("AA A0 02"));
    // READ 12 timeout 100, nothing written → READ_TIMEOUT
    reader.send_bytes(&hex("AA A0 07 00 00 00 0C 00 00 00 64"));
    assert_eq!(reader.recv_bytes(2000).unwrap(), hex("AA A0 0A"));
    writer.send_bytes(&hex("AA A0 0C 00 00 00 0C 48 65 6C 6C 6F 2C 20 57 6F 72 6C 64 00 00 00 64"));
    assert_eq!(writer.recv_bytes(2000).unwrap(), hex("AA A0 0D"));
    reader.send_bytes(&hex("AA A0 07 00 00 00 0C 00 00 00 64"));
    assert_eq!(
        reader.recv_bytes(2000).unwrap(),
        hex("AA A0 08 00 00 00 0C 48 65 6C 6C 6F 2C 20 57 6F 72 6C 64")
    );
    // READ size 0 → READ_END; PING → PING_OK
    reader.send_bytes(&hex("AA A0 07 00 00 00 00 00 00 00 00"));
    assert_eq!(reader.recv_bytes(2000).unwrap(), hex("AA A0 09"));
    reader.send_bytes(&hex("AA A0 13 FF")); // trailing byte accepted
    assert_eq!(reader.recv_bytes(2000).unwrap(), hex("AA A0 14"));
    // The reader leaves: the writer's next WRITE fails with reason on the wire.
    reader.send_bytes(&hex("AA A0 10"));
    assert_eq!(reader.recv_bytes(2000).unwrap(), hex("AA A0 11"));
    writer.send_bytes(&hex("AA A0 0C 00 00 00 01 41 00 00 00 00"));
    let failed = writer.recv_bytes(2000).unwrap();
    assert_eq!(failed[..3], hex("AA A0 0F"));
    // CLOSE after close → INVALID
    writer.send_bytes(&hex("AA A0 10"));
    assert_eq!(writer.recv_bytes(2000).unwrap(), hex("AA A0 11"));
    writer.send_bytes(&hex("AA A0 10"));
    assert_eq!(writer.recv_bytes(2000).unwrap(), hex("AA A0 15"));
}

#[test]
fn pipelined_reads_and_close() {
    let broker = Broker::start(&[]);
    let writer = Raw::connect(&broker.endpoint());
    let reader = Raw::connect(&broker.endpoint());
    assert_eq!(writer.ask(output("test pipe")), M::OutputOk {});
    assert_eq!(reader.ask(input("test pipe")), M::InputOk {});
    for _ in 0..3 {
        reader.send(M::Read { size: 12, timeout: 100 });
    }
    assert_eq!(reader.recv(2000), Some(M::ReadTimeout {}));
    assert_eq!(writer.ask(M::Write { chunk: Chunk(bytes_of(b"Hello, World")), timeout: 100 }), M::WriteOk {});
    assert_eq!(reader.recv(2000), Some(read_ok(b"Hello, World")));
    assert_eq!(reader.ask(M::Ping {}), M::PingOk {});
    assert_eq!(writer.ask(M::Close {}), M::CloseOk {});
    assert_eq!(reader.recv(2000), Some(M::ReadEnd {}));

    // Read/close pipelining (selftest 7).
    assert_eq!(writer.ask(output("p7")), M::OutputOk {});
    assert_eq!(reader.ask(M::Close {}), M::CloseOk {});
    assert_eq!(reader.ask(input("p7")), M::InputOk {});
    reader.send(M::Read { size: 12, timeout: 0 });
    reader.send(M::Read { size: 12, timeout: 0 });
    assert_eq!(reader.ask(M::Ping {}), M::PingOk {});
    reader.send(M::Close {});
    assert!(matches!(reader.recv(2000), Some(M::ReadFailed { .. })));
    assert_eq!(reader.recv(2000), Some(M::CloseOk {}));
    assert_eq!(reader.recv(2000), Some(M::Invalid {}));
}

#[test]
fn garbage_is_dropped_and_everyone_else_is_served() {
    let broker = Broker::start(&[]);
    let vandal = Raw::connect(&broker.endpoint());
    let client = Raw::connect(&broker.endpoint());
    for garbage in
        [&b"garbage"[..], &hex("AA A0 07 00 00 00"), &hex("AA A1 13"), &hex("AA A0 63"), b"", b"\xAA"]
    {
        vandal.send_bytes(garbage);
    }
    // A multi-frame message: only the first body frame counts.
    vandal.socket.send_multipart([M::Ping {}.encode(), b"extra".to_vec()], 0).unwrap();
    assert_eq!(vandal.recv(2000), Some(M::PingOk {}));
    assert_eq!(vandal.recv(200), None, "garbage gets no reply");
    assert_eq!(client.ask(M::Ping {}), M::PingOk {});
    let status = broker.status();
    assert_eq!(status["services"]["zpipes"]["malformed_frames"], 2, "truncated READ, unknown id");
    assert_eq!(status["dropped_frames"], 4, "no service's signature: {status}");
}

#[test]
fn a_second_broker_with_the_same_name_refuses_to_start() {
    let broker = Broker::start(&[]);
    let second =
        std::process::Command::new(zbroker_tests::bin("zbroker")).arg(&broker.name).output().unwrap();
    assert_eq!(second.status.code(), Some(3), "exit 3: the name is taken");
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(stderr.contains("already running"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    // The first one still serves.
    assert_eq!(Raw::connect(&broker.endpoint()).ask(M::Ping {}), M::PingOk {});
}

#[test]
fn tcp_bind_serves_the_same_pipes_as_ipc() {
    let broker = Broker::start(&["--bind", "tcp://127.0.0.1:*"]);
    let endpoints = broker.status()["endpoints"].clone();
    let tcp = endpoints
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e.as_str())
        .find(|e| e.starts_with("tcp://"))
        .expect("a tcp endpoint")
        .to_string();
    assert!(!tcp.ends_with(":*"), "the real port is reported: {tcp}");
    let writer = Raw::connect(&tcp);
    let reader = Raw::connect(&broker.endpoint());
    assert_eq!(writer.ask(output("mixed")), M::OutputOk {});
    assert_eq!(reader.ask(input("mixed")), M::InputOk {});
    assert_eq!(writer.ask(M::Write { chunk: Chunk(bytes_of(b"over tcp")), timeout: 0 }), M::WriteOk {});
    assert_eq!(reader.ask(M::Read { size: 8, timeout: 0 }), read_ok(b"over tcp"));
}

#[test]
fn silent_connections_expire() {
    let broker = Broker::start(&["--expiry", "200"]);
    let reader = Raw::connect(&broker.endpoint());
    assert_eq!(reader.ask(input("e")), M::InputOk {});
    reader.send(M::Read { size: 12, timeout: 0 });
    assert_eq!(reader.recv(400), None, "expiry sends nothing");
    assert_eq!(reader.ask(M::Read { size: 12, timeout: 0 }), M::Invalid {});
    assert!(wait_until(std::time::Duration::from_secs(2), || broker.zpipes()["pipes"]
        .as_array()
        .is_some_and(|p| p.is_empty())));
}

#[test]
fn a_dead_peer_is_noticed_at_once() {
    let broker = Broker::start(&[]);
    let writer = Raw::connect(&broker.endpoint());
    let reader = Raw::connect(&broker.endpoint());
    assert_eq!(writer.ask(output("d")), M::OutputOk {});
    assert_eq!(reader.ask(input("d")), M::InputOk {});
    drop(reader); // closes the socket: the broker's monitor sees the disconnect
    let started = std::time::Instant::now();
    let failed = wait_until(std::time::Duration::from_secs(2), || {
        matches!(writer.ask(M::Write { chunk: Chunk(bytes_of(b"x")), timeout: 0 }), M::WriteFailed { .. })
    });
    assert!(failed, "the writer learns of the reader's end");
    assert!(started.elapsed() < std::time::Duration::from_secs(2));
}

#[test]
fn sigterm_stops_the_broker_cleanly() {
    let mut broker = Broker::start(&[]);
    let client = Raw::connect(&broker.endpoint());
    assert_eq!(client.ask(M::Ping {}), M::PingOk {});
    let status = broker.terminate();
    assert_eq!(status.code(), Some(0));
}

#[test]
fn timeouts_fire_under_steady_traffic() {
    let broker = Broker::start(&[]);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flood = {
        let (endpoint, stop) = (broker.endpoint(), stop.clone());
        std::thread::spawn(move || {
            // Keep 500 PINGs in flight, so the broker never runs dry.
            let raw = Raw::connect(&endpoint);
            for _ in 0..500 {
                raw.send(M::Ping {});
            }
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                raw.recv(2000).expect("PING_OK");
                raw.send(M::Ping {});
            }
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(100));
    let reader = Raw::connect(&broker.endpoint());
    assert_eq!(reader.ask(input("quiet")), M::InputOk {});
    let started = std::time::Instant::now();
    reader.send(M::Read { size: 1, timeout: 100 });
    assert_eq!(reader.recv(3000), Some(M::ReadTimeout {}));
    let took = started.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    flood.join().unwrap();
    assert!(took < std::time::Duration::from_millis(1000), "timed out after {took:?}");
}

#[test]
fn replies_to_a_peer_that_reads_slowly_are_parked_not_lost() {
    let broker = Broker::start(&[]);
    let context = zmq::Context::new();
    let slow = context.socket(zmq::DEALER).unwrap();
    slow.set_rcvhwm(1).unwrap();
    slow.set_linger(0).unwrap();
    slow.connect(&broker.endpoint()).unwrap();
    slow.send(input("parking").encode(), 0).unwrap();
    assert_eq!(slow.recv_bytes(0).unwrap(), M::InputOk {}.encode());
    let writer = Raw::connect(&broker.endpoint());
    assert_eq!(writer.ask(output("parking")), M::OutputOk {});
    // 4 MiB of replies (far beyond socket buffers and the send HWM) asked
    // for, and not read yet: the broker must park them.
    const N: usize = 64;
    let block = zbroker_tests::pseudo_random(64 << 10, 11);
    for _ in 0..N {
        slow.send(M::Read { size: 64 << 10, timeout: 0 }.encode(), 0).unwrap();
    }
    for _ in 0..N {
        assert_eq!(
            writer.ask(M::Write { chunk: Chunk(bytes::Bytes::from(block.clone())), timeout: 0 }),
            M::WriteOk {}
        );
    }
    assert!(wait_until(std::time::Duration::from_secs(5), || {
        broker.status()["parked_replies"].as_u64().unwrap_or(0) > 0
    }));
    // Others are served meanwhile.
    assert_eq!(Raw::connect(&broker.endpoint()).ask(M::Ping {}), M::PingOk {});
    for i in 0..N {
        assert_eq!(slow.poll(zmq::POLLIN, 5000).unwrap(), 1, "reply {i} never came");
        assert_eq!(M::decode(slow.recv_bytes(0).unwrap()).unwrap(), read_ok(&block), "reply {i}");
    }
    assert_eq!(broker.status()["parked_replies"], 0);
}

#[test]
fn a_peer_that_never_reads_its_replies_is_dropped_at_the_parking_bound() {
    let broker = Broker::start(&["--pipe-limit", "1MiB"]);
    let context = zmq::Context::new();
    let hoarder = context.socket(zmq::DEALER).unwrap();
    hoarder.set_rcvhwm(1).unwrap();
    hoarder.set_linger(0).unwrap();
    hoarder.connect(&broker.endpoint()).unwrap();
    hoarder.send(input("hoard").encode(), 0).unwrap();
    assert_eq!(hoarder.recv_bytes(0).unwrap(), M::InputOk {}.encode());
    for _ in 0..300 {
        hoarder.send(M::Read { size: 1 << 20, timeout: 0 }.encode(), 0).unwrap();
    }
    let rss_before = broker.rss();
    let writer = Raw::connect(&broker.endpoint());
    assert_eq!(writer.ask(output("hoard")), M::OutputOk {});
    let block = bytes::Bytes::from(vec![7u8; 1 << 20]);
    let mut written = 0;
    let outcome = loop {
        match writer.ask(M::Write { chunk: Chunk(block.clone()), timeout: 0 }) {
            M::WriteOk {} => written += 1,
            other => break other,
        }
        assert!(written < 300, "300 MiB went to a reader that reads nothing");
    };
    assert!(matches!(outcome, M::WriteFailed { .. }), "{outcome:?}");
    let status = broker.status();
    assert_eq!(status["parked_bytes"], 0, "the hoarder's replies were let go: {status}");
    let growth = broker.rss().saturating_sub(rss_before);
    assert!(growth < 48 << 20, "broker RSS grew by {growth} bytes after {written} MiB");
}

#[test]
fn a_write_sent_just_before_a_disconnect_is_delivered() {
    let broker = Broker::start(&[]);
    let reader = Raw::connect(&broker.endpoint());
    for round in 0..20 {
        let pipe = format!("last-{round}");
        assert_eq!(reader.ask(input(&pipe)), M::InputOk {});
        {
            // Fire and forget: WRITE, then the socket closes at once.
            let context = zmq::Context::new();
            let writer = context.socket(zmq::DEALER).unwrap();
            writer.set_linger(1000).unwrap();
            writer.connect(&broker.endpoint()).unwrap();
            writer.send(output(&pipe).encode(), 0).unwrap();
            writer.send(M::Write { chunk: Chunk(bytes_of(b"last words")), timeout: 0 }.encode(), 0).unwrap();
        }
        assert_eq!(reader.ask(M::Read { size: 10, timeout: 2000 }), read_ok(b"last words"), "round {round}");
        assert_eq!(reader.ask(M::Read { size: 10, timeout: 2000 }), M::ReadEnd {});
        assert_eq!(reader.ask(M::Close {}), M::CloseOk {});
    }
}
