//! The ZPIPES protocol (signature `AA A0`), declared once: see
//! `docs/protocol/ZPIPES.md`. Every message is one ZeroMQ frame.

use crate::codec::{Chunk, DecodeError, ShortStr};
use bytes::Bytes;

crate::protocol! {
    /// One ZPIPES message. Client→server requests and server→client replies
    /// share one id space, as in the original `zpipes_msg.xml`.
    pub enum ZpipesMsg, signature 0xAAA0 {
        /// Open a pipe for reading.
        Input = 1 from client { pipename: ShortStr },
        InputOk = 2 from server {},
        /// The pipe already has a reader.
        InputFailed = 3 from server { reason: ShortStr },
        /// Open a pipe for writing.
        Output = 4 from client { pipename: ShortStr },
        OutputOk = 5 from server {},
        /// The pipe already has a writer.
        OutputFailed = 6 from server { reason: ShortStr },
        /// Read exactly `size` bytes (fewer only once the writer has gone);
        /// `timeout` in ms, 0 = no limit.
        Read = 7 from client { size: u32, timeout: u32 },
        ReadOk = 8 from server { chunk: Chunk },
        /// The writer has gone and nothing is left, or `size` was 0.
        ReadEnd = 9 from server {},
        ReadTimeout = 10 from server {},
        ReadFailed = 11 from server { reason: ShortStr },
        /// Write a chunk; `timeout` in ms, 0 = no limit. The chunk comes
        /// before the timeout on the wire.
        Write = 12 from client { chunk: Chunk, timeout: u32 },
        WriteOk = 13 from server {},
        WriteTimeout = 14 from server {},
        WriteFailed = 15 from server { reason: ShortStr },
        Close = 16 from client {},
        CloseOk = 17 from server {},
        CloseFailed = 18 from server { reason: ShortStr },
        Ping = 19 from client {},
        PingOk = 20 from server {},
        /// The request is not valid in the connection's state.
        Invalid = 21 from server {},
    }
}

/// The well-known local endpoint of ZPIPES on the broker called `broker`.
pub fn local_endpoint(broker: &str) -> String {
    format!("ipc://@/zpipes/{broker}")
}

/// Our extension of the wire (ARCHITECTURE.md, "ZPIPES: how we extend the
/// wire"): a trailer after a message's declared fields, which every
/// decoder (the original's and ours) ignores. A trailer is [`EXT_MAGIC`]
/// then one byte of bits; anything else after the fields means nothing.
///
/// - PING + trailer: the client offers these capabilities; PING_OK +
///   trailer: the broker grants those it has (a broker that answers a
///   plain PING_OK has none).
/// - READ + trailer [`PARTIAL_READ`], once granted on the connection:
///   answer with what is queued, up to `size`, as soon as there is at
///   least one byte (READ_TIMEOUT / READ_END as for any READ).
pub const EXT_MAGIC: [u8; 2] = *b"ZB";
/// "What is there, up to n": the capability and the READ flag.
pub const PARTIAL_READ: u8 = 0x01;

impl ZpipesMsg {
    /// Decodes a frame and its extension bits (0 without a trailer).
    pub fn decode_ext(frame: Bytes) -> Result<(Self, u8), DecodeError> {
        let all = frame.clone();
        let msg = Self::decode(frame)?;
        let tail = all.get(msg.encoded_len()..).unwrap_or_default();
        let bits = match tail {
            [m0, m1, bits, ..] if [*m0, *m1] == EXT_MAGIC => *bits,
            _ => 0,
        };
        Ok((msg, bits))
    }

    /// Encodes the message with an extension trailer carrying `bits`
    /// (none when `bits` is 0: the original wire).
    pub fn encode_ext(&self, bits: u8) -> Vec<u8> {
        let mut frame = self.encode();
        if bits != 0 {
            frame.extend_from_slice(&EXT_MAGIC);
            frame.push(bits);
        }
        frame
    }
}

/// A WRITE frame built in place: a writer gathers its data straight into
/// the frame's buffer and hands the finished frame to libzmq, so each byte
/// is copied once on its way out instead of into a gathering buffer, then
/// a frame, then a ZeroMQ message. The bytes are exactly those of
/// `ZpipesMsg::Write { chunk, timeout }.encode()`.
#[derive(Debug)]
pub struct WriteFrame {
    frame: Vec<u8>,
    /// Most chunk bytes the frame takes (at most `u32::MAX`, the wire's).
    max: usize,
}

/// Bytes of a WRITE before its chunk: signature, id and the chunk's length.
const WRITE_HEAD: usize = 7;
/// Bytes of a WRITE after its chunk: the timeout.
const WRITE_TAIL: usize = 4;

impl WriteFrame {
    /// An empty frame with room for `max` chunk bytes (allocated now).
    pub fn with_capacity(max: usize) -> WriteFrame {
        let max = max.min(u32::MAX as usize);
        let mut frame = Vec::with_capacity(WRITE_HEAD + max + WRITE_TAIL);
        ZpipesMsg::Write { chunk: Chunk(Bytes::new()), timeout: 0 }.encode_into(&mut frame);
        frame.truncate(WRITE_HEAD);
        WriteFrame { frame, max }
    }

    /// Chunk bytes gathered so far.
    pub fn len(&self) -> usize {
        self.frame.len() - WRITE_HEAD
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// True once the frame holds `max` chunk bytes.
    pub fn is_full(&self) -> bool {
        self.len() >= self.max
    }

    /// Appends as much of `data` as there is room for; returns how much.
    pub fn push(&mut self, data: &[u8]) -> usize {
        let n = data.len().min(self.max - self.len());
        self.frame.extend_from_slice(&data[..n]);
        n
    }

    /// The finished frame, ready to send.
    pub fn finish(mut self, timeout: u32) -> Vec<u8> {
        // `push` kept the chunk within `max`, hence within a u32.
        let len = self.len() as u32;
        self.frame[WRITE_HEAD - 4..WRITE_HEAD].copy_from_slice(&len.to_be_bytes());
        self.frame.extend_from_slice(&timeout.to_be_bytes());
        self.frame
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::DecodeError;
    use bytes::Bytes;

    use crate::codec::testing::{hex, short as pipe};

    fn chunk(s: &str) -> Chunk {
        Chunk(Bytes::copy_from_slice(s.as_bytes()))
    }

    /// docs/protocol/ZPIPES.md "Test vectors", rows 1–7: byte for byte, both directions.
    #[test]
    fn spec_vectors_round_trip_byte_for_byte() {
        let cases = [
            (ZpipesMsg::Input { pipename: pipe("test pipe") }, "AA A0 01 09 74 65 73 74 20 70 69 70 65"),
            (ZpipesMsg::Output { pipename: pipe("test pipe") }, "AA A0 04 09 74 65 73 74 20 70 69 70 65"),
            (ZpipesMsg::Read { size: 12, timeout: 100 }, "AA A0 07 00 00 00 0C 00 00 00 64"),
            (ZpipesMsg::Read { size: 0, timeout: 0 }, "AA A0 07 00 00 00 00 00 00 00 00"),
            (
                ZpipesMsg::Write { chunk: chunk("Hello, World"), timeout: 100 },
                "AA A0 0C 00 00 00 0C 48 65 6C 6C 6F 2C 20 57 6F 72 6C 64 00 00 00 64",
            ),
            (
                ZpipesMsg::ReadOk { chunk: chunk("Hello, World") },
                "AA A0 08 00 00 00 0C 48 65 6C 6C 6F 2C 20 57 6F 72 6C 64",
            ),
            (ZpipesMsg::WriteFailed { reason: ShortStr::default() }, "AA A0 0F 00"),
        ];
        for (msg, bytes) in cases {
            assert_eq!(msg.encode(), hex(bytes), "encoding {msg:?}");
            assert_eq!(ZpipesMsg::decode(hex(bytes)).unwrap(), msg);
            assert_eq!(msg.encoded_len(), hex(bytes).len());
        }
    }

    /// docs/protocol/ZPIPES.md "Test vectors", row 8: the one-byte-body messages.
    #[test]
    fn spec_vectors_header_only_messages() {
        let cases = [
            (ZpipesMsg::InputOk {}, 0x02),
            (ZpipesMsg::OutputOk {}, 0x05),
            (ZpipesMsg::ReadEnd {}, 0x09),
            (ZpipesMsg::ReadTimeout {}, 0x0A),
            (ZpipesMsg::WriteOk {}, 0x0D),
            (ZpipesMsg::WriteTimeout {}, 0x0E),
            (ZpipesMsg::Close {}, 0x10),
            (ZpipesMsg::CloseOk {}, 0x11),
            (ZpipesMsg::Ping {}, 0x13),
            (ZpipesMsg::PingOk {}, 0x14),
            (ZpipesMsg::Invalid {}, 0x15),
        ];
        for (msg, id) in cases {
            assert_eq!(msg.encode(), vec![0xAA, 0xA0, id]);
            assert_eq!(ZpipesMsg::decode(vec![0xAA, 0xA0, id]).unwrap(), msg);
        }
    }

    /// docs/protocol/ZPIPES.md "Test vectors", decoder edge cases.
    #[test]
    fn spec_decoder_edge_cases() {
        assert_eq!(
            ZpipesMsg::decode(hex("AA A0 07 00 00 00")),
            Err(DecodeError::Truncated { message: "Read", field: "size" })
        );
        assert_eq!(
            ZpipesMsg::decode(hex("AA A1 13")),
            Err(DecodeError::BadSignature { found: 0xAAA1, expected: 0xAAA0 })
        );
        assert_eq!(ZpipesMsg::decode(hex("AA A0 63")), Err(DecodeError::UnknownId(99)));
        assert_eq!(ZpipesMsg::decode(hex("AA A0 13 FF")), Ok(ZpipesMsg::Ping {}));
        assert_eq!(
            ZpipesMsg::decode(b"garbage".to_vec()),
            Err(DecodeError::BadSignature { found: 0x6761, expected: 0xAAA0 })
        );
        assert_eq!(ZpipesMsg::decode(Vec::new()), Err(DecodeError::NoHeader(0)));
        // A chunk whose length runs past the frame.
        assert!(matches!(
            ZpipesMsg::decode(hex("AA A0 0C 00 00 00 0C 48")),
            Err(DecodeError::Truncated { message: "Write", field: "chunk" })
        ));
    }

    #[test]
    fn over_long_strings_are_refused_not_wrapped() {
        assert!(ShortStr::new(vec![b'x'; 255]).is_ok());
        assert_eq!(ShortStr::new(vec![b'x'; 256]), Err(crate::codec::EncodeError::StringTooLong(256)));
        assert_eq!(ShortStr::lossy(&"é".repeat(200)).as_bytes().len(), 254);
    }

    #[test]
    fn decoded_chunks_share_the_frame() {
        let frame = Bytes::from(hex("AA A0 08 00 00 00 02 41 42"));
        let ZpipesMsg::ReadOk { chunk } = ZpipesMsg::decode(frame.clone()).unwrap() else { panic!() };
        assert_eq!(chunk.0.as_ptr(), frame[7..].as_ptr());
    }

    proptest::proptest! {
        #[test]
        fn decode_inverts_encode(msg in ZpipesMsg::arbitrary()) {
            let bytes = msg.encode();
            proptest::prop_assert_eq!(bytes.len(), msg.encoded_len());
            proptest::prop_assert_eq!(ZpipesMsg::decode(bytes).unwrap(), msg);
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)) {
            let _ = ZpipesMsg::decode(bytes);
        }

        #[test]
        fn decode_never_panics_on_valid_headers(id in 0u8..=25, body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..32)) {
            let mut frame = vec![0xAA, 0xA0, id];
            frame.extend(body);
            let _ = ZpipesMsg::decode(frame);
        }
    }

    proptest::proptest! {
        /// However the data is pushed, the frame is the codec's WRITE.
        #[test]
        fn a_write_frame_is_the_codecs_write(
            pieces in proptest::collection::vec(proptest::collection::vec(proptest::prelude::any::<u8>(), 0..40), 0..8),
            max in 0usize..200,
            timeout in proptest::prelude::any::<u32>(),
        ) {
            let mut frame = WriteFrame::with_capacity(max);
            let mut taken = Vec::new();
            for piece in &pieces {
                let n = frame.push(piece);
                proptest::prop_assert_eq!(n, piece.len().min(max - taken.len()));
                taken.extend_from_slice(&piece[..n]);
            }
            proptest::prop_assert_eq!(frame.len(), taken.len());
            proptest::prop_assert_eq!(frame.is_full(), taken.len() == max);
            let expected = ZpipesMsg::Write { chunk: Chunk(taken.into()), timeout }.encode();
            proptest::prop_assert_eq!(frame.finish(timeout), expected);
        }
    }

    #[test]
    fn a_write_frame_matches_the_spec_vector() {
        let mut frame = WriteFrame::with_capacity(1 << 20);
        assert_eq!(frame.push(b"Hello, "), 7);
        assert_eq!(frame.push(b"World"), 5);
        assert_eq!(
            frame.finish(100),
            hex("AA A0 0C 00 00 00 0C 48 65 6C 6C 6F 2C 20 57 6F 72 6C 64 00 00 00 64")
        );
    }

    /// The extension trailer: absent, it is the original wire; present, the
    /// original decoder still reads the message (trailing bytes ignored).
    #[test]
    fn extension_trailer() {
        let ping = ZpipesMsg::Ping {}.encode_ext(PARTIAL_READ);
        assert_eq!(ping, hex("AA A0 13 5A 42 01"));
        assert_eq!(ZpipesMsg::decode(ping.clone()).unwrap(), ZpipesMsg::Ping {});
        assert_eq!(ZpipesMsg::decode_ext(ping.into()).unwrap(), (ZpipesMsg::Ping {}, PARTIAL_READ));
        let read = ZpipesMsg::Read { size: 12, timeout: 100 };
        assert_eq!(read.encode_ext(0), read.encode());
        let bytes = read.encode_ext(PARTIAL_READ);
        assert_eq!(bytes, hex("AA A0 07 00 00 00 0C 00 00 00 64 5A 42 01"));
        assert_eq!(ZpipesMsg::decode_ext(bytes.into()).unwrap(), (read, PARTIAL_READ));
        // The spec's own trailing byte (a PING with FF after it) is no trailer.
        assert_eq!(ZpipesMsg::decode_ext(hex("AA A0 13 FF").into()).unwrap(), (ZpipesMsg::Ping {}, 0));
        assert_eq!(ZpipesMsg::decode_ext(hex("AA A0 13 5A 42").into()).unwrap(), (ZpipesMsg::Ping {}, 0));
    }
}
