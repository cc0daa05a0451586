//! The stores behind a LUN: image files opened with `O_DIRECT`, and RAM.
//!
//! The reactors drive file I/O on the hot path through their own io_uring using
//! [`Backing::direct_fd`]; RAM stores are copied to and from directly. The synchronous methods
//! here serve the slow path (parameter-list commands such as COMPARE AND WRITE or UNMAP) and
//! tools. [`open_lun_store`] opens (creating or growing) the store a LUN's configuration asks
//! for.

mod aligned;
mod file;
mod mem;
mod open;
pub mod pool;

pub use aligned::{AlignedBuf, IO_ALIGN};
pub use file::FileStore;
pub use mem::MemStore;
pub use open::{open_lun_store, LunStore, OpenError};

use std::io;
use std::path::{Path, PathBuf};

/// Errors of the backing stores; each names the store and the operation.
#[derive(Debug, thiserror::Error)]
pub enum BackingError {
    /// Opening or inspecting the image file failed.
    #[error("{path}: {op}: {source}")]
    Open { path: PathBuf, op: &'static str, source: io::Error },
    /// The store's size is not usable as a disk.
    #[error("{path}: size {size} bytes is not a non-zero multiple of the {block_size}-byte block size")]
    BadSize { path: PathBuf, size: u64, block_size: u32 },
    /// A read, write, flush or discard failed.
    #[error("{op} at byte {offset} (+{len}): {source}")]
    Io { op: &'static str, offset: u64, len: u64, source: io::Error },
    /// Allocating RAM for a `mem` store failed.
    #[error("cannot allocate {size} bytes for a RAM store: {source}")]
    Alloc { size: u64, source: io::Error },
}

/// Which kind of store serves a LUN.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum BackingKind {
    /// An image file (or an allowed block device).
    #[default]
    File,
    /// RAM, lost when the target stops.
    Mem,
}

/// A LUN's store.
pub enum Backing {
    File(FileStore),
    Mem(MemStore),
}

impl Backing {
    /// Opens an existing image file or block device.
    pub fn open_file(path: &Path, read_only: bool) -> Result<Self, BackingError> {
        FileStore::open(path, read_only).map(Backing::File)
    }

    /// Allocates a zero-filled RAM store of `size` bytes.
    pub fn new_mem(size: u64) -> Result<Self, BackingError> {
        MemStore::new(size).map(Backing::Mem)
    }

    pub fn kind(&self) -> BackingKind {
        match self {
            Backing::File(_) => BackingKind::File,
            Backing::Mem(_) => BackingKind::Mem,
        }
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        match self {
            Backing::File(f) => f.size(),
            Backing::Mem(m) => m.size(),
        }
    }

    /// The file descriptor reactors submit reads and writes on; `None` for RAM stores.
    pub fn ring_fd(&self) -> Option<i32> {
        match self {
            Backing::File(f) => Some(f.fd()),
            Backing::Mem(_) => None,
        }
    }

    /// Reads `buf.len()` bytes at `offset` (any alignment; bounced when O_DIRECT needs it).
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), BackingError> {
        match self {
            Backing::File(f) => f.read_at(buf, offset),
            Backing::Mem(m) => {
                m.read(offset, buf);
                Ok(())
            }
        }
    }

    /// Writes `buf` at `offset`; with `fua` it is durable when this returns.
    pub fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> Result<(), BackingError> {
        match self {
            Backing::File(f) => f.write_at(buf, offset, fua),
            Backing::Mem(m) => {
                m.write(offset, buf);
                Ok(())
            }
        }
    }

    /// Makes every completed write durable.
    pub fn flush(&self) -> Result<(), BackingError> {
        match self {
            Backing::File(f) => f.flush(),
            Backing::Mem(_) => Ok(()),
        }
    }

    /// Deallocates `len` bytes at `offset`; they read back as zeroes afterwards.
    pub fn discard(&self, offset: u64, len: u64) -> Result<(), BackingError> {
        match self {
            Backing::File(f) => f.discard(offset, len),
            Backing::Mem(m) => {
                m.zero(offset, len);
                Ok(())
            }
        }
    }
}
