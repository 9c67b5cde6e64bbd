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

use crate::endpoint;
use bytes::Bytes;
use std::collections::VecDeque;
use std::io;
use std::time::{Duration, Instant};
use zbroker_proto::byte_queue::ByteQueue;
use zbroker_proto::codec::ShortStr;
use zbroker_proto::zpipes::WriteFrame;
use zbroker_proto::zpipes::PARTIAL_READ;
use zbroker_proto::ZpipesMsg;

mod link;
use link::{ms, Link};

/// WRITE bytes kept in flight at most: below the 4 MiB the broker always
/// lets wait behind a pending request.
const IN_FLIGHT_BYTES: usize = 3 << 20;

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
    /// Bytes gathered by `std::io::Write` and not yet sent, already in
    /// their WRITE frame.
    gathered: Option<WriteFrame>,
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
            gathered: None,
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
        let mut frame = WriteFrame::with_capacity(len);
        frame.push(data);
        self.link.send_frame(frame.finish(ms(timeout)), self.link.opts.dead_after)?;
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
        let len = self.gathered.as_ref().map_or(0, WriteFrame::len);
        if len == 0 {
            return Ok(());
        }
        // Stay within what the broker queues behind a pending request
        // (4 MiB at the least), so a pipelined WRITE is never refused.
        let room = IN_FLIGHT_BYTES.saturating_sub(len);
        self.collect(self.link.opts.window.max(1) - 1, room)?;
        let Some(frame) = self.gathered.take() else { return Ok(()) };
        // No timeout: a reader is attached, and a timeout could leave a
        // hole in the stream.
        self.link.send_frame(frame.finish(0), self.link.opts.dead_after)?;
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
        let frame = self.gathered.get_or_insert_with(|| WriteFrame::with_capacity(max));
        let n = frame.push(buf);
        // A full chunk goes out at once. The bytes are accepted either way:
        // a failure is kept for the next call, so that a caller retrying
        // this one never sends them twice.
        if frame.is_full() {
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
