//! The receiving side of `zbroker_proto::transfer` (`Window`, `Inflow`,
//! `Prefix`) against an arbitrary sender: grants, chunks at any offset of
//! any length, resumes with any prefix, and the end of the stream with any
//! digest, in any order.
//!
//! Invariants:
//! - nothing panics (overflow checks on);
//! - a chunk is taken only within the credit left: the bytes accepted
//!   never exceed the credit granted, and a refused chunk spends nothing;
//! - a chunk is accepted exactly when it starts at the next byte and ends
//!   within the declared size, and then the next byte moves past it; a
//!   refused one changes nothing, and the error names the right reason;
//! - a stream finishes exactly when it is whole (declared size) and its
//!   digest is the one declared, and the digest returned is that of the
//!   prefix and the chunks accepted, in order.

#![no_main]

use arbitrary::Arbitrary;
// Without cargo-fuzz, `tests/tests/fuzz_corpus.rs` supplies the macro.
#[cfg(fuzzing)]
use libfuzzer_sys::fuzz_target;
use sha1::{Digest as _, Sha1};
use zbroker_proto::digest::Digest;
use zbroker_proto::transfer::{Inflow, Prefix, TransferError, Window};

#[derive(Arbitrary, Debug)]
enum Step {
    /// The receiver tops its credit up, if due.
    Grant,
    /// The sender sends `len` bytes of `fill` as the bytes at `offset`
    /// (relative to the next one expected, so that most are near it).
    Chunk { ahead: i16, len: u16, fill: u8 },
    /// The sender says the stream is over, with this digest (or the right
    /// one).
    Finish { digest: Option<[u8; 20]> },
}

#[derive(Arbitrary, Debug)]
struct Session {
    window: u32,
    slice: u32,
    size: Option<u32>,
    /// Resume at the prefix's length (plus `skew`), the prefix being
    /// `held` bytes of `fill`.
    resume: Option<(u16, u8, i8)>,
    steps: Vec<Step>,
}

fuzz_target!(|session: Session| {
    let size = session.size.map(u64::from);
    let mut window = Window::new(u64::from(session.window), u64::from(session.slice));
    let mut hasher = Sha1::new();
    let start = match session.resume {
        None => Some(Inflow::new(size)),
        Some((held, fill, skew)) => {
            let bytes = vec![fill; usize::from(held)];
            let mut prefix = Prefix::new();
            prefix.feed(&bytes);
            let at = (u64::from(held)).saturating_add_signed(i64::from(skew));
            let resumed = Inflow::resume(size, at, prefix);
            match &resumed {
                Ok(inflow) => {
                    assert_eq!(at, u64::from(held), "a resume is at the prefix's end");
                    assert!(size.is_none_or(|size| at <= size));
                    assert_eq!(inflow.offset(), at);
                    hasher.update(&bytes);
                }
                Err(TransferError::Prefix { at: a, held: h }) => {
                    assert!(*a == at && *h == u64::from(held) && at != *h)
                }
                Err(TransferError::PastSize { end, size: s }) => {
                    assert!(*end == at && Some(*s) == size && at > *s)
                }
                Err(other) => panic!("a resume refused for {other:?}"),
            }
            resumed.ok()
        }
    };
    let Some(mut inflow) = start else { return };
    let mut granted = 0u64;
    let mut accepted = 0u64;
    for step in session.steps {
        match step {
            Step::Grant => {
                let before = window.credit();
                if let Some(grant) = window.grant_due() {
                    assert!(grant > 0);
                    assert_eq!(window.credit(), before + grant);
                    granted += grant;
                }
            }
            Step::Chunk { ahead, len, fill } => {
                let len = u64::from(len);
                let credit = window.credit();
                match window.receive(len) {
                    Ok(()) => {
                        assert!(len <= credit);
                        assert_eq!(window.credit(), credit - len);
                    }
                    Err(e) => {
                        assert_eq!(e, TransferError::OverCredit { len, credit });
                        assert_eq!(window.credit(), credit, "a refused chunk spends nothing");
                        // A sender that breaks the credit rule is left.
                        return;
                    }
                }
                let next = inflow.offset();
                let offset = next.saturating_add_signed(i64::from(ahead));
                let data = vec![fill; len as usize];
                let end = offset + len;
                match inflow.accept(offset, &data) {
                    Ok(()) => {
                        assert_eq!(offset, next);
                        assert!(size.is_none_or(|size| end <= size));
                        assert_eq!(inflow.offset(), end);
                        hasher.update(&data);
                        accepted += len;
                    }
                    Err(e) => {
                        assert_eq!(inflow.offset(), next, "a refused chunk changes nothing");
                        match e {
                            TransferError::Gap { offset: o, expected } => {
                                assert!(o == offset && expected == next && o > next)
                            }
                            TransferError::Overlap { offset: o, expected } => {
                                assert!(o == offset && expected == next && o < next)
                            }
                            TransferError::PastSize { end: e, size: s } => {
                                assert!(offset == next && e == end && Some(s) == size && e > s)
                            }
                            other => panic!("a chunk refused for {other:?}"),
                        }
                    }
                }
                // What was taken never exceeds what was granted.
                assert!(accepted <= granted);
            }
            Step::Finish { digest } => {
                let received = Digest::from_hasher(hasher.clone());
                let expected = digest.map(Digest);
                let whole = size.is_none_or(|size| size == inflow.offset());
                let offset = inflow.offset();
                match inflow.clone().finish(expected.as_ref()) {
                    Ok(digest) => {
                        assert!(whole);
                        assert_eq!(digest, received);
                        assert!(expected.is_none_or(|e| e == received));
                    }
                    Err(TransferError::Incomplete { received: r, size: s }) => {
                        assert!(!whole && r == offset && Some(s) == size)
                    }
                    Err(TransferError::Mismatch { received: r, expected: e }) => {
                        assert!(whole && r == received && Some(e) == expected && e != r)
                    }
                    Err(other) => panic!("a stream refused for {other:?}"),
                }
            }
        }
    }
});
