//! `filemq`: mirror files published through a zbroker into a local inbox.

use clap::{Args, Parser, Subcommand};
use indicatif::{HumanBytes, ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::collections::{BTreeSet, HashSet};
use std::io::{self, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};
use zbroker_client::filemq::{self, Event, Options, Subscriber};
use zbroker_client::filemq::{Kept, Mirrored, Plan};
use zbroker_client::{curve, endpoint};
use zbroker_proto::escape::escape;

/// The exit statuses, as `--help` shows them (see `mod status`).
macro_rules! exit_status_help {
    () => {
        "Exit status:\n  0  stopped by SIGINT/SIGTERM, or in sync (--once)\n  \
        1  local I/O error (e.g. the inbox is not writable)\n  2  bad command line\n  \
        3  not in sync in time (--once --timeout)\n  \
        4  the broker refused us (RTFM/SRSLY to our greeting, or SRSLY to a PATH),\n     \
        or (--once) no broker answered within 2 s\n  \
        5  in sync (--once), but some files could not be fetched (they failed\n     \
        verification again and again), were refused for safety, or were kept\n     \
        because a local file we did not write is in the way (see --overwrite)\n  \
        6  (--once) nothing at all is published under a PATH (a misspelling?)\n  \
        7  the server cannot honour --exclude (or --dry-run): it is the original\n     \
        FileMQ or an older zbroker; nothing was changed"
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
        missing or different, removes the files it delivered that the publisher no longer \
        has, then keeps following changes until interrupted. Files of the inbox that it \
        did not write are never deleted or replaced unless --delete or --overwrite says so. Files appear whole (they are received aside, \
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
        updated PATH\n  deleted PATH\n\
        (with --dry-run: create PATH, update PATH, delete PATH, and nothing changes)\n\
        (PATH relative to the inbox, escaped: \\n, \\r, \\t, \\\\, \\xNN, \\u{XXXX} stand for\n\
        control characters, backslashes, bytes that are not UTF-8 and bidi controls,\n\
        so one line is always one change). On a terminal, a progress bar.\n\
        With --json, one JSON object per line for every event (see README).\n\
        Warnings and the summary go to standard error.\n\n",
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
    /// With --once or --dry-run: give up (exit 3) if not done after MS milliseconds
    #[arg(long, value_name = "MS")]
    timeout: Option<u64>,
    /// Change nothing: list what would be created, updated and deleted (one line each,
    /// then a summary), from a listing the broker sends without reading any file;
    /// exits once listed. Nothing is written in the inbox, not even INBOX/.filemq
    #[arg(long)]
    dry_run: bool,
    /// Credit window: bytes the broker may send ahead (e.g. 8MiB, 500k, 8000000)
    #[arg(long, value_name = "SIZE", default_value = "8000000", value_parser = parse_window)]
    window: u64,
    /// Delete files the publisher does not have even if filemq did not write them
    /// (like rsync --delete); without it, only files filemq delivered are deleted
    #[arg(long)]
    delete: bool,
    /// Replace files filemq did not write when the publisher has another version
    #[arg(long)]
    overwrite: bool,
    /// Leave out paths matching PATTERN (gitignore-style: *, ?, **, a trailing / for
    /// directories, a leading / to anchor, !PATTERN to take back), relative to each PATH;
    /// repeatable. Excluded files are neither fetched nor deleted (not even with --delete)
    #[arg(long, value_name = "PATTERN")]
    exclude: Vec<String>,
    /// Print one JSON object per event on standard output, for programs
    #[arg(long)]
    json: bool,
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
    pub const NOTHING_PUBLISHED: u8 = 6;
    pub const UNSUPPORTED: u8 = 7;
}

/// At most this many names of files that did not make it are listed when
/// `--once` exits 5.
const NAMES_LISTED: usize = 5;
/// At most this many files given up on are remembered (to forget them
/// again if a new version arrives); past it they are only counted.
const GAVE_UP_KEPT: usize = 10_000;

struct Failure {
    code: u8,
    message: String,
}

impl Failure {
    fn new(code: u8, message: impl Into<String>) -> Failure {
        Failure { code, message: message.into() }
    }
}

/// `--window`: a size (`8000000`, `500k`, `8MB`, `8MiB`), at least 1 byte.
fn parse_window(text: &str) -> Result<u64, String> {
    match zbroker_client::size::parse(text) {
        Ok(0) => Err("the window must be at least 1 byte".into()),
        Ok(size) => Ok(size),
        Err(e) => Err(e.to_string()),
    }
}

fn init_logging(level: Option<&str>) -> Result<(), Failure> {
    // Errors reach the user as our own one-line message; the rest on
    // demand, but for a handshake refused again and again (wrong CURVE
    // keys), which would otherwise look like a silent hang.
    let filter = zbroker_client::log::filter(level, "error,filemq::curve=warn")
        .map_err(|e| Failure::new(status::USAGE, e.to_string()))?;
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
    Json(io::Stdout),
    Bar { bar: ProgressBar, file: String, done: u64 },
}

impl Output {
    fn new(quiet: bool, json: bool) -> Output {
        if json {
            return Output::Json(io::stdout());
        }
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

    /// One `updated …`/`deleted …` line (`what`, then the escaped path),
    /// or its JSON form `{"event": what, "path": path, ...}`. False if
    /// standard output is gone.
    fn change(&mut self, what: &str, path: &str, size: Option<u64>) -> bool {
        let mut object = serde_json::json!({ "event": what, "path": path });
        if let Some(size) = size {
            object["size"] = size.into();
        }
        match self {
            Output::Json(_) => self.json(object),
            _ => self.line(&format!("{what} {}", escape(path.as_bytes()))),
        }
    }

    /// One JSON object, on its own line (only with `--json`).
    fn json(&mut self, object: serde_json::Value) -> bool {
        match self {
            Output::Json(out) => {
                let mut out = out.lock();
                writeln!(out, "{object}").and_then(|()| out.flush()).is_ok()
            }
            _ => true,
        }
    }

    fn line(&mut self, line: &str) -> bool {
        match self {
            Output::Quiet | Output::Json(_) => true,
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
            bar.set_message(format!("{}: {}{of}", escape(file.as_bytes()), HumanBytes(offset)));
        }
    }

    fn finish(&self) {
        if let Output::Bar { bar, .. } = self {
            bar.finish_and_clear();
        }
    }

    /// A warning for the user: standard error (above the bar on a
    /// terminal), and an event object with `--json`.
    fn warn(&mut self, quiet: bool, message: &str, object: serde_json::Value) -> bool {
        if !quiet {
            match self {
                Output::Bar { bar, .. } => bar.suspend(|| eprintln!("filemq: {message}")),
                _ => eprintln!("filemq: {message}"),
            }
        }
        self.json(object)
    }
}

/// What happened in this run, for the summary and `--once`'s exit status.
#[derive(Default)]
struct Tally {
    updated: u64,
    deleted: u64,
    /// (Dry run) paths that would be created, updated, deleted.
    planned: [u64; 3],
    /// Local files kept that the publisher does not have.
    kept_unpublished: u64,
    /// Local files kept where the publisher has another version.
    kept_differing: BTreeSet<String>,
    /// Names refused for safety: how many, and the first few (escaped).
    refused: u64,
    refused_names: Vec<String>,
    /// Files given up on (bounded); `gave_up_more` counts the rest.
    gave_up: BTreeSet<String>,
    gave_up_more: u64,
    /// Subscription paths under which nothing is published.
    unpublished_paths: BTreeSet<String>,
}

impl Tally {
    /// A file arrived or went: it no longer counts as missing.
    fn settled(&mut self, path: &str) {
        self.gave_up.remove(path);
        self.kept_differing.remove(path);
    }

    fn missing(&self) -> u64 {
        self.refused + self.gave_up.len() as u64 + self.gave_up_more + self.kept_differing.len() as u64
    }

    /// The names that did not make it, first few, escaped.
    fn missing_names(&self) -> String {
        let mut names: Vec<String> = self.refused_names.clone();
        names.extend(self.gave_up.iter().chain(&self.kept_differing).map(|p| escape(p.as_bytes())));
        let mut shown = names.iter().take(NAMES_LISTED).cloned().collect::<Vec<_>>().join(", ");
        if self.missing() > NAMES_LISTED as u64 {
            shown.push_str(", …");
        }
        shown
    }

    /// One line: what changed (or would, in a dry run), and what was kept.
    fn summary(&self, dry_run: bool) -> String {
        let [create, update, delete] = self.planned;
        let mut line = if dry_run {
            format!("dry run, nothing changed: {create} to create, {update} to update, {delete} to delete")
        } else {
            format!("{} updated, {} deleted", self.updated, self.deleted)
        };
        if self.kept_unpublished > 0 {
            line.push_str(&format!(
                "; kept {} local file(s) the publisher does not have (--delete removes them)",
                self.kept_unpublished
            ));
        }
        if !self.kept_differing.is_empty() {
            line.push_str(&format!(
                "; kept {} local file(s) the publisher has another version of (--overwrite replaces them)",
                self.kept_differing.len()
            ));
        }
        line
    }

    fn json(&self, dry_run: bool) -> serde_json::Value {
        let mut summary = serde_json::json!({
            "event": "summary",
            "updated": self.updated,
            "deleted": self.deleted,
            "kept_unpublished": self.kept_unpublished,
            "kept_differing": self.kept_differing.len(),
            "refused": self.refused,
            "gave_up": self.gave_up.len() as u64 + self.gave_up_more,
        });
        if dry_run {
            let [create, update, delete] = self.planned;
            summary["dry_run"] = true.into();
            summary["create"] = create.into();
            summary["update"] = update.into();
            summary["delete"] = delete.into();
        }
        summary
    }
}

fn subscribe(args: SubscribeArgs) -> Result<(), Failure> {
    init_logging(args.log.as_deref())?;
    if args.timeout.is_some() && !args.once && !args.dry_run {
        return Err(Failure::new(status::USAGE, "--timeout needs --once or --dry-run"));
    }
    // A dry run ends, as --once does, once everything is listed.
    let once = args.once || args.dry_run;
    let endpoint = match &args.endpoint {
        Some(ep) => {
            endpoint::validate(ep).map_err(|e| Failure::new(status::USAGE, format!("--endpoint {e}")))?;
            ep.clone()
        }
        None => {
            endpoint::check_name(&args.broker).map_err(|e| Failure::new(status::USAGE, e.to_string()))?;
            endpoint::filemq(&args.broker)
        }
    };
    let mut opts = Options::endpoint(&endpoint, args.paths, args.inbox);
    opts.window = args.window;
    opts.delete = args.delete;
    opts.overwrite = args.overwrite;
    opts.exclude = args.exclude.clone();
    opts.dry_run = args.dry_run;
    if let Some(server_key) = &args.server_key {
        let keys = curve::ClientKeys::from_files(server_key, args.key.as_deref())
            .map_err(|e| Failure::new(status::USAGE, e.to_string()))?;
        opts.curve = Some(keys);
    }
    let subscriber = Subscriber::start(opts).map_err(|e| {
        let code = match e {
            filemq::Error::BadPath { .. } | filemq::Error::BadOption(_) | filemq::Error::BadExclude(_) => {
                status::USAGE
            }
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
    let mut tally = Tally::default();
    let quiet = args.quiet;
    let mut output = Output::new(quiet, args.json);
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
            Event::Updated { path, size } => {
                tally.updated += 1;
                tally.settled(&path);
                output.change("updated", &path, Some(size))
            }
            Event::Deleted { path } => {
                tally.deleted += 1;
                tally.settled(&path);
                output.change("deleted", &path, None)
            }
            Event::Mirrored { path, what } => {
                tally.updated += 1;
                tally.settled(&path);
                let mut object = serde_json::json!({ "event": "updated", "path": path });
                match what {
                    Mirrored::Directory => object["kind"] = "directory".into(),
                    Mirrored::Link { target } => {
                        object["kind"] = "link".into();
                        object["target"] = target.into();
                    }
                    Mirrored::Attributes => object["kind"] = "attributes".into(),
                }
                match output {
                    Output::Json(_) => output.json(object),
                    _ => output.line(&format!("updated {}", escape(path.as_bytes()))),
                }
            }
            Event::Kept { path, reason } => {
                let reason = match reason {
                    Kept::NotPublished => {
                        tally.kept_unpublished += 1;
                        "not-published"
                    }
                    Kept::Differs => {
                        if tally.kept_differing.len() < GAVE_UP_KEPT {
                            tally.kept_differing.insert(path.clone());
                        }
                        "differs"
                    }
                };
                output.json(serde_json::json!({ "event": "kept", "path": path, "reason": reason }))
            }
            Event::Progress { path, offset, size } => {
                output.progress(path, offset, size);
                true
            }
            Event::InSync { path, published } => {
                pending.remove(&path);
                let mut written = output
                    .json(serde_json::json!({ "event": "in-sync", "path": path, "published": published }));
                if !published && tally.unpublished_paths.insert(path.clone()) && !once {
                    let message = format!("nothing is published under {} (yet?)", escape(path.as_bytes()));
                    written &= output.warn(quiet, &message, serde_json::Value::Null);
                }
                if once && pending.is_empty() {
                    break finish_once(&tally, args.dry_run);
                }
                output.status(format!("{} in sync", escape(path.as_bytes())));
                written
            }
            Event::Connected => {
                output.status(format!("connected to {endpoint}"));
                output.json(serde_json::json!({ "event": "connected" }))
            }
            Event::Disconnected { why } => {
                output.status(format!("{why}; reconnecting"));
                output.json(serde_json::json!({ "event": "disconnected", "why": why }))
            }
            Event::Unreachable { why } => {
                if once {
                    break Err(Failure::new(status::REFUSED, format!("no broker answers: {why}")));
                }
                let object = serde_json::json!({ "event": "unreachable", "why": why });
                output.warn(quiet, &format!("no broker answers yet: {why} (still trying)"), object)
            }
            // Logged by the library (--log warn); nothing was written.
            Event::Rejected { name, why } => {
                tally.refused += 1;
                if tally.refused_names.len() < NAMES_LISTED {
                    tally.refused_names.push(name.clone());
                }
                output.json(serde_json::json!({ "event": "refused", "name": name, "why": why }))
            }
            Event::GaveUp { path } => {
                if tally.gave_up.len() < GAVE_UP_KEPT {
                    tally.gave_up.insert(path.clone());
                } else {
                    tally.gave_up_more += 1;
                }
                output.json(serde_json::json!({ "event": "gave-up", "path": path }))
            }
            // Fetched again; a file given up on is reported as GaveUp.
            Event::IntegrityFailed { path } => {
                output.json(serde_json::json!({ "event": "integrity-failed", "path": path }))
            }
            Event::Refused { why } => {
                break Err(Failure::new(status::REFUSED, format!("the broker refused us: {why}")))
            }
            Event::Failed { why } => break Err(Failure::new(status::IO, why)),
            Event::Unsupported { why } => break Err(Failure::new(status::UNSUPPORTED, why)),
            Event::Planned { path, plan, size } => {
                let (index, word) = match plan {
                    Plan::Create => (0, "create"),
                    Plan::Update => (1, "update"),
                    Plan::Delete => (2, "delete"),
                };
                tally.planned[index] += 1;
                output.change(word, &path, size)
            }
        };
        if !written {
            // The reader of our output went away (`| head`): not an error of ours.
            break Ok(());
        }
    };
    output.finish();
    subscriber.stop();
    if args.json {
        let _ = output.json(tally.json(args.dry_run));
    } else if !quiet && result.is_ok() && (once || tally.updated + tally.deleted + tally.kept_unpublished > 0)
    {
        // A failure says it all in its one line.
        eprintln!("filemq: {}", tally.summary(args.dry_run));
    }
    result
}

/// How `--once` (and `--dry-run`) ends once every subscription is in
/// sync (listed): a dry run succeeds whatever it found to keep or refuse,
/// since it lists those too.
fn finish_once(tally: &Tally, dry_run: bool) -> Result<(), Failure> {
    if !tally.unpublished_paths.is_empty() {
        let paths: Vec<String> = tally.unpublished_paths.iter().map(|p| escape(p.as_bytes())).collect();
        let changed = if tally.deleted + tally.updated == 0 { "; nothing was changed there" } else { "" };
        return Err(Failure::new(
            status::NOTHING_PUBLISHED,
            format!("nothing is published under {} (check the path{changed})", paths.join(", ")),
        ));
    }
    if tally.missing() == 0 || dry_run {
        return Ok(());
    }
    let failed = tally.missing() - tally.kept_differing.len() as u64;
    let mut what = Vec::new();
    if failed > 0 {
        what.push(format!(
            "{failed} file(s) could not be fetched or were refused for safety (--log warn says why)"
        ));
    }
    if !tally.kept_differing.is_empty() {
        what.push(format!(
            "{} local file(s) that filemq did not write differ from the publisher's and were kept \
             (--overwrite replaces them)",
            tally.kept_differing.len()
        ));
    }
    Err(Failure::new(
        status::INCOMPLETE,
        format!("in sync, but {}: {}", what.join("; "), tally.missing_names()),
    ))
}

#[cfg(test)]
mod tests {
    use super::parse_window;

    #[test]
    fn the_window_takes_the_shared_size_units() {
        assert_eq!(parse_window("8000000"), Ok(8_000_000));
        assert_eq!(parse_window("8MiB"), Ok(8 << 20));
        assert_eq!(parse_window("8MB"), Ok(8_000_000));
        assert_eq!(parse_window("500k"), Ok(500_000));
        assert!(parse_window("0").is_err());
        assert!(parse_window("8 parsecs").is_err());
    }
}
