//! Outbound links through the public contract only: a toy relay service,
//! embedded with `zbroker::reactor::spawn`, opens links to a real `zbroker`
//! process and speaks ZPIPES to it over them (a pipe opened, written and
//! read on the remote broker; PINGs), while the test kills, freezes and
//! restarts that broker, feeds the service bad endpoints, too many links,
//! a peer that never reads, and CURVE keys right and wrong. Figures (time
//! to `Down` and `Up`, round trips over a link and direct) are printed.

use bytes::Bytes;
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};
use zbroker::reactor::Settings;
use zbroker_client::{curve, endpoint};
use zbroker_proto::codec::{Chunk, LongStr, ShortStr};
use zbroker_proto::ZpipesMsg;
use zbroker_services::link::{Heartbeat, LinkEvent, LinkKey, LinkOptions};
use zbroker_services::{Action, ConnId, Service, TimerKey};
use zbroker_tests::{bin, signal, unique_name, Broker, Raw};

zbroker_proto::protocol! {
    /// The test's handle on the relay: open and close links, relay through
    /// them; the service answers and reports its links' events.
    pub enum RelayMsg, signature 0xAAE1 {
        /// `server_key`: Z85, empty for none; `heartbeat_ms` 0: none.
        Open = 1 from client { key: u32, endpoint: LongStr, server_key: ShortStr, heartbeat_ms: u32 },
        Close = 2 from client { key: u32 },
        /// Through the remote broker: OUTPUT on `writer`, INPUT on
        /// `reader`, WRITE `text`, READ it back.
        Pipe = 3 from client { writer: u32, reader: u32, pipe: ShortStr, text: LongStr },
        Ping = 4 from client { key: u32 },
        /// `count` frames of `size` bytes on link `key`, at once.
        Flood = 5 from client { key: u32, count: u32, size: u32 },
        Answer = 6 from server { text: LongStr },
        /// A link event: "up", "down retrying: …", "down final: …".
        Note = 7 from server { key: u32, text: LongStr },
    }
}

const MAX_LINKS: usize = 8;
const MAX_PARKED: usize = 256 << 10;

/// A pipe relay under way.
struct Relay {
    writer: LinkKey,
    reader: LinkKey,
    text: Bytes,
}

/// The toy service: deterministic, no socket, no clock.
#[derive(Default)]
struct RelayService {
    /// Whoever spoke last gets answers and notes.
    controller: Option<ConnId>,
    relay: Option<Relay>,
}

impl RelayService {
    fn tell(&self, out: &mut Vec<Action>, msg: RelayMsg) {
        if let Some(to) = self.controller {
            out.push(Action::Send { to, frame: msg.encode() });
        }
    }
    fn answer(&self, out: &mut Vec<Action>, text: &str) {
        self.tell(out, RelayMsg::Answer { text: text.into() });
    }
}

fn zpipes(key: LinkKey, msg: ZpipesMsg) -> Action {
    Action::LinkSend { key, frame: msg.encode() }
}

impl Service for RelayService {
    fn name(&self) -> &'static str {
        "relay"
    }
    fn signature(&self) -> u16 {
        RelayMsg::SIGNATURE
    }
    fn local_endpoint(&self, broker: &str) -> String {
        format!("ipc://@/relay/{broker}")
    }
    fn max_frame(&self) -> usize {
        1 << 20
    }
    fn max_parked(&self) -> usize {
        MAX_PARKED
    }
    fn max_links(&self) -> usize {
        MAX_LINKS
    }
    fn handle(&mut self, conn: ConnId, frame: Bytes, _: Instant, out: &mut Vec<Action>) {
        self.controller = Some(conn);
        let Ok(msg) = RelayMsg::decode(frame) else { return };
        match msg {
            RelayMsg::Open { key, endpoint, server_key, heartbeat_ms } => {
                let server_key = match server_key.to_string_lossy().as_str() {
                    "" => None,
                    text => match curve::z85_decode(text) {
                        Ok(key) => Some(key),
                        Err(e) => return self.answer(out, &format!("bad key: {e}")),
                    },
                };
                let heartbeat = (heartbeat_ms > 0).then(|| Heartbeat {
                    interval: Duration::from_millis(u64::from(heartbeat_ms) / 4),
                    timeout: Duration::from_millis(u64::from(heartbeat_ms)),
                });
                let endpoint = String::from_utf8_lossy(endpoint.as_bytes()).into_owned();
                out.push(Action::Connect {
                    key: key.into(),
                    endpoint,
                    options: LinkOptions { server_key, heartbeat },
                });
            }
            RelayMsg::Close { key } => out.push(Action::Disconnect { key: key.into() }),
            RelayMsg::Pipe { writer, reader, pipe, text } => {
                let (writer, reader) = (LinkKey::from(writer), LinkKey::from(reader));
                out.push(zpipes(writer, ZpipesMsg::Output { pipename: pipe.clone() }));
                out.push(zpipes(reader, ZpipesMsg::Input { pipename: pipe }));
                self.relay = Some(Relay { writer, reader, text: text.0 });
            }
            RelayMsg::Ping { key } => out.push(zpipes(key.into(), ZpipesMsg::Ping {})),
            RelayMsg::Flood { key, count, size } => {
                for _ in 0..count {
                    out.push(Action::LinkSend { key: key.into(), frame: vec![0xAA; size as usize] });
                }
            }
            RelayMsg::Answer { .. } | RelayMsg::Note { .. } => {}
        }
    }
    fn on_link(&mut self, key: LinkKey, event: LinkEvent, _: Instant, out: &mut Vec<Action>) {
        let frame = match event {
            LinkEvent::Up => return self.tell(out, note(key, "up".into())),
            LinkEvent::Down { why } => {
                let kind = if why.retrying() { "retrying" } else { "final" };
                return self.tell(out, note(key, format!("down {kind}: {why}")));
            }
            LinkEvent::Frame(frame) => frame,
        };
        let Ok(msg) = ZpipesMsg::decode(frame) else { return self.answer(out, "garbage from the link") };
        let relay = self.relay.as_ref();
        match msg {
            ZpipesMsg::PingOk {} => self.answer(out, "pong"),
            ZpipesMsg::OutputOk {} => {
                if let Some(relay) = relay.filter(|r| r.writer == key) {
                    let chunk = Chunk(relay.text.clone());
                    out.push(zpipes(key, ZpipesMsg::Write { chunk, timeout: 5000 }));
                }
            }
            ZpipesMsg::InputOk {} => {
                if let Some(relay) = relay.filter(|r| r.reader == key) {
                    out.push(zpipes(key, ZpipesMsg::Read { size: relay.text.len() as u32, timeout: 5000 }));
                }
            }
            ZpipesMsg::WriteOk {} => out.push(zpipes(key, ZpipesMsg::Close {})),
            ZpipesMsg::ReadOk { chunk } => {
                out.push(zpipes(key, ZpipesMsg::Close {}));
                self.relay = None;
                self.answer(out, &format!("read {}", String::from_utf8_lossy(&chunk.0)));
            }
            ZpipesMsg::CloseOk {} => {}
            other => self.answer(out, &format!("failed: {other:?}")),
        }
    }
    fn on_timer(&mut self, _: TimerKey, _: Instant, _: &mut Vec<Action>) {}
    fn on_disconnect(&mut self, _: ConnId, _: Instant, _: &mut Vec<Action>) {}
    fn status(&self) -> serde_json::Value {
        serde_json::json!({})
    }
}

fn note(key: LinkKey, text: String) -> RelayMsg {
    RelayMsg::Note { key: key as u32, text: text.as_str().into() }
}

/// The relay embedded in this process under a name of its own.
fn start_relay() -> String {
    let name = unique_name("relay");
    let settings = Settings {
        name: name.clone(),
        binds: Vec::new(),
        control_endpoint: endpoint::control(&name),
        control_token: None,
        state_dir: None,
        max_connections: 100,
        budget: Default::default(),
    };
    zbroker::reactor::spawn(settings, || vec![Box::new(RelayService::default()) as Box<dyn Service>])
        .expect("the relay binds");
    name
}

/// The test's side of the relay: answers and notes as they come.
struct Controller {
    raw: Raw,
    answers: VecDeque<String>,
    notes: HashMap<u32, VecDeque<(String, Instant)>>,
}

impl Controller {
    fn new(relay: &str) -> Controller {
        Controller {
            raw: Raw::connect(&format!("ipc://@/relay/{relay}")),
            answers: VecDeque::new(),
            notes: HashMap::new(),
        }
    }
    fn send(&self, msg: RelayMsg) {
        self.raw.send_bytes(&msg.encode());
    }
    fn open(&self, key: u32, endpoint: &str, server_key: &str, heartbeat_ms: u32) {
        self.send(RelayMsg::Open {
            key,
            endpoint: endpoint.into(),
            server_key: ShortStr::lossy(server_key),
            heartbeat_ms,
        });
    }
    /// Takes in what arrives within `ms`; false if nothing did.
    fn pump(&mut self, ms: i64) -> bool {
        let Some(frame) = self.raw.recv_bytes(ms) else { return false };
        match RelayMsg::decode(frame).expect("the relay sends its own messages") {
            RelayMsg::Answer { text } => self.answers.push_back(text.to_string_lossy()),
            RelayMsg::Note { key, text } => {
                self.notes.entry(key).or_default().push_back((text.to_string_lossy(), Instant::now()))
            }
            other => panic!("unexpected {other:?}"),
        }
        true
    }
    fn answer(&mut self, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        while self.answers.is_empty() && Instant::now() < deadline {
            self.pump(10);
        }
        self.answers.pop_front().unwrap_or_else(|| panic!("no answer within {limit:?}"))
    }
    /// The next note of link `key`, and when it arrived.
    fn note(&mut self, key: u32, limit: Duration) -> (String, Instant) {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(note) = self.notes.get_mut(&key).and_then(VecDeque::pop_front) {
                return note;
            }
            assert!(Instant::now() < deadline, "no note for link {key} within {limit:?}");
            self.pump(10);
        }
    }
    fn expect_up(&mut self, key: u32, limit: Duration) -> Instant {
        let (text, at) = self.note(key, limit);
        assert_eq!(text, "up", "link {key}");
        at
    }
    fn relay_pipe(&mut self, pipe: &str, text: &str) -> String {
        self.send(RelayMsg::Pipe { writer: 1, reader: 2, pipe: ShortStr::lossy(pipe), text: text.into() });
        self.answer(Duration::from_secs(10))
    }
    fn ping(&mut self) -> Duration {
        let began = Instant::now();
        self.send(RelayMsg::Ping { key: 1 });
        assert_eq!(self.answer(Duration::from_secs(5)), "pong");
        began.elapsed()
    }
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn tcp_broker(name: &str, port: Option<u16>, extra: &[&str]) -> Broker {
    let bind = format!("tcp://127.0.0.1:{}", port.map_or("*".to_string(), |p| p.to_string()));
    let mut args = vec!["--bind", bind.as_str()];
    args.extend_from_slice(extra);
    Broker::start_named(name, &args)
}

fn port_of(endpoint: &str) -> u16 {
    endpoint.rsplit(':').next().and_then(|p| p.parse().ok()).expect("a tcp endpoint with a port")
}

fn link_status(relay: &str) -> Vec<serde_json::Value> {
    let status = zbroker_tests::status_of(relay, Duration::from_secs(2)).expect("the relay answers status");
    status["services"]["relay"]["links"].as_array().cloned().unwrap_or_default()
}

#[test]
fn zpipes_over_links_to_a_real_broker_survives_its_death_and_restart() {
    let remote_name = unique_name("remote");
    let mut remote = tcp_broker(&remote_name, None, &[]);
    let remote_endpoint = remote.tcp_endpoint();
    let relay = start_relay();
    let mut control = Controller::new(&relay);
    control.open(1, &remote_endpoint, "", 1000);
    control.open(2, &remote_endpoint, "", 1000);
    control.expect_up(1, Duration::from_secs(5));
    control.expect_up(2, Duration::from_secs(5));

    // Frames both ways: a pipe on the remote broker, written on one link
    // and read on the other.
    assert_eq!(control.relay_pipe("over-links", "hello across brokers"), "read hello across brokers");
    let links = link_status(&relay);
    assert_eq!(links.len(), 2, "{links:?}");
    for link in &links {
        assert_eq!(link["state"], "up", "{link}");
        assert_eq!(link["endpoint"], remote_endpoint.as_str());
        assert!(link["frames_out"].as_u64() >= Some(3) && link["frames_in"].as_u64() >= Some(2), "{link}");
    }
    // The remote saw the bytes as a pipe.
    assert!(remote.zpipes()["bytes_moved"].as_u64() >= Some(20), "{}", remote.zpipes());

    // Round trips: through the relay and its link, and straight to the
    // remote broker.
    let over_link = median((0..300).map(|_| control.ping()).collect());
    let direct_raw = Raw::connect(&remote_endpoint);
    let direct = median(
        (0..300)
            .map(|_| {
                let began = Instant::now();
                assert_eq!(direct_raw.ask(ZpipesMsg::Ping {}), ZpipesMsg::PingOk {});
                began.elapsed()
            })
            .collect(),
    );
    eprintln!("round trip, median of 300: client → relay → link → remote and back {over_link:?}; client → remote {direct:?}");
    assert!(over_link < Duration::from_secs(1), "{over_link:?}");

    // The remote dies: both links go down, and say they retry.
    let killed = Instant::now();
    remote.child.kill().expect("SIGKILL the remote");
    remote.child.wait().expect("reaped");
    for key in [1, 2] {
        let (text, at) = control.note(key, Duration::from_secs(10));
        assert!(text.starts_with("down retrying: the peer at"), "{text}");
        eprintln!("link {key}: Down {:?} after the remote was killed", at - killed);
    }
    let links = link_status(&relay);
    assert!(links.iter().all(|l| l["state"] == "down" && l["downs"] == 1), "{links:?}");

    // It comes back on the same port: the links come up by themselves, and
    // traffic resumes.
    let restarting = Instant::now();
    let _remote = tcp_broker(&remote_name, Some(port_of(&remote_endpoint)), &[]);
    let ready = Instant::now();
    for key in [1, 2] {
        let up = control.expect_up(key, Duration::from_secs(10));
        eprintln!(
            "link {key}: Up {:?} after the restart began ({:?} after it answered status)",
            up - restarting,
            up.saturating_duration_since(ready)
        );
    }
    assert_eq!(control.relay_pipe("after-restart", "still here"), "read still here");
    control.ping();
}

#[test]
fn heartbeats_find_a_frozen_peer() {
    let remote = tcp_broker(&unique_name("frozen"), None, &[]);
    let relay = start_relay();
    let mut control = Controller::new(&relay);
    control.open(1, &remote.tcp_endpoint(), "", 600);
    control.expect_up(1, Duration::from_secs(5));
    control.ping();
    // SIGSTOP: the connection stays open, nothing answers.
    signal(&remote.child, libc::SIGSTOP);
    let frozen = Instant::now();
    let (text, at) = control.note(1, Duration::from_secs(10));
    signal(&remote.child, libc::SIGCONT);
    assert!(text.starts_with("down retrying"), "{text}");
    let found = at - frozen;
    eprintln!("a frozen peer: Down {found:?} after SIGSTOP (heartbeat timeout 600 ms)");
    assert!(found >= Duration::from_millis(300) && found < Duration::from_secs(5), "{found:?}");
    control.expect_up(1, Duration::from_secs(10));
    control.ping();
}

#[test]
fn bad_endpoints_and_the_link_limit_give_final_downs() {
    let relay = start_relay();
    let mut control = Controller::new(&relay);
    for (key, bad) in [(1, "127.0.0.1:5670"), (2, "tcp://127.0.0.1:99999"), (3, "tcp://*:5670")] {
        control.open(key, bad, "", 0);
        let (text, _) = control.note(key, Duration::from_secs(5));
        assert!(text.starts_with("down final: endpoint refused"), "{bad}: {text}");
    }
    assert!(link_status(&relay).is_empty(), "refused links are not kept");

    // Nothing listens on a port we bound and let go: the links stay and
    // retry, each said once.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
        listener.local_addr().expect("its address").port()
    };
    let nowhere = format!("tcp://127.0.0.1:{closed}");
    for key in 0..MAX_LINKS as u32 {
        control.open(10 + key, &nowhere, "", 0);
        let (text, _) = control.note(10 + key, Duration::from_secs(5));
        assert!(text.starts_with("down retrying: nothing answers"), "{text}");
    }
    control.open(99, &nowhere, "", 0);
    let (text, _) = control.note(99, Duration::from_secs(5));
    assert!(text.starts_with("down final: link limit reached: 8 links for this service"), "{text}");
    // Replacing a link is no new one; closing one frees its place.
    control.open(10, &nowhere, "", 0);
    control.send(RelayMsg::Close { key: 11 });
    control.open(99, &nowhere, "", 0);
    assert!(control.note(99, Duration::from_secs(5)).0.starts_with("down retrying"));
    let links = link_status(&relay);
    assert_eq!(links.len(), MAX_LINKS, "{links:?}");
    assert!(!links.iter().any(|l| l["key"] == 11), "link 11 was closed");
    // `zbroker status` shows them to a person.
    let shown = std::process::Command::new(bin("zbroker")).args(["status", &relay]).output().expect("status");
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(shown.contains(&format!("relay link 99 -> {nowhere}: down, 0 frames (0 bytes) in")), "{shown}");
    let status = zbroker_tests::status_of(&relay, Duration::from_secs(2)).expect("status");
    assert_eq!(status["max_links"], 256);
}

#[test]
fn a_peer_that_never_reads_is_dropped_past_the_parking_bound() {
    let context = zmq::Context::new();
    let sink = context.socket(zmq::ROUTER).expect("a ROUTER");
    sink.set_rcvhwm(1).expect("rcvhwm");
    sink.set_rcvbuf(4096).expect("rcvbuf");
    sink.set_linger(0).expect("linger");
    sink.bind("tcp://127.0.0.1:*").expect("bind");
    let sink_endpoint = sink.get_last_endpoint().expect("endpoint").expect("utf-8");
    let relay = start_relay();
    let mut control = Controller::new(&relay);
    control.open(1, &sink_endpoint, "", 0);
    control.expect_up(1, Duration::from_secs(5));
    // 64 MB for a peer that takes nothing: libzmq and the kernel hold some,
    // then at most MAX_PARKED bytes wait here.
    for _ in 0..16 {
        control.send(RelayMsg::Flood { key: 1, count: 256, size: 16 << 10 });
    }
    let (text, _) = control.note(1, Duration::from_secs(20));
    assert_eq!(
        text,
        format!("down final: the peer at {sink_endpoint} is too slow: over {MAX_PARKED} bytes waited for it")
    );
    assert!(link_status(&relay).is_empty(), "the slow link is closed");
}

#[test]
fn curve_links_come_up_with_the_right_key_only() {
    let keys = tempfile::tempdir().expect("a key directory");
    let secret = keys.path().join("server");
    let out = std::process::Command::new(bin("zbroker")).arg("keygen").arg(&secret).output().expect("keygen");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let server_key = curve::read_public_key(&curve::public_path(&secret)).expect("the public key");
    let remote =
        tcp_broker(&unique_name("curve"), None, &["--curve-secret-key", secret.to_str().expect("utf-8")]);
    let remote_endpoint = remote.tcp_endpoint();
    let relay = start_relay();
    let mut control = Controller::new(&relay);

    control.open(1, &remote_endpoint, &curve::z85_encode(&server_key), 1000);
    control.expect_up(1, Duration::from_secs(5));
    control.ping();
    assert_eq!(link_status(&relay)[0]["curve"], true);

    let wrong = curve::KeyPair::generate().expect("a key pair").public;
    control.open(2, &remote_endpoint, &curve::z85_encode(&wrong), 1000);
    let (text, _) = control.note(2, Duration::from_secs(5));
    assert!(text.starts_with("down final: handshake with") && text.contains("wrong server key"), "{text}");

    control.open(3, &remote_endpoint, "", 1000);
    let (text, _) = control.note(3, Duration::from_secs(5));
    // libzmq says only that the server closed the connection (or, at
    // times, that the mechanisms differ): final either way.
    assert!(
        text.starts_with("down final: handshake with")
            && (text.contains("does it require CURVE") || text.contains("one side speaks CURVE")),
        "{text}"
    );
    assert_eq!(link_status(&relay).len(), 1, "only the good link is kept");
    // The good one still carries traffic.
    control.ping();
}
