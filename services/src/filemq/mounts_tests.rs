//! Run-time mounts (kept in the state directory, changed one at a time,
//! answered once saved) and overlapping aliases (the longest serves the
//! paths under it; subscribers are told at once what a mount hides or
//! reveals).

use super::command::{Command, ConfigMount, MountError, RuntimeHeld};
use super::tests::{config, icanhaz, nom, ohai, replace_mounts, send, sha1_hex, take, world, world_with};
use super::*;
use crate::sim::Sim;
use crate::{Service as _, Success};
use std::path::Path;

fn put(root: &Path, rel: &str, data: &[u8]) {
    let path = root.join(rel);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, data).unwrap();
}

/// What a subscriber was told, sorted: `+PATH` a file arrived whole,
/// `-PATH` a delete.
fn events(msgs: Vec<FilemqMsg>) -> Vec<String> {
    let mut events: Vec<String> = msgs
        .into_iter()
        .filter_map(|m| match m {
            FilemqMsg::Cheezburger {
                operation: zbroker_proto::filemq::Operation::Delete, filename, ..
            } => Some(format!("-{}", filename.to_string_lossy())),
            FilemqMsg::Cheezburger { eof: 1, filename, .. } if !filename.0.is_empty() => {
                Some(format!("+{}", filename.to_string_lossy()))
            }
            _ => None,
        })
        .collect();
    events.sort();
    events
}

/// Subscribes `conn` to `/` with RESYNC and plenty of credit.
fn subscribe(sim: &mut Sim<Filemq>, conn: u64) -> Vec<String> {
    send(sim, conn, ohai());
    send(sim, conn, icanhaz("/", &[("RESYNC", "1")], &[]));
    send(sim, conn, nom(10_000_000));
    events(take(sim, conn))
}

fn publish(sim: &mut Sim<Filemq>, dir: &Path, alias: &str) -> Result<Success, CommandError> {
    sim.command(&["PUBLISH", dir.to_str().unwrap(), alias]).expect("an answer")
}

/// An answer as the operator reads it.
fn shown(answer: Option<Result<Success, CommandError>>) -> Option<Result<String, String>> {
    answer.map(|r| r.map(|s| s.text).map_err(|e| e.to_string()))
}

/// The service's own error behind a refusal.
fn mount_error(answer: Option<Result<Success, CommandError>>) -> MountError {
    let error = answer.expect("an answer").expect_err("a refusal");
    match error.downcast_ref::<MountError>() {
        Some(MountError::AliasTaken { alias, root }) => {
            MountError::AliasTaken { alias: alias.clone(), root: root.clone() }
        }
        Some(MountError::UnknownAlias(alias)) => MountError::UnknownAlias(alias.clone()),
        Some(MountError::NotRuntime { alias, root }) => {
            MountError::NotRuntime { alias: alias.clone(), root: root.clone() }
        }
        Some(MountError::BadAlias(alias)) => MountError::BadAlias(alias.clone()),
        Some(MountError::HeldAtRuntime { done, refused }) => {
            MountError::HeldAtRuntime { done: *done, refused: refused.clone() }
        }
        _ => panic!("not the error expected: {error}"),
    }
}

fn hides(sim: &Sim<Filemq>, alias: &str) -> serde_json::Value {
    let status = sim.service.status();
    let mount = status["mounts"].as_array().unwrap().iter().find(|m| m["alias"] == alias).cloned();
    mount.expect("the mount")["hides"].clone()
}

#[test]
fn a_longer_alias_hides_what_lies_under_it_and_subscribers_are_told_at_once() {
    let (outbox, mut sim) = world(&[("a", b"a"), ("extra/o.txt", b"outer")]);
    assert_eq!(subscribe(&mut sim, 1), vec!["+/a", "+/extra/o.txt"]);
    let other = tempfile::tempdir().unwrap();
    put(other.path(), "x.txt", b"x");
    assert!(publish(&mut sim, other.path(), "/extra").is_ok());
    // Not at the next RESYNC: now.
    assert_eq!(events(take(&mut sim, 1)), vec!["+/extra/x.txt", "-/extra/o.txt"]);
    let dir = outbox.path().join("extra").to_str().unwrap().to_string();
    assert_eq!(hides(&sim, "/extra"), serde_json::json!([{ "alias": "/", "dir": dir, "files": 1 }]));
    assert_eq!(hides(&sim, "/"), serde_json::json!([]));
    // A newcomer gets what the paths serve.
    assert_eq!(subscribe(&mut sim, 2), vec!["+/a", "+/extra/x.txt"]);
    assert_eq!(
        shown(sim.command(&["UNPUBLISH", "/extra"])),
        Some(Ok(format!(
            "no longer publishing {} as /extra (not kept: no state directory)",
            other.path().display()
        )))
    );
    assert_eq!(events(take(&mut sim, 1)), vec!["+/extra/o.txt", "-/extra/x.txt"]);
    assert_eq!(events(take(&mut sim, 2)), vec!["+/extra/o.txt", "-/extra/x.txt"]);
}

/// The README's own config: `/` and `/photos`, with no `photos` in the
/// outbox. Nested, hiding nothing.
#[test]
fn a_nested_alias_over_nothing_hides_nothing() {
    let (_outbox, mut sim) = world(&[("a", b"a")]);
    let photos = tempfile::tempdir().unwrap();
    put(photos.path(), "p.jpg", b"jpeg");
    assert!(publish(&mut sim, photos.path(), "/photos").is_ok());
    assert_eq!(subscribe(&mut sim, 1), vec!["+/a", "+/photos/p.jpg"]);
    assert_eq!(hides(&sim, "/photos")[0]["files"], 0);
}

/// The root of "`/extra` silently hid `outbox/extra/o.txt`": a mount's
/// scan announced changes for every path of its tree, served or not, so a
/// hidden file's delete reached the file that path does serve.
#[test]
fn a_hidden_files_changes_never_reach_the_path_another_mount_serves() {
    let (outbox, mut sim) = world(&[("extra/o.txt", b"outer")]);
    let other = tempfile::tempdir().unwrap();
    put(other.path(), "o.txt", b"inner");
    assert!(publish(&mut sim, other.path(), "/extra").is_ok());
    assert_eq!(subscribe(&mut sim, 1), vec!["+/extra/o.txt"]);
    std::fs::remove_file(outbox.path().join("extra/o.txt")).unwrap();
    sim.advance(Duration::from_secs(6));
    assert_eq!(events(take(&mut sim, 1)), Vec::<String>::new(), "the inner o.txt is still published");
    put(outbox.path(), "extra/o.txt", b"outer, again");
    sim.advance(Duration::from_secs(6));
    assert_eq!(events(take(&mut sim, 1)), Vec::<String>::new());
}

#[test]
fn run_time_mounts_are_kept_and_a_reload_replaces_only_the_configs_own() {
    let state = tempfile::tempdir().unwrap();
    let file = state.path().join(mounts::FILE_NAME);
    let (outbox, mut sim) =
        world_with(&[("a", b"a")], Config { state_dir: Some(state.path().into()), ..config() });
    let photos = tempfile::tempdir().unwrap();
    put(photos.path(), "p.jpg", b"jpeg");
    let reply = publish(&mut sim, photos.path(), "/photos/").unwrap().text;
    assert!(reply.ends_with(&format!("as /photos (kept in {})", file.display())), "{reply}");
    let kept = vec![mounts::Saved { alias: "/photos".into(), root: photos.path().into() }];
    assert_eq!(mounts::load(&file).unwrap(), kept);

    let root = (outbox.path(), "/");
    assert!(matches!(replace_mounts(&mut sim, &[root]), Some(Ok(_))));
    let aliases = |sim: &Sim<Filemq>| -> Vec<String> {
        let status = sim.service.status();
        let mut all: Vec<String> = status["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| format!("{} {}", m["alias"], m["origin"]))
            .collect();
        all.sort();
        all
    };
    assert_eq!(aliases(&sim), vec![r#""/" "config""#, r#""/photos" "runtime""#]);
    // A config that now lists the run-time alias: refused, the rest applied.
    let elsewhere = tempfile::tempdir().unwrap();
    let clash = (elsewhere.path(), "/photos");
    let docs = (elsewhere.path(), "/docs");
    let reply = replace_mounts(&mut sim, &[root, clash, docs]).unwrap().unwrap_err().to_string();
    assert!(reply.contains("1 published") && reply.contains("`zbroker unpublish` it first"), "{reply}");
    assert_eq!(aliases(&sim), vec![r#""/" "config""#, r#""/docs" "config""#, r#""/photos" "runtime""#]);

    let refused = sim.command(&["UNPUBLISH", "/"]).unwrap().unwrap_err().to_string();
    assert!(refused.contains("comes from the command line or config file"), "{refused}");
    assert_eq!(
        shown(sim.command(&["UNPUBLISH", "/nope"])),
        Some(Err("nothing is published as /nope".into()))
    );
    assert!(matches!(sim.command(&["UNPUBLISH", "/photos"]), Some(Ok(_))));
    assert_eq!(mounts::load(&file).unwrap(), vec![]);
    assert_eq!(aliases(&sim), vec![r#""/" "config""#, r#""/docs" "config""#]);
}

#[test]
fn a_change_is_answered_once_saved_and_a_failed_save_changes_nothing() {
    let state = tempfile::tempdir().unwrap();
    let (_outbox, mut sim) = world_with(&[], Config { state_dir: Some(state.path().into()), ..config() });
    let photos = tempfile::tempdir().unwrap();
    sim.hold_work = true;
    assert_eq!(publish_later(&mut sim, photos.path(), "/photos"), None, "waits for the save");
    let first = sim.last_request();
    assert_eq!(publish_later(&mut sim, photos.path(), "/photos"), None, "waits its turn");
    let second = sim.last_request();
    assert_eq!(sim.service.mount_count(), 1, "nothing changes before it is saved");
    sim.run_work();
    assert!(matches!(sim.reply(first), Some(Ok(_))));
    assert_eq!(
        shown(sim.reply(second)),
        Some(Err(format!("/photos is already published from {}", photos.path().display())))
    );

    // A state "directory" that is a file: the save fails, nothing changes.
    let not_a_dir = state.path().join("file");
    std::fs::write(&not_a_dir, b"").unwrap();
    let (_outbox, mut sim) = world_with(&[], Config { state_dir: Some(not_a_dir), ..config() });
    let error = publish(&mut sim, photos.path(), "/photos").unwrap_err().to_string();
    assert!(error.starts_with("cannot save ") && error.ends_with("; nothing changed"), "{error}");
    assert_eq!(sim.service.mount_count(), 1);
}

fn publish_later(sim: &mut Sim<Filemq>, dir: &Path, alias: &str) -> Option<Result<String, String>> {
    shown(sim.command(&["PUBLISH", dir.to_str().unwrap(), alias]))
}

/// A directory whose name is not UTF-8 is published and kept as it is.
#[test]
fn a_directory_name_that_is_not_utf8_is_kept_whole() {
    use std::os::unix::ffi::OsStrExt as _;
    let state = tempfile::tempdir().unwrap();
    let (_outbox, mut sim) = world_with(&[], Config { state_dir: Some(state.path().into()), ..config() });
    let base = tempfile::tempdir().unwrap();
    let odd = base.path().join(std::ffi::OsStr::from_bytes(b"caf\xe9"));
    std::fs::create_dir(&odd).unwrap();
    put(&odd, "menu", b"soup");
    let escaped = zbroker_proto::escape::escape(odd.as_os_str().as_bytes());
    assert!(escaped.ends_with("caf\\xe9"), "{escaped}");
    assert!(matches!(sim.command(&["PUBLISH", &escaped, "/cafe"]), Some(Ok(_))));
    let kept = mounts::load(&state.path().join(mounts::FILE_NAME)).unwrap();
    assert_eq!(kept, vec![mounts::Saved { alias: "/cafe".into(), root: odd.clone() }]);
    assert_eq!(subscribe(&mut sim, 1), vec!["+/cafe/menu"]);
}

/// A kept mount whose directory is missing after a restart has never been
/// read: a RESYNC must not take its files as deleted (the issue: "a
/// restart drops it, and the mirrors then delete its files").
#[test]
fn a_mount_never_read_deletes_nothing_at_a_resync() {
    let (_outbox, mut sim) = world(&[("a", b"a")]);
    let base = tempfile::tempdir().unwrap();
    let missing = base.path().join("photos");
    assert!(publish(&mut sim, &missing, "/photos").is_ok());
    assert!(hides(&sim, "/photos").is_array());
    let held = [("a", sha1_hex(b"a")), ("photos/p.jpg", sha1_hex(b"jpeg"))];
    let cache: Vec<(&str, &str)> = held.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let resync = |sim: &mut Sim<Filemq>, conn: u64| {
        send(sim, conn, ohai());
        send(sim, conn, icanhaz("/", &[("RESYNC", "1")], &cache));
        send(sim, conn, nom(1_000_000));
        events(take(sim, conn))
    };
    assert_eq!(resync(&mut sim, 1), Vec::<String>::new(), "nothing deleted while /photos is unread");
    // Once it can be read (empty), the file is gone for real.
    std::fs::create_dir(&missing).unwrap();
    sim.advance(Duration::from_secs(6));
    assert_eq!(resync(&mut sim, 2), vec!["-/photos/p.jpg"]);
}

/// Typed commands, as the host hands them over: a directory that is not
/// UTF-8 goes through PUBLISH and a reload as a path, never as text.
#[test]
fn typed_commands_carry_any_directory_name() {
    use std::os::unix::ffi::OsStrExt as _;
    let state = tempfile::tempdir().unwrap();
    let (outbox, mut sim) = world_with(&[], Config { state_dir: Some(state.path().into()), ..config() });
    let base = tempfile::tempdir().unwrap();
    let odd = base.path().join(std::ffi::OsStr::from_bytes(b"men\xfc"));
    std::fs::create_dir(&odd).unwrap();
    put(&odd, "soup", b"soup");
    let runtime = base.path().join(std::ffi::OsStr::from_bytes(b"caf\xe9"));
    std::fs::create_dir(&runtime).unwrap();
    put(&runtime, "tea", b"tea");

    let publish = Command::Publish { dir: runtime.clone(), alias: "/cafe/".into() };
    let reply = sim.execute(Box::new(publish)).expect("an answer").expect("published");
    assert_eq!(reply.details, Some(serde_json::json!({ "alias": "/cafe", "root": mounts::shown(&runtime) })));
    let kept = mounts::load(&state.path().join(mounts::FILE_NAME)).unwrap();
    assert_eq!(kept, vec![mounts::Saved { alias: "/cafe".into(), root: runtime.clone() }]);

    let reload = |dirs: &[(&Path, &str)]| {
        dirs.iter()
            .map(|(dir, alias)| ConfigMount { dir: dir.to_path_buf(), alias: alias.to_string() })
            .collect()
    };
    let replace = Command::ReplaceMounts(reload(&[(outbox.path(), "/"), (&odd, "/menu")]));
    let reply = sim.execute(Box::new(replace)).expect("an answer").expect("replaced");
    assert_eq!(reply.text, "mounts: 1 published, 0 moved, 0 unpublished, 3 in all");
    assert_eq!(subscribe(&mut sim, 1), vec!["+/cafe/tea", "+/menu/soup"]);
    let status = sim.service.status();
    let roots: Vec<_> = status["mounts"].as_array().unwrap().iter().map(|m| m["root"].clone()).collect();
    assert!(roots.contains(&serde_json::json!(mounts::shown(&odd))), "{roots:?}");

    // The run-time alias in the config: refused by name, the rest applied.
    let replace = Command::ReplaceMounts(reload(&[(&odd, "/cafe"), (outbox.path(), "/")]));
    let MountError::HeldAtRuntime { done, refused } = mount_error(sim.execute(Box::new(replace))) else {
        panic!("not a refusal for a run-time alias")
    };
    assert_eq!(refused, vec![RuntimeHeld { alias: "/cafe".into(), dir: odd.clone(), held: runtime.clone() }]);
    assert_eq!((done.published, done.unpublished, done.total), (0, 1, 2), "/menu left the config");

    // A bad alias refuses the whole list before anything changes.
    let replace = Command::ReplaceMounts(reload(&[(&odd, "/a/../b")]));
    assert!(matches!(mount_error(sim.execute(Box::new(replace))), MountError::BadAlias(a) if a == "/a/../b"));
    assert_eq!(sim.service.mount_count(), 2);
}

/// Each refusal is the service's own typed error; the text is what
/// `zbroker publish` and `unpublish` print.
#[test]
fn refusals_are_typed() {
    let (outbox, mut sim) = world(&[]);
    let taken =
        mount_error(sim.execute(Box::new(Command::Publish { dir: "/srv".into(), alias: "/".into() })));
    assert!(
        matches!(&taken, MountError::AliasTaken { alias, root } if alias == "/" && root == outbox.path())
    );
    assert!(matches!(
        mount_error(sim.command(&["UNPUBLISH", "/nope"])),
        MountError::UnknownAlias(alias) if alias == "/nope"
    ));
    assert!(matches!(
        mount_error(sim.command(&["UNPUBLISH", "/"])),
        MountError::NotRuntime { alias, .. } if alias == "/"
    ));
    let relative = sim.execute(Box::new(Command::Publish { dir: "srv".into(), alias: "/r".into() }));
    assert_eq!(shown(relative), Some(Err("srv is not an absolute path".into())));
    // Bad words never reach the service: its parse error, no panic.
    let usage = sim.command(&["PUBLISH", "/srv"]).unwrap().unwrap_err();
    assert_eq!(usage.downcast_ref::<command::ParseError>(), Some(&command::ParseError::PublishUsage));
    // Something else's command is answered, not obeyed.
    let foreign = sim.execute(Box::new(7u8)).unwrap().unwrap_err();
    assert_eq!(foreign.to_string(), "filemq does not take this command");
    assert_eq!(sim.service.mount_count(), 1);
}
