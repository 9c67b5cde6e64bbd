//! The `filemq` program against real brokers: trees converge, every change
//! is mirrored, transfers resume after a SIGKILL, subscribers ride out a
//! broker restart, a hostile server cannot write outside the inbox, and
//! brokers cascade.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use zbroker_proto::codec::{Chunk, Hash, LongStr};
use zbroker_proto::filemq::{FilemqMsg, Operation::Create};
use zbroker_tests::{
    assert_same_tree, bin, pseudo_random, put, tree_digests, unique_name, wait_converged, wait_timeout,
    wait_until, Broker, Subscriber,
};

fn path_arg(dir: &Path) -> &str {
    dir.to_str().expect("temporary paths are UTF-8")
}

/// `filemq subscribe / --inbox INBOX --broker NAME --once`, to completion.
fn once(broker: &str, inbox: &Path, limit: Duration) -> std::process::Output {
    let mut child = Command::new(bin("filemq"))
        .args(["subscribe", "/", "--inbox", path_arg(inbox), "--broker", broker, "--once"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    if wait_timeout(&mut child, limit).is_none() {
        let _ = child.kill();
        panic!("filemq --once did not finish within {limit:?}");
    }
    child.wait_with_output().unwrap()
}

#[test]
fn a_thousand_files_and_a_large_one_converge_then_nothing_is_sent_again() {
    let publisher = tempfile::tempdir().unwrap();
    let inbox = tempfile::tempdir().unwrap();
    for i in 0..1000 {
        let rel = format!("d{}/e{}/f{i}.dat", i % 7, i % 3);
        put(publisher.path(), &rel, &pseudo_random(100 + i * 13, i as u64));
    }
    put(publisher.path(), "large/200MiB.bin", &pseudo_random(200 << 20, 99));
    let broker = Broker::start(&["--publish", path_arg(publisher.path())]);
    let out = once(&broker.name, inbox.path(), Duration::from_secs(180));
    assert!(out.status.success(), "filemq --once failed: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(tree_digests(publisher.path()).len(), 1001);
    assert_same_tree(publisher.path(), inbox.path());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let file_lines = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("updated "))
        .filter(|p| publisher.path().join(p).is_file());
    assert_eq!(file_lines.count(), 1001, "one line per file");
    let lines = stdout.lines().filter(|l| l.starts_with("updated ")).count();
    assert_eq!(lines, 1001 + 29, "and one per directory (7 + 21 + large/)");
    assert!(stdout.contains("updated large/200MiB.bin"));

    // A returning subscriber holds everything: no file byte is sent.
    let before = broker.filemq_bytes_sent();
    let out = once(&broker.name, inbox.path(), Duration::from_secs(60));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(broker.filemq_bytes_sent(), before, "re-subscribing to an unchanged tree sent file bytes");
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 0);
}

#[test]
fn creates_rewrites_and_deletes_are_mirrored() {
    let publisher = tempfile::tempdir().unwrap();
    let inbox = tempfile::tempdir().unwrap();
    let broker = Broker::start(&["--publish", path_arg(publisher.path()), "--stable-age", "200"]);
    let sub = Subscriber::start(&["/", "--inbox", path_arg(inbox.path()), "--broker", &broker.name]);
    let limit = Duration::from_secs(20);

    put(publisher.path(), "a.txt", &[b'x'; 5000]);
    sub.expect_line("updated a.txt", limit);
    assert_eq!(std::fs::read(inbox.path().join("a.txt")).unwrap(), vec![b'x'; 5000]);

    // Shorter: no stale tail (the original kept one: docs/protocol/FILEMQ.md "Divergences").
    put(publisher.path(), "a.txt", b"short");
    sub.expect_line("updated a.txt", limit);
    assert_eq!(std::fs::read(inbox.path().join("a.txt")).unwrap(), b"short");

    std::fs::remove_file(publisher.path().join("a.txt")).unwrap();
    sub.expect_line("deleted a.txt", limit);
    assert!(!inbox.path().join("a.txt").exists());

    for name in ["x", "y", "z"] {
        put(publisher.path(), &format!("folder/sub/{name}"), name.as_bytes());
    }
    assert!(wait_converged(publisher.path(), inbox.path(), limit));
    std::fs::remove_dir_all(publisher.path().join("folder")).unwrap();
    let mut deleted = Vec::new();
    while deleted.len() < 3 {
        let line = sub.lines.recv_timeout(limit).expect("a delete line");
        if let Some(name) = line.strip_prefix("deleted ") {
            deleted.push(name.to_string());
        }
    }
    deleted.sort();
    assert_eq!(deleted, vec!["folder/sub/x", "folder/sub/y", "folder/sub/z"]);
    assert!(!inbox.path().join("folder").exists(), "folders emptied by deletes are removed");
}

fn partial_bytes(inbox: &Path) -> u64 {
    let dir = inbox.join(".filemq").join("partial");
    std::fs::read_dir(dir)
        .map(|entries| entries.flatten().filter_map(|e| e.metadata().ok()).map(|m| m.len()).sum())
        .unwrap_or(0)
}

#[test]
fn a_subscriber_killed_mid_file_resumes_it() {
    let publisher = tempfile::tempdir().unwrap();
    let inbox = tempfile::tempdir().unwrap();
    let size: u64 = 200 << 20;
    put(publisher.path(), "big.bin", &pseudo_random(size as usize, 5));
    let broker = Broker::start(&["--publish", path_arg(publisher.path())]);
    broker.wait_scanned();
    let mut sub = Subscriber::start(&["/", "--inbox", path_arg(inbox.path()), "--broker", &broker.name]);
    assert!(
        wait_until(Duration::from_secs(60), || partial_bytes(inbox.path()) >= 8 << 20),
        "the transfer did not start"
    );
    zbroker_tests::signal(&sub.child, libc::SIGKILL);
    sub.kill();
    let kept = partial_bytes(inbox.path());
    assert!(kept < size, "killed too late: the file had arrived");
    // Once the broker has let go of the killed subscriber, it sends it
    // nothing more: count from there.
    let gone = wait_until(Duration::from_secs(10), || {
        broker.filemq()["subscribers"].as_array().is_some_and(|subs| subs.is_empty())
    });
    assert!(gone, "the broker did not notice the subscriber's death");
    let before = broker.filemq_bytes_sent();

    let out = once(&broker.name, inbox.path(), Duration::from_secs(120));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_same_tree(publisher.path(), inbox.path());
    let resent = broker.filemq_bytes_sent() - before;
    assert!(resent < size, "resumed: {resent} bytes sent again of {size} ({kept} were kept)");
    assert!(resent <= size - kept + (1 << 20), "resumed near the kept offset: {resent} sent, {kept} kept");
}

#[test]
fn subscribers_reconnect_when_the_broker_restarts() {
    let publisher = tempfile::tempdir().unwrap();
    let inbox = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    for i in 0..40 {
        put(publisher.path(), &format!("f{i:02}"), &pseudo_random(2 << 20, i));
    }
    let name = unique_name("restart");
    let args = ["--publish", path_arg(publisher.path()), "--state-dir", path_arg(state.path())];
    let mut broker = Broker::start_named(&name, &args);
    let sub = Subscriber::start(&["/", "--inbox", path_arg(inbox.path()), "--broker", &name]);
    sub.expect_line("updated f00", Duration::from_secs(60));
    // Mid-file: some bytes of a file not yet complete are on their way.
    wait_until(Duration::from_secs(10), || partial_bytes(inbox.path()) > 0);
    zbroker_tests::signal(&broker.child, libc::SIGKILL);
    let _ = broker.child.wait();
    assert!(tree_digests(inbox.path()).len() < 40, "killed too late: everything had arrived");
    std::thread::sleep(Duration::from_millis(300));
    let _broker = Broker::start_named(&name, &args);
    assert!(
        wait_converged(publisher.path(), inbox.path(), Duration::from_secs(90)),
        "the subscriber did not converge after the broker restarted"
    );
}

/// A raw ROUTER pretending to be a broker sends names that try to leave
/// the inbox; nothing lands outside it, and a good file still does.
#[test]
fn a_hostile_server_cannot_write_outside_the_inbox() {
    let parent = tempfile::tempdir().unwrap();
    let inbox = parent.path().join("inbox");
    let outside = parent.path().join("outside");
    std::fs::create_dir_all(&inbox).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, inbox.join("link")).unwrap();

    let endpoint = format!("ipc://@/filemq-hostile/{}", unique_name("h"));
    let context = zmq::Context::new();
    let router = context.socket(zmq::ROUTER).unwrap();
    router.set_linger(0).unwrap();
    router.bind(&endpoint).unwrap();
    let sub = Subscriber::start(&["/", "--inbox", path_arg(&inbox), "--endpoint", &endpoint]);

    let deadline = Instant::now() + Duration::from_secs(20);
    let mut peer = None;
    let mut sequence = 0u64;
    let mut attacked = false;
    while Instant::now() < deadline && !attacked {
        if router.poll(zmq::POLLIN, 100).unwrap() == 0 {
            continue;
        }
        let parts = router.recv_multipart(0).unwrap();
        let (id, frame) = (parts[0].clone(), parts[parts.len() - 1].clone());
        peer = Some(id.clone());
        let reply = match FilemqMsg::decode(frame) {
            Ok(FilemqMsg::Ohai { .. }) => Some(FilemqMsg::OhaiOk {}),
            Ok(FilemqMsg::Icanhaz { .. }) => Some(FilemqMsg::IcanhazOk {}),
            Ok(FilemqMsg::Hugz {}) => Some(FilemqMsg::HugzOk {}),
            Ok(FilemqMsg::Nom { .. }) => {
                attacked = true;
                None
            }
            _ => None,
        };
        if let Some(reply) = reply {
            router.send_multipart([id, reply.encode()], 0).unwrap();
        }
    }
    let id = peer.expect("the subscriber connected");
    assert!(attacked, "the subscriber granted credit");
    let evil = [
        "/../escape",
        "/a/../../escape",
        "/..",
        "//etc/escape",
        "/x\0y",
        "/.filemq/partial/escape",
        "/link/escape",
        "/link/../escape",
        "/good.txt",
    ];
    for name in evil {
        for (offset, eof, chunk) in [(0u64, 0u8, &b"evil"[..]), (4, 1, &b""[..])] {
            let msg = FilemqMsg::Cheezburger {
                sequence,
                operation: Create,
                filename: LongStr(bytes::Bytes::copy_from_slice(name.as_bytes())),
                offset,
                eof,
                headers: Hash::default(),
                chunk: Chunk(bytes::Bytes::copy_from_slice(chunk)),
            };
            sequence += 1;
            router.send_multipart([id.clone(), msg.encode()], 0).unwrap();
        }
    }
    let lines = sub.expect_line("updated good.txt", Duration::from_secs(20));
    assert!(lines.iter().all(|l| !l.contains("escape")), "{lines:?}");
    assert_eq!(std::fs::read(inbox.join("good.txt")).unwrap(), b"evil");
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0, "a file was written through the symlink");
    let mut names: Vec<String> = std::fs::read_dir(parent.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, vec!["inbox", "outside"], "a file was written beside the inbox");
    let in_inbox = tree_digests(&inbox);
    assert_eq!(in_inbox.keys().collect::<Vec<_>>(), vec!["good.txt"], "{in_inbox:?}");
}

/// hub → relay → leaf over TCP loopback: the relay mirrors the hub into a
/// directory it publishes, and the leaf mirrors the relay.
#[test]
fn brokers_cascade_hub_relay_leaf() {
    let hub_dir = tempfile::tempdir().unwrap();
    let relay_dir = tempfile::tempdir().unwrap();
    let leaf_dir = tempfile::tempdir().unwrap();
    for i in 0..20 {
        put(hub_dir.path(), &format!("tree/{}/f{i}", i % 4), &pseudo_random(10_000 + i * 1000, i as u64));
    }
    let hub = Broker::start(&[
        "--publish",
        path_arg(hub_dir.path()),
        "--bind",
        "tcp://127.0.0.1:*",
        "--stable-age",
        "200",
    ]);
    let relay = Broker::start(&[
        "--upstream",
        &hub.tcp_endpoint(),
        "--subscribe",
        "/",
        "--inbox",
        path_arg(relay_dir.path()),
        "--publish",
        path_arg(relay_dir.path()),
        "--bind",
        "tcp://127.0.0.1:*",
        "--stable-age",
        "200",
    ]);
    let leaf =
        Subscriber::start(&["/", "--inbox", path_arg(leaf_dir.path()), "--endpoint", &relay.tcp_endpoint()]);
    assert!(
        wait_converged(hub_dir.path(), leaf_dir.path(), Duration::from_secs(60)),
        "the leaf did not converge"
    );
    // A change at the hub travels down the tree.
    put(hub_dir.path(), "tree/new", b"fresh");
    std::fs::remove_file(hub_dir.path().join("tree/0/f0")).unwrap();
    assert!(
        wait_converged(hub_dir.path(), leaf_dir.path(), Duration::from_secs(60)),
        "a change did not cascade"
    );
    assert!(!leaf_dir.path().join("tree/0/f0").exists());
    drop(leaf);
}
