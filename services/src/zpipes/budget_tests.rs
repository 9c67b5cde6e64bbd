//! The memory budget seen from ZPIPES, on a simulated clock: WRITEs wait
//! for room as at the pipe bound, the largest holders first, and a pending
//! READ is always filled.

use super::*;
use crate::sim::Sim;
use ZpipesMsg as M;

fn world(budget: usize) -> (Sim<Zpipes>, Budget) {
    let budget = Budget::new(budget);
    let config = Config { pipe_limit: 64, mailbox_bytes: 64, budget: budget.clone(), ..Config::default() };
    (Sim::new(Zpipes::new(config)), budget)
}

fn ask(sim: &mut Sim<Zpipes>, conn: u64, msg: ZpipesMsg) -> Vec<ZpipesMsg> {
    sim.send_raw(conn, msg.encode());
    recv(sim, conn)
}

fn recv(sim: &mut Sim<Zpipes>, conn: u64) -> Vec<ZpipesMsg> {
    sim.take_raw(conn).into_iter().map(|f| M::decode(f).expect("server frames decode")).collect()
}

fn open(sim: &mut Sim<Zpipes>, pipe: &str, reader: u64, writer: u64) {
    let pipename = ShortStr::lossy(pipe);
    assert_eq!(ask(sim, writer, M::Output { pipename: pipename.clone() }), [M::OutputOk {}]);
    assert_eq!(ask(sim, reader, M::Input { pipename }), [M::InputOk {}]);
}

fn write(data: &[u8], timeout: u32) -> ZpipesMsg {
    M::Write { chunk: Chunk(Bytes::copy_from_slice(data)), timeout }
}

fn read_ok(data: &[u8]) -> ZpipesMsg {
    M::ReadOk { chunk: Chunk(Bytes::copy_from_slice(data)) }
}

#[test]
fn the_pipe_holding_most_waits_and_a_newcomer_still_moves() {
    let (mut sim, budget) = world(100);
    open(&mut sim, "a", 1, 2);
    open(&mut sim, "b", 3, 4);
    open(&mut sim, "c", 5, 6);
    assert_eq!(ask(&mut sim, 2, write(&[1; 40], 0)), [M::WriteOk {}]);
    assert_eq!(ask(&mut sim, 4, write(&[2; 40], 0)), [M::WriteOk {}]);
    // Pipe a holds 40 of the 20 left: its next WRITE waits.
    assert_eq!(ask(&mut sim, 2, write(&[3; 20], 0)), []);
    assert!(budget.at_limit());
    assert_eq!(sim.status()["waiting_for_memory"], 1);
    // Pipe c holds nothing: 10 fit.
    assert_eq!(ask(&mut sim, 6, write(&[4; 10], 0)), [M::WriteOk {}]);
    assert_eq!(budget.used(), 90);
    // Beyond the budget, but the reader's READ of 30 is filled outside it.
    assert_eq!(ask(&mut sim, 5, M::Read { size: 30, timeout: 0 }), []);
    assert_eq!(ask(&mut sim, 6, write(&[5; 25], 0)), [M::WriteOk {}]);
    let mut expected = vec![4; 10];
    expected.extend([5; 20]);
    assert_eq!(recv(&mut sim, 5), [read_ok(&expected)]);
    // Pipe a's reader reads: its writer's 20 go in.
    assert_eq!(ask(&mut sim, 1, M::Read { size: 40, timeout: 0 }), [read_ok(&[1; 40])]);
    assert_eq!(recv(&mut sim, 2), [M::WriteOk {}]);
    assert!(!budget.at_limit());
    assert_eq!(ask(&mut sim, 1, M::Read { size: 20, timeout: 0 }), [read_ok(&[3; 20])]);
    assert_eq!(budget.used(), 40 + 5);
    for conn in 1..=6 {
        sim.disconnect(conn);
    }
    assert_eq!((budget.used(), budget.waiting()), (0, 0));
}

#[test]
fn a_write_waiting_for_the_budget_times_out_as_at_the_pipe_bound() {
    let (mut sim, budget) = world(50);
    open(&mut sim, "a", 1, 2);
    assert_eq!(ask(&mut sim, 2, write(&[1; 30], 0)), [M::WriteOk {}]);
    assert_eq!(ask(&mut sim, 2, write(&[2; 30], 100)), []);
    sim.advance(Duration::from_millis(100));
    assert_eq!(recv(&mut sim, 2), [M::WriteTimeout {}]);
    assert_eq!((budget.used(), budget.waiting()), (30, 0));
}

#[test]
fn an_exact_read_larger_than_the_budget_completes() {
    let (mut sim, budget) = world(16);
    open(&mut sim, "a", 1, 2);
    // Nothing fits the budget, so the WRITE waits; the READ makes room.
    assert_eq!(ask(&mut sim, 2, write(&[7; 64], 0)), []);
    assert_eq!(ask(&mut sim, 1, M::Read { size: 64, timeout: 0 }), [read_ok(&[7; 64])]);
    assert_eq!(recv(&mut sim, 2), [M::WriteOk {}]);
    // A READ smaller than the WRITE: the rest waits without a timeout.
    assert_eq!(ask(&mut sim, 2, write(&[8; 64], 100)), []);
    assert_eq!(ask(&mut sim, 1, M::Read { size: 32, timeout: 0 }), [read_ok(&[8; 32])]);
    sim.advance(Duration::from_millis(500));
    assert_eq!(recv(&mut sim, 2), []);
    assert_eq!(ask(&mut sim, 1, M::Read { size: 32, timeout: 0 }), [read_ok(&[8; 32])]);
    assert_eq!(recv(&mut sim, 2), [M::WriteOk {}]);
    assert_eq!(budget.used(), 0);
}

#[test]
fn room_goes_to_the_smallest_holder_first() {
    let (mut sim, budget) = world(100);
    open(&mut sim, "big", 1, 2);
    open(&mut sim, "small", 3, 4);
    open(&mut sim, "other", 5, 6);
    assert_eq!(ask(&mut sim, 2, write(&[1; 30], 0)), [M::WriteOk {}]);
    assert_eq!(ask(&mut sim, 4, write(&[2; 10], 0)), [M::WriteOk {}]);
    assert_eq!(ask(&mut sim, 6, write(&[3; 50], 0)), [M::WriteOk {}]);
    // 10 left: both wait for 10 more.
    assert_eq!(ask(&mut sim, 2, write(&[1; 10], 0)), []);
    assert_eq!(ask(&mut sim, 4, write(&[2; 10], 0)), []);
    // 50 freed: "small" (10 held) goes first, then "big" (30 held).
    assert_eq!(ask(&mut sim, 5, M::Read { size: 50, timeout: 0 }).len(), 1);
    assert_eq!(recv(&mut sim, 4), [M::WriteOk {}]);
    assert_eq!(recv(&mut sim, 2), [M::WriteOk {}]);
    assert_eq!(budget.used(), 60);
}
