//! The `--log LEVEL` filter every program shares.
//!
//! A level (`error`, `warn`, `info`, `debug`, `trace`, `off`) or a full
//! `tracing` filter (`info,zbroker=debug`, `filemq=trace`) is accepted; a
//! bare word that is not a level (`verbose`) is refused, rather than taken
//! as the name of a module to trace, which silently turned logging off.
//! The `notify` crate's chatter (inotify book-keeping at INFO) is kept at
//! `warn` unless the filter names `notify` itself.

use tracing_subscriber::EnvFilter;

/// The levels `--log` accepts, for messages.
pub const LEVELS: &str = "error, warn, info, debug, trace or off";

/// Why a filter was refused: `origin` (`--log`, `RUST_LOG`, the default)
/// gave `text`. Its `Display` is one line naming the accepted levels.
#[derive(Debug, thiserror::Error)]
#[error("{origin} {text:?}: {problem}")]
pub struct FilterError {
    pub origin: &'static str,
    pub text: String,
    pub problem: Problem,
}

/// What is wrong with a filter's text.
#[derive(Debug, thiserror::Error)]
pub enum Problem {
    #[error("no level: use {LEVELS}, or a filter such as info,zbroker=debug")]
    Empty,
    #[error("{0:?} is not a log level: use {LEVELS}, or a filter such as info,zbroker=debug")]
    NotALevel(String),
    #[error("{0}: use {LEVELS}, or a filter such as info,zbroker=debug")]
    Invalid(#[source] tracing_subscriber::filter::ParseError),
}

/// The filter for `--log LEVEL`: `level` if given, else `RUST_LOG` if set,
/// else `default`. The error is one line naming the accepted levels.
///
/// ```
/// use zbroker_client::log::filter;
/// assert!(filter(Some("debug"), "info").is_ok());
/// assert!(filter(Some("info,zbroker=debug"), "info").is_ok());
/// assert!(filter(Some("verbose"), "info").unwrap_err().to_string().contains("error, warn, info"));
/// ```
pub fn filter(level: Option<&str>, default: &str) -> Result<EnvFilter, FilterError> {
    let (text, source) = match level {
        Some(level) => (level.to_string(), "--log"),
        None => match std::env::var("RUST_LOG") {
            Ok(env) if !env.trim().is_empty() => (env, "RUST_LOG"),
            _ => (default.to_string(), "the default log filter"),
        },
    };
    parse(&text).map_err(|problem| FilterError { origin: source, text, problem })
}

/// `text` as a filter, with `notify=warn` added unless it names `notify`.
fn parse(text: &str) -> Result<EnvFilter, Problem> {
    let text = text.trim();
    if text.is_empty() {
        return Err(Problem::Empty);
    }
    let mut mentions_notify = false;
    for directive in text.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let target = directive.split(['=', '[']).next().unwrap_or("");
        mentions_notify |= target == "notify" || target.starts_with("notify::");
        if !directive.contains(['=', '[']) && !is_level(directive) {
            return Err(Problem::NotALevel(directive.to_string()));
        }
    }
    let full = if mentions_notify { text.to_string() } else { format!("{text},notify=warn") };
    EnvFilter::builder().parse(&full).map_err(Problem::Invalid)
}

fn is_level(word: &str) -> bool {
    ["error", "warn", "info", "debug", "trace", "off"].iter().any(|l| l.eq_ignore_ascii_case(word))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_and_directives_are_accepted() {
        for ok in [
            "error",
            "warn",
            "info",
            "debug",
            "trace",
            "off",
            "INFO",
            "info,zbroker=debug",
            "filemq=trace",
            "zbroker::reactor=debug,warn",
            "notify=debug",
        ] {
            assert!(parse(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn a_bare_word_that_is_no_level_is_refused_in_one_line() {
        for bad in ["verbose", "", "info,loud", "zbroker=loud"] {
            let e = parse(bad).unwrap_err().to_string();
            assert!(e.contains(LEVELS) && !e.contains('\n'), "{bad}: {e}");
        }
        let e = filter(Some("verbose"), "info").unwrap_err().to_string();
        assert!(e.starts_with("--log \"verbose\": \"verbose\" is not a log level"), "{e}");
    }

    #[test]
    fn notify_is_quiet_unless_asked_for() {
        assert!(parse("debug").unwrap().to_string().contains("notify=warn"));
        assert!(!parse("notify=debug").unwrap().to_string().contains("notify=warn"));
    }
}
