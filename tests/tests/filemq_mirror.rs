//! Faithful mirrors with the real programs: a tree with modes, old mtimes,
//! links inside and out, an empty directory and a chmod, mirrored by
//! `zbroker` + `filemq` exactly as `rsync -a` copies it (compared as
//! `find DIR -printf '%P %m %T@ %y %l\n' | sort` lists them, the link
//! that leads out left aside), and against a listing the test builds
//! itself, so it proves something where rsync is missing.

use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use zbroker_tests::{bin, put, wait_timeout, wait_until, Broker, Subscriber};

fn path_arg(dir: &Path) -> &str {
    dir.to_str().expect("temporary paths are UTF-8")
}

/// `find DIR -printf '%P %m %T@ %y %l\n' | sort`, without the root itself,
/// our private `.filemq` and the names in `leave_out`.
fn listing(dir: &Path, leave_out: &[&str]) -> Vec<String> {
    let out = Command::new("find").arg(dir).args(["-printf", "%P %m %T@ %y %l\\n"]).output().expect("find");
    assert!(out.status.success(), "find failed: {}", String::from_utf8_lossy(&out.stderr));
    let mut lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| {
            let name = l.split(' ').next().unwrap_or_default();
            !name.is_empty()
                && name != ".filemq"
                && !name.starts_with(".filemq/")
                && !leave_out.contains(&name)
        })
        .map(str::to_string)
        .collect();
    lines.sort();
    lines
}

/// `touch -h -d @SECS`: the entry's own mtime (a link's, not its target's).
fn set_mtime(path: &Path, secs: i64) {
    let status =
        Command::new("touch").args(["-h", "-d", &format!("@{secs}")]).arg(path).status().expect("touch");
    assert!(status.success());
}

fn set_mode(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// The issue's tree; returns the listing it must mirror to, as the test
/// knows it (mode, mtime, type, target per entry).
fn build(root: &Path, outside: &Path) -> Vec<String> {
    put(root, "bin/run.sh", b"#!/bin/sh\necho hi\n");
    put(root, "secret.txt", b"private");
    put(root, "docs/readme", b"read me");
    std::fs::create_dir(root.join("empty")).unwrap();
    symlink("docs/readme", root.join("link-in")).unwrap();
    symlink("docs", root.join("link-dir")).unwrap();
    symlink(outside.join("elsewhere"), root.join("link-out")).unwrap();
    let entries: [(&str, u32, i64, char, &str); 9] = [
        ("bin/run.sh", 0o755, 1_000_000_001, 'f', ""),
        ("secret.txt", 0o600, 1_000_000_002, 'f', ""),
        ("docs/readme", 0o644, 1_000_000_003, 'f', ""),
        ("link-in", 0o777, 1_000_000_004, 'l', "docs/readme"),
        ("link-dir", 0o777, 1_000_000_005, 'l', "docs"),
        // Directories last: what is made inside them moves their mtime.
        ("bin", 0o755, 1_000_000_006, 'd', ""),
        ("docs", 0o750, 1_000_000_007, 'd', ""),
        ("empty", 0o700, 1_000_000_008, 'd', ""),
        ("link-out", 0o777, 1_000_000_009, 'l', ""),
    ];
    let mut expect = Vec::new();
    for (rel, mode, secs, kind, target) in entries {
        let path = root.join(rel);
        if kind != 'l' {
            set_mode(&path, mode);
        }
        set_mtime(&path, secs);
        if rel != "link-out" {
            expect.push(format!("{rel} {mode:o} {secs}.0000000000 {kind} {target}"));
        }
    }
    expect.sort();
    expect
}

fn rsync_copy(from: &Path, to: &Path) -> bool {
    if Command::new("rsync").arg("--version").output().is_err() {
        eprintln!(
            "SKIPPED the rsync comparison: rsync is not installed (the test's own listing is still checked)"
        );
        return false;
    }
    let status = Command::new("rsync")
        .args(["-a", &format!("{}/", path_arg(from)), &format!("{}/", path_arg(to))])
        .status()
        .expect("rsync");
    assert!(status.success(), "rsync -a failed");
    true
}

fn once(broker: &Broker, inbox: &Path) -> std::process::Output {
    once_with(broker, inbox, &[])
}

#[test]
fn a_tree_mirrors_as_rsync_copies_it_and_a_chmod_alone_follows() {
    let publisher = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let inbox = tempfile::tempdir().unwrap();
    let copy = tempfile::tempdir().unwrap();
    let expect = build(publisher.path(), outside.path());
    assert_eq!(listing(publisher.path(), &["link-out"]), expect, "the test's own tree");
    let rsync = rsync_copy(publisher.path(), copy.path());

    let broker = Broker::start(&["--publish", path_arg(publisher.path()), "--stable-age", "200"]);
    let out = once(&broker, inbox.path());
    assert!(out.status.success(), "filemq --once failed: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(listing(inbox.path(), &[]), expect, "the mirror");
    assert!(std::fs::symlink_metadata(inbox.path().join("link-out")).is_err(), "a link out is not published");
    if rsync {
        assert_eq!(listing(copy.path(), &["link-out"]), expect, "rsync -a");
    }
    // Links as links, not copies of their targets: the content of the
    // three files went once.
    let files = 18 + 7 + 7;
    assert_eq!(broker.filemq_bytes_sent(), files, "only the regular files' bytes");

    // A chmod alone reaches a running subscriber, without the content.
    let sub = Subscriber::start(&["/", "--inbox", path_arg(inbox.path()), "--broker", &broker.name]);
    assert!(wait_until(Duration::from_secs(20), || broker.filemq()["subscribers"]
        .as_array()
        .is_some_and(|s| !s.is_empty())));
    std::thread::sleep(Duration::from_millis(300));
    set_mode(&publisher.path().join("secret.txt"), 0o640);
    sub.expect_line("updated secret.txt", Duration::from_secs(20));
    let expect: Vec<String> =
        expect.iter().map(|l| l.replace("secret.txt 600 ", "secret.txt 640 ")).collect();
    assert!(
        wait_until(Duration::from_secs(10), || listing(inbox.path(), &[]) == expect),
        "{:?}",
        listing(inbox.path(), &[])
    );
    assert_eq!(broker.filemq_bytes_sent(), files, "no content sent again");
    if rsync {
        rsync_copy(publisher.path(), copy.path());
        assert_eq!(listing(copy.path(), &["link-out"]), expect, "rsync -a after the chmod");
    }
    drop(sub);

    // A touch alone, while nobody listens: the next session brings it.
    set_mtime(&publisher.path().join("docs/readme"), 1_100_000_000);
    std::thread::sleep(Duration::from_millis(400));
    let out = once(&broker, inbox.path());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let expect: Vec<String> = expect
        .iter()
        .map(|l| l.replace("docs/readme 644 1000000003.", "docs/readme 644 1100000000."))
        .collect();
    assert_eq!(listing(inbox.path(), &[]), expect);
    assert_eq!(broker.filemq_bytes_sent(), files, "still no content sent again");
    assert!(String::from_utf8_lossy(&out.stdout).lines().any(|l| l == "updated docs/readme"));
}

fn once_with(broker: &Broker, inbox: &Path, extra: &[&str]) -> std::process::Output {
    let mut child = Command::new(bin("filemq"))
        .args(["subscribe", "/", "--inbox", path_arg(inbox), "--broker", &broker.name, "--once"])
        .args(extra)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    assert!(wait_timeout(&mut child, Duration::from_secs(60)).is_some(), "filemq --once did not finish");
    child.wait_with_output().unwrap()
}

/// `--exclude` against our broker: what is excluded is never sent (the
/// broker's byte count says so), and a local file it covers survives a
/// `--delete` of the publisher's delete.
#[test]
fn exclusions_are_never_sent_and_never_deleted() {
    let publisher = tempfile::tempdir().unwrap();
    let root = publisher.path();
    put(root, "keep.txt", b"keep");
    put(root, "big.log", &vec![b'l'; 2 << 20]);
    put(root, "cache/c.bin", &vec![b'c'; 1 << 20]);
    put(root, "sub/note.txt", b"note");
    put(root, "sub/deep/x.log", b"x");
    for rel in ["keep.txt", "big.log", "cache/c.bin", "sub/note.txt", "sub/deep/x.log"] {
        set_mtime(&root.join(rel), 1_000_000_000);
    }
    let broker = Broker::start(&["--publish", path_arg(root), "--stable-age", "200"]);
    let excludes = ["--exclude", "*.log", "--exclude", "cache/"];

    let fresh = tempfile::tempdir().unwrap();
    let out = once_with(&broker, fresh.path(), &excludes);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(broker.filemq_bytes_sent(), 8, "only keep.txt and sub/note.txt were sent");
    let names: Vec<String> =
        listing(fresh.path(), &[]).iter().map(|l| l.split(' ').next().unwrap().to_string()).collect();
    assert_eq!(names, ["keep.txt", "sub", "sub/deep", "sub/note.txt"]);

    // A full mirror, then the publisher deletes what is excluded: with
    // --delete and the exclusions, the local copies stay.
    let inbox = tempfile::tempdir().unwrap();
    let out = once_with(&broker, inbox.path(), &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::remove_file(root.join("big.log")).unwrap();
    std::fs::remove_dir_all(root.join("cache")).unwrap();
    std::fs::remove_file(root.join("keep.txt")).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let mut args = excludes.to_vec();
    args.push("--delete");
    let out = once_with(&broker, inbox.path(), &args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "deleted keep.txt");
    assert_eq!(std::fs::read(inbox.path().join("big.log")).unwrap().len(), 2 << 20);
    assert!(inbox.path().join("cache/c.bin").exists());
    assert!(!inbox.path().join("keep.txt").exists());
}

/// Every entry under `dir`, `.filemq` included, with its mode, mtime,
/// kind, target and content: what "changes nothing" is checked against.
fn everything(dir: &Path) -> Vec<String> {
    let out =
        Command::new("find").arg(dir).args(["-printf", "%P %m %T@ %y %l %s\\n"]).output().expect("find");
    let mut lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let name = l.split(' ').next().unwrap_or_default();
            match std::fs::read(dir.join(name)) {
                Ok(bytes) if !name.is_empty() => format!("{l} {}", zbroker_tests::sha1_hex(&bytes)),
                _ => l.to_string(),
            }
        })
        .collect();
    lines.sort();
    lines
}

fn sorted_lines(out: &std::process::Output) -> Vec<String> {
    let mut lines: Vec<String> = String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect();
    lines.sort();
    lines
}

/// `--dry-run` against our broker: it lists what a run would create,
/// update and delete, changes nothing (not even `.filemq/`), costs the
/// broker no read; the run that follows does exactly that.
#[test]
fn a_dry_run_lists_what_a_run_would_do_and_changes_nothing() {
    let publisher = tempfile::tempdir().unwrap();
    let root = publisher.path();
    for (rel, data) in [("a.txt", "a"), ("b.txt", "b"), ("d/c.txt", "c")] {
        put(root, rel, data.as_bytes());
        set_mtime(&root.join(rel), 1_000_000_000);
    }
    symlink("a.txt", root.join("link")).unwrap();
    let broker = Broker::start(&["--publish", path_arg(root), "--stable-age", "200"]);

    // Nothing there yet: everything would be created, and nothing is.
    let parent = tempfile::tempdir().unwrap();
    let absent = parent.path().join("absent");
    let out = once_with(&broker, &absent, &["--dry-run"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        sorted_lines(&out),
        ["create a.txt", "create b.txt", "create d", "create d/c.txt", "create link"]
    );
    assert!(!absent.exists(), "no inbox made");

    let inbox = tempfile::tempdir().unwrap();
    let out = once_with(&broker, inbox.path(), &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    put(inbox.path(), "mine.txt", b"mine");
    put(root, "b.txt", b"b, changed");
    put(root, "new.txt", b"new");
    set_mode(&root.join("a.txt"), 0o600);
    std::fs::remove_dir_all(root.join("d")).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let sent = broker.filemq_bytes_sent();
    let before = everything(inbox.path());

    let out = once_with(&broker, inbox.path(), &["--dry-run"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let plan = sorted_lines(&out);
    assert_eq!(plan, ["create new.txt", "delete d", "delete d/c.txt", "update a.txt", "update b.txt"]);
    let summary = String::from_utf8_lossy(&out.stderr);
    assert!(
        summary.contains(
            "dry run, nothing changed: 1 to create, 2 to update, 2 to delete; kept 1 local file(s)"
        ),
        "{summary}"
    );
    assert_eq!(everything(inbox.path()), before, "a dry run changes nothing, .filemq included");
    assert_eq!(broker.filemq_bytes_sent(), sent, "a listing reads and sends no content");

    let out = once_with(&broker, inbox.path(), &["--dry-run", "--json"]);
    assert!(out.status.success());
    let events: Vec<serde_json::Value> =
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(events.contains(&serde_json::json!({ "event": "create", "path": "new.txt", "size": 3 })));
    let summary = events.last().unwrap();
    assert_eq!((summary["dry_run"].as_bool(), summary["create"].as_u64()), (Some(true), Some(1)));
    assert_eq!(everything(inbox.path()), before);

    // The run does what was listed.
    let out = once_with(&broker, inbox.path(), &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let done: Vec<String> = sorted_lines(&out)
        .iter()
        .map(|l| l.replacen("updated ", "", 1).replacen("deleted ", "", 1))
        .collect();
    let listed: Vec<String> = plan.iter().map(|l| l.split_once(' ').unwrap().1.to_string()).collect();
    let (mut done, mut listed) = (done, listed);
    done.sort();
    listed.sort();
    assert_eq!(done, listed);
}

/// Subscriptions below the published root, one (the inbox mirrors that
/// directory) or several (full paths): directories arrive with their
/// attributes, and the subscribed directory itself is the inbox's, never
/// an entry refused in it.
#[test]
fn subscriptions_below_the_root_mirror_their_directories() {
    let publisher = tempfile::tempdir().unwrap();
    let root = publisher.path();
    put(root, "photos/2024/a.jpg", b"a");
    put(root, "docs/readme", b"r");
    std::fs::create_dir(root.join("photos/empty")).unwrap();
    for rel in ["photos/2024/a.jpg", "photos/2024", "photos/empty", "photos", "docs/readme", "docs"] {
        set_mtime(&root.join(rel), 1_000_000_000);
    }
    let broker = Broker::start(&["--publish", path_arg(root), "--stable-age", "200"]);
    let one = tempfile::tempdir().unwrap();
    let out = Command::new(bin("filemq"))
        .args(["subscribe", "/photos", "--inbox", path_arg(one.path()), "--broker", &broker.name, "--once"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let names = |dir: &Path| -> Vec<String> {
        listing(dir, &[]).iter().map(|l| l.split(' ').take(3).collect::<Vec<_>>().join(" ")).collect()
    };
    let mode =
        |rel: &str| format!("{:o}", std::fs::metadata(root.join(rel)).unwrap().permissions().mode() & 0o777);
    assert_eq!(
        names(one.path()),
        [
            format!("2024 {} 1000000000.0000000000", mode("photos/2024")),
            "2024/a.jpg 644 1000000000.0000000000".to_string(),
            format!("empty {} 1000000000.0000000000", mode("photos/empty")),
        ]
    );
    let both = tempfile::tempdir().unwrap();
    let out = Command::new(bin("filemq"))
        .args(["subscribe", "/photos", "/docs", "--inbox", path_arg(both.path()), "--broker", &broker.name])
        .args(["--once"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let got = names(both.path());
    assert!(got.contains(&"docs/readme 644 1000000000.0000000000".to_string()), "{got:?}");
    assert!(got.contains(&"photos/2024/a.jpg 644 1000000000.0000000000".to_string()), "{got:?}");
    assert!(got.iter().any(|l| l.starts_with("photos/empty ")), "{got:?}");
}
