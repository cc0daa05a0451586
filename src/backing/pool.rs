//! A reactor's pool of aligned I/O buffers, in power-of-two size classes.
//!
//! Buffers are allocated while the pool warms up and recycled afterwards, so a steady I/O load
//! allocates nothing. Each class keeps a bounded number of free buffers.

use crate::backing::{AlignedBuf, IO_ALIGN};

/// The largest buffer the pool hands out: the largest SCSI transfer we accept.
pub const MAX_BUF: usize = 16 << 20;
const CLASSES: usize = (MAX_BUF / IO_ALIGN).trailing_zeros() as usize + 1;
/// Free buffers kept per class; more are freed. Large classes keep fewer.
const KEEP_BYTES_PER_CLASS: usize = 64 << 20;
const KEEP_MIN: usize = 4;

pub struct BufPool {
    free: [Vec<AlignedBuf>; CLASSES],
}

impl Default for BufPool {
    fn default() -> Self {
        Self::new()
    }
}

impl BufPool {
    pub fn new() -> Self {
        Self { free: std::array::from_fn(|c| Vec::with_capacity(Self::keep(c))) }
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

    /// A buffer of at least `len` bytes (`len` ≤ [`MAX_BUF`]). Contents are unspecified.
    pub fn get(&mut self, len: usize) -> AlignedBuf {
        assert!(len <= MAX_BUF, "I/O buffer of {len} bytes exceeds the pool's maximum");
        let class = Self::class_of(len);
        self.free[class].pop().unwrap_or_else(|| AlignedBuf::new(Self::class_size(class)))
    }

    /// Returns a buffer obtained from [`BufPool::get`].
    pub fn put(&mut self, buf: AlignedBuf) {
        let class = Self::class_of(buf.len());
        debug_assert_eq!(Self::class_size(class), buf.len());
        if self.free[class].len() < Self::keep(class) {
            self.free[class].push(buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_round_up_and_recycle() {
        let mut p = BufPool::new();
        let b = p.get(5000);
        assert_eq!(b.len(), 8192);
        let addr = b.as_ptr();
        p.put(b);
        let again = p.get(8192);
        assert_eq!(again.as_ptr(), addr, "a freed buffer is reused");
        assert_eq!(p.get(1).len(), IO_ALIGN);
        assert_eq!(p.get(MAX_BUF).len(), MAX_BUF);
    }
}
