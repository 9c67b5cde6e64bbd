//! CURVE on the front endpoints: who may connect (`Allow`), and the ZAP
//! handler the reactor answers itself on `inproc://zeromq.zap.01`: a client
//! key not in the allow-list fails its handshake and never reaches a
//! service; refusals are counted and logged at most once per key and
//! interval.

use super::*;
use crate::error::Doing as _;

/// Which CURVE clients may connect.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Allow {
    /// Any client that knows the server's public key.
    #[default]
    Anyone,
    /// Only clients with one of these public keys.
    Only(HashSet<Key>),
}

impl Allow {
    pub fn permits(&self, key: &Key) -> bool {
        match self {
            Allow::Anyone => true,
            Allow::Only(keys) => keys.contains(key),
        }
    }

    /// For the log: "any client" or "N client keys".
    pub fn describe(&self) -> String {
        match self {
            Allow::Anyone => "any client that knows the server key".to_string(),
            Allow::Only(keys) => format!("{} allowed client key(s)", keys.len()),
        }
    }
}

/// CURVE security for the front endpoints.
pub struct Curve {
    /// The broker's secret key.
    pub secret_key: Key,
    pub allow: Allow,
    /// CURVE on the `ipc://` endpoints too (otherwise they stay open to
    /// local processes, as without CURVE).
    pub ipc: bool,
}

/// The remote address of a TCP socket libzmq accepted (`None` if it is
/// not one, or already closed).
pub(super) fn peer_address(fd: i32) -> Option<String> {
    use std::os::fd::FromRawFd as _;
    // SAFETY: the descriptor is libzmq's; ManuallyDrop never closes it,
    // and getpeername(2) only reads it (on a reused or closed descriptor
    // it fails or names another peer, which only affects a log line).
    let stream = std::mem::ManuallyDrop::new(unsafe { std::net::TcpStream::from_raw_fd(fd) });
    stream.peer_addr().ok().map(|a| a.to_string())
}

/// A `HANDSHAKE_FAILED_PROTOCOL` event's value, in words.
pub(super) fn handshake_protocol_error(code: u32) -> String {
    // libzmq's ZMQ_PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC and _MECHANISM_MISMATCH.
    const CRYPTOGRAPHIC: u32 = 0x1100_0001;
    const MECHANISM_MISMATCH: u32 = 0x1100_0002;
    match code {
        CRYPTOGRAPHIC => {
            "its HELLO could not be decrypted: the client has the wrong server key (--server-key)".into()
        }
        MECHANISM_MISMATCH => "the client does not speak CURVE (no --server-key?)".into(),
        code => format!("ZMTP protocol error 0x{code:x}"),
    }
}

impl Reactor {
    /// Answers every ZAP request waiting (there are none without CURVE).
    pub(super) fn drain_zap(&mut self) -> Result<(), ReactorError> {
        loop {
            let Some(zap) = self.zap.as_ref() else {
                return Ok(());
            };
            if !events(zap)?.contains(zmq::POLLIN) {
                return Ok(());
            }
            let frames = match retry(|| zap.recv_multipart(zmq::DONTWAIT)) {
                Ok(frames) => frames,
                Err(zmq::Error::EAGAIN) => return Ok(()),
                Err(e) => return Err(e).doing("receiving on the ZAP socket"),
            };
            let Some(reply) = self.zap_reply(frames) else { continue };
            if let Some(zap) = self.zap.as_ref() {
                // libzmq's own request socket always takes its reply; one
                // that cannot (its connection gone) needs none.
                let _ = retry(|| zap.send_multipart(&reply, zmq::DONTWAIT));
            }
        }
    }

    /// The reply to one ZAP request (RFC 27), envelope included:
    /// `[routing id, …, "", version, request id, domain, address, identity,
    /// mechanism, credentials…]` → `[envelope, version, request id, status
    /// code, status text, user id, metadata]`.
    pub(super) fn zap_reply(&mut self, frames: Vec<Vec<u8>>) -> Option<Vec<Vec<u8>>> {
        let delimiter = frames.iter().skip(1).position(|f| f.is_empty())? + 1;
        let (envelope, request) = frames.split_at(delimiter + 1);
        let [version, request_id, _domain, address, _identity, mechanism, credentials @ ..] = request else {
            tracing::debug!(frames = request.len(), "ignoring a malformed ZAP request");
            return None;
        };
        let (code, text, user_id): (&str, &str, String) = if version.as_slice() != b"1.0" {
            ("500", "ZAP version not supported", String::new())
        } else {
            match mechanism.as_slice() {
                b"NULL" => ("200", "OK", String::new()),
                b"CURVE" => {
                    let key: Option<Key> = credentials.first().and_then(|c| c.as_slice().try_into().ok());
                    match key {
                        Some(key) if self.allow.permits(&key) => ("200", "OK", curve::z85_encode(&key)),
                        Some(key) => {
                            self.refused_key(&key, &String::from_utf8_lossy(address));
                            ("400", "not allowed", String::new())
                        }
                        None => {
                            self.curve_refused += 1;
                            ("400", "no client key", String::new())
                        }
                    }
                }
                other => {
                    tracing::warn!("refused a client using the {} mechanism", String::from_utf8_lossy(other));
                    ("400", "mechanism not supported", String::new())
                }
            }
        };
        let mut reply = envelope.to_vec();
        reply.extend([
            version.clone(),
            request_id.clone(),
            code.as_bytes().to_vec(),
            text.as_bytes().to_vec(),
            user_id.into_bytes(),
            Vec::new(),
        ]);
        Some(reply)
    }

    /// Counts a refused CURVE client and logs it (each key at most once per
    /// `REFUSAL_LOG_INTERVAL`: a refused client retries ten times a second).
    pub(super) fn refused_key(&mut self, key: &Key, address: &str) {
        self.curve_refused += 1;
        let now = Instant::now();
        let due =
            self.refusals_logged.get(key).is_none_or(|t| now.duration_since(*t) >= REFUSAL_LOG_INTERVAL);
        if due {
            if self.refusals_logged.len() >= REFUSAL_LOG_KEYS {
                self.refusals_logged.clear();
            }
            self.refusals_logged.insert(*key, now);
            tracing::warn!(
                "CURVE: refused client key {} from {address}: not in the allow-list ({} refused so far)",
                curve::z85_encode(key),
                self.curve_refused
            );
        }
    }
}
