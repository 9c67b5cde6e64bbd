//! `filemq`: mirror files published through a zbroker into a local inbox.

use clap::{Args, Parser, Subcommand};
use indicatif::{HumanBytes, ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::collections::HashSet;
use std::io::{self, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};
use zbroker_client::filemq::{self, Event, Options, Subscriber};
use zbroker_client::{curve, endpoint};

/// The exit statuses, as `--help` shows them (see `mod status`).
macro_rules! exit_status_help {
    () => {
        "Exit status:\n  0  stopped by SIGINT/SIGTERM, or in sync (--once)\n  \
        1  local I/O error (e.g. the inbox is not writable)\n  2  bad command line\n  \
        3  not in sync in time (--once --timeout)\n  \
        4  the broker refused us (RTFM/SRSLY to our greeting, or SRSLY to a PATH)\n  \
        5  in sync (--once), but some files could not be fetched (they failed\n     \
        verification again and again) or were refused for safety"
    };
}

#[derive(Parser)]
#[command(
    name = "filemq",
    version,
    about = "Mirror files published through a zbroker into a local directory",
    long_about = "Mirror files published through a zbroker into a local directory.\n\n\
        A zbroker publishes directories under virtual paths (FILEMQ). `filemq subscribe` \
        mirrors one or more of those paths into an inbox directory: it fetches what is \
        missing or different, removes what the publisher no longer has, then keeps \
        following changes until interrupted. Files appear whole (they are received aside, \
        verified, then renamed into place); a transfer cut short resumes where it stopped; \
        a lost broker is reconnected to.",
    after_help = concat!(
        "Examples:\n  filemq subscribe /photos --inbox ~/photos\n  \
        filemq subscribe /logs /etc-backup --inbox /srv/mirror --endpoint tcp://hub:5670\n  \
        filemq subscribe /data --inbox data --once --timeout 60000 && make\n  \
        filemq subscribe / --inbox m --endpoint tcp://hub:5670 --server-key hub.pub --key ~/.zbroker/me\n\n",
        exit_status_help!()
    )
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Mirror the virtual PATHs into the inbox, and keep mirroring them
    #[command(after_help = concat!(
        "Inbox layout:\n  \
        With one PATH, its files land relative to it: /data/a/b.txt -> INBOX/a/b.txt.\n  \
        With several, they keep their full path: /data/a/b.txt -> INBOX/data/a/b.txt.\n  \
        INBOX/.filemq/ holds partial files and a digest cache; hidden files are left alone.\n\n\
        Output (when standard output is not a terminal), one line per change:\n  \
        updated PATH\n  deleted PATH\n(PATH relative to the inbox). On a terminal, a progress bar.\n\n",
        exit_status_help!()
    ))]
    Subscribe(SubscribeArgs),
}

#[derive(Args)]
struct SubscribeArgs {
    /// Virtual paths to mirror, each starting with '/' ("/" is everything)
    #[arg(required = true, value_name = "PATH")]
    paths: Vec<String>,
    /// The directory that mirrors them (created if missing)
    #[arg(long, value_name = "DIR")]
    inbox: PathBuf,
    /// Name of the broker on this machine
    #[arg(long, value_name = "NAME", default_value = endpoint::DEFAULT_BROKER)]
    broker: String,
    /// Reach the broker at this ZeroMQ endpoint instead (e.g. tcp://host:5670)
    #[arg(long, value_name = "EP", conflicts_with = "broker")]
    endpoint: Option<String>,
    /// Speak CURVE: FILE is the broker's public key (its `zbroker keygen` .pub file)
    #[arg(long, value_name = "FILE")]
    server_key: Option<PathBuf>,
    /// This client's secret key file (`zbroker keygen PATH`) [default: a fresh key pair]
    #[arg(long, value_name = "PATH", requires = "server_key")]
    key: Option<PathBuf>,
    /// Exit as soon as the inbox matches the publisher
    #[arg(long)]
    once: bool,
    /// With --once: give up (exit 3) if not in sync after MS milliseconds
    #[arg(long, value_name = "MS", requires = "once")]
    timeout: Option<u64>,
    /// Credit window: bytes the broker may send ahead (e.g. 8MiB, 500k, 8000000)
    #[arg(long, value_name = "SIZE", default_value = "8000000", value_parser = parse_size)]
    window: u64,
    /// Print nothing but errors
    #[arg(long, short)]
    quiet: bool,
    /// Log filter for standard error (error, warn, info, debug, trace; default: error, or RUST_LOG)
    #[arg(long, value_name = "LEVEL")]
    log: Option<String>,
}

/// Exit statuses, as documented in `--help`.
mod status {
    pub const IO: u8 = 1;
    pub const USAGE: u8 = 2;
    pub const TIMEOUT: u8 = 3;
    pub const REFUSED: u8 = 4;
    pub const INCOMPLETE: u8 = 5;
}

/// At most this many names of files that did not make it are listed when
/// `--once` exits 5.
const NAMES_LISTED: usize = 5;

struct Failure {
    code: u8,
    message: String,
}

impl Failure {
    fn new(code: u8, message: impl Into<String>) -> Failure {
        Failure { code, message: message.into() }
    }
}

/// `8000000`, `500k`, `8MB`, `8MiB`, `1g`: decimal or binary multiples.
fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let number: u64 =
        digits.parse().map_err(|_| format!("{text:?} is not a size (e.g. 8MiB, 500k, 8000000)"))?;
    let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "kib" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mib" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gib" => 1 << 30,
        other => return Err(format!("unknown size unit {other:?} (use k, M, G, KiB, MiB or GiB)")),
    };
    match number.checked_mul(multiplier) {
        Some(0) => Err("the window must be at least 1 byte".into()),
        Some(size) => Ok(size),
        None => Err(format!("{text:?} is too large")),
    }
}

fn init_logging(level: Option<&str>) -> Result<(), Failure> {
    use tracing_subscriber::EnvFilter;
    let filter = match level {
        Some(level) => EnvFilter::try_new(level)
            .map_err(|e| Failure::new(status::USAGE, format!("bad --log filter {level:?}: {e}")))?,
        // Errors reach the user as our own one-line message; the rest on
        // demand, but for a handshake refused again and again (wrong CURVE
        // keys), which would otherwise look like a silent hang.
        None => {
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("error,filemq::curve=warn"))
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(io::stderr)
        .with_ansi(io::stderr().is_terminal())
        .with_target(false)
        .init();
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Subscribe(args) => subscribe(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("filemq: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

/// Where file events go: plain lines for scripts, or a progress bar with
/// the same lines above it on a terminal.
enum Output {
    Quiet,
    Lines(io::Stdout),
    Bar { bar: ProgressBar, file: String, done: u64 },
}

impl Output {
    fn new(quiet: bool) -> Output {
        if quiet {
            return Output::Quiet;
        }
        let stdout = io::stdout();
        if !stdout.is_terminal() {
            return Output::Lines(stdout);
        }
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stdout());
        let style =
            ProgressStyle::with_template("{spinner} {bytes:>10} {binary_bytes_per_sec:>12}  {wide_msg}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner());
        bar.set_style(style);
        bar.enable_steady_tick(Duration::from_millis(100));
        Output::Bar { bar, file: String::new(), done: 0 }
    }

    /// One `updated …`/`deleted …` line. False if standard output is gone.
    fn line(&mut self, line: &str) -> bool {
        match self {
            Output::Quiet => true,
            Output::Lines(out) => {
                let mut out = out.lock();
                writeln!(out, "{line}").and_then(|()| out.flush()).is_ok()
            }
            Output::Bar { bar, .. } => {
                bar.println(line);
                true
            }
        }
    }

    fn status(&self, message: String) {
        if let Output::Bar { bar, .. } = self {
            bar.set_message(message);
        }
    }

    fn progress(&mut self, path: String, offset: u64, size: Option<u64>) {
        if let Output::Bar { bar, file, done } = self {
            if *file != path {
                *file = path;
                *done = 0;
            }
            bar.inc(offset.saturating_sub(*done));
            *done = offset;
            let of = size.map(|s| format!(" of {}", HumanBytes(s))).unwrap_or_default();
            bar.set_message(format!("{file}: {}{of}", HumanBytes(offset)));
        }
    }

    fn finish(&self) {
        if let Output::Bar { bar, .. } = self {
            bar.finish_and_clear();
        }
    }
}

fn subscribe(args: SubscribeArgs) -> Result<(), Failure> {
    init_logging(args.log.as_deref())?;
    let endpoint = match &args.endpoint {
        Some(ep) => ep.clone(),
        None => {
            endpoint::check_name(&args.broker).map_err(|e| Failure::new(status::USAGE, e.to_string()))?;
            endpoint::filemq(&args.broker)
        }
    };
    let mut opts = Options::endpoint(&endpoint, args.paths, args.inbox);
    opts.window = args.window;
    if let Some(server_key) = &args.server_key {
        let keys = curve::ClientKeys::from_files(server_key, args.key.as_deref())
            .map_err(|e| Failure::new(status::USAGE, e.to_string()))?;
        opts.curve = Some(keys);
    }
    let subscriber = Subscriber::start(opts).map_err(|e| {
        let code = match e {
            filemq::Error::BadPath { .. } | filemq::Error::BadOption(_) => status::USAGE,
            _ => status::IO,
        };
        Failure::new(code, e.to_string())
    })?;

    let interrupted = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        // A second signal while we say goodbye ends the process at once.
        let _ =
            signal_hook::flag::register_conditional_shutdown(signal, status::IO as i32, interrupted.clone());
        signal_hook::flag::register(signal, interrupted.clone())
            .map_err(|e| Failure::new(status::IO, format!("cannot handle signals: {e}")))?;
    }

    let deadline = args.timeout.map(|ms| Instant::now() + Duration::from_millis(ms));
    let mut pending: HashSet<String> = subscriber.subscriptions().iter().cloned().collect();
    // Files refused for safety or given up on: `--once` then exits 5.
    let mut missing: Vec<String> = Vec::new();
    let mut output = Output::new(args.quiet);
    output.status(format!("connecting to {endpoint}"));
    let result = loop {
        if interrupted.load(Ordering::Relaxed) {
            break Ok(());
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            let waiting: Vec<&str> = pending.iter().map(String::as_str).collect();
            break Err(Failure::new(
                status::TIMEOUT,
                format!(
                    "not in sync after {} ms (waiting for {})",
                    args.timeout.unwrap_or(0),
                    waiting.join(", ")
                ),
            ));
        }
        let event = match subscriber.recv_timeout(Duration::from_millis(100)) {
            Ok(event) => event,
            Err(mpsc::RecvTimeoutError::Timeout) => continue,
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                break Err(Failure::new(status::IO, "the subscriber stopped unexpectedly"));
            }
        };
        let written = match event {
            Event::Updated { path, .. } => {
                // A file given up on may still come (a new version).
                missing.retain(|m| *m != path);
                output.line(&format!("updated {path}"))
            }
            Event::Deleted { path } => {
                missing.retain(|m| *m != path);
                output.line(&format!("deleted {path}"))
            }
            Event::Progress { path, offset, size } => {
                output.progress(path, offset, size);
                true
            }
            Event::InSync { path } => {
                pending.remove(&path);
                if args.once && pending.is_empty() {
                    if missing.is_empty() {
                        break Ok(());
                    }
                    let mut names = missing.iter().take(NAMES_LISTED).cloned().collect::<Vec<_>>().join(", ");
                    if missing.len() > NAMES_LISTED {
                        names.push_str(", …");
                    }
                    break Err(Failure::new(
                        status::INCOMPLETE,
                        format!(
                            "in sync, but {} file(s) could not be fetched or were refused for safety \
                             (--log warn says why): {names}",
                            missing.len()
                        ),
                    ));
                }
                output.status(format!("{path} in sync"));
                true
            }
            Event::Connected => {
                output.status(format!("connected to {endpoint}"));
                true
            }
            Event::Disconnected { why } => {
                output.status(format!("{why}; reconnecting"));
                true
            }
            // Logged by the library (--log warn); nothing was written.
            Event::Rejected { name, .. } => {
                missing.push(name);
                true
            }
            Event::GaveUp { path } => {
                missing.push(path);
                true
            }
            // Fetched again; a file given up on is reported as GaveUp.
            Event::IntegrityFailed { .. } => true,
            Event::Refused { why } => {
                break Err(Failure::new(status::REFUSED, format!("the broker refused us: {why}")))
            }
            Event::Failed { why } => break Err(Failure::new(status::IO, why)),
        };
        if !written {
            // The reader of our output went away (`| head`): not an error of ours.
            break Ok(());
        }
    };
    output.finish();
    subscriber.stop();
    result
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_take_decimal_and_binary_units() {
        assert_eq!(parse_size("8000000"), Ok(8_000_000));
        assert_eq!(parse_size("8MiB"), Ok(8 << 20));
        assert_eq!(parse_size("8M"), Ok(8_000_000));
        assert_eq!(parse_size("500k"), Ok(500_000));
        assert_eq!(parse_size("2 GiB"), Ok(2 << 30));
        assert!(parse_size("0").is_err());
        assert!(parse_size("MiB").is_err());
        assert!(parse_size("8 parsecs").is_err());
        assert!(parse_size("99999999999999999999").is_err());
    }
}
