//! `zpipes`: named pipes through a zbroker, from the shell.

use clap::{Parser, Subcommand};
use std::io::{self, Read, Write};
use std::process::ExitCode;
use std::time::Duration;
use zbroker_client::endpoint;
use zbroker_client::zpipes::{Error, Options, ReadOutcome, Reader, Writer};

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
        zpipes --endpoint tcp://hub:5670 read logs\n\n\
        Exit status:\n  0  the copy completed\n  1  reading standard input or writing standard output failed\n  \
        2  bad command line\n  3  timed out (--timeout)\n  4  no broker answered\n  \
        5  the pipe already has a reader (or writer)\n  6  the pipe failed: the other end, or the broker, went away"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Name of the broker on this machine
    #[arg(long, global = true, value_name = "NAME", default_value = endpoint::DEFAULT_BROKER)]
    broker: String,
    /// Reach the broker at this ZeroMQ endpoint instead (e.g. tcp://host:5670)
    #[arg(long, global = true, value_name = "EP")]
    endpoint: Option<String>,
    /// Give up after MS milliseconds: the writer waiting for a reader, or the reader waiting for data
    #[arg(long, global = true, value_name = "MS")]
    timeout: Option<u64>,
}

#[derive(Subcommand)]
enum Command {
    /// Copy the pipe NAME to standard output until its writer closes
    Read {
        /// The pipe's name
        name: String,
        /// Bytes asked for per request: output comes in blocks of this size (smaller is more
        /// interactive, larger is faster)
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
            Error::NoBroker(_) => status::NO_BROKER,
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
    let cli = Cli::parse();
    let mut opts = match &cli.endpoint {
        Some(ep) => Options::endpoint(ep),
        None => {
            if let Err(e) = endpoint::check_name(&cli.broker) {
                eprintln!("zpipes: {e}");
                return ExitCode::from(2);
            }
            Options::broker(&cli.broker)
        }
    };
    let timeout = cli.timeout.map(Duration::from_millis);
    if let Some(t) = timeout {
        opts.connect_timeout = opts.connect_timeout.min(t.max(Duration::from_millis(100)));
    }
    let result = match cli.command {
        Command::Read { name, block_size } => read(&name, &opts, timeout, block_size as usize),
        Command::Write { name } => write(&name, &opts, timeout),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("zpipes: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

fn read(name: &str, opts: &Options, timeout: Option<Duration>, block: usize) -> Result<(), Failure> {
    let mut reader = Reader::open(name, opts)?;
    let stdout = io::stdout();
    let mut out = stdout.lock();
    loop {
        let data = match reader.read_chunk(block, timeout)? {
            ReadOutcome::Data(data) => data,
            ReadOutcome::End => break,
            // A block may be partly there: a one-byte READ tells whether
            // anything at all arrived in time.
            ReadOutcome::Timeout => match reader.read_chunk(1, timeout)? {
                ReadOutcome::Data(data) => data,
                ReadOutcome::End => break,
                ReadOutcome::Timeout => {
                    return Err(Failure {
                        code: status::TIMEOUT,
                        message: format!("no data on pipe {name:?} in time"),
                    })
                }
            },
        };
        match out.write_all(&data).and_then(|()| out.flush()) {
            Ok(()) => {}
            // The consumer stopped reading (`| head`): not an error of ours.
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => return Ok(()),
            Err(e) => return Err(io_failure("writing standard output", e)),
        }
    }
    reader.close()?;
    Ok(())
}

/// True if standard input can be read without waiting.
fn stdin_has_data() -> bool {
    let mut fd = libc::pollfd { fd: 0, events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd, zero timeout.
    unsafe { libc::poll(&mut fd, 1, 0) > 0 }
}

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
    let stdin = io::stdin();
    let mut input = stdin.lock();
    let mut buf = vec![0u8; opts.max_chunk];
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_failure("reading standard input", e)),
        };
        writer.write_all(&buf[..n]).map_err(pipe_failure)?;
        // The writer gathers small writes into large chunks; when the
        // producer pauses, deliver what it has so far.
        if !stdin_has_data() {
            writer.flush().map_err(pipe_failure)?;
        }
    }
    writer.close()?;
    Ok(())
}
