//! The ZPIPES codec (`ZpipesMsg`), both ways.
//!
//! Invariants:
//! - `decode` never panics, whatever the bytes (raw, and again behind a
//!   valid `AA A0` header so the field decoders get most of the effort);
//! - a decoded message re-encodes to exactly the bytes it came from, less
//!   any trailing bytes (decode ignores them): the encoding is canonical;
//!   `encoded_len` is the encoded length, and the re-encoding decodes to
//!   the same message;
//! - a decode error is the right one (`NoHeader` iff under 3 bytes,
//!   `BadSignature` iff the signature is not `AA A0`);
//! - every message built from arbitrary field values encodes and decodes
//!   back to itself; `ShortStr::new` refuses over 255 bytes and
//!   `ShortStr::lossy` cuts at a character boundary.

#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use bytes::Bytes;
// Without cargo-fuzz, `tests/tests/fuzz_corpus.rs` supplies the macro.
#[cfg(fuzzing)]
use libfuzzer_sys::fuzz_target;
use zbroker_proto::codec::{Chunk, DecodeError, EncodeError, ShortStr};
use zbroker_proto::ZpipesMsg as M;

fn check_decode(frame: &[u8]) {
    match M::decode(Bytes::copy_from_slice(frame)) {
        Ok(msg) => {
            let encoded = msg.encode();
            assert_eq!(encoded.len(), msg.encoded_len(), "{msg:?}");
            assert!(frame.starts_with(&encoded), "not canonical: {msg:?}");
            assert_eq!(M::decode(encoded).as_ref(), Ok(&msg));
            assert_eq!(frame[2], msg.id());
            let _ = (msg.name(), msg.sender());
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
}

/// Every message, with arbitrary field values.
#[derive(Arbitrary, Debug)]
enum Msg {
    Input(Vec<u8>),
    InputOk,
    InputFailed(Vec<u8>),
    Output(Vec<u8>),
    OutputOk,
    OutputFailed(Vec<u8>),
    Read(u32, u32),
    ReadOk(Vec<u8>),
    ReadEnd,
    ReadTimeout,
    ReadFailed(Vec<u8>),
    Write(Vec<u8>, u32),
    WriteOk,
    WriteTimeout,
    WriteFailed(Vec<u8>),
    Close,
    CloseOk,
    CloseFailed(Vec<u8>),
    Ping,
    PingOk,
    Invalid,
}

fn short(bytes: Vec<u8>) -> ShortStr {
    let len = bytes.len();
    match ShortStr::new(bytes.clone()) {
        Ok(s) => {
            assert!(len <= ShortStr::MAX);
            assert_eq!(s.as_bytes(), &bytes[..]);
            s
        }
        Err(EncodeError::StringTooLong(n)) => {
            assert!(n == len && len > ShortStr::MAX);
            ShortStr::new(bytes[..ShortStr::MAX].to_vec()).expect("255 bytes fit")
        }
    }
}

fn build(m: Msg) -> M {
    let chunk = |b: Vec<u8>| Chunk(Bytes::from(b));
    match m {
        Msg::Input(p) => M::Input { pipename: short(p) },
        Msg::InputOk => M::InputOk {},
        Msg::InputFailed(r) => M::InputFailed { reason: short(r) },
        Msg::Output(p) => M::Output { pipename: short(p) },
        Msg::OutputOk => M::OutputOk {},
        Msg::OutputFailed(r) => M::OutputFailed { reason: short(r) },
        Msg::Read(size, timeout) => M::Read { size, timeout },
        Msg::ReadOk(c) => M::ReadOk { chunk: chunk(c) },
        Msg::ReadEnd => M::ReadEnd {},
        Msg::ReadTimeout => M::ReadTimeout {},
        Msg::ReadFailed(r) => M::ReadFailed { reason: short(r) },
        Msg::Write(c, timeout) => M::Write { chunk: chunk(c), timeout },
        Msg::WriteOk => M::WriteOk {},
        Msg::WriteTimeout => M::WriteTimeout {},
        Msg::WriteFailed(r) => M::WriteFailed { reason: short(r) },
        Msg::Close => M::Close {},
        Msg::CloseOk => M::CloseOk {},
        Msg::CloseFailed(r) => M::CloseFailed { reason: short(r) },
        Msg::Ping => M::Ping {},
        Msg::PingOk => M::PingOk {},
        Msg::Invalid => M::Invalid {},
    }
}

/// No wildcard: a message added to the protocol breaks this build until
/// `Msg` covers it too.
#[allow(dead_code)]
fn covered(m: &M) {
    match m {
        M::Input { .. }
        | M::InputOk {}
        | M::InputFailed { .. }
        | M::Output { .. }
        | M::OutputOk {}
        | M::OutputFailed { .. }
        | M::Read { .. }
        | M::ReadOk { .. }
        | M::ReadEnd {}
        | M::ReadTimeout {}
        | M::ReadFailed { .. }
        | M::Write { .. }
        | M::WriteOk {}
        | M::WriteTimeout {}
        | M::WriteFailed { .. }
        | M::Close {}
        | M::CloseOk {}
        | M::CloseFailed { .. }
        | M::Ping {}
        | M::PingOk {}
        | M::Invalid {} => {}
    }
}

fn check_lossy(text: &str) {
    let s = ShortStr::lossy(text);
    assert!(s.as_bytes().len() <= ShortStr::MAX);
    assert!(text.as_bytes().starts_with(s.as_bytes()));
    assert!(std::str::from_utf8(s.as_bytes()).is_ok(), "cut inside a character");
    assert!(text.len() > ShortStr::MAX || s.as_bytes().len() == text.len());
}

fuzz_target!(|data: &[u8]| {
    check_decode(data);
    if let Some((&id, body)) = data.split_first() {
        // Ids 0..=23: every message and a few unknown ones.
        let mut frame = vec![0xAA, 0xA0, id % 24];
        frame.extend_from_slice(body);
        check_decode(&frame);
    }
    let mut u = Unstructured::new(data);
    if let Ok(m) = Msg::arbitrary(&mut u) {
        let msg = build(m);
        let bytes = msg.encode();
        assert_eq!(bytes.len(), msg.encoded_len());
        assert_eq!(M::decode(bytes.clone()).as_ref(), Ok(&msg));
        check_decode(&bytes);
    }
    if let Ok(text) = <&str>::arbitrary(&mut u) {
        check_lossy(text);
    }
});
