//! Control commands as the host sees them: typed by the service that owns
//! them, opaque to everyone else.
//!
//! The control endpoint's words (`PUBLISH DIR ALIAS`) are parsed once, at
//! the edge, by the service that knows the verb
//! ([`crate::Service::parse_command`]) into a [`Command`] of its own type;
//! the host (or SIGHUP's reload, which builds typed commands from the
//! config file without any words) hands it back to that service's
//! [`crate::Service::command`]. The outcome is a [`Success`] or a
//! [`CommandError`] boxing the service's own error, which the host shows
//! with `Display` and never looks inside.

use std::any::Any;

/// A command in the type of the service that parsed it (FILEMQ's
/// `filemq::command::Command`); only that service downcasts it.
pub type Command = Box<dyn Any + Send>;

/// A command the host made for the service called `service` (by
/// [`crate::Service::name`]), not parsed from words: SIGHUP's reload.
pub struct CommandFor {
    pub service: &'static str,
    pub command: Command,
}

impl std::fmt::Debug for CommandFor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CommandFor {{ service: {:?}, .. }}", self.service)
    }
}

/// What a command did: a line for the operator (`zbroker publish` prints
/// it) and, if useful to a script, details as JSON (the control reply's
/// `details`).
#[derive(Debug, Clone, PartialEq)]
pub struct Success {
    pub text: String,
    pub details: Option<serde_json::Value>,
}

impl Success {
    pub fn text(text: impl Into<String>) -> Success {
        Success { text: text.into(), details: None }
    }

    pub fn with_details(self, details: serde_json::Value) -> Success {
        Success { details: Some(details), ..self }
    }
}

/// Why a command could not be parsed or carried out: the service's own
/// typed error, shown to the operator with `Display` (the control reply's
/// `error`).
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct CommandError(Box<dyn std::error::Error + Send + Sync>);

impl CommandError {
    pub fn new(error: impl std::error::Error + Send + Sync + 'static) -> CommandError {
        CommandError(Box::new(error))
    }

    /// The service's error, if it is a `T` (for its tests).
    pub fn downcast_ref<T: std::error::Error + 'static>(&self) -> Option<&T> {
        self.0.downcast_ref::<T>()
    }
}

/// A [`Command`] handed to a service that did not make it: a bug in the
/// host, answered rather than panicked on.
#[derive(Debug, thiserror::Error)]
#[error("{service} does not take this command")]
pub struct ForeignCommand {
    pub service: &'static str,
}

/// The command as the service's own type `T`, or the error to answer.
pub fn downcast<T: Any>(service: &'static str, command: Command) -> Result<T, CommandError> {
    command.downcast::<T>().map(|c| *c).map_err(|_| CommandError::new(ForeignCommand { service }))
}
