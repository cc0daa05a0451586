//! EXTENDED COPY (LID1) and RECEIVE COPY RESULTS (SPC-4 6.4, 6.18): block-to-block copies
//! between LUNs of this target, named by identification-descriptor target descriptors, so an
//! initiator (VMware's XCOPY clones, Windows ODX-style copies) never moves the data itself.
//!
//! [`copy_segment`] is a plain function over the backing stores: the copy runs where the
//! command executes, in chunks of [`COPY_CHUNK`] bytes, and is bounded by
//! [`MAX_SEGMENT_BYTES`] per segment and [`MAX_SEGMENT_DESCRIPTORS`] segments per command.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};

use super::{data_in, Res};
use crate::scsi::cdb::{be16, be32, be64, put16, put32};
use crate::scsi::lun::BLOCK_SIZE;
use crate::scsi::{Disposition, Lun, LunTable, Nexus, Sense, SenseKey};

/// EXTENDED COPY service action: LID1 (the SPC-3 command, what VMware and Linux send).
const SA_LID1: u8 = 0x00;
/// RECEIVE COPY RESULTS service actions.
pub const RCR_COPY_STATUS: u8 = 0x00;
pub const RCR_OPERATING_PARAMETERS: u8 = 0x03;

/// Target descriptors per command (a source and a destination).
pub const MAX_TARGET_DESCRIPTORS: u16 = 2;
/// Segment descriptors per command.
pub const MAX_SEGMENT_DESCRIPTORS: u16 = 1;
/// MAXIMUM DESCRIPTOR LIST LENGTH: target plus segment descriptors, in bytes.
pub const MAX_DESCRIPTOR_LIST: u32 = 1024;
/// MAXIMUM SEGMENT LENGTH in bytes: 4 MiB, what VMware sends per segment, so a copy (which
/// still runs on the reactor that received it: the worker pool's work functions see one LUN,
/// a copy two) holds the reactor no longer than a few large writes do.
pub const MAX_SEGMENT_BYTES: u32 = 4 << 20;
/// Bytes read and written per step of a copy.
const COPY_CHUNK: usize = 1 << 20;
/// Copy results held per LUN (the oldest go first).
const HELD_RESULTS: usize = 32;

const HEADER_LEN: usize = 16;
const TARGET_DESCRIPTOR_LEN: usize = 32;
/// Identification descriptor target descriptor (SPC-4 6.4.6.2).
const TD_IDENTIFICATION: u8 = 0xE4;
/// Block device to block device segment descriptor (SPC-4 6.4.7.5).
const SD_BLOCK_TO_BLOCK: u8 = 0x02;
const SD_BLOCK_TO_BLOCK_LEN: usize = 0x1C;

/// What RECEIVE COPY RESULTS reports for one finished EXTENDED COPY.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct CopyStatus {
    ok: bool,
    segments: u16,
    bytes: u64,
}

/// Results of the copies a LUN (as copy manager) ran, per initiator port and list identifier.
#[derive(Debug, Default)]
pub struct CopyResults {
    held: Mutex<VecDeque<(Arc<str>, u8, CopyStatus)>>,
}

impl CopyResults {
    fn record(&self, who: &Arc<str>, list_id: u8, st: CopyStatus) {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        held.retain(|(w, l, _)| !(w == who && *l == list_id));
        if held.len() == HELD_RESULTS {
            held.pop_front();
        }
        held.push_back((who.clone(), list_id, st));
    }

    fn get(&self, who: &Arc<str>, list_id: u8) -> Option<CopyStatus> {
        let held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        held.iter().find(|(w, l, _)| w == who && *l == list_id).map(|e| e.2)
    }
}

fn copy_aborted(asc: u8, ascq: u8) -> Sense {
    Sense::new(SenseKey::CopyAborted, asc, ascq)
}

/// EXTENDED COPY: asks for the parameter list (PARAMETER LIST LENGTH, bytes 10..13).
pub(super) fn extended_copy(cdb: &[u8]) -> Res {
    if cdb[1] & 0x1F != SA_LID1 {
        return Err(Sense::invalid_field_in_cdb(1, 4));
    }
    let len = be32(cdb, 10);
    if len == 0 {
        return Ok(Disposition::Good);
    }
    if len as usize > HEADER_LEN + MAX_DESCRIPTOR_LIST as usize {
        return Err(Sense::parameter_list_length_error());
    }
    Ok(Disposition::DataOut { len })
}

/// A block-to-block segment, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Segment {
    src: usize,
    dst: usize,
    blocks: u16,
    src_lba: u64,
    dst_lba: u64,
}

/// An EXTENDED COPY parameter list, decoded: the copy targets (`None` for a designator that
/// names no LUN of this target) and the segments.
struct CopyList {
    list_id: u8,
    usage: u8,
    targets: Vec<Option<Arc<Lun>>>,
    segments: Vec<Segment>,
}

/// The parameter list, checked in the order SPC-4 gives the errors.
fn parse(data: &[u8], table: &LunTable) -> Result<CopyList, Sense> {
    if data.len() < HEADER_LEN {
        return Err(Sense::parameter_list_length_error());
    }
    let (list_id, usage) = (data[0], (data[1] >> 3) & 0x03);
    if usage == 0x03 && list_id != 0 {
        return Err(Sense::invalid_field_in_param_list(0, 7));
    }
    let td_len = usize::from(be16(data, 2));
    let sd_len = be32(data, 8) as usize;
    if td_len + sd_len > MAX_DESCRIPTOR_LIST as usize {
        return Err(Sense::parameter_list_length_error());
    }
    if be32(data, 12) != 0 {
        return Err(Sense::invalid_field_in_param_list(12, 7)); // no inline data
    }
    if data.len() < HEADER_LEN + td_len + sd_len {
        return Err(Sense::parameter_list_length_error());
    }
    if td_len % TARGET_DESCRIPTOR_LEN != 0 {
        return Err(Sense::invalid_field_in_param_list(2, 7));
    }
    if td_len / TARGET_DESCRIPTOR_LEN > usize::from(MAX_TARGET_DESCRIPTORS) {
        return Err(Sense::new(SenseKey::IllegalRequest, 0x26, 0x06)); // TOO MANY TARGET DESCRIPTORS
    }
    let mut targets = Vec::new();
    for (i, td) in data[HEADER_LEN..HEADER_LEN + td_len].chunks_exact(TARGET_DESCRIPTOR_LEN).enumerate() {
        let at = (HEADER_LEN + i * TARGET_DESCRIPTOR_LEN) as u16;
        if td[0] != TD_IDENTIFICATION {
            return Err(Sense::new(SenseKey::IllegalRequest, 0x26, 0x07)); // UNSUPPORTED TARGET DESCRIPTOR TYPE CODE
        }
        // LU ID TYPE and NUL are ignored (SPC-4); only direct-access devices are copied.
        if td[1] & 0x1F != 0 {
            return Err(Sense::invalid_field_in_param_list(at + 1, 4));
        }
        if u32::from_be_bytes([0, td[29], td[30], td[31]]) != BLOCK_SIZE {
            return Err(Sense::invalid_field_in_param_list(at + 29, 7));
        }
        targets.push(resolve(&td[4..28], table));
    }
    let mut segments = Vec::new();
    let mut rest = &data[HEADER_LEN + td_len..HEADER_LEN + td_len + sd_len];
    while !rest.is_empty() {
        if rest.len() < 4 {
            return Err(Sense::parameter_list_length_error());
        }
        let len = 4 + usize::from(be16(rest, 2));
        if rest[0] != SD_BLOCK_TO_BLOCK {
            return Err(Sense::new(SenseKey::IllegalRequest, 0x26, 0x09)); // UNSUPPORTED SEGMENT DESCRIPTOR TYPE CODE
        }
        if segments.len() == usize::from(MAX_SEGMENT_DESCRIPTORS) {
            return Err(Sense::new(SenseKey::IllegalRequest, 0x26, 0x08)); // TOO MANY SEGMENT DESCRIPTORS
        }
        if len != SD_BLOCK_TO_BLOCK_LEN || rest.len() < len {
            return Err(Sense::parameter_list_length_error());
        }
        segments.push(Segment {
            src: usize::from(be16(rest, 4)),
            dst: usize::from(be16(rest, 6)),
            blocks: be16(rest, 10),
            src_lba: be64(rest, 12),
            dst_lba: be64(rest, 20),
        });
        rest = &rest[len..];
    }
    Ok(CopyList { list_id, usage, targets, segments })
}

/// The LUN of this target whose NAA or T10 vendor ID designator (as VPD page 83h shows it) is
/// the one in a target descriptor (code set, type and association, length, designator).
fn resolve(designator: &[u8], table: &LunTable) -> Option<Arc<Lun>> {
    let (kind, len) = (designator[1] & 0x0F, usize::from(designator[3]));
    let id = designator.get(4..4 + len)?;
    table
        .iter()
        .find(|l| match kind {
            3 => len == 8 && id == l.naa.to_be_bytes(),
            1 => id.starts_with(super::inquiry::VENDOR.as_bytes()) && id[8..] == *l.serial.as_bytes(),
            _ => false,
        })
        .cloned()
}

/// Copies one segment from `src` to `dst` in [`COPY_CHUNK`] steps; returns the bytes copied.
fn copy_segment(src: &Lun, dst: &Lun, seg: &Segment) -> Result<u64, Sense> {
    if !src.medium_present() || !dst.medium_present() {
        return Err(copy_aborted(0x0D, 0x02)); // COPY TARGET DEVICE NOT REACHABLE: medium ejected
    }
    let blocks = u64::from(seg.blocks);
    if seg.src_lba.checked_add(blocks).is_none_or(|e| e > src.num_blocks()) {
        return Err(copy_aborted(0x0D, 0x03)); // COPY TARGET DEVICE DATA UNDERRUN
    }
    if seg.dst_lba.checked_add(blocks).is_none_or(|e| e > dst.num_blocks()) {
        return Err(copy_aborted(0x0D, 0x02)); // COPY TARGET DEVICE DATA OVERRUN
    }
    if dst.read_only {
        return Err(Sense::write_protected());
    }
    let total = blocks * u64::from(BLOCK_SIZE);
    let bs = u64::from(BLOCK_SIZE);
    let fua = !dst.write_cache();
    let mut buf = vec![0u8; (total as usize).min(COPY_CHUNK)];
    let mut done = 0u64;
    while done < total {
        let n = (total - done).min(buf.len() as u64) as usize;
        src.backing.read_at(&mut buf[..n], seg.src_lba * bs + done).map_err(|_| Sense::read_error())?;
        dst.backing.write_at(&buf[..n], seg.dst_lba * bs + done, fua).map_err(|_| Sense::write_error())?;
        done += n as u64;
    }
    Ok(total)
}

/// EXTENDED COPY's parameter list: checks it, runs the segments, holds the result for RECEIVE
/// COPY RESULTS (unless LIST ID USAGE is 11b).
pub(super) fn extended_copy_data(cdb: &[u8], lun: &Lun, table: &LunTable, nexus: &Nexus, data: &[u8]) -> Res {
    let len = (be32(cdb, 10) as usize).min(data.len());
    let CopyList { list_id, usage, targets, segments } = parse(&data[..len], table)?;
    let mut st = CopyStatus { ok: true, segments: 0, bytes: 0 };
    let mut outcome = Ok(Disposition::Good);
    for seg in &segments {
        let ends = (targets.get(seg.src).cloned().flatten(), targets.get(seg.dst).cloned().flatten());
        let r = match ends {
            (Some(s), Some(d)) if u32::from(seg.blocks) * BLOCK_SIZE <= MAX_SEGMENT_BYTES => copy_segment(&s, &d, seg),
            (Some(_), Some(_)) => Err(copy_aborted(0x26, 0x00)),
            _ => Err(copy_aborted(0x08, 0x04)), // UNREACHABLE COPY TARGET
        };
        match r {
            Ok(n) => {
                st.segments += 1;
                st.bytes += n;
            }
            Err(s) => {
                st.ok = false;
                outcome = Err(s);
                break;
            }
        }
    }
    if usage != 0x03 {
        lun.xcopy.record(nexus.identity(), list_id, st);
    }
    outcome
}

/// RECEIVE COPY RESULTS: COPY STATUS of a held list identifier, or OPERATING PARAMETERS.
pub(super) fn receive_copy_results(cdb: &[u8], lun: &Lun, nexus: &Nexus, buf: &mut [u8]) -> Res {
    let alloc = be32(cdb, 10) as usize;
    let n = match cdb[1] & 0x1F {
        RCR_COPY_STATUS => {
            let st = lun.xcopy.get(nexus.identity(), cdb[2]).ok_or_else(|| Sense::invalid_field_in_cdb(2, 7))?;
            buf[..12].fill(0);
            put32(buf, 0, 8);
            buf[4] = if st.ok { 0x01 } else { 0x02 }; // completed without / with errors
            put16(buf, 5, st.segments);
            // TRANSFER COUNT UNITS F1h: kibibytes.
            buf[7] = 0xF1;
            put32(buf, 8, u32::try_from(st.bytes / 1024).unwrap_or(u32::MAX));
            12
        }
        RCR_OPERATING_PARAMETERS => {
            const CODES: [u8; 2] = [SD_BLOCK_TO_BLOCK, TD_IDENTIFICATION];
            let n = 44 + CODES.len();
            buf[..n].fill(0);
            put32(buf, 0, (n - 4) as u32);
            put16(buf, 8, MAX_TARGET_DESCRIPTORS);
            put16(buf, 10, MAX_SEGMENT_DESCRIPTORS);
            put32(buf, 12, MAX_DESCRIPTOR_LIST);
            put32(buf, 16, MAX_SEGMENT_BYTES);
            // No inline or held data, no stream devices; one copy at a time per command.
            put16(buf, 34, 1);
            buf[36] = 1;
            buf[37] = 9; // DATA SEGMENT GRANULARITY: 2^9 bytes
            buf[38] = 9;
            buf[39] = 9;
            buf[43] = CODES.len() as u8;
            buf[44..n].copy_from_slice(&CODES);
            n
        }
        _ => return Err(Sense::invalid_field_in_cdb(1, 4)),
    };
    data_in(buf, n, alloc)
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;
    use crate::scsi::cdb::{op, put64};

    fn xcopy_cdb(len: u32) -> [u8; 16] {
        let mut c = [0u8; 16];
        c[0] = op::EXTENDED_COPY;
        put32(&mut c, 10, len);
        c
    }

    fn target(lun: &Lun) -> [u8; 32] {
        let mut d = [0u8; 32];
        d[0] = TD_IDENTIFICATION;
        d[4..8].copy_from_slice(&[0x01, 0x03, 0x00, 0x08]);
        d[8..16].copy_from_slice(&lun.naa.to_be_bytes());
        d[29..32].copy_from_slice(&[0, 2, 0]);
        d
    }

    fn segment(src: u16, dst: u16, blocks: u16, src_lba: u64, dst_lba: u64) -> [u8; 28] {
        let mut d = [0u8; 28];
        d[0] = SD_BLOCK_TO_BLOCK;
        put16(&mut d, 2, 0x18);
        put16(&mut d, 4, src);
        put16(&mut d, 6, dst);
        put16(&mut d, 10, blocks);
        put64(&mut d, 12, src_lba);
        put64(&mut d, 20, dst_lba);
        d
    }

    fn list(list_id: u8, targets: &[[u8; 32]], segments: &[[u8; 28]]) -> Vec<u8> {
        let mut v = vec![0u8; 16];
        v[0] = list_id;
        put16(&mut v, 2, (32 * targets.len()) as u16);
        put32(&mut v, 8, (28 * segments.len()) as u32);
        for t in targets {
            v.extend_from_slice(t);
        }
        for s in segments {
            v.extend_from_slice(s);
        }
        v
    }

    fn rcr(sa: u8, list_id: u8) -> [u8; 16] {
        let mut c = [0u8; 16];
        c[0] = op::RECEIVE_COPY_RESULTS;
        c[1] = sa;
        c[2] = list_id;
        put32(&mut c, 10, 1024);
        c
    }

    #[test]
    fn an_ejected_copy_target_is_not_reachable() {
        let iso = Lun::new(1, "iso", None, crate::backing::Backing::new_mem(BLOCKS * 512).unwrap(), false, "t")
            .with_removable(true);
        let t = LunTable::new(vec![lun(0, false), std::sync::Arc::new(iso)]);
        let mut n = Nexus::new();
        n.take(0);
        n.take(1);
        let (l0, l1) = (t.get(0).unwrap().clone(), t.get(1).unwrap().clone());
        let p = list(1, &[target(&l0), target(&l1)], &[segment(0, 1, 4, 0, 0)]);
        assert_eq!(exec_out(&t, &mut n, &xcopy_cdb(p.len() as u32), 0, &p), Disposition::Good);
        l1.medium.load_eject(false).unwrap();
        let s = sense(exec_out(&t, &mut n, &xcopy_cdb(p.len() as u32), 0, &p));
        assert_eq!((s.key, s.asc, s.ascq), (SenseKey::CopyAborted, 0x0D, 0x02));
    }

    #[test]
    fn copies_blocks_within_and_across_luns() {
        let t = LunTable::new(vec![lun(0, false), lun(1, true), lun(2, false)]);
        let mut n = Nexus::new();
        for id in 0..3 {
            n.take(id);
        }
        let (l0, l1, l2) = (t.get(0).unwrap().clone(), t.get(1).unwrap().clone(), t.get(2).unwrap().clone());
        let pat: Vec<u8> = (0..4 * 512).map(|i| (i % 251) as u8).collect();
        l0.backing.write_at(&pat, 10 * 512, false).unwrap();
        let p = list(7, &[target(&l0)], &[segment(0, 0, 4, 10, 100)]);
        assert_eq!(exec_out(&t, &mut n, &xcopy_cdb(p.len() as u32), 0, &p), Disposition::Good);
        let mut back = vec![0u8; pat.len()];
        l0.backing.read_at(&mut back, 100 * 512).unwrap();
        assert_eq!(back, pat);
        // Across LUNs: LUN 0 to LUN 2, the command sent to LUN 2.
        let p = list(8, &[target(&l0), target(&l2)], &[segment(0, 1, 4, 10, 3)]);
        assert_eq!(exec_out(&t, &mut n, &xcopy_cdb(p.len() as u32), 2, &p), Disposition::Good);
        l2.backing.read_at(&mut back, 3 * 512).unwrap();
        assert_eq!(back, pat);
        // Copy status is held per list identifier on the LUN the command went to.
        let mut buf = vec![0u8; 1024];
        assert_eq!(exec(&t, &mut n, &rcr(RCR_COPY_STATUS, 8), 2, &mut buf), Disposition::DataIn(12));
        assert_eq!(&buf[..8], &[0, 0, 0, 8, 0x01, 0, 1, 0xF1]);
        assert_eq!(be32(&buf, 8), 2);
        assert_eq!(check(exec(&t, &mut n, &rcr(RCR_COPY_STATUS, 8), 0, &mut buf)).1, 0x24);
        // A read-only destination refuses.
        let p = list(9, &[target(&l0), target(&l1)], &[segment(0, 1, 1, 0, 0)]);
        assert_eq!(check(exec_out(&t, &mut n, &xcopy_cdb(p.len() as u32), 0, &p)).0, SenseKey::DataProtect);
    }

    #[test]
    fn parameter_list_errors() {
        let (t, mut n) = setup();
        let l0 = t.get(0).unwrap().clone();
        let td = target(&l0);
        let seg = segment(0, 0, 1, 0, 1);
        let run = |n: &mut Nexus, p: &[u8]| check(exec_out(&t, n, &xcopy_cdb(p.len() as u32), 0, p));
        assert_eq!(exec_out(&t, &mut n, &xcopy_cdb(0), 0, &[]), Disposition::Good);
        let p = list(1, &[td], &[seg]);
        assert_eq!(run(&mut n, &p[..16 + 31]), (SenseKey::IllegalRequest, 0x1A, 0));
        assert_eq!(run(&mut n, &p[..p.len() - 1]), (SenseKey::IllegalRequest, 0x1A, 0));
        assert_eq!(run(&mut n, &list(1, &[td, td, td], &[seg])), (SenseKey::IllegalRequest, 0x26, 0x06));
        assert_eq!(run(&mut n, &list(1, &[td], &[seg, seg])), (SenseKey::IllegalRequest, 0x26, 0x08));
        let segs = vec![seg; 40];
        assert_eq!(run(&mut n, &list(1, &[td], &segs)), (SenseKey::IllegalRequest, 0x1A, 0));
        let mut fc = td;
        fc[0] = 0xE0;
        assert_eq!(run(&mut n, &list(1, &[fc], &[seg])), (SenseKey::IllegalRequest, 0x26, 0x07));
        let mut stream = seg;
        stream[0] = 0x03;
        assert_eq!(run(&mut n, &list(1, &[td], &[stream])), (SenseKey::IllegalRequest, 0x26, 0x09));
        // Copy target index out of the list; a designator naming no LUN of the target.
        assert_eq!(run(&mut n, &list(1, &[td], &[segment(0, 1, 1, 0, 0)])), (SenseKey::CopyAborted, 0x08, 0x04));
        let mut stranger = td;
        stranger[15] ^= 0xFF;
        assert_eq!(run(&mut n, &list(1, &[stranger], &[seg])), (SenseKey::CopyAborted, 0x08, 0x04));
        // Past the end of the destination.
        assert_eq!(run(&mut n, &list(1, &[td], &[segment(0, 0, 2, 0, BLOCKS - 1)])), (SenseKey::CopyAborted, 0x0D, 2));
        // The failure is held too.
        let mut buf = vec![0u8; 1024];
        assert_eq!(exec(&t, &mut n, &rcr(RCR_COPY_STATUS, 1), 0, &mut buf), Disposition::DataIn(12));
        assert_eq!(buf[4], 0x02);
    }

    #[test]
    fn operating_parameters() {
        let (t, mut n) = setup();
        let mut buf = vec![0u8; 1024];
        assert_eq!(exec(&t, &mut n, &rcr(RCR_OPERATING_PARAMETERS, 0), 0, &mut buf), Disposition::DataIn(46));
        assert_eq!(be32(&buf, 0), 42);
        assert_eq!((be16(&buf, 8), be16(&buf, 10)), (MAX_TARGET_DESCRIPTORS, MAX_SEGMENT_DESCRIPTORS));
        assert_eq!(be32(&buf, 12), MAX_DESCRIPTOR_LIST);
        assert_eq!(&buf[43..46], &[2, SD_BLOCK_TO_BLOCK, TD_IDENTIFICATION]);
        assert_eq!(check(exec(&t, &mut n, &rcr(0x05, 0), 0, &mut buf)).1, 0x24);
    }
}
