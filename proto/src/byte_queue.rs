//! A byte stream held as the chunks it arrived in (shared slices of the
//! frames, not copies), read back across chunk boundaries. The broker
//! queues a pipe's data in one; the client's reader buffers read-ahead
//! data in one.
//!
//! Small chunks are copied into a shared tail buffer instead: each received
//! frame costs a hundred bytes or so of bookkeeping, so a million one-byte
//! writes kept as frames would hold a hundred times their size.

use bytes::{Bytes, BytesMut};
use std::collections::VecDeque;

/// Chunks shorter than this are copied into the tail rather than kept.
const COPY_BELOW: usize = 4096;

#[derive(Debug, Default)]
pub struct ByteQueue {
    /// Older bytes, in order, then `tail`.
    chunks: VecDeque<Bytes>,
    tail: BytesMut,
    len: usize,
}

impl ByteQueue {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn push(&mut self, chunk: Bytes) {
        if chunk.is_empty() {
            return;
        }
        self.len += chunk.len();
        if chunk.len() < COPY_BELOW {
            self.tail.extend_from_slice(&chunk);
        } else {
            self.seal_tail();
            self.chunks.push_back(chunk);
        }
    }

    /// Moves the tail's bytes into the chunk list (no copy).
    fn seal_tail(&mut self) {
        if !self.tail.is_empty() {
            self.chunks.push_back(self.tail.split().freeze());
        }
    }

    /// Takes the first `n` bytes (or all, if fewer are queued). Zero-copy
    /// when they lie within one chunk.
    pub fn take(&mut self, n: usize) -> Bytes {
        let n = n.min(self.len);
        self.len -= n;
        if self.len + n - self.tail.len() < n {
            self.seal_tail();
        }
        match self.chunks.front_mut() {
            Some(front) if front.len() > n => return front.split_to(n),
            Some(front) if front.len() == n => return self.chunks.pop_front().unwrap_or_default(),
            _ => {}
        }
        let mut out = BytesMut::with_capacity(n);
        while out.len() < n {
            let Some(front) = self.chunks.front_mut() else {
                break;
            };
            let want = n - out.len();
            if front.len() <= want {
                out.extend_from_slice(front);
                self.chunks.pop_front();
            } else {
                out.extend_from_slice(&front.split_to(want));
            }
        }
        out.freeze()
    }

    /// Drops everything; returns how many bytes were dropped.
    pub fn clear(&mut self) -> usize {
        self.chunks.clear();
        // A new buffer: clearing would keep the old allocation.
        self.tail = BytesMut::new();
        std::mem::take(&mut self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn takes_across_chunk_boundaries() {
        let mut q = ByteQueue::default();
        q.push(Bytes::from_static(b"Hello, "));
        q.push(Bytes::new());
        q.push(Bytes::from_static(b"World"));
        assert_eq!(q.len(), 12);
        assert_eq!(&q.take(1)[..], b"H");
        assert_eq!(&q.take(8)[..], b"ello, Wo");
        assert_eq!(&q.take(100)[..], b"rld");
        assert!(q.is_empty());
        assert_eq!(&q.take(5)[..], b"");
    }

    #[test]
    fn small_chunks_are_gathered_large_ones_kept() {
        let mut q = ByteQueue::default();
        for _ in 0..1000 {
            q.push(Bytes::from_static(b"x"));
        }
        let big = Bytes::from(vec![b'!'; 5000]);
        q.push(big.clone());
        q.push(Bytes::from_static(b"?"));
        assert_eq!(q.len(), 6001);
        assert_eq!(q.chunks.len(), 2, "a thousand one-byte chunks became one");
        assert_eq!(&q.take(1000)[..], &[b'x'; 1000][..]);
        assert_eq!(q.take(5000).as_ptr(), big.as_ptr(), "a large chunk comes back without a copy");
        assert_eq!(&q.take(10)[..], b"?");
    }

    proptest! {
        /// Whatever the chunking, the bytes come out as they went in.
        #[test]
        fn is_a_byte_stream(chunks in proptest::collection::vec(
                                prop_oneof![proptest::collection::vec(any::<u8>(), 0..40),
                                            proptest::collection::vec(any::<u8>(), 4090..4200)], 0..20),
                            reads in proptest::collection::vec(prop_oneof![1usize..50, 1usize..9000], 1..40)) {
            let mut q = ByteQueue::default();
            let mut expected = Vec::new();
            for c in &chunks {
                expected.extend_from_slice(c);
                q.push(Bytes::from(c.clone()));
            }
            let mut got = Vec::new();
            for n in reads {
                let before = q.len();
                let b = q.take(n);
                prop_assert_eq!(b.len(), n.min(before));
                got.extend_from_slice(&b);
            }
            got.extend_from_slice(&q.take(usize::MAX));
            prop_assert_eq!(got, expected);
            prop_assert_eq!(q.len(), 0);
        }
    }
}
