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

/// Runs `zbroker ARGS`, expecting it to fail at once with `code` and one
/// line on stderr containing each of `words`; returns the line.
fn refused(args: &[&str], code: i32, words: &[&str]) -> String {
    let out = zbroker(args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(code), "zbroker {args:?}: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "zbroker {args:?}: not one line: {err}");
    for word in words {
        assert!(err.contains(word), "zbroker {args:?}: {err:?} lacks {word:?}");
    }
    err
}

#[test]
fn bad_arguments_get_one_line_and_a_failure_status() {
    let out = zbroker(&["--no-such-flag"]);
    assert_eq!(out.status.code(), Some(2));
    let err = refused(&["bad/name"], 2, &["broker name"]);
    assert!(err.starts_with("zbroker: broker name"), "{err}");
    refused(&["x", "--pipe-limit", "64KiB"], 2, &["--pipe-limit must be at least 1MiB"]);
    refused(&["x", "--bind", "nonsense://x"], 2, &["--bind", "nonsense://x", "tcp://HOST:PORT"]);
    refused(&["x", "--config", "/nonexistent/zbroker.toml"], 2, &["cannot read config file"]);
}

#[test]
fn an_unknown_log_level_is_refused_not_taken_as_silence() {
    refused(
        &["x", "--log", "verbose"],
        2,
        &["\"verbose\" is not a log level", "error, warn, info, debug, trace or off"],
    );
    refused(&["x", "--log", "info,zbroker=loud"], 2, &["--log"]);
}

#[test]
fn endpoints_are_checked_before_anything_starts() {
    let forms = ["tcp://HOST:PORT", "ipc://", "tcp://*:*"];
    for bad in ["127.0.0.1:25692", "http://127.0.0.1:25692", "tcp://127.0.0.1:99999", "tcp://127.0.0.1:0"] {
        refused(&["x", "--bind", bad], 2, &forms);
    }
    let dir = tempfile::tempdir().unwrap();
    let inbox = dir.path().join("in");
    let inbox = inbox.to_str().unwrap();
    refused(&["x", "--upstream", "127.0.0.1:25670", "--inbox", inbox], 2, &["--upstream", "tcp://HOST:PORT"]);
    refused(&["x", "--upstream", "tcp://*:5670", "--inbox", inbox], 2, &["--upstream"]);
    refused(&["x", "--publish", "./outbox=photos"], 2, &["must start with '/'"]);
    let file = dir.path().join("z.toml");
    std::fs::write(&file, "bind = [\"127.0.0.1:25692\"]\n").unwrap();
    refused(&["x", "--config", file.to_str().unwrap()], 2, &["config file", "bind", "tcp://HOST:PORT"]);
}

#[test]
fn config_file_errors_name_the_file_and_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("zbroker.toml");
    let path = file.to_str().unwrap();
    let check = |text: &str, words: &[&str]| {
        std::fs::write(&file, text).unwrap();
        let mut words = words.to_vec();
        words.push(path);
        refused(&["x", "--config", path], 2, &words)
    };
    check("pipe_limit = \"8 furlongs\"\n", &["pipe_limit", "furlongs", "MiB"]);
    let err = check("pipe_limit = \"512KiB\"\n", &["pipe_limit must be at least 1MiB"]);
    assert!(!err.contains("--pipe-limit"), "{err}");
    check("expiry = \"soon\"\n", &["expiry", "milliseconds"]);
    check("nmae = \"typo\"\n", &["unknown key \"nmae\""]);
    check("name = [\n", &["line 1"]);
    check("log = \"verbose\"\n", &["log", "not a log level"]);
    check("publish = [\"./outbox=photos\"]\n", &["publish", "must start with '/'"]);
    // The CURVE relay keys have keys of their own.
    let keys = dir.path().join("hub");
    assert!(zbroker(&["keygen", keys.to_str().unwrap()]).status.success());
    let relay = format!(
        "upstream = \"tcp://127.0.0.1:1\"\ninbox = \"{}\"\nupstream_server_key = \"{}\"\n",
        dir.path().join("in").display(),
        keys.display()
    );
    check(&relay, &["upstream_server_key", "that is a secret key file; pass the broker's .pub file"]);
}

#[test]
fn every_flag_has_a_config_key() {
    let help = String::from_utf8_lossy(&zbroker(&["--help"]).stdout).into_owned();
    let mut flags: Vec<String> = help
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("--"))
        .map(|w| w.trim_end_matches(|c: char| !c.is_ascii_alphanumeric()).replace('-', "_"))
        .filter(|w| !w.is_empty() && w.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
        .filter(|w| {
            !["help", "version", "config", "json", "timeout", "key", "server_key"].contains(&w.as_str())
        })
        .collect();
    flags.sort();
    flags.dedup();
    assert!(flags.len() >= 15, "{flags:?}");
    for flag in flags {
        assert!(zbroker::config::KEYS.contains(&flag.as_str()), "--{flag} has no config key");
    }
}

#[test]
fn exit_statuses_are_documented_and_kept() {
    let help = String::from_utf8_lossy(&zbroker(&["--help"]).stdout).into_owned();
    let table = &help[help.find("Exit status:").expect("an exit status table")..];
    for line in [
        "0  stopped cleanly",
        "1  run-time or I/O failure",
        "2  bad command line or config file",
        "3  another broker already runs under this name",
        "4  status, publish, unpublish: no broker",
        "5  publish, unpublish: the broker refused",
    ] {
        assert!(table.contains(line), "{table}");
    }
    refused(&["x", "--pipe-limit", "512KiB"], 2, &["at least 1MiB"]);
    assert_eq!(zbroker(&["x", "--pipe-limit", "8furlongs"]).status.code(), Some(2));
    refused(&["status", &unique("absent"), "--timeout", "200"], 4, &["no broker named"]);
    refused(&["unpublish", &unique("absent"), "/photos"], 4, &["no broker named"]);
    // keygen into a directory that does not exist: one line, said once.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nodir/x");
    let err = refused(&["keygen", path.to_str().unwrap()], 1, &["cannot write key file"]);
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
}

#[test]
fn a_second_broker_of_the_same_name_exits_3() {
    let name = unique("twice");
    let state = tempfile::tempdir().unwrap();
    let mut first = Command::new(env!("CARGO_BIN_EXE_zbroker"))
        .args([&name, "--state-dir", state.path().to_str().unwrap(), "--log", "error"])
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !zbroker(&["status", &name, "--timeout", "200"]).status.success() {
        assert!(Instant::now() < deadline, "the first broker never answered");
    }
    refused(&[&name, "--state-dir", state.path().to_str().unwrap()], 3, &["already running"]);
    unsafe { libc::kill(first.id() as i32, libc::SIGTERM) };
    assert!(first.wait().unwrap().success());
}

#[test]
fn help_examples_are_commands_or_comments() {
    let help = String::from_utf8_lossy(&zbroker(&["--help"]).stdout).into_owned();
    let examples = &help[help.find("Examples:").unwrap()..help.find("Exit status:").unwrap()];
    let mut continued = false;
    for line in examples.lines().skip(1).filter(|l| !l.trim().is_empty()) {
        let text = line.trim();
        assert!(
            continued || text.starts_with("# ") || text.starts_with("zbroker"),
            "an example line that is neither a command nor a comment: {line:?}"
        );
        assert!(line.len() <= 80, "an example wider than a terminal: {line:?}");
        continued = text.ends_with('\\');
    }
}

#[test]
fn a_relay_creates_its_inbox_before_publishing_it() {
    let dir = tempfile::tempdir().unwrap();
    let relay = dir.path().join("relay");
    let name = unique("relay");
    let mut child = Command::new(env!("CARGO_BIN_EXE_zbroker"))
        .args([&name, "--upstream", "tcp://127.0.0.1:9", "--subscribe", "/", "--log", "error"])
        .args(["--inbox", relay.to_str().unwrap(), "--publish", relay.to_str().unwrap()])
        .args(["--state-dir", dir.path().join("state").to_str().unwrap()])
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !zbroker(&["status", &name, "--timeout", "200"]).status.success() {
        assert!(child.try_wait().unwrap().is_none(), "the relay exited");
        assert!(Instant::now() < deadline, "the relay never answered");
    }
    assert!(relay.is_dir());
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
}

#[test]
fn status_of_a_missing_broker_fails_cleanly() {
    let out = zbroker(&["status", &unique("absent"), "--timeout", "200"]);
    assert_eq!(out.status.code(), Some(4));
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
        .args(["--config", file.to_str().unwrap(), "--pipe-limit", "2MB"])
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
    assert_eq!(zpipes["pipe_limit"], 2_000_000, "the flag wins, and MB is 10^6 bytes");
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

#[test]
fn the_readme_config_example_parses_and_names_every_key() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let start = readme.find("```toml\n").expect("a TOML example in the README") + 8;
    let text = &readme[start..start + readme[start..].find("```").unwrap()];
    // Commented-out keys are examples too.
    let uncommented: String = text
        .lines()
        .map(|l| l.strip_prefix("# ").filter(|rest| rest.contains(" = ")).unwrap_or(l))
        .map(|l| format!("{l}\n"))
        .collect();
    let config = zbroker::config::parse(&uncommented).unwrap_or_else(|e| panic!("{e}\n{uncommented}"));
    assert_eq!(config.pipe_limit, Some(8 << 20));
    for key in zbroker::config::KEYS {
        assert!(
            uncommented.lines().any(|l| l.starts_with(&format!("{key} = "))),
            "the README example lacks {key}"
        );
    }
}

/// A damaged run-time mounts file stops the broker at start, naming the
/// file and the line, rather than dropping mounts (and with them, files
/// downstream).
#[test]
fn a_damaged_mounts_file_is_one_line_and_nothing_starts() {
    let state = tempfile::tempdir().unwrap();
    let file = state.path().join("mounts");
    let name = unique("mounts");
    let dir = state.path().to_str().unwrap();
    std::fs::write(&file, "zbroker-mounts 1\n/photos /srv/photos\n").unwrap();
    refused(
        &[&name, "--state-dir", dir],
        1,
        &["run-time mounts: ", "mounts: line 2: expected ALIAS<TAB>DIRECTORY"],
    );
    std::fs::write(&file, "zbroker-mounts 2\n").unwrap();
    refused(&[&name, "--state-dir", dir], 1, &["format 2, written by another version of zbroker"]);
}
