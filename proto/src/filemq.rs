//! The FILEMQ protocol (signature `AA A3`), v2-newest wire, declared once:
//! see `docs/protocol/FILEMQ.md`. Every message is one ZeroMQ frame.

use crate::codec::{Ceiling, Chunk, Field, Hash, LongStr, Reader, ShortStr};

/// The well-known local endpoint of FILEMQ on the broker called `broker`.
pub fn local_endpoint(broker: &str) -> String {
    format!("ipc://@/filemq/{broker}")
}

/// Option keys and header names of our wire extensions, and their values.
/// A server offers them only to a client that asked with [`ext::ZBROKER`];
/// the original client never sees one.
pub mod ext {
    /// ICANHAZ option: the client understands the extensions (value `1`).
    pub const ZBROKER: &str = "X-ZBROKER";
    /// ICANHAZ option: partial files held, lines `SHA1 OFFSET`.
    pub const RESUME: &str = "X-RESUME";
    /// ICANHAZ option of the original protocol: send what is published now.
    pub const RESYNC: &str = "RESYNC";
    /// CHEEZBURGER header: SHA-1 of the whole file (see `crate::digest`).
    pub const SHA1: &str = "X-SHA1";
    /// CHEEZBURGER header: size of the whole file, decimal.
    pub const SIZE: &str = "X-SIZE";
    /// CHEEZBURGER header of the in-sync marker: the subscription path.
    pub const SYNCED: &str = "X-SYNCED";
    /// CHEEZBURGER header of the in-sync marker: `1` if anything is
    /// published under the path (a mount at or below it, even empty, or a
    /// file under it), `0` if nothing is (a misspelled path).
    pub const PUBLISHED: &str = "X-PUBLISHED";
    /// Capability bits (the OHAI / OHAI-OK trailer), the options they
    /// allow and the headers of entries with attributes: see
    /// `crate::filemq_ext`.
    pub use crate::filemq_ext::{
        ALL, EXCLUDE, EXCLUDE_OPTION, LIST, LIST_OPTION, META, MODE, MTIME, TARGET, TYPE, TYPE_ATTRS,
        TYPE_DIR, TYPE_LINK,
    };

    /// An `X-RESUME` line: a partial file's digest and how many bytes of
    /// it are held.
    pub fn resume_line(digest: &str, offset: u64) -> String {
        format!("{digest} {offset}")
    }

    /// The lines of an `X-RESUME` value that are well formed; the others
    /// are skipped.
    pub fn parse_resume(value: &[u8]) -> Vec<(String, u64)> {
        String::from_utf8_lossy(value)
            .lines()
            .filter_map(|line| {
                let (digest, offset) = line.trim().split_once(' ')?;
                Some((crate::digest::Digest::normalise(digest)?, offset.trim().parse().ok()?))
            })
            .collect()
    }
}

/// Ceilings of the `hash` fields, declared with the protocol below and
/// enforced by the decoder on both sides: a frame over one is malformed.
/// They leave room for every legitimate use (a few options, a few headers,
/// the digests of a million held files) and nothing like the millions of
/// empty entries a 60 MB frame can hold.
pub mod ceiling {
    /// ICANHAZ options: RESYNC, our X-* keys, an X-RESUME list of up to
    /// 10,000 partial files (60 bytes a line).
    pub const OPTIONS_ENTRIES: usize = 64;
    pub const OPTIONS_BYTES: usize = 1 << 20;
    /// ICANHAZ cache: one entry per file the client holds, a million
    /// files with names of 80 bytes on average (an entry is 45 bytes plus
    /// its name). A client holding more reports what fits (the rest is
    /// simply sent again).
    pub const CACHE_ENTRIES: usize = 1 << 20;
    pub const CACHE_BYTES: usize = 128 << 20;
    /// ICANHAZ path: a virtual path (`crate::vpath::MAX_PATH`).
    pub const PATH_BYTES: usize = 4 + crate::vpath::MAX_PATH;
    /// CHEEZBURGER headers: X-SHA1, X-SIZE, X-SYNCED and what may follow.
    pub const HEADERS_ENTRIES: usize = 64;
    pub const HEADERS_BYTES: usize = 64 << 10;
}

/// The largest legitimate frame a client sends: an ICANHAZ at every
/// ceiling. Every other client message is bounded by its declared fields
/// (`FilemqMsg::max_len`).
pub const MAX_CLIENT_MESSAGE: usize = 3 + ceiling::PATH_BYTES + ceiling::OPTIONS_BYTES + ceiling::CACHE_BYTES;

/// The most bytes a frame from a client with message id `id` may
/// legitimately take: a server drops a larger one unread.
pub fn max_client_len(id: u8) -> usize {
    let declared = FilemqMsg::max_len(id).map(|n| n + crate::codec::TRAILING_SLACK);
    declared.unwrap_or(MAX_CLIENT_MESSAGE).min(MAX_CLIENT_MESSAGE)
}

crate::protocol! {
    /// One FILEMQ message (the wire of `zeromq/filemq` since Dec 2014).
    pub enum FilemqMsg, signature 0xAAA3 {
        /// Client hello: `protocol` must be "FILEMQ", `version` 2.
        Ohai = 1 from client { protocol: ShortStr, version: u16 },
        OhaiOk = 4 from server {},
        /// Subscribe to a virtual path; `cache` maps files the client holds
        /// to their SHA-1 digests.
        Icanhaz = 5 from client {
            path: LongStr,
            options: Hash [max ceiling::OPTIONS_ENTRIES, ceiling::OPTIONS_BYTES],
            cache: Hash [max ceiling::CACHE_ENTRIES, ceiling::CACHE_BYTES],
        },
        IcanhazOk = 6 from server {},
        /// Grants `credit` more bytes; `sequence` is ignored by servers.
        Nom = 7 from client { credit: u64, sequence: u64 },
        /// One chunk of a file (operation 1) or a delete (operation 2).
        /// `sequence` counts CHEEZBURGERs per connection; `eof` is 1 on the
        /// final, empty chunk.
        Cheezburger = 8 from server {
            sequence: u64,
            operation: Operation,
            filename: LongStr,
            offset: u64,
            eof: u8,
            headers: Hash [max ceiling::HEADERS_ENTRIES, ceiling::HEADERS_BYTES],
            chunk: Chunk,
        },
        Hugz = 9 from either {},
        HugzOk = 10 from either {},
        Kthxbai = 11 from client {},
        /// Refused (for example, access denied).
        Srsly = 128 from server { reason: ShortStr },
        /// Not understood (for example, an unsupported version).
        Rtfm = 129 from server { reason: ShortStr },
    }
}

/// What a CHEEZBURGER does (`number-1` on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// A chunk of a file (1).
    Create,
    /// Delete the file (2).
    Delete,
    /// Any other value: decoded, so that a receiver can refuse it.
    Other(u8),
}

impl Operation {
    fn code(self) -> u8 {
        match self {
            Operation::Create => 1,
            Operation::Delete => 2,
            Operation::Other(code) => code,
        }
    }
}

impl Field for Operation {
    fn wire_len(&self) -> usize {
        1
    }
    fn put(&self, out: &mut Vec<u8>) {
        out.push(self.code());
    }
    fn get(r: &mut Reader) -> Option<Self> {
        Some(match u8::get(r)? {
            1 => Operation::Create,
            2 => Operation::Delete,
            code => Operation::Other(code),
        })
    }
    fn max_wire(_: Ceiling) -> Option<usize> {
        Some(1)
    }
}

#[cfg(any(test, feature = "testing"))]
impl crate::codec::strategy::ArbitraryField for Operation {
    fn strategy() -> proptest::strategy::BoxedStrategy<Self> {
        use proptest::prelude::*;
        any::<u8>()
            .prop_map(|code| Operation::get(&mut Reader::new(vec![code].into())).expect("one byte"))
            .boxed()
    }
}

/// The FILEMQ wire generations, told apart by the OHAI frame (docs/protocol/FILEMQ.md "Generations").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Generation {
    /// 2012–2013: one-byte version 1, SASL in the protocol.
    V1,
    /// 2013–2014: two-byte version 1, `string` paths.
    V2Interim,
    /// Since Dec 2014: two-byte version 2, `longstr` paths. What we speak.
    V2,
}

/// How each generation's OHAI continues after signature, id and the
/// `FILEMQ` protocol name: its version field, and whether more may follow
/// (v1 ended there; v2's OHAI may carry trailing bytes).
const GENERATIONS: [(Generation, &[u8], bool); 3] =
    [(Generation::V1, &[1], false), (Generation::V2Interim, &[0, 1], true), (Generation::V2, &[0, 2], true)];

impl Generation {
    /// Which generation an OHAI frame comes from; `None` if it is not an
    /// OHAI of any of them.
    pub fn of_ohai(frame: &[u8]) -> Option<Generation> {
        const HELLO: &[u8] = b"\xAA\xA3\x01\x06FILEMQ";
        let version = frame.strip_prefix(HELLO)?;
        GENERATIONS.iter().find_map(|&(generation, field, more)| {
            let rest = version.strip_prefix(field)?;
            (more || rest.is_empty()).then_some(generation)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    use crate::codec::testing::{hex, short};

    fn hash(entries: &[(&str, &str)]) -> Hash {
        let mut h = Hash::default();
        for (k, v) in entries {
            h.insert(k, Bytes::copy_from_slice(v.as_bytes())).unwrap();
        }
        h
    }

    fn burger(sequence: u64, operation: Operation, offset: u64, eof: u8, chunk: &str) -> FilemqMsg {
        FilemqMsg::Cheezburger {
            sequence,
            operation,
            filename: "/hello.txt".into(),
            offset,
            eof,
            headers: Hash::default(),
            chunk: Chunk(Bytes::copy_from_slice(chunk.as_bytes())),
        }
    }

    /// docs/protocol/FILEMQ.md "Test vectors", row 3 (84 bytes).
    const ICANHAZ_PHOTOS: &str = "AA A3 05 00 00 00 07 2F 70 68 6F 74 6F 73 00 00 00 01 06 52 45 53 59 4E 43 00 00 00 01 \
        31 00 00 00 01 05 61 2E 74 78 74 00 00 00 28 41 39 39 39 33 45 33 36 34 37 30 36 38 31 36 41 42 41 33 45 32 35 \
        37 31 37 38 35 30 43 32 36 43 39 43 44 30 44 38 39 44";

    /// docs/protocol/FILEMQ.md "Test vectors", rows 1–7, byte for byte both ways.
    #[test]
    fn spec_vectors_round_trip_byte_for_byte() {
        let cases = [
            (FilemqMsg::Ohai { protocol: short("FILEMQ"), version: 2 }, "AA A3 01 06 46 49 4C 45 4D 51 00 02"),
            (
                FilemqMsg::Icanhaz { path: "/".into(), options: Hash::default(), cache: Hash::default() },
                "AA A3 05 00 00 00 01 2F 00 00 00 00 00 00 00 00",
            ),
            (
                FilemqMsg::Icanhaz {
                    path: "/photos".into(),
                    options: hash(&[("RESYNC", "1")]),
                    cache: hash(&[("a.txt", "A9993E364706816ABA3E25717850C26C9CD0D89D")]),
                },
                ICANHAZ_PHOTOS,
            ),
            (FilemqMsg::Nom { credit: 5_000_000, sequence: 0 }, "AA A3 07 00 00 00 00 00 4C 4B 40 00 00 00 00 00 00 00 00"),
            (
                burger(0, Operation::Create, 0, 0, "Hello"),
                "AA A3 08 00 00 00 00 00 00 00 00 01 00 00 00 0A 2F 68 65 6C 6C 6F 2E 74 78 74 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 05 48 65 6C 6C 6F",
            ),
            (
                burger(1, Operation::Create, 5, 1, ""),
                "AA A3 08 00 00 00 00 00 00 00 01 01 00 00 00 0A 2F 68 65 6C 6C 6F 2E 74 78 74 00 00 00 00 00 00 00 \
                 05 01 00 00 00 00 00 00 00 00",
            ),
            (
                burger(2, Operation::Delete, 0, 0, ""),
                "AA A3 08 00 00 00 00 00 00 00 02 02 00 00 00 0A 2F 68 65 6C 6C 6F 2E 74 78 74 00 00 00 00 00 00 00 \
                 00 00 00 00 00 00 00 00 00 00",
            ),
        ];
        for (msg, bytes) in cases {
            assert_eq!(msg.encode(), hex(bytes), "encoding {msg:?}");
            assert_eq!(FilemqMsg::decode(hex(bytes)).unwrap(), msg);
        }
        assert_eq!(hex(ICANHAZ_PHOTOS).len(), 84, "as the spec counts it");
    }

    /// docs/protocol/FILEMQ.md "Test vectors", row 8.
    #[test]
    fn spec_vectors_short_messages() {
        let cases = [
            (FilemqMsg::OhaiOk {}, "AA A3 04"),
            (FilemqMsg::IcanhazOk {}, "AA A3 06"),
            (FilemqMsg::Hugz {}, "AA A3 09"),
            (FilemqMsg::HugzOk {}, "AA A3 0A"),
            (FilemqMsg::Kthxbai {}, "AA A3 0B"),
            (FilemqMsg::Rtfm { reason: ShortStr::default() }, "AA A3 81 00"),
            (FilemqMsg::Srsly { reason: short("denied") }, "AA A3 80 06 64 65 6E 69 65 64"),
        ];
        for (msg, bytes) in cases {
            assert_eq!(msg.encode(), hex(bytes));
            assert_eq!(FilemqMsg::decode(hex(bytes)).unwrap(), msg);
        }
    }

    #[test]
    fn older_generations_are_recognised_not_decoded() {
        let v1 = hex("AA A3 01 06 46 49 4C 45 4D 51 01");
        assert_eq!(Generation::of_ohai(&v1), Some(Generation::V1));
        assert!(FilemqMsg::decode(v1).is_err(), "a v1 OHAI is too short for v2");
        assert_eq!(
            Generation::of_ohai(&hex("AA A3 01 06 46 49 4C 45 4D 51 00 01")),
            Some(Generation::V2Interim)
        );
        assert_eq!(Generation::of_ohai(&hex("AA A3 01 06 46 49 4C 45 4D 51 00 02")), Some(Generation::V2));
        assert_eq!(Generation::of_ohai(&hex("AA A3 01 06 46 49 4C 45 4D 52 00 02")), None);
        assert_eq!(Generation::of_ohai(&hex("AA A3 05 00")), None);
        // A v1 ICANHAZ (string path) does not decode as v2.
        assert!(FilemqMsg::decode(hex("AA A3 05 07 2F 70 68 6F 74 6F 73 01 08 52 45 53 59 4E 43 3D 31 00"))
            .is_err());
    }

    #[test]
    fn multi_entry_hashes_decode_in_any_order_first_key_wins() {
        // count 3: "a"="1", "b"="2", "a"="3"
        let frame = hex(
            "AA A3 05 00 00 00 00 00 00 00 03 01 61 00 00 00 01 31 01 62 00 00 00 01 32 01 61 00 00 00 01 33 \
             00 00 00 00",
        );
        let FilemqMsg::Icanhaz { options, .. } = FilemqMsg::decode(frame).unwrap() else { panic!() };
        assert_eq!(options.len(), 3);
        assert_eq!(options.get("a").unwrap().as_bytes(), b"1");
        assert_eq!(options.get("b").unwrap().as_bytes(), b"2");
        assert!(options.get("c").is_none());
    }

    #[test]
    fn a_lying_hash_count_is_truncation_not_a_huge_allocation() {
        let frame = hex("AA A3 05 00 00 00 00 FF FF FF FF 01 61");
        assert!(FilemqMsg::decode(frame).is_err());
    }

    fn burger_with_headers(headers: Hash) -> Vec<u8> {
        let mut msg = burger(0, Operation::Create, 0, 0, "x");
        if let FilemqMsg::Cheezburger { headers: h, .. } = &mut msg {
            *h = headers;
        }
        msg.encode()
    }

    #[test]
    fn hashes_over_their_declared_ceiling_are_refused_before_they_are_built() {
        use crate::codec::DecodeError;
        let mut full = Hash::default();
        for i in 0..ceiling::HEADERS_ENTRIES {
            full.insert(&format!("k{i}"), "v").unwrap();
        }
        assert!(FilemqMsg::decode(burger_with_headers(full.clone())).is_ok(), "at the ceiling");
        full.insert("one-more", "v").unwrap();
        let over = FilemqMsg::decode(burger_with_headers(full));
        assert_eq!(over, Err(DecodeError::OverCeiling { message: "Cheezburger", field: "headers" }));

        let mut fat = Hash::default();
        fat.insert("X-BIG", vec![b'x'; ceiling::HEADERS_BYTES]).unwrap();
        assert!(matches!(
            FilemqMsg::decode(burger_with_headers(fat)),
            Err(DecodeError::OverCeiling { field: "headers", .. })
        ));

        // The attack of a 60 MB frame of 12,000,000 empty entries: the count
        // alone refuses it, in no time and no memory.
        let mut frame = burger_with_headers(Hash::default());
        let at = frame.len() - 4 - 1 - 4; // headers count, then the chunk
        frame[at..at + 4].copy_from_slice(&12_000_000u32.to_be_bytes());
        frame.extend(std::iter::repeat_n(0u8, 1 << 20));
        let started = std::time::Instant::now();
        assert!(matches!(FilemqMsg::decode(frame), Err(DecodeError::OverCeiling { .. })));
        assert!(started.elapsed() < std::time::Duration::from_millis(50));
    }

    #[test]
    fn a_cache_of_a_million_files_fits_its_ceiling() {
        let mut cache = Hash::default();
        let digest = "A9993E364706816ABA3E25717850C26C9CD0D89D";
        for i in 0..ceiling::CACHE_ENTRIES {
            cache.insert(&format!("d{}/{i}", i % 100), digest).unwrap();
        }
        let msg = FilemqMsg::Icanhaz { path: "/".into(), options: Hash::default(), cache };
        assert_eq!(FilemqMsg::decode(msg.encode()).unwrap(), msg);
    }

    #[test]
    fn size_limits_follow_the_declared_fields() {
        assert_eq!(FilemqMsg::max_len(1), Some(3 + 256 + 2), "OHAI");
        assert_eq!(FilemqMsg::max_len(7), Some(3 + 8 + 8), "NOM");
        assert_eq!(FilemqMsg::max_len(9), Some(3), "HUGZ");
        assert_eq!(FilemqMsg::max_len(5), None, "ICANHAZ: its path is a longstr");
        assert_eq!(FilemqMsg::max_len(200), None, "unknown");
        assert_eq!(max_client_len(7), 19 + crate::codec::TRAILING_SLACK);
        assert_eq!(max_client_len(5), MAX_CLIENT_MESSAGE);
        const { assert!(MAX_CLIENT_MESSAGE < 130 << 20) };
    }

    proptest::proptest! {
        #[test]
        fn no_message_exceeds_its_max_len(msg in FilemqMsg::arbitrary()) {
            if let Some(max) = FilemqMsg::max_len(msg.id()) {
                proptest::prop_assert!(msg.encoded_len() <= max);
            }
        }

        #[test]
        fn decode_inverts_encode(msg in FilemqMsg::arbitrary()) {
            let bytes = msg.encode();
            proptest::prop_assert_eq!(bytes.len(), msg.encoded_len());
            proptest::prop_assert_eq!(FilemqMsg::decode(bytes).unwrap(), msg);
        }

        #[test]
        fn decode_never_panics(id in proptest::prelude::any::<u8>(),
                               body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..96)) {
            let mut frame = vec![0xAA, 0xA3, id];
            frame.extend(body);
            let _ = FilemqMsg::decode(frame);
        }
    }
}
