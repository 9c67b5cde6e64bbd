//! One connection to the server: a DEALER socket and the monitor that tells
//! us when it drops. A new session gets a new `Link` (and a new routing id
//! at the server), never a reused socket: the socket itself never
//! reconnects (`ZMQ_RECONNECT_IVL` -1), so a session never goes on, unaware,
//! over a connection the server does not know.

use bytes::Bytes;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use zbroker_proto::FilemqMsg;
use zmq::SocketEvent::{
    CLOSED, CONNECTED, CONNECT_RETRIED, DISCONNECTED, HANDSHAKE_FAILED_AUTH, HANDSHAKE_FAILED_NO_DETAIL,
    HANDSHAKE_FAILED_PROTOCOL, HANDSHAKE_SUCCEEDED,
};

/// How an attempt to connect ended without a link.
pub(crate) enum NoLink {
    /// Asked to stop while connecting.
    Stop,
    /// No server, or a local ZeroMQ failure; try again later.
    Failed(String),
    /// A server is there but the handshake failed (CURVE keys not
    /// accepted, or keys required); try again later, and say so.
    Handshake(String),
}

/// A received frame, shared as `Bytes` without a copy.
struct Frame(zmq::Message);
impl AsRef<[u8]> for Frame {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

pub(crate) struct Link {
    pub socket: zmq::Socket,
    /// Reports DISCONNECTED once the handshake is done.
    pub monitor: zmq::Socket,
    context: zmq::Context,
    monitor_endpoint: String,
    endpoint: String,
    /// The monitor saw the connection drop.
    pub dropped: bool,
    /// KTHXBAI is on its way: closing must not cut it off.
    leaving: bool,
}

fn event_mask(events: &[zmq::SocketEvent]) -> i32 {
    events.iter().fold(0, |all, e| all | e.to_raw()) as i32
}

/// `zmq::poll`, where an interruption by a signal counts as a wake-up with
/// nothing to do: callers loop and re-check.
pub(crate) fn poll(items: &mut [zmq::PollItem], timeout: Duration) -> zmq::Result<()> {
    match zmq::poll(items, timeout.as_millis().clamp(1, i64::MAX as u128) as i64) {
        Ok(_) | Err(zmq::Error::EINTR) => Ok(()),
        Err(e) => Err(e),
    }
}

impl Link {
    /// Connects and waits for the ZMTP handshake, at most `patience`; a
    /// message on `control` (stop) ends the wait.
    #[cfg(test)]
    pub fn connect(
        context: &zmq::Context,
        endpoint: &str,
        control: &zmq::Socket,
        patience: Duration,
    ) -> Result<Link, NoLink> {
        Self::connect_with(context, endpoint, None, control, patience, super::session::intake(8_000_000))
    }

    /// [`Link::connect`], speaking CURVE with `curve`'s keys if given, with
    /// the intake bounds `(largest frame, frames queued)`.
    pub fn connect_with(
        context: &zmq::Context,
        endpoint: &str,
        curve: Option<&crate::curve::ClientKeys>,
        control: &zmq::Socket,
        patience: Duration,
        (max_frame, queued): (i64, i32),
    ) -> Result<Link, NoLink> {
        static MONITORS: AtomicU64 = AtomicU64::new(0);
        let zmq_failed = |e: zmq::Error| NoLink::Failed(format!("ZeroMQ: {e}"));
        let socket = context.socket(zmq::DEALER).map_err(zmq_failed)?;
        // Nothing is queued before a server is there, so a message we send
        // goes to the connection we watch, and "no server" shows at once.
        socket.set_immediate(true).map_err(zmq_failed)?;
        socket.set_linger(0).map_err(zmq_failed)?;
        // A dropped connection ends the session, and the next session gets a
        // new socket: libzmq must not reconnect this one underneath us (the
        // server would see a stranger speak in the middle of a session).
        socket.set_reconnect_ivl(-1).map_err(zmq_failed)?;
        // What a server can make us hold: at most `queued` frames of at most
        // `max_frame` bytes (see `session::intake`). A bigger frame drops
        // the connection (libzmq refuses it before buffering it) and the
        // session layer makes a new one; a full queue holds the server back.
        socket.set_maxmsgsize(max_frame).map_err(zmq_failed)?;
        socket.set_rcvhwm(queued).map_err(zmq_failed)?;
        let monitor_endpoint = format!(
            "inproc://filemq-monitor-{}-{}",
            std::process::id(),
            MONITORS.fetch_add(1, Ordering::Relaxed)
        );
        socket
            .monitor(
                &monitor_endpoint,
                event_mask(&[
                    CONNECTED,
                    CONNECT_RETRIED,
                    CLOSED,
                    HANDSHAKE_SUCCEEDED,
                    HANDSHAKE_FAILED_NO_DETAIL,
                    HANDSHAKE_FAILED_PROTOCOL,
                    HANDSHAKE_FAILED_AUTH,
                    DISCONNECTED,
                ]),
            )
            .map_err(zmq_failed)?;
        let monitor = context.socket(zmq::PAIR).map_err(zmq_failed)?;
        monitor.set_linger(0).map_err(zmq_failed)?;
        monitor.connect(&monitor_endpoint).map_err(zmq_failed)?;
        let mut link = Link {
            socket,
            monitor,
            context: context.clone(),
            monitor_endpoint,
            endpoint: endpoint.to_string(),
            dropped: false,
            leaving: false,
        };
        if let Some(keys) = curve {
            keys.apply(&link.socket).map_err(zmq_failed)?;
        }
        let hint = match curve {
            Some(_) => crate::curve::HINT,
            None => crate::curve::HINT_NO_KEYS,
        };
        link.socket
            .connect(endpoint)
            .map_err(|e| NoLink::Failed(format!("cannot connect to {endpoint}: {e}")))?;
        let mut deadline = Instant::now() + patience;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(match curve {
                    Some(_) => NoLink::Handshake(format!("no server answered at {endpoint}: {hint}")),
                    None => NoLink::Failed(format!("no server answered at {endpoint}")),
                });
            }
            let mut items = [link.monitor.as_poll_item(zmq::POLLIN), control.as_poll_item(zmq::POLLIN)];
            poll(&mut items, left).map_err(zmq_failed)?;
            if items[1].is_readable() {
                return Err(NoLink::Stop);
            }
            match link.monitor_event() {
                Some(e) if e == HANDSHAKE_SUCCEEDED.to_raw() => break,
                // Without reconnection a failed attempt closes its socket
                // (CLOSED) and is not retried; CONNECT_RETRIED for libzmqs
                // that announce a retry anyway.
                Some(e) if e == CONNECT_RETRIED.to_raw() || e == CLOSED.to_raw() => {
                    return Err(NoLink::Failed(format!("nothing listens at {endpoint}")));
                }
                // Connected but not yet greeted: a busy peer gets the full
                // patience for the handshake.
                Some(e) if e == CONNECTED.to_raw() => deadline = Instant::now() + patience,
                Some(e)
                    if e == HANDSHAKE_FAILED_NO_DETAIL.to_raw()
                        || e == HANDSHAKE_FAILED_PROTOCOL.to_raw()
                        || e == HANDSHAKE_FAILED_AUTH.to_raw() =>
                {
                    return Err(NoLink::Handshake(format!("no server answered at {endpoint}: {hint}")));
                }
                Some(e) if e == DISCONNECTED.to_raw() => {
                    return Err(match curve {
                        Some(_) => NoLink::Handshake(format!("{endpoint} closed the connection: {hint}")),
                        None => NoLink::Failed(format!("{endpoint} closed the connection")),
                    });
                }
                _ => {}
            }
        }
        // From now on only a drop matters; events nobody reads would pile
        // up, and libzmq sends them blocking from its I/O thread.
        link.watch(&[DISCONNECTED]).map_err(zmq_failed)?;
        Ok(link)
    }

    /// Points the monitor at a fresh endpoint for `events` (which stops the
    /// previous one) and listens there.
    fn watch(&mut self, events: &[zmq::SocketEvent]) -> zmq::Result<()> {
        static GENERATION: AtomicU64 = AtomicU64::new(0);
        let endpoint = format!("{}-{}", self.monitor_endpoint, GENERATION.fetch_add(1, Ordering::Relaxed));
        self.socket.monitor(&endpoint, event_mask(events))?;
        if !events.is_empty() {
            let monitor = self.context.socket(zmq::PAIR)?;
            monitor.set_linger(0)?;
            monitor.connect(&endpoint)?;
            self.monitor = monitor;
        }
        Ok(())
    }

    /// Reads one monitor event (its kind) if there is one, noting a drop.
    pub fn monitor_event(&mut self) -> Option<u16> {
        let frames = self.monitor.recv_multipart(zmq::DONTWAIT).ok()?;
        let kind = frames.first().filter(|f| f.len() >= 2).map(|f| u16::from_le_bytes([f[0], f[1]]));
        if kind == Some(DISCONNECTED.to_raw()) {
            self.dropped = true;
        }
        kind
    }

    /// Sends one message, waiting at most `patience` for room.
    pub fn send(&mut self, msg: &FilemqMsg, patience: Duration) -> Result<(), String> {
        self.send_with_bits(msg, 0, patience)
    }

    /// Sends `msg` with capability bits after its fields
    /// (`filemq_ext::encode_with_bits`; none when 0).
    pub fn send_with_bits(&mut self, msg: &FilemqMsg, bits: u8, patience: Duration) -> Result<(), String> {
        let frame = zbroker_proto::filemq_ext::encode_with_bits(msg, bits);
        match self.socket.send(&frame, zmq::DONTWAIT) {
            Ok(()) => Ok(()),
            Err(zmq::Error::EAGAIN) => {
                // Immediate mode: no room means no connection, or a server
                // that stopped reading.
                match self.socket.poll(zmq::POLLOUT, patience.as_millis().max(1) as i64) {
                    Ok(n) if n > 0 => self.socket.send(frame, zmq::DONTWAIT).map_err(|e| e.to_string()),
                    _ => Err(format!("could not send {} to the server", msg.name())),
                }
            }
            Err(e) => Err(format!("sending {}: {e}", msg.name())),
        }
    }

    /// The next frame if one is there; `Err` on a socket failure.
    pub fn try_recv(&mut self) -> Result<Option<Bytes>, String> {
        match self.socket.recv_msg(zmq::DONTWAIT) {
            Ok(frame) => Ok(Some(Bytes::from_owner(Frame(frame)))),
            Err(zmq::Error::EAGAIN | zmq::Error::EINTR) => Ok(None),
            Err(e) => Err(format!("receiving: {e}")),
        }
    }

    /// Sends KTHXBAI and lets the socket linger a moment so it leaves.
    pub fn goodbye(&mut self) {
        self.leaving = true;
        let _ = self.socket.set_linger(200);
        let _ = self.socket.send(FilemqMsg::Kthxbai {}.encode(), zmq::DONTWAIT);
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        // Stop the monitor before its reader goes: libzmq sends monitor
        // events blocking, and an event for a closed reader would stall the
        // I/O thread.
        let _ = self.watch(&[]);
        if !self.leaving {
            let _ = self.socket.disconnect(&self.endpoint);
        }
    }
}
