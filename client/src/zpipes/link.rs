//! The socket to the broker: connection and handshake, the disconnect
//! monitor, heartbeats, and request/reply with PING_OK filtered out.

use super::{Error, Options, Result};
use crate::codec::ShortStr;
use crate::zpipes_msg::PARTIAL_READ;
use crate::ZpipesMsg;
use bytes::Bytes;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use zmq::SocketEvent::{
    CONNECTED, CONNECT_RETRIED, DISCONNECTED, HANDSHAKE_FAILED_AUTH, HANDSHAKE_FAILED_NO_DETAIL,
    HANDSHAKE_FAILED_PROTOCOL, HANDSHAKE_SUCCEEDED,
};

/// Frames at least this large are sent without a copy (see `send_frame`).
const ZERO_COPY_FROM: usize = 64 << 10;

/// A received frame, shared as `Bytes` without a copy.
struct Frame(zmq::Message);
impl AsRef<[u8]> for Frame {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// One ZeroMQ context for every client in the process.
pub(super) fn context() -> &'static zmq::Context {
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

pub(super) fn ms(timeout: Option<Duration>) -> u32 {
    match timeout {
        None => 0,
        // 0 means "no limit" on the wire; the shortest real limit is 1 ms.
        Some(t) => t.as_millis().clamp(1, u32::MAX as u128) as u32,
    }
}

/// The socket to the broker, its disconnect monitor and the heartbeat.
pub(super) struct Link {
    pub(super) socket: zmq::Socket,
    pub(super) monitor: zmq::Socket,
    pub(super) opts: Options,
    pub(super) monitor_endpoint: String,
    /// PINGs sent and not yet answered.
    pub(super) pings: usize,
    pub(super) last_heard: Instant,
    /// When we last sent anything: the broker's expiry counts from there.
    pub(super) last_sent: Instant,
    /// The monitor saw the connection drop (the broker died or restarted).
    pub(super) dropped: bool,
    /// The broker granted partial READs (a PING_OK carrying the bit).
    pub(super) partial: bool,
}

impl Link {
    pub(super) fn connect(opts: &Options) -> Result<Link> {
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
    pub(super) fn watch(&mut self, events: &[zmq::SocketEvent]) -> Result<()> {
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
    pub(super) fn await_handshake(&mut self) -> Result<()> {
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
    pub(super) fn monitor_event(&mut self) -> Result<Option<u16>> {
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

    pub(super) fn gone(&self, why: &'static str) -> Error {
        Error::BrokerGone { endpoint: self.opts.endpoint.clone(), why }
    }

    pub(super) fn send(&mut self, msg: &ZpipesMsg) -> Result<()> {
        self.send_within(msg, self.opts.dead_after)
    }

    /// Sends, waiting at most `wait` for a connection to send on (in
    /// immediate mode a message is never queued without one).
    pub(super) fn send_within(&mut self, msg: &ZpipesMsg, wait: Duration) -> Result<()> {
        self.send_frame(msg.encode(), wait)
    }

    /// Sends an encoded frame (see `send_within`).
    pub(super) fn send_frame(&mut self, frame: Vec<u8>, wait: Duration) -> Result<()> {
        self.last_sent = Instant::now();
        // A large frame is handed to libzmq without a copy, which a send
        // that would block drops: check for room first. A small one is
        // copied (cheaper than asking), so a blocked send leaves it here.
        if frame.len() >= ZERO_COPY_FROM {
            if !matches!(self.socket.get_events(), Ok(events) if events.contains(zmq::POLLOUT)) {
                self.await_room(wait)?;
            }
            return match self.socket.send(frame, zmq::DONTWAIT) {
                Ok(()) => Ok(()),
                // There was room a moment ago: only a dropped connection
                // takes it away (this thread is the socket's only sender).
                Err(zmq::Error::EAGAIN) => Err(self.gone("the connection dropped")),
                Err(e) => Err(e.into()),
            };
        }
        match self.socket.send(&frame[..], zmq::DONTWAIT) {
            Ok(()) => Ok(()),
            Err(zmq::Error::EAGAIN) => {
                self.await_room(wait)?;
                self.socket.send(frame, zmq::DONTWAIT)?;
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Waits at most `wait` until a frame can be sent (in immediate mode,
    /// until there is a connection to send on).
    fn await_room(&mut self, wait: Duration) -> Result<()> {
        while self.monitor_event()?.is_some() {}
        if self.dropped {
            return Err(self.gone("the connection dropped"));
        }
        if self.socket.poll(zmq::POLLOUT, wait.as_millis() as i64)? == 0 {
            return Err(self.gone("no connection to send on"));
        }
        Ok(())
    }

    /// The next frame if one is already there.
    pub(super) fn try_recv(&mut self) -> Result<Option<ZpipesMsg>> {
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
    pub(super) fn recv(&mut self, deadline: Option<Instant>) -> Result<Option<ZpipesMsg>> {
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
    pub(super) fn wait(&mut self, limit: Duration) -> Result<()> {
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
    pub(super) fn reply(&mut self) -> Result<ZpipesMsg> {
        Ok(self.recv(None)?.expect("no deadline"))
    }

    /// Opens a pipe end with INPUT or OUTPUT.
    pub(super) fn open(opts: &Options, pipe: &str, reader: bool) -> Result<Link> {
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
    pub(super) fn ping(&mut self) -> Result<()> {
        self.ping_offering(0)
    }

    /// A PING offering extension `bits` (none: the original PING); what
    /// the PING_OK grants is noted by `try_recv`.
    pub(super) fn ping_offering(&mut self, bits: u8) -> Result<()> {
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
    pub(super) fn close(&mut self) -> Result<()> {
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
