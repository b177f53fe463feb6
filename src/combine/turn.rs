//! A key's turn on its hot row inside one process: one batch at a time, handed from batch to
//! batch without a NOWAIT refusal between them.
//!
//! The state is one atomic word (`generation << 1 | busy`): a holder's ticket is the generation
//! it took the turn in, and only that ticket gives it back. A leader waiting for the turn
//! sleeps on a condition variable.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, PoisonError};

use crate::txn::Deadline;

const BUSY: u64 = 1;
const GENERATION: u64 = 2;

/// One key's turn (see the module docs).
#[derive(Debug, Default)]
pub(crate) struct Turn {
    state: AtomicU64,
    /// Batches that handed the turn on at COMMIT and whose COMMIT has not answered yet.
    committing: AtomicUsize,
    sleep: Mutex<()>,
    changed: Condvar,
}

impl Turn {
    /// Whether a batch holds the turn.
    pub(crate) fn is_busy(&self) -> bool {
        self.state.load(Ordering::Acquire) & BUSY != 0
    }

    /// Takes the turn once it is free and returns its ticket; `None` once `deadline` has
    /// passed first. Only a key's leader calls this, so it never competes with another taker.
    pub(crate) fn acquire(&self, deadline: Deadline) -> Option<u64> {
        loop {
            let state = self.state.load(Ordering::Acquire);
            if state & BUSY == 0 {
                let taken = state + GENERATION + BUSY;
                if self
                    .state
                    .compare_exchange(state, taken, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    return Some(taken >> 1);
                }
                continue;
            }
            if deadline.is_expired() {
                return None;
            }
            // Sleep until the state changes (checked under the mutex, so a release made
            // before the wait is never missed).
            let guard = self.sleep.lock().unwrap_or_else(PoisonError::into_inner);
            if self.state.load(Ordering::Acquire) == state {
                let _ = self
                    .changed
                    .wait_timeout(guard, deadline.remaining())
                    .unwrap_or_else(|e| e.into_inner());
            }
        }
    }

    /// Whether a batch that handed the turn on at COMMIT is still waiting for its answer.
    pub(crate) fn is_committing(&self) -> bool {
        self.committing.load(Ordering::Acquire) > 0
    }

    /// Hands the turn of `ticket` on as its batch sends COMMIT: counted as committing (until
    /// [`committed`](Self::committed)), then released. `false` (nothing done) if `ticket` does
    /// not hold the turn.
    pub(crate) fn pass_at_commit(&self, ticket: u64) -> bool {
        if self.state.load(Ordering::Acquire) != (ticket << 1) | BUSY {
            return false;
        }
        self.committing.fetch_add(1, Ordering::AcqRel);
        self.release(ticket);
        true
    }

    /// The COMMIT of a batch that [`pass_at_commit`](Self::pass_at_commit) answered (or failed).
    pub(crate) fn committed(&self) {
        let _ = self
            .committing
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }

    /// Gives the turn of `ticket` back; nothing if it is not held by that ticket.
    pub(crate) fn release(&self, ticket: u64) {
        let held = (ticket << 1) | BUSY;
        if self
            .state
            .compare_exchange(held, ticket << 1, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            drop(self.sleep.lock().unwrap_or_else(PoisonError::into_inner));
            self.changed.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    fn far() -> Deadline {
        Deadline::after(Duration::from_secs(5))
    }

    #[test]
    fn a_ticket_releases_only_its_own_turn() {
        let turn = Turn::default();
        let first = turn.acquire(far());
        assert!(first.is_some());
        let first = first.unwrap_or_default();
        turn.release(first);
        let second = turn.acquire(far());
        assert!(second.is_some_and(|second| second != first));
        // A second release of the first ticket leaves the second batch's turn alone.
        turn.release(first);
        assert!(turn.is_busy());
        assert!(turn
            .acquire(Deadline::after(Duration::from_millis(30)))
            .is_none());
        turn.release(second.unwrap_or_default());
        assert!(!turn.is_busy());
    }

    #[test]
    fn a_waiting_leader_gets_the_turn_when_it_is_released() {
        let turn = Arc::new(Turn::default());
        let held = turn.acquire(far()).unwrap_or_default();
        let waiter = {
            let turn = turn.clone();
            std::thread::spawn(move || turn.acquire(far()))
        };
        std::thread::sleep(Duration::from_millis(20));
        assert!(turn.is_busy());
        turn.release(held);
        let next = waiter.join().ok().flatten();
        assert_eq!(next, Some(held + 1));
    }
}
