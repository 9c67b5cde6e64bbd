//! Tests of the scan, hashing and chunk reads (`disk.rs`).

use super::*;
use std::cell::Cell;
use std::os::unix::fs::symlink;

thread_local! {
    /// Files hashed on this thread (each test runs on its own thread).
    pub(super) static HASHED: Cell<usize> = const { Cell::new(0) };
}

const LONG: Duration = Duration::from_secs(3600);

fn hashed() -> usize {
    HASHED.with(Cell::get)
}

fn write(root: &Path, rel: &str, content: &[u8]) {
    let path = root.join(rel);
    fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    fs::write(&path, content).expect("write");
}

/// Writes a file whose mtime is an hour old: stable for any test.
fn write_old(root: &Path, rel: &str, content: &[u8]) {
    write(root, rel, content);
    set_age(root, rel, Duration::from_secs(7200));
}

fn set_age(root: &Path, rel: &str, age: Duration) {
    let file = File::options().write(true).open(root.join(rel)).expect("open");
    file.set_modified(SystemTime::now() - age).expect("set mtime");
}

fn scan_ok(root: &Path, previous: &Snapshot, stable_age: Duration, cache: Option<&Path>) -> Scanned {
    scan(root, previous, stable_age, cache).expect("scan")
}

use zbroker_proto::codec::testing::sha1_hex;

/// Every entry's key.
fn keys(scanned: &Scanned) -> Vec<&str> {
    scanned.snapshot.files.keys().map(String::as_str).collect()
}

/// The regular files' keys.
fn files(scanned: &Scanned) -> Vec<&str> {
    scanned.snapshot.files.iter().filter(|(_, m)| m.is_file()).map(|(k, _)| k.as_str()).collect()
}

/// The links: key, target, and the file a copy would be of.
fn links(scanned: &Scanned) -> Vec<(&str, &str, Option<&str>)> {
    scanned
        .snapshot
        .files
        .iter()
        .filter_map(|(k, m)| match &m.kind {
            Kind::Link { target, copy } => {
                Some((k.as_str(), target.as_str(), copy.as_ref().map(|c| c.rel.as_str())))
            }
            _ => None,
        })
        .collect()
}

fn removed(path: &str, dir: bool) -> Change {
    Change::Removed { rel: path.to_owned(), dir }
}

fn created(path: &str) -> Change {
    Change::Created(path.to_owned())
}

fn deleted(path: &str) -> Change {
    Change::Deleted(path.to_owned())
}

/// `rsync -a`, `cp -p` and `tar x` put back the old mtime: the ctime
/// still tells that the content changed.
#[test]
fn content_replaced_with_its_old_mtime_is_hashed_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_old(dir.path(), "f", b"aaaa");
    let first = scan_ok(dir.path(), &Snapshot::default(), Duration::ZERO, None);
    let mtime = fs::metadata(dir.path().join("f")).expect("stat").modified().expect("mtime");
    std::thread::sleep(Duration::from_millis(20));
    write(dir.path(), "f", b"bbbb");
    File::options().write(true).open(dir.path().join("f")).expect("open").set_modified(mtime).expect("mtime");
    let second = scan_ok(dir.path(), &first.snapshot, Duration::ZERO, None);
    assert_eq!(second.changes, [created("f")]);
    assert_eq!(second.snapshot.files["f"].digest, sha1_hex(b"bbbb"));
}

#[test]
fn new_files_appear_once_stable() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(dir.path(), "a.txt", b"hello");
    let young = scan_ok(dir.path(), &Snapshot::default(), LONG, None);
    assert!(young.snapshot.files.is_empty());
    assert!(young.changes.is_empty());
    assert!(young.unstable);

    let stable = scan_ok(dir.path(), &young.snapshot, Duration::ZERO, None);
    assert_eq!(keys(&stable), ["a.txt"]);
    assert_eq!(stable.changes, [created("a.txt")]);
    assert!(!stable.unstable);
    let meta = &stable.snapshot.files["a.txt"];
    assert_eq!(meta.size, 5);
    assert_eq!(meta.digest, sha1_hex(b"hello"));
}

#[test]
fn a_file_in_the_far_future_is_unstable() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(dir.path(), "later.txt", b"x");
    let file = File::options().write(true).open(dir.path().join("later.txt")).expect("open");
    file.set_modified(SystemTime::now() + LONG).expect("set mtime");
    let scanned = scan_ok(dir.path(), &Snapshot::default(), Duration::ZERO, None);
    assert!(scanned.snapshot.files.is_empty());
    assert!(scanned.unstable);
}

#[test]
fn digests_are_upper_case_sha1() {
    let dir = tempfile::tempdir().expect("tempdir");
    let big: Vec<u8> = (0..3 * HASH_BUFFER + 17).map(|i| (i % 251) as u8).collect();
    write_old(dir.path(), "big.bin", &big);
    write_old(dir.path(), "empty", b"");
    let scanned = scan_ok(dir.path(), &Snapshot::default(), Duration::ZERO, None);
    assert_eq!(scanned.snapshot.files["big.bin"].digest, sha1_hex(&big));
    assert_eq!(scanned.snapshot.files["empty"].digest, "DA39A3EE5E6B4B0D3255BFEF95601890AFD80709");
    assert_eq!(sha1_hex(b"abc"), "A9993E364706816ABA3E25717850C26C9CD0D89D");
}

#[test]
fn hidden_entries_and_their_subtrees_are_skipped() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_old(dir.path(), "shown.txt", b"1");
    write_old(dir.path(), ".hidden.txt", b"2");
    write_old(dir.path(), ".filemq/partial", b"3");
    write_old(dir.path(), "sub/.secret", b"4");
    write_old(dir.path(), "sub/.git/config", b"5");
    let scanned = scan_ok(dir.path(), &Snapshot::default(), Duration::ZERO, None);
    assert_eq!(keys(&scanned), ["shown.txt", "sub"]);
}

#[test]
fn nested_folders_use_slash_keys() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_old(dir.path(), "a/b/c.txt", b"c");
    write_old(dir.path(), "a/d.txt", b"d");
    write_old(dir.path(), "z.txt", b"z");
    fs::create_dir_all(dir.path().join("empty/folder")).expect("mkdir");
    let scanned = scan_ok(dir.path(), &Snapshot::default(), Duration::ZERO, None);
    assert_eq!(files(&scanned), ["a/b/c.txt", "a/d.txt", "z.txt"]);
    let all = ["a", "a/b", "a/b/c.txt", "a/d.txt", "empty", "empty/folder", "z.txt"];
    assert_eq!(keys(&scanned), all, "directories, empty ones too, are entries");
    assert_eq!(scanned.changes, all.map(created));
    assert_eq!(scanned.snapshot.files["empty"].kind, Kind::Dir);
    assert_eq!(scanned.snapshot.files["empty"].digest, EMPTY_SHA1);
}

#[test]
fn unchanged_files_are_not_announced_or_rehashed() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_old(dir.path(), "a.txt", b"a");
    let first = scan_ok(dir.path(), &Snapshot::default(), Duration::ZERO, None);
    let before = hashed();
    let second = scan_ok(dir.path(), &first.snapshot, Duration::ZERO, None);
    assert_eq!(hashed(), before);
    assert!(second.changes.is_empty());
    assert_eq!(second.snapshot, first.snapshot);
}

#[test]
fn a_file_rewritten_shorter_is_created_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_old(dir.path(), "f.txt", b"a long first version");
    let first = scan_ok(dir.path(), &Snapshot::default(), Duration::ZERO, None);
    write(dir.path(), "f.txt", b"short");
    set_age(dir.path(), "f.txt", Duration::from_secs(60));
    let second = scan_ok(dir.path(), &first.snapshot, Duration::ZERO, None);
    assert_eq!(second.changes, [created("f.txt")]);
    let meta = &second.snapshot.files["f.txt"];
    assert_eq!(meta.size, 5);
    assert_eq!(meta.digest, sha1_hex(b"short"));
}

#[test]
fn a_file_being_rewritten_keeps_its_previous_version() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_old(dir.path(), "f.txt", b"old");
    let first = scan_ok(dir.path(), &Snapshot::default(), Duration::from_secs(60), None);
    write(dir.path(), "f.txt", b"new and still growing");
    let second = scan_ok(dir.path(), &first.snapshot, Duration::from_secs(60), None);
    assert!(second.unstable);
    assert!(second.changes.is_empty(), "not deleted, not created: {:?}", second.changes);
    assert_eq!(second.snapshot, first.snapshot);
}

#[test]
fn deleting_files_and_folders_announces_each_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_old(dir.path(), "keep.txt", b"k");
    write_old(dir.path(), "gone.txt", b"g");
    write_old(dir.path(), "folder/a", b"a");
    write_old(dir.path(), "folder/sub/b", b"b");
    let first = scan_ok(dir.path(), &Snapshot::default(), Duration::ZERO, None);
    fs::remove_file(dir.path().join("gone.txt")).expect("rm");
    fs::remove_dir_all(dir.path().join("folder")).expect("rm -r");
    let second = scan_ok(dir.path(), &first.snapshot, Duration::ZERO, None);
    assert_eq!(
        second.changes,
        [
            removed("folder", true),
            deleted("folder/a"),
            removed("folder/sub", true),
            deleted("folder/sub/b"),
            deleted("gone.txt")
        ]
    );
    assert_eq!(keys(&second), ["keep.txt"]);
}

#[test]
fn symlinks_out_of_the_root_are_skipped() {
    let outside = tempfile::tempdir().expect("tempdir");
    write_old(outside.path(), "secret.txt", b"s");
    fs::create_dir(outside.path().join("secrets")).expect("mkdir");
    write_old(outside.path(), "secrets/x", b"x");
    let dir = tempfile::tempdir().expect("tempdir");
    write_old(dir.path(), "real.txt", b"r");
    symlink(outside.path().join("secret.txt"), dir.path().join("file-link")).expect("symlink");
    symlink(outside.path().join("secrets"), dir.path().join("dir-link")).expect("symlink");
    symlink("../../nowhere", dir.path().join("dangling")).expect("symlink");
    symlink(".hidden", dir.path().join("into-hidden")).expect("symlink");
    write_old(dir.path(), ".hidden", b"h");
    let scanned = scan_ok(dir.path(), &Snapshot::default(), Duration::ZERO, None);
    assert_eq!(keys(&scanned), ["real.txt"]);
}

/// A link inside is published as a link, never followed: what lies
/// behind a symlinked directory is published once, under its real
/// path. A link to a file knows that file, for copies.
#[test]
fn symlinks_inside_the_root_are_links() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_old(dir.path(), "data/a.txt", b"a");
    symlink("data/a.txt", dir.path().join("alias.txt")).expect("symlink");
    symlink("data", dir.path().join("mirror")).expect("symlink");
    symlink(dir.path().join("data/a.txt"), dir.path().join("data/absolute")).expect("symlink");
    symlink("missing", dir.path().join("dangling")).expect("symlink");
    let scanned = scan_ok(dir.path(), &Snapshot::default(), Duration::ZERO, None);
    assert_eq!(files(&scanned), ["data/a.txt"]);
    assert_eq!(
        links(&scanned),
        [
            ("alias.txt", "data/a.txt", Some("data/a.txt")),
            ("dangling", "missing", None),
            ("data/absolute", "../data/a.txt", Some("data/a.txt")),
            ("mirror", "data", None),
        ]
    );
    let alias = &scanned.snapshot.files["alias.txt"];
    assert_eq!(alias.digest, link_digest("data/a.txt"));
    let (read, copy) = alias.as_copy("alias.txt").expect("a copy");
    assert_eq!((read, copy.digest.as_str()), ("data/a.txt", sha1_hex(b"a").as_str()));
    assert_eq!(alias.attrs.mode, 0o777);

    // The file it leads to changes: so does the link (for copies).
    write(dir.path(), "data/a.txt", b"new");
    set_age(dir.path(), "data/a.txt", Duration::from_secs(60));
    let second = scan_ok(dir.path(), &scanned.snapshot, Duration::ZERO, None);
    assert_eq!(second.changes, [created("alias.txt"), created("data/a.txt"), created("data/absolute")]);
}

#[test]
fn modes_and_mtimes_are_kept_and_a_chmod_is_a_change() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    write_old(dir.path(), "d/x", b"x");
    fs::set_permissions(dir.path().join("d/x"), fs::Permissions::from_mode(0o4751)).expect("chmod");
    let first = scan_ok(dir.path(), &Snapshot::default(), Duration::ZERO, None);
    let x = &first.snapshot.files["d/x"];
    assert_eq!(x.attrs.mode, 0o751, "permission bits only, never setuid");
    let on_disk = fs::metadata(dir.path().join("d/x")).expect("stat");
    assert_eq!(x.attrs, Attrs { mode: 0o751, ..Attrs::of(&on_disk) });
    assert_eq!(
        first.snapshot.files["d"].attrs.mode,
        fs::metadata(dir.path().join("d")).unwrap().permissions().mode() & 0o777
    );
    fs::set_permissions(dir.path().join("d/x"), fs::Permissions::from_mode(0o600)).expect("chmod");
    let second = scan_ok(dir.path(), &first.snapshot, Duration::ZERO, None);
    assert_eq!(second.changes, [created("d/x")]);
    assert_eq!(second.snapshot.files["d/x"].digest, x.digest);
    assert_eq!(second.snapshot.files["d/x"].attrs.mode, 0o600);
}

#[test]
fn symlink_loops_end() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_old(dir.path(), "a/b/f", b"f");
    symlink("..", dir.path().join("a/b/up")).expect("symlink");
    symlink(dir.path(), dir.path().join("a/root")).expect("symlink");
    symlink("self", dir.path().join("self")).expect("symlink");
    let scanned = scan_ok(dir.path(), &Snapshot::default(), Duration::ZERO, None);
    assert_eq!(files(&scanned), ["a/b/f"]);
    // Never followed: ".." is a link, a link to the root itself is not
    // published, and a loop is a (dangling) link.
    assert_eq!(links(&scanned), [("a/b/up", "..", None), ("self", "self", None)]);
}

#[test]
fn non_utf8_names_are_skipped() {
    use std::os::unix::ffi::OsStrExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let name = std::ffi::OsStr::from_bytes(b"bad-\xff");
    fs::write(dir.path().join(name), b"x").expect("write");
    write_old(dir.path(), "good", b"g");
    let scanned = scan_ok(dir.path(), &Snapshot::default(), Duration::ZERO, None);
    assert_eq!(keys(&scanned), ["good"]);
}

#[test]
fn fifos_are_skipped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let made = std::process::Command::new("mkfifo").arg(dir.path().join("pipe")).status();
    if !made.is_ok_and(|status| status.success()) {
        return; // no mkfifo here: nothing to test
    }
    write_old(dir.path(), "good", b"g");
    let scanned = scan_ok(dir.path(), &Snapshot::default(), Duration::ZERO, None);
    assert_eq!(keys(&scanned), ["good"]);
}

#[test]
fn an_unreadable_root_is_an_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("missing");
    assert!(scan(&missing, &Snapshot::default(), Duration::ZERO, None).is_err());
    write_old(dir.path(), "file", b"f");
    assert!(scan(&dir.path().join("file"), &Snapshot::default(), Duration::ZERO, None).is_err());
}

#[test]
fn an_unreadable_folder_keeps_its_previous_entries() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    write_old(dir.path(), "locked/a", b"a");
    write_old(dir.path(), "open/b", b"b");
    let first = scan_ok(dir.path(), &Snapshot::default(), Duration::ZERO, None);
    let locked = dir.path().join("locked");
    fs::set_permissions(&locked, fs::Permissions::from_mode(0o000)).expect("chmod");
    let still_readable = fs::read_dir(&locked).is_ok(); // running as root
    let second = scan_ok(dir.path(), &first.snapshot, Duration::ZERO, None);
    fs::set_permissions(&locked, fs::Permissions::from_mode(0o755)).expect("chmod");
    if still_readable {
        return;
    }
    assert!(second.changes.is_empty(), "{:?}", second.changes);
    assert_eq!(second.snapshot, first.snapshot);
}

#[test]
fn the_digest_cache_saves_rehashing_after_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = tempfile::tempdir().expect("tempdir");
    let cache = state.path().join("nested/mount.digests");
    write_old(dir.path(), "a.txt", b"a");
    write_old(dir.path(), "b/c.txt", b"c");
    let before = hashed();
    let first = scan_ok(dir.path(), &Snapshot::default(), Duration::ZERO, Some(&cache));
    assert_eq!(hashed(), before + 2);
    assert!(cache.exists());

    // A restart: no previous snapshot, the cache is all we have.
    let second = scan_ok(dir.path(), &Snapshot::default(), Duration::ZERO, Some(&cache));
    assert_eq!(hashed(), before + 2, "nothing rehashed");
    assert_eq!(second.snapshot, first.snapshot);
    assert_eq!(second.changes.len(), 3, "a restart announces everything again (b/ too)");
}

#[test]
fn the_digest_cache_is_trusted_for_unchanged_files_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = tempfile::tempdir().expect("tempdir");
    let cache = state.path().join("mount.digests");
    write_old(dir.path(), "same.txt", b"same");
    write_old(dir.path(), "edited.txt", b"before");
    scan_ok(dir.path(), &Snapshot::default(), Duration::ZERO, Some(&cache));
    let fake = "0123456789ABCDEF0123456789ABCDEF01234567";
    let text = fs::read_to_string(&cache).expect("read cache");
    let real = sha1_hex(b"same");
    fs::write(&cache, text.replace(&real, fake)).expect("write cache");
    write(dir.path(), "edited.txt", b"after!");
    set_age(dir.path(), "edited.txt", Duration::from_secs(60));

    let scanned = scan_ok(dir.path(), &Snapshot::default(), Duration::ZERO, Some(&cache));
    assert_eq!(scanned.snapshot.files["same.txt"].digest, fake, "the cached digest is reused");
    assert_eq!(scanned.snapshot.files["edited.txt"].digest, sha1_hex(b"after!"));
    let rewritten = fs::read_to_string(&cache).expect("read cache");
    assert!(rewritten.contains(&sha1_hex(b"after!")));
}

#[test]
fn a_damaged_or_foreign_digest_cache_is_ignored() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = tempfile::tempdir().expect("tempdir");
    let cache = state.path().join("mount.digests");
    write_old(dir.path(), "a.txt", b"a");
    for garbage in [&b"\xff\xfe not text"[..], b"something else\n1 2 3 a.txt\n", b""] {
        fs::write(&cache, garbage).expect("write cache");
        let scanned = scan_ok(dir.path(), &Snapshot::default(), Duration::ZERO, Some(&cache));
        assert_eq!(scanned.snapshot.files["a.txt"].digest, sha1_hex(b"a"));
    }
    let text = fs::read_to_string(&cache).expect("read cache");
    fs::write(&cache, format!("{text}junk line\n12 x {} broken\n", sha1_hex(b"a"))).expect("write");
    let scanned = scan_ok(dir.path(), &Snapshot::default(), Duration::ZERO, Some(&cache));
    assert_eq!(scanned.snapshot.files["a.txt"].digest, sha1_hex(b"a"));
}

#[test]
fn the_digest_cache_is_rewritten_when_files_are_removed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = tempfile::tempdir().expect("tempdir");
    let cache = state.path().join("mount.digests");
    write_old(dir.path(), "a.txt", b"a");
    write_old(dir.path(), "b.txt", b"b");
    let first = scan_ok(dir.path(), &Snapshot::default(), Duration::ZERO, Some(&cache));
    fs::remove_file(dir.path().join("b.txt")).expect("rm");
    scan_ok(dir.path(), &first.snapshot, Duration::ZERO, Some(&cache));
    let text = fs::read_to_string(&cache).expect("read cache");
    assert!(text.contains("a.txt") && !text.contains("b.txt"), "{text}");
}

fn meta_of(root: &Path, rel: &str) -> FileMeta {
    let meta = fs::metadata(root.join(rel)).expect("stat");
    FileMeta { size: meta.len(), mtime_ns: mtime_ns(&meta), ..FileMeta::default() }
}

#[test]
fn read_returns_the_bytes_asked_for() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_old(dir.path(), "sub/f.txt", b"0123456789");
    let expect = meta_of(dir.path(), "sub/f.txt");
    assert_eq!(read(dir.path(), "sub/f.txt", 3, 4, &expect), Ok(Bytes::from_static(b"3456")));
    assert_eq!(read(dir.path(), "sub/f.txt", 0, 10, &expect), Ok(Bytes::from_static(b"0123456789")));
    assert_eq!(read(dir.path(), "sub/f.txt", 10, 0, &expect), Ok(Bytes::new()));
    assert_eq!(read(dir.path(), "sub/f.txt", 8, 4, &expect), Err(ReadError::Changed));
    assert_eq!(read(dir.path(), "sub/f.txt", u64::MAX, 4, &expect), Err(ReadError::Changed));
}

#[test]
fn read_refuses_a_file_that_changed() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_old(dir.path(), "f.txt", b"0123456789");
    let expect = meta_of(dir.path(), "f.txt");
    let other_size = FileMeta { size: 11, ..expect.clone() };
    assert_eq!(read(dir.path(), "f.txt", 0, 1, &other_size), Err(ReadError::Changed));
    let other_mtime = FileMeta { mtime_ns: expect.mtime_ns + 1, ..expect.clone() };
    assert_eq!(read(dir.path(), "f.txt", 0, 1, &other_mtime), Err(ReadError::Changed));
    fs::remove_file(dir.path().join("f.txt")).expect("rm");
    assert_eq!(read(dir.path(), "f.txt", 0, 1, &expect), Err(ReadError::Changed));
}

#[test]
fn read_refuses_paths_that_leave_the_root() {
    let outside = tempfile::tempdir().expect("tempdir");
    write_old(outside.path(), "secret", b"secret");
    let dir = tempfile::tempdir().expect("tempdir");
    fs::create_dir(dir.path().join("sub")).expect("mkdir");
    symlink(outside.path().join("secret"), dir.path().join("escape")).expect("symlink");
    let expect = meta_of(outside.path(), "secret");
    let name = outside.path().file_name().and_then(|n| n.to_str()).expect("name");
    for rel in [
        "escape".to_owned(),
        format!("../{name}/secret"),
        format!("sub/../../{name}/secret"),
        outside.path().join("secret").to_string_lossy().into_owned(),
        "sub//x".to_owned(),
        String::new(),
        "./escape".to_owned(),
    ] {
        assert_eq!(read(dir.path(), &rel, 0, 1, &expect), Err(ReadError::Changed), "{rel}");
    }
}

#[test]
fn run_answers_scan_and_read_but_not_watch() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_old(dir.path(), "f", b"abc");
    let scan = Job::Scan {
        mount: 7,
        root: dir.path().to_owned(),
        previous: Arc::default(),
        stable_age: Duration::ZERO,
        digest_cache: None,
    };
    let Some(Done::Scanned { mount: 7, result: Ok(scanned) }) = run(scan) else { panic!("scan") };
    let expect = scanned.snapshot.files["f"].clone();
    let read = Job::Read { root: dir.path().to_owned(), rel: "f".into(), offset: 1, len: 2, expect };
    let Some(Done::Read(Ok(bytes))) = run(read) else { panic!("read") };
    assert_eq!(bytes, Bytes::from_static(b"bc"));
    assert!(run(Job::Watch { mount: 1, root: dir.path().to_owned() }).is_none());
    assert!(run(Job::Unwatch { mount: 1 }).is_none());
}
