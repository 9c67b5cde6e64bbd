//! The subscriber against fake servers: a ROUTER socket driven by the test
//! thread, speaking the FILEMQ codec, polite or hostile.

use super::*;
use bytes::Bytes;
use std::fs;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;
use zbroker_proto::codec::{Chunk, Hash};
use zbroker_proto::filemq::Operation::{self, Create, Delete};
use zbroker_proto::FilemqMsg;

const WAIT: Duration = Duration::from_secs(10);

fn unique_endpoint() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    format!("ipc://@/filemq-test/{}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed))
}

use zbroker_proto::codec::testing::sha1_hex;

fn hash(entries: &[(&str, &str)]) -> Hash {
    let mut h = Hash::default();
    for (k, v) in entries {
        h.insert(k, Bytes::copy_from_slice(v.as_bytes())).unwrap();
    }
    h
}

fn text(h: &Hash, key: &str) -> Option<String> {
    h.get(key).map(|v| v.to_string_lossy())
}

/// Bytes that differ at every position, so a misplaced chunk shows.
fn content(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
}

struct FakeServer {
    socket: zmq::Socket,
    endpoint: String,
    /// The routing id of the last client heard.
    peer: Vec<u8>,
    next_sequence: u64,
    /// Sum of all NOM credit received.
    granted: u64,
    /// Payload bytes sent in CHEEZBURGERs.
    spent: u64,
    answer_hugz: bool,
    hugz_seen: usize,
    /// Capabilities the client offered in its last OHAI, and what OHAI-OK
    /// grants.
    offered: u8,
    grant: u8,
    _context: zmq::Context,
}

impl FakeServer {
    fn bind(endpoint: &str) -> FakeServer {
        let context = zmq::Context::new();
        let socket = context.socket(zmq::ROUTER).unwrap();
        socket.set_linger(0).unwrap();
        socket.bind(endpoint).unwrap();
        FakeServer {
            socket,
            endpoint: endpoint.to_string(),
            peer: Vec::new(),
            next_sequence: 0,
            granted: 0,
            spent: 0,
            answer_hugz: true,
            hugz_seen: 0,
            offered: 0,
            grant: 0,
            _context: context,
        }
    }

    /// The next message, NOMs included, or `None` after `timeout`. HUGZ
    /// is answered (while `answer_hugz`) and not returned.
    fn next(&mut self, timeout: Duration) -> Option<FilemqMsg> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || self.socket.poll(zmq::POLLIN, left.as_millis().max(1) as i64).unwrap() == 0 {
                return None;
            }
            let frames = self.socket.recv_multipart(0).unwrap();
            assert_eq!(frames.len(), 2, "one body frame per message");
            let msg = FilemqMsg::decode(frames[1].clone()).expect("the client sends valid frames");
            if matches!(msg, FilemqMsg::Ohai { .. }) {
                self.offered = zbroker_proto::filemq_ext::trailer_bits(&frames[1], &msg);
            }
            if frames[0] != self.peer {
                self.peer = frames[0].clone();
            }
            match msg {
                FilemqMsg::Hugz {} => {
                    self.hugz_seen += 1;
                    if self.answer_hugz {
                        self.send(&FilemqMsg::HugzOk {});
                    }
                }
                FilemqMsg::Nom { credit, .. } => {
                    self.granted += credit;
                    return Some(msg);
                }
                msg => return Some(msg),
            }
        }
    }

    /// The next message other than NOM (NOMs are counted).
    fn recv(&mut self) -> FilemqMsg {
        loop {
            match self.next(WAIT).expect("the client said nothing") {
                FilemqMsg::Nom { .. } => {}
                msg => return msg,
            }
        }
    }

    /// Collects NOMs for a moment.
    fn settle(&mut self) {
        while let Some(msg) = self.next(Duration::from_millis(300)) {
            assert!(matches!(msg, FilemqMsg::Nom { .. }), "unexpected {msg:?}");
        }
    }

    fn send(&self, msg: &FilemqMsg) {
        self.send_raw(&msg.encode());
    }

    fn send_raw(&self, body: &[u8]) {
        self.socket.send_multipart([self.peer.as_slice(), body], 0).unwrap();
    }

    /// OHAI → OHAI-OK, then each ICANHAZ → ICANHAZ-OK, then the first NOM.
    /// Returns the ICANHAZs as (path, options, cache).
    fn handshake(&mut self, subscriptions: usize) -> Vec<(String, Hash, Hash)> {
        match self.recv() {
            FilemqMsg::Ohai { protocol, version } => {
                assert_eq!(protocol.as_bytes(), b"FILEMQ");
                assert_eq!(version, 2);
            }
            other => panic!("expected OHAI, got {other:?}"),
        }
        self.next_sequence = 0;
        self.send_raw(&zbroker_proto::filemq_ext::encode_with_bits(&FilemqMsg::OhaiOk {}, self.grant));
        let mut icanhaz = Vec::new();
        for _ in 0..subscriptions {
            match self.recv() {
                FilemqMsg::Icanhaz { path, options, cache } => {
                    icanhaz.push((path.to_string_lossy(), options, cache))
                }
                other => panic!("expected ICANHAZ, got {other:?}"),
            }
            self.send(&FilemqMsg::IcanhazOk {});
        }
        match self.next(WAIT) {
            Some(FilemqMsg::Nom { .. }) => {}
            other => panic!("expected NOM, got {other:?}"),
        }
        icanhaz
    }

    fn burger(
        &mut self,
        operation: Operation,
        name: &[u8],
        offset: u64,
        eof: u8,
        headers: Hash,
        data: &[u8],
    ) {
        let sequence = self.next_sequence;
        self.next_sequence += 1;
        self.spent += data.len() as u64;
        self.send(&FilemqMsg::Cheezburger {
            sequence,
            operation,
            filename: zbroker_proto::codec::LongStr(Bytes::copy_from_slice(name)),
            offset,
            eof,
            headers,
            chunk: Chunk(Bytes::copy_from_slice(data)),
        });
    }

    /// A whole file from `offset`, in chunks of `chunk`, as an X-ZBROKER
    /// server sends it (headers on every chunk) or, with `announce` None,
    /// as the original does.
    fn file(&mut self, name: &str, data: &[u8], from: usize, chunk: usize, announce: Option<(&str, u64)>) {
        let headers = || match announce {
            Some((digest, size)) => hash(&[("X-SHA1", digest), ("X-SIZE", &size.to_string())]),
            None => Hash::default(),
        };
        let mut offset = from;
        while offset < data.len() {
            let end = (offset + chunk).min(data.len());
            self.burger(Create, name.as_bytes(), offset as u64, 0, headers(), &data[offset..end]);
            offset = end;
        }
        self.burger(Create, name.as_bytes(), data.len() as u64, 1, headers(), b"");
    }

    /// A whole file with truthful X-SHA1/X-SIZE.
    fn publish(&mut self, name: &str, data: &[u8]) {
        let digest = sha1_hex(data);
        self.file(name, data, 0, 1_000_000, Some((&digest, data.len() as u64)));
    }

    fn delete(&mut self, name: &str) {
        // Stale offset and chunk, as the original server sends them.
        self.burger(Delete, name.as_bytes(), 12345, 0, Hash::default(), b"");
    }

    fn synced(&mut self, path: &str) {
        self.burger(Create, b"", 0, 1, hash(&[("X-SYNCED", path)]), b"");
    }
}

fn options(endpoint: &str, paths: &[&str], inbox: &Path) -> Options {
    let mut opts =
        Options::endpoint(endpoint, paths.iter().map(|p| p.to_string()).collect(), inbox.to_path_buf());
    opts.heartbeat = Duration::from_millis(100);
    opts.dead_after = Duration::from_millis(1500);
    opts.refetch_delay = Duration::from_millis(100);
    opts
}

/// Events (Progress left out) up to and including the first that `done`
/// accepts.
fn events_until(sub: &Subscriber, done: impl Fn(&Event) -> bool) -> Vec<Event> {
    let deadline = Instant::now() + WAIT;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match sub.recv_timeout(left) {
            Ok(Event::Progress { .. }) => {}
            Ok(event) => {
                let last = done(&event);
                seen.push(event);
                if last {
                    return seen;
                }
            }
            Err(e) => panic!("no awaited event ({e}); got {seen:?}"),
        }
    }
}

fn partial_files(inbox: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(inbox.join(".filemq/partial"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Visible entries under `dir`, recursively, as sorted relative paths.
fn listing(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut pending = vec![(dir.to_path_buf(), String::new())];
    while let Some((path, rel)) = pending.pop() {
        for entry in fs::read_dir(&path).unwrap() {
            let entry = entry.unwrap();
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            let child = if rel.is_empty() { name } else { format!("{rel}/{name}") };
            let meta = fs::symlink_metadata(entry.path()).unwrap();
            if meta.is_dir() {
                pending.push((entry.path(), child.clone()));
                found.push(format!("{child}/"));
            } else {
                found.push(child);
            }
        }
    }
    found.sort();
    found
}

#[test]
fn a_multi_chunk_file_and_a_delete_arrive() {
    let endpoint = unique_endpoint();
    let mut server = FakeServer::bind(&endpoint);
    let dir = tempfile::tempdir().unwrap();
    let inbox = dir.path().join("inbox");
    let sub = Subscriber::start(options(&endpoint, &["/data"], &inbox)).unwrap();
    assert_eq!(sub.subscriptions(), ["/data"]);

    let icanhaz = server.handshake(1);
    let (path, opts, cache) = &icanhaz[0];
    assert_eq!(path, "/data");
    assert_eq!(text(opts, "RESYNC").as_deref(), Some("1"));
    assert_eq!(text(opts, "X-ZBROKER").as_deref(), Some("1"));
    assert_eq!(opts.get("X-RESUME"), None, "nothing to resume");
    assert!(cache.is_empty());
    assert_eq!(server.granted, DEFAULT_WINDOW);

    let data = content(2_500_000);
    server.publish("/data/sub/f.bin", &data);
    server.synced("/data");
    let events = events_until(&sub, |e| matches!(e, Event::InSync { .. }));
    assert_eq!(
        events,
        [
            Event::Connected,
            Event::Updated { path: "sub/f.bin".into(), size: 2_500_000 },
            Event::InSync { path: "/data".into(), published: true },
        ]
    );
    assert!(fs::read(inbox.join("sub/f.bin")).unwrap() == data, "the file arrived intact");
    assert!(partial_files(&inbox).is_empty(), "no temporary file is left");

    server.delete("/data/sub/f.bin");
    let events = events_until(&sub, |e| matches!(e, Event::Deleted { .. }));
    assert_eq!(events, [Event::Deleted { path: "sub/f.bin".into() }]);
    assert!(!inbox.join("sub").exists(), "the emptied directory went too");
    assert!(inbox.is_dir(), "but never the inbox itself");

    // The original server's form: no headers, the end is an empty chunk
    // (eof 0 here, as its newest client reads it).
    server.burger(Create, b"/data/hello.txt", 0, 0, Hash::default(), b"Hello");
    server.burger(Create, b"/data/hello.txt", 5, 0, Hash::default(), b"");
    let events = events_until(&sub, |e| matches!(e, Event::Updated { .. }));
    assert_eq!(events, [Event::Updated { path: "hello.txt".into(), size: 5 }]);
    assert_eq!(fs::read(inbox.join("hello.txt")).unwrap(), b"Hello");
    assert!(partial_files(&inbox).is_empty());

    sub.stop();
    assert!(matches!(server.recv(), FilemqMsg::Kthxbai {}), "stop says goodbye");
}

#[test]
fn a_hostile_server_cannot_touch_anything_outside_the_inbox() {
    let endpoint = unique_endpoint();
    let mut server = FakeServer::bind(&endpoint);
    let base = tempfile::tempdir().unwrap();
    let inbox = base.path().join("inbox");
    let outside = base.path().join("outside");
    fs::create_dir_all(&inbox).unwrap();
    fs::create_dir_all(&outside).unwrap();
    fs::write(outside.join("victim"), b"keep me").unwrap();
    std::os::unix::fs::symlink(&outside, inbox.join("link")).unwrap();
    std::os::unix::fs::symlink(outside.join("victim"), inbox.join("victim")).unwrap();
    let sub = Subscriber::start(options(&endpoint, &["/data"], &inbox)).unwrap();
    server.handshake(1);

    let evil_creates: [&[u8]; 14] = [
        b"/data/../escape",
        b"/data/a/../../escape",
        b"/data//escape",
        b"/data/./x",
        b"/data/a\0b",
        b"/data/.hidden",
        b"/data/.filemq/partial/x",
        b"/data/.filemq/lock",
        b"/data/link/planted",
        b"/data/victim",
        b"/other/x",
        b"/datax/y",
        b"relative/x",
        b"/data/\xff\xfe",
    ];
    for name in evil_creates {
        // Two chunks and the end: one refusal per file, not per chunk.
        server.burger(Create, name, 0, 0, Hash::default(), b"evil");
        server.burger(Create, name, 4, 0, Hash::default(), b"evil");
        server.burger(Create, name, 8, 1, Hash::default(), b"");
    }
    // A digest header that would name a file outside our private area.
    let traversal = hash(&[("X-SHA1", "../../../../../../../../../../../../../../../escape")]);
    server.burger(Create, b"/data/ok-name", 0, 0, traversal.clone(), b"evil");
    server.burger(Create, b"/data/ok-name", 4, 1, traversal, b"");
    server.burger(Create, b"/data/sized", 0, 1, hash(&[("X-SIZE", "-1")]), b"evil");
    for name in
        [&b"/data/link/victim"[..], b"/data/victim", b"/data/../outside/victim", b"/data/.filemq/lock"]
    {
        server.burger(Delete, name, 0, 0, Hash::default(), b"");
    }
    // Garbage and messages a server never sends are dropped, not fatal.
    server.send_raw(b"garbage");
    server.send_raw(&[0xAA, 0xA3, 0x08, 0x00]);
    server.send(&FilemqMsg::Nom { credit: 1, sequence: 0 });
    server.publish("/data/fine", b"fine");

    let events = events_until(&sub, |e| matches!(e, Event::Updated { .. }));
    let rejected: Vec<&Event> = events.iter().filter(|e| matches!(e, Event::Rejected { .. })).collect();
    assert_eq!(rejected.len(), evil_creates.len() + 2 + 4, "{events:#?}");
    assert_eq!(events.last(), Some(&Event::Updated { path: "fine".into(), size: 4 }));
    assert!(events.contains(&Event::Rejected {
        name: "/data/../escape".into(),
        why: "has a '.' or '..' component".into()
    }));

    assert_eq!(fs::read(outside.join("victim")).unwrap(), b"keep me");
    assert_eq!(listing(&outside), ["victim"]);
    assert_eq!(
        listing(base.path()),
        ["inbox/", "inbox/fine", "inbox/link", "inbox/victim", "outside/", "outside/victim"]
    );
    assert!(fs::symlink_metadata(inbox.join("victim")).unwrap().file_type().is_symlink());
    assert!(inbox.join(".filemq/lock").exists());
    assert!(partial_files(&inbox).is_empty());
    drop(sub);
}

/// An entry without content, as a server granting attributes sends it.
fn entry(server: &mut FakeServer, name: &[u8], headers: &[(&str, &str)]) {
    server.burger(Create, name, 0, 1, hash(headers), b"");
}

#[test]
fn links_directories_and_attributes_from_a_hostile_server_stay_inside() {
    let endpoint = unique_endpoint();
    let mut server = FakeServer::bind(&endpoint);
    server.grant = zbroker_proto::filemq_ext::ALL;
    let base = tempfile::tempdir().unwrap();
    let inbox = base.path().join("inbox");
    let outside = base.path().join("outside");
    fs::create_dir_all(&inbox).unwrap();
    fs::create_dir_all(&outside).unwrap();
    fs::write(outside.join("victim"), b"keep me").unwrap();
    std::os::unix::fs::symlink(&outside, inbox.join("planted")).unwrap();
    let sub = Subscriber::start(options(&endpoint, &["/data"], &inbox)).unwrap();
    let icanhaz = server.handshake(1);
    assert_eq!(server.offered, zbroker_proto::filemq_ext::ALL, "our client offers every capability");
    // Granted attributes, the cache carries them: the planted link, as a
    // link of the user's, with its own target's digest.
    let planted = text(&icanhaz[0].2, "planted").expect("links are held");
    let target = outside.to_str().unwrap();
    assert!(planted.starts_with(&zbroker_proto::filemq_ext::link_digest(target)), "{planted}");

    let evil_links: [(&[u8], &str); 8] = [
        (b"/data/up", ".."),
        (b"/data/l1", "../outside/victim"),
        (b"/data/l2", "/etc/passwd"),
        (b"/data/a/l3", "../../x"),
        (b"/data/l4", "a/../../x"),
        (b"/data/l5", ".filemq/lock"),
        (b"/data/planted/l6", "x"),
        (b"/data/l7", ""),
    ];
    for (name, target) in evil_links {
        entry(&mut server, name, &[("X-TYPE", "link"), ("X-TARGET", target), ("X-MTIME", "1")]);
    }
    type Headers<'a> = &'a [(&'a str, &'a str)];
    let evil_entries: [(&[u8], Headers); 6] = [
        (b"/data/d1", &[("X-TYPE", "dir"), ("X-MODE", "4755"), ("X-MTIME", "1")]),
        (b"/data/d2", &[("X-TYPE", "dir"), ("X-MODE", "755")]),
        (b"/data/d3", &[("X-TYPE", "dir"), ("X-MODE", "rwx"), ("X-MTIME", "1")]),
        (b"/data/planted", &[("X-TYPE", "dir"), ("X-MODE", "755"), ("X-MTIME", "1")]),
        (b"/data/planted/d4", &[("X-TYPE", "dir"), ("X-MODE", "755"), ("X-MTIME", "1")]),
        (b"/data/../d5", &[("X-TYPE", "dir"), ("X-MODE", "755"), ("X-MTIME", "1")]),
    ];
    for (name, headers) in evil_entries {
        entry(&mut server, name, headers);
    }
    // Attributes of a file behind a planted link: never followed.
    let victim = sha1_hex(b"keep me");
    entry(
        &mut server,
        b"/data/planted/victim",
        &[("X-TYPE", "attrs"), ("X-SHA1", &victim), ("X-MODE", "777"), ("X-MTIME", "1")],
    );
    // Good ones: a directory, a link into it, a file with attributes.
    entry(
        &mut server,
        b"/data/dir",
        &[("X-TYPE", "dir"), ("X-MODE", "750"), ("X-MTIME", "1000000000000000000")],
    );
    entry(&mut server, b"/data/dir/link", &[("X-TYPE", "link"), ("X-TARGET", "../f"), ("X-MTIME", "5")]);
    let digest = sha1_hex(b"ff");
    let headers =
        || hash(&[("X-SHA1", &digest), ("X-SIZE", "2"), ("X-MODE", "640"), ("X-MTIME", "7000000000")]);
    server.burger(Create, b"/data/f", 0, 0, headers(), b"ff");
    server.burger(Create, b"/data/f", 2, 1, headers(), b"");

    let events = events_until(&sub, |e| matches!(e, Event::Updated { .. }));
    let rejected = events.iter().filter(|e| matches!(e, Event::Rejected { .. })).count();
    let kept = events.iter().filter(|e| matches!(e, Event::Kept { .. })).count();
    // The planted link stays the user's: a directory there is kept out.
    assert_eq!((rejected, kept), (evil_links.len() + evil_entries.len() - 1 + 1, 1), "{events:#?}");
    assert!(events.contains(&Event::Mirrored { path: "dir".into(), what: Mirrored::Directory }));
    assert!(events.contains(&Event::Mirrored {
        path: "dir/link".into(),
        what: Mirrored::Link { target: "../f".into() }
    }));
    assert_eq!(events.last(), Some(&Event::Updated { path: "f".into(), size: 2 }));

    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    assert_eq!(fs::read(outside.join("victim")).unwrap(), b"keep me");
    assert_ne!(fs::metadata(outside.join("victim")).unwrap().permissions().mode() & 0o777, 0o777);
    assert_eq!(listing(&outside), ["victim"]);
    assert_eq!(listing(&inbox), ["dir/", "dir/link", "f", "planted"]);
    assert_eq!(fs::read_link(inbox.join("dir/link")).unwrap(), Path::new("../f"));
    let f = fs::metadata(inbox.join("f")).unwrap();
    assert_eq!((f.mode() & 0o7777, f.mtime()), (0o640, 7));
    assert_eq!(fs::metadata(inbox.join("dir")).unwrap().mtime(), 1_000_000_000);
    drop(sub);
}

#[test]
fn entries_from_a_server_that_did_not_grant_them_are_ignored() {
    let endpoint = unique_endpoint();
    let mut server = FakeServer::bind(&endpoint);
    let inbox = tempfile::tempdir().unwrap();
    let sub = Subscriber::start(options(&endpoint, &["/"], inbox.path())).unwrap();
    let icanhaz = server.handshake(1);
    assert!(text(&icanhaz[0].1, "X-ZBROKER").is_some());
    entry(&mut server, b"/d", &[("X-TYPE", "dir"), ("X-MODE", "755"), ("X-MTIME", "1")]);
    entry(&mut server, b"/l", &[("X-TYPE", "link"), ("X-TARGET", "d"), ("X-MTIME", "1")]);
    let headers = hash(&[("X-MODE", "600"), ("X-MTIME", "1")]);
    server.burger(Create, b"/f", 0, 1, headers, b"");
    let events = events_until(&sub, |e| matches!(e, Event::Updated { .. }));
    assert_eq!(events.last(), Some(&Event::Updated { path: "f".into(), size: 0 }));
    assert_eq!(listing(inbox.path()), ["f"]);
    use std::os::unix::fs::MetadataExt;
    assert_ne!(
        fs::metadata(inbox.path().join("f")).unwrap().mtime(),
        1,
        "attributes not granted are not applied"
    );
    drop(sub);
}

#[test]
fn a_file_that_fails_its_check_is_fetched_again() {
    let endpoint = unique_endpoint();
    let mut server = FakeServer::bind(&endpoint);
    let dir = tempfile::tempdir().unwrap();
    let inbox = dir.path().join("inbox");
    let sub = Subscriber::start(options(&endpoint, &["/data"], &inbox)).unwrap();
    server.handshake(1);

    let data = content(3000);
    let digest = sha1_hex(&data);
    let mut corrupt = data.clone();
    corrupt[1500] ^= 1;
    server.file("/data/f", &corrupt, 0, 1000, Some((&digest, 3000)));
    let events = events_until(&sub, |e| matches!(e, Event::IntegrityFailed { .. }));
    assert_eq!(events, [Event::Connected, Event::IntegrityFailed { path: "f".into() }]);
    match server.recv() {
        FilemqMsg::Icanhaz { path, options, cache } => {
            assert_eq!(path.to_string_lossy(), "/data");
            assert_eq!(text(&options, "RESYNC").as_deref(), Some("1"));
            assert!(cache.is_empty(), "the bad file is not held");
        }
        other => panic!("expected a new ICANHAZ, got {other:?}"),
    }
    server.send(&FilemqMsg::IcanhazOk {});
    assert!(!inbox.join("f").exists());
    assert!(partial_files(&inbox).is_empty());

    // The first RESYNC's marker does not mean in sync: the refetch is due.
    server.synced("/data");
    // A wrong size is caught too.
    server.file("/data/g", b"short", 0, 1000, Some((&sha1_hex(b"short"), 6)));
    let events = events_until(&sub, |e| matches!(e, Event::IntegrityFailed { .. }));
    assert_eq!(events, [Event::IntegrityFailed { path: "g".into() }]);
    assert!(matches!(server.recv(), FilemqMsg::Icanhaz { .. }));
    server.send(&FilemqMsg::IcanhazOk {});
    server.publish("/data/f", &data);
    server.publish("/data/g", b"short");
    server.synced("/data");
    server.synced("/data");
    let events = events_until(&sub, |e| matches!(e, Event::InSync { .. }));
    assert_eq!(
        events,
        [
            Event::Updated { path: "f".into(), size: 3000 },
            Event::Updated { path: "g".into(), size: 5 },
            Event::InSync { path: "/data".into(), published: true },
        ]
    );
    assert_eq!(fs::read(inbox.join("f")).unwrap(), data);
}

#[test]
fn an_interrupted_transfer_resumes_where_it_stopped() {
    let endpoint = unique_endpoint();
    let mut server = FakeServer::bind(&endpoint);
    let dir = tempfile::tempdir().unwrap();
    let inbox = dir.path().join("inbox");
    let data = content(2_500_000);
    let digest = sha1_hex(&data);
    let announce = Some((digest.as_str(), data.len() as u64));

    // First session: one chunk arrives, then the subscriber stops.
    let sub = Subscriber::start(options(&endpoint, &["/data"], &inbox)).unwrap();
    server.handshake(1);
    server.burger(Create, b"/data/big", 0, 0, hash(&[("X-SHA1", &digest)]), &data[..1_000_000]);
    let deadline = Instant::now() + WAIT;
    while fs::metadata(inbox.join(".filemq/partial").join(&digest)).map_or(0, |m| m.len()) < 1_000_000 {
        assert!(Instant::now() < deadline, "the first chunk never reached the disk");
        std::thread::sleep(Duration::from_millis(10));
    }
    sub.stop();
    assert!(matches!(server.recv(), FilemqMsg::Kthxbai {}));
    assert_eq!(partial_files(&inbox), vec![digest.clone()], "the part is kept, named by its digest");
    // Bytes past the resume point are cut off: make some.
    let mut part = data[..1_000_000].to_vec();
    part.extend_from_slice(&[0xEE; 500]);
    fs::write(inbox.join(".filemq/partial").join(&digest), &part).unwrap();

    // Second session: the part is offered and the server resumes short of
    // its end.
    let sub = Subscriber::start(options(&endpoint, &["/data"], &inbox)).unwrap();
    let icanhaz = server.handshake(1);
    assert_eq!(text(&icanhaz[0].1, "X-RESUME"), Some(format!("{digest} 1000500\n")));
    server.file("/data/big", &data, 900_000, 1_000_000, announce);
    server.synced("/data");
    let events = events_until(&sub, |e| matches!(e, Event::InSync { .. }));
    assert_eq!(events[1], Event::Updated { path: "big".into(), size: 2_500_000 });
    assert!(fs::read(inbox.join("big")).unwrap() == data, "the resumed file is identical");
    assert!(partial_files(&inbox).is_empty());

    // A resume the client cannot honour is an integrity failure, not a
    // corrupt file.
    server.file("/data/other", b"abcdef", 3, 1000, Some((&sha1_hex(b"abcdef"), 6)));
    let events = events_until(&sub, |e| matches!(e, Event::IntegrityFailed { .. }));
    assert_eq!(events, [Event::IntegrityFailed { path: "other".into() }]);
    assert!(matches!(server.recv(), FilemqMsg::Icanhaz { .. }));
    assert!(!inbox.join("other").exists());
}

#[test]
fn stale_partial_files_go_once_in_sync() {
    let endpoint = unique_endpoint();
    let mut server = FakeServer::bind(&endpoint);
    let dir = tempfile::tempdir().unwrap();
    let inbox = dir.path().join("inbox");
    fs::create_dir_all(inbox.join(".filemq/partial")).unwrap();
    let stale = sha1_hex(b"gone from the publisher");
    fs::write(inbox.join(".filemq/partial").join(&stale), b"gone").unwrap();
    let sub = Subscriber::start(options(&endpoint, &["/data"], &inbox)).unwrap();
    let icanhaz = server.handshake(1);
    assert_eq!(text(&icanhaz[0].1, "X-RESUME"), Some(format!("{stale} 4\n")));
    server.synced("/data");
    events_until(&sub, |e| matches!(e, Event::InSync { .. }));
    assert!(partial_files(&inbox).is_empty());
}

#[test]
fn the_cache_lists_what_the_inbox_holds() {
    let endpoint = unique_endpoint();
    let mut server = FakeServer::bind(&endpoint);
    let dir = tempfile::tempdir().unwrap();
    let inbox = dir.path().join("inbox");
    fs::create_dir_all(inbox.join("sub")).unwrap();
    fs::create_dir_all(inbox.join(".secret")).unwrap();
    fs::write(inbox.join("a.txt"), b"abc").unwrap();
    fs::write(inbox.join("sub/b.txt"), b"xyz").unwrap();
    fs::write(inbox.join(".hidden"), b"h").unwrap();
    fs::write(inbox.join(".secret/c"), b"c").unwrap();

    let sub = Subscriber::start(options(&endpoint, &["/data"], &inbox)).unwrap();
    let icanhaz = server.handshake(1);
    let cache = &icanhaz[0].2;
    assert_eq!(cache.len(), 2, "{cache:?}");
    assert_eq!(text(cache, "a.txt"), Some(sha1_hex(b"abc")));
    assert_eq!(text(cache, "sub/b.txt"), Some(sha1_hex(b"xyz")));
    // The digests are kept for the next time.
    let digests = fs::read_to_string(inbox.join(".filemq/digests")).unwrap();
    assert_eq!(digests.lines().count(), 3, "a header and two files: {digests}");
    // RESYNC's deletes do not touch files we did not write.
    server.delete("/data/a.txt");
    let events = events_until(&sub, |e| matches!(e, Event::Kept { .. }));
    assert_eq!(events.last(), Some(&Event::Kept { path: "a.txt".into(), reason: Kept::NotPublished }));
    assert_eq!(fs::read(inbox.join("a.txt")).unwrap(), b"abc");
    sub.stop();
    server.recv();

    // Several paths: full virtual paths, one cache per subscription.
    fs::create_dir_all(inbox.join("logs")).unwrap();
    fs::create_dir_all(inbox.join("data")).unwrap();
    fs::write(inbox.join("data/x"), b"x").unwrap();
    fs::write(inbox.join("logs/today"), b"log").unwrap();
    let sub = Subscriber::start(options(&endpoint, &["/data", "/logs/", "/data/deeper"], &inbox)).unwrap();
    assert_eq!(sub.subscriptions(), ["/data", "/logs"]);
    let icanhaz = server.handshake(2);
    let by_path: std::collections::HashMap<_, _> =
        icanhaz.iter().map(|(p, _, c)| (p.clone(), c.clone())).collect();
    assert_eq!(by_path["/data"].len(), 1);
    assert_eq!(text(&by_path["/data"], "x"), Some(sha1_hex(b"x")));
    assert_eq!(by_path["/logs"].len(), 1);
    assert_eq!(text(&by_path["/logs"], "today"), Some(sha1_hex(b"log")));
    server.publish("/logs/new", b"new");
    server.synced("/data");
    server.synced("/logs");
    let events = events_until(&sub, |e| matches!(e, Event::InSync { path, .. } if path == "/logs"));
    assert!(events.contains(&Event::Updated { path: "logs/new".into(), size: 3 }), "{events:?}");
    assert_eq!(fs::read(inbox.join("logs/new")).unwrap(), b"new");
}

#[test]
fn credit_counts_every_payload_byte_the_server_sent() {
    let endpoint = unique_endpoint();
    let mut server = FakeServer::bind(&endpoint);
    let dir = tempfile::tempdir().unwrap();
    let inbox = dir.path().join("inbox");
    let mut opts = options(&endpoint, &["/data"], &inbox);
    opts.window = 3_000_000;
    let sub = Subscriber::start(opts).unwrap();
    server.handshake(1);
    assert_eq!(server.granted, 3_000_000);

    // Refused chunks cost credit at the server: they must here too, or the
    // two would drift apart and the transfer stall (docs/protocol/FILEMQ.md "Credit").
    let junk = content(1_000_000);
    server.burger(Create, b"/other/junk", 0, 0, Hash::default(), &junk);
    server.burger(Create, b"/other/junk", 1_000_000, 1, Hash::default(), b"");
    let data = content(1_700_000);
    server.publish("/data/f", &data);
    events_until(&sub, |e| matches!(e, Event::Updated { .. }));
    server.settle();
    assert_eq!(server.spent, 2_700_000);
    let outstanding = server.granted - server.spent;
    // The client tops up when less than a slice below the window is left.
    assert!((2_000_000..=3_000_000).contains(&outstanding), "outstanding {outstanding}");
    assert_eq!(server.granted, 3_000_000 + 2_000_000, "one top-up after the second chunk");

    // A tiny window still flows.
    sub.stop();
    server.recv();
    let mut opts = options(&endpoint, &["/data"], &inbox);
    opts.window = 10;
    let sub = Subscriber::start(opts).unwrap();
    server.granted = 0;
    server.spent = 0;
    server.handshake(1);
    assert_eq!(server.granted, 10);
    server.file("/data/small", b"0123456789abcdef", 0, 4, None);
    events_until(&sub, |e| matches!(e, Event::Updated { .. }));
    server.settle();
    assert!(server.granted - server.spent >= 5, "granted {} spent {}", server.granted, server.spent);
}

#[test]
fn the_subscriber_comes_back_after_the_server_restarts() {
    let endpoint = unique_endpoint();
    let mut server = FakeServer::bind(&endpoint);
    let dir = tempfile::tempdir().unwrap();
    let inbox = dir.path().join("inbox");
    let sub = Subscriber::start(options(&endpoint, &["/data"], &inbox)).unwrap();
    server.handshake(1);
    server.publish("/data/one", b"1");
    events_until(&sub, |e| matches!(e, Event::Updated { .. }));
    drop(server);

    let events = events_until(&sub, |e| matches!(e, Event::Disconnected { .. }));
    assert!(matches!(events.last(), Some(Event::Disconnected { .. })));
    let mut server = FakeServer::bind(&endpoint);
    let icanhaz = server.handshake(1);
    assert_eq!(text(&icanhaz[0].2, "one"), Some(sha1_hex(b"1")), "a fresh cache on the new session");
    server.publish("/data/two", b"2");
    let events = events_until(&sub, |e| matches!(e, Event::Updated { .. }));
    assert_eq!(events, [Event::Connected, Event::Updated { path: "two".into(), size: 1 }]);
    assert_eq!(server.endpoint, endpoint);
}

#[test]
fn a_silent_server_is_given_up_on_and_reconnected() {
    let endpoint = unique_endpoint();
    let mut server = FakeServer::bind(&endpoint);
    let dir = tempfile::tempdir().unwrap();
    let sub = Subscriber::start(options(&endpoint, &["/data"], &dir.path().join("inbox"))).unwrap();
    server.handshake(1);
    let first_peer = server.peer.clone();
    server.answer_hugz = false;
    let started = Instant::now();
    // HUGZ go unanswered; after dead_after a new session says OHAI.
    match server.recv() {
        FilemqMsg::Ohai { .. } => {}
        other => panic!("expected a new OHAI, got {other:?}"),
    }
    assert!(started.elapsed() >= Duration::from_millis(1200), "gave up after {:?}", started.elapsed());
    assert!(server.hugz_seen >= 5, "HUGZ every heartbeat: {}", server.hugz_seen);
    assert_ne!(server.peer, first_peer, "a new connection");
    let events = events_until(&sub, |e| matches!(e, Event::Disconnected { .. }));
    assert_eq!(events.len(), 2);
}

#[test]
fn garbage_is_no_sign_of_life() {
    let endpoint = unique_endpoint();
    let mut server = FakeServer::bind(&endpoint);
    let dir = tempfile::tempdir().unwrap();
    let sub = Subscriber::start(options(&endpoint, &["/data"], &dir.path().join("inbox"))).unwrap();
    server.handshake(1);
    server.answer_hugz = false;
    let started = Instant::now();
    // Garbage every 50 ms, HUGZ unanswered: the session still ends after
    // dead_after (1.5 s) and a new one starts.
    loop {
        server.send_raw(b"\xAA\xA3\x08garbage");
        server.send_raw(b"not even a header");
        match server.next(Duration::from_millis(50)) {
            Some(FilemqMsg::Ohai { .. }) => break,
            _ => assert!(started.elapsed() < Duration::from_secs(5), "garbage kept the session alive"),
        }
    }
    assert!(started.elapsed() >= Duration::from_millis(1200), "gave up after {:?}", started.elapsed());
    let events = events_until(&sub, |e| matches!(e, Event::Disconnected { .. }));
    assert_eq!(events.len(), 2, "{events:?}");
}

#[test]
fn files_started_and_never_finished_leave_no_parts_behind() {
    let endpoint = unique_endpoint();
    let mut server = FakeServer::bind(&endpoint);
    let dir = tempfile::tempdir().unwrap();
    let inbox = dir.path().join("inbox");
    let sub = Subscriber::start(options(&endpoint, &["/data"], &inbox)).unwrap();
    server.handshake(1);
    for i in 0..300 {
        let data = format!("part of file {i}");
        let digest = sha1_hex(format!("whole file {i}").as_bytes());
        let name = format!("/data/f{i}");
        server.burger(Create, name.as_bytes(), 0, 0, hash(&[("X-SHA1", &digest)]), data.as_bytes());
    }
    server.publish("/data/last", b"last");
    events_until(&sub, |e| matches!(e, Event::Updated { .. }));
    assert!(partial_files(&inbox).is_empty(), "{} parts left", partial_files(&inbox).len());
    // One cut by a disconnect is kept for a resume.
    let digest = sha1_hex(b"whole");
    server.burger(Create, b"/data/cut", 0, 0, hash(&[("X-SHA1", &digest)]), b"who");
    // Its first chunk is written once the subscriber reports progress on it.
    let deadline = Instant::now() + WAIT;
    while !matches!(sub.recv_timeout(Duration::from_millis(50)), Ok(Event::Progress { path, .. }) if path == "cut")
    {
        assert!(Instant::now() < deadline, "no progress on the cut file");
    }
    sub.stop();
    assert_eq!(partial_files(&inbox), [digest]);
}

#[test]
fn a_gap_in_the_sequence_starts_a_new_session() {
    let endpoint = unique_endpoint();
    let mut server = FakeServer::bind(&endpoint);
    let dir = tempfile::tempdir().unwrap();
    let sub = Subscriber::start(options(&endpoint, &["/data"], &dir.path().join("inbox"))).unwrap();
    server.handshake(1);
    server.burger(Create, b"/data/a", 0, 0, Hash::default(), b"abc");
    server.next_sequence += 3;
    server.burger(Create, b"/data/a", 3, 1, Hash::default(), b"");
    let events = events_until(&sub, |e| matches!(e, Event::Disconnected { .. }));
    assert!(matches!(&events[1], Event::Disconnected { why } if why.contains("lost")), "{events:?}");
    server.handshake(1);
    assert!(!dir.path().join("inbox/a").exists());
}

#[test]
fn a_refusal_stops_the_subscriber() {
    let endpoint = unique_endpoint();
    let mut server = FakeServer::bind(&endpoint);
    let dir = tempfile::tempdir().unwrap();
    let sub = Subscriber::start(options(&endpoint, &["/data"], &dir.path().join("inbox"))).unwrap();
    assert!(matches!(server.recv(), FilemqMsg::Ohai { .. }));
    server.send(&FilemqMsg::Rtfm { reason: zbroker_proto::codec::ShortStr::lossy("go away") });
    let events = events_until(&sub, |e| matches!(e, Event::Refused { .. }));
    assert_eq!(events, [Event::Refused { why: "RTFM: go away".into() }]);
    assert_eq!(sub.recv(), None, "the subscriber has ended");
}

#[test]
fn bad_options_are_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let start = |paths: &[&str], window: u64| {
        let mut opts = options("ipc://@/filemq-test/unused", paths, dir.path());
        opts.window = window;
        Subscriber::start(opts)
    };
    assert!(matches!(start(&["data"], 1), Err(Error::BadPath { .. })));
    assert!(matches!(start(&["/a/../b"], 1), Err(Error::BadPath { .. })));
    assert!(matches!(start(&[], 1), Err(Error::BadPath { .. })));
    assert!(matches!(start(&["/a"], 0), Err(Error::BadOption(_))));
    let file = dir.path().join("file");
    fs::write(&file, b"").unwrap();
    let opts = options("ipc://@/filemq-test/unused", &["/a"], &file);
    assert!(matches!(Subscriber::start(opts), Err(Error::Inbox { .. })));
}

#[test]
fn without_a_server_stop_still_returns_promptly() {
    let dir = tempfile::tempdir().unwrap();
    let sub = Subscriber::start(options(&unique_endpoint(), &["/data"], dir.path())).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    sub.stop();
    assert!(started.elapsed() < Duration::from_secs(1), "stop took {:?}", started.elapsed());
}

/// The next message other than NOM, and how long it took to come.
fn timed_recv(server: &mut FakeServer) -> (FilemqMsg, Duration) {
    let started = Instant::now();
    let msg = server.recv();
    (msg, started.elapsed())
}

fn rtfm(server: &FakeServer, why: &str) {
    server.send(&FilemqMsg::Rtfm { reason: zbroker_proto::codec::ShortStr::lossy(why) });
}

#[test]
fn an_rtfm_after_the_greeting_is_a_lost_session_and_pauses_grow() {
    let endpoint = unique_endpoint();
    let mut server = FakeServer::bind(&endpoint);
    let dir = tempfile::tempdir().unwrap();
    let sub = Subscriber::start(options(&endpoint, &["/data"], &dir.path().join("inbox"))).unwrap();
    server.handshake(1);
    // The broker forgot us (expiry, its parking bound, a restart under a
    // silently reconnected socket): our next message gets "OHAI first".
    // That is no refusal but a new session, after a pause that grows while
    // sessions end at once without delivering anything.
    let mut pauses = Vec::new();
    for _ in 0..4 {
        rtfm(&server, "OHAI first");
        let started = Instant::now();
        server.handshake(1);
        pauses.push(started.elapsed());
    }
    assert!(pauses[3] >= Duration::from_millis(700), "no growing pause: {pauses:?}");
    assert!(pauses[0] < pauses[3], "{pauses:?}");
    // A session that delivers something was a good one: the pause starts
    // again from 100 ms (it would be 1.6 s otherwise).
    server.publish("/data/f", b"f");
    let mut events = events_until(&sub, |e| matches!(e, Event::Updated { .. }));
    rtfm(&server, "OHAI first");
    let started = Instant::now();
    server.handshake(1);
    assert!(started.elapsed() < Duration::from_millis(1000), "the pause was {:?}", started.elapsed());

    events.extend(events_until(&sub, |e| *e == Event::Connected));
    assert!(!events.iter().any(|e| matches!(e, Event::Refused { .. })), "{events:?}");
    let lost = events.iter().filter(
        |e| matches!(e, Event::Disconnected { why } if why.contains("lost our session (RTFM): OHAI first")),
    );
    assert_eq!(lost.count(), 5, "{events:?}");
    assert_eq!(events.iter().filter(|e| **e == Event::Connected).count(), 6, "{events:?}");
}

#[test]
fn an_srsly_to_a_subscription_stops_the_subscriber() {
    let endpoint = unique_endpoint();
    let mut server = FakeServer::bind(&endpoint);
    let dir = tempfile::tempdir().unwrap();
    let sub = Subscriber::start(options(&endpoint, &["/data"], &dir.path().join("inbox"))).unwrap();
    assert!(matches!(server.recv(), FilemqMsg::Ohai { .. }));
    server.send(&FilemqMsg::OhaiOk {});
    assert!(matches!(server.recv(), FilemqMsg::Icanhaz { .. }));
    server.send(&FilemqMsg::Srsly { reason: zbroker_proto::codec::ShortStr::lossy("no such path") });
    let events = events_until(&sub, |e| matches!(e, Event::Refused { .. }));
    assert_eq!(events, [Event::Connected, Event::Refused { why: "SRSLY: no such path".into() }]);
    assert_eq!(sub.recv(), None, "the subscriber has ended");
}

#[test]
fn a_file_that_keeps_failing_is_fetched_after_growing_pauses_then_given_up() {
    let endpoint = unique_endpoint();
    let mut server = FakeServer::bind(&endpoint);
    let dir = tempfile::tempdir().unwrap();
    let inbox = dir.path().join("inbox");
    let sub = Subscriber::start(options(&endpoint, &["/data"], &inbox)).unwrap();
    server.handshake(1);
    // The server's digest is stale: the file never matches it.
    let data = content(3000);
    let stale = sha1_hex(b"what the file once was");
    let mut pauses = Vec::new();
    for round in 0..5 {
        server.file("/data/f", &data, 0, 1000, Some((&stale, 3000)));
        // The marker of the RESYNC that brought it: not in sync, since the
        // file is to be fetched again.
        server.synced("/data");
        if round == 4 {
            break;
        }
        let (msg, pause) = timed_recv(&mut server);
        match msg {
            FilemqMsg::Icanhaz { options, .. } => assert_eq!(text(&options, "RESYNC").as_deref(), Some("1")),
            other => panic!("expected a new ICANHAZ, got {other:?}"),
        }
        server.send(&FilemqMsg::IcanhazOk {});
        pauses.push(pause);
    }
    // 100 ms, doubling; the first marker came before the pause ended.
    for (pause, least) in pauses.iter().zip([90, 190, 390, 790]) {
        assert!(*pause >= Duration::from_millis(least), "pauses {pauses:?}");
    }
    let events = events_until(&sub, |e| matches!(e, Event::InSync { .. }));
    let failed = Event::IntegrityFailed { path: "f".into() };
    assert_eq!(
        events,
        [
            Event::Connected,
            failed.clone(),
            failed.clone(),
            failed.clone(),
            failed.clone(),
            failed,
            Event::GaveUp { path: "f".into() },
            Event::InSync { path: "/data".into(), published: true },
        ]
    );
    // Given up on: no more ICANHAZ in this session.
    while let Some(msg) = server.next(Duration::from_millis(500)) {
        assert!(matches!(msg, FilemqMsg::Nom { .. }), "unexpected {msg:?}");
    }
    assert!(!inbox.join("f").exists());
    assert!(partial_files(&inbox).is_empty());
    // A good copy is still taken if the server sends one.
    server.publish("/data/f", &data);
    let events = events_until(&sub, |e| matches!(e, Event::Updated { .. }));
    assert_eq!(events, [Event::Updated { path: "f".into(), size: 3000 }]);
}

#[test]
fn a_new_version_at_the_old_offset_is_not_appended_to_the_old_one() {
    let endpoint = unique_endpoint();
    let mut server = FakeServer::bind(&endpoint);
    let dir = tempfile::tempdir().unwrap();
    let inbox = dir.path().join("inbox");
    let old = content(3000);
    let new: Vec<u8> = content(3500).iter().map(|b| b ^ 0x55).collect();
    let (old_digest, new_digest) = (sha1_hex(&old), sha1_hex(&new));
    // We hold the first 1000 bytes of the new version from an earlier run.
    fs::create_dir_all(inbox.join(".filemq/partial")).unwrap();
    fs::write(inbox.join(".filemq/partial").join(&new_digest), &new[..1000]).unwrap();
    let sub = Subscriber::start(options(&endpoint, &["/data"], &inbox)).unwrap();
    let icanhaz = server.handshake(1);
    assert_eq!(text(&icanhaz[0].1, "X-RESUME"), Some(format!("{new_digest} 1000\n")));

    // The server sends the old version's first 1000 bytes, abandons it
    // (it changed), and resumes the new one at 1000: same name, same
    // offset, another digest.
    let old_headers = hash(&[("X-SHA1", &old_digest), ("X-SIZE", "3000")]);
    server.burger(Create, b"/data/f", 0, 0, old_headers, &old[..1000]);
    server.file("/data/f", &new, 1000, 1000, Some((&new_digest, new.len() as u64)));
    let events = events_until(&sub, |e| matches!(e, Event::Updated { .. } | Event::IntegrityFailed { .. }));
    assert_eq!(events, [Event::Connected, Event::Updated { path: "f".into(), size: 3500 }]);
    assert!(fs::read(inbox.join("f")).unwrap() == new, "the new version, whole");
    assert!(partial_files(&inbox).is_empty(), "the old version's part went with it: {old_digest}");
}

#[test]
fn a_file_abandoned_mid_transfer_leaves_no_part() {
    let endpoint = unique_endpoint();
    let mut server = FakeServer::bind(&endpoint);
    let dir = tempfile::tempdir().unwrap();
    let inbox = dir.path().join("inbox");
    let mut opts = options(&endpoint, &["/data"], &inbox);
    opts.delete = true;
    let sub = Subscriber::start(opts).unwrap();
    server.handshake(1);
    let a = content(3000);
    let c = content(2000);
    let (a_digest, c_digest) = (sha1_hex(&a), sha1_hex(&c));
    let a_headers = || hash(&[("X-SHA1", &a_digest), ("X-SIZE", "3000")]);
    // Part of A, then B from 0 without A's end (A changed on the server,
    // which sends its new version later).
    server.burger(Create, b"/data/a", 0, 0, a_headers(), &a[..1000]);
    server.publish("/data/b", b"bee");
    // Part of C, then C is deleted (it went from the publisher while being
    // sent), then B2.
    server.burger(Create, b"/data/c", 0, 0, hash(&[("X-SHA1", &c_digest)]), &c[..500]);
    server.delete("/data/c");
    server.publish("/data/b2", b"bee two");
    let events = events_until(&sub, |e| *e == Event::Updated { path: "b2".into(), size: 7 });
    assert_eq!(
        events,
        [
            Event::Connected,
            Event::Updated { path: "b".into(), size: 3 },
            Event::Updated { path: "b2".into(), size: 7 }
        ]
    );
    assert!(!inbox.join("a").exists() && !inbox.join("c").exists());
    assert!(partial_files(&inbox).is_empty(), "nothing is kept of files the server abandoned");
}

#[test]
fn a_file_longer_than_announced_is_refused_at_once() {
    let endpoint = unique_endpoint();
    let mut server = FakeServer::bind(&endpoint);
    let dir = tempfile::tempdir().unwrap();
    let inbox = dir.path().join("inbox");
    let sub = Subscriber::start(options(&endpoint, &["/data"], &inbox)).unwrap();
    server.handshake(1);
    let data = content(4000);
    let headers = || hash(&[("X-SHA1", "0123456789ABCDEF0123456789ABCDEF01234567"), ("X-SIZE", "1500")]);
    server.burger(Create, b"/data/huge", 0, 0, headers(), &data[..1000]);
    server.burger(Create, b"/data/huge", 1000, 0, headers(), &data[1000..2000]);
    // No end yet: the overrun alone is enough.
    let events = events_until(&sub, |e| matches!(e, Event::IntegrityFailed { .. }));
    assert_eq!(events, [Event::Connected, Event::IntegrityFailed { path: "huge".into() }]);
    assert!(partial_files(&inbox).is_empty(), "nothing of it is kept");
    // The rest of it is ignored, not refused again.
    server.burger(Create, b"/data/huge", 2000, 0, headers(), &data[2000..]);
    server.burger(Create, b"/data/huge", 4000, 1, headers(), b"");
    server.publish("/data/fine", b"fine");
    let events = events_until(&sub, |e| matches!(e, Event::Updated { .. }));
    assert_eq!(events, [Event::Updated { path: "fine".into(), size: 4 }]);
    assert!(!inbox.join("huge").exists());
    assert!(partial_files(&inbox).is_empty());
}

#[test]
fn the_socket_neither_reconnects_nor_takes_huge_frames() {
    let endpoint = unique_endpoint();
    let server = FakeServer::bind(&endpoint);
    let context = zmq::Context::new();
    let control = context.socket(zmq::PAIR).unwrap();
    let link = link::Link::connect(&context, &endpoint, &control, WAIT).expect("a link");
    assert_eq!(link.socket.get_reconnect_ivl().unwrap(), -1);
    let (max_frame, queued) = session::intake(8_000_000);
    assert_eq!(link.socket.get_maxmsgsize().unwrap(), max_frame);
    assert!(max_frame < 8_100_000, "{max_frame}");
    assert_eq!(link.socket.get_rcvhwm().unwrap(), queued);
    assert!(queued as i64 * max_frame <= 32 << 20, "{queued} frames");
    drop(link);
    drop(server);
    // Without reconnection, a failed attempt is still seen at once.
    let started = Instant::now();
    assert!(link::Link::connect(&context, &unique_endpoint(), &control, WAIT).is_err());
    assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
}

#[test]
fn an_oversized_frame_drops_the_connection_and_a_new_one_is_made() {
    let endpoint = unique_endpoint();
    let mut server = FakeServer::bind(&endpoint);
    let dir = tempfile::tempdir().unwrap();
    let sub = Subscriber::start(options(&endpoint, &["/data"], &dir.path().join("inbox"))).unwrap();
    server.handshake(1);
    let first_peer = server.peer.clone();
    server.send_raw(&vec![0u8; (64 << 20) + 1]);
    let events = events_until(&sub, |e| matches!(e, Event::Disconnected { .. }));
    assert_eq!(events.len(), 2, "{events:?}");
    server.handshake(1);
    assert_ne!(server.peer, first_peer, "a new connection");
    server.publish("/data/f", b"f");
    events_until(&sub, |e| matches!(e, Event::Updated { .. }));
}

/// Makes a chain of directories under `base` whose full path is longer
/// than PATH_MAX (so that no path-based call reaches its end, whoever we
/// run as), with a file at the bottom.
fn too_deep(base: &Path) {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let name = CString::new("d".repeat(200)).unwrap();
    let base = CString::new(base.as_os_str().as_bytes()).unwrap();
    // SAFETY: plain *at(2) calls on descriptors we open and close here.
    unsafe {
        let mut fd = libc::open(base.as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY);
        assert!(fd >= 0);
        for _ in 0..25 {
            assert_eq!(libc::mkdirat(fd, name.as_ptr(), 0o755), 0);
            let next = libc::openat(fd, name.as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY);
            assert!(next >= 0);
            libc::close(fd);
            fd = next;
        }
        let file = CString::new("deep.txt").unwrap();
        let f = libc::openat(fd, file.as_ptr(), libc::O_CREAT | libc::O_WRONLY, 0o644);
        assert!(f >= 0);
        libc::close(f);
        libc::close(fd);
    }
}

#[test]
fn an_unreadable_folder_is_left_out_not_fatal() {
    let endpoint = unique_endpoint();
    let mut server = FakeServer::bind(&endpoint);
    let dir = tempfile::tempdir().unwrap();
    let inbox = dir.path().join("inbox");
    fs::create_dir_all(inbox.join("deep")).unwrap();
    too_deep(&inbox.join("deep"));
    fs::write(inbox.join("a.txt"), b"abc").unwrap();
    let sub = Subscriber::start(options(&endpoint, &["/data"], &inbox)).unwrap();
    let icanhaz = server.handshake(1);
    let cache = &icanhaz[0].2;
    assert_eq!(cache.len(), 1, "{cache:?}");
    assert_eq!(text(cache, "a.txt"), Some(sha1_hex(b"abc")));
    server.publish("/data/b", b"b");
    let events = events_until(&sub, |e| matches!(e, Event::Updated { .. } | Event::Failed { .. }));
    assert_eq!(events, [Event::Connected, Event::Updated { path: "b".into(), size: 1 }]);
}
