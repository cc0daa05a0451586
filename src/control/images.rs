//! The image methods: `image_info`, `upload_image` (the image bytes follow the request line on
//! the same connection) and `import_image` (a file already on the server), each importing
//! through [`crate::images`] and then (re-)exporting the image as the LUN of the same name.
//!
//! Replacing an image that is exported and in use: the library writes a temp file and renames
//! it over `<name>.img` only once it is complete and verified. Until the LUN is re-added, the
//! old LUN keeps its descriptor on the old inode and serves the OLD data, so no initiator ever
//! reads a half-written (or the wrong half of an) image. Re-adding replaces the LUN atomically:
//! in-flight I/O to the old one is drained and sessions get a unit attention. On any failure
//! before the rename, the old image, its digest and its LUN are untouched.
//!
//! Skipping: a client computes the SHA-256 of the uncompressed image and calls `image_info`;
//! when the digests match (and `force` is not asked) it sends `upload_image` with `size: 0`
//! and the digest, a conditional re-export that succeeds with `skipped: true` only if that
//! image is still in place. An `upload_image` that carries the bytes of an image already in
//! place is skipped too: the server drains the bytes without writing them when the client
//! gave the digest, or hashes them and drops the copy when it did not (a URL, a raw upload).

use super::methods::map_target_error;
use super::rpc::{self, decode_params, RpcError};
use crate::backing::BackingKind;
use crate::config::LunConfig;
use crate::images::{self, Compression, ImageError, ImportOptions, ImportResult};
use crate::scsi::Lun;
use crate::target::Target;
use serde::Deserialize;
use serde_json::{json, Value};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// Errors of the image methods, mapped to JSON-RPC errors by [`ImageMethodError::rpc`].
#[derive(Debug, thiserror::Error)]
pub enum ImageMethodError {
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("no image named {0:?}")]
    NotFound(String),
    /// A conditional (0-byte) upload whose digest is not the image's in place.
    #[error("{name}: no image with sha256 {sha256} is in place; send the image bytes")]
    NotInPlace { name: String, sha256: String },
    /// Another LUN serves the file this image would replace.
    #[error("{path} is served by LUN {by:?}; remove it first")]
    FileInUse { path: PathBuf, by: String },
    /// Imported, but exporting it failed.
    #[error("imported {path}, but exporting it failed: {}", .error.message)]
    Export { path: PathBuf, error: RpcError },
    /// A parameter is unusable (a bad initiator name).
    #[error("{0}")]
    Params(String),
}

impl ImageMethodError {
    pub fn rpc(self) -> RpcError {
        let code = match &self {
            ImageMethodError::Params(_) => rpc::INVALID_PARAMS,
            ImageMethodError::Image(e) => match e {
                ImageError::InvalidName { .. }
                | ImageError::InvalidDigest { .. }
                | ImageError::InvalidCompression(_)
                | ImageError::InvalidSize { .. }
                | ImageError::Http { .. } => rpc::INVALID_PARAMS,
                ImageError::Write { source, .. } if source.raw_os_error() == Some(libc::ENOSPC) => rpc::NO_SPACE,
                ImageError::Io { source, .. } if source.raw_os_error() == Some(libc::ENOSPC) => rpc::NO_SPACE,
                ImageError::Io { .. } | ImageError::Write { .. } => rpc::IO_ERROR,
                ImageError::BadSource { .. } => rpc::PATH_REJECTED,
                ImageError::DigestMismatch { .. } => rpc::DIGEST_MISMATCH,
                _ => rpc::BAD_UPLOAD,
            },
            ImageMethodError::NotFound(_) => rpc::IMAGE_NOT_FOUND,
            ImageMethodError::NotInPlace { .. } => rpc::DIGEST_MISMATCH,
            ImageMethodError::FileInUse { .. } => rpc::LUN_CONFLICT,
            ImageMethodError::Export { error, .. } => error.code,
        };
        RpcError::new(code, self.to_string())
    }
}

/// Parameters shared by `upload_image` and `import_image` after their source.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UploadParams {
    name: String,
    /// Bytes on the wire after the request line.
    size: u64,
    #[serde(default)]
    compression: Option<String>,
    #[serde(default)]
    sha256: Option<String>,
    #[serde(default)]
    size_mb: u64,
    #[serde(default)]
    force: bool,
    #[serde(default)]
    read_only: bool,
    /// Initiator names that see the LUN; empty: all.
    #[serde(default)]
    initiators: Vec<String>,
}
pub const UPLOAD_PARAMS: &[&str] =
    &["name", "size", "compression", "sha256", "size_mb", "force", "read_only", "initiators"];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ImportParams {
    name: String,
    src_path: PathBuf,
    #[serde(default)]
    compression: Option<String>,
    #[serde(default)]
    sha256: Option<String>,
    #[serde(default)]
    size_mb: u64,
    #[serde(default)]
    force: bool,
    #[serde(default)]
    read_only: bool,
    #[serde(default)]
    initiators: Vec<String>,
}
pub const IMPORT_PARAMS: &[&str] =
    &["name", "src_path", "compression", "sha256", "size_mb", "force", "read_only", "initiators"];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InfoParams {
    name: String,
}

/// What an import and export need besides the source.
struct Plan {
    name: String,
    read_only: bool,
    initiators: Vec<String>,
    opts: ImportOptions,
}

fn plan(
    target: &Target,
    name: String,
    compression: Option<&str>,
    sha256: Option<&str>,
    size_mb: u64,
    force: bool,
    read_only: bool,
) -> Result<Plan, ImageMethodError> {
    images::validate_name(&name)?;
    let compression = compression.map(Compression::from_str).transpose()?;
    let sha256 = sha256.map(images::parse_sha256).transpose()?;
    // Refused before any byte is read.
    images::lun_size_bytes(0, size_mb)?;
    check_file_free(target, &name)?;
    let initiators = Vec::new();
    Ok(Plan {
        name,
        read_only,
        initiators,
        opts: ImportOptions { compression, expected_size: None, sha256, size_mb, force },
    })
}

/// `image_info {name}` → `{name, path, size, image_bytes, sha256}`.
pub fn image_info(target: &Target, params: Value) -> Result<Value, RpcError> {
    let p: InfoParams = decode_params(params, &["name"])?;
    let root = &target.config().root_dir;
    match images::image_info(root, &p.name) {
        Ok(Some(info)) => Ok(json!({
            "name": info.name,
            "path": info.path.display().to_string(),
            "size": info.size,
            "image_bytes": info.image_bytes,
            "sha256": info.sha256.as_ref().map(|d| images::to_hex(d)),
        })),
        Ok(None) => Err(ImageMethodError::NotFound(p.name).rpc()),
        Err(e) => Err(ImageMethodError::from(e).rpc()),
    }
}

/// `import_image {name, src_path, compression?, sha256?, size_mb, force, read_only}`.
pub fn import_image(target: &Target, params: Value) -> Result<Value, RpcError> {
    let p: ImportParams = decode_params(params, IMPORT_PARAMS)?;
    let run = || {
        let mut plan =
            plan(target, p.name, p.compression.as_deref(), p.sha256.as_deref(), p.size_mb, p.force, p.read_only)?;
        plan.initiators = checked_initiators(p.initiators)?;
        let cfg = target.config();
        let res = images::import_file_within(&cfg.root_dir, &cfg.import_dirs, &plan.name, &p.src_path, &plan.opts)?;
        export(target, &plan, &res)
    };
    let started = std::time::Instant::now();
    let result = run();
    let bytes = result.as_ref().ok().and_then(|v| v["bytes"].as_u64()).unwrap_or(0);
    crate::metrics::upload_finished(result.as_ref().ok(), bytes, started.elapsed());
    result.map_err(ImageMethodError::rpc)
}

/// How an `upload_image` ended, for the connection that carried it.
pub struct Upload {
    pub result: Result<Value, RpcError>,
    /// The payload was not read to its announced end (or its size is unknown): the connection
    /// cannot find the next request line and must be closed after the answer.
    pub close: bool,
}

/// `upload_image {name, size, compression, sha256?, size_mb, force, read_only}` followed by
/// `size` raw bytes read from `payload` (the connection's buffered reader, which may already
/// hold some of them). Every path reads exactly `size` bytes, or reports that it could not.
pub fn upload_image(target: &Target, params: Value, payload: &mut impl Read) -> Upload {
    let p: UploadParams = match decode_params(params.clone(), UPLOAD_PARAMS) {
        Ok(p) => p,
        Err(e) => {
            // The bytes still follow: skip them if their count is readable, else give up on
            // the connection.
            return match announced_size(&params) {
                Some(size) => Upload { result: Err(e), close: drain(payload, size).is_err() },
                None => Upload { result: Err(e), close: true },
            };
        }
    };
    let size = p.size;
    let mut wire = payload.take(size);
    let started = std::time::Instant::now();
    let result = upload(target, p, &mut wire);
    crate::metrics::upload_finished(result.as_ref().ok(), size - wire.limit(), started.elapsed());
    // Whatever the import left unread (it failed early, or skipped) is drained so the next
    // request line is found; a short stream ends the connection.
    let left = wire.limit();
    let close = drain(&mut wire, left).is_err();
    Upload { result: result.map_err(ImageMethodError::rpc), close }
}

fn upload(target: &Target, p: UploadParams, wire: &mut impl Read) -> Result<Value, ImageMethodError> {
    let size = p.size;
    let mut plan =
        plan(target, p.name, p.compression.as_deref(), p.sha256.as_deref(), p.size_mb, p.force, p.read_only)?;
    plan.initiators = checked_initiators(p.initiators)?;
    let root = &target.config().root_dir;
    if images::would_skip(root, &plan.name, &plan.opts)? {
        drain(wire, size).map_err(|e| ImageError::Source { offset: 0, source: e })?;
        return export_in_place(target, &plan);
    }
    // Without a digest, 0 bytes are not a conditional re-export but an empty image.
    if size == 0 && plan.opts.sha256.is_none() {
        return Err(ImageError::Empty.into());
    }
    if size == 0 {
        let sha256 = plan.opts.sha256.map_or_else(|| "(none given)".into(), |d| images::to_hex(&d));
        return Err(ImageMethodError::NotInPlace { name: plan.name, sha256 });
    }
    plan.opts.expected_size = Some(size);
    let res = images::import_image(root, &plan.name, wire, &plan.opts)?;
    export(target, &plan, &res)
}

/// `size` from params that did not decode as a whole: named or second positional.
fn announced_size(params: &Value) -> Option<u64> {
    match params {
        Value::Object(o) => o.get("size").and_then(Value::as_u64),
        Value::Array(a) => a.get(1).and_then(Value::as_u64),
        _ => None,
    }
}

/// A LUN's `initiators` parameter, checked before any byte is imported.
fn checked_initiators(initiators: Vec<String>) -> Result<Vec<String>, ImageMethodError> {
    crate::config::validate_initiator_list(&initiators, "initiators")
        .map_err(|e| ImageMethodError::Params(e.to_string()))?;
    Ok(initiators)
}

/// Reads and discards exactly `n` bytes; an early end is an error.
fn drain(r: &mut impl Read, n: u64) -> io::Result<()> {
    let got = io::copy(&mut r.take(n), &mut io::sink())?;
    if got < n {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, format!("{got} of {n} bytes")));
    }
    Ok(())
}

/// Refuses an image whose file another LUN (of another name) serves: renaming over it would
/// leave that LUN on the old inode.
fn check_file_free(target: &Target, name: &str) -> Result<(), ImageMethodError> {
    let Ok(root) = std::fs::canonicalize(&target.config().root_dir) else { return Ok(()) };
    let path = root.join(images::image_file_name(name));
    let (table, _) = target.shared().lun_table();
    let by = table.iter().find(|l| l.name != name && l.path.as_ref() == Some(&path)).map(|l| l.name.clone());
    match by {
        Some(by) => Err(ImageMethodError::FileInUse { path, by }),
        None => Ok(()),
    }
}

/// Exports a freshly imported image: the LUN is (re-)added over the new inode.
fn export(target: &Target, plan: &Plan, res: &ImportResult) -> Result<Value, ImageMethodError> {
    if res.skipped {
        return export_in_place(target, plan);
    }
    let lun = add(target, plan, &res.path)?;
    Ok(answer(target, &lun, res.bytes, &res.sha256, false))
}

/// Exports the image in place, skipped: the LUN is left alone when it already serves this very
/// file (same inode, size and mode), so initiators see no unit attention.
fn export_in_place(target: &Target, plan: &Plan) -> Result<Value, ImageMethodError> {
    let root = &target.config().root_dir;
    let info = images::image_info(root, &plan.name)?.ok_or_else(|| ImageMethodError::NotFound(plan.name.clone()))?;
    let (bytes, sha256) = match (info.image_bytes, info.sha256) {
        (Some(b), Some(d)) => (b, d),
        _ => {
            let sha256 = plan.opts.sha256.map_or_else(String::new, |d| images::to_hex(&d));
            return Err(ImageMethodError::NotInPlace { name: plan.name.clone(), sha256 });
        }
    };
    let (table, _) = target.shared().lun_table();
    let current = table.by_name(&plan.name).cloned();
    drop(table);
    let same = |l: &Lun| serves(l, &info.path, info.size, plan.read_only) && l.initiators == plan.initiators;
    let lun = match current.filter(|l| same(l)) {
        Some(l) => l,
        None => add(target, plan, &info.path)?,
    };
    Ok(answer(target, &lun, bytes, &sha256, true))
}

/// Whether `lun` serves the file now at `path`, with this size and mode.
fn serves(lun: &Lun, path: &Path, size: u64, read_only: bool) -> bool {
    let (Some(fd), Ok(meta)) = (lun.backing.ring_fd(), std::fs::metadata(path)) else { return false };
    // SAFETY: stat is plain data, filled by fstat before it is read.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fd is the LUN's open descriptor, alive while `lun` is held.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return false;
    }
    use std::os::unix::fs::MetadataExt;
    st.st_ino == meta.ino() && st.st_dev == meta.dev() && lun.size_bytes() == size && lun.read_only == read_only
}

fn add(target: &Target, plan: &Plan, path: &Path) -> Result<std::sync::Arc<Lun>, ImageMethodError> {
    let lc = LunConfig {
        name: plan.name.clone(),
        file_path: Some(PathBuf::from(images::image_file_name(&plan.name))),
        // The import already sized the file to the LUN size.
        size_mb: 0,
        backing: BackingKind::File,
        read_only: plan.read_only,
        lun_id: None,
        is_block: false,
        removable: false,
        initiators: plan.initiators.clone(),
    };
    target.add_lun(lc).map_err(|e| ImageMethodError::Export { path: path.to_owned(), error: map_target_error(e) })
}

fn answer(target: &Target, lun: &Lun, bytes: u64, sha256: &[u8; 32], skipped: bool) -> Value {
    json!({
        "name": lun.name,
        "address": target.advertised_addr().to_string(),
        "iqn": target.iqn(),
        "lun_id": lun.id,
        "size": lun.size_bytes(),
        "bytes": bytes,
        "sha256": images::to_hex(sha256),
        "skipped": skipped,
    })
}
