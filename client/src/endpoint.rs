//! Broker names and the endpoints they stand for.
//!
//! A broker is found by name on the local machine through Linux abstract
//! namespace IPC endpoints: `ipc://@/zpipes/NAME` (what the original C
//! `zpipes_client` connects to), `ipc://@/filemq/NAME`, and the control
//! endpoint `ipc://@/zbroker/NAME`.

/// The broker name used when none is given.
pub const DEFAULT_BROKER: &str = "local";

/// Longest broker name: abstract socket paths hold 107 bytes.
pub const MAX_NAME_LEN: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("a broker name cannot be empty")]
    Empty,
    #[error("broker name is {0} bytes long; at most {MAX_NAME_LEN} are allowed")]
    TooLong(usize),
    #[error("broker name {0:?} may hold only letters, digits, '-', '_' and '.'")]
    BadCharacter(String),
}

/// Checks that `name` can be a broker name.
pub fn check_name(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong(name.len()));
    }
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')) {
        return Err(NameError::BadCharacter(name.to_string()));
    }
    Ok(())
}

/// The ZPIPES endpoint of the broker called `name`.
pub fn zpipes(name: &str) -> String {
    format!("ipc://@/zpipes/{name}")
}

/// The FILEMQ endpoint of the broker called `name`.
pub fn filemq(name: &str) -> String {
    format!("ipc://@/filemq/{name}")
}

/// The control endpoint of the broker called `name` (status queries).
pub fn control(name: &str) -> String {
    format!("ipc://@/zbroker/{name}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_the_original_endpoints() {
        assert_eq!(zpipes("local"), "ipc://@/zpipes/local");
        assert_eq!(control("x"), "ipc://@/zbroker/x");
        assert_eq!(filemq("local"), "ipc://@/filemq/local");
    }

    #[test]
    fn bad_names_are_refused() {
        assert_eq!(check_name(""), Err(NameError::Empty));
        assert!(check_name(&"a".repeat(65)).is_err());
        assert!(check_name("a/b").is_err());
        assert!(check_name("test-1.x_y").is_ok());
    }
}
