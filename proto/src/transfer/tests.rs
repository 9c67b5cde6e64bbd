use super::*;
use proptest::prelude::*;

/// The stream's byte at `i`: payload without holding a file.
fn byte(i: u64) -> u8 {
    (i.wrapping_mul(31) ^ (i >> 7)) as u8
}

fn bytes(range: Range<u64>) -> Vec<u8> {
    range.map(byte).collect()
}

fn prefix_of(data: &[u8]) -> Prefix {
    let mut prefix = Prefix::new();
    prefix.feed(data);
    prefix
}

#[test]
fn a_chunk_is_the_least_of_chunk_size_credit_and_bytes_left() {
    let mut credit = Credit::new(u64::MAX);
    let mut out = Outflow::new(10);
    assert_eq!(out.next_chunk(4, &credit), None, "no credit, no chunk");
    credit.grant(3);
    let chunk = out.next_chunk(4, &credit).unwrap();
    assert_eq!(chunk, 0..3);
    out.begin(chunk.clone(), &credit).unwrap();
    assert_eq!(out.next_chunk(4, &credit), None, "one chunk in flight");
    assert_eq!(out.begin(3..4, &credit), Err(TransferError::InFlight));
    assert_eq!(out.sent(2, &mut credit), Err(TransferError::NotBegun { len: 2 }));
    assert_eq!(out.sent(3, &mut credit), Ok(0..3));
    assert_eq!(credit.available(), 0);
    credit.grant(100);
    assert_eq!(out.next_chunk(4, &credit), Some(3..7));
    out.begin(3..7, &credit).unwrap();
    out.sent(4, &mut credit).unwrap();
    assert_eq!(out.next_chunk(4, &credit), Some(7..10), "what is left");
    out.begin(7..10, &credit).unwrap();
    assert!(!out.is_done(), "not while in flight");
    out.sent(3, &mut credit).unwrap();
    assert!(out.is_done());
    assert_eq!(out.next_chunk(4, &credit), None);
    assert_eq!(credit.available(), 100 - 7);
}

#[test]
fn a_sender_refuses_to_break_the_rules_itself() {
    let mut credit = Credit::new(8);
    credit.grant(5);
    credit.grant(5);
    assert_eq!(credit.available(), 8, "grants beyond the ceiling are dropped");
    let mut out = Outflow::resume(20, 4);
    assert_eq!(out.begin(5..6, &credit), Err(TransferError::Gap { offset: 5, expected: 4 }));
    assert_eq!(out.begin(3..6, &credit), Err(TransferError::Overlap { offset: 3, expected: 4 }));
    assert_eq!(out.begin(4..13, &credit), Err(TransferError::OverCredit { len: 9, credit: 8 }));
    assert_eq!(Outflow::resume(5, 4).begin(4..6, &credit), Err(TransferError::PastSize { end: 6, size: 5 }));
    #[allow(clippy::reversed_empty_ranges)]
    out.begin(4..2, &credit).unwrap();
    assert_eq!(out.sent(0, &mut credit), Ok(4..4), "a reversed range is empty");
    out.begin(4..6, &credit).unwrap();
    out.cancel();
    assert_eq!(out.offset(), 4, "a cancelled chunk is sent again");
    assert_eq!(Outflow::resume(5, 9).offset(), 5, "a resume past the end is the end");
}

#[test]
fn a_window_is_topped_up_a_slice_below_it() {
    let mut window = Window::new(10, 3);
    assert_eq!(window.grant_due(), Some(10));
    assert_eq!(window.grant_due(), None);
    window.receive(3).unwrap();
    assert_eq!(window.grant_due(), None, "a slice below is not below it");
    window.receive(1).unwrap();
    assert_eq!(window.grant_due(), Some(4));
    // A small window is topped up at half of it.
    let mut small = Window::new(4, 1_000_000);
    assert_eq!(small.grant_due(), Some(4));
    small.receive(2).unwrap();
    assert_eq!(small.grant_due(), None);
    small.receive(1).unwrap();
    assert_eq!(small.grant_due(), Some(3));
    assert_eq!(small.receive(5), Err(TransferError::OverCredit { len: 5, credit: 4 }));
    assert_eq!(small.credit(), 4, "a refused chunk spends nothing");
}

#[test]
fn a_receiver_refuses_every_deviation() {
    let mut inflow = Inflow::new(Some(6));
    inflow.accept(0, b"ab").unwrap();
    assert_eq!(inflow.accept(3, b"d"), Err(TransferError::Gap { offset: 3, expected: 2 }));
    assert_eq!(inflow.accept(1, b"bc"), Err(TransferError::Overlap { offset: 1, expected: 2 }));
    assert_eq!(inflow.accept(2, b"cdefg"), Err(TransferError::PastSize { end: 7, size: 6 }));
    assert_eq!(inflow.offset(), 2, "refused chunks change nothing");
    let short = inflow.clone().finish(None);
    assert_eq!(short, Err(TransferError::Incomplete { received: 2, size: 6 }));
    inflow.accept(2, b"cdef").unwrap();
    let wrong = Digest::of(b"abcdeX");
    assert_eq!(
        inflow.clone().finish(Some(&wrong)),
        Err(TransferError::Mismatch { received: Digest::of(b"abcdef"), expected: wrong })
    );
    assert_eq!(inflow.finish(Some(&Digest::of(b"abcdef"))), Ok(Digest::of(b"abcdef")));
    // Without a declared size, any length; the digest still decides.
    let mut open = Inflow::new(None);
    open.accept(0, b"xyz").unwrap();
    assert_eq!(open.finish(None), Ok(Digest::of(b"xyz")));
}

#[test]
fn a_resume_needs_the_whole_prefix_and_the_right_one() {
    let whole = b"0123456789";
    let digest = Digest::of(whole);
    let at = Inflow::resume(Some(10), 4, prefix_of(b"012"));
    assert_eq!(at.unwrap_err(), TransferError::Prefix { at: 4, held: 3 });
    let past = Inflow::resume(Some(3), 4, prefix_of(b"0123"));
    assert_eq!(past.unwrap_err(), TransferError::PastSize { end: 4, size: 3 });
    let mut good = Inflow::resume(Some(10), 4, prefix_of(b"0123")).unwrap();
    assert_eq!(good.accept(0, b"0123"), Err(TransferError::Overlap { offset: 0, expected: 4 }));
    good.accept(4, b"456789").unwrap();
    assert_eq!(good.finish(Some(&digest)), Ok(digest));
    let mut wrong = Inflow::resume(Some(10), 4, prefix_of(b"0X23")).unwrap();
    wrong.accept(4, b"456789").unwrap();
    assert!(matches!(wrong.finish(Some(&digest)), Err(TransferError::Mismatch { .. })));
}

/// One move of a session: the receiver tops its credit up (if due), or the
/// sender sends a chunk (if it may).
#[derive(Debug, Clone, Copy)]
enum Step {
    Grant,
    Send,
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Whatever the sizes, the window, the sender's ceiling (above the
    /// slice), the resume
    /// point and the order of grants and sends, every chunk a sender
    /// produces is accepted, fits the chunk size and the credit, and the
    /// receiver reassembles exactly the stream, verified.
    #[test]
    fn what_a_sender_sends_a_receiver_accepts_whole(
        size in prop_oneof![0u64..64, 0u64..6000],
        resume in 0u64..7000,
        chunk_size in prop_oneof![1u64..16, 1u64..3000],
        window in prop_oneof![1u64..32, 1u64..9000],
        slice in 0u64..5000,
        extra in prop_oneof![0u64..64, Just(u64::MAX / 2)],
        steps in proptest::collection::vec(prop_oneof![Just(Step::Grant), Just(Step::Send)], 0..200),
    ) {
        // A sender's ceiling above the receiver's slice (see `Credit`).
        let ceiling = slice.min(window / 2) + 1 + extra;
        let at = resume.min(size);
        let mut receiver = Window::new(window, slice);
        let mut inflow = Inflow::resume(Some(size), at, prefix_of(&bytes(0..at))).unwrap();
        let mut credit = Credit::new(ceiling);
        let mut outflow = Outflow::resume(size, resume);
        prop_assert_eq!(outflow.offset(), at);
        let mut received = bytes(0..at);
        let mut step = |step: Step, credit: &mut Credit, outflow: &mut Outflow| -> Result<(), TestCaseError> {
            match step {
                Step::Grant => {
                    if let Some(grant) = receiver.grant_due() {
                        credit.grant(grant);
                    }
                }
                Step::Send => {
                    let Some(chunk) = outflow.next_chunk(chunk_size, credit) else { return Ok(()) };
                    let len = chunk.end - chunk.start;
                    prop_assert!(len >= 1 && len <= chunk_size && len <= credit.available());
                    outflow.begin(chunk.clone(), credit).unwrap();
                    let data = bytes(chunk.clone());
                    prop_assert_eq!(outflow.sent(len, credit), Ok(chunk.clone()));
                    receiver.receive(len).unwrap();
                    inflow.accept(chunk.start, &data).unwrap();
                    received.extend_from_slice(&data);
                }
            }
            // The sender never believes it holds more than was granted.
            prop_assert!(credit.available() <= receiver.credit());
            Ok(())
        };
        for s in steps {
            step(s, &mut credit, &mut outflow)?;
        }
        // Then to the end: each round sends something.
        while !outflow.is_done() {
            step(Step::Grant, &mut credit, &mut outflow)?;
            step(Step::Send, &mut credit, &mut outflow)?;
        }
        prop_assert_eq!(inflow.offset(), size);
        prop_assert_eq!(&received, &bytes(0..size));
        let digest = Digest::of(&received);
        prop_assert_eq!(inflow.finish(Some(&digest)), Ok(digest));
    }

    /// Any chunk at any offset is accepted exactly when it is the next
    /// one and within the size, and refused with the reason otherwise;
    /// over credit, it is refused whatever it is.
    #[test]
    fn a_receiver_refuses_each_deviation_with_its_reason(
        size in 0u64..1000,
        held in 0u64..1000,
        offset in 0u64..1200,
        len in 0usize..300,
        credit in 0u64..400,
    ) {
        let held = held.min(size);
        let mut inflow = Inflow::resume(Some(size), held, prefix_of(&bytes(0..held))).unwrap();
        let chunk = bytes(offset..offset + len as u64);
        let end = offset + len as u64;
        let expected = if offset > held {
            Err(TransferError::Gap { offset, expected: held })
        } else if offset < held {
            Err(TransferError::Overlap { offset, expected: held })
        } else if end > size {
            Err(TransferError::PastSize { end, size })
        } else {
            Ok(())
        };
        prop_assert_eq!(inflow.accept(offset, &chunk), expected.clone());
        prop_assert_eq!(inflow.offset(), if expected.is_ok() { end } else { held });
        let mut window = Window::new(credit, 0);
        window.grant_due();
        let spent = window.receive(len as u64);
        if len as u64 > credit {
            prop_assert_eq!(spent, Err(TransferError::OverCredit { len: len as u64, credit }));
        } else {
            prop_assert_eq!(spent, Ok(()));
            prop_assert_eq!(window.credit(), credit - len as u64);
        }
    }

    /// A stream whose bytes (or resumed prefix) differ from the declared
    /// digest in any one byte fails verification, naming both digests.
    #[test]
    fn a_wrong_byte_anywhere_fails_verification(
        size in 1u64..2000,
        at in 0u64..2000,
        wrong in 0u64..2000,
        flip in 1u8..=255,
    ) {
        let at = at.min(size);
        let wrong = wrong % size;
        let whole = bytes(0..size);
        let mut sent = whole.clone();
        sent[wrong as usize] ^= flip;
        let mut inflow = Inflow::resume(Some(size), at, prefix_of(&sent[..at as usize])).unwrap();
        inflow.accept(at, &sent[at as usize..]).unwrap();
        let expected = Digest::of(&whole);
        prop_assert_eq!(
            inflow.finish(Some(&expected)),
            Err(TransferError::Mismatch { received: Digest::of(&sent), expected })
        );
    }
}
