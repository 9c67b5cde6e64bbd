//! The zproto wire conventions, and the `protocol!` macro that turns one
//! declaration of a protocol into its message type, encoder, decoder and
//! proptest strategies.
//!
//! A frame is `signature (2 bytes, big-endian) | id (1 byte) | fields...`.
//! Every field type implements [`Field`]; a protocol is nothing but a list of
//! messages, each a list of typed fields. The codec knows nothing of sockets,
//! mio or the filesystem: it maps bytes to values and back.

use bytes::{Buf, Bytes};
use std::fmt;

/// Why a frame could not be decoded. Decoding never panics.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("frame of {0} bytes is too short for a header")]
    NoHeader(usize),
    #[error("bad signature {found:#06x}, expected {expected:#06x}")]
    BadSignature { found: u16, expected: u16 },
    #[error("unknown message id {0}")]
    UnknownId(u8),
    #[error("field `{field}` of {message} runs past the end of the frame")]
    Truncated { message: &'static str, field: &'static str },
    /// A field holds more than the protocol declares it may (see
    /// [`Ceiling`]): refused before its entries cost memory.
    #[error("field `{field}` of {message} exceeds its declared ceiling")]
    OverCeiling { message: &'static str, field: &'static str },
}

/// Bytes after a message's last field that a receiver still accepts (the
/// original codec ignores them); a frame longer than its message's
/// `max_len` plus these is dropped unread.
pub const TRAILING_SLACK: usize = 256;

/// How large a variable-sized field may be, declared with the protocol
/// (`field: Hash [max ENTRIES, BYTES]`) and enforced while decoding, so that
/// a frame from an untrusted peer cannot make us build millions of entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ceiling {
    /// Most entries (of a `hash`).
    pub entries: usize,
    /// Most bytes the field takes on the wire.
    pub bytes: usize,
}

impl Ceiling {
    /// No ceiling beyond the frame's own size.
    pub const NONE: Ceiling = Ceiling { entries: usize::MAX, bytes: usize::MAX };

    /// A ceiling of `entries` entries and `bytes` wire bytes.
    pub const fn with(self, entries: usize, bytes: usize) -> Ceiling {
        Ceiling { entries, bytes }
    }
}

/// Which end of a connection may send a message, as its declaration says
/// (`Input = 1 from client { … }`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sender {
    Client,
    Server,
    /// Either end (heartbeats).
    Either,
}

impl Sender {
    /// True if a client may send it (what a server accepts).
    pub fn client_may_send(self) -> bool {
        self != Sender::Server
    }
}

/// Why one field could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldError {
    /// The frame ends too early.
    Truncated,
    /// The field is larger than its [`Ceiling`].
    OverCeiling,
}

/// Why a value cannot be put on the wire.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("a `string` field holds at most 255 bytes, got {0}")]
    StringTooLong(usize),
}

/// The read side of a frame: a cursor over shared bytes, so that `chunk`
/// fields are slices of the received frame, not copies.
pub struct Reader {
    buf: Bytes,
}

impl Reader {
    pub fn new(buf: Bytes) -> Self {
        Reader { buf }
    }
    fn take(&mut self, n: usize) -> Option<Bytes> {
        (self.buf.remaining() >= n).then(|| self.buf.split_to(n))
    }
}

/// One wire type of the zproto conventions.
pub trait Field: Sized {
    /// Bytes this value takes on the wire.
    fn wire_len(&self) -> usize;
    /// Appends the value; `out` has room for `wire_len` more bytes.
    fn put(&self, out: &mut Vec<u8>);
    /// Reads one value; `None` when the frame ends too early.
    fn get(r: &mut Reader) -> Option<Self>;
    /// Reads one value within `ceiling`. Fixed-size fields have no use for
    /// one; variable-sized ones check it before they allocate.
    fn get_within(r: &mut Reader, ceiling: Ceiling) -> Result<Self, FieldError> {
        let before = r.buf.remaining();
        let value = Self::get(r).ok_or(FieldError::Truncated)?;
        if before - r.buf.remaining() > ceiling.bytes {
            return Err(FieldError::OverCeiling);
        }
        Ok(value)
    }
    /// Most bytes any value may take on the wire within `ceiling`; `None`
    /// if only the frame's own size bounds it.
    fn max_wire(ceiling: Ceiling) -> Option<usize> {
        (ceiling.bytes != usize::MAX).then_some(ceiling.bytes)
    }
}

macro_rules! number_field {
    ($t:ty) => {
        impl Field for $t {
            fn wire_len(&self) -> usize {
                std::mem::size_of::<$t>()
            }
            fn put(&self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_be_bytes());
            }
            fn max_wire(_: Ceiling) -> Option<usize> {
                Some(std::mem::size_of::<$t>())
            }
            fn get(r: &mut Reader) -> Option<Self> {
                let b = r.take(std::mem::size_of::<$t>())?;
                Some(<$t>::from_be_bytes(b.as_ref().try_into().ok()?))
            }
        }
    };
}
number_field!(u8);
number_field!(u16);
number_field!(u32);
number_field!(u64);

/// zproto `string`: a 1-byte length, then at most 255 bytes (not
/// necessarily UTF-8). Construction checks the length, so an over-long
/// value can never reach the wire (the original wrote a wrapped length).
#[derive(Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ShortStr(Bytes);

impl ShortStr {
    pub const MAX: usize = 255;
    pub fn new(bytes: impl Into<Bytes>) -> Result<Self, EncodeError> {
        let bytes = bytes.into();
        if bytes.len() > Self::MAX {
            return Err(EncodeError::StringTooLong(bytes.len()));
        }
        Ok(ShortStr(bytes))
    }
    /// For text the caller knows is short (reasons, fixed names); longer
    /// text is cut at a character boundary rather than corrupting a frame.
    pub fn lossy(text: &str) -> Self {
        let mut end = text.len().min(Self::MAX);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        ShortStr(Bytes::copy_from_slice(&text.as_bytes()[..end]))
    }
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
    pub fn to_string_lossy(&self) -> String {
        String::from_utf8_lossy(&self.0).into_owned()
    }
}

impl fmt::Debug for ShortStr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", String::from_utf8_lossy(&self.0))
    }
}

impl Field for ShortStr {
    fn wire_len(&self) -> usize {
        1 + self.0.len()
    }
    fn max_wire(_: Ceiling) -> Option<usize> {
        Some(1 + Self::MAX)
    }
    fn put(&self, out: &mut Vec<u8>) {
        out.push(self.0.len() as u8); // < 256 by construction
        out.extend_from_slice(&self.0);
    }
    fn get(r: &mut Reader) -> Option<Self> {
        let len = r.take(1)?[0] as usize;
        Some(ShortStr(r.take(len)?))
    }
}

/// zproto `chunk`: a 4-byte length, then the bytes. Decoded chunks share the
/// received frame's memory.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Chunk(pub Bytes);

impl fmt::Debug for Chunk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.len() <= 32 {
            write!(f, "Chunk({:?})", self.0)
        } else {
            write!(f, "Chunk({} bytes)", self.0.len())
        }
    }
}

impl Field for Chunk {
    fn wire_len(&self) -> usize {
        4 + self.0.len()
    }
    fn put(&self, out: &mut Vec<u8>) {
        put_long_bytes(&self.0, out);
    }
    fn get(r: &mut Reader) -> Option<Self> {
        get_long_bytes(r).map(Chunk)
    }
}

/// zproto `longstr`: a 4-byte length, then the bytes (not necessarily
/// UTF-8).
#[derive(Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LongStr(pub Bytes);

impl LongStr {
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
    pub fn to_string_lossy(&self) -> String {
        String::from_utf8_lossy(&self.0).into_owned()
    }
}

impl From<&str> for LongStr {
    fn from(text: &str) -> Self {
        LongStr(Bytes::copy_from_slice(text.as_bytes()))
    }
}

impl fmt::Debug for LongStr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", String::from_utf8_lossy(&self.0))
    }
}

impl Field for LongStr {
    fn wire_len(&self) -> usize {
        4 + self.0.len()
    }
    fn put(&self, out: &mut Vec<u8>) {
        put_long_bytes(&self.0, out);
    }
    fn get(r: &mut Reader) -> Option<Self> {
        get_long_bytes(r).map(LongStr)
    }
}

/// `longstr` and `chunk` share a layout: a 4-byte length, then the bytes.
fn put_long_bytes(bytes: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    out.extend_from_slice(bytes);
}

fn get_long_bytes(r: &mut Reader) -> Option<Bytes> {
    let len = u32::get(r)? as usize;
    r.take(len)
}

/// zproto `hash` (a "dictionary"): a 4-byte entry count, then each entry as
/// a `string` key and a `longstr` value. Entries keep their wire order;
/// with a duplicate key the first entry counts, as in the C decoder.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Hash(pub Vec<(ShortStr, LongStr)>);

impl Hash {
    /// The value of the first entry with this key.
    pub fn get(&self, key: &str) -> Option<&LongStr> {
        self.0.iter().find(|(k, _)| k.as_bytes() == key.as_bytes()).map(|(_, v)| v)
    }
    /// Appends an entry; the key must be at most 255 bytes.
    pub fn insert(&mut self, key: &str, value: impl Into<Bytes>) -> Result<(), EncodeError> {
        self.0.push((ShortStr::new(Bytes::copy_from_slice(key.as_bytes()))?, LongStr(value.into())));
        Ok(())
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.0.iter().map(|(k, v)| (k, v))).finish()
    }
}

impl Field for Hash {
    fn wire_len(&self) -> usize {
        4 + self.0.iter().map(|(k, v)| k.wire_len() + v.wire_len()).sum::<usize>()
    }
    fn put(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&(self.0.len() as u32).to_be_bytes());
        for (k, v) in &self.0 {
            k.put(out);
            v.put(out);
        }
    }
    fn get(r: &mut Reader) -> Option<Self> {
        Self::get_within(r, Ceiling::NONE).ok()
    }
    fn get_within(r: &mut Reader, ceiling: Ceiling) -> Result<Self, FieldError> {
        let entries =
            Hash::visit_within(r, ceiling, Vec::with_capacity, |entries, k, v| entries.push((k, v)))?;
        Ok(Hash(entries))
    }
}

impl Hash {
    /// Reads a `hash` field within `ceiling` entry by entry, handing each
    /// to `entry` instead of building the hash (a receiver that keeps its
    /// own form of a million entries need not hold both). `start` makes
    /// the collection from the number of entries to expect (at most what
    /// the frame could hold).
    pub fn visit_within<T>(
        r: &mut Reader,
        ceiling: Ceiling,
        start: impl FnOnce(usize) -> T,
        mut entry: impl FnMut(&mut T, ShortStr, LongStr),
    ) -> Result<T, FieldError> {
        let before = r.buf.remaining();
        let entries = u32::get(r).ok_or(FieldError::Truncated)? as usize;
        if entries > ceiling.entries {
            return Err(FieldError::OverCeiling);
        }
        // Each entry takes at least 5 bytes: a lying count cannot make us
        // reserve more than the frame could hold.
        let mut collection = start(entries.min(r.buf.remaining() / 5));
        for _ in 0..entries {
            let key = ShortStr::get(r).ok_or(FieldError::Truncated)?;
            let value = LongStr::get(r).ok_or(FieldError::Truncated)?;
            if before - r.buf.remaining() > ceiling.bytes {
                return Err(FieldError::OverCeiling);
            }
            entry(&mut collection, key, value);
        }
        Ok(collection)
    }
}

/// Helpers for tests of every crate and the fuzz targets: the protocol
/// documents write vectors as hex, and FILEMQ names files by SHA-1.
#[cfg(any(test, feature = "testing"))]
pub mod testing {
    use super::ShortStr;

    /// "AA A0 01" → [0xAA, 0xA0, 0x01]
    pub fn hex(text: &str) -> Vec<u8> {
        text.split_whitespace().map(|b| u8::from_str_radix(b, 16).expect("hex byte")).collect()
    }

    /// A `string` field from text of at most 255 bytes.
    pub fn short(text: &str) -> ShortStr {
        ShortStr::new(text.as_bytes().to_vec()).expect("a short string")
    }

    /// The SHA-1 of `data` as the wire writes it.
    pub fn sha1_hex(data: &[u8]) -> String {
        crate::digest::Digest::of(data).to_string()
    }
}

/// Proptest strategies for each field type, used by the generated
/// `arbitrary()` of every protocol.
#[cfg(any(test, feature = "testing"))]
pub mod strategy {
    use super::*;
    use proptest::prelude::*;

    pub trait ArbitraryField: Sized {
        fn strategy() -> BoxedStrategy<Self>;
    }
    macro_rules! any_number {
        ($t:ty) => {
            impl ArbitraryField for $t {
                fn strategy() -> BoxedStrategy<Self> {
                    any::<$t>().boxed()
                }
            }
        };
    }
    any_number!(u8);
    any_number!(u16);
    any_number!(u32);
    any_number!(u64);
    impl ArbitraryField for ShortStr {
        fn strategy() -> BoxedStrategy<Self> {
            proptest::collection::vec(any::<u8>(), 0..=255).prop_map(|v| ShortStr(Bytes::from(v))).boxed()
        }
    }
    impl ArbitraryField for LongStr {
        fn strategy() -> BoxedStrategy<Self> {
            proptest::collection::vec(any::<u8>(), 0..300).prop_map(|v| LongStr(Bytes::from(v))).boxed()
        }
    }
    impl ArbitraryField for Hash {
        fn strategy() -> BoxedStrategy<Self> {
            proptest::collection::vec((ShortStr::strategy(), LongStr::strategy()), 0..4)
                .prop_map(Hash)
                .boxed()
        }
    }
    impl ArbitraryField for Chunk {
        fn strategy() -> BoxedStrategy<Self> {
            proptest::collection::vec(any::<u8>(), 0..512).prop_map(|v| Chunk(Bytes::from(v))).boxed()
        }
    }
}

/// Declares a protocol once; generates the message enum (one struct variant
/// per message), `id`, `name`, `encode`, `decode` and, with the `testing`
/// feature, `arbitrary()`.
///
/// ```ignore
/// protocol! {
///     /// doc
///     pub enum Msg, signature 0xAAA0 {
///         /// doc
///         Input = 1 from client { pipename: ShortStr },
///         InputOk = 2 from server {},
///     }
/// }
/// ```
#[macro_export]
macro_rules! protocol {
    (
        $(#[$meta:meta])*
        pub enum $name:ident, signature $sig:literal {
            $(
                $(#[$vmeta:meta])*
                $variant:ident = $id:literal from $from:ident {
                    $( $field:ident : $fty:ty $( [max $entries:expr, $bytes:expr] )? ),* $(,)?
                }
            ),* $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub enum $name {
            $( $(#[$vmeta])* $variant { $( $field: $fty ),* } ),*
        }

        impl $name {
            /// The two signature bytes that open every frame of this protocol.
            pub const SIGNATURE: u16 = $sig;

            /// Who may send this message.
            pub fn sender(&self) -> $crate::codec::Sender {
                Self::sender_of(self.id()).unwrap_or($crate::codec::Sender::Either)
            }

            /// Who may send the message with id `id`; `None` for an unknown id.
            pub fn sender_of(id: u8) -> Option<$crate::codec::Sender> {
                match id {
                    $( $id => Some($crate::sender!($from)), )*
                    _ => None,
                }
            }

            /// The message id on the wire.
            pub fn id(&self) -> u8 {
                match self { $( $name::$variant { .. } => $id ),* }
            }

            /// The message name as the protocol documents it.
            pub fn name(&self) -> &'static str {
                match self { $( $name::$variant { .. } => stringify!($variant) ),* }
            }

            /// The most bytes a frame with message id `id` can take, from
            /// its fields' types and declared ceilings: a receiver drops a
            /// larger frame before decoding it. `None` for an unknown id or
            /// a message with a field only the frame bounds (`chunk`,
            /// `longstr`, a `hash` without ceiling).
            pub fn max_len(id: u8) -> Option<usize> {
                use $crate::codec::{Ceiling, Field};
                match id {
                    $( $id => Some(3usize) $( .and_then(|n| Some(n + <$fty as Field>::max_wire(
                        Ceiling::NONE $( .with($entries, $bytes) )?,
                    )?)) )*, )*
                    _ => None,
                }
            }

            /// Bytes the encoded frame takes.
            #[allow(unused_variables)]
            pub fn encoded_len(&self) -> usize {
                3 + match self {
                    $( $name::$variant { $( $field ),* } => 0 $( + $crate::codec::Field::wire_len($field) )* ),*
                }
            }

            /// Appends the frame to `out`.
            #[allow(unused_variables)]
            pub fn encode_into(&self, out: &mut Vec<u8>) {
                out.reserve(self.encoded_len());
                out.extend_from_slice(&Self::SIGNATURE.to_be_bytes());
                out.push(self.id());
                match self {
                    $( $name::$variant { $( $field ),* } => { $( $crate::codec::Field::put($field, out); )* } ),*
                }
            }

            /// The frame as a new vector.
            pub fn encode(&self) -> Vec<u8> {
                let mut out = Vec::with_capacity(self.encoded_len());
                self.encode_into(&mut out);
                out
            }

            /// Decodes one frame. Bytes after the last field are ignored, as
            /// in the original codec.
            #[allow(unused_mut, unused_variables)]
            pub fn decode(frame: impl Into<bytes::Bytes>) -> Result<Self, $crate::codec::DecodeError> {
                use $crate::codec::{Ceiling, DecodeError, Field, FieldError};
                let frame: bytes::Bytes = frame.into();
                if frame.len() < 3 {
                    return Err(DecodeError::NoHeader(frame.len()));
                }
                let found = u16::from_be_bytes([frame[0], frame[1]]);
                if found != Self::SIGNATURE {
                    return Err(DecodeError::BadSignature { found, expected: Self::SIGNATURE });
                }
                let id = frame[2];
                let mut r = $crate::codec::Reader::new(frame.slice(3..));
                match id {
                    $( $id => Ok($name::$variant { $(
                        $field: <$fty as Field>::get_within(
                            &mut r,
                            Ceiling::NONE $( .with($entries, $bytes) )?,
                        ).map_err(|e| match e {
                            FieldError::Truncated => DecodeError::Truncated {
                                message: stringify!($variant),
                                field: stringify!($field),
                            },
                            FieldError::OverCeiling => DecodeError::OverCeiling {
                                message: stringify!($variant),
                                field: stringify!($field),
                            },
                        })?
                    ),* }), )*
                    other => Err(DecodeError::UnknownId(other)),
                }
            }

            $crate::if_testing! {
                /// A strategy over every message with arbitrary field values.
                pub fn arbitrary() -> $crate::proptest::strategy::BoxedStrategy<Self> {
                    #[allow(unused_imports)]
                    use $crate::codec::strategy::ArbitraryField;
                    use $crate::proptest::strategy::Strategy;
                    let variants: Vec<$crate::proptest::strategy::BoxedStrategy<Self>> = vec![ $(
                        // The leading `Just(())` keeps field-less messages a tuple too.
                        ( $crate::proptest::strategy::Just(()), $( <$fty as ArbitraryField>::strategy(), )* )
                            .prop_map(|((), $( $field, )* )| $name::$variant { $( $field ),* })
                            .boxed()
                    ),* ];
                    $crate::proptest::strategy::Union::new(variants).boxed()
                }
            }
        }
    };
}

pub use crate::protocol;

/// What `protocol!` generates for tests (strategies), only where this
/// crate is built for tests or with its `testing` feature: decided here, not
/// in the crate that declares a protocol.
#[cfg(any(test, feature = "testing"))]
#[doc(hidden)]
#[macro_export]
macro_rules! if_testing {
    ($($item:tt)*) => { $($item)* };
}
#[cfg(not(any(test, feature = "testing")))]
#[doc(hidden)]
#[macro_export]
macro_rules! if_testing {
    ($($item:tt)*) => {};
}

/// Maps a declaration's `from client|server|either` to a [`Sender`].
#[doc(hidden)]
#[macro_export]
macro_rules! sender {
    (client) => {
        $crate::codec::Sender::Client
    };
    (server) => {
        $crate::codec::Sender::Server
    };
    (either) => {
        $crate::codec::Sender::Either
    };
}
