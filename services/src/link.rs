//! Outbound links: connections a service asks the host to open (to another
//! broker, say), use and close. The service only names them (a
//! [`LinkKey`] of its choosing) and acts on their [`LinkEvent`]s; the host
//! owns the sockets, the handshake, heartbeats and reconnection, so the
//! service stays deterministic and runs unchanged under [`crate::sim`].
//!
//! A link's life, as the service sees it: `Action::Connect` → `Up` (the
//! peer greeted us: frames flow both ways) → `Frame`s → `Down`. A `Down`
//! whose [`LinkDown::retrying`] is true leaves the link in place: the host
//! reconnects by itself and a later `Up` follows. A final one means the
//! link is gone and its key is free. A frame sent while the link is not up
//! is dropped (and counted): send after `Up`.

use bytes::Bytes;
use std::time::Duration;

/// A link owned by one service; the service chooses what the key means
/// (as with `TimerKey`). Connecting again with a key in use replaces that
/// link, without a `Down` for the old one.
pub type LinkKey = u64;

/// A CURVE public key, 32 bytes (not Z85 text).
pub type CurveKey = [u8; 32];

/// How a link is made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkOptions {
    /// The peer's CURVE public key: speak CURVE to it. The host's own key
    /// pair is the broker's (`--curve-secret-key`) if it has one, else a
    /// key pair it makes once for all its links.
    pub server_key: Option<CurveKey>,
    /// ZMTP heartbeats, so a peer that went silent without closing the
    /// connection (a frozen host, a cut cable) is found without traffic.
    /// `None`: only a closed connection is noticed.
    pub heartbeat: Option<Heartbeat>,
}

impl Default for LinkOptions {
    fn default() -> Self {
        LinkOptions { server_key: None, heartbeat: Some(Heartbeat::default()) }
    }
}

/// ZMTP PING every `interval`; no traffic for `timeout` ends the connection
/// (`ZMQ_HEARTBEAT_IVL`, `ZMQ_HEARTBEAT_TIMEOUT`; the peer is told the same
/// timeout as `ZMQ_HEARTBEAT_TTL`). Milliseconds on the wire: at least 1 ms
/// each, at most 65 s for the timeout told to the peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heartbeat {
    pub interval: Duration,
    pub timeout: Duration,
}

impl Default for Heartbeat {
    fn default() -> Self {
        Heartbeat { interval: Duration::from_secs(1), timeout: Duration::from_secs(3) }
    }
}

/// What happened to a link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkEvent {
    /// The connection is up and greeted (handshake done, CURVE included).
    Up,
    /// A frame from the peer (at most the service's `max_frame`: a larger
    /// one makes libzmq drop the connection, a `Down` that retries).
    Frame(Bytes),
    /// The link is down: see [`LinkDown::retrying`].
    Down { why: LinkDown },
}

/// Why a link is down.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkDown {
    /// Nothing answered a connection yet (refused, or no route). Retrying.
    #[error("nothing answers at {endpoint} yet (retrying)")]
    Unreachable { endpoint: String },
    /// The connection was up and is no more: the peer closed it, died, or
    /// stayed silent past the heartbeat timeout. Retrying.
    #[error("the peer at {endpoint} went away (retrying)")]
    PeerGone { endpoint: String },
    /// The endpoint is not one the host connects to (the one check of an
    /// endpoint's form, or libzmq refused it). Final.
    #[error("endpoint refused: {why}")]
    BadEndpoint { endpoint: String, why: String },
    /// The handshake failed in a way retrying would not fix. Final.
    #[error("handshake with {endpoint} failed: {failure}")]
    HandshakeFailed { endpoint: String, failure: HandshakeFailure },
    /// The service's or the broker's bound on links is reached. Final.
    #[error("link limit reached: {limit} links {whose}")]
    LimitReached { limit: usize, whose: LimitOf },
    /// The peer took nothing while frames for it piled up past the
    /// service's `max_parked` bytes. Final.
    #[error("the peer at {endpoint} is too slow: over {bound} bytes waited for it")]
    TooSlow { endpoint: String, bound: usize },
}

impl LinkDown {
    /// Whether the host keeps the link and reconnects by itself (a later
    /// `Up` follows); otherwise the link is gone and its key is free.
    pub fn retrying(&self) -> bool {
        matches!(self, LinkDown::Unreachable { .. } | LinkDown::PeerGone { .. })
    }
}

/// Whose bound on links a `Connect` met.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitOf {
    /// The service's own `max_links`.
    Service,
    /// The broker-wide bound.
    Broker,
}

impl std::fmt::Display for LimitOf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LimitOf::Service => "for this service",
            LimitOf::Broker => "for the whole broker",
        })
    }
}

/// How a handshake failed for good.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeFailure {
    /// With CURVE, the peer closed the connection during the handshake: it
    /// could not read our HELLO (the wrong server key), or it is no CURVE
    /// server.
    #[error("the peer closed the connection during the CURVE handshake: wrong server key?")]
    ClosedDuringCurve,
    /// Without CURVE, the peer closed the connection during the handshake:
    /// it requires CURVE, or is no ZeroMQ peer.
    #[error(
        "the peer closed the connection during the handshake: does it require CURVE (no server key given)?"
    )]
    ClosedWithoutCurve,
    /// One side speaks CURVE and the other does not.
    #[error("security mismatch: one side speaks CURVE and the other does not")]
    Mechanism,
    /// The peer's authentication (ZAP) refused our key.
    #[error("the peer refused our key (status {status})")]
    Denied { status: u32 },
    /// Any other ZMTP protocol error (libzmq's code).
    #[error("ZMTP protocol error 0x{code:x}")]
    Protocol { code: u32 },
}

impl LinkEvent {
    /// The frame, for a [`LinkEvent::Frame`].
    pub fn frame(&self) -> Option<&Bytes> {
        match self {
            LinkEvent::Frame(frame) => Some(frame),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::{LinkRecord, Sim};
    use crate::{Action, ConnId, Service, TimerKey};
    use std::time::Instant;

    /// Opens link N for a frame `[N]`, sends `hello` on every link that
    /// comes up, and keeps what it was told.
    #[derive(Default)]
    struct Dialer {
        events: Vec<(LinkKey, LinkEvent)>,
    }

    impl Service for Dialer {
        fn name(&self) -> &'static str {
            "dialer"
        }
        fn signature(&self) -> u16 {
            0xAAEF
        }
        fn local_endpoint(&self, broker: &str) -> String {
            format!("ipc://@/dialer/{broker}")
        }
        fn max_frame(&self) -> usize {
            1024
        }
        fn max_parked(&self) -> usize {
            4096
        }
        fn max_links(&self) -> usize {
            2
        }
        fn handle(&mut self, _: ConnId, frame: Bytes, _: Instant, out: &mut Vec<Action>) {
            let key = LinkKey::from(frame[0]);
            out.push(Action::Connect {
                key,
                endpoint: "tcp://127.0.0.1:5670".into(),
                options: LinkOptions::default(),
            });
            out.push(Action::LinkSend { key, frame: b"too early".to_vec() });
        }
        fn on_link(&mut self, key: LinkKey, event: LinkEvent, _: Instant, out: &mut Vec<Action>) {
            if event == LinkEvent::Up {
                out.push(Action::LinkSend { key, frame: b"hello".to_vec() });
            }
            self.events.push((key, event));
        }
        fn on_timer(&mut self, _: TimerKey, _: Instant, _: &mut Vec<Action>) {}
        fn on_disconnect(&mut self, _: ConnId, _: Instant, _: &mut Vec<Action>) {}
        fn status(&self) -> serde_json::Value {
            serde_json::Value::Null
        }
    }

    #[test]
    fn the_simulator_keeps_links_as_the_host_does() {
        let mut sim = Sim::new(Dialer::default());
        sim.send_raw(1, vec![1]);
        let link = sim.link(1).expect("link 1 open");
        assert_eq!((link.up, link.dropped, link.options.heartbeat), (false, 1, Some(Heartbeat::default())));
        sim.link_event(1, LinkEvent::Up);
        assert_eq!(sim.take_link_frames(1), vec![b"hello".to_vec()]);

        // A retrying Down keeps the link; a final one forgets it.
        let gone = LinkDown::PeerGone { endpoint: "tcp://127.0.0.1:5670".into() };
        sim.link_event(1, LinkEvent::Down { why: gone });
        assert!(sim.link(1).is_some_and(|l| !l.up));
        let slow = LinkDown::TooSlow { endpoint: "tcp://127.0.0.1:5670".into(), bound: 4096 };
        sim.link_event(1, LinkEvent::Down { why: slow.clone() });
        assert!(sim.link(1).is_none());
        assert!(!slow.retrying());

        // The service's bound: a third link gets a final Down at once.
        sim.send_raw(1, vec![2]);
        sim.send_raw(1, vec![3]);
        sim.send_raw(1, vec![4]);
        assert_eq!(sim.open_links(), vec![2, 3]);
        let (key, last) = sim.service.events.last().expect("an event");
        assert_eq!(*key, 4);
        let LinkEvent::Down { why } = last else { panic!("{last:?}") };
        assert_eq!(why.to_string(), "link limit reached: 2 links for this service");
        assert_eq!(sim.link_history.iter().filter(|r| matches!(r, LinkRecord::Connect { .. })).count(), 4);
    }
}
