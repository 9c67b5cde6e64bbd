//! Blocking ZPIPES clients: a [`Reader`] and a [`Writer`], each one DEALER
//! socket holding one end of a named pipe.
//!
//! ```no_run
//! use std::io::{Read, Write};
//! use zbroker_client::zpipes::{Options, Reader, Writer};
//!
//! let opts = Options::broker("local");
//! let mut writer = Writer::open("backup", &opts)?;
//! writer.write_all(b"hello")?;
//! writer.close()?;
//!
//! let mut reader = Reader::open("backup", &opts)?;
//! let mut text = String::new();
//! reader.read_to_string(&mut text)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! While a client waits for a reply it PINGs the broker every
//! [`Options::heartbeat`], so the broker never expires a client that is
//! merely blocked, and it watches its socket for a disconnect, so a broker
//! that dies or restarts ends the wait with [`Error::BrokerGone`] instead of
//! a hang.

use crate::byte_queue::ByteQueue;
use crate::codec::{Chunk, ShortStr};
use crate::endpoint;
use crate::zpipes_msg::PARTIAL_READ;
use crate::ZpipesMsg;
use bytes::Bytes;
use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Why a pipe operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no broker answers at {0}")]
    NoBroker(String),
    /// A broker is there but the handshake failed or never completed: with
    /// CURVE, a wrong server key or a client key the broker does not allow;
    /// without, a broker that requires CURVE.
    #[error("no broker answered at {endpoint}: {hint}")]
    Handshake { endpoint: String, hint: &'static str },
    #[error("lost the broker at {endpoint}: {why}")]
    BrokerGone { endpoint: String, why: &'static str },
    #[error("pipe {pipe:?} already has a {end}")]
    Busy { pipe: String, end: &'static str },
    #[error("pipe failed: {0}")]
    Failed(String),
    #[error("the broker refused the request as invalid for this pipe end")]
    Invalid,
    #[error("pipe name {0:?} is longer than 255 bytes")]
    BadName(String),
    #[error("{0} bytes is more than one request can carry")]
    TooLarge(usize),
    #[error("unexpected {0} from the broker")]
    Protocol(&'static str),
    #[error(transparent)]
    Zmq(#[from] zmq::Error),
}

impl From<Error> for io::Error {
    fn from(e: Error) -> io::Error {
        let kind = match e {
            Error::NoBroker(_) | Error::Handshake { .. } => io::ErrorKind::NotFound,
            Error::BrokerGone { .. } => io::ErrorKind::ConnectionAborted,
            Error::Failed(_) => io::ErrorKind::BrokenPipe,
            _ => io::ErrorKind::Other,
        };
        io::Error::new(kind, e)
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// The outcome of one READ.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadOutcome {
    /// Exactly the bytes asked for, or fewer once the writer has gone.
    Data(Bytes),
    /// The writer has gone and nothing is left.
    End,
    /// Not enough bytes arrived in time; whatever did arrive stays queued.
    Timeout,
}

/// The outcome of one WRITE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteOutcome {
    /// The broker holds the bytes for the reader.
    Written,
    /// No reader (or no room) in time; none of the bytes were delivered.
    Timeout,
}

/// How to reach the broker, and client tuning.
#[derive(Debug, Clone)]
pub struct Options {
    /// A ZeroMQ endpoint, e.g. `ipc://@/zpipes/local` or `tcp://host:5670`.
    pub endpoint: String,
    /// How long opening a pipe waits for a broker to be there.
    pub connect_timeout: Duration,
    /// PING interval while waiting for a reply.
    pub heartbeat: Duration,
    /// With no message at all from the broker for this long (PINGs
    /// unanswered), it is taken as gone.
    pub dead_after: Duration,
    /// Largest chunk one WRITE carries: `std::io::Write` gathers small
    /// writes up to this and splits larger ones. At most the broker's pipe
    /// limit (1 MiB at the least).
    pub max_chunk: usize,
    /// Largest READ that `std::io::Read` sends; at most the broker's pipe
    /// limit.
    pub max_read: usize,
    /// WRITEs in flight at once through `std::io::Write` (and at most
    /// 3 MiB of them, which the broker always accepts).
    pub window: usize,
    /// After a read without a timeout, ask for the next chunk of the same
    /// size at once (see [`Reader`]).
    pub read_ahead: bool,
    /// Speak CURVE to the broker with these keys (needed for a broker's
    /// `--curve-secret-key` endpoints); `None`: no security (local IPC).
    pub curve: Option<crate::curve::ClientKeys>,
    /// A reader offers the broker our "what is there, up to n" READ
    /// ([`Reader::read_some`]); a broker without it (the original) simply
    /// does not grant it. Off: exactly the original wire.
    pub partial_reads: bool,
}

impl Options {
    /// The broker called `name` on this machine.
    pub fn broker(name: &str) -> Self {
        Self::endpoint(&endpoint::zpipes(name))
    }

    /// A broker at any ZeroMQ endpoint.
    pub fn endpoint(endpoint: &str) -> Self {
        Options {
            endpoint: endpoint.to_string(),
            connect_timeout: Duration::from_secs(2),
            heartbeat: Duration::from_secs(1),
            dead_after: Duration::from_secs(10),
            // Large messages: each costs a wake-up of four threads, so
            // fewer, bigger ones move bytes for less CPU (see the bench).
            max_chunk: 1 << 20,
            max_read: 1 << 20,
            window: 4,
            read_ahead: false,
            curve: None,
            partial_reads: true,
        }
    }
}

impl Default for Options {
    fn default() -> Self {
        Self::broker(endpoint::DEFAULT_BROKER)
    }
}

use zmq::SocketEvent::{
    CONNECTED, CONNECT_RETRIED, DISCONNECTED, HANDSHAKE_FAILED_AUTH, HANDSHAKE_FAILED_NO_DETAIL,
    HANDSHAKE_FAILED_PROTOCOL, HANDSHAKE_SUCCEEDED,
};

/// WRITE bytes kept in flight at most: below the 4 MiB the broker always
/// lets wait behind a pending request.
const IN_FLIGHT_BYTES: usize = 3 << 20;

/// A received frame, shared as `Bytes` without a copy.
struct Frame(zmq::Message);
impl AsRef<[u8]> for Frame {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// One ZeroMQ context for every client in the process.
fn context() -> &'static zmq::Context {
    static CONTEXT: OnceLock<zmq::Context> = OnceLock::new();
    CONTEXT.get_or_init(zmq::Context::new)
}

/// `zmq::poll`, where a signal's interruption (EINTR) counts as a wake-up
/// with nothing to do: the callers loop and re-check.
fn poll(items: &mut [zmq::PollItem], timeout_ms: i64) -> Result<()> {
    match zmq::poll(items, timeout_ms) {
        Ok(_) | Err(zmq::Error::EINTR) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

fn ms(timeout: Option<Duration>) -> u32 {
    match timeout {
        None => 0,
        // 0 means "no limit" on the wire; the shortest real limit is 1 ms.
        Some(t) => t.as_millis().clamp(1, u32::MAX as u128) as u32,
    }
}

/// The socket to the broker, its disconnect monitor and the heartbeat.
struct Link {
    socket: zmq::Socket,
    monitor: zmq::Socket,
    opts: Options,
    monitor_endpoint: String,
    /// PINGs sent and not yet answered.
    pings: usize,
    last_heard: Instant,
    /// When we last sent anything: the broker's expiry counts from there.
    last_sent: Instant,
    /// The monitor saw the connection drop (the broker died or restarted).
    dropped: bool,
    /// The broker granted partial READs (a PING_OK carrying the bit).
    partial: bool,
}

impl Link {
    fn connect(opts: &Options) -> Result<Link> {
        static MONITORS: AtomicU64 = AtomicU64::new(0);
        let socket = context().socket(zmq::DEALER)?;
        // Queue nothing until a broker is really there, so "no broker"
        // shows at once instead of as a request that waits for ever.
        socket.set_immediate(true)?;
        socket.set_linger(200)?;
        let monitor_endpoint = format!(
            "inproc://zpipes-client-monitor-{}-{}",
            std::process::id(),
            MONITORS.fetch_add(1, Ordering::Relaxed)
        );
        let events = [
            CONNECTED,
            CONNECT_RETRIED,
            HANDSHAKE_SUCCEEDED,
            HANDSHAKE_FAILED_NO_DETAIL,
            HANDSHAKE_FAILED_PROTOCOL,
            HANDSHAKE_FAILED_AUTH,
            DISCONNECTED,
        ];
        socket.monitor(&monitor_endpoint, events.iter().fold(0, |all, e| all | e.to_raw()) as i32)?;
        let monitor = context().socket(zmq::PAIR)?;
        monitor.set_linger(0)?;
        monitor.connect(&monitor_endpoint)?;
        if let Some(keys) = &opts.curve {
            keys.apply(&socket)?;
        }
        socket.connect(&opts.endpoint)?;
        let mut link = Link {
            socket,
            monitor,
            monitor_endpoint,
            opts: opts.clone(),
            pings: 0,
            last_heard: Instant::now(),
            last_sent: Instant::now(),
            dropped: false,
            partial: false,
        };
        link.await_handshake()?;
        // From now on only a drop matters. Events nobody reads would pile
        // up (a reconnecting socket reports a retry every 100 ms) and
        // libzmq sends them blocking, from its I/O thread.
        link.watch(&[DISCONNECTED])?;
        Ok(link)
    }

    /// Points the socket's monitor at a fresh endpoint for `events` (which
    /// stops the previous one) and listens there.
    fn watch(&mut self, events: &[zmq::SocketEvent]) -> Result<()> {
        static GENERATION: AtomicU64 = AtomicU64::new(0);
        let endpoint = format!("{}-{}", self.monitor_endpoint, GENERATION.fetch_add(1, Ordering::Relaxed));
        self.socket.monitor(&endpoint, events.iter().fold(0, |all, e| all | e.to_raw()) as i32)?;
        if !events.is_empty() {
            let monitor = context().socket(zmq::PAIR)?;
            monitor.set_linger(0)?;
            monitor.connect(&endpoint)?;
            self.monitor = monitor;
        }
        Ok(())
    }

    /// Waits for the connection's ZMTP handshake. A refused connection
    /// (nothing listens there) is "no broker" at once; a connection that is
    /// up but slow to greet (a busy machine) gets `dead_after` to finish. A
    /// handshake that fails (CURVE keys not accepted, or a broker that
    /// requires CURVE from a client without keys) ends the wait at once,
    /// with a hint: libzmq would retry it for ever.
    fn await_handshake(&mut self) -> Result<()> {
        let endpoint = self.opts.endpoint.clone();
        let curve = self.opts.curve.is_some();
        let no_broker = || match curve {
            true => Error::Handshake { endpoint: endpoint.clone(), hint: crate::curve::HINT },
            false => Error::NoBroker(endpoint.clone()),
        };
        let failed = || Error::Handshake {
            endpoint: endpoint.clone(),
            hint: if curve { crate::curve::HINT } else { crate::curve::HINT_NO_KEYS },
        };
        let mut deadline = Instant::now() + self.opts.connect_timeout;
        let mut connected = false;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || self.monitor.poll(zmq::POLLIN, left.as_millis().max(1) as i64)? == 0 {
                // Nothing ever answered: the broker is not there, whatever
                // the keys. Answered but never finished the handshake: keys.
                return Err(if connected { no_broker() } else { Error::NoBroker(endpoint.clone()) });
            }
            match self.monitor_event()? {
                Some(e) if e == HANDSHAKE_SUCCEEDED.to_raw() => {
                    self.dropped = false;
                    return Ok(());
                }
                Some(e) if e == CONNECT_RETRIED.to_raw() && !connected => {
                    return Err(Error::NoBroker(endpoint.clone()))
                }
                Some(e) if e == CONNECT_RETRIED.to_raw() => return Err(no_broker()),
                Some(e) if e == CONNECTED.to_raw() && !connected => {
                    connected = true;
                    deadline = Instant::now() + self.opts.dead_after;
                }
                Some(e)
                    if e == HANDSHAKE_FAILED_NO_DETAIL.to_raw()
                        || e == HANDSHAKE_FAILED_PROTOCOL.to_raw()
                        || e == HANDSHAKE_FAILED_AUTH.to_raw()
                        || e == DISCONNECTED.to_raw() =>
                {
                    return Err(failed());
                }
                _ => {}
            }
        }
    }

    /// Reads one event from the socket's monitor (its kind), noting a drop.
    fn monitor_event(&mut self) -> Result<Option<u16>> {
        let frames = match self.monitor.recv_multipart(zmq::DONTWAIT) {
            Ok(frames) => frames,
            Err(zmq::Error::EAGAIN | zmq::Error::EINTR) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let kind = frames.first().filter(|f| f.len() >= 2).map(|f| u16::from_le_bytes([f[0], f[1]]));
        if kind == Some(DISCONNECTED.to_raw()) {
            self.dropped = true;
        }
        Ok(kind)
    }

    fn gone(&self, why: &'static str) -> Error {
        Error::BrokerGone { endpoint: self.opts.endpoint.clone(), why }
    }

    fn send(&mut self, msg: &ZpipesMsg) -> Result<()> {
        self.send_within(msg, self.opts.dead_after)
    }

    /// Sends, waiting at most `wait` for a connection to send on (in
    /// immediate mode a message is never queued without one).
    fn send_within(&mut self, msg: &ZpipesMsg, wait: Duration) -> Result<()> {
        self.send_frame(msg.encode(), wait)
    }

    /// Sends an encoded frame (see `send_within`).
    fn send_frame(&mut self, frame: Vec<u8>, wait: Duration) -> Result<()> {
        self.last_sent = Instant::now();
        match self.socket.send(&frame[..], zmq::DONTWAIT) {
            Ok(()) => Ok(()),
            Err(zmq::Error::EAGAIN) => {
                while self.monitor_event()?.is_some() {}
                if self.dropped {
                    return Err(self.gone("the connection dropped"));
                }
                if self.socket.poll(zmq::POLLOUT, wait.as_millis() as i64)? == 0 {
                    return Err(self.gone("no connection to send on"));
                }
                self.socket.send(frame, zmq::DONTWAIT)?;
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The next frame if one is already there.
    fn try_recv(&mut self) -> Result<Option<ZpipesMsg>> {
        loop {
            let frame = match self.socket.recv_msg(zmq::DONTWAIT) {
                Ok(frame) => frame,
                Err(zmq::Error::EAGAIN | zmq::Error::EINTR) => return Ok(None),
                Err(e) => return Err(e.into()),
            };
            self.last_heard = Instant::now();
            match ZpipesMsg::decode_ext(Bytes::from_owner(Frame(frame))) {
                Ok((ZpipesMsg::PingOk {}, granted)) => {
                    self.partial |= granted & PARTIAL_READ != 0;
                    self.pings = self.pings.saturating_sub(1);
                }
                Ok((msg, _)) => return Ok(Some(msg)),
                Err(e) => tracing::warn!("ignoring a malformed frame from the broker: {e}"),
            }
        }
    }

    /// The next reply other than PING_OK, or `None` at `deadline`.
    fn recv(&mut self, deadline: Option<Instant>) -> Result<Option<ZpipesMsg>> {
        loop {
            // Counted from the last message sent, not from this call: short
            // waits in a row (a reader polling while a READ stays in flight)
            // still ping.
            let next_ping = self.last_sent + self.opts.heartbeat;
            // Most replies are already there: no poll for them.
            if let Some(msg) = self.try_recv()? {
                return Ok(Some(msg));
            }
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                return Ok(None);
            }
            if now >= next_ping {
                self.send(&ZpipesMsg::Ping {})?;
                self.pings += 1;
                continue;
            }
            if self.pings > 0 && now.duration_since(self.last_heard) > self.opts.dead_after {
                return Err(self.gone("no answer to pings"));
            }
            let until = deadline.map_or(next_ping, |d| d.min(next_ping));
            self.wait(until.saturating_duration_since(now))?;
        }
    }

    /// Waits up to `limit` for a frame; fails if the connection to the
    /// broker dropped (and nothing is left to read).
    fn wait(&mut self, limit: Duration) -> Result<()> {
        let mut items = [self.socket.as_poll_item(zmq::POLLIN), self.monitor.as_poll_item(zmq::POLLIN)];
        poll(&mut items, (limit.as_millis() as i64).max(1))?;
        let (frames, events) = (items[0].is_readable(), items[1].is_readable());
        if events {
            while self.monitor_event()?.is_some() {}
        }
        if self.dropped && !frames {
            return Err(self.gone("the connection dropped"));
        }
        Ok(())
    }

    /// Waits for the next reply for as long as the broker lives.
    fn reply(&mut self) -> Result<ZpipesMsg> {
        Ok(self.recv(None)?.expect("no deadline"))
    }

    /// Opens a pipe end with INPUT or OUTPUT.
    fn open(opts: &Options, pipe: &str, reader: bool) -> Result<Link> {
        let pipename =
            ShortStr::new(pipe.as_bytes().to_vec()).map_err(|_| Error::BadName(pipe.to_string()))?;
        let mut link = Link::connect(opts)?;
        let request = if reader { ZpipesMsg::Input { pipename } } else { ZpipesMsg::Output { pipename } };
        link.send(&request)?;
        match link.recv(Some(Instant::now() + opts.connect_timeout + opts.dead_after))? {
            Some(ZpipesMsg::InputOk {}) if reader => Ok(link),
            Some(ZpipesMsg::OutputOk {}) if !reader => Ok(link),
            Some(ZpipesMsg::InputFailed { .. }) => Err(Error::Busy { pipe: pipe.to_string(), end: "reader" }),
            Some(ZpipesMsg::OutputFailed { .. }) => {
                Err(Error::Busy { pipe: pipe.to_string(), end: "writer" })
            }
            Some(ZpipesMsg::Invalid {}) => Err(Error::Invalid),
            Some(other) => Err(Error::Protocol(other.name())),
            None => Err(Error::NoBroker(opts.endpoint.clone())),
        }
    }

    /// One PING and its PING_OK: keeps the connection from expiring.
    fn ping(&mut self) -> Result<()> {
        self.ping_offering(0)
    }

    /// A PING offering extension `bits` (none: the original PING); what
    /// the PING_OK grants is noted by `try_recv`.
    fn ping_offering(&mut self, bits: u8) -> Result<()> {
        self.send_frame(ZpipesMsg::Ping {}.encode_ext(bits), self.opts.dead_after)?;
        self.pings += 1;
        let deadline = Instant::now() + self.opts.dead_after;
        loop {
            if let Some(other) = self.try_recv()? {
                return Err(Error::Protocol(other.name()));
            }
            if self.pings == 0 {
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(self.gone("no answer to a ping"));
            }
            self.wait(left)?;
        }
    }

    /// Sends CLOSE and waits (briefly) for CLOSE_OK.
    fn close(&mut self) -> Result<()> {
        // Closing runs in Drop too: a broker that is gone must not hold it.
        self.send_within(&ZpipesMsg::Close {}, self.opts.connect_timeout.min(Duration::from_millis(500)))?;
        let deadline = Instant::now() + self.opts.connect_timeout;
        loop {
            match self.recv(Some(deadline))? {
                Some(ZpipesMsg::CloseOk {}) => return Ok(()),
                // A pending request is failed (or answered) before CLOSE_OK.
                Some(
                    ZpipesMsg::ReadFailed { .. }
                    | ZpipesMsg::WriteFailed { .. }
                    | ZpipesMsg::ReadOk { .. }
                    | ZpipesMsg::ReadEnd {}
                    | ZpipesMsg::ReadTimeout {}
                    | ZpipesMsg::WriteOk {},
                ) => continue,
                Some(ZpipesMsg::Invalid {}) => return Err(Error::Invalid),
                Some(other) => return Err(Error::Protocol(other.name())),
                None => return Err(self.gone("no answer to CLOSE")),
            }
        }
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        // Stop the monitor before its reader goes: libzmq sends monitor
        // events blocking, and an event for a closed reader would stall the
        // I/O thread that every client in the process shares.
        let _ = self.watch(&[]);
        let _ = self.socket.disconnect(&self.opts.endpoint);
    }
}

fn failure(reason: &ShortStr) -> Error {
    Error::Failed(reason.to_string_lossy())
}

/// How a wait for a READ's reply ended.
enum Awaited {
    /// Data or the end of the stream.
    Reply,
    /// The broker's READ_TIMEOUT.
    TimedOut,
    /// Nothing before the deadline (the READ stays in flight).
    NoReply,
}

/// A READ awaiting its reply.
#[derive(Debug, Clone, Copy)]
struct Flight {
    /// Sent with a timeout, so the broker will answer by itself.
    timed: bool,
}

/// What a READ asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    /// Exactly `size` bytes (the protocol's READ).
    Exact,
    /// What is there, up to `size`, at least one byte (our extension).
    Some,
}

/// The reading end of a named pipe.
///
/// With [`Options::read_ahead`], after a read without a timeout the reader
/// asks for the next chunk of the same size at once, so the broker can
/// answer while the program is still busy with the last one: a small
/// message is often already there when asked for. The cost: until that
/// READ is answered (that many bytes, or the writer's end), a later read
/// waits for it, even one with a timeout or a smaller size. Without it,
/// every read is plain request/reply.
pub struct Reader {
    link: Link,
    /// Bytes received and not yet handed out.
    buffer: ByteQueue,
    /// The READ sent and not yet answered.
    in_flight: Option<Flight>,
    timeout: Option<Duration>,
    ended: bool,
    closed: bool,
}

impl Reader {
    /// Opens `pipe` for reading. Fails with [`Error::Busy`] if it already has
    /// a reader.
    pub fn open(pipe: &str, opts: &Options) -> Result<Reader> {
        let mut link = Link::open(opts, pipe, true)?;
        if opts.partial_reads {
            // One round trip on open; the original broker answers a plain
            // PING_OK and the reader then reads as the original's does.
            link.ping_offering(PARTIAL_READ)?;
        }
        Ok(Reader {
            link,
            buffer: ByteQueue::default(),
            in_flight: None,
            timeout: None,
            ended: false,
            closed: false,
        })
    }

    /// Reads exactly `size` bytes (fewer only when the writer has gone),
    /// waiting at most `timeout` (`None`: no limit). On `Timeout` whatever
    /// arrived stays for the next call. `size` 0 is the protocol's probe and
    /// answers `End`.
    pub fn read_chunk(&mut self, size: usize, timeout: Option<Duration>) -> Result<ReadOutcome> {
        if size == 0 {
            return Ok(ReadOutcome::End);
        }
        if u32::try_from(size).is_err() {
            return Err(Error::TooLarge(size));
        }
        let deadline = timeout.map(|t| Instant::now() + t);
        // A READ_TIMEOUT counts only for a READ this call sent: one that
        // comes late for an earlier call is not this call's timeout.
        let mut posted = false;
        loop {
            if self.buffer.len() >= size || (self.ended && !self.buffer.is_empty()) {
                let data = self.buffer.take(size);
                if timeout.is_none() && self.link.opts.read_ahead {
                    self.post(size, None, Want::Exact)?;
                }
                return Ok(ReadOutcome::Data(data));
            }
            if self.ended {
                return Ok(ReadOutcome::End);
            }
            if self.in_flight.is_none() {
                self.post(size - self.buffer.len(), timeout, Want::Exact)?;
                posted = true;
            }
            match self.await_reply(deadline)? {
                Awaited::Reply => {}
                Awaited::TimedOut if !posted => {}
                Awaited::TimedOut | Awaited::NoReply => return Ok(ReadOutcome::Timeout),
            }
        }
    }

    /// Takes every byte received and not yet handed out (say, a
    /// read-ahead's answer), so a program that fails can still pass on
    /// what it got.
    pub fn take_buffered(&mut self) -> Bytes {
        let n = self.buffer.len();
        self.buffer.take(n)
    }

    /// True if the broker grants "what is there" READs: [`Reader::read_some`]
    /// and `std::io::Read` then answer as soon as any bytes are there.
    pub fn partial_reads(&self) -> bool {
        self.link.partial
    }

    /// Reads what is there, up to `max` bytes and at least one, waiting at
    /// most `timeout` for the first; `End` once the writer has gone and
    /// nothing is left. After data it keeps the next such READ in flight,
    /// so bytes arriving meanwhile are already here on the next call. A
    /// broker without the capability ([`Reader::partial_reads`] false)
    /// gets exactly [`Reader::read_chunk`] instead.
    pub fn read_some(&mut self, max: usize, timeout: Option<Duration>) -> Result<ReadOutcome> {
        if !self.link.partial {
            return self.read_chunk(max, timeout);
        }
        if max == 0 {
            return Ok(ReadOutcome::End);
        }
        let max = max.min(u32::MAX as usize);
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut posted = false;
        loop {
            if !self.buffer.is_empty() {
                let data = self.buffer.take(max);
                self.post(max, None, Want::Some)?;
                return Ok(ReadOutcome::Data(data));
            }
            if self.ended {
                return Ok(ReadOutcome::End);
            }
            if self.in_flight.is_none() {
                self.post(max, timeout, Want::Some)?;
                posted = true;
            }
            match self.await_reply(deadline)? {
                Awaited::Reply => {}
                Awaited::TimedOut if !posted => {}
                Awaited::TimedOut | Awaited::NoReply => return Ok(ReadOutcome::Timeout),
            }
        }
    }

    /// Waits for the reply to the READ in flight. A READ
    /// sent with a timeout is answered by the broker (READ_TIMEOUT at the
    /// deadline; the grace covers the trip). A read-ahead has no timeout
    /// of its own: it is waited for only until the deadline, and stays in
    /// flight.
    fn await_reply(&mut self, deadline: Option<Instant>) -> Result<Awaited> {
        let limit = match self.in_flight {
            Some(Flight { timed: true }) => deadline.map(|d| d + self.link.opts.connect_timeout),
            _ => deadline,
        };
        Ok(match self.link.recv(limit)? {
            Some(reply) => {
                if self.take_reply(reply)? {
                    Awaited::TimedOut
                } else {
                    Awaited::Reply
                }
            }
            None => Awaited::NoReply,
        })
    }

    /// Sends a READ unless one is in flight or the stream has ended.
    fn post(&mut self, size: usize, timeout: Option<Duration>, want: Want) -> Result<()> {
        if self.in_flight.is_some() || self.ended || size == 0 {
            return Ok(());
        }
        let size = size.min(u32::MAX as usize) as u32;
        let bits = if want == Want::Some && self.link.partial { PARTIAL_READ } else { 0 };
        let frame = ZpipesMsg::Read { size, timeout: ms(timeout) }.encode_ext(bits);
        self.link.send_frame(frame, self.link.opts.dead_after)?;
        self.in_flight = Some(Flight { timed: timeout.is_some() });
        Ok(())
    }

    /// Files a reply to our READ; true if it was READ_TIMEOUT.
    fn take_reply(&mut self, reply: ZpipesMsg) -> Result<bool> {
        self.in_flight = None;
        match reply {
            ZpipesMsg::ReadOk { chunk } => self.buffer.push(chunk.0),
            ZpipesMsg::ReadEnd {} => self.ended = true,
            ZpipesMsg::ReadTimeout {} => return Ok(true),
            ZpipesMsg::ReadFailed { reason } => return Err(failure(&reason)),
            ZpipesMsg::Invalid {} => return Err(Error::Invalid),
            other => return Err(Error::Protocol(other.name())),
        }
        Ok(false)
    }

    /// The limit each `std::io::Read` call waits for data (`None`: none);
    /// past it the call fails with `ErrorKind::TimedOut`.
    pub fn set_timeout(&mut self, timeout: Option<Duration>) {
        self.timeout = timeout;
    }

    /// Tells the broker this reader is alive. The client PINGs by itself
    /// while a call waits; between calls, a program idle for longer than
    /// the broker's expiry (60 s by default) should ping.
    pub fn ping(&mut self) -> Result<()> {
        // A read-ahead's answer may come first: keep it for later.
        while self.in_flight.is_some() {
            match self.link.recv(Some(Instant::now()))? {
                Some(reply) => {
                    self.take_reply(reply)?;
                }
                None => break,
            }
        }
        if self.in_flight.is_some() {
            // The broker answers PING while the READ waits: PINGing through
            // the normal wait loop would mistake the READ's reply.
            self.link.send(&ZpipesMsg::Ping {})?;
            self.link.pings += 1;
            return Ok(());
        }
        self.link.ping()
    }

    /// Closes the pipe end; data not yet read is dropped.
    pub fn close(mut self) -> Result<()> {
        self.closed = true;
        self.link.close()
    }
}

/// Returns what is already buffered at once; otherwise waits for the
/// read-ahead, or sends one READ for `min(buf.len(), max_read)` bytes.
/// A broker that grants partial READs answers it as soon as any bytes are
/// there; the original answers only when that many bytes are there (or
/// the writer has gone): then give it large buffers, or small ones for
/// interactive streams.
impl io::Read for Reader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let want = buf.len().min(self.link.opts.max_read);
        let deadline = self.timeout.map(|t| Instant::now() + t);
        while self.buffer.is_empty() && !self.ended {
            if self.in_flight.is_none() {
                self.post(want, self.timeout, Want::Some)?;
            }
            if !matches!(self.await_reply(deadline)?, Awaited::Reply) {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "no data arrived in time"));
            }
        }
        let data = self.buffer.take(buf.len());
        buf[..data.len()].copy_from_slice(&data);
        if self.timeout.is_none() && self.link.opts.read_ahead {
            self.post(want, None, Want::Some)?;
        }
        Ok(data.len())
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        if !self.closed {
            let _ = self.link.close();
        }
    }
}

/// The writing end of a named pipe.
pub struct Writer {
    link: Link,
    /// Bytes gathered by `std::io::Write` and not yet sent.
    buffer: Vec<u8>,
    /// Sizes of the WRITEs sent through `std::io::Write` and not yet
    /// acknowledged, oldest first.
    in_flight: VecDeque<usize>,
    /// A failure met after `std::io::Write` had accepted the bytes,
    /// reported by the next call.
    failed: Option<Error>,
    attach_timeout: Option<Duration>,
    attached: bool,
    closed: bool,
}

impl Writer {
    /// Opens `pipe` for writing. Fails with [`Error::Busy`] if it already has
    /// a writer.
    pub fn open(pipe: &str, opts: &Options) -> Result<Writer> {
        Ok(Writer {
            link: Link::open(opts, pipe, false)?,
            buffer: Vec::new(),
            in_flight: VecDeque::new(),
            failed: None,
            attach_timeout: None,
            attached: false,
            closed: false,
        })
    }

    /// Writes one chunk, waiting at most `timeout` (`None`: no limit) for a
    /// reader and for room in the pipe. Sends and settles anything written
    /// through `std::io::Write` first, so the stream stays in order.
    pub fn write_chunk(&mut self, data: &[u8], timeout: Option<Duration>) -> Result<WriteOutcome> {
        self.settle()?;
        let len = data.len();
        if u32::try_from(len).is_err() {
            return Err(Error::TooLarge(len));
        }
        let chunk = Chunk(Bytes::copy_from_slice(data));
        self.link.send(&ZpipesMsg::Write { chunk, timeout: ms(timeout) })?;
        let outcome = self.ack()?;
        if outcome == WriteOutcome::Written {
            self.attached = true;
        }
        Ok(outcome)
    }

    /// Waits until a reader is attached (an empty WRITE, acknowledged once a
    /// reader is there). False if none came within `timeout`.
    pub fn wait_for_reader(&mut self, timeout: Option<Duration>) -> Result<bool> {
        Ok(self.write_chunk(&[], timeout)? == WriteOutcome::Written)
    }

    /// How long `std::io::Write` waits for a reader before its first write
    /// fails with `ErrorKind::TimedOut` (`None`: no limit). Later writes
    /// wait for room as long as the reader lives.
    pub fn set_attach_timeout(&mut self, timeout: Option<Duration>) {
        self.attach_timeout = timeout;
    }

    /// Tells the broker this writer is alive (see [`Reader::ping`]).
    pub fn ping(&mut self) -> Result<()> {
        self.settle()?;
        self.link.ping()
    }

    /// Sends what is buffered, waits for every acknowledgement, then closes
    /// the pipe end. The reader can still read everything written.
    pub fn close(mut self) -> Result<()> {
        self.closed = true;
        self.settle()?;
        self.link.close()
    }

    fn ack(&mut self) -> Result<WriteOutcome> {
        match self.link.reply()? {
            ZpipesMsg::WriteOk {} => Ok(WriteOutcome::Written),
            ZpipesMsg::WriteTimeout {} => Ok(WriteOutcome::Timeout),
            ZpipesMsg::WriteFailed { reason } => Err(failure(&reason)),
            ZpipesMsg::Invalid {} => Err(Error::Invalid),
            other => Err(Error::Protocol(other.name())),
        }
    }

    /// Collects acknowledgements until at most `max` writes, and at most
    /// `max_bytes`, are in flight. A failure is returned at once; the
    /// replies of the writes after it are collected by later calls (they
    /// fail too: the broker cuts a failed writer off from its pipe).
    fn collect(&mut self, max: usize, max_bytes: usize) -> Result<()> {
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        while self.in_flight.len() > max || self.in_flight.iter().sum::<usize>() > max_bytes {
            let outcome = self.ack();
            self.in_flight.pop_front();
            match outcome? {
                WriteOutcome::Written => {}
                // Pipelined writes carry no timeout, so this cannot happen.
                WriteOutcome::Timeout => return Err(Error::Protocol("WriteTimeout")),
            }
        }
        Ok(())
    }

    /// Sends what `std::io::Write` has gathered as one pipelined WRITE,
    /// without waiting for its acknowledgement (use it when the stream
    /// pauses; `flush` also waits).
    pub fn send_gathered(&mut self) -> Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        // Stay within what the broker queues behind a pending request
        // (4 MiB at the least), so a pipelined WRITE is never refused.
        let room = IN_FLIGHT_BYTES.saturating_sub(self.buffer.len());
        self.collect(self.link.opts.window.max(1) - 1, room)?;
        let chunk = Chunk(Bytes::from(std::mem::take(&mut self.buffer)));
        let len = chunk.0.len();
        // No timeout: a reader is attached, and a timeout could leave a
        // hole in the stream.
        self.link.send(&ZpipesMsg::Write { chunk, timeout: 0 })?;
        self.in_flight.push_back(len);
        Ok(())
    }

    /// Sends what is buffered and waits for every acknowledgement.
    fn settle(&mut self) -> Result<()> {
        self.send_gathered()?;
        self.collect(0, 0)
    }
}

/// Small writes are gathered into chunks of up to [`Options::max_chunk`]
/// bytes, and chunks are pipelined: up to [`Options::window`] travel
/// before the first acknowledgement is awaited. A failure surfaces on a
/// later call. [`io::Write::flush`] sends what is gathered and waits for
/// every acknowledgement: call it when the stream pauses. The first write
/// waits for a reader (see [`Writer::set_attach_timeout`]).
impl io::Write for Writer {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if !self.attached && !self.wait_for_reader(self.attach_timeout)? {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "no reader attached in time"));
        }
        if let Some(e) = self.failed.take() {
            return Err(e.into());
        }
        let max = self.link.opts.max_chunk.clamp(1, IN_FLIGHT_BYTES);
        if self.buffer.capacity() == 0 {
            self.buffer.reserve_exact(max);
        }
        let n = buf.len().min(max - self.buffer.len());
        self.buffer.extend_from_slice(&buf[..n]);
        // A full chunk goes out at once. The bytes are accepted either way:
        // a failure is kept for the next call, so that a caller retrying
        // this one never sends them twice.
        if self.buffer.len() >= max {
            if let Err(e) = self.send_gathered() {
                self.failed = Some(e);
            }
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(self.settle()?)
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        if !self.closed {
            // Like BufWriter: deliver what was written; errors have no one
            // to go to. Call close() to see them.
            let _ = self.settle();
            let _ = self.link.close();
        }
    }
}
