//! Image files (and allowed block devices) opened with `O_DIRECT`.

use super::{AlignedBuf, BackingError, IO_ALIGN};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// The logical block size every LUN exports; offsets from SCSI are multiples of it.
const SECTOR: u32 = 512;

/// An open image file.
pub struct FileStore {
    file: File,
    path: PathBuf,
    size: u64,
    direct: bool,
    is_block: bool,
}

impl FileStore {
    /// Opens `path` with `O_DIRECT` when the filesystem allows it for 512-byte offsets, and
    /// buffered otherwise (tmpfs, or storage that needs larger direct-I/O alignment).
    pub fn open(path: &Path, read_only: bool) -> Result<Self, BackingError> {
        let err = |op, source| BackingError::Open { path: path.to_owned(), op, source };
        let open = |flags: i32| {
            OpenOptions::new().read(true).write(!read_only).custom_flags(flags | libc::O_CLOEXEC).open(path)
        };
        let (mut file, mut direct) = match open(libc::O_DIRECT) {
            Ok(f) => (f, true),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => (open(0).map_err(|e| err("open", e))?, false),
            Err(e) => return Err(err("open", e)),
        };
        if direct {
            let align = dio_offset_align(&file).map_err(|e| err("statx", e))?;
            if align > SECTOR {
                log::info!(
                    "{}: direct I/O needs {align}-byte offsets, larger than the {SECTOR}-byte block; using buffered I/O",
                    path.display()
                );
                file = open(0).map_err(|e| err("open", e))?;
                direct = false;
            }
        } else {
            log::info!("{}: filesystem refuses O_DIRECT; using buffered I/O", path.display());
        }
        let meta = file.metadata().map_err(|e| err("stat", e))?;
        let is_block = meta.file_type().is_block_device();
        let size = if is_block { block_device_size(&file).map_err(|e| err("BLKGETSIZE64", e))? } else { meta.len() };
        if size == 0 || size % u64::from(SECTOR) != 0 {
            return Err(BackingError::BadSize { path: path.to_owned(), size, block_size: SECTOR });
        }
        Ok(Self { file, path: path.to_owned(), size, direct, is_block })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn fd(&self) -> i32 {
        self.file.as_raw_fd()
    }

    /// Whether reads and writes bypass the page cache.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    pub fn is_block(&self) -> bool {
        self.is_block
    }

    fn io_err(op: &'static str, offset: u64, len: usize) -> impl FnOnce(io::Error) -> BackingError {
        move |source| BackingError::Io { op, offset, len: len as u64, source }
    }

    /// Synchronous read for the slow path; bounces through an aligned buffer under O_DIRECT.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), BackingError> {
        if !self.direct {
            return self.file.read_exact_at(buf, offset).map_err(Self::io_err("read", offset, buf.len()));
        }
        let (start, bounce_len) = self.bounce_window(offset, buf.len());
        let mut bounce = AlignedBuf::new(bounce_len);
        self.file.read_exact_at(&mut bounce[..bounce_len], start).map_err(Self::io_err("read", offset, buf.len()))?;
        let skip = (offset - start) as usize;
        buf.copy_from_slice(&bounce[skip..skip + buf.len()]);
        Ok(())
    }

    /// Synchronous write for the slow path; read-modify-write through an aligned buffer when
    /// the range is not sector aligned under O_DIRECT.
    pub fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> Result<(), BackingError> {
        let res = if !self.direct {
            self.file.write_all_at(buf, offset)
        } else {
            let (start, bounce_len) = self.bounce_window(offset, buf.len());
            let mut bounce = AlignedBuf::new(bounce_len);
            let skip = (offset - start) as usize;
            if skip != 0 || !buf.len().is_multiple_of(SECTOR as usize) {
                self.file
                    .read_exact_at(&mut bounce[..bounce_len], start)
                    .map_err(Self::io_err("read", start, bounce_len))?;
            }
            bounce[skip..skip + buf.len()].copy_from_slice(buf);
            self.file.write_all_at(&bounce[..bounce_len], start)
        };
        res.map_err(Self::io_err("write", offset, buf.len()))?;
        if fua {
            self.flush()?;
        }
        Ok(())
    }

    /// The sector-aligned window around `[offset, offset + len)`.
    fn bounce_window(&self, offset: u64, len: usize) -> (u64, usize) {
        let sector = u64::from(SECTOR);
        let start = offset / sector * sector;
        let end = (offset + len as u64).next_multiple_of(sector);
        (start, (end - start) as usize)
    }

    pub fn flush(&self) -> Result<(), BackingError> {
        self.file.sync_data().map_err(Self::io_err("flush", 0, 0))
    }

    /// Punches a hole (files) or discards (block devices); the range then reads as zeroes.
    pub fn discard(&self, offset: u64, len: u64) -> Result<(), BackingError> {
        let fail = Self::io_err("discard", offset, len as usize);
        if self.is_block {
            let range = [offset, len];
            // SAFETY: BLKZEROOUT reads two u64s from the pointer, which outlives the call.
            let rc = unsafe { libc::ioctl(self.fd(), BLKZEROOUT, range.as_ptr()) };
            return if rc == 0 { Ok(()) } else { Err(fail(io::Error::last_os_error())) };
        }
        // SAFETY: fallocate takes plain integers and a descriptor we own.
        let rc = unsafe {
            libc::fallocate(
                self.fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset as i64,
                len as i64,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EOPNOTSUPP) {
            return Err(fail(e));
        }
        // No hole punching here: write zeroes instead.
        let chunk = AlignedBuf::new((1 << 20).min(len as usize).max(IO_ALIGN));
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(chunk.len() as u64) as usize;
            self.file.write_all_at(&chunk[..n], offset + done).map_err(Self::io_err(
                "discard",
                offset,
                len as usize,
            ))?;
            done += n as u64;
        }
        Ok(())
    }
}

/// `_IO(0x12, 127)`: zero a byte range of a block device.
const BLKZEROOUT: libc::c_ulong = 0x127f;
/// `_IOR(0x12, 114, size_t)`: a block device's size in bytes.
const BLKGETSIZE64: libc::c_ulong = 0x80081272;

fn block_device_size(file: &File) -> io::Result<u64> {
    let mut size = 0u64;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which is valid for the call.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
    if rc == 0 {
        Ok(size)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The file offset alignment direct I/O needs, from `statx(STATX_DIOALIGN)`; 512 when the
/// kernel or filesystem does not say.
fn dio_offset_align(file: &File) -> io::Result<u32> {
    // SAFETY: statx is plain data; all-zero is a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: the empty path with AT_EMPTY_PATH refers to the descriptor; stx is writable.
    let rc =
        unsafe { libc::statx(file.as_raw_fd(), c"".as_ptr(), libc::AT_EMPTY_PATH, libc::STATX_DIOALIGN, &mut stx) };
    if rc != 0 {
        let e = io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::ENOSYS) { Ok(SECTOR) } else { Err(e) };
    }
    if stx.stx_mask & libc::STATX_DIOALIGN == 0 || stx.stx_dio_offset_align == 0 {
        return Ok(SECTOR);
    }
    Ok(stx.stx_dio_offset_align)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(len: u64) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.img");
        File::create(&p).unwrap().set_len(len).unwrap();
        (dir, p)
    }

    #[test]
    fn unaligned_round_trip() {
        let (_d, p) = image(1 << 20);
        let f = FileStore::open(&p, false).unwrap();
        assert_eq!(f.size(), 1 << 20);
        let data: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
        f.write_at(&data, 777, true).unwrap();
        let mut back = vec![0u8; 1000];
        f.read_at(&mut back, 777).unwrap();
        assert_eq!(back, data);
        let mut before = [9u8; 10];
        f.read_at(&mut before, 767).unwrap();
        assert_eq!(before, [0; 10]);
    }

    #[test]
    fn discard_reads_zero() {
        let (_d, p) = image(1 << 20);
        let f = FileStore::open(&p, false).unwrap();
        f.write_at(&[0xAB; 8192], 4096, false).unwrap();
        f.discard(4096, 4096).unwrap();
        let mut b = vec![1u8; 8192];
        f.read_at(&mut b, 4096).unwrap();
        assert!(b[..4096].iter().all(|&x| x == 0));
        assert!(b[4096..].iter().all(|&x| x == 0xAB));
    }

    #[test]
    fn rejects_odd_sizes() {
        let (_d, p) = image(1000);
        assert!(matches!(FileStore::open(&p, false), Err(BackingError::BadSize { .. })));
        let (_d2, p2) = image(0);
        assert!(matches!(FileStore::open(&p2, false), Err(BackingError::BadSize { .. })));
    }
}
