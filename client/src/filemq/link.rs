//! The subscriber's connection: the client link ([`crate::link`]) set up
//! for FILEMQ, and the goodbye. A new session gets a new `Link` (and a new
//! routing id at the server), never a reused socket: the socket itself
//! never reconnects (`ZMQ_RECONNECT_IVL` -1), so a session never goes on,
//! unaware, over a connection the server does not know.

use crate::link;
use bytes::Bytes;
use std::ops::{Deref, DerefMut};
use std::time::Duration;
use zbroker_proto::FilemqMsg;

/// Why a message did not go to, or come from, the server; the session ends.
#[derive(Debug, thiserror::Error)]
pub(crate) enum WireError {
    /// No connection to send on (it dropped), or a server that stopped
    /// reading.
    #[error("could not send {0} to the server")]
    NoRoom(&'static str),
    #[error("sending {name}: {source}")]
    Send {
        name: &'static str,
        #[source]
        source: zmq::Error,
    },
    #[error("receiving: {0}")]
    Receive(zmq::Error),
}

pub(crate) struct Link(link::Link);

impl Deref for Link {
    type Target = link::Link;
    fn deref(&self) -> &link::Link {
        &self.0
    }
}

impl DerefMut for Link {
    fn deref_mut(&mut self) -> &mut link::Link {
        &mut self.0
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
    ) -> link::Result<Link> {
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
        intake: (i64, i32),
    ) -> link::Result<Link> {
        let opts = link::Options {
            endpoint,
            curve,
            linger: Duration::ZERO,
            // A dropped connection ends the session, and the next session
            // gets a new socket: libzmq must not reconnect this one
            // underneath us (the server would see a stranger speak in the
            // middle of a session).
            reconnect: false,
            // At most `queued` frames of at most `max_frame` bytes (see
            // `session::intake`): a bigger frame drops the connection and
            // the session layer makes a new one.
            intake: Some(intake),
            // Connected but not yet greeted: a busy peer gets the full
            // patience for the handshake.
            patience,
            handshake_patience: patience,
            stop: Some(control),
        };
        link::Link::connect(context, &opts).map(Link)
    }

    /// Sends one message, waiting at most `patience` for room.
    pub fn send(&mut self, msg: &FilemqMsg, patience: Duration) -> Result<(), WireError> {
        self.send_with_bits(msg, 0, patience)
    }

    /// Sends `msg` with capability bits after its fields
    /// (`filemq_ext::encode_with_bits`; none when 0).
    pub fn send_with_bits(&mut self, msg: &FilemqMsg, bits: u8, patience: Duration) -> Result<(), WireError> {
        let frame = zbroker_proto::filemq_ext::encode_with_bits(msg, bits);
        self.0.send(frame, patience).map_err(|e| match e {
            link::Error::Zmq(source) => WireError::Send { name: msg.name(), source },
            _ => WireError::NoRoom(msg.name()),
        })
    }

    /// The next frame if one is there.
    pub fn try_recv(&mut self) -> Result<Option<Bytes>, WireError> {
        self.0.try_recv().map_err(WireError::Receive)
    }

    /// Sends KTHXBAI and lets the socket linger a moment so it leaves.
    pub fn goodbye(&mut self) {
        self.0.linger_on_close(Duration::from_millis(200));
        let _ = self.0.socket.send(FilemqMsg::Kthxbai {}.encode(), zmq::DONTWAIT);
    }
}
