//! The FILEMQ service's state machine, driven by `sim::Sim` over a real
//! published directory (made once per process; the sim runs disk jobs
//! inline, or holds them back when told): arbitrary sequences of client
//! messages (well-formed, any message, older generations' OHAI, garbage
//! frames) from four connections, a simulated clock, disconnects, held
//! disk work, mount-list reloads and shutdown.
//!
//! Invariants, after every step:
//! - no panic (overflow checks and debug assertions are on);
//! - every frame the service sends decodes with `FilemqMsg`, re-encodes to
//!   the same bytes, and is a server message;
//! - CHEEZBURGERs are well-formed: only after OHAI-OK, sequence numbers
//!   consecutive from 0 in each session; a delete has clean fields; an
//!   in-sync marker is an empty eof chunk with `X-SYNCED`; a data chunk is
//!   at most `chunk_size`, within the credit granted, and is exactly the
//!   published file's bytes at that offset; an eof marker's offset is the
//!   file's size; `X-SHA1`/`X-SIZE` headers match the file;
//! - memory is bounded: no connection holds more than `max_credit`, and a
//!   connection's patch queue is at most (aliases × published files) +
//!   its subscriptions + the cache entries it sent; no more connections
//!   have state than peers exist; chunk reads in flight stay within the
//!   memory budget (a few chunks);
//! - `refusal` is a frame that decodes.
//!
//! At the end every peer disconnects and held work runs: no connection,
//! read in flight, budgeted byte or connection timer is left.

#![no_main]

use arbitrary::Arbitrary;
use bytes::Bytes;
// Without cargo-fuzz, `tests/tests/fuzz_corpus.rs` supplies the macro.
#[cfg(fuzzing)]
use libfuzzer_sys::fuzz_target;
use sha1::{Digest as _, Sha1};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;
use zbroker_proto::codec::{Chunk, Hash, LongStr, ShortStr};
use zbroker_proto::filemq::{
    FilemqMsg as M,
    Operation::{self, Create, Delete},
};
use zbroker_proto::vpath::covers;
use zbroker_services::budget::Budget;
use zbroker_services::filemq::command::{Command as FilemqCommand, ConfigMount};
use zbroker_services::filemq::executor::DiskExecutor;
use zbroker_services::filemq::{Config, Filemq};
use zbroker_services::sim::Sim;
use zbroker_services::Service;

/// SIGHUP's reload of a config publishing `root` under each of `aliases`.
fn replace_mounts(root: &str, aliases: &[&str]) -> zbroker_services::Command {
    let list = aliases
        .iter()
        .map(|alias| ConfigMount { dir: PathBuf::from(root), alias: alias.to_string() })
        .collect();
    Box::new(FilemqCommand::ReplaceMounts(list))
}

const CONNS: u64 = 4;
const CHUNK_SIZE: usize = 16;
const MAX_CREDIT: u64 = 200;
/// Room for two and a half chunks: subscribers wait for each other.
const BUDGET: usize = 40;

/// The published tree: relative path → contents.
const FILES: &[(&str, &[u8])] = &[
    ("a/b", b"hello"),
    ("a/c", &[0; 0]), // replaced by `contents` below with 300 numbered bytes
    ("d", b""),
    ("e", b"forty bytes of text in one little file.\n"),
    ("x/y", b"twenty bytes of data"),
];

/// Aliases the `Step::Mounts` reload may publish the tree under.
const ALIASES: [&str; 3] = ["/", "/x", "/a"];

const PATHS: &[&str] =
    &["/", "/a", "/a/b", "/x", "/x/y", "/a/a", "/e", "/nope", "a", "/a/../b", "//", "/a/", "/x/a/c", ""];

const CACHE_KEYS: &[&str] =
    &["b", "/a/b", "a/c", "/a/c", "c", "/e", "e", "/x/y", "y", "/gone", "../e", "/x/a/b", "/a/a/c"];

struct Tree {
    root: PathBuf,
    files: BTreeMap<String, Vec<u8>>,
    /// SHA-1 of each file (upper-case hex), in `files` order, then junk.
    digests: Vec<String>,
}

fn contents(rel: &str, data: &[u8]) -> Vec<u8> {
    if rel == "a/c" {
        (0..300u32).map(|i| (i * 7 % 251) as u8).collect()
    } else {
        data.to_vec()
    }
}

fn sha1_hex(data: &[u8]) -> String {
    Sha1::digest(data).iter().map(|b| format!("{b:02X}")).collect()
}

fn tree() -> &'static Tree {
    static TREE: OnceLock<Tree> = OnceLock::new();
    TREE.get_or_init(|| {
        let root = std::env::temp_dir().join(format!("zbroker-fuzz-filemq-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let mut files = BTreeMap::new();
        for (rel, data) in FILES {
            let data = contents(rel, data);
            let path = root.join(rel);
            std::fs::create_dir_all(path.parent().expect("has a parent")).expect("mkdir");
            std::fs::write(&path, &data).expect("write");
            files.insert(rel.to_string(), data);
        }
        let mut digests: Vec<String> = files.values().map(|d| sha1_hex(d)).collect();
        digests.push("A9993E364706816ABA3E25717850C26C9CD0D89D".into());
        digests.push(digests[0].to_ascii_lowercase());
        digests.push("not a digest".into());
        Tree { root, files, digests }
    })
}

#[derive(Arbitrary, Debug)]
enum Step {
    Ohai {
        conn: u8,
    },
    /// OHAI of an older generation or with a wrong name or version.
    BadOhai {
        conn: u8,
        kind: u8,
    },
    Icanhaz {
        conn: u8,
        path: u8,
        resync: bool,
        extended: bool,
        cache: Vec<(u8, u8)>,
        resume: Option<Vec<(u8, u16)>>,
    },
    Nom {
        conn: u8,
        credit: u16,
    },
    Hugz {
        conn: u8,
    },
    HugzOk {
        conn: u8,
    },
    Kthxbai {
        conn: u8,
    },
    /// Any message, server messages included, with arbitrary fields.
    Msg {
        conn: u8,
        id: u8,
        text: Vec<u8>,
        a: u64,
        b: u64,
    },
    /// Bytes behind a FILEMQ signature (as the reactor routes them).
    Raw {
        conn: u8,
        bytes: Vec<u8>,
    },
    Disconnect {
        conn: u8,
    },
    Advance {
        ms: u16,
    },
    /// Hold disk work back (reads in flight across other events), or
    /// release it and run what piled up.
    HoldWork(bool),
    /// Reload the mount list: the tree under the aliases in the bit mask.
    Mounts(u8),
    /// Publish a directory that does not exist.
    PublishMissing,
    Shutdown,
}

fn conn(c: u8) -> u64 {
    c as u64 % CONNS
}

fn short(mut t: Vec<u8>) -> ShortStr {
    t.truncate(ShortStr::MAX);
    ShortStr::new(t).expect("at most 255 bytes")
}

fn hash(entries: &[(&str, Vec<u8>)]) -> Hash {
    let mut h = Hash::default();
    for (k, v) in entries {
        h.insert(k, Bytes::from(v.clone())).expect("short key");
    }
    h
}

fn any_msg(id: u8, text: Vec<u8>, a: u64, b: u64) -> M {
    let long = |t: &[u8]| LongStr(Bytes::copy_from_slice(t));
    let split = text.len() / 2;
    let pairs =
        |t: &[u8]| Hash(t.chunks(7).map(|c| (short(c[..c.len().min(3)].to_vec()), long(c))).collect());
    match id % 11 {
        0 => M::Ohai { protocol: short(text), version: a as u16 },
        1 => M::OhaiOk {},
        2 => M::Icanhaz {
            path: long(&text[..split]),
            options: pairs(&text[split..]),
            cache: pairs(&text[..split]),
        },
        3 => M::IcanhazOk {},
        4 => M::Nom { credit: a, sequence: b },
        5 => M::Cheezburger {
            sequence: a,
            operation: match b as u8 {
                1 => Create,
                2 => Delete,
                code => Operation::Other(code),
            },
            filename: long(&text[..split]),
            offset: b >> 8,
            eof: (a >> 8) as u8,
            headers: Hash::default(),
            chunk: Chunk(Bytes::copy_from_slice(&text[split..])),
        },
        6 => M::Hugz {},
        7 => M::HugzOk {},
        8 => M::Kthxbai {},
        9 => M::Srsly { reason: short(text) },
        _ => M::Rtfm { reason: short(text) },
    }
}

#[derive(Default, Clone)]
struct Peer {
    /// Most credit the service may hold for this peer (our model).
    credit: u64,
    /// The next CHEEZBURGER sequence number, once OHAI-OK came.
    sequence: Option<u64>,
    /// Cache entries sent in all ICANHAZ (bounds the deletes it may get).
    cache_entries: usize,
}

struct World {
    sim: Sim<Filemq>,
    peers: Vec<Peer>,
    budget: Budget,
}

/// The published files a virtual path may name, under any alias.
fn candidates<'a>(tree: &'a Tree, vpath: &'a str) -> impl Iterator<Item = (&'a str, &'a [u8])> + 'a {
    ALIASES.iter().filter_map(move |alias| {
        if !covers(alias, vpath) || vpath == *alias {
            return None;
        }
        let rel = if *alias == "/" { &vpath[1..] } else { &vpath[alias.len() + 1..] };
        tree.files.get_key_value(rel).map(|(k, v)| (k.as_str(), v.as_slice()))
    })
}

impl World {
    fn send_frame(&mut self, c: u64, frame: Vec<u8>) {
        let peer = &mut self.peers[c as usize];
        match M::decode(frame.clone()) {
            Ok(M::Nom { credit, .. }) => peer.credit = peer.credit.saturating_add(credit).min(MAX_CREDIT),
            Ok(M::Ohai { protocol, version: 2 }) if protocol.as_bytes() == b"FILEMQ" => peer.credit = 0,
            Ok(M::Icanhaz { cache, .. }) => peer.cache_entries += cache.len(),
            _ => {}
        }
        let refusal = self.sim.service.refusal(&frame, "the broker is at its connection limit");
        if let Some(refusal) = refusal {
            M::decode(refusal).expect("a refusal decodes");
        }
        self.sim.send_raw(c, frame);
    }

    fn send(&mut self, c: u64, msg: M) {
        self.send_frame(c, msg.encode());
    }

    fn drain(&mut self) {
        let tree = tree();
        for c in 0..CONNS {
            for frame in self.sim.take_raw(c) {
                let msg =
                    M::decode(frame.clone()).unwrap_or_else(|e| panic!("a sent frame does not decode: {e}"));
                assert_eq!(msg.encode(), frame, "not canonical: {msg:?}");
                let peer = &mut self.peers[c as usize];
                match msg {
                    M::OhaiOk {} => peer.sequence = Some(0),
                    M::IcanhazOk {} | M::HugzOk {} | M::Kthxbai {} | M::Srsly { .. } | M::Rtfm { .. } => {}
                    M::Ohai { .. } | M::Icanhaz { .. } | M::Nom { .. } | M::Hugz {} => {
                        panic!("the service sent a client message: {msg:?}")
                    }
                    M::Cheezburger { sequence, operation, filename, offset, eof, headers, chunk } => {
                        let next = peer.sequence.as_mut().expect("a CHEEZBURGER before OHAI-OK");
                        assert_eq!(sequence, *next, "sequence gap on {c}");
                        *next += 1;
                        let name = filename.to_string_lossy();
                        let chunk = &chunk.0;
                        match operation {
                            Delete => {
                                assert!(!name.is_empty() && offset == 0 && eof == 0, "unclean delete");
                                assert!(headers.is_empty() && chunk.is_empty(), "unclean delete");
                            }
                            Create if name.is_empty() => {
                                assert!(eof == 1 && offset == 0 && chunk.is_empty(), "bad marker");
                                assert!(headers.get("X-SYNCED").is_some(), "marker without X-SYNCED");
                            }
                            Create => {
                                let len = chunk.len() as u64;
                                assert!(len as usize <= CHUNK_SIZE, "chunk of {len} bytes");
                                assert!(
                                    len <= peer.credit,
                                    "chunk of {len} bytes beyond credit {}",
                                    peer.credit
                                );
                                peer.credit -= len;
                                assert!(eof == 0 || chunk.is_empty(), "eof with data");
                                let ok = candidates(tree, &name).any(|(rel, data)| {
                                    let end = offset.checked_add(len);
                                    let bytes_ok = if eof == 1 {
                                        offset == data.len() as u64
                                    } else {
                                        end.is_some_and(|end| end <= data.len() as u64)
                                            && &data[offset as usize..(offset + len) as usize]
                                                == chunk.as_ref()
                                    };
                                    let sha_ok = headers
                                        .get("X-SHA1")
                                        .is_none_or(|d| d.as_bytes() == sha1_hex(data).as_bytes());
                                    let size_ok = headers
                                        .get("X-SIZE")
                                        .is_none_or(|s| s.as_bytes() == data.len().to_string().as_bytes());
                                    let _ = rel;
                                    bytes_ok && sha_ok && size_ok
                                });
                                assert!(
                                    ok,
                                    "chunk of {name} at {offset} (eof {eof}, {len} bytes) is not the file's"
                                );
                            }
                            other => panic!("operation {other:?}"),
                        }
                    }
                }
            }
        }
    }

    fn check_bounds(&self) {
        let s = &self.sim.service;
        assert!(s.connections() <= CONNS as usize);
        let used = self.budget.used();
        assert!(used <= BUDGET, "{used} bytes of reads in flight, over the budget of {BUDGET}");
        assert!(
            used <= s.reads_in_flight() * CHUNK_SIZE,
            "{used} bytes budgeted for {} reads",
            s.reads_in_flight()
        );
        // Every entry a mount publishes may be queued: its files and
        // directories (a directory entry is queued, then sent as nothing,
        // to a connection without attributes).
        let dirs: std::collections::BTreeSet<&str> =
            tree().files.keys().filter_map(|rel| rel.rsplit_once('/').map(|(dir, _)| dir)).collect();
        let most_files = ALIASES.len() * (tree().files.len() + dirs.len());
        for (id, queued, subscriptions, credit) in s.queue_lengths() {
            assert!(credit <= MAX_CREDIT, "credit {credit}");
            let peer = &self.peers[id.0 as usize];
            assert!(credit <= peer.credit, "credit {credit} beyond the {} granted", peer.credit);
            let bound = most_files + subscriptions + peer.cache_entries;
            assert!(queued <= bound, "{queued} patches queued on {} (bound {bound})", id.0);
        }
    }
}

fuzz_target!(|steps: Vec<Step>| {
    let tree = tree();
    let root = tree.root.to_str().expect("a UTF-8 temp dir");
    let config = Config {
        expiry: Duration::from_millis(2000),
        chunk_size: CHUNK_SIZE,
        stable_age: Duration::ZERO,
        max_subscriptions: 6,
        max_credit: MAX_CREDIT,
        budget: Budget::new(BUDGET),
        // Small: RESYNCs of the fuzzed tree are walked off the loop too.
        resync_inline: 4,
        ..Config::default()
    };
    let budget = config.budget.clone();
    let mut w = World {
        sim: Sim::with_executor(Filemq::new(config), std::sync::Arc::new(DiskExecutor::recording())),
        peers: vec![Peer::default(); CONNS as usize],
        budget: budget.clone(),
    };
    // A config mount, which `Step::Mounts` replaces.
    let reply = w.sim.execute(replace_mounts(root, &["/"]));
    assert!(matches!(reply, Some(Ok(_))), "{reply:?}");
    for step in steps.into_iter().take(300) {
        match step {
            Step::Ohai { conn: c } => {
                w.send(conn(c), M::Ohai { protocol: ShortStr::lossy("FILEMQ"), version: 2 })
            }
            Step::BadOhai { conn: c, kind } => {
                let mut frame = b"\xAA\xA3\x01\x06FILEMQ".to_vec();
                match kind % 4 {
                    0 => frame.push(1),
                    1 => frame.extend([0, 1]),
                    2 => frame.extend([0, 3]),
                    _ => frame[9] = b'X',
                }
                if kind % 4 == 3 {
                    frame.extend([0, 2]);
                }
                w.send_frame(conn(c), frame)
            }
            Step::Icanhaz { conn: c, path, resync, extended, cache, resume } => {
                let mut options = Vec::new();
                if resync {
                    options.push(("RESYNC", b"1".to_vec()));
                }
                if extended {
                    options.push(("X-ZBROKER", b"1".to_vec()));
                }
                if let Some(resume) = resume {
                    let lines: Vec<String> = resume
                        .iter()
                        .map(|(d, off)| format!("{} {off}\n", tree.digests[*d as usize % tree.digests.len()]))
                        .collect();
                    options.push(("X-RESUME", lines.concat().into_bytes()));
                }
                let cache: Vec<(&str, Vec<u8>)> = cache
                    .iter()
                    .take(16)
                    .map(|(k, d)| {
                        let digest = &tree.digests[*d as usize % tree.digests.len()];
                        (CACHE_KEYS[*k as usize % CACHE_KEYS.len()], digest.clone().into_bytes())
                    })
                    .collect();
                let path = PATHS[path as usize % PATHS.len()];
                w.send(
                    conn(c),
                    M::Icanhaz { path: path.into(), options: hash(&options), cache: hash(&cache) },
                )
            }
            Step::Nom { conn: c, credit } => w.send(conn(c), M::Nom { credit: credit as u64, sequence: 0 }),
            Step::Hugz { conn: c } => w.send(conn(c), M::Hugz {}),
            Step::HugzOk { conn: c } => w.send(conn(c), M::HugzOk {}),
            Step::Kthxbai { conn: c } => w.send(conn(c), M::Kthxbai {}),
            Step::Msg { conn: c, id, text, a, b } => w.send(conn(c), any_msg(id, text, a, b)),
            Step::Raw { conn: c, bytes } => {
                let mut frame = vec![0xAA, 0xA3];
                frame.extend(bytes);
                w.send_frame(conn(c), frame)
            }
            Step::Disconnect { conn: c } => w.sim.disconnect(conn(c)),
            Step::Advance { ms } => w.sim.advance(Duration::from_millis(ms as u64)),
            Step::HoldWork(hold) => {
                w.sim.hold_work = hold;
                if !hold {
                    w.sim.run_work();
                }
            }
            Step::Mounts(mask) => {
                let aliases: Vec<&str> = ALIASES
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| mask & (1 << i) != 0)
                    .map(|(_, a)| *a)
                    .collect();
                let reply = w.sim.execute(replace_mounts(root, &aliases));
                assert!(matches!(reply, Some(Ok(_))), "{reply:?}");
            }
            Step::PublishMissing => {
                let missing = format!("{root}-missing");
                let _ = w.sim.command(&["PUBLISH", &missing, "/missing"]);
            }
            Step::Shutdown => w.sim.shutdown(),
        }
        w.drain();
        w.check_bounds();
    }
    for c in 0..CONNS {
        w.sim.disconnect(c);
    }
    w.sim.hold_work = false;
    w.sim.run_work();
    w.drain();
    let s = &w.sim.service;
    assert_eq!(s.connections(), 0, "connections leaked");
    assert_eq!(s.reads_in_flight(), 0, "reads outlived their connections");
    assert_eq!((budget.used(), budget.waiting()), (0, 0), "the budget leaked");
    assert!(
        w.sim.armed_timers() <= s.mount_count(),
        "timers leaked: {} for {} mounts",
        w.sim.armed_timers(),
        s.mount_count()
    );
});
