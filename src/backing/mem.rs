//! RAM-backed stores for ephemeral CI disks and for measuring protocol cost alone.

use super::BackingError;
use std::io;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};

/// An anonymous, lazily-populated mapping shared by every reactor.
///
/// Several reactors (and offload workers) may copy into or out of overlapping ranges at once
/// when initiators issue overlapping I/O; SCSI leaves the resulting bytes undefined, but Rust
/// must not see a data race. So, as `vm-memory` does for guest memory, the mapping is never
/// borrowed as a Rust slice: every access is a copy made of relaxed atomic loads and stores
/// (8 bytes at a time where aligned), which may interleave but are never undefined behaviour.
/// The kernel reading the mapping for a zero-copy send (see [`MemStore::ptr_at`]) is outside
/// the Rust memory model; a write racing with it can only make the initiator see a mix of old
/// and new data, which is what overlapping SCSI commands allow, and the transport copies
/// instead when a data digest must match the bytes sent.
pub struct MemStore {
    ptr: NonNull<u8>,
    size: u64,
}

// SAFETY: the mapping lives as long as the store; every access from any thread is a
// bounds-checked atomic copy (see the type's doc), so sharing it between threads cannot race.
unsafe impl Send for MemStore {}
// SAFETY: as above: `&MemStore` only offers atomic copies in and out of the mapping.
unsafe impl Sync for MemStore {}

/// Words moved per step of the copy loops: 64 bytes, one cache line. The loads (or stores) on
/// private memory of one step are plain and may be merged by the compiler; the atomic side is
/// eight independent relaxed accesses, which on x86-64 and aarch64 are ordinary moves.
const STEP: usize = 8;

/// Copies `len` bytes from `src` (store memory, read with relaxed atomic loads) to `dst`
/// (private memory). Byte accesses up to 8-byte alignment of `src` and for the tail; whole
/// words in between.
///
/// # Safety
/// `src..src+len` lies in the mapping; `dst..dst+len` is valid for writes and not shared.
#[inline]
unsafe fn copy_out(src: *const u8, dst: *mut u8, len: usize) {
    let head = src.align_offset(8).min(len);
    for i in 0..head {
        // SAFETY: i < len, so in bounds; AtomicU8 has u8's size and alignment.
        unsafe { *dst.add(i) = AtomicU8::from_ptr(src.add(i).cast_mut()).load(Ordering::Relaxed) };
    }
    let words = (len - head) / 8;
    // SAFETY: head <= len; src + head is 8-aligned (or head == len and no word is read).
    let (ws, wd) = unsafe { (src.add(head).cast::<AtomicU64>(), dst.add(head).cast::<u64>()) };
    let mut k = 0;
    while k + STEP <= words {
        let mut line = [0u64; STEP];
        for (j, w) in line.iter_mut().enumerate() {
            // SAFETY: k + j < words: an aligned word inside the mapping.
            *w = unsafe { (*ws.add(k + j)).load(Ordering::Relaxed) };
        }
        // SAFETY: the same 64 bytes of dst, valid for writes; dst may be unaligned.
        unsafe { wd.add(k).cast::<[u64; STEP]>().write_unaligned(line) };
        k += STEP;
    }
    while k < words {
        // SAFETY: k < words, as above.
        unsafe { wd.add(k).write_unaligned((*ws.add(k)).load(Ordering::Relaxed)) };
        k += 1;
    }
    for i in head + words * 8..len {
        // SAFETY: i < len, as in the head loop.
        unsafe { *dst.add(i) = AtomicU8::from_ptr(src.add(i).cast_mut()).load(Ordering::Relaxed) };
    }
}

/// Copies `len` bytes from `src` (private memory) into `dst` (store memory, written with
/// relaxed atomic stores), laid out as [`copy_out`].
///
/// # Safety
/// `dst..dst+len` lies in the mapping; `src..src+len` is valid for reads.
#[inline]
unsafe fn copy_in(src: *const u8, dst: *mut u8, len: usize) {
    let head = dst.align_offset(8).min(len);
    for i in 0..head {
        // SAFETY: i < len: dst + i lies in the mapping, src + i is readable.
        unsafe { AtomicU8::from_ptr(dst.add(i)).store(*src.add(i), Ordering::Relaxed) };
    }
    let words = (len - head) / 8;
    // SAFETY: head <= len; dst + head is 8-aligned (or head == len and no word is written).
    let (ws, wd) = unsafe { (src.add(head).cast::<u64>(), dst.add(head).cast::<AtomicU64>()) };
    let mut k = 0;
    while k + STEP <= words {
        // SAFETY: k + STEP <= words: 64 readable bytes of src, read unaligned.
        let line = unsafe { ws.add(k).cast::<[u64; STEP]>().read_unaligned() };
        for (j, w) in line.into_iter().enumerate() {
            // SAFETY: k + j < words: an aligned word inside the mapping.
            unsafe { (*wd.add(k + j)).store(w, Ordering::Relaxed) };
        }
        k += STEP;
    }
    while k < words {
        // SAFETY: k < words, as above.
        unsafe { (*wd.add(k)).store(ws.add(k).read_unaligned(), Ordering::Relaxed) };
        k += 1;
    }
    for i in head + words * 8..len {
        // SAFETY: i < len, as in the head loop.
        unsafe { AtomicU8::from_ptr(dst.add(i)).store(*src.add(i), Ordering::Relaxed) };
    }
}

/// Writes `len` zero bytes into `dst` (store memory) with relaxed atomic stores.
///
/// # Safety
/// `dst..dst+len` lies in the mapping.
unsafe fn zero_in(dst: *mut u8, len: usize) {
    let head = dst.align_offset(8).min(len);
    let words = (len - head) / 8;
    for i in (0..head).chain(head + words * 8..len) {
        // SAFETY: i < len: dst + i lies in the mapping.
        unsafe { AtomicU8::from_ptr(dst.add(i)).store(0, Ordering::Relaxed) };
    }
    // SAFETY: head <= len; dst + head is 8-aligned.
    let wd = unsafe { dst.add(head).cast::<AtomicU64>() };
    for k in 0..words {
        // SAFETY: k < words: an aligned word inside the mapping.
        unsafe { (*wd.add(k)).store(0, Ordering::Relaxed) };
    }
}

impl MemStore {
    pub fn new(size: u64) -> Result<Self, BackingError> {
        let len = usize::try_from(size)
            .map_err(|_| BackingError::Alloc { size, source: io::Error::from(io::ErrorKind::OutOfMemory) })?;
        // SAFETY: an anonymous private mapping with no address hint has no preconditions.
        // MAP_POPULATE faults every page in now: the memory is committed when the LUN is
        // created (an out-of-memory shows up at add time, not mid-test), and writes never pay
        // a first-touch page fault on the I/O path.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len.max(1),
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return Err(BackingError::Alloc { size, source: io::Error::last_os_error() });
        }
        let ptr = NonNull::new(raw.cast::<u8>()).expect("mmap returned null");
        Ok(Self { ptr, size })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    fn check(&self, offset: u64, len: usize) -> usize {
        let end = offset.checked_add(len as u64).expect("offset overflow");
        assert!(end <= self.size, "RAM store access past its end");
        offset as usize
    }

    /// Copies `dst.len()` bytes from `offset`. Panics when out of range (callers check LBAs).
    pub fn read(&self, offset: u64, dst: &mut [u8]) {
        let off = self.check(offset, dst.len());
        // SAFETY: [off, off+len) is inside the mapping (checked above); dst is a distinct,
        // exclusively borrowed buffer (it cannot be the mapping: that is never lent out).
        unsafe { copy_out(self.ptr.as_ptr().add(off), dst.as_mut_ptr(), dst.len()) }
    }

    /// Where `len` bytes at `offset` live, for sending Data-In straight from the store. The
    /// pointer stays valid while the store does: callers keep the LUN (and so the store) alive
    /// until the send completes. Only the kernel may read through it (a send); Rust code must
    /// use [`MemStore::read`]. Panics when out of range (callers check LBAs).
    pub fn ptr_at(&self, offset: u64, len: usize) -> *const u8 {
        let off = self.check(offset, len);
        // SAFETY: off + len <= size (checked), so the pointer stays inside the mapping.
        unsafe { self.ptr.as_ptr().add(off) }
    }

    /// Copies `src` to `offset`. Panics when out of range (callers check LBAs).
    pub fn write(&self, offset: u64, src: &[u8]) {
        let off = self.check(offset, src.len());
        // SAFETY: as in `read`, with the direction reversed.
        unsafe { copy_in(src.as_ptr(), self.ptr.as_ptr().add(off), src.len()) }
    }

    /// Zeroes a range. Whole pages go back to the kernel (MADV_DONTNEED on a private anonymous
    /// mapping reads back as zeroes), so discarding a large RAM LUN frees memory rather than
    /// touching every page; only the unaligned edges are written.
    pub fn zero(&self, offset: u64, len: u64) {
        let off = self.check(offset, len as usize);
        let end = off + len as usize;
        let page = 4096;
        let (mid_start, mid_end) = (off.next_multiple_of(page), end / page * page);
        let write_zeroes = |from: usize, to: usize| {
            // SAFETY: [from, to) lies inside [off, end), which is inside the mapping.
            unsafe { zero_in(self.ptr.as_ptr().add(from), to - from) }
        };
        if mid_start >= mid_end {
            return write_zeroes(off, end);
        }
        write_zeroes(off, mid_start);
        // SAFETY: a page-aligned range inside our own private anonymous mapping.
        let rc =
            unsafe { libc::madvise(self.ptr.as_ptr().add(mid_start).cast(), mid_end - mid_start, libc::MADV_DONTNEED) };
        if rc != 0 {
            write_zeroes(mid_start, mid_end);
        }
        write_zeroes(mid_end, end);
    }
}

impl Drop for MemStore {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping made in `new`; no references outlive self.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), (self.size as usize).max(1)) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_zero() {
        let m = MemStore::new(1 << 20).unwrap();
        m.write(4096, &[1, 2, 3]);
        let mut b = [0u8; 4];
        m.read(4095, &mut b);
        assert_eq!(b, [0, 1, 2, 3]);
        m.zero(4096, 2);
        m.read(4096, &mut b);
        assert_eq!(b, [0, 0, 3, 0]);
        // Whole pages (madvise) plus unaligned edges.
        m.write(0, &[0xAB; 20000]);
        m.zero(100, 12000);
        let mut all = vec![0u8; 20000];
        m.read(0, &mut all);
        assert!(all[..100].iter().all(|&x| x == 0xAB));
        assert!(all[100..12100].iter().all(|&x| x == 0));
        assert!(all[12100..].iter().all(|&x| x == 0xAB));
    }

    #[test]
    fn unaligned_copies_round_trip() {
        let m = MemStore::new(8192).unwrap();
        let data: Vec<u8> = (0..300u32).map(|i| (i * 7 + 1) as u8).collect();
        for off in [0u64, 1, 7, 8, 9, 4093] {
            // Below a word, one word, below and past a 64-byte step, several steps.
            for len in [0usize, 1, 7, 8, 9, 17, 63, 64, 65, 71, 100, 136, 300] {
                m.write(off, &data[..len]);
                let mut back = vec![0xEE; len + 3];
                m.read(off, &mut back[1..len + 1]);
                assert_eq!(&back[1..len + 1], &data[..len], "offset {off} length {len}");
                assert_eq!((back[0], back[len + 1]), (0xEE, 0xEE), "copied outside the buffer");
            }
        }
        m.write(0, &[0xFF; 32]);
        m.zero(3, 21);
        let mut b = [0u8; 32];
        m.read(0, &mut b);
        assert_eq!(&b[..3], &[0xFF; 3]);
        assert!(b[3..24].iter().all(|&x| x == 0));
        assert_eq!(&b[24..], &[0xFF; 8]);
    }

    #[test]
    fn overlapping_copies_from_many_threads_stay_within_what_was_written() {
        // Racing writers of whole patterns: every 8-byte word read back is one writer's.
        let m = std::sync::Arc::new(MemStore::new(1 << 16).unwrap());
        let threads: Vec<_> = (1..=4u8)
            .map(|k| {
                let m = m.clone();
                std::thread::spawn(move || {
                    let buf = vec![k; 1 << 16];
                    let mut back = vec![0u8; 1 << 16];
                    for _ in 0..50 {
                        m.write(0, &buf);
                        m.read(0, &mut back);
                        assert!(back.chunks(8).all(|w| w.iter().all(|&b| b == w[0]) && (1..=4).contains(&w[0])));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    }

    #[test]
    #[should_panic]
    fn out_of_range_panics() {
        let m = MemStore::new(4096).unwrap();
        m.write(4095, &[1, 2]);
    }
}
