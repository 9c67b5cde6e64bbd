//! A control command that waits for work off the loop (as `zbroker publish`
//! waits for its mounts file to be saved) is answered even when the broker
//! is told to stop meanwhile: the drain waits for its answer, and past the
//! drain's deadline it is told the broker stopped first, never left to
//! time out. One test in its own binary: it sends SIGTERM to this process,
//! whose handler belongs to the embedded broker.

use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};
use zbroker::reactor::Settings;
use zbroker_client::endpoint;
use zbroker_services::work::{self, Executor, Lane, Reporter};
use zbroker_services::{command, Action, Answer, Command, CommandError, ConnId, Service, Success, TimerKey};
use zbroker_tests::unique_name;

const TOKEN: &str = "stop-token";

/// `SLOW MS`: answered once a job has slept MS milliseconds off the loop.
struct Sleep(u64);
struct Slept(u64);

struct SleepExecutor;

impl Executor for SleepExecutor {
    fn lanes(&self) -> Vec<Lane> {
        vec![Lane { name: "sleep", threads: 1 }]
    }
    fn lane(&self, _: &work::Job) -> usize {
        0
    }
    fn run(&self, _key: u64, job: work::Job, _: &Arc<dyn Reporter>) -> Option<work::Done> {
        let Sleep(ms) = *job.downcast::<Sleep>().ok()?;
        thread::sleep(Duration::from_millis(ms));
        Some(Box::new(Slept(ms)))
    }
}

#[derive(Debug)]
struct Usage;

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("usage: SLOW MS")
    }
}

impl std::error::Error for Usage {}

struct Slow;

impl Service for Slow {
    fn name(&self) -> &'static str {
        "slow"
    }
    fn signature(&self) -> u16 {
        0xAAE1
    }
    fn local_endpoint(&self, broker: &str) -> String {
        format!("ipc://@/slow/{broker}")
    }
    fn max_frame(&self) -> usize {
        64
    }
    fn max_parked(&self) -> usize {
        64
    }
    fn executor(&self) -> Option<Arc<dyn Executor>> {
        Some(Arc::new(SleepExecutor))
    }
    fn parse_command(&self, words: &[String]) -> Option<Result<Command, CommandError>> {
        match words {
            [verb, ms] if verb == "SLOW" => Some(
                ms.parse::<u64>()
                    .map(|ms| Box::new(Sleep(ms)) as Command)
                    .map_err(|_| CommandError::new(Usage)),
            ),
            [verb, ..] if verb == "SLOW" => Some(Err(CommandError::new(Usage))),
            _ => None,
        }
    }
    fn command(&mut self, request: u64, command: Command, _: Instant, out: &mut Vec<Action>) -> Answer {
        match command::downcast::<Sleep>(self.name(), command) {
            Ok(sleep) => {
                out.push(Action::Work { key: request, job: Box::new(sleep) });
                Answer::Later
            }
            Err(e) => Answer::Now(Err(e)),
        }
    }
    fn on_work(&mut self, key: u64, done: work::Done, _: Instant, out: &mut Vec<Action>) {
        if let Ok(slept) = done.downcast::<Slept>() {
            let text = format!("slept {} ms", slept.0);
            out.push(Action::Reply { request: key, result: Ok(Success::text(text)) });
        }
    }
    fn handle(&mut self, _: ConnId, _: bytes::Bytes, _: Instant, _: &mut Vec<Action>) {}
    fn on_timer(&mut self, _: TimerKey, _: Instant, _: &mut Vec<Action>) {}
    fn on_disconnect(&mut self, _: ConnId, _: Instant, _: &mut Vec<Action>) {}
    fn status(&self) -> serde_json::Value {
        serde_json::json!({})
    }
}

fn start(name: &str) {
    let settings = Settings {
        name: name.to_string(),
        binds: Vec::new(),
        control_endpoint: endpoint::control(name),
        control_token: Some(TOKEN.into()),
        state_dir: None,
        max_connections: 10,
        budget: Default::default(),
    };
    zbroker::reactor::spawn(settings, || vec![Box::new(Slow) as Box<dyn Service>]).expect("the broker binds");
}

/// Sends `SLOW MS` and, once the broker has it, SIGTERM; returns the reply
/// and how long it took.
fn slow_then_stop(name: &str, ms: u64) -> (serde_json::Value, Duration) {
    let context = zmq::Context::new();
    let socket = context.socket(zmq::DEALER).expect("socket");
    socket.set_linger(0).expect("linger");
    socket.connect(&endpoint::control(name)).expect("connect");
    let started = Instant::now();
    let ms_text = ms.to_string();
    socket.send_multipart(["SLOW", TOKEN, ms_text.as_str()], 0).expect("send");
    // Stop only once the command's job is running off the loop.
    let running = zbroker_tests::wait_until(Duration::from_secs(5), || {
        zbroker_tests::status_of(name, Duration::from_secs(1))
            .is_some_and(|status| status["work_in_flight"].as_u64() == Some(1))
    });
    assert!(running, "the command's job never started");
    // SAFETY: kill only sends a signal; the broker's handler takes it.
    assert_eq!(unsafe { libc::kill(libc::getpid(), libc::SIGTERM) }, 0);
    assert!(socket.poll(zmq::POLLIN, 10_000).expect("poll") > 0, "no answer at all from {name}");
    let reply = serde_json::from_slice(&socket.recv_bytes(0).expect("recv")).expect("a JSON reply");
    (reply, started.elapsed())
}

#[test]
fn a_command_waiting_for_work_is_answered_when_the_broker_stops() {
    // Work that ends within the drain: the broker waits, the answer is real.
    let name = unique_name("stop-answers");
    start(&name);
    let (reply, took) = slow_then_stop(&name, 400);
    assert_eq!(reply, serde_json::json!({ "ok": "slept 400 ms" }));
    assert!(took >= Duration::from_millis(400) && took < Duration::from_secs(3), "took {took:?}");

    // Work that outlasts the drain (3 s): told the broker stopped first.
    let name = unique_name("stop-answers-late");
    start(&name);
    let (reply, took) = slow_then_stop(&name, 6_000);
    let error = reply["error"].as_str().unwrap_or_default();
    assert!(error.contains("the broker stopped before this finished"), "{reply}");
    assert!(took >= Duration::from_secs(3) && took < Duration::from_secs(6), "took {took:?}");
}
