//! The FILEMQ subscriber's session against an arbitrary server: after the
//! greeting, a sequence of frames (CHEEZBURGERs built from hostile pieces:
//! traversal names, hidden and over-long names, control characters, lying
//! offsets, sizes and digests, in-sync markers; any message; raw garbage)
//! handled into a real inbox, which may hold planted symlinks and files of
//! the user's own.
//!
//! Invariants, after each input:
//! - no panic (overflow checks and debug assertions are on);
//! - nothing is created, changed or removed outside the inbox: the planted
//!   outside file keeps its bytes, and the directory around the inbox holds
//!   nothing new;
//! - the user's own file is never deleted or replaced (no --delete or
//!   --overwrite in this session);
//! - every entry in the inbox is a regular file or a directory (no symlink
//!   is created);
//! - at most `MAX_PARTIALS` + 1 partial files are left;
//! - a refused name, and the reason given for it, are shown escaped (no
//!   control character), the name cut to at most 200 characters.
//!
//! Memory is bounded by libFuzzer's `-rss_limit_mb` (the README runs it
//! with 2048); frames are at most 64 KiB here.

#![no_main]

use arbitrary::Arbitrary;
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use sha1::{Digest as _, Sha1};
use std::fs;
use std::path::Path;
use zbroker_client::filemq::{fuzzing, Event};
use zbroker_proto::codec::{Chunk, Hash, LongStr, ShortStr};
use zbroker_proto::filemq::{
    FilemqMsg as M,
    Operation::{self, Create, Delete},
};

/// Pieces names are made of, so the interesting ones are common.
const PIECES: &[&str] = &[
    "/",
    "data",
    "a",
    "b",
    "..",
    ".",
    ".filemq",
    "partial",
    "digests",
    "digests.new",
    "lock",
    "link",
    "mine.txt",
    "\n",
    "\r",
    "\x1b]0;T\x07",
    "\u{202e}",
    "\\",
    "\0",
    " ",
    "é",
];

const CONTENTS: &[&[u8]] = &[b"", b"x", b"hello", b"0123456789abcdef", b"mine"];

#[derive(Arbitrary, Debug)]
enum Name {
    Pieces(Vec<u8>),
    Long { piece: u8, repeat: u16 },
    Raw(Vec<u8>),
}

impl Name {
    fn bytes(&self) -> Vec<u8> {
        match self {
            Name::Pieces(picks) => {
                let mut name = b"/data".to_vec();
                for pick in picks.iter().take(12) {
                    let piece = PIECES[*pick as usize % PIECES.len()];
                    if piece != "/" && !name.ends_with(b"/") {
                        name.push(b'/');
                    }
                    name.extend_from_slice(piece.as_bytes());
                }
                name
            }
            Name::Long { piece, repeat } => {
                let piece = PIECES[*piece as usize % PIECES.len()];
                let mut name = b"/data/".to_vec();
                for _ in 0..(*repeat as usize % 3000) {
                    name.extend_from_slice(piece.as_bytes());
                    name.push(b'/');
                }
                name.push(b'z');
                name
            }
            Name::Raw(bytes) => bytes.clone(),
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Digest {
    None,
    /// The SHA-1 of one of `CONTENTS`.
    Of(u8),
    Raw(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
enum Frame {
    Chunk {
        delete: bool,
        operation: Option<u8>,
        name: Name,
        offset: u16,
        eof: u8,
        digest: Digest,
        size: Option<u16>,
        /// Which of `CONTENTS`, and from where.
        content: u8,
        from: u8,
        /// The sequence number is the next one unless this says otherwise.
        sequence: Option<u64>,
    },
    Marker {
        path: Name,
        published: Option<bool>,
    },
    Message(u8),
    Raw(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
struct Input {
    plant_link: bool,
    plant_partial_link: bool,
    window: u16,
    two_paths: bool,
    frames: Vec<Frame>,
}

fn sha1_hex(data: &[u8]) -> String {
    Sha1::digest(data).iter().map(|b| format!("{b:02X}")).collect()
}

fn encode(frame: &Frame, sequence: &mut u64) -> Vec<u8> {
    let mut next = || {
        let s = *sequence;
        *sequence += 1;
        s
    };
    match frame {
        Frame::Chunk { delete, operation, name, offset, eof, digest, size, content, from, sequence: seq } => {
            let content = CONTENTS[*content as usize % CONTENTS.len()];
            let data = &content[(*from as usize).min(content.len())..];
            let mut headers = Hash::default();
            match digest {
                Digest::None => {}
                Digest::Of(i) => {
                    let _ = headers.insert("X-SHA1", sha1_hex(CONTENTS[*i as usize % CONTENTS.len()]));
                }
                Digest::Raw(raw) => {
                    let _ = headers.insert("X-SHA1", Bytes::copy_from_slice(raw));
                }
            }
            if let Some(size) = size {
                let _ = headers.insert("X-SIZE", size.to_string());
            }
            let sequence = seq.unwrap_or_else(&mut next);
            M::Cheezburger {
                sequence,
                operation: operation.map_or(if *delete { Delete } else { Create }, Operation::Other),
                filename: LongStr(Bytes::from(name.bytes())),
                offset: *offset as u64,
                eof: *eof % 2,
                headers,
                chunk: Chunk(Bytes::copy_from_slice(data)),
            }
            .encode()
        }
        Frame::Marker { path, published } => {
            let mut headers = Hash::default();
            let _ = headers.insert("X-SYNCED", Bytes::from(path.bytes()));
            if let Some(published) = published {
                let _ = headers.insert("X-PUBLISHED", if *published { "1" } else { "0" });
            }
            M::Cheezburger {
                sequence: next(),
                operation: Create,
                filename: LongStr::default(),
                offset: 0,
                eof: 1,
                headers,
                chunk: Chunk::default(),
            }
            .encode()
        }
        Frame::Message(which) => match which % 8 {
            0 => M::OhaiOk {},
            1 => M::IcanhazOk {},
            2 => M::Hugz {},
            3 => M::HugzOk {},
            4 => M::Kthxbai {},
            5 => M::Srsly { reason: ShortStr::lossy("no") },
            6 => M::Rtfm { reason: ShortStr::lossy("\x1b[31m") },
            _ => M::Nom { credit: 1, sequence: 0 },
        }
        .encode(),
        Frame::Raw(bytes) => bytes.iter().copied().take(64 << 10).collect(),
    }
}

/// Every entry under `dir`, recursively, with its kind.
fn listing(dir: &Path, out: &mut Vec<(String, fs::FileType)>, prefix: &str) {
    let Ok(entries) = fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let name = format!("{prefix}{}", entry.file_name().to_string_lossy());
        let Ok(kind) = entry.file_type() else { continue };
        out.push((name.clone(), kind));
        if kind.is_dir() {
            listing(&entry.path(), out, &format!("{name}/"));
        }
    }
}

fuzz_target!(|input: Input| {
    let around = tempfile::tempdir().unwrap();
    let inbox = around.path().join("inbox");
    let outside = around.path().join("outside");
    fs::create_dir_all(&inbox).unwrap();
    fs::write(&outside, b"outside").unwrap();
    fs::write(inbox.join("mine.txt"), b"the user's own").unwrap();
    if input.plant_link {
        std::os::unix::fs::symlink(around.path(), inbox.join("link")).unwrap();
    }
    if input.plant_partial_link {
        let partial = inbox.join(".filemq/partial");
        fs::create_dir_all(&partial).unwrap();
        for content in CONTENTS {
            let _ = std::os::unix::fs::symlink(&outside, partial.join(sha1_hex(content)));
        }
    }
    let mut sequence = 0;
    let frames: Vec<Vec<u8>> = input.frames.iter().take(64).map(|f| encode(f, &mut sequence)).collect();
    let paths: &[&str] = if input.two_paths { &["/data", "/data/a"] } else { &["/data"] };
    let window = 1 + input.window as u64;
    let events = fuzzing::session(&inbox, paths, window, &frames);

    assert_eq!(fs::read(&outside).unwrap(), b"outside", "written through a link");
    let mut around_now: Vec<String> = fs::read_dir(around.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    around_now.sort();
    assert_eq!(around_now, ["inbox", "outside"], "something was made outside the inbox");
    assert_eq!(fs::read(inbox.join("mine.txt")).unwrap(), b"the user's own", "the user's file was touched");

    let mut entries = Vec::new();
    listing(&inbox, &mut entries, "");
    for (name, kind) in &entries {
        if name == "link"
            || name.starts_with(".filemq/partial/") && input.plant_partial_link && kind.is_symlink()
        {
            continue; // planted by us
        }
        assert!(kind.is_file() || kind.is_dir(), "{name:?} is neither a file nor a directory");
    }
    let partials =
        entries.iter().filter(|(n, k)| n.starts_with(".filemq/partial/") && !k.is_symlink()).count();
    assert!(partials <= 16 + 1, "{partials} partial files");

    for event in &events {
        if let Event::Rejected { name, why } = event {
            assert!(name.chars().count() <= 200, "a refused name of {} characters", name.chars().count());
            for shown in [name, why] {
                assert!(!shown.chars().any(char::is_control), "{shown:?} is not escaped");
            }
        }
    }
});
