//! Stopping and reloading a running broker.

use std::time::{Duration, Instant};
use zbroker_proto::codec::{Chunk, ShortStr};
use zbroker_proto::filemq::FilemqMsg;
use zbroker_proto::ZpipesMsg as M;
use zbroker_tests::{signal, wait_timeout, wait_until, Broker, Raw};

fn pipe(name: &str) -> ShortStr {
    ShortStr::lossy(name)
}

/// SIGTERM: acknowledged bytes are still delivered, then the reader and
/// any pending writer are told; FILEMQ subscribers get KTHXBAI; the broker
/// exits 0 within 5 s.
#[test]
fn sigterm_delivers_what_was_acknowledged_and_exits_cleanly() {
    let mut broker = Broker::start(&["--pipe-limit", "1MiB"]);
    let writer = Raw::connect(&broker.endpoint());
    let reader = Raw::connect(&broker.endpoint());
    assert_eq!(writer.ask(M::Output { pipename: pipe("p") }), M::OutputOk {});
    assert_eq!(reader.ask(M::Input { pipename: pipe("p") }), M::InputOk {});
    let data = zbroker_tests::pseudo_random(600_000, 3);
    assert_eq!(writer.ask(M::Write { chunk: Chunk(data.clone().into()), timeout: 0 }), M::WriteOk {});
    // This one does not fit: it waits for room.
    writer.send(M::Write { chunk: Chunk(vec![1u8; 600_000].into()), timeout: 0 });
    let subscriber = Raw::connect(&broker.filemq_endpoint());
    subscriber.send_bytes(&FilemqMsg::Ohai { protocol: ShortStr::lossy("FILEMQ"), version: 2 }.encode());
    assert!(subscriber.recv_bytes(5000).is_some());

    let stopping = Instant::now();
    signal(&broker.child, libc::SIGTERM);
    match writer.recv(5000) {
        Some(M::WriteFailed { reason }) => assert!(reason.to_string_lossy().contains("shutting down")),
        other => panic!("the pending write should fail, got {other:?}"),
    }
    assert_eq!(
        FilemqMsg::decode(subscriber.recv_bytes(5000).expect("a goodbye")).unwrap(),
        FilemqMsg::Kthxbai {}
    );
    // Every queued byte is delivered; then the reader is told, or (once
    // nothing is owed to anyone) the broker has already gone.
    let mut got = Vec::new();
    loop {
        reader.send(M::Read { size: 1 << 20, timeout: 0 });
        match reader.recv(2000) {
            Some(M::ReadOk { chunk }) => got.extend_from_slice(&chunk.0),
            Some(M::ReadFailed { reason }) => {
                assert!(reason.to_string_lossy().contains("shutting down"));
                break;
            }
            None => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(got.starts_with(&data), "every acknowledged byte arrived first");
    assert_eq!(got.len(), 1 << 20, "and the part of the failed write that was queued");
    let status = wait_timeout(&mut broker.child, Duration::from_secs(5)).expect("exits within 5 s");
    assert!(status.success(), "{status:?}");
    assert!(stopping.elapsed() < Duration::from_secs(5));
}

/// A reader waiting on an empty pipe is told at once.
#[test]
fn sigterm_fails_a_waiting_read() {
    let mut broker = Broker::start(&[]);
    let reader = Raw::connect(&broker.endpoint());
    assert_eq!(reader.ask(M::Input { pipename: pipe("w") }), M::InputOk {});
    reader.send(M::Read { size: 10, timeout: 0 });
    assert_eq!(reader.recv(300), None, "nothing to read yet");
    signal(&broker.child, libc::SIGTERM);
    match reader.recv(5000) {
        Some(M::ReadFailed { reason }) => assert!(reason.to_string_lossy().contains("shutting down")),
        other => panic!("expected READ_FAILED, got {other:?}"),
    }
    assert!(wait_timeout(&mut broker.child, Duration::from_secs(5)).expect("exits").success());
}

/// A reader that never comes back does not hold the broker up for ever.
#[test]
fn sigterm_gives_up_on_an_absent_reader_within_5_s() {
    let mut broker = Broker::start(&[]);
    let writer = Raw::connect(&broker.endpoint());
    let reader = Raw::connect(&broker.endpoint());
    assert_eq!(writer.ask(M::Output { pipename: pipe("q") }), M::OutputOk {});
    assert_eq!(reader.ask(M::Input { pipename: pipe("q") }), M::InputOk {});
    assert_eq!(writer.ask(M::Write { chunk: Chunk(vec![5u8; 1000].into()), timeout: 0 }), M::WriteOk {});
    let stopping = Instant::now();
    signal(&broker.child, libc::SIGTERM);
    let status = wait_timeout(&mut broker.child, Duration::from_secs(6)).expect("exits");
    assert!(status.success());
    assert!(stopping.elapsed() < Duration::from_secs(5), "took {:?}", stopping.elapsed());
}

/// SIGHUP re-reads the config file's mounts without dropping anyone.
#[test]
fn sighup_reloads_mounts_and_keeps_connections() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let config_dir = tempfile::tempdir().unwrap();
    let config = config_dir.path().join("zbroker.toml");
    let write_config = |mounts: &[String]| {
        let list: Vec<String> = mounts.iter().map(|m| format!("{m:?}")).collect();
        std::fs::write(&config, format!("publish = [{}]\n", list.join(", "))).unwrap();
    };
    let a_mount = format!("{}=/a", a.path().display());
    let b_mount = format!("{}=/b", b.path().display());
    write_config(std::slice::from_ref(&a_mount));
    let broker = Broker::start(&["--config", config.to_str().unwrap()]);
    let peer = Raw::connect(&broker.filemq_endpoint());
    peer.send_bytes(&FilemqMsg::Ohai { protocol: ShortStr::lossy("FILEMQ"), version: 2 }.encode());
    assert!(peer.recv_bytes(5000).is_some());
    let aliases = || -> Vec<String> {
        let mounts = broker.filemq()["mounts"].as_array().cloned().unwrap_or_default();
        mounts.iter().filter_map(|m| m["alias"].as_str().map(str::to_string)).collect()
    };
    assert_eq!(aliases(), vec!["/a"]);

    write_config(&[a_mount, b_mount.clone()]);
    signal(&broker.child, libc::SIGHUP);
    assert!(wait_until(Duration::from_secs(5), || aliases() == vec!["/a", "/b"]), "{:?}", aliases());
    write_config(&[b_mount]);
    signal(&broker.child, libc::SIGHUP);
    assert!(wait_until(Duration::from_secs(5), || aliases() == vec!["/b"]), "{:?}", aliases());
    // A broken file changes nothing (and the failed reload is counted).
    std::fs::write(&config, "publish = [").unwrap();
    signal(&broker.child, libc::SIGHUP);
    assert!(wait_until(Duration::from_secs(5), || broker.status()["reload_errors"] == 1));
    assert_eq!(broker.status()["reloads"], 3);
    assert_eq!(aliases(), vec!["/b"]);
    peer.send_bytes(&FilemqMsg::Hugz {}.encode());
    assert_eq!(FilemqMsg::decode(peer.recv_bytes(5000).unwrap()).unwrap(), FilemqMsg::HugzOk {});
}

/// While stopping, a newcomer is refused with a reason, not ignored.
#[test]
fn a_stopping_broker_refuses_newcomers() {
    let broker = Broker::start(&[]);
    let writer = Raw::connect(&broker.endpoint());
    let reader = Raw::connect(&broker.endpoint());
    assert_eq!(writer.ask(M::Output { pipename: pipe("r") }), M::OutputOk {});
    assert_eq!(reader.ask(M::Input { pipename: pipe("r") }), M::InputOk {});
    // Acknowledged but unread: the broker waits for the reader.
    assert_eq!(writer.ask(M::Write { chunk: Chunk(vec![5u8; 10].into()), timeout: 0 }), M::WriteOk {});
    signal(&broker.child, libc::SIGTERM);
    assert!(wait_until(Duration::from_secs(5), || broker.status()["stopping"] == true));
    let late = Raw::connect(&broker.endpoint());
    match late.ask(M::Input { pipename: pipe("s") }) {
        M::InputFailed { reason } => assert!(reason.to_string_lossy().contains("shutting down")),
        other => panic!("expected INPUT_FAILED, got {other:?}"),
    }
}
