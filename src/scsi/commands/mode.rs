//! MODE SENSE / MODE SELECT (6 and 10) with the caching, control and informational exceptions
//! control pages (SPC-4 7.5, SBC-3 6.5). Only WCE and D_SENSE can change; nothing is saved.

use super::{data_in, Res};
use crate::scsi::cdb::{be16, be24, be32, op, put16, put32, put64};
use crate::scsi::nexus::ua;
use crate::scsi::{Disposition, Lun, Nexus, Sense};
use std::sync::atomic::Ordering;

const CACHING: u8 = 0x08;
const CONTROL: u8 = 0x0A;
const INFO_EXCEPTIONS: u8 = 0x1C;
const ALL_PAGES: u8 = 0x3F;
/// Pages served, ascending (the order MODE SENSE returns "all pages" in).
const PAGES: [u8; 3] = [CACHING, CONTROL, INFO_EXCEPTIONS];
const MAX_PAGE_LEN: usize = 20;

const WCE: u8 = 0x04;
const D_SENSE: u8 = 0x04;
/// TST 001b: each I_T nexus has its own task set, so task attributes (ORDERED) order the
/// commands of one session only (see `crate::iscsi::order`).
const TST_PER_NEXUS: u8 = 0x20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pc {
    Current,
    Changeable,
    Default,
}

/// Writes mode page `code` as `pc` asks; returns its length, or `None` for an unknown page.
fn page(code: u8, pc: Pc, lun: &Lun, out: &mut [u8]) -> Option<usize> {
    let len = match code {
        CACHING => 20,
        CONTROL | INFO_EXCEPTIONS => 12,
        _ => return None,
    };
    let p = &mut out[..len];
    p.fill(0);
    p[0] = code;
    p[1] = (len - 2) as u8;
    match (code, pc) {
        (CACHING, Pc::Current) => p[2] = if lun.write_cache() { WCE } else { 0 },
        (CACHING, Pc::Default) => p[2] = WCE,
        (CACHING, Pc::Changeable) => p[2] = WCE,
        (CONTROL, Pc::Changeable) => p[2] = D_SENSE,
        (CONTROL, _) => {
            p[2] = TST_PER_NEXUS | if pc == Pc::Current && lun.d_sense() { D_SENSE } else { 0 };
            p[3] = 0x10; // QUEUE ALGORITHM MODIFIER 1: unrestricted reordering; QERR 0
            put16(p, 8, 0xFFFF); // BUSY TIMEOUT PERIOD: unlimited
        }
        (INFO_EXCEPTIONS, Pc::Changeable) => {}
        (INFO_EXCEPTIONS, _) => p[2] = 0x08, // DEXCPT: no informational exceptions
        _ => unreachable!("page codes checked above"),
    }
    Some(len)
}

/// MODE SENSE(6/10).
pub(super) fn mode_sense(cdb: &[u8], lun: &Lun, buf: &mut [u8]) -> Res {
    let six = cdb[0] == op::MODE_SENSE_6;
    let dbd = cdb[1] & 0x08 != 0;
    let llbaa = !six && cdb[1] & 0x10 != 0;
    let code = cdb[2] & 0x3F;
    let subpage = cdb[3];
    let alloc = if six { usize::from(cdb[4]) } else { usize::from(be16(cdb, 7)) };
    let pc = match cdb[2] >> 6 {
        0 => Pc::Current,
        1 => Pc::Changeable,
        2 => Pc::Default,
        _ => return Err(Sense::saving_params_not_supported()),
    };
    // No subpages: only "all pages and subpages" (3Fh/FFh) has a meaning besides 00h.
    if subpage != 0 && !(code == ALL_PAGES && subpage == 0xFF) {
        return Err(Sense::invalid_field_in_cdb(3, 7));
    }
    let pages: &[u8] = match code {
        ALL_PAGES => &PAGES,
        CACHING => &PAGES[0..1],
        CONTROL => &PAGES[1..2],
        INFO_EXCEPTIONS => &PAGES[2..3],
        _ => return Err(Sense::invalid_field_in_cdb(2, 5)),
    };
    let hdr = if six { 4 } else { 8 };
    let bd_len = match (dbd, llbaa) {
        (true, _) => 0,
        (false, false) => 8,
        (false, true) => 16,
    };
    buf[..hdr + bd_len].fill(0);
    // Device-specific parameter: WP for read-only LUNs, DPOFUA (DPO and FUA are accepted).
    let dsp = if pc == Pc::Changeable { 0 } else { 0x10 | if lun.read_only { 0x80 } else { 0 } };
    if six {
        buf[2] = dsp;
        buf[3] = bd_len as u8;
    } else {
        buf[3] = dsp;
        buf[4] = u8::from(llbaa && !dbd); // LONGLBA
        put16(buf, 6, bd_len as u16);
    }
    if pc != Pc::Changeable {
        let bd = &mut buf[hdr..hdr + bd_len];
        match bd_len {
            8 => {
                put32(bd, 0, u32::try_from(lun.num_blocks()).unwrap_or(u32::MAX));
                put32(bd, 4, lun.block_size()); // byte 4 (density code) stays 0: block size < 2^24
            }
            16 => {
                put64(bd, 0, lun.num_blocks());
                put32(bd, 12, lun.block_size());
            }
            _ => {}
        }
    }
    let mut n = hdr + bd_len;
    for &code in pages {
        n += page(code, pc, lun, &mut buf[n..]).unwrap_or(0);
    }
    if six {
        buf[0] = (n - 1) as u8;
    } else {
        put16(buf, 0, (n - 2) as u16);
    }
    data_in(buf, n, alloc)
}

/// MODE SELECT(6/10): checks the CDB and asks for the parameter list.
pub(super) fn select(cdb: &[u8]) -> Res {
    let len = select_check(cdb)?;
    if len == 0 {
        return Ok(Disposition::Good);
    }
    Ok(Disposition::DataOut { len: u32::from(len) })
}

fn select_check(cdb: &[u8]) -> Result<u16, Sense> {
    if cdb[1] & 0x10 == 0 {
        return Err(Sense::invalid_field_in_cdb(1, 4)); // PF: only the SPC page format
    }
    if cdb[1] & 0x01 != 0 {
        return Err(Sense::invalid_field_in_cdb(1, 0)); // SP: nothing can be saved
    }
    Ok(if cdb[0] == op::MODE_SELECT_6 { u16::from(cdb[4]) } else { be16(cdb, 7) })
}

/// MODE SELECT's parameter list: header, optional block descriptor, pages. Every change is
/// checked before any is applied.
pub(super) fn select_data(cdb: &[u8], lun: &Lun, nexus: &Nexus, data: &[u8]) -> Res {
    let len = usize::from(select_check(cdb)?);
    let data = &data[..len.min(data.len())];
    let six = cdb[0] == op::MODE_SELECT_6;
    let hdr = if six { 4 } else { 8 };
    if data.len() < hdr {
        return Err(Sense::parameter_list_length_error());
    }
    let (medium_type, bd_len, long_lba) = if six {
        (data[1], usize::from(data[3]), false)
    } else {
        (data[2], usize::from(be16(data, 6)), data[4] & 1 != 0)
    };
    if medium_type != 0 {
        return Err(Sense::invalid_field_in_param_list(if six { 1 } else { 2 }, 7));
    }
    let bd_size = if long_lba { 16 } else { 8 };
    if bd_len != 0 && bd_len != bd_size {
        return Err(Sense::invalid_field_in_param_list(if six { 3 } else { 6 }, 7));
    }
    if hdr + bd_len > data.len() {
        return Err(Sense::parameter_list_length_error());
    }
    if bd_len != 0 {
        // The block length cannot change; 0 means "unchanged".
        let (off, block_len) = if long_lba { (hdr + 12, be32(data, hdr + 12)) } else { (hdr + 5, be24(data, hdr + 5)) };
        if block_len != 0 && block_len != lun.block_size() {
            return Err(Sense::invalid_field_in_param_list(off as u16, 7));
        }
    }
    let (mut wce, mut d_sense) = (lun.write_cache(), lun.d_sense());
    let mut off = hdr + bd_len;
    while off < data.len() {
        if data.len() - off < 2 {
            return Err(Sense::parameter_list_length_error());
        }
        if data[off] & 0x40 != 0 {
            return Err(Sense::invalid_field_in_param_list(off as u16, 6)); // SPF: no subpages
        }
        let code = data[off] & 0x3F;
        let plen = usize::from(data[off + 1]) + 2;
        if off + plen > data.len() {
            return Err(Sense::parameter_list_length_error());
        }
        let (mut cur, mut mask) = ([0u8; MAX_PAGE_LEN], [0u8; MAX_PAGE_LEN]);
        let Some(n) = page(code, Pc::Current, lun, &mut cur) else {
            return Err(Sense::invalid_field_in_param_list(off as u16, 5));
        };
        page(code, Pc::Changeable, lun, &mut mask);
        if plen != n {
            return Err(Sense::invalid_field_in_param_list(off as u16 + 1, 7));
        }
        let new = &data[off..off + plen];
        for i in 2..n {
            let bad = (new[i] ^ cur[i]) & !mask[i];
            if bad != 0 {
                return Err(Sense::invalid_field_in_param_list((off + i) as u16, 7 - bad.leading_zeros() as u8));
            }
        }
        match code {
            CACHING => wce = new[2] & WCE != 0,
            CONTROL => d_sense = new[2] & D_SENSE != 0,
            _ => {}
        }
        off += plen;
    }
    let changed = wce != lun.write_cache() || d_sense != lun.d_sense();
    lun.write_cache.store(wce, Ordering::Relaxed);
    lun.d_sense.store(d_sense, Ordering::Relaxed);
    if changed {
        nexus.notify_others(lun, ua::MODE_PARAMETERS_CHANGED);
    }
    Ok(Disposition::Good)
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;
    use crate::scsi::cdb::be64;
    use crate::scsi::{LunTable, Nexus, SenseKey};

    fn ms6(dbd: bool, pc: u8, page: u8, sub: u8, alloc: u8) -> [u8; 6] {
        [op::MODE_SENSE_6, if dbd { 0x08 } else { 0 }, (pc << 6) | page, sub, alloc, 0]
    }

    fn ms10(flags: u8, pc: u8, page: u8, alloc: u16) -> [u8; 10] {
        let [hi, lo] = alloc.to_be_bytes();
        [op::MODE_SENSE_10, flags, (pc << 6) | page, 0, 0, 0, 0, hi, lo, 0]
    }

    fn get(t: &LunTable, n: &mut Nexus, cdb: &[u8], lun: u64) -> Vec<u8> {
        let mut buf = vec![0u8; 65536];
        let Disposition::DataIn(len) = exec(t, n, cdb, lun, &mut buf) else { panic!("no data") };
        buf.truncate(len);
        buf
    }

    fn select6(pages: &[u8]) -> ([u8; 6], Vec<u8>) {
        let data = [&[0u8, 0, 0, 0][..], pages].concat();
        ([op::MODE_SELECT_6, 0x10, 0, 0, data.len() as u8, 0], data)
    }

    #[test]
    fn sense6_all_pages_with_block_descriptor() {
        let (t, mut n) = setup();
        let d = get(&t, &mut n, &ms6(false, 0, 0x3F, 0, 255), 0);
        assert_eq!(d.len(), 4 + 8 + 20 + 12 + 12);
        assert_eq!(&d[..4], &[d.len() as u8 - 1, 0, 0x10, 8]);
        assert_eq!(be32(&d, 4), BLOCKS as u32);
        assert_eq!(be32(&d, 8), 512);
        assert_eq!(&d[12..15], &[0x08, 0x12, WCE]);
        assert_eq!(&d[32..36], &[0x0A, 0x0A, TST_PER_NEXUS, 0x10]);
        assert_eq!(&d[44..47], &[0x1C, 0x0A, 0x08]);
        // All pages and subpages is the same set.
        assert_eq!(get(&t, &mut n, &ms6(false, 0, 0x3F, 0xFF, 255), 0), d);
        // Read-only LUN: WP.
        let d = get(&t, &mut n, &ms6(true, 0, 0x08, 0, 255), 1);
        assert_eq!(&d[..4], &[23, 0, 0x90, 0]);
        // Allocation length cuts, mode data length does not.
        let d = get(&t, &mut n, &ms6(true, 0, 0x3F, 0, 4), 0);
        assert_eq!(d, [47, 0, 0x10, 0]);
    }

    #[test]
    fn sense_page_controls() {
        let (t, mut n) = setup();
        let d = get(&t, &mut n, &ms6(true, 1, 0x3F, 0, 255), 0);
        assert_eq!(&d[..4], &[47, 0, 0, 0]);
        assert_eq!(&d[4..7], &[0x08, 0x12, WCE]);
        assert!(d[7..24].iter().all(|&b| b == 0));
        assert_eq!(&d[24..28], &[0x0A, 0x0A, D_SENSE, 0]);
        assert_eq!(&d[36..40], &[0x1C, 0x0A, 0, 0]);
        t.get(0).unwrap().write_cache.store(false, Ordering::Relaxed);
        let cur = get(&t, &mut n, &ms6(true, 0, 0x08, 0, 255), 0);
        assert_eq!(cur[6], 0);
        let def = get(&t, &mut n, &ms6(true, 2, 0x08, 0, 255), 0);
        assert_eq!(def[6], WCE);
        let s = sense(exec(&t, &mut n, &ms6(true, 3, 0x08, 0, 255), 0, &mut [0; 256]));
        assert_eq!((s.key, s.asc), (SenseKey::IllegalRequest, 0x39));
        assert_eq!(sense(exec(&t, &mut n, &ms6(true, 0, 0x19, 0, 255), 0, &mut [0; 256])).specific, Some([0x4D, 0, 2]));
        assert_eq!(sense(exec(&t, &mut n, &ms6(true, 0, 0x08, 1, 255), 0, &mut [0; 256])).specific, Some([0x4F, 0, 3]));
    }

    #[test]
    fn sense10_block_descriptors() {
        let (t, mut n) = setup();
        let d = get(&t, &mut n, &ms10(0, 0, 0x0A, 512), 0);
        assert_eq!(d.len(), 8 + 8 + 12);
        assert_eq!(&d[..8], &[0, 26, 0, 0x10, 0, 0, 0, 8]);
        assert_eq!(be32(&d, 8), BLOCKS as u32);
        let d = get(&t, &mut n, &ms10(0x10, 0, 0x0A, 512), 0);
        assert_eq!(d.len(), 8 + 16 + 12);
        assert_eq!(&d[..8], &[0, 34, 0, 0x10, 1, 0, 0, 16]);
        assert_eq!(be64(&d, 8), BLOCKS);
        assert_eq!(be32(&d, 20), 512);
        let d = get(&t, &mut n, &ms10(0x18, 0, 0x0A, 512), 0);
        assert_eq!(&d[..8], &[0, 18, 0, 0x10, 0, 0, 0, 0]);
    }

    #[test]
    fn select_round_trips() {
        let (t, mut n) = setup();
        let l = t.get(0).unwrap();
        // Change WCE off and D_SENSE on using what MODE SENSE returned.
        let mut caching = get(&t, &mut n, &ms6(true, 0, 0x08, 0, 255), 0)[4..].to_vec();
        caching[2] &= !WCE;
        let mut control = get(&t, &mut n, &ms6(true, 0, 0x0A, 0, 255), 0)[4..].to_vec();
        control[2] |= D_SENSE;
        let (cdb, data) = select6(&[caching, control].concat());
        assert_eq!(exec_out(&t, &mut n, &cdb, 0, &data), Disposition::Good);
        assert!(!l.write_cache() && l.d_sense());
        assert_eq!(get(&t, &mut n, &ms6(true, 0, 0x08, 0, 255), 0)[6], 0);
        assert_eq!(get(&t, &mut n, &ms6(true, 0, 0x0A, 0, 255), 0)[6], TST_PER_NEXUS | D_SENSE);

        // MODE SELECT(10) with a block descriptor turns WCE back on.
        let mut d = get(&t, &mut n, &ms10(0, 0, 0x08, 512), 0);
        d[0..2].fill(0);
        d[3] = 0;
        d[16 + 2] |= WCE;
        let mut cdb = [op::MODE_SELECT_10, 0x10, 0, 0, 0, 0, 0, 0, 0, 0];
        put16(&mut cdb, 7, d.len() as u16);
        assert_eq!(exec_out(&t, &mut n, &cdb, 0, &d), Disposition::Good);
        assert!(l.write_cache());
        assert_eq!(run_len0(&t, &mut n), Disposition::Good);
    }

    #[test]
    fn changes_tell_the_other_sessions() {
        let (t, mut n) = setup();
        let mut other = Nexus::new();
        other.take(0);
        let mut buf = [0u8; 64];
        // Both sessions have used the LUN.
        assert_eq!(exec(&t, &mut other, &[0u8; 6], 0, &mut buf), Disposition::Good);
        let mut caching = get(&t, &mut n, &ms6(true, 0, 0x08, 0, 255), 0)[4..].to_vec();
        // Selecting the current values changes nothing and tells no one.
        let (cdb, data) = select6(&caching);
        assert_eq!(exec_out(&t, &mut n, &cdb, 0, &data), Disposition::Good);
        assert_eq!(exec(&t, &mut other, &[0u8; 6], 0, &mut buf), Disposition::Good);
        caching[2] &= !WCE;
        let (cdb, data) = select6(&caching);
        assert_eq!(exec_out(&t, &mut n, &cdb, 0, &data), Disposition::Good);
        assert_eq!(check(exec(&t, &mut other, &[0u8; 6], 0, &mut buf)), (SenseKey::UnitAttention, 0x2A, 0x01));
        assert_eq!(exec(&t, &mut other, &[0u8; 6], 0, &mut buf), Disposition::Good);
        assert_eq!(exec(&t, &mut n, &[0u8; 6], 0, &mut buf), Disposition::Good, "not the session that changed it");
    }

    fn run_len0(t: &LunTable, n: &mut Nexus) -> Disposition {
        exec(t, n, &[op::MODE_SELECT_6, 0x10, 0, 0, 0, 0], 0, &mut [0; 64])
    }

    #[test]
    fn select_rejections() {
        let (t, mut n) = setup();
        let l = t.get(0).unwrap();
        let s = |d: Disposition| sense(d).specific;
        assert_eq!(s(exec(&t, &mut n, &[op::MODE_SELECT_6, 0x00, 0, 0, 4, 0], 0, &mut [0; 64])), Some([0x4C, 0, 1]));
        assert_eq!(s(exec(&t, &mut n, &[op::MODE_SELECT_6, 0x11, 0, 0, 4, 0], 0, &mut [0; 64])), Some([0x48, 0, 1]));
        // Unchangeable field: RCD in the caching page.
        let mut caching = [0u8; 20];
        page(CACHING, Pc::Current, l, &mut caching);
        caching[2] |= 0x01;
        let (cdb, data) = select6(&caching);
        let sn = sense(exec_out(&t, &mut n, &cdb, 0, &data));
        assert_eq!((sn.asc, sn.specific), (0x26, Some([0x08, 0, 6])));
        // A bad page in the list leaves the good one before it unapplied.
        caching[2] = 0;
        let mut control = [0u8; 12];
        page(CONTROL, Pc::Current, l, &mut control);
        control[3] = 0x20;
        let (cdb, data) = select6(&[&caching[..], &control[..]].concat());
        assert_eq!(s(exec_out(&t, &mut n, &cdb, 0, &data)), Some([0x0D, 0, 27]));
        assert!(l.write_cache());
        // Wrong page length, unknown page, subpage format, short list, block length.
        let mut bad = caching;
        bad[1] = 0x10;
        let (cdb, data) = select6(&bad[..18]);
        assert_eq!(s(exec_out(&t, &mut n, &cdb, 0, &data)), Some([0x0F, 0, 5]));
        let (cdb, data) = select6(&[0x19, 2, 0, 0]);
        assert_eq!(s(exec_out(&t, &mut n, &cdb, 0, &data)), Some([0x0D, 0, 4]));
        let (cdb, data) = select6(&[0x48, 2, 0, 0]);
        assert_eq!(s(exec_out(&t, &mut n, &cdb, 0, &data)), Some([0x0E, 0, 4]));
        let (cdb, data) = select6(&caching[..10]);
        assert_eq!(check(exec_out(&t, &mut n, &cdb, 0, &data)), (SenseKey::IllegalRequest, 0x1A, 0));
        let data = [0u8, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0x10, 0];
        let cdb = [op::MODE_SELECT_6, 0x10, 0, 0, 12, 0];
        assert_eq!(s(exec_out(&t, &mut n, &cdb, 0, &data)), Some([0x0F, 0, 9]));
    }
}
