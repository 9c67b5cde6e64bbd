//! The broker's settings: a TOML file (`--config FILE`) where every flag has
//! a key, overridden by the flags themselves.
//!
//! ```toml
//! name = "local"
//! bind = ["tcp://127.0.0.1:5670"]
//! expiry = 60000          # ms
//! pipe_limit = "8MiB"     # or "8MB" (10^6), or a number of bytes
//! memory_limit = "1GiB"   # what peers may make the broker hold, in all
//! log = "info"
//! max_connections = 10000
//! publish = ["/srv/outbox", "/srv/photos=/photos"]   # DIR[=/alias]
//! stable_age = 1000       # ms a file must stay unchanged before it is sent
//! state_dir = "/var/lib/zbroker"   # digests kept between runs
//! upstream = "tcp://hub:5670"      # cascade: mirror this broker's files...
//! subscribe = ["/"]                # ...under these paths...
//! inbox = "/srv/outbox"            # ...into this directory
//! curve_secret_key = "/etc/zbroker/server"     # CURVE on the TCP endpoints
//! allow_client_key = ["/etc/zbroker/clients"]  # .pub files or directories of them
//! curve_ipc = false                # CURVE on the local ipc:// endpoints too
//! upstream_server_key = "/etc/zbroker/hub.pub"  # cascade from a CURVE hub: its public key...
//! upstream_key = "/etc/zbroker/relay"          # ...and this relay's secret key
//! ```
//!
//! Errors are one line naming the file, the key and what is accepted.

use serde::Deserialize;
use std::path::{Path, PathBuf};
use zbroker_client::size;

/// Why the command line or the config file cannot be used: the program
/// exits with status 2 (see `crate::exit`).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

macro_rules! invalid {
    ($($arg:tt)*) => { Invalid(format!($($arg)*)) };
}

#[derive(Debug, Default, PartialEq)]
pub struct FileConfig {
    pub name: Option<String>,
    pub bind: Option<Vec<String>>,
    pub expiry: Option<u64>,
    pub pipe_limit: Option<u64>,
    pub memory_limit: Option<u64>,
    pub log: Option<String>,
    pub max_connections: Option<usize>,
    pub publish: Option<Vec<String>>,
    pub stable_age: Option<u64>,
    pub state_dir: Option<PathBuf>,
    pub upstream: Option<String>,
    pub subscribe: Option<Vec<String>>,
    pub inbox: Option<PathBuf>,
    pub upstream_server_key: Option<PathBuf>,
    pub upstream_key: Option<PathBuf>,
    pub curve_secret_key: Option<PathBuf>,
    pub allow_client_key: Option<Vec<PathBuf>>,
    pub curve_ipc: Option<bool>,
}

/// Every key of the file, in the order the documentation lists them.
pub const KEYS: &[&str] = &[
    "name",
    "bind",
    "expiry",
    "pipe_limit",
    "memory_limit",
    "log",
    "max_connections",
    "publish",
    "stable_age",
    "state_dir",
    "upstream",
    "subscribe",
    "inbox",
    "upstream_server_key",
    "upstream_key",
    "curve_secret_key",
    "allow_client_key",
    "curve_ipc",
];

/// A `--publish DIR[=/alias]` argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    pub dir: PathBuf,
    pub alias: String,
}

/// Parses `DIR` (published as `/`) or `DIR=/alias`. An alias must start
/// with `/`; `DIR=photos` is refused, unless a directory of that very
/// name exists.
pub fn parse_publish(text: &str) -> Result<Publish, Invalid> {
    let (dir, alias) = match text.rsplit_once('=') {
        Some((dir, alias)) if alias.starts_with('/') => (dir, alias.to_string()),
        Some((_, alias)) if !Path::new(text).is_dir() => {
            return Err(invalid!(
                "{text:?}: the alias {alias:?} must start with '/' (use DIR or DIR=/alias, e.g. ./outbox=/photos)"
            ))
        }
        _ => (text, "/".to_string()),
    };
    if dir.is_empty() {
        return Err(invalid!("{text:?}: no directory (use DIR or DIR=/alias, e.g. ./outbox=/photos)"));
    }
    Ok(Publish { dir: dir.into(), alias })
}

/// Reads the config file. Every error is one line naming the file, the
/// key and what the key accepts.
pub fn load(path: &Path) -> Result<FileConfig, Invalid> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| invalid!("cannot read config file {}: {e}", path.display()))?;
    parse(&text).map_err(|why| invalid!("config file {}: {why}", path.display()))
}

/// Why the config file's text is not a config; one line, without the file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("line {line}: {message} (not valid TOML)")]
    TomlAt { line: usize, message: String },
    #[error("{message} (not valid TOML)")]
    Toml { message: String },
    /// `key = kind`: a value of the wrong type for the key.
    #[error("{key} = {kind}: expected {expected}")]
    Type { key: String, kind: &'static str, expected: &'static str },
    #[error("{key}: {error}")]
    Size { key: String, error: size::SizeError },
    #[error("unknown key {0:?} (the keys are {keys})", keys = KEYS.join(", "))]
    UnknownKey(String),
}

/// Parses the config file's text.
pub fn parse(text: &str) -> Result<FileConfig, ConfigError> {
    let table: toml::Table = toml::from_str(text).map_err(|e| {
        let line = e.span().map(|span| text[..span.start.min(text.len())].lines().count().max(1));
        let message = e.message().lines().next().unwrap_or("").trim().trim_end_matches('.').to_string();
        match line {
            Some(line) => ConfigError::TomlAt { line, message },
            None => ConfigError::Toml { message },
        }
    })?;
    let mut config = FileConfig::default();
    for (key, value) in table {
        let kind = value.type_str();
        fn get<T: for<'de> Deserialize<'de>>(
            key: &str,
            value: toml::Value,
            kind: &'static str,
            expected: &'static str,
        ) -> Result<T, ConfigError> {
            value.try_into().map_err(|_| ConfigError::Type { key: key.to_string(), kind, expected })
        }
        const MS: &str = "a whole number of milliseconds";
        const STRINGS: &str = "a list of strings, e.g. [\"a\", \"b\"]";
        match key.as_str() {
            "name" => config.name = Some(get(&key, value, kind, "a broker name in quotes")?),
            "bind" => config.bind = Some(get(&key, value, kind, STRINGS)?),
            "expiry" => config.expiry = Some(get(&key, value, kind, MS)?),
            "pipe_limit" | "memory_limit" => {
                let bytes = match value {
                    toml::Value::Integer(n) if n >= 0 => n as u64,
                    toml::Value::String(s) => {
                        size::parse(&s).map_err(|error| ConfigError::Size { key: key.clone(), error })?
                    }
                    _ => return Err(ConfigError::Type { key, kind, expected: size::ACCEPTED }),
                };
                match key.as_str() {
                    "pipe_limit" => config.pipe_limit = Some(bytes),
                    _ => config.memory_limit = Some(bytes),
                }
            }
            "log" => config.log = Some(get(&key, value, kind, "a log level in quotes, e.g. \"info\"")?),
            "max_connections" => {
                config.max_connections = Some(get(&key, value, kind, "a whole number of connections")?)
            }
            "publish" => {
                config.publish = Some(get(&key, value, kind, "a list of \"DIR\" or \"DIR=/alias\"")?)
            }
            "stable_age" => config.stable_age = Some(get(&key, value, kind, MS)?),
            "state_dir" => config.state_dir = Some(get(&key, value, kind, "a directory in quotes")?),
            "upstream" => config.upstream = Some(get(&key, value, kind, "an endpoint in quotes")?),
            "subscribe" => config.subscribe = Some(get(&key, value, kind, STRINGS)?),
            "inbox" => config.inbox = Some(get(&key, value, kind, "a directory in quotes")?),
            "upstream_server_key" => {
                config.upstream_server_key = Some(get(&key, value, kind, "a .pub file in quotes")?)
            }
            "upstream_key" => {
                config.upstream_key = Some(get(&key, value, kind, "a secret key file in quotes")?)
            }
            "curve_secret_key" => {
                config.curve_secret_key = Some(get(&key, value, kind, "a secret key file in quotes")?)
            }
            "allow_client_key" => config.allow_client_key = Some(get(&key, value, kind, STRINGS)?),
            "curve_ipc" => config.curve_ipc = Some(get(&key, value, kind, "true or false")?),
            _ => return Err(ConfigError::UnknownKey(key)),
        }
    }
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_errors_are_one_line_naming_the_key() {
        let e = parse("pipe_limit = \"8 furlongs\"").unwrap_err().to_string();
        assert!(e.starts_with("pipe_limit: ") && e.contains("MiB") && !e.contains('\n'), "{e}");
        let e = parse("expiry = \"soon\"").unwrap_err().to_string();
        assert_eq!(e, "expiry = string: expected a whole number of milliseconds");
        let e = parse("nmae = 'typo'").unwrap_err().to_string();
        assert!(e.starts_with("unknown key \"nmae\"") && e.contains("upstream_server_key"), "{e}");
        let e = parse("name = \"hub\"\nbind = [\"tcp://x:1\"\n").unwrap_err().to_string();
        assert!(e.starts_with("line ") && !e.contains('\n'), "{e}");
        let e = load(Path::new("/nonexistent/zbroker.toml")).unwrap_err().to_string();
        assert!(e.starts_with("cannot read config file /nonexistent/zbroker.toml"), "{e}");
    }

    #[test]
    fn every_key_parses() {
        let config: FileConfig = parse(
            r#"
            name = "hub"
            bind = ["tcp://127.0.0.1:5670"]
            expiry = 1000
            pipe_limit = "1MiB"
            log = "debug"
            publish = ["/srv/a", "/srv/b=/photos"]
            stable_age = 500
            state_dir = "/var/lib/zbroker"
            upstream = "tcp://hub:5670"
            subscribe = ["/"]
            inbox = "/srv/a"
            curve_secret_key = "/etc/zbroker/server"
            allow_client_key = ["/etc/zbroker/clients", "/etc/zbroker/ops.pub"]
            curve_ipc = true
            upstream_server_key = "/etc/zbroker/hub.pub"
            upstream_key = "/etc/zbroker/relay"
            max_connections = 10
            "#,
        )
        .unwrap();
        assert_eq!(config.name.as_deref(), Some("hub"));
        assert_eq!(config.pipe_limit, Some(1 << 20));
        let numeric: FileConfig = parse("pipe_limit = 1024").unwrap();
        assert_eq!(numeric.pipe_limit, Some(1024));
        assert!(parse("nmae = 'typo'").is_err());
        assert_eq!(config.upstream_server_key.as_deref(), Some(Path::new("/etc/zbroker/hub.pub")));
        assert_eq!(config.upstream_key.as_deref(), Some(Path::new("/etc/zbroker/relay")));
        assert_eq!(config.max_connections, Some(10));
        assert_eq!(config.publish.map(|p| p.len()), Some(2));
        assert_eq!(config.stable_age, Some(500));
        assert_eq!(config.curve_secret_key.as_deref(), Some(Path::new("/etc/zbroker/server")));
        assert_eq!(config.allow_client_key.map(|k| k.len()), Some(2));
        assert_eq!(config.curve_ipc, Some(true));
    }

    #[test]
    fn publish_arguments_parse() {
        assert_eq!(parse_publish("./out").unwrap(), Publish { dir: "./out".into(), alias: "/".into() });
        assert_eq!(parse_publish("a=b=/x/y").unwrap(), Publish { dir: "a=b".into(), alias: "/x/y".into() });
        assert!(parse_publish("=/x").is_err());
        let e = parse_publish("./outbox=photos").unwrap_err().to_string();
        assert!(e.contains("must start with '/'"), "{e}");
    }
}
