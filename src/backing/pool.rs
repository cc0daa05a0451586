//! A reactor's pool of aligned I/O buffers, in power-of-two size classes, under a memory
//! budget (`limits.buffer_memory_mib`).
//!
//! Buffers are allocated while the pool warms up and recycled afterwards, so a steady I/O load
//! allocates nothing. The budget bounds the bytes a reactor's tasks hold (`reserved`) and,
//! with the free lists (`cached`), the bytes it has allocated at all: a miss that would pass the
//! budget drops cached buffers of other sizes first. A command that finds no room either waits
//! in order (its connection queues it, see `Conn::grant_buffers`) or is answered TASK SET FULL;
//! once anyone waits, new commands queue behind them instead of overtaking.
//!
//! Accounting is by task: a task records the class size it was charged ([`BufPool::take`])
//! and gives exactly that back when it ends ([`BufPool::give_back`]), whether or not its buffer
//! came back with it (an offloaded job carries the buffer to a worker and back).

use crate::backing::{AlignedBuf, IO_ALIGN};

/// The largest buffer the pool hands out: the largest SCSI transfer we accept.
pub const MAX_BUF: usize = 16 << 20;
const CLASSES: usize = (MAX_BUF / IO_ALIGN).trailing_zeros() as usize + 1;
/// Free buffers kept per class; more are freed. Large classes keep fewer.
const KEEP_BYTES_PER_CLASS: usize = 64 << 20;
const KEEP_MIN: usize = 4;

/// What the pool reports to `stats` (per reactor).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    pub limit: u64,
    /// Bytes held by tasks now.
    pub reserved: u64,
    /// Bytes allocated and free for reuse.
    pub cached: u64,
    /// Commands waiting for buffer memory now.
    pub waiting: u64,
    /// Commands that had to wait, since start.
    pub waits: u64,
    /// Commands answered TASK SET FULL for lack of buffer memory, since start.
    pub refused: u64,
}

pub struct BufPool {
    free: [Vec<AlignedBuf>; CLASSES],
    limit: usize,
    reserved: usize,
    cached: usize,
    waiting: usize,
    waits: u64,
    refused: u64,
}

impl Default for BufPool {
    fn default() -> Self {
        Self::new(Self::DEFAULT_LIMIT)
    }
}

impl BufPool {
    /// The default budget: 256 MiB per reactor.
    pub const DEFAULT_LIMIT: usize = 256 << 20;

    /// A pool whose tasks may hold at most `limit` bytes (at least [`MAX_BUF`], so that any
    /// single command fits once the others have ended).
    pub fn new(limit: usize) -> Self {
        assert!(limit >= MAX_BUF, "a buffer budget of {limit} bytes cannot hold one {MAX_BUF}-byte command");
        Self {
            free: std::array::from_fn(|c| Vec::with_capacity(Self::keep(c))),
            limit,
            reserved: 0,
            cached: 0,
            waiting: 0,
            waits: 0,
            refused: 0,
        }
    }

    fn class_size(class: usize) -> usize {
        IO_ALIGN << class
    }

    fn keep(class: usize) -> usize {
        (KEEP_BYTES_PER_CLASS / Self::class_size(class)).clamp(KEEP_MIN, 1024)
    }

    /// The class whose buffers hold `len` bytes.
    fn class_of(len: usize) -> usize {
        let pages = len.max(1).div_ceil(IO_ALIGN);
        pages.next_power_of_two().trailing_zeros() as usize
    }

    /// Bytes a buffer for `len` bytes is charged (its size class).
    pub fn charge_for(len: usize) -> usize {
        Self::class_size(Self::class_of(len))
    }

    /// The most one connection may hold: a quarter of the budget (at least one largest
    /// command), so a session that holds buffers without moving data (writes whose Data-Out
    /// never comes, reads it does not read) cannot stall the others until its timeouts end.
    pub fn share(&self) -> usize {
        (self.limit / 4).max(MAX_BUF)
    }

    /// Whether a charge of `size` bytes ([`BufPool::charge_for`]) fits in what the budget has
    /// left.
    pub fn fits(&self, size: usize) -> bool {
        self.reserved + size <= self.limit
    }

    /// A buffer of at least `len` bytes (`len` ≤ [`MAX_BUF`]; contents unspecified), charged to
    /// the budget: its length is what the caller gives back. None when the budget has no room,
    /// or when others wait and `queued` is false (a new command does not overtake them).
    pub fn take(&mut self, len: usize, queued: bool) -> Option<AlignedBuf> {
        assert!(len <= MAX_BUF, "I/O buffer of {len} bytes exceeds the pool's maximum");
        let class = Self::class_of(len);
        let size = Self::class_size(class);
        if (!queued && self.waiting > 0) || !self.fits(size) {
            return None;
        }
        self.reserved += size;
        if let Some(buf) = self.free[class].pop() {
            self.cached -= size;
            return Some(buf);
        }
        // A miss: make room under the budget by dropping cached buffers, largest first.
        for c in (0..CLASSES).rev() {
            while self.reserved + self.cached > self.limit {
                let Some(b) = self.free[c].pop() else { break };
                self.cached -= b.len();
            }
        }
        Some(AlignedBuf::new(size))
    }

    /// Ends a charge of `charged` bytes (the length of the buffer [`BufPool::take`] returned),
    /// keeping `buf` for reuse when there is room.
    pub fn give_back(&mut self, buf: Option<AlignedBuf>, charged: usize) {
        debug_assert!(charged <= self.reserved, "gave back {charged} bytes, {} reserved", self.reserved);
        self.reserved -= charged;
        let Some(buf) = buf else { return };
        let class = Self::class_of(buf.len());
        if Self::class_size(class) == buf.len()
            && self.free[class].len() < Self::keep(class)
            && self.reserved + self.cached + buf.len() <= self.limit
        {
            self.cached += buf.len();
            self.free[class].push(buf);
        }
    }

    /// A command starts waiting for room.
    pub fn wait(&mut self) {
        self.waiting += 1;
        self.waits += 1;
    }

    /// A waiting command got its buffer or ended.
    pub fn unwait(&mut self) {
        debug_assert!(self.waiting > 0);
        self.waiting -= 1;
    }

    /// Commands waiting for room.
    pub fn waiting(&self) -> usize {
        self.waiting
    }

    /// A command was answered TASK SET FULL for lack of room.
    pub fn refused(&mut self) {
        self.refused += 1;
    }

    pub fn stats(&self) -> PoolStats {
        PoolStats {
            limit: self.limit as u64,
            reserved: self.reserved as u64,
            cached: self.cached as u64,
            waiting: self.waiting as u64,
            waits: self.waits,
            refused: self.refused,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_round_up_and_recycle() {
        let mut p = BufPool::default();
        let b = p.take(5000, false).unwrap();
        assert_eq!(b.len(), 8192);
        let addr = b.as_ptr();
        p.give_back(Some(b), 8192);
        let again = p.take(8192, false).unwrap();
        assert_eq!(again.as_ptr(), addr, "a freed buffer is reused");
        assert_eq!(p.take(1, false).unwrap().len(), IO_ALIGN);
        assert_eq!(p.take(MAX_BUF, false).unwrap().len(), MAX_BUF);
    }

    #[test]
    fn budget_refuses_past_the_limit_and_room_comes_back() {
        let mut p = BufPool::new(MAX_BUF);
        let a = p.take(MAX_BUF / 2, false).unwrap();
        let b = p.take(MAX_BUF / 4, false).unwrap();
        assert!(p.take(MAX_BUF / 2, false).is_none(), "12 MiB held: 8 MiB more does not fit in 16");
        assert!(p.take(MAX_BUF / 4, false).is_some_and(|c| c.len() == MAX_BUF / 4), "4 MiB more fits exactly");
        // The 4 MiB just taken was dropped without giving back: its charge is still held.
        assert!(p.take(IO_ALIGN, false).is_none());
        p.give_back(None, MAX_BUF / 4);
        p.give_back(Some(a), MAX_BUF / 2);
        p.give_back(Some(b), MAX_BUF / 4);
        assert_eq!(p.stats().reserved, 0);
        assert!(p.take(MAX_BUF, false).is_some(), "everything given back: a whole-budget buffer fits");
    }

    #[test]
    fn a_connections_share_is_a_quarter_of_the_budget_and_never_below_one_command() {
        assert_eq!(BufPool::new(256 << 20).share(), 64 << 20);
        assert_eq!(BufPool::new(MAX_BUF).share(), MAX_BUF);
        assert_eq!(BufPool::charge_for(5000), 8192);
    }

    #[test]
    fn waiters_are_not_overtaken() {
        let mut p = BufPool::new(MAX_BUF);
        p.wait();
        assert!(p.take(IO_ALIGN, false).is_none(), "a new command queues behind a waiting one");
        let b = p.take(IO_ALIGN, true).expect("the queue's head takes what fits");
        p.unwait();
        assert!(p.take(IO_ALIGN, false).is_some(), "no one waits: new commands take again");
        p.give_back(Some(b), IO_ALIGN);
        let s = p.stats();
        assert_eq!((s.waits, s.waiting), (1, 0));
    }

    #[test]
    fn allocation_stays_under_the_budget_by_dropping_cached_buffers() {
        let mut p = BufPool::new(MAX_BUF);
        // Fill the cache with 1 MiB buffers (the whole budget), then ask for an 8 MiB one.
        let small: Vec<_> = (0..16).map(|_| p.take(1 << 20, false).unwrap()).collect();
        for b in small {
            p.give_back(Some(b), 1 << 20);
        }
        let s = p.stats();
        assert_eq!((s.reserved, s.cached), (0, 16 << 20));
        let big = p.take(8 << 20, false).unwrap();
        let s = p.stats();
        assert_eq!(s.reserved, 8 << 20);
        assert!(s.reserved + s.cached <= MAX_BUF as u64, "allocated {} + cached {}", s.reserved, s.cached);
        p.give_back(Some(big), 8 << 20);
        assert!(p.stats().cached <= MAX_BUF as u64);
    }
}
