//! Client-side helpers: opening a local image source, digesting it the way the server will,
//! and counting progress while it streams.

use super::decompress::WireReader;
use super::writer::read_full;
use super::{Compression, ImageError};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

/// A source to upload: its bytes, their count (when known) and compression.
pub struct Source {
    pub reader: Box<dyn Read + Send>,
    /// Bytes on the wire; `None` when unknown (the upload then needs it another way).
    pub len: Option<u64>,
    pub compression: Compression,
}

/// Opens a local file, compression from its extension. URLs are refused with a clear error
/// until an HTTP client is wired in.
pub fn open_source(spec: &str) -> Result<Source, ImageError> {
    if spec.starts_with("http://") || spec.starts_with("https://") {
        return Err(ImageError::Http { url: spec.to_owned(), reason: "HTTP(S) sources are not supported yet".into() });
    }
    let path = PathBuf::from(spec);
    let bad = |reason: String| ImageError::BadSource { path: path.clone(), reason };
    let file = File::open(&path).map_err(|e| bad(format!("open: {e}")))?;
    let meta = file.metadata().map_err(|e| bad(format!("stat: {e}")))?;
    if !meta.is_file() {
        return Err(bad("not a regular file".into()));
    }
    Ok(Source { reader: Box::new(file), len: Some(meta.len()), compression: Compression::from_extension(&path) })
}

/// The uncompressed size and SHA-256 of an image source: what the server's sidecar records, so
/// a client can ask [`super::image_info`] whether sending it can be skipped.
pub fn digest_image(src: impl Read, compression: Compression) -> Result<(u64, [u8; 32]), ImageError> {
    let (mut wire, state) = WireReader::new(src, None);
    let mut hasher = Sha256::new();
    let mut total = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    let err = |e: io::Error, state: &super::decompress::WireState| match state.error.borrow_mut().take() {
        Some(source) => ImageError::Source { offset: state.bytes.get(), source },
        None => ImageError::Decompress { compression, offset: state.bytes.get(), source: e },
    };
    let mut decoder = compression.decoder(&mut wire).map_err(|e| err(e, &state))?;
    loop {
        let n = read_full(&mut decoder, &mut buf).map_err(|e| err(e, &state))?;
        hasher.update(&buf[..n]);
        total += n as u64;
        if n < buf.len() {
            return Ok((total, hasher.finalize().into()));
        }
    }
}

/// [`digest_image`] of a local file, compression from its extension.
pub fn digest_file(path: &Path) -> Result<(u64, [u8; 32]), ImageError> {
    let file =
        File::open(path).map_err(|e| ImageError::BadSource { path: path.to_owned(), reason: format!("open: {e}") })?;
    digest_image(file, Compression::from_extension(path))
}

/// Calls `on_progress(total bytes so far)` as bytes are read: drives a progress bar.
pub struct Progress<R, F> {
    inner: R,
    done: u64,
    on_progress: F,
}

impl<R: Read, F: FnMut(u64)> Progress<R, F> {
    pub fn new(inner: R, on_progress: F) -> Self {
        Self { inner, done: 0, on_progress }
    }
}

impl<R: Read, F: FnMut(u64)> Read for Progress<R, F> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.done += n as u64;
        (self.on_progress)(self.done);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn digest_matches_the_import() {
        let dir = tempfile::tempdir().unwrap();
        let image: Vec<u8> = (0..300_000u32).map(|i| (i % 7) as u8).collect();
        let path = dir.path().join("x.img.gz");
        let mut e = flate2::write::GzEncoder::new(File::create(&path).unwrap(), flate2::Compression::fast());
        e.write_all(&image).unwrap();
        e.finish().unwrap();
        let (bytes, digest) = digest_file(&path).unwrap();
        let src = open_source(path.to_str().unwrap()).unwrap();
        assert_eq!(src.compression, Compression::Gz);
        let mut seen = 0;
        let opts = super::super::ImportOptions {
            compression: Some(src.compression),
            expected_size: src.len,
            ..Default::default()
        };
        let r = super::super::import_image(dir.path(), "x", Progress::new(src.reader, |n| seen = n), &opts).unwrap();
        assert_eq!((r.bytes, r.sha256), (bytes, digest));
        assert_eq!(seen, std::fs::metadata(&path).unwrap().len());
        assert!(matches!(open_source("https://example.invalid/x.img"), Err(ImageError::Http { .. })));
        assert!(open_source(dir.path().to_str().unwrap()).is_err());
    }
}
