//! CURVE security against the real programs: `zbroker keygen`, a broker
//! with `--curve-secret-key` and an allow-list, `zpipes` and `filemq`
//! clients with and without the right keys, the open local endpoints,
//! `--curve-ipc`, and SIGHUP re-reading the allow-list.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;
use zbroker_tests::{assert_same_tree, bin, put, signal, wait_until, Broker};

/// How long any one client program may take.
const LIMIT: Duration = Duration::from_secs(30);

fn path_arg(path: &Path) -> &str {
    path.to_str().expect("temporary paths are UTF-8")
}

/// `zbroker keygen DIR/NAME`: the secret key file's path.
fn keygen(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    let out = Command::new(bin("zbroker")).arg("keygen").arg(&path).output().unwrap();
    assert!(out.status.success(), "keygen failed: {}", String::from_utf8_lossy(&out.stderr));
    path
}

fn public(secret: &Path) -> PathBuf {
    zbroker_client::curve::public_path(secret)
}

/// Runs a client program to completion (or kills it at `LIMIT`), its
/// output read as it comes.
fn run(mut command: Command, input: &[u8]) -> Output {
    let mut child =
        command.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let pid = child.id() as i32;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(LIMIT) {
        Ok(output) => output.unwrap(),
        Err(_) => {
            // SAFETY: kill(2) on our own child, not yet reaped (its waiter
            // is still waiting).
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
            panic!("{command:?} did not finish within {LIMIT:?}");
        }
    }
}

/// `zpipes ARGS` (`--endpoint` and keys among them).
fn zpipes(args: &[&str]) -> Command {
    let mut command = Command::new(bin("zpipes"));
    command.args(args);
    command
}

/// Client flags for the broker's TCP endpoint with these keys.
fn tcp_args<'a>(endpoint: &'a str, server_pub: &'a Path, key: Option<&'a Path>) -> Vec<&'a str> {
    let mut args = vec!["--endpoint", endpoint, "--server-key", path_arg(server_pub)];
    if let Some(key) = key {
        args.extend(["--key", path_arg(key)]);
    }
    args
}

/// A writer and a reader of `pipe`, both with `args`: what the reader got.
fn through(args: &[&str], pipe: &str, data: &[u8]) -> Vec<u8> {
    let mut writer = zpipes(args);
    writer.args(["write", pipe]);
    let data_copy = data.to_vec();
    let writer = std::thread::spawn(move || run(writer, &data_copy));
    let mut reader = zpipes(args);
    reader.args(["read", pipe]);
    let read = run(reader, b"");
    let written = writer.join().unwrap();
    assert!(written.status.success(), "zpipes write failed: {}", String::from_utf8_lossy(&written.stderr));
    assert!(read.status.success(), "zpipes read failed: {}", String::from_utf8_lossy(&read.stderr));
    read.stdout
}

/// A client that must be refused: exit 4 with a message about keys, and
/// no pipe of that name appears at the broker.
fn assert_refused(broker: &Broker, args: &[&str], pipe: &str) -> String {
    let mut reader = zpipes(args);
    reader.args(["--timeout", "3000", "read", pipe]);
    let out = run(reader, b"");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(4), "a refused client must exit 4 (no broker): {stderr}");
    assert!(out.stdout.is_empty());
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    let pipes = broker.zpipes()["pipes"].as_array().cloned().unwrap_or_default();
    assert!(pipes.iter().all(|p| p["name"] != pipe), "a refused client opened {pipe:?}: {pipes:?}");
    stderr
}

#[test]
fn keygen_writes_a_private_secret_key_and_never_overwrites() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let secret = keygen(dir.path(), "server");
    let mode = std::fs::metadata(&secret).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the secret key file must be private");
    let secret_text = std::fs::read_to_string(&secret).unwrap();
    let public_text = std::fs::read_to_string(public(&secret)).unwrap();
    let last = |text: &str| text.lines().rev().find(|l| !l.trim().is_empty()).unwrap().trim().to_string();
    assert!(last(&secret_text).starts_with("secret-key = \""), "{secret_text}");
    assert!(secret_text.contains("    public-key = \""), "{secret_text}");
    assert!(last(&public_text).starts_with("public-key = \""), "{public_text}");
    assert!(!public_text.contains("secret-key"));
    let pair = zbroker_client::curve::KeyPair::read(&secret).unwrap();
    assert_eq!(zbroker_client::curve::read_public_key(&public(&secret)).unwrap(), pair.public);

    let again = Command::new(bin("zbroker")).arg("keygen").arg(&secret).output().unwrap();
    assert!(!again.status.success(), "keygen overwrote an existing key");
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(stderr.contains("already exists"), "{stderr}");
    assert_eq!(std::fs::read_to_string(&secret).unwrap(), secret_text, "the secret key changed");
    assert_eq!(std::fs::read_to_string(public(&secret)).unwrap(), public_text, "the public key changed");
}

#[test]
fn only_allowed_keys_reach_the_pipes_over_tcp_and_ipc_stays_open() {
    let keys = tempfile::tempdir().unwrap();
    let server = keygen(keys.path(), "server");
    let client = keygen(keys.path(), "client");
    let stranger = keygen(keys.path(), "stranger");
    let allowed = keys.path().join("allowed");
    std::fs::create_dir(&allowed).unwrap();
    std::fs::copy(public(&client), allowed.join("client.pub")).unwrap();
    let broker = Broker::start(&[
        "--bind",
        "tcp://127.0.0.1:*",
        "--curve-secret-key",
        path_arg(&server),
        "--allow-client-key",
        path_arg(&allowed),
    ]);
    let tcp = broker.tcp_endpoint();
    let server_pub = public(&server);
    let stranger_pub = public(&stranger);
    let status = broker.status();
    assert_eq!(status["curve_endpoints"], serde_json::json!([tcp]), "{status}");
    assert_eq!(status["curve_refused"], 0);

    // The allowed client: data moves.
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let args = tcp_args(&tcp, &server_pub, Some(&client));
    assert_eq!(through(&args, "secure", &data), data);

    // Another key: refused at the handshake, counted, and told about keys.
    let stderr = assert_refused(&broker, &tcp_args(&tcp, &server_pub, Some(&stranger)), "stranger");
    assert!(stderr.contains("--server-key"), "the message should hint at keys: {stderr}");
    assert!(broker.status()["curve_refused"].as_u64().unwrap_or(0) > 0, "the refusal was not counted");

    // An ephemeral key (no --key) is not in the allow-list either.
    assert_refused(&broker, &tcp_args(&tcp, &server_pub, None), "ephemeral");

    // No keys at all over TCP: nothing.
    let stderr = assert_refused(&broker, &["--endpoint", &tcp], "plain");
    assert!(stderr.contains("CURVE"), "the message should hint at CURVE: {stderr}");

    // The wrong server key: the client cannot even say hello.
    assert_refused(&broker, &tcp_args(&tcp, &stranger_pub, Some(&client)), "impostor");

    // The local endpoints are open to local processes without keys.
    assert_eq!(through(&["--broker", &broker.name], "local", b"over ipc"), b"over ipc");
}

#[test]
fn curve_ipc_closes_the_local_endpoints_to_clients_without_keys() {
    let keys = tempfile::tempdir().unwrap();
    let server = keygen(keys.path(), "server");
    let broker = Broker::start(&["--curve-secret-key", path_arg(&server), "--curve-ipc"]);
    assert_refused(&broker, &["--broker", &broker.name], "local");
    // Any client with the server key gets in (no allow-list), over ipc too.
    let ipc = broker.endpoint();
    let server_pub = public(&server);
    let args = tcp_args(&ipc, &server_pub, None);
    assert_eq!(through(&args, "keyed", b"with keys"), b"with keys");
    assert_eq!(broker.status()["curve_allowed_keys"], "any");
}

#[test]
fn sighup_rereads_the_allowed_keys() {
    let keys = tempfile::tempdir().unwrap();
    let server = keygen(keys.path(), "server");
    let late = keygen(keys.path(), "late");
    let allowed = keys.path().join("allowed");
    std::fs::create_dir(&allowed).unwrap();
    let broker = Broker::start(&[
        "--bind",
        "tcp://127.0.0.1:*",
        "--curve-secret-key",
        path_arg(&server),
        "--allow-client-key",
        path_arg(&allowed),
    ]);
    let tcp = broker.tcp_endpoint();
    let server_pub = public(&server);
    let args = tcp_args(&tcp, &server_pub, Some(&late));
    assert_refused(&broker, &args, "before");

    std::fs::copy(public(&late), allowed.join("late.pub")).unwrap();
    signal(&broker.child, libc::SIGHUP);
    assert!(
        wait_until(Duration::from_secs(5), || broker.status()["curve_allowed_keys"] == 1),
        "SIGHUP did not reload the allow-list"
    );
    assert_eq!(through(&args, "after", b"now allowed"), b"now allowed");
}

#[test]
fn a_filemq_subscriber_with_keys_mirrors_over_tcp() {
    let keys = tempfile::tempdir().unwrap();
    let server = keygen(keys.path(), "server");
    let client = keygen(keys.path(), "client");
    let stranger = keygen(keys.path(), "stranger");
    let publisher = tempfile::tempdir().unwrap();
    put(publisher.path(), "a.txt", b"hello");
    put(publisher.path(), "sub/b.bin", &vec![7u8; 200_000]);
    let broker = Broker::start(&[
        "--bind",
        "tcp://127.0.0.1:*",
        "--publish",
        path_arg(publisher.path()),
        "--curve-secret-key",
        path_arg(&server),
        "--allow-client-key",
        path_arg(&public(&client)),
    ]);
    broker.wait_scanned();
    let tcp = broker.tcp_endpoint();
    let server_pub = public(&server);
    let subscribe = |inbox: &Path, key: &Path, timeout: &str| {
        let mut command = Command::new(bin("filemq"));
        command.args(["subscribe", "/", "--inbox", path_arg(inbox), "--once", "--timeout", timeout]);
        command.args(tcp_args(&tcp, &server_pub, Some(key)));
        run(command, b"")
    };

    let inbox = tempfile::tempdir().unwrap();
    let out = subscribe(inbox.path(), &client, "20000");
    assert!(out.status.success(), "filemq failed: {}", String::from_utf8_lossy(&out.stderr));
    assert_same_tree(publisher.path(), inbox.path());

    // A stranger keeps trying, says why, and gets nothing.
    let inbox = tempfile::tempdir().unwrap();
    let out = subscribe(inbox.path(), &stranger, "1500");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "not in sync in time: {stderr}");
    assert!(stderr.contains("--server-key"), "a warning should hint at keys: {stderr}");
    assert!(!inbox.path().join("a.txt").exists());
    assert!(broker.status()["curve_refused"].as_u64().unwrap_or(0) > 0);
}

/// A relay mirrors a CURVE hub with its own allowed key, and serves a leaf.
#[test]
fn a_relay_cascades_from_a_curve_hub() {
    let keys = tempfile::tempdir().unwrap();
    let hub_key = keygen(keys.path(), "hub");
    let relay_key = keygen(keys.path(), "relay");
    let hub_dir = tempfile::tempdir().unwrap();
    let relay_dir = tempfile::tempdir().unwrap();
    let leaf_dir = tempfile::tempdir().unwrap();
    put(hub_dir.path(), "x/y.txt", b"through the tree");
    let hub = Broker::start(&[
        "--publish",
        path_arg(hub_dir.path()),
        "--bind",
        "tcp://127.0.0.1:*",
        "--curve-secret-key",
        path_arg(&hub_key),
        "--allow-client-key",
        path_arg(&public(&relay_key)),
        "--stable-age",
        "100",
    ]);
    let relay = Broker::start(&[
        "--upstream",
        &hub.tcp_endpoint(),
        "--upstream-server-key",
        path_arg(&public(&hub_key)),
        "--upstream-key",
        path_arg(&relay_key),
        "--inbox",
        path_arg(relay_dir.path()),
        "--publish",
        path_arg(relay_dir.path()),
        "--stable-age",
        "100",
    ]);
    let leaf = zbroker_tests::Subscriber::start(&[
        "/",
        "--inbox",
        path_arg(leaf_dir.path()),
        "--broker",
        &relay.name,
    ]);
    assert!(
        zbroker_tests::wait_converged(hub_dir.path(), leaf_dir.path(), Duration::from_secs(60)),
        "the leaf did not converge through the CURVE hop"
    );
    drop(leaf);
}

/// The broker's standard error so far.
fn log_of(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// `curve_refused` in the broker's status.
fn refused_count(broker: &Broker) -> u64 {
    broker.status()["curve_refused"].as_u64().unwrap_or(0)
}

#[test]
fn every_failed_handshake_is_counted_and_logged_and_a_readme_among_the_keys_is_skipped() {
    let keys = tempfile::tempdir().unwrap();
    let server = keygen(keys.path(), "server");
    let client = keygen(keys.path(), "client");
    let stranger = keygen(keys.path(), "stranger");
    let allowed = keys.path().join("clients");
    std::fs::create_dir(&allowed).unwrap();
    std::fs::copy(public(&client), allowed.join("client.pub")).unwrap();
    // Not a key file: skipped with a warning, at start and at every reload.
    std::fs::write(allowed.join("README"), "Put the clients' .pub files here.\n").unwrap();
    let log = keys.path().join("broker.log");
    let log_file = std::fs::File::create(&log).unwrap();
    let broker = Broker::start_with(
        &zbroker_tests::unique_name("handshakes"),
        &[
            "--bind",
            "tcp://127.0.0.1:*",
            "--curve-secret-key",
            path_arg(&server),
            "--allow-client-key",
            path_arg(&allowed),
        ],
        |command| {
            command.stderr(log_file).env("RUST_LOG", "warn");
        },
    );
    assert_eq!(broker.status()["curve_allowed_keys"], 1);
    assert!(log_of(&log).contains("README: not a public key file"), "{}", log_of(&log));
    let tcp = broker.tcp_endpoint();
    let server_pub = public(&server);
    assert_eq!(through(&tcp_args(&tcp, &server_pub, Some(&client)), "ok", b"allowed"), b"allowed");
    assert_eq!(refused_count(&broker), 0);

    // Each kind of failure raises the count and is logged with the address.
    let mut seen = 0;
    let stranger_pub = public(&stranger);
    // A client without keys fails on the broker's side as a mechanism
    // mismatch or, if the client hangs up first, a connection ended.
    let cases: [(Vec<&str>, &[&str]); 3] = [
        (vec!["--endpoint", &tcp], &["does not speak CURVE", "ended during the handshake"]),
        (tcp_args(&tcp, &stranger_pub, Some(&client)), &["wrong server key"]),
        (tcp_args(&tcp, &server_pub, Some(&stranger)), &["not in the allow-list"]),
    ];
    for (args, words) in cases {
        assert_refused(&broker, &args, "refused");
        assert!(
            wait_until(Duration::from_secs(5), || refused_count(&broker) > seen),
            "{words:?}: not counted"
        );
        seen = refused_count(&broker);
        assert!(
            wait_until(Duration::from_secs(5), || log_of(&log)
                .lines()
                .any(|l| words.iter().any(|w| l.contains(w)) && l.contains("127.0.0.1"))),
            "{words:?}: not logged with the address: {}",
            log_of(&log)
        );
    }
    // Logged at most once per address and reason every 10 s, whatever the
    // retries (each refused client above retried for 3 s).
    let lines = log_of(&log).lines().filter(|l| l.contains("handshake from")).count();
    assert!(lines <= 4, "{}", log_of(&log));

    // SIGHUP with the README still there reloads fine.
    std::fs::copy(public(&stranger), allowed.join("stranger.pub")).unwrap();
    signal(&broker.child, libc::SIGHUP);
    assert!(
        wait_until(Duration::from_secs(5), || broker.status()["curve_allowed_keys"] == 2),
        "SIGHUP did not reload the allow-list: {}",
        log_of(&log)
    );
}
