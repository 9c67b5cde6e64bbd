//! `zpipes`: named pipes through a zbroker, from the shell.

use clap::{Parser, Subcommand};
use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::mpsc;
use std::time::{Duration, Instant};
use zbroker_client::zpipes::{Error, Options, ReadOutcome, Reader, Writer};
use zbroker_client::{curve, endpoint};

#[derive(Parser)]
#[command(
    name = "zpipes",
    version,
    about = "Move bytes between processes through a named pipe on a zbroker",
    long_about = "Move bytes between processes through a named pipe on a zbroker.\n\n\
        One process writes, another reads; they find each other by the pipe's name on a \
        broker (see `zbroker --help`). `zpipes write NAME` copies its standard input into \
        the pipe and closes it at end of input; `zpipes read NAME` copies the pipe to its \
        standard output until the writer closes. Either side may start first.",
    after_help = "Examples:\n  tar c photos | zpipes write backup\n  zpipes read backup | tar x -C /restore\n  \
        zpipes --endpoint tcp://hub:5670 read logs\n  \
        zpipes --endpoint tcp://hub:5670 --server-key hub.pub --key ~/.zbroker/me read logs\n\n\
        Exit status:\n  0  the copy completed\n  1  reading standard input or writing standard output failed\n  \
        2  bad command line\n  3  timed out (--timeout)\n  4  no broker answered\n  \
        5  the pipe already has a reader (or writer)\n  6  the pipe failed: the other end, or the broker, went away"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Name of the broker on this machine
    #[arg(long, global = true, value_name = "NAME", default_value = endpoint::DEFAULT_BROKER,
          conflicts_with = "endpoint")]
    broker: String,
    /// Reach the broker at this ZeroMQ endpoint instead (e.g. tcp://host:5670)
    #[arg(long, global = true, value_name = "EP")]
    endpoint: Option<String>,
    /// Give up after MS milliseconds: the writer waiting for a reader, or the reader waiting for data
    #[arg(long, global = true, value_name = "MS")]
    timeout: Option<u64>,
    /// Speak CURVE: FILE is the broker's public key (its `zbroker keygen` .pub file)
    #[arg(long, global = true, value_name = "FILE")]
    server_key: Option<PathBuf>,
    /// This client's secret key file (`zbroker keygen PATH`) [default: a fresh key pair]
    #[arg(long, global = true, value_name = "PATH", requires = "server_key")]
    key: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Copy the pipe NAME to standard output until its writer closes
    Read {
        /// The pipe's name
        name: String,
        /// Most bytes asked for per request (at most the broker's pipe limit); a trickle is
        /// passed on within a fraction of a second whatever the size
        #[arg(long, value_name = "BYTES", default_value_t = 1 << 20,
              value_parser = clap::value_parser!(u32).range(1..=(64 << 20)))]
        block_size: u32,
    },
    /// Copy standard input into the pipe NAME, then close it
    Write {
        /// The pipe's name
        name: String,
    },
}

/// Exit statuses, as documented in `--help`.
mod status {
    pub const IO: u8 = 1;
    pub const TIMEOUT: u8 = 3;
    pub const NO_BROKER: u8 = 4;
    pub const BUSY: u8 = 5;
    pub const FAILED: u8 = 6;
}

struct Failure {
    code: u8,
    message: String,
}

impl From<Error> for Failure {
    fn from(e: Error) -> Failure {
        let code = match e {
            Error::NoBroker(_) | Error::Handshake { .. } => status::NO_BROKER,
            Error::Busy { .. } => status::BUSY,
            Error::BadName(_) => 2,
            _ => status::FAILED,
        };
        Failure { code, message: e.to_string() }
    }
}

/// Sorts an `io::Error` from the pipe side (it wraps an [`Error`]) from one
/// of standard input or output.
fn pipe_failure(e: io::Error) -> Failure {
    if e.kind() == io::ErrorKind::TimedOut {
        return Failure { code: status::TIMEOUT, message: e.to_string() };
    }
    match e.into_inner().map(|inner| inner.downcast::<Error>()) {
        Some(Ok(pipe_error)) => Failure::from(*pipe_error),
        Some(Err(other)) => Failure { code: status::FAILED, message: other.to_string() },
        None => Failure { code: status::FAILED, message: "pipe failed".into() },
    }
}

fn io_failure(what: &str, e: io::Error) -> Failure {
    Failure { code: status::IO, message: format!("{what}: {e}") }
}

fn main() -> ExitCode {
    zbroker_client::allocator::keep_freed_buffers();
    let cli = Cli::parse();
    let (Command::Read { name, .. } | Command::Write { name }) = &cli.command;
    if name.is_empty() {
        eprintln!("zpipes: the pipe name is empty: give the pipe a name, e.g. `zpipes write backup`");
        return ExitCode::from(2);
    }
    let mut opts = match &cli.endpoint {
        Some(ep) => {
            if let Err(e) = endpoint::validate(ep) {
                eprintln!("zpipes: --endpoint {e}");
                return ExitCode::from(2);
            }
            Options::endpoint(ep)
        }
        None => {
            if let Err(e) = endpoint::check_name(&cli.broker) {
                eprintln!("zpipes: {e}");
                return ExitCode::from(2);
            }
            Options::broker(&cli.broker)
        }
    };
    if let Some(server_key) = &cli.server_key {
        match curve::ClientKeys::from_files(server_key, cli.key.as_deref()) {
            Ok(keys) => opts.curve = Some(keys),
            Err(e) => {
                eprintln!("zpipes: {e}");
                return ExitCode::from(2);
            }
        }
    }
    let timeout = cli.timeout.map(Duration::from_millis);
    if let Some(t) = timeout {
        opts.connect_timeout = opts.connect_timeout.min(t.max(Duration::from_millis(100)));
    }
    let result = match cli.command {
        Command::Read { name, block_size } => read(&name, &opts, timeout, block_size as usize),
        Command::Write { name } => write(&name, &opts, timeout).map_err(|mut f| {
            // The reader went (WRITE_FAILED): what it had not read is lost.
            if f.code == status::FAILED && f.message.starts_with("pipe failed:") {
                f.message = format!(
                    "{}: start a reader (`zpipes read {name}`) and write the whole stream again",
                    f.message
                );
            }
            f
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("zpipes: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

/// How long one READ waits before the reader looks for a partial block:
/// the most a trickle of bytes waits to be passed on.
const PATIENCE: Duration = Duration::from_millis(200);
/// How long a probing READ waits: only for bytes already there.
const PROBE: Duration = Duration::from_millis(1);

/// What a search for less than a block found.
enum Probe {
    Data(bytes::Bytes),
    End,
    Nothing,
}

/// A READ answers only when its whole size is there, so after a timeout the
/// reader asks for one byte, and if there is one, for halves of the block
/// until a size fits what is waiting.
fn probe(reader: &mut Reader, block: usize) -> Result<Probe, Failure> {
    match reader.read_chunk(1, Some(PROBE))? {
        ReadOutcome::Data(first) => {
            let mut size = block / 2;
            while size > 1 {
                match reader.read_chunk(size, Some(PROBE))? {
                    ReadOutcome::Data(more) => return Ok(Probe::Data([first, more].concat().into())),
                    ReadOutcome::End => break,
                    ReadOutcome::Timeout => size /= 2,
                }
            }
            Ok(Probe::Data(first))
        }
        ReadOutcome::End => Ok(Probe::End),
        ReadOutcome::Timeout => Ok(Probe::Nothing),
    }
}

/// Copies the pipe to standard output. A thread writes standard output, so
/// that a slow consumer never keeps this one from the broker: while it
/// waits, it pings, and the pipe end does not expire.
fn read(name: &str, opts: &Options, timeout: Option<Duration>, max_block: usize) -> Result<(), Failure> {
    let mut reader = Reader::open(name, opts)?;
    let (tx, rx) = mpsc::sync_channel::<bytes::Bytes>(4);
    let output = std::thread::spawn(move || -> io::Result<()> {
        let mut out = io::stdout().lock();
        for data in rx {
            out.write_all(&data)?;
            out.flush()?;
        }
        Ok(())
    });
    let mut block = max_block;
    let mut idle_since = Instant::now();
    // Whatever ends the loop, what was received reaches standard output:
    // the output thread is joined before any error is reported.
    let result = (|| loop {
        // A broker with "what is there" READs answers as soon as a byte is
        // there, whatever the block: no probing, and bulk stays in blocks.
        let outcome = match reader.partial_reads() {
            true => reader.read_some(max_block, Some(PATIENCE))?,
            false => reader.read_chunk(block, Some(PATIENCE))?,
        };
        let data = match outcome {
            ReadOutcome::Data(data) if reader.partial_reads() => data,
            ReadOutcome::Data(data) => {
                if data.len() == block {
                    block = (block * 2).min(max_block);
                }
                data
            }
            ReadOutcome::End => break Ok(()),
            ReadOutcome::Timeout if reader.partial_reads() => {
                if timeout.is_some_and(|t| idle_since.elapsed() >= t) {
                    break Err(Failure {
                        code: status::TIMEOUT,
                        message: format!("no data on pipe {name:?} in time"),
                    });
                }
                continue;
            }
            ReadOutcome::Timeout => match probe(&mut reader, block)? {
                Probe::Data(data) => {
                    block = data.len().max(1);
                    data
                }
                Probe::End => break Ok(()),
                Probe::Nothing => {
                    if timeout.is_some_and(|t| idle_since.elapsed() >= t) {
                        break Err(Failure {
                            code: status::TIMEOUT,
                            message: format!("no data on pipe {name:?} in time"),
                        });
                    }
                    continue;
                }
            },
        };
        idle_since = Instant::now();
        if !hand_over(&tx, data, &mut reader, opts.heartbeat)? {
            break Ok(()); // standard output failed: see below
        }
    })();
    drop(tx);
    match output.join() {
        Ok(Ok(())) => {}
        // The consumer stopped reading (`| head`): not an error of ours.
        Ok(Err(e)) if e.kind() == io::ErrorKind::BrokenPipe => return Ok(()),
        Ok(Err(e)) => return Err(io_failure("writing standard output", e)),
        Err(_) => return Err(Failure { code: status::IO, message: "the output thread failed".into() }),
    }
    result?;
    reader.close()?;
    Ok(())
}

/// Queues data for the output thread, pinging the broker while it is
/// full. False if the output thread has stopped. The data is never
/// dropped while the output thread runs.
fn hand_over(
    tx: &mpsc::SyncSender<bytes::Bytes>,
    mut data: bytes::Bytes,
    reader: &mut Reader,
    heartbeat: Duration,
) -> Result<bool, Failure> {
    let mut last_ping = Instant::now();
    loop {
        match tx.try_send(data) {
            Ok(()) => return Ok(true),
            Err(mpsc::TrySendError::Disconnected(_)) => return Ok(false),
            Err(mpsc::TrySendError::Full(back)) => {
                data = back;
                std::thread::sleep(Duration::from_millis(5));
                if last_ping.elapsed() >= heartbeat {
                    if let Err(e) = reader.ping() {
                        // The broker is gone, but these bytes were received:
                        // they still go out, however long the consumer takes
                        // (and so do those a read-ahead brought meanwhile).
                        let _ = tx.send(data);
                        let _ = tx.send(reader.take_buffered());
                        return Err(e.into());
                    }
                    last_ping = Instant::now();
                }
            }
        }
    }
}

/// Copies standard input into the pipe, then closes it. A thread reads
/// standard input, so that a quiet producer never keeps this one from the
/// broker: while nothing comes it pings, and the pipe end does not expire.
fn write(name: &str, opts: &Options, timeout: Option<Duration>) -> Result<(), Failure> {
    let mut writer = Writer::open(name, opts)?;
    // Wait for the reader first, so that even empty input reaches it as an
    // end of stream rather than a pipe that vanished before it came.
    if !writer.wait_for_reader(timeout)? {
        return Err(Failure {
            code: status::TIMEOUT,
            message: format!("no reader opened pipe {name:?} in time"),
        });
    }
    // Buffers travel to this thread with the byte count read into them and
    // come back for the next read: the bytes are not copied on the way
    // (they are once, into the WRITE frame). A buffer is made only when
    // none has come back: at most seven exist (four queued, one being
    // queued, one being read into, one being written out).
    let (tx, rx) = mpsc::sync_channel::<io::Result<(Vec<u8>, usize)>>(4);
    let (give_back, spare) = mpsc::channel::<Vec<u8>>();
    let chunk = opts.max_chunk.clamp(4096, 1 << 20);
    std::thread::spawn(move || {
        let mut input = io::stdin().lock();
        let mut buf = vec![0u8; chunk];
        loop {
            match input.read(&mut buf) {
                Ok(0) => return, // end of input: the channel closes
                Ok(n) => {
                    let next = spare.try_recv().unwrap_or_else(|_| vec![0u8; chunk]);
                    if tx.send(Ok((std::mem::replace(&mut buf, next), n))).is_err() {
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            }
        }
    });
    loop {
        let next = match rx.try_recv() {
            Ok(next) => Ok(next),
            Err(mpsc::TryRecvError::Disconnected) => break,
            Err(mpsc::TryRecvError::Empty) => {
                // The producer paused: pass on what has been gathered.
                writer.send_gathered()?;
                rx.recv_timeout(opts.heartbeat)
            }
        };
        match next {
            Ok(Ok((data, n))) => {
                writer.write_all(&data[..n]).map_err(pipe_failure)?;
                // The reader thread may have ended: then the buffer goes.
                let _ = give_back.send(data);
            }
            Ok(Err(e)) => return Err(io_failure("reading standard input", e)),
            Err(mpsc::RecvTimeoutError::Timeout) => writer.ping()?,
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    writer.close()?;
    Ok(())
}
