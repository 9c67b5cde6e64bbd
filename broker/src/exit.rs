//! `zbroker`'s exit statuses, shown in `zbroker --help` and the README.

/// Stopped cleanly (SIGINT/SIGTERM), or the command did what it was asked.
pub const OK: u8 = 0;
/// A run-time or I/O failure: an endpoint cannot be bound, a directory or
/// key file cannot be read or written, the event loop failed.
pub const FAILURE: u8 = 1;
/// Bad command line or config file: nothing was started.
pub const USAGE: u8 = 2;
/// Another broker already runs under this name.
pub const NAME_TAKEN: u8 = 3;
/// `zbroker status` / `publish` / `unpublish`: no broker of that name answers.
pub const NO_BROKER: u8 = 4;
/// `zbroker publish` / `unpublish`: the broker refused the request.
pub const REFUSED: u8 = 5;

/// The table as `--help` shows it.
pub const TABLE: &str = "Exit status:\n  \
    0  stopped cleanly (SIGINT/SIGTERM), or the command succeeded\n  \
    1  run-time or I/O failure (cannot bind, cannot read or write a file or directory)\n  \
    2  bad command line or config file\n  \
    3  another broker already runs under this name\n  \
    4  status, publish, unpublish: no broker of that name answers\n  \
    5  publish, unpublish: the broker refused the request";

/// Another broker holds the name (the control endpoint is taken).
#[derive(Debug, thiserror::Error)]
#[error("a broker named {name:?} is already running ({endpoint} is taken)")]
pub struct NameTaken {
    pub name: String,
    pub endpoint: String,
}

/// No broker answers on the control endpoint.
#[derive(Debug, thiserror::Error)]
#[error("no broker named {name:?} answers at {endpoint}")]
pub struct NoBroker {
    pub name: String,
    pub endpoint: String,
}

/// The broker answered with a refusal.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

/// The exit status for an error, given its chain of causes (outermost
/// first): its kind, wherever it is in the chain.
pub fn code<'a>(chain: impl IntoIterator<Item = &'a (dyn std::error::Error + 'static)>) -> u8 {
    for cause in chain {
        if cause
            .downcast_ref::<crate::error::ReactorError>()
            .is_some_and(|e| matches!(e, crate::error::ReactorError::NameTaken(_)))
        {
            return NAME_TAKEN;
        }
        if cause.is::<crate::config::Invalid>() || cause.is::<zbroker_client::endpoint::NameError>() {
            return USAGE;
        }
        if cause.is::<zbroker_client::endpoint::EndpointError>()
            || cause.is::<zbroker_client::size::SizeError>()
        {
            return USAGE;
        }
        if cause.is::<NameTaken>() {
            return NAME_TAKEN;
        }
        if cause.is::<NoBroker>() {
            return NO_BROKER;
        }
        if cause.is::<Refused>() {
            return REFUSED;
        }
    }
    FAILURE
}
