//! The libzmq we link (built by `vendor/zmq-sys` against libsodium from the
//! `libsodium-sys-stable` crate) supports CURVE, and CURVE really
//! authenticates the server. Plain (NULL mechanism) sockets are unchanged.

use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(5);
/// How long a peer that must not get through is given to try.
const REFUSED_WAIT: Duration = Duration::from_millis(750);

fn millis(d: Duration) -> i32 {
    d.as_millis().try_into().unwrap()
}

/// A CURVE server ROUTER bound to an ephemeral loopback port.
fn curve_server(ctx: &zmq::Context, keys: &zmq::CurveKeyPair) -> (zmq::Socket, String) {
    let router = ctx.socket(zmq::ROUTER).unwrap();
    router.set_linger(0).unwrap();
    router.set_curve_server(true).unwrap();
    router.set_curve_secretkey(&keys.secret_key).unwrap();
    router.set_rcvtimeo(millis(TIMEOUT)).unwrap();
    router.bind("tcp://127.0.0.1:*").unwrap();
    let endpoint = router.get_last_endpoint().unwrap().unwrap();
    (router, endpoint)
}

/// A CURVE client DEALER that trusts `server_key`, with a fresh key pair.
fn curve_client(ctx: &zmq::Context, server_key: &[u8], endpoint: &str) -> zmq::Socket {
    let keys = zmq::CurveKeyPair::new().unwrap();
    let dealer = ctx.socket(zmq::DEALER).unwrap();
    dealer.set_linger(0).unwrap();
    dealer.set_curve_serverkey(server_key).unwrap();
    dealer.set_curve_publickey(&keys.public_key).unwrap();
    dealer.set_curve_secretkey(&keys.secret_key).unwrap();
    dealer.set_rcvtimeo(millis(TIMEOUT)).unwrap();
    dealer.connect(endpoint).unwrap();
    dealer
}

/// Sends `body` from `dealer`, expects it at `router`, and answers it.
fn round_trip(router: &zmq::Socket, dealer: &zmq::Socket, body: &[u8]) {
    dealer.send(body, 0).unwrap();
    let frames = router.recv_multipart(0).expect("the server received the message");
    assert_eq!(frames.len(), 2, "routing id + body: {frames:?}");
    assert_eq!(frames[1], body);
    router.send_multipart([&frames[0][..], b"world"], 0).unwrap();
    assert_eq!(dealer.recv_bytes(0).expect("the client received the reply"), b"world");
}

#[test]
fn libzmq_has_curve() {
    assert_eq!(zmq::has("curve"), Some(true));
    let keys = zmq::CurveKeyPair::new().expect("zmq_curve_keypair works");
    assert_ne!(keys.public_key, [0; 32]);
    assert_ne!(keys.public_key, keys.secret_key);
}

#[test]
fn curve_handshake_over_tcp() {
    let ctx = zmq::Context::new();
    let server_keys = zmq::CurveKeyPair::new().unwrap();
    let (router, endpoint) = curve_server(&ctx, &server_keys);
    assert_eq!(router.get_mechanism().unwrap(), zmq::Mechanism::ZMQ_CURVE);

    let dealer = curve_client(&ctx, &server_keys.public_key, &endpoint);
    assert_eq!(dealer.get_mechanism().unwrap(), zmq::Mechanism::ZMQ_CURVE);
    round_trip(&router, &dealer, b"hello");
}

#[test]
fn wrong_server_key_gets_nothing() {
    let ctx = zmq::Context::new();
    let server_keys = zmq::CurveKeyPair::new().unwrap();
    let (router, endpoint) = curve_server(&ctx, &server_keys);

    // A client that trusts another server key: its HELLO cannot be opened by
    // the server, the handshake fails and nothing is delivered either way.
    let impostor_keys = zmq::CurveKeyPair::new().unwrap();
    let wrong = curve_client(&ctx, &impostor_keys.public_key, &endpoint);
    wrong.send("from the wrong client", 0).unwrap();

    // A client without any keys (NULL mechanism) does not get through either.
    let plain = ctx.socket(zmq::DEALER).unwrap();
    plain.set_linger(0).unwrap();
    plain.connect(&endpoint).unwrap();
    plain.send("from a plain client", 0).unwrap();

    router.set_rcvtimeo(millis(REFUSED_WAIT)).unwrap();
    match router.recv_multipart(0) {
        Err(zmq::Error::EAGAIN) => {}
        other => panic!("a client without the server's key got through: {other:?}"),
    }

    // The server itself is fine: a client with the right key is served.
    router.set_rcvtimeo(millis(TIMEOUT)).unwrap();
    let right = curve_client(&ctx, &server_keys.public_key, &endpoint);
    round_trip(&router, &right, b"hello");

    // And the wrong client never hears from the server.
    wrong.set_rcvtimeo(millis(REFUSED_WAIT)).unwrap();
    assert!(matches!(wrong.recv_bytes(0), Err(zmq::Error::EAGAIN)));
}

#[test]
fn no_keys_over_ipc_is_unchanged() {
    let ctx = zmq::Context::new();
    let endpoint = format!("ipc://@/zbroker-curve-test/{}", std::process::id());
    let router = ctx.socket(zmq::ROUTER).unwrap();
    router.set_linger(0).unwrap();
    router.set_rcvtimeo(millis(TIMEOUT)).unwrap();
    router.bind(&endpoint).unwrap();
    let dealer = ctx.socket(zmq::DEALER).unwrap();
    dealer.set_linger(0).unwrap();
    dealer.set_rcvtimeo(millis(TIMEOUT)).unwrap();
    dealer.connect(&endpoint).unwrap();
    assert_eq!(router.get_mechanism().unwrap(), zmq::Mechanism::ZMQ_NULL);
    round_trip(&router, &dealer, b"hello");
}
