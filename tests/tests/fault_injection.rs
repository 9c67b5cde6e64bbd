//! Seeded fault injection: kill -9 the pipe's reader or writer, the FILEMQ
//! subscriber or the broker at a random point of a transfer, round after
//! round, then bring everything back and check what must hold:
//!
//! - no inbox file is ever torn: it is always one of the versions published;
//! - the tree converges to identical digests once everything runs again;
//! - a pipe writer learns of its reader's death within 2 s;
//! - what a pipe reader received is exactly a prefix of what was written
//!   (nothing lost in the middle, nothing duplicated), and all of it when
//!   neither end nor the broker was killed.
//!
//! CI runs a few rounds; `ZBROKER_FAULT_ROUNDS=200` runs a long campaign and
//! `ZBROKER_FAULT_SEED=N` replays one (the seed is printed).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use zbroker_tests::{
    bin, pseudo_random, put, sha1_hex, signal, tree_digests, unique_name, wait_converged, wait_timeout,
    Broker, Rng,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Victim {
    Reader,
    Writer,
    Subscriber,
    Broker,
}

const VICTIMS: [Victim; 4] = [Victim::Reader, Victim::Writer, Victim::Subscriber, Victim::Broker];

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn path_arg(path: &Path) -> &str {
    path.to_str().expect("temporary paths are UTF-8")
}

fn subscriber(broker: &str, inbox: &Path) -> Child {
    Command::new(bin("filemq"))
        .args(["subscribe", "/", "--inbox", path_arg(inbox), "--broker", broker])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start filemq")
}

fn zpipes(broker: &str, args: &[&str], stdin: Stdio, stdout: Stdio) -> Child {
    Command::new(bin("zpipes"))
        .args(["--broker", broker])
        .args(args)
        .stdin(stdin)
        .stdout(stdout)
        .stderr(Stdio::null())
        .spawn()
        .expect("start zpipes")
}

fn kill(child: &mut Child) {
    signal(child, libc::SIGKILL);
    let _ = child.wait();
}

/// Every file in the inbox is a version that was published at that path.
fn assert_untorn(inbox: &Path, versions: &BTreeMap<String, BTreeSet<String>>, round: u64) {
    for (path, digest) in tree_digests(inbox) {
        let known = versions.get(&path).is_some_and(|v| v.contains(&digest));
        assert!(known, "round {round}: inbox file {path} is torn or unknown (digest {digest})");
    }
}

#[test]
fn random_kills_never_tear_lose_or_duplicate() {
    let rounds = env_u64("ZBROKER_FAULT_ROUNDS", 6);
    let seed = env_u64("ZBROKER_FAULT_SEED", 0x5EED_F00D);
    eprintln!("fault injection: {rounds} rounds, seed {seed} (ZBROKER_FAULT_SEED to replay)");
    let mut rng = Rng::new(seed);
    let mut order = VICTIMS;
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let publisher = tempfile::tempdir().unwrap();
    let inbox = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let mut versions: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let publish = |rel: &str, data: &[u8], versions: &mut BTreeMap<String, BTreeSet<String>>| {
        versions.entry(rel.to_string()).or_default().insert(sha1_hex(data));
        put(publisher.path(), rel, data);
    };
    for i in 0..12u64 {
        publish(&format!("f{i}"), &pseudo_random(1 << 20, i), &mut versions);
    }

    let name = unique_name("faults");
    let broker_args = [
        "--publish",
        path_arg(publisher.path()),
        "--state-dir",
        path_arg(state.path()),
        "--stable-age",
        "200",
    ];
    let mut broker = Broker::start_named(&name, &broker_args);
    let mut sub = subscriber(&name, inbox.path());
    let input: PathBuf = scratch.path().join("input");
    let data = pseudo_random(24 << 20, seed);
    std::fs::write(&input, &data).unwrap();

    for round in 0..rounds {
        // A change to mirror while things die: a new version of one file.
        let rel = format!("f{}", rng.below(12));
        let size = (256 << 10) + rng.below(2 << 20) as usize;
        publish(&rel, &pseudo_random(size, rng.next()), &mut versions);

        let output = scratch.path().join(format!("output{round}"));
        let pipe = format!("pipe{round}");
        let mut reader = zpipes(
            &name,
            &["read", &pipe],
            Stdio::null(),
            Stdio::from(std::fs::File::create(&output).unwrap()),
        );
        let mut writer = zpipes(
            &name,
            &["write", &pipe],
            Stdio::from(std::fs::File::open(&input).unwrap()),
            Stdio::null(),
        );
        // Every victim once in the first four rounds (in a seeded order),
        // then at random.
        let victim = if round < 4 { order[round as usize] } else { VICTIMS[rng.below(4) as usize] };
        std::thread::sleep(Duration::from_millis(50 + rng.below(400)));
        eprintln!("round {round}: changed {rel}, killing the {victim:?}");
        match victim {
            Victim::Reader => {
                kill(&mut reader);
                let died = Instant::now();
                // The writer may have finished before the kill; if not, it
                // must fail promptly.
                let status = wait_timeout(&mut writer, Duration::from_secs(10)).expect("the writer ends");
                if !status.success() {
                    assert!(
                        died.elapsed() < Duration::from_secs(2),
                        "round {round}: the writer took {:?} to notice its reader's death",
                        died.elapsed()
                    );
                }
            }
            Victim::Writer => kill(&mut writer),
            Victim::Subscriber => kill(&mut sub),
            Victim::Broker => kill(&mut broker.child),
        }
        assert_untorn(inbox.path(), &versions, round);

        // The pipe ends finish (or fail) on their own.
        for child in [&mut reader, &mut writer] {
            if wait_timeout(child, Duration::from_secs(30)).is_none() {
                kill(child);
            }
        }
        let got = std::fs::read(&output).unwrap();
        assert!(
            data.starts_with(&got),
            "round {round}: the reader got bytes that are not a prefix of the stream"
        );
        if victim == Victim::Subscriber {
            assert_eq!(got.len(), data.len(), "round {round}: the pipe was cut though neither end died");
        }

        // Everything back up; the mirror converges.
        if victim == Victim::Broker {
            std::thread::sleep(Duration::from_millis(200));
            broker = Broker::start_named(&name, &broker_args);
        }
        if victim == Victim::Subscriber {
            sub = subscriber(&name, inbox.path());
        }
        assert!(
            wait_converged(publisher.path(), inbox.path(), Duration::from_secs(60)),
            "round {round}: the inbox did not converge after the {victim:?} was killed"
        );
        assert_untorn(inbox.path(), &versions, round);
    }
    kill(&mut sub);
    drop(broker);
}
