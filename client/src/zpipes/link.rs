//! The pipe end's link to the broker: the client link
//! ([`crate::link`]) set up for ZPIPES, with its heartbeat (PINGs, and the
//! capability bits a PING_OK grants) and request/reply with PING_OK
//! filtered out.

use super::{Error, Options, Result};
use crate::link::{self, Heartbeat, PingWhen};
use std::time::{Duration, Instant};
use zbroker_proto::codec::ShortStr;
use zbroker_proto::zpipes::PARTIAL_READ;
use zbroker_proto::ZpipesMsg;

impl From<link::Error> for Error {
    fn from(e: link::Error) -> Error {
        match e {
            link::Error::NoBroker { endpoint, .. } => Error::NoBroker(endpoint),
            link::Error::Handshake { endpoint, hint, .. } => Error::Handshake { endpoint, hint },
            link::Error::BrokerGone { endpoint, why } => Error::BrokerGone { endpoint, why },
            link::Error::Connect { source, .. } | link::Error::Zmq(source) => Error::Zmq(source),
            // A pipe end's link has no stop socket: this never comes.
            link::Error::Stopped => Error::Failed("stopped".into()),
        }
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
    link: link::Link,
    pub(super) opts: Options,
    /// PINGs sent and not yet answered.
    pub(super) pings: usize,
    /// Every message we send counts as a ping: the broker's expiry counts
    /// from the last.
    beat: Heartbeat,
    /// The broker granted partial READs (a PING_OK carrying the bit).
    pub(super) partial: bool,
}

impl Link {
    pub(super) fn connect(opts: &Options) -> Result<Link> {
        let link = link::Link::connect(
            link::context(),
            &link::Options {
                endpoint: &opts.endpoint,
                curve: opts.curve.as_ref(),
                // Bounded: what is unsent when the socket closes gets 200 ms,
                // never a hang on a broker that is gone.
                linger: Duration::from_millis(200),
                reconnect: true,
                intake: None,
                patience: opts.connect_timeout,
                handshake_patience: opts.dead_after,
                stop: None,
            },
        )?;
        Ok(Link {
            link,
            opts: opts.clone(),
            pings: 0,
            beat: Heartbeat::new(opts.heartbeat, PingWhen::Unpinged),
            partial: false,
        })
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
        self.beat.pinged(Instant::now());
        Ok(self.link.send(frame, wait)?)
    }

    /// The next frame if one is already there.
    pub(super) fn try_recv(&mut self) -> Result<Option<ZpipesMsg>> {
        while let Some(frame) = self.link.try_recv()? {
            self.beat.heard(Instant::now());
            match ZpipesMsg::decode_ext(frame) {
                Ok((ZpipesMsg::PingOk {}, granted)) => {
                    self.partial |= granted & PARTIAL_READ != 0;
                    self.pings = self.pings.saturating_sub(1);
                }
                Ok((msg, _)) => return Ok(Some(msg)),
                Err(e) => tracing::warn!("ignoring a malformed frame from the broker: {e}"),
            }
        }
        Ok(None)
    }

    /// The next reply other than PING_OK, or `None` at `deadline`.
    pub(super) fn recv(&mut self, deadline: Option<Instant>) -> Result<Option<ZpipesMsg>> {
        loop {
            // Counted from the last message sent, not from this call: short
            // waits in a row (a reader polling while a READ stays in flight)
            // still ping.
            let next_ping = self.beat.ping_due();
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
            if self.pings > 0 && now > self.beat.dead_at(self.opts.dead_after) {
                return Err(self.link.gone("no answer to pings").into());
            }
            let until = deadline.map_or(next_ping, |d| d.min(next_ping));
            self.wait(until.saturating_duration_since(now))?;
        }
    }

    /// Waits up to `limit` for a frame; fails if the connection to the
    /// broker dropped (and nothing is left to read).
    pub(super) fn wait(&mut self, limit: Duration) -> Result<()> {
        Ok(self.link.wait_frame(limit)?)
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
                return Err(self.link.gone("no answer to a ping").into());
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
                None => return Err(self.link.gone("no answer to CLOSE").into()),
            }
        }
    }
}
