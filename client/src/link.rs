//! One connection to a broker, for every client: the DEALER socket set up
//! one way, the monitor that reports what becomes of its connection, CURVE,
//! the wait for the ZMTP handshake, disconnect detection, the heartbeat's
//! clock, and a `poll` that a signal does not break.
//!
//! The protocols sit on top in their own modules: `zpipes/link.rs` (PING
//! and its capability bits, INPUT/OUTPUT/CLOSE) and `filemq/link.rs`
//! (KTHXBAI; HUGZ in the session). Where they need the link to behave
//! differently, [`Options`] says how.

/// Frames at least this large are sent without a copy (see `Link::send`).
const ZERO_COPY_FROM: usize = 64 << 10;

use crate::curve::{self, ClientKeys};
use bytes::Bytes;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use zmq::SocketEvent::{
    CLOSED, CONNECTED, CONNECT_RETRIED, DISCONNECTED, HANDSHAKE_FAILED_AUTH, HANDSHAKE_FAILED_NO_DETAIL,
    HANDSHAKE_FAILED_PROTOCOL, HANDSHAKE_SUCCEEDED,
};

/// One ZeroMQ context for the clients of a process that need none of
/// their own (a FILEMQ subscriber has its own: dropping it waits for the
/// goodbye to leave).
pub(crate) fn context() -> &'static zmq::Context {
    static CONTEXT: OnceLock<zmq::Context> = OnceLock::new();
    CONTEXT.get_or_init(zmq::Context::new)
}

/// `zmq::poll` for at most `timeout` (at least 1 ms), where a signal's
/// interruption (EINTR) counts as a wake-up with nothing to do: callers
/// loop and re-check.
pub(crate) fn poll(items: &mut [zmq::PollItem], timeout: Duration) -> zmq::Result<()> {
    match zmq::poll(items, timeout.as_millis().clamp(1, i64::MAX as u128) as i64) {
        Ok(_) | Err(zmq::Error::EINTR) => Ok(()),
        Err(e) => Err(e),
    }
}

pub(crate) type Result<T> = std::result::Result<T, Error>;

/// How a wait for a broker ended without one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Seen {
    /// Nothing answered in time.
    Silence,
    /// Nothing listens there: the connection was refused.
    Refused,
    /// The peer closed the connection before the handshake completed.
    Closed,
    /// The handshake failed: keys refused, or a peer that speaks otherwise.
    Failed,
}

impl Seen {
    fn at(self, endpoint: &str) -> String {
        match self {
            Seen::Silence | Seen::Failed => format!("no server answered at {endpoint}"),
            Seen::Refused => format!("nothing listens at {endpoint}"),
            Seen::Closed => format!("{endpoint} closed the connection"),
        }
    }
}

/// Why there is no link, or no more. Each protocol words the first two its
/// own way (ZPIPES: "no broker answers at …"); these are FILEMQ's words.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    /// No broker at the endpoint; `seen` says how that showed.
    #[error("{}", .seen.at(.endpoint))]
    NoBroker { endpoint: String, seen: Seen },
    /// A peer is there but the handshake failed or never completed: with
    /// CURVE, a wrong server key or a client key the broker does not allow;
    /// without, a broker that requires CURVE. `hint` says which.
    #[error("{}: {hint}", .seen.at(.endpoint))]
    Handshake { endpoint: String, seen: Seen, hint: &'static str },
    /// The stop socket had a message while we waited for the handshake.
    #[error("stopped")]
    Stopped,
    /// libzmq refused the endpoint.
    #[error("cannot connect to {endpoint}: {source}")]
    Connect {
        endpoint: String,
        #[source]
        source: zmq::Error,
    },
    /// ZeroMQ failed locally.
    #[error("ZeroMQ: {0}")]
    Zmq(#[from] zmq::Error),
    /// The connection was up and is no more, or cannot carry a message.
    #[error("lost the broker at {endpoint}: {why}")]
    BrokerGone { endpoint: String, why: &'static str },
}

/// How a link is set up, and what its handshake wait makes of failures.
pub(crate) struct Options<'a> {
    pub endpoint: &'a str,
    /// Speak CURVE with these keys.
    pub curve: Option<&'a ClientKeys>,
    /// How long closing the socket waits for what is still unsent.
    pub linger: Duration,
    /// Let libzmq reconnect by itself after a drop. `false`: never
    /// (`ZMQ_RECONNECT_IVL` -1), so a dropped connection ends the link.
    pub reconnect: bool,
    /// What a peer can make us hold: `(largest frame, frames queued)`
    /// (`ZMQ_MAXMSGSIZE`, `ZMQ_RCVHWM`). A larger frame drops the
    /// connection (libzmq refuses it before buffering it); a full queue
    /// holds the peer back. `None`: libzmq's defaults.
    pub intake: Option<(i64, i32)>,
    /// How long to wait for a connection.
    pub patience: Duration,
    /// Once connected, how long the handshake may take (a busy peer).
    pub handshake_patience: Duration,
    /// A message on this socket ends the wait with [`Error::Stopped`].
    pub stop: Option<&'a zmq::Socket>,
}

/// The hint to give if a failed handshake wait is put down to keys (given
/// or not); `None`: there is no broker. Keys are suspected only once a
/// connection is up: before that the broker is simply not there, whatever
/// the keys. A connection closed or failed during the handshake is keys (or
/// their absence). One rule for every client.
fn keys_hint(seen: Seen, connected: bool, keys: bool) -> Option<&'static str> {
    let keys_hint = if keys { curve::HINT } else { curve::HINT_NO_KEYS };
    match seen {
        Seen::Failed | Seen::Closed => Some(keys_hint),
        Seen::Silence | Seen::Refused => (keys && connected).then_some(curve::HINT),
    }
}

/// What woke a [`Link::wait`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct Woke {
    /// A frame is there to read.
    pub frames: bool,
    /// The stop socket has a message.
    pub stop: bool,
}

/// Fresh names for monitor endpoints (inproc names are per context, and
/// the process-wide context is shared).
static MONITORS: AtomicU64 = AtomicU64::new(0);

fn event_mask(events: &[zmq::SocketEvent]) -> i32 {
    events.iter().fold(0, |all, e| all | e.to_raw()) as i32
}

/// A received frame, shared as `Bytes` without a copy.
struct Frame(zmq::Message);
impl AsRef<[u8]> for Frame {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// A DEALER connected to one broker, and its disconnect monitor.
pub(crate) struct Link {
    pub socket: zmq::Socket,
    /// Reports DISCONNECTED once the handshake is done.
    monitor: zmq::Socket,
    context: zmq::Context,
    endpoint: String,
    /// The monitor saw the connection drop.
    dropped: bool,
    /// Closing must not cut off what was sent last (a goodbye).
    leaving: bool,
}

impl Link {
    /// Connects and waits for the ZMTP handshake (see [`Options`]).
    pub fn connect(context: &zmq::Context, opts: &Options<'_>) -> Result<Link> {
        let socket = context.socket(zmq::DEALER)?;
        // Queue nothing until a broker is really there, so a message goes
        // to the connection we watch, and "no broker" shows at once instead
        // of as a request that waits for ever.
        socket.set_immediate(true)?;
        socket.set_linger(opts.linger.as_millis().min(i32::MAX as u128) as i32)?;
        if !opts.reconnect {
            socket.set_reconnect_ivl(-1)?;
        }
        if let Some((max_frame, queued)) = opts.intake {
            socket.set_maxmsgsize(max_frame)?;
            socket.set_rcvhwm(queued)?;
        }
        let mut link = Link {
            monitor: context.socket(zmq::PAIR)?,
            socket,
            context: context.clone(),
            endpoint: opts.endpoint.to_string(),
            dropped: false,
            leaving: false,
        };
        link.watch(&[
            CONNECTED,
            CONNECT_RETRIED,
            CLOSED,
            HANDSHAKE_SUCCEEDED,
            HANDSHAKE_FAILED_NO_DETAIL,
            HANDSHAKE_FAILED_PROTOCOL,
            HANDSHAKE_FAILED_AUTH,
            DISCONNECTED,
        ])?;
        if let Some(keys) = opts.curve {
            keys.apply(&link.socket)?;
        }
        link.socket
            .connect(opts.endpoint)
            .map_err(|source| Error::Connect { endpoint: opts.endpoint.to_string(), source })?;
        link.await_handshake(opts)?;
        // From now on only a drop matters. Events nobody reads would pile
        // up (a reconnecting socket reports a retry every 100 ms) and
        // libzmq sends them blocking, from its I/O thread.
        link.watch(&[DISCONNECTED])?;
        Ok(link)
    }

    /// Points the socket's monitor at a fresh endpoint for `events` (which
    /// stops the previous one) and listens there.
    fn watch(&mut self, events: &[zmq::SocketEvent]) -> Result<()> {
        let endpoint = format!(
            "inproc://zbroker-client-monitor-{}-{}",
            std::process::id(),
            MONITORS.fetch_add(1, Ordering::Relaxed)
        );
        self.socket.monitor(&endpoint, event_mask(events))?;
        if !events.is_empty() {
            let monitor = self.context.socket(zmq::PAIR)?;
            monitor.set_linger(0)?;
            monitor.connect(&endpoint)?;
            self.monitor = monitor;
        }
        Ok(())
    }

    /// Waits for the connection's handshake. A refused connection is "no
    /// broker" at once; a connection that is up but slow to greet gets
    /// `handshake_patience`. A failed handshake ends the wait at once, with
    /// a hint: libzmq would retry it for ever.
    fn await_handshake(&mut self, opts: &Options<'_>) -> Result<()> {
        let mut deadline = Instant::now() + opts.patience;
        let mut connected = false;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(self.no_handshake(opts, Seen::Silence, connected));
            }
            let monitor = self.monitor.as_poll_item(zmq::POLLIN);
            let stopped = match opts.stop {
                Some(stop) => {
                    let mut items = [monitor, stop.as_poll_item(zmq::POLLIN)];
                    poll(&mut items, left)?;
                    items[1].is_readable()
                }
                None => {
                    poll(&mut [monitor], left)?;
                    false
                }
            };
            if stopped {
                return Err(Error::Stopped);
            }
            let seen = match self.monitor_event()? {
                Some(e) if e == HANDSHAKE_SUCCEEDED.to_raw() => return Ok(()),
                // Without reconnection a failed attempt closes its socket
                // (CLOSED) and is not retried; with it, CONNECT_RETRIED
                // follows. Either way nothing listens there.
                Some(e) if e == CONNECT_RETRIED.to_raw() || e == CLOSED.to_raw() => Seen::Refused,
                Some(e) if e == CONNECTED.to_raw() => {
                    if !connected {
                        connected = true;
                        deadline = Instant::now() + opts.handshake_patience;
                    }
                    continue;
                }
                Some(e)
                    if e == HANDSHAKE_FAILED_NO_DETAIL.to_raw()
                        || e == HANDSHAKE_FAILED_PROTOCOL.to_raw()
                        || e == HANDSHAKE_FAILED_AUTH.to_raw() =>
                {
                    Seen::Failed
                }
                Some(e) if e == DISCONNECTED.to_raw() => Seen::Closed,
                _ => continue,
            };
            return Err(self.no_handshake(opts, seen, connected));
        }
    }

    /// "No broker" or "handshake failed, check the keys" (see `keys_hint`).
    fn no_handshake(&self, opts: &Options<'_>, seen: Seen, connected: bool) -> Error {
        let endpoint = self.endpoint.clone();
        match keys_hint(seen, connected, opts.curve.is_some()) {
            Some(hint) => Error::Handshake { endpoint, seen, hint },
            None => Error::NoBroker { endpoint, seen },
        }
    }

    /// Reads one event from the monitor (its kind) if there is one, noting
    /// a drop.
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

    /// The monitor saw the connection drop (frames received before it may
    /// still wait to be read).
    pub fn dropped(&self) -> bool {
        self.dropped
    }

    pub fn gone(&self, why: &'static str) -> Error {
        Error::BrokerGone { endpoint: self.endpoint.clone(), why }
    }

    /// Sends a frame, waiting at most `wait` for a connection to send on
    /// (in immediate mode no room means no connection, or a broker that
    /// stopped reading). A connection seen to drop fails at once.
    pub fn send(&mut self, frame: Vec<u8>, wait: Duration) -> Result<()> {
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
        if self.socket.poll(zmq::POLLOUT, wait.as_millis().max(1) as i64)? == 0 {
            return Err(self.gone("no connection to send on"));
        }
        Ok(())
    }

    /// The next frame if one is already there.
    pub fn try_recv(&mut self) -> zmq::Result<Option<Bytes>> {
        match self.socket.recv_msg(zmq::DONTWAIT) {
            Ok(frame) => Ok(Some(Bytes::from_owner(Frame(frame)))),
            Err(zmq::Error::EAGAIN | zmq::Error::EINTR) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Waits up to `limit` for a frame, a monitor event (read at once) or
    /// a message on `stop`.
    pub fn wait(&mut self, limit: Duration, stop: Option<&zmq::Socket>) -> Result<Woke> {
        let socket = self.socket.as_poll_item(zmq::POLLIN);
        let monitor = self.monitor.as_poll_item(zmq::POLLIN);
        let (frames, events, stop) = match stop {
            Some(stop) => {
                let mut items = [socket, monitor, stop.as_poll_item(zmq::POLLIN)];
                poll(&mut items, limit)?;
                (items[0].is_readable(), items[1].is_readable(), items[2].is_readable())
            }
            None => {
                let mut items = [socket, monitor];
                poll(&mut items, limit)?;
                (items[0].is_readable(), items[1].is_readable(), false)
            }
        };
        if events && !stop {
            while self.monitor_event()?.is_some() {}
        }
        Ok(Woke { frames, stop })
    }

    /// Waits up to `limit` for a frame; fails if the connection dropped and
    /// nothing is left to read.
    pub fn wait_frame(&mut self, limit: Duration) -> Result<()> {
        let woke = self.wait(limit, None)?;
        if self.dropped && !woke.frames {
            return Err(self.gone("the connection dropped"));
        }
        Ok(())
    }

    /// Closing the socket waits up to `linger` for what was sent last (a
    /// goodbye) and leaves the connection to it.
    pub fn linger_on_close(&mut self, linger: Duration) {
        self.leaving = true;
        let _ = self.socket.set_linger(linger.as_millis().min(i32::MAX as u128) as i32);
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        // Stop the monitor before its reader goes: libzmq sends monitor
        // events blocking, and an event for a closed reader would stall the
        // I/O thread (which every client of a shared context shares).
        let _ = self.watch(&[]);
        if !self.leaving {
            let _ = self.socket.disconnect(&self.endpoint);
        }
    }
}

/// When a ping is due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PingWhen {
    /// `every` after the last ping, whatever came (ZPIPES, where every
    /// message counts as one: the broker's expiry counts from our last).
    Unpinged,
    /// `every` after the later of the last ping and the last word from the
    /// peer (FILEMQ: a peer that talks needs no HUGZ).
    Quiet,
}

/// The heartbeat's clock: when we last heard from the peer and last pinged
/// it, and what follows.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Heartbeat {
    every: Duration,
    when: PingWhen,
    last_heard: Instant,
    last_ping: Instant,
}

impl Heartbeat {
    pub fn new(every: Duration, when: PingWhen) -> Heartbeat {
        let now = Instant::now();
        Heartbeat { every, when, last_heard: now, last_ping: now }
    }

    /// The peer said something that counts as a sign of life.
    pub fn heard(&mut self, at: Instant) {
        self.last_heard = at;
    }

    /// We sent something that counts as a ping.
    pub fn pinged(&mut self, at: Instant) {
        self.last_ping = at;
    }

    pub fn ping_due(&self) -> Instant {
        match self.when {
            PingWhen::Unpinged => self.last_ping + self.every,
            PingWhen::Quiet => self.last_ping.max(self.last_heard) + self.every,
        }
    }

    /// When a peer that stays silent counts as gone.
    pub fn dead_at(&self, after: Duration) -> Instant {
        self.last_heard + after
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn options(endpoint: &str, reconnect: bool) -> Options<'_> {
        Options {
            endpoint,
            curve: None,
            linger: Duration::ZERO,
            reconnect,
            intake: None,
            patience: Duration::from_secs(5),
            handshake_patience: Duration::from_secs(5),
            stop: None,
        }
    }

    fn unique_ipc() -> String {
        static N: AtomicU64 = AtomicU64::new(0);
        format!("ipc://@/zbroker-link-test/{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
    }

    #[test]
    fn keys_are_blamed_only_once_a_connection_is_up() {
        use Seen::*;
        let (hint, none) = (Some(curve::HINT), Some(curve::HINT_NO_KEYS));
        // (seen, connected, keys) → hint
        let table = [
            (Silence, false, false, None),
            (Silence, false, true, None),
            (Silence, true, false, None),
            (Silence, true, true, hint),
            (Refused, false, true, None),
            (Refused, true, true, hint),
            (Closed, true, false, none),
            (Closed, true, true, hint),
            (Failed, true, false, none),
            (Failed, true, true, hint),
        ];
        for (seen, connected, keys, expected) in table {
            let case = format!("{seen:?} connected={connected} keys={keys}");
            assert_eq!(keys_hint(seen, connected, keys), expected, "{case}");
        }
    }

    #[test]
    fn nothing_listening_is_seen_at_once_with_or_without_reconnection() {
        for reconnect in [true, false] {
            let endpoint = unique_ipc();
            let started = Instant::now();
            let e = Link::connect(context(), &options(&endpoint, reconnect)).err().expect("nothing listens");
            assert!(matches!(&e, Error::NoBroker { seen: Seen::Refused, .. }), "reconnect={reconnect}: {e}");
            assert_eq!(e.to_string(), format!("nothing listens at {endpoint}"));
            assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
        }
    }

    #[test]
    fn a_silent_peer_gets_the_handshake_patience_and_a_stop_ends_the_wait() {
        // A TCP listener that accepts (in the kernel) and never speaks ZMTP.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("tcp://{}", listener.local_addr().unwrap());
        let mut opts = options(&endpoint, false);
        opts.patience = Duration::from_secs(5);
        opts.handshake_patience = Duration::from_millis(300);
        let started = Instant::now();
        let e = Link::connect(context(), &opts).err().expect("no handshake");
        assert!(matches!(e, Error::NoBroker { seen: Seen::Silence, .. }), "{e}");
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(300) && took < Duration::from_secs(3), "took {took:?}");

        let stop_in = context().socket(zmq::PAIR).unwrap();
        let stop_name =
            format!("inproc://zbroker-link-test-stop-{}", MONITORS.fetch_add(1, Ordering::Relaxed));
        stop_in.bind(&stop_name).unwrap();
        let stop_out = context().socket(zmq::PAIR).unwrap();
        stop_out.connect(&stop_name).unwrap();
        stop_out.send("stop", 0).unwrap();
        opts.handshake_patience = Duration::from_secs(5);
        opts.stop = Some(&stop_in);
        let started = Instant::now();
        let e = Link::connect(context(), &opts).err().expect("stopped");
        assert!(matches!(e, Error::Stopped), "{e}");
        assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
    }

    #[test]
    fn pings_are_due_by_each_clients_rule() {
        let every = Duration::from_secs(1);
        let mut zpipes = Heartbeat::new(every, PingWhen::Unpinged);
        let mut filemq = Heartbeat::new(every, PingWhen::Quiet);
        let t0 = Instant::now();
        for beat in [&mut zpipes, &mut filemq] {
            beat.pinged(t0);
            beat.heard(t0 + Duration::from_millis(600));
        }
        // Hearing from the broker does not reset its expiry of us.
        assert_eq!(zpipes.ping_due(), t0 + every);
        // A FILEMQ server that talks needs no HUGZ.
        assert_eq!(filemq.ping_due(), t0 + Duration::from_millis(1600));
        assert_eq!(filemq.dead_at(Duration::from_secs(5)), t0 + Duration::from_millis(5600));
    }
}
