//! The FILEMQ codec (`FilemqMsg`), both ways, and the recognition of
//! older generations' OHAI.
//!
//! Invariants:
//! - `decode` never panics, whatever the bytes (raw, and again behind a
//!   valid `AA A3` header), and a lying `hash` count never makes it
//!   allocate more than the frame could hold (the RSS limit catches that);
//! - a decoded message re-encodes to exactly the bytes it came from, less
//!   any trailing bytes: the encoding is canonical; `encoded_len` is the
//!   encoded length; the re-encoding decodes to the same message;
//! - a decode error is the right one (`NoHeader`, `BadSignature`,
//!   `UnknownId` agree with the bytes);
//! - `Generation::of_ohai` agrees with `decode`: a v2 or v2-interim OHAI
//!   decodes as OHAI "FILEMQ" with version 2 or 1, a v1 OHAI does not
//!   decode;
//! - `Hash::get` finds the first entry with a key;
//! - every message built from arbitrary field values encodes and decodes
//!   back to itself.

#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use bytes::Bytes;
// Without cargo-fuzz, `tests/tests/fuzz_corpus.rs` supplies the macro.
#[cfg(fuzzing)]
use libfuzzer_sys::fuzz_target;
use zbroker_proto::codec::{Chunk, DecodeError, Hash, LongStr, ShortStr};
use zbroker_proto::filemq::{ceiling, FilemqMsg as M, Generation, Operation};

const IDS: [u8; 12] = [1, 4, 5, 6, 7, 8, 9, 10, 11, 128, 129, 130];

fn check_hash(h: &Hash) {
    for (i, (key, value)) in h.0.iter().enumerate() {
        let Ok(text) = std::str::from_utf8(key.as_bytes()) else { continue };
        let first = h.0.iter().position(|(k, _)| k.as_bytes() == key.as_bytes()).expect("present");
        assert!(first <= i);
        let got = h.get(text).expect("a key present is found");
        assert_eq!(got, &h.0[first].1);
        let _ = value;
    }
}

fn check_decode(frame: &[u8]) {
    let decoded = M::decode(Bytes::copy_from_slice(frame));
    match &decoded {
        Ok(msg) => {
            let encoded = msg.encode();
            assert_eq!(encoded.len(), msg.encoded_len(), "{msg:?}");
            assert!(frame.starts_with(&encoded), "not canonical: {msg:?}");
            assert_eq!(M::decode(encoded).as_ref(), Ok(msg));
            assert_eq!(frame[2], msg.id());
            let _ = msg.name();
            match msg {
                M::Icanhaz { options, cache, .. } => {
                    check_hash(options);
                    check_hash(cache);
                }
                M::Cheezburger { headers, .. } => check_hash(headers),
                _ => {}
            }
        }
        Err(error) => {
            let _ = error.to_string();
            match error.clone() {
                DecodeError::NoHeader(n) => assert!(n == frame.len() && n < 3),
                DecodeError::BadSignature { found, expected } => {
                    assert_eq!(expected, M::SIGNATURE);
                    assert_ne!(found, M::SIGNATURE);
                    assert_eq!(found.to_be_bytes(), [frame[0], frame[1]]);
                }
                DecodeError::UnknownId(_) | DecodeError::Truncated { .. } if frame.len() < 3 => {
                    panic!("{error:?} on a frame without a header")
                }
                DecodeError::UnknownId(id) => assert_eq!(id, frame[2]),
                DecodeError::Truncated { .. } | DecodeError::OverCeiling { .. } => {}
            }
        }
    }
    let ohai = |version| M::Ohai { protocol: ShortStr::lossy("FILEMQ"), version };
    match Generation::of_ohai(frame) {
        Some(Generation::V2) => assert_eq!(decoded, Ok(ohai(2))),
        Some(Generation::V2Interim) => assert_eq!(decoded, Ok(ohai(1))),
        Some(Generation::V1) => assert!(decoded.is_err(), "a v1 OHAI decoded: {decoded:?}"),
        None => {}
    }
}

type Pairs = Vec<(Vec<u8>, Vec<u8>)>;

/// Every message, with arbitrary field values.
#[derive(Arbitrary, Debug)]
enum Msg {
    Ohai(Vec<u8>, u16),
    OhaiOk,
    Icanhaz(Vec<u8>, Pairs, Pairs),
    IcanhazOk,
    Nom(u64, u64),
    Cheezburger {
        sequence: u64,
        operation: u8,
        filename: Vec<u8>,
        offset: u64,
        eof: u8,
        headers: Pairs,
        chunk: Vec<u8>,
    },
    Hugz,
    HugzOk,
    Kthxbai,
    Srsly(Vec<u8>),
    Rtfm(Vec<u8>),
}

fn short(mut bytes: Vec<u8>) -> ShortStr {
    bytes.truncate(ShortStr::MAX);
    ShortStr::new(bytes).expect("at most 255 bytes")
}

fn long(bytes: Vec<u8>) -> LongStr {
    LongStr(Bytes::from(bytes))
}

fn hash(pairs: Pairs) -> Hash {
    Hash(pairs.into_iter().map(|(k, v)| (short(k), long(v))).collect())
}

/// Whether a hash of `msg` holds more entries, or more bytes, than its
/// declaration allows.
fn over_a_ceiling(msg: &M) -> bool {
    let over = |hash: &Hash, entries: usize, bytes: usize| {
        // As the decoder counts: the entry count, then each key and value.
        let size: usize =
            4 + hash.0.iter().map(|(k, v)| 1 + k.as_bytes().len() + 4 + v.0.len()).sum::<usize>();
        hash.0.len() > entries || size > bytes
    };
    match msg {
        M::Icanhaz { options, cache, .. } => {
            over(options, ceiling::OPTIONS_ENTRIES, ceiling::OPTIONS_BYTES)
                || over(cache, ceiling::CACHE_ENTRIES, ceiling::CACHE_BYTES)
        }
        M::Cheezburger { headers, .. } => over(headers, ceiling::HEADERS_ENTRIES, ceiling::HEADERS_BYTES),
        _ => false,
    }
}

fn build(m: Msg) -> M {
    match m {
        Msg::Ohai(p, version) => M::Ohai { protocol: short(p), version },
        Msg::OhaiOk => M::OhaiOk {},
        Msg::Icanhaz(path, options, cache) => {
            M::Icanhaz { path: long(path), options: hash(options), cache: hash(cache) }
        }
        Msg::IcanhazOk => M::IcanhazOk {},
        Msg::Nom(credit, sequence) => M::Nom { credit, sequence },
        Msg::Cheezburger { sequence, operation, filename, offset, eof, headers, chunk } => M::Cheezburger {
            sequence,
            operation: match operation {
                1 => Operation::Create,
                2 => Operation::Delete,
                code => Operation::Other(code),
            },
            filename: long(filename),
            offset,
            eof,
            headers: hash(headers),
            chunk: Chunk(Bytes::from(chunk)),
        },
        Msg::Hugz => M::Hugz {},
        Msg::HugzOk => M::HugzOk {},
        Msg::Kthxbai => M::Kthxbai {},
        Msg::Srsly(r) => M::Srsly { reason: short(r) },
        Msg::Rtfm(r) => M::Rtfm { reason: short(r) },
    }
}

/// No wildcard: a message added to the protocol breaks this build until
/// `Msg` covers it too.
#[allow(dead_code)]
fn covered(m: &M) {
    match m {
        M::Ohai { .. }
        | M::OhaiOk {}
        | M::Icanhaz { .. }
        | M::IcanhazOk {}
        | M::Nom { .. }
        | M::Cheezburger { .. }
        | M::Hugz {}
        | M::HugzOk {}
        | M::Kthxbai {}
        | M::Srsly { .. }
        | M::Rtfm { .. } => {}
    }
}

fuzz_target!(|data: &[u8]| {
    check_decode(data);
    if let Some((&id, body)) = data.split_first() {
        let mut frame = vec![0xAA, 0xA3, IDS[id as usize % IDS.len()]];
        frame.extend_from_slice(body);
        check_decode(&frame);
        // The OHAI of every generation, with arbitrary tails.
        let mut hello = b"\xAA\xA3\x01\x06FILEMQ".to_vec();
        hello.extend_from_slice(body);
        check_decode(&hello);
    }
    let mut u = Unstructured::new(data);
    if let Ok(m) = Msg::arbitrary(&mut u) {
        let msg = build(m);
        let bytes = msg.encode();
        assert_eq!(bytes.len(), msg.encoded_len());
        // A message the encoder takes may still be over a ceiling its
        // receiver declares: then the decoder must say so, and only then.
        match M::decode(bytes.clone()) {
            Err(DecodeError::OverCeiling { .. }) => {
                assert!(over_a_ceiling(&msg), "refused within its ceilings")
            }
            decoded => assert_eq!(decoded.as_ref(), Ok(&msg)),
        }
        check_decode(&bytes);
    }
});
