use super::*;
use crate::filemq::layout::Placed;

use zbroker_proto::codec::testing::sha1_hex;

fn placed(rel: &str) -> Placed {
    Placed { subscription: 0, rel: rel.to_string() }
}

#[test]
fn a_delivery_is_verified_then_renamed_into_place() {
    let dir = tempfile::tempdir().unwrap();
    let mut inbox = Inbox::open(dir.path()).unwrap();
    let digest = sha1_hex(b"hello world");
    let mut inc =
        inbox.begin(b"/x".to_vec(), placed("a/b/c.txt"), Some(11), Some(digest.clone()), 0).unwrap();
    assert_eq!(inc.temp(), dir.path().join(".filemq/partial").join(&digest));
    inc.write(b"hello ").unwrap();
    inc.write(b"world").unwrap();
    assert_eq!(inbox.deliver(inc, false).unwrap(), 11);
    assert_eq!(fs::read(dir.path().join("a/b/c.txt")).unwrap(), b"hello world");
    assert!(inbox.resumable().unwrap().is_empty());
    assert_eq!(inbox.holdings("").unwrap(), vec![("a/b/c.txt".to_string(), digest)]);

    let mut bad = inbox.begin(b"/x".to_vec(), placed("d.txt"), None, Some(sha1_hex(b"other")), 0).unwrap();
    bad.write(b"not it").unwrap();
    assert!(matches!(inbox.deliver(bad, false), Err(FileError::Integrity(_))));
    assert!(!dir.path().join("d.txt").exists());
    assert!(fs::read_dir(dir.path().join(".filemq/partial")).unwrap().next().is_none());
}

#[test]
fn a_resume_cuts_the_part_back_and_hashes_what_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let inbox = Inbox::open(dir.path()).unwrap();
    let digest = sha1_hex(b"0123456789");
    fs::write(dir.path().join(".filemq/partial").join(&digest), b"0123456XYZ").unwrap();
    assert_eq!(inbox.resumable().unwrap(), vec![(digest.clone(), 10)]);
    let mut inbox = inbox;
    let mut inc = inbox.begin(b"/f".to_vec(), placed("f"), Some(10), Some(digest.clone()), 7).unwrap();
    inc.write(b"789").unwrap();
    inbox.deliver(inc, false).unwrap();
    assert_eq!(fs::read(dir.path().join("f")).unwrap(), b"0123456789");
    assert!(matches!(
        inbox.begin(b"/f".to_vec(), placed("f"), None, Some(digest), 3),
        Err(FileError::Integrity(_))
    ));
    assert!(matches!(inbox.begin(b"/f".to_vec(), placed("f"), None, None, 3), Err(FileError::Integrity(_))));
}

#[test]
fn deletes_remove_emptied_directories_but_not_the_root() {
    let dir = tempfile::tempdir().unwrap();
    let mut inbox = Inbox::open(dir.path()).unwrap();
    fs::create_dir_all(dir.path().join("a/b")).unwrap();
    fs::write(dir.path().join("a/b/f"), b"x").unwrap();
    fs::write(dir.path().join("top"), b"x").unwrap();
    assert_eq!(inbox.delete("a/b/f", false).unwrap(), Deleted::Kept, "not ours");
    assert_eq!(inbox.delete("a/b/f", true).unwrap(), Deleted::Removed);
    assert!(!dir.path().join("a").exists());
    assert_eq!(inbox.delete("top", true).unwrap(), Deleted::Removed);
    assert!(dir.path().exists());
    assert_eq!(inbox.delete("never", true).unwrap(), Deleted::Absent);
}

#[test]
fn symlinks_on_the_way_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    fs::write(outside.path().join("victim"), b"keep").unwrap();
    let mut inbox = Inbox::open(dir.path()).unwrap();
    std::os::unix::fs::symlink(outside.path(), dir.path().join("link")).unwrap();
    std::os::unix::fs::symlink(outside.path().join("victim"), dir.path().join("file")).unwrap();
    assert!(matches!(inbox.check_target("link/victim", true), Err(FileError::Refused(_))));
    assert!(matches!(inbox.check_target("file", true), Err(FileError::Refused(_))));
    assert!(matches!(inbox.delete("link/victim", true), Err(FileError::Refused(_))));
    assert!(matches!(inbox.delete("file", true), Err(FileError::Refused(_))));
    let mut inc = inbox.begin(b"/x".to_vec(), placed("link/new"), None, None, 0).unwrap();
    inc.write(b"evil").unwrap();
    assert!(matches!(inbox.deliver(inc, true), Err(FileError::Refused(_))));
    assert_eq!(fs::read(outside.path().join("victim")).unwrap(), b"keep");
    assert!(!outside.path().join("new").exists());
    assert!(inbox.holdings("").unwrap().is_empty(), "symlinks are not holdings");
}

#[test]
fn the_digest_cache_spares_rehashing_and_forgets_removed_files() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("a"), b"abc").unwrap();
    fs::write(dir.path().join(".hidden"), b"abc").unwrap();
    {
        let mut inbox = Inbox::open(dir.path()).unwrap();
        assert_eq!(inbox.holdings("").unwrap(), vec![("a".to_string(), sha1_hex(b"abc"))]);
        inbox.save_digests(true).unwrap();
    }
    let saved = fs::read_to_string(dir.path().join(".filemq/digests")).unwrap();
    assert!(saved.ends_with(&format!(" {} - a\n", sha1_hex(b"abc"))), "{saved}");
    // A cached digest is believed while size and mtime hold: plant a
    // wrong one to see that it is used.
    let planted = saved.replace(&sha1_hex(b"abc"), &sha1_hex(b"xyz"));
    fs::write(dir.path().join(".filemq/digests"), planted).unwrap();
    let mut inbox = Inbox::open(dir.path()).unwrap();
    assert_eq!(inbox.holdings("").unwrap()[0].1, sha1_hex(b"xyz"));
    fs::remove_file(dir.path().join("a")).unwrap();
    inbox.start_census();
    assert!(inbox.holdings("").unwrap().is_empty());
    inbox.save_digests(true).unwrap();
    assert_eq!(fs::read_to_string(dir.path().join(".filemq/digests")).unwrap(), "filemq-digests 2\n");
}

#[test]
fn one_subscriber_per_inbox() {
    let dir = tempfile::tempdir().unwrap();
    let _first = Inbox::open(dir.path()).unwrap();
    let second = Inbox::open(dir.path()).err().unwrap();
    assert_eq!(second.kind(), io::ErrorKind::WouldBlock);
}

#[test]
fn unnamed_partials_are_cleared_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let partial = dir.path().join(".filemq/partial");
    fs::create_dir_all(&partial).unwrap();
    fs::write(partial.join("tmp-1-2"), b"x").unwrap();
    fs::write(partial.join(sha1_hex(b"x")), b"x").unwrap();
    let inbox = Inbox::open(dir.path()).unwrap();
    assert!(!partial.join("tmp-1-2").exists());
    assert_eq!(inbox.resumable().unwrap(), vec![(sha1_hex(b"x"), 1)]);
}

#[test]
fn a_file_we_did_not_write_is_neither_replaced_nor_deleted_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("thesis.txt"), b"mine").unwrap();
    let mut inbox = Inbox::open(dir.path()).unwrap();
    assert!(matches!(inbox.check_target("thesis.txt", false), Err(FileError::NotOurs)));
    let mut inc = inbox.begin(b"/t".to_vec(), placed("thesis.txt"), None, None, 0).unwrap();
    inc.write(b"theirs").unwrap();
    assert!(matches!(inbox.deliver(inc, false), Err(FileError::NotOurs)));
    assert_eq!(fs::read(dir.path().join("thesis.txt")).unwrap(), b"mine");
    assert_eq!(inbox.delete("thesis.txt", false).unwrap(), Deleted::Kept);
    assert!(inbox.resumable().unwrap().is_empty(), "the refused part is gone");

    // What we deliver is ours: replaced and deleted without a flag.
    let mut inc = inbox.begin(b"/n".to_vec(), placed("new.txt"), None, None, 0).unwrap();
    inc.write(b"v1").unwrap();
    inbox.deliver(inc, false).unwrap();
    inbox.check_target("new.txt", false).unwrap();
    let mut inc = inbox.begin(b"/n".to_vec(), placed("new.txt"), None, None, 0).unwrap();
    inc.write(b"v2").unwrap();
    inbox.deliver(inc, false).unwrap();
    assert_eq!(fs::read(dir.path().join("new.txt")).unwrap(), b"v2");
    inbox.save_digests(false).unwrap();
    drop(inbox);
    // The mark lasts across a restart.
    let mut inbox = Inbox::open(dir.path()).unwrap();
    assert_eq!(inbox.delete("new.txt", false).unwrap(), Deleted::Removed);
    // With the user's word, theirs goes too.
    let mut inc = inbox.begin(b"/t".to_vec(), placed("thesis.txt"), None, None, 0).unwrap();
    inc.write(b"theirs").unwrap();
    inbox.deliver(inc, true).unwrap();
    assert_eq!(fs::read(dir.path().join("thesis.txt")).unwrap(), b"theirs");
}

#[test]
fn a_kill_between_saves_does_not_lose_which_files_are_ours() {
    let dir = tempfile::tempdir().unwrap();
    let mut inbox = Inbox::open(dir.path()).unwrap();
    let mut inc = inbox.begin(b"/f".to_vec(), placed("f"), None, None, 0).unwrap();
    inc.write(b"v1").unwrap();
    inbox.deliver(inc, false).unwrap();
    drop(inbox); // as SIGKILL would: no save
    let mut inbox = Inbox::open(dir.path()).unwrap();
    inbox.check_target("f", false).unwrap();
    inbox.save_digests(false).unwrap();
    assert!(!dir.path().join(".filemq/digests.log").exists(), "the journal is emptied by a save");
    drop(inbox);
    let mut inbox = Inbox::open(dir.path()).unwrap();
    assert_eq!(inbox.delete("f", false).unwrap(), Deleted::Removed);
}

#[test]
fn a_path_too_long_is_refused_before_any_directory_is_made() {
    let dir = tempfile::tempdir().unwrap();
    let inbox = Inbox::open(dir.path()).unwrap();
    let deep = format!("{}z", "a/".repeat(2600));
    assert!(matches!(inbox.check_target(&deep, false), Err(FileError::Refused(_))));
    assert!(!dir.path().join("a").exists());
}

#[test]
fn directories_made_for_a_failed_delivery_are_removed() {
    let dir = tempfile::tempdir().unwrap();
    let mut inbox = Inbox::open(dir.path()).unwrap();
    fs::create_dir(dir.path().join("keep")).unwrap();
    let mut inc = inbox.begin(b"/f".to_vec(), placed("keep/made/for/it"), None, None, 0).unwrap();
    inc.write(b"x").unwrap();
    // The rename fails once the parents are made: its source is gone.
    fs::remove_file(inc.temp()).unwrap();
    assert!(matches!(inbox.deliver(inc, true), Err(FileError::Io(_))));
    assert!(!dir.path().join("keep/made").exists(), "the directories made for it are gone");
    assert!(dir.path().join("keep").is_dir(), "a directory we did not make stays");

    // A symlink planted where a directory is to be made: refused, and
    // nothing is made through it.
    let outside = tempfile::tempdir().unwrap();
    let mut inc = inbox.begin(b"/f".to_vec(), placed("keep/link/x"), None, None, 0).unwrap();
    inc.write(b"x").unwrap();
    std::os::unix::fs::symlink(outside.path(), dir.path().join("keep/link")).unwrap();
    assert!(matches!(inbox.deliver(inc, true), Err(FileError::Refused(_))));
    assert!(fs::read_dir(outside.path()).unwrap().next().is_none());
}

#[test]
fn a_directory_of_the_users_is_not_removed_without_leave_to() {
    let dir = tempfile::tempdir().unwrap();
    let mut inbox = Inbox::open(dir.path()).unwrap();
    fs::create_dir(dir.path().join("empty")).unwrap();
    let mut inc = inbox.begin(b"/e".to_vec(), placed("empty"), None, None, 0).unwrap();
    inc.write(b"file").unwrap();
    assert!(matches!(inbox.deliver(inc, false), Err(FileError::NotOurs)));
    assert!(dir.path().join("empty").is_dir());
    let mut inc = inbox.begin(b"/e".to_vec(), placed("empty"), None, None, 0).unwrap();
    inc.write(b"file").unwrap();
    inbox.deliver(inc, true).unwrap();
    assert_eq!(fs::read(dir.path().join("empty")).unwrap(), b"file");
}

#[test]
fn a_file_saved_anew_at_a_delivered_path_is_the_users() {
    let dir = tempfile::tempdir().unwrap();
    let mut inbox = Inbox::open(dir.path()).unwrap();
    let mut inc = inbox.begin(b"/r".to_vec(), placed("report.txt"), None, None, 0).unwrap();
    inc.write(b"ours").unwrap();
    inbox.deliver(inc, false).unwrap();
    // The user replaces it (a new file renamed over it, as editors do).
    fs::write(dir.path().join("report.new"), b"theirs").unwrap();
    fs::rename(dir.path().join("report.new"), dir.path().join("report.txt")).unwrap();
    assert!(matches!(inbox.check_target("report.txt", false), Err(FileError::NotOurs)));
    assert_eq!(inbox.delete("report.txt", false).unwrap(), Deleted::Kept);
    assert_eq!(fs::read(dir.path().join("report.txt")).unwrap(), b"theirs");
}

#[test]
fn our_private_area_is_ours_alone() {
    let dir = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(outside.path(), dir.path().join(".filemq")).unwrap();
    let refused = Inbox::open(dir.path()).err().unwrap();
    assert!(refused.to_string().contains("symlink"), "{refused}");
    assert!(fs::read_dir(outside.path()).unwrap().next().is_none());

    let dir = tempfile::tempdir().unwrap();
    fs::create_dir(dir.path().join(".filemq")).unwrap();
    fs::set_permissions(dir.path().join(".filemq"), std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .unwrap();
    let victim = outside.path().join("victim");
    fs::write(&victim, b"keep").unwrap();
    fs::create_dir(dir.path().join(".filemq/partial")).unwrap();
    let digest = sha1_hex(b"evil");
    std::os::unix::fs::symlink(&victim, dir.path().join(".filemq/partial").join(&digest)).unwrap();
    std::os::unix::fs::symlink(&victim, dir.path().join(".filemq/digests.new")).unwrap();
    let mut inbox = Inbox::open(dir.path()).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(fs::metadata(dir.path().join(".filemq")).unwrap().permissions().mode() & 0o777, 0o700);
    // A planted partial is neither written through nor resumed from.
    assert!(inbox.resumable().unwrap().is_empty());
    assert!(inbox.begin(b"/e".to_vec(), placed("e"), Some(4), Some(digest.clone()), 3).is_err());
    let mut inc = inbox.begin(b"/e".to_vec(), placed("e"), Some(4), Some(digest), 0).unwrap();
    inc.write(b"evil").unwrap();
    inbox.deliver(inc, false).unwrap();
    assert!(fs::symlink_metadata(dir.path().join("e")).unwrap().is_file());
    // The cache is written as a new file, not through the planted link.
    inbox.save_digests(false).unwrap();
    assert_eq!(fs::read(&victim).unwrap(), b"keep");
}

fn attrs(mode: u32, secs: i64) -> Attrs {
    Attrs { mode, mtime_ns: secs * 1_000_000_000 }
}

fn stat(root: &Path, rel: &str) -> (u32, i64) {
    use std::os::unix::fs::MetadataExt;
    let meta = fs::symlink_metadata(root.join(rel)).unwrap();
    (meta.mode() & 0o7777, meta.mtime())
}

fn deliver(inbox: &mut Inbox, rel: &str, data: &[u8], attrs: Option<Attrs>) -> Result<u64, FileError> {
    let mut inc = inbox.begin(rel.as_bytes().to_vec(), placed(rel), None, None, 0).unwrap();
    inc.attrs = attrs;
    inc.write(data).unwrap();
    inbox.deliver(inc, false)
}

#[test]
fn files_arrive_with_their_attributes_and_directories_keep_their_mtime() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let mut inbox = Inbox::open(root).unwrap();
    // The file before its directory: the directory is made as a parent,
    // then given the publisher's attributes.
    deliver(&mut inbox, "d/f", b"x", Some(attrs(0o751, 1_000))).unwrap();
    assert_eq!(stat(root, "d/f"), (0o751, 1_000));
    assert!(!inbox.make_dir("d", attrs(0o750, 2_000), false).unwrap(), "it was there");
    assert_eq!(stat(root, "d"), (dir_mode(0o750), 2_000));
    // A change inside moves the directory's mtime: it is put back.
    deliver(&mut inbox, "d/g", b"y", None).unwrap();
    assert_eq!(stat(root, "d").1, 2_000);
    inbox.make_link("d/l", "g", 3_000_000_000_123, false).unwrap();
    assert_eq!(fs::read_link(root.join("d/l")).unwrap(), Path::new("g"));
    assert_eq!(stat(root, "d/l").1, 3_000);
    assert_eq!(stat(root, "d").1, 2_000);
    assert_eq!(inbox.delete("d/g", false).unwrap(), Deleted::Removed);
    assert_eq!(stat(root, "d").1, 2_000);
    // Empty, but published: kept.
    assert_eq!(inbox.delete("d/f", false).unwrap(), Deleted::Removed);
    assert_eq!(inbox.delete("d/l", false).unwrap(), Deleted::Removed);
    assert!(root.join("d").is_dir());
    assert!(inbox.make_dir("e/mpty", attrs(0o700, 4_000), false).unwrap());
    let held: Vec<(String, EntryKind)> =
        inbox.entries("", true, None).unwrap().into_iter().map(|h| (h.rel, h.kind)).collect();
    let expect = [("d", EntryKind::Dir), ("e", EntryKind::Dir), ("e/mpty", EntryKind::Dir)];
    assert_eq!(held, expect.map(|(r, k)| (r.to_string(), k)));
    // The publisher's own attributes are what is reported, even where
    // we keep a directory writable for ourselves.
    let d = inbox.entries("", true, None).unwrap().remove(0);
    assert_eq!(d.attrs, attrs(0o750, 2_000));
    // Deleted by the publisher: removed once empty.
    assert_eq!(inbox.delete("e/mpty", false).unwrap(), Deleted::Removed);
    assert!(!root.join("e").exists(), "its parent, made only as a parent, goes with it");
    assert!(inbox.take_removed_dirs().is_empty(), "and that is no delete of the publisher's");
    assert_eq!(inbox.delete("d", false).unwrap(), Deleted::Removed);
    assert!(!root.join("d").exists());
}

#[test]
fn a_directory_still_holding_something_goes_once_emptied() {
    let dir = tempfile::tempdir().unwrap();
    let mut inbox = Inbox::open(dir.path()).unwrap();
    inbox.make_dir("d", attrs(0o755, 1_000), false).unwrap();
    deliver(&mut inbox, "d/f", b"x", None).unwrap();
    // The publisher deletes the directory before its file.
    assert_eq!(inbox.delete("d", false).unwrap(), Deleted::Absent);
    assert!(dir.path().join("d/f").exists());
    assert_eq!(inbox.delete("d/f", false).unwrap(), Deleted::Removed);
    assert!(!dir.path().join("d").exists());
    assert_eq!(inbox.take_removed_dirs(), ["d"], "its delete is reported then");
}

#[test]
fn links_and_directories_of_the_users_are_theirs() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let mut inbox = Inbox::open(root).unwrap();
    fs::create_dir(root.join("mine")).unwrap();
    fs::set_permissions(root.join("mine"), std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    fs::write(root.join("file"), b"mine").unwrap();
    std::os::unix::fs::symlink("file", root.join("link")).unwrap();
    assert!(matches!(inbox.make_dir("mine", attrs(0o777, 1), false), Err(FileError::NotOurs)));
    assert_eq!(stat(root, "mine").0, 0o700, "a directory of yours keeps its mode");
    // One with the publisher's mode (as an older filemq made them) is
    // taken as the mirror's.
    fs::create_dir(root.join("old")).unwrap();
    fs::set_permissions(root.join("old"), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    assert!(!inbox.make_dir("old", attrs(0o755, 3), false).unwrap());
    assert_eq!(stat(root, "old"), (0o755, 3));
    assert!(matches!(inbox.make_dir("file", attrs(0o755, 1), false), Err(FileError::NotOurs)));
    assert!(matches!(inbox.make_link("file", "mine", 1, false), Err(FileError::NotOurs)));
    assert!(matches!(inbox.make_link("link", "mine", 1, false), Err(FileError::NotOurs)));
    assert_eq!(fs::read(root.join("file")).unwrap(), b"mine");
    assert_eq!(fs::read_link(root.join("link")).unwrap(), Path::new("file"));
    assert_eq!(inbox.delete("mine", false).unwrap(), Deleted::Kept);
    assert!(matches!(inbox.delete("link", true), Err(FileError::Refused(_))), "a link of yours stays");
    assert!(matches!(
        inbox.set_attrs("file", &sha1_hex(b"mine"), attrs(0o600, 1), false),
        Err(FileError::NotOurs)
    ));
    // With the user's word, they are taken over.
    assert!(!inbox.make_dir("mine", attrs(0o755, 5), true).unwrap());
    assert_eq!(stat(root, "mine"), (dir_mode(0o755), 5));
    assert_eq!(inbox.set_attrs("file", &sha1_hex(b"mine"), attrs(0o640, 6), true).unwrap(), Applied::Done);
    assert_eq!(stat(root, "file"), (0o640, 6));
    assert_eq!(
        inbox.set_attrs("file", &sha1_hex(b"other"), attrs(0o600, 7), true).unwrap(),
        Applied::Lacking
    );
    assert_eq!(inbox.set_attrs("absent", &sha1_hex(b"x"), attrs(0o600, 7), true).unwrap(), Applied::Lacking);
    inbox.make_link("link", "mine", 8, true).unwrap();
    assert_eq!(fs::read_link(root.join("link")).unwrap(), Path::new("mine"));
    // Ours now: replaced or removed without a word.
    inbox.make_link("link", "file", 9, false).unwrap();
    assert_eq!(inbox.delete("link", false).unwrap(), Deleted::Removed);
}

#[test]
fn no_link_leads_out_and_none_is_written_through() {
    let dir = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    fs::write(outside.path().join("victim"), b"keep").unwrap();
    let root = dir.path();
    let mut inbox = Inbox::open(root).unwrap();
    for target in ["../x", "/etc/passwd", "a/../../x", ".filemq/digests", "a/./b", ""] {
        assert!(matches!(inbox.make_link("l", target, 1, true), Err(FileError::Refused(_))), "{target}");
    }
    assert!(matches!(inbox.make_link("d/l", "../../x", 1, true), Err(FileError::Refused(_))));
    assert!(!root.join("d").exists(), "nothing made for a refused link");
    // A link of ours is replaced by a file, never written through.
    inbox.make_link("l", "d", 1, false).unwrap();
    std::fs::remove_file(root.join("l")).unwrap();
    std::os::unix::fs::symlink(outside.path().join("victim"), root.join("l")).unwrap();
    // Refused, or (its inode reused) replaced: never written through.
    let _ = deliver(&mut inbox, "l", b"evil", None);
    assert_eq!(fs::read(outside.path().join("victim")).unwrap(), b"keep");
    inbox.make_link("m", "d", 1, false).unwrap();
    deliver(&mut inbox, "m", b"file", None).unwrap();
    assert!(fs::symlink_metadata(root.join("m")).unwrap().is_file());
    // Attributes never go through a link.
    assert_eq!(inbox.set_attrs("l", &sha1_hex(b"keep"), attrs(0o777, 1), true).unwrap(), Applied::Lacking);
    use std::os::unix::fs::PermissionsExt;
    assert_ne!(fs::metadata(outside.path().join("victim")).unwrap().permissions().mode() & 0o777, 0o777);
}

#[test]
fn marks_of_links_and_directories_survive_a_kill() {
    let dir = tempfile::tempdir().unwrap();
    let mut inbox = Inbox::open(dir.path()).unwrap();
    inbox.make_dir("d", attrs(0o755, 1), false).unwrap();
    inbox.make_link("d/l", "x", 1, false).unwrap();
    drop(inbox); // as SIGKILL would: no save
    let mut inbox = Inbox::open(dir.path()).unwrap();
    assert_eq!(inbox.delete("d/l", false).unwrap(), Deleted::Removed);
    assert!(dir.path().join("d").is_dir(), "still known as published");
    assert_eq!(inbox.delete("d", false).unwrap(), Deleted::Removed);
}

#[test]
fn partial_files_kept_for_resume_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let inbox = Inbox::open(dir.path()).unwrap();
    for i in 0..MAX_PARTIALS + 5 {
        let digest = sha1_hex(format!("file {i}").as_bytes());
        let mut inc = inbox.begin(b"/p".to_vec(), placed("p"), None, Some(digest), 0).unwrap();
        inc.write(b"part").unwrap();
        inbox.abandon(inc, true);
    }
    assert_eq!(inbox.resumable().unwrap().len(), MAX_PARTIALS);
    let digest = sha1_hex(b"dropped");
    let inc = inbox.begin(b"/p".to_vec(), placed("p"), None, Some(digest), 0).unwrap();
    inbox.abandon(inc, false);
    assert_eq!(inbox.resumable().unwrap().len(), MAX_PARTIALS);
}
