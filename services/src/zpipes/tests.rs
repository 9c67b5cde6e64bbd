//! The original selftest scenarios (docs/protocol/ZPIPES.md "Selftests") and our fixes
//! ("Divergences"), on a simulated clock.

use super::*;
use crate::sim::Sim;
use proptest::prelude::*;
use ZpipesMsg as M;

struct World(Sim<Zpipes>);

const R: u64 = 1;
const W: u64 = 2;

fn name(s: &str) -> ShortStr {
    ShortStr::new(s.as_bytes().to_vec()).unwrap()
}
fn input(pipe: &str) -> ZpipesMsg {
    M::Input { pipename: name(pipe) }
}
fn output(pipe: &str) -> ZpipesMsg {
    M::Output { pipename: name(pipe) }
}
fn chunk(s: &[u8]) -> Chunk {
    Chunk(Bytes::copy_from_slice(s))
}
fn read(size: u32, timeout: u32) -> ZpipesMsg {
    M::Read { size, timeout }
}
fn write(data: &[u8], timeout: u32) -> ZpipesMsg {
    M::Write { chunk: chunk(data), timeout }
}
fn read_ok(data: &[u8]) -> ZpipesMsg {
    M::ReadOk { chunk: chunk(data) }
}

impl World {
    fn new() -> Self {
        Self::with(Config::default())
    }
    fn with(config: Config) -> Self {
        World(Sim::new(Zpipes::new(config)))
    }
    fn send(&mut self, conn: u64, msg: ZpipesMsg) {
        self.0.send_raw(conn, msg.encode());
    }
    fn recv(&mut self, conn: u64) -> Vec<ZpipesMsg> {
        self.0.take_raw(conn).into_iter().map(|f| M::decode(f).expect("server frames decode")).collect()
    }
    /// Sends and returns whatever `conn` got back at once.
    fn ask(&mut self, conn: u64, msg: ZpipesMsg) -> Vec<ZpipesMsg> {
        self.send(conn, msg);
        self.recv(conn)
    }
    fn ms(&mut self, ms: u64) {
        self.0.advance(Duration::from_millis(ms));
    }
    fn open_pair(&mut self) {
        assert_eq!(self.ask(W, output("test pipe")), [M::OutputOk {}]);
        assert_eq!(self.ask(R, input("test pipe")), [M::InputOk {}]);
    }
}

fn reason_of(msg: &ZpipesMsg) -> String {
    match msg {
        M::ReadFailed { reason } | M::WriteFailed { reason } => reason.to_string_lossy(),
        other => panic!("not a failure: {other:?}"),
    }
}

#[test]
fn selftest_1_to_5_basic_flow() {
    let mut w = World::new();
    assert_eq!(w.ask(W, output("test pipe")), [M::OutputOk {}]);
    w.send(W, write(b"Hello, World", 100));
    w.ms(99);
    assert_eq!(w.recv(W), []);
    w.ms(1);
    assert_eq!(w.recv(W), [M::WriteTimeout {}]);

    assert_eq!(w.ask(R, input("test pipe")), [M::InputOk {}]);
    w.send(R, read(12, 100));
    w.ms(100);
    assert_eq!(w.recv(R), [M::ReadTimeout {}]);

    assert_eq!(w.ask(W, write(b"Hello, World", 0)), [M::WriteOk {}]);
    assert_eq!(w.ask(R, read(12, 0)), [read_ok(b"Hello, World")]);
    assert_eq!(w.ask(R, read(0, 0)), [M::ReadEnd {}]);
    assert_eq!(w.ask(W, M::Close {}), [M::CloseOk {}]);
    assert_eq!(w.ask(R, read(12, 100)), [M::ReadEnd {}]);
    assert_eq!(w.ask(R, M::Close {}), [M::CloseOk {}]);
    assert_eq!(w.0.service.counts(), (2, 0));
}

#[test]
fn selftest_6_pipelining() {
    let mut w = World::new();
    w.open_pair();
    for _ in 0..3 {
        w.send(R, read(12, 100));
    }
    w.ms(100);
    assert_eq!(w.recv(R), [M::ReadTimeout {}]);
    assert_eq!(w.ask(W, write(b"Hello, World", 100)), [M::WriteOk {}]);
    assert_eq!(w.recv(R), [read_ok(b"Hello, World")]);
    assert_eq!(w.ask(R, M::Ping {}), [M::PingOk {}]);
    w.ms(50);
    assert_eq!(w.ask(W, M::Close {}), [M::CloseOk {}]);
    assert_eq!(w.recv(R), [M::ReadEnd {}]);
    assert_eq!(w.ask(R, M::Close {}), [M::CloseOk {}]);
    assert_eq!(w.ask(R, read(12, 100)), [M::Invalid {}]);
    assert_eq!(w.ask(R, M::Close {}), [M::Invalid {}]);
}

#[test]
fn selftest_7_read_close_pipelining() {
    let mut w = World::new();
    w.open_pair();
    w.send(R, read(12, 0));
    w.send(R, read(12, 0));
    assert_eq!(w.ask(R, M::Ping {}), [M::PingOk {}]);
    let reasons = w.ask(R, M::Close {});
    assert!(matches!(reasons[0], M::ReadFailed { .. }));
    assert_eq!(reasons[1..], [M::CloseOk {}, M::Invalid {}]);
    assert_eq!(w.ask(W, M::Close {}), [M::CloseOk {}]);
}

#[test]
fn selftest_8_rechunking() {
    let mut w = World::new();
    w.open_pair();
    assert_eq!(w.ask(W, write(b"Hello, World", 0)), [M::WriteOk {}]);
    assert_eq!(w.ask(W, M::Close {}), [M::CloseOk {}]);
    assert_eq!(w.ask(R, read(1, 0)), [read_ok(b"H")]);
    assert_eq!(w.ask(R, read(2, 0)), [read_ok(b"el")]);
    assert_eq!(w.ask(R, read(3, 0)), [read_ok(b"lo,")]);
    assert_eq!(w.ask(R, read(3, 0)), [read_ok(b" Wo")]);
    assert_eq!(w.ask(R, read(100, 0)), [read_ok(b"rld")]);
    assert_eq!(w.ask(R, read(100, 0)), [M::ReadEnd {}]);
}

#[test]
fn selftest_9_expiry() {
    let mut w = World::with(Config { expiry: Duration::from_millis(200), ..Config::default() });
    w.open_pair();
    w.send(R, read(12, 0));
    w.ms(300);
    assert_eq!(w.recv(R), []);
    assert_eq!(w.ask(R, read(12, 0)), [M::Invalid {}]);

    let mut w = World::with(Config { expiry: Duration::from_millis(200), ..Config::default() });
    w.open_pair();
    assert_eq!(w.ask(W, write(b"Hello, World", 0)), [M::WriteOk {}]);
    w.ms(300);
    assert_eq!(w.0.service.counts(), (0, 0));
    assert_eq!(w.0.service.queued_bytes(), 0);
    w.open_pair();
    w.send(R, read(12, 100));
    w.ms(100);
    assert_eq!(w.recv(R), [M::ReadTimeout {}]);
    assert_eq!(w.0.armed_timers(), 2, "only the two expiry timers remain");
}

#[test]
fn activity_postpones_expiry() {
    let mut w = World::with(Config { expiry: Duration::from_millis(200), ..Config::default() });
    w.open_pair();
    for _ in 0..10 {
        w.ms(150);
        assert_eq!(w.ask(R, M::Ping {}), [M::PingOk {}]);
        assert_eq!(w.ask(W, M::Ping {}), [M::PingOk {}]);
    }
    assert_eq!(w.0.service.counts(), (2, 1));
}

#[test]
fn selftest_10_writer_closes_before_reader_has_read() {
    let mut w = World::new();
    w.open_pair();
    assert_eq!(w.ask(W, write(b"Hello, World", 0)), [M::WriteOk {}]);
    assert_eq!(w.ask(W, M::Close {}), [M::CloseOk {}]);
    assert_eq!(w.ask(W, output("test pipe")), [M::OutputOk {}]);
    assert_eq!(w.ask(R, read(12, 0)), [read_ok(b"Hello, World")]);
    const R2: u64 = 3;
    assert_eq!(w.ask(R2, input("test pipe")), [M::InputOk {}]);
    assert_eq!(w.ask(W, write(b"second", 0)), [M::WriteOk {}]);
    assert_eq!(w.ask(R, read(0, 0)), [M::ReadEnd {}]);
    assert_eq!(w.ask(R, read(6, 0)), [M::ReadEnd {}], "the old reader is not part of the new pipe");
    assert_eq!(w.ask(R2, read(6, 0)), [read_ok(b"second")]);
    assert_eq!(w.ask(W, M::Close {}), [M::CloseOk {}]);
    assert_eq!(w.ask(R2, read(0, 0)), [M::ReadEnd {}]);
    assert_eq!(w.ask(R2, read(0, 0)), [M::ReadEnd {}]);
}

#[test]
fn selftest_11_reader_closes_while_writer_active() {
    let mut w = World::new();
    w.open_pair();
    assert_eq!(w.ask(R, M::Close {}), [M::CloseOk {}]);
    let got = w.ask(W, write(b"Hello, World", 0));
    assert!(matches!(got[..], [M::WriteFailed { .. }]));
    // Even a new reader on the name does not revive the old writer.
    assert_eq!(w.ask(R, input("test pipe")), [M::InputOk {}]);
    assert!(matches!(w.ask(W, write(b"x", 0))[..], [M::WriteFailed { .. }]));
    assert_eq!(w.ask(W, M::Close {}), [M::CloseOk {}]);
}

#[test]
fn selftest_12_one_writer_one_reader() {
    let mut w = World::new();
    w.open_pair();
    let got = w.ask(3, output("test pipe"));
    assert!(matches!(got[..], [M::OutputFailed { .. }]));
    let got = w.ask(4, input("test pipe"));
    assert!(matches!(got[..], [M::InputFailed { .. }]));
    // Their state is gone: they may simply try again elsewhere.
    assert_eq!(w.ask(3, output("other")), [M::OutputOk {}]);
}

#[test]
fn selftest_13_short_read_when_writer_closes() {
    let mut w = World::new();
    w.open_pair();
    assert_eq!(w.ask(W, write(b"Hello, World", 0)), [M::WriteOk {}]);
    assert_eq!(w.ask(R, read(1000, 0)), []);
    assert_eq!(w.ask(W, M::Close {}), [M::CloseOk {}]);
    assert_eq!(w.recv(R), [read_ok(b"Hello, World")]);
    assert_eq!(w.ask(R, read(0, 0)), [M::ReadEnd {}]);
}

#[test]
fn write_waits_for_a_reader_with_no_timeout() {
    let mut w = World::new();
    assert_eq!(w.ask(W, output("p")), [M::OutputOk {}]);
    w.send(W, write(b"abc", 0));
    w.ms(700);
    assert_eq!(w.recv(W), []);
    assert_eq!(w.ask(R, input("p")), [M::InputOk {}]);
    assert_eq!(w.recv(W), [M::WriteOk {}]);
    assert_eq!(w.ask(R, read(3, 0)), [read_ok(b"abc")]);
}

// ---- fixes (docs/protocol/ZPIPES.md "Divergences") ----

#[test]
fn malformed_frames_are_dropped_and_service_goes_on() {
    let mut w = World::new();
    w.open_pair();
    for garbage in [&b"garbage"[..], &[0xAA, 0xA0, 0x07, 0, 0], &[0xAA, 0xA0, 99], &[]] {
        w.0.send_raw(R, garbage.to_vec());
        w.0.send_raw(9, garbage.to_vec());
    }
    assert_eq!(w.recv(R), []);
    assert_eq!(w.recv(9), []);
    assert_eq!(w.ask(W, write(b"ok", 0)), [M::WriteOk {}]);
    assert_eq!(w.ask(R, read(2, 0)), [read_ok(b"ok")]);
    assert_eq!(w.0.status()["malformed_frames"], 8);
}

#[test]
fn frames_larger_than_their_message_can_be_are_dropped_unread() {
    let mut w = World::new();
    w.open_pair();
    // A PING with a few trailing bytes is answered (as the original); one
    // far larger than any PING is dropped before it is decoded.
    let mut ping = vec![0xAA, 0xA0, 19];
    ping.extend([0u8; 8]);
    w.0.send_raw(R, ping.clone());
    assert_eq!(w.recv(R), [M::PingOk {}]);
    ping.extend(vec![0u8; 1 << 20]);
    w.0.send_raw(R, ping);
    assert_eq!(w.recv(R), []);
    assert_eq!(w.0.status()["malformed_frames"], 1);
}

#[test]
fn ping_leaves_a_pending_read_and_its_timer_alone() {
    let mut w = World::new();
    w.open_pair();
    w.send(R, read(6, 100));
    w.ms(50);
    assert_eq!(w.ask(R, M::Ping {}), [M::PingOk {}]);
    w.ms(49);
    assert_eq!(w.recv(R), []);
    w.ms(1);
    assert_eq!(w.recv(R), [M::ReadTimeout {}], "the timer survived the PING");
    w.send(R, read(6, 0));
    assert_eq!(w.ask(R, M::Ping {}), [M::PingOk {}]);
    assert_eq!(w.ask(W, write(b"abcdef", 0)), [M::WriteOk {}]);
    assert_eq!(w.recv(R), [read_ok(b"abcdef")], "not an empty READ_OK");
}

#[test]
fn ping_leaves_a_pending_write_alone() {
    let mut w = World::new();
    assert_eq!(w.ask(W, output("p")), [M::OutputOk {}]);
    w.send(W, write(b"abc", 0));
    assert_eq!(w.ask(W, M::Ping {}), [M::PingOk {}]);
    assert_eq!(w.ask(R, input("p")), [M::InputOk {}]);
    assert_eq!(w.recv(W), [M::WriteOk {}], "the original aborted here");
    assert_eq!(w.ask(R, read(3, 0)), [read_ok(b"abc")]);
}

#[test]
fn read_timeout_stays_armed_with_partial_data() {
    let mut w = World::new();
    w.open_pair();
    w.send(R, read(12, 100));
    w.ms(50);
    assert_eq!(w.ask(W, write(b"Hello,", 0)), [M::WriteOk {}]);
    w.ms(50);
    assert_eq!(w.recv(R), [M::ReadTimeout {}]);
    assert_eq!(w.ask(W, write(b" World", 0)), [M::WriteOk {}]);
    assert_eq!(w.ask(R, read(12, 100)), [read_ok(b"Hello, World")], "nothing was lost");
}

#[test]
fn invalid_detaches_the_pipe_end() {
    let mut w = World::new();
    w.open_pair();
    assert_eq!(w.ask(W, input("x")), [M::Invalid {}]);
    assert_eq!(w.ask(3, output("test pipe")), [M::OutputOk {}], "the name is free again");
    assert_eq!(w.ask(R, output("y")), [M::Invalid {}]);
    assert_eq!(w.ask(4, input("test pipe")), [M::InputOk {}]);
}

#[test]
fn wrong_half_gets_invalid_but_keeps_the_connection() {
    let mut w = World::new();
    w.open_pair();
    assert_eq!(w.ask(W, read(1, 0)), [M::Invalid {}]);
    assert_eq!(w.ask(R, write(b"x", 0)), [M::Invalid {}]);
    assert_eq!(w.ask(W, write(b"x", 0)), [M::WriteOk {}]);
    assert_eq!(w.ask(R, read(1, 0)), [read_ok(b"x")]);
}

#[test]
fn server_ids_from_a_client_get_invalid_and_terminate() {
    let mut w = World::new();
    w.open_pair();
    assert_eq!(w.ask(R, M::ReadEnd {}), [M::Invalid {}]);
    assert_eq!(w.ask(4, input("test pipe")), [M::InputOk {}]);
}

#[test]
fn close_clears_the_readers_queue() {
    let mut w = World::new();
    w.open_pair();
    assert_eq!(w.ask(W, write(b"stale", 0)), [M::WriteOk {}]);
    assert_eq!(w.ask(R, M::Close {}), [M::CloseOk {}]);
    assert_eq!(w.0.service.queued_bytes(), 0);
    assert_eq!(w.ask(R, input("B")), [M::InputOk {}]);
    assert_eq!(w.ask(3, output("B")), [M::OutputOk {}]);
    assert_eq!(w.ask(3, write(b"fresh", 0)), [M::WriteOk {}]);
    assert_eq!(w.ask(R, read(5, 0)), [read_ok(b"fresh")]);
}

#[test]
fn writes_wait_for_room_within_the_bound() {
    let mut w = World::with(Config { pipe_limit: 10, ..Config::default() });
    w.open_pair();
    assert_eq!(w.ask(W, write(b"0123456789", 0)), [M::WriteOk {}], "fits exactly");
    assert_eq!(w.ask(W, write(b"abc", 100)), [], "no room: waits");
    w.ms(100);
    assert_eq!(w.recv(W), [M::WriteTimeout {}], "nothing of it was queued");
    assert_eq!(w.ask(R, read(4, 0)), [read_ok(b"0123")]);
    assert_eq!(w.ask(W, write(b"abcdef", 100)), [], "4 bytes of room: part is queued, the rest waits");
    w.ms(500);
    assert_eq!(w.recv(W), [], "a partly delivered write does not time out");
    assert_eq!(w.0.service.queued_bytes(), 10);
    assert_eq!(w.ask(R, read(10, 0)), [read_ok(b"456789abcd")]);
    assert_eq!(w.recv(W), [M::WriteOk {}], "room was made for the rest");
    assert_eq!(w.ask(R, read(2, 0)), [read_ok(b"ef")]);
    assert_eq!(w.0.service.peak_queued_bytes(), 10);
    let got = w.ask(W, write(b"0123456789a", 0));
    assert!(reason_of(&got[0]).contains("pipe limit of 10 bytes"));
    assert!(
        matches!(w.ask(W, write(b"x", 0))[..], [M::WriteFailed { .. }]),
        "no hole: the writer is cut off after a refused write"
    );
    let got = w.ask(R, read(11, 0));
    assert!(reason_of(&got[0]).contains("read of 11 bytes"));
}

#[test]
fn pending_write_fails_when_the_reader_leaves() {
    let mut w = World::with(Config { pipe_limit: 4, ..Config::default() });
    w.open_pair();
    assert_eq!(w.ask(W, write(b"1234", 0)), [M::WriteOk {}]);
    assert_eq!(w.ask(W, write(b"5", 0)), []);
    w.0.disconnect(R);
    assert!(matches!(w.recv(W)[..], [M::WriteFailed { .. }]));
    assert_eq!(w.0.service.queued_bytes(), 0);
}

#[test]
fn writer_disconnect_ends_the_stream_after_queued_data() {
    let mut w = World::new();
    w.open_pair();
    assert_eq!(w.ask(W, write(b"tail", 0)), [M::WriteOk {}]);
    w.0.disconnect(W);
    assert_eq!(w.ask(R, read(10, 0)), [read_ok(b"tail")]);
    assert_eq!(w.ask(R, read(10, 0)), [M::ReadEnd {}]);
}

#[test]
fn mailbox_is_bounded() {
    let mut w = World::with(Config { mailbox_limit: 3, pipe_limit: 100, ..Config::default() });
    w.open_pair();
    w.send(R, read(10, 0));
    for _ in 0..3 {
        w.send(R, read(10, 0));
    }
    assert_eq!(w.recv(R), []);
    let got = w.ask(R, read(10, 0));
    assert!(reason_of(&got[0]).contains("pipelined"));
}

#[test]
fn a_refused_write_never_leaves_a_hole_in_the_stream() {
    let mut w = World::with(Config { mailbox_limit: 2, pipe_limit: 4, ..Config::default() });
    w.open_pair();
    w.send(W, write(b"AAAA", 0));
    w.send(W, write(b"BBBB", 0)); // pending: no room
    w.send(W, write(b"CCCC", 0));
    w.send(W, write(b"DDDD", 0)); // mailbox now full
    w.send(W, write(b"EEEE", 0)); // refused
    let got = w.recv(W);
    // One reply per request, in order: the queued writes fail, then the
    // refused one says why.
    assert_eq!(got.len(), 5, "{got:?}");
    assert_eq!(got[0], M::WriteOk {});
    assert!(got[1..].iter().all(|m| matches!(m, M::WriteFailed { .. })), "{got:?}");
    assert!(reason_of(&got[4]).contains("pipelined"));
    assert_eq!(w.ask(W, write(b"FFFF", 0)).len(), 1);
    let mut stream = Vec::new();
    loop {
        match w.ask(R, read(4, 0)).as_slice() {
            [M::ReadOk { chunk }] => stream.extend_from_slice(&chunk.0),
            [M::ReadEnd {}] => break,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(stream, b"AAAA", "a prefix of the stream, never one with a gap");
}

// ---- properties ----

#[derive(Debug, Clone)]
enum Op {
    Msg(u64, ZpipesMsg),
    Raw(u64, Vec<u8>),
    Advance(u64),
    Disconnect(u64),
}

fn op() -> impl Strategy<Value = Op> {
    let conn = 1u64..=4;
    let pipe = prop_oneof![Just(name("a")), Just(name("b"))];
    let request = prop_oneof![
        pipe.clone().prop_map(|p| M::Input { pipename: p }),
        pipe.prop_map(|p| M::Output { pipename: p }),
        (0u32..40, prop_oneof![Just(0u32), 1u32..300]).prop_map(|(size, timeout)| M::Read { size, timeout }),
        (proptest::collection::vec(any::<u8>(), 0..30), prop_oneof![Just(0u32), 1u32..300])
            .prop_map(|(d, timeout)| M::Write { chunk: Chunk(d.into()), timeout }),
        Just(M::Close {}),
        Just(M::Ping {}),
    ];
    prop_oneof![
        6 => (conn.clone(), request).prop_map(|(c, m)| Op::Msg(c, m)),
        1 => (conn.clone(), ZpipesMsg::arbitrary()).prop_map(|(c, m)| Op::Msg(c, m)),
        1 => (conn.clone(), proptest::collection::vec(any::<u8>(), 0..12)).prop_map(|(c, b)| Op::Raw(c, b)),
        2 => (0u64..400).prop_map(Op::Advance),
        1 => conn.prop_map(Op::Disconnect),
    ]
}

proptest! {
    /// Whatever several peers send, the service never panics, only sends
    /// frames that decode, keeps memory within its bound, and once every
    /// peer has gone holds no connection, pipe, byte or timer.
    #[test]
    fn arbitrary_sessions_keep_invariants(ops in proptest::collection::vec(op(), 1..120)) {
        let mut w = World::with(Config { pipe_limit: 64, mailbox_limit: 8, mailbox_bytes: 64, expiry: Duration::from_millis(1000), ..Config::default() });
        for op in ops {
            match op {
                Op::Msg(c, m) => w.send(c, m),
                Op::Raw(c, b) => w.0.send_raw(c, b),
                Op::Advance(ms) => w.ms(ms),
                Op::Disconnect(c) => w.0.disconnect(c),
            }
            prop_assert!(w.0.service.queued_bytes() <= 4 * 64);
            for c in 1..=4 {
                for reply in w.recv(c) {
                    prop_assert!(!reply.sender().client_may_send());
                }
            }
        }
        for c in 1..=4 {
            w.0.disconnect(c);
        }
        prop_assert_eq!(w.0.service.counts(), (0, 0));
        prop_assert_eq!(w.0.service.queued_bytes(), 0);
        prop_assert_eq!(w.0.armed_timers(), 0);
    }

    /// A byte stream: whatever the write and read sizes, the reader gets the
    /// writer's bytes in order, exactly once.
    #[test]
    fn pipe_is_a_byte_stream(writes in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..50), 0..30),
                             read_size in 1u32..64) {
        let mut w = World::with(Config { pipe_limit: 64, ..Config::default() });
        w.open_pair();
        let sent: Vec<u8> = writes.concat();
        let mut got = Vec::new();
        // Each write may wait for room: read (with a timeout, so a short
        // queue cannot block) until it is acknowledged.
        for data in &writes {
            w.send(W, write(data, 0));
            loop {
                match w.recv(W).as_slice() {
                    [] => {}
                    [M::WriteOk {}] => break,
                    other => prop_assert!(false, "unexpected {:?}", other),
                }
                w.send(R, read(read_size, 10));
                w.ms(10);
                match w.recv(R).as_slice() {
                    [M::ReadOk { chunk }] => got.extend_from_slice(&chunk.0),
                    [M::ReadTimeout {}] => {}
                    other => prop_assert!(false, "unexpected {:?}", other),
                }
            }
        }
        prop_assert_eq!(w.ask(W, M::Close {}), [M::CloseOk {}]);
        loop {
            w.send(R, read(read_size, 0));
            match w.recv(R).as_slice() {
                [M::ReadOk { chunk }] => got.extend_from_slice(&chunk.0),
                [M::ReadEnd {}] => break,
                other => prop_assert!(false, "unexpected {:?}", other),
            }
        }
        prop_assert_eq!(got, sent);
    }
}

/// Stopping: acknowledged bytes still reach the reader, then it is told;
/// a pending write and any new request fail with a reason.
#[test]
fn shutdown_delivers_what_was_acknowledged_then_fails() {
    let mut w = World::with(Config { pipe_limit: 1 << 20, ..Config::default() });
    w.open_pair();
    assert_eq!(w.ask(W, write(b"acknowledged", 0)), [M::WriteOk {}]);
    // Fills the queue; the rest waits for room.
    let big = vec![7u8; 1 << 20];
    assert!(w.ask(W, write(&big, 0)).is_empty());
    assert!(!w.0.service.drained());
    w.0.shutdown();
    let failed = w.recv(W);
    assert!(matches!(&failed[..], [M::WriteFailed { .. }]), "{failed:?}");
    // The reader gets every queued byte (short of its size: no more is
    // coming), then READ_FAILED.
    let mut got = Vec::new();
    loop {
        match w.ask(R, read(1 << 20, 0)).pop() {
            Some(M::ReadOk { chunk }) => got.extend_from_slice(&chunk.0),
            Some(M::ReadFailed { reason }) => {
                assert!(reason.to_string_lossy().contains("shutting down"));
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(got.starts_with(b"acknowledged"));
    assert!(w.0.service.drained());
    assert!(matches!(&w.ask(3, input("new"))[..], [M::InputFailed { .. }]));
    assert!(matches!(&w.ask(W, write(b"more", 0))[..], [M::WriteFailed { .. }]));
}

/// A small reference model of one pipe (docs/protocol/ZPIPES.md "States" to
/// "INVALID", with the "Divergences" and the queue bound): what each request gets, and when.
mod model {
    use super::*;

    #[derive(Debug, Clone)]
    pub enum Step {
        Write(Vec<u8>, u32),
        Read(u32, u32),
        CloseWriter,
        Advance(u64),
    }

    /// What the service should answer, per connection, as comparable text.
    #[derive(Default)]
    pub struct Pipe {
        pub limit: usize,
        pub now: u64,
        queue: Vec<u8>,
        writer_open: bool,
        /// (data left to queue, deadline, partly queued)
        write: Option<(Vec<u8>, Option<u64>, bool)>,
        /// (size, deadline)
        read: Option<(usize, Option<u64>)>,
        pub to_writer: Vec<String>,
        pub to_reader: Vec<String>,
    }

    impl Pipe {
        pub fn new(limit: usize) -> Pipe {
            Pipe { limit, writer_open: true, ..Pipe::default() }
        }

        /// Whether the writer (reader) may send now: one request at a time.
        pub fn writer_idle(&self) -> bool {
            self.write.is_none() && self.writer_open
        }
        pub fn reader_idle(&self) -> bool {
            self.read.is_none()
        }

        pub fn apply(&mut self, step: &Step) {
            match step {
                Step::Write(data, timeout) => {
                    let deadline = (*timeout > 0).then(|| self.now + *timeout as u64);
                    self.write = Some((data.clone(), deadline, false));
                }
                Step::Read(size, timeout) => {
                    if *size == 0 {
                        self.to_reader.push("READ_END".into());
                    } else if *size as usize > self.limit {
                        self.to_reader.push("ReadFailed".into());
                    } else {
                        let deadline = (*timeout > 0).then(|| self.now + *timeout as u64);
                        self.read = Some((*size as usize, deadline));
                    }
                }
                Step::CloseWriter => {
                    self.writer_open = false;
                    self.to_writer.push("CLOSE_OK".into());
                }
                Step::Advance(ms) => {
                    let end = self.now + ms;
                    // Deadlines in order, settling after each.
                    loop {
                        self.settle();
                        let next = [
                            self.write.as_ref().and_then(|w| w.1.filter(|_| !w.2)),
                            self.read.as_ref().and_then(|r| r.1),
                        ]
                        .into_iter()
                        .flatten()
                        .filter(|at| *at <= end)
                        .min();
                        let Some(at) = next else { break };
                        self.now = at;
                        if self.write.as_ref().is_some_and(|w| !w.2 && w.1 == Some(at)) {
                            self.write = None;
                            self.to_writer.push("WRITE_TIMEOUT".into());
                        }
                        if self.read.as_ref().is_some_and(|r| r.1 == Some(at)) {
                            self.read = None;
                            self.to_reader.push("READ_TIMEOUT".into());
                        }
                    }
                    self.now = end;
                    return;
                }
            }
            self.settle();
        }

        /// Moves bytes and completes requests until nothing changes.
        fn settle(&mut self) {
            loop {
                let mut changed = false;
                if let Some((data, _, partly)) = self.write.as_mut() {
                    let room = self.limit - self.queue.len();
                    if data.len() <= room {
                        self.queue.extend_from_slice(data);
                        self.write = None;
                        self.to_writer.push("WRITE_OK".into());
                        changed = true;
                    } else if room > 0 {
                        self.queue.extend(data.drain(..room));
                        *partly = true;
                        changed = true;
                    }
                }
                if let Some((size, _)) = self.read {
                    if self.queue.len() >= size {
                        let chunk: Vec<u8> = self.queue.drain(..size).collect();
                        self.to_reader.push(format!("READ_OK {chunk:?}"));
                        self.read = None;
                        changed = true;
                    } else if !self.writer_open {
                        if self.queue.is_empty() {
                            self.to_reader.push("READ_END".into());
                        } else {
                            let chunk: Vec<u8> = std::mem::take(&mut self.queue);
                            self.to_reader.push(format!("READ_OK {chunk:?}"));
                        }
                        self.read = None;
                        changed = true;
                    }
                }
                if !changed {
                    return;
                }
            }
        }
    }

    pub fn describe(msg: &ZpipesMsg) -> String {
        match msg {
            M::ReadOk { chunk } => format!("READ_OK {:?}", chunk.0.to_vec()),
            other => match other.name() {
                "WriteOk" => "WRITE_OK",
                "WriteTimeout" => "WRITE_TIMEOUT",
                "ReadTimeout" => "READ_TIMEOUT",
                "ReadEnd" => "READ_END",
                "CloseOk" => "CLOSE_OK",
                name => name,
            }
            .to_string(),
        }
    }
}

fn model_step() -> impl Strategy<Value = model::Step> {
    use model::Step;
    prop_oneof![
        4 => (proptest::collection::vec(any::<u8>(), 1..40), prop_oneof![Just(0u32), 1u32..50])
            .prop_map(|(d, t)| Step::Write(d, t)),
        4 => (0u32..40, prop_oneof![Just(0u32), 1u32..50]).prop_map(|(s, t)| Step::Read(s, t)),
        1 => Just(Step::CloseWriter),
        3 => (0u64..60).prop_map(Step::Advance),
    ]
}

proptest! {
    /// Random interleavings of one or two pipes (two to four connections)
    /// with timeouts on a simulated clock: the service answers each
    /// connection exactly as the reference model of its pipe does (pipe
    /// limit 32 bytes, so writes wait for room).
    #[test]
    fn pipes_match_the_reference_model(
        pipes in 1usize..=2,
        steps in proptest::collection::vec((0usize..2, model_step()), 1..100),
    ) {
        use model::Step;
        let limit = 32;
        let mut w = World::with(Config { pipe_limit: limit, ..Config::default() });
        // Pipe i: writer 2i+2, reader 2i+1.
        let ends = |i: usize| (2 * i as u64 + 2, 2 * i as u64 + 1);
        let mut models = Vec::new();
        for i in 0..pipes {
            let (writer, reader) = ends(i);
            let name = format!("pipe {i}");
            prop_assert_eq!(w.ask(writer, output(&name)), [M::OutputOk {}]);
            prop_assert_eq!(w.ask(reader, input(&name)), [M::InputOk {}]);
            models.push((model::Pipe::new(limit), Vec::new(), Vec::new()));
        }
        for (which, step) in &steps {
            let i = which % pipes;
            let (writer, reader) = ends(i);
            let pipe = &models[i].0;
            // A client sends one request at a time; skip what it could not send.
            let allowed = match step {
                Step::Write(data, _) => pipe.writer_idle() && data.len() <= limit,
                Step::CloseWriter => pipe.writer_idle(),
                Step::Read(..) => pipe.reader_idle(),
                Step::Advance(_) => true,
            };
            if !allowed {
                continue;
            }
            match step {
                Step::Write(data, timeout) => w.send(writer, write(data, *timeout)),
                Step::Read(size, timeout) => w.send(reader, read(*size, *timeout)),
                Step::CloseWriter => w.send(writer, M::Close {}),
                Step::Advance(ms) => w.ms(*ms),
            }
            for (j, (pipe, to_writer, to_reader)) in models.iter_mut().enumerate() {
                // The clock moves for every pipe; a request only for its own.
                if j == i || matches!(step, Step::Advance(_)) {
                    pipe.apply(step);
                }
                let (writer, reader) = ends(j);
                to_writer.extend(w.recv(writer).iter().map(model::describe));
                to_reader.extend(w.recv(reader).iter().map(model::describe));
                prop_assert_eq!(&*to_writer, &pipe.to_writer, "pipe {} writer, after {:?}", j, step);
                prop_assert_eq!(&*to_reader, &pipe.to_reader, "pipe {} reader, after {:?}", j, step);
            }
        }
    }
}
