//! A third service added through the public contract only, as ARCHITECTURE.md
//! "Adding a service" says: its protocol declared once with `protocol!`,
//! a `Service` with an executor of its own (one off-loop job) and a control
//! command of its own type, registered beside ZPIPES with one line, driven
//! through the real reactor and real sockets. Nothing in the host names it.

use bytes::Bytes;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};
use zbroker::reactor::Settings;
use zbroker_client::endpoint;
use zbroker_proto::codec::LongStr;
use zbroker_proto::ZpipesMsg;
use zbroker_services::work::{self, Executor, Lane, Reporter};
use zbroker_services::zpipes::{self, Zpipes};
use zbroker_services::{Action, Answer, Command, CommandError, ConnId, Service, Success, TimerKey};
use zbroker_tests::unique_name;

// 1. The protocol, declared once.
zbroker_proto::protocol! {
    /// A toy protocol: ECHO asks for the text back in upper case.
    pub enum EchoMsg, signature 0xAAE0 {
        Echo = 1 from client { text: LongStr },
        EchoOk = 2 from server { text: LongStr },
    }
}

/// 2. Its off-loop job and outcome: the host never looks inside.
struct Shout {
    conn: ConnId,
    text: Bytes,
}
struct Shouted {
    conn: ConnId,
    text: Vec<u8>,
    thread: String,
}

/// The one place the echo service "does I/O": a worker thread.
struct ShoutExecutor;

impl Executor for ShoutExecutor {
    fn lanes(&self) -> Vec<Lane> {
        vec![Lane { name: "shout", threads: 1 }]
    }
    fn lane(&self, _: &work::Job) -> usize {
        0
    }
    fn run(&self, _key: u64, job: work::Job, _: &Arc<dyn Reporter>) -> Option<work::Done> {
        let Shout { conn, text } = *job.downcast::<Shout>().ok()?;
        let thread = thread::current().name().unwrap_or_default().to_string();
        Some(Box::new(Shouted { conn, text: text.to_ascii_uppercase(), thread }))
    }
}

/// 3. Its control command, typed: `PREFIX TEXT` sets what answers start with.
enum EchoCommand {
    Prefix(String),
}

/// Words with its verb that are not its command.
#[derive(Debug)]
struct EchoUsage;

impl std::fmt::Display for EchoUsage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("usage: PREFIX TEXT")
    }
}

impl std::error::Error for EchoUsage {}

/// 4. The service: a state machine, no socket, no clock.
#[derive(Default)]
struct Echo {
    next_key: u64,
    answered: u64,
    prefix: String,
}

impl Service for Echo {
    fn name(&self) -> &'static str {
        "echo"
    }
    fn signature(&self) -> u16 {
        EchoMsg::SIGNATURE
    }
    fn local_endpoint(&self, broker: &str) -> String {
        format!("ipc://@/echo/{broker}")
    }
    fn max_frame(&self) -> usize {
        64 << 10
    }
    fn max_parked(&self) -> usize {
        128 << 10
    }
    fn executor(&self) -> Option<Arc<dyn Executor>> {
        Some(Arc::new(ShoutExecutor))
    }
    fn handle(&mut self, conn: ConnId, frame: Bytes, _: Instant, out: &mut Vec<Action>) {
        if let Ok(EchoMsg::Echo { text }) = EchoMsg::decode(frame) {
            self.next_key += 1;
            out.push(Action::Work { key: self.next_key, job: Box::new(Shout { conn, text: text.0 }) });
        }
    }
    fn on_work(&mut self, _key: u64, done: work::Done, _: Instant, out: &mut Vec<Action>) {
        let Ok(done) = done.downcast::<Shouted>() else { return };
        self.answered += 1;
        let text = format!("{}{} (on {})", self.prefix, String::from_utf8_lossy(&done.text), done.thread);
        out.push(Action::Send {
            to: done.conn,
            frame: EchoMsg::EchoOk { text: text.as_str().into() }.encode(),
        });
    }
    fn parse_command(&self, words: &[String]) -> Option<Result<Command, CommandError>> {
        match words {
            [verb, prefix] if verb == "PREFIX" => Some(Ok(Box::new(EchoCommand::Prefix(prefix.clone())))),
            [verb, ..] if verb == "PREFIX" => Some(Err(CommandError::new(EchoUsage))),
            _ => None,
        }
    }
    fn command(&mut self, _request: u64, command: Command, _: Instant, _: &mut Vec<Action>) -> Answer {
        Answer::Now(zbroker_services::command::downcast(self.name(), command).map(
            |EchoCommand::Prefix(prefix)| {
                self.prefix = prefix;
                Success::text(format!("answers now start with {:?}", self.prefix))
                    .with_details(serde_json::json!({ "prefix": self.prefix }))
            },
        ))
    }
    fn on_timer(&mut self, _: TimerKey, _: Instant, _: &mut Vec<Action>) {}
    fn on_disconnect(&mut self, _: ConnId, _: Instant, _: &mut Vec<Action>) {}
    fn status(&self) -> serde_json::Value {
        serde_json::json!({ "answered": self.answered })
    }
}

const TOKEN: &str = "echo-token";

fn settings(name: &str) -> Settings {
    Settings {
        name: name.to_string(),
        binds: Vec::new(),
        control_endpoint: endpoint::control(name),
        control_token: Some(TOKEN.into()),
        state_dir: None,
        max_connections: 100,
        budget: Default::default(),
    }
}

/// Binds the services `make` builds on a broker embedded in the test
/// process (for the rest of it).
fn start(name: &str, make: fn() -> Vec<Box<dyn Service>>) -> Result<(), zbroker::error::ReactorError> {
    zbroker::reactor::spawn(settings(name), make).map(drop)
}

fn ask(endpoint: &str, frame: Vec<u8>) -> Vec<u8> {
    let context = zmq::Context::new();
    let socket = context.socket(zmq::DEALER).expect("socket");
    socket.set_linger(0).expect("linger");
    socket.connect(endpoint).expect("connect");
    socket.send(frame, 0).expect("send");
    assert!(socket.poll(zmq::POLLIN, 5000).expect("poll") > 0, "no answer from {endpoint}");
    socket.recv_bytes(0).expect("recv")
}

#[test]
fn a_service_added_through_the_contract_runs_its_work_off_the_loop() {
    let name = unique_name("echo");
    // 5. The one registration line.
    start(&name, || vec![Box::new(Zpipes::new(zpipes::Config::default())), Box::new(Echo::default())])
        .expect("the broker binds");

    let reply = ask(&format!("ipc://@/echo/{name}"), EchoMsg::Echo { text: "hello".into() }.encode());
    match EchoMsg::decode(reply).expect("an echo message") {
        EchoMsg::EchoOk { text } => {
            let text = String::from_utf8_lossy(text.as_bytes()).into_owned();
            assert_eq!(text, "HELLO (on echo-shout-0)", "answered from the service's own worker lane");
        }
        other => panic!("unexpected {other:?}"),
    }
    // ZPIPES on the same broker, reached on the echo endpoint too (routing
    // is by signature), is untouched.
    let pong = ask(&format!("ipc://@/echo/{name}"), ZpipesMsg::Ping {}.encode());
    assert_eq!(ZpipesMsg::decode(pong).expect("a ZPIPES reply"), ZpipesMsg::PingOk {});
}

#[test]
fn two_services_with_one_signature_are_refused_at_start_up() {
    let name = unique_name("echo-clash");
    let started = Instant::now();
    let err = start(&name, || vec![Box::new(Echo::default()), Box::new(Echo::default())])
        .expect_err("a clashing signature is refused");
    assert!(err.to_string().contains("both claim the signature 0xAAE0"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

/// A control request's JSON reply.
fn control(name: &str, words: &[&str]) -> serde_json::Value {
    let context = zmq::Context::new();
    let socket = context.socket(zmq::DEALER).expect("socket");
    socket.set_linger(0).expect("linger");
    socket.connect(&endpoint::control(name)).expect("connect");
    socket.send_multipart(words.iter().map(|w| w.as_bytes()), 0).expect("send");
    assert!(socket.poll(zmq::POLLIN, 5000).expect("poll") > 0, "no answer from {name}");
    serde_json::from_slice(&socket.recv_bytes(0).expect("recv")).expect("a JSON reply")
}

/// The control endpoint hands the words to the service that owns the
/// verb, which parses them into its own command; the host shows its
/// answer or its error without knowing either type.
#[test]
fn a_service_parses_and_carries_out_its_own_control_command() {
    let name = unique_name("echo-cmd");
    start(&name, || vec![Box::new(Zpipes::new(zpipes::Config::default())), Box::new(Echo::default())])
        .expect("the broker binds");
    let reply = control(&name, &["PREFIX", TOKEN, ">> "]);
    assert_eq!(
        reply,
        serde_json::json!({ "ok": "answers now start with \">> \"", "details": { "prefix": ">> " } })
    );
    let reply = ask(&format!("ipc://@/echo/{name}"), EchoMsg::Echo { text: "hi".into() }.encode());
    let Ok(EchoMsg::EchoOk { text }) = EchoMsg::decode(reply) else { panic!("not an ECHO-OK") };
    assert_eq!(String::from_utf8_lossy(text.as_bytes()), ">> HI (on echo-shout-0)");

    assert_eq!(control(&name, &["PREFIX", TOKEN]), serde_json::json!({ "error": "usage: PREFIX TEXT" }));
    assert_eq!(
        control(&name, &["SHOUT", TOKEN, "x"]),
        serde_json::json!({ "error": "unknown control request \"SHOUT x\"" })
    );
    let refused = control(&name, &["PREFIX", "wrong-token", "x"]);
    assert!(refused["error"].as_str().unwrap_or_default().starts_with("not authorised"), "{refused}");
}
