//! The broker-wide memory budget (`--memory-limit`): one count of the bytes
//! peers make the broker hold — pipe queues and mailboxes (ZPIPES), chunk
//! reads in flight (FILEMQ), and replies from the moment they are made
//! until libzmq frees them (the reactor).
//!
//! The host makes one [`Budget`] and lends clones to the services at
//! construction; services stay sans-IO (a budget is only a counter) and run
//! under `sim` with their own. The count is atomic because libzmq frees a
//! sent reply on its own I/O thread.
//!
//! The rule, [`Budget::admits`]: a holder (a pipe, a subscriber) may grow by
//! `n` while what it would then hold is no more than what the budget has
//! left. So the connections holding the most are the first to wait, a
//! newcomer holding nothing gets room while there is any, and the total
//! never passes the limit through this door.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering, Ordering::Relaxed};
use std::sync::Arc;

/// A shared count of held bytes against a limit. Clones share the count.
#[derive(Clone)]
pub struct Budget(Arc<Inner>);

struct Inner {
    limit: usize,
    used: AtomicUsize,
    peak: AtomicUsize,
    /// Something was given back since the host last looked: waiters may
    /// move.
    freed: AtomicBool,
    /// Requests waiting for room (for status, logs and the host's poll).
    waiting: AtomicUsize,
}

impl std::fmt::Debug for Budget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Budget").field("limit", &self.limit()).field("used", &self.used()).finish()
    }
}

impl Default for Budget {
    fn default() -> Self {
        Budget::unlimited()
    }
}

impl Budget {
    pub fn new(limit: usize) -> Self {
        Budget(Arc::new(Inner {
            limit,
            used: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            freed: AtomicBool::new(false),
            waiting: AtomicUsize::new(0),
        }))
    }

    /// No limit (tests and tools that do not care).
    pub fn unlimited() -> Self {
        Budget::new(usize::MAX)
    }

    pub fn limit(&self) -> usize {
        self.0.limit
    }

    /// Bytes held now.
    pub fn used(&self) -> usize {
        self.0.used.load(Relaxed)
    }

    /// The most bytes ever held at once.
    pub fn peak(&self) -> usize {
        self.0.peak.load(Relaxed)
    }

    /// Bytes left before the limit.
    pub fn free(&self) -> usize {
        self.0.limit.saturating_sub(self.used())
    }

    /// Whether a holder of `held` bytes may take `n` more now (the rule
    /// above; always true for `n == 0`).
    pub fn admits(&self, held: usize, n: usize) -> bool {
        n == 0 || held.saturating_add(n) <= self.free()
    }

    /// Counts `n` more bytes held.
    pub fn take(&self, n: usize) {
        if n == 0 {
            return;
        }
        let used = self.0.used.fetch_add(n, Relaxed) + n;
        self.0.peak.fetch_max(used, Relaxed);
    }

    /// Counts `n` bytes let go.
    pub fn give(&self, n: usize) {
        if n == 0 {
            return;
        }
        let before = self.0.used.fetch_sub(n, Relaxed);
        debug_assert!(before >= n, "budget gave back {n} bytes it did not hold ({before})");
        // Release/Acquire: whoever sees the flag sees the bytes given back
        // (a libzmq thread frees replies; the loop reads the flag).
        self.0.freed.store(true, Ordering::Release);
    }

    /// Whether anything was given back since the last call.
    pub fn take_freed(&self) -> bool {
        self.0.freed.swap(false, Ordering::AcqRel)
    }

    /// One more (`true`) or one fewer request waiting for room.
    pub fn set_waiting(&self, more: bool) {
        if more {
            self.0.waiting.fetch_add(1, Relaxed);
        } else {
            self.0.waiting.fetch_sub(1, Relaxed);
        }
    }

    /// Requests waiting for room now.
    pub fn waiting(&self) -> usize {
        self.0.waiting.load(Relaxed)
    }

    /// "At its budget": full, or something waits for room.
    pub fn at_limit(&self) -> bool {
        self.used() >= self.0.limit || self.waiting() > 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_largest_holders_wait_first() {
        let budget = Budget::new(100);
        budget.take(60);
        // 40 left: a holder of 30 may add 10, not 11; a newcomer may add 40.
        assert!(budget.admits(30, 10));
        assert!(!budget.admits(30, 11));
        assert!(budget.admits(0, 40));
        assert!(!budget.admits(0, 41));
        assert!(budget.admits(1000, 0));
        assert!(!budget.take_freed());
        budget.give(60);
        assert!(budget.take_freed() && !budget.take_freed());
        assert_eq!((budget.used(), budget.peak()), (0, 60));
    }

    #[test]
    fn equal_holders_leave_room_for_a_newcomer() {
        // Holders that each grow while the rule lets them stop short of
        // the limit: at most limit * k / (k + 1) with k of them.
        let budget = Budget::new(1000);
        let mut held = [0usize; 4];
        loop {
            let mut moved = false;
            for h in &mut held {
                if budget.admits(*h, 1) {
                    budget.take(1);
                    *h += 1;
                    moved = true;
                }
            }
            if !moved {
                break;
            }
        }
        assert!(budget.used() <= 800, "{}", budget.used());
        assert!(budget.admits(0, 150));
        assert!(!budget.at_limit());
        budget.set_waiting(true);
        assert!(budget.at_limit());
        budget.set_waiting(false);
    }
}
