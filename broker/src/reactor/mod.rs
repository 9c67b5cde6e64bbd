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

mod control;
mod lifecycle;
mod links;
mod monitor;
mod outbox;
mod zap;

use crate::error::{Doing as _, ReactorError};
use bytes::Bytes;
pub use control::{AllowReload, Reload};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use outbox::Parked;
use std::collections::{HashMap, HashSet, VecDeque};
use std::io::Read;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};
use zap::{handshake_protocol_error, peer_address};
pub use zap::{Allow, Curve};
use zbroker_client::curve::{self, Key};
use zbroker_proto::escape::escape;
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
/// take them are bounded by the services' `max_parked` counted this way;
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

/// What the operator asked for.
pub struct Settings {
    pub name: String,
    /// Endpoints of the front ROUTER besides the services' well-known
    /// local ones (every `--bind`).
    pub binds: Vec<String>,
    pub control_endpoint: String,
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
    /// Services' outbound links (`links.rs`), sockets of this context.
    links: links::Links,
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

fn zmq_fd(socket: &zmq::Socket) -> Result<i32, ReactorError> {
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
    pub fn bind(settings: Settings, services: Vec<Box<dyn Service>>) -> Result<Self, ReactorError> {
        Self::bind_secure(settings, services, None)
    }

    /// `bind`, with CURVE on the endpoints that need it (every one but
    /// `ipc://` ones, and those too with `Curve::ipc`).
    pub fn bind_secure(
        settings: Settings,
        services: Vec<Box<dyn Service>>,
        curve: Option<Curve>,
    ) -> Result<Self, ReactorError> {
        let mut routes = HashMap::new();
        for (i, service) in services.iter().enumerate() {
            if let Some(other) = routes.insert(service.signature(), i) {
                return Err(ReactorError::SignatureClash {
                    first: services[other].name(),
                    second: service.name(),
                    signature: service.signature(),
                });
            }
        }
        // The largest frame any service takes: a peer sending a larger one
        // is disconnected by libzmq before the frame is buffered. Each
        // service then bounds every other message by its type.
        let max_message_size = services.iter().map(|s| s.max_frame()).max().unwrap_or(0);
        let max_parked_bytes = services.iter().map(|s| s.max_parked()).max().unwrap_or(0) + 4096;
        let mut all_endpoints: Vec<String> =
            services.iter().map(|s| s.local_endpoint(&settings.name)).collect();
        all_endpoints.extend(settings.binds.iter().cloned());

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
            return Err(ReactorError::Bind { endpoint: settings.control_endpoint.clone(), source: e });
        }

        let front = context.socket(zmq::ROUTER)?;
        front.set_router_mandatory(true)?;
        front.set_sndhwm(SEND_HWM)?;
        front.set_linger(LINGER_MS)?;
        front.set_maxmsgsize(i64::try_from(max_message_size).unwrap_or(i64::MAX))?;
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
                zap.bind(ZAP_ENDPOINT).doing("binding the ZAP handler")?;
                Some(zap)
            }
            None => None,
        };
        let secure =
            |endpoint: &str| curve.as_ref().is_some_and(|c| c.ipc || !endpoint.starts_with("ipc://"));
        let mut endpoints = vec![String::new(); all_endpoints.len()];
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
            for (i, endpoint) in all_endpoints.iter().enumerate() {
                if secure(endpoint) != with_curve {
                    continue;
                }
                front.bind(endpoint).map_err(|e| match e {
                    zmq::Error::EADDRINUSE => ReactorError::AddressInUse { endpoint: endpoint.clone() },
                    e => ReactorError::Bind { endpoint: endpoint.clone(), source: e },
                })?;
                // `tcp://host:*` binds a free port; record the real one.
                let actual = front.get_last_endpoint()?.map_err(ReactorError::EndpointName)?;
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
                .doing("installing signal handlers")?;
        }

        let (reload_signals, reload_writer) = UnixStream::pair()?;
        reload_signals.set_nonblocking(true)?;
        signal_hook::low_level::pipe::register(signal_hook::consts::SIGHUP, reload_writer)
            .doing("installing the SIGHUP handler")?;

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
        let executors = services.iter().map(|s| (s.name(), s.executor())).collect();
        let worker = Worker::start(waker, executors).doing("starting the worker threads")?;

        let mut reactor = Reactor {
            name: settings.name,
            poll,
            front,
            monitor,
            control,
            zap,
            links: links::Links::new(curve.as_ref().map(|c| c.secret_key)),
            signals,
            _context: context,
            endpoints,
            services,
            routes,
            peers: Peers::default(),
            timers: Timers::default(),
            parked: HashMap::new(),
            max_parked_bytes,
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
        };
        // Each service's work to start with (the first scans).
        let now = Instant::now();
        for service in 0..reactor.services.len() {
            reactor.services[service].start(now, &mut reactor.actions);
            reactor.apply(service);
        }
        Ok(reactor)
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
    pub fn run(&mut self) -> Result<(), ReactorError> {
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
                Err(e) => return Err(e).doing("polling"),
            }
            self.passes.begin();
            for event in events.iter() {
                match event.token() {
                    SIGNALS => self.check_signals(),
                    RELOAD => self.check_reload(),
                    MONITOR => self.drain_monitor()?,
                    CONTROL => self.drain_control()?,
                    ZAP => self.drain_zap()?,
                    token => self.link_woke(token),
                }
            }
            // Whatever woke us, the front socket is drained: timers and
            // disconnects send on it, and a send may consume its edge.
            self.drain_front()?;
            self.check_drain();
            self.passes.end();
        }
        self.flush_at_shutdown();
        self.answer_waiting_at_stop();
        self.close_links();
        Ok(())
    }

    /// Works the front socket until a whole pass finds nothing to do.
    /// Timers get a turn on every pass and signals every 64, so steady
    /// traffic cannot starve them. Each socket's `ZMQ_FD` edge is consumed
    /// only by calls on that socket, so the monitor and control sockets are
    /// drained when their own token fires, not on every pass.
    fn drain_front(&mut self) -> Result<(), ReactorError> {
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
            let mut progress = delivered | self.work_links()?;
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

    /// Receives up to a batch of frames from the front socket.
    fn recv_front(&mut self) -> Result<bool, ReactorError> {
        let mut any = false;
        for _ in 0..RECV_BATCH {
            let mut routing_id = zmq::Message::new();
            match retry(|| self.front.recv(&mut routing_id, zmq::DONTWAIT)) {
                Ok(()) => {}
                Err(zmq::Error::EAGAIN) => break,
                Err(e) => return Err(e).doing("receiving on the front socket"),
            }
            any = true;
            if !self.front.get_rcvmore()? {
                self.dropped_frames += 1;
                continue;
            }
            let mut body = zmq::Message::new();
            retry(|| self.front.recv(&mut body, 0))?;
            // Only the first body frame counts (docs/protocol/ZPIPES.md
            // "Transport"); skip any others.
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
                Action::Connect { key, endpoint, options } => {
                    self.connect_link(service, key, endpoint, options)
                }
                Action::LinkSend { key, frame } => self.link_send(service, key, frame),
                Action::Disconnect { key } => self.disconnect_link(service, key),
            }
        }
        self.actions = actions;
    }
}

/// Binds a reactor on a thread of its own and runs it there for the rest
/// of the process: how benches and tests embed the broker. `make` builds
/// the services on that thread (they are not `Send`). Returns the bound
/// endpoints; a loop that fails later ends the process with a message.
pub fn spawn(
    settings: Settings,
    make: impl FnOnce() -> Vec<Box<dyn Service>> + Send + 'static,
) -> Result<Vec<String>, ReactorError> {
    let (bound_tx, bound_rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("broker".into())
        .spawn(move || match Reactor::bind(settings, make()) {
            Ok(mut reactor) => {
                let _ = bound_tx.send(Ok(reactor.endpoints().to_vec()));
                if let Err(e) = reactor.run() {
                    eprintln!("embedded broker failed: {e}");
                    std::process::exit(1);
                }
            }
            Err(e) => {
                let _ = bound_tx.send(Err(e));
            }
        })
        .doing("starting the broker thread")?;
    bound_rx.recv().map_err(|_| ReactorError::ThreadDied)?
}
