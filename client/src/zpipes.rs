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

use crate::codec::{Chunk, ShortStr};
use crate::endpoint;
use crate::ZpipesMsg;
use bytes::Bytes;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Why a pipe operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no broker answers at {0}")]
    NoBroker(String),
    #[error("lost the broker at {0}")]
    BrokerGone(String),
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
            Error::NoBroker(_) => io::ErrorKind::NotFound,
            Error::BrokerGone(_) => io::ErrorKind::ConnectionAborted,
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
    /// Largest chunk one WRITE carries; `std::io::Write` splits larger
    /// buffers.
    pub max_chunk: usize,
    /// Largest READ that `std::io::Read` sends.
    pub max_read: usize,
    /// WRITEs in flight at once through `std::io::Write`.
    pub window: usize,
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
            max_chunk: 256 << 10,
            max_read: 256 << 10,
            window: 4,
        }
    }
}

impl Default for Options {
    fn default() -> Self {
        Self::broker(endpoint::DEFAULT_BROKER)
    }
}

/// One ZeroMQ context for every client in the process.
fn context() -> &'static zmq::Context {
    static CONTEXT: OnceLock<zmq::Context> = OnceLock::new();
    CONTEXT.get_or_init(zmq::Context::new)
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
    /// PINGs sent and not yet answered.
    pings: usize,
    last_heard: Instant,
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
        socket.monitor(
            &monitor_endpoint,
            zmq::SocketEvent::DISCONNECTED.to_raw() as i32,
        )?;
        let monitor = context().socket(zmq::PAIR)?;
        monitor.set_linger(0)?;
        monitor.connect(&monitor_endpoint)?;
        socket.connect(&opts.endpoint)?;
        if socket.poll(zmq::POLLOUT, opts.connect_timeout.as_millis() as i64)? == 0 {
            return Err(Error::NoBroker(opts.endpoint.clone()));
        }
        Ok(Link {
            socket,
            monitor,
            opts: opts.clone(),
            pings: 0,
            last_heard: Instant::now(),
        })
    }

    fn send(&mut self, msg: &ZpipesMsg) -> Result<()> {
        match self.socket.send(msg.encode(), zmq::DONTWAIT) {
            Ok(()) => Ok(()),
            // Immediate mode: no connection to queue on.
            Err(zmq::Error::EAGAIN) => {
                if self
                    .socket
                    .poll(zmq::POLLOUT, self.opts.connect_timeout.as_millis() as i64)?
                    == 0
                {
                    return Err(Error::BrokerGone(self.opts.endpoint.clone()));
                }
                self.socket.send(msg.encode(), zmq::DONTWAIT)?;
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The next reply other than PING_OK, or `None` at `deadline`.
    fn recv(&mut self, deadline: Option<Instant>) -> Result<Option<ZpipesMsg>> {
        let endpoint = self.opts.endpoint.clone();
        let gone = || Error::BrokerGone(endpoint.clone());
        let mut next_ping = Instant::now() + self.opts.heartbeat;
        loop {
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                return Ok(None);
            }
            if now >= next_ping {
                self.send(&ZpipesMsg::Ping {})?;
                self.pings += 1;
                next_ping = now + self.opts.heartbeat;
            }
            if self.pings > 0 && now.duration_since(self.last_heard) > self.opts.dead_after {
                return Err(gone());
            }
            let until = deadline.map_or(next_ping, |d| d.min(next_ping));
            let wait = until.saturating_duration_since(now).as_millis() as i64;
            let mut items = [
                self.socket.as_poll_item(zmq::POLLIN),
                self.monitor.as_poll_item(zmq::POLLIN),
            ];
            zmq::poll(&mut items, wait.max(1))?;
            if items[1].is_readable() {
                return Err(gone());
            }
            if !items[0].is_readable() {
                continue;
            }
            let frame = self.socket.recv_bytes(0)?;
            self.last_heard = Instant::now();
            match ZpipesMsg::decode(frame) {
                Ok(ZpipesMsg::PingOk {}) => self.pings = self.pings.saturating_sub(1),
                Ok(msg) => return Ok(Some(msg)),
                Err(e) => tracing::warn!("ignoring a malformed frame from the broker: {e}"),
            }
        }
    }

    /// Waits for the next reply for as long as the broker lives.
    fn reply(&mut self) -> Result<ZpipesMsg> {
        Ok(self.recv(None)?.expect("no deadline"))
    }

    /// Opens a pipe end with INPUT or OUTPUT.
    fn open(opts: &Options, pipe: &str, reader: bool) -> Result<Link> {
        let pipename = ShortStr::new(pipe.as_bytes().to_vec())
            .map_err(|_| Error::BadName(pipe.to_string()))?;
        let mut link = Link::connect(opts)?;
        let request = if reader {
            ZpipesMsg::Input { pipename }
        } else {
            ZpipesMsg::Output { pipename }
        };
        link.send(&request)?;
        match link.recv(Some(
            Instant::now() + opts.connect_timeout + opts.dead_after,
        ))? {
            Some(ZpipesMsg::InputOk {}) if reader => Ok(link),
            Some(ZpipesMsg::OutputOk {}) if !reader => Ok(link),
            Some(ZpipesMsg::InputFailed { .. }) => Err(Error::Busy {
                pipe: pipe.to_string(),
                end: "reader",
            }),
            Some(ZpipesMsg::OutputFailed { .. }) => Err(Error::Busy {
                pipe: pipe.to_string(),
                end: "writer",
            }),
            Some(ZpipesMsg::Invalid {}) => Err(Error::Invalid),
            Some(other) => Err(Error::Protocol(other.name())),
            None => Err(Error::NoBroker(opts.endpoint.clone())),
        }
    }

    /// One PING and its PING_OK: keeps the connection from expiring.
    fn ping(&mut self) -> Result<()> {
        self.send(&ZpipesMsg::Ping {})?;
        self.pings += 1;
        let deadline = Instant::now() + self.opts.dead_after;
        while self.pings > 0 {
            if Instant::now() >= deadline {
                return Err(Error::BrokerGone(self.opts.endpoint.clone()));
            }
            let wait = deadline
                .saturating_duration_since(Instant::now())
                .as_millis() as i64;
            let mut items = [
                self.socket.as_poll_item(zmq::POLLIN),
                self.monitor.as_poll_item(zmq::POLLIN),
            ];
            zmq::poll(&mut items, wait.max(1))?;
            if items[1].is_readable() {
                return Err(Error::BrokerGone(self.opts.endpoint.clone()));
            }
            if items[0].is_readable() {
                match ZpipesMsg::decode(self.socket.recv_bytes(0)?) {
                    Ok(ZpipesMsg::PingOk {}) => self.pings -= 1,
                    Ok(other) => return Err(Error::Protocol(other.name())),
                    Err(e) => tracing::warn!("ignoring a malformed frame from the broker: {e}"),
                }
            }
        }
        self.last_heard = Instant::now();
        Ok(())
    }

    /// Sends CLOSE and waits (briefly) for CLOSE_OK.
    fn close(&mut self) -> Result<()> {
        self.send(&ZpipesMsg::Close {})?;
        let deadline = Instant::now() + self.opts.connect_timeout;
        loop {
            match self.recv(Some(deadline))? {
                Some(ZpipesMsg::CloseOk {}) => return Ok(()),
                // A pending request is failed before CLOSE_OK.
                Some(ZpipesMsg::ReadFailed { .. } | ZpipesMsg::WriteFailed { .. }) => continue,
                Some(ZpipesMsg::Invalid {}) => return Err(Error::Invalid),
                Some(other) => return Err(Error::Protocol(other.name())),
                None => return Err(Error::BrokerGone(self.opts.endpoint.clone())),
            }
        }
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        let _ = self.socket.disconnect(&self.opts.endpoint);
    }
}

fn failure(reason: &ShortStr) -> Error {
    Error::Failed(reason.to_string_lossy())
}

/// The reading end of a named pipe.
pub struct Reader {
    link: Link,
    timeout: Option<Duration>,
    ended: bool,
    closed: bool,
}

impl Reader {
    /// Opens `pipe` for reading. Fails with [`Error::Busy`] if it already has
    /// a reader.
    pub fn open(pipe: &str, opts: &Options) -> Result<Reader> {
        Ok(Reader {
            link: Link::open(opts, pipe, true)?,
            timeout: None,
            ended: false,
            closed: false,
        })
    }

    /// Reads exactly `size` bytes (fewer only when the writer has gone),
    /// waiting at most `timeout` (`None`: no limit).
    pub fn read_chunk(&mut self, size: usize, timeout: Option<Duration>) -> Result<ReadOutcome> {
        let size = u32::try_from(size).map_err(|_| Error::TooLarge(size))?;
        self.link.send(&ZpipesMsg::Read {
            size,
            timeout: ms(timeout),
        })?;
        match self.link.reply()? {
            ZpipesMsg::ReadOk { chunk } => Ok(ReadOutcome::Data(chunk.0)),
            ZpipesMsg::ReadEnd {} => Ok(ReadOutcome::End),
            ZpipesMsg::ReadTimeout {} => Ok(ReadOutcome::Timeout),
            ZpipesMsg::ReadFailed { reason } => Err(failure(&reason)),
            ZpipesMsg::Invalid {} => Err(Error::Invalid),
            other => Err(Error::Protocol(other.name())),
        }
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
        self.link.ping()
    }

    /// Closes the pipe end; queued data not yet read is dropped.
    pub fn close(mut self) -> Result<()> {
        self.closed = true;
        self.link.close()
    }
}

/// Each call sends one READ for `min(buf.len(), max_read)` bytes, which the
/// broker answers only when that many bytes are there (or the writer has
/// gone): give it large buffers.
impl io::Read for Reader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() || self.ended {
            return Ok(0);
        }
        let want = buf.len().min(self.link.opts.max_read);
        match self.read_chunk(want, self.timeout)? {
            ReadOutcome::Data(data) => {
                buf[..data.len()].copy_from_slice(&data);
                Ok(data.len())
            }
            ReadOutcome::End => {
                self.ended = true;
                Ok(0)
            }
            ReadOutcome::Timeout => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no data arrived in time",
            )),
        }
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
    /// WRITEs sent through `std::io::Write` and not yet acknowledged.
    in_flight: usize,
    /// A failure of a pipelined WRITE, reported by the next call.
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
            in_flight: 0,
            failed: None,
            attach_timeout: None,
            attached: false,
            closed: false,
        })
    }

    /// Writes one chunk, waiting at most `timeout` (`None`: no limit) for a
    /// reader and for room in the pipe. Waits first for any pipelined
    /// writes to be acknowledged.
    pub fn write_chunk(&mut self, data: &[u8], timeout: Option<Duration>) -> Result<WriteOutcome> {
        self.settle()?;
        let len = data.len();
        let chunk = Chunk(Bytes::copy_from_slice(data));
        if u32::try_from(len).is_err() {
            return Err(Error::TooLarge(len));
        }
        self.link.send(&ZpipesMsg::Write {
            chunk,
            timeout: ms(timeout),
        })?;
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

    /// Waits for every pipelined write, then closes the pipe end. The
    /// reader can still read everything written.
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

    /// Collects acknowledgements until at most `max` writes are in flight.
    fn collect(&mut self, max: usize) -> Result<()> {
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        while self.in_flight > max {
            let outcome = self.ack();
            self.in_flight -= 1;
            match outcome {
                Ok(WriteOutcome::Written) => {}
                // Pipelined writes carry no timeout, so this cannot happen.
                Ok(WriteOutcome::Timeout) => return Err(Error::Protocol("WriteTimeout")),
                Err(e) => {
                    // The later in-flight writes fail too; drop their replies.
                    self.in_flight = 0;
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    fn settle(&mut self) -> Result<()> {
        self.collect(0)
    }
}

/// Writes are pipelined: up to [`Options::window`] chunks travel before the
/// first acknowledgement is awaited. A failure surfaces on a later call,
/// and [`io::Write::flush`] waits for every acknowledgement. The first
/// write waits for a reader (see [`Writer::set_attach_timeout`]).
impl io::Write for Writer {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let len = buf.len().min(self.link.opts.max_chunk);
        if !self.attached {
            return match self.write_chunk(&buf[..len], self.attach_timeout)? {
                WriteOutcome::Written => Ok(len),
                WriteOutcome::Timeout => Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no reader attached in time",
                )),
            };
        }
        self.collect(self.link.opts.window.saturating_sub(1))?;
        let chunk = Chunk(Bytes::copy_from_slice(&buf[..len]));
        self.link.send(&ZpipesMsg::Write { chunk, timeout: 0 })?;
        self.in_flight += 1;
        Ok(len)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(self.settle()?)
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        if !self.closed {
            if let Err(e) = self.settle() {
                self.failed = Some(e);
            }
            let _ = self.link.close();
        }
    }
}
