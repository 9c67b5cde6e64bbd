//! RESYNCs walked off the loop (`Job::Resync`): the same frames as a walk
//! on the loop, and the right outcome when the snapshots, the mounts or
//! the connection change while the walk runs.

use super::tests::{config, hash, nom, ohai, send, sha1_hex, take};
use super::*;
use crate::sim::Sim;
use crate::work::{Executor, Lane, Reporter};
use proptest::prelude::*;
use std::fs;
use std::path::Path;
use std::sync::Mutex;

/// FILEMQ's executor (disk work inline, watches recorded), except that a
/// RESYNC's walk runs when asked for but its outcome is parked until the
/// test delivers it: whatever the test does meanwhile happens mid-walk.
struct Parking {
    disk: executor::DiskExecutor,
    parked: Mutex<Vec<(u64, crate::work::Done)>>,
}

impl Executor for Parking {
    fn lanes(&self) -> Vec<Lane> {
        self.disk.lanes()
    }
    fn lane(&self, job: &crate::work::Job) -> usize {
        self.disk.lane(job)
    }
    fn run(
        &self,
        key: u64,
        job: crate::work::Job,
        reporter: &Arc<dyn Reporter>,
    ) -> Option<crate::work::Done> {
        let walk = matches!(job.downcast_ref::<Job>(), Some(Job::Resync(_)));
        let done = self.disk.run(key, job, reporter)?;
        if !walk {
            return Some(done);
        }
        self.parked.lock().unwrap().push((key, done));
        None
    }
}

fn write(root: &Path, rel: &str, data: &[u8]) {
    let path = root.join(rel);
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, data).unwrap();
}

/// A broker publishing a fresh directory holding `files` as `/`, whose
/// RESYNCs all walk off the loop and wait to be delivered.
fn parked_world(files: &[(&str, &[u8])]) -> (tempfile::TempDir, Sim<Filemq>) {
    let dir = tempfile::tempdir().unwrap();
    for (rel, data) in files {
        write(dir.path(), rel, data);
    }
    let parking = Parking { disk: executor::DiskExecutor::recording(), parked: Mutex::default() };
    let mut sim = Sim::with_executor(Filemq::new(Config { resync_inline: 0, ..config() }), Arc::new(parking));
    let mut out = Vec::new();
    sim.service.publish(dir.path().to_path_buf(), "/", sim.now, &mut out).unwrap();
    sim.service.start(sim.now, &mut out);
    sim.run_outcomes(out);
    (dir, sim)
}

trait Outcomes {
    fn run_outcomes(&mut self, out: Vec<Action>);
    fn deliver_parked(&mut self, parked: Vec<(u64, crate::work::Done)>);
    fn parked(&self) -> Vec<(u64, crate::work::Done)>;
    fn rescan(&mut self);
}

impl Outcomes for Sim<Filemq> {
    /// Runs what the service asked for outside a frame (the first scan).
    fn run_outcomes(&mut self, out: Vec<Action>) {
        for action in out {
            if let Action::Work { key, job } = action {
                let reporter: Arc<dyn Reporter> = Arc::new(NoReports);
                let done = self.executor::<Parking>().expect("a parking executor").run(key, job, &reporter);
                if let Some(done) = done {
                    self.deliver(key, done);
                }
            }
        }
    }

    /// Hands the service parked outcomes, then runs the work they lead to
    /// (chunk reads, further walks) and the passes after.
    fn deliver_parked(&mut self, parked: Vec<(u64, crate::work::Done)>) {
        for (key, done) in parked {
            self.deliver(key, done);
        }
        self.run_work();
        for _ in 0..4 {
            self.advance(Duration::ZERO);
        }
    }

    /// The walks' outcomes parked so far.
    fn parked(&self) -> Vec<(u64, crate::work::Done)> {
        std::mem::take(&mut *self.executor::<Parking>().expect("a parking executor").parked.lock().unwrap())
    }

    /// The tree changed: the watch says so and the rescan is delivered.
    fn rescan(&mut self) {
        let watched = self.executor::<Parking>().expect("a parking executor").disk.watched();
        let (mount, key) = watched.into_iter().next().expect("the mount is watched");
        self.deliver(key, Box::new(Done::Dirty { mount }));
        self.advance(Duration::from_millis(100));
    }
}

struct NoReports;
impl Reporter for NoReports {
    fn report(&self, _: u64, _: crate::work::Done) {}
    fn report_once(&self, _: u64, _: u64, _: crate::work::Done) {}
}

const EXTENDED: [(&str, &str); 2] = [("RESYNC", "1"), ("X-ZBROKER", "1")];

fn resync(cache: &[(&str, &str)]) -> FilemqMsg {
    FilemqMsg::Icanhaz { path: "/".into(), options: hash(&EXTENDED), cache: hash(cache) }
}

/// A client's view of what it was sent: the files it ends up with (from
/// `held`), how often each file's content was sent, and where in the
/// stream each in-sync marker and each other CHEEZBURGER came.
#[derive(Debug, Default)]
struct Mirror {
    files: BTreeMap<String, Vec<u8>>,
    sent: BTreeMap<String, usize>,
    markers: Vec<usize>,
    last_entry: Option<usize>,
}

fn mirror(held: &[(&str, &[u8])], msgs: &[FilemqMsg]) -> Mirror {
    let mut m = Mirror {
        files: held.iter().map(|(k, v)| (format!("/{k}"), v.to_vec())).collect(),
        ..Mirror::default()
    };
    let mut partial: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let burgers = msgs.iter().filter(|msg| matches!(msg, FilemqMsg::Cheezburger { .. }));
    for (at, msg) in burgers.enumerate() {
        let FilemqMsg::Cheezburger { operation, filename, eof, headers, chunk, .. } = msg else { continue };
        let name = filename.to_string_lossy();
        if headers.get(ext::SYNCED).is_some() {
            m.markers.push(at);
            continue;
        }
        m.last_entry = Some(at);
        match operation {
            Operation::Delete => {
                m.files.remove(&name);
            }
            Operation::Create => {
                partial.entry(name.clone()).or_default().extend_from_slice(&chunk.0);
                if *eof == 1 {
                    *m.sent.entry(name.clone()).or_default() += 1;
                    m.files.insert(name.clone(), partial.remove(&name).unwrap_or_default());
                }
            }
            other => panic!("the service sent operation {other:?}"),
        }
    }
    m
}

/// RESYNC walks asked for and not yet answered.
fn walking(sim: &Sim<Filemq>) -> usize {
    sim.service.work.values().filter(|w| matches!(w, WorkFor::Resync { .. })).count()
}

fn tree(files: &[(&str, &[u8])]) -> BTreeMap<String, Vec<u8>> {
    files.iter().map(|(k, v)| (format!("/{k}"), v.to_vec())).collect()
}

#[test]
fn a_small_resync_is_walked_on_the_loop_and_a_large_one_off_it() {
    let files: Vec<(String, Vec<u8>)> = (0..30).map(|i| (format!("f{i:02}"), vec![b'x'; i])).collect();
    let files: Vec<(&str, &[u8])> = files.iter().map(|(k, v)| (k.as_str(), v.as_slice())).collect();
    for (limit, walks) in [(30, 0), (29, 1)] {
        let (_dir, mut sim) = super::tests::world_with(&files, Config { resync_inline: limit, ..config() });
        send(&mut sim, 1, ohai());
        let _ = take(&mut sim, 1);
        sim.hold_work = true;
        send(&mut sim, 1, resync(&[]));
        assert_eq!(walking(&sim), walks, "a walk of 30 entries within {limit}");
        let mut got = Vec::new();
        if walks == 1 {
            assert_eq!(take(&mut sim, 1), vec![FilemqMsg::IcanhazOk {}]);
            send(&mut sim, 1, FilemqMsg::Hugz {});
            assert_eq!(take(&mut sim, 1), vec![], "the HUGZ waits for the walk");
            sim.hold_work = false;
            sim.run_work();
            let queued = sim.service.conns[&ConnId(1)].queue.len();
            assert_eq!(queued, 2, "one entry for the creates (the first, empty, sent), one marker");
            got = take(&mut sim, 1);
            assert!(got.contains(&FilemqMsg::HugzOk {}));
        }
        sim.hold_work = false;
        send(&mut sim, 1, nom(1 << 20));
        for _ in 0..4 {
            sim.advance(Duration::ZERO);
        }
        got.extend(take(&mut sim, 1));
        let m = mirror(&[], &got);
        assert_eq!(m.files, tree(&files));
        assert_eq!(m.markers.len(), 1);
        assert!(m.markers[0] > m.last_entry.unwrap(), "the marker comes last");
    }
}

/// A tree, a second mount inside it, what the client holds, its
/// exclusions and capabilities: everything a RESYNC's walk depends on.
#[derive(Debug, Clone)]
struct Case {
    files: Vec<(String, u8)>,
    nested: bool,
    /// Per file: 0 not held, 1 held as published, 2 held with other content.
    held: Vec<u8>,
    unpublished_held: Vec<String>,
    excludes: Vec<&'static str>,
    caps: u8,
    path: &'static str,
}

fn case() -> impl Strategy<Value = Case> {
    let name = prop::sample::select(vec![
        "a", "b.log", "d/c", "d/e.log", "d/f/g", "in/h", "in/i.log", "in/j/k", "x-y",
    ]);
    let files = prop::collection::btree_map(name, any::<u8>(), 0..9)
        .prop_map(|m| m.into_iter().map(|(k, v)| (k.to_string(), v)).collect::<Vec<_>>());
    let pattern = prop::sample::select(vec!["*.log", "d/", "!d/c", "/in/j", "**/g", "?"]);
    (
        files,
        any::<bool>(),
        prop::collection::vec(0u8..3, 9),
        prop::collection::vec(prop::sample::select(vec!["gone", "d/gone", "in/gone", "z/z"]), 0..3),
        prop::collection::vec(pattern, 0..3),
        prop::sample::select(vec![0u8, ext::META, ext::EXCLUDE, ext::META | ext::EXCLUDE]),
        prop::sample::select(vec!["/", "/d", "/in"]),
    )
        .prop_map(|(files, nested, held, unpublished_held, excludes, caps, path)| Case {
            files,
            nested,
            held,
            unpublished_held: unpublished_held.into_iter().map(String::from).collect(),
            excludes,
            caps,
            path,
        })
}

/// Every frame a client gets for `case` from a broker walking RESYNCs of
/// more than `limit` entries off the loop (the same tree rebuilt each
/// time), and how many walks went off the loop.
fn run(case: &Case, dir: &Path, inner: &Path, limit: usize) -> (Vec<Vec<u8>>, usize) {
    let mut sim = super::tests::sim_of(Filemq::new(Config { resync_inline: limit, ..config() }));
    let mut mounts = vec![(dir, "/")];
    if case.nested {
        mounts.push((inner, "/in"));
    }
    assert!(matches!(super::tests::replace_mounts(&mut sim, &mounts), Some(Ok(_))));
    let mut cache = Vec::new();
    for (i, (rel, byte)) in case.files.iter().enumerate() {
        let content = match case.held[i] {
            1 => [*byte; 3].to_vec(),
            2 => b"other".to_vec(),
            _ => continue,
        };
        cache.push((format!("/{rel}"), sha1_hex(&content)));
    }
    for rel in &case.unpublished_held {
        cache.push((format!("/{rel}"), sha1_hex(b"old")));
    }
    let cache: Vec<(&str, &str)> = cache.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let excludes = case.excludes.join("\n");
    let mut options = EXTENDED.to_vec();
    if !case.excludes.is_empty() {
        options.push((ext::EXCLUDE_OPTION, excludes.as_str()));
    }
    sim.send_raw(1, filemq_ext::encode_with_bits(&ohai(), case.caps));
    let mut walks = 0;
    // Two RESYNCs, the second from the state the first left.
    for resync in 0..2 {
        if resync > 0 {
            send(&mut sim, 1, nom(1 << 20));
        }
        sim.hold_work = true;
        send(
            &mut sim,
            1,
            FilemqMsg::Icanhaz { path: case.path.into(), options: hash(&options), cache: hash(&cache) },
        );
        walks += walking(&sim);
        sim.run_work();
        sim.hold_work = false;
    }
    for _ in 0..4 {
        sim.advance(Duration::ZERO);
    }
    (sim.take_raw(1), walks)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Whatever the tree, mounts, holdings, exclusions and capabilities,
    /// a RESYNC walked off the loop sends exactly the frames, in the same
    /// order, that the same RESYNC walked on the loop does.
    #[test]
    fn off_the_loop_sends_what_on_the_loop_sends(case in case()) {
        let (dir, inner) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        for (rel, byte) in &case.files {
            write(dir.path(), rel, &[*byte; 3]);
            // The inner mount serves /in with other content.
            if let Some(rest) = rel.strip_prefix("in/") {
                write(inner.path(), rest, &[byte.wrapping_add(1); 2]);
            }
        }
        let (inline, walked_inline) = run(&case, dir.path(), inner.path(), usize::MAX);
        let (off_loop, walked_off) = run(&case, dir.path(), inner.path(), 0);
        prop_assert_eq!(walked_inline, 0);
        // A walk that looks at nothing stays on the loop even at 0.
        prop_assert!(walked_off <= 2);
        prop_assert_eq!(inline, off_loop);
    }
}

#[test]
fn the_walk_of_each_mount_is_the_rule_of_resolve() {
    // What `walk` finds on its own agrees with the walk the service made
    // before it could be done off the loop: a subscription's view.
    let (_dir, mut sim) = super::tests::world(&[("a", b"1"), ("d/b", b"2"), ("d-c", b"3"), ("d0", b"4")]);
    send(&mut sim, 1, ohai());
    send(
        &mut sim,
        1,
        FilemqMsg::Icanhaz { path: "/d".into(), options: Hash::default(), cache: Hash::default() },
    );
    let views = sim.service.views();
    let found = scans::walk("/d", &views, None, false, &BTreeMap::new(), true, usize::MAX).unwrap();
    assert_eq!(found.creates, ["/d/b"]);
    assert_eq!(scans::walk("/d", &views, None, false, &BTreeMap::new(), true, 0), None, "over the limit");
    let held: BTreeMap<String, cache::Holding> = [("/d/gone", "A9993E364706816ABA3E25717850C26C9CD0D89D")]
        .iter()
        .map(|(k, v)| {
            (k.to_string(), cache::Holding::plain(zbroker_proto::digest::Digest::parse(v).unwrap()))
        })
        .collect();
    let found = scans::walk("/d", &views, None, false, &held, true, usize::MAX).unwrap();
    assert_eq!(found.stale, ["/d/gone"]);
}

#[test]
fn a_scan_during_the_walk_is_applied_as_if_it_came_first() {
    let files: [(&str, &[u8]); 4] = [("a", b"alpha"), ("b", b"bravo"), ("c", b"charlie"), ("keep", b"kept")];
    let (dir, mut sim) = parked_world(&files);
    send(&mut sim, 1, ohai());
    let _ = take(&mut sim, 1);
    // It holds `a` and `keep` as published, `b` stale, and `gone`.
    let held: [(&str, &[u8]); 4] = [("a", b"alpha"), ("b", b"old"), ("keep", b"kept"), ("gone", b"x")];
    let cache: Vec<(String, String)> = held.iter().map(|(k, v)| (k.to_string(), sha1_hex(v))).collect();
    let cache: Vec<(&str, &str)> = cache.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    send(&mut sim, 1, resync(&cache));
    send(&mut sim, 1, nom(1 << 20));
    assert_eq!(take(&mut sim, 1), vec![FilemqMsg::IcanhazOk {}]);
    let parked = sim.parked();
    assert_eq!(parked.len(), 1, "the walk is parked");

    // Meanwhile: `a` and `b` change, `c` goes, `d` comes, `keep` stays.
    write(dir.path(), "a", b"alpha two");
    write(dir.path(), "b", b"bravo two");
    fs::remove_file(dir.path().join("c")).unwrap();
    write(dir.path(), "d", b"delta");
    sim.rescan();
    assert_eq!(take(&mut sim, 1), vec![], "nothing is sent while the walk is out");
    sim.deliver_parked(parked);
    let got = take(&mut sim, 1);
    let m = mirror(&held, &got);
    let now: [(&str, &[u8]); 4] =
        [("a", b"alpha two"), ("b", b"bravo two"), ("d", b"delta"), ("keep", b"kept")];
    assert_eq!(m.files, tree(&now), "what is published now, and only that");
    assert!(m.sent.values().all(|n| *n == 1), "nothing sent twice: {:?}", m.sent);
    assert!(!m.sent.contains_key("/keep") && !m.sent.contains_key("/c"));
    assert_eq!(m.markers.len(), 1);
    assert!(m.markers[0] > m.last_entry.unwrap(), "the marker comes after everything: {got:?}");
}

#[test]
fn a_client_gone_during_the_walk_leaves_nothing_and_its_holdings_are_freed_off_the_loop() {
    let (_dir, mut sim) = parked_world(&[("a", b"alpha")]);
    send(&mut sim, 1, ohai());
    let _ = take(&mut sim, 1);
    let mut cache = Hash::default();
    let x = sha1_hex(b"x");
    for i in 0..10_000 {
        cache.insert(&format!("held/{i:05}"), x.clone()).unwrap();
    }
    // Large: prepared off the loop, then walked off the loop.
    send(&mut sim, 1, FilemqMsg::Icanhaz { path: "/".into(), options: hash(&EXTENDED), cache });
    assert_eq!(take(&mut sim, 1), vec![FilemqMsg::IcanhazOk {}]);
    let parked = sim.parked();
    assert_eq!(parked.len(), 1);
    sim.disconnect(1);
    assert_eq!(sim.service.connections(), 0);
    for (key, done) in parked {
        let mut out = Vec::new();
        let now = sim.now;
        sim.service.on_work(key, done, now, &mut out);
        assert!(!out.iter().any(|a| matches!(a, Action::Send { .. })), "nothing sent: {out:?}");
        let freed = out.iter().any(|a| matches!(a, Action::Work { job, .. } if matches!(job.downcast_ref::<Job>(), Some(Job::Discard(g)) if g.0.len() == 10_000)));
        assert!(freed, "the ten thousand names it held are freed off the loop: {out:?}");
    }
    // The same connection number, a new session: a stale outcome is not its.
    send(&mut sim, 1, ohai());
    send(&mut sim, 1, resync(&[]));
    assert_eq!(take(&mut sim, 1), vec![FilemqMsg::OhaiOk {}, FilemqMsg::IcanhazOk {}]);
    assert_eq!(sim.parked().len(), 1);
}

#[test]
fn a_second_resync_during_the_walk_waits_in_order_and_each_gets_its_marker() {
    let files: [(&str, &[u8]); 3] = [("a", b"alpha"), ("b", b"bravo"), ("c", b"charlie")];
    let (_dir, mut sim) = parked_world(&files);
    send(&mut sim, 1, ohai());
    let _ = take(&mut sim, 1);
    send(&mut sim, 1, resync(&[]));
    assert_eq!(take(&mut sim, 1), vec![FilemqMsg::IcanhazOk {}]);
    // The second holds `a` (as its cache says), then credit, then a HUGZ.
    let a = sha1_hex(b"alpha");
    send(&mut sim, 1, resync(&[("a", &a)]));
    send(&mut sim, 1, nom(1 << 20));
    send(&mut sim, 1, FilemqMsg::Hugz {});
    assert_eq!(take(&mut sim, 1), vec![], "held behind the walk");
    let first = sim.parked();
    assert_eq!(first.len(), 1);
    sim.deliver_parked(first);
    // The held ICANHAZ is taken and walked in turn: the rest waits again.
    assert_eq!(take(&mut sim, 1), vec![FilemqMsg::IcanhazOk {}]);
    let second = sim.parked();
    assert_eq!(second.len(), 1);
    sim.deliver_parked(second);
    let got = take(&mut sim, 1);
    assert!(got.contains(&FilemqMsg::HugzOk {}), "the HUGZ is answered once its turn comes");
    let m = mirror(&[("a", b"alpha")], &got);
    assert_eq!(m.files, tree(&files));
    assert_eq!(m.sent.get("/a"), None, "the second cache says it holds a");
    assert!(m.sent.values().all(|n| *n == 1), "{:?}", m.sent);
    assert_eq!(m.markers.len(), 2, "one marker per RESYNC");
    assert!(m.markers[0] > m.last_entry.unwrap());
}

#[test]
fn a_mount_scanned_during_the_walk_is_announced_once_the_walk_is_in() {
    let (_dir, mut sim) = parked_world(&[("in/x", b"outer"), ("y", b"why")]);
    send(&mut sim, 1, ohai());
    let _ = take(&mut sim, 1);
    // The client holds /in/x as the outer mount published it.
    let x = sha1_hex(b"outer");
    send(&mut sim, 1, resync(&[("in/x", &x)]));
    assert_eq!(take(&mut sim, 1), vec![FilemqMsg::IcanhazOk {}]);
    let parked = sim.parked();
    // Meanwhile a mount at /in (empty) hides /in/x.
    let inner = tempfile::tempdir().unwrap();
    let mut out = Vec::new();
    sim.service.publish(inner.path().to_path_buf(), "/in", sim.now, &mut out).unwrap();
    sim.run_outcomes(out);
    sim.deliver_parked(parked);
    send(&mut sim, 1, nom(1 << 20));
    let got = take(&mut sim, 1);
    let m = mirror(&[("in/x", b"outer")], &got);
    assert_eq!(m.files, tree(&[("y", b"why")]), "the hidden file deleted, the rest sent: {got:?}");
    assert_eq!(m.markers.len(), 1);
    assert!(m.markers[0] > m.last_entry.unwrap());
}
