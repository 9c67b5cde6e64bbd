//! The FILEMQ service on a simulated clock, over real files in temporary
//! directories (the sim runs disk jobs inline).

use super::*;
use crate::sim::Sim;
use proptest::prelude::*;
use std::fs;
use std::path::Path;
use zbroker_proto::filemq::Operation::{Create, Delete};

use zbroker_proto::codec::testing::hex;

pub(super) fn config() -> Config {
    Config { stable_age: Duration::ZERO, ..Config::default() }
}

fn write(root: &Path, rel: &str, data: &[u8]) {
    let path = root.join(rel);
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, data).unwrap();
}

pub(super) use zbroker_proto::codec::testing::sha1_hex;

/// A broker publishing a fresh temporary directory as `/`.
pub(super) fn world(files: &[(&str, &[u8])]) -> (tempfile::TempDir, Sim<Filemq>) {
    world_with(files, config())
}

/// A simulation running FILEMQ's disk work inline, watches recorded.
pub(super) fn sim_of(service: Filemq) -> Sim<Filemq> {
    Sim::with_executor(service, Arc::new(executor::DiskExecutor::recording()))
}

/// The mounts the service asked to watch, and the key of each.
pub(super) fn watched(sim: &Sim<Filemq>) -> BTreeMap<MountId, u64> {
    sim.executor::<executor::DiskExecutor>().expect("FILEMQ's executor").watched()
}

pub(super) fn world_with(files: &[(&str, &[u8])], config: Config) -> (tempfile::TempDir, Sim<Filemq>) {
    let dir = tempfile::tempdir().unwrap();
    for (rel, data) in files {
        write(dir.path(), rel, data);
    }
    let mut sim = sim_of(Filemq::new(config));
    // As the command line or config file would: a reload may replace it.
    let reply = replace_mounts(&mut sim, &[(dir.path(), "/")]);
    assert!(matches!(reply, Some(Ok(_))), "{reply:?}");
    (dir, sim)
}

/// What SIGHUP's reload hands the service: the config file's mounts, typed.
pub(super) fn replace_mounts(
    sim: &mut Sim<Filemq>,
    list: &[(&std::path::Path, &str)],
) -> Option<Result<crate::Success, crate::CommandError>> {
    let list = list
        .iter()
        .map(|(dir, alias)| command::ConfigMount { dir: dir.to_path_buf(), alias: alias.to_string() })
        .collect();
    sim.execute(Box::new(command::Command::ReplaceMounts(list)))
}

pub(super) fn send(sim: &mut Sim<Filemq>, conn: u64, msg: FilemqMsg) {
    sim.send_raw(conn, msg.encode());
}

pub(super) fn take(sim: &mut Sim<Filemq>, conn: u64) -> Vec<FilemqMsg> {
    sim.take_raw(conn)
        .into_iter()
        .map(|f| FilemqMsg::decode(f).expect("the service sends valid frames"))
        .collect()
}

pub(super) fn ohai() -> FilemqMsg {
    FilemqMsg::Ohai { protocol: ShortStr::lossy("FILEMQ"), version: 2 }
}

pub(super) fn hash(entries: &[(&str, &str)]) -> Hash {
    let mut h = Hash::default();
    for (k, v) in entries {
        h.insert(k, Bytes::copy_from_slice(v.as_bytes())).unwrap();
    }
    h
}

pub(super) fn icanhaz(path: &str, options: &[(&str, &str)], cache: &[(&str, &str)]) -> FilemqMsg {
    FilemqMsg::Icanhaz { path: path.into(), options: hash(options), cache: hash(cache) }
}

pub(super) fn nom(credit: u64) -> FilemqMsg {
    FilemqMsg::Nom { credit, sequence: 0 }
}

/// Connects `conn`, subscribes to `path` with `options`, and grants
/// `credit`; returns what came back after OHAI-OK and ICANHAZ-OK.
fn subscribe(
    sim: &mut Sim<Filemq>,
    conn: u64,
    path: &str,
    options: &[(&str, &str)],
    credit: u64,
) -> Vec<FilemqMsg> {
    send(sim, conn, ohai());
    assert_eq!(take(sim, conn), vec![FilemqMsg::OhaiOk {}]);
    send(sim, conn, icanhaz(path, options, &[]));
    let replies = take(sim, conn);
    assert_eq!(replies.first(), Some(&FilemqMsg::IcanhazOk {}), "{replies:?}");
    send(sim, conn, nom(credit));
    let mut all = replies[1..].to_vec();
    all.extend(take(sim, conn));
    all
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Burger {
    sequence: u64,
    operation: Operation,
    filename: String,
    offset: u64,
    eof: u8,
    headers: Vec<(String, String)>,
    chunk: Vec<u8>,
}

fn burgers(msgs: Vec<FilemqMsg>) -> Vec<Burger> {
    msgs.into_iter()
        .map(|m| match m {
            FilemqMsg::Cheezburger { sequence, operation, filename, offset, eof, headers, chunk } => Burger {
                sequence,
                operation,
                filename: filename.to_string_lossy(),
                offset,
                eof,
                headers: headers.0.iter().map(|(k, v)| (k.to_string_lossy(), v.to_string_lossy())).collect(),
                chunk: chunk.0.to_vec(),
            },
            other => panic!("expected CHEEZBURGER, got {other:?}"),
        })
        .collect()
}

/// Reassembles files from a stream of CHEEZBURGERs as a client would,
/// checking sequence numbers and offsets on the way.
fn reassemble(stream: &[Burger]) -> BTreeMap<String, Vec<u8>> {
    let mut files = BTreeMap::new();
    let mut open: Option<(String, Vec<u8>)> = None;
    for (i, b) in stream.iter().enumerate() {
        assert_eq!(b.sequence, stream[0].sequence + i as u64, "sequence gap at {b:?}");
        match b.operation {
            Delete => {
                files.remove(&b.filename);
            }
            _ if b.filename.is_empty() => {}
            _ => {
                let (name, data) = open.get_or_insert_with(|| (b.filename.clone(), Vec::new()));
                assert_eq!(*name, b.filename, "chunks of two files interleaved");
                assert_eq!(b.offset, data.len() as u64, "chunk out of place: {b:?}");
                data.extend_from_slice(&b.chunk);
                if b.eof == 1 {
                    let (name, data) = open.take().unwrap();
                    files.insert(name, data);
                }
            }
        }
    }
    assert!(open.is_none(), "a file was left open");
    files
}

fn trigger_rescan(sim: &mut Sim<Filemq>) {
    let key = *watched(sim).values().next().expect("the mount is watched");
    sim.deliver(key, Box::new(Done::Dirty { mount: 0 }));
    sim.advance(Duration::from_millis(100));
}

#[test]
fn session_basics_match_the_original() {
    let (_dir, mut sim) = world(&[]);
    // ICANHAZ before OHAI → RTFM (docs/protocol/FILEMQ.md "States").
    send(&mut sim, 1, icanhaz("/", &[], &[]));
    assert!(matches!(take(&mut sim, 1)[..], [FilemqMsg::Rtfm { .. }]));
    send(&mut sim, 1, ohai());
    assert_eq!(take(&mut sim, 1), vec![FilemqMsg::OhaiOk {}]);
    send(&mut sim, 1, FilemqMsg::Hugz {});
    assert_eq!(take(&mut sim, 1), vec![FilemqMsg::HugzOk {}]);
    send(&mut sim, 1, icanhaz("/", &[], &[]));
    assert_eq!(take(&mut sim, 1), vec![FilemqMsg::IcanhazOk {}]);
    // A second ICANHAZ and a second OHAI are allowed.
    send(&mut sim, 1, icanhaz("/x", &[], &[]));
    assert_eq!(take(&mut sim, 1), vec![FilemqMsg::IcanhazOk {}]);
    send(&mut sim, 1, ohai());
    assert_eq!(take(&mut sim, 1), vec![FilemqMsg::OhaiOk {}]);
    send(&mut sim, 1, FilemqMsg::Kthxbai {});
    assert!(take(&mut sim, 1).is_empty());
    assert_eq!(sim.service.conns.len(), 0);
    assert_eq!(sim.armed_timers(), 1, "only the mount's rescan timer is left");
}

#[test]
fn older_generations_get_rtfm_and_garbage_is_dropped() {
    let (_dir, mut sim) = world(&[]);
    sim.send_raw(1, hex("AA A3 01 06 46 49 4C 45 4D 51 01"));
    assert!(matches!(&take(&mut sim, 1)[..], [FilemqMsg::Rtfm { .. }]));
    sim.send_raw(2, hex("AA A3 01 06 46 49 4C 45 4D 51 00 01"));
    assert!(matches!(&take(&mut sim, 2)[..], [FilemqMsg::Rtfm { .. }]));
    sim.send_raw(3, b"garbage".to_vec());
    sim.send_raw(3, hex("AA A3 08 00"));
    assert!(take(&mut sim, 3).is_empty());
    assert_eq!(sim.service.malformed, 2);
    // A server-only message from a client ends its session.
    send(&mut sim, 4, ohai());
    take(&mut sim, 4);
    send(&mut sim, 4, FilemqMsg::OhaiOk {});
    assert!(matches!(&take(&mut sim, 4)[..], [FilemqMsg::Rtfm { .. }]));
    assert!(sim.service.conns.is_empty());
}

#[test]
fn resync_sends_what_is_published_and_plain_subscribers_get_only_changes() {
    let (dir, mut sim) = world(&[("a.txt", b"alpha"), ("sub/b.txt", b"beta")]);
    let got = burgers(subscribe(&mut sim, 1, "/", &[("RESYNC", "1")], 5_000_000));
    let files = reassemble(&got);
    assert_eq!(files.get("/a.txt").map(Vec::as_slice), Some(&b"alpha"[..]));
    assert_eq!(files.get("/sub/b.txt").map(Vec::as_slice), Some(&b"beta"[..]));
    assert!(got.iter().all(|b| b.headers.is_empty()), "no extension headers unless asked");

    // A client as the original (no RESYNC) gets nothing that exists...
    assert!(subscribe(&mut sim, 2, "/", &[], 5_000_000).is_empty());
    // ...then every change: a create, and a delete with clean fields.
    write(dir.path(), "c.txt", b"gamma");
    trigger_rescan(&mut sim);
    let got = burgers(take(&mut sim, 2));
    assert_eq!(reassemble(&got).get("/c.txt").map(Vec::as_slice), Some(&b"gamma"[..]));
    fs::remove_file(dir.path().join("c.txt")).unwrap();
    trigger_rescan(&mut sim);
    let got = burgers(take(&mut sim, 2));
    assert_eq!(
        got,
        vec![Burger {
            sequence: 2,
            operation: Delete,
            filename: "/c.txt".into(),
            offset: 0,
            eof: 0,
            headers: vec![],
            chunk: vec![]
        }]
    );
    // The first subscriber saw both changes too.
    let got = burgers(take(&mut sim, 1));
    assert_eq!(got.len(), 3, "{got:?}");
}

/// docs/protocol/FILEMQ.md "Chunks": with credit 5,000,000, a 300-byte file and a 10 MB file, the
/// original repeated one chunk for ever. Here every byte arrives once,
/// with the client topping up as the original client does ("Credit").
#[test]
fn small_credit_never_repeats_a_chunk() {
    let big: Vec<u8> = (0..10_000_000u32).map(|i| (i % 251) as u8).collect();
    let (_dir, mut sim) = world(&[("a-small", &[7u8; 300]), ("b-big", &big)]);
    let mut stream = burgers(subscribe(&mut sim, 1, "/", &[("RESYNC", "1")], 5_000_000));
    let mut credit: i64 = 5_000_000 - stream.iter().map(|b| b.chunk.len() as i64).sum::<i64>();
    for _ in 0..100 {
        if stream.last().is_some_and(|b| b.filename == "/b-big" && b.eof == 1) {
            break;
        }
        // The original client: top up in 1,000,000 slices below 4,000,001.
        let mut grant = 0;
        while credit + grant < 4_000_001 {
            grant += 1_000_000;
        }
        assert!(grant > 0, "stalled with credit {credit}");
        send(&mut sim, 1, nom(grant as u64));
        credit += grant;
        let more = burgers(take(&mut sim, 1));
        credit -= more.iter().map(|b| b.chunk.len() as i64).sum::<i64>();
        stream.extend(more);
    }
    let files = reassemble(&stream);
    assert_eq!(files["/a-small"], vec![7u8; 300]);
    assert!(files["/b-big"] == big, "the big file arrived intact");
    let mut seen = std::collections::HashSet::new();
    assert!(
        stream.iter().all(|b| seen.insert((b.filename.clone(), b.offset, b.eof))),
        "a chunk was repeated"
    );
    assert!(stream.iter().all(|b| b.chunk.len() <= 1_000_000));
}

#[test]
fn chunks_fit_the_credit_and_wait_for_more() {
    let (_dir, mut sim) = world(&[("f", &[1u8; 2500])]);
    let got = burgers(subscribe(&mut sim, 1, "/", &[("RESYNC", "1")], 1000));
    assert_eq!(got.iter().map(|b| (b.offset, b.chunk.len())).collect::<Vec<_>>(), vec![(0, 1000)]);
    send(&mut sim, 1, nom(0));
    assert!(take(&mut sim, 1).is_empty());
    send(&mut sim, 1, nom(999));
    let got = burgers(take(&mut sim, 1));
    assert_eq!(got.iter().map(|b| (b.offset, b.chunk.len())).collect::<Vec<_>>(), vec![(1000, 999)]);
    send(&mut sim, 1, nom(10_000));
    let got = burgers(take(&mut sim, 1));
    assert_eq!(
        got.iter().map(|b| (b.offset, b.chunk.len(), b.eof)).collect::<Vec<_>>(),
        vec![(1999, 501, 0), (2500, 0, 1)]
    );
    assert_eq!(sim.service.conns[&ConnId(1)].credit.available(), 10_000 - 501);
}

#[test]
fn zero_credit_still_carries_deletes_and_empty_files() {
    let (dir, mut sim) = world(&[("gone", b"x"), ("empty", b"")]);
    let got = burgers(subscribe(&mut sim, 1, "/", &[("RESYNC", "1")], 0));
    assert_eq!(got.iter().map(|b| (b.filename.as_str(), b.eof)).collect::<Vec<_>>(), vec![("/empty", 1)]);
    // "gone" waits for credit; deleting it leaves only the delete.
    fs::remove_file(dir.path().join("gone")).unwrap();
    trigger_rescan(&mut sim);
    let got = burgers(take(&mut sim, 1));
    assert_eq!(
        got.iter().map(|b| (b.filename.as_str(), b.operation)).collect::<Vec<_>>(),
        vec![("/gone", Delete)]
    );
}

#[test]
fn the_cache_spares_what_the_client_holds_and_prunes_what_is_gone() {
    let (_dir, mut sim) = world(&[("photos/a.txt", b"abc"), ("photos/b.txt", b"new"), ("other/c.txt", b"c")]);
    send(&mut sim, 1, ohai());
    take(&mut sim, 1);
    // Keys relative to the path, and absolute; digests in any case.
    let cache = [
        ("a.txt", "a9993e364706816aba3e25717850c26c9cd0d89d"),
        ("/photos/b.txt", &sha1_hex(b"old")),
        ("stale.txt", &sha1_hex(b"stale")),
        ("../escape", &sha1_hex(b"x")),
        ("/other/c.txt", &sha1_hex(b"c")),
    ];
    send(&mut sim, 1, icanhaz("/photos", &[("RESYNC", "1")], &cache));
    send(&mut sim, 1, nom(1_000_000));
    let got = burgers(take(&mut sim, 1)[1..].to_vec());
    let summary: Vec<_> = got.iter().map(|b| (b.filename.as_str(), b.operation, b.eof)).collect();
    assert_eq!(
        summary,
        vec![("/photos/b.txt", Create, 0), ("/photos/b.txt", Create, 1), ("/photos/stale.txt", Delete, 0)]
    );
}

#[test]
fn patches_are_filtered_by_subscription_path() {
    let (dir, mut sim) = world(&[]);
    subscribe(&mut sim, 1, "/data", &[], 1_000_000);
    send(&mut sim, 1, icanhaz("/logs", &[], &[]));
    take(&mut sim, 1);
    write(dir.path(), "data/x", b"1");
    write(dir.path(), "database/y", b"2");
    write(dir.path(), "other/z", b"3");
    write(dir.path(), "logs/w", b"4");
    trigger_rescan(&mut sim);
    let names: std::collections::BTreeSet<_> =
        burgers(take(&mut sim, 1)).into_iter().map(|b| b.filename).collect();
    assert_eq!(names.into_iter().collect::<Vec<_>>(), vec!["/data/x".to_string(), "/logs/w".to_string()]);
}

#[test]
fn extended_clients_get_digests_sizes_and_an_in_sync_marker() {
    let (_dir, mut sim) = world(&[("a", b"abc")]);
    let got = burgers(subscribe(&mut sim, 1, "/", &[("RESYNC", "1"), ("X-ZBROKER", "1")], 1_000_000));
    assert_eq!(got.len(), 3);
    for b in &got[..2] {
        assert_eq!(
            b.headers,
            vec![
                ("X-SHA1".into(), "A9993E364706816ABA3E25717850C26C9CD0D89D".into()),
                ("X-SIZE".into(), "3".into())
            ]
        );
    }
    assert_eq!(
        got[2],
        Burger {
            sequence: 2,
            operation: Create,
            filename: String::new(),
            offset: 0,
            eof: 1,
            headers: vec![("X-SYNCED".into(), "/".into()), ("X-PUBLISHED".into(), "1".into())],
            chunk: vec![]
        }
    );
}

#[test]
fn the_in_sync_marker_says_whether_anything_is_published_there() {
    let (_dir, mut sim) = world(&[("a", b"abc"), ("sub/b", b"b"), ("sub-c", b"c")]);
    let extended = [("RESYNC", "1"), ("X-ZBROKER", "1")];
    let published = |sim: &mut Sim<Filemq>, conn, path: &str| {
        let got = burgers(subscribe(sim, conn, path, &extended, 1_000_000));
        let marker = got.last().unwrap().clone();
        assert_eq!(marker.headers[0], ("X-SYNCED".into(), path.into()));
        marker.headers[1].1.clone()
    };
    assert_eq!(published(&mut sim, 1, "/"), "1");
    assert_eq!(published(&mut sim, 2, "/sub"), "1");
    assert_eq!(published(&mut sim, 3, "/a"), "1", "a file is published there");
    assert_eq!(published(&mut sim, 4, "/typo"), "0");
    assert_eq!(published(&mut sim, 5, "/su"), "0", "components, not characters");
    assert_eq!(published(&mut sim, 6, "/sub/b/c"), "0");
}

#[test]
fn a_million_deletes_go_out_over_many_passes() {
    let (_dir, mut sim) = world(&[("a", b"a")]);
    send(&mut sim, 1, ohai());
    let names: Vec<String> = (0..3000).map(|i| format!("gone-{i}")).collect();
    let digest = sha1_hex(b"x");
    let cache: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), digest.as_str())).collect();
    send(&mut sim, 1, icanhaz("/", &[("RESYNC", "1"), ("X-ZBROKER", "1")], &cache));
    send(&mut sim, 1, nom(1_000_000));
    let deletes = |msgs: Vec<FilemqMsg>| {
        msgs.iter().filter(|m| matches!(m, FilemqMsg::Cheezburger { operation: Delete, .. })).count()
    };
    let first = deletes(take(&mut sim, 1));
    assert!((1000..=1100).contains(&first), "one pass sends a batch, not everything: {first}");
    let mut total = first;
    let mut passes = 1;
    while total < 3000 && passes < 10 {
        sim.advance(Duration::ZERO);
        let this_pass = deletes(take(&mut sim, 1));
        assert!(this_pass <= 1024, "a pass sent {this_pass}");
        total += this_pass;
        passes += 1;
    }
    assert_eq!(total, 3000, "the rest follows on the next passes");
    assert!(passes >= 3, "over several passes: {passes}");
}

#[test]
fn a_misspelled_path_deletes_nothing() {
    let (_dir, mut sim) = world(&[("photos/a.jpg", b"a")]);
    send(&mut sim, 1, ohai());
    let cache = [("a.jpg", sha1_hex(b"a"))];
    let cache: Vec<(&str, &str)> = cache.iter().map(|(k, v)| (*k, v.as_str())).collect();
    send(&mut sim, 1, icanhaz("/photoz", &[("RESYNC", "1"), ("X-ZBROKER", "1")], &cache));
    send(&mut sim, 1, nom(1_000_000));
    let got = burgers(
        take(&mut sim, 1).into_iter().filter(|m| matches!(m, FilemqMsg::Cheezburger { .. })).collect(),
    );
    assert_eq!(got.len(), 1, "the marker alone, no delete: {got:?}");
    assert_eq!(got[0].headers[1], ("X-PUBLISHED".into(), "0".into()));
    // Where something is published, what is no longer there goes.
    send(
        &mut sim,
        1,
        icanhaz("/photos", &[("RESYNC", "1"), ("X-ZBROKER", "1")], &[("gone.jpg", &sha1_hex(b"g"))]),
    );
    let got = burgers(
        take(&mut sim, 1).into_iter().filter(|m| matches!(m, FilemqMsg::Cheezburger { .. })).collect(),
    );
    assert!(got.iter().any(|b| b.operation == Delete && b.filename == "/photos/gone.jpg"), "{got:?}");
}

#[test]
fn resync_waits_for_the_first_scan() {
    let mut sim = sim_of(Filemq::new(config()));
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a", b"abc");
    sim.hold_work = true;
    sim.command(&["PUBLISH", dir.path().to_str().unwrap(), "/"]);
    send(&mut sim, 1, ohai());
    send(&mut sim, 1, icanhaz("/", &[("RESYNC", "1"), ("X-ZBROKER", "1")], &[("a", &sha1_hex(b"abc"))]));
    send(&mut sim, 1, nom(1000));
    // Before the scan, the cached file must not be taken as deleted.
    assert_eq!(take(&mut sim, 1), vec![FilemqMsg::OhaiOk {}, FilemqMsg::IcanhazOk {}]);
    sim.hold_work = false;
    sim.run_work();
    let got = burgers(take(&mut sim, 1));
    assert_eq!(got.len(), 1, "only the marker: the client holds the file: {got:?}");
    assert_eq!(got[0].headers[0].0, "X-SYNCED");
}

#[test]
fn a_partial_file_resumes_from_its_offset() {
    let data: Vec<u8> = (0..3000u32).map(|i| i as u8).collect();
    let (_dir, mut sim) = world(&[("f", &data)]);
    let resume = format!("{} 1200\n", sha1_hex(&data));
    let got = burgers(subscribe(
        &mut sim,
        1,
        "/",
        &[("RESYNC", "1"), ("X-ZBROKER", "1"), ("X-RESUME", &resume)],
        10_000,
    ));
    assert_eq!(got[0].offset, 1200);
    assert_eq!(got[0].chunk, data[1200..]);
    assert_eq!(sim.service.bytes_sent(), 1800);
    // A client that did not ask for the extensions never gets a resume.
    let got = burgers(subscribe(&mut sim, 2, "/", &[("RESYNC", "1"), ("X-RESUME", &resume)], 10_000));
    assert_eq!(got[0].offset, 0);
}

#[test]
fn a_file_changed_during_transfer_is_abandoned_and_sent_anew() {
    let (dir, mut sim) = world(&[("f", &[1u8; 3000])]);
    let got = burgers(subscribe(&mut sim, 1, "/", &[("RESYNC", "1")], 1000));
    assert_eq!(got.len(), 1);
    // Rewritten (a different size) while the client has no credit.
    write(dir.path(), "f", &[2u8; 2000]);
    send(&mut sim, 1, nom(10_000));
    assert!(take(&mut sim, 1).is_empty(), "nothing of the stale version is sent");
    sim.advance(Duration::from_millis(100));
    let got = burgers(take(&mut sim, 1));
    assert_eq!(got[0].offset, 0);
    assert_eq!(reassemble(&got)["/f"], vec![2u8; 2000]);
}

#[test]
fn several_mounts_and_runtime_publish() {
    let (_dir, mut sim) = world(&[("a", b"1")]);
    let photos = tempfile::tempdir().unwrap();
    write(photos.path(), "p.jpg", b"jpeg");
    let got = burgers(subscribe(&mut sim, 1, "/", &[("RESYNC", "1")], 1_000_000));
    assert_eq!(reassemble(&got).len(), 1);
    assert!(matches!(sim.command(&["PUBLISH", photos.path().to_str().unwrap(), "/photos/"]), Some(Ok(_))));
    assert!(matches!(sim.command(&["PUBLISH", photos.path().to_str().unwrap(), "/photos"]), Some(Err(_))));
    assert!(matches!(sim.command(&["PUBLISH", "relative", "/r"]), Some(Err(_))));
    assert!(matches!(sim.command(&["PUBLISH", "/tmp", "no-slash"]), Some(Err(_))));
    let got = burgers(take(&mut sim, 1));
    assert_eq!(reassemble(&got)["/photos/p.jpg"], b"jpeg");
    let status = sim.service.status();
    assert_eq!(status["mounts"].as_array().unwrap().len(), 2);
    assert_eq!(status["subscribers"][0]["subscriptions"][0], "/");
}

#[test]
fn silent_clients_expire_and_bad_subscriptions_are_refused() {
    let (_dir, mut sim) = world(&[]);
    send(&mut sim, 1, ohai());
    send(&mut sim, 1, icanhaz("relative", &[], &[]));
    send(&mut sim, 1, icanhaz("/a/../b", &[], &[]));
    let got = take(&mut sim, 1);
    assert!(
        matches!(&got[..], [FilemqMsg::OhaiOk {}, FilemqMsg::Srsly { .. }, FilemqMsg::Srsly { .. }]),
        "{got:?}"
    );
    sim.advance(Duration::from_secs(59));
    send(&mut sim, 1, FilemqMsg::Hugz {});
    sim.advance(Duration::from_secs(59));
    assert_eq!(sim.service.conns.len(), 1);
    sim.advance(Duration::from_secs(2));
    assert!(sim.service.conns.is_empty());
}

#[test]
fn subscriptions_per_connection_are_bounded() {
    let (_dir, mut sim) = world(&[]);
    send(&mut sim, 1, ohai());
    for i in 0..100 {
        send(&mut sim, 1, icanhaz(&format!("/p{i}"), &[("RESYNC", "1"), ("X-ZBROKER", "1")], &[]));
        // Repeating one keeps one marker queued, not many.
        send(&mut sim, 1, icanhaz("/p0", &[("RESYNC", "1")], &[]));
    }
    let conn = &sim.service.conns[&ConnId(1)];
    assert_eq!(conn.subscriptions.len(), 64);
    assert!(conn.queue.len() <= 64);
}

/// A client counts one marker per RESYNC (it re-subscribes to fetch a
/// file that failed verification), so merged RESYNCs still owe as many.
#[test]
fn every_resync_gets_its_marker() {
    let (_dir, mut sim) = world(&[("a", b"abc")]);
    send(&mut sim, 1, ohai());
    for _ in 0..3 {
        send(&mut sim, 1, icanhaz("/", &[("RESYNC", "1"), ("X-ZBROKER", "1")], &[]));
    }
    take(&mut sim, 1);
    send(&mut sim, 1, nom(1_000_000));
    let got = burgers(take(&mut sim, 1));
    let markers = got.iter().filter(|b| b.headers.first().is_some_and(|(k, _)| k == "X-SYNCED")).count();
    assert_eq!(markers, 3, "{got:?}");
    assert_eq!(reassemble(&got)["/a"], b"abc");
}

fn client_msg() -> impl Strategy<Value = FilemqMsg> {
    prop_oneof![
        Just(ohai()),
        Just(FilemqMsg::Hugz {}),
        Just(FilemqMsg::Kthxbai {}),
        (0u64..5000).prop_map(nom),
        prop_oneof![Just("/"), Just("/a"), Just("/a/b"), Just("x")].prop_flat_map(|p| {
            (any::<bool>(), any::<bool>()).prop_map(move |(resync, ext)| {
                let mut options = vec![];
                if resync {
                    options.push(("RESYNC", "1"));
                }
                if ext {
                    options.push(("X-ZBROKER", "1"));
                }
                icanhaz(p, &options, &[("b", "A9993E364706816ABA3E25717850C26C9CD0D89D")])
            })
        }),
        FilemqMsg::arbitrary(),
    ]
}

#[derive(Debug, Clone)]
enum Step {
    Msg(u64, FilemqMsg),
    Garbage(u64, Vec<u8>),
    Disconnect(u64),
    Advance(u64),
    Touch(u8),
    /// Let disk work pile up (so reads are in flight across other events),
    /// or run what piled up.
    HoldWork(bool),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => (0u64..4, client_msg()).prop_map(|(c, m)| Step::Msg(c, m)),
        1 => (0u64..4, proptest::collection::vec(any::<u8>(), 0..40)).prop_map(|(c, g)| Step::Garbage(c, g)),
        1 => (0u64..4).prop_map(Step::Disconnect),
        1 => (0u64..2000).prop_map(Step::Advance),
        1 => any::<u8>().prop_map(Step::Touch),
        1 => any::<bool>().prop_map(Step::HoldWork),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Any sequence of messages from several connections: no panic, every
    /// reply decodes, every stream is well-formed (sequence numbers in
    /// order, chunks in place), and nothing is left once all have gone.
    #[test]
    fn arbitrary_sessions_keep_the_invariants(steps in proptest::collection::vec(step(), 1..60)) {
        let (dir, mut sim) = world(&[("a/b", b"hello"), ("a/c", &[3u8; 2500]), ("d", b"")]);
        let mut sequences: HashMap<u64, u64> = HashMap::new();
        for step in steps {
            match step {
                Step::Msg(c, m) => {
                    if matches!(m, FilemqMsg::Ohai { .. }) {
                        sequences.remove(&c);
                    }
                    send(&mut sim, c, m)
                }
                Step::Garbage(c, g) => sim.send_raw(c, g),
                Step::Disconnect(c) => {
                    sequences.remove(&c);
                    sim.disconnect(c)
                }
                Step::Advance(ms) => sim.advance(Duration::from_millis(ms)),
                Step::Touch(n) => {
                    write(dir.path(), &format!("a/t{}", n % 4), &vec![n; n as usize * 37]);
                    trigger_rescan(&mut sim);
                }
                Step::HoldWork(hold) => {
                    sim.hold_work = hold;
                    if !hold {
                        sim.run_work();
                    }
                }
            }
            for c in 0..4 {
                for msg in take(&mut sim, c) {
                    if let FilemqMsg::Cheezburger { sequence, .. } = msg {
                        let next = sequences.entry(c).or_insert(sequence);
                        prop_assert_eq!(sequence, *next);
                        *next += 1;
                    }
                }
            }
        }
        for c in 0..4 {
            sim.disconnect(c);
        }
        sim.hold_work = false;
        sim.run_work();
        prop_assert!(sim.service.conns.is_empty());
        let only_watches = sim.service.work.values().all(|w| matches!(w, WorkFor::Watch { .. }));
        prop_assert!(only_watches, "work outlived its connection");
    }
}

#[test]
fn the_in_sync_marker_waits_for_files_still_changing() {
    let config = Config { stable_age: Duration::from_millis(300), ..Config::default() };
    let (_dir, mut sim) = world_with(&[("fresh", b"just written")], config);
    let got = burgers(subscribe(&mut sim, 1, "/", &[("RESYNC", "1"), ("X-ZBROKER", "1")], 1_000_000));
    assert!(got.is_empty(), "neither the unsettled file nor the marker yet: {got:?}");
    std::thread::sleep(Duration::from_millis(350));
    sim.advance(Duration::from_millis(300));
    let got = burgers(take(&mut sim, 1));
    let names: Vec<_> = got.iter().map(|b| (b.filename.as_str(), b.eof)).collect();
    assert_eq!(names, vec![("/fresh", 0), ("/fresh", 1), ("", 1)]);
}

fn marker_count(got: &[Burger]) -> usize {
    got.iter().filter(|b| b.headers.first().is_some_and(|(k, _)| k == "X-SYNCED")).count()
}

#[test]
fn a_file_changing_elsewhere_does_not_hold_a_marker_back_and_none_holds_it_for_ever() {
    let config = Config { stable_age: Duration::from_secs(3600), ..Config::default() };
    // Written now, so "changing" for the next hour of wall-clock time.
    let (_dir, mut sim) = world_with(&[("b/log", b"growing")], config);
    let got = burgers(subscribe(&mut sim, 1, "/a", &[("RESYNC", "1"), ("X-ZBROKER", "1")], 1000));
    assert_eq!(marker_count(&got), 1, "/a has nothing changing under it: {got:?}");
    let got = burgers(subscribe(&mut sim, 2, "/", &[("RESYNC", "1"), ("X-ZBROKER", "1")], 1000));
    assert_eq!(marker_count(&got), 0, "/ covers the changing file");
    sim.advance(Duration::from_secs(20));
    assert_eq!(marker_count(&burgers(take(&mut sim, 2))), 0);
    sim.advance(Duration::from_secs(15));
    assert_eq!(marker_count(&burgers(take(&mut sim, 2))), 1, "the marker waits at most MARKER_WAIT");
}

#[test]
fn resync_of_a_deep_path_sends_only_what_lies_under_it() {
    let (_dir, mut sim) =
        world(&[("ab", b"1"), ("a-b/x", b"2"), ("a/x", b"3"), ("a/y/z", b"4"), ("a0", b"5")]);
    let got = burgers(subscribe(&mut sim, 1, "/a", &[("RESYNC", "1")], 1000));
    let names: std::collections::BTreeSet<_> = reassemble(&got).into_keys().collect();
    assert_eq!(names.into_iter().collect::<Vec<_>>(), vec!["/a/x".to_string(), "/a/y/z".to_string()]);
}

/// The client re-subscribes when a file failed verification; the broker
/// must not count the file it was sending as held by the client.
#[test]
fn a_resubscribe_during_a_transfer_resends_that_file() {
    let (_dir, mut sim) = world(&[("f", &[9u8; 3000])]);
    let got = burgers(subscribe(&mut sim, 1, "/", &[("RESYNC", "1"), ("X-ZBROKER", "1")], 1000));
    assert_eq!(got.len(), 1, "one chunk within the credit");
    send(&mut sim, 1, icanhaz("/", &[("RESYNC", "1"), ("X-ZBROKER", "1")], &[]));
    send(&mut sim, 1, nom(10_000));
    let got = burgers(take(&mut sim, 1)[1..].to_vec());
    assert_eq!(got[0].offset, 0, "the file starts over");
    assert_eq!(reassemble(&got)["/f"], vec![9u8; 3000]);
    assert_eq!(marker_count(&got), 2);
}

#[test]
fn a_reloaded_mount_list_publishes_and_unpublishes() {
    let (dir, mut sim) = world(&[("a", b"1")]);
    let photos = tempfile::tempdir().unwrap();
    write(photos.path(), "p", b"2");
    let got = burgers(subscribe(&mut sim, 1, "/", &[("RESYNC", "1")], 1_000_000));
    assert_eq!(reassemble(&got).len(), 1);
    let both = [(dir.path(), "/"), (photos.path(), "/photos")];
    assert!(matches!(replace_mounts(&mut sim, &both), Some(Ok(_))));
    let got = burgers(take(&mut sim, 1));
    assert_eq!(reassemble(&got)["/photos/p"], b"2");
    // Dropping /photos from the list: its files are deleted downstream.
    assert!(matches!(replace_mounts(&mut sim, &[(dir.path(), "/")]), Some(Ok(_))));
    let got = burgers(take(&mut sim, 1));
    assert_eq!(
        got.iter().map(|b| (b.filename.as_str(), b.operation)).collect::<Vec<_>>(),
        vec![("/photos/p", Delete)]
    );
    assert_eq!(sim.status()["mounts"].as_array().unwrap().len(), 1);
    assert_eq!(watched(&sim).len(), 1, "the dropped mount is no longer watched");
}

/// A reference model of credit and chunking (docs/protocol/FILEMQ.md "Credit" and
/// "Chunks"): files go in path order; each is cut into chunks of
/// `min(chunk, credit, left)` while there is credit, then an eof marker
/// that costs none. Returns (file, offset, length, eof) as sent after
/// each grant.
fn model_stream(
    files: &[(String, usize)],
    chunk: usize,
    grants: &[u64],
) -> Vec<Vec<(String, u64, usize, u8)>> {
    let mut out = Vec::new();
    let mut credit = 0u64;
    let mut file = 0;
    let mut offset = 0usize;
    let step = |credit: &mut u64, file: &mut usize, offset: &mut usize| {
        let mut sent = Vec::new();
        while let Some((name, size)) = files.get(*file) {
            if *offset == *size {
                sent.push((format!("/{name}"), *size as u64, 0, 1));
                *file += 1;
                *offset = 0;
                continue;
            }
            if *credit == 0 {
                break;
            }
            let len = (chunk as u64).min(*credit).min((*size - *offset) as u64) as usize;
            sent.push((format!("/{name}"), *offset as u64, len, 0));
            *credit -= len as u64;
            *offset += len;
        }
        sent
    };
    // ICANHAZ-OK comes first; files that need no credit go at once.
    out.push(step(&mut credit, &mut file, &mut offset));
    for grant in grants {
        credit += grant;
        out.push(step(&mut credit, &mut file, &mut offset));
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// The service sends exactly what the model says, grant after grant.
    #[test]
    fn credit_and_chunking_follow_the_model(
        sizes in proptest::collection::vec(0usize..5000, 1..6),
        grants in proptest::collection::vec(0u64..4000, 0..20),
    ) {
        let files: Vec<(String, usize)> = sizes.iter().enumerate().map(|(i, s)| (format!("f{i}"), *s)).collect();
        let data: Vec<(String, Vec<u8>)> =
            files.iter().map(|(name, size)| (name.clone(), vec![b'x'; *size])).collect();
        let refs: Vec<(&str, &[u8])> = data.iter().map(|(n, d)| (n.as_str(), d.as_slice())).collect();
        let config = Config { chunk_size: 1000, ..config() };
        let (_dir, mut sim) = world_with(&refs, config);
        let expected = model_stream(&files, 1000, &grants);
        send(&mut sim, 1, ohai());
        take(&mut sim, 1);
        send(&mut sim, 1, icanhaz("/", &[("RESYNC", "1")], &[]));
        let first = take(&mut sim, 1);
        prop_assert_eq!(&first[0], &FilemqMsg::IcanhazOk {});
        let summary = |msgs: Vec<FilemqMsg>| -> Vec<(String, u64, usize, u8)> {
            burgers(msgs).into_iter().map(|b| (b.filename, b.offset, b.chunk.len(), b.eof)).collect()
        };
        prop_assert_eq!(summary(first[1..].to_vec()), expected[0].clone());
        for (i, grant) in grants.iter().enumerate() {
            send(&mut sim, 1, nom(*grant));
            prop_assert_eq!(summary(take(&mut sim, 1)), expected[i + 1].clone(), "after grant {}", i);
        }
    }
}

/// What the patch model is told happens, in order.
#[derive(Debug, Clone)]
enum PatchStep {
    /// Write file `n` (new content of `size` bytes), then rescan.
    Put(u8, usize),
    /// Delete file `n` if it exists, then rescan.
    Remove(u8),
    Nom(u64),
}

fn patch_step() -> impl Strategy<Value = PatchStep> {
    prop_oneof![
        3 => (0u8..4, 0usize..3000).prop_map(|(n, s)| PatchStep::Put(n, s)),
        1 => (0u8..4).prop_map(PatchStep::Remove),
        3 => (0u64..2500).prop_map(PatchStep::Nom),
    ]
}

/// A reference model of patches (docs/protocol/FILEMQ.md "Mounts", "Changes",
/// "Deletes", with our fixes) on top
/// of credit and chunking: one queue entry per file (a newer change
/// replaces the queued one in place), a change to the file in transfer
/// abandons it, deletes and eof markers are free.
#[derive(Default)]
struct PatchModel {
    files: BTreeMap<String, usize>,
    queue: VecDeque<String>,
    ops: HashMap<String, bool>,
    /// (name, size, offset)
    current: Option<(String, usize, usize)>,
    credit: u64,
    sent: Vec<(String, Operation, u64, usize, u8)>,
}

impl PatchModel {
    fn change(&mut self, name: &str, create: bool) {
        if self.current.as_ref().is_some_and(|(n, _, _)| n == name) {
            self.current = None;
        }
        if self.ops.insert(name.to_string(), create).is_none() {
            self.queue.push_back(name.to_string());
        }
    }

    fn pump(&mut self) {
        loop {
            if let Some((name, size, offset)) = self.current.clone() {
                if offset == size {
                    self.sent.push((name, Create, size as u64, 0, 1));
                    self.current = None;
                    continue;
                }
                if self.credit == 0 {
                    return;
                }
                let len = 1000u64.min(self.credit).min((size - offset) as u64) as usize;
                self.sent.push((name.clone(), Create, offset as u64, len, 0));
                self.credit -= len as u64;
                self.current = Some((name, size, offset + len));
                continue;
            }
            let Some(name) = self.queue.pop_front() else { return };
            let Some(create) = self.ops.remove(&name) else { continue };
            if !create {
                self.sent.push((name, Delete, 0, 0, 0));
            } else if let Some(size) = self.files.get(&name) {
                self.current = Some((name, *size, 0));
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Files created, rewritten and deleted while credit comes and goes: a
    /// plain subscriber gets exactly the stream the patch model predicts.
    #[test]
    fn patches_follow_the_model(steps in proptest::collection::vec(patch_step(), 1..40)) {
        let config = Config { chunk_size: 1000, ..config() };
        let (dir, mut sim) = world_with(&[], config);
        send(&mut sim, 1, ohai());
        send(&mut sim, 1, icanhaz("/", &[], &[]));
        take(&mut sim, 1);
        let mut model = PatchModel::default();
        let mut version = 0u8;
        for step in &steps {
            match step {
                PatchStep::Put(n, size) => {
                    let name = format!("/f{n}");
                    version = version.wrapping_add(1);
                    // Content unique to this version: never the one the client holds.
                    let mut data = vec![version; *size];
                    data.extend_from_slice(&[version, *n, 0xAB]);
                    write(dir.path(), &name[1..], &data);
                    trigger_rescan(&mut sim);
                    model.files.insert(name.clone(), data.len());
                    model.change(&name, true);
                }
                PatchStep::Remove(n) => {
                    let name = format!("/f{n}");
                    if model.files.remove(&name).is_none() {
                        continue;
                    }
                    fs::remove_file(dir.path().join(&name[1..])).unwrap();
                    trigger_rescan(&mut sim);
                    model.change(&name, false);
                }
                PatchStep::Nom(grant) => {
                    send(&mut sim, 1, nom(*grant));
                    model.credit += grant;
                }
            }
            model.pump();
            let got: Vec<_> = burgers(take(&mut sim, 1))
                .into_iter()
                .map(|b| (b.filename, b.operation, b.offset, b.chunk.len(), b.eof))
                .collect();
            let want = std::mem::take(&mut model.sent);
            prop_assert_eq!(got, want, "after {:?}", step);
        }
    }
}

/// Moving an alias to another directory (a reloaded config) sends only
/// what differs: no delete for every file first.
#[test]
fn a_mount_moved_to_another_directory_sends_only_the_difference() {
    let (dir, mut sim) = world(&[("same", b"kept"), ("old-only", b"x")]);
    let got = burgers(subscribe(&mut sim, 1, "/", &[("RESYNC", "1")], 1_000_000));
    assert_eq!(reassemble(&got).len(), 2);
    let other = tempfile::tempdir().unwrap();
    write(other.path(), "same", b"kept");
    write(other.path(), "new-only", b"y");
    let _ = dir;
    let reply = replace_mounts(&mut sim, &[(other.path(), "/")]);
    assert!(matches!(&reply, Some(Ok(m)) if m.text.contains("1 moved")), "{reply:?}");
    let got = burgers(take(&mut sim, 1));
    let ops: Vec<_> = got.iter().map(|b| (b.filename.as_str(), b.operation, b.eof)).collect();
    assert_eq!(ops, vec![("/new-only", Create, 0), ("/new-only", Create, 1), ("/old-only", Delete, 0)]);
    assert_eq!(watched(&sim).len(), 1);
}
