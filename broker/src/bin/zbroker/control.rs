//! The control side of the `zbroker` program: the control token in the
//! state directory, and the `status`, `publish` and `unpublish` commands
//! that talk to a running broker over its control endpoint.

use super::*;

/// The file in the state directory holding the control token.
pub(crate) const CONTROL_TOKEN_FILE: &str = "control-token";

/// Makes a fresh random control token, readable by this user only, in a
/// file beside the real one (renamed over it once the broker is up). The
/// file names the broker too (`TOKEN NAME`): `zbroker publish NAME` reads
/// the directory a broker answering as NAME points to, and must not hand
/// another broker's token to an impostor.
pub(crate) fn write_control_token(dir: &std::path::Path, name: &str) -> anyhow::Result<(String, PathBuf)> {
    use std::io::{Read as _, Write as _};
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create the state directory {}", dir.display()))?;
    let mut random = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut random))
        .context("reading /dev/urandom")?;
    let token: String = random.iter().map(|b| format!("{b:02x}")).collect();
    let path = dir.join(format!(".{CONTROL_TOKEN_FILE}.{}", std::process::id()));
    let _ = std::fs::remove_file(&path);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .and_then(|mut f| f.write_all(format!("{token} {name}\n").as_bytes()))
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok((token, path))
}

/// Where digests are kept between runs when `--state-dir` is not given.
pub(crate) fn default_state_dir(name: &str) -> Option<PathBuf> {
    let base = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".local/state")))?;
    Some(base.join("zbroker").join(name))
}

/// How long `publish` and `unpublish` wait for the broker: it answers once
/// the change is saved to disk.
pub(crate) const CHANGE_TIMEOUT: Duration = Duration::from_secs(10);

/// Asks a running broker to publish one more directory, until unpublished.
pub(crate) fn publish(name: &str, dir: &Path, alias: &str, state_dir: Option<PathBuf>) -> anyhow::Result<()> {
    endpoint::check_name(name)?;
    let root = publishable(dir)?;
    let token = control_token(name, state_dir)?;
    // Escaped, so that a directory name that is not UTF-8 arrives intact.
    let root = escape(root.as_os_str().as_bytes());
    change(name, &["PUBLISH", &token, &root, alias])
}

/// Asks a running broker to stop publishing a run-time mount.
pub(crate) fn unpublish(name: &str, alias: &str, state_dir: Option<PathBuf>) -> anyhow::Result<()> {
    endpoint::check_name(name)?;
    let token = control_token(name, state_dir)?;
    change(name, &["UNPUBLISH", &token, alias])
}

/// Sends a change of the mounts and prints the broker's answer.
pub(crate) fn change(name: &str, words: &[&str]) -> anyhow::Result<()> {
    let reply = control_request(name, words, CHANGE_TIMEOUT)?;
    match (reply["ok"].as_str(), reply["error"].as_str()) {
        (Some(ok), _) => {
            println!("{ok}");
            Ok(())
        }
        (_, Some(error)) => Err(exit::Refused(error.to_string()).into()),
        _ => bail!("unexpected reply from the broker: {reply}"),
    }
}

/// The control token of the broker `name`: from `--state-dir DIR` if
/// given, else from the state directory the broker says it uses (its
/// status: the flag, the config file's `state_dir` or the default,
/// whatever its environment), else (a broker that does not say) from the
/// default one.
pub(crate) fn control_token(name: &str, flag: Option<PathBuf>) -> anyhow::Result<String> {
    let (dir, told) = match flag {
        Some(dir) => (dir, false),
        None => {
            let status = control_request(name, &["STATUS"], Duration::from_secs(2))?;
            match status.get("state_dir") {
                Some(serde_json::Value::String(dir)) => {
                    let dir = unescape(dir)
                        .with_context(|| format!("the broker's state_dir {dir:?} is garbled"))?;
                    (PathBuf::from(std::ffi::OsString::from_vec(dir)), true)
                }
                Some(serde_json::Value::Null) => {
                    return Err(exit::Refused(format!(
                        "broker {name:?} has no state directory (started without --state-dir or HOME): \
                         it takes no run-time mounts"
                    ))
                    .into())
                }
                _ => (
                    default_state_dir(name).context("no state directory: pass the broker's --state-dir")?,
                    false,
                ),
            }
        }
    };
    let path = dir.join(CONTROL_TOKEN_FILE);
    let shown = escape(path.as_os_str().as_bytes());
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!("cannot read the broker's control token {shown} (run as the broker's user)")
    })?;
    let mut fields = text.split_whitespace();
    let token = fields.next().unwrap_or_default().to_string();
    match fields.next() {
        Some(owner) if owner != name => {
            bail!("the control token {shown} belongs to broker {owner:?}, not {name:?}")
        }
        None if told => {
            bail!("the control token {shown} names no broker: it was not written by broker {name:?}")
        }
        _ => Ok(token),
    }
}

/// Sends one request to a broker's control endpoint and returns its JSON reply.
pub(crate) fn control_request(
    name: &str,
    words: &[&str],
    timeout: Duration,
) -> anyhow::Result<serde_json::Value> {
    let context = zmq::Context::new();
    let socket = context.socket(zmq::DEALER)?;
    socket.set_linger(0)?;
    socket.connect(&endpoint::control(name))?;
    socket.send_multipart(words.iter().map(|w| w.as_bytes()), 0)?;
    if socket.poll(zmq::POLLIN, timeout.as_millis() as i64)? == 0 {
        return Err(exit::NoBroker { name: name.to_string(), endpoint: endpoint::control(name) }.into());
    }
    let reply = socket.recv_bytes(0)?;
    serde_json::from_slice(&reply).context("the broker's reply is not JSON")
}

/// Asks the broker's control endpoint for its status and prints it.
pub(crate) fn status(name: &str, json: bool, timeout: Duration) -> anyhow::Result<()> {
    endpoint::check_name(name)?;
    let status = control_request(name, &["STATUS"], timeout)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print!("{}", describe(&status));
    }
    Ok(())
}

/// The status as a person reads it.
pub(crate) fn describe(s: &serde_json::Value) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "broker {} (pid {}, up {} s, version {})",
        s["name"].as_str().unwrap_or("?"),
        s["pid"],
        s["uptime_ms"].as_u64().unwrap_or(0) / 1000,
        s["version"].as_str().unwrap_or("?")
    );
    let endpoints: Vec<&str> =
        s["endpoints"].as_array().into_iter().flatten().filter_map(|e| e.as_str()).collect();
    let _ = writeln!(out, "endpoints: {}", endpoints.join(", "));
    let _ = writeln!(out, "peers: {}, dropped frames: {}", s["peers"], s["dropped_frames"]);
    let m = &s["memory"];
    if m.is_object() {
        let holders: Vec<String> = m["holders"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|h| {
                format!(
                    "connection {} ({}) {} bytes",
                    h["connection"],
                    h["what"].as_str().unwrap_or("?"),
                    h["bytes"]
                )
            })
            .collect();
        let _ = writeln!(
            out,
            "memory: {} of {} bytes held (peak {}){}{}",
            m["used"],
            m["limit"],
            m["peak"],
            match m["at_limit"].as_bool() {
                Some(true) => format!(", AT THE BUDGET: {} requests wait for room", m["waiting"]),
                _ => String::new(),
            },
            if holders.is_empty() {
                String::new()
            } else {
                format!("; holding most: {}", holders.join(", "))
            }
        );
    }
    if let Some(longest) = s["longest_pass_ms"].as_f64() {
        let cause = match (s["longest_pass_cause"].as_str(), s["longest_pass_cause_ms"].as_f64()) {
            (Some(what), Some(ms)) => format!(": {what} took {ms:.2} ms"),
            _ => String::new(),
        };
        let _ = writeln!(
            out,
            "event loop: {} passes, the longest {longest:.2} ms at {:.1} s{cause}",
            s["passes"],
            s["longest_pass_at_ms"].as_u64().unwrap_or(0) as f64 / 1000.0
        );
    }
    let z = &s["services"]["zpipes"];
    if z.is_object() {
        let _ = writeln!(
            out,
            "zpipes: {} connections, {} bytes queued (peak {}, limit {} per pipe), {} bytes moved, {} malformed frames",
            z["connections"], z["queued_bytes"], z["peak_queued_bytes"], z["pipe_limit"], z["bytes_moved"], z["malformed_frames"]
        );
        for pipe in z["pipes"].as_array().into_iter().flatten() {
            let yes = |v: &serde_json::Value| {
                if v.as_bool() == Some(true) {
                    "attached"
                } else {
                    "none"
                }
            };
            let _ = writeln!(
                out,
                "  pipe {:?}: reader {}, writer {}, {} bytes queued",
                pipe["name"].as_str().unwrap_or("?"),
                yes(&pipe["reader"]),
                yes(&pipe["writer"]),
                pipe["queued_bytes"]
            );
        }
    }
    let f = &s["services"]["filemq"];
    if f.is_object() {
        let _ = writeln!(
            out,
            "filemq: {} subscribers, {} files and {} bytes sent, {} deletes sent, {} malformed frames",
            f["subscribers"].as_array().map_or(0, Vec::len),
            f["files_sent"],
            f["bytes_sent"],
            f["deletes_sent"],
            f["malformed_frames"]
        );
        for mount in f["mounts"].as_array().into_iter().flatten() {
            let state = match (mount["error"].as_str(), mount["scanned"].as_bool()) {
                (Some(error), _) => format!("error: {error}"),
                (None, Some(true)) => format!("{} files, {} bytes", mount["files"], mount["bytes"]),
                _ => "scanning".to_string(),
            };
            let hides: String = mount["hides"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|h| h["files"].as_u64().is_some_and(|n| n > 0))
                .map(|h| {
                    format!(
                        "; hides {} file(s) of mount {} in {}",
                        h["files"],
                        h["alias"].as_str().unwrap_or("?"),
                        h["dir"].as_str().unwrap_or("?")
                    )
                })
                .collect();
            let _ = writeln!(
                out,
                "  mount {} <- {} ({state}{}{}{hides})",
                mount["alias"].as_str().unwrap_or("?"),
                mount["root"].as_str().unwrap_or("?"),
                if mount["watching"].as_bool() == Some(false) { ", polling" } else { "" },
                if mount["origin"] == "runtime" { ", run-time" } else { "" }
            );
        }
        for sub in f["subscribers"].as_array().into_iter().flatten() {
            let paths: Vec<&str> =
                sub["subscriptions"].as_array().into_iter().flatten().filter_map(|p| p.as_str()).collect();
            let _ = writeln!(
                out,
                "  subscriber #{}: {}, {} bytes sent, {} queued, credit {}{}",
                sub["connection"],
                paths.join(" "),
                sub["bytes_sent"],
                sub["queued"],
                sub["credit"],
                sub["sending"].as_str().map(|f| format!(", sending {f}")).unwrap_or_default()
            );
        }
    }
    // Outbound links, under whichever service opened them.
    for (service, fields) in s["services"].as_object().into_iter().flatten() {
        for link in fields["links"].as_array().into_iter().flatten() {
            let _ = writeln!(
                out,
                "  {service} link {} -> {}: {}, {} frames ({} bytes) in, {} frames ({} bytes) out, {} dropped",
                link["key"],
                link["endpoint"].as_str().unwrap_or("?"),
                link["state"].as_str().unwrap_or("?"),
                link["frames_in"],
                link["bytes_in"],
                link["frames_out"],
                link["bytes_out"],
                link["dropped_frames"]
            );
        }
    }
    out
}
