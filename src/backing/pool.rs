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
//!
//! The pool also decides which of its buffers the reactor registers with its ring as io_uring
//! fixed buffers ([`FixedBufs`]): it sees every buffer made and dropped.

use crate::backing::{AlignedBuf, IO_ALIGN};
use std::collections::HashMap;

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
    /// Bytes of buffers registered with the ring as io_uring fixed buffers.
    pub fixed: u64,
}

pub struct BufPool {
    free: [Vec<AlignedBuf>; CLASSES],
    fixed: FixedBufs,
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
            fixed: FixedBufs::default(),
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
                self.fixed.dropped(b.as_ptr() as usize);
            }
        }
        let buf = AlignedBuf::new(size);
        self.fixed.made(buf.as_ptr() as usize, buf.len());
        Some(buf)
    }

    /// Ends a charge of `charged` bytes (the length of the buffer [`BufPool::take`] returned),
    /// keeping `buf` for reuse when there is room. `buf` must be one this pool made: fixed-buffer
    /// slots are found by address ([`BufPool::fixed_index`]), and a foreign buffer kept here
    /// could inherit the slot of a lost one at the same address.
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
        } else {
            self.fixed.dropped(buf.as_ptr() as usize);
        }
    }

    /// The reactor registered a sparse table of [`FIXED_SLOTS`] buffers with its ring: from now
    /// on new buffers get registered (see [`FixedBufs`]).
    pub fn enable_fixed(&mut self) {
        self.fixed.enabled = true;
    }

    /// The fixed-buffer index of the buffer at `ptr` (a task buffer's start), if registered.
    pub fn fixed_index(&self, ptr: *const u8) -> Option<u16> {
        self.fixed.by_addr.get(&(ptr as usize)).copied()
    }

    /// Registrations to apply to the ring, in order, before the next I/O is submitted (none
    /// once the pool has warmed up: taking the empty list allocates nothing).
    pub fn fixed_updates(&mut self) -> Vec<FixedUpdate> {
        std::mem::take(&mut self.fixed.updates)
    }

    /// The ring refused a registration (RLIMIT_MEMLOCK, say): that buffer stays unregistered
    /// and no more are tried.
    pub fn fixed_failed(&mut self, update: &FixedUpdate) {
        self.fixed.enabled = false;
        if update.len > 0 && self.fixed.by_addr.get(&update.addr) == Some(&update.slot) {
            self.fixed.by_addr.remove(&update.addr);
            self.fixed.release(update.slot);
        }
    }

    /// Bytes in registered buffers now.
    pub fn fixed_bytes(&self) -> usize {
        self.fixed.bytes
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
            fixed: self.fixed.bytes as u64,
        }
    }
}

/// Fixed buffers a reactor's ring holds at most (a sparse table of this many slots).
pub const FIXED_SLOTS: u32 = 1024;
/// Bytes a reactor keeps registered at most: pinned memory counts against RLIMIT_MEMLOCK
/// (8 MiB for an unprivileged user on Debian) unless the process may lock memory.
const FIXED_BYTES: usize = 8 << 20;
/// Larger buffers are not registered: pinning their pages per I/O is a small part of moving
/// them, and a few of them would use up [`FIXED_BYTES`].
const FIXED_MAX_BUF: usize = 256 << 10;

/// One change to the ring's fixed-buffer table: register `len` bytes at `addr` in `slot`, or
/// clear the slot when `len` is 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FixedUpdate {
    pub slot: u16,
    pub addr: usize,
    pub len: usize,
}

/// Which pool buffers are io_uring fixed buffers. An O_DIRECT read or write into a fixed buffer
/// skips pinning its pages on every I/O (`READ_FIXED` / `WRITE_FIXED`).
///
/// Safety rests on one rule: a slot is looked up by the exact address of a buffer the pool made,
/// and every buffer the pool makes is (re)registered before it is used. A buffer that leaves
/// the pool for good (dropped by an offload job that never ran) keeps its slot, pinning its old
/// pages, until the pool makes a buffer at that address again: that one re-registers the slot,
/// so an I/O through the slot always reaches the live buffer's pages.
#[derive(Default)]
struct FixedBufs {
    enabled: bool,
    by_addr: HashMap<usize, u16>,
    /// Registered length per slot (0: free).
    lens: Vec<usize>,
    free: Vec<u16>,
    bytes: usize,
    updates: Vec<FixedUpdate>,
}

impl FixedBufs {
    /// The pool made a buffer of `len` bytes at `addr`.
    fn made(&mut self, addr: usize, len: usize) {
        if !self.enabled || len > FIXED_MAX_BUF {
            return;
        }
        let slot = match self.by_addr.get(&addr) {
            // An earlier buffer at this address left the pool without coming back.
            Some(&slot) => {
                self.bytes -= self.lens[usize::from(slot)];
                slot
            }
            None => {
                if self.bytes + len > FIXED_BYTES {
                    return;
                }
                let Some(slot) = self.free.pop().or_else(|| {
                    (self.lens.len() < FIXED_SLOTS as usize).then(|| {
                        self.lens.push(0);
                        (self.lens.len() - 1) as u16
                    })
                }) else {
                    return;
                };
                self.by_addr.insert(addr, slot);
                slot
            }
        };
        self.lens[usize::from(slot)] = len;
        self.bytes += len;
        self.updates.push(FixedUpdate { slot, addr, len });
    }

    /// The pool dropped its buffer at `addr`.
    fn dropped(&mut self, addr: usize) {
        if let Some(slot) = self.by_addr.remove(&addr) {
            self.updates.push(FixedUpdate { slot, addr: 0, len: 0 });
            self.release(slot);
        }
    }

    fn release(&mut self, slot: u16) {
        self.bytes -= std::mem::take(&mut self.lens[usize::from(slot)]);
        self.free.push(slot);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_buffers_are_registered_once_and_cleared_when_dropped() {
        let mut p = BufPool::new(MAX_BUF);
        p.enable_fixed();
        let a = p.take(4096, false).unwrap();
        let big = p.take(FIXED_MAX_BUF * 2, false).unwrap();
        let ups = p.fixed_updates();
        assert_eq!(ups.len(), 1, "only the small buffer is registered: {ups:?}");
        assert_eq!((ups[0].addr, ups[0].len), (a.as_ptr() as usize, 4096));
        let slot = p.fixed_index(a.as_ptr()).unwrap();
        assert_eq!(p.fixed_index(big.as_ptr()), None);
        // Recycled: still registered, nothing to do.
        let addr = a.as_ptr();
        p.give_back(Some(a), 4096);
        let a = p.take(4096, false).unwrap();
        assert_eq!((a.as_ptr(), p.fixed_index(addr)), (addr, Some(slot)));
        assert!(p.fixed_updates().is_empty());
        // Dropped by the pool (a buffer of an odd size is never kept): the slot is cleared.
        p.give_back(Some(AlignedBuf::new(3 * 4096)), 0);
        assert!(p.fixed_updates().is_empty(), "not a pool buffer: nothing registered, nothing cleared");
        p.give_back(Some(big), FIXED_MAX_BUF * 2);
        let limit = p.stats().limit as usize;
        // Fill the cache past the limit so the next miss evicts our 4 KiB buffer.
        p.give_back(Some(a), 4096);
        let _huge = p.take(limit - 4096, false).unwrap();
        let ups = p.fixed_updates();
        assert!(ups.contains(&FixedUpdate { slot, addr: 0, len: 0 }), "an evicted buffer's slot is cleared: {ups:?}");
        assert_eq!(p.fixed_index(addr), None);
        assert_eq!(p.fixed_bytes(), 0);
    }

    #[test]
    fn a_buffer_made_where_a_lost_one_was_registers_its_own_pages() {
        let mut f = FixedBufs { enabled: true, ..FixedBufs::default() };
        let addr = 0x7f00_0000_0000;
        f.made(addr, 8192);
        let slot = f.by_addr[&addr];
        f.updates.clear();
        // That buffer left the pool for good (an offload job that never ran dropped it) and the
        // allocator hands its address to the next buffer, of another size: the slot must now
        // hold the new buffer's pages.
        f.made(addr, 16384);
        assert_eq!(f.by_addr[&addr], slot, "same slot");
        assert_eq!(f.updates, [FixedUpdate { slot, addr, len: 16384 }], "re-registered");
        assert_eq!(f.bytes, 16384, "the lost buffer's bytes are not counted twice");
        f.dropped(addr);
        assert_eq!(f.updates.last(), Some(&FixedUpdate { slot, addr: 0, len: 0 }));
        assert_eq!((f.bytes, f.free.as_slice()), (0, &[slot][..]));
    }

    #[test]
    fn fixed_registration_stops_at_its_byte_cap_and_after_a_refusal() {
        let mut p = BufPool::new(64 << 20);
        p.enable_fixed();
        let bufs: Vec<_> = (0..40).map(|_| p.take(FIXED_MAX_BUF, false).unwrap()).collect();
        assert_eq!(p.fixed_bytes(), FIXED_BYTES, "at most {FIXED_BYTES} bytes");
        assert_eq!(bufs.iter().filter(|b| p.fixed_index(b.as_ptr()).is_some()).count(), FIXED_BYTES / FIXED_MAX_BUF);
        let mut q = BufPool::default();
        q.enable_fixed();
        let b = q.take(4096, false).unwrap();
        let ups = q.fixed_updates();
        q.fixed_failed(&ups[0]);
        assert_eq!((q.fixed_index(b.as_ptr()), q.fixed_bytes()), (None, 0));
        let c = q.take(4096, false).unwrap();
        assert_eq!(q.fixed_index(c.as_ptr()), None, "no more registrations after a refusal");
        assert!(q.fixed_updates().is_empty());
    }

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
