//! The event loop: one mio `Poll` over the ZeroMQ sockets, a timer queue
//! and a signal pipe. It is the only code that touches sockets and clocks.
//!
//! ZeroMQ's `ZMQ_FD` is an edge-triggered "go and look" signal, and any zmq
//! call (send included) may consume the edge. So after every wake-up the
//! loop re-reads `ZMQ_EVENTS` on every socket and keeps sending and
//! receiving until one full pass finds nothing to do
//! (`docs/zmq-on-mio.md`).
//!
//! Every frame arriving on the front ROUTER is routed by its first two bytes
//! (the protocol signature) to the service that declared it.
//!
//! With CURVE (`Reactor::bind_secure`), the endpoints that need it are bound
//! after the front socket is made a CURVE server (libzmq takes a listener's
//! security options when it binds), and the reactor answers libzmq's ZAP
//! requests itself on `inproc://zeromq.zap.01`: a client key not in the
//! allow-list fails its handshake and never reaches a service.

use crate::passes::Passes;
use crate::peers::Peers;
use crate::timers::Timers;
use crate::worker::Worker;
use anyhow::{bail, Context as _};
use bytes::Bytes;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use std::collections::{HashMap, HashSet, VecDeque};
use std::io::Read;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};
use zbroker_client::curve::{self, Key};
use zbroker_client::escape::escape;
use zbroker_services::budget::Budget;
use zbroker_services::{Action, Answer, ConnId, Service};

const FRONT: Token = Token(0);
const MONITOR: Token = Token(1);
const CONTROL: Token = Token(2);
const SIGNALS: Token = Token(3);
const WORK_DONE: Token = Token(4);
const RELOAD: Token = Token(5);
const ZAP: Token = Token(6);

/// Where libzmq sends ZAP requests (RFC 27), in the socket's context.
const ZAP_ENDPOINT: &str = "inproc://zeromq.zap.01";
/// The ZAP domain of the CURVE endpoints.
const ZAP_DOMAIN: &str = "zbroker";
/// A refused client key is logged at most once per this interval.
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);
/// Keys whose last refusal log time is remembered, at most.
const REFUSAL_LOG_KEYS: usize = 4096;

/// Frames taken from the front socket before the other sockets get a turn.
const RECV_BATCH: usize = 256;
/// Bytes a parked frame is counted for beyond its own length (its
/// allocation and queue slot). Replies parked for one peer that cannot
/// take them are bounded by `Settings::max_parked_bytes` counted this way;
/// past it the peer is treated as gone: it has stopped reading its socket.
/// Bytes, not frames: a FILEMQ subscriber of small files gets two frames
/// per file (and a mass delete one per file) whatever its credit.
const PARKED_OVERHEAD: usize = 64;
/// Frames libzmq itself may hold for one peer before a send would block
/// and the reply is parked (where its bytes are counted).
const SEND_HWM: i32 = 4;
/// Front-socket passes between turns for the monitor, control socket and
/// signal pipe while traffic keeps the front socket busy.
const PASSES_PER_TURN: u64 = 64;
/// Threads running disk work (scans, hashing, chunk reads).
const WORKER_THREADS: usize = 3;
/// How long a stopping broker waits for acknowledged data to be delivered
/// before it gives up on it (then replies get `LINGER_MS` to leave).
const DRAIN_TIME: Duration = Duration::from_secs(3);
/// How long queued replies may take to leave at shutdown.
const LINGER_MS: i32 = 1000;
/// Longest sleep while requests wait for the memory budget: libzmq frees
/// sent replies on its own threads, which wakes nobody.
const BUDGET_POLL: Duration = Duration::from_millis(20);
/// "At the memory budget" is logged at most this often.
const BUDGET_LOG_INTERVAL: Duration = Duration::from_secs(10);
/// Control requests waiting for a service's answer (a mounts file being
/// saved); more are told the broker is busy.
const MAX_CONTROL_WAITING: usize = 64;

/// What SIGHUP runs: it returns control commands (words, no token) for
/// the services, e.g. FILEMQ's `MOUNTS` from a re-read config file.
pub type Reload = Box<dyn FnMut() -> anyhow::Result<Vec<Vec<String>>>>;
/// What SIGHUP runs as well when CURVE is on: the new allow-list.
pub type AllowReload = Box<dyn FnMut() -> anyhow::Result<Allow>>;

/// Which CURVE clients may connect.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Allow {
    /// Any client that knows the server's public key.
    #[default]
    Anyone,
    /// Only clients with one of these public keys.
    Only(HashSet<Key>),
}

impl Allow {
    pub fn permits(&self, key: &Key) -> bool {
        match self {
            Allow::Anyone => true,
            Allow::Only(keys) => keys.contains(key),
        }
    }

    /// For the log: "any client" or "N client keys".
    pub fn describe(&self) -> String {
        match self {
            Allow::Anyone => "any client that knows the server key".to_string(),
            Allow::Only(keys) => format!("{} allowed client key(s)", keys.len()),
        }
    }
}

/// CURVE security for the front endpoints.
pub struct Curve {
    /// The broker's secret key.
    pub secret_key: Key,
    pub allow: Allow,
    /// CURVE on the `ipc://` endpoints too (otherwise they stay open to
    /// local processes, as without CURVE).
    pub ipc: bool,
}

/// What the operator asked for.
pub struct Settings {
    pub name: String,
    /// Endpoints of the front ROUTER (the services' well-known endpoints
    /// and every `--bind`).
    pub endpoints: Vec<String>,
    pub control_endpoint: String,
    /// Most reply bytes parked for one peer before it is dropped.
    pub max_parked_bytes: usize,
    /// Largest frame accepted on the front socket; a peer sending a larger
    /// one is disconnected by libzmq before the frame is buffered.
    pub max_message_size: i64,
    /// Most peers served at once; a new one beyond it gets its protocol's
    /// refusal to its first message and is not tracked.
    pub max_connections: usize,
    /// Secret that control commands other than STATUS must carry (the
    /// `zbroker publish` of the same user reads it from the state
    /// directory); `None` refuses them all.
    pub control_token: Option<String>,
    /// Where the control token (and the services' state) is kept, told to
    /// `zbroker status`, so `zbroker publish` finds it however the broker
    /// was started.
    pub state_dir: Option<std::path::PathBuf>,
    /// The broker-wide memory budget (the services hold clones): replies
    /// count in it from the moment they are made until libzmq frees them.
    pub budget: Budget,
}

/// A socket monitor event that ends the peers last seen on a descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FdEvent {
    accepted: bool,
    fd: i32,
}

/// Replies waiting for a peer that cannot take them now.
#[derive(Default)]
struct Parked {
    frames: VecDeque<Vec<u8>>,
    bytes: usize,
}

/// The frame bytes of a received ZeroMQ message, shared without copying.
struct Frame(zmq::Message);
impl AsRef<[u8]> for Frame {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

pub struct Reactor {
    name: String,
    poll: Poll,
    // Sockets before the context: they must close before it terminates.
    front: zmq::Socket,
    monitor: zmq::Socket,
    control: zmq::Socket,
    /// The ZAP handler (with CURVE): a ROUTER at `ZAP_ENDPOINT`.
    zap: Option<zmq::Socket>,
    signals: UnixStream,
    _context: zmq::Context,
    endpoints: Vec<String>,
    services: Vec<Box<dyn Service>>,
    routes: HashMap<u16, usize>,
    peers: Peers,
    timers: Timers,
    parked: HashMap<ConnId, Parked>,
    max_parked_bytes: usize,
    budget: Budget,
    /// Whether the last look found the broker at its budget, and when that
    /// was last logged.
    at_budget: bool,
    budget_logged: Option<Instant>,
    /// This time at the budget was logged: say when it ends.
    budget_warned: bool,
    /// Monitor events (ACCEPTED or DISCONNECTED, with the descriptor), in
    /// order, applied once the front socket has been read dry: frames a
    /// peer sent before it went must reach the services before its
    /// disconnect does.
    fd_events: Vec<FdEvent>,
    actions: Vec<Action>,
    /// Peers found gone while sending; forgotten once the front socket has
    /// been read dry, like `fd_events`.
    gone: Vec<ConnId>,
    /// Peers dropped at the parking bound: no further reply goes to them
    /// (a later, smaller one would leave a hole behind the lost one).
    dropping: HashSet<ConnId>,
    started: Instant,
    /// How long the loop's passes take (the longest, and why).
    passes: Passes,
    dropped_frames: u64,
    stop: bool,
    /// Runs services' disk work off this thread; wakes `WORK_DONE`.
    worker: Worker,
    control_token: Option<String>,
    state_dir: Option<std::path::PathBuf>,
    /// Control requests a service answers later, by request number: the
    /// requester's routing id, or `None` for a SIGHUP's command (logged).
    control_waiting: HashMap<u64, Option<Vec<u8>>>,
    next_request: u64,
    max_connections: usize,
    refused_connections: u64,
    /// SIGHUPs handled, and how many of their parts failed.
    reloads: u64,
    reload_errors: u64,
    /// Descriptors whose DISCONNECTED was applied and no ACCEPTED since.
    closed_fds: HashSet<i32>,
    /// Set at the first SIGINT/SIGTERM: the deadline for delivering what
    /// was acknowledged. A second signal stops at once.
    draining: Option<Instant>,
    /// SIGHUP arrives here.
    reload_signals: UnixStream,
    /// What SIGHUP does: control commands (without token) for the services.
    reload: Option<Reload>,
    /// What SIGHUP does with CURVE: a new allow-list.
    allow_reload: Option<AllowReload>,
    /// Which CURVE clients the ZAP handler lets in.
    allow: Allow,
    /// The front endpoints that require CURVE.
    curve_endpoints: Vec<String>,
    /// CURVE handshakes refused by the ZAP handler.
    curve_refused: u64,
    /// When each refused key was last logged (rate limit).
    refusals_logged: HashMap<Key, Instant>,
    /// With CURVE: whether the ipc:// endpoints require it too (`None`:
    /// no CURVE, no handshake is watched).
    curve_ipc: Option<bool>,
    /// With CURVE: the peer address of each descriptor accepted on a CURVE
    /// endpoint, until it disconnects (for logging failed handshakes).
    accepted_addresses: HashMap<i32, String>,
    /// A handshake failure seen by the monitor, waiting for the
    /// DISCONNECTED (same engine, next event) that names its descriptor.
    handshake_failed: Option<String>,
    /// When each (host, reason) of a failed handshake was last logged.
    handshake_failures_logged: HashMap<(String, String), Instant>,
}

/// A control command's outcome as its JSON reply.
fn control_reply(result: Result<String, String>) -> serde_json::Value {
    match result {
        Ok(message) => serde_json::json!({ "ok": message }),
        Err(error) => serde_json::json!({ "error": error }),
    }
}

/// The remote address of a TCP socket libzmq accepted (`None` if it is
/// not one, or already closed).
fn peer_address(fd: i32) -> Option<String> {
    use std::os::fd::FromRawFd as _;
    // SAFETY: the descriptor is libzmq's; ManuallyDrop never closes it,
    // and getpeername(2) only reads it (on a reused or closed descriptor
    // it fails or names another peer, which only affects a log line).
    let stream = std::mem::ManuallyDrop::new(unsafe { std::net::TcpStream::from_raw_fd(fd) });
    stream.peer_addr().ok().map(|a| a.to_string())
}

/// A `HANDSHAKE_FAILED_PROTOCOL` event's value, in words.
fn handshake_protocol_error(code: u32) -> String {
    // libzmq's ZMQ_PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC and _MECHANISM_MISMATCH.
    const CRYPTOGRAPHIC: u32 = 0x1100_0001;
    const MECHANISM_MISMATCH: u32 = 0x1100_0002;
    match code {
        CRYPTOGRAPHIC => {
            "its HELLO could not be decrypted: the client has the wrong server key (--server-key)".into()
        }
        MECHANISM_MISMATCH => "the client does not speak CURVE (no --server-key?)".into(),
        code => format!("ZMTP protocol error 0x{code:x}"),
    }
}

fn zmq_fd(socket: &zmq::Socket) -> anyhow::Result<i32> {
    Ok(socket.get_fd()?)
}

/// Repeats a zmq call that a signal interrupted (EINTR): a SIGTERM must stop
/// the loop through the signal pipe, not as an error from whatever call it
/// happened to land in.
fn retry<T>(mut call: impl FnMut() -> zmq::Result<T>) -> zmq::Result<T> {
    loop {
        match call() {
            Err(zmq::Error::EINTR) => continue,
            other => return other,
        }
    }
}

fn events(socket: &zmq::Socket) -> zmq::Result<zmq::PollEvents> {
    retry(|| socket.get_events())
}

impl Reactor {
    /// Binds every socket. Fails (before binding the front endpoints) if
    /// another broker already holds this name's control endpoint.
    pub fn bind(settings: Settings, services: Vec<Box<dyn Service>>) -> anyhow::Result<Self> {
        Self::bind_secure(settings, services, None)
    }

    /// `bind`, with CURVE on the endpoints that need it (every one but
    /// `ipc://` ones, and those too with `Curve::ipc`).
    pub fn bind_secure(
        settings: Settings,
        services: Vec<Box<dyn Service>>,
        curve: Option<Curve>,
    ) -> anyhow::Result<Self> {
        let context = zmq::Context::new();

        // The control endpoint is bound first: abstract-namespace IPC refuses
        // a second bind, which makes it the broker name's lock.
        let control = context.socket(zmq::ROUTER)?;
        control.set_linger(0)?;
        if let Err(e) = control.bind(&settings.control_endpoint) {
            if e == zmq::Error::EADDRINUSE {
                return Err(crate::exit::NameTaken {
                    name: settings.name.clone(),
                    endpoint: settings.control_endpoint.clone(),
                }
                .into());
            }
            bail!("cannot bind {}: {e}", settings.control_endpoint);
        }

        let front = context.socket(zmq::ROUTER)?;
        front.set_router_mandatory(true)?;
        front.set_sndhwm(SEND_HWM)?;
        front.set_linger(LINGER_MS)?;
        front.set_maxmsgsize(settings.max_message_size)?;
        let monitor_endpoint = format!("inproc://zbroker-monitor-{}", settings.name);
        // With CURVE, failed handshakes too: a client with the wrong server
        // key, or none, never reaches the ZAP handler.
        let mut events = zmq::SocketEvent::ACCEPTED.to_raw() | zmq::SocketEvent::DISCONNECTED.to_raw();
        if curve.is_some() {
            events |= zmq::SocketEvent::HANDSHAKE_FAILED_NO_DETAIL.to_raw()
                | zmq::SocketEvent::HANDSHAKE_FAILED_PROTOCOL.to_raw();
        }
        front.monitor(&monitor_endpoint, events as i32)?;
        let monitor = context.socket(zmq::PAIR)?;
        monitor.connect(&monitor_endpoint)?;

        // The ZAP handler must be there before the first CURVE client.
        let zap = match &curve {
            Some(_) => {
                let zap = context.socket(zmq::ROUTER)?;
                zap.set_linger(0)?;
                zap.bind(ZAP_ENDPOINT).context("binding the ZAP handler")?;
                Some(zap)
            }
            None => None,
        };
        let secure =
            |endpoint: &str| curve.as_ref().is_some_and(|c| c.ipc || !endpoint.starts_with("ipc://"));
        let mut endpoints = vec![String::new(); settings.endpoints.len()];
        let mut curve_endpoints = Vec::new();
        // libzmq takes a listener's security options when it binds: the open
        // endpoints first, then the front socket becomes a CURVE server for
        // the rest.
        for with_curve in [false, true] {
            if with_curve {
                let Some(curve) = &curve else { break };
                front.set_curve_server(true)?;
                front.set_curve_secretkey(&curve.secret_key)?;
                front.set_zap_domain(ZAP_DOMAIN)?;
            }
            for (i, endpoint) in settings.endpoints.iter().enumerate() {
                if secure(endpoint) != with_curve {
                    continue;
                }
                front.bind(endpoint).map_err(|e| match e {
                    zmq::Error::EADDRINUSE => {
                        anyhow::anyhow!("cannot bind {endpoint}: address already in use")
                    }
                    e => anyhow::anyhow!("cannot bind {endpoint}: {e}"),
                })?;
                // `tcp://host:*` binds a free port; record the real one.
                let actual = front
                    .get_last_endpoint()?
                    .map_err(|raw| anyhow::anyhow!("endpoint name is not UTF-8: {raw:?}"))?;
                if with_curve {
                    curve_endpoints.push(actual.clone());
                }
                endpoints[i] = actual;
            }
        }

        let (signals, signal_writer) = UnixStream::pair()?;
        signals.set_nonblocking(true)?;
        for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
            signal_hook::low_level::pipe::register(signal, signal_writer.try_clone()?)
                .context("installing signal handlers")?;
        }

        let (reload_signals, reload_writer) = UnixStream::pair()?;
        reload_signals.set_nonblocking(true)?;
        signal_hook::low_level::pipe::register(signal_hook::consts::SIGHUP, reload_writer)
            .context("installing the SIGHUP handler")?;

        let poll = Poll::new()?;
        let registry = poll.registry();
        registry.register(&mut SourceFd(&zmq_fd(&front)?), FRONT, Interest::READABLE)?;
        registry.register(&mut SourceFd(&zmq_fd(&monitor)?), MONITOR, Interest::READABLE)?;
        registry.register(&mut SourceFd(&zmq_fd(&control)?), CONTROL, Interest::READABLE)?;
        if let Some(zap) = &zap {
            registry.register(&mut SourceFd(&zmq_fd(zap)?), ZAP, Interest::READABLE)?;
        }
        registry.register(
            &mut SourceFd(&std::os::fd::AsRawFd::as_raw_fd(&signals)),
            SIGNALS,
            Interest::READABLE,
        )?;
        registry.register(
            &mut SourceFd(&std::os::fd::AsRawFd::as_raw_fd(&reload_signals)),
            RELOAD,
            Interest::READABLE,
        )?;

        let waker = std::sync::Arc::new(mio::Waker::new(registry, WORK_DONE)?);
        let worker = Worker::start(waker, WORKER_THREADS).context("starting the worker threads")?;

        let routes = services.iter().enumerate().map(|(i, s)| (s.signature(), i)).collect();
        Ok(Reactor {
            name: settings.name,
            poll,
            front,
            monitor,
            control,
            zap,
            signals,
            _context: context,
            endpoints,
            services,
            routes,
            peers: Peers::default(),
            timers: Timers::default(),
            parked: HashMap::new(),
            max_parked_bytes: settings.max_parked_bytes,
            budget: settings.budget,
            at_budget: false,
            budget_logged: None,
            budget_warned: false,
            fd_events: Vec::new(),
            dropping: HashSet::new(),
            actions: Vec::new(),
            gone: Vec::new(),
            started: Instant::now(),
            passes: Passes::new(Instant::now()),
            dropped_frames: 0,
            stop: false,
            worker,
            control_token: settings.control_token,
            state_dir: settings.state_dir,
            control_waiting: HashMap::new(),
            next_request: 0,
            max_connections: settings.max_connections,
            refused_connections: 0,
            draining: None,
            closed_fds: HashSet::new(),
            reloads: 0,
            reload_errors: 0,
            reload_signals,
            reload: None,
            allow_reload: None,
            curve_ipc: curve.as_ref().map(|c| c.ipc),
            allow: curve.map(|c| c.allow).unwrap_or_default(),
            curve_endpoints,
            curve_refused: 0,
            refusals_logged: HashMap::new(),
            accepted_addresses: HashMap::new(),
            handshake_failed: None,
            handshake_failures_logged: HashMap::new(),
        })
    }

    /// Carries out actions a service produced before the reactor existed
    /// (the first scans of the mounts given on the command line).
    pub fn start_work(&mut self, service: usize, actions: Vec<Action>) {
        self.actions.extend(actions);
        self.apply(service);
    }

    /// What SIGHUP does: produce control commands (such as the FILEMQ
    /// `MOUNTS` list from a re-read config file) to hand to the services.
    pub fn on_reload(&mut self, reload: Reload) {
        self.reload = Some(reload);
    }

    /// What SIGHUP does with CURVE: produce the new allow-list (on an
    /// error the old one stays).
    pub fn on_reload_allow(&mut self, reload: AllowReload) {
        self.allow_reload = Some(reload);
    }

    /// The endpoints that require CURVE.
    pub fn curve_endpoints(&self) -> &[String] {
        &self.curve_endpoints
    }

    /// The front endpoints as bound (wildcard ports resolved).
    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// Runs until SIGINT or SIGTERM.
    pub fn run(&mut self) -> anyhow::Result<()> {
        let mut events = Events::with_capacity(64);
        self.drain_monitor()?;
        self.drain_control()?;
        self.drain_zap()?;
        while !self.stop {
            let deadline = match (self.timers.next_deadline(), self.draining) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let mut timeout = deadline.map(|at| at.saturating_duration_since(Instant::now()));
            if self.budget.waiting() > 0 {
                timeout = Some(timeout.map_or(BUDGET_POLL, |t| t.min(BUDGET_POLL)));
            }
            match self.poll.poll(&mut events, timeout) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e).context("polling"),
            }
            self.passes.begin();
            for event in events.iter() {
                match event.token() {
                    SIGNALS => self.check_signals(),
                    RELOAD => self.check_reload(),
                    MONITOR => self.drain_monitor()?,
                    CONTROL => self.drain_control()?,
                    ZAP => self.drain_zap()?,
                    _ => {}
                }
            }
            // Whatever woke us, the front socket is drained: timers and
            // disconnects send on it, and a send may consume its edge.
            self.drain_front()?;
            self.check_drain();
            self.passes.end();
        }
        self.flush_at_shutdown();
        Ok(())
    }

    /// While stopping: stop once nothing is owed, or at the deadline.
    fn check_drain(&mut self) {
        let Some(deadline) = self.draining else { return };
        let drained = self.services.iter().all(|s| s.drained()) && self.parked.is_empty();
        if drained || Instant::now() >= deadline {
            if !drained {
                tracing::warn!("stopping with acknowledged data undelivered (its readers did not read it)");
            }
            self.stop = true;
        }
    }

    /// The first SIGINT/SIGTERM: stop accepting, let each service tell its
    /// clients and deliver what it acknowledged, for at most `DRAIN_TIME`.
    fn begin_drain(&mut self) {
        tracing::info!("signal received: stopping (a second signal stops at once)");
        let now = Instant::now();
        self.draining = Some(now + DRAIN_TIME);
        // New peers are refused from now on (`recv_front`). The endpoints
        // stay bound: unbinding would also close the connections accepted
        // through them, and with them what they are still owed.
        for service in 0..self.services.len() {
            self.services[service].shutdown(now, &mut self.actions);
            self.apply(service);
        }
    }

    fn check_reload(&mut self) {
        let mut buf = [0u8; 64];
        let mut any = false;
        while matches!(self.reload_signals.read(&mut buf), Ok(n) if n > 0) {
            any = true;
        }
        if !any {
            return;
        }
        self.reloads += 1;
        if let Some(reload) = self.allow_reload.as_mut() {
            match reload() {
                Ok(allow) => {
                    tracing::info!("SIGHUP: CURVE: {}", allow.describe());
                    self.allow = allow;
                }
                Err(e) => {
                    self.reload_errors += 1;
                    tracing::error!("SIGHUP: client keys not reloaded (the old ones stay): {e:#}")
                }
            }
        }
        let Some(reload) = self.reload.as_mut() else {
            if self.allow_reload.is_none() {
                tracing::info!("SIGHUP: no config file to reload");
            }
            return;
        };
        match reload() {
            Err(e) => {
                self.reload_errors += 1;
                tracing::error!("SIGHUP: config not reloaded: {e:#}")
            }
            Ok(commands) => {
                let now = Instant::now();
                for words in commands {
                    let request = self.next_request;
                    self.next_request += 1;
                    for service in 0..self.services.len() {
                        let Some(answer) =
                            self.services[service].command(request, &words, now, &mut self.actions)
                        else {
                            continue;
                        };
                        match answer {
                            Answer::Now(result) => self.reloaded(result),
                            Answer::Later => {
                                self.control_waiting.insert(request, None);
                            }
                        }
                        self.apply(service);
                        break;
                    }
                }
            }
        }
    }

    /// Logs the outcome of one of SIGHUP's commands.
    fn reloaded(&mut self, result: Result<String, String>) {
        match result {
            Ok(message) => tracing::info!("SIGHUP: {message}"),
            Err(error) => {
                self.reload_errors += 1;
                tracing::error!("SIGHUP: {error}")
            }
        }
    }

    /// A service's later answer to control request `request`: to the
    /// requester, if it still waits, or to the log for SIGHUP's.
    fn answer(&mut self, request: u64, result: Result<String, String>) {
        match self.control_waiting.remove(&request) {
            Some(Some(routing_id)) => {
                let reply = control_reply(result).to_string();
                // A control client that vanished is no loss.
                let _ = self.control.send_multipart([routing_id, reply.into_bytes()], zmq::DONTWAIT);
            }
            Some(None) => self.reloaded(result),
            None => {}
        }
    }

    fn check_signals(&mut self) {
        let mut buf = [0u8; 64];
        let mut any = false;
        while matches!(self.signals.read(&mut buf), Ok(n) if n > 0) {
            any = true;
        }
        if !any {
            return;
        }
        if self.draining.is_some() {
            tracing::info!("second signal: stopping now");
            self.stop = true;
        } else {
            self.begin_drain();
        }
    }

    /// Hands finished disk work back to the services that asked for it.
    fn deliver_work(&mut self) -> bool {
        let done = self.worker.take_done();
        if done.is_empty() {
            return false;
        }
        let now = Instant::now();
        for (service, key, outcome) in done {
            let began = Instant::now();
            self.services[service].on_work(key, outcome, now, &mut self.actions);
            self.apply(service);
            let name = self.services[service].name();
            self.passes.note(began.elapsed(), || format!("{name} work outcome {key}"));
        }
        true
    }

    fn fire_timers(&mut self) {
        let now = Instant::now();
        let mark = self.timers.mark();
        while let Some((service, key)) = self.timers.pop_due(now, mark) {
            let began = Instant::now();
            self.services[service].on_timer(key, now, &mut self.actions);
            self.apply(service);
            let name = self.services[service].name();
            self.passes.note(began.elapsed(), || format!("{name} timer {key}"));
        }
    }

    /// Works the front socket until a whole pass finds nothing to do.
    /// Timers get a turn on every pass and signals every 64, so steady
    /// traffic cannot starve them. Each socket's `ZMQ_FD` edge is consumed
    /// only by calls on that socket, so the monitor and control sockets are
    /// drained when their own token fires, not on every pass.
    fn drain_front(&mut self) -> anyhow::Result<()> {
        let mut passes = 0u64;
        loop {
            // Each pass is timed on its own: a stream that keeps the socket
            // busy makes many short passes, not one long one.
            if passes > 0 {
                self.passes.begin();
            }
            self.fire_timers();
            let delivered = self.deliver_work();
            self.budget_freed();
            passes += 1;
            if passes.is_multiple_of(PASSES_PER_TURN) {
                self.check_signals();
                self.drain_monitor()?;
                self.drain_control()?;
                self.drain_zap()?;
            }
            // Checked on every pass too: traffic that never lets up must not
            // hold a stopping broker past its deadline.
            self.check_drain();
            if self.stop {
                return Ok(());
            }
            let mut progress = delivered;
            let events = events(&self.front)?;
            if events.contains(zmq::POLLOUT) && !self.parked.is_empty() {
                progress |= self.flush_parked()?;
            }
            if events.contains(zmq::POLLIN) {
                progress |= self.recv_front()?;
            }
            let disconnects = !self.fd_events.is_empty() || !self.gone.is_empty();
            // Disconnects wait until the front socket is read dry, so that
            // a peer's last frames reach the services first; under traffic
            // that never lets up, they wait at most a turn.
            if disconnects && (!progress || passes.is_multiple_of(PASSES_PER_TURN)) {
                for event in std::mem::take(&mut self.fd_events) {
                    if event.accepted {
                        self.closed_fds.remove(&event.fd);
                    } else {
                        self.closed_fds.insert(event.fd);
                    }
                    self.forget_fd(event.fd);
                }
                self.forget_gone();
                progress = true;
            }
            if !progress {
                self.log_budget();
                return Ok(());
            }
        }
    }

    /// Room came back to the memory budget: requests waiting for it may
    /// move.
    fn budget_freed(&mut self) {
        if !self.budget.take_freed() || self.budget.waiting() == 0 {
            return;
        }
        let now = Instant::now();
        for service in 0..self.services.len() {
            self.services[service].budget_freed(now, &mut self.actions);
            self.apply(service);
        }
    }

    /// Who holds the most of the memory budget: services' holdings plus
    /// replies parked here, largest first.
    fn budget_holders(&self, n: usize) -> Vec<(ConnId, usize, String)> {
        let mut held: HashMap<ConnId, (usize, String)> = HashMap::new();
        let parked = self
            .parked
            .iter()
            .map(|(c, p)| (*c, p.frames.iter().map(Vec::len).sum(), "replies parked".to_string()));
        for (conn, bytes, what) in self.services.iter().flat_map(|s| s.holders()).chain(parked) {
            let entry = held.entry(conn).or_default();
            entry.0 += bytes;
            if !entry.1.is_empty() {
                entry.1.push_str(", ");
            }
            entry.1.push_str(&what);
        }
        let mut held: Vec<_> = held.into_iter().map(|(c, (b, w))| (c, b, w)).collect();
        held.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        held.truncate(n);
        held
    }

    /// Logs reaching the memory budget (with who holds most, at most every
    /// `BUDGET_LOG_INTERVAL`) and leaving it.
    fn log_budget(&mut self) {
        let at = self.budget.at_limit();
        if at == self.at_budget {
            return;
        }
        self.at_budget = at;
        let (used, limit) = (self.budget.used(), self.budget.limit());
        if !at {
            if std::mem::take(&mut self.budget_warned) {
                tracing::info!(used, limit, "below the memory budget again");
            }
            return;
        }
        let now = Instant::now();
        if self.budget_logged.is_some_and(|t| now.duration_since(t) < BUDGET_LOG_INTERVAL) {
            return;
        }
        self.budget_logged = Some(now);
        self.budget_warned = true;
        let holders: Vec<String> = self
            .budget_holders(5)
            .iter()
            .map(|(c, b, w)| format!("connection {} ({w}) {b} bytes", c.0))
            .collect();
        tracing::warn!(
            used,
            limit,
            waiting = self.budget.waiting(),
            "at the memory budget (--memory-limit): writes and file chunks wait; holding most: {}",
            holders.join(", ")
        );
    }

    fn drain_monitor(&mut self) -> anyhow::Result<()> {
        while events(&self.monitor)?.contains(zmq::POLLIN) {
            self.recv_monitor_event()?;
        }
        Ok(())
    }

    fn drain_control(&mut self) -> anyhow::Result<()> {
        while events(&self.control)?.contains(zmq::POLLIN) {
            self.recv_control()?;
        }
        Ok(())
    }

    /// Answers every ZAP request waiting (there are none without CURVE).
    fn drain_zap(&mut self) -> anyhow::Result<()> {
        loop {
            let Some(zap) = self.zap.as_ref() else {
                return Ok(());
            };
            if !events(zap)?.contains(zmq::POLLIN) {
                return Ok(());
            }
            let frames = match retry(|| zap.recv_multipart(zmq::DONTWAIT)) {
                Ok(frames) => frames,
                Err(zmq::Error::EAGAIN) => return Ok(()),
                Err(e) => return Err(e).context("receiving on the ZAP socket"),
            };
            let Some(reply) = self.zap_reply(frames) else { continue };
            if let Some(zap) = self.zap.as_ref() {
                // libzmq's own request socket always takes its reply; one
                // that cannot (its connection gone) needs none.
                let _ = retry(|| zap.send_multipart(&reply, zmq::DONTWAIT));
            }
        }
    }

    /// The reply to one ZAP request (RFC 27), envelope included:
    /// `[routing id, …, "", version, request id, domain, address, identity,
    /// mechanism, credentials…]` → `[envelope, version, request id, status
    /// code, status text, user id, metadata]`.
    fn zap_reply(&mut self, frames: Vec<Vec<u8>>) -> Option<Vec<Vec<u8>>> {
        let delimiter = frames.iter().skip(1).position(|f| f.is_empty())? + 1;
        let (envelope, request) = frames.split_at(delimiter + 1);
        let [version, request_id, _domain, address, _identity, mechanism, credentials @ ..] = request else {
            tracing::debug!(frames = request.len(), "ignoring a malformed ZAP request");
            return None;
        };
        let (code, text, user_id): (&str, &str, String) = if version.as_slice() != b"1.0" {
            ("500", "ZAP version not supported", String::new())
        } else {
            match mechanism.as_slice() {
                b"NULL" => ("200", "OK", String::new()),
                b"CURVE" => {
                    let key: Option<Key> = credentials.first().and_then(|c| c.as_slice().try_into().ok());
                    match key {
                        Some(key) if self.allow.permits(&key) => ("200", "OK", curve::z85_encode(&key)),
                        Some(key) => {
                            self.refused_key(&key, &String::from_utf8_lossy(address));
                            ("400", "not allowed", String::new())
                        }
                        None => {
                            self.curve_refused += 1;
                            ("400", "no client key", String::new())
                        }
                    }
                }
                other => {
                    tracing::warn!("refused a client using the {} mechanism", String::from_utf8_lossy(other));
                    ("400", "mechanism not supported", String::new())
                }
            }
        };
        let mut reply = envelope.to_vec();
        reply.extend([
            version.clone(),
            request_id.clone(),
            code.as_bytes().to_vec(),
            text.as_bytes().to_vec(),
            user_id.into_bytes(),
            Vec::new(),
        ]);
        Some(reply)
    }

    /// Counts a refused CURVE client and logs it (each key at most once per
    /// `REFUSAL_LOG_INTERVAL`: a refused client retries ten times a second).
    fn refused_key(&mut self, key: &Key, address: &str) {
        self.curve_refused += 1;
        let now = Instant::now();
        let due =
            self.refusals_logged.get(key).is_none_or(|t| now.duration_since(*t) >= REFUSAL_LOG_INTERVAL);
        if due {
            if self.refusals_logged.len() >= REFUSAL_LOG_KEYS {
                self.refusals_logged.clear();
            }
            self.refusals_logged.insert(*key, now);
            tracing::warn!(
                "CURVE: refused client key {} from {address}: not in the allow-list ({} refused so far)",
                curve::z85_encode(key),
                self.curve_refused
            );
        }
    }

    /// Receives up to a batch of frames from the front socket.
    fn recv_front(&mut self) -> anyhow::Result<bool> {
        let mut any = false;
        for _ in 0..RECV_BATCH {
            let mut routing_id = zmq::Message::new();
            match retry(|| self.front.recv(&mut routing_id, zmq::DONTWAIT)) {
                Ok(()) => {}
                Err(zmq::Error::EAGAIN) => break,
                Err(e) => return Err(e).context("receiving on the front socket"),
            }
            any = true;
            if !self.front.get_rcvmore()? {
                self.dropped_frames += 1;
                continue;
            }
            let mut body = zmq::Message::new();
            retry(|| self.front.recv(&mut body, 0))?;
            // Only the first body frame counts (spec §2); skip any others.
            while self.front.get_rcvmore()? {
                let mut extra = zmq::Message::new();
                retry(|| self.front.recv(&mut extra, 0))?;
            }
            if !self.peers.contains(&routing_id) {
                if self.draining.is_some() {
                    self.refuse(routing_id, &body, "the broker is shutting down");
                    continue;
                }
                if self.peers.len() >= self.max_connections {
                    self.refuse(routing_id, &body, "broker at its connection limit");
                    continue;
                }
            }
            let (conn, _) = if self.peers.contains(&routing_id) {
                self.peers.lookup(&routing_id)
            } else {
                let fd: Option<i32> = body.gets("__fd").and_then(|fd| fd.parse().ok());
                self.drain_monitor()?;
                if let Some(fd) = fd {
                    self.admit_fd(fd);
                }
                let (conn, new) = self.peers.lookup(&routing_id);
                if let Some(fd) = fd {
                    self.peers.set_fd(conn, fd);
                    // Frames that outlived their connection's DISCONNECTED
                    // (applied after a turn of unbroken traffic): the peer
                    // is a ghost. Serve its frames, then forget it: no
                    // later event would.
                    if self.closed_fds.contains(&fd) {
                        self.gone.push(conn);
                    }
                }
                (conn, new)
            };
            let service = (body.len() >= 2)
                .then(|| u16::from_be_bytes([body[0], body[1]]))
                .and_then(|signature| self.routes.get(&signature).copied());
            let Some(service) = service else {
                self.dropped_frames += 1;
                tracing::debug!(conn = conn.0, len = body.len(), "dropped a frame for no known service");
                continue;
            };
            let (id, len) = (body.get(2).copied().unwrap_or(0), body.len());
            let frame = Bytes::from_owner(Frame(body));
            let began = Instant::now();
            self.services[service].handle(conn, frame, began, &mut self.actions);
            self.apply(service);
            let name = self.services[service].name();
            self.passes.note(began.elapsed(), || {
                format!("{name} message {id} ({len} bytes) from connection {}", conn.0)
            });
        }
        Ok(any)
    }

    /// Answers a peer beyond the connection limit with its protocol's
    /// refusal, without tracking it.
    fn refuse(&mut self, routing_id: zmq::Message, body: &zmq::Message, why: &str) {
        self.refused_connections += 1;
        if self.draining.is_none() && self.refused_connections.is_power_of_two() {
            tracing::warn!(
                limit = self.max_connections,
                refused = self.refused_connections,
                "connection limit reached: refusing new peers"
            );
        }
        let service = (body.len() >= 2)
            .then(|| u16::from_be_bytes([body[0], body[1]]))
            .and_then(|signature| self.routes.get(&signature).copied());
        let reply = service.and_then(|s| self.services[s].refusal(body, why));
        if let Some(reply) = reply {
            // Best effort: a refused peer that cannot take it loses nothing.
            let _ = retry(|| self.front.send(&*routing_id, zmq::SNDMORE | zmq::DONTWAIT))
                .and_then(|()| retry(|| self.front.send(reply.as_slice(), zmq::DONTWAIT)));
        }
    }

    /// Carries out what a service asked for.
    fn apply(&mut self, service: usize) {
        let mut actions = std::mem::take(&mut self.actions);
        for action in actions.drain(..) {
            match action {
                Action::Send { to, frame } => self.send(to, frame),
                Action::SetTimer { key, at } => self.timers.set((service, key), at),
                Action::CancelTimer { key } => self.timers.cancel((service, key)),
                Action::Work { key, job } => self.worker.submit(service, key, job),
                Action::Reply { request, result } => self.answer(request, result),
            }
        }
        self.actions = actions;
    }

    fn send(&mut self, to: ConnId, frame: Vec<u8>) {
        if self.dropping.contains(&to) {
            return; // nothing more, so nothing after a lost reply
        }
        // Counted from here until libzmq frees it, or it is dropped.
        self.budget.take(frame.len());
        let frame = match self.parked.get(&to) {
            Some(_) => frame,
            None => match self.try_send(to, frame) {
                Ok(()) => return,
                Err(frame) => frame,
            },
        };
        let parked = self.parked.entry(to).or_default();
        let cost = frame.len() + PARKED_OVERHEAD;
        if parked.bytes + cost > self.max_parked_bytes {
            tracing::warn!(conn = to.0, "peer stopped reading its replies: dropping it");
            self.budget.give(frame.len());
            self.unpark(to);
            self.dropping.insert(to);
            self.gone.push(to);
            return;
        }
        parked.bytes += cost;
        parked.frames.push_back(frame);
    }

    /// Forgets the replies parked for a peer.
    fn unpark(&mut self, conn: ConnId) {
        if let Some(parked) = self.parked.remove(&conn) {
            self.budget.give(parked.frames.iter().map(Vec::len).sum());
        }
    }

    /// Sends one frame, or gives it back if the peer cannot take it now.
    /// A frame not given back leaves the budget when libzmq is done with
    /// it, or now if it is dropped.
    fn try_send(&mut self, to: ConnId, frame: Vec<u8>) -> Result<(), Vec<u8>> {
        let Some(routing_id) = self.peers.routing_id(to) else {
            self.budget.give(frame.len());
            return Ok(());
        };
        // The routing id goes first as a slice, so that an EAGAIN does not
        // consume the payload.
        match retry(|| self.front.send(routing_id, zmq::SNDMORE | zmq::DONTWAIT)) {
            Ok(()) => {}
            Err(zmq::Error::EAGAIN) => return Err(frame),
            Err(zmq::Error::EHOSTUNREACH) => {
                self.budget.give(frame.len());
                self.gone.push(to);
                return Ok(());
            }
            Err(e) => {
                tracing::warn!(conn = to.0, error = %e, "send failed: dropping the peer");
                self.budget.give(frame.len());
                self.gone.push(to);
                return Ok(());
            }
        }
        if let Err(e) = crate::memory::send_counted(&mut self.front, frame, &self.budget, zmq::DONTWAIT) {
            tracing::warn!(conn = to.0, error = %e, "send of a frame body failed");
        }
        Ok(())
    }

    /// Retries parked replies; true if any left.
    fn flush_parked(&mut self) -> anyhow::Result<bool> {
        let mut sent = false;
        let conns: Vec<ConnId> = self.parked.keys().copied().collect();
        for conn in conns {
            while let Some(frame) = self.parked.get_mut(&conn).and_then(|p| p.frames.pop_front()) {
                let cost = frame.len() + PARKED_OVERHEAD;
                if let Err(frame) = self.try_send(conn, frame) {
                    if let Some(parked) = self.parked.get_mut(&conn) {
                        parked.frames.push_front(frame);
                    }
                    break;
                }
                if let Some(parked) = self.parked.get_mut(&conn) {
                    parked.bytes -= cost;
                }
                sent = true;
            }
            if self.parked.get(&conn).is_some_and(|p| p.frames.is_empty()) {
                self.parked.remove(&conn);
            }
        }
        Ok(sent)
    }

    /// Tells every service about peers found gone (unreachable, or not
    /// reading their replies), and forgets them.
    fn forget_gone(&mut self) {
        self.gone.sort_unstable();
        self.gone.dedup();
        while let Some(conn) = self.gone.pop() {
            self.dropping.remove(&conn);
            self.disconnect(conn);
            self.peers.remove(conn);
        }
    }

    fn disconnect(&mut self, conn: ConnId) {
        self.unpark(conn);
        let now = Instant::now();
        for service in 0..self.services.len() {
            self.services[service].on_disconnect(conn, now, &mut self.actions);
            self.apply(service);
        }
        self.passes.note(now.elapsed(), || format!("the disconnect of connection {}", conn.0));
    }

    fn recv_monitor_event(&mut self) -> anyhow::Result<()> {
        let event = retry(|| self.monitor.recv_msg(0))?;
        // The second frame: the endpoint (for a bound one, its local address).
        let mut local = None;
        while self.monitor.get_rcvmore()? {
            let frame = retry(|| self.monitor.recv_msg(0))?;
            local.get_or_insert_with(|| String::from_utf8_lossy(&frame).into_owned());
        }
        if event.len() < 6 {
            return Ok(());
        }
        let kind = u16::from_le_bytes([event[0], event[1]]);
        let value = u32::from_le_bytes([event[2], event[3], event[4], event[5]]);
        let fd = value as i32;
        // A closed peer's fd, or a new peer on a reused fd: either way the
        // connections last seen on it are gone.
        tracing::trace!(kind, value, "monitor event");
        let accepted = kind == zmq::SocketEvent::ACCEPTED.to_raw();
        let disconnected = kind == zmq::SocketEvent::DISCONNECTED.to_raw();
        if accepted || disconnected {
            self.fd_events.push(FdEvent { accepted, fd });
        }
        let Some(curve_ipc) = self.curve_ipc else { return Ok(()) };
        let secure = local.as_deref().is_some_and(|l| curve_ipc || !l.starts_with("ipc://"));
        if accepted && secure {
            if let Some(address) = peer_address(fd) {
                self.accepted_addresses.insert(fd, address);
            }
        } else if disconnected {
            let address = self.accepted_addresses.remove(&fd);
            if let Some(why) = self.handshake_failed.take() {
                // The peer may have gone before its ACCEPTED was read: then
                // only the endpoint it came to is known.
                let address = address.unwrap_or_else(|| {
                    format!("a peer already gone (on {})", local.as_deref().unwrap_or("?"))
                });
                self.failed_handshake(&address, &why);
            }
        } else if secure && kind == zmq::SocketEvent::HANDSHAKE_FAILED_PROTOCOL.to_raw() {
            self.handshake_failed = Some(handshake_protocol_error(value));
        } else if secure && kind == zmq::SocketEvent::HANDSHAKE_FAILED_NO_DETAIL.to_raw() {
            let error = std::io::Error::from_raw_os_error(value as i32);
            self.handshake_failed = Some(format!(
                "the connection ended during the handshake ({error}): a client without CURVE or with the \
                 wrong server key?"
            ));
        }
        Ok(())
    }

    /// Counts a CURVE handshake that failed before any client key was
    /// known (a wrong server key, a client without CURVE, a broken
    /// handshake) and logs it, each address (its host) at most once per
    /// `REFUSAL_LOG_INTERVAL` for each reason (a refused client retries
    /// ten times a second, from a new port each time).
    fn failed_handshake(&mut self, address: &str, why: &str) {
        self.curve_refused += 1;
        let host = match address.rsplit_once(':') {
            Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
            _ => address,
        };
        let key = (host.to_string(), why.to_string());
        let now = Instant::now();
        let due = self
            .handshake_failures_logged
            .get(&key)
            .is_none_or(|t| now.duration_since(*t) >= REFUSAL_LOG_INTERVAL);
        if due {
            if self.handshake_failures_logged.len() >= REFUSAL_LOG_KEYS {
                self.handshake_failures_logged.clear();
            }
            self.handshake_failures_logged.insert(key, now);
            tracing::warn!(
                "CURVE: handshake from {address} failed: {why} ({} refused so far)",
                self.curve_refused
            );
        }
    }

    /// A new peer speaks on `fd`. Its own connection is the last ACCEPTED on
    /// that descriptor: what came before ends older peers (now, before the
    /// new one takes the descriptor over); what came after (its own
    /// DISCONNECTED) waits until its frames have been read.
    fn admit_fd(&mut self, fd: i32) {
        let Some(last_accept) = self.fd_events.iter().rposition(|e| e.accepted && e.fd == fd) else {
            return;
        };
        // A fresh connection on this descriptor: it is open again.
        self.closed_fds.remove(&fd);
        let mut index = 0;
        self.fd_events.retain(|e| {
            let keep = e.fd != fd || index > last_accept;
            index += 1;
            keep
        });
        // The older peers there are gone, but their last frames may still
        // be queued: forget them once the front socket is read dry.
        let old = self.peers.take_fd(fd);
        self.gone.extend(old);
    }

    /// The peers last seen on a closed descriptor are gone.
    fn forget_fd(&mut self, fd: i32) {
        for conn in self.peers.remove_fd(fd) {
            tracing::debug!(conn = conn.0, fd, "peer disconnected");
            self.disconnect(conn);
        }
    }

    fn recv_control(&mut self) -> anyhow::Result<()> {
        let mut parts = retry(|| self.control.recv_multipart(0))?;
        if parts.len() < 2 {
            return Ok(());
        }
        let routing_id = parts.remove(0);
        let words: Vec<String> = parts.iter().map(|p| String::from_utf8_lossy(p).into_owned()).collect();
        let reply = match words.first().map(String::as_str) {
            Some("STATUS") => self.status(),
            _ => match self.command(&words, &routing_id) {
                Some(reply) => reply,
                None => return Ok(()),
            },
        };
        // A control client that vanished is no loss.
        let _ = self.control.send_multipart([routing_id, reply.to_string().into_bytes()], zmq::DONTWAIT);
        Ok(())
    }

    /// A control command for the services (`PUBLISH DIR ALIAS`): the first
    /// service that knows it answers `{"ok": …}` or `{"error": …}`, now or
    /// (`None` here) later, through `answer`.
    fn command(&mut self, words: &[String], routing_id: &[u8]) -> Option<serde_json::Value> {
        let refuse = |error: &str| Some(serde_json::json!({ "error": error }));
        // The abstract-namespace control socket has no file permissions:
        // anyone on the machine can reach it, so commands that change
        // what is published need the secret only the broker's user can read.
        let (Some(verb), Some(token)) = (words.first(), words.get(1)) else {
            return refuse("usage: COMMAND TOKEN ARGUMENTS...");
        };
        if self.control_token.as_ref() != Some(token) {
            return refuse("not authorised: the control token does not match (run as the broker's user)");
        }
        if self.control_waiting.len() >= MAX_CONTROL_WAITING {
            return refuse("busy: too many control requests waiting; try again");
        }
        let words: Vec<String> = std::iter::once(verb.clone()).chain(words[2..].iter().cloned()).collect();
        let words = &words[..];
        let now = Instant::now();
        let request = self.next_request;
        self.next_request += 1;
        for service in 0..self.services.len() {
            if let Some(answer) = self.services[service].command(request, words, now, &mut self.actions) {
                let reply = match answer {
                    Answer::Now(result) => Some(control_reply(result)),
                    Answer::Later => {
                        self.control_waiting.insert(request, Some(routing_id.to_vec()));
                        None
                    }
                };
                // After registering the request: the answer may be among
                // the actions.
                self.apply(service);
                return reply;
            }
        }
        refuse(&format!("unknown control request {:?}", words.join(" ")))
    }

    fn status(&self) -> serde_json::Value {
        let services: serde_json::Map<String, serde_json::Value> =
            self.services.iter().map(|s| (s.name().to_string(), s.status())).collect();
        let mut status = serde_json::json!({
            "name": self.name,
            "version": env!("CARGO_PKG_VERSION"),
            "pid": std::process::id(),
            "state_dir": self.state_dir.as_ref().map(|d| escape(d.as_os_str().as_encoded_bytes())),
            "uptime_ms": self.started.elapsed().as_millis() as u64,
            "endpoints": self.endpoints,
            "peers": self.peers.len(),
            "max_connections": self.max_connections,
            "refused_connections": self.refused_connections,
            "reloads": self.reloads,
            "reload_errors": self.reload_errors,
            "stopping": self.draining.is_some(),
            "timers": self.timers.len(),
            "parked_replies": self.parked.values().map(|p| p.frames.len()).sum::<usize>(),
            "parked_bytes": self.parked.values().map(|p| p.bytes).sum::<usize>(),
            "memory": {
                "limit": self.budget.limit(),
                "used": self.budget.used(),
                "peak": self.budget.peak(),
                "at_limit": self.budget.at_limit(),
                "waiting": self.budget.waiting(),
                "holders": self.budget_holders(5).iter()
                    .map(|(c, b, w)| serde_json::json!({ "connection": c.0, "bytes": b, "what": w }))
                    .collect::<Vec<_>>(),
            },
            "dropped_frames": self.dropped_frames,
            "curve_endpoints": self.curve_endpoints,
            "curve_allowed_keys": match &self.allow {
                _ if self.zap.is_none() => serde_json::Value::Null,
                Allow::Anyone => serde_json::json!("any"),
                Allow::Only(keys) => serde_json::json!(keys.len()),
            },
            "curve_refused": self.curve_refused,
            "work_in_flight": self.worker.in_flight(),
            "services": services,
        });
        if let (Some(status), serde_json::Value::Object(passes)) =
            (status.as_object_mut(), self.passes.status())
        {
            status.extend(passes);
        }
        status
    }

    /// Gives parked replies a last chance to leave.
    fn flush_at_shutdown(&mut self) {
        let deadline = Instant::now() + Duration::from_millis(LINGER_MS as u64);
        while !self.parked.is_empty() && Instant::now() < deadline {
            if !matches!(self.flush_parked(), Ok(true)) {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
}
