//! Bounds the broker enforces on whole connections.

use std::time::Duration;
use zbroker_proto::codec::ShortStr;
use zbroker_proto::filemq::FilemqMsg;
use zbroker_proto::ZpipesMsg as M;
use zbroker_tests::{wait_until, Broker, Raw};

fn pipe(name: &str) -> ShortStr {
    ShortStr::lossy(name)
}

/// Beyond `--max-connections`, a new peer gets its protocol's refusal and
/// the broker carries on; when a peer leaves, there is room again.
#[test]
fn connections_beyond_the_limit_are_refused_cleanly() {
    let broker = Broker::start(&["--max-connections", "2"]);
    let first = Raw::connect(&broker.endpoint());
    assert_eq!(first.ask(M::Ping {}), M::PingOk {});
    let second = Raw::connect(&broker.filemq_endpoint());
    second.send_bytes(&FilemqMsg::Hugz {}.encode());
    assert!(second.recv_bytes(5000).is_some());

    let refused = Raw::connect(&broker.endpoint());
    match refused.ask(M::Input { pipename: pipe("p") }) {
        M::InputFailed { reason } => assert!(reason.to_string_lossy().contains("connection limit")),
        other => panic!("expected INPUT_FAILED, got {other:?}"),
    }
    let refused_files = Raw::connect(&broker.filemq_endpoint());
    refused_files.send_bytes(&FilemqMsg::Ohai { protocol: ShortStr::lossy("FILEMQ"), version: 2 }.encode());
    let reply = FilemqMsg::decode(refused_files.recv_bytes(5000).expect("a refusal")).unwrap();
    assert!(matches!(reply, FilemqMsg::Srsly { .. }), "{reply:?}");
    let status = broker.status();
    assert_eq!(status["peers"], 2);
    assert_eq!(status["refused_connections"], 2);

    // The first peer leaves; a newcomer is served.
    drop(first);
    assert!(wait_until(Duration::from_secs(5), || broker.status()["peers"] == 1));
    let third = Raw::connect(&broker.endpoint());
    assert_eq!(third.ask(M::Input { pipename: pipe("p") }), M::InputOk {});
}
