//! The digest sidecar `<root_dir>/.<name>.img.sha256`: the SHA-256 of an image as imported,
//! trusted only while the image file is the same inode with the same size and mtime. A write
//! through iSCSI (O_DIRECT writes update mtime), a truncation or a replacement invalidates it.

use super::writer::sync_dir;
use super::{image_file_name, to_hex, validate_name, ImageError};
use serde::{Deserialize, Serialize};
use std::fs::{self, Metadata};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// What the sidecar records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Sidecar {
    /// Hex SHA-256 of the uncompressed image.
    pub sha256: String,
    /// Uncompressed image bytes (the file may be longer: extended to the LUN size).
    pub image_bytes: u64,
    /// The file's size, mtime and inode when the sidecar was written.
    pub size: u64,
    pub mtime_ns: i128,
    pub ino: u64,
}

/// An image file under root_dir, and its digest when the sidecar still vouches for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ImageInfo {
    pub name: String,
    pub path: PathBuf,
    /// The file's size in bytes (what a LUN over it exports).
    pub size: u64,
    /// Bytes of the image as imported, when the digest is known.
    pub image_bytes: Option<u64>,
    /// SHA-256 of the first `image_bytes` bytes; `None` when no valid sidecar exists (never
    /// imported, or changed since).
    #[serde(serialize_with = "hex_opt")]
    pub sha256: Option<[u8; 32]>,
    pub mtime_ns: i128,
}

fn hex_opt<S: serde::Serializer>(v: &Option<[u8; 32]>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(d) => s.serialize_some(&to_hex(d)),
        None => s.serialize_none(),
    }
}

pub(crate) fn sidecar_path(root: &Path, name: &str) -> PathBuf {
    root.join(format!(".{}.sha256", image_file_name(name)))
}

pub(crate) fn mtime_ns(m: &Metadata) -> i128 {
    i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec())
}

impl Sidecar {
    pub fn for_file(meta: &Metadata, sha256: &[u8; 32], image_bytes: u64) -> Sidecar {
        Sidecar { sha256: to_hex(sha256), image_bytes, size: meta.len(), mtime_ns: mtime_ns(meta), ino: meta.ino() }
    }

    fn matches(&self, meta: &Metadata) -> bool {
        self.size == meta.len() && self.mtime_ns == mtime_ns(meta) && self.ino == meta.ino()
    }

    /// Writes the sidecar through a temp file and a rename, so a reader never sees half of one.
    pub fn write(&self, root: &Path, name: &str) -> Result<(), ImageError> {
        let path = sidecar_path(root, name);
        let tmp = root.join(format!(".{}.sha256.tmp-{}", image_file_name(name), std::process::id()));
        let text = serde_json::to_string(self).expect("a Sidecar always serialises") + "\n";
        fs::write(&tmp, text).map_err(ImageError::io(&tmp, "write sidecar"))?;
        if let Err(e) = fs::rename(&tmp, &path) {
            let _ = fs::remove_file(&tmp);
            return Err(ImageError::io(&path, "rename sidecar")(e));
        }
        sync_dir(root)
    }

    /// The sidecar of `name`, if there is a readable one (a corrupt one counts as none).
    pub fn read(root: &Path, name: &str) -> Option<Sidecar> {
        let path = sidecar_path(root, name);
        let text = fs::read_to_string(&path).ok()?;
        match serde_json::from_str(&text) {
            Ok(s) => Some(s),
            Err(e) => {
                log::warn!("{}: ignoring unreadable sidecar: {e}", path.display());
                None
            }
        }
    }
}

/// Removes the sidecar of `name`, if any (before the image changes in a way mtime misses).
pub(crate) fn remove_sidecar(root: &Path, name: &str) {
    let _ = fs::remove_file(sidecar_path(root, name));
}

/// Size and, while the sidecar is valid, SHA-256 of image `name` under `root_dir`; `None` when
/// there is no such image.
pub fn image_info(root_dir: &Path, name: &str) -> Result<Option<ImageInfo>, ImageError> {
    validate_name(name)?;
    let path = root_dir.join(image_file_name(name));
    let meta = match fs::metadata(&path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(ImageError::io(&path, "stat")(e)),
    };
    if !meta.is_file() {
        return Err(ImageError::io(&path, "stat")(io::Error::other("not a regular file")));
    }
    let valid = Sidecar::read(root_dir, name).filter(|s| s.matches(&meta));
    let digest = valid.as_ref().and_then(|s| super::parse_sha256(&s.sha256).ok());
    Ok(Some(ImageInfo {
        name: name.to_owned(),
        path,
        size: meta.len(),
        image_bytes: valid.filter(|_| digest.is_some()).map(|s| s.image_bytes),
        sha256: digest,
        mtime_ns: mtime_ns(&meta),
    }))
}
