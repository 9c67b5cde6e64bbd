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

#[test]
fn malformed_endpoints_exit_2_naming_the_accepted_forms() {
    for bad in ["127.0.0.1:25670", "http://127.0.0.1:25670", "tcp://127.0.0.1:99999", "tcp://*:5670"] {
        let out = zpipes(&["--endpoint", bad, "--timeout", "300", "read", "p"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{bad}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(err.contains("tcp://HOST:PORT") && err.contains("ipc://"), "{err}");
    }
}

#[test]
fn broker_and_endpoint_together_are_refused() {
    let out = zpipes(&["--broker", "a", "--endpoint", "tcp://127.0.0.1:1", "read", "p"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot be used with"));
}

#[test]
fn an_empty_pipe_name_is_refused() {
    for command in ["read", "write"] {
        let out = zpipes(&["--timeout", "300", command, ""]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains("pipe name is empty"), "{err}");
    }
}

#[test]
fn a_secret_key_as_server_key_gets_a_hint() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("hub");
    zbroker_client::curve::KeyPair::generate().unwrap().write(&secret).unwrap();
    let out =
        zpipes(&["--endpoint", "tcp://127.0.0.1:1", "--server-key", secret.to_str().unwrap(), "read", "p"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("that is a secret key file; pass the broker's .pub file"), "{err}");
}
