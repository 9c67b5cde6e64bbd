//! A stream of bytes moved under credit, verified at its end: the rules
//! both ends of a transfer keep, written once. FILEMQ follows them today;
//! any service that moves files (and its client) uses them the same way.
//!
//! - The receiver grants credit, in bytes of payload ([`Window`]); the
//!   sender holds what it was granted ([`Credit`]) and spends it on every
//!   payload byte it sends. The receiver spends its own count on every
//!   payload byte that arrives, whatever it makes of them, so both counts
//!   stay equal without ever being compared; a chunk beyond the credit is
//!   refused ([`TransferError::OverCredit`]).
//! - The sender cuts a stream ([`Outflow`]) into chunks of at most the
//!   chunk size and never beyond the credit it holds, one chunk in flight
//!   at a time, from where the receiver already is (a resume) to the size
//!   it declared.
//! - The receiver ([`Inflow`]) takes chunks only in order: no gap, no
//!   overlap, nothing past the declared size. It hashes what it accepts,
//!   and at the end the stream must be whole and have the digest the
//!   sender declared ([`Inflow::finish`]): a stream arrives whole and
//!   verified, or its receiver is told why not. A resume hashes the prefix
//!   held first ([`Prefix`]), so a wrong prefix fails the same check.
//!
//! Only the rules: no buffer of payload, no disk, no clock. The caller
//! reads and writes the bytes; credit is kept apart from any one stream
//! because a connection's credit spans the streams it carries (FILEMQ
//! grants credit per connection, and files follow one another on it).

use crate::digest::Digest;
use sha1::{Digest as _, Sha1};
use std::ops::Range;

/// Why a chunk, a resume or a finished stream is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransferError {
    /// More payload than the credit granted and not yet spent.
    #[error("a {len}-byte chunk with only {credit} bytes of credit granted")]
    OverCredit { len: u64, credit: u64 },
    /// A chunk starting after the next byte expected: bytes are missing.
    #[error("a chunk at offset {offset} when {expected} was next: bytes are missing")]
    Gap { offset: u64, expected: u64 },
    /// A chunk starting before the next byte expected: bytes repeated.
    #[error("a chunk at offset {offset} when {expected} was next: bytes repeated")]
    Overlap { offset: u64, expected: u64 },
    /// A chunk (or a resume) that ends past the declared size.
    #[error("more than the {size} bytes announced (up to {end})")]
    PastSize { end: u64, size: u64 },
    /// The stream ended before its declared size.
    #[error("{received} bytes received, {size} announced")]
    Incomplete { received: u64, size: u64 },
    /// The stream's digest is not the one declared.
    #[error("SHA-1 {received} received, {expected} announced")]
    Mismatch { received: Digest, expected: Digest },
    /// A resume whose prefix was not hashed to the resume offset.
    #[error("resumes at {at}, but the prefix hashed holds {held} bytes")]
    Prefix { at: u64, held: u64 },
    /// (Sender) a chunk begun while another is in flight.
    #[error("a chunk is already in flight")]
    InFlight,
    /// (Sender) a chunk sent that was not the one begun.
    #[error("a {len}-byte chunk sent that was not the one begun")]
    NotBegun { len: u64 },
}

/// The credit a sender holds: granted by its receiver, spent on payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Credit {
    available: u64,
    /// Most credit held: grants beyond it are dropped. It bounds what a
    /// sender may have in flight to one receiver. It must exceed the
    /// receiver's slice ([`Window`]): a receiver that believes it granted
    /// more than its sender kept tops up only once a slice is spent.
    ceiling: u64,
}

impl Credit {
    pub fn new(ceiling: u64) -> Credit {
        Credit { available: 0, ceiling }
    }

    /// The receiver granted `bytes` more.
    pub fn grant(&mut self, bytes: u64) {
        self.available = self.available.saturating_add(bytes).min(self.ceiling);
    }

    /// Bytes of payload that may be sent now.
    pub fn available(&self) -> u64 {
        self.available
    }
}

/// The credit a receiver keeps granted: a window of bytes, topped up once
/// what is left of it falls a slice (or half a small window) below it, so
/// that a stream of chunks is not answered by a stream of grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    window: u64,
    slice: u64,
    /// Granted and not yet spent, as far as the receiver can tell.
    credit: u64,
}

impl Window {
    pub fn new(window: u64, slice: u64) -> Window {
        Window { window, slice, credit: 0 }
    }

    /// Granted and not yet spent.
    pub fn credit(&self) -> u64 {
        self.credit
    }

    /// `len` bytes of payload arrived: they spent credit whatever the
    /// receiver makes of them (counting only what it keeps would drift).
    /// More than the credit left is refused, and spends nothing: a sender
    /// that breaks the rule is not to be believed any further.
    pub fn receive(&mut self, len: u64) -> Result<(), TransferError> {
        if len > self.credit {
            return Err(TransferError::OverCredit { len, credit: self.credit });
        }
        self.credit -= len;
        Ok(())
    }

    /// The credit to grant now, if it is time (and it counts as granted).
    pub fn grant_due(&mut self) -> Option<u64> {
        let refill_below = self.window - self.slice.min(self.window / 2);
        if self.credit >= refill_below {
            return None;
        }
        let grant = self.window - self.credit;
        self.credit = self.window;
        Some(grant)
    }
}

/// A stream as its sender sends it: where it is, and the chunk in flight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outflow {
    size: u64,
    offset: u64,
    in_flight: Option<Range<u64>>,
}

impl Outflow {
    /// A stream of `size` bytes sent from the start.
    pub fn new(size: u64) -> Outflow {
        Outflow::resume(size, 0)
    }

    /// A stream of which the receiver holds the first `at` bytes (no more
    /// than the whole).
    pub fn resume(size: u64, at: u64) -> Outflow {
        Outflow { size, offset: at.min(size), in_flight: None }
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// The next byte to send (a chunk in flight not counted).
    pub fn offset(&self) -> u64 {
        self.offset
    }

    pub fn in_flight(&self) -> Option<&Range<u64>> {
        self.in_flight.as_ref()
    }

    /// Every byte has been sent.
    pub fn is_done(&self) -> bool {
        self.offset >= self.size && self.in_flight.is_none()
    }

    /// The next chunk to send: `min(chunk_size, credit, bytes left)` bytes
    /// from the offset. `None` while a chunk is in flight, once done, or
    /// without credit: a small credit sends a small chunk, never nothing
    /// for ever, never a chunk again.
    pub fn next_chunk(&self, chunk_size: u64, credit: &Credit) -> Option<Range<u64>> {
        let len = chunk_size.min(credit.available()).min(self.size - self.offset);
        (self.in_flight.is_none() && len > 0).then(|| self.offset..self.offset + len)
    }

    /// The chunk is on its way (its bytes being read, say): no other until
    /// it is [`Outflow::sent`]. It must start at the offset, end within the
    /// size and fit the credit.
    pub fn begin(&mut self, chunk: Range<u64>, credit: &Credit) -> Result<(), TransferError> {
        if self.in_flight.is_some() {
            return Err(TransferError::InFlight);
        }
        in_order(chunk.start, self.offset)?;
        // A reversed range is an empty one, as `Range` reads it.
        let chunk = chunk.start..chunk.end.max(chunk.start);
        if chunk.end > self.size {
            return Err(TransferError::PastSize { end: chunk.end, size: self.size });
        }
        let len = chunk.end - chunk.start;
        if len > credit.available() {
            return Err(TransferError::OverCredit { len, credit: credit.available() });
        }
        self.in_flight = Some(chunk);
        Ok(())
    }

    /// The chunk begun, `len` bytes, was sent: the offset moves past it and
    /// its bytes spend credit. Returns its range.
    pub fn sent(&mut self, len: u64, credit: &mut Credit) -> Result<Range<u64>, TransferError> {
        let chunk = match self.in_flight.take() {
            Some(chunk) if chunk.end - chunk.start == len => chunk,
            other => {
                self.in_flight = other;
                return Err(TransferError::NotBegun { len });
            }
        };
        self.offset = chunk.end;
        // Credit only grows while a chunk is in flight: this never
        // saturates, but a sender must never underflow whatever happens.
        credit.available = credit.available.saturating_sub(len);
        Ok(chunk)
    }

    /// The chunk in flight will not be sent (its read failed): the next
    /// one starts at the offset again.
    pub fn cancel(&mut self) {
        self.in_flight = None;
    }
}

/// The bytes a receiver already holds of a stream, hashed before it
/// resumes: fed in order, as read back.
#[derive(Clone, Default)]
pub struct Prefix {
    hasher: Sha1,
    len: u64,
}

impl Prefix {
    pub fn new() -> Prefix {
        Prefix::default()
    }

    pub fn feed(&mut self, bytes: &[u8]) {
        self.hasher.update(bytes);
        self.len += bytes.len() as u64;
    }

    /// Bytes fed so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// A stream as its receiver takes it: the next byte expected, the size
/// declared (if the sender declared one), and the digest of what was
/// accepted so far. Only what is declared can be checked: FILEMQ's
/// original server declares neither size nor digest, so its files are
/// taken as they come; a new service declares both.
#[derive(Clone)]
pub struct Inflow {
    size: Option<u64>,
    offset: u64,
    hasher: Sha1,
}

impl std::fmt::Debug for Inflow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inflow").field("size", &self.size).field("offset", &self.offset).finish()
    }
}

impl Inflow {
    /// A stream received from its first byte.
    pub fn new(size: Option<u64>) -> Inflow {
        Inflow { size, offset: 0, hasher: Sha1::new() }
    }

    /// A stream received from `at`, the receiver holding the bytes before
    /// it, hashed into `prefix` (exactly `at` of them).
    pub fn resume(size: Option<u64>, at: u64, prefix: Prefix) -> Result<Inflow, TransferError> {
        if prefix.len != at {
            return Err(TransferError::Prefix { at, held: prefix.len });
        }
        if let Some(size) = size.filter(|&size| at > size) {
            return Err(TransferError::PastSize { end: at, size });
        }
        Ok(Inflow { size, offset: at, hasher: prefix.hasher })
    }

    /// The next byte expected: the bytes held so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The size declared, if any.
    pub fn size(&self) -> Option<u64> {
        self.size
    }

    /// Takes `chunk`, sent as the bytes at `offset`: it must start at the
    /// next byte expected and end within the declared size. Refused, it
    /// changes nothing. (Credit is the connection's: see [`Window`].)
    pub fn accept(&mut self, offset: u64, chunk: &[u8]) -> Result<(), TransferError> {
        in_order(offset, self.offset)?;
        let end = self.offset.saturating_add(chunk.len() as u64);
        if let Some(size) = self.size.filter(|&size| end > size) {
            return Err(TransferError::PastSize { end, size });
        }
        self.hasher.update(chunk);
        self.offset = end;
        Ok(())
    }

    /// The stream is over: it must hold the declared size (if declared)
    /// and have the digest `expected` (if the sender declared one).
    /// Returns the digest of what was received.
    pub fn finish(self, expected: Option<&Digest>) -> Result<Digest, TransferError> {
        if let Some(size) = self.size.filter(|&size| size != self.offset) {
            return Err(TransferError::Incomplete { received: self.offset, size });
        }
        let received = Digest::from_hasher(self.hasher);
        match expected {
            Some(&expected) if expected != received => Err(TransferError::Mismatch { received, expected }),
            _ => Ok(received),
        }
    }
}

/// A chunk at `offset` where `expected` is next.
fn in_order(offset: u64, expected: u64) -> Result<(), TransferError> {
    match offset.cmp(&expected) {
        std::cmp::Ordering::Equal => Ok(()),
        std::cmp::Ordering::Greater => Err(TransferError::Gap { offset, expected }),
        std::cmp::Ordering::Less => Err(TransferError::Overlap { offset, expected }),
    }
}

#[cfg(test)]
mod tests;
