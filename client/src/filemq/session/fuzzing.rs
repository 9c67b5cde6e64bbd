//! Drives one session's protocol handling with frames chosen by a fuzzer,
//! as if a server sent them, into `inbox`: no socket, no clock but the
//! real one, every effect on disk real.

use super::*;

struct Nowhere;
impl Wire for Nowhere {
    fn send(&mut self, _: &FilemqMsg, _: Duration) -> Result<(), WireError> {
        Ok(())
    }
}

/// Greets, subscribes to `paths` with credit `window`, then hands each
/// frame to the session until it ends (as a real one would); then the
/// session is left as on a disconnect. Returns the events it emitted.
pub fn session(inbox: &std::path::Path, paths: &[&str], window: u64, frames: &[Vec<u8>]) -> Vec<Event> {
    let context = crate::link::context().clone();
    let paths: Vec<String> = paths.iter().map(|p| p.to_string()).collect();
    let mut opts = Options::endpoint("inproc://nowhere", paths.clone(), inbox.to_path_buf());
    opts.window = window.max(1);
    let Ok(layout) = Layout::new(&paths) else { return Vec::new() };
    let inbox = Inbox::open(inbox).expect("a usable inbox");
    let (tx, rx) = std::sync::mpsc::sync_channel(4096);
    let control = context.socket(zmq::PAIR).expect("a socket");
    let mut shared = Shared::new(opts, layout, Default::default(), Disk::Inbox(inbox), tx, control, context);
    let subscriptions = shared.layout.subscriptions().len();
    let mut events = Vec::new();
    let mut session = Session::new(&mut shared, Nowhere);
    let mut result = session.on_message(FilemqMsg::OhaiOk {});
    for _ in 0..subscriptions {
        result = result.and_then(|_| session.on_message(FilemqMsg::IcanhazOk {}));
    }
    events.extend(rx.try_iter());
    if result.is_ok() {
        for frame in frames {
            let handled = session.on_frame(Bytes::copy_from_slice(frame));
            events.extend(rx.try_iter());
            if handled.is_err() {
                break;
            }
        }
    }
    session.leave();
    events
}
