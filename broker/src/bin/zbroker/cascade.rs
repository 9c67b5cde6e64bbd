//! The cascade (`--upstream`): a client-library subscriber on a thread of
//! its own, mirroring an upstream broker into a directory this one
//! publishes.

use super::*;

/// The cascade: a FILEMQ subscription to an upstream broker, mirrored into
/// a directory (which this broker usually publishes in turn), running on a
/// thread of its own beside the event loop.
pub(crate) struct Upstream {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl Upstream {
    pub(crate) fn start(
        endpoint: &str,
        paths: Vec<String>,
        inbox: PathBuf,
        curve: Option<zbroker_client::curve::ClientKeys>,
    ) -> anyhow::Result<Upstream> {
        use std::sync::atomic::Ordering;
        use zbroker_client::filemq::{Event, Kept, Options, Subscriber};
        use zbroker_proto::escape::escape;
        let options = Options { curve, ..Options::endpoint(endpoint, paths.clone(), inbox.clone()) };
        let subscriber = Subscriber::start(options)
            .with_context(|| format!("cannot mirror {endpoint} into {}", inbox.display()))?;
        tracing::info!("mirroring {} from {endpoint} into {}", paths.join(" "), inbox.display());
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopping = stop.clone();
        let endpoint = endpoint.to_string();
        let thread = std::thread::Builder::new().name("upstream".into()).spawn(move || {
            while !stopping.load(Ordering::Relaxed) {
                match subscriber.recv_timeout(Duration::from_millis(200)) {
                    Ok(Event::Updated { path, size }) => {
                        tracing::debug!(path = %escape(path.as_bytes()), size, "upstream file updated")
                    }
                    Ok(Event::Deleted { path }) => {
                        tracing::debug!(path = %escape(path.as_bytes()), "upstream file deleted")
                    }
                    Ok(Event::InSync { path, published: true }) => {
                        tracing::info!(path = %escape(path.as_bytes()), "in sync with {endpoint}")
                    }
                    Ok(Event::InSync { path, published: false }) => tracing::warn!(
                        path = %escape(path.as_bytes()),
                        "in sync with {endpoint}, which publishes nothing there"
                    ),
                    Ok(Event::Kept { path, reason }) => tracing::info!(
                        path = %escape(path.as_bytes()),
                        "kept a file of the inbox the relay did not write ({})",
                        match reason {
                            Kept::NotPublished => "upstream does not have it",
                            Kept::Differs => "upstream has another version",
                        }
                    ),
                    Ok(Event::Unreachable { why }) => {
                        tracing::warn!("upstream {endpoint}: {why}; still trying")
                    }
                    Ok(Event::Disconnected { why }) => {
                        tracing::warn!("upstream {endpoint}: {why}; reconnecting")
                    }
                    Ok(Event::Rejected { name, why }) => {
                        tracing::warn!("upstream sent {name}: refused ({why})")
                    }
                    Ok(Event::IntegrityFailed { path }) => tracing::warn!(
                        path = %escape(path.as_bytes()),
                        "upstream file failed verification; fetching again"
                    ),
                    Ok(Event::Refused { why }) | Ok(Event::Failed { why }) => {
                        tracing::error!("upstream {endpoint}: {why}; mirroring stopped");
                        return;
                    }
                    Ok(_) | Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
                }
            }
            subscriber.stop();
        })?;
        Ok(Upstream { stop, thread })
    }

    pub(crate) fn stop(self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = self.thread.join();
    }
}
