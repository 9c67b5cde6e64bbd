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

/// The endpoint forms a client (or `--upstream`) may connect to.
pub const CONNECT_FORMS: &str = "tcp://HOST:PORT (port 1-65535), ipc://PATH, ipc://@NAME or inproc://NAME";
/// The endpoint forms a broker may bind.
pub const BIND_FORMS: &str =
    "tcp://HOST:PORT (port 1-65535; * for any interface or any free port, as in tcp://*:5670 or tcp://*:*), \
     ipc://PATH, ipc://@NAME or inproc://NAME";

/// Why a text is not an endpoint. Its `Display` is one line naming the
/// accepted forms.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EndpointError {
    /// No `tcp://`, `ipc://` or `inproc://` in front (`127.0.0.1:5670`, `http://…`).
    #[error("{endpoint:?} is not an endpoint: use {forms}")]
    Form { endpoint: String, forms: &'static str },
    /// `tcp://` without a host, or with a `*` host where one connects.
    #[error("{endpoint:?} has no usable host: use {forms}")]
    Host { endpoint: String, forms: &'static str },
    /// A port that is missing, not a number, 0 or over 65535.
    #[error("{endpoint:?}: the port must be 1-65535: use {forms}")]
    Port { endpoint: String, forms: &'static str },
    /// `ipc://` or `inproc://` with nothing after it.
    #[error("{endpoint:?} names no socket: use {forms}")]
    Empty { endpoint: String, forms: &'static str },
}

/// Checks an endpoint to connect to: `tcp://HOST:PORT` (port 1-65535),
/// `ipc://PATH`, `ipc://@NAME` or `inproc://NAME`.
///
/// ```
/// use zbroker_client::endpoint::validate;
/// assert!(validate("tcp://hub:5670").is_ok());
/// assert!(validate("127.0.0.1:5670").is_err());
/// assert!(validate("tcp://hub:99999").is_err());
/// ```
pub fn validate(endpoint: &str) -> Result<(), EndpointError> {
    check(endpoint, false)
}

/// Checks an endpoint to bind: as [`validate`], and `*` may stand for the
/// host (every interface) or the port (any free one): `tcp://*:5670`,
/// `tcp://127.0.0.1:*`, `tcp://*:*`.
pub fn validate_bind(endpoint: &str) -> Result<(), EndpointError> {
    check(endpoint, true)
}

fn check(endpoint: &str, bind: bool) -> Result<(), EndpointError> {
    let forms = if bind { BIND_FORMS } else { CONNECT_FORMS };
    let e = endpoint.to_string();
    if let Some(rest) = endpoint.strip_prefix("tcp://") {
        let Some((host, port)) = rest.rsplit_once(':') else {
            return Err(EndpointError::Port { endpoint: e, forms });
        };
        // libzmq's `tcp://SOURCE;HOST:PORT`: the host is what follows `;`.
        let host = host.rsplit_once(';').map_or(host, |(_, h)| h);
        let host_ok = !host.is_empty()
            && !host.contains(['/', ' '])
            && (host != "*" || bind)
            && (!host.starts_with('[') || host.ends_with(']'));
        if !host_ok {
            return Err(EndpointError::Host { endpoint: e, forms });
        }
        let port_ok = (port == "*" && bind) || port.parse::<u16>().is_ok_and(|p| p > 0);
        if !port_ok {
            return Err(EndpointError::Port { endpoint: e, forms });
        }
        return Ok(());
    }
    for scheme in ["ipc://", "inproc://"] {
        if let Some(rest) = endpoint.strip_prefix(scheme) {
            if rest.is_empty() || rest == "@" {
                return Err(EndpointError::Empty { endpoint: e, forms });
            }
            return Ok(());
        }
    }
    Err(EndpointError::Form { endpoint: e, forms })
}

/// The ZPIPES endpoint of the broker called `name`.
pub fn zpipes(name: &str) -> String {
    zbroker_proto::zpipes::local_endpoint(name)
}

/// The FILEMQ endpoint of the broker called `name`.
pub fn filemq(name: &str) -> String {
    zbroker_proto::filemq::local_endpoint(name)
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
    fn endpoints_are_checked_before_use() {
        for ok in [
            "tcp://127.0.0.1:5670",
            "tcp://hub:1",
            "tcp://hub:65535",
            "tcp://[::1]:5670",
            "ipc:///tmp/x",
            "ipc://@/zpipes/local",
            "inproc://x",
            "tcp://eth0;hub:5670",
        ] {
            assert_eq!(validate(ok), Ok(()), "{ok}");
            assert_eq!(validate_bind(ok), Ok(()), "{ok}");
        }
        for bind_only in ["tcp://*:5670", "tcp://127.0.0.1:*", "tcp://*:*"] {
            assert!(validate(bind_only).is_err(), "{bind_only}");
            assert_eq!(validate_bind(bind_only), Ok(()), "{bind_only}");
        }
        for bad in [
            "127.0.0.1:25670",
            "http://hub:5670",
            "tcp://hub:99999",
            "tcp://hub:0",
            "tcp://hub",
            "tcp://:5670",
            "tcp://hub:port",
            "ipc://",
            "inproc://",
            "",
            "hub",
        ] {
            let e = validate(bad).unwrap_err().to_string();
            assert!(e.contains("tcp://HOST:PORT") && e.contains("ipc://") && !e.contains('\n'), "{bad}: {e}");
            let e = validate_bind(bad).unwrap_err().to_string();
            assert!(e.contains("tcp://*:*"), "{bad}: {e}");
        }
        assert!(matches!(validate("tcp://hub:99999"), Err(EndpointError::Port { .. })));
        assert!(matches!(validate("http://hub"), Err(EndpointError::Form { .. })));
    }

    #[test]
    fn bad_names_are_refused() {
        assert_eq!(check_name(""), Err(NameError::Empty));
        assert!(check_name(&"a".repeat(65)).is_err());
        assert!(check_name("a/b").is_err());
        assert!(check_name("test-1.x_y").is_ok());
    }
}
