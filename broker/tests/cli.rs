//! The `zbroker` command line: help, bad arguments, config files.
//! (Being an integration test of this package also makes `cargo test`
//! build the `zbroker` binary that the workspace's `tests` crate starts.)

use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn zbroker(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_zbroker")).args(args).output().unwrap()
}

fn unique(prefix: &str) -> String {
    static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{prefix}-{}-{n}", std::process::id())
}

#[test]
fn help_teaches_the_tool() {
    let out = zbroker(&["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for word in ["--bind", "--expiry", "--pipe-limit", "--config", "status", "ipc://@/zpipes/NAME"] {
        assert!(help.contains(word), "help lacks {word}: {help}");
    }
}

#[test]
fn bad_arguments_get_one_line_and_a_failure_status() {
    let out = zbroker(&["--no-such-flag"]);
    assert_eq!(out.status.code(), Some(2));
    let out = zbroker(&["bad/name"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.starts_with("zbroker: broker name"), "{err}");
    let out = zbroker(&["x", "--pipe-limit", "64KiB"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("at least 1MiB"));
    let out = zbroker(&["x", "--bind", "nonsense://x"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot bind nonsense://x"));
    let out = zbroker(&["x", "--config", "/nonexistent/zbroker.toml"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read config file"));
}

#[test]
fn status_of_a_missing_broker_fails_cleanly() {
    let out = zbroker(&["status", &unique("absent"), "--timeout", "200"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no broker named"));
}

#[test]
fn config_file_sets_everything_and_flags_override_it() {
    let dir = std::env::temp_dir().join(unique("zbroker-config"));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("zbroker.toml");
    let name = unique("cfg");
    std::fs::write(
        &file,
        format!("name = \"{name}\"\nbind = [\"tcp://127.0.0.1:*\"]\nexpiry = 1234\npipe_limit = \"1MiB\"\nlog = \"warn\"\n"),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_zbroker"))
        .args(["--config", file.to_str().unwrap(), "--pipe-limit", "2MiB"])
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        let out = zbroker(&["status", &name, "--json", "--timeout", "500"]);
        if out.status.success() {
            break serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap();
        }
        assert!(Instant::now() < deadline, "broker from config never answered");
        std::thread::sleep(Duration::from_millis(20));
    };
    let zpipes = &status["services"]["zpipes"];
    assert_eq!(zpipes["expiry_ms"], 1234, "from the file");
    assert_eq!(zpipes["pipe_limit"], 2 << 20, "the flag wins");
    assert!(status["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e.as_str().unwrap().starts_with("tcp://127.0.0.1:")));
    // The human form names the same things.
    let human = String::from_utf8_lossy(&zbroker(&["status", &name]).stdout).into_owned();
    assert!(human.contains(&format!("broker {name}")) && human.contains("zpipes:"), "{human}");
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
    std::fs::remove_dir_all(&dir).unwrap();
}
