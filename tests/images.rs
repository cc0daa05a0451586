//! Image import (src/images): round trips in every format, sizes, sparseness, the skip sidecar,
//! and every bad input leaving the previous image intact.

use rand::{RngCore, SeedableRng};
use sha2::{Digest, Sha256};
use std::fs::{self, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use uringtgt::images::{
    image_info, import_file, import_image, lun_size_bytes, would_skip, Compression, ImageError, ImportOptions,
};

const MIB: usize = 1 << 20;

fn sha(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// Random data with zero regions: 1.5 MiB random, 2 MiB zero, 100 KiB random, `tail` zero bytes.
fn disk_like(tail: usize) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut v = vec![0u8; 3 * MIB / 2 + 2 * MIB + 100_000 + tail];
    rng.fill_bytes(&mut v[..3 * MIB / 2]);
    rng.fill_bytes(&mut v[3 * MIB / 2 + 2 * MIB..3 * MIB / 2 + 2 * MIB + 100_000]);
    v
}

fn compress(c: Compression, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    match c {
        Compression::None => out.extend_from_slice(data),
        Compression::Gz => {
            let mut e = flate2::write::GzEncoder::new(&mut out, flate2::Compression::fast());
            e.write_all(data).unwrap();
            e.finish().unwrap();
        }
        Compression::Xz => {
            let mut e = liblzma::write::XzEncoder::new(&mut out, 0);
            e.write_all(data).unwrap();
            e.finish().unwrap();
        }
        Compression::Bz2 => {
            let mut e = bzip2::write::BzEncoder::new(&mut out, bzip2::Compression::fast());
            e.write_all(data).unwrap();
            e.finish().unwrap();
        }
        Compression::Zstd => {
            // With a checksum, as the zstd command line writes by default.
            let mut e = zstd::Encoder::new(&mut out, 1).unwrap();
            e.include_checksum(true).unwrap();
            e.write_all(data).unwrap();
            e.finish().unwrap();
        }
    }
    out
}

fn opts(c: Compression) -> ImportOptions {
    ImportOptions { compression: Some(c), ..ImportOptions::default() }
}

/// Reads the file and checks it is the image followed by zeros up to `lun_size`.
fn assert_image(path: &Path, image: &[u8], lun_size: u64) {
    let got = fs::read(path).unwrap();
    assert_eq!(got.len() as u64, lun_size);
    assert!(got[..image.len()] == *image, "image bytes differ");
    assert!(got[image.len()..].iter().all(|&b| b == 0), "padding is not zero");
}

/// The previous image is still there, still vouched for, and no temp file is left.
fn assert_intact(root: &Path, name: &str, old: &[u8]) {
    let path = root.join(format!("{name}.img"));
    assert_image(&path, old, lun_size_bytes(old.len() as u64, 0).unwrap());
    let info = image_info(root, name).unwrap().unwrap();
    assert_eq!(info.sha256, Some(sha(old)), "sidecar lost");
    let temps: Vec<_> = fs::read_dir(root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp-"))
        .collect();
    assert!(temps.is_empty(), "temp files left: {temps:?}");
}

fn with_old_image() -> (tempfile::TempDir, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let old: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8 + 1).collect();
    import_image(dir.path(), "d", &old[..], &ImportOptions::default()).unwrap();
    assert_intact(dir.path(), "d", &old);
    (dir, old)
}

#[test]
fn every_format_round_trips_sparse() {
    let image = disk_like(3000);
    for c in Compression::ALL {
        let dir = tempfile::tempdir().unwrap();
        let wire = compress(c, &image);
        let o = ImportOptions { expected_size: Some(wire.len() as u64), sha256: Some(sha(&image)), ..opts(c) };
        let r = import_image(dir.path(), "disk", &wire[..], &o).unwrap();
        assert_eq!(r.bytes, image.len() as u64, "{c}");
        assert_eq!(r.lun_size, (image.len() as u64).next_multiple_of(512));
        assert_eq!(r.sha256, sha(&image));
        assert!(!r.skipped);
        assert_eq!(r.path, fs::canonicalize(dir.path()).unwrap().join("disk.img"));
        assert_image(&r.path, &image, r.lun_size);
        // The 2 MiB zero region and the zero tail are holes.
        let allocated = fs::metadata(&r.path).unwrap().blocks() * 512;
        assert!(allocated < r.lun_size - MIB as u64, "{c}: {allocated} bytes allocated, not sparse");
        let info = image_info(dir.path(), "disk").unwrap().unwrap();
        assert_eq!((info.size, info.image_bytes, info.sha256), (r.lun_size, Some(r.bytes), Some(r.sha256)));
    }
}

#[test]
fn tails_are_kept_not_rounded_to_mib() {
    let dir = tempfile::tempdir().unwrap();
    for len in [1000usize, MIB + 1, 512, 3 * MIB] {
        let image: Vec<u8> = (0..len).map(|i| (i % 255) as u8 + 1).collect();
        let r = import_image(dir.path(), "t", &image[..], &ImportOptions::default()).unwrap();
        assert_eq!(r.bytes, len as u64);
        assert_eq!(r.lun_size, (len as u64).next_multiple_of(512));
        assert_image(&r.path, &image, r.lun_size);
    }
}

#[test]
fn size_mb_extends_and_must_hold_the_image() {
    let (dir, old) = with_old_image();
    let r =
        import_image(dir.path(), "big", &old[..], &ImportOptions { size_mb: 3, ..ImportOptions::default() }).unwrap();
    assert_eq!(r.lun_size, 3 << 20);
    assert_image(&r.path, &old, 3 << 20);
    let big = vec![1u8; MIB + 1];
    let e = import_image(dir.path(), "d", &big[..], &ImportOptions { size_mb: 1, ..ImportOptions::default() })
        .unwrap_err()
        .to_string();
    assert!(e.contains("smaller than the 1048577-byte image"), "{e}");
    assert_intact(dir.path(), "d", &old);
}

#[test]
fn concatenated_streams_decode_as_one() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (vec![1u8; 70_000], vec![2u8; 30_000]);
    for c in [Compression::Gz, Compression::Xz, Compression::Bz2, Compression::Zstd] {
        let mut wire = compress(c, &a);
        wire.extend(compress(c, &b));
        let r = import_image(dir.path(), "cat", &wire[..], &opts(c)).unwrap();
        assert_eq!(r.bytes, 100_000, "{c}");
        assert_eq!(r.sha256, sha(&[a.clone(), b.clone()].concat()), "{c}");
    }
}

fn expect_err(dir: &Path, old: &[u8], src: impl Read, o: &ImportOptions, want: &str) -> ImageError {
    let e = import_image(dir, "d", src, o).expect_err(&format!("{o:?} should fail with {want:?}"));
    let msg = e.to_string();
    assert!(msg.contains(want), "wanted {want:?} in: {msg}");
    assert_intact(dir, "d", old);
    e
}

#[test]
fn truncated_and_corrupt_streams_keep_the_old_image() {
    let (dir, old) = with_old_image();
    let image = disk_like(0);
    for c in [Compression::Gz, Compression::Xz, Compression::Bz2, Compression::Zstd] {
        let wire = compress(c, &image);
        // Truncated: without an announced size it is the decoder that notices.
        let cut = &wire[..wire.len() * 2 / 3];
        let e = expect_err(dir.path(), &old, cut, &opts(c), "corrupt or truncated");
        assert!(matches!(e, ImageError::Decompress { .. }), "{c}: {e:?}");
        // Truncated with a size announced: reported as the short upload it is.
        let o = ImportOptions { expected_size: Some(wire.len() as u64), ..opts(c) };
        let e = expect_err(dir.path(), &old, cut, &o, "announced bytes");
        assert!(matches!(e, ImageError::ShortInput { .. }), "{c}: {e:?}");
        // Corrupt in the middle.
        let mut bad = wire.clone();
        let mid = bad.len() / 2;
        bad[mid..mid + 64].iter_mut().for_each(|b| *b ^= 0x5a);
        expect_err(dir.path(), &old, &bad[..], &opts(c), "corrupt or truncated");
        // Garbage after the stream.
        let mut trailing = wire.clone();
        trailing.extend_from_slice(b"garbage after the stream");
        expect_err(dir.path(), &old, &trailing[..], &opts(c), "corrupt or truncated");
        // Not this format at all.
        expect_err(dir.path(), &old, &image[..4096], &opts(c), "corrupt or truncated");
    }
}

#[test]
fn digest_mismatch_keeps_the_old_image() {
    let (dir, old) = with_old_image();
    let new = vec![9u8; 10_000];
    let o = ImportOptions { sha256: Some(sha(b"something else")), ..ImportOptions::default() };
    let e = expect_err(dir.path(), &old, &new[..], &o, "sha256 mismatch");
    assert!(e.to_string().contains(&uringtgt::images::to_hex(&sha(&new))));
}

#[test]
fn wrong_byte_counts_keep_the_old_image() {
    let (dir, old) = with_old_image();
    let new = vec![9u8; 10_000];
    // Fewer bytes than announced (the client disconnected).
    let o = ImportOptions { expected_size: Some(10_001), ..ImportOptions::default() };
    expect_err(dir.path(), &old, &new[..], &o, "ended after 10000 of the 10001 announced bytes");
    // More bytes than announced.
    let o = ImportOptions { expected_size: Some(9_999), ..ImportOptions::default() };
    expect_err(dir.path(), &old, &new[..], &o, "more than the 9999 announced bytes");
    // A compressed stream that ends before the announced size.
    let mut wire = compress(Compression::Gz, &new);
    let n = wire.len() as u64;
    wire.extend_from_slice(&[0u8; 100]);
    let o = ImportOptions { expected_size: Some(n + 100), ..opts(Compression::Gz) };
    expect_err(dir.path(), &old, &wire[..], &o, "");
    // Announced size reached: the rest of the source is not read (the next request on a socket).
    let o = ImportOptions { expected_size: Some(n), ..opts(Compression::Gz) };
    let mut src = &wire[..];
    import_image(dir.path(), "other", (&mut src).take(n), &o).unwrap();
    assert_eq!(src.len(), 100);
    // Empty.
    expect_err(dir.path(), &old, &[][..], &ImportOptions::default(), "empty");
}

/// Yields `data`, then fails like a reset connection.
struct Disconnects {
    data: Vec<u8>,
    pos: usize,
}

impl Read for Disconnects {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos == self.data.len() {
            return Err(io::Error::new(io::ErrorKind::ConnectionReset, "peer went away"));
        }
        let n = buf.len().min(self.data.len() - self.pos).min(65536);
        buf[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[test]
fn reader_errors_keep_the_old_image() {
    let (dir, old) = with_old_image();
    let image = disk_like(0);
    for c in Compression::ALL {
        let mut data = compress(c, &image);
        let cut = data.len() * 3 / 4;
        data.truncate(cut);
        let e = expect_err(dir.path(), &old, Disconnects { data, pos: 0 }, &opts(c), "peer went away");
        match e {
            ImageError::Source { offset, .. } => assert_eq!(offset, cut as u64, "{c}"),
            e => panic!("{c}: {e:?}"),
        }
    }
}

/// An image of many import buffers (the pipeline hands 8 MiB at a time): random data with a
/// hole across every 8 MiB boundary. Raw and gz round-trip; a source that breaks off after the
/// first buffers were written, a digest mismatch found only at the end, and a source one byte
/// longer than announced leave the old image.
#[test]
fn multi_buffer_images_round_trip_and_fail_cleanly() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let mut image = vec![0u8; 29 * MIB + 333];
    rng.fill_bytes(&mut image);
    for boundary in [8 * MIB, 16 * MIB, 24 * MIB] {
        image[boundary - 3 * MIB / 2..boundary + MIB / 2].fill(0);
    }
    let (dir, old) = with_old_image();
    for c in [Compression::None, Compression::Gz] {
        let wire = compress(c, &image);
        let o = ImportOptions { expected_size: Some(wire.len() as u64), sha256: Some(sha(&image)), ..opts(c) };
        let r = import_image(dir.path(), "big", &wire[..], &o).unwrap();
        assert_eq!((r.bytes, r.sha256), (image.len() as u64, sha(&image)), "{c}");
        assert_image(&r.path, &image, r.lun_size);
        let allocated = fs::metadata(&r.path).unwrap().blocks() * 512;
        assert!(allocated <= r.lun_size - 5 * MIB as u64, "{c}: {allocated} bytes allocated, not sparse");

        let cut = wire.len() * 3 / 5;
        let src = Disconnects { data: wire[..cut].to_vec(), pos: 0 };
        let e = expect_err(dir.path(), &old, src, &opts(c), "peer went away");
        assert!(matches!(e, ImageError::Source { offset, .. } if offset == cut as u64), "{c}: {e:?}");
        let o = ImportOptions { sha256: Some(sha(b"another image")), ..opts(c) };
        expect_err(dir.path(), &old, &wire[..], &o, "sha256 mismatch");
        // One byte less announced: raw sees the extra byte, gz a stream cut short.
        let o = ImportOptions { expected_size: Some(wire.len() as u64 - 1), ..opts(c) };
        let want = if c == Compression::None { "more than the" } else { "corrupt or truncated" };
        expect_err(dir.path(), &old, &wire[..], &o, want);
    }
}

#[test]
fn bad_names_are_refused_before_anything_is_written() {
    let (dir, old) = with_old_image();
    for name in ["../d", "a/b", "..", "", "/etc/passwd", ".d.img"] {
        let e = import_image(dir.path(), name, &old[..], &ImportOptions::default()).unwrap_err();
        assert!(matches!(e, ImageError::InvalidName { .. }), "{name:?}: {e:?}");
        assert!(image_info(dir.path(), name).is_err());
    }
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 2, "only d.img and its sidecar");
    assert!(!dir.path().parent().unwrap().join("d.img").exists());
}

/// A source that must not be read.
struct Untouchable;

impl Read for Untouchable {
    fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
        panic!("a skipped import read its source");
    }
}

#[test]
fn identical_images_are_skipped_unless_forced() {
    let dir = tempfile::tempdir().unwrap();
    let image = disk_like(10);
    let o = ImportOptions { sha256: Some(sha(&image)), ..ImportOptions::default() };
    assert!(!would_skip(dir.path(), "s", &o).unwrap());
    let first = import_image(dir.path(), "s", &image[..], &o).unwrap();
    assert!(!first.skipped);
    assert!(would_skip(dir.path(), "s", &o).unwrap());
    let again = import_image(dir.path(), "s", Untouchable, &o).unwrap();
    assert_eq!(again, uringtgt::images::ImportResult { skipped: true, ..first.clone() });
    // Forced, another digest, another size, or no digest: imported.
    let forced = ImportOptions { force: true, ..o.clone() };
    assert!(!would_skip(dir.path(), "s", &forced).unwrap());
    assert!(!import_image(dir.path(), "s", &image[..], &forced).unwrap().skipped);
    assert!(!would_skip(dir.path(), "s", &ImportOptions { sha256: Some([0; 32]), ..o.clone() }).unwrap());
    assert!(!would_skip(dir.path(), "s", &ImportOptions { size_mb: 8, ..o.clone() }).unwrap());
    assert!(!would_skip(dir.path(), "s", &ImportOptions { sha256: None, ..o.clone() }).unwrap());
    assert!(would_skip(dir.path(), "s", &o).unwrap());
}

#[test]
fn changes_invalidate_the_sidecar() {
    let dir = tempfile::tempdir().unwrap();
    let image = vec![5u8; 100_000];
    let o = ImportOptions { sha256: Some(sha(&image)), ..ImportOptions::default() };
    let path = import_image(dir.path(), "w", &image[..], &o).unwrap().path;

    // A buffered write right after the import, within the same clock tick.
    OpenOptions::new().write(true).open(&path).unwrap().write_all_at(&[5], 10).unwrap();
    assert_eq!(image_info(dir.path(), "w").unwrap().unwrap().sha256, None, "same bytes, but written");
    assert!(!would_skip(dir.path(), "w", &o).unwrap());

    // An O_DIRECT write through the store iSCSI uses.
    import_image(dir.path(), "w", &image[..], &o).unwrap();
    let store = uringtgt::backing::FileStore::open(&path, false).unwrap();
    store.write_at(&[0u8; 512], 0, true).unwrap();
    drop(store);
    assert_eq!(image_info(dir.path(), "w").unwrap().unwrap().sha256, None);

    // Grown, or replaced by another file.
    import_image(dir.path(), "w", &image[..], &o).unwrap();
    OpenOptions::new().write(true).open(&path).unwrap().set_len(1 << 20).unwrap();
    assert_eq!(image_info(dir.path(), "w").unwrap().unwrap().sha256, None);
    import_image(dir.path(), "w", &image[..], &o).unwrap();
    let meta = fs::metadata(&path).unwrap();
    let copy = dir.path().join("copy");
    fs::copy(&path, &copy).unwrap();
    OpenOptions::new().write(true).open(&copy).unwrap().set_modified(meta.modified().unwrap()).unwrap();
    fs::rename(&copy, &path).unwrap();
    assert_eq!(image_info(dir.path(), "w").unwrap().unwrap().sha256, None);

    // A corrupt sidecar counts as none.
    import_image(dir.path(), "w", &image[..], &o).unwrap();
    fs::write(dir.path().join(".w.img.sha256"), "{not json").unwrap();
    let info = image_info(dir.path(), "w").unwrap().unwrap();
    assert_eq!((info.sha256, info.size), (None, 100_352));
    assert!(image_info(dir.path(), "none").unwrap().is_none());
}

#[test]
fn server_local_files() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let image = disk_like(1);
    let outside = dir.path().join("src.img.zst");
    fs::write(&outside, compress(Compression::Zstd, &image)).unwrap();
    // Absolute source outside root_dir, compression from the extension.
    let r = import_file(&root, "a", &outside, &ImportOptions::default()).unwrap();
    assert_eq!((r.bytes, r.sha256), (image.len() as u64, sha(&image)));
    assert_eq!(r.path, fs::canonicalize(&root).unwrap().join("a.img"));
    // Relative to root_dir; the compression given wins over the extension.
    fs::write(root.join("raw.gz"), &image).unwrap();
    let r = import_file(&root, "b", Path::new("raw.gz"), &opts(Compression::None)).unwrap();
    assert_eq!(r.sha256, sha(&image));
    // Re-importing an image from itself.
    let r = import_file(&root, "b", Path::new("b.img"), &ImportOptions::default()).unwrap();
    assert_eq!(r.bytes, r.lun_size);
    // Missing, a directory, a size that does not match.
    let e = import_file(&root, "c", Path::new("nope.img"), &ImportOptions::default()).unwrap_err();
    assert!(e.to_string().contains("nope.img: open: "), "{e}");
    let e = import_file(&root, "c", dir.path(), &ImportOptions::default()).unwrap_err();
    assert!(e.to_string().contains("not a regular file"), "{e}");
    let o = ImportOptions { expected_size: Some(5), ..ImportOptions::default() };
    let e = import_file(&root, "c", &root.join("b.img"), &o).unwrap_err();
    assert!(e.to_string().contains("more than the 5 announced bytes"), "{e}");
    assert!(!root.join("c.img").exists());
}
