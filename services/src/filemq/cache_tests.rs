//! Large ICANHAZ caches off the loop, and frames sized by their header.

use super::tests::{hash, icanhaz, nom, ohai, send, sha1_hex, take, world};
use super::*;

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
    let deletes = replies.iter().filter_map(name).filter(|(op, _, _)| *op == DELETE).count();
    assert_eq!(deletes, 10_000, "a delete for every cached file no longer published");
    let created: Vec<String> = replies
        .iter()
        .filter_map(name)
        .filter(|(op, _, eof)| *op == CREATE && *eof == 1)
        .map(|n| n.1)
        .collect();
    assert_eq!(created, ["/b.txt"], "what the cache lists is not sent again");
    let hugz = replies.iter().position(|m| *m == FilemqMsg::HugzOk {}).expect("HUGZ answered");
    assert!(hugz > 0);
    assert_eq!(sim.service.status()["malformed_frames"], 0);
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
    assert_eq!(sim.service.status()["malformed_frames"], 1);
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
    assert_eq!(sim.service.status()["malformed_frames"], 2);
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
    assert_eq!(cache::digest(DIGEST), cache::digest(&DIGEST.to_lowercase()));

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
