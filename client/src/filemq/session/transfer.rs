//! What a session does with CHEEZBURGERs: chunks into the inbox (checked,
//! verified, renamed into place), deletes, in-sync markers, and what it
//! says of files it refuses, keeps or fails to verify.

use super::*;
use crate::filemq::preview::Planned;
use crate::filemq::Mirrored;
use inbox::Applied;
use zbroker_proto::filemq_ext::Attrs;

impl<W: Wire> Session<'_, W> {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn on_cheezburger(
        &mut self,
        sequence: u64,
        operation: Operation,
        name: &[u8],
        offset: u64,
        eof: u8,
        headers: &Hash,
        chunk: Bytes,
    ) -> Result<(), End> {
        if let Some(previous) = self.last_sequence {
            if sequence != previous.wrapping_add(1) {
                return Err(End::Lost(format!(
                    "CHEEZBURGER {sequence} came after {previous}: messages were lost"
                )));
            }
        }
        self.last_sequence = Some(sequence);
        // No honest server sends beyond the credit we granted (the original
        // only sends a chunk that fits): one that does would make us hold
        // whatever it likes. The server spent credit on every payload byte
        // it sent, whatever we make of them: counting only what we keep
        // would drift (docs/protocol/FILEMQ.md "Credit").
        if let Err(e) = self.grants.receive(chunk.len() as u64) {
            return Err(End::Lost(format!("the server sent {e}")));
        }
        if self.dry_run() {
            // A listing: every entry is one message without content.
            return match operation {
                Operation::Create if name.is_empty() => self.on_marker(headers),
                Operation::Create | Operation::Delete => self.on_planned(operation, name, headers),
                Operation::Other(code) => {
                    self.oddity(format_args!("ignoring a CHEEZBURGER with operation {code}"));
                    Ok(())
                }
            };
        }
        match operation {
            Operation::Create if name.is_empty() => self.on_marker(headers)?,
            // A directory, a link, or a file's new attributes.
            Operation::Create if headers.get(ext::TYPE).is_some() => self.on_entry(name, headers)?,
            // The original server marks the end with an empty chunk only.
            Operation::Create => {
                self.on_chunk(name, offset, eof != 0 || chunk.is_empty(), headers, &chunk)?
            }
            // Offset and chunk of a delete may be stale (docs/protocol/FILEMQ.md "Deletes").
            Operation::Delete => self.on_delete(name)?,
            Operation::Other(code) => {
                self.oddity(format_args!("ignoring a CHEEZBURGER with operation {code}"))
            }
        }
        self.top_up()
    }

    /// The in-sync marker: everything the last RESYNC for a path asked
    /// for has come.
    fn on_marker(&mut self, headers: &Hash) -> Result<(), End> {
        let Some(synced) = headers.get(ext::SYNCED) else {
            self.oddity(format_args!("ignoring a CHEEZBURGER without a filename"));
            return Ok(());
        };
        let subs = self.shared.layout.subscriptions();
        let Some(sub) = subs.iter().position(|s| s.as_bytes() == synced.as_bytes()) else {
            let synced = escape_truncated(synced.as_bytes(), NAME_SHOWN);
            self.oddity(format_args!(
                "ignoring an in-sync marker for {synced}, which we did not subscribe to"
            ));
            return Ok(());
        };
        let path = subs[sub].clone();
        // Our server says whether anything is published there at all; a
        // server that does not say is taken to publish the path.
        let published = headers.get(ext::PUBLISHED).is_none_or(|v| v.as_bytes() != b"0");
        self.markers_due[sub] = self.markers_due[sub].saturating_sub(1);
        if self.markers_due[sub] > 0 || self.resubscribe_at[sub].is_some() {
            // A later RESYNC (a file being fetched again) was sent, or is
            // to be sent after a pause: its own marker will say.
            return Ok(());
        }
        let settled =
            self.markers_due.iter().all(|&due| due == 0) && self.resubscribe_at.iter().all(Option::is_none);
        if !self.partials_cleared && settled {
            // Every offered resume had its chance: what is left is stale.
            self.partials_cleared = true;
            if let Disk::Inbox(inbox) = &self.shared.disk {
                inbox.remove_stale_partials(self.incoming.as_ref());
            }
        }
        if published {
            tracing::info!("{path} is in sync");
        } else {
            tracing::info!("{path} is in sync, but nothing is published there");
        }
        self.emit(Event::InSync { path, published })
    }

    fn on_chunk(
        &mut self,
        name: &[u8],
        offset: u64,
        end: bool,
        headers: &Hash,
        data: &[u8],
    ) -> Result<(), End> {
        // The digest this chunk says its file has, if it says: a chunk that
        // names another digest than the file in progress is another file
        // (a new version, perhaps resumed at the very offset where the old
        // one was abandoned), never its continuation.
        // A chunk without one continues whatever (the original server never
        // says); a malformed one is kept as `Some(None)`.
        let said = said_digest(headers);
        let same_digest = |held: Option<&Option<String>>| said.as_ref().is_none_or(|said| Some(said) == held);
        if let Some(skipped) = self.skipping.take() {
            if skipped.name == name && skipped.next == offset && same_digest(skipped.digest.as_ref()) {
                if !end {
                    self.skipping = Some(skipped.after(data.len()));
                }
                return Ok(());
            }
        }
        let continues = self.incoming.as_ref().is_some_and(|i| {
            i.name == name && i.written() == offset && same_digest(Some(&i.expected_digest))
        });
        if !continues {
            if let Some(previous) = self.incoming.take() {
                // The server moved on without finishing it (it changed while
                // being sent, and a new version follows): its part is of no
                // more use.
                tracing::debug!("{} was left unfinished", shown(&previous.rel));
                self.shared.inbox()?.abandon(previous, false);
            }
            match self.begin(name, offset, headers)? {
                Some(incoming) => self.incoming = Some(incoming),
                None => {
                    self.skip(name, offset, end, headers, data.len());
                    return Ok(());
                }
            }
        }
        let Some(incoming) = self.incoming.as_mut() else { return Ok(()) };
        let failed = incoming.write_at(offset, data).err();
        if let Some(e) = failed {
            // Nothing more of it is written: an oversized file is refused
            // as soon as it overruns, not once the disk is full.
            let Some(incoming) = self.incoming.take() else { return Ok(()) };
            let placed = Placed { subscription: incoming.subscription, rel: incoming.rel.clone() };
            self.shared.inbox()?.abandon(incoming, false);
            self.skip(name, offset, end, headers, data.len());
            return self.file_error(name, placed, e);
        }
        let progress = Event::Progress {
            path: incoming.rel.clone(),
            offset: incoming.written(),
            size: incoming.expected_size(),
        };
        if let Err(TrySendError::Disconnected(_)) = self.shared.events.try_send(progress) {
            return Err(End::Stop);
        }
        if end {
            let Some(incoming) = self.incoming.take() else { return Ok(()) };
            let placed = Placed { subscription: incoming.subscription, rel: incoming.rel.clone() };
            let overwrite = self.shared.opts.overwrite;
            match self.shared.inbox()?.deliver(incoming, overwrite) {
                Ok(size) => {
                    tracing::info!("updated {}", shown(&placed.rel));
                    self.delivered = true;
                    self.failures.remove(&placed.rel);
                    self.emit(Event::Updated { path: placed.rel, size })?;
                }
                Err(e) => self.file_error(name, placed, e)?,
            }
        }
        Ok(())
    }

    /// Ignores the rest of the file this chunk belongs to (unless it was
    /// its last).
    fn skip(&mut self, name: &[u8], offset: u64, end: bool, headers: &Hash, len: usize) {
        self.skipping = (!end)
            .then(|| Skipping { name: name.to_vec(), next: offset, digest: said_digest(headers) }.after(len));
    }

    /// Checks a new file's name and headers and opens its temporary file;
    /// `None` if it is refused (and reported).
    fn begin(&mut self, name: &[u8], offset: u64, headers: &Hash) -> Result<Option<Incoming>, End> {
        let placed = match self.shared.layout.place(name) {
            Ok(placed) => placed,
            Err(why) => return self.reject(name, why).map(|()| None),
        };
        if self.shared.excluded(placed.subscription, &placed.rel, Some(false)) {
            self.oddity(format_args!("ignoring {}, which we excluded", shown(&placed.rel)));
            return Ok(None);
        }
        let digest = match headers.get(ext::SHA1) {
            None => None,
            Some(text) => match Digest::normalise(text.as_bytes()) {
                Some(digest) => Some(digest),
                None => return self.reject(name, "has a malformed X-SHA1 header").map(|()| None),
            },
        };
        let size = match headers.get(ext::SIZE) {
            None => None,
            Some(text) => match std::str::from_utf8(text.as_bytes()).ok().and_then(|t| t.parse::<u64>().ok())
            {
                Some(size) => Some(size),
                None => return self.reject(name, "has a malformed X-SIZE header").map(|()| None),
            },
        };
        let attrs = match self.attrs(headers) {
            Ok(attrs) => attrs,
            Err(why) => return self.reject(name, why).map(|()| None),
        };
        let overwrite = self.shared.opts.overwrite;
        if let Err(e) = self.shared.inbox()?.check_target(&placed.rel, overwrite) {
            return self.file_error(name, placed, e).map(|()| None);
        }
        match self.shared.inbox()?.begin(name.to_vec(), placed.clone(), size, digest, offset) {
            Ok(mut incoming) => {
                incoming.attrs = attrs;
                Ok(Some(incoming))
            }
            Err(e) => self.file_error(name, placed, e).map(|()| None),
        }
    }

    /// (Dry run) what a real run would do with a listed entry or a delete,
    /// by the inbox's rules, reported and not done.
    fn on_planned(&mut self, operation: Operation, name: &[u8], headers: &Hash) -> Result<(), End> {
        let placed = match self.shared.layout.place(name) {
            Ok(placed) => placed,
            Err(why) => return self.reject(name, why),
        };
        let kind = headers.get(filemq_ext::TYPE).map(|t| t.as_bytes().to_vec());
        let is_dir = (operation == Operation::Create).then_some(kind.as_deref() == Some(b"dir"));
        if self.shared.excluded(placed.subscription, &placed.rel, is_dir) {
            return Ok(());
        }
        let attrs = self.attrs(headers);
        let (overwrite, any) = (self.shared.opts.overwrite, self.shared.opts.delete);
        let Disk::Preview(preview) = &self.shared.disk else { return Ok(()) };
        let rel = placed.rel.as_str();
        let planned = match (operation, kind.as_deref()) {
            (Operation::Delete, _) => preview.delete(rel, any),
            (_, None) => preview.file(rel, overwrite),
            (_, Some(b"dir")) => match attrs {
                Ok(Some(attrs)) => preview.dir(rel, attrs, overwrite),
                _ => Planned::Refused("is a directory without a valid X-MODE and X-MTIME".into()),
            },
            (_, Some(b"link")) => {
                match headers.get(filemq_ext::TARGET).map(|t| std::str::from_utf8(t.as_bytes())) {
                    Some(Ok(target)) => preview.link(rel, target, overwrite),
                    _ => Planned::Refused("is a link without a UTF-8 X-TARGET".into()),
                }
            }
            (_, Some(b"attrs")) => preview.attrs(rel, overwrite),
            (_, Some(other)) => {
                let shown_kind = escape_truncated(other, NAME_SHOWN);
                self.oddity(format_args!("ignoring an entry of unknown X-TYPE {shown_kind}"));
                return Ok(());
            }
        };
        let size = match kind {
            None if operation == Operation::Create => {
                headers.get(ext::SIZE).and_then(|t| std::str::from_utf8(t.as_bytes()).ok()?.parse().ok())
            }
            _ => None,
        };
        match planned {
            Planned::Do(plan) => self.emit(Event::Planned { path: placed.rel, plan, size }),
            Planned::Keep(reason) => self.emit(Event::Kept { path: placed.rel, reason }),
            Planned::Refused(why) => self.reject(name, &why),
            Planned::Nothing => Ok(()),
        }
    }

    /// `X-MODE` and `X-MTIME`, from a server granted attributes (none
    /// from another: the original never sends them).
    fn attrs(&self, headers: &Hash) -> Result<Option<Attrs>, &'static str> {
        if self.granted & filemq_ext::META == 0 {
            return Ok(None);
        }
        match (headers.get(filemq_ext::MODE), headers.get(filemq_ext::MTIME)) {
            (None, None) => Ok(None),
            (Some(mode), Some(mtime)) => Attrs::parse(mode.as_bytes(), mtime.as_bytes())
                .map(Some)
                .ok_or("has a malformed X-MODE or X-MTIME header"),
            _ => Err("has X-MODE or X-MTIME without the other"),
        }
    }

    /// A directory, a symlink, or a file's new attributes: one message,
    /// no content.
    fn on_entry(&mut self, name: &[u8], headers: &Hash) -> Result<(), End> {
        if self.granted & filemq_ext::META == 0 {
            self.oddity(format_args!("ignoring an X-TYPE entry from a server that did not offer them"));
            return Ok(());
        }
        // The server never interleaves: a file in progress was abandoned.
        if let Some(previous) = self.incoming.take() {
            tracing::debug!("{} was left unfinished", shown(&previous.rel));
            self.shared.inbox()?.abandon(previous, false);
        }
        self.skipping = None;
        let placed = match self.shared.layout.place(name) {
            Ok(placed) => placed,
            Err(why) => return self.reject(name, why),
        };
        let kind = headers.get(filemq_ext::TYPE).map(|t| t.as_bytes().to_vec()).unwrap_or_default();
        if self.shared.excluded(placed.subscription, &placed.rel, Some(kind == b"dir")) {
            self.oddity(format_args!("ignoring {}, which we excluded", shown(&placed.rel)));
            return Ok(());
        }
        let overwrite = self.shared.opts.overwrite;
        let mtime =
            headers.get(filemq_ext::MTIME).and_then(|t| std::str::from_utf8(t.as_bytes()).ok()?.parse().ok());
        let outcome = match kind.as_slice() {
            b"dir" => {
                let attrs = match self.attrs(headers) {
                    Ok(Some(attrs)) => attrs,
                    Ok(None) => return self.reject(name, "is a directory without X-MODE and X-MTIME"),
                    Err(why) => return self.reject(name, why),
                };
                match self.shared.inbox()?.make_dir(&placed.rel, attrs, overwrite) {
                    Ok(true) => Ok(Some(Mirrored::Directory)),
                    // Its attributes alone: not worth a line (every change
                    // inside a directory moves its mtime).
                    Ok(false) => Ok(None),
                    Err(e) => Err(e),
                }
            }
            b"link" => {
                let target =
                    headers.get(filemq_ext::TARGET).and_then(|t| std::str::from_utf8(t.as_bytes()).ok());
                let (Some(target), Some(mtime)) = (target, mtime) else {
                    return self.reject(name, "is a link without a UTF-8 X-TARGET and an X-MTIME");
                };
                let target = target.to_string();
                self.shared
                    .inbox()?
                    .make_link(&placed.rel, &target, mtime, overwrite)
                    .map(|()| Some(Mirrored::Link { target }))
            }
            b"attrs" => {
                let digest = headers.get(ext::SHA1).and_then(|d| Digest::normalise(d.as_bytes()));
                let attrs = match self.attrs(headers) {
                    Ok(Some(attrs)) => attrs,
                    _ => return self.reject(name, "has new attributes without a valid X-MODE and X-MTIME"),
                };
                let Some(digest) = digest else {
                    return self.reject(name, "has new attributes without X-SHA1");
                };
                match self.shared.inbox()?.set_attrs(&placed.rel, &digest, attrs, overwrite) {
                    Ok(Applied::Done) => Ok(Some(Mirrored::Attributes)),
                    Ok(Applied::Lacking) => {
                        // Not as the server believes: a RESYNC fetches it.
                        tracing::debug!(
                            "{} is not held as announced; asking for it again",
                            shown(&placed.rel)
                        );
                        let due = &mut self.resubscribe_at[placed.subscription];
                        *due = Some(Instant::now());
                        Ok(None)
                    }
                    Err(e) => Err(e),
                }
            }
            _ => {
                let shown_kind = escape_truncated(&kind, NAME_SHOWN);
                self.oddity(format_args!("ignoring an entry of unknown X-TYPE {shown_kind}"));
                return Ok(());
            }
        };
        match outcome {
            Ok(Some(what)) => {
                tracing::info!("updated {}", shown(&placed.rel));
                self.delivered = true;
                self.failures.remove(&placed.rel);
                self.emit(Event::Mirrored { path: placed.rel, what })
            }
            Ok(None) => Ok(()),
            Err(e) => self.file_error(name, placed, e),
        }
    }

    fn on_delete(&mut self, name: &[u8]) -> Result<(), End> {
        if self.incoming.as_ref().is_some_and(|i| i.name == name) {
            // The server gave up sending it: its part is of no more use.
            if let Some(incoming) = self.incoming.take() {
                tracing::debug!("{} was deleted while being received", shown(&incoming.rel));
                self.shared.inbox()?.abandon(incoming, false);
            }
        }
        if self.skipping.as_ref().is_some_and(|s| s.name == name) {
            self.skipping = None;
        }
        let placed = match self.shared.layout.place(name) {
            Ok(placed) => placed,
            Err(why) => return self.reject(name, why),
        };
        if self.shared.excluded(placed.subscription, &placed.rel, None) {
            // Excluded is protected, --delete or not.
            tracing::debug!("not deleting {}, which we excluded", shown(&placed.rel));
            return Ok(());
        }
        let any = self.shared.opts.delete;
        match self.shared.inbox()?.delete(&placed.rel, any) {
            Ok(Deleted::Removed) => {
                tracing::info!("deleted {}", shown(&placed.rel));
                self.delivered = true;
                self.emit(Event::Deleted { path: placed.rel })?;
                // Directories the publisher deleted before emptying them.
                for dir in self.shared.inbox()?.take_removed_dirs() {
                    tracing::info!("deleted {}", shown(&dir));
                    self.emit(Event::Deleted { path: dir })?;
                }
                Ok(())
            }
            Ok(Deleted::Absent) => {
                tracing::debug!("nothing to delete at {}", shown(&placed.rel));
                Ok(())
            }
            Ok(Deleted::Kept) => {
                tracing::info!("kept {}: not published, and not written by us", shown(&placed.rel));
                self.emit(Event::Kept { path: placed.rel, reason: Kept::NotPublished })
            }
            Err(e) => self.file_error(name, placed, e),
        }
    }

    /// Reports one file that could not be taken; only a fatal I/O error
    /// ends the subscriber.
    fn file_error(&mut self, name: &[u8], placed: Placed, e: FileError) -> Result<(), End> {
        match e {
            FileError::Refused(why) => self.reject(name, &why),
            FileError::NotOurs => {
                tracing::info!(
                    "kept {}: the publisher has another version, and we did not write this one",
                    shown(&placed.rel)
                );
                self.emit(Event::Kept { path: placed.rel, reason: Kept::Differs })
            }
            FileError::Integrity(why) => self.integrity_failed(placed, &why),
            FileError::Io(e) if inbox::is_fatal(&e) => {
                Err(End::Failed(format!("{}: {e}", shown(&placed.rel))))
            }
            FileError::Io(e) => self.reject(name, &e.to_string()),
        }
    }

    /// A file failed its check: it is asked for again (a RESYNC of its
    /// subscription) after a pause that doubles with each of its failures,
    /// and not at all after [`MAX_FAILURES`] in this session.
    fn integrity_failed(&mut self, placed: Placed, why: &str) -> Result<(), End> {
        // Counted per file, for so many files: past that (a server failing
        // file after file) a file counts as failing for the first time.
        let room = self.failures.len() < FAILURES_KEPT;
        let failures = match self.failures.get_mut(&placed.rel) {
            Some(failures) => {
                *failures += 1;
                *failures
            }
            None => {
                if room {
                    self.failures.insert(placed.rel.clone(), 1);
                }
                1
            }
        };
        if failures >= MAX_FAILURES {
            let shown = shown(&placed.rel);
            self.oddity(format_args!(
                "{shown}: {why}; not fetching it again in this session ({failures} failures)"
            ));
            self.emit(Event::IntegrityFailed { path: placed.rel.clone() })?;
            if failures == MAX_FAILURES {
                return self.emit(Event::GaveUp { path: placed.rel });
            }
            return Ok(());
        }
        let delay = self
            .shared
            .opts
            .refetch_delay
            .saturating_mul(1 << (failures - 1))
            .min(MAX_REFETCH_DELAY.max(self.shared.opts.refetch_delay));
        let shown = shown(&placed.rel);
        self.oddity(format_args!("{shown}: {why}; fetching it again in {} ms", delay.as_millis()));
        self.emit(Event::IntegrityFailed { path: placed.rel })?;
        let at = Instant::now() + delay;
        let due = &mut self.resubscribe_at[placed.subscription];
        // Sooner wins: one RESYNC fetches every file of the subscription
        // that is not held.
        *due = Some(due.map_or(at, |due| due.min(at)));
        Ok(())
    }

    /// Reports a refused name, escaped and cut short: a server may send
    /// names of megabytes, and control characters in them.
    fn reject(&mut self, name: &[u8], why: &str) -> Result<(), End> {
        let name = escape_truncated(name, NAME_SHOWN);
        self.oddity(format_args!("refusing {name} from the server: {why}"));
        self.emit(Event::Rejected { name, why: why.to_string() })
    }
}

/// The rest of a file we ignore: its chunks go on with the same name at
/// the next offset (and, if they say, the same digest).
pub(super) struct Skipping {
    name: Vec<u8>,
    next: u64,
    /// What its first chunk said in `X-SHA1` (see [`said_digest`]).
    digest: Option<Option<String>>,
}

impl Skipping {
    fn after(self, len: usize) -> Skipping {
        Skipping { next: self.next.saturating_add(len as u64), ..self }
    }
}

/// A chunk's `X-SHA1`: `None` if it has none, `Some(None)` if it is
/// malformed.
fn said_digest(headers: &Hash) -> Option<Option<String>> {
    headers.get(ext::SHA1).map(|text| Digest::normalise(text.as_bytes()))
}
