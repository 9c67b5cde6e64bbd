//! Our "what is there, up to n" READ (the extension trailer of
//! `zbroker_proto::zpipes`): granted by PING, ignored unless granted.

use super::*;
use crate::sim::Sim;
use zbroker_proto::zpipes::PARTIAL_READ;
use ZpipesMsg as M;

const R: u64 = 1;
const W: u64 = 2;

fn world() -> Sim<Zpipes> {
    let mut sim = Sim::new(Zpipes::new(Config::default()));
    let pipe = ShortStr::new(b"p".to_vec()).unwrap();
    sim.send_raw(W, M::Output { pipename: pipe.clone() }.encode());
    sim.send_raw(R, M::Input { pipename: pipe }.encode());
    assert_eq!(sim.take_raw(W), [M::OutputOk {}.encode()]);
    assert_eq!(sim.take_raw(R), [M::InputOk {}.encode()]);
    sim
}

fn write(sim: &mut Sim<Zpipes>, data: &[u8]) {
    sim.send_raw(W, M::Write { chunk: Chunk(Bytes::copy_from_slice(data)), timeout: 0 }.encode());
    assert_eq!(sim.take_raw(W), [M::WriteOk {}.encode()]);
}

fn read_some(size: u32, timeout: u32) -> Vec<u8> {
    M::Read { size, timeout }.encode_ext(PARTIAL_READ)
}

fn read_ok(data: &[u8]) -> Vec<u8> {
    M::ReadOk { chunk: Chunk(Bytes::copy_from_slice(data)) }.encode()
}

#[test]
fn a_ping_offering_the_capability_is_granted_it_a_plain_ping_is_not() {
    let mut sim = world();
    sim.send_raw(R, M::Ping {}.encode());
    assert_eq!(sim.take_raw(R), [M::PingOk {}.encode()]);
    sim.send_raw(R, M::Ping {}.encode_ext(PARTIAL_READ | 0x80));
    assert_eq!(sim.take_raw(R), [M::PingOk {}.encode_ext(PARTIAL_READ)]);
}

#[test]
fn a_granted_partial_read_returns_what_is_queued_or_the_first_bytes_to_come() {
    let mut sim = world();
    sim.send_raw(R, M::Ping {}.encode_ext(PARTIAL_READ));
    sim.take_raw(R);
    write(&mut sim, b"line 1\n");
    sim.send_raw(R, read_some(1 << 20, 0));
    assert_eq!(sim.take_raw(R), [read_ok(b"line 1\n")]);
    // Pending: answered by the next WRITE, however small.
    sim.send_raw(R, read_some(1 << 20, 0));
    assert_eq!(sim.take_raw(R), Vec::<Vec<u8>>::new());
    write(&mut sim, b"2");
    assert_eq!(sim.take_raw(R), [read_ok(b"2")]);
    // Up to n, the rest stays queued.
    write(&mut sim, b"abcdef");
    sim.send_raw(R, read_some(4, 0));
    assert_eq!(sim.take_raw(R), [read_ok(b"abcd")]);
    sim.send_raw(R, read_some(4, 0));
    assert_eq!(sim.take_raw(R), [read_ok(b"ef")]);
    // Nothing in time: READ_TIMEOUT, as for any READ.
    sim.send_raw(R, read_some(4, 50));
    sim.advance(Duration::from_millis(50));
    assert_eq!(sim.take_raw(R), [M::ReadTimeout {}.encode()]);
    // The writer goes: READ_END.
    sim.send_raw(W, M::Close {}.encode());
    sim.send_raw(R, read_some(4, 0));
    assert_eq!(sim.take_raw(R), [M::ReadEnd {}.encode()]);
}

#[test]
fn the_flag_is_ignored_without_the_grant() {
    let mut sim = world();
    write(&mut sim, b"abc");
    sim.send_raw(R, read_some(4, 0));
    assert_eq!(sim.take_raw(R), Vec::<Vec<u8>>::new());
    write(&mut sim, b"d");
    assert_eq!(sim.take_raw(R), [read_ok(b"abcd")]);
}

#[test]
fn a_partial_read_is_filled_outside_the_budget_up_to_its_size() {
    let budget = Budget::new(4 << 10);
    let config = Config { budget: budget.clone(), ..Config::default() };
    let mut sim = Sim::new(Zpipes::new(config));
    let pipe = ShortStr::new(b"p".to_vec()).unwrap();
    sim.send_raw(W, M::Output { pipename: pipe.clone() }.encode());
    sim.send_raw(R, M::Input { pipename: pipe }.encode());
    sim.send_raw(R, M::Ping {}.encode_ext(PARTIAL_READ));
    sim.take_raw(R);
    sim.take_raw(W);
    // Fill the budget, then a partial READ still gets what is queued.
    let big = vec![7u8; 64 << 10];
    sim.send_raw(W, M::Write { chunk: Chunk(Bytes::from(big.clone())), timeout: 0 }.encode());
    let mut got = Vec::new();
    while got.len() < big.len() {
        sim.send_raw(R, read_some(16 << 10, 0));
        for frame in sim.take_raw(R) {
            match M::decode(frame).unwrap() {
                M::ReadOk { chunk } => got.extend_from_slice(&chunk.0),
                other => panic!("{other:?}"),
            }
        }
    }
    assert_eq!(got, big);
    assert_eq!(sim.take_raw(W), [M::WriteOk {}.encode()]);
}
