//! The `filemq` command line, against no server or a fake one (a ROUTER
//! socket in a thread speaking the FILEMQ codec).

use bytes::Bytes;
use sha1::{Digest, Sha1};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use zbroker_proto::codec::{Chunk, Hash, LongStr, ShortStr};
use zbroker_proto::filemq::Operation::{self, Create, Delete};
use zbroker_proto::FilemqMsg;

fn filemq(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_filemq")).args(args).output().unwrap()
}

fn unique_endpoint() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    format!("ipc://@/filemq-cli-test/{}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed))
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn help_names_every_option_and_exit_status() {
    let out = filemq(&["subscribe", "--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for word in [
        "--inbox",
        "--broker",
        "--endpoint",
        "--once",
        "--timeout",
        "--window",
        "--quiet",
        "--log",
        "Exit status",
        "the broker refused us",
        "5  in sync (--once), but some files could not be fetched",
        "refused for safety",
        "updated PATH",
        "--exclude",
        "--dry-run",
        "create PATH",
        "7  the server cannot honour --exclude",
    ] {
        assert!(help.contains(word), "help lacks {word}: {help}");
    }
    assert!(filemq(&["--help"]).status.success());
}

#[test]
fn usage_errors_exit_2_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let inbox = dir.path().to_str().unwrap();
    assert_eq!(filemq(&[]).status.code(), Some(2));
    assert_eq!(filemq(&["subscribe", "--inbox", inbox]).status.code(), Some(2), "no path");
    assert_eq!(filemq(&["subscribe", "/a"]).status.code(), Some(2), "no inbox");
    assert_eq!(filemq(&["subscribe", "/a", "--inbox", inbox, "--timeout", "5"]).status.code(), Some(2));
    assert_eq!(filemq(&["subscribe", "/a", "--inbox", inbox, "--window", "lots"]).status.code(), Some(2));
    assert_eq!(
        filemq(&["subscribe", "/a", "--inbox", inbox, "--broker", "x", "--endpoint", "tcp://127.0.0.1:1"])
            .status
            .code(),
        Some(2)
    );
    for args in [
        &["subscribe", "relative", "--inbox", inbox][..],
        &["subscribe", "/a/../b", "--inbox", inbox],
        &["subscribe", "/a", "--inbox", inbox, "--broker", "no/slash"],
        &["subscribe", "/a", "--inbox", inbox, "--log", "verbose"],
        &["subscribe", "/a", "--inbox", inbox, "--endpoint", "127.0.0.1:25670"],
        &["subscribe", "/a", "--inbox", inbox, "--endpoint", "http://hub:5670"],
        &["subscribe", "/a", "--inbox", inbox, "--endpoint", "tcp://127.0.0.1:99999"],
    ] {
        let out = filemq(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = stderr(&out);
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(err.starts_with("filemq: "), "{err}");
    }
}

#[test]
fn an_unusable_inbox_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("file");
    std::fs::write(&file, b"").unwrap();
    let inbox = file.join("inbox");
    let out =
        filemq(&["subscribe", "/a", "--inbox", inbox.to_str().unwrap(), "--endpoint", &unique_endpoint()]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.starts_with("filemq: inbox ") && err.trim().lines().count() == 1, "{err}");
}

#[test]
fn once_without_a_broker_times_out_with_3() {
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let out = filemq(&[
        "subscribe",
        "/a",
        "--inbox",
        dir.path().to_str().unwrap(),
        "--endpoint",
        &unique_endpoint(),
        "--once",
        "--timeout",
        "500",
    ]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(started.elapsed() < Duration::from_secs(5));
    let err = stderr(&out);
    assert!(err.starts_with("filemq: not in sync after 500 ms") && err.trim().lines().count() == 1, "{err}");
}

/// A fake server for one session: greets, acknowledges the ICANHAZs, runs
/// `script` with a way to send, and returns the messages received after.
fn fake_server(
    endpoint: &str,
    script: impl FnOnce(&mut dyn FnMut(FilemqMsg)) + Send + 'static,
) -> JoinHandle<Vec<FilemqMsg>> {
    let context = zmq::Context::new();
    let socket = context.socket(zmq::ROUTER).unwrap();
    socket.set_linger(0).unwrap();
    socket.bind(endpoint).unwrap();
    std::thread::spawn(move || {
        let _context = context;
        let recv = |socket: &zmq::Socket| -> Option<(Vec<u8>, FilemqMsg)> {
            if socket.poll(zmq::POLLIN, 10_000).unwrap() == 0 {
                return None;
            }
            let frames = socket.recv_multipart(0).unwrap();
            Some((frames[0].clone(), FilemqMsg::decode(frames[1].clone()).unwrap()))
        };
        let (peer, ohai) = recv(&socket).expect("OHAI");
        assert!(matches!(ohai, FilemqMsg::Ohai { .. }));
        let send = |msg: FilemqMsg| socket.send_multipart([peer.clone(), msg.encode()], 0).unwrap();
        send(FilemqMsg::OhaiOk {});
        assert!(matches!(recv(&socket).expect("ICANHAZ").1, FilemqMsg::Icanhaz { .. }));
        send(FilemqMsg::IcanhazOk {});
        let mut send_mut = send;
        script(&mut send_mut);
        let mut after = Vec::new();
        while let Some((_, msg)) = recv(&socket) {
            let last = matches!(msg, FilemqMsg::Kthxbai {});
            if !matches!(msg, FilemqMsg::Nom { .. } | FilemqMsg::Hugz {}) {
                after.push(msg);
            }
            if last {
                break;
            }
        }
        after
    })
}

fn burger(
    sequence: u64,
    operation: Operation,
    name: &str,
    offset: u64,
    eof: u8,
    headers: Hash,
    data: &[u8],
) -> FilemqMsg {
    FilemqMsg::Cheezburger {
        sequence,
        operation,
        filename: LongStr::from(name),
        offset,
        eof,
        headers,
        chunk: Chunk(Bytes::copy_from_slice(data)),
    }
}

fn header(key: &str, value: &str) -> Hash {
    let mut h = Hash::default();
    h.insert(key, value.to_string()).unwrap();
    h
}

/// Runs `filemq subscribe /data --once` against `endpoint` with `extra`
/// arguments.
fn once_at(endpoint: &str, inbox: &std::path::Path, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_filemq"))
        .args(["subscribe", "/data", "--inbox", inbox.to_str().unwrap(), "--endpoint", endpoint, "--once"])
        .args(["--timeout", "10000"])
        .args(extra)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// hello.txt, then a delete of stale.txt, then the in-sync marker.
fn hello_and_a_delete(send: &mut dyn FnMut(FilemqMsg)) {
    let digest: String = Sha1::digest(b"hello").iter().map(|b| format!("{b:02X}")).collect();
    let mut headers = header("X-SHA1", &digest);
    headers.insert("X-SIZE", "5").unwrap();
    send(burger(0, Create, "/data/a/hello.txt", 0, 0, headers.clone(), b"hello"));
    send(burger(1, Create, "/data/a/hello.txt", 5, 1, headers, b""));
    send(burger(2, Delete, "/data/stale.txt", 0, 0, Hash::default(), b""));
    send(burger(3, Create, "", 0, 1, header("X-SYNCED", "/data"), b""));
}

#[test]
fn once_mirrors_prints_one_line_per_file_and_says_goodbye() {
    let endpoint = unique_endpoint();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("stale.txt"), b"old").unwrap();
    let server = fake_server(&endpoint, hello_and_a_delete);
    let out = once_at(&endpoint, dir.path(), &[]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "updated a/hello.txt\n");
    assert_eq!(std::fs::read(dir.path().join("a/hello.txt")).unwrap(), b"hello");
    // Not ours: kept, and said so.
    assert_eq!(std::fs::read(dir.path().join("stale.txt")).unwrap(), b"old");
    assert_eq!(
        stderr(&out),
        "filemq: 1 updated, 0 deleted; kept 1 local file(s) the publisher does not have \
         (--delete removes them)\n"
    );
    let after = server.join().unwrap();
    assert!(matches!(after.last(), Some(FilemqMsg::Kthxbai {})), "{after:?}");

    // With --delete, the publisher's word goes for every file.
    let server = fake_server(&endpoint, hello_and_a_delete);
    let out = once_at(&endpoint, dir.path(), &["--delete"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "updated a/hello.txt\ndeleted stale.txt\n");
    assert!(!dir.path().join("stale.txt").exists());
    server.join().unwrap();
}

#[test]
fn json_lines_and_escaped_names_cannot_be_forged() {
    let endpoint = unique_endpoint();
    let dir = tempfile::tempdir().unwrap();
    let forged = "/data/x\ndeleted important.txt\x1b]0;TITLE\x07";
    let server = fake_server(&endpoint, move |send| {
        send(burger(0, Create, forged, 0, 1, Hash::default(), b"x"));
        send(burger(1, Create, "", 0, 1, header("X-SYNCED", "/data"), b""));
    });
    let out = once_at(&endpoint, dir.path(), &[]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "updated x\\ndeleted important.txt\\x1b]0;TITLE\\x07\n");
    server.join().unwrap();

    let dir = tempfile::tempdir().unwrap();
    let server = fake_server(&endpoint, move |send| {
        send(burger(0, Create, forged, 0, 1, Hash::default(), b"x"));
        send(burger(1, Create, "/data/../up", 0, 1, Hash::default(), b"x"));
        send(burger(2, Create, "", 0, 1, header("X-SYNCED", "/data"), b""));
    });
    let out = once_at(&endpoint, dir.path(), &["--json"]);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    let events: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).expect("one JSON object per line"))
        .collect();
    let kinds: Vec<&str> = events.iter().map(|e| e["event"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["connected", "updated", "refused", "in-sync", "summary"]);
    assert_eq!(events[1]["path"], "x\ndeleted important.txt\x1b]0;TITLE\x07");
    assert_eq!(events[1]["size"], 1);
    assert_eq!(events[2]["name"], "/data/../up");
    assert_eq!(events[3]["published"], true);
    assert_eq!(events[4]["refused"], 1);
    server.join().unwrap();
}

#[test]
fn once_says_when_nothing_is_published_under_a_path() {
    let endpoint = unique_endpoint();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("thesis.txt"), b"mine").unwrap();
    let server = fake_server(&endpoint, |send| {
        send(burger(0, Delete, "/data/thesis.txt", 0, 0, Hash::default(), b""));
        let mut marker = header("X-SYNCED", "/data");
        marker.insert("X-PUBLISHED", "0").unwrap();
        send(burger(1, Create, "", 0, 1, marker, b""));
    });
    let out = once_at(&endpoint, dir.path(), &[]);
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));
    assert_eq!(
        stderr(&out),
        "filemq: nothing is published under /data (check the path; nothing was changed there)\n"
    );
    assert_eq!(std::fs::read(dir.path().join("thesis.txt")).unwrap(), b"mine");
    server.join().unwrap();
}

#[test]
fn once_without_any_broker_says_so_within_seconds() {
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let out = filemq(&[
        "subscribe",
        "/a",
        "--inbox",
        dir.path().to_str().unwrap(),
        "--endpoint",
        &unique_endpoint(),
        "--once",
    ]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    let took = started.elapsed();
    assert!(took >= Duration::from_secs(2) && took < Duration::from_millis(2800), "took {took:?}");
    let err = stderr(&out);
    assert!(
        err.starts_with("filemq: no broker answers: nothing listens at ipc://") && err.lines().count() == 1,
        "{err}"
    );
}

#[test]
fn once_with_a_refused_file_exits_5() {
    let endpoint = unique_endpoint();
    let dir = tempfile::tempdir().unwrap();
    let server = fake_server(&endpoint, |send| {
        send(burger(0, Create, "/data/../escape", 0, 1, Hash::default(), b"evil"));
        send(burger(1, Create, "/data/fine", 0, 1, Hash::default(), b"fine"));
        send(burger(2, Create, "", 0, 1, header("X-SYNCED", "/data"), b""));
    });
    let out = filemq(&[
        "subscribe",
        "/data",
        "--inbox",
        dir.path().to_str().unwrap(),
        "--endpoint",
        &endpoint,
        "--once",
        "--timeout",
        "10000",
    ]);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "updated fine\n");
    let err = stderr(&out);
    assert!(
        err.starts_with("filemq: in sync, but 1 file(s) could not be fetched or were refused for safety")
            && err.contains("/data/../escape")
            && err.trim().lines().count() == 1,
        "{err}"
    );
    let after = server.join().unwrap();
    assert!(matches!(after.last(), Some(FilemqMsg::Kthxbai {})), "{after:?}");
}

#[test]
fn a_refusal_exits_4() {
    let endpoint = unique_endpoint();
    let context = zmq::Context::new();
    let socket = context.socket(zmq::ROUTER).unwrap();
    socket.set_linger(0).unwrap();
    socket.bind(&endpoint).unwrap();
    let server = std::thread::spawn(move || {
        let frames = socket.recv_multipart(0).unwrap();
        let rtfm = FilemqMsg::Srsly { reason: ShortStr::lossy("not you") }.encode();
        socket.send_multipart([frames[0].clone(), rtfm], 0).unwrap();
        std::thread::sleep(Duration::from_millis(500));
    });
    let dir = tempfile::tempdir().unwrap();
    let out =
        filemq(&["subscribe", "/data", "--inbox", dir.path().to_str().unwrap(), "--endpoint", &endpoint]);
    assert_eq!(out.status.code(), Some(4));
    assert_eq!(stderr(&out).trim(), "filemq: the broker refused us: SRSLY: not you");
    server.join().unwrap();
}

#[test]
fn bad_exclude_patterns_exit_2_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let inbox = dir.path().join("inbox");
    let many: Vec<String> = (0..65).flat_map(|i| ["--exclude".to_string(), format!("p{i}")]).collect();
    let long = "x".repeat(257);
    for extra in [
        vec!["--exclude", ""],
        vec!["--exclude", "!"],
        vec!["--exclude", &long],
        many.iter().map(String::as_str).collect(),
    ] {
        let mut args =
            vec!["subscribe", "/a", "--inbox", inbox.to_str().unwrap(), "--endpoint", "ipc://@/nowhere"];
        args.extend(extra.iter().copied());
        let out = filemq(&args);
        assert_eq!(out.status.code(), Some(2), "{extra:?}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(
            err.starts_with("filemq: ") && err.contains("exclude") && err.trim().lines().count() == 1,
            "{err}"
        );
    }
    assert!(!inbox.exists(), "nothing made for a refused command line");
}

/// A server that speaks only the original protocol: it greets with a
/// plain OHAI-OK (it grants nothing) and acknowledges subscriptions;
/// returns every message it received until the client goes.
fn original_server(endpoint: &str) -> JoinHandle<Vec<FilemqMsg>> {
    let context = zmq::Context::new();
    let socket = context.socket(zmq::ROUTER).unwrap();
    socket.set_linger(0).unwrap();
    socket.bind(endpoint).unwrap();
    std::thread::spawn(move || {
        let _context = context;
        let mut heard = Vec::new();
        while socket.poll(zmq::POLLIN, 3_000).unwrap() > 0 {
            let frames = socket.recv_multipart(0).unwrap();
            let msg = FilemqMsg::decode(frames[1].clone()).expect("the client speaks FILEMQ");
            let reply = match &msg {
                FilemqMsg::Ohai { .. } => Some(FilemqMsg::OhaiOk {}),
                FilemqMsg::Icanhaz { .. } => Some(FilemqMsg::IcanhazOk {}),
                FilemqMsg::Hugz {} => Some(FilemqMsg::HugzOk {}),
                _ => None,
            };
            if let Some(reply) = reply {
                socket.send_multipart([frames[0].clone(), reply.encode()], 0).unwrap();
            }
            let last = matches!(msg, FilemqMsg::Kthxbai {});
            heard.push(msg);
            if last {
                break;
            }
        }
        heard
    })
}

/// Exclusions against a server that would not honour them: refused with
/// status 7, before anything is subscribed, rather than filtered here
/// after the transfer.
#[test]
fn exclude_against_an_original_server_exits_7_before_subscribing() {
    let endpoint = unique_endpoint();
    let server = original_server(&endpoint);
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let out = once_at(&endpoint, dir.path(), &["--exclude", "*.log"]);
    assert_eq!(out.status.code(), Some(7), "{}", stderr(&out));
    assert!(started.elapsed() < Duration::from_secs(5));
    let err = stderr(&out);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("does not offer exclusions (--exclude)"), "{err}");
    let heard = server.join().unwrap();
    assert!(matches!(heard.first(), Some(FilemqMsg::Ohai { .. })), "{heard:?}");
    assert!(
        !heard.iter().any(|m| matches!(m, FilemqMsg::Icanhaz { .. } | FilemqMsg::Nom { .. })),
        "{heard:?}"
    );
}

/// A dry run against a server that cannot list: refused with status 7,
/// before subscribing, and nothing at all made on disk.
#[test]
fn dry_run_against_an_original_server_exits_7_and_writes_nothing() {
    let endpoint = unique_endpoint();
    let server = original_server(&endpoint);
    let dir = tempfile::tempdir().unwrap();
    let inbox = dir.path().join("not-yet");
    let out = Command::new(env!("CARGO_BIN_EXE_filemq"))
        .args([
            "subscribe",
            "/data",
            "--inbox",
            inbox.to_str().unwrap(),
            "--endpoint",
            &endpoint,
            "--dry-run",
        ])
        .args(["--timeout", "10000"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(7), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.trim().lines().count() == 1 && err.contains("does not offer listings (--dry-run)"), "{err}");
    let heard = server.join().unwrap();
    assert!(
        !heard.iter().any(|m| matches!(m, FilemqMsg::Icanhaz { .. } | FilemqMsg::Nom { .. })),
        "{heard:?}"
    );
    assert!(!inbox.exists(), "a dry run makes nothing, not even the inbox");
}

#[test]
fn sigterm_says_goodbye_and_exits_0() {
    let endpoint = unique_endpoint();
    let dir = tempfile::tempdir().unwrap();
    let server = fake_server(&endpoint, |_| {});
    let mut child = Command::new(env!("CARGO_BIN_EXE_filemq"))
        .args(["subscribe", "/data", "--inbox", dir.path().to_str().unwrap(), "--endpoint", &endpoint])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    let after = server.join().unwrap();
    assert!(matches!(after.last(), Some(FilemqMsg::Kthxbai {})), "{after:?}");
}
