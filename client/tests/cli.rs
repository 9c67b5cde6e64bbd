//! The `zpipes` command line on its own (no broker needed).
//! (Being an integration test of this package also makes `cargo test`
//! build the `zpipes` binary that the workspace's `tests` crate runs.)

use std::process::{Command, Output};

fn zpipes(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_zpipes")).args(args).output().unwrap()
}

#[test]
fn help_names_every_option_and_exit_status() {
    let out = zpipes(&["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for word in ["read", "write", "--broker", "--endpoint", "--timeout", "Exit status", "no broker answered"]
    {
        assert!(help.contains(word), "help lacks {word}: {help}");
    }
}

#[test]
fn usage_errors_exit_2() {
    assert_eq!(zpipes(&[]).status.code(), Some(2));
    assert_eq!(zpipes(&["read"]).status.code(), Some(2));
    assert_eq!(zpipes(&["read", "p", "--timeout", "soon"]).status.code(), Some(2));
    let out = zpipes(&["--broker", "no/slash", "read", "p"]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(String::from_utf8_lossy(&out.stderr).trim().lines().count(), 1);
}

#[test]
fn no_broker_exits_4_with_one_line() {
    let name = format!("absent-{}", std::process::id());
    let out = zpipes(&["--broker", &name, "--timeout", "300", "read", "p"]);
    assert_eq!(out.status.code(), Some(4));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim(), format!("zpipes: no broker answers at ipc://@/zpipes/{name}"));
}
