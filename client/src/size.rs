//! Sizes written by people: `4096`, `64KiB`, `8MB`, `1GiB`.
//!
//! One parser for every program, with the units the project settled on:
//! decimal units are powers of 1000 and binary units powers of 1024, as
//! their names say.
//!
//! | unit | bytes |
//! |---|---|
//! | none, `B` | 1 |
//! | `k`, `K`, `kB`, `KB` | 1000 |
//! | `KiB` | 1024 |
//! | `M`, `MB` | 1000² |
//! | `MiB` | 1024² |
//! | `G`, `GB` | 1000³ |
//! | `GiB` | 1024³ |
//! | `T`, `TB` / `TiB` | 1000⁴ / 1024⁴ |
//!
//! Units are case-insensitive (`mib` is `MiB`), a space between number and
//! unit is allowed (`8 MiB`), the number is a whole number.
//!
//! ```
//! use zbroker_client::size;
//! assert_eq!(size::parse("8MB"), Ok(8_000_000));
//! assert_eq!(size::parse("8MiB"), Ok(8 << 20));
//! assert!(size::parse("8 furlongs").is_err());
//! ```

/// The units accepted, for messages.
pub const ACCEPTED: &str =
    "a number of bytes, optionally with a unit: k/kB, M/MB, G/GB, T/TB (powers of 1000) \
     or KiB, MiB, GiB, TiB (powers of 1024), e.g. 8MB or 8MiB";

/// Why a text is not a size. Its `Display` is one line naming what is accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    #[error("{0:?} is not a size: expected {ACCEPTED}")]
    NotANumber(String),
    #[error("{unit:?} in {text:?} is not a size unit: expected {ACCEPTED}")]
    UnknownUnit { text: String, unit: String },
    #[error("{0:?} is too large (at most 2^64 - 1 bytes)")]
    TooLarge(String),
}

/// Parses a size; see the module documentation for the units.
pub fn parse(text: &str) -> Result<u64, SizeError> {
    let trimmed = text.trim();
    let split = trimmed.find(|c: char| !c.is_ascii_digit()).unwrap_or(trimmed.len());
    let (digits, unit) = trimmed.split_at(split);
    if digits.is_empty() {
        return Err(SizeError::NotANumber(text.to_string()));
    }
    let unit = unit.trim_start();
    let multiplier: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1000,
        "kib" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mib" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gib" => 1 << 30,
        "t" | "tb" => 1_000_000_000_000,
        "tib" => 1 << 40,
        _ => return Err(SizeError::UnknownUnit { text: text.to_string(), unit: unit.to_string() }),
    };
    let n: u64 = digits.parse().map_err(|_| SizeError::TooLarge(text.to_string()))?;
    n.checked_mul(multiplier).ok_or_else(|| SizeError::TooLarge(text.to_string()))
}

/// A size for people: the exact binary unit if there is one (`8MiB`),
/// else the exact decimal one (`8MB`), else bytes.
pub fn format(bytes: u64) -> String {
    const UNITS: [(u64, &str); 8] = [
        (1 << 40, "TiB"),
        (1_000_000_000_000, "TB"),
        (1 << 30, "GiB"),
        (1_000_000_000, "GB"),
        (1 << 20, "MiB"),
        (1_000_000, "MB"),
        (1 << 10, "KiB"),
        (1000, "kB"),
    ];
    for (unit, name) in UNITS {
        if bytes >= unit && bytes.is_multiple_of(unit) {
            return format!("{}{name}", bytes / unit);
        }
    }
    bytes.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_and_binary_units_are_what_they_say() {
        assert_eq!(parse("4096"), Ok(4096));
        assert_eq!(parse("0"), Ok(0));
        assert_eq!(parse("12B"), Ok(12));
        assert_eq!(parse("64k"), Ok(64_000));
        assert_eq!(parse("64kB"), Ok(64_000));
        assert_eq!(parse("64KB"), Ok(64_000));
        assert_eq!(parse("64KiB"), Ok(64 << 10));
        assert_eq!(parse("8M"), Ok(8_000_000));
        assert_eq!(parse("8MB"), Ok(8_000_000));
        assert_eq!(parse("8MiB"), Ok(8 << 20));
        assert_eq!(parse("8mib"), Ok(8 << 20));
        assert_eq!(parse("1G"), Ok(1_000_000_000));
        assert_eq!(parse("1GB"), Ok(1_000_000_000));
        assert_eq!(parse("1GiB"), Ok(1 << 30));
        assert_eq!(parse("2TiB"), Ok(2 << 40));
        assert_eq!(parse(" 8 MiB "), Ok(8 << 20));
    }

    #[test]
    fn nonsense_is_refused_in_one_line_naming_the_units() {
        for bad in ["", "lots", "MiB", "-1", "1.5MiB", "8 furlongs", "8 M B", "0x10"] {
            let e = parse(bad).unwrap_err().to_string();
            assert!(!e.contains('\n'), "{e}");
            assert!(e.contains("MiB") && e.contains("MB"), "{bad}: {e}");
        }
        assert!(matches!(parse("8 furlongs"), Err(SizeError::UnknownUnit { .. })));
        assert!(matches!(parse("99999999999999999999"), Err(SizeError::TooLarge(_))));
        assert!(matches!(parse("20000000TiB"), Err(SizeError::TooLarge(_))));
    }

    #[test]
    fn formatting_round_trips() {
        for n in [0, 1, 1000, 1024, 8 << 20, 8_000_000, 1 << 30, 3_000_000_001, 5 << 40] {
            assert_eq!(parse(&format(n)), Ok(n), "{}", format(n));
        }
        assert_eq!(format(8 << 20), "8MiB");
        assert_eq!(format(8_000_000), "8MB");
    }
}
