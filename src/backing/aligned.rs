//! Heap buffers aligned for O_DIRECT.

use std::alloc::{self, Layout};
use std::ptr::NonNull;

/// Alignment of every I/O buffer: a page satisfies any O_DIRECT memory alignment we meet.
pub const IO_ALIGN: usize = 4096;
/// Buffers this large are fresh anonymous mappings: the kernel hands out zeroed pages as they
/// are first touched, so allocating (on a reactor's pool miss, say) costs no memset of up to
/// 16 MiB and no memory until used. (The allocator's `alloc_zeroed` memsets page-aligned
/// memory.)
const MMAP_MIN: usize = 1 << 20;

/// An owned, zero-initialised, page-aligned byte buffer.
///
/// Its address never moves, so it can be handed to the kernel for an io_uring operation and
/// kept alive until the completion arrives.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Box<[u8]>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared references only allow reads, like &[u8].
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// Allocates `len` zeroed bytes (rounded up to a multiple of [`IO_ALIGN`], at least one page).
    pub fn new(len: usize) -> Self {
        let len = len.max(1).next_multiple_of(IO_ALIGN);
        if len >= MMAP_MIN {
            // SAFETY: a fresh private anonymous mapping; the result is checked.
            let raw = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            if raw == libc::MAP_FAILED {
                alloc::handle_alloc_error(Self::layout(len));
            }
            let ptr = NonNull::new(raw.cast()).expect("mmap never returns null on success");
            return Self { ptr, len };
        }
        let layout = Self::layout(len);
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| alloc::handle_alloc_error(layout));
        Self { ptr, len }
    }

    fn layout(len: usize) -> Layout {
        Layout::from_size_align(len, IO_ALIGN).expect("buffer size overflows a Layout")
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for len initialised bytes for the lifetime of self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: ptr is valid for len initialised bytes and we hold the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.len >= MMAP_MIN {
            // SAFETY: mapped in `new` with exactly this length; nothing references it now.
            unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
            return;
        }
        // SAFETY: allocated in `new` with exactly this layout.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.len)) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_and_zeroed() {
        let mut b = AlignedBuf::new(100);
        assert_eq!(b.len(), IO_ALIGN);
        assert_eq!(b.as_ptr() as usize % IO_ALIGN, 0);
        assert!(b.iter().all(|&x| x == 0));
        b[5] = 7;
        assert_eq!(b[5], 7);
    }

    /// Pages of `b` that are resident (mincore), so other tests' memory cannot disturb it.
    fn resident_pages(b: &AlignedBuf) -> usize {
        let mut vec = vec![0u8; b.len() / 4096];
        // SAFETY: the range is one live mapping of ours; vec has a byte per page.
        let rc = unsafe { libc::mincore(b.as_ptr() as *mut _, b.len(), vec.as_mut_ptr()) };
        assert_eq!(rc, 0, "mincore: {}", std::io::Error::last_os_error());
        vec.iter().filter(|&&v| v & 1 != 0).count()
    }

    #[test]
    fn large_buffers_are_zeroed_without_being_filled() {
        let mut bufs: Vec<AlignedBuf> = (0..4).map(|_| AlignedBuf::new(16 << 20)).collect();
        // Writing zeros over 16 MiB would make its 4096 pages resident; a fresh mapping is not.
        for b in &bufs {
            assert_eq!(resident_pages(b), 0, "allocation touched the buffer");
        }
        for b in &mut bufs {
            assert_eq!(b.len(), 16 << 20);
            assert_eq!(b.as_ptr() as usize % IO_ALIGN, 0);
            assert!(b.iter().step_by(4096).all(|&x| x == 0));
            b[(16 << 20) - 1] = 9;
            assert_eq!(b[(16 << 20) - 1], 9);
        }
    }
}
