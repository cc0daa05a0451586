//! SANITIZE (SBC-3 5.30): wipe the whole LUN, "clean the DUT's disk between runs" done by the
//! target. OVERWRITE writes an initialization pattern (repeated to fill each block, inverted
//! between passes when INVERT is set) over every block COUNT times; BLOCK ERASE deallocates
//! every block (holes / discard: they read back as zeroes, LBPRZ); EXIT FAILURE MODE has no
//! failed sanitize to leave and succeeds. CRYPTO ERASE is refused (no encryption to forget),
//! and so is IMMED: status comes when the medium is clean.
//!
//! The work runs on the offload pool holding the whole LUN's LBA range; meanwhile every
//! command but INQUIRY, REPORT LUNS and REQUEST SENSE gets NOT READY, SANITIZE IN PROGRESS
//! with the progress indication (REQUEST SENSE returns that sense).

use super::Res;
use crate::offload::LbaRange;
use crate::scsi::cdb::be16;
use crate::scsi::lun::BLOCK_SIZE;
use crate::scsi::{Disposition, Lun, Sense};
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};

pub const OVERWRITE: u8 = 0x01;
pub const BLOCK_ERASE: u8 = 0x02;
pub const CRYPTO_ERASE: u8 = 0x03;
pub const EXIT_FAILURE_MODE: u8 = 0x1F;

const BS: usize = BLOCK_SIZE as usize;
/// Bytes written per call while overwriting.
const CHUNK: usize = 1 << 20;

/// A LUN's sanitize state, read by every command of that LUN (one relaxed load).
#[derive(Debug, Default)]
pub struct SanitizeState {
    active: AtomicBool,
    /// Fraction done, in 1/65536 (the sense-key specific progress indication).
    progress: AtomicU16,
}

impl SanitizeState {
    /// NOT READY, SANITIZE IN PROGRESS with the progress so far, while one runs.
    pub fn in_progress(&self) -> Option<Sense> {
        if !self.active.load(Ordering::Relaxed) {
            return None;
        }
        Some(Sense::sanitize_in_progress(self.progress.load(Ordering::Relaxed)))
    }
}

/// Marks the sanitize running until dropped (also when the work fails).
struct Running<'a>(&'a SanitizeState);

impl<'a> Running<'a> {
    fn start(s: &'a SanitizeState) -> Self {
        s.progress.store(0, Ordering::Relaxed);
        s.active.store(true, Ordering::Release);
        Running(s)
    }

    fn progress(&self, done: u64, total: u64) {
        let p = if total == 0 { 0 } else { (u128::from(done) * 65536 / u128::from(total)).min(65535) as u16 };
        self.0.progress.store(p, Ordering::Relaxed);
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.active.store(false, Ordering::Release);
    }
}

/// Checks the CDB; returns the service action and the parameter list length.
fn check(cdb: &[u8], lun: &Lun) -> Result<(u8, u16), Sense> {
    if cdb[1] & 0x80 != 0 {
        return Err(Sense::invalid_field_in_cdb(1, 7)); // IMMED: not supported
    }
    if cdb[1] & 0x40 != 0 {
        return Err(Sense::invalid_field_in_cdb(1, 6)); // reserved
    }
    if let Some(i) = (2..7).find(|&i| cdb[i] != 0) {
        return Err(Sense::invalid_field_in_cdb(i as u16, 7)); // reserved bytes
    }
    let sa = cdb[1] & 0x1F;
    let len = be16(cdb, 7);
    match sa {
        // The header (4 bytes) and a pattern of 1 to one block.
        OVERWRITE if !(5..=BLOCK_SIZE as u16 + 4).contains(&len) => return Err(Sense::invalid_field_in_cdb(7, 7)),
        BLOCK_ERASE | EXIT_FAILURE_MODE if len != 0 => return Err(Sense::invalid_field_in_cdb(7, 7)),
        OVERWRITE | BLOCK_ERASE | EXIT_FAILURE_MODE => {}
        // There is no encryption key to forget.
        CRYPTO_ERASE => return Err(Sense::invalid_field_in_cdb(1, 4)),
        _ => return Err(Sense::invalid_field_in_cdb(1, 4)),
    }
    if sa != EXIT_FAILURE_MODE && lun.read_only {
        return Err(Sense::write_protected());
    }
    Ok((sa, len))
}

/// The whole LUN, held while the work runs.
fn whole(lun: &Lun) -> Disposition {
    Disposition::Offload { lock: Some(LbaRange::new(0, lun.num_blocks())) }
}

/// SANITIZE: OVERWRITE asks for its parameter list, BLOCK ERASE goes to the pool.
pub(super) fn sanitize(cdb: &[u8], lun: &Lun) -> Res {
    let (sa, len) = check(cdb, lun)?;
    match sa {
        OVERWRITE => Ok(Disposition::DataOut { len: u32::from(len) }),
        BLOCK_ERASE => Ok(whole(lun)),
        _ => Ok(Disposition::Good),
    }
}

/// The OVERWRITE parameter list: (invert, count, pattern).
fn overwrite_params(data: &[u8], len: u16) -> Result<(bool, u8, &[u8]), Sense> {
    let data = data.get(..usize::from(len)).ok_or_else(Sense::parameter_list_length_error)?;
    let (invert, test, count) = (data[0] & 0x80 != 0, (data[0] >> 5) & 0x03, data[0] & 0x1F);
    if test != 0 {
        return Err(Sense::invalid_field_in_param_list(0, 6));
    }
    if count == 0 {
        return Err(Sense::invalid_field_in_param_list(0, 4));
    }
    let pattern_len = usize::from(be16(data, 2));
    if pattern_len == 0 || pattern_len > BS || pattern_len + 4 != data.len() {
        return Err(Sense::invalid_field_in_param_list(2, 7));
    }
    Ok((invert, count, &data[4..]))
}

/// SANITIZE OVERWRITE with its parameter list: checked, then to the pool.
pub(super) fn sanitize_data(cdb: &[u8], lun: &Lun, data: &[u8]) -> Res {
    let (_, len) = check(cdb, lun)?;
    overwrite_params(data, len)?;
    Ok(whole(lun))
}

/// SANITIZE's work on a worker thread.
pub(super) fn work(cdb: &[u8], lun: &Lun, data: &[u8]) -> Res {
    let (sa, len) = check(cdb, lun)?;
    let size = lun.size_bytes();
    let running = Running::start(&lun.sanitize);
    match sa {
        BLOCK_ERASE => {
            lun.backing.discard(0, size).map_err(|_| Sense::write_error())?;
        }
        OVERWRITE => {
            let (invert, count, pattern) = overwrite_params(data, len)?;
            // One block of the pattern repeated (a short pattern repeats within the block).
            let block: Vec<u8> = pattern.iter().copied().cycle().take(BS).collect();
            let mut chunk = block.repeat((CHUNK / BS).min((size as usize / BS).max(1)));
            let total = size * u64::from(count);
            for pass in 0..count {
                // INVERT: the pattern is inverted between consecutive passes.
                if pass > 0 && invert {
                    chunk.iter_mut().for_each(|b| *b = !*b);
                }
                let mut done = 0u64;
                while done < size {
                    let n = (size - done).min(chunk.len() as u64) as usize;
                    lun.backing.write_at(&chunk[..n], done, false).map_err(|_| Sense::write_error())?;
                    done += n as u64;
                    running.progress(u64::from(pass) * size + done, total);
                }
            }
        }
        _ => return Ok(Disposition::Good),
    }
    lun.backing.flush().map_err(|_| Sense::write_error())?;
    drop(running);
    Ok(Disposition::Good)
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;
    use crate::scsi::cdb::op;
    use crate::scsi::SenseKey;

    fn cdb(sa: u8, len: u16) -> [u8; 10] {
        let mut c = [0u8; 10];
        c[0] = op::SANITIZE;
        c[1] = sa;
        c[7..9].copy_from_slice(&len.to_be_bytes());
        c
    }

    fn params(first: u8, pattern: &[u8]) -> Vec<u8> {
        let mut p = vec![first, 0];
        p.extend_from_slice(&(pattern.len() as u16).to_be_bytes());
        p.extend_from_slice(pattern);
        p
    }

    fn read_all(t: &crate::scsi::LunTable) -> Vec<u8> {
        let mut buf = vec![0u8; (BLOCKS * 512) as usize];
        t.get(0).unwrap().backing.read_at(&mut buf, 0).unwrap();
        buf
    }

    #[test]
    fn overwrite_fills_every_block_with_the_pattern() {
        let (t, mut n) = setup();
        let p = params(0x01, &[0xA5; 512]);
        assert_eq!(exec_out(&t, &mut n, &cdb(OVERWRITE, p.len() as u16), 0, &p), Disposition::Good);
        assert!(read_all(&t).iter().all(|&b| b == 0xA5));
        // A short pattern repeats within each block; INVERT flips it on every other pass.
        let p = params(0x80 | 0x03, &[1, 2, 3]);
        assert_eq!(exec_out(&t, &mut n, &cdb(OVERWRITE, p.len() as u16), 0, &p), Disposition::Good);
        let all = read_all(&t);
        assert_eq!(&all[..6], &[1, 2, 3, 1, 2, 3]);
        assert_eq!(all[511], [1, 2, 3][511 % 3]);
        assert_eq!(&all[512..515], &[1, 2, 3]);
        let p = params(0x80 | 0x02, &[1, 2, 3]);
        assert_eq!(exec_out(&t, &mut n, &cdb(OVERWRITE, p.len() as u16), 0, &p), Disposition::Good);
        assert_eq!(&read_all(&t)[..3], &[!1, !2, !3]);
        assert!(t.get(0).unwrap().sanitize.in_progress().is_none());
    }

    #[test]
    fn block_erase_deallocates_and_reads_zero() {
        let (t, mut n) = setup();
        let p = params(0x01, &[0xFF; 512]);
        assert_eq!(exec_out(&t, &mut n, &cdb(OVERWRITE, p.len() as u16), 0, &p), Disposition::Good);
        let mut buf = vec![0u8; 64];
        assert_eq!(exec(&t, &mut n, &cdb(BLOCK_ERASE, 0), 0, &mut buf), Disposition::Good);
        assert!(read_all(&t).iter().all(|&b| b == 0));
        assert_eq!(exec(&t, &mut n, &cdb(EXIT_FAILURE_MODE, 0), 0, &mut buf), Disposition::Good);
    }

    #[test]
    fn bad_requests_are_refused() {
        let (t, mut n) = setup();
        let mut buf = vec![0u8; 64];
        let invalid = |d: Disposition| {
            let s = sense(d);
            assert_eq!(s.key, SenseKey::IllegalRequest);
            s.asc
        };
        for sa in [0u8, CRYPTO_ERASE, 4, 0x10, 0x1E] {
            assert_eq!(invalid(exec(&t, &mut n, &cdb(sa, 0), 0, &mut buf)), 0x24, "sa {sa:#x}");
        }
        assert_eq!(invalid(exec(&t, &mut n, &cdb(BLOCK_ERASE | 0x80, 0), 0, &mut buf)), 0x24, "IMMED");
        assert_eq!(invalid(exec(&t, &mut n, &cdb(BLOCK_ERASE | 0x40, 0), 0, &mut buf)), 0x24, "reserved bit");
        for i in 2..7 {
            let mut c = cdb(BLOCK_ERASE, 0);
            c[i] = 1;
            assert_eq!(invalid(exec(&t, &mut n, &c, 0, &mut buf)), 0x24, "reserved byte {i}");
        }
        assert_eq!(invalid(exec(&t, &mut n, &cdb(BLOCK_ERASE, 8), 0, &mut buf)), 0x24);
        assert_eq!(invalid(exec(&t, &mut n, &cdb(EXIT_FAILURE_MODE, 8), 0, &mut buf)), 0x24);
        for len in [0u16, 4, 517] {
            assert_eq!(invalid(exec(&t, &mut n, &cdb(OVERWRITE, len), 0, &mut buf)), 0x24, "length {len}");
        }
        for p in [params(0x00, &[1; 512]), params(0x21, &[1; 512]), {
            let mut p = params(0x01, &[1; 8]);
            p[3] = 0;
            p
        }] {
            assert_eq!(invalid(exec_out(&t, &mut n, &cdb(OVERWRITE, p.len() as u16), 0, &p)), 0x26);
        }
        // A read-only LUN is write protected.
        let p = params(0x01, &[1; 8]);
        assert_eq!(sense(exec_out(&t, &mut n, &cdb(OVERWRITE, p.len() as u16), 1, &p)).key, SenseKey::DataProtect);
    }

    #[test]
    fn commands_meanwhile_get_sanitize_in_progress() {
        let (t, mut n) = setup();
        let lun = t.get(0).unwrap();
        let running = Running::start(&lun.sanitize);
        running.progress(1, 4);
        let mut buf = vec![0u8; 256];
        let s = sense(exec(&t, &mut n, &[0u8; 6], 0, &mut buf));
        assert_eq!((s.key, s.asc, s.ascq, s.specific), (SenseKey::NotReady, 0x04, 0x1B, Some([0x80, 0x40, 0x00])));
        assert_eq!(exec(&t, &mut n, &[op::INQUIRY, 0, 0, 0, 96, 0], 0, &mut buf), Disposition::DataIn(96));
        assert_eq!(exec(&t, &mut n, &[op::REQUEST_SENSE, 0, 0, 0, 18, 0], 0, &mut buf), Disposition::DataIn(18));
        assert_eq!((buf[2], buf[12], buf[13], buf[15]), (0x02, 0x04, 0x1B, 0x80));
        drop(running);
        assert_eq!(exec(&t, &mut n, &[0u8; 6], 0, &mut buf), Disposition::Good);
    }
}
