//! The control endpoint (`zbroker status`, `zbroker publish`): STATUS for
//! anyone, other commands only with the control token; SIGHUP's reload of
//! the config file and the CURVE allow-list.

use super::*;
use zbroker_services::{CommandError, CommandFor, Success};

/// What SIGHUP runs: typed commands for services named by
/// `Service::name`, e.g. FILEMQ's `ReplaceMounts` from a re-read config
/// file (values, never words: a directory stays a path).
pub type Reload = Box<dyn FnMut() -> Result<Vec<CommandFor>, crate::error::ReloadError>>;

/// What SIGHUP runs as well when CURVE is on: the new allow-list.
pub type AllowReload = Box<dyn FnMut() -> Result<Allow, crate::error::ReloadError>>;

/// A control command's outcome as its JSON reply: `{"ok": TEXT}` (with
/// `details` if the service gives any) or `{"error": TEXT}`, the error
/// shown as its service wrote it.
fn control_reply(result: Result<Success, CommandError>) -> serde_json::Value {
    match result {
        Ok(Success { text, details: None }) => serde_json::json!({ "ok": text }),
        Ok(Success { text, details: Some(details) }) => serde_json::json!({ "ok": text, "details": details }),
        Err(error) => serde_json::json!({ "error": error.to_string() }),
    }
}

impl Reactor {
    /// What SIGHUP does: produce typed commands (such as FILEMQ's mounts
    /// from a re-read config file) to hand to the services they name.
    pub fn on_reload(&mut self, reload: Reload) {
        self.reload = Some(reload);
    }

    /// What SIGHUP does with CURVE: produce the new allow-list (on an
    /// error the old one stays).
    pub fn on_reload_allow(&mut self, reload: AllowReload) {
        self.allow_reload = Some(reload);
    }

    pub(super) fn check_reload(&mut self) {
        let mut buf = [0u8; 64];
        let mut any = false;
        while matches!(self.reload_signals.read(&mut buf), Ok(n) if n > 0) {
            any = true;
        }
        if !any {
            return;
        }
        self.reloads += 1;
        if let Some(reload) = self.allow_reload.as_mut() {
            match reload() {
                Ok(allow) => {
                    tracing::info!("SIGHUP: CURVE: {}", allow.describe());
                    self.allow = allow;
                }
                Err(e) => {
                    self.reload_errors += 1;
                    tracing::error!("SIGHUP: client keys not reloaded (the old ones stay): {e:#}")
                }
            }
        }
        let Some(reload) = self.reload.as_mut() else {
            if self.allow_reload.is_none() {
                tracing::info!("SIGHUP: no config file to reload");
            }
            return;
        };
        match reload() {
            Err(e) => {
                self.reload_errors += 1;
                tracing::error!("SIGHUP: config not reloaded: {e:#}")
            }
            Ok(commands) => {
                let now = Instant::now();
                for CommandFor { service: name, command } in commands {
                    let Some(service) = self.services.iter().position(|s| s.name() == name) else {
                        self.reload_errors += 1;
                        tracing::error!("SIGHUP: no service {name:?} for its command");
                        continue;
                    };
                    let request = self.next_request;
                    self.next_request += 1;
                    match self.services[service].command(request, command, now, &mut self.actions) {
                        Answer::Now(result) => self.reloaded(result),
                        Answer::Later => {
                            self.control_waiting.insert(request, None);
                        }
                    }
                    self.apply(service);
                }
            }
        }
    }

    /// Logs the outcome of one of SIGHUP's commands.
    fn reloaded(&mut self, result: Result<Success, CommandError>) {
        match result {
            Ok(done) => tracing::info!("SIGHUP: {}", done.text),
            Err(error) => {
                self.reload_errors += 1;
                tracing::error!("SIGHUP: {error}")
            }
        }
    }

    /// A service's later answer to control request `request`: to the
    /// requester, if it still waits, or to the log for SIGHUP's.
    pub(super) fn answer(&mut self, request: u64, result: Result<Success, CommandError>) {
        match self.control_waiting.remove(&request) {
            Some(Some(routing_id)) => {
                let reply = control_reply(result).to_string();
                // A control client that vanished is no loss.
                let _ = self.control.send_multipart([routing_id, reply.into_bytes()], zmq::DONTWAIT);
            }
            Some(None) => self.reloaded(result),
            None => {}
        }
    }

    pub(super) fn drain_control(&mut self) -> Result<(), ReactorError> {
        while events(&self.control)?.contains(zmq::POLLIN) {
            self.recv_control()?;
        }
        Ok(())
    }

    pub(super) fn recv_control(&mut self) -> Result<(), ReactorError> {
        let mut parts = retry(|| self.control.recv_multipart(0))?;
        if parts.len() < 2 {
            return Ok(());
        }
        let routing_id = parts.remove(0);
        let words: Vec<String> = parts.iter().map(|p| String::from_utf8_lossy(p).into_owned()).collect();
        let reply = match words.first().map(String::as_str) {
            Some("STATUS") => self.status(),
            _ => match self.command(&words, &routing_id) {
                Some(reply) => reply,
                None => return Ok(()),
            },
        };
        // A control client that vanished is no loss.
        let _ = self.control.send_multipart([routing_id, reply.to_string().into_bytes()], zmq::DONTWAIT);
        Ok(())
    }

    /// A control command for the services (`PUBLISH DIR ALIAS`): the first
    /// service that knows it answers `{"ok": …}` or `{"error": …}`, now or
    /// (`None` here) later, through `answer`.
    pub(super) fn command(&mut self, words: &[String], routing_id: &[u8]) -> Option<serde_json::Value> {
        let refuse = |error: &str| Some(serde_json::json!({ "error": error }));
        // The abstract-namespace control socket has no file permissions:
        // anyone on the machine can reach it, so commands that change
        // what is published need the secret only the broker's user can read.
        let (Some(verb), Some(token)) = (words.first(), words.get(1)) else {
            return refuse("usage: COMMAND TOKEN ARGUMENTS...");
        };
        if self.control_token.as_ref() != Some(token) {
            return refuse("not authorised: the control token does not match (run as the broker's user)");
        }
        if self.control_waiting.len() >= MAX_CONTROL_WAITING {
            return refuse("busy: too many control requests waiting; try again");
        }
        let words: Vec<String> = std::iter::once(verb.clone()).chain(words[2..].iter().cloned()).collect();
        // The service that owns the verb parses the words, once, into its
        // own command; the rest of the way it is typed.
        let Some((service, parsed)) =
            self.services.iter().enumerate().find_map(|(i, s)| Some((i, s.parse_command(&words)?)))
        else {
            return refuse(&format!("unknown control request {:?}", words.join(" ")));
        };
        let command = match parsed {
            Ok(command) => command,
            Err(usage) => return Some(control_reply(Err(usage))),
        };
        let request = self.next_request;
        self.next_request += 1;
        let reply = match self.services[service].command(request, command, Instant::now(), &mut self.actions)
        {
            Answer::Now(result) => Some(control_reply(result)),
            Answer::Later => {
                self.control_waiting.insert(request, Some(routing_id.to_vec()));
                None
            }
        };
        // After registering the request: the answer may be among the
        // actions.
        self.apply(service);
        reply
    }

    pub(super) fn status(&self) -> serde_json::Value {
        let services: serde_json::Map<String, serde_json::Value> =
            self.services.iter().map(|s| (s.name().to_string(), zbroker_services::status_of(&**s))).collect();
        let mut status = serde_json::json!({
            "name": self.name,
            "version": env!("CARGO_PKG_VERSION"),
            "pid": std::process::id(),
            "state_dir": self.state_dir.as_ref().map(|d| escape(d.as_os_str().as_encoded_bytes())),
            "uptime_ms": self.started.elapsed().as_millis() as u64,
            "endpoints": self.endpoints,
            "peers": self.peers.len(),
            "max_connections": self.max_connections,
            "refused_connections": self.refused_connections,
            "reloads": self.reloads,
            "reload_errors": self.reload_errors,
            "stopping": self.draining.is_some(),
            "timers": self.timers.len(),
            "parked_replies": self.parked.values().map(|p| p.frames.len()).sum::<usize>(),
            "parked_bytes": self.parked.values().map(|p| p.bytes).sum::<usize>(),
            "memory": {
                "limit": self.budget.limit(),
                "used": self.budget.used(),
                "peak": self.budget.peak(),
                "at_limit": self.budget.at_limit(),
                "waiting": self.budget.waiting(),
                "holders": self.budget_holders(5).iter()
                    .map(|(c, b, w)| serde_json::json!({ "connection": c.0, "bytes": b, "what": w }))
                    .collect::<Vec<_>>(),
            },
            "dropped_frames": self.dropped_frames,
            "curve_endpoints": self.curve_endpoints,
            "curve_allowed_keys": match &self.allow {
                _ if self.zap.is_none() => serde_json::Value::Null,
                Allow::Anyone => serde_json::json!("any"),
                Allow::Only(keys) => serde_json::json!(keys.len()),
            },
            "curve_refused": self.curve_refused,
            "work_in_flight": self.worker.in_flight(),
            "services": services,
        });
        if let (Some(status), serde_json::Value::Object(passes)) =
            (status.as_object_mut(), self.passes.status())
        {
            status.extend(passes);
        }
        self.links_status(&mut status);
        status
    }
}
