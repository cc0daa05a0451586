//! Importing an image: source → byte counter → decoder → SHA-256 → sparse temp file → rename.

use super::decompress::{WireReader, WireState};
use super::sidecar::{image_info, remove_sidecar, Sidecar};
use super::writer::{self, Faults, TempImage};
use super::{
    image_file_name, lun_size_bytes, to_hex, validate_name, Compression, ImageError, ImportOptions, ImportResult,
};
use sha2::{Digest, Sha256};
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// Imports image `name` from `src` into `<root_dir>/<name>.img` (root_dir is created if
/// missing). See the [module](super) docs for the guarantees on failure.
///
/// With `opts.expected_size`, `src` is read up to exactly that many bytes and then probed once
/// for more: pass a source that ends there (for a socket, `(&mut stream).take(size)`), or the
/// probe blocks on the next request. When the image in place has `opts.sha256` and `!opts.force`,
/// nothing is read and `skipped` is true: a caller whose client sends the bytes regardless must
/// decide with [`would_skip`] first and drain or refuse them itself.
pub fn import_image(
    root_dir: &Path,
    name: &str,
    src: impl Read,
    opts: &ImportOptions,
) -> Result<ImportResult, ImageError> {
    import_with(root_dir, name, src, opts.compression.unwrap_or_default(), opts, Faults::default())
}

/// Imports image `name` from a file already on this machine. `src_path` may be absolute or
/// relative to root_dir; only the destination is confined to root_dir. The compression is
/// `opts.compression`, or else the file name's extension.
pub fn import_file(
    root_dir: &Path,
    name: &str,
    src_path: &Path,
    opts: &ImportOptions,
) -> Result<ImportResult, ImageError> {
    let (path, file) = open_source(root_dir, src_path)?;
    import_open_file(root_dir, name, &path, file, opts)
}

/// `src_path` taken against root_dir (an absolute one stays as it is), opened for reading.
fn open_source(root_dir: &Path, src_path: &Path) -> Result<(PathBuf, File), ImageError> {
    let path = root_dir.join(src_path);
    match File::open(&path) {
        Ok(file) => Ok((path, file)),
        Err(e) => Err(ImageError::BadSource { path, reason: format!("open: {e}") }),
    }
}

/// [`import_file`] for a caller that must not read any file the process can: the source must
/// resolve (symlinks followed) inside root_dir or one of `allowed_dirs`, else
/// [`ImageError::BadSource`]. The check is made on the opened file itself, so a path swapped
/// for a symlink after the check cannot redirect the read.
pub fn import_file_within(
    root_dir: &Path,
    allowed_dirs: &[PathBuf],
    name: &str,
    src_path: &Path,
    opts: &ImportOptions,
) -> Result<ImportResult, ImageError> {
    let (path, file) = open_source(root_dir, src_path)?;
    let bad = |reason: String| ImageError::BadSource { path: path.clone(), reason };
    let real = fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))
        .or_else(|_| fs::canonicalize(&path))
        .map_err(|e| bad(format!("resolve: {e}")))?;
    let dirs: Vec<PathBuf> = std::iter::once(root_dir)
        .chain(allowed_dirs.iter().map(PathBuf::as_path))
        .filter_map(|d| fs::canonicalize(d).ok())
        .collect();
    if !dirs.iter().any(|d| real.starts_with(d)) {
        let list: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
        return Err(bad(format!(
            "resolves to {}, outside root_dir and import_dirs ({})",
            real.display(),
            list.join(", ")
        )));
    }
    import_open_file(root_dir, name, &path, file, opts)
}

fn import_open_file(
    root_dir: &Path,
    name: &str,
    path: &Path,
    file: File,
    opts: &ImportOptions,
) -> Result<ImportResult, ImageError> {
    let bad = |reason: String| ImageError::BadSource { path: path.to_owned(), reason };
    let meta = file.metadata().map_err(|e| bad(format!("stat: {e}")))?;
    if !meta.is_file() {
        return Err(bad("not a regular file".into()));
    }
    let compression = opts.compression.unwrap_or_else(|| Compression::from_extension(path));
    // A file growing or shrinking while it is read is caught like a short or long upload.
    let opts = ImportOptions { expected_size: opts.expected_size.or(Some(meta.len())), ..opts.clone() };
    import_with(root_dir, name, file, compression, &opts, Faults::default())
}

/// Whether importing `name` with `opts` would be skipped: `opts.sha256` given, `!opts.force`,
/// and the image in place has that digest (valid sidecar) and the size `opts.size_mb` asks for.
pub fn would_skip(root_dir: &Path, name: &str, opts: &ImportOptions) -> Result<bool, ImageError> {
    Ok(skip_result(root_dir, name, opts)?.is_some())
}

fn skip_result(root: &Path, name: &str, opts: &ImportOptions) -> Result<Option<ImportResult>, ImageError> {
    let (Some(want), false) = (opts.sha256, opts.force) else { return Ok(None) };
    let Some(info) = image_info(root, name)? else { return Ok(None) };
    let (Some(have), Some(bytes)) = (info.sha256, info.image_bytes) else { return Ok(None) };
    if have != want || lun_size_bytes(bytes, opts.size_mb).ok() != Some(info.size) {
        return Ok(None);
    }
    Ok(Some(ImportResult { path: info.path, bytes, lun_size: info.size, sha256: have, skipped: true }))
}

/// Creates root_dir if missing and returns its canonical path: the temp file and the image are
/// siblings in it, so the rename is atomic.
fn prepare_root(root_dir: &Path) -> Result<PathBuf, ImageError> {
    fs::create_dir_all(root_dir).map_err(ImageError::io(root_dir, "create root_dir"))?;
    fs::canonicalize(root_dir).map_err(ImageError::io(root_dir, "resolve root_dir"))
}

pub(crate) fn import_with(
    root_dir: &Path,
    name: &str,
    src: impl Read,
    compression: Compression,
    opts: &ImportOptions,
    faults: Faults,
) -> Result<ImportResult, ImageError> {
    validate_name(name)?;
    // Checked before any byte is read: a bad size_mb fails fast.
    lun_size_bytes(0, opts.size_mb)?;
    let root = prepare_root(root_dir)?;
    if let Some(skipped) = skip_result(&root, name, opts)? {
        log::info!("{}: sha256 {} already in place, skipped", skipped.path.display(), skipped.sha256_hex());
        return Ok(skipped);
    }
    let file_name = image_file_name(name);
    let dest = root.join(&file_name);
    let (mut wire, state) = WireReader::new(src, opts.expected_size);
    let classify = |e: io::Error| classify(e, &state, compression, opts.expected_size);

    let mut tmp = TempImage::create(&root, &file_name, faults)?;
    let mut hasher = Sha256::new();
    let bytes = {
        let mut decoder = compression.decoder(&mut wire).map_err(classify)?;
        writer::pipe(
            &mut tmp,
            |buf| writer::read_full(&mut decoder, buf).map_err(classify),
            |data| hasher.update(data),
        )?
    };
    check_wire(&mut wire, &state, compression, opts.expected_size)?;
    if bytes == 0 {
        return Err(ImageError::Empty);
    }
    let sha256: [u8; 32] = hasher.finalize().into();
    if let Some(want) = opts.sha256 {
        if want != sha256 {
            return Err(ImageError::DigestMismatch { expected: to_hex(&want), actual: to_hex(&sha256) });
        }
    }
    let lun_size = lun_size_bytes(bytes, opts.size_mb)
        .map_err(|e| ImageError::InvalidSize { name: name.to_owned(), reason: e.to_string() })?;
    // The digest is known only now when the client sent none (a URL, a raw upload): an image
    // identical to the one in place, at the same LUN size, is dropped rather than renamed over
    // it, so the LUN serving it is left alone (no replace, no unit attention).
    if !opts.force {
        let same = ImportOptions { sha256: Some(sha256), ..opts.clone() };
        if let Some(skipped) = skip_result(&root, name, &same)?.filter(|s| s.bytes == bytes) {
            log::info!("{}: sha256 {} already in place, dropped the copy", skipped.path.display(), to_hex(&sha256));
            return Ok(skipped);
        }
    }
    tmp.finish(lun_size)?;
    // Gone before the rename: a crash in between leaves no sidecar rather than a stale one.
    remove_sidecar(&root, name);
    tmp.persist(&dest)?;
    match fs::metadata(&dest) {
        Ok(meta) => {
            if let Err(e) = Sidecar::for_file(&meta, &sha256, bytes).write(&root, name) {
                // The image is in place; only the next upload's skip is lost.
                log::warn!("{e}");
            }
        }
        Err(e) => log::warn!("{}: stat after rename: {e}", dest.display()),
    }
    log::info!(
        "{}: imported {bytes} bytes ({compression}, {} on the wire), sha256 {}",
        dest.display(),
        state.bytes.get(),
        to_hex(&sha256)
    );
    Ok(ImportResult { path: dest, bytes, lun_size, sha256, skipped: false })
}

/// The decoder ended cleanly: the source must have held exactly the announced bytes.
fn check_wire<R: Read>(
    wire: &mut WireReader<R>,
    state: &WireState,
    compression: Compression,
    expected: Option<u64>,
) -> Result<(), ImageError> {
    let got = state.bytes.get();
    match expected {
        Some(n) if got < n && state.eof.get() => Err(ImageError::ShortInput { expected: n, got }),
        Some(n) if got < n => Err(ImageError::TrailingData {
            reason: format!("the {compression} stream ended after {got} of the {n} announced bytes"),
        }),
        Some(n) => {
            // At the limit: anything further is more than announced.
            let mut probe = [0u8; 1];
            match wire.probe(&mut probe) {
                Ok(0) => Ok(()),
                Ok(_) => Err(ImageError::TrailingData {
                    reason: format!("the source holds more than the {n} announced bytes"),
                }),
                Err(source) => Err(ImageError::Source { offset: got, source }),
            }
        }
        None => Ok(()),
    }
}

/// Tells a source failure, a short source and a bad stream apart.
fn classify(e: io::Error, state: &WireState, compression: Compression, expected: Option<u64>) -> ImageError {
    let offset = state.bytes.get();
    if let Some(source) = state.error.borrow_mut().take() {
        return ImageError::Source { offset, source };
    }
    if let Some(n) = expected {
        if state.eof.get() && offset < n {
            return ImageError::ShortInput { expected: n, got: offset };
        }
    }
    ImageError::Decompress { compression, offset, source: e }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes through a given fault: ENOSPC half-way leaves the old image.
    #[test]
    fn full_disk_keeps_the_old_image() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let old = vec![3u8; 4096];
        import_image(root, "d", &old[..], &ImportOptions::default()).unwrap();
        let new = vec![4u8; 3 << 20];
        let faults = Faults { write_error_at: Some((2 << 20, libc::ENOSPC)) };
        let e = import_with(root, "d", &new[..], Compression::None, &ImportOptions::default(), faults).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, ImageError::Write { .. }) && msg.contains("No space left on device"), "{msg}");
        assert_eq!(fs::read(root.join("d.img")).unwrap(), old);
        let left: Vec<_> = fs::read_dir(root).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert!(left.iter().all(|n| !n.to_string_lossy().contains(".tmp-")), "{left:?}");
        assert!(image_info(root, "d").unwrap().unwrap().sha256.is_some());
    }
}
