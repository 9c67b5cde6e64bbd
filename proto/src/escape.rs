//! How a name chosen by a peer is shown (and stored in line-based files):
//! one line of visible text, never a terminal escape, a forged line or a
//! bidirectional trick, and reversible, so that two different names never
//! look the same.
//!
//! - `\` becomes `\\`; newline, carriage return and tab become `\n`, `\r`,
//!   `\t`;
//! - other C0 controls, DEL, and bytes that are not UTF-8 become `\xNN`;
//! - C1 controls and the Unicode characters that reorder, hide or break
//!   text (bidi marks, overrides and isolates, zero-width and invisible
//!   characters, soft hyphen, line and paragraph separators, tags) become
//!   `\u{XXXX}`;
//! - everything else, spaces and non-ASCII letters included, stays as is.
//!
//! [`unescape`] inverts [`escape`] exactly.

use std::fmt::Write as _;

/// True for characters shown as `\u{…}`: C1 controls and format
/// characters that change how the rest of a line reads.
fn is_deceptive(c: char) -> bool {
    matches!(c,
        '\u{80}'..='\u{9f}'
        | '\u{ad}'
        | '\u{61c}'
        | '\u{180e}'
        | '\u{200b}'..='\u{200f}'
        | '\u{2028}'..='\u{202e}'
        | '\u{2060}'..='\u{206f}'
        | '\u{feff}'
        | '\u{fff9}'..='\u{fffb}'
        | '\u{e0000}'..='\u{e007f}'
    )
}

/// `bytes` as one line of visible text (see the module documentation).
pub fn escape(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                c if (c as u32) < 0x20 || c == '\u{7f}' => {
                    let _ = write!(out, "\\x{:02x}", c as u32);
                }
                c if is_deceptive(c) => {
                    let _ = write!(out, "\\u{{{:x}}}", c as u32);
                }
                c => out.push(c),
            }
        }
        for byte in chunk.invalid() {
            let _ = write!(out, "\\x{byte:02x}");
        }
    }
    out
}

/// [`escape`], cut to at most `max_chars` characters of output (an escape
/// is never split); a cut is shown by a trailing `…`.
pub fn escape_truncated(bytes: &[u8], max_chars: usize) -> String {
    // Escaping at most 4 input bytes per output character is enough to
    // know whether the result is longer than `max_chars`.
    let head = &bytes[..bytes.len().min(max_chars.saturating_mul(4).saturating_add(4))];
    let full = escape(head);
    if full.chars().count() <= max_chars && head.len() == bytes.len() {
        return full;
    }
    let mut out = String::new();
    let mut count = 0;
    let mut chars = full.chars().peekable();
    while let Some(c) = chars.next() {
        // Keep an escape sequence whole: `\xNN`, `\u{…}`, `\\`, `\n`.
        let mut piece = String::from(c);
        if c == '\\' {
            match chars.next() {
                Some('x') => {
                    piece.push('x');
                    piece.extend(chars.by_ref().take(2));
                }
                Some('u') => {
                    piece.push('u');
                    for c in chars.by_ref() {
                        piece.push(c);
                        if c == '}' {
                            break;
                        }
                    }
                }
                Some(other) => piece.push(other),
                None => {}
            }
        }
        let len = piece.chars().count();
        if count + len > max_chars.saturating_sub(1) {
            break;
        }
        count += len;
        out.push_str(&piece);
    }
    out.push('…');
    out
}

/// The bytes [`escape`] turned into `text`; `None` if `text` is not
/// something it writes (a raw control character, a bad escape).
pub fn unescape(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            if (c as u32) < 0x20 || c == '\u{7f}' || is_deceptive(c) {
                return None;
            }
            let mut buf = [0u8; 4];
            out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            continue;
        }
        match chars.next()? {
            '\\' => out.push(b'\\'),
            'n' => out.push(b'\n'),
            'r' => out.push(b'\r'),
            't' => out.push(b'\t'),
            'x' => {
                let hex: String = chars.by_ref().take(2).collect();
                if hex.len() != 2 || !hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
                    return None;
                }
                out.push(u8::from_str_radix(&hex, 16).ok()?);
            }
            'u' => {
                if chars.next()? != '{' {
                    return None;
                }
                let hex: String = chars.by_ref().take_while(|&c| c != '}').collect();
                let c = char::from_u32(u32::from_str_radix(&hex, 16).ok()?)?;
                if !is_deceptive(c) {
                    return None;
                }
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
            _ => return None,
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn forged_lines_and_terminal_escapes_are_made_visible() {
        assert_eq!(escape(b"x\ndeleted important.txt"), "x\\ndeleted important.txt");
        assert_eq!(escape(b"\x1b]0;TITLE\x07\x1b[31m"), "\\x1b]0;TITLE\\x07\\x1b[31m");
        assert_eq!(escape(b"dup\r"), "dup\\r");
        assert_eq!(escape(b"a\\nb"), "a\\\\nb", "a real backslash is doubled");
        assert_eq!(escape(b"\xff\xfe"), "\\xff\\xfe");
        assert_eq!(escape("évil\u{202e}txt.exe".as_bytes()), "évil\\u{202e}txt.exe");
        assert_eq!(escape("a\u{2028}b\u{61c}c\u{e0041}".as_bytes()), "a\\u{2028}b\\u{61c}c\\u{e0041}");
        assert_eq!(escape("photos/été 2024.jpg".as_bytes()), "photos/été 2024.jpg");
    }

    #[test]
    fn truncation_keeps_escapes_whole_and_says_so() {
        assert_eq!(escape_truncated(b"short", 10), "short");
        assert_eq!(escape_truncated(b"abcdefghij", 10), "abcdefghij");
        assert_eq!(escape_truncated(b"abcdefghijk", 10), "abcdefghi…");
        assert_eq!(escape_truncated(b"abcdefgh\x1b", 10), "abcdefgh…");
        let huge = vec![b'x'; 64 << 20];
        let shown = escape_truncated(&huge, 200);
        assert_eq!(shown.chars().count(), 200);
        assert!(shown.ends_with('…'));
    }

    #[test]
    fn unescape_refuses_what_escape_never_writes() {
        for bad in ["a\nb", "a\rb", "\\q", "\\x4", "\\xZZ", "\\u{41}", "\\", "\u{202e}"] {
            assert_eq!(unescape(bad), None, "{bad:?}");
        }
    }

    proptest! {
        #[test]
        fn escape_is_one_visible_line_and_unescape_inverts_it(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let shown = escape(&bytes);
            prop_assert!(!shown.chars().any(|c| c.is_control() || is_deceptive(c)));
            prop_assert_eq!(unescape(&shown), Some(bytes));
        }

        #[test]
        fn escape_of_text_round_trips(text in "\\PC*|[\\x00-\\x1f\\u{80}-\\u{9f}\\u{202a}-\\u{202e}\\\\a ]*") {
            prop_assert_eq!(unescape(&escape(text.as_bytes())), Some(text.into_bytes()));
        }
    }
}
