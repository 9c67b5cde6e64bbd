//! A byte stream held as the chunks it arrived in (shared slices of the
//! frames, not copies), read back across chunk boundaries. The broker
//! queues a pipe's data in one; the client's reader buffers read-ahead
//! data in one.

use bytes::{Bytes, BytesMut};
use std::collections::VecDeque;

#[derive(Debug, Default)]
pub struct ByteQueue {
    chunks: VecDeque<Bytes>,
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
        if !chunk.is_empty() {
            self.len += chunk.len();
            self.chunks.push_back(chunk);
        }
    }

    /// Takes the first `n` bytes (or all, if fewer are queued). Zero-copy
    /// when they lie within one chunk.
    pub fn take(&mut self, n: usize) -> Bytes {
        let n = n.min(self.len);
        self.len -= n;
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

    proptest! {
        /// Whatever the chunking, the bytes come out as they went in.
        #[test]
        fn is_a_byte_stream(chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 0..20),
                            reads in proptest::collection::vec(1usize..50, 1..40)) {
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
