//! Faithful mirrors: what a client granted attributes (`ext::META`) is
//! sent beside content (directories, links, modes and mtimes, changes of
//! those alone), what a client without them still gets (the original
//! wire, links as copies), and the capability handshake.

use super::tests::{hash, nom, ohai, send, sha1_hex, take, world};
use super::*;
use crate::sim::Sim;
use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;
use work::Attrs;

/// A received CHEEZBURGER: name, headers (as text), chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Got {
    pub operation: Operation,
    pub name: String,
    pub headers: BTreeMap<String, String>,
    pub chunk: Vec<u8>,
    pub eof: u8,
}

pub(super) fn got(msgs: Vec<FilemqMsg>) -> Vec<Got> {
    msgs.into_iter()
        .filter_map(|m| match m {
            FilemqMsg::Cheezburger { operation, filename, headers, chunk, eof, .. } => Some(Got {
                operation,
                name: filename.to_string_lossy(),
                headers: headers.0.iter().map(|(k, v)| (k.to_string_lossy(), v.to_string_lossy())).collect(),
                chunk: chunk.0.to_vec(),
                eof,
            }),
            _ => None,
        })
        .collect()
}

/// Connects `conn` offering `caps`, checks what OHAI-OK grants, subscribes
/// to `path` with `options` and `cache`, and grants `credit`.
pub(super) fn subscribe_with(
    sim: &mut Sim<Filemq>,
    conn: u64,
    caps: u8,
    path: &str,
    options: &[(&str, &str)],
    cache: &[(&str, &str)],
    credit: u64,
) -> Vec<FilemqMsg> {
    sim.send_raw(conn, filemq_ext::encode_with_bits(&ohai(), caps));
    let greeting = sim.take_raw(conn);
    assert_eq!(greeting, vec![filemq_ext::encode_with_bits(&FilemqMsg::OhaiOk {}, caps & ext::ALL)]);
    send(sim, conn, FilemqMsg::Icanhaz { path: path.into(), options: hash(options), cache: hash(cache) });
    let mut replies = take(sim, conn);
    assert_eq!(replies.first(), Some(&FilemqMsg::IcanhazOk {}), "{replies:?}");
    replies.remove(0);
    send(sim, conn, nom(credit));
    replies.extend(take(sim, conn));
    replies
}

const EXTENDED: &[(&str, &str)] = &[("RESYNC", "1"), ("X-ZBROKER", "1")];

fn set_mode(root: &Path, rel: &str, mode: u32) {
    fs::set_permissions(root.join(rel), fs::Permissions::from_mode(mode)).unwrap();
}

fn set_mtime(root: &Path, rel: &str, secs: u64) {
    let time = std::time::UNIX_EPOCH + Duration::from_secs(secs);
    fs::File::options().write(true).open(root.join(rel)).unwrap().set_modified(time).unwrap();
}

fn rescan(sim: &mut Sim<Filemq>) {
    let key = *super::tests::watched(sim).values().next().expect("the mount is watched");
    sim.deliver(key, Box::new(Done::Dirty { mount: 0 }));
    sim.advance(Duration::from_millis(100));
}

/// The tree of the issue: modes, an old mtime, an empty directory, a
/// link inside, a link outside, a link to a directory.
fn tree(outside: &Path) -> (tempfile::TempDir, Sim<Filemq>) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    fs::create_dir(root.join("a")).unwrap();
    fs::write(root.join("a/x"), b"xx").unwrap();
    fs::write(root.join("a/run.sh"), b"#!/bin/sh\n").unwrap();
    set_mode(root, "a/x", 0o600);
    set_mode(root, "a/run.sh", 0o4755);
    set_mtime(root, "a/x", 1_000_000_000);
    fs::create_dir(root.join("empty")).unwrap();
    symlink("a/x", root.join("to-x")).unwrap();
    symlink("a", root.join("to-a")).unwrap();
    symlink(outside, root.join("out")).unwrap();
    let sim = publish(root);
    (dir, sim)
}

/// A broker publishing `root` as `/` (scanned at once).
fn publish(root: &Path) -> Sim<Filemq> {
    let mut sim = super::tests::sim_of(Filemq::new(super::tests::config()));
    let reply = super::tests::replace_mounts(&mut sim, &[(root, "/")]);
    assert!(matches!(reply, Some(Ok(_))), "{reply:?}");
    sim
}

#[test]
fn the_capabilities_are_granted_only_to_who_offers_them() {
    let (_dir, mut sim) = world(&[]);
    send(&mut sim, 1, ohai());
    assert_eq!(sim.take_raw(1), vec![hex_frame("AA A3 04")], "the original greeting, byte for byte");
    sim.send_raw(2, filemq_ext::encode_with_bits(&ohai(), 0xFF));
    assert_eq!(sim.take_raw(2), vec![filemq_ext::encode_with_bits(&FilemqMsg::OhaiOk {}, ext::ALL)]);
    // A stray byte after the fields is no offer.
    let mut stray = ohai().encode();
    stray.push(b'Z');
    sim.send_raw(3, stray);
    assert_eq!(sim.take_raw(3), vec![hex_frame("AA A3 04")]);
}

fn hex_frame(text: &str) -> Vec<u8> {
    text.split_whitespace().map(|b| u8::from_str_radix(b, 16).unwrap()).collect()
}

#[test]
fn clients_with_attributes_get_directories_links_modes_and_mtimes() {
    let outside = tempfile::tempdir().unwrap();
    let (dir, mut sim) = tree(outside.path());
    let got = got(subscribe_with(&mut sim, 1, ext::ALL, "/", EXTENDED, &[], 1_000_000));
    let names: Vec<&str> = got.iter().map(|g| g.name.as_str()).collect();
    // One chunk and one eof marker per file; one message per directory
    // and link; the marker. Nothing for the link that leads out, nothing
    // below the link to a directory.
    assert_eq!(names, ["/a", "/a/run.sh", "/a/run.sh", "/a/x", "/a/x", "/empty", "/to-a", "/to-x", ""]);
    let by_name = |name: &str| got.iter().rev().find(|g| g.name == name).unwrap();
    let attrs = |rel: &str| Attrs::of(&fs::symlink_metadata(dir.path().join(rel)).unwrap());

    let x = by_name("/a/x");
    assert_eq!(x.headers["X-MODE"], "600");
    assert_eq!(x.headers["X-MTIME"], "1000000000000000000");
    assert_eq!(x.headers["X-SHA1"], sha1_hex(b"xx"));
    assert!(!x.headers.contains_key("X-TYPE"), "content carries no type");
    assert_eq!(by_name("/a/run.sh").headers["X-MODE"], "755", "never setuid");

    let a = by_name("/a");
    assert_eq!(a.headers["X-TYPE"], "dir");
    assert_eq!(a.headers["X-MODE"], format!("{:o}", attrs("a").mode));
    assert_eq!(a.headers["X-MTIME"], attrs("a").mtime_ns.to_string());
    assert_eq!((a.eof, a.chunk.len()), (1, 0));
    assert_eq!(by_name("/empty").headers["X-TYPE"], "dir");

    let link = by_name("/to-x");
    assert_eq!(link.headers["X-TYPE"], "link");
    assert_eq!(link.headers["X-TARGET"], "a/x");
    assert_eq!(link.headers["X-MTIME"], attrs("to-x").mtime_ns.to_string());
    assert!(!link.headers.contains_key("X-MODE"));
    assert_eq!(by_name("/to-a").headers["X-TARGET"], "a");
    assert_eq!(sim.service.bytes_sent(), 2 + 10, "content once, links not as copies");
}

#[test]
fn clients_without_attributes_get_links_to_files_as_copies_and_nothing_else() {
    let outside = tempfile::tempdir().unwrap();
    let (_dir, mut sim) = tree(outside.path());
    // Extensions asked, attributes not offered: X-SHA1 and X-SIZE only.
    let got = got(subscribe_with(&mut sim, 1, 0, "/", EXTENDED, &[], 1_000_000));
    let names: Vec<&str> = got.iter().map(|g| g.name.as_str()).collect();
    assert_eq!(names, ["/a/run.sh", "/a/run.sh", "/a/x", "/a/x", "/to-x", "/to-x", ""]);
    assert!(got.iter().all(|g| !g.headers.contains_key("X-MODE") && !g.headers.contains_key("X-TYPE")));
    assert_eq!(got[4].chunk, b"xx", "the link's target, under the link's name");
    // A client as the original: no headers at all.
    let got =
        super::mirror_tests::got(subscribe_with(&mut sim, 2, 0, "/", &[("RESYNC", "1")], &[], 1_000_000));
    assert!(got.iter().all(|g| g.headers.is_empty()));
    assert_eq!(got.iter().filter(|g| g.eof == 1).count(), 3);
}

#[test]
fn a_chmod_or_a_touch_alone_sends_attributes_not_content() {
    let (dir, mut sim) = world(&[("f", b"content")]);
    subscribe_with(&mut sim, 1, ext::ALL, "/", EXTENDED, &[], 1_000_000);
    let sent = sim.service.bytes_sent();
    set_mode(dir.path(), "f", 0o640);
    rescan(&mut sim);
    let got = got(take(&mut sim, 1));
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].headers["X-TYPE"], "attrs");
    assert_eq!(got[0].headers["X-MODE"], "640");
    assert_eq!(got[0].headers["X-SHA1"], sha1_hex(b"content"));
    assert_eq!(got[0].chunk, b"");
    set_mtime(dir.path(), "f", 1_500_000_000);
    rescan(&mut sim);
    let got = super::mirror_tests::got(take(&mut sim, 1));
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].headers["X-MTIME"], "1500000000000000000");
    assert_eq!(sim.service.bytes_sent(), sent, "no content sent again");
    // A client without attributes hears nothing of either.
    subscribe_with(
        &mut sim,
        2,
        0,
        "/",
        &[("RESYNC", "1"), ("X-ZBROKER", "1")],
        &[("f", &sha1_hex(b"content"))],
        1_000_000,
    );
    set_mode(dir.path(), "f", 0o600);
    rescan(&mut sim);
    assert!(super::mirror_tests::got(take(&mut sim, 2)).is_empty());
}

#[test]
fn a_cache_with_attributes_spares_what_matches_and_corrects_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    for (name, data) in [("same", "1"), ("chmodded", "2"), ("changed", "3")] {
        fs::write(dir.path().join(name), data).unwrap();
    }
    fs::create_dir(dir.path().join("d")).unwrap();
    symlink("same", dir.path().join("l")).unwrap();
    let mut sim = publish(dir.path());
    let attrs = |rel: &str| Attrs::of(&fs::symlink_metadata(dir.path().join(rel)).unwrap());
    let value = |rel: &str, kind, digest: &str, mode: Option<u32>| {
        let mut a = attrs(rel);
        if let Some(mode) = mode {
            a.mode = mode;
        }
        filemq_ext::cache_value(digest, kind, a)
    };
    let cache = [
        ("same", value("same", EntryKind::File, &sha1_hex(b"1"), None)),
        ("chmodded", value("chmodded", EntryKind::File, &sha1_hex(b"2"), Some(0o777))),
        ("changed", value("changed", EntryKind::File, &sha1_hex(b"old"), None)),
        ("d", value("d", EntryKind::Dir, filemq_ext::EMPTY_SHA1, None)),
        ("l", value("l", EntryKind::Link, &filemq_ext::link_digest("same"), None)),
        ("gone", value("same", EntryKind::File, &sha1_hex(b"1"), None)),
    ];
    let cache: Vec<(&str, &str)> = cache.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let got = got(subscribe_with(&mut sim, 1, ext::ALL, "/", EXTENDED, &cache, 1_000_000));
    let summary: Vec<(Operation, &str, Option<&str>)> = got
        .iter()
        .map(|g| (g.operation, g.name.as_str(), g.headers.get("X-TYPE").map(String::as_str)))
        .collect();
    assert_eq!(
        summary,
        [
            (Operation::Create, "/changed", None),
            (Operation::Create, "/changed", None),
            (Operation::Create, "/chmodded", Some("attrs")),
            (Operation::Delete, "/gone", None),
            (Operation::Create, "", None),
        ]
    );
}

#[test]
fn replacing_a_directory_or_a_link_reaches_clients_with_attributes_only() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("keep"), "k").unwrap();
    fs::create_dir(dir.path().join("d")).unwrap();
    symlink("nowhere", dir.path().join("dangling")).unwrap();
    symlink("keep", dir.path().join("to-keep")).unwrap();
    let mut sim = publish(dir.path());
    subscribe_with(&mut sim, 1, ext::ALL, "/", EXTENDED, &[], 1_000_000);
    subscribe_with(&mut sim, 2, 0, "/", EXTENDED, &[], 1_000_000);
    fs::remove_dir(dir.path().join("d")).unwrap();
    fs::remove_file(dir.path().join("dangling")).unwrap();
    fs::remove_file(dir.path().join("to-keep")).unwrap();
    rescan(&mut sim);
    let deleted = |g: Vec<Got>| -> Vec<String> {
        g.into_iter().filter(|g| g.operation == Operation::Delete).map(|g| g.name).collect()
    };
    assert_eq!(deleted(got(take(&mut sim, 1))), ["/d", "/dangling", "/to-keep"]);
    assert_eq!(deleted(got(take(&mut sim, 2))), ["/to-keep"], "only the copy it holds");
}

/// What a connection granted EXCLUDE asks to leave out never enters its
/// queue: no content (no credit), no delete, live or on a RESYNC.
#[test]
fn excluded_entries_cost_nothing_and_are_never_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    fs::create_dir_all(root.join("logs/old")).unwrap();
    fs::create_dir_all(root.join("src")).unwrap();
    fs::write(root.join("keep.txt"), "keep").unwrap();
    fs::write(root.join("big.log"), vec![0u8; 100_000]).unwrap();
    fs::write(root.join("logs/old/a.txt"), "a").unwrap();
    fs::write(root.join("src/x.tmp"), "x").unwrap();
    fs::write(root.join("src/main.rs"), "fn main() {}").unwrap();
    let mut sim = publish(root);
    let options = [("RESYNC", "1"), ("X-ZBROKER", "1"), ("X-EXCLUDE", "*.log\nlogs/\n*.tmp\n!keep.tmp")];
    // It holds an excluded file the publisher does not have: no delete.
    let cache = [("gone.tmp", sha1_hex(b"g")), ("gone.txt", sha1_hex(b"g"))];
    let cache: Vec<(&str, &str)> = cache.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let got = got(subscribe_with(&mut sim, 1, ext::ALL, "/", &options, &cache, 1_000_000));
    let names: Vec<(Operation, &str)> = got.iter().map(|g| (g.operation, g.name.as_str())).collect();
    assert_eq!(
        names,
        [
            (Operation::Create, "/keep.txt"),
            (Operation::Create, "/keep.txt"),
            (Operation::Create, "/src"),
            (Operation::Create, "/src/main.rs"),
            (Operation::Create, "/src/main.rs"),
            (Operation::Delete, "/gone.txt"),
            (Operation::Create, ""),
        ]
    );
    assert_eq!(sim.service.bytes_sent(), 4 + 12, "excluded content cost nothing");
    assert_eq!(sim.service.status()["subscribers"][0]["excluding"], 4);
    // Live: excluded creates and deletes are not sent either.
    fs::write(root.join("new.log"), "n").unwrap();
    fs::write(root.join("src/keep.tmp"), "k").unwrap();
    fs::remove_file(root.join("big.log")).unwrap();
    fs::remove_dir_all(root.join("logs")).unwrap();
    rescan(&mut sim);
    let names: Vec<String> =
        super::mirror_tests::got(take(&mut sim, 1)).into_iter().map(|g| g.name).collect();
    assert_eq!(names, ["/src", "/src/keep.tmp", "/src/keep.tmp"], "taken back by !keep.tmp");
    // Another subscriber without exclusions gets everything.
    let got = super::mirror_tests::got(subscribe_with(&mut sim, 2, ext::ALL, "/", EXTENDED, &[], 1_000_000));
    assert!(got.iter().any(|g| g.name == "/new.log"));
}

#[test]
fn exclusions_are_bounded_and_honoured_only_when_granted() {
    let (_dir, mut sim) = world(&[("a.log", b"a"), ("b", b"b")]);
    // Not granted: ignored, as the original would.
    let got =
        got(subscribe_with(&mut sim, 1, 0, "/", &[("RESYNC", "1"), ("X-EXCLUDE", "*.log")], &[], 1_000));
    assert_eq!(got.iter().filter(|g| g.name == "/a.log").count(), 2);
    // Too many, or an unusable one: SRSLY naming why, nothing subscribed.
    let many = vec!["x"; zbroker_proto::exclude::MAX_PATTERNS + 1].join("\n");
    for (conn, patterns) in [(2, many.as_str()), (3, "ok\n"), (4, "\u{1}")] {
        sim.send_raw(conn, filemq_ext::encode_with_bits(&ohai(), ext::ALL));
        sim.take_raw(conn);
        send(
            &mut sim,
            conn,
            FilemqMsg::Icanhaz {
                path: "/".into(),
                options: hash(&[("RESYNC", "1"), ("X-EXCLUDE", patterns)]),
                cache: Hash::default(),
            },
        );
        match &take(&mut sim, conn)[..] {
            [FilemqMsg::Srsly { reason }] => {
                assert!(reason.to_string_lossy().contains("exclude"), "{reason:?}")
            }
            other => panic!("{patterns:?}: {other:?}"),
        }
        assert!(sim.service.conns[&crate::ConnId(conn)].subscriptions.is_empty());
    }
}

/// A large cache is prepared off the loop, its stale list without regard
/// to exclusions: they are checked as each delete is sent.
#[test]
fn a_large_cache_deletes_nothing_excluded() {
    let (_dir, mut sim) = world(&[("kept", b"k")]);
    let names: Vec<String> =
        (0..600).map(|i| format!("gone-{i:03}.{}", if i % 2 == 0 { "log" } else { "txt" })).collect();
    let digest = sha1_hex(b"x");
    let cache: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), digest.as_str())).collect();
    let options = [("RESYNC", "1"), ("X-ZBROKER", "1"), ("X-EXCLUDE", "*.log")];
    sim.send_raw(1, filemq_ext::encode_with_bits(&ohai(), ext::ALL));
    sim.take_raw(1);
    let frame = icanhaz_frame("/", &options, &cache);
    assert!(frame.len() > cache::INLINE_BYTES, "prepared off the loop");
    sim.send_raw(1, frame);
    sim.run_work();
    send(&mut sim, 1, nom(1_000_000));
    sim.advance(Duration::from_millis(10));
    let deleted: Vec<String> = got(take(&mut sim, 1))
        .into_iter()
        .filter(|g| g.operation == Operation::Delete)
        .map(|g| g.name)
        .collect();
    assert_eq!(deleted.len(), 300);
    assert!(deleted.iter().all(|n| n.ends_with(".txt")), "{deleted:?}");
}

fn icanhaz_frame(path: &str, options: &[(&str, &str)], cache: &[(&str, &str)]) -> Vec<u8> {
    FilemqMsg::Icanhaz { path: path.into(), options: hash(options), cache: hash(cache) }.encode()
}

/// A listing connection (`X-LIST`) is told what a RESYNC would send, every
/// file announced by one empty CHEEZBURGER with its headers: nothing is
/// read, no credit is needed.
#[test]
fn a_listing_reads_nothing_and_needs_no_credit() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("big"), vec![7u8; 3_000_000]).unwrap();
    fs::write(dir.path().join("held"), "same").unwrap();
    fs::create_dir(dir.path().join("d")).unwrap();
    symlink("big", dir.path().join("l")).unwrap();
    let mut sim = publish(dir.path());
    let held = filemq_ext::cache_value(
        &sha1_hex(b"same"),
        EntryKind::File,
        Attrs::of(&fs::metadata(dir.path().join("held")).unwrap()),
    );
    let options = [("RESYNC", "1"), ("X-ZBROKER", "1"), ("X-LIST", "1")];
    let cache = [("held", held.as_str()), ("gone", sha1_hex(b"g").leak())];
    // No NOM at all: a listing costs none.
    sim.send_raw(1, filemq_ext::encode_with_bits(&ohai(), ext::ALL));
    sim.take_raw(1);
    send(&mut sim, 1, FilemqMsg::Icanhaz { path: "/".into(), options: hash(&options), cache: hash(&cache) });
    sim.run_work();
    let got = got(take(&mut sim, 1)[1..].to_vec());
    let summary: Vec<(Operation, &str, Option<&str>, usize)> = got
        .iter()
        .map(|g| (g.operation, g.name.as_str(), g.headers.get("X-TYPE").map(String::as_str), g.chunk.len()))
        .collect();
    assert_eq!(
        summary,
        [
            (Operation::Create, "/big", None, 0),
            (Operation::Create, "/d", Some("dir"), 0),
            (Operation::Create, "/l", Some("link"), 0),
            (Operation::Delete, "/gone", None, 0),
            (Operation::Create, "", None, 0),
        ]
    );
    assert_eq!(got[0].headers["X-SIZE"], "3000000");
    assert_eq!(got[0].headers["X-SHA1"], sha1_hex(&vec![7u8; 3_000_000]));
    assert_eq!(got[0].eof, 1);
    assert_eq!((sim.service.bytes_sent(), sim.service.reads_in_flight()), (0, 0));
    // Not granted LIST: the option is ignored (content is sent as usual).
    let got =
        super::mirror_tests::got(subscribe_with(&mut sim, 2, ext::META, "/", &options, &[], 10_000_000));
    assert!(got.iter().any(|g| g.name == "/big" && !g.chunk.is_empty()));
}

/// The directory a subscription names is the client's mirror root, not an
/// entry of it: never sent, created or deleted, whatever its changes.
#[test]
fn the_subscribed_directory_itself_is_not_an_entry() {
    let dir = tempfile::tempdir().unwrap();
    fs::create_dir_all(dir.path().join("photos/2024")).unwrap();
    fs::write(dir.path().join("photos/2024/a.jpg"), "a").unwrap();
    let mut sim = publish(dir.path());
    let got = got(subscribe_with(&mut sim, 1, ext::ALL, "/photos", EXTENDED, &[], 1_000_000));
    let names: Vec<&str> = got.iter().map(|g| g.name.as_str()).collect();
    assert_eq!(names, ["/photos/2024", "/photos/2024/a.jpg", "/photos/2024/a.jpg", ""]);
    // Its mtime moves with a new file; removed, its files' deletes say it.
    fs::write(dir.path().join("photos/b.jpg"), "b").unwrap();
    rescan(&mut sim);
    let names: Vec<String> =
        super::mirror_tests::got(take(&mut sim, 1)).into_iter().map(|g| g.name).collect();
    assert_eq!(names, ["/photos/b.jpg", "/photos/b.jpg"]);
    fs::remove_dir_all(dir.path().join("photos")).unwrap();
    rescan(&mut sim);
    let names: Vec<String> =
        super::mirror_tests::got(take(&mut sim, 1)).into_iter().map(|g| g.name).collect();
    assert_eq!(names, ["/photos/2024", "/photos/2024/a.jpg", "/photos/b.jpg"]);
}
