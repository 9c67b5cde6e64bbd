//! The connection thread: one session per connection (OHAI, ICANHAZ per
//! subscription, NOM credit, CHEEZBURGERs into the inbox, HUGZ while the
//! server is quiet), and reconnection with backoff when a session ends.

use super::inbox::{self, Deleted, FileError, Inbox, Incoming};
use super::layout::{Layout, Placed};
use super::link::{Link, WireError};
use super::preview::Preview;
use super::{Event, Kept, Options};
use crate::link::{self, Heartbeat, PingWhen};
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::mpsc::{SyncSender, TrySendError};
use std::time::{Duration, Instant};
use zbroker_proto::codec::{Hash, ShortStr};
use zbroker_proto::digest::Digest;
use zbroker_proto::escape::{escape, escape_truncated};
use zbroker_proto::exclude::Excludes;
use zbroker_proto::filemq::ceiling;
use zbroker_proto::filemq::{ext, Operation};
use zbroker_proto::filemq_ext;
use zbroker_proto::transfer::Window;
use zbroker_proto::FilemqMsg;

/// Credit is granted in at least this many bytes at a time (the original's
/// slice), so that a stream of chunks does not become a stream of NOMs.
const CREDIT_SLICE: u64 = 1_000_000;
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// A session that lasted this long (or delivered something) was a good
/// one: the reconnection pause starts again from [`FIRST_BACKOFF`]. A
/// server that greets and drops us at once gets a growing pause instead.
const STEADY_SESSION: Duration = Duration::from_secs(10);
/// The longest pause before a file that failed verification is asked for
/// again (the first is `Options::refetch_delay`, doubling).
const MAX_REFETCH_DELAY: Duration = Duration::from_secs(60);
/// Failed verifications of one file in one session before we stop asking
/// for it.
const MAX_FAILURES: u32 = 5;
/// Frames handled per wake-up before the timers are looked at again.
const BATCH: usize = 256;
/// Before a first session, this long without one is reported
/// ([`Event::Unreachable`]); we go on trying.
const UNREACHABLE_AFTER: Duration = Duration::from_secs(2);
/// A frame may hold this much beside its chunk: the filename (names longer
/// than a path are refused anyway) and the headers (within their declared
/// ceiling).
const HEADER_ROOM: u64 = 4096 + zbroker_proto::filemq::ceiling::HEADERS_BYTES as u64 + 1024;
/// What libzmq may hold for us in received, unread frames: the receive
/// queue is cut to fit it (at least 2 frames).
const INTAKE_BUDGET: u64 = 32 << 20;
/// Header of our in-sync marker: `0` when nothing at all is published
/// under the path (no mount covers it, and no file lies under it).
/// Warnings a server can cause per session (malformed frames, refused
/// names, failed files); the rest are logged at debug.
const SERVER_WARNINGS: u32 = 20;
/// Files whose failed verifications are counted, per session.
const FAILURES_KEPT: usize = 10_000;
/// Longest name shown in an event or a log line, in characters.
const NAME_SHOWN: usize = 200;

/// The largest frame a server may send us (no honest chunk exceeds the
/// credit, which never exceeds the window) and how many libzmq queues:
/// together they bound what a server can make us hold.
pub(crate) fn intake(window: u64) -> (i64, i32) {
    let max_frame = window.saturating_add(HEADER_ROOM).min(i64::MAX as u64);
    let queued = (INTAKE_BUDGET / max_frame).clamp(2, 1000);
    (max_frame as i64, queued as i32)
}

/// What lives across sessions.
pub(crate) struct Shared {
    opts: Options,
    layout: Layout,
    /// `opts.exclude`, compiled.
    excludes: Excludes,
    disk: Disk,
    events: SyncSender<Event>,
    /// Readable when the subscriber is told to stop.
    control: zmq::Socket,
    context: zmq::Context,
}

impl Shared {
    pub fn new(
        opts: Options,
        layout: Layout,
        excludes: Excludes,
        disk: Disk,
        events: SyncSender<Event>,
        control: zmq::Socket,
        context: zmq::Context,
    ) -> Shared {
        Shared { opts, layout, excludes, disk, events, control, context }
    }

    /// The inbox a real run writes to; a dry run has none (and never gets
    /// here: its CHEEZBURGERs go to `on_planned`).
    fn inbox(&mut self) -> Result<&mut Inbox, End> {
        match &mut self.disk {
            Disk::Inbox(inbox) => Ok(inbox),
            Disk::Preview(_) => Err(End::Failed("a dry run writes nothing".into())),
        }
    }

    /// Writes the digest cache, unless this is a dry run.
    fn save_digests(&mut self, prune: bool) {
        if let Disk::Inbox(inbox) = &mut self.disk {
            if let Err(e) = inbox.save_digests(prune) {
                tracing::warn!("cannot save the digest cache: {e}");
            }
        }
    }

    /// Is inbox-relative `rel`, placed under subscription `sub`, excluded
    /// (as a directory if `is_dir`; `None`: as either, which protects
    /// both)?
    fn excluded(&self, sub: usize, rel: &str, is_dir: Option<bool>) -> bool {
        if self.excludes.is_empty() {
            return false;
        }
        let dir = self.layout.mirror_dir(sub);
        let below =
            if dir.is_empty() { Some(rel) } else { rel.strip_prefix(dir).and_then(|r| r.strip_prefix('/')) };
        let Some(below) = below else { return false };
        match is_dir {
            Some(is_dir) => self.excludes.excludes(below, is_dir),
            None => self.excludes.excludes(below, false) || self.excludes.excludes(below, true),
        }
    }

    /// Waits `pause` unless told to stop first; true if told to stop.
    fn stop_within(&self, pause: Duration) -> bool {
        let mut items = [self.control.as_poll_item(zmq::POLLIN)];
        let deadline = Instant::now() + pause;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            if link::poll(&mut items, left).is_err() || items[0].is_readable() {
                return true;
            }
        }
    }
}

/// Where a subscriber's entries go: the inbox, or (a dry run) nowhere, the
/// inbox only looked at.
pub(crate) enum Disk {
    Inbox(Inbox),
    Preview(Preview),
}

/// Why a session ended.
#[derive(Debug)]
enum End {
    /// We were told to stop, or nobody reads our events any more.
    Stop,
    /// The connection is no good; start a new one.
    Lost(String),
    /// RTFM or SRSLY to our OHAI, or SRSLY to an ICANHAZ.
    Refused(String),
    /// The inbox is unusable.
    Failed(String),
    /// The server did not grant a capability the options need.
    Unsupported(String),
}

/// The connection thread's body.
pub(crate) fn run(mut shared: Shared) {
    let mut backoff = FIRST_BACKOFF;
    let mut failed_attempts = 0u32;
    let started = Instant::now();
    // A session has existed: from then on, reconnect quietly for ever.
    let mut ever_greeted = false;
    let mut told_unreachable = false;
    loop {
        // Until the first session, an attempt waits no longer than it takes
        // to say that nobody answers.
        let patience = if ever_greeted || told_unreachable {
            shared.opts.dead_after
        } else {
            shared.opts.dead_after.min(UNREACHABLE_AFTER)
        };
        let end = match Link::connect_with(
            &shared.context,
            &shared.opts.endpoint,
            shared.opts.curve.as_ref(),
            &shared.control,
            patience,
            intake(shared.opts.window),
        ) {
            Ok(link) => {
                failed_attempts = 0;
                let mut session = Session::new(&mut shared, link);
                session.greeting_patience = patience;
                let end = session.run();
                let greeted = session.greeted_at.is_some();
                ever_greeted |= greeted;
                let good =
                    session.delivered || session.greeted_at.is_some_and(|t| t.elapsed() >= STEADY_SESSION);
                session.close(&end);
                if good {
                    backoff = FIRST_BACKOFF;
                }
                if greeted {
                    if let End::Lost(why) = &end {
                        tracing::warn!("lost the server: {why}; reconnecting");
                        if shared.events.send(Event::Disconnected { why: why.clone() }).is_err() {
                            break;
                        }
                    }
                }
                end
            }
            Err(link::Error::Stopped) => End::Stop,
            Err(e @ link::Error::Handshake { .. }) => {
                // Keys that do not fit never start to: say so every time
                // (the backoff keeps it to one line every few seconds).
                let why = e.to_string();
                tracing::warn!(target: "filemq::curve", "{why} (retrying)");
                failed_attempts += 1;
                End::Lost(why)
            }
            // No server, or a local ZeroMQ failure: try again later.
            Err(e) => {
                let why = e.to_string();
                if failed_attempts == 0 {
                    tracing::warn!("{why}; retrying");
                } else {
                    tracing::debug!("{why}; retrying");
                }
                failed_attempts += 1;
                End::Lost(why)
            }
        };
        match end {
            End::Stop => break,
            End::Refused(why) => {
                tracing::warn!("the server refused us: {why}");
                let _ = shared.events.send(Event::Refused { why });
                break;
            }
            End::Failed(why) => {
                tracing::warn!("{why}");
                let _ = shared.events.send(Event::Failed { why });
                break;
            }
            End::Unsupported(why) => {
                tracing::warn!("{why}");
                let _ = shared.events.send(Event::Unsupported { why });
                break;
            }
            End::Lost(why) => {
                if !ever_greeted && !told_unreachable && started.elapsed() >= UNREACHABLE_AFTER {
                    told_unreachable = true;
                    if shared.events.send(Event::Unreachable { why }).is_err() {
                        break;
                    }
                }
            }
        }
        // Before a first session, the pause never carries us past the
        // moment to say that nobody answers.
        let mut pause = backoff;
        if !ever_greeted && !told_unreachable {
            let left = UNREACHABLE_AFTER.saturating_sub(started.elapsed());
            if !left.is_zero() {
                pause = pause.min(left);
            }
        }
        if shared.stop_within(pause) {
            break;
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
    shared.save_digests(false);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// OHAI sent, waiting for OHAI-OK.
    Greeting,
    /// ICANHAZs sent; credit goes out once all are acknowledged.
    Subscribing { oks_due: usize },
    /// Credit granted; files flow.
    Subscribed,
}

/// Where a session's messages go: the connection, or (fuzzing) nowhere.
pub(crate) trait Wire {
    fn send(&mut self, msg: &FilemqMsg, patience: Duration) -> Result<(), WireError>;
}

impl Wire for Link {
    fn send(&mut self, msg: &FilemqMsg, patience: Duration) -> Result<(), WireError> {
        Link::send(self, msg, patience)
    }
}

/// One session: the protocol's state and what it does with each message
/// (any [`Wire`]), driven by the I/O loop of `Session<Link>`.
struct Session<'a, W: Wire = Link> {
    shared: &'a mut Shared,
    link: W,
    phase: Phase,
    /// When OHAI-OK came: this session counts as connected.
    greeted_at: Option<Instant>,
    /// A file was updated or deleted in this session.
    delivered: bool,
    /// Credit granted and not yet spent, as far as we can tell, and when
    /// to grant more (`zbroker_proto::transfer`).
    grants: Window,
    last_sequence: Option<u64>,
    /// The file being received.
    incoming: Option<Incoming>,
    /// A file whose remaining chunks are ignored (refused, or failed and
    /// asked for again).
    skipping: Option<Skipping>,
    /// Per subscription: RESYNCs sent whose in-sync marker has not come.
    markers_due: Vec<u32>,
    /// Per subscription: a RESYNC to send then (a file that failed its
    /// check is fetched again after a pause). Until it is sent and its
    /// marker has come, the subscription is not in sync.
    resubscribe_at: Vec<Option<Instant>>,
    /// Failed verifications this session, per inbox-relative path.
    failures: HashMap<String, u32>,
    /// Leftover partial files have been cleared this session.
    partials_cleared: bool,
    /// Malformed frames and other oddities this session (only the first
    /// few are warned of).
    malformed: u32,
    /// When the server last sent a valid message (garbage is no sign of
    /// life) and we last sent HUGZ: HUGZ go out only while it is quiet.
    beat: Heartbeat,
    /// How long to wait for OHAI-OK (less than `dead_after` before any
    /// session has existed: see [`UNREACHABLE_AFTER`]).
    greeting_patience: Duration,
    /// Capabilities the server granted in its OHAI-OK (`filemq_ext`).
    granted: u8,
}

impl<'a, W: Wire> Session<'a, W> {
    fn new(shared: &'a mut Shared, link: W) -> Session<'a, W> {
        let subscriptions = shared.layout.subscriptions().len();
        let greeting_patience = shared.opts.dead_after;
        let beat = Heartbeat::new(shared.opts.heartbeat, PingWhen::Quiet);
        let grants = Window::new(shared.opts.window, CREDIT_SLICE);
        Session {
            shared,
            link,
            phase: Phase::Greeting,
            greeted_at: None,
            delivered: false,
            grants,
            last_sequence: None,
            incoming: None,
            skipping: None,
            markers_due: vec![0; subscriptions],
            resubscribe_at: vec![None; subscriptions],
            failures: HashMap::new(),
            partials_cleared: false,
            malformed: 0,
            beat,
            greeting_patience,
            granted: 0,
        }
    }

    fn send(&mut self, msg: &FilemqMsg) -> Result<(), End> {
        tracing::trace!("sending {}", msg.name());
        let patience = self.shared.opts.dead_after;
        self.link.send(msg, patience).map_err(|e| End::Lost(e.to_string()))
    }
}

impl Session<'_, Link> {
    fn run(&mut self) -> End {
        match self.session() {
            Ok(()) => End::Stop,
            Err(end) => end,
        }
    }

    /// Runs until the session ends; `Err` says why (`Ok` never comes back
    /// but keeps `?` usable throughout).
    fn session(&mut self) -> Result<(), End> {
        // Our capabilities ride after OHAI's fields, which any server
        // reads past (see `filemq_ext`).
        let ohai = FilemqMsg::Ohai { protocol: ShortStr::lossy("FILEMQ"), version: 2 };
        let patience = self.shared.opts.dead_after;
        self.link.send_with_bits(&ohai, filemq_ext::ALL, patience).map_err(|e| End::Lost(e.to_string()))?;
        loop {
            let mut read_dry = false;
            for _ in 0..BATCH {
                match self.link.try_recv().map_err(|e| End::Lost(e.to_string()))? {
                    Some(frame) => {
                        if self.on_frame(frame)? {
                            self.beat.heard(Instant::now());
                        }
                    }
                    None => {
                        read_dry = true;
                        break;
                    }
                }
            }
            // Frames that arrived before the drop are handled first.
            if self.link.dropped() && read_dry {
                return Err(End::Lost("the connection dropped".into()));
            }
            let now = Instant::now();
            let opts = &self.shared.opts;
            let patience = if self.greeted_at.is_some() { opts.dead_after } else { self.greeting_patience };
            let dead_at = self.beat.dead_at(patience);
            if now >= dead_at {
                return Err(End::Lost(format!("no word from the server for {} ms", patience.as_millis())));
            }
            let hugz_at = self.beat.ping_due();
            if self.greeted_at.is_some() && now >= hugz_at {
                self.send(&FilemqMsg::Hugz {})?;
                self.beat.pinged(now);
                continue;
            }
            if let Some(sub) = self.resubscribe_at.iter().position(|at| at.is_some_and(|at| now >= at)) {
                self.resubscribe_at[sub] = None;
                self.subscribe(sub)?;
                continue;
            }
            if !read_dry {
                continue;
            }
            let mut wake = if self.greeted_at.is_some() { dead_at.min(hugz_at) } else { dead_at };
            if let Some(at) = self.resubscribe_at.iter().flatten().min() {
                wake = wake.min(*at);
            }
            let woke = self
                .link
                .wait(wake.saturating_duration_since(now), Some(&self.shared.control))
                .map_err(|e| End::Lost(e.to_string()))?;
            if woke.stop {
                return Err(End::Stop);
            }
        }
    }

    /// Ends the session: a file being received stays for a resume; a
    /// stopping subscriber says goodbye.
    fn close(&mut self, end: &End) {
        if matches!(end, End::Stop) {
            self.link.goodbye();
        }
        self.leave();
    }
}

impl<W: Wire> Session<'_, W> {
    /// Saves what the session leaves: a file being received stays for a
    /// resume, and the digest cache is written.
    fn leave(&mut self) {
        if let (Some(incoming), Disk::Inbox(inbox)) = (self.incoming.take(), &mut self.shared.disk) {
            inbox.abandon(incoming, true);
        }
        self.shared.save_digests(false);
    }
    fn emit(&self, event: Event) -> Result<(), End> {
        tracing::debug!("event {event:?}");
        self.shared.events.send(event).map_err(|_| End::Stop)
    }

    /// Logs something odd the server did: the first few of a session as
    /// warnings, the rest at debug, so a hostile server cannot fill the log.
    fn oddity(&mut self, what: std::fmt::Arguments<'_>) {
        self.malformed += 1;
        if self.malformed <= SERVER_WARNINGS {
            tracing::warn!("{what}");
        } else {
            if self.malformed == SERVER_WARNINGS + 1 {
                tracing::warn!("more trouble from the server this session is logged at debug only");
            }
            tracing::debug!("{what}");
        }
    }

    /// Handles one frame; true if it was a valid message for this point of
    /// the session (progress, which keeps the session alive).
    fn on_frame(&mut self, frame: Bytes) -> Result<bool, End> {
        let msg = match FilemqMsg::decode(frame.clone()) {
            Ok(msg) => msg,
            Err(e) => {
                self.oddity(format_args!("ignoring a malformed frame from the server: {e}"));
                return Ok(false);
            }
        };
        tracing::trace!("received {}", msg.name());
        if matches!(msg, FilemqMsg::OhaiOk {}) && self.phase == Phase::Greeting {
            self.granted = filemq_ext::trailer_bits(&frame, &msg) & filemq_ext::ALL;
        }
        self.on_message(msg)
    }

    fn on_message(&mut self, msg: FilemqMsg) -> Result<bool, End> {
        match msg {
            FilemqMsg::OhaiOk {} if self.phase == Phase::Greeting => {
                self.greeted_at = Some(Instant::now());
                self.emit(Event::Connected)?;
                self.check_granted()?;
                self.subscribe_all()?;
            }
            // Also the answer to a RESYNC sent again once subscribed.
            FilemqMsg::IcanhazOk {} if self.greeted_at.is_some() => {
                if let Phase::Subscribing { oks_due } = self.phase {
                    self.phase = match oks_due.saturating_sub(1) {
                        0 => Phase::Subscribed,
                        oks_due => Phase::Subscribing { oks_due },
                    };
                    self.top_up()?;
                }
            }
            FilemqMsg::Cheezburger { sequence, operation, filename, offset, eof, headers, chunk }
                if self.greeted_at.is_some() =>
            {
                self.on_cheezburger(sequence, operation, filename.as_bytes(), offset, eof, &headers, chunk.0)?
            }
            FilemqMsg::HugzOk {} if self.greeted_at.is_some() => {}
            FilemqMsg::Hugz {} if self.greeted_at.is_some() => self.send(&FilemqMsg::HugzOk {})?,
            // Before the greeting, RTFM and SRSLY answer our OHAI: the
            // server will not serve us, now or later. After it, SRSLY
            // answers an ICANHAZ (a subscription path refused, which no new
            // session changes), but RTFM ("OHAI first") means the server has
            // forgotten our session (expiry, a restart, or it dropped us):
            // a new session puts that right.
            FilemqMsg::Srsly { reason } => return Err(End::Refused(why_or(&reason, "SRSLY"))),
            FilemqMsg::Rtfm { reason } if self.greeted_at.is_some() => {
                return Err(End::Lost(why_or(&reason, "the server lost our session (RTFM)")))
            }
            FilemqMsg::Rtfm { reason } => return Err(End::Refused(why_or(&reason, "RTFM"))),
            FilemqMsg::Kthxbai {} => return Err(End::Lost("the server said goodbye".into())),
            other => {
                self.oddity(format_args!("ignoring an unexpected {} from the server", other.name()));
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Refuses, before anything is subscribed, a server that did not grant
    /// what the options need: filtering locally what it sends would cost
    /// the credit and the transfer exclusions are there to save.
    fn check_granted(&self) -> Result<(), End> {
        if !self.shared.excludes.is_empty() && self.granted & filemq_ext::EXCLUDE == 0 {
            return Err(End::Unsupported(
                "the server does not offer exclusions (--exclude): it is not a zbroker, or an older one"
                    .into(),
            ));
        }
        if self.dry_run() && self.granted & filemq_ext::LIST == 0 {
            return Err(End::Unsupported(
                "the server does not offer listings (--dry-run): it is not a zbroker, or an older one".into(),
            ));
        }
        Ok(())
    }

    /// A dry run: the server lists, the inbox is only looked at.
    fn dry_run(&self) -> bool {
        matches!(self.shared.disk, Disk::Preview(_))
    }

    /// ICANHAZ for every subscription; the digest cache is saved (and
    /// pruned) once all holdings have been listed.
    fn subscribe_all(&mut self) -> Result<(), End> {
        let count = self.shared.layout.subscriptions().len();
        self.phase = Phase::Subscribing { oks_due: count };
        if let Disk::Inbox(inbox) = &mut self.shared.disk {
            inbox.start_census();
        }
        for sub in 0..count {
            self.subscribe(sub)?;
        }
        self.shared.save_digests(true);
        Ok(())
    }

    /// ICANHAZ(path, RESYNC, X-ZBROKER, X-RESUME, cache of what we hold).
    fn subscribe(&mut self, sub: usize) -> Result<(), End> {
        let local = |e: std::io::Error| End::Failed(format!("reading the inbox: {e}"));
        let path = self.shared.layout.subscriptions()[sub].clone();
        let dir = self.shared.layout.mirror_dir(sub).to_string();
        let mut cache = Hash::default();
        let (mut bytes, mut left_out) = (0usize, 0usize);
        // A server that keeps attributes is told those of every entry held
        // (directories and links too); any other, the files' digests.
        let meta = self.granted & filemq_ext::META != 0;
        // What is excluded is not reported: the server then sends no
        // delete for it, whatever --delete says.
        let excludes = Some(&self.shared.excludes).filter(|e| !e.is_empty());
        let held = match &mut self.shared.disk {
            Disk::Inbox(inbox) => inbox.entries(&dir, meta, excludes),
            Disk::Preview(preview) => preview.entries(&dir, meta, excludes),
        };
        for held in held.map_err(local)? {
            // A key longer than a `string` cannot travel, and a cache past
            // the protocol's ceiling would be refused whole: those files
            // are simply sent again.
            let Some(key) = self.shared.layout.cache_key(sub, &held.rel) else { continue };
            let value =
                if meta { filemq_ext::cache_value(&held.digest, held.kind, held.attrs) } else { held.digest };
            let wire = 1 + key.len() + 4 + value.len();
            if cache.len() >= ceiling::CACHE_ENTRIES || bytes + wire > ceiling::CACHE_BYTES - 4 {
                left_out += 1;
                continue;
            }
            if cache.insert(&key, value).is_ok() {
                bytes += wire;
            }
        }
        if left_out > 0 {
            tracing::warn!(
                "{path}: the inbox holds more files than one subscription can list ({} files, {} MiB); \
                 {left_out} will be sent again",
                ceiling::CACHE_ENTRIES,
                ceiling::CACHE_BYTES >> 20
            );
        }
        let mut options = Hash::default();
        let _ = options.insert(ext::RESYNC, "1");
        let _ = options.insert(ext::ZBROKER, "1");
        if !self.shared.excludes.is_empty() {
            let _ = options.insert(ext::EXCLUDE_OPTION, self.shared.excludes.to_option());
        }
        match &self.shared.disk {
            Disk::Inbox(inbox) => {
                let resume: String = inbox
                    .resumable()
                    .map_err(local)?
                    .iter()
                    .map(|(digest, held)| ext::resume_line(digest, *held) + "\n")
                    .collect();
                if !resume.is_empty() {
                    let _ = options.insert(ext::RESUME, resume);
                }
            }
            // A listing: no content is sent, so nothing resumes.
            Disk::Preview(_) => {
                let _ = options.insert(ext::LIST_OPTION, "1");
            }
        }
        tracing::debug!("subscribing to {path} holding {} files", cache.len());
        self.send(&FilemqMsg::Icanhaz { path: path.as_str().into(), options, cache })?;
        self.markers_due[sub] += 1;
        Ok(())
    }

    /// Keeps `window` bytes of credit granted: tops up once the estimate
    /// falls a slice (or half a small window) below it.
    fn top_up(&mut self) -> Result<(), End> {
        // A listing costs no credit: a dry run grants none, so content
        // sent anyway ends the session (a chunk beyond the credit).
        if self.phase != Phase::Subscribed || self.dry_run() {
            return Ok(());
        }
        match self.grants.grant_due() {
            Some(credit) => self.send(&FilemqMsg::Nom { credit, sequence: self.last_sequence.unwrap_or(0) }),
            None => Ok(()),
        }
    }
}

/// An inbox path as a log line shows it.
fn shown(rel: &str) -> String {
    escape(rel.as_bytes())
}

fn why_or(reason: &ShortStr, default: &str) -> String {
    let reason = escape(reason.as_bytes());
    if reason.is_empty() {
        default.to_string()
    } else {
        format!("{default}: {reason}")
    }
}

mod transfer;
use transfer::Skipping;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
