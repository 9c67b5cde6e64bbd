//! The broker's settings: a TOML file (`--config FILE`) where every flag has
//! a key, overridden by the flags themselves.
//!
//! ```toml
//! name = "local"
//! bind = ["tcp://127.0.0.1:5670"]
//! expiry = 60000          # ms
//! pipe_limit = "8MiB"     # or a number of bytes
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
//! ```

use anyhow::{bail, Context as _};
use serde::Deserialize;
use std::path::Path;

#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub name: Option<String>,
    pub bind: Option<Vec<String>>,
    pub expiry: Option<u64>,
    pub pipe_limit: Option<Size>,
    pub log: Option<String>,
    pub max_connections: Option<usize>,
    pub publish: Option<Vec<String>>,
    pub stable_age: Option<u64>,
    pub state_dir: Option<std::path::PathBuf>,
    pub upstream: Option<String>,
    pub subscribe: Option<Vec<String>>,
    pub inbox: Option<std::path::PathBuf>,
    pub curve_secret_key: Option<std::path::PathBuf>,
    pub allow_client_key: Option<Vec<std::path::PathBuf>>,
    pub curve_ipc: Option<bool>,
}

/// A `--publish DIR[=/alias]` argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    pub dir: std::path::PathBuf,
    pub alias: String,
}

/// Parses `DIR` (published as `/`) or `DIR=/alias`.
pub fn parse_publish(text: &str) -> anyhow::Result<Publish> {
    let (dir, alias) = match text.rsplit_once("=/") {
        Some((dir, rest)) => (dir, format!("/{rest}")),
        None => (text, "/".to_string()),
    };
    if dir.is_empty() {
        bail!("--publish {text:?}: no directory (use DIR or DIR=/alias)");
    }
    Ok(Publish { dir: dir.into(), alias })
}

/// A byte count written as a number or as text with a unit ("8MiB").
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum Size {
    Bytes(u64),
    Text(#[serde(deserialize_with = "de_size")] u64),
}

impl Size {
    pub fn bytes(self) -> u64 {
        match self {
            Size::Bytes(n) | Size::Text(n) => n,
        }
    }
}

fn de_size<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let text = String::deserialize(d)?;
    parse_size(&text).map_err(serde::de::Error::custom)
}

/// Parses `4096`, `64k`, `64KiB`, `8M`, `8MiB`, `1G` (binary units).
pub fn parse_size(text: &str) -> anyhow::Result<u64> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let n: u64 =
        digits.parse().with_context(|| format!("{text:?} is not a size (try 4096, 64KiB or 8MiB)"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        other => bail!("unknown size unit {other:?} in {text:?} (use KiB, MiB or GiB)"),
    };
    n.checked_mul(1 << shift).with_context(|| format!("size {text:?} is too large"))
}

pub fn load(path: &Path) -> anyhow::Result<FileConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("bad config file {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("64KiB").unwrap(), 64 << 10);
        assert_eq!(parse_size("8M").unwrap(), 8 << 20);
        assert_eq!(parse_size("1g").unwrap(), 1 << 30);
        assert!(parse_size("lots").is_err());
        assert!(parse_size("8 parsecs").is_err());
    }

    #[test]
    fn every_key_parses() {
        let config: FileConfig = toml::from_str(
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
            "#,
        )
        .unwrap();
        assert_eq!(config.name.as_deref(), Some("hub"));
        assert_eq!(config.pipe_limit.map(Size::bytes), Some(1 << 20));
        let numeric: FileConfig = toml::from_str("pipe_limit = 1024").unwrap();
        assert_eq!(numeric.pipe_limit.map(Size::bytes), Some(1024));
        assert!(toml::from_str::<FileConfig>("nmae = 'typo'").is_err());
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
    }
}
