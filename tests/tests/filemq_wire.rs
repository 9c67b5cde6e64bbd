//! The FILEMQ service of a real broker, spoken to in raw bytes from the
//! spec: the wire the original C client expects, the busy-loop fix, and
//! the one front door shared with ZPIPES.

use bytes::Bytes;
use zbroker_proto::codec::{Hash, LongStr, ShortStr};
use zbroker_proto::filemq::{FilemqMsg, Operation::Delete};
use zbroker_proto::ZpipesMsg;
use zbroker_tests::{hex, pseudo_random, put, Broker, Raw};

fn recv(raw: &Raw, ms: i64) -> Option<FilemqMsg> {
    raw.recv_bytes(ms).map(|f| FilemqMsg::decode(f).expect("the broker sends well-formed FILEMQ frames"))
}

fn send(raw: &Raw, msg: FilemqMsg) {
    raw.send_bytes(&msg.encode());
}

fn ohai() -> FilemqMsg {
    FilemqMsg::Ohai { protocol: ShortStr::lossy("FILEMQ"), version: 2 }
}

fn icanhaz(path: &str, resync: bool) -> FilemqMsg {
    let mut options = Hash::default();
    if resync {
        options.insert("RESYNC", Bytes::from_static(b"1")).unwrap();
    }
    FilemqMsg::Icanhaz { path: path.into(), options, cache: Hash::default() }
}

/// Connects as the original client does: OHAI, ICANHAZ, first NOM.
fn subscribe(broker: &Broker, path: &str, resync: bool, credit: u64) -> Raw {
    subscribe_raw(Raw::connect(&broker.filemq_endpoint()), path, resync, credit)
}

fn subscribe_raw(raw: Raw, path: &str, resync: bool, credit: u64) -> Raw {
    send(&raw, ohai());
    assert_eq!(recv(&raw, 5000), Some(FilemqMsg::OhaiOk {}));
    send(&raw, icanhaz(path, resync));
    assert_eq!(recv(&raw, 5000), Some(FilemqMsg::IcanhazOk {}));
    send(&raw, FilemqMsg::Nom { credit, sequence: 0 });
    raw
}

fn publisher() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let arg = dir.path().to_str().unwrap().to_string();
    (dir, arg)
}

#[test]
fn spec_vectors_against_the_real_broker() {
    let (_dir, root) = publisher();
    let broker = Broker::start(&["--publish", &root]);
    let raw = Raw::connect(&broker.filemq_endpoint());
    // docs/protocol/FILEMQ.md "Test vectors": row 1 → OHAI-OK (row 8).
    raw.send_bytes(&hex("AA A3 01 06 46 49 4C 45 4D 51 00 02"));
    assert_eq!(raw.recv_bytes(5000).unwrap(), hex("AA A3 04"));
    raw.send_bytes(&hex("AA A3 09"));
    assert_eq!(raw.recv_bytes(5000).unwrap(), hex("AA A3 0A"));
    // Row 2 → ICANHAZ-OK.
    raw.send_bytes(&hex("AA A3 05 00 00 00 01 2F 00 00 00 00 00 00 00 00"));
    assert_eq!(raw.recv_bytes(5000).unwrap(), hex("AA A3 06"));
    // v1 and v2-interim OHAI get RTFM, never a crash (docs/protocol/FILEMQ.md "Generations").
    let old = Raw::connect(&broker.filemq_endpoint());
    old.send_bytes(&hex("AA A3 01 06 46 49 4C 45 4D 51 01"));
    assert!(matches!(recv(&old, 5000), Some(FilemqMsg::Rtfm { .. })));
    // Garbage is dropped; the broker and the session carry on.
    raw.send_bytes(b"garbage");
    raw.send_bytes(&hex("AA A3 08 00 00"));
    send(&raw, FilemqMsg::Hugz {});
    assert_eq!(recv(&raw, 5000), Some(FilemqMsg::HugzOk {}));
    // "garbage" has no service's signature: the reactor drops it; the
    // truncated CHEEZBURGER reaches FILEMQ, which drops it.
    assert_eq!(broker.filemq()["malformed_frames"], 1);
    assert_eq!(broker.status()["dropped_frames"], 1);
}

/// docs/protocol/FILEMQ.md "Chunks"'s case: credit 5,000,000, a 300-byte file and a 10 MB file.
/// The original flooded duplicate chunks for ever; here the client, topping
/// up as the original client does, gets every byte exactly once.
#[test]
fn small_credit_completes_without_duplicate_chunks() {
    let (dir, root) = publisher();
    let big = pseudo_random(10_000_000, 7);
    put(dir.path(), "a-small", &[1u8; 300]);
    put(dir.path(), "b-big", &big);
    let broker = Broker::start(&["--publish", &root]);
    let raw = subscribe(&broker, "/", true, 5_000_000);
    let mut credit: i64 = 5_000_000;
    let mut received: Vec<(String, u64, u8)> = Vec::new();
    let mut files: std::collections::BTreeMap<String, Vec<u8>> = Default::default();
    let mut sequence = 0;
    while !received.iter().any(|(f, _, eof)| f == "/b-big" && *eof == 1) {
        let msg = recv(&raw, 10_000).expect("the transfer keeps going");
        let FilemqMsg::Cheezburger { sequence: seq, filename, offset, eof, chunk, .. } = msg else {
            panic!("unexpected {msg:?}");
        };
        assert_eq!(seq, sequence, "sequence numbers count every CHEEZBURGER");
        sequence += 1;
        let name = filename.to_string_lossy();
        let data = files.entry(name.clone()).or_default();
        assert_eq!(offset, data.len() as u64, "chunks arrive in order, once");
        data.extend_from_slice(&chunk.0);
        received.push((name, offset, eof));
        credit -= chunk.0.len() as i64;
        let mut grant = 0;
        while credit + grant < 4_000_001 {
            grant += 1_000_000;
        }
        if grant > 0 {
            send(&raw, FilemqMsg::Nom { credit: grant as u64, sequence: 0 });
            credit += grant;
        }
    }
    assert_eq!(files["/a-small"], vec![1u8; 300]);
    assert!(files["/b-big"] == big);
    let mut unique = received.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), received.len(), "no chunk was sent twice");
    assert_eq!(broker.filemq_bytes_sent(), 10_000_300);
}

#[test]
fn a_plain_subscriber_gets_changes_with_clean_deletes() {
    let (dir, root) = publisher();
    let broker = Broker::start(&["--publish", &root, "--stable-age", "100"]);
    broker.wait_scanned();
    let raw = subscribe(&broker, "/", false, 5_000_000);
    put(dir.path(), "hello.txt", b"Hello");
    let mut got = Vec::new();
    while got.len() < 2 {
        got.push(recv(&raw, 10_000).expect("the new file arrives"));
    }
    // Byte for byte the spec's vectors 5 and 6: no extension headers.
    assert_eq!(
        got[0].encode(),
        hex(
            "AA A3 08 00 00 00 00 00 00 00 00 01 00 00 00 0A 2F 68 65 6C 6C 6F 2E 74 78 74 00 00 00 00 00 00 00 00 \
             00 00 00 00 00 00 00 00 05 48 65 6C 6C 6F"
        )
    );
    assert_eq!(
        got[1].encode(),
        hex(
            "AA A3 08 00 00 00 00 00 00 00 01 01 00 00 00 0A 2F 68 65 6C 6C 6F 2E 74 78 74 00 00 00 00 00 00 00 05 \
             01 00 00 00 00 00 00 00 00"
        )
    );
    std::fs::remove_file(dir.path().join("hello.txt")).unwrap();
    let delete = recv(&raw, 10_000).expect("the delete arrives");
    // Vector 7: the clean form of a delete.
    assert_eq!(
        delete.encode(),
        hex(
            "AA A3 08 00 00 00 00 00 00 00 02 02 00 00 00 0A 2F 68 65 6C 6C 6F 2E 74 78 74 00 00 00 00 00 00 00 00 \
             00 00 00 00 00 00 00 00 00"
        )
    );
    assert!(matches!(delete, FilemqMsg::Cheezburger { operation: Delete, .. }));

    // Directories, links to them and a chmod alone are nothing to a client
    // that did not offer attributes (the original): it hears of the next
    // file only, as it always did.
    put(dir.path(), "a.txt", b"A");
    let names = |msgs: &[FilemqMsg]| -> Vec<String> {
        msgs.iter()
            .map(|m| match m {
                FilemqMsg::Cheezburger { filename, headers, .. } => {
                    assert!(headers.is_empty(), "no headers: {m:?}");
                    filename.to_string_lossy()
                }
                other => panic!("unexpected {other:?}"),
            })
            .collect()
    };
    let got: Vec<FilemqMsg> = (0..2).map(|_| recv(&raw, 10_000).expect("a.txt arrives")).collect();
    assert_eq!(names(&got), ["/a.txt", "/a.txt"]);
    std::fs::create_dir(dir.path().join("empty")).unwrap();
    std::os::unix::fs::symlink("empty", dir.path().join("dir-link")).unwrap();
    std::os::unix::fs::symlink("a.txt", dir.path().join("file-link")).unwrap();
    std::fs::set_permissions(dir.path().join("a.txt"), std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(600));
    put(dir.path(), "b.txt", b"B");
    let mut got: Vec<FilemqMsg> =
        (0..4).map(|_| recv(&raw, 10_000).expect("b.txt and the link's copy")).collect();
    got.extend(recv(&raw, 1_000));
    // A link to a file still arrives as a copy of it, as before.
    let mut heard = names(&got);
    heard.sort();
    assert_eq!(heard, ["/b.txt", "/b.txt", "/file-link", "/file-link"]);
    let copy = got.iter().find_map(|m| match m {
        FilemqMsg::Cheezburger { filename, chunk, .. }
            if filename.as_bytes() == b"/file-link" && !chunk.0.is_empty() =>
        {
            Some(chunk.0.clone())
        }
        _ => None,
    });
    assert_eq!(copy.as_deref(), Some(&b"A"[..]));
}

/// One TCP port for both services: the signature routes each message.
#[test]
fn one_tcp_endpoint_serves_zpipes_and_filemq() {
    let (dir, root) = publisher();
    put(dir.path(), "f", b"file");
    let broker = Broker::start(&["--publish", &root, "--bind", "tcp://127.0.0.1:*"]);
    let tcp = broker.tcp_endpoint();
    let pipe = Raw::connect(&tcp);
    let reply = pipe.ask(ZpipesMsg::Input { pipename: ShortStr::lossy("p") });
    assert_eq!(reply, ZpipesMsg::InputOk {});
    let files = Raw::connect(&tcp);
    send(&files, ohai());
    assert_eq!(recv(&files, 5000), Some(FilemqMsg::OhaiOk {}));
    send(&files, icanhaz("/", true));
    assert_eq!(recv(&files, 5000), Some(FilemqMsg::IcanhazOk {}));
    send(&files, FilemqMsg::Nom { credit: 100, sequence: 0 });
    let Some(FilemqMsg::Cheezburger { filename, chunk, .. }) = recv(&files, 10_000) else {
        panic!("the file arrives over the shared port");
    };
    assert_eq!(filename, LongStr::from("/f"));
    assert_eq!(&chunk.0[..], b"file");
}

#[test]
fn publish_at_run_time_and_status() {
    let (dir, root) = publisher();
    let (photos, photos_root) = publisher();
    put(dir.path(), "a", b"a");
    put(photos.path(), "p.jpg", b"jpeg");
    let broker = Broker::start(&["--publish", &root]);
    let state = broker.state_dir().unwrap().to_str().unwrap().to_string();
    let publish = |state: &str| {
        std::process::Command::new(zbroker_tests::bin("zbroker"))
            .args(["publish", &broker.name, &photos_root, "/photos", "--state-dir", state])
            .output()
            .unwrap()
    };
    // Someone without the broker's control token cannot publish.
    let stranger = tempfile::tempdir().unwrap();
    std::fs::write(stranger.path().join("control-token"), "guess").unwrap();
    let refused = publish(stranger.path().to_str().unwrap());
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("not authorised"));
    let out = publish(&state);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let again = publish(&state);
    assert!(!again.status.success(), "a second mount on one alias is refused");
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(stderr.starts_with("zbroker: ") && stderr.contains("/photos"), "{stderr}");
    broker.wait_scanned();
    let raw = subscribe(&broker, "/photos", true, 1_000_000);
    let Some(FilemqMsg::Cheezburger { filename, .. }) = recv(&raw, 10_000) else { panic!("a file") };
    assert_eq!(filename, LongStr::from("/photos/p.jpg"));
    let status = broker.filemq();
    let aliases: Vec<&str> =
        status["mounts"].as_array().unwrap().iter().map(|m| m["alias"].as_str().unwrap()).collect();
    assert_eq!(aliases, vec!["/", "/photos"]);
    assert_eq!(status["subscribers"][0]["subscriptions"][0], "/photos");
    let human = std::process::Command::new(zbroker_tests::bin("zbroker"))
        .args(["status", &broker.name])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&human.stdout);
    assert!(text.contains("mount /photos <- "), "{text}");
    assert!(text.contains("subscriber #"), "{text}");
}

/// Small files cost two frames each (data, eof) whatever the credit: a
/// subscriber that reads late must not be taken for one that stopped
/// reading while thousands of them wait for it.
#[test]
fn a_late_reader_of_many_small_files_is_not_dropped() {
    let (dir, root) = publisher();
    for i in 0..3000 {
        put(dir.path(), &format!("d{}/f{i}", i % 10), format!("file {i}").as_bytes());
    }
    let broker = Broker::start(&["--publish", &root]);
    broker.wait_scanned();
    let late = Raw::connect_with_rcvhwm(&broker.filemq_endpoint(), 1);
    let raw = subscribe_raw(late, "/", true, 8_000_000);
    std::thread::sleep(std::time::Duration::from_secs(2));
    let mut files = 0;
    while let Some(msg) = recv(&raw, 5000) {
        if let FilemqMsg::Cheezburger { eof: 1, .. } = msg {
            files += 1;
            if files == 3000 {
                break;
            }
        }
    }
    assert_eq!(files, 3000, "every file arrived");
    assert_eq!(broker.filemq()["subscribers"].as_array().map(Vec::len), Some(1), "the subscriber was kept");
}
