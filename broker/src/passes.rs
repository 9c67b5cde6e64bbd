//! How long the event loop's passes take: the longest one since the broker
//! started, and the slowest piece of work in it (a service handling one
//! frame, a timer, a work outcome), so that `zbroker status` can say what
//! stalled every peer, and for how long.

use std::time::{Duration, Instant};

/// The slowest call within a pass.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cause {
    /// "filemq ICANHAZ from connection 7 (64000000 bytes)", "timers", …
    pub what: String,
    pub took: Duration,
}

/// The longest pass seen.
#[derive(Debug, Clone, Default)]
pub struct Longest {
    pub took: Duration,
    /// When it ended, since the broker started.
    pub at: Duration,
    pub cause: Option<Cause>,
}

#[derive(Debug)]
pub struct Passes {
    started: Instant,
    /// The pass under way: when it began and its slowest call so far.
    current: Option<(Instant, Option<Cause>)>,
    longest: Longest,
    count: u64,
}

impl Passes {
    pub fn new(started: Instant) -> Passes {
        Passes { started, current: None, longest: Longest::default(), count: 0 }
    }

    /// A pass begins (ending any pass under way).
    pub fn begin(&mut self) {
        self.end();
        self.current = Some((Instant::now(), None));
    }

    /// A call within the pass took `took`; `what` is asked for only if it
    /// is the slowest so far (naming it costs a string).
    pub fn note(&mut self, took: Duration, what: impl FnOnce() -> String) {
        let Some((_, slowest)) = self.current.as_mut() else { return };
        if slowest.as_ref().is_none_or(|c| took > c.took) {
            *slowest = Some(Cause { what: what(), took });
        }
    }

    /// The pass under way ends.
    pub fn end(&mut self) {
        let Some((began, cause)) = self.current.take() else { return };
        let now = Instant::now();
        let took = now.duration_since(began);
        self.count += 1;
        if took > self.longest.took {
            self.longest = Longest { took, at: now.duration_since(self.started), cause };
        }
    }

    /// For `zbroker status`.
    pub fn status(&self) -> serde_json::Value {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        serde_json::json!({
            "passes": self.count,
            "longest_pass_ms": ms(self.longest.took),
            "longest_pass_at_ms": self.longest.at.as_millis() as u64,
            "longest_pass_cause": self.longest.cause.as_ref().map(|c| c.what.clone()),
            "longest_pass_cause_ms": self.longest.cause.as_ref().map(|c| ms(c.took)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_pass_and_its_slowest_call_are_kept() {
        let mut passes = Passes::new(Instant::now());
        passes.begin();
        passes.note(Duration::from_millis(1), || "quick".into());
        passes.begin();
        std::thread::sleep(Duration::from_millis(20));
        passes.note(Duration::from_millis(3), || "small".into());
        passes.note(Duration::from_millis(15), || "slow".into());
        passes.note(Duration::from_millis(2), || unreachable!("not the slowest: never named"));
        passes.begin();
        passes.end();
        let status = passes.status();
        assert_eq!(status["passes"], 3);
        assert!(status["longest_pass_ms"].as_f64().unwrap() >= 20.0, "{status}");
        assert_eq!(status["longest_pass_cause"], "slow");
        assert_eq!(status["longest_pass_cause_ms"], 15.0);
    }
}
