//! SHA-1 digests as FILEMQ carries them: 40 hex digits, upper case as
//! CZMQ's `zdigest` writes them (the `X-SHA1` header, ICANHAZ caches,
//! `X-RESUME` lines, digest-cache files, partial-file names). One parser,
//! one formatter.

use sha1::{Digest as _, Sha1};
use std::fmt;

/// A SHA-1 digest, held binary (half the memory of its text).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Digest(pub [u8; 20]);

impl Digest {
    /// The digest of `data`.
    pub fn of(data: &[u8]) -> Digest {
        Digest::from_hasher(Sha1::new_with_prefix(data))
    }

    /// The digest a hasher has computed.
    pub fn from_hasher(hasher: Sha1) -> Digest {
        Digest(hasher.finalize().into())
    }

    /// A digest from its text: exactly 40 hex digits, either case. Nothing
    /// else passes: a digest names files in a subscriber's private area.
    pub fn parse(text: impl AsRef<[u8]>) -> Option<Digest> {
        let text = text.as_ref();
        if text.len() != 40 {
            return None;
        }
        let nibble = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
        let mut out = [0u8; 20];
        for (byte, pair) in out.iter_mut().zip(text.chunks_exact(2)) {
            *byte = (nibble(pair[0])? << 4) | nibble(pair[1])?;
        }
        Some(Digest(out))
    }

    /// Re-writes a digest's text in the one form (upper case), if it is one.
    pub fn normalise(text: impl AsRef<[u8]>) -> Option<String> {
        Digest::parse(text).map(|d| d.to_string())
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in self.0 {
            write!(f, "{byte:02X}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({self})")
    }
}

/// First line of a digest-cache file: the broker's per-mount cache and a
/// subscriber's `.filemq/digests` share one format.
pub const CACHE_HEADER: &str = "filemq-digests 2";

/// One line of a digest-cache file, what a file held when it had this
/// size, mtime and inode: `SIZE MTIME_NS INODE DIGEST MARK PATH`. `MARK` is
/// `d` for a file a subscriber delivered, `-` otherwise, and (a subscriber
/// mirroring with attributes) `l` for a symlink it made, `D`, `p` or `x`
/// for a directory it made (published; made as a parent; deleted by the
/// publisher while not empty: [`MARKS`]); `PATH` is written with
/// [`crate::escape`], so no name can break, forge or shadow a line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheLine {
    pub size: u64,
    /// Nanoseconds since the Unix epoch, negative before it.
    pub mtime_ns: i128,
    pub inode: u64,
    pub digest: Digest,
    /// One of [`MARKS`].
    pub mark: char,
    pub path: String,
}

/// The marks a cache line may carry.
pub const MARKS: [char; 6] = ['d', '-', 'l', 'D', 'p', 'x'];

impl CacheLine {
    /// The line, newline included.
    pub fn format(&self) -> String {
        let CacheLine { size, mtime_ns, inode, digest, mark, path } = self;
        format!("{size} {mtime_ns} {inode} {digest} {mark} {}\n", crate::escape::escape(path.as_bytes()))
    }

    /// A line (without its newline), unless any field is malformed or the
    /// path does not read back exactly.
    pub fn parse(line: &[u8]) -> Option<CacheLine> {
        let line = std::str::from_utf8(line).ok()?;
        let mut fields = line.splitn(6, ' ');
        let size = fields.next()?.parse().ok()?;
        let mtime_ns = fields.next()?.parse().ok()?;
        let inode = fields.next()?.parse().ok()?;
        let digest = Digest::parse(fields.next()?)?;
        let mark = match fields.next()?.as_bytes() {
            [c] if MARKS.contains(&char::from(*c)) => char::from(*c),
            _ => return None,
        };
        let path = String::from_utf8(crate::escape::unescape(fields.next()?)?).ok()?;
        (!path.is_empty()).then_some(CacheLine { size, mtime_ns, inode, digest, mark, path })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn digests_are_written_upper_case() {
        assert_eq!(Digest::of(b"abc").to_string(), "A9993E364706816ABA3E25717850C26C9CD0D89D");
    }

    #[test]
    fn only_forty_hex_digits_parse() {
        let lower = "a9993e364706816aba3e25717850c26c9cd0d89d";
        assert_eq!(Digest::parse(lower), Some(Digest::of(b"abc")));
        assert_eq!(Digest::normalise(lower).as_deref(), Some("A9993E364706816ABA3E25717850C26C9CD0D89D"));
        for bad in [
            "",
            &lower[1..],
            &format!("{lower}0"),
            "../../../../../../../../../../etc/passwd",
            &lower.replace('a', "g"),
        ] {
            assert_eq!(Digest::parse(bad), None, "{bad:?}");
        }
    }

    proptest! {
        #[test]
        fn cache_lines_round_trip(size: u64, mtime_ns: i128, inode: u64, bytes: [u8; 20], mark in proptest::sample::select(MARKS.to_vec()), path in "\\PC+") {
            let line = CacheLine { size, mtime_ns, inode, digest: Digest(bytes), mark, path };
            let text = line.format();
            prop_assert_eq!(text.matches('\n').count(), 1);
            prop_assert_eq!(CacheLine::parse(text.trim_end_matches('\n').as_bytes()), Some(line));
        }

        #[test]
        fn text_round_trips(bytes in any::<[u8; 20]>()) {
            let digest = Digest(bytes);
            prop_assert_eq!(Digest::parse(digest.to_string()), Some(digest));
        }
    }
}
