//! The front socket's monitor: which descriptor each peer speaks on, a
//! disconnect ending every peer on it, the connection limit, and failed
//! handshakes (counted, logged per host and reason at most once per
//! interval).

use super::*;

impl Reactor {
    pub(super) fn drain_monitor(&mut self) -> Result<(), ReactorError> {
        while events(&self.monitor)?.contains(zmq::POLLIN) {
            self.recv_monitor_event()?;
        }
        Ok(())
    }

    pub(super) fn recv_monitor_event(&mut self) -> Result<(), ReactorError> {
        let event = retry(|| self.monitor.recv_msg(0))?;
        // The second frame: the endpoint (for a bound one, its local address).
        let mut local = None;
        while self.monitor.get_rcvmore()? {
            let frame = retry(|| self.monitor.recv_msg(0))?;
            local.get_or_insert_with(|| String::from_utf8_lossy(&frame).into_owned());
        }
        if event.len() < 6 {
            return Ok(());
        }
        let kind = u16::from_le_bytes([event[0], event[1]]);
        let value = u32::from_le_bytes([event[2], event[3], event[4], event[5]]);
        let fd = value as i32;
        // A closed peer's fd, or a new peer on a reused fd: either way the
        // connections last seen on it are gone.
        tracing::trace!(kind, value, "monitor event");
        let accepted = kind == zmq::SocketEvent::ACCEPTED.to_raw();
        let disconnected = kind == zmq::SocketEvent::DISCONNECTED.to_raw();
        if accepted || disconnected {
            self.fd_events.push(FdEvent { accepted, fd });
        }
        let Some(curve_ipc) = self.curve_ipc else { return Ok(()) };
        let secure = local.as_deref().is_some_and(|l| curve_ipc || !l.starts_with("ipc://"));
        if accepted && secure {
            if let Some(address) = peer_address(fd) {
                self.accepted_addresses.insert(fd, address);
            }
        } else if disconnected {
            let address = self.accepted_addresses.remove(&fd);
            if let Some(why) = self.handshake_failed.take() {
                // The peer may have gone before its ACCEPTED was read: then
                // only the endpoint it came to is known.
                let address = address.unwrap_or_else(|| {
                    format!("a peer already gone (on {})", local.as_deref().unwrap_or("?"))
                });
                self.failed_handshake(&address, &why);
            }
        } else if secure && kind == zmq::SocketEvent::HANDSHAKE_FAILED_PROTOCOL.to_raw() {
            self.handshake_failed = Some(handshake_protocol_error(value));
        } else if secure && kind == zmq::SocketEvent::HANDSHAKE_FAILED_NO_DETAIL.to_raw() {
            let error = std::io::Error::from_raw_os_error(value as i32);
            self.handshake_failed = Some(format!(
                "the connection ended during the handshake ({error}): a client without CURVE or with the \
                 wrong server key?"
            ));
        }
        Ok(())
    }

    /// Counts a CURVE handshake that failed before any client key was
    /// known (a wrong server key, a client without CURVE, a broken
    /// handshake) and logs it, each address (its host) at most once per
    /// `REFUSAL_LOG_INTERVAL` for each reason (a refused client retries
    /// ten times a second, from a new port each time).
    pub(super) fn failed_handshake(&mut self, address: &str, why: &str) {
        self.curve_refused += 1;
        let host = match address.rsplit_once(':') {
            Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
            _ => address,
        };
        let key = (host.to_string(), why.to_string());
        let now = Instant::now();
        let due = self
            .handshake_failures_logged
            .get(&key)
            .is_none_or(|t| now.duration_since(*t) >= REFUSAL_LOG_INTERVAL);
        if due {
            if self.handshake_failures_logged.len() >= REFUSAL_LOG_KEYS {
                self.handshake_failures_logged.clear();
            }
            self.handshake_failures_logged.insert(key, now);
            tracing::warn!(
                "CURVE: handshake from {address} failed: {why} ({} refused so far)",
                self.curve_refused
            );
        }
    }

    /// A new peer speaks on `fd`. Its own connection is the last ACCEPTED on
    /// that descriptor: what came before ends older peers (now, before the
    /// new one takes the descriptor over); what came after (its own
    /// DISCONNECTED) waits until its frames have been read.
    pub(super) fn admit_fd(&mut self, fd: i32) {
        let Some(last_accept) = self.fd_events.iter().rposition(|e| e.accepted && e.fd == fd) else {
            return;
        };
        // A fresh connection on this descriptor: it is open again.
        self.closed_fds.remove(&fd);
        let mut index = 0;
        self.fd_events.retain(|e| {
            let keep = e.fd != fd || index > last_accept;
            index += 1;
            keep
        });
        // The older peers there are gone, but their last frames may still
        // be queued: forget them once the front socket is read dry.
        let old = self.peers.take_fd(fd);
        self.gone.extend(old);
    }

    /// The peers last seen on a closed descriptor are gone.
    pub(super) fn forget_fd(&mut self, fd: i32) {
        for conn in self.peers.remove_fd(fd) {
            tracing::debug!(conn = conn.0, fd, "peer disconnected");
            self.disconnect(conn);
        }
    }
}
