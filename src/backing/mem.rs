//! RAM-backed stores for ephemeral CI disks and for measuring protocol cost alone.

use super::BackingError;
use std::io;
use std::ptr::NonNull;

/// An anonymous, lazily-populated mapping shared by every reactor.
///
/// Like guest memory in a VMM, several reactors may copy into or out of overlapping ranges at
/// once when initiators issue overlapping I/O; SCSI leaves the result of such races undefined,
/// and the copies never leave the mapping, so no lock sits on the data path.
pub struct MemStore {
    ptr: NonNull<u8>,
    size: u64,
}

// SAFETY: the mapping lives as long as the store and is only accessed through bounds-checked
// copies; concurrent overlapping copies are the device-level races described above.
unsafe impl Send for MemStore {}
// SAFETY: as above.
unsafe impl Sync for MemStore {}

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
        // SAFETY: [off, off+len) is inside the mapping (checked above); dst is a distinct
        // buffer that cannot overlap the private mapping.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.as_ptr().add(off), dst.as_mut_ptr(), dst.len()) }
    }

    /// Where `len` bytes at `offset` live, for sending Data-In straight from the store. The
    /// pointer stays valid while the store does: callers keep the LUN (and so the store) alive
    /// until the send completes. Panics when out of range (callers check LBAs).
    pub fn ptr_at(&self, offset: u64, len: usize) -> *const u8 {
        let off = self.check(offset, len);
        // SAFETY: off + len <= size (checked), so the pointer stays inside the mapping.
        unsafe { self.ptr.as_ptr().add(off) }
    }

    /// Copies `src` to `offset`. Panics when out of range (callers check LBAs).
    pub fn write(&self, offset: u64, src: &[u8]) {
        let off = self.check(offset, src.len());
        // SAFETY: as in `read`, with the direction reversed.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr.as_ptr().add(off), src.len()) }
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
            unsafe { std::ptr::write_bytes(self.ptr.as_ptr().add(from), 0, to - from) }
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
    #[should_panic]
    fn out_of_range_panics() {
        let m = MemStore::new(4096).unwrap();
        m.write(4095, &[1, 2]);
    }
}
