//! `zbroker`: the broker daemon and its status command.

mod cascade;
mod control;

use anyhow::{bail, Context as _};
use cascade::Upstream;
use clap::{Args, Parser, Subcommand};
use control::*;
use std::os::unix::ffi::{OsStrExt as _, OsStringExt as _};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;
use zbroker::config::Invalid;
use zbroker::{config, exit, reactor};
use zbroker_client::curve::KeyPair;
use zbroker_client::endpoint;
use zbroker_proto::escape::{escape, unescape};
use zbroker_services::budget::Budget;
use zbroker_services::filemq::mounts::{self, Origin};
use zbroker_services::filemq::{self, Filemq};
use zbroker_services::zpipes::{self, Zpipes};
use zbroker_services::{CommandFor, Service};

/// Examples (each comment line says what the command under it does) and
/// the exit statuses.
const EXAMPLES: &str = "Examples:\n  \
    # run the broker \"local\"\n  \
    zbroker\n  \
    # also listen on TCP\n  \
    zbroker hub --bind tcp://127.0.0.1:5670\n  \
    # publish ./outbox as / over TCP\n  \
    zbroker --publish ./outbox --bind 'tcp://*:5670'\n  \
    # cascade: mirror the hub into ./mirror and publish the mirror\n  \
    zbroker relay --upstream tcp://hub:5670 --subscribe / \\\n      \
    --inbox ./mirror --publish ./mirror\n  \
    # machine-readable status\n  \
    zbroker status hub --json\n  \
    # publish one more directory on the running hub (kept across restarts)\n  \
    zbroker publish hub /srv/photos /photos\n  \
    zbroker unpublish hub /photos\n  \
    # CURVE key pair: hub (secret) and hub.pub\n  \
    zbroker keygen /etc/zbroker/hub\n  \
    # TCP clients then need hub.pub and an allowed key\n  \
    zbroker hub --bind 'tcp://*:5670' --curve-secret-key /etc/zbroker/hub \\\n      \
    --allow-client-key /etc/zbroker/clients\n";

#[derive(Parser)]
#[command(
    name = "zbroker",
    version,
    about = "A ZeroMQ broker hosting ZPIPES named pipes and FILEMQ file distribution",
    long_about = "A ZeroMQ broker hosting ZPIPES named pipes and FILEMQ file distribution.\n\n\
        `zbroker NAME` runs the broker called NAME (default `local`). Local clients find it at \
        ipc://@/zpipes/NAME (the endpoint the original C zpipes_client uses) and \
        ipc://@/filemq/NAME; --bind adds more endpoints (tcp://...). Every endpoint serves every \
        service: the protocol signature at the start of each message picks the service. \
        --publish DIR[=/alias] publishes a directory to FILEMQ subscribers: every file in it, \
        and every later create, change and delete, reaches them. A second broker with the same \
        name refuses to start. SIGINT or SIGTERM stops it cleanly.\n\n\
        `zbroker status NAME` asks a running broker what it is doing; `zbroker publish NAME DIR \
        /alias` publishes one more directory at run time, kept in the broker's state directory \
        across reloads and restarts until `zbroker unpublish NAME /alias`.\n\n\
        CURVE: `zbroker keygen PATH` makes a key pair; --curve-secret-key PATH then requires \
        CURVE on the TCP endpoints (clients need PATH.pub, and with --allow-client-key a key \
        of their own that is listed; SIGHUP re-reads the list). The ipc:// endpoints stay \
        open to local processes unless --curve-ipc.",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Args)]
struct RunArgs {
    /// Name of this broker; clients find it by this name [default: local]
    #[arg(value_name = "NAME")]
    name: Option<String>,
    /// Also listen on ENDPOINT (repeatable), e.g. tcp://127.0.0.1:5670 or tcp://*:* for any free port
    #[arg(long = "bind", value_name = "ENDPOINT")]
    bind: Vec<String>,
    /// Forget a client silent for this many milliseconds [default: 60000]
    #[arg(long, value_name = "MS")]
    expiry: Option<u64>,
    /// Most bytes queued for one pipe's reader, at least 1MiB (MB = 10^6 bytes, MiB = 2^20)
    /// [default: 8MiB]
    #[arg(long, value_name = "SIZE")]
    pipe_limit: Option<String>,
    /// Most bytes all peers together may make the broker hold (pipe queues, pipelined writes,
    /// replies, file chunks), at least 1MiB [default: the lesser of 1GiB and a quarter of the
    /// machine's (or cgroup's) memory]
    #[arg(long, value_name = "SIZE")]
    memory_limit: Option<String>,
    /// Most clients served at once; more get their protocol's refusal [default: 10000]
    #[arg(long, value_name = "N")]
    max_connections: Option<usize>,
    /// Publish DIR to FILEMQ subscribers as virtual path /alias (repeatable) [default alias: /]
    #[arg(long, value_name = "DIR[=/alias]")]
    publish: Vec<String>,
    /// A file is sent once unchanged for this many milliseconds [default: 1000]
    #[arg(long, value_name = "MS")]
    stable_age: Option<u64>,
    /// Keep file digests here between runs, so a restart does not rehash an unchanged tree
    /// [default: $XDG_STATE_HOME/zbroker/NAME or ~/.local/state/zbroker/NAME]
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Cascade: mirror the FILEMQ broker at ENDPOINT (with --subscribe and --inbox)
    #[arg(long, value_name = "ENDPOINT", requires = "inbox")]
    upstream: Option<String>,
    /// Cascade: virtual path to mirror from --upstream (repeatable) [default: /]
    #[arg(long, value_name = "PATH", requires = "upstream")]
    subscribe: Vec<String>,
    /// Cascade: the upstream broker's CURVE public key file (its .pub), when it requires CURVE
    #[arg(long, value_name = "FILE", requires = "upstream")]
    upstream_server_key: Option<PathBuf>,
    /// Cascade: this broker's client secret key file for the upstream [default: a fresh key pair]
    #[arg(long, value_name = "PATH", requires = "upstream_server_key")]
    upstream_key: Option<PathBuf>,
    /// Cascade: directory the --upstream files go into (publish it too to relay them)
    #[arg(long, value_name = "DIR", requires = "upstream")]
    inbox: Option<PathBuf>,
    /// CURVE: this broker's secret key file (`zbroker keygen PATH`); its TCP endpoints then
    /// require CURVE clients that know the public key (PATH.pub)
    #[arg(long, value_name = "PATH")]
    curve_secret_key: Option<PathBuf>,
    /// CURVE: allow only clients whose public key is in FILE, or in any file in DIR
    /// (repeatable; re-read on SIGHUP) [default: any client that knows the server key]
    #[arg(long, value_name = "FILE|DIR")]
    allow_client_key: Vec<PathBuf>,
    /// CURVE: require it on the local ipc:// endpoints too (otherwise they stay open to local
    /// processes)
    #[arg(long)]
    curve_ipc: bool,
    /// Read settings from a TOML file; flags override it
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Log level: error, warn, info, debug, trace or off, or a filter such as info,zbroker=debug
    /// [default: info, or RUST_LOG]
    #[arg(long, value_name = "LEVEL")]
    log: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Show what a running broker is doing: endpoints, pipes, queued bytes
    Status {
        /// Name of the broker to ask
        #[arg(value_name = "NAME", default_value = endpoint::DEFAULT_BROKER)]
        name: String,
        /// Print the status as JSON, for programs
        #[arg(long)]
        json: bool,
        /// Give up after this many milliseconds without an answer
        #[arg(long, value_name = "MS", default_value_t = 2000)]
        timeout: u64,
    },
    /// Write a new CURVE key pair: PATH (the secret key, mode 0600) and PATH.pub (the public key)
    Keygen {
        /// Where the secret key goes; the public key goes to PATH.pub. Neither may exist.
        #[arg(value_name = "PATH")]
        path: PathBuf,
    },
    /// Publish a directory to FILEMQ subscribers of a running broker, until unpublished (kept in
    /// its state directory across reloads and restarts)
    Publish {
        /// Name of the broker
        #[arg(value_name = "NAME")]
        name: String,
        /// Directory to publish
        #[arg(value_name = "DIR")]
        dir: PathBuf,
        /// Virtual path subscribers see it under, e.g. / or /photos
        #[arg(value_name = "ALIAS")]
        alias: String,
        /// Read the control token from DIR [default: the state directory the broker says it uses]
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
    },
    /// Stop publishing a directory that `zbroker publish` published
    Unpublish {
        /// Name of the broker
        #[arg(value_name = "NAME")]
        name: String,
        /// The virtual path it was published as, e.g. /photos
        #[arg(value_name = "ALIAS")]
        alias: String,
        /// Read the control token from DIR [default: the state directory the broker says it uses]
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    use clap::{CommandFactory as _, FromArgMatches as _};
    zbroker_client::allocator::keep_freed_buffers();
    let matches = Cli::command().after_help(format!("{EXAMPLES}\n{}", exit::TABLE)).get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let result = match cli.command {
        Some(Command::Status { name, json, timeout }) => status(&name, json, Duration::from_millis(timeout)),
        Some(Command::Publish { name, dir, alias, state_dir }) => publish(&name, &dir, &alias, state_dir),
        Some(Command::Unpublish { name, alias, state_dir }) => unpublish(&name, &alias, state_dir),
        Some(Command::Keygen { path }) => keygen(&path),
        None => run(cli.run),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("zbroker: {}", one_line(&e));
            ExitCode::from(exit::code(e.chain()))
        }
    }
}

/// The error and its causes on one line, each said once: a cause whose
/// text its context already quotes (`cannot write key file x: No such
/// file…` over `No such file…`) is not repeated.
fn one_line(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line.replace('\n', " ")
}

/// Where a setting came from, for messages: the flag, or the file's key.
fn origin(flag: &str, from_flag: bool, config: Option<&std::path::Path>, key: &str) -> String {
    match (from_flag, config) {
        (false, Some(path)) => format!("config file {}: {key}", path.display()),
        _ => flag.to_string(),
    }
}

/// `--memory-limit` (or the file's `memory_limit`), else the default.
fn memory_limit(
    flag: Option<&str>,
    file: Option<u64>,
    cfg: Option<&std::path::Path>,
) -> anyhow::Result<usize> {
    let origin = origin("--memory-limit", flag.is_some(), cfg, "memory_limit");
    let bytes = match flag {
        Some(text) => {
            Some(zbroker_client::size::parse(text).map_err(|e| Invalid(format!("--memory-limit {e}")))?)
        }
        None => file,
    };
    match bytes {
        None => Ok(zbroker::memory::default_limit()),
        Some(n) if n < zbroker::memory::MIN_LIMIT as u64 => {
            Err(Invalid(format!("{origin} must be at least 1MiB, not {}", zbroker_client::size::format(n)))
                .into())
        }
        Some(n) => Ok(usize::try_from(n).unwrap_or(usize::MAX)),
    }
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    let file = match &args.config {
        Some(path) => config::load(path)?,
        None => config::FileConfig::default(),
    };
    let cfg = args.config.as_deref();
    let name = args.name.or(file.name).unwrap_or_else(|| endpoint::DEFAULT_BROKER.to_string());
    endpoint::check_name(&name)?;
    let log_from_flag = args.log.is_some();
    let log = args.log.or(file.log);
    init_logging(log.as_deref(), &origin("--log", log_from_flag, cfg, "log"))?;

    let defaults = zpipes::Config::default();
    let limit_origin = origin("--pipe-limit", args.pipe_limit.is_some(), cfg, "pipe_limit");
    let flag_limit = match &args.pipe_limit {
        Some(text) => {
            Some(zbroker_client::size::parse(text).map_err(|e| Invalid(format!("--pipe-limit {e}")))?)
        }
        None => None,
    };
    let pipe_limit = match flag_limit.or(file.pipe_limit) {
        None => defaults.pipe_limit,
        // Clients send and ask for chunks of up to 1 MiB.
        Some(n) if n < zbroker::memory::MIN_LIMIT as u64 => {
            return Err(Invalid(format!(
                "{limit_origin} must be at least 1MiB, not {}",
                zbroker_client::size::format(n)
            ))
            .into())
        }
        Some(n) if n > u32::MAX as u64 => {
            return Err(
                Invalid(format!("{limit_origin} can be at most 4GiB (a READ's size is 32 bits)")).into()
            )
        }
        Some(n) => n as usize,
    };
    let expiry = match args.expiry.or(file.expiry) {
        None => defaults.expiry,
        Some(0) => {
            let origin = origin("--expiry", args.expiry.is_some(), cfg, "expiry");
            return Err(Invalid(format!("{origin} must be at least 1 ms")).into());
        }
        Some(ms) => Duration::from_millis(ms),
    };
    // Pipelined writes may hold as much again as the pipe, and at least
    // the default, so a client's usual window always fits.
    let mailbox_bytes = pipe_limit.max(defaults.mailbox_bytes);
    if expiry < Duration::from_secs(3) {
        tracing::warn!(
            "--expiry {} ms: zbroker clients ping once a second while they wait; \
             an expiry under 3 s may drop clients that are only waiting",
            expiry.as_millis()
        );
    }
    let memory_limit = memory_limit(args.memory_limit.as_deref(), file.memory_limit, cfg)?;
    if (memory_limit as u64) < pipe_limit as u64 {
        tracing::warn!(
            "the memory limit ({memory_limit} bytes) is below the pipe limit ({pipe_limit} bytes): \
             a pipe will never hold a full pipe limit, and a large WRITE moves only as fast as READs ask"
        );
    }
    let budget = Budget::new(memory_limit);
    let zpipes =
        Zpipes::new(zpipes::Config { expiry, pipe_limit, mailbox_bytes, budget: budget.clone(), ..defaults });

    let fdefaults = filemq::Config::default();
    let stable_age = args.stable_age.or(file.stable_age).map_or(fdefaults.stable_age, Duration::from_millis);
    let state_dir = args.state_dir.or(file.state_dir).or_else(|| default_state_dir(&name));
    // Absolute: the status tells it to `zbroker publish`, which may run
    // elsewhere.
    let state_dir = match state_dir {
        Some(dir) => {
            Some(std::path::absolute(&dir).with_context(|| format!("state directory {}", dir.display()))?)
        }
        None => None,
    };
    // Written aside now, put in place only once this broker holds its name
    // (binding the control endpoint): a second broker refused for the same
    // name must not replace the running one's token.
    let token_file = match &state_dir {
        Some(dir) => Some(write_control_token(dir, &name)?),
        None => None,
    };
    let control_token = match &token_file {
        Some((token, _)) => Some(token.clone()),
        None => {
            tracing::warn!("no state directory (no HOME, no --state-dir): `zbroker publish` is refused");
            None
        }
    };
    let mut filemq = Filemq::new(filemq::Config {
        expiry,
        stable_age,
        state_dir: state_dir.clone(),
        budget: budget.clone(),
        ..fdefaults.clone()
    });
    let flags_publish = !args.publish.is_empty();
    let publish_texts = if flags_publish { args.publish } else { file.publish.clone().unwrap_or_default() };
    let mut publish = Vec::new();
    for text in publish_texts {
        publish.push(
            config::parse_publish(&text).map_err(|e| {
                Invalid(format!("{} {e}", origin("--publish", flags_publish, cfg, "publish")))
            })?,
        );
    }
    // Check every endpoint before anything is created or bound.
    let bind_from_flags = !args.bind.is_empty();
    let binds = if bind_from_flags { args.bind } else { file.bind.unwrap_or_default() };
    for bind in &binds {
        endpoint::validate_bind(bind)
            .map_err(|e| Invalid(format!("{} {e}", origin("--bind", bind_from_flags, cfg, "bind"))))?;
    }
    let upstream_from_flag = args.upstream.is_some();
    let upstream = args.upstream.or(file.upstream);
    if let Some(upstream) = &upstream {
        endpoint::validate(upstream).map_err(|e| {
            Invalid(format!("{} {e}", origin("--upstream", upstream_from_flag, cfg, "upstream")))
        })?;
    }
    let inbox_from_flag = args.inbox.is_some();
    let inbox = args.inbox.or(file.inbox);
    // A relay publishes its inbox: it must exist before it is published.
    if let (Some(_), Some(inbox)) = (&upstream, &inbox) {
        std::fs::create_dir_all(inbox).with_context(|| {
            format!(
                "{} {}: cannot create it",
                origin("--inbox", inbox_from_flag, cfg, "inbox"),
                inbox.display()
            )
        })?;
    }
    let now = std::time::Instant::now();
    for config::Publish { dir, alias } in publish {
        let root = publishable(&dir)?;
        filemq
            .publish_at_start(root, &alias, Origin::Config, now)
            .map_err(|e| anyhow::anyhow!("--publish: {e}"))?;
    }
    // The run-time mounts to write back, if some of the kept ones were
    // dropped.
    let runtime_kept = match &state_dir {
        Some(dir) => restore_runtime_mounts(&mut filemq, dir, now)?,
        None => None,
    };

    let max_connections = match args.max_connections.or(file.max_connections) {
        Some(0) => {
            let origin = origin("--max-connections", args.max_connections.is_some(), cfg, "max_connections");
            return Err(Invalid(format!("{origin} must be at least 1")).into());
        }
        Some(n) => n,
        None => DEFAULT_MAX_CONNECTIONS,
    };
    raise_open_file_limit(max_connections);
    let mut paths =
        if args.subscribe.is_empty() { file.subscribe.unwrap_or_default() } else { args.subscribe };
    if paths.is_empty() {
        paths.push("/".to_string());
    }
    let cascade = match (upstream, inbox) {
        (Some(upstream), Some(inbox)) => {
            let keys_from_flags = args.upstream_server_key.is_some();
            let upstream_key = args.upstream_key.or(file.upstream_key);
            let curve = match args.upstream_server_key.or(file.upstream_server_key) {
                Some(server_key) => Some(
                    zbroker_client::curve::ClientKeys::from_files(&server_key, upstream_key.as_deref())
                        .map_err(|e| {
                            let origin =
                                origin("--upstream-server-key", keys_from_flags, cfg, "upstream_server_key");
                            Invalid(format!("{origin}: {e}"))
                        })?,
                ),
                None if upstream_key.is_some() => {
                    return Err(Invalid(
                        "upstream_key needs upstream_server_key (the upstream broker's .pub)".into(),
                    )
                    .into())
                }
                None => None,
            };
            Some(Upstream::start(&upstream, paths, inbox, curve)?)
        }
        (Some(_), None) => {
            return Err(Invalid("--upstream needs --inbox DIR (the directory to mirror into)".into()).into())
        }
        (None, Some(_)) => {
            return Err(Invalid("--inbox is for --upstream ENDPOINT (the broker to mirror)".into()).into())
        }
        (None, None) => None,
    };

    let curve_ipc = args.curve_ipc || file.curve_ipc.unwrap_or(false);
    let allow_flags = !args.allow_client_key.is_empty();
    let allow_paths =
        if allow_flags { args.allow_client_key } else { file.allow_client_key.unwrap_or_default() };
    let curve = match args.curve_secret_key.or(file.curve_secret_key) {
        Some(path) => {
            let keys = KeyPair::read(&path)?;
            warn_if_readable_by_others(&path);
            Some(reactor::Curve {
                secret_key: keys.secret,
                allow: read_allow_list(&allow_paths)?,
                ipc: curve_ipc,
            })
        }
        None if !allow_paths.is_empty() => {
            return Err(
                Invalid("--allow-client-key needs --curve-secret-key (the broker's own key)".into()).into()
            )
        }
        None if curve_ipc => {
            return Err(Invalid("--curve-ipc needs --curve-secret-key (the broker's own key)".into()).into())
        }
        None => None,
    };
    let curve_on = curve.is_some();

    let settings = reactor::Settings {
        control_endpoint: endpoint::control(&name),
        name: name.clone(),
        binds,
        control_token,
        state_dir: state_dir.clone(),
        max_connections,
        budget,
    };
    let allow_description = curve.as_ref().map(|c| c.allow.describe());
    // The services, each registered by one line.
    let services: Vec<Box<dyn Service>> = vec![Box::new(zpipes), Box::new(filemq)];
    let bound = reactor::Reactor::bind_secure(settings, services, curve);
    if let Some((_, aside)) = &token_file {
        let result = match &bound {
            Ok(_) => std::fs::rename(aside, aside.with_file_name(CONTROL_TOKEN_FILE)),
            Err(_) => std::fs::remove_file(aside),
        };
        if let Err(e) = result {
            tracing::warn!("control token {}: {e}", aside.display());
        }
    }
    let mut reactor = bound?;
    // Only once this broker holds its name: a second one refused for it
    // must not rewrite the running one's file.
    if let (Some(kept), Some(dir)) = (runtime_kept, &state_dir) {
        if let Err(e) = mounts::save(&dir.join(mounts::FILE_NAME), &mounts::format(&kept)) {
            tracing::warn!("run-time mounts: {e}");
        }
    }
    // SIGHUP re-reads the config file: its mounts replace the running ones
    // (unless --publish flags, which override the file, were given).
    if let (Some(path), false) = (args.config.clone(), flags_publish) {
        reactor.on_reload(Box::new(move || {
            let file = config::load(&path)?;
            let mut mounts = Vec::new();
            for text in file.publish.unwrap_or_default() {
                let config::Publish { dir, alias } = config::parse_publish(&text)?;
                mounts.push(filemq::command::ConfigMount { dir: publishable(&dir)?, alias });
            }
            tracing::info!("SIGHUP: reloaded {}", path.display());
            // Typed, never words: a directory that is not UTF-8 stays a path.
            let command = filemq::command::Command::ReplaceMounts(mounts);
            Ok(vec![CommandFor { service: filemq::NAME, command: Box::new(command) }])
        }));
    }
    // SIGHUP re-reads the allowed client keys: the --allow-client-key
    // files and directories, or the config file's list.
    if curve_on {
        let config_path = args.config.clone();
        reactor.on_reload_allow(Box::new(move || {
            let paths = match (&config_path, allow_flags) {
                (Some(path), false) => config::load(path)?.allow_client_key.unwrap_or_default(),
                _ => allow_paths.clone(),
            };
            Ok(read_allow_list(&paths)?)
        }));
    }
    if let Some(allow) = allow_description {
        tracing::info!(
            "CURVE on {} ({allow}){}",
            reactor.curve_endpoints().join(", "),
            if curve_ipc { "" } else { "; ipc:// endpoints open to local processes" }
        );
    }
    tracing::info!(
        "zbroker {name} ready at {} (pipe limit {pipe_limit} bytes, memory limit {memory_limit} bytes, expiry {} ms)",
        reactor.endpoints().join(", "),
        expiry.as_millis()
    );
    reactor.run()?;
    if let Some(cascade) = cascade {
        cascade.stop();
    }
    tracing::info!("zbroker {name} stopped");
    Ok(())
}

/// The allow-list from key files and directories of them (none: anyone).
fn read_allow_list(paths: &[PathBuf]) -> anyhow::Result<reactor::Allow> {
    if paths.is_empty() {
        return Ok(reactor::Allow::Anyone);
    }
    let mut keys = std::collections::HashSet::new();
    for path in paths {
        keys.extend(zbroker_client::curve::read_public_keys(path)?);
    }
    if keys.is_empty() {
        tracing::warn!("--allow-client-key: no keys found: every CURVE client is refused");
    }
    Ok(reactor::Allow::Only(keys))
}

/// A secret key others can read is no secret: say so (but go on).
fn warn_if_readable_by_others(path: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path) {
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!("{} can be read by other users: chmod 600 it", path.display());
        }
    }
}

/// `zbroker keygen PATH`: a new key pair in PATH and PATH.pub.
fn keygen(path: &std::path::Path) -> anyhow::Result<()> {
    let pair = KeyPair::generate()?;
    let public = pair.write(path)?;
    println!("secret key: {} (keep it private)", path.display());
    println!("public key: {} {}", public.display(), zbroker_client::curve::z85_encode(&pair.public));
    Ok(())
}

const DEFAULT_MAX_CONNECTIONS: usize = 10_000;

/// Each connection is a file descriptor in libzmq's I/O thread: raise the
/// soft limit (often 1024) towards the hard one so the connection limit,
/// not the descriptor limit, is what clients meet.
fn raise_open_file_limit(connections: usize) {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit write and read the struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return;
        }
        let wanted = (connections as libc::rlim_t).saturating_add(256).min(limit.rlim_max);
        if wanted > limit.rlim_cur {
            limit.rlim_cur = wanted;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                tracing::warn!("cannot raise the open-file limit to {wanted}: clients may be refused by the system first");
            }
        }
    }
}

/// Publishes the run-time mounts kept in the state directory. One whose
/// alias the command line or config file now publishes is dropped with a
/// warning (they win); the list to save then comes back. One whose
/// directory is missing stays published (status shows the error;
/// subscribers delete nothing for it) until `zbroker unpublish`.
fn restore_runtime_mounts(
    filemq: &mut Filemq,
    dir: &Path,
    now: std::time::Instant,
) -> anyhow::Result<Option<Vec<mounts::Saved>>> {
    let saved = mounts::load(&dir.join(mounts::FILE_NAME))
        .map_err(|e| anyhow::anyhow!("run-time mounts: {e} (fix the file, or remove it to forget them)"))?;
    let mut dropped = false;
    for m in saved {
        let root = escape(m.root.as_os_str().as_bytes());
        match filemq.publish_at_start(m.root.clone(), &m.alias, Origin::Runtime, now) {
            Ok(()) if !m.root.is_dir() => tracing::warn!(
                "run-time mount {}: {root} is not a directory now; it stays published (nothing is deleted \
                 downstream) until it is back or `zbroker unpublish`",
                m.alias
            ),
            Ok(()) => tracing::info!("run-time mount {} ({root}) restored", m.alias),
            Err(why) => {
                tracing::warn!(
                    "run-time mount {} ({root}) dropped: {why}, by the command line or config file",
                    m.alias
                );
                dropped = true;
            }
        }
    }
    Ok(dropped.then(|| filemq.runtime_mounts()))
}

/// The absolute path of a directory to publish, or why it cannot be.
fn publishable(dir: &std::path::Path) -> anyhow::Result<PathBuf> {
    let root = std::fs::canonicalize(dir).with_context(|| format!("cannot publish {}", dir.display()))?;
    if !root.is_dir() {
        bail!("cannot publish {}: not a directory", dir.display());
    }
    Ok(root)
}

fn init_logging(level: Option<&str>, origin: &str) -> anyhow::Result<()> {
    let filter = zbroker_client::log::filter(level, "info").map_err(|e| match e.origin {
        // The level came from the config file, not the command line.
        "--log" if origin != "--log" => Invalid(format!("{origin} {:?}: {}", e.text, e.problem)),
        _ => Invalid(e.to_string()),
    })?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
    Ok(())
}
