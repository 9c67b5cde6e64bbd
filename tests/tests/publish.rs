//! Run-time mounts (`zbroker publish` / `unpublish`) against the real
//! broker and subscriber: kept across SIGHUP and restarts in the state
//! directory the config file names, found by the commands without being
//! told; and an alias that lies inside another mount's tree.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;
use zbroker_tests::{bin, put, signal, unique_name, wait_until, Broker, Subscriber};

const LIMIT: Duration = Duration::from_secs(20);

fn zbroker(args: &[&str]) -> Output {
    Command::new(bin("zbroker")).args(args).output().expect("run zbroker")
}

/// Runs `zbroker ARGS`, expecting success; returns its standard output.
fn ok(args: &[&str]) -> String {
    let out = zbroker(args);
    assert!(out.status.success(), "zbroker {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `zbroker ARGS`, expecting exit status `code`; returns its one
/// line of standard error.
fn refused(args: &[&str], code: i32) -> String {
    let out = zbroker(args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(code), "zbroker {args:?}: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    stderr
}

/// Every line the subscriber has printed so far, added to `seen`.
fn drain(subscriber: &Subscriber, seen: &mut Vec<String>) {
    seen.extend(subscriber.lines.try_iter());
}

fn aliases(broker: &Broker) -> Vec<String> {
    let mounts = broker.filemq()["mounts"].as_array().cloned().unwrap_or_default();
    let mut all: Vec<String> = mounts
        .iter()
        .map(|m| format!("{} {}", m["alias"].as_str().unwrap_or("?"), m["origin"].as_str().unwrap_or("?")))
        .collect();
    all.sort();
    all
}

fn text(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// publish → SIGHUP → restart → unpublish, with the state directory set in
/// the config file only: the commands find it by asking the broker.
#[test]
fn run_time_mounts_last_across_sighup_and_restart_until_unpublished() {
    let work = tempfile::tempdir().unwrap();
    let (outbox, photos, inbox, state) = (
        work.path().join("outbox"),
        work.path().join("photos"),
        work.path().join("inbox"),
        work.path().join("state"),
    );
    put(&outbox, "a.txt", b"a");
    put(&photos, "p.jpg", b"jpeg");
    // The user's own file where the run-time mount's files land.
    put(&inbox, "photos/mine.txt", b"mine");
    let config = work.path().join("zbroker.toml");
    std::fs::write(
        &config,
        format!(
            "publish = [{:?}]\nstate_dir = {:?}\nstable_age = 100\n",
            outbox.to_str().unwrap(),
            state.to_str().unwrap()
        ),
    )
    .unwrap();
    let name = unique_name("pub");
    let start = || Broker::start_as_configured(&name, &["--config", config.to_str().unwrap()], |_| {});
    let mut broker = start();
    let subscriber = Subscriber::start(&["/", "--inbox", inbox.to_str().unwrap(), "--broker", &name]);
    let mut seen = Vec::new();
    assert!(wait_until(LIMIT, || inbox.join("a.txt").exists()));

    let said = ok(&["publish", &name, photos.to_str().unwrap(), "/photos"]);
    let kept_in = state.join("mounts");
    assert!(said.contains(&format!("as /photos (kept in {})", kept_in.display())), "{said}");
    assert!(text(&kept_in).contains(&format!("/photos\t{}\n", photos.display())), "{}", text(&kept_in));
    assert!(wait_until(LIMIT, || text(&inbox.join("photos/p.jpg")) == "jpeg"));
    assert_eq!(aliases(&broker), vec!["/ config", "/photos runtime"]);

    // SIGHUP re-reads the config: its mounts only.
    signal(&broker.child, libc::SIGHUP);
    assert!(wait_until(LIMIT, || broker.status()["reloads"] == 1));
    assert_eq!(aliases(&broker), vec!["/ config", "/photos runtime"]);
    put(&photos, "q.jpg", b"after the reload");
    assert!(wait_until(LIMIT, || inbox.join("photos/q.jpg").exists()), "still published after SIGHUP");

    // A restart restores it from the state directory.
    assert!(broker.terminate().success());
    broker = start();
    assert_eq!(aliases(&broker), vec!["/ config", "/photos runtime"]);
    put(&photos, "r.jpg", b"after the restart");
    assert!(wait_until(LIMIT, || inbox.join("photos/r.jpg").exists()), "still published after a restart");
    drain(&subscriber, &mut seen);
    assert!(!seen.iter().any(|l| l.starts_with("deleted")), "nothing was deleted meanwhile: {seen:?}");
    for held in ["photos/p.jpg", "photos/q.jpg", "a.txt"] {
        assert!(inbox.join(held).exists(), "{held} is still there");
    }

    // A config mount is not the commands' to remove; nor is what is not there.
    let e = refused(&["unpublish", &name, "/"], 5);
    assert!(e.contains("comes from the command line or config file"), "{e}");
    let e = refused(&["unpublish", &name, "/nowhere"], 5);
    assert!(e.contains("nothing is published as /nowhere"), "{e}");

    let said = ok(&["unpublish", &name, "/photos"]);
    assert!(said.starts_with("no longer publishing "), "{said}");
    assert_eq!(aliases(&broker), vec!["/ config"]);
    // What the subscriber delivered from it goes; the user's file stays.
    assert!(
        wait_until(LIMIT, || !inbox.join("photos/r.jpg").exists() && !inbox.join("photos/p.jpg").exists())
    );
    assert_eq!(text(&inbox.join("photos/mine.txt")), "mine");
    assert!(inbox.join("a.txt").exists());
    assert!(!text(&kept_in).contains("/photos"), "{}", text(&kept_in));
    assert!(broker.terminate().success());
    let broker = start();
    assert_eq!(aliases(&broker), vec!["/ config"], "unpublished for good");
}

/// The control token a `--state-dir` points to must be the named broker's.
#[test]
fn publish_refuses_another_brokers_token() {
    let broker = Broker::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let token = broker.state_dir().unwrap().join("control-token");
    assert!(text(&token).ends_with(&format!(" {}\n", broker.name)), "the token file names its broker");
    std::fs::write(dir.path().join("control-token"), "0123 someone-else\n").unwrap();
    let e = refused(
        &[
            "publish",
            &broker.name,
            dir.path().to_str().unwrap(),
            "/x",
            "--state-dir",
            dir.path().to_str().unwrap(),
        ],
        1,
    );
    assert!(e.contains("belongs to broker \"someone-else\""), "{e}");
}

/// `/extra` over the `/` mount's `outbox/extra/`: the longer alias serves
/// `/extra/...`, the log says once what it hides, the status shows it, and
/// the subscriber follows it both ways. `/photos` over nothing (the
/// README's config) hides nothing and is not warned of.
#[test]
fn a_longer_alias_hides_the_directory_under_it_and_says_so_once() {
    let work = tempfile::tempdir().unwrap();
    let (outbox, other, photos, inbox) = (
        work.path().join("outbox"),
        work.path().join("other"),
        work.path().join("photos"),
        work.path().join("inbox"),
    );
    put(&outbox, "a.txt", b"a");
    put(&outbox, "extra/o.txt", b"outer");
    put(&other, "x.txt", b"x");
    put(&photos, "p.jpg", b"jpeg");
    let log = work.path().join("broker.log");
    let log_file = std::fs::File::create(&log).unwrap();
    let name = unique_name("ovl");
    let broker =
        Broker::start_with(&name, &["--publish", outbox.to_str().unwrap(), "--stable-age", "100"], |c| {
            c.stderr(Stdio::from(log_file));
        });
    let subscriber = Subscriber::start(&["/", "--inbox", inbox.to_str().unwrap(), "--broker", &name]);
    assert!(wait_until(LIMIT, || text(&inbox.join("extra/o.txt")) == "outer"));

    ok(&["publish", &name, photos.to_str().unwrap(), "/photos"]);
    ok(&["publish", &name, other.to_str().unwrap(), "/extra"]);
    assert!(wait_until(LIMIT, || inbox.join("extra/x.txt").exists() && !inbox.join("extra/o.txt").exists()));
    assert!(inbox.join("photos/p.jpg").exists() && inbox.join("a.txt").exists());
    // Another hidden file: counted, not warned of again.
    put(&outbox, "extra/p.txt", b"also hidden");
    let hidden = |alias: &str| -> serde_json::Value {
        let mounts = broker.filemq()["mounts"].as_array().cloned().unwrap_or_default();
        mounts.iter().find(|m| m["alias"] == alias).map(|m| m["hides"].clone()).unwrap_or_default()
    };
    assert!(wait_until(LIMIT, || hidden("/extra")[0]["files"] == 2), "{}", hidden("/extra"));
    assert_eq!(hidden("/extra")[0]["dir"], outbox.join("extra").to_str().unwrap());
    assert_eq!(hidden("/photos")[0]["files"], 0);
    let human = ok(&["status", &name]);
    let line = format!(
        "mount /extra <- {} (1 files, 1 bytes, run-time; hides 2 file(s) of mount / in {})",
        other.display(),
        outbox.join("extra").display()
    );
    assert!(human.contains(&line), "{human}");
    let logged = text(&log);
    let warnings: Vec<&str> = logged.lines().filter(|l| l.contains(" hides ")).collect();
    assert_eq!(warnings.len(), 1, "{logged}");
    assert!(
        warnings[0].contains(&format!(
            "/extra ({}) hides {} of the mount /",
            other.display(),
            outbox.join("extra").display()
        )),
        "{logged}"
    );
    assert!(!inbox.join("extra/p.txt").exists());

    ok(&["unpublish", &name, "/extra"]);
    assert!(wait_until(LIMIT, || {
        text(&inbox.join("extra/o.txt")) == "outer"
            && inbox.join("extra/p.txt").exists()
            && !inbox.join("extra/x.txt").exists()
    }));
    drop(subscriber);
}

/// A restart that finds a kept mount's directory missing keeps the mount
/// (shown with its error) and deletes nothing downstream; once the
/// directory is back it is served again. The broker runs elsewhere with a
/// relative `--state-dir`: the commands still find it.
#[test]
fn a_kept_mount_whose_directory_is_missing_stays_and_deletes_nothing() {
    let work = tempfile::tempdir().unwrap();
    let (outbox, photos, away, inbox) = (
        work.path().join("outbox"),
        work.path().join("photos"),
        work.path().join("photos.away"),
        work.path().join("inbox"),
    );
    put(&outbox, "a.txt", b"a");
    put(&photos, "p.jpg", b"jpeg");
    let name = unique_name("miss");
    let args = ["--publish", outbox.to_str().unwrap(), "--state-dir", "state", "--stable-age", "100"];
    let start = || {
        Broker::start_as_configured(&name, &args, |c| {
            c.current_dir(work.path());
        })
    };
    let mut broker = start();
    assert_eq!(broker.status()["state_dir"], work.path().join("state").to_str().unwrap());
    ok(&["publish", &name, photos.to_str().unwrap(), "/photos"]);
    let once = || {
        let out = Command::new(bin("filemq"))
            .args(["subscribe", "/", "--inbox", inbox.to_str().unwrap(), "--broker", &name])
            .args(["--once", "--timeout", "20000"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    once();
    assert_eq!(text(&inbox.join("photos/p.jpg")), "jpeg");

    assert!(broker.terminate().success());
    std::fs::rename(&photos, &away).unwrap();
    broker = start();
    let photos_mount = |broker: &Broker| {
        let mounts = broker.filemq()["mounts"].as_array().cloned().unwrap_or_default();
        mounts.into_iter().find(|m| m["alias"] == "/photos").unwrap_or_default()
    };
    assert!(wait_until(LIMIT, || photos_mount(&broker)["error"].is_string()), "{}", photos_mount(&broker));
    assert_eq!(photos_mount(&broker)["origin"], "runtime");
    let said = once();
    assert!(!said.contains("deleted"), "{said}");
    assert_eq!(text(&inbox.join("photos/p.jpg")), "jpeg", "the mirror kept the file");

    std::fs::rename(&away, &photos).unwrap();
    put(&photos, "q.jpg", b"back");
    assert!(wait_until(LIMIT, || photos_mount(&broker)["error"].is_null()));
    once();
    assert_eq!(text(&inbox.join("photos/q.jpg")), "back");
}

/// SIGHUP hands the config's mounts to FILEMQ as paths, not words: a
/// directory whose name is not UTF-8 (reached through a symlink, as a
/// TOML string cannot name it) is published as it is.
#[test]
fn a_reload_publishes_a_directory_whose_name_is_not_utf8() {
    use std::os::unix::ffi::OsStrExt as _;
    let work = tempfile::tempdir().unwrap();
    let (outbox, inbox) = (work.path().join("outbox"), work.path().join("inbox"));
    let odd = work.path().join(std::ffi::OsStr::from_bytes(b"men\xfc"));
    put(&outbox, "a.txt", b"a");
    put(&odd, "soup.txt", b"soup");
    let link = work.path().join("menu-link");
    std::os::unix::fs::symlink(&odd, &link).unwrap();
    let config = work.path().join("zbroker.toml");
    let write_config = |publish: &[String]| {
        let state = work.path().join("state");
        let text =
            format!("publish = {publish:?}\nstate_dir = {:?}\nstable_age = 100\n", state.to_str().unwrap());
        std::fs::write(&config, text).unwrap();
    };
    let outbox_mount = outbox.to_str().unwrap().to_string();
    write_config(std::slice::from_ref(&outbox_mount));
    let name = unique_name("odd");
    let broker = Broker::start_as_configured(&name, &["--config", config.to_str().unwrap()], |_| {});
    let subscriber = Subscriber::start(&["/", "--inbox", inbox.to_str().unwrap(), "--broker", &name]);
    assert!(wait_until(LIMIT, || inbox.join("a.txt").exists()));

    write_config(&[outbox_mount, format!("{}=/menu", link.to_str().unwrap())]);
    signal(&broker.child, libc::SIGHUP);
    assert!(wait_until(LIMIT, || broker.status()["reloads"] == 1));
    assert_eq!(broker.status()["reload_errors"], 0);
    assert_eq!(aliases(&broker), vec!["/ config", "/menu config"]);
    let mounts = broker.filemq()["mounts"].as_array().cloned().unwrap_or_default();
    let menu = mounts.iter().find(|m| m["alias"] == "/menu").expect("the /menu mount");
    let escaped = zbroker_proto::escape::escape(odd.as_os_str().as_bytes());
    assert!(escaped.ends_with("men\\xfc"), "{escaped}");
    assert_eq!(menu["root"], escaped, "the directory itself, not the link or a lossy name");
    assert!(
        wait_until(LIMIT, || text(&inbox.join("menu/soup.txt")) == "soup"),
        "the subscriber gets its file"
    );
    drop(subscriber);
}
