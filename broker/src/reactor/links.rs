//! Outbound links services open (`Action::Connect`): one DEALER per link,
//! registered with mio under a token of its own, drained like the front
//! socket (its `ZMQ_FD` edge is consumed by any call on it, sends
//! included, so a link touched by a send is looked at again on the next
//! pass), and a monitor PAIR per link whose events become `Up` and `Down`.
//! Frames that cannot leave at once are parked per link, bounded by the
//! service's `max_parked`; past it the link is closed ("too slow"). Links
//! are bounded per service (`max_links`) and broker-wide (`MAX_LINKS`),
//! closed at shutdown after the services' own shutdown, and shown in the
//! status under their service.

use super::*;
use slab::Slab;
use std::collections::BTreeSet;
use zbroker_client::curve::KeyPair;
use zbroker_services::link::{HandshakeFailure, LimitOf, LinkDown, LinkEvent, LinkKey, LinkOptions};
use zmq::SocketEvent;

/// Links open at once, broker-wide: each takes two sockets of the
/// context's 1,023 and, while connected, a descriptor.
pub(super) const MAX_LINKS: usize = 256;
/// The first mio token of the links: link `slot` is `LINK_TOKENS + 2 *
/// slot` (its DEALER) and the next one (its monitor).
pub(super) const LINK_TOKENS: usize = 16;
/// Frames libzmq may hold for one link before a send parks.
const LINK_SNDHWM: i32 = 16;
/// Frames libzmq may hold from one link before the peer is held back.
const LINK_RCVHWM: i32 = 64;
/// libzmq's reconnection: first after 100 ms, backing off to 1 s.
const RECONNECT_MS: i32 = 100;
const RECONNECT_MAX_MS: i32 = 1000;
/// libzmq's code for a peer with another security mechanism.
const MECHANISM_MISMATCH: u32 = 0x1100_0002;

/// Where a link stands, as its service was last told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum State {
    /// Never up yet, and no `Down` said so.
    Connecting,
    Up,
    /// A retrying `Down` was given; libzmq reconnects.
    Down,
}

/// What a monitor event makes of a link.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Step {
    Nothing,
    Up,
    /// A `Down` that retries: the link stays.
    Down(LinkDown),
    /// A final `Down`: the link is closed.
    Fail(LinkDown),
}

/// The one rule from a monitor event (`kind`, `value`) to a link's step.
/// A failed handshake is final when retrying would not fix it (keys, a
/// mechanism mismatch, a refusal). A connection the peer closed during
/// the handshake is one of these (as for the clients): with CURVE, the
/// server could not read our HELLO (a wrong key); without, it requires
/// CURVE (libzmq reports no detail for either). A handshake that timed out
/// is a frozen peer, and retries.
pub(super) fn step(state: State, kind: u16, value: u32, endpoint: &str, curve: bool) -> Step {
    let endpoint = endpoint.to_string();
    let failed = |failure| Step::Fail(LinkDown::HandshakeFailed { endpoint: endpoint.clone(), failure });
    if kind == SocketEvent::HANDSHAKE_SUCCEEDED.to_raw() {
        return if state == State::Up { Step::Nothing } else { Step::Up };
    }
    if kind == SocketEvent::HANDSHAKE_FAILED_PROTOCOL.to_raw() {
        return failed(match value {
            MECHANISM_MISMATCH => HandshakeFailure::Mechanism,
            code => HandshakeFailure::Protocol { code },
        });
    }
    if kind == SocketEvent::HANDSHAKE_FAILED_AUTH.to_raw() {
        return failed(HandshakeFailure::Denied { status: value });
    }
    if kind == SocketEvent::HANDSHAKE_FAILED_NO_DETAIL.to_raw() && value != libc::ETIMEDOUT as u32 {
        return failed(match curve {
            true => HandshakeFailure::ClosedDuringCurve,
            false => HandshakeFailure::ClosedWithoutCurve,
        });
    }
    let lost = kind == SocketEvent::DISCONNECTED.to_raw();
    let unanswered = kind == SocketEvent::CONNECT_RETRIED.to_raw()
        || kind == SocketEvent::HANDSHAKE_FAILED_NO_DETAIL.to_raw();
    match state {
        State::Up if lost => Step::Down(LinkDown::PeerGone { endpoint }),
        State::Connecting if unanswered => Step::Down(LinkDown::Unreachable { endpoint }),
        _ => Step::Nothing,
    }
}

/// The monitor events a link listens for.
fn link_events() -> i32 {
    [
        SocketEvent::CONNECT_RETRIED,
        SocketEvent::DISCONNECTED,
        SocketEvent::HANDSHAKE_SUCCEEDED,
        SocketEvent::HANDSHAKE_FAILED_NO_DETAIL,
        SocketEvent::HANDSHAKE_FAILED_PROTOCOL,
        SocketEvent::HANDSHAKE_FAILED_AUTH,
    ]
    .iter()
    .fold(0, |all, e| all | e.to_raw()) as i32
}

/// One open link.
pub(super) struct Link {
    service: usize,
    key: LinkKey,
    /// Never reused: tells a link from a later one in the same slot.
    serial: u64,
    endpoint: String,
    socket: zmq::Socket,
    monitor: zmq::Socket,
    curve: bool,
    state: State,
    parked: VecDeque<Vec<u8>>,
    parked_bytes: usize,
    max_parked: usize,
    frames_in: u64,
    bytes_in: u64,
    frames_out: u64,
    bytes_out: u64,
    /// Frames sent while the link was not up, or parked when it went down.
    dropped: u64,
    ups: u64,
    downs: u64,
}

/// Every link of every service.
#[derive(Default)]
pub(super) struct Links {
    slots: Slab<Link>,
    by_key: HashMap<(usize, LinkKey), usize>,
    /// Links to look at on the next pass: woken, or touched by a send.
    dirty: BTreeSet<usize>,
    /// Final `Down`s found while carrying out actions, handed over on the
    /// next pass (a service is never called back from inside its actions).
    refused: VecDeque<(usize, LinkKey, LinkDown)>,
    /// The broker's own CURVE secret key (`--curve-secret-key`), if any.
    broker_secret: Option<Key>,
    /// The key pair links speak CURVE with, made once when first needed.
    own_keys: Option<KeyPair>,
    next_serial: u64,
}

impl Links {
    pub(super) fn new(broker_secret: Option<Key>) -> Links {
        Links { broker_secret, ..Links::default() }
    }

    /// The key pair of our side of CURVE links: the broker's own, else an
    /// ephemeral one made once.
    fn own_keys(&mut self) -> Result<KeyPair, ReactorError> {
        if let Some(keys) = &self.own_keys {
            return Ok(keys.clone());
        }
        let keys = match self.broker_secret {
            Some(secret) => KeyPair { public: public_of(&secret)?, secret },
            None => KeyPair::generate().map_err(|_| ReactorError::Zmq {
                doing: "making a CURVE key pair for links",
                source: zmq::Error::EINVAL,
            })?,
        };
        self.own_keys = Some(keys.clone());
        Ok(keys)
    }
}

// libzmq's own (zmq.h); `zmq-sys` declares it without exporting it.
extern "C" {
    fn zmq_curve_public(
        z85_public_key: *mut std::ffi::c_char,
        z85_secret_key: *const std::ffi::c_char,
    ) -> i32;
}

/// The public key of a CURVE secret key.
fn public_of(secret: &Key) -> Result<Key, ReactorError> {
    let secret_text = std::ffi::CString::new(curve::z85_encode(secret)).map_err(|_| ReactorError::Zmq {
        doing: "reading the broker's CURVE key",
        source: zmq::Error::EINVAL,
    })?;
    let mut public_text = [0u8; 41];
    // SAFETY: libzmq writes 40 Z85 characters and a NUL into the 41 bytes
    // given, and only reads the NUL-terminated secret.
    let rc = unsafe { zmq_curve_public(public_text.as_mut_ptr().cast(), secret_text.as_ptr()) };
    let public = std::str::from_utf8(&public_text[..40]).ok().and_then(|t| curve::z85_decode(t).ok());
    match public {
        Some(public) if rc == 0 => Ok(public),
        _ => Err(ReactorError::Zmq {
            doing: "deriving the broker's CURVE public key",
            source: zmq::Error::EINVAL,
        }),
    }
}

fn millis(d: Duration) -> i32 {
    d.as_millis().clamp(1, i32::MAX as u128) as i32
}

impl Reactor {
    /// A link's token fired: look at it on this pass.
    pub(super) fn link_woke(&mut self, token: Token) {
        if let Some(slot) = token.0.checked_sub(LINK_TOKENS) {
            self.links.dirty.insert(slot / 2);
        }
    }

    /// `Action::Connect`: opens the link (replacing the service's link with
    /// that key), or refuses it with a final `Down` on the next pass.
    pub(super) fn connect_link(
        &mut self,
        service: usize,
        key: LinkKey,
        endpoint: String,
        options: LinkOptions,
    ) {
        if let Some(slot) = self.links.by_key.get(&(service, key)).copied() {
            self.close_link(slot);
        }
        let refuse = |why| (service, key, why);
        let service_links = self.links.by_key.keys().filter(|(s, _)| *s == service).count();
        let limit = self.services[service].max_links();
        let refusal = if let Err(e) = zbroker_client::endpoint::validate(&endpoint) {
            Some(refuse(LinkDown::BadEndpoint { endpoint, why: e.to_string() }))
        } else if service_links >= limit {
            Some(refuse(LinkDown::LimitReached { limit, whose: LimitOf::Service }))
        } else if self.links.slots.len() >= MAX_LINKS {
            Some(refuse(LinkDown::LimitReached { limit: MAX_LINKS, whose: LimitOf::Broker }))
        } else {
            match self.open_link(service, key, &endpoint, &options) {
                Ok(()) => None,
                Err(e) => Some(refuse(LinkDown::BadEndpoint { endpoint, why: e.to_string() })),
            }
        };
        if let Some(refusal) = refusal {
            tracing::warn!(service = self.services[service].name(), key, "link not opened: {}", refusal.2);
            self.links.refused.push_back(refusal);
        }
    }

    fn open_link(
        &mut self,
        service: usize,
        key: LinkKey,
        endpoint: &str,
        options: &LinkOptions,
    ) -> Result<(), ReactorError> {
        let socket = self._context.socket(zmq::DEALER)?;
        socket.set_linger(0)?;
        // No queue before a connection is up: what is sent goes to the
        // connection the monitor speaks of, or is parked here, counted.
        socket.set_immediate(true)?;
        socket.set_sndhwm(LINK_SNDHWM)?;
        socket.set_rcvhwm(LINK_RCVHWM)?;
        socket.set_maxmsgsize(i64::try_from(self.services[service].max_frame()).unwrap_or(i64::MAX))?;
        socket.set_reconnect_ivl(RECONNECT_MS)?;
        socket.set_reconnect_ivl_max(RECONNECT_MAX_MS)?;
        if let Some(heartbeat) = options.heartbeat {
            socket.set_heartbeat_ivl(millis(heartbeat.interval))?;
            socket.set_heartbeat_timeout(millis(heartbeat.timeout))?;
            // The peer is told the timeout in tenths of a second, at most
            // 6,553.5 s.
            socket.set_heartbeat_ttl(millis(heartbeat.timeout).clamp(100, 6_553_500))?;
        }
        if let Some(server_key) = &options.server_key {
            let own = self.links.own_keys()?;
            curve::ClientKeys::new(*server_key, own).apply(&socket)?;
        }
        let serial = self.links.next_serial;
        self.links.next_serial += 1;
        let monitor_endpoint = format!("inproc://zbroker-link-monitor-{serial}");
        socket.monitor(&monitor_endpoint, link_events())?;
        let monitor = self._context.socket(zmq::PAIR)?;
        monitor.set_linger(0)?;
        monitor.connect(&monitor_endpoint)?;
        socket.connect(endpoint).doing("connecting a link")?;
        let link = Link {
            service,
            key,
            serial,
            endpoint: endpoint.to_string(),
            curve: options.server_key.is_some(),
            state: State::Connecting,
            parked: VecDeque::new(),
            parked_bytes: 0,
            max_parked: self.services[service].max_parked(),
            frames_in: 0,
            bytes_in: 0,
            frames_out: 0,
            bytes_out: 0,
            dropped: 0,
            ups: 0,
            downs: 0,
            socket,
            monitor,
        };
        let slot = self.links.slots.vacant_key();
        let registry = self.poll.registry();
        registry.register(
            &mut SourceFd(&zmq_fd(&link.socket)?),
            Token(LINK_TOKENS + 2 * slot),
            Interest::READABLE,
        )?;
        if let Err(e) = registry.register(
            &mut SourceFd(&zmq_fd(&link.monitor)?),
            Token(LINK_TOKENS + 2 * slot + 1),
            Interest::READABLE,
        ) {
            let _ = registry.deregister(&mut SourceFd(&zmq_fd(&link.socket)?));
            return Err(e.into());
        }
        self.links.slots.insert(link);
        self.links.by_key.insert((service, key), slot);
        self.links.dirty.insert(slot);
        tracing::debug!(service = self.services[service].name(), key, endpoint, "link opened");
        Ok(())
    }

    /// Closes a link: its sockets leave mio, then libzmq.
    fn close_link(&mut self, slot: usize) {
        let Some(link) = self.links.slots.try_remove(slot) else { return };
        self.links.by_key.remove(&(link.service, link.key));
        self.links.dirty.remove(&slot);
        let registry = self.poll.registry();
        for socket in [&link.socket, &link.monitor] {
            if let Ok(fd) = zmq_fd(socket) {
                let _ = registry.deregister(&mut SourceFd(&fd));
            }
        }
    }

    /// `Action::Disconnect`.
    pub(super) fn disconnect_link(&mut self, service: usize, key: LinkKey) {
        if let Some(slot) = self.links.by_key.get(&(service, key)).copied() {
            self.close_link(slot);
        }
    }

    /// `Action::LinkSend`: sent now, parked, or (link not up) dropped.
    pub(super) fn link_send(&mut self, service: usize, key: LinkKey, frame: Vec<u8>) {
        let Some(slot) = self.links.by_key.get(&(service, key)).copied() else {
            tracing::debug!(service = self.services[service].name(), key, "frame for no open link dropped");
            return;
        };
        self.links.dirty.insert(slot);
        let link = &mut self.links.slots[slot];
        if link.state != State::Up {
            link.dropped += 1;
            return;
        }
        if link.parked.is_empty() {
            // A slice, so an EAGAIN leaves the frame with us to park.
            match retry(|| link.socket.send(frame.as_slice(), zmq::DONTWAIT)) {
                Ok(()) => {
                    link.frames_out += 1;
                    link.bytes_out += frame.len() as u64;
                    return;
                }
                Err(zmq::Error::EAGAIN) => {}
                Err(e) => tracing::warn!(key, error = %e, "send on a link failed: parked"),
            }
        }
        let cost = frame.len() + PARKED_OVERHEAD;
        if link.parked_bytes + cost > link.max_parked {
            let why = LinkDown::TooSlow { endpoint: link.endpoint.clone(), bound: link.max_parked };
            tracing::warn!(service = self.services[service].name(), key, "link closed: {why}");
            self.close_link(slot);
            self.links.refused.push_back((service, key, why));
            return;
        }
        link.parked_bytes += cost;
        link.parked.push_back(frame);
    }

    /// Works every link that needs it: final `Down`s owed, parked frames,
    /// frames in, monitor events. True if anything moved.
    pub(super) fn work_links(&mut self) -> Result<bool, ReactorError> {
        let mut progress = false;
        while let Some((service, key, why)) = self.links.refused.pop_front() {
            self.deliver_link(service, key, LinkEvent::Down { why });
            progress = true;
        }
        let dirty: Vec<usize> = self.links.dirty.iter().copied().collect();
        for slot in dirty {
            if self.work_link(slot)? {
                progress = true;
            } else {
                self.links.dirty.remove(&slot);
            }
        }
        Ok(progress)
    }

    /// One link's turn: parked frames out, up to a batch of frames in,
    /// and, once it is read dry (so a peer's last frames come before its
    /// `Down`), its monitor's events.
    fn work_link(&mut self, slot: usize) -> Result<bool, ReactorError> {
        let Some(link) = self.links.slots.get_mut(slot) else { return Ok(false) };
        let (service, key, serial) = (link.service, link.key, link.serial);
        let alive = |links: &Links| links.slots.get(slot).is_some_and(|l| l.serial == serial);
        let mut progress = false;
        let ready = events(&link.socket)?;
        if ready.contains(zmq::POLLOUT) {
            while let Some(frame) = link.parked.pop_front() {
                match retry(|| link.socket.send(frame.as_slice(), zmq::DONTWAIT)) {
                    Ok(()) => {
                        link.parked_bytes -= frame.len() + PARKED_OVERHEAD;
                        link.frames_out += 1;
                        link.bytes_out += frame.len() as u64;
                        progress = true;
                    }
                    Err(zmq::Error::EAGAIN) => {
                        link.parked.push_front(frame);
                        break;
                    }
                    Err(e) => return Err(e).doing("sending on a link"),
                }
            }
        }
        let mut read_dry = false;
        for _ in 0..RECV_BATCH {
            let Some(link) = self.links.slots.get_mut(slot).filter(|l| l.serial == serial) else {
                return Ok(true);
            };
            let mut message = zmq::Message::new();
            match retry(|| link.socket.recv(&mut message, zmq::DONTWAIT)) {
                Ok(()) => {}
                Err(zmq::Error::EAGAIN) => {
                    read_dry = true;
                    break;
                }
                Err(e) => return Err(e).doing("receiving on a link"),
            }
            // Only the first frame of a message counts, as on the front.
            while link.socket.get_rcvmore()? {
                retry(|| link.socket.recv(&mut zmq::Message::new(), 0))?;
            }
            progress = true;
            link.frames_in += 1;
            link.bytes_in += message.len() as u64;
            // A frame proves the handshake done, whatever the monitor has
            // yet to say.
            if link.state != State::Up {
                link.state = State::Up;
                link.ups += 1;
                self.deliver_link(service, key, LinkEvent::Up);
                if !alive(&self.links) {
                    return Ok(true);
                }
            }
            self.deliver_link(service, key, LinkEvent::Frame(Bytes::from_owner(Frame(message))));
        }
        if !read_dry {
            return Ok(true);
        }
        loop {
            let Some(link) = self.links.slots.get_mut(slot).filter(|l| l.serial == serial) else {
                return Ok(true);
            };
            if !events(&link.monitor)?.contains(zmq::POLLIN) {
                break;
            }
            let event = retry(|| link.monitor.recv_msg(0))?;
            while link.monitor.get_rcvmore()? {
                retry(|| link.monitor.recv_msg(0))?;
            }
            progress = true;
            if event.len() < 6 {
                continue;
            }
            let kind = u16::from_le_bytes([event[0], event[1]]);
            let value = u32::from_le_bytes([event[2], event[3], event[4], event[5]]);
            tracing::trace!(key, kind, value, "link monitor event");
            match step(link.state, kind, value, &link.endpoint, link.curve) {
                Step::Nothing => {}
                Step::Up => {
                    link.state = State::Up;
                    link.ups += 1;
                    self.deliver_link(service, key, LinkEvent::Up);
                }
                Step::Down(why) => {
                    link.state = State::Down;
                    link.downs += 1;
                    // What waited for the old connection is not for the next.
                    link.dropped += link.parked.len() as u64;
                    link.parked.clear();
                    link.parked_bytes = 0;
                    self.deliver_link(service, key, LinkEvent::Down { why });
                }
                Step::Fail(why) => {
                    tracing::warn!(service = self.services[service].name(), key, "link closed: {why}");
                    self.close_link(slot);
                    self.deliver_link(service, key, LinkEvent::Down { why });
                }
            }
        }
        Ok(progress)
    }

    fn deliver_link(&mut self, service: usize, key: LinkKey, event: LinkEvent) {
        let began = Instant::now();
        let what = match &event {
            LinkEvent::Up => "up",
            LinkEvent::Frame(_) => "frame",
            LinkEvent::Down { .. } => "down",
        };
        self.services[service].on_link(key, event, began, &mut self.actions);
        self.apply(service);
        let name = self.services[service].name();
        self.passes.note(began.elapsed(), || format!("{name} link {key} {what}"));
    }

    /// At shutdown, after the services' own: what is parked gets a last
    /// chance, the rest of `LINGER_MS` to leave, and every link is closed.
    pub(super) fn close_links(&mut self) {
        let slots: Vec<usize> = self.links.slots.iter().map(|(slot, _)| slot).collect();
        for slot in slots {
            if let Some(link) = self.links.slots.get_mut(slot) {
                while let Some(frame) = link.parked.pop_front() {
                    if link.socket.send(frame.as_slice(), zmq::DONTWAIT).is_err() {
                        break;
                    }
                }
                let _ = link.socket.set_linger(LINGER_MS);
            }
            self.close_link(slot);
        }
    }

    /// Each service's links, under its part of `status`.
    pub(super) fn links_status(&self, status: &mut serde_json::Value) {
        status["links"] = self.links.slots.len().into();
        status["max_links"] = MAX_LINKS.into();
        for (_, link) in self.links.slots.iter() {
            let name = self.services[link.service].name();
            let entry = serde_json::json!({
                "key": link.key,
                "endpoint": link.endpoint,
                "state": match link.state {
                    State::Connecting => "connecting",
                    State::Up => "up",
                    State::Down => "down",
                },
                "curve": link.curve,
                "frames_in": link.frames_in,
                "bytes_in": link.bytes_in,
                "frames_out": link.frames_out,
                "bytes_out": link.bytes_out,
                "dropped_frames": link.dropped,
                "parked_bytes": link.parked_bytes,
                "ups": link.ups,
                "downs": link.downs,
            });
            let links = &mut status["services"][name]["links"];
            match links.as_array_mut() {
                Some(list) => list.push(entry),
                None => *links = serde_json::json!([entry]),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EP: &str = "tcp://127.0.0.1:5670";
    fn raw(event: SocketEvent) -> u16 {
        event.to_raw()
    }

    #[test]
    fn a_handshake_makes_a_link_up_once() {
        assert_eq!(step(State::Connecting, raw(SocketEvent::HANDSHAKE_SUCCEEDED), 0, EP, false), Step::Up);
        assert_eq!(step(State::Down, raw(SocketEvent::HANDSHAKE_SUCCEEDED), 0, EP, true), Step::Up);
        assert_eq!(step(State::Up, raw(SocketEvent::HANDSHAKE_SUCCEEDED), 0, EP, false), Step::Nothing);
    }

    #[test]
    fn a_lost_connection_retries_and_is_said_once() {
        let gone = step(State::Up, raw(SocketEvent::DISCONNECTED), 12, EP, false);
        assert_eq!(gone, Step::Down(LinkDown::PeerGone { endpoint: EP.into() }));
        // While down, libzmq's retries say nothing more.
        assert_eq!(step(State::Down, raw(SocketEvent::CONNECT_RETRIED), 100, EP, false), Step::Nothing);
        assert_eq!(step(State::Down, raw(SocketEvent::DISCONNECTED), 12, EP, false), Step::Nothing);
        // Never up: the first retry says nothing answers, and retries.
        let first = step(State::Connecting, raw(SocketEvent::CONNECT_RETRIED), 100, EP, false);
        let Step::Down(why) = first else { panic!("{first:?}") };
        assert!(why.retrying() && why.to_string().contains("nothing answers"), "{why}");
    }

    #[test]
    fn handshake_failures_that_keys_explain_are_final() {
        let closed = step(State::Connecting, raw(SocketEvent::HANDSHAKE_FAILED_NO_DETAIL), 32, EP, true);
        let Step::Fail(why) = closed else { panic!("{closed:?}") };
        assert!(!why.retrying());
        assert!(why.to_string().contains("wrong server key"), "{why}");
        let mismatch =
            step(State::Up, raw(SocketEvent::HANDSHAKE_FAILED_PROTOCOL), MECHANISM_MISMATCH, EP, false);
        assert!(
            matches!(
                &mismatch,
                Step::Fail(LinkDown::HandshakeFailed { failure: HandshakeFailure::Mechanism, .. })
            ),
            "{mismatch:?}"
        );
        let denied = step(State::Down, raw(SocketEvent::HANDSHAKE_FAILED_AUTH), 400, EP, true);
        assert!(
            matches!(
                &denied,
                Step::Fail(LinkDown::HandshakeFailed {
                    failure: HandshakeFailure::Denied { status: 400 },
                    ..
                })
            ),
            "{denied:?}"
        );
    }

    #[test]
    fn a_handshake_that_times_out_retries() {
        // A frozen peer lets the handshake time out: keys are not to blame.
        let timeout = libc::ETIMEDOUT as u32;
        let frozen = step(State::Down, raw(SocketEvent::HANDSHAKE_FAILED_NO_DETAIL), timeout, EP, true);
        assert_eq!(frozen, Step::Nothing);
        let first = step(State::Connecting, raw(SocketEvent::HANDSHAKE_FAILED_NO_DETAIL), timeout, EP, false);
        assert_eq!(first, Step::Down(LinkDown::Unreachable { endpoint: EP.into() }));
        // Closed by the peer without CURVE on our side: it requires it.
        let plain = step(State::Connecting, raw(SocketEvent::HANDSHAKE_FAILED_NO_DETAIL), 32, EP, false);
        let Step::Fail(why) = plain else { panic!("{plain:?}") };
        assert!(why.to_string().contains("does it require CURVE"), "{why}");
    }

    #[test]
    fn the_public_key_is_derived_from_the_secret_one() {
        let pair = KeyPair::generate().expect("a key pair");
        assert_eq!(public_of(&pair.secret).expect("derived"), pair.public);
        let mut links = Links::new(Some(pair.secret));
        assert_eq!(links.own_keys().expect("the broker's keys"), pair);
        let mut ephemeral = Links::new(None);
        let made = ephemeral.own_keys().expect("made once");
        assert_eq!(ephemeral.own_keys().expect("the same"), made, "made once, then kept");
    }
}
