//! Ring resources registered up front: backing files (fixed files) and I/O buffers (fixed
//! buffers, which the buffer pool chooses: it sees every buffer made and dropped).
//!
//! A fixed file spares each I/O a reference taken and dropped on the file: an atomic on a
//! counter that every reactor serving that LUN would otherwise share. A fixed buffer spares an
//! O_DIRECT I/O pinning its pages.

use crate::backing::pool::{BufPool, FIXED_SLOTS};
use io_uring::Submitter;

/// Backing files a reactor's ring holds at most; LUNs beyond this use plain descriptors.
const FILE_SLOTS: u32 = 256;

/// The backing files registered with a reactor's ring, by descriptor.
pub(super) struct FixedFiles {
    enabled: bool,
    /// The descriptor in each slot (-1: free). A few LUNs per target: a scan beats a map.
    slots: Vec<i32>,
}

impl FixedFiles {
    /// Registers an empty table of [`FILE_SLOTS`]; without kernel support (or room) the
    /// reactor uses plain descriptors.
    pub fn new(submitter: &Submitter) -> Self {
        let enabled = match submitter.register_files_sparse(FILE_SLOTS) {
            Ok(()) => true,
            Err(e) => {
                log::info!("io_uring fixed files unavailable ({e}): backing I/O uses plain descriptors");
                false
            }
        };
        Self { enabled, slots: Vec::new() }
    }

    /// The fixed-file slot of `fd`, if registered.
    pub fn slot(&self, fd: i32) -> Option<u32> {
        // Free slots hold -1, which no open descriptor is.
        (fd >= 0).then(|| self.slots.iter().position(|&f| f == fd)).flatten().map(|s| s as u32)
    }

    /// Makes the table hold exactly the descriptors of `fds` (the backing files of the
    /// reactor's current LUN table). A file dropped here stays referenced by I/O the kernel
    /// still has in flight on it; the next I/O on a descriptor not in the table goes through
    /// the plain descriptor.
    pub fn sync(&mut self, fds: &[i32], submitter: &Submitter) {
        if !self.enabled {
            return;
        }
        for slot in 0..self.slots.len() {
            let fd = self.slots[slot];
            if fd >= 0 && !fds.contains(&fd) {
                self.slots[slot] = -1;
                if let Err(e) = submitter.register_files_update(slot as u32, &[-1]) {
                    log::warn!("io_uring: clearing fixed file {slot}: {e}");
                }
            }
        }
        for &fd in fds {
            if self.slots.contains(&fd) {
                continue;
            }
            let slot = match self.slots.iter().position(|&f| f < 0) {
                Some(s) => s,
                None if self.slots.len() < FILE_SLOTS as usize => {
                    self.slots.push(-1);
                    self.slots.len() - 1
                }
                None => return,
            };
            match submitter.register_files_update(slot as u32, &[fd]) {
                Ok(_) => self.slots[slot] = fd,
                Err(e) => log::info!("io_uring: registering backing file {fd}: {e}; it uses its descriptor"),
            }
        }
    }
}

/// Registers a sparse table of fixed buffers and lets the pool fill it; without kernel
/// support the pool never registers any.
pub(super) fn enable_fixed_buffers(submitter: &Submitter, pool: &mut BufPool) {
    match submitter.register_buffers_sparse(FIXED_SLOTS) {
        Ok(()) => pool.enable_fixed(),
        Err(e) => log::info!("io_uring fixed buffers unavailable ({e}): backing I/O pins pages per I/O"),
    }
}

/// Applies the pool's registrations to the ring, in order, before I/O that may use them is
/// submitted.
pub(super) fn apply_buffer_updates(submitter: &Submitter, pool: &mut BufPool) {
    for u in &pool.fixed_updates() {
        let iov = libc::iovec { iov_base: u.addr as *mut libc::c_void, iov_len: u.len };
        // SAFETY: a registration names a live pool buffer (the pool queued it when it made
        // the buffer, and a later drop queues the clearing after it); the pool hands out a
        // slot only for the buffer registered in it (`BufPool::fixed_index`), so the kernel
        // only ever writes through a slot into memory its task owns. A clearing (len 0)
        // references no memory.
        if let Err(e) = unsafe { submitter.register_buffers_update(u32::from(u.slot), &[iov], None) } {
            log::info!("io_uring: registering a {}-byte I/O buffer: {e}; no more are registered", u.len);
            pool.fixed_failed(u);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backing::pool::BufPool;

    #[test]
    fn fixed_files_follow_the_lun_table() {
        let ring = io_uring::IoUring::new(8).expect("io_uring");
        let mut files = FixedFiles::new(&ring.submitter());
        assert!(files.enabled, "this kernel has sparse file tables");
        let a = std::fs::File::open("/dev/null").unwrap();
        let b = std::fs::File::open("/dev/zero").unwrap();
        use std::os::fd::AsRawFd;
        let (fa, fb) = (a.as_raw_fd(), b.as_raw_fd());
        files.sync(&[fa, fb], &ring.submitter());
        let (sa, sb) = (files.slot(fa).unwrap(), files.slot(fb).unwrap());
        assert_ne!(sa, sb);
        files.sync(&[fb], &ring.submitter());
        assert_eq!(files.slot(fa), None, "a removed LUN's file leaves the table");
        assert_eq!(files.slot(fb), Some(sb), "a kept file keeps its slot");
        files.sync(&[fb, fa], &ring.submitter());
        assert_eq!(files.slot(fa), Some(sa), "a freed slot is reused");
    }

    #[test]
    fn pool_buffers_are_registered_and_cleared_through_the_ring() {
        let ring = io_uring::IoUring::new(8).expect("io_uring");
        let mut pool = BufPool::default();
        enable_fixed_buffers(&ring.submitter(), &mut pool);
        let b = pool.take(4096, false).unwrap();
        apply_buffer_updates(&ring.submitter(), &mut pool);
        assert!(pool.fixed_index(b.as_ptr()).is_some(), "the kernel accepted the registration");
        assert_eq!(pool.fixed_bytes(), 4096);
        pool.give_back(Some(b), 4096);
        assert_eq!(pool.fixed_bytes(), 4096, "a cached buffer stays registered");
    }
}
