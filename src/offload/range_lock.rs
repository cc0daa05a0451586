//! A per-LUN lock on LBA ranges that never blocks a thread: a request for a range that
//! overlaps a held one is queued with the work that wants it, and handed back to whoever
//! releases the conflicting range, to be resumed there.

use std::collections::VecDeque;
use std::sync::Mutex;

/// A half-open range of logical blocks `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LbaRange {
    pub start: u64,
    pub end: u64,
}

impl LbaRange {
    pub fn new(start: u64, blocks: u64) -> Self {
        Self { start, end: start.saturating_add(blocks) }
    }

    fn overlaps(&self, other: &LbaRange) -> bool {
        self.start < self.end && other.start < other.end && self.start < other.end && other.start < self.end
    }
}

struct State<W> {
    held: Vec<LbaRange>,
    waiting: VecDeque<(LbaRange, W)>,
}

/// Exclusive locks on LBA ranges. The mutex inside guards only this bookkeeping and is held
/// for a few comparisons, never across I/O; a conflicting request does not wait on it, it is
/// parked in `waiting` and granted by [`RangeLock::release`].
pub struct RangeLock<W> {
    state: Mutex<State<W>>,
}

impl<W> Default for RangeLock<W> {
    fn default() -> Self {
        Self { state: Mutex::new(State { held: Vec::new(), waiting: VecDeque::new() }) }
    }
}

impl<W> RangeLock<W> {
    /// Takes `range` for `waiter` when nothing held or queued overlaps it: returns the waiter
    /// back to run now. Otherwise queues it (FIFO among overlapping requests) and returns
    /// `None`; a later [`RangeLock::release`] hands it out.
    pub fn acquire(&self, range: LbaRange, waiter: W) -> Option<W> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        // Queued requests count as conflicts too, so a stream of newcomers cannot starve them.
        let busy = s.held.iter().any(|h| h.overlaps(&range)) || s.waiting.iter().any(|(w, _)| w.overlaps(&range));
        if busy {
            s.waiting.push_back((range, waiter));
            return None;
        }
        s.held.push(range);
        Some(waiter)
    }

    /// Releases `range` (which must be held) and returns the queued requests that can run
    /// now, their ranges already taken for them, in arrival order.
    pub fn release(&self, range: LbaRange) -> Vec<W> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let i = s.held.iter().position(|h| *h == range).expect("released a range that is not held");
        s.held.swap_remove(i);
        let mut granted = Vec::new();
        let mut still: VecDeque<(LbaRange, W)> = VecDeque::with_capacity(s.waiting.len());
        while let Some((r, w)) = s.waiting.pop_front() {
            // Behind an earlier waiter it overlaps, it keeps waiting (FIFO per overlap).
            if s.held.iter().any(|h| h.overlaps(&r)) || still.iter().any(|(o, _)| o.overlaps(&r)) {
                still.push_back((r, w));
            } else {
                s.held.push(r);
                granted.push(w);
            }
        }
        s.waiting = still;
        granted
    }

    /// Ranges held and requests queued, for tests and statistics.
    pub fn counts(&self) -> (usize, usize) {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        (s.held.len(), s.waiting.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(start: u64, blocks: u64) -> LbaRange {
        LbaRange::new(start, blocks)
    }

    #[test]
    fn disjoint_ranges_are_granted_at_once() {
        let l = RangeLock::default();
        assert_eq!(l.acquire(r(0, 8), 1), Some(1));
        assert_eq!(l.acquire(r(8, 8), 2), Some(2));
        assert_eq!(l.counts(), (2, 0));
    }

    #[test]
    fn overlapping_range_waits_and_is_resumed_on_release() {
        let l = RangeLock::default();
        assert_eq!(l.acquire(r(0, 8), 1), Some(1));
        assert_eq!(l.acquire(r(7, 2), 2), None, "overlaps block 7");
        assert_eq!(l.acquire(r(100, 1), 3), Some(3), "unrelated range still runs");
        assert_eq!(l.counts(), (2, 1));
        assert_eq!(l.release(r(0, 8)), vec![2]);
        assert_eq!(l.counts(), (2, 0), "the resumed request holds its range");
        assert_eq!(l.release(r(7, 2)), Vec::<i32>::new());
        assert_eq!(l.release(r(100, 1)), Vec::<i32>::new());
        assert_eq!(l.counts(), (0, 0));
    }

    #[test]
    fn waiters_keep_their_order_and_newcomers_do_not_overtake() {
        let l = RangeLock::default();
        assert_eq!(l.acquire(r(0, 10), 1), Some(1));
        assert_eq!(l.acquire(r(5, 10), 2), None);
        // Does not overlap the held range, but overlaps the queued one: it queues behind it.
        assert_eq!(l.acquire(r(12, 2), 3), None);
        assert_eq!(l.acquire(r(50, 2), 4), Some(4));
        assert_eq!(l.release(r(0, 10)), vec![2], "3 still conflicts with 2");
        assert_eq!(l.release(r(5, 10)), vec![3]);
        assert_eq!(l.release(r(12, 2)), Vec::<i32>::new());
    }

    #[test]
    fn one_release_can_resume_several() {
        let l = RangeLock::default();
        assert_eq!(l.acquire(r(0, 100), 0), Some(0));
        assert_eq!(l.acquire(r(0, 10), 1), None);
        assert_eq!(l.acquire(r(20, 10), 2), None);
        assert_eq!(l.acquire(r(5, 20), 3), None);
        assert_eq!(l.release(r(0, 100)), vec![1, 2]);
        assert_eq!(l.release(r(0, 10)), Vec::<i32>::new(), "3 still overlaps 2");
        assert_eq!(l.release(r(20, 10)), vec![3]);
    }

    #[test]
    fn empty_ranges_never_conflict() {
        let l = RangeLock::default();
        assert_eq!(l.acquire(r(5, 0), 1), Some(1));
        assert_eq!(l.acquire(r(0, 10), 2), Some(2));
    }
}
