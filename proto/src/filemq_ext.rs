//! zbroker's FILEMQ extensions that both ends must read alike: the
//! capabilities a greeting negotiates, the names of our options and
//! headers, entry attributes (kind, permission bits, mtime) as the cache
//! and the headers carry them, and the rule for a symlink's target. The
//! wire itself stays the original's (`filemq.rs`); see
//! `docs/protocol/FILEMQ-EXTENSIONS.md`.
//!
//! Capabilities ride in a trailer after OHAI's and OHAI-OK's declared
//! fields, which every decoder (the original C one and ours) ignores: the
//! client offers, the server grants. A server that answers a plain OHAI-OK
//! (the original, an older zbroker) grants nothing, and a client that
//! offers nothing (the original C client) gets exactly the original wire.

use crate::digest::Digest;
use crate::FilemqMsg;

/// First bytes of a trailer; one byte of capability bits follows.
pub const EXT_MAGIC: [u8; 2] = *b"ZB";
/// Entries keep their permission bits and mtime; symlinks and directories
/// are carried as such (headers [`TYPE`], [`MODE`], [`MTIME`],
/// [`TARGET`]; cache values with attributes).
pub const META: u8 = 0x01;
/// The ICANHAZ option [`EXCLUDE_OPTION`] is honoured by the server.
pub const EXCLUDE: u8 = 0x02;
/// The ICANHAZ option [`LIST_OPTION`] is honoured by the server.
pub const LIST: u8 = 0x04;
/// Every capability this code knows.
pub const ALL: u8 = META | EXCLUDE | LIST;

/// ICANHAZ option: gitignore-style patterns, one a line, of paths under
/// the subscription that are neither sent nor deleted (`crate::exclude`).
pub const EXCLUDE_OPTION: &str = "X-EXCLUDE";
/// ICANHAZ option `1`: this connection lists, it never receives content:
/// a file is announced by one empty CHEEZBURGER with its headers.
pub const LIST_OPTION: &str = "X-LIST";
/// CHEEZBURGER header: what the entry is when it is not a file's content:
/// [`TYPE_DIR`], [`TYPE_LINK`], or [`TYPE_ATTRS`] (new attributes of a
/// file whose content, `X-SHA1`, the client already holds).
pub const TYPE: &str = "X-TYPE";
pub const TYPE_DIR: &str = "dir";
pub const TYPE_LINK: &str = "link";
pub const TYPE_ATTRS: &str = "attrs";
/// CHEEZBURGER header: permission bits, octal (never setuid, setgid or
/// sticky).
pub const MODE: &str = "X-MODE";
/// CHEEZBURGER header: modification time, nanoseconds since the Unix
/// epoch, decimal (negative before it).
pub const MTIME: &str = "X-MTIME";
/// CHEEZBURGER header of a symlink: its target, relative (see
/// [`link_target`]).
pub const TARGET: &str = "X-TARGET";

/// SHA-1 of nothing: the digest a directory is compared by.
pub const EMPTY_SHA1: &str = "DA39A3EE5E6B4B0D3255BFEF95601890AFD80709";
/// Longest symlink target carried.
pub const MAX_TARGET: usize = 4095;
/// Permission bits: what a mode may carry.
pub const PERMISSIONS: u32 = 0o777;

/// The capability bits in the trailer after `msg`'s fields in `frame` (0
/// without one).
pub fn trailer_bits(frame: &[u8], msg: &FilemqMsg) -> u8 {
    match frame.get(msg.encoded_len()..).unwrap_or_default() {
        [m0, m1, bits, ..] if [*m0, *m1] == EXT_MAGIC => *bits,
        _ => 0,
    }
}

/// `msg` with a trailer carrying `bits` (none when `bits` is 0: the
/// original wire).
pub fn encode_with_bits(msg: &FilemqMsg, bits: u8) -> Vec<u8> {
    let mut frame = msg.encode();
    if bits != 0 {
        frame.extend_from_slice(&EXT_MAGIC);
        frame.push(bits);
    }
    frame
}

/// What a published entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum EntryKind {
    #[default]
    File,
    Dir,
    Link,
}

impl EntryKind {
    fn letter(self) -> char {
        match self {
            EntryKind::File => 'f',
            EntryKind::Dir => 'd',
            EntryKind::Link => 'l',
        }
    }

    fn of_letter(letter: &str) -> Option<EntryKind> {
        match letter {
            "f" => Some(EntryKind::File),
            "d" => Some(EntryKind::Dir),
            "l" => Some(EntryKind::Link),
            _ => None,
        }
    }
}

/// What a mirror keeps of an entry beside its content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Attrs {
    /// Permission bits only (`& PERMISSIONS`); a symlink's are 0o777.
    pub mode: u32,
    /// Nanoseconds since the Unix epoch.
    pub mtime_ns: i64,
}

impl Attrs {
    /// The attributes of `meta` (of the entry itself, never a link's
    /// target).
    pub fn of(meta: &std::fs::Metadata) -> Attrs {
        use std::os::unix::fs::MetadataExt;
        let mtime_ns = meta.mtime().saturating_mul(1_000_000_000).saturating_add(meta.mtime_nsec());
        Attrs { mode: meta.mode() & PERMISSIONS, mtime_ns }
    }

    /// Reads the [`MODE`] and [`MTIME`] header values.
    pub fn parse(mode: &[u8], mtime: &[u8]) -> Option<Attrs> {
        let mode = u32::from_str_radix(std::str::from_utf8(mode).ok()?, 8).ok()?;
        let mtime_ns = std::str::from_utf8(mtime).ok()?.parse().ok()?;
        (mode <= PERMISSIONS).then_some(Attrs { mode, mtime_ns })
    }

    /// The [`MODE`] header value.
    pub fn mode_text(&self) -> String {
        format!("{:o}", self.mode & PERMISSIONS)
    }
}

/// A cache value with attributes, as a client that was granted [`META`]
/// sends it: `DIGEST KIND MODE MTIME` (40 hex digits; `f`, `d` or `l`;
/// octal; decimal nanoseconds). A file's digest is its content's, a
/// link's that of its target ([`link_digest`]), a directory's
/// [`EMPTY_SHA1`].
pub fn cache_value(digest: &str, kind: EntryKind, attrs: Attrs) -> String {
    format!("{digest} {} {} {}", kind.letter(), attrs.mode_text(), attrs.mtime_ns)
}

/// Reads a cache value: the digest, and the kind and
/// attributes when the value has them (a plain digest, as the original
/// wire has it, has none). `None` if it is malformed.
pub fn parse_cache_value(value: &[u8]) -> Option<(Digest, Option<(EntryKind, Attrs)>)> {
    let text = std::str::from_utf8(value).ok()?;
    let mut fields = text.split(' ');
    let digest = Digest::parse(fields.next()?)?;
    let Some(kind) = fields.next() else { return Some((digest, None)) };
    let kind = EntryKind::of_letter(kind)?;
    let attrs = Attrs::parse(fields.next()?.as_bytes(), fields.next()?.as_bytes())?;
    fields.next().is_none().then_some((digest, Some((kind, attrs))))
}

/// The digest a symlink is compared by: SHA-1 of its target, upper-case
/// hex.
pub fn link_digest(target: &str) -> String {
    Digest::of(target.as_bytes()).to_string()
}

/// Checks the target of a symlink at `link` (a relative path of plain
/// components, `/`-separated) and returns the path it leads to, relative
/// to the same root. Resolved lexically, so it must stay inside the root
/// whatever lies on the way: only a relative target of leading `..`
/// components (no more than `link` has directories above it) then plain
/// visible components is accepted. A `..` after a name is refused: if
/// that name were a symlink, the kernel would climb from where it leads,
/// not from where the name is.
pub fn link_target(link: &str, target: &str) -> Result<String, &'static str> {
    if target.is_empty() {
        return Err("has an empty symlink target");
    }
    if target.len() > MAX_TARGET || target.contains('\0') {
        return Err("has a symlink target too long or with a NUL byte");
    }
    if target.starts_with('/') {
        return Err("is a symlink to an absolute path");
    }
    let mut dir: Vec<&str> = link.split('/').collect();
    dir.pop();
    let mut climbing = true;
    let mut rest = Vec::new();
    for part in target.split('/') {
        match part {
            ".." if climbing => {
                if dir.pop().is_none() {
                    return Err("is a symlink that leads out of the tree");
                }
            }
            "" | "." | ".." => {
                return Err("is a symlink whose target has an empty, '.' or misplaced '..' part")
            }
            name if name.starts_with('.') => return Err("is a symlink into a hidden entry"),
            name => {
                climbing = false;
                rest.push(name);
            }
        }
    }
    dir.extend(rest);
    Ok(dir.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn capabilities_ride_after_the_fields() {
        let ohai = FilemqMsg::Ohai { protocol: crate::codec::ShortStr::lossy("FILEMQ"), version: 2 };
        let frame = encode_with_bits(&ohai, ALL);
        assert_eq!(FilemqMsg::decode(frame.clone()).unwrap(), ohai, "the original decoder reads it");
        assert_eq!(trailer_bits(&frame, &ohai), ALL);
        assert_eq!(encode_with_bits(&ohai, 0), ohai.encode(), "no bits: the original wire");
        assert_eq!(trailer_bits(&ohai.encode(), &ohai), 0);
        let mut stray = ohai.encode();
        stray.extend_from_slice(b"Z");
        assert_eq!(trailer_bits(&stray, &ohai), 0, "a stray byte is no trailer");
        let ok = FilemqMsg::OhaiOk {};
        assert_eq!(encode_with_bits(&ok, META), b"\xAA\xA3\x04ZB\x01");
    }

    #[test]
    fn cache_values_read_back() {
        let attrs = Attrs { mode: 0o755, mtime_ns: -1_500_000_000 };
        let value = cache_value(EMPTY_SHA1, EntryKind::Dir, attrs);
        assert_eq!(value, format!("{EMPTY_SHA1} d 755 -1500000000"));
        let empty = Digest::parse(EMPTY_SHA1).unwrap();
        assert_eq!(parse_cache_value(value.as_bytes()), Some((empty, Some((EntryKind::Dir, attrs)))));
        let lower = EMPTY_SHA1.to_ascii_lowercase();
        assert_eq!(parse_cache_value(lower.as_bytes()), Some((empty, None)));
        for bad in [
            "xyz".to_string(),
            format!("{EMPTY_SHA1} "),
            format!("{EMPTY_SHA1} q 644 1"),
            format!("{EMPTY_SHA1} f 1777 1"),
            format!("{EMPTY_SHA1} f 644"),
            format!("{EMPTY_SHA1} f 644 1 extra"),
            format!("{EMPTY_SHA1} f 9 1"),
        ] {
            assert_eq!(parse_cache_value(bad.as_bytes()), None, "{bad}");
        }
    }

    #[test]
    fn link_targets_stay_inside() {
        assert_eq!(link_target("a/b/l", "../c/f"), Ok("a/c/f".into()));
        assert_eq!(link_target("a/l", "f"), Ok("a/f".into()));
        assert_eq!(link_target("a/l", ".."), Ok("".into()), "the root itself is inside");
        assert_eq!(link_target("l", "d/e"), Ok("d/e".into()));
        for (link, target) in [
            ("l", "../x"),
            ("a/l", "../../x"),
            ("a/l", "/etc/passwd"),
            ("a/l", "b/../../x"),
            ("a/l", "b/../c"),
            ("a/l", "./c"),
            ("a/l", "c//d"),
            ("a/l", "c/"),
            ("a/l", ".filemq/digests"),
            ("a/l", ""),
            ("a/l", "x\0y"),
        ] {
            assert!(link_target(link, target).is_err(), "{link} -> {target}");
        }
    }

    proptest! {
        /// Whatever the target, an accepted one names a path of plain
        /// visible components under the root (the links' directories
        /// being real ones).
        #[test]
        fn an_accepted_target_never_leaves_the_root(
            depth in 0usize..4,
            parts in proptest::collection::vec(prop_oneof![
                Just(".."), Just("."), Just(""), Just("x"), Just(".h"), Just("y")
            ], 0..8),
        ) {
            let link = (0..depth).map(|i| format!("d{i}")).chain(["l".to_string()]).collect::<Vec<_>>().join("/");
            let target = parts.join("/");
            if let Ok(resolved) = link_target(&link, &target) {
                let mut real: Vec<String> = link.split('/').map(str::to_string).collect();
                real.pop();
                for part in target.split('/') {
                    if part == ".." {
                        prop_assert!(real.pop().is_some());
                    } else {
                        real.push(part.to_string());
                    }
                }
                prop_assert_eq!(real.join("/"), resolved.clone());
                for part in resolved.split('/').filter(|p| !p.is_empty()) {
                    prop_assert!(part != "." && part != ".." && !part.starts_with('.'));
                }
            }
        }
    }
}
