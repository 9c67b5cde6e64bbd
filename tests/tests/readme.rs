//! The README runs as written: every ```sh / ```console block is either
//! run here, with the built programs, or listed below with the reason it
//! cannot be. A block the test does not know, or a known block that is no
//! longer in the README, fails the test: change both together.
//!
//! Each block runs as a bash script in a temporary directory, after a
//! mechanical translation that keeps the commands as written:
//! `cargo run [-q] --release --bin X --` becomes `X` (the built program,
//! first on `PATH`); the broker names `hub`, `relay` and the default
//! `local` become names of this run (also after `zbroker status`,
//! `publish` and `unpublish`); `tcp://hub:5670` and
//! `'tcp://*:5670'` become free loopback ports; `/restore` becomes
//! `./restore`. Commands that run until stopped (a broker, a `filemq
//! subscribe` without `--once`, a writer waiting for its reader) go to the
//! background and are stopped at the end. A plan's `setup` prepares what
//! the README assumes (a running broker, files to send) and its `check`
//! proves the block did what the README says.
//!
//! To add a block: add a `Plan` whose `first` is its first command line.

use std::path::Path;
use std::process::Command;
use zbroker_tests::{bin, unique_name};

/// What the test does with one README block.
struct Plan {
    /// The block's first line that is not a comment, as written.
    first: &'static str,
    /// Why the block cannot run here (then nothing else is used).
    skip: Option<&'static str>,
    /// Bash run before the block (variables: see `run`).
    setup: &'static str,
    /// Lines (after translation) starting with one of these run in the background.
    background: &'static [&'static str],
    /// Bash run after the block; it must exit 0.
    check: &'static str,
    /// Text the block's standard output must contain.
    stdout: &'static str,
}

const RUN: Plan = Plan { first: "", skip: None, setup: "", background: &[], check: "", stdout: "" };

/// Starts a broker in the background and waits until it answers.
const BROKER_FN: &str = r#"
up() { for _ in $(seq 100); do zbroker status "$1" --timeout 200 >/dev/null 2>&1 && return 0; sleep 0.1; done; echo "broker $1 never answered" >&2; return 1; }
until_file() { for _ in $(seq 200); do [ -f "$1" ] && return 0; sleep 0.1; done; echo "$1 never appeared" >&2; return 1; }
"#;

fn plans() -> Vec<Plan> {
    vec![
        Plan {
            first: "cargo run --release --bin zbroker -- local   # builds and runs the broker named \"local\"",
            skip: Some(
                "a release build and the whole test suite (this test is part of it); every other block \
                 runs the same programs",
            ),
            ..RUN
        },
        Plan {
            first: "tar c photos | cargo run -q --release --bin zpipes -- write backup",
            setup: "mkdir -p photos/2024 && head -c 300000 /dev/urandom > photos/2024/a.jpg && \
                    echo hi > photos/b.txt && mkdir restore\n\
                    zbroker $LOCAL >/dev/null 2>>.bg.log &\n\
                    up $LOCAL",
            background: &["tar c photos |"],
            check: "diff -r photos restore/photos",
            ..RUN
        },
        Plan {
            first: "mkdir -p outbox",
            setup: "mkdir -p outbox && echo hello > outbox/a.txt",
            background: &["zbroker ", "filemq subscribe / --inbox ./mirror --endpoint"],
            check: "until_file mirror/a.txt && diff -r -x .filemq outbox mirror",
            ..RUN
        },
        Plan {
            first: "filemq subscribe / --inbox ./mirror --broker hub --once --timeout 60000 && echo mirrored",
            setup: "mkdir -p outbox && echo hello > outbox/a.txt\n\
                    zbroker $HUB --publish ./outbox >/dev/null 2>>.bg.log &\n\
                    up $HUB",
            check: "diff -r -x .filemq outbox mirror",
            stdout: "mirrored",
            ..RUN
        },
        Plan {
            first: "filemq subscribe / --inbox ./mirror --broker hub --once --exclude '*.tmp' --exclude 'cache/' --exclude '!keep.tmp'",
            setup: "mkdir -p outbox/cache && echo a > outbox/a.txt && echo x > outbox/x.tmp && \
                    echo k > outbox/keep.tmp && echo c > outbox/cache/c\n\
                    zbroker $HUB --publish ./outbox >/dev/null 2>>.bg.log &\n\
                    up $HUB",
            check: "[ -f mirror/a.txt ] && [ -f mirror/keep.tmp ] && [ ! -e mirror/x.tmp ] && [ ! -e mirror/cache ]",
            ..RUN
        },
        Plan {
            first: "filemq subscribe / --inbox ./mirror --broker hub --dry-run",
            setup: "mkdir -p outbox && echo a > outbox/a.txt\n\
                    zbroker $HUB --publish ./outbox >/dev/null 2>>.bg.log &\n\
                    up $HUB",
            check: "[ ! -e mirror ]",
            stdout: "create a.txt",
            ..RUN
        },
        Plan {
            first: "zbroker relay --upstream tcp://hub:5670 --subscribe / --inbox ./relay --publish ./relay --bind 'tcp://*:5670'",
            setup: "mkdir -p outbox && echo hello > outbox/a.txt\n\
                    zbroker $HUB --publish ./outbox --bind tcp://127.0.0.1:$HUB_PORT >/dev/null 2>>.bg.log &\n\
                    up $HUB",
            background: &["zbroker "],
            // A leaf subscribes to the relay and gets the hub's files.
            check: "up $RELAY\n\
                    filemq subscribe / --inbox ./leaf --endpoint tcp://127.0.0.1:$PORT >/dev/null 2>>.bg.log &\n\
                    until_file leaf/a.txt && diff -r -x .filemq outbox relay && diff -r -x .filemq outbox leaf",
            ..RUN
        },
        Plan {
            first: "zbroker publish hub ./photos /photos",
            setup: "mkdir -p outbox photos && echo hi > photos/p.jpg\n\
                    zbroker $HUB --publish ./outbox >/dev/null 2>>.bg.log &\n\
                    up $HUB",
            // Published (the status says run-time), then unpublished: the
            // kept list is empty again.
            check: "grep -qx 'zbroker-mounts 1' .state/zbroker/$HUB/mounts && ! grep -q photos .state/zbroker/$HUB/mounts",
            stdout: "run-time",
            ..RUN
        },
    ]
}

/// A fenced ```sh or ```console block of the README.
struct Block {
    line: usize,
    text: String,
}

fn blocks(readme: &str) -> Vec<Block> {
    let mut blocks = Vec::new();
    let mut current: Option<Block> = None;
    for (n, line) in readme.lines().enumerate() {
        let fence = line.trim_start();
        match &mut current {
            Some(block) if fence.starts_with("```") => {
                blocks.push(std::mem::replace(block, Block { line: 0, text: String::new() }));
                current = None;
            }
            Some(block) => {
                block.text.push_str(line);
                block.text.push('\n');
            }
            None if fence == "```sh"
                || fence == "```console"
                || fence == "```shell"
                || fence == "```bash" =>
            {
                current = Some(Block { line: n + 1, text: String::new() })
            }
            None => {}
        }
    }
    blocks
}

/// The first line of a block that is a command, not a comment.
fn first_command(text: &str) -> &str {
    text.lines().map(str::trim).find(|l| !l.is_empty() && !l.starts_with('#')).unwrap_or("")
}

/// The README's commands with this run's programs, names and ports.
fn translate(text: &str) -> String {
    let mut out = text.to_string();
    for program in ["zbroker", "zpipes", "filemq"] {
        for prefix in ["cargo run -q --release --bin ", "cargo run --release --bin "] {
            out = out.replace(&format!("{prefix}{program} --"), program);
        }
    }
    let out = out
        .replace("tcp://hub:5670", "tcp://127.0.0.1:$HUB_PORT")
        .replace("zbroker hub ", "zbroker $HUB ")
        .replace("zbroker relay ", "zbroker $RELAY ")
        .replace("--broker hub", "--broker $HUB")
        .replace("publish hub ", "publish $HUB ")
        .replace("zbroker status hub", "zbroker status $HUB")
        .replace("zpipes write", "zpipes --broker $LOCAL write")
        .replace("zpipes read", "zpipes --broker $LOCAL read")
        .replace("/restore", "./restore");
    // The hub binds the port its clients reach as hub:5670; any other
    // broker (a relay) binds one of its own.
    let lines: Vec<String> = out
        .lines()
        .map(|line| {
            let port = if line.contains("zbroker $HUB ") { "$HUB_PORT" } else { "$PORT" };
            line.replace("'tcp://*:5670'", &format!("\"tcp://127.0.0.1:{port}\""))
        })
        .collect();
    lines.join("\n") + "\n"
}

/// Joins `\`-continued lines, and sends long-running ones to the background.
fn script(text: &str, background: &[&str]) -> String {
    let joined = text.replace("\\\n", " ");
    let mut out = String::new();
    for line in joined.lines() {
        let command = line.trim();
        if background.iter().any(|prefix| command.starts_with(prefix)) {
            out.push_str(&format!("{command} >/dev/null 2>>.bg.log &\n"));
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Runs one block with its plan: setup, the block, check. Every process it
/// started is stopped when it ends.
fn run(block: &Block, plan: &Plan) -> Result<(), String> {
    let dir = tempfile::tempdir().unwrap();
    let bin_dir = dir.path().join(".bin");
    std::fs::create_dir(&bin_dir).unwrap();
    for program in ["zbroker", "zpipes", "filemq"] {
        std::os::unix::fs::symlink(bin(program), bin_dir.join(program)).unwrap();
    }
    let body = script(&translate(&block.text), plan.background);
    let full = format!(
        "set -e\ntrap 'kill $(jobs -p) 2>/dev/null; wait' EXIT\n{BROKER_FN}\n{}\n{body}\n{}\n",
        plan.setup, plan.check
    );
    let path = std::env::var("PATH").unwrap_or_default();
    let out = Command::new("bash")
        .arg("-c")
        .arg(&full)
        .current_dir(dir.path())
        .env("PATH", format!("{}:{path}", bin_dir.display()))
        .env("XDG_STATE_HOME", dir.path().join(".state"))
        .env("LOCAL", unique_name("readme-local"))
        .env("HUB", unique_name("readme-hub"))
        .env("RELAY", unique_name("readme-relay"))
        .env("HUB_PORT", free_port().to_string())
        .env("PORT", free_port().to_string())
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || !stdout.contains(plan.stdout) {
        return Err(format!(
            "README block at line {} failed ({}):\n{full}\n--- stdout:\n{stdout}\n--- stderr:\n{}\n--- background:\n{}",
            block.line,
            out.status,
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(dir.path().join(".bg.log")).unwrap_or_default()
        ));
    }
    Ok(())
}

#[test]
fn every_readme_command_block_runs_or_says_why_not() {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md")).unwrap();
    let blocks = blocks(&readme);
    let plans = plans();
    let mut failures = Vec::new();
    let mut used = vec![false; plans.len()];
    let mut handles = Vec::new();
    for block in blocks {
        let first = first_command(&block.text).to_string();
        let Some(index) = plans.iter().position(|p| p.first == first) else {
            failures.push(format!(
                "README line {}: a block this test does not know (first command {first:?}): add a Plan for it",
                block.line
            ));
            continue;
        };
        assert!(!used[index], "two README blocks start with {first:?}");
        used[index] = true;
        if plans[index].skip.is_some() {
            continue;
        }
        // Blocks run in parallel: each has its own directory, names and ports.
        handles.push(std::thread::spawn(move || run(&block, &plans_ref()[index])));
    }
    for handle in handles {
        if let Err(e) = handle.join().unwrap() {
            failures.push(e);
        }
    }
    for (plan, used) in plans.iter().zip(&used) {
        if !used {
            failures.push(format!("no README block starts with {:?} any more: update its Plan", plan.first));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    assert_eq!(used.len(), plans.len());
}

/// The plans, for a thread (they are rebuilt: `Plan` holds only statics).
fn plans_ref() -> Vec<Plan> {
    plans()
}
