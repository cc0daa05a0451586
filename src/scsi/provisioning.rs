//! Which blocks of a LUN are mapped, for GET LBA STATUS (SBC-3 5.7).
//!
//! Image files answer from their holes (`SEEK_DATA` / `SEEK_HOLE`); RAM stores from their
//! contents: with LBPRZ=1 a block of zeroes reads exactly like a deallocated one, so it is
//! reported deallocated. Block devices cannot say, so all their blocks are mapped.

use crate::backing::Backing;
use crate::scsi::lun::BLOCK_SIZE;
use std::io;

const BS: u64 = BLOCK_SIZE as u64;
/// At most this many bytes of a RAM store are scanned per extent, so one GET LBA STATUS stays
/// short; a shorter extent is still a correct answer (the initiator asks again from its end).
const MEM_SCAN_LIMIT: u64 = 32 << 20;

/// A run of blocks with one provisioning status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub deallocated: bool,
    pub blocks: u64,
}

/// The extent that starts at `lba`, never past `end_lba` (exclusive, `lba < end_lba`).
pub fn extent_at(backing: &Backing, lba: u64, end_lba: u64) -> Extent {
    let (start, end) = (lba * BS, end_lba * BS);
    let (deallocated, bytes) = match backing {
        Backing::File(f) if !f.is_block() => file_extent(f.fd(), start, end).unwrap_or((false, end - start)),
        Backing::File(_) => (false, end - start),
        Backing::Mem(_) => mem_extent(backing, start, end),
    };
    // Hole edges sit on filesystem blocks, multiples of ours; round inward to whole blocks
    // anyway, but always report at least the first one.
    Extent { deallocated, blocks: (bytes / BS).max(1) }
}

/// `(hole, length)` of the run at byte `start` of the file, cut at `end`.
fn file_extent(fd: i32, start: u64, end: u64) -> io::Result<(bool, u64)> {
    let seek = |whence| {
        // SAFETY: lseek takes plain integers; the descriptor belongs to the backing store,
        // which outlives the call. Moving the file offset is harmless: all I/O on it is
        // positioned (pread/pwrite, io_uring with explicit offsets).
        let r = unsafe { libc::lseek(fd, start as libc::off_t, whence) };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r as u64)
        }
    };
    match seek(libc::SEEK_DATA) {
        // No data at or after `start`: a hole to the end of the file.
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => Ok((true, end - start)),
        Err(e) => Err(e),
        Ok(data) if data > start => Ok((true, data.min(end) - start)),
        Ok(_) => {
            let hole = seek(libc::SEEK_HOLE)?;
            Ok((false, hole.min(end).max(start + BS) - start))
        }
    }
}

/// `(all zero, length)` of the run of zero or non-zero blocks at byte `start` of a RAM store.
fn mem_extent(backing: &Backing, start: u64, end: u64) -> (bool, u64) {
    let end = end.min(start + MEM_SCAN_LIMIT);
    let mut block = [0u8; BS as usize];
    let mut zero_run = None;
    let mut off = start;
    while off < end {
        if backing.read_at(&mut block, off).is_err() {
            break;
        }
        let zero = block.iter().all(|&b| b == 0);
        match zero_run {
            None => zero_run = Some(zero),
            Some(z) if z != zero => break,
            Some(_) => {}
        }
        off += BS;
    }
    (zero_run.unwrap_or(false), (off - start).max(BS))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn mem_zero_blocks_are_deallocated() {
        let b = Backing::new_mem(64 * BS).unwrap();
        assert_eq!(extent_at(&b, 0, 64), Extent { deallocated: true, blocks: 64 });
        b.write_at(&[1; 3 * BS as usize], 10 * BS, false).unwrap();
        assert_eq!(extent_at(&b, 0, 64), Extent { deallocated: true, blocks: 10 });
        assert_eq!(extent_at(&b, 10, 64), Extent { deallocated: false, blocks: 3 });
        assert_eq!(extent_at(&b, 11, 12), Extent { deallocated: false, blocks: 1 });
        assert_eq!(extent_at(&b, 13, 64), Extent { deallocated: true, blocks: 51 });
        b.discard(11 * BS, BS).unwrap();
        assert_eq!(extent_at(&b, 10, 64), Extent { deallocated: false, blocks: 1 });
        assert_eq!(extent_at(&b, 11, 64), Extent { deallocated: true, blocks: 1 });
    }

    #[test]
    fn mem_scan_is_bounded() {
        let b = Backing::new_mem(2 * MEM_SCAN_LIMIT).unwrap();
        let all = 2 * MEM_SCAN_LIMIT / BS;
        assert_eq!(extent_at(&b, 0, all), Extent { deallocated: true, blocks: MEM_SCAN_LIMIT / BS });
    }

    #[test]
    fn file_holes_are_deallocated() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        let mut f = std::fs::File::create(&p).unwrap();
        f.write_all(&[0xAB; 64 << 10]).unwrap();
        drop(f);
        let b = Backing::open_file(&p, false).unwrap();
        let blocks = (64 << 10) / BS;
        assert_eq!(extent_at(&b, 0, blocks), Extent { deallocated: false, blocks });
        // Punch 16 KiB at 16 KiB: filesystems without hole support zero-fill instead, and
        // then everything stays mapped, which is also a correct answer.
        b.discard(16 << 10, 16 << 10).unwrap();
        let first = extent_at(&b, 0, blocks);
        if first.blocks == blocks {
            assert!(!first.deallocated);
            return;
        }
        assert_eq!(first, Extent { deallocated: false, blocks: 32 });
        assert_eq!(extent_at(&b, 32, blocks), Extent { deallocated: true, blocks: 32 });
        assert_eq!(extent_at(&b, 40, 50), Extent { deallocated: true, blocks: 10 });
        assert_eq!(extent_at(&b, 64, blocks), Extent { deallocated: false, blocks: 64 });
    }
}
