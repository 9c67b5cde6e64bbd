//! `zbroker`: the broker daemon and its status command.

use anyhow::{bail, Context as _};
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use zbroker::config::Invalid;
use zbroker::{config, exit, reactor};
use zbroker_client::curve::KeyPair;
use zbroker_client::endpoint;
use zbroker_services::budget::Budget;
use zbroker_services::filemq::{self, Filemq};
use zbroker_services::zpipes::{self, Zpipes};

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
        /alias` publishes one more directory at run time.\n\n\
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
    /// Publish a directory to FILEMQ subscribers of a running broker
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
        /// The broker's --state-dir, if it was given one (its control token is there)
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
        Some(Command::Keygen { path }) => keygen(&path),
        None => run(cli.run),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("zbroker: {}", one_line(&e));
            ExitCode::from(exit::code(&e))
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
    // Written aside now, put in place only once this broker holds its name
    // (binding the control endpoint): a second broker refused for the same
    // name must not replace the running one's token.
    let token_file = match &state_dir {
        Some(dir) => Some(write_control_token(dir)?),
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
    let mut startup_work = Vec::new();
    for config::Publish { dir, alias } in publish {
        let root = publishable(&dir)?;
        filemq
            .publish(root, &alias, now, &mut startup_work)
            .map_err(|e| anyhow::anyhow!("--publish: {e}"))?;
    }

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

    let mut endpoints = vec![endpoint::zpipes(&name), endpoint::filemq(&name)];
    endpoints.extend(binds);
    let settings = reactor::Settings {
        control_endpoint: endpoint::control(&name),
        name: name.clone(),
        endpoints,
        // Room for a couple of the largest replies (a READ_OK of the
        // whole pipe); more means the peer is not reading.
        // (or the most credit a FILEMQ subscriber may hold, plus a chunk).
        max_parked_bytes: (2 * pipe_limit).max(fdefaults.max_credit as usize + fdefaults.chunk_size) + 4096,
        // The largest legitimate message: a WRITE of the pipe limit, or an
        // ICANHAZ at every ceiling (a million cached files). Each service
        // then bounds every other message by its type.
        max_message_size: config::max_message_size(pipe_limit),
        control_token,
        max_connections,
        budget,
    };
    let allow_description = curve.as_ref().map(|c| c.allow.describe());
    let bound = reactor::Reactor::bind_secure(settings, vec![Box::new(zpipes), Box::new(filemq)], curve);
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
    // The FILEMQ service is the second one handed to the reactor.
    reactor.start_work(1, startup_work);
    // SIGHUP re-reads the config file: its mounts replace the running ones
    // (unless --publish flags, which override the file, were given).
    if let (Some(path), false) = (args.config.clone(), flags_publish) {
        reactor.on_reload(Box::new(move || {
            let file = config::load(&path)?;
            let mut words = vec!["MOUNTS".to_string()];
            for text in file.publish.unwrap_or_default() {
                let config::Publish { dir, alias } = config::parse_publish(&text)?;
                let root = publishable(&dir)?;
                let root = root.to_str().with_context(|| format!("{} is not valid UTF-8", root.display()))?;
                words.push(format!("{root}={alias}"));
            }
            tracing::info!("SIGHUP: reloaded {}", path.display());
            Ok(vec![words])
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
            read_allow_list(&paths)
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

/// The cascade: a FILEMQ subscription to an upstream broker, mirrored into
/// a directory (which this broker usually publishes in turn), running on a
/// thread of its own beside the event loop.
struct Upstream {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl Upstream {
    fn start(
        endpoint: &str,
        paths: Vec<String>,
        inbox: PathBuf,
        curve: Option<zbroker_client::curve::ClientKeys>,
    ) -> anyhow::Result<Upstream> {
        use std::sync::atomic::Ordering;
        use zbroker_client::escape::escape;
        use zbroker_client::filemq::{Event, Kept, Options, Subscriber};
        let options = Options { curve, ..Options::endpoint(endpoint, paths.clone(), inbox.clone()) };
        let subscriber = Subscriber::start(options)
            .with_context(|| format!("cannot mirror {endpoint} into {}", inbox.display()))?;
        tracing::info!("mirroring {} from {endpoint} into {}", paths.join(" "), inbox.display());
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopping = stop.clone();
        let endpoint = endpoint.to_string();
        let thread = std::thread::Builder::new().name("upstream".into()).spawn(move || {
            while !stopping.load(Ordering::Relaxed) {
                match subscriber.recv_timeout(Duration::from_millis(200)) {
                    Ok(Event::Updated { path, size }) => {
                        tracing::debug!(path = %escape(path.as_bytes()), size, "upstream file updated")
                    }
                    Ok(Event::Deleted { path }) => {
                        tracing::debug!(path = %escape(path.as_bytes()), "upstream file deleted")
                    }
                    Ok(Event::InSync { path, published: true }) => {
                        tracing::info!(path = %escape(path.as_bytes()), "in sync with {endpoint}")
                    }
                    Ok(Event::InSync { path, published: false }) => tracing::warn!(
                        path = %escape(path.as_bytes()),
                        "in sync with {endpoint}, which publishes nothing there"
                    ),
                    Ok(Event::Kept { path, reason }) => tracing::info!(
                        path = %escape(path.as_bytes()),
                        "kept a file of the inbox the relay did not write ({})",
                        match reason {
                            Kept::NotPublished => "upstream does not have it",
                            Kept::Differs => "upstream has another version",
                        }
                    ),
                    Ok(Event::Unreachable { why }) => {
                        tracing::warn!("upstream {endpoint}: {why}; still trying")
                    }
                    Ok(Event::Disconnected { why }) => {
                        tracing::warn!("upstream {endpoint}: {why}; reconnecting")
                    }
                    Ok(Event::Rejected { name, why }) => {
                        tracing::warn!("upstream sent {name}: refused ({why})")
                    }
                    Ok(Event::IntegrityFailed { path }) => tracing::warn!(
                        path = %escape(path.as_bytes()),
                        "upstream file failed verification; fetching again"
                    ),
                    Ok(Event::Refused { why }) | Ok(Event::Failed { why }) => {
                        tracing::error!("upstream {endpoint}: {why}; mirroring stopped");
                        return;
                    }
                    Ok(_) | Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
                }
            }
            subscriber.stop();
        })?;
        Ok(Upstream { stop, thread })
    }

    fn stop(self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = self.thread.join();
    }
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

/// The file in the state directory holding the control token.
const CONTROL_TOKEN_FILE: &str = "control-token";

/// Makes a fresh random control token, readable by this user only, in a
/// file beside the real one (renamed over it once the broker is up).
fn write_control_token(dir: &std::path::Path) -> anyhow::Result<(String, PathBuf)> {
    use std::io::{Read as _, Write as _};
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create the state directory {}", dir.display()))?;
    let mut random = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut random))
        .context("reading /dev/urandom")?;
    let token: String = random.iter().map(|b| format!("{b:02x}")).collect();
    let path = dir.join(format!(".{CONTROL_TOKEN_FILE}.{}", std::process::id()));
    let _ = std::fs::remove_file(&path);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .and_then(|mut f| f.write_all(token.as_bytes()))
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok((token, path))
}

/// Where digests are kept between runs when `--state-dir` is not given.
fn default_state_dir(name: &str) -> Option<PathBuf> {
    let base = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".local/state")))?;
    Some(base.join("zbroker").join(name))
}

/// The absolute path of a directory to publish, or why it cannot be.
fn publishable(dir: &std::path::Path) -> anyhow::Result<PathBuf> {
    let root = std::fs::canonicalize(dir).with_context(|| format!("cannot publish {}", dir.display()))?;
    if !root.is_dir() {
        bail!("cannot publish {}: not a directory", dir.display());
    }
    Ok(root)
}

/// Asks a running broker to publish one more directory.
fn publish(name: &str, dir: &std::path::Path, alias: &str, state_dir: Option<PathBuf>) -> anyhow::Result<()> {
    endpoint::check_name(name)?;
    let root = publishable(dir)?;
    let root = root.to_str().with_context(|| format!("{} is not valid UTF-8", root.display()))?;
    let state_dir = state_dir
        .or_else(|| default_state_dir(name))
        .context("no state directory: pass the broker's --state-dir")?;
    let token_path = state_dir.join(CONTROL_TOKEN_FILE);
    let token = std::fs::read_to_string(&token_path).with_context(|| {
        format!(
            "cannot read the broker's control token {} (run as the broker's user, with its --state-dir)",
            token_path.display()
        )
    })?;
    let reply = control_request(name, &["PUBLISH", token.trim(), root, alias], Duration::from_secs(2))?;
    match (reply["ok"].as_str(), reply["error"].as_str()) {
        (Some(ok), _) => {
            println!("{ok}");
            Ok(())
        }
        (_, Some(error)) => Err(exit::Refused(error.to_string()).into()),
        _ => bail!("unexpected reply from the broker: {reply}"),
    }
}

/// Sends one request to a broker's control endpoint and returns its JSON reply.
fn control_request(name: &str, words: &[&str], timeout: Duration) -> anyhow::Result<serde_json::Value> {
    let context = zmq::Context::new();
    let socket = context.socket(zmq::DEALER)?;
    socket.set_linger(0)?;
    socket.connect(&endpoint::control(name))?;
    socket.send_multipart(words.iter().map(|w| w.as_bytes()), 0)?;
    if socket.poll(zmq::POLLIN, timeout.as_millis() as i64)? == 0 {
        return Err(exit::NoBroker { name: name.to_string(), endpoint: endpoint::control(name) }.into());
    }
    let reply = socket.recv_bytes(0)?;
    serde_json::from_slice(&reply).context("the broker's reply is not JSON")
}

fn init_logging(level: Option<&str>, origin: &str) -> anyhow::Result<()> {
    let filter = zbroker_client::log::filter(level, "info").map_err(|e| match e.strip_prefix("--log ") {
        Some(rest) if origin != "--log" => Invalid(format!("{origin} {rest}")),
        _ => Invalid(e),
    })?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
    Ok(())
}

/// Asks the broker's control endpoint for its status and prints it.
fn status(name: &str, json: bool, timeout: Duration) -> anyhow::Result<()> {
    endpoint::check_name(name)?;
    let status = control_request(name, &["STATUS"], timeout)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print!("{}", describe(&status));
    }
    Ok(())
}

/// The status as a person reads it.
fn describe(s: &serde_json::Value) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "broker {} (pid {}, up {} s, version {})",
        s["name"].as_str().unwrap_or("?"),
        s["pid"],
        s["uptime_ms"].as_u64().unwrap_or(0) / 1000,
        s["version"].as_str().unwrap_or("?")
    );
    let endpoints: Vec<&str> =
        s["endpoints"].as_array().into_iter().flatten().filter_map(|e| e.as_str()).collect();
    let _ = writeln!(out, "endpoints: {}", endpoints.join(", "));
    let _ = writeln!(out, "peers: {}, dropped frames: {}", s["peers"], s["dropped_frames"]);
    let m = &s["memory"];
    if m.is_object() {
        let holders: Vec<String> = m["holders"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|h| {
                format!(
                    "connection {} ({}) {} bytes",
                    h["connection"],
                    h["what"].as_str().unwrap_or("?"),
                    h["bytes"]
                )
            })
            .collect();
        let _ = writeln!(
            out,
            "memory: {} of {} bytes held (peak {}){}{}",
            m["used"],
            m["limit"],
            m["peak"],
            match m["at_limit"].as_bool() {
                Some(true) => format!(", AT THE BUDGET: {} requests wait for room", m["waiting"]),
                _ => String::new(),
            },
            if holders.is_empty() {
                String::new()
            } else {
                format!("; holding most: {}", holders.join(", "))
            }
        );
    }
    if let Some(longest) = s["longest_pass_ms"].as_f64() {
        let cause = match (s["longest_pass_cause"].as_str(), s["longest_pass_cause_ms"].as_f64()) {
            (Some(what), Some(ms)) => format!(": {what} took {ms:.2} ms"),
            _ => String::new(),
        };
        let _ = writeln!(
            out,
            "event loop: {} passes, the longest {longest:.2} ms at {:.1} s{cause}",
            s["passes"],
            s["longest_pass_at_ms"].as_u64().unwrap_or(0) as f64 / 1000.0
        );
    }
    let z = &s["services"]["zpipes"];
    if z.is_object() {
        let _ = writeln!(
            out,
            "zpipes: {} connections, {} bytes queued (peak {}, limit {} per pipe), {} bytes moved, {} malformed frames",
            z["connections"], z["queued_bytes"], z["peak_queued_bytes"], z["pipe_limit"], z["bytes_moved"], z["malformed_frames"]
        );
        for pipe in z["pipes"].as_array().into_iter().flatten() {
            let yes = |v: &serde_json::Value| {
                if v.as_bool() == Some(true) {
                    "attached"
                } else {
                    "none"
                }
            };
            let _ = writeln!(
                out,
                "  pipe {:?}: reader {}, writer {}, {} bytes queued",
                pipe["name"].as_str().unwrap_or("?"),
                yes(&pipe["reader"]),
                yes(&pipe["writer"]),
                pipe["queued_bytes"]
            );
        }
    }
    let f = &s["services"]["filemq"];
    if f.is_object() {
        let _ = writeln!(
            out,
            "filemq: {} subscribers, {} files and {} bytes sent, {} deletes sent, {} malformed frames",
            f["subscribers"].as_array().map_or(0, Vec::len),
            f["files_sent"],
            f["bytes_sent"],
            f["deletes_sent"],
            f["malformed_frames"]
        );
        for mount in f["mounts"].as_array().into_iter().flatten() {
            let state = match (mount["error"].as_str(), mount["scanned"].as_bool()) {
                (Some(error), _) => format!("error: {error}"),
                (None, Some(true)) => format!("{} files, {} bytes", mount["files"], mount["bytes"]),
                _ => "scanning".to_string(),
            };
            let _ = writeln!(
                out,
                "  mount {} <- {} ({state}{})",
                mount["alias"].as_str().unwrap_or("?"),
                mount["root"].as_str().unwrap_or("?"),
                if mount["watching"].as_bool() == Some(false) { ", polling" } else { "" }
            );
        }
        for sub in f["subscribers"].as_array().into_iter().flatten() {
            let paths: Vec<&str> =
                sub["subscriptions"].as_array().into_iter().flatten().filter_map(|p| p.as_str()).collect();
            let _ = writeln!(
                out,
                "  subscriber #{}: {}, {} bytes sent, {} queued, credit {}{}",
                sub["connection"],
                paths.join(" "),
                sub["bytes_sent"],
                sub["queued"],
                sub["credit"],
                sub["sending"].as_str().map(|f| format!(", sending {f}")).unwrap_or_default()
            );
        }
    }
    out
}
