//! What can go wrong in the broker library, by kind: the `zbroker` program
//! maps kinds to exit statuses (`exit::code`) and shows the message.

/// A failure of the reactor: binding, or the event loop itself.
#[derive(Debug, thiserror::Error)]
pub enum ReactorError {
    /// Another broker holds the name (its control endpoint is taken).
    #[error(transparent)]
    NameTaken(#[from] crate::exit::NameTaken),
    #[error("services {first} and {second} both claim the signature {signature:#06X}")]
    SignatureClash { first: &'static str, second: &'static str, signature: u16 },
    #[error("cannot bind {endpoint}: address already in use")]
    AddressInUse { endpoint: String },
    #[error("cannot bind {endpoint}: {source}")]
    Bind { endpoint: String, source: zmq::Error },
    #[error("endpoint name is not UTF-8: {0:?}")]
    EndpointName(Vec<u8>),
    /// A ZeroMQ call failed while `doing`.
    #[error("{doing}: {source}")]
    Zmq { doing: &'static str, source: zmq::Error },
    /// The thread an embedded reactor was to run on ended before binding.
    #[error("the broker thread ended before binding")]
    ThreadDied,
    /// A system call failed while `doing`.
    #[error("{doing}: {source}")]
    Io { doing: &'static str, source: std::io::Error },
}

/// Adds what was being done to a ZeroMQ or I/O error.
pub(crate) trait Doing<T> {
    fn doing(self, doing: &'static str) -> Result<T, ReactorError>;
}

impl<T> Doing<T> for Result<T, zmq::Error> {
    fn doing(self, doing: &'static str) -> Result<T, ReactorError> {
        self.map_err(|source| ReactorError::Zmq { doing, source })
    }
}

impl<T> Doing<T> for Result<T, std::io::Error> {
    fn doing(self, doing: &'static str) -> Result<T, ReactorError> {
        self.map_err(|source| ReactorError::Io { doing, source })
    }
}

impl From<zmq::Error> for ReactorError {
    fn from(source: zmq::Error) -> Self {
        ReactorError::Zmq { doing: "ZeroMQ", source }
    }
}

impl From<std::io::Error> for ReactorError {
    fn from(source: std::io::Error) -> Self {
        ReactorError::Io { doing: "I/O", source }
    }
}

/// What a reload (SIGHUP) reports when it cannot read its sources.
pub type ReloadError = Box<dyn std::error::Error + Send + Sync>;
