//! A FILEMQ subscriber: mirrors what a server publishes under one or more
//! virtual paths into a local inbox directory, and keeps it mirrored across
//! broker restarts and network cuts.
//!
//! ```no_run
//! use zbroker_client::filemq::{Event, Options, Subscriber};
//!
//! let opts = Options::broker("local", vec!["/photos".into()], "inbox".into());
//! let subscriber = Subscriber::start(opts)?;
//! while let Some(event) = subscriber.recv() {
//!     match event {
//!         Event::Updated { path, .. } => println!("updated {path}"),
//!         Event::Deleted { path } => println!("deleted {path}"),
//!         Event::InSync { .. } => break,
//!         _ => {}
//!     }
//! }
//! subscriber.stop();
//! # Ok::<(), zbroker_client::filemq::Error>(())
//! ```
//!
//! # Inbox layout
//!
//! - With **one** subscription path `P`, a published file `P/rest` lands at
//!   `<inbox>/rest` (like the original newest client).
//! - With **several** paths, a file `/full/path` lands at
//!   `<inbox>/full/path`, so subscriptions never collide. The files each
//!   subscription reports to the server as held (the ICANHAZ cache) are
//!   those under its own subdirectory.
//!
//! A path given twice, or covered by another (`/a/b` beside `/a`), is
//! subscribed once. Hidden entries of the inbox are never reported nor
//! touched; `<inbox>/.filemq/` is the subscriber's own (partial files, a
//! digest cache, a lock that keeps a second subscriber out).
//!
//! # Guarantees
//!
//! - Nothing is written or deleted outside the inbox, whatever the server
//!   sends: names that do not fall under a subscription, or that hold
//!   `..`, `.`, empty or hidden components or NUL, or whose path would be
//!   longer than the system's limit, are refused ([`Event::Rejected`]) and
//!   nothing is created for them; every file is created, renamed and
//!   removed through directory handles that never follow a symlink.
//! - Only files this subscriber delivered are deleted or replaced, unless
//!   [`Options::delete`] / [`Options::overwrite`] say otherwise: the
//!   user's own files in the inbox are kept ([`Event::Kept`]).
//! - What a server can make us hold is bounded: a frame is at most the
//!   credit window plus 69 KiB, libzmq queues at most 32 MiB of them (at
//!   least 2), a chunk beyond the credit granted ends the session, and
//!   every header hash is decoded within its declared ceiling.
//! - A file appears whole or not at all: it is received into
//!   `.filemq/partial/`, checked against the server's `X-SIZE` and `X-SHA1`
//!   and renamed into place. A file that fails the check is discarded and
//!   fetched again ([`Event::IntegrityFailed`]) after a pause (1 s,
//!   doubling up to 60 s); after 5 failures in one session it is given up
//!   on until the next session ([`Event::GaveUp`]). A file whose bytes
//!   overrun its announced `X-SIZE` is discarded at once, not at its end.
//! - A transfer cut short (even by SIGKILL) resumes where it stopped on the
//!   next connection, with a server that supports it.
//! - With a server that grants attributes (zbroker), the mirror keeps
//!   permission bits (never setuid, setgid or sticky) and mtimes, empty
//!   directories, and symlinks whose target stays inside the inbox (made
//!   as links, never written through; any other is refused); a chmod or a
//!   touch alone arrives as new attributes, not as the content again.
//! - When the server goes silent, the connection drops, or the server has
//!   forgotten our session (an RTFM after it greeted us), the subscriber
//!   reconnects (100 ms, doubling to 5 s; the pause only starts again from
//!   100 ms after a session that lasted 10 s or delivered something) and
//!   resynchronises: the inbox converges to the publisher's content,
//!   deletes included.
//! - An inbox entry that cannot be read (a directory without permission, a
//!   path too long) is left out of what we report as held, with a warning;
//!   only an unusable inbox root or private area stops the subscriber.
//!
//! The connection runs on a thread of its own; events arrive on a bounded
//! channel. A consumer that stops reading events holds that thread up (and,
//! after the server's expiry, 60 s by default, loses the connection, which
//! is then made anew): read them. [`Event::Progress`] alone is dropped
//! rather than waited for.

mod digests;
mod dirfd;
mod inbox;
mod layout;
mod link;
mod preview;
mod session;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub use session::fuzzing;
#[cfg(test)]
mod tests;

use crate::endpoint;
use std::path::PathBuf;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Default credit window: bytes of file content granted ahead.
pub const DEFAULT_WINDOW: u64 = 8_000_000;

/// Why a subscriber could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A subscription path is unusable (it must start with `/`, and hold no
    /// empty, `.`, `..` or hidden component).
    #[error("bad subscription path {path:?}: {why}")]
    BadPath { path: String, why: &'static str },
    /// An option is out of range.
    #[error("bad option: {0}")]
    BadOption(&'static str),
    /// An exclude pattern is unusable or there are too many.
    #[error(transparent)]
    BadExclude(#[from] zbroker_proto::exclude::PatternError),
    /// The inbox cannot be created, locked or read.
    #[error("inbox {path}: {source}")]
    Inbox {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// ZeroMQ failed locally.
    #[error(transparent)]
    Zmq(#[from] zmq::Error),
    /// The connection thread could not be started.
    #[error("cannot start the connection thread: {0}")]
    Thread(std::io::Error),
}

/// What to subscribe to, where to put it, and tuning.
#[derive(Debug, Clone)]
pub struct Options {
    /// A ZeroMQ endpoint: `ipc://@/filemq/NAME` (see [`Options::broker`]),
    /// `tcp://host:port`, …
    pub endpoint: String,
    /// Virtual paths to mirror; each starts with `/`.
    pub paths: Vec<String>,
    /// The directory that mirrors them (created if missing).
    pub inbox: PathBuf,
    /// Credit window: bytes of file content the server may send ahead of
    /// what we have written. At least 1.
    pub window: u64,
    /// Send HUGZ when nothing has come from the server for this long.
    pub heartbeat: Duration,
    /// Take the server as gone after this long without a message from it.
    pub dead_after: Duration,
    /// Capacity of the event channel.
    pub event_capacity: usize,
    /// Pause before a file that failed verification is asked for again;
    /// it doubles with each failure of that file (up to 60 s).
    pub refetch_delay: Duration,
    /// Speak CURVE to the server with these keys (needed for a broker's
    /// `--curve-secret-key` endpoints); `None`: no security (local IPC).
    /// A handshake the server refuses is retried like a missing server,
    /// with a warning (tracing target `filemq::curve`).
    pub curve: Option<crate::curve::ClientKeys>,
    /// Apply the publisher's deletes to every file of the inbox, not only
    /// to those this subscriber delivered (rsync's `--delete`).
    pub delete: bool,
    /// Replace a file of the inbox that this subscriber did not write when
    /// the publisher has another version of it.
    pub overwrite: bool,
    /// Gitignore-style patterns ([`zbroker_proto::exclude`]) of paths, relative
    /// to each subscription path, that are neither fetched nor deleted
    /// nor reported as held. The server filters them (they never cost
    /// credit), so a server that does not offer it (the original, an
    /// older zbroker) is refused: [`Event::Unsupported`].
    pub exclude: Vec<String>,
    /// Change nothing: ask the server for a listing (no content is sent
    /// or read) and report what a real run would do with each path
    /// ([`Event::Planned`], [`Event::Kept`], [`Event::Rejected`]), then
    /// [`Event::InSync`] as usual. The inbox is only looked at: nothing
    /// is created in it, not even `.filemq/`, and it need not exist. A
    /// server that does not offer listings is refused
    /// ([`Event::Unsupported`]).
    pub dry_run: bool,
}

impl Options {
    /// Subscribes to `paths` on the broker called `name` on this machine.
    pub fn broker(name: &str, paths: Vec<String>, inbox: PathBuf) -> Self {
        Self::endpoint(&endpoint::filemq(name), paths, inbox)
    }

    /// Subscribes to `paths` on a server at any ZeroMQ endpoint.
    pub fn endpoint(endpoint: &str, paths: Vec<String>, inbox: PathBuf) -> Self {
        Options {
            endpoint: endpoint.to_string(),
            paths,
            inbox,
            window: DEFAULT_WINDOW,
            heartbeat: Duration::from_secs(1),
            dead_after: Duration::from_secs(5),
            event_capacity: 1024,
            refetch_delay: Duration::from_secs(1),
            curve: None,
            delete: false,
            overwrite: false,
            exclude: Vec::new(),
            dry_run: false,
        }
    }
}

/// What the subscriber reports. Paths in `Progress`, `Updated`, `Deleted`
/// and `IntegrityFailed` are relative to the inbox, `/`-separated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A session started: the server greeted us (OHAI-OK).
    Connected,
    /// Bytes of a file arrived; `size` is the whole file's when the server
    /// said (`X-SIZE`). Dropped when the channel is full.
    Progress { path: String, offset: u64, size: Option<u64> },
    /// A file was created or replaced in the inbox, whole and verified.
    Updated { path: String, size: u64 },
    /// A directory or symlink was made, or a file given new attributes
    /// (permission bits, mtime) with its content unchanged: see
    /// [`Mirrored`]. Only from a server that carries them (zbroker).
    Mirrored { path: String, what: Mirrored },
    /// A file (or symlink, or empty directory) was removed from the inbox.
    Deleted { path: String },
    /// (Dry run) what a real run would do at `path`; `size` for a file's
    /// content.
    Planned { path: String, plan: Plan, size: Option<u64> },
    /// Everything published under this subscription path when we
    /// (re)subscribed has arrived: every published file is in the inbox
    /// (files of the inbox that are not published may be there too, see
    /// [`Event::Kept`]). Comes again after every reconnection. `published`
    /// is false when the server says nothing at all is published under the
    /// path (a misspelled path, say); an empty published directory, or a
    /// server that does not say, gives true.
    InSync { path: String, published: bool },
    /// A file of the inbox that this subscriber did not write was left
    /// alone (see [`Kept`]).
    Kept { path: String, reason: Kept },
    /// A name the server sent was refused for safety (see the module
    /// documentation); nothing was written. `name` is the server's, shown
    /// with [`zbroker_proto::escape::escape`] and cut to 200 characters.
    Rejected { name: String, why: String },
    /// No server has answered for 2 s since the subscriber started (sent
    /// once, before any session); it goes on trying.
    Unreachable { why: String },
    /// A received file did not match its announced size or digest; it was
    /// discarded and is asked for again after a pause (see
    /// [`Options::refetch_delay`]), unless [`Event::GaveUp`] follows.
    IntegrityFailed { path: String },
    /// A file failed verification 5 times in this session: it is no longer
    /// asked for (the server may still send it, as a change or along with
    /// other files) until the next session. [`Event::InSync`] still comes.
    GaveUp { path: String },
    /// The session ended (server gone, connection cut, the server forgot
    /// us, protocol trouble); reconnecting.
    Disconnected { why: String },
    /// The server refused us: RTFM or SRSLY in answer to our OHAI (it does
    /// not speak our protocol or will not serve us), or SRSLY after it
    /// greeted us (it refused a subscription path). The subscriber has
    /// stopped. (An RTFM after the greeting means the server lost our
    /// session: that is [`Event::Disconnected`] and a new session.)
    Refused { why: String },
    /// The inbox became unusable (not writable, disk full, …). The
    /// subscriber has stopped.
    Failed { why: String },
    /// The server cannot do what the options ask for (exclusions, a
    /// listing): it did not grant that capability in its greeting (the
    /// original FileMQ, an older zbroker). Nothing was subscribed; the
    /// subscriber has stopped.
    Unsupported { why: String },
}

/// What a dry run says a real one would do ([`Event::Planned`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// Make a file, link or directory that is not there.
    Create,
    /// Replace one (a file of ours, or with `overwrite`), or give it new
    /// attributes.
    Update,
    /// Remove one the publisher no longer has.
    Delete,
}

/// What [`Event::Mirrored`] made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mirrored {
    /// A directory the publisher has (even an empty one).
    Directory,
    /// A symlink leading to `target` (relative, inside the inbox).
    Link { target: String },
    /// A file's permission bits or mtime changed, not its content.
    Attributes,
}

/// Why a file of the inbox was kept: files this subscriber did not write
/// are deleted or replaced only if [`Options::delete`] or
/// [`Options::overwrite`] says so.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kept {
    /// The publisher does not have it (it sent a delete).
    NotPublished,
    /// The publisher has another version; the inbox does not mirror that
    /// file until it is removed or `overwrite` is set.
    Differs,
}

/// A running subscription. Dropping it is [`Subscriber::stop`].
pub struct Subscriber {
    /// A message here tells the connection thread to say KTHXBAI and end.
    control: zmq::Socket,
    events: Option<mpsc::Receiver<Event>>,
    thread: Option<JoinHandle<()>>,
    subscriptions: Vec<String>,
}

impl Subscriber {
    /// Checks the options, opens (creates and locks) the inbox, and starts
    /// the connection thread, which connects, subscribes and keeps the
    /// inbox mirrored until [`Subscriber::stop`]. A server that is not
    /// there yet is not an error: the thread keeps trying.
    pub fn start(opts: Options) -> Result<Subscriber, Error> {
        let layout = layout::Layout::new(&opts.paths).map_err(|(path, why)| Error::BadPath { path, why })?;
        let excludes = zbroker_proto::exclude::Excludes::new(&opts.exclude)?;
        if opts.window == 0 {
            return Err(Error::BadOption("the credit window must be at least 1 byte"));
        }
        if opts.heartbeat.is_zero() || opts.dead_after.is_zero() || opts.refetch_delay.is_zero() {
            return Err(Error::BadOption("heartbeat, dead_after and refetch_delay must be more than 0"));
        }
        let opened = if opts.dry_run {
            preview::Preview::open(&opts.inbox).map(session::Disk::Preview)
        } else {
            inbox::Inbox::open(&opts.inbox).map(session::Disk::Inbox)
        };
        let disk = opened.map_err(|source| Error::Inbox { path: opts.inbox.clone(), source })?;
        // One context per subscriber: dropping it waits (briefly) for the
        // KTHXBAI to leave before the process may exit.
        let context = zmq::Context::new();
        let control = context.socket(zmq::PAIR)?;
        // inproc names are per context: this one is ours alone.
        control.bind("inproc://filemq-control")?;
        let thread_control = context.socket(zmq::PAIR)?;
        thread_control.connect("inproc://filemq-control")?;
        let (tx, rx) = mpsc::sync_channel(opts.event_capacity.max(1));
        let subscriptions = layout.subscriptions().to_vec();
        let thread = std::thread::Builder::new()
            .name("filemq-subscriber".into())
            .spawn(move || {
                session::run(session::Shared::new(opts, layout, excludes, disk, tx, thread_control, context))
            })
            .map_err(Error::Thread)?;
        Ok(Subscriber { control, events: Some(rx), thread: Some(thread), subscriptions })
    }

    /// The subscription paths in the form the server sees them (and
    /// [`Event::InSync`] names them): normalised, duplicates and covered
    /// paths dropped.
    pub fn subscriptions(&self) -> &[String] {
        &self.subscriptions
    }

    /// The next event; `None` once the subscriber has ended (after
    /// [`Event::Refused`] or [`Event::Failed`]).
    pub fn recv(&self) -> Option<Event> {
        self.events.as_ref()?.recv().ok()
    }

    /// The next event, waiting at most `timeout`.
    pub fn recv_timeout(&self, timeout: Duration) -> Result<Event, mpsc::RecvTimeoutError> {
        match &self.events {
            Some(rx) => rx.recv_timeout(timeout),
            None => Err(mpsc::RecvTimeoutError::Disconnected),
        }
    }

    /// The next event if there is one.
    pub fn try_recv(&self) -> Result<Event, mpsc::TryRecvError> {
        match &self.events {
            Some(rx) => rx.try_recv(),
            None => Err(mpsc::TryRecvError::Disconnected),
        }
    }

    /// Says KTHXBAI to the server, ends the connection thread and waits for
    /// it. Events not yet received are dropped. A file being received stays
    /// in `.filemq/partial/` for a later resume.
    pub fn stop(mut self) {
        self.shut_down();
    }

    fn shut_down(&mut self) {
        let _ = self.control.send("stop", zmq::DONTWAIT);
        // Unblocks the thread if it waits for room in a full channel.
        self.events = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.shut_down();
    }
}
