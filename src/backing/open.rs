//! Opening a LUN's store as configured: RAM (checked against the memory available), a block
//! device from `block_device_allowlist`, or an image file under `root_dir` that is created
//! sparse, grown, or served at its size, with every path resolved and kept inside `root_dir`.
//! This is where the old driver's `add_lun` semantics live; the schema they read is
//! [`crate::config`].

use super::{Backing, BackingError, BackingKind};
use crate::config::{Config, ConfigError, LunConfig};
use crate::scsi::lun::BLOCK_SIZE;
use std::fs::{self, OpenOptions};
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

/// Errors of opening a LUN's store; each names the LUN.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The LUN's entry is not valid on its own (see [`LunConfig::validate`]).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Creating, resolving or inspecting the image, its directory or the device failed.
    #[error("lun {lun}: {path}: {op}: {source}")]
    Io { lun: String, path: PathBuf, op: &'static str, source: io::Error },
    /// The image's size cannot be served as configured: missing with `size_mb` 0, not a
    /// multiple of the block size, or larger than `size_mb` (never shrunk).
    #[error("lun {lun}: {message}")]
    BadImage { lun: String, message: String },
    /// The path resolves outside `root_dir`, is not a regular file, or is a block device
    /// missing from the allowlist.
    #[error("lun {lun}: {message}")]
    PathRejected { lun: String, message: String },
    /// Creating or growing the store would need more disk space or RAM than is free.
    #[error("lun {lun}: {message}")]
    NoSpace { lun: String, message: String },
    /// Opening the store itself failed.
    #[error("lun {lun}: {source}")]
    Store { lun: String, source: BackingError },
}

fn io_err(lun: &str, path: &Path, op: &'static str) -> impl FnOnce(io::Error) -> OpenError {
    let (lun, path) = (lun.to_owned(), path.to_owned());
    move |source| OpenError::Io { lun, path, op, source }
}

/// A LUN's open store, the path it was opened from, and whether this call created the file.
pub struct LunStore {
    pub backing: Backing,
    /// The canonical image or device path; `None` for `mem` LUNs.
    pub path: Option<PathBuf>,
    /// The image file did not exist before: `remove_created_on_close` deletes it.
    pub created: bool,
}

/// Opens the store behind `lun`: RAM, an allow-listed block device, or an image file under
/// `root_dir`, created (sparse) or grown to `size_mb` as configured, never shrunk.
pub fn open_lun_store(cfg: &Config, lun: &LunConfig) -> Result<LunStore, OpenError> {
    lun.validate(&format!("lun {}", lun.name))?;
    let backing_err = |source| OpenError::Store { lun: lun.name.clone(), source };
    let rejected = |message: String| OpenError::PathRejected { lun: lun.name.clone(), message };
    match lun.backing {
        BackingKind::Mem => {
            let want = lun.size_mb << 20;
            if let Some(avail) = mem_available() {
                if want > avail {
                    return Err(OpenError::NoSpace {
                        lun: lun.name.clone(),
                        message: format!("{want} bytes of RAM asked, {avail} available"),
                    });
                }
            }
            let backing = Backing::new_mem(lun.size_mb << 20).map_err(backing_err)?;
            Ok(LunStore { backing, path: None, created: false })
        }
        BackingKind::File if lun.is_block => {
            // validate() guarantees an absolute path.
            let dev = lun.file_path.as_deref().unwrap_or(Path::new(""));
            let canon = fs::canonicalize(dev).map_err(io_err(&lun.name, dev, "resolve block device"))?;
            let allowed =
                cfg.block_device_allowlist.iter().filter_map(|p| fs::canonicalize(p).ok()).any(|p| p == canon);
            if !allowed {
                return Err(rejected(format!(
                    "{} (resolved from {}) is not in block_device_allowlist",
                    canon.display(),
                    dev.display()
                )));
            }
            let meta = fs::metadata(&canon).map_err(io_err(&lun.name, &canon, "stat"))?;
            if !meta.file_type().is_block_device() {
                return Err(rejected(format!("{} is not a block device", canon.display())));
            }
            let backing = Backing::open_file(&canon, lun.read_only).map_err(backing_err)?;
            Ok(LunStore { backing, path: Some(canon), created: false })
        }
        BackingKind::File => {
            let rel = lun.image_path().unwrap_or_default();
            let (path, created) = prepare_image(&cfg.root_dir, &rel, lun.size_mb, &lun.name)?;
            match Backing::open_file(&path, lun.read_only) {
                Ok(backing) => Ok(LunStore { backing, path: Some(path), created }),
                Err(e) => {
                    // Do not leave behind a file nobody will serve.
                    if created {
                        let _ = fs::remove_file(&path);
                    }
                    Err(backing_err(e))
                }
            }
        }
    }
}

/// Resolves `rel` (already checked by [`LunConfig::validate`]) under `root_dir` (which is created
/// if missing), refuses anything that escapes it, then creates (sparse), grows or checks the image. Returns its canonical path and whether
/// it was created.
fn prepare_image(root_dir: &Path, rel: &Path, size_mb: u64, lun: &str) -> Result<(PathBuf, bool), OpenError> {
    let lun_err = |message: String| OpenError::BadImage { lun: lun.to_owned(), message };
    let rejected = |message: String| OpenError::PathRejected { lun: lun.to_owned(), message };
    // Sparse files only take space when written, but an initiator will write them: refuse a
    // size the filesystem cannot hold rather than fail writes later.
    let check_space = |dir: &Path, grow: u64| match free_space(dir) {
        Some(free) if grow > free => Err(OpenError::NoSpace {
            lun: lun.to_owned(),
            message: format!("{grow} more bytes needed under {}, {free} free", dir.display()),
        }),
        _ => Ok(()),
    };
    fs::create_dir_all(root_dir).map_err(io_err(lun, root_dir, "create root_dir"))?;
    let root = fs::canonicalize(root_dir).map_err(io_err(lun, root_dir, "resolve root_dir"))?;
    let joined = root.join(rel);
    let want = size_mb << 20;
    let escapes = |p: &Path| {
        rejected(format!("{} resolves to {}, outside root_dir {}", rel.display(), p.display(), root.display()))
    };
    match fs::symlink_metadata(&joined) {
        Ok(_) => {
            let canon = fs::canonicalize(&joined).map_err(io_err(lun, &joined, "resolve"))?;
            if !canon.starts_with(&root) {
                return Err(escapes(&canon));
            }
            let meta = fs::metadata(&canon).map_err(io_err(lun, &canon, "stat"))?;
            if !meta.is_file() {
                return Err(rejected(format!("{} is not a regular file", canon.display())));
            }
            let size = meta.len();
            if size_mb == 0 {
                if size == 0 || size % u64::from(BLOCK_SIZE) != 0 {
                    return Err(lun_err(format!(
                        "{} is {size} bytes, not a non-zero multiple of {BLOCK_SIZE}; set size_mb to grow it",
                        canon.display()
                    )));
                }
            } else if want > size {
                check_space(&root, want - size)?;
                let f = OpenOptions::new().write(true).open(&canon).map_err(io_err(lun, &canon, "open to grow"))?;
                f.set_len(want).map_err(io_err(lun, &canon, "grow"))?;
                log::info!("{}: grown from {size} to {want} bytes", canon.display());
            } else if want < size {
                return Err(lun_err(format!(
                    "{} is {size} bytes, larger than size_mb {size_mb} ({want} bytes); refusing to shrink it",
                    canon.display()
                )));
            }
            Ok((canon, false))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if size_mb == 0 {
                return Err(lun_err(format!("{} does not exist and size_mb is 0", joined.display())));
            }
            let parent = joined.parent().unwrap_or(&root);
            let canon_parent = fs::canonicalize(parent).map_err(io_err(lun, parent, "resolve parent directory"))?;
            if !canon_parent.starts_with(&root) {
                return Err(escapes(&canon_parent));
            }
            // validate() guarantees a file name.
            let path = canon_parent.join(joined.file_name().unwrap_or_default());
            check_space(&canon_parent, want)?;
            // create_new (O_EXCL) does not follow a symlink planted since the check above.
            let f =
                OpenOptions::new().write(true).create_new(true).open(&path).map_err(io_err(lun, &path, "create"))?;
            if let Err(e) = f.set_len(want) {
                let _ = fs::remove_file(&path);
                return Err(io_err(lun, &path, "set size")(e));
            }
            log::info!("{}: created, {want} bytes (sparse)", path.display());
            Ok((path, true))
        }
        Err(e) => Err(io_err(lun, &joined, "stat")(e)),
    }
}

/// Bytes an unprivileged user may still write on the filesystem holding `dir`, if known.
fn free_space(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs is plain data; it is only read after statvfs(2) filled it in.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: c is a NUL-terminated path and st a valid out-pointer for the call's duration.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    // The field types are narrower than u64 on some targets.
    #[allow(clippy::useless_conversion)]
    Some(u64::from(st.f_bavail).saturating_mul(u64::from(st.f_frsize)))
}

/// `MemAvailable` plus free swap, from /proc/meminfo, in bytes (if readable).
fn mem_available() -> Option<u64> {
    let info = fs::read_to_string("/proc/meminfo").ok()?;
    let field = |key: &str| {
        info.lines().find_map(|l| l.strip_prefix(key)?.trim().strip_suffix("kB")?.trim().parse::<u64>().ok())
    };
    Some((field("MemAvailable:")? + field("SwapFree:").unwrap_or(0)) << 10)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn cfg_in(dir: &Path) -> Config {
        Config { root_dir: dir.join("root"), ..Config::default() }
    }

    fn file_lun(name: &str, size_mb: u64) -> LunConfig {
        LunConfig::parse_spec(&format!("name={name},size_mb={size_mb}")).unwrap()
    }

    /// The store and its path, for tests that do not look at `created`.
    fn open_backing(cfg: &Config, lun: &LunConfig) -> Result<(Backing, Option<PathBuf>), OpenError> {
        open_lun_store(cfg, lun).map(|s| (s.backing, s.path))
    }

    #[test]
    fn new_image_is_created_sparse_and_tracked() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = cfg_in(dir.path());
        let s = open_lun_store(&cfg, &file_lun("d", 4)).unwrap();
        let path = s.path.clone().unwrap();
        assert!(s.created);
        assert_eq!(s.backing.size(), 4 << 20);
        assert_eq!(path, fs::canonicalize(dir.path().join("root/d.img")).unwrap());
        use std::os::unix::fs::MetadataExt;
        assert!(fs::metadata(&path).unwrap().blocks() * 512 < 4 << 20, "not sparse");
        drop(s);
        // Reopened with size 0: its size, not created.
        let s = open_lun_store(&cfg, &file_lun("d", 0)).unwrap();
        assert!(!s.created);
        assert_eq!(s.backing.size(), 4 << 20);
    }

    #[test]
    fn missing_image_needs_a_size() {
        let dir = tempfile::tempdir().unwrap();
        let e = open_backing(&cfg_in(dir.path()), &file_lun("d", 0)).err().unwrap().to_string();
        assert!(e.starts_with("lun d: ") && e.ends_with("does not exist and size_mb is 0"), "{e}");
    }

    #[test]
    fn existing_image_sizes() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = cfg_in(dir.path());
        fs::create_dir_all(&cfg.root_dir).unwrap();
        let img = cfg.root_dir.join("d.img");
        // Exact size kept, not rounded to MiB.
        fs::write(&img, vec![7u8; 3 * 512]).unwrap();
        let (b, _) = open_backing(&cfg, &file_lun("d", 0)).unwrap();
        assert_eq!(b.size(), 3 * 512);
        drop(b);
        // Grown, data kept.
        let (b, _) = open_backing(&cfg, &file_lun("d", 1)).unwrap();
        assert_eq!(b.size(), 1 << 20);
        let mut buf = [0u8; 512];
        b.read_at(&mut buf, 512).unwrap();
        assert_eq!(buf, [7u8; 512]);
        drop(b);
        // Never shrunk.
        fs::write(&img, vec![0u8; 3 << 20]).unwrap();
        let e = open_backing(&cfg, &file_lun("d", 1)).err().unwrap().to_string();
        assert!(e.contains("refusing to shrink"), "{e}");
        assert_eq!(fs::metadata(&img).unwrap().len(), 3 << 20);
        // Odd sizes are refused rather than truncated.
        fs::write(&img, vec![0u8; 1000]).unwrap();
        let e = open_backing(&cfg, &file_lun("d", 0)).err().unwrap().to_string();
        assert!(e.contains("1000 bytes, not a non-zero multiple of 512"), "{e}");
    }

    #[test]
    fn symlinks_are_resolved_and_kept_inside_root_dir() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = cfg_in(dir.path());
        fs::create_dir_all(&cfg.root_dir).unwrap();
        let outside = dir.path().join("outside.img");
        fs::write(&outside, vec![0u8; 4096]).unwrap();
        symlink(&outside, cfg.root_dir.join("esc.img")).unwrap();
        let e = open_backing(&cfg, &file_lun("esc", 0)).err().unwrap().to_string();
        assert!(e.contains("outside root_dir"), "{e}");
        // A directory symlink escaping root_dir, for a file to be created.
        symlink(dir.path(), cfg.root_dir.join("up")).unwrap();
        let lun = LunConfig::parse_spec("name=n,file_path=up/new.img,size_mb=1").unwrap();
        let e = open_backing(&cfg, &lun).err().unwrap().to_string();
        assert!(e.contains("outside root_dir"), "{e}");
        assert!(!dir.path().join("new.img").exists());
        // A dangling symlink is not followed to create its target.
        symlink(dir.path().join("planted.img"), cfg.root_dir.join("dang.img")).unwrap();
        assert!(open_backing(&cfg, &file_lun("dang", 1)).is_err());
        assert!(!dir.path().join("planted.img").exists());
        // A symlink inside root_dir is served from its canonical path.
        fs::write(cfg.root_dir.join("real.img"), vec![0u8; 4096]).unwrap();
        symlink("real.img", cfg.root_dir.join("alias.img")).unwrap();
        let (_, path) = open_backing(&cfg, &file_lun("alias", 0)).unwrap();
        assert_eq!(path.unwrap(), fs::canonicalize(cfg.root_dir.join("real.img")).unwrap());
    }

    #[test]
    fn directories_are_not_images() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = cfg_in(dir.path());
        fs::create_dir_all(cfg.root_dir.join("d.img")).unwrap();
        let e = open_backing(&cfg, &file_lun("d", 0)).err().unwrap().to_string();
        assert!(e.contains("is not a regular file"), "{e}");
    }

    #[test]
    fn block_devices_need_the_allowlist() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = cfg_in(dir.path());
        let fake = dir.path().join("fake");
        fs::write(&fake, vec![0u8; 4096]).unwrap();
        let lun = LunConfig::parse_spec(&format!("name=b,is_block=true,file_path={}", fake.display())).unwrap();
        let e = open_backing(&cfg, &lun).err().unwrap().to_string();
        assert!(e.contains("is not in block_device_allowlist"), "{e}");
        // Listed through a symlink: matched after resolution, then refused as not a device.
        let link = dir.path().join("link");
        symlink(&fake, &link).unwrap();
        cfg.block_device_allowlist = vec![link];
        let e = open_backing(&cfg, &lun).err().unwrap().to_string();
        assert!(e.contains("is not a block device"), "{e}");
        assert!(LunConfig::parse_spec("name=b,is_block=true,file_path=/dev/sda,size_mb=1").is_err());
    }

    #[test]
    fn mem_luns_are_allocated() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = cfg_in(dir.path());
        let lun = LunConfig::parse_spec("name=r,backing=mem,size_mb=2").unwrap();
        let s = open_lun_store(&cfg, &lun).unwrap();
        assert_eq!((s.backing.kind(), s.backing.size(), s.path, s.created), (BackingKind::Mem, 2 << 20, None, false));
    }

    #[test]
    fn sizes_beyond_free_space_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = cfg_in(dir.path());
        // 1 PiB: more than any test machine's disk or RAM.
        let e = open_lun_store(&cfg, &file_lun("big", 1 << 30)).err().unwrap();
        assert!(matches!(e, OpenError::NoSpace { .. }), "{e}");
        assert!(!cfg.root_dir.join("big.img").exists());
        fs::write(cfg.root_dir.join("g.img"), vec![0u8; 4096]).unwrap();
        let e = open_lun_store(&cfg, &file_lun("g", 1 << 30)).err().unwrap();
        assert!(matches!(e, OpenError::NoSpace { .. }), "{e}");
        assert_eq!(fs::metadata(cfg.root_dir.join("g.img")).unwrap().len(), 4096);
        let lun = LunConfig::parse_spec("name=r,backing=mem,size_mb=1073741824").unwrap();
        let e = open_lun_store(&cfg, &lun).err().unwrap();
        assert!(matches!(e, OpenError::NoSpace { .. }), "{e}");
    }
}
