//! Large ICANHAZ caches off the loop, and frames sized by their header.

use super::tests::{config, hash, icanhaz, nom, ohai, send, sha1_hex, take, world, world_with};
use super::*;
use crate::sim::Sim;
use crate::Service as _;
use zbroker_proto::filemq::Operation::{Create, Delete};

const DIGEST: &str = "A9993E364706816ABA3E25717850C26C9CD0D89D";

/// A cache of `gone` files that are not published, plus `held`.
fn big_cache(gone: usize, held: &[(&str, &str)]) -> Hash {
    let mut cache = hash(held);
    for i in 0..gone {
        cache.insert(&format!("gone/file-{i:06}.dat"), DIGEST).unwrap();
    }
    cache
}

#[test]
fn a_large_cache_is_prepared_off_the_loop_and_later_frames_wait_in_order() {
    let (_dir, mut sim) = world(&[("a.txt", b"alpha"), ("b.txt", b"bravo")]);
    send(&mut sim, 1, ohai());
    assert_eq!(take(&mut sim, 1), vec![FilemqMsg::OhaiOk {}]);
    sim.hold_work = true;
    let a = sha1_hex(b"alpha");
    let cache = big_cache(10_000, &[("a.txt", &a)]);
    let msg = FilemqMsg::Icanhaz { path: "/".into(), options: hash(&[("RESYNC", "1")]), cache };
    assert!(msg.encoded_len() > cache::INLINE_BYTES);
    send(&mut sim, 1, msg);
    send(&mut sim, 1, nom(1 << 20));
    send(&mut sim, 1, FilemqMsg::Hugz {});
    assert_eq!(take(&mut sim, 1), vec![], "everything waits for the prepared cache");
    assert_eq!(sim.pending_work(), 1);

    sim.run_work();
    let queued = sim.service.conns[&ConnId(1)].queue.len();
    assert!(queued < 10, "the deletes are handed over as one queue entry, not {queued}");
    let mut replies = take(&mut sim, 1);
    // Ten thousand deletes go out a batch per loop pass.
    for _ in 0..20 {
        sim.advance(Duration::ZERO);
        replies.extend(take(&mut sim, 1));
    }
    assert_eq!(replies.first(), Some(&FilemqMsg::IcanhazOk {}), "{:?}", &replies[..2]);
    let name = |m: &FilemqMsg| match m {
        FilemqMsg::Cheezburger { operation, filename, eof, .. } => {
            Some((*operation, filename.to_string_lossy(), *eof))
        }
        _ => None,
    };
    let deletes = replies.iter().filter_map(name).filter(|(op, _, _)| *op == Delete).count();
    assert_eq!(deletes, 10_000, "a delete for every cached file no longer published");
    let created: Vec<String> = replies
        .iter()
        .filter_map(name)
        .filter(|(op, _, eof)| *op == Create && *eof == 1)
        .map(|n| n.1)
        .collect();
    assert_eq!(created, ["/b.txt"], "what the cache lists is not sent again");
    let hugz = replies.iter().position(|m| *m == FilemqMsg::HugzOk {}).expect("HUGZ answered");
    assert!(hugz > 0);
    assert_eq!(sim.status()["malformed_frames"], 0);
}

#[test]
fn a_malformed_large_icanhaz_is_dropped_and_the_frames_behind_it_go_on() {
    let (_dir, mut sim) = world(&[("a.txt", b"alpha")]);
    send(&mut sim, 1, ohai());
    let _ = take(&mut sim, 1);
    let mut frame =
        FilemqMsg::Icanhaz { path: "/".into(), options: Hash::default(), cache: big_cache(10_000, &[]) }
            .encode();
    frame.truncate(frame.len() - 10);
    sim.send_raw(1, frame);
    send(&mut sim, 1, FilemqMsg::Hugz {});
    assert_eq!(take(&mut sim, 1), vec![FilemqMsg::HugzOk {}]);
    assert_eq!(sim.status()["malformed_frames"], 1);
}

#[test]
fn too_much_sent_behind_a_large_cache_ends_the_connection() {
    let (_dir, mut sim) = world(&[]);
    send(&mut sim, 1, ohai());
    let _ = take(&mut sim, 1);
    sim.hold_work = true;
    send(
        &mut sim,
        1,
        FilemqMsg::Icanhaz { path: "/".into(), options: Hash::default(), cache: big_cache(10_000, &[]) },
    );
    for _ in 0..cache::MAX_HELD_FRAMES {
        send(&mut sim, 1, FilemqMsg::Hugz {});
    }
    assert_eq!(take(&mut sim, 1), vec![]);
    send(&mut sim, 1, FilemqMsg::Hugz {});
    let replies = take(&mut sim, 1);
    assert!(matches!(&replies[..], [FilemqMsg::Srsly { .. }]), "{replies:?}");
    assert_eq!(sim.service.connections(), 0);
    sim.run_work();
    assert_eq!(take(&mut sim, 1), vec![], "the late outcome finds nobody");
}

#[test]
fn frames_larger_than_their_message_can_be_are_dropped_unread() {
    let (_dir, mut sim) = world(&[("a.txt", b"alpha")]);
    send(&mut sim, 1, ohai());
    let _ = take(&mut sim, 1);
    send(&mut sim, 1, icanhaz("/", &[], &[]));
    assert_eq!(take(&mut sim, 1), vec![FilemqMsg::IcanhazOk {}]);
    let mut fat_nom = nom(1 << 20).encode();
    fat_nom.extend([0u8; 1000]);
    sim.send_raw(1, fat_nom);
    let mut fat_hugz = FilemqMsg::Hugz {}.encode();
    fat_hugz.extend([0u8; 300]);
    sim.send_raw(1, fat_hugz);
    assert_eq!(take(&mut sim, 1), vec![], "no credit granted, no HUGZ-OK");
    assert_eq!(sim.status()["malformed_frames"], 2);
}

#[test]
fn prepare_reads_an_icanhaz_as_the_codec_declares_it() {
    let valid = FilemqMsg::Icanhaz {
        path: "/x".into(),
        options: hash(&[("RESYNC", "1")]),
        cache: hash(&[("a", DIGEST), ("/x/b", &DIGEST.to_lowercase()), ("../c", DIGEST), ("d", "nothex")]),
    }
    .encode();
    let prepared = cache::prepare(Bytes::from(valid.clone()), &[]).unwrap();
    let known: Vec<&str> = prepared.known.keys().map(String::as_str).collect();
    assert_eq!(known, ["/x/a", "/x/b"]);
    assert_eq!(prepared.stale.as_deref(), Some(&["/x/a".to_string(), "/x/b".to_string()][..]));
    assert_eq!(Digest::parse(DIGEST), Digest::parse(DIGEST.to_lowercase()));

    let mut over =
        FilemqMsg::Icanhaz { path: "/".into(), options: Hash::default(), cache: Hash::default() }.encode();
    let at = over.len() - 4;
    over[at..].copy_from_slice(&12_000_000u32.to_be_bytes());
    over.extend(vec![0u8; 1 << 16]);
    let mut truncated = valid.clone();
    truncated.truncate(valid.len() - 3);
    for frame in [valid, over, truncated] {
        let codec = FilemqMsg::decode(frame.clone()).is_ok();
        assert_eq!(cache::prepare(Bytes::from(frame), &[]).is_ok(), codec);
    }
}

#[test]
fn a_large_icanhaz_before_ohai_is_refused_undecoded() {
    let (_dir, mut sim) = world(&[]);
    sim.hold_work = true;
    send(
        &mut sim,
        1,
        FilemqMsg::Icanhaz { path: "/".into(), options: Hash::default(), cache: big_cache(10_000, &[]) },
    );
    assert_eq!(sim.pending_work(), 0, "nothing decoded for it");
    let replies = take(&mut sim, 1);
    assert!(matches!(&replies[..], [FilemqMsg::Rtfm { .. }]), "{replies:?}");
    assert_eq!(sim.service.connections(), 0);
}

/// The key of the latest ICANHAZ job in flight for `conn`.
fn icanhaz_key(sim: &Sim<Filemq>, conn: u64) -> u64 {
    sim.service
        .work
        .iter()
        .filter(|(_, w)| matches!(w, WorkFor::Icanhaz { conn: c, .. } if c.0 == conn))
        .map(|(k, _)| *k)
        .max()
        .expect("an ICANHAZ job")
}

fn discards(out: &[Action]) -> usize {
    out.iter().filter(|a| matches!(a, Action::Work { job, .. } if matches!(job.downcast_ref::<Job>(), Some(Job::Discard(_))))).count()
}

fn large(path: &str, resync: bool) -> FilemqMsg {
    let options = if resync { hash(&[("RESYNC", "1")]) } else { Hash::default() };
    FilemqMsg::Icanhaz { path: path.into(), options, cache: big_cache(10_000, &[]) }
}

#[test]
fn an_outcome_from_a_forgotten_session_is_not_applied_to_the_next_one() {
    let (_dir, mut sim) = world(&[]);
    send(&mut sim, 1, ohai());
    let _ = take(&mut sim, 1);
    sim.hold_work = true;
    let first = large("/", true).encode();
    sim.send_raw(1, first.clone());
    let first_key = icanhaz_key(&sim, 1);
    for _ in 0..=cache::MAX_HELD_FRAMES {
        send(&mut sim, 1, FilemqMsg::Hugz {});
    }
    assert!(matches!(&take(&mut sim, 1)[..], [FilemqMsg::Srsly { .. }]));
    assert_eq!(sim.service.connections(), 0);
    // The same connection starts over, with another large cache.
    send(&mut sim, 1, ohai());
    assert_eq!(take(&mut sim, 1), vec![FilemqMsg::OhaiOk {}]);
    send(&mut sim, 1, large("/", false));
    let second_key = icanhaz_key(&sim, 1);
    assert_ne!(first_key, second_key);

    // The first job's outcome (a RESYNC: ten thousand deletes) arrives.
    let done = Done::Icanhaz(cache::prepare(Bytes::from(first), &[]));
    let mut out = Vec::new();
    let now = sim.now;
    sim.service.on_work(first_key, Box::new(done), now, &mut out);
    assert_eq!(discards(&out), 1, "the stale outcome is freed off the loop: {out:?}");
    assert!(!out.iter().any(|a| matches!(a, Action::Send { .. })), "nothing sent for it");

    // The second session's own outcome is the one applied.
    sim.run_work();
    let mut replies = take(&mut sim, 1);
    for _ in 0..20 {
        sim.advance(Duration::ZERO);
        replies.extend(take(&mut sim, 1));
    }
    assert_eq!(replies, vec![FilemqMsg::IcanhazOk {}], "no RESYNC asked: no deletes");
    assert_eq!(sim.service.preparing.jobs, 0);
    assert_eq!(sim.service.preparing.bytes, 0);
}

#[test]
fn a_prepared_cache_refused_or_unclaimed_is_freed_off_the_loop() {
    let (_dir, mut sim) = world_with(&[], Config { max_subscriptions: 1, ..config() });
    send(&mut sim, 1, ohai());
    send(&mut sim, 1, icanhaz("/a", &[], &[]));
    assert_eq!(take(&mut sim, 1), vec![FilemqMsg::OhaiOk {}, FilemqMsg::IcanhazOk {}]);
    sim.hold_work = true;
    let frame = large("/b", false).encode();
    sim.send_raw(1, frame.clone());
    let key = icanhaz_key(&sim, 1);
    let mut out = Vec::new();
    let now = sim.now;
    let done = Done::Icanhaz(cache::prepare(Bytes::from(frame.clone()), &[]));
    sim.service.on_work(key, Box::new(done), now, &mut out);
    assert_eq!(discards(&out), 1, "refused (too many subscriptions): freed off the loop");
    assert!(out.iter().any(|a| matches!(a, Action::Send { .. })), "SRSLY sent");

    // The connection goes while its cache is prepared.
    sim.send_raw(1, frame.clone());
    let key = icanhaz_key(&sim, 1);
    sim.disconnect(1);
    let mut out = Vec::new();
    let done = Done::Icanhaz(cache::prepare(Bytes::from(frame), &[]));
    sim.service.on_work(key, Box::new(done), now, &mut out);
    assert_eq!(discards(&out), 1, "nobody to take it: freed off the loop");
    assert_eq!(sim.service.preparing.jobs, 0);
    assert_eq!(sim.service.preparing.bytes, 0);
}

#[test]
fn small_caches_are_decoded_on_the_loop_only_up_to_a_few_hundred_entries() {
    let (_dir, mut sim) = world(&[]);
    send(&mut sim, 1, ohai());
    let _ = take(&mut sim, 1);
    sim.hold_work = true;
    let mut cache = Hash::default();
    for i in 0..400 {
        cache.insert(&format!("f-{i:04}"), DIGEST).unwrap();
    }
    send(&mut sim, 1, FilemqMsg::Icanhaz { path: "/".into(), options: Hash::default(), cache });
    assert_eq!(sim.pending_work(), 1, "four hundred entries go off the loop");
}

#[test]
fn too_many_caches_prepared_at_once_are_answered_busy() {
    let (_dir, mut sim) = world(&[]);
    sim.hold_work = true;
    for conn in 1..=cache::MAX_PREPARING_JOBS as u64 + 1 {
        send(&mut sim, conn, ohai());
        let _ = take(&mut sim, conn);
        send(&mut sim, conn, large("/", false));
    }
    assert_eq!(sim.pending_work(), cache::MAX_PREPARING_JOBS);
    let last = cache::MAX_PREPARING_JOBS as u64 + 1;
    let replies = take(&mut sim, last);
    assert!(
        matches!(&replies[..], [FilemqMsg::Rtfm { reason }] if reason.to_string_lossy().starts_with("busy")),
        "{replies:?}"
    );
    assert_eq!(sim.service.connections(), cache::MAX_PREPARING_JOBS);
    sim.run_work();
    for conn in 1..last {
        assert_eq!(take(&mut sim, conn), vec![FilemqMsg::IcanhazOk {}]);
    }
    assert_eq!(sim.service.preparing.jobs, 0);
    assert_eq!(sim.service.preparing.bytes, 0);
    // Room again: the refused client subscribes on its next session.
    send(&mut sim, last, ohai());
    let _ = take(&mut sim, last);
    send(&mut sim, last, large("/", false));
    sim.run_work();
    assert_eq!(take(&mut sim, last), vec![FilemqMsg::IcanhazOk {}]);
}

#[test]
fn the_entries_under_a_path_are_found_by_key_range() {
    let names = ["/", "/a", "/a-b", "/a/x", "/a/y/z", "/a0", "/ab", "/b", "/a.", "/a/"];
    let known: BTreeMap<String, cache::Holding> =
        names.iter().map(|n| (n.to_string(), cache::Holding::plain(Digest([0u8; 20])))).collect();
    for path in ["/", "/a", "/a/y", "/b", "/c", "/a-b"] {
        let got: Vec<&str> = cache::under(&known, path).map(|(k, _)| k.as_str()).collect();
        let want: Vec<&str> = known.keys().filter(|k| covers(path, k)).map(String::as_str).collect();
        assert_eq!(got, want, "under {path}");
        let mut rest = known.clone();
        cache::remove_under(&mut rest, path);
        let kept: Vec<&str> = rest.keys().map(String::as_str).collect();
        let want: Vec<&str> = known.keys().filter(|k| !covers(path, k)).map(String::as_str).collect();
        assert_eq!(kept, want, "left after removing {path}");
    }
}

#[test]
fn small_caches_after_a_large_one_touch_only_their_own_path() {
    let (_dir, mut sim) = world(&[("other/a.txt", b"alpha")]);
    send(&mut sim, 1, ohai());
    let _ = take(&mut sim, 1);
    send(&mut sim, 1, large("/", false));
    assert_eq!(take(&mut sim, 1), vec![FilemqMsg::IcanhazOk {}]);
    assert_eq!(sim.service.conns[&ConnId(1)].known.len(), 10_000);
    cache::WALKED.with(|w| w.set(0));
    let small = [("x1", DIGEST), ("x2", DIGEST), ("x3", DIGEST)];
    for _ in 0..100 {
        send(&mut sim, 1, icanhaz("/other", &[("RESYNC", "1")], &small));
    }
    let walked = cache::WALKED.with(|w| w.get());
    // Each: the old entries under /other removed, the new ones merged in,
    // those under /other listed for the RESYNC: a few each, never the
    // ten thousand held under /gone.
    assert!(walked <= 100 * 3 * small.len(), "walked {walked} entries");
    // The files listed under /other are not published: deleted, and
    // forgotten once the deletes are sent.
    assert_eq!(sim.service.conns[&ConnId(1)].known.len(), 10_000);
}
