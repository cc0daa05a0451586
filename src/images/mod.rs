//! Disk images under `root_dir`: streamed import (decompressed on the fly, hashed, written
//! sparse through a temp file and renamed atomically), and the SHA-256 sidecar that lets a
//! client skip re-sending an identical image.
//!
//! The control plane wires these onto its methods:
//! - `image_info {name}` → [`image_info`];
//! - `upload_image {name, size, compression, sha256?, size_mb, force}` → [`would_skip`], then
//!   (unless skipped) [`import_image`] on `(&mut socket).take(size)` with
//!   `expected_size: Some(size)`;
//! - `import_image {name, src_path, ...}` → [`import_file`].
//!
//! Any failure (a truncated or corrupt stream, a digest mismatch, a full disk, a wrong byte
//! count, a reader error such as a client that disconnects) removes the temp file and leaves the
//! previous `<name>.img` and its sidecar untouched.

mod decompress;
mod import;
mod sidecar;
mod source;
mod writer;

pub use decompress::Compression;
pub use import::{import_file, import_file_within, import_image, would_skip};
pub use sidecar::{image_info, ImageInfo};
pub use source::{digest_file, digest_image, is_url, open_source, parse_header, FetchOptions, Progress, Source};
pub use writer::remove_stale_temp_files;

use std::io;
use std::path::{Path, PathBuf};

/// The logical block size LUNs export: an image file is extended to a whole number of them.
pub const BLOCK_SIZE: u64 = 512;

/// Longest image name: leaves room for `.<name>.img.tmp-<pid>-<n>` in a 255-byte file name.
pub const MAX_NAME_LEN: usize = 200;

/// Errors of importing and inspecting images; each tells what failed and where.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ImageError {
    /// The image name cannot become a file name under root_dir.
    #[error("image name {name:?}: {reason}")]
    InvalidName { name: String, reason: String },
    /// A string is not a SHA-256 digest in hex.
    #[error("sha256 {value:?}: {reason}")]
    InvalidDigest { value: String, reason: String },
    /// A compression name is not one of none, gz, xz, bz2, zstd.
    #[error("compression {0:?} is not one of none, gz, xz, bz2, zstd")]
    InvalidCompression(String),
    /// `size_mb` is smaller than the image, or too large to be a byte count.
    #[error("{name}: {reason}")]
    InvalidSize { name: String, reason: String },
    /// A file-system operation on the image, its temp file, its sidecar or root_dir failed.
    #[error("{path}: {op}: {source}")]
    Io { path: PathBuf, op: &'static str, source: io::Error },
    /// Writing the image failed (ENOSPC shows up here).
    #[error("{path}: write at byte {offset}: {source}")]
    Write { path: PathBuf, offset: u64, source: io::Error },
    /// Reading the source failed (a client that disconnects, an unreadable file).
    #[error("reading the source after {offset} bytes: {source}")]
    Source { offset: u64, source: io::Error },
    /// The compressed stream is corrupt or truncated.
    #[error("{compression} stream is corrupt or truncated after {offset} compressed bytes: {source}")]
    Decompress { compression: Compression, offset: u64, source: io::Error },
    /// The source ended before the announced number of bytes.
    #[error("the source ended after {got} of the {expected} announced bytes")]
    ShortInput { expected: u64, got: u64 },
    /// The source holds more bytes than announced, or bytes after the end of the compressed stream.
    #[error("{reason}")]
    TrailingData { reason: String },
    /// The uncompressed image's SHA-256 is not the one given.
    #[error("sha256 mismatch: expected {expected}, the image has {actual}")]
    DigestMismatch { expected: String, actual: String },
    /// An image of 0 bytes cannot be a LUN.
    #[error("empty image: 0 bytes after decompression")]
    Empty,
    /// A local source path is unusable.
    #[error("{path}: {reason}")]
    BadSource { path: PathBuf, reason: String },
    /// A `--header` is not `Name: value`.
    #[error("--header {header:?}: {reason}")]
    BadHeader { header: String, reason: &'static str },
    /// A `--cacert` file cannot be read or holds no certificate.
    #[error("--cacert {path}: {reason}")]
    BadCaFile { path: PathBuf, reason: String },
    /// Fetching an HTTP(S) source failed.
    #[error("{url}: {reason}")]
    Http { url: String, reason: String },
}

impl ImageError {
    pub(crate) fn io(path: &Path, op: &'static str) -> impl FnOnce(io::Error) -> ImageError {
        let path = path.to_owned();
        move |source| ImageError::Io { path, op, source }
    }
}

/// How to import one image.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImportOptions {
    /// How the source is compressed. `None`: raw for [`import_image`], from the file name's
    /// extension for [`import_file`].
    pub compression: Option<Compression>,
    /// Bytes the source holds (on the wire, compressed): fewer or more is an error.
    pub expected_size: Option<u64>,
    /// SHA-256 of the uncompressed image: checked after the import (mismatch is an error), and
    /// with `!force` an identical image already in place is not imported again.
    pub sha256: Option<[u8; 32]>,
    /// LUN size in MiB; 0 means the image size rounded up to a whole block. See [`lun_size_bytes`].
    pub size_mb: u64,
    /// Import even when the image in place has the same digest.
    pub force: bool,
}

/// What an import did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportResult {
    /// `<root_dir>/<name>.img` (root_dir canonical).
    pub path: PathBuf,
    /// Uncompressed image bytes (exact; not rounded).
    pub bytes: u64,
    /// The file's size: what the LUN exports, see [`lun_size_bytes`].
    pub lun_size: u64,
    /// SHA-256 of the uncompressed image.
    pub sha256: [u8; 32],
    /// The image in place already had this digest: nothing was written (and nothing read when
    /// the digest was given up front; otherwise the bytes were read, hashed and dropped).
    pub skipped: bool,
}

impl ImportResult {
    pub fn sha256_hex(&self) -> String {
        to_hex(&self.sha256)
    }
}

/// The size of the LUN that exports an image of `image_bytes`: `size_mb` MiB when non-zero (it
/// must hold the whole image), else the image size rounded UP to a whole 512-byte block. The
/// replaced system rounded down to whole MiB and cut image tails.
pub fn lun_size_bytes(image_bytes: u64, size_mb: u64) -> Result<u64, ImageError> {
    let bad = |reason: String| ImageError::InvalidSize { name: "size_mb".into(), reason };
    if size_mb == 0 {
        return image_bytes
            .checked_next_multiple_of(BLOCK_SIZE)
            .ok_or_else(|| bad(format!("{image_bytes} bytes cannot be rounded up to a block")));
    }
    let want = size_mb.checked_mul(1 << 20).ok_or_else(|| bad(format!("{size_mb} MiB does not fit in 64 bits")))?;
    if want < image_bytes {
        return Err(bad(format!("{size_mb} MiB ({want} bytes) is smaller than the {image_bytes}-byte image")));
    }
    Ok(want)
}

/// Checks that `name` can be an image file name: `[A-Za-z0-9._-]`, not empty, not starting with
/// `.` (hidden names are this module's temp and sidecar files; this also refuses `.` and `..`).
pub fn validate_name(name: &str) -> Result<(), ImageError> {
    let bad = |reason: String| Err(ImageError::InvalidName { name: name.to_owned(), reason });
    if name.is_empty() {
        return bad("must not be empty".into());
    }
    if name.len() > MAX_NAME_LEN {
        return bad(format!("longer than {MAX_NAME_LEN} bytes"));
    }
    if let Some(c) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))) {
        return bad(format!("contains {c:?}; allowed are A-Z a-z 0-9 . _ -"));
    }
    if name.starts_with('.') {
        return bad("must not start with '.'".into());
    }
    Ok(())
}

/// The file name of image `name`.
pub fn image_file_name(name: &str) -> String {
    format!("{name}.img")
}

/// The name an image gets from its source: the base name without `.img` and compression
/// suffixes (`https://x/disk.img.gz?sig=1` → `disk`), as the replaced system's `serve` did.
pub fn name_from_source(spec: &str) -> String {
    let mut base = base_name(spec);
    let comp = Compression::from_extension(Path::new(base));
    if comp != Compression::None {
        base = base.rsplit_once('.').map_or(base, |(stem, _)| stem);
    }
    base.strip_suffix(".img").unwrap_or(base).to_owned()
}

/// The last path component of a file path or URL, without any `?query` or `#fragment`.
pub(crate) fn base_name(spec: &str) -> &str {
    let path = spec.split(['?', '#']).next().unwrap_or(spec);
    path.rsplit('/').next().unwrap_or(path)
}

/// Lower-case hex of `bytes`.
pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses a SHA-256 digest written as 64 hex digits (either case).
pub fn parse_sha256(s: &str) -> Result<[u8; 32], ImageError> {
    let bad = |reason: &str| ImageError::InvalidDigest { value: s.to_owned(), reason: reason.to_owned() };
    if s.len() != 64 {
        return Err(bad("not 64 hex digits"));
    }
    let mut out = [0u8; 32];
    for (i, pair) in s.as_bytes().chunks_exact(2).enumerate() {
        let digit = |c: u8| (c as char).to_digit(16).ok_or_else(|| bad("not a hex digit"));
        out[i] = (digit(pair[0])? << 4 | digit(pair[1])?) as u8;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lun_sizes_keep_every_byte() {
        assert_eq!(lun_size_bytes(1000, 0).unwrap(), 1024);
        assert_eq!(lun_size_bytes((1 << 20) + 1, 0).unwrap(), (1 << 20) + 512);
        assert_eq!(lun_size_bytes(512, 0).unwrap(), 512);
        assert_eq!(lun_size_bytes(1000, 1).unwrap(), 1 << 20);
        assert_eq!(lun_size_bytes(1 << 20, 1).unwrap(), 1 << 20);
        let e = lun_size_bytes((1 << 20) + 1, 1).unwrap_err().to_string();
        assert!(e.contains("smaller than the 1048577-byte image"), "{e}");
        assert!(lun_size_bytes(1, u64::MAX).is_err());
        assert!(lun_size_bytes(u64::MAX, 0).is_err());
    }

    #[test]
    fn names() {
        for ok in ["disk", "disk-1.2_x", "A"] {
            validate_name(ok).unwrap();
        }
        for (bad, why) in [
            ("", "empty"),
            ("a/b", "'/'"),
            ("..", "start with '.'"),
            (".", "start with '.'"),
            (".hidden", "start with '.'"),
            ("../x", "'/'"),
            ("a b", "' '"),
            ("é", "'é'"),
            ("a\0", "'\\0'"),
        ] {
            let e = validate_name(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
        assert!(validate_name(&"a".repeat(MAX_NAME_LEN + 1)).is_err());
    }

    #[test]
    fn names_from_sources() {
        assert_eq!(name_from_source("/tmp/disk.img.gz"), "disk");
        assert_eq!(name_from_source("https://h/x/fw.img.zst?sig=a/b"), "fw");
        assert_eq!(name_from_source("rootfs.ext4.xz"), "rootfs.ext4");
        assert_eq!(name_from_source("plain.img"), "plain");
        assert_eq!(name_from_source("raw"), "raw");
    }

    #[test]
    fn hex_round_trip() {
        let d: [u8; 32] = std::array::from_fn(|i| (i * 9) as u8);
        assert_eq!(parse_sha256(&to_hex(&d)).unwrap(), d);
        assert_eq!(parse_sha256(&to_hex(&d).to_uppercase()).unwrap(), d);
        assert!(parse_sha256("abc").unwrap_err().to_string().contains("not 64 hex digits"));
        assert!(parse_sha256(&"g".repeat(64)).unwrap_err().to_string().contains("not a hex digit"));
    }
}
