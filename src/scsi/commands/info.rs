//! Commands that describe the target and its LUNs: REQUEST SENSE, READ CAPACITY, REPORT LUNS,
//! GET LBA STATUS, REPORT SUPPORTED OPERATION CODES / TASK MANAGEMENT FUNCTIONS.

use super::{data_in, sanitize, xcopy, Res};
use crate::scsi::cdb::{be16, be32, be64, op, put16, put32, put64, sa};
use crate::scsi::lun::{encode_lun, PHYS_BLOCK_EXP};
use crate::scsi::nexus::ua;
use crate::scsi::{provisioning, Lun, LunTable, Nexus, Sense};

/// REQUEST SENSE: the oldest pending unit attention (now cleared), else NO SENSE.
pub(super) fn request_sense(cdb: &[u8], lun: &Lun, nexus: &mut Nexus, buf: &mut [u8]) -> Res {
    let sense = match nexus.take(lun.id) {
        Some((asc, ascq)) => Sense::unit_attention(asc, ascq),
        None => Sense::no_sense(),
    };
    sense_data(cdb, &sense, buf)
}

/// REQUEST SENSE's Data-In: `sense` in the format the DESC bit asks for.
pub(super) fn sense_data(cdb: &[u8], sense: &Sense, buf: &mut [u8]) -> Res {
    let n = sense.encode(cdb[1] & 0x01 != 0, buf);
    data_in(buf, n, usize::from(cdb[4]))
}

/// READ CAPACITY(10).
pub(super) fn read_capacity_10(cdb: &[u8], lun: &Lun, buf: &mut [u8]) -> Res {
    // With PMI clear (it is obsolete) the LBA field must be zero.
    if cdb[8] & 0x01 == 0 && be32(cdb, 2) != 0 {
        return Err(Sense::invalid_field_in_cdb(2, 7));
    }
    let last = lun.num_blocks().saturating_sub(1);
    put32(buf, 0, u32::try_from(last).unwrap_or(u32::MAX));
    put32(buf, 4, lun.block_size());
    data_in(buf, 8, 8)
}

/// READ CAPACITY(16): thin provisioned (LBPME), unmapped blocks read as zeroes (LBPRZ).
pub(super) fn read_capacity_16(cdb: &[u8], lun: &Lun, buf: &mut [u8]) -> Res {
    buf[..32].fill(0);
    put64(buf, 0, lun.num_blocks().saturating_sub(1));
    put32(buf, 8, lun.block_size());
    buf[13] = PHYS_BLOCK_EXP;
    buf[14] = 0x80 | 0x40;
    data_in(buf, 32, be32(cdb, 10) as usize)
}

/// REPORT LUNS (any LUN address, never blocked by a unit attention).
pub(super) fn report_luns(cdb: &[u8], table: &LunTable, nexus: &mut Nexus, buf: &mut [u8]) -> Res {
    let alloc = be32(cdb, 6) as usize;
    if alloc < 4 {
        return Err(Sense::invalid_field_in_cdb(6, 7));
    }
    let with_luns = match cdb[2] {
        0x00 | 0x02 => true, // all LUNs (there are no well-known LUNs)
        0x01 => false,       // well-known LUNs only
        _ => return Err(Sense::invalid_field_in_cdb(2, 7)),
    };
    buf[..8].fill(0);
    let mut n = 8;
    if with_luns {
        for lun in table.iter() {
            if n + 8 <= buf.len() {
                buf[n..n + 8].copy_from_slice(&encode_lun(lun.id));
            }
            n += 8;
        }
    }
    put32(buf, 0, (n - 8) as u32);
    // The initiator has now seen the current inventory (SPC-4 6.33).
    nexus.clear_all(ua::LUNS_CHANGED);
    data_in(buf, n, alloc)
}

/// GET LBA STATUS, first phase: the range check. The extents come from the backing store
/// (`lseek` on files, a scan of RAM), so the rest runs offloaded.
pub(super) fn get_lba_status_check(cdb: &[u8], lun: &Lun) -> Res {
    if be64(cdb, 2) >= lun.num_blocks() {
        return Err(Sense::lba_out_of_range());
    }
    Ok(crate::scsi::Disposition::Offload { lock: None })
}

/// GET LBA STATUS: one descriptor per extent of mapped or deallocated blocks from the
/// starting LBA, as many as the allocation length holds.
pub(super) fn get_lba_status(cdb: &[u8], lun: &Lun, buf: &mut [u8]) -> Res {
    let lba = be64(cdb, 2);
    let alloc = be32(cdb, 10) as usize;
    let num = lun.num_blocks();
    if lba >= num {
        return Err(Sense::lba_out_of_range());
    }
    // At least one descriptor even when the allocation length cannot hold it: the length
    // field still tells the initiator what there is.
    let room = alloc.min(buf.len()).saturating_sub(8).div_ceil(16).max(1);
    buf[..8].fill(0);
    let (mut n, mut at) = (8, lba);
    while at < num && (n - 8) / 16 < room && n + 16 <= buf.len() {
        let e = provisioning::extent_at(&lun.backing, at, num);
        let blocks = e.blocks.min(u64::from(u32::MAX));
        let d = &mut buf[n..n + 16];
        d.fill(0);
        put64(d, 0, at);
        put32(d, 8, blocks as u32);
        d[12] = u8::from(e.deallocated); // PROVISIONING STATUS: 0 mapped, 1 deallocated
        n += 16;
        at += blocks;
    }
    put32(buf, 0, (n - 4) as u32);
    data_in(buf, n, alloc)
}

/// READ DEFECT DATA(10/12): a disk image has no defects, so an empty list in the format asked
/// for (SBC-3 5.13 / 5.14).
pub(super) fn read_defect_data(cdb: &[u8], buf: &mut [u8]) -> Res {
    // REQ_PLIST, REQ_GLIST and the DEFECT LIST FORMAT are echoed back.
    if cdb[0] == op::READ_DEFECT_DATA_10 {
        buf[..4].fill(0);
        buf[1] = cdb[2] & 0x1F;
        data_in(buf, 4, usize::from(be16(cdb, 7)))
    } else {
        buf[..8].fill(0);
        buf[1] = cdb[1] & 0x1F;
        data_in(buf, 8, be32(cdb, 6) as usize)
    }
}

/// One supported command: opcode, service action, CDB usage data (its first byte is the
/// opcode, the service action byte holds the service action, other bytes mask the bits the
/// device server looks at).
struct Supported {
    sa: Option<u8>,
    usage: &'static [u8],
}

const fn cmd(usage: &'static [u8]) -> Supported {
    Supported { sa: None, usage }
}

const fn sa_cmd(sa: u8, usage: &'static [u8]) -> Supported {
    Supported { sa: Some(sa), usage }
}

/// Control byte usage: NACA and LINK are looked at (to be rejected).
const C: u8 = 0x05;

/// Every command a disk LUN supports, by opcode.
static SUPPORTED: &[Supported] = &[
    cmd(&[op::TEST_UNIT_READY, 0, 0, 0, 0, C]),
    cmd(&[op::REQUEST_SENSE, 0x01, 0, 0, 0xFF, C]),
    cmd(&[op::READ_6, 0x1F, 0xFF, 0xFF, 0xFF, C]),
    cmd(&[op::WRITE_6, 0x1F, 0xFF, 0xFF, 0xFF, C]),
    cmd(&[op::INQUIRY, 0x03, 0xFF, 0xFF, 0xFF, C]),
    cmd(&[op::MODE_SELECT_6, 0x11, 0, 0, 0xFF, C]),
    cmd(&[op::RESERVE_6, 0, 0, 0, 0, C]),
    cmd(&[op::RELEASE_6, 0, 0, 0, 0, C]),
    cmd(&[op::MODE_SENSE_6, 0x08, 0xFF, 0xFF, 0xFF, C]),
    cmd(&[op::START_STOP_UNIT, 0x01, 0, 0, 0xF7, C]),
    cmd(&[op::PREVENT_ALLOW, 0, 0, 0, 0x03, C]),
    cmd(&[op::READ_CAPACITY_10, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0x01, C]),
    cmd(&[op::READ_10, 0xFA, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0xFF, 0xFF, C]),
    cmd(&[op::WRITE_10, 0xFA, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0xFF, 0xFF, C]),
    cmd(&[op::WRITE_VERIFY_10, 0xF6, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0xFF, 0xFF, C]),
    cmd(&[op::VERIFY_10, 0xF6, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0xFF, 0xFF, C]),
    cmd(&[op::PRE_FETCH_10, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0xFF, 0xFF, C]),
    cmd(&[op::READ_DEFECT_DATA_10, 0, 0x1F, 0, 0, 0, 0, 0xFF, 0xFF, C]),
    cmd(&[op::SYNC_CACHE_10, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0xFF, 0xFF, C]),
    cmd(&[op::WRITE_SAME_10, 0xFE, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0xFF, 0xFF, C]),
    cmd(&[op::UNMAP, 0x01, 0, 0, 0, 0, 0, 0xFF, 0xFF, C]),
    sa_cmd(sanitize::OVERWRITE, &[op::SANITIZE, 0x20 | sanitize::OVERWRITE, 0, 0, 0, 0, 0, 0xFF, 0xFF, C]),
    sa_cmd(sanitize::BLOCK_ERASE, &[op::SANITIZE, 0x20 | sanitize::BLOCK_ERASE, 0, 0, 0, 0, 0, 0xFF, 0xFF, C]),
    sa_cmd(
        sanitize::EXIT_FAILURE_MODE,
        &[op::SANITIZE, 0x20 | sanitize::EXIT_FAILURE_MODE, 0, 0, 0, 0, 0, 0xFF, 0xFF, C],
    ),
    cmd(&[op::MODE_SELECT_10, 0x11, 0, 0, 0, 0, 0, 0xFF, 0xFF, C]),
    cmd(&[op::RESERVE_10, 0x12, 0, 0, 0, 0, 0, 0, 0, C]),
    cmd(&[op::RELEASE_10, 0x12, 0, 0, 0, 0, 0, 0, 0, C]),
    cmd(&[op::MODE_SENSE_10, 0x18, 0xFF, 0xFF, 0, 0, 0, 0xFF, 0xFF, C]),
    cmd(&[op::PERSISTENT_RESERVE_IN, 0x1F, 0, 0, 0, 0, 0, 0xFF, 0xFF, C]),
    cmd(&[op::PERSISTENT_RESERVE_OUT, 0x1F, 0xFF, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, C]),
    sa_cmd(0x00, &[op::EXTENDED_COPY, 0x00, 0, 0, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, C]),
    sa_cmd(
        xcopy::RCR_COPY_STATUS,
        &[op::RECEIVE_COPY_RESULTS, xcopy::RCR_COPY_STATUS, 0xFF, 0, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, C],
    ),
    sa_cmd(
        xcopy::RCR_OPERATING_PARAMETERS,
        &[
            op::RECEIVE_COPY_RESULTS,
            xcopy::RCR_OPERATING_PARAMETERS,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0xFF,
            0xFF,
            0xFF,
            0xFF,
            0,
            C,
        ],
    ),
    cmd(&[op::READ_16, 0xFA, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, C]),
    cmd(&[op::COMPARE_AND_WRITE, 0xE8, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0, 0xFF, 0, C]),
    cmd(&[op::WRITE_16, 0xFA, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, C]),
    cmd(&[op::ORWRITE_16, 0xE8, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, C]),
    cmd(&[op::WRITE_VERIFY_16, 0xF6, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, C]),
    cmd(&[op::VERIFY_16, 0xF6, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, C]),
    cmd(&[op::PRE_FETCH_16, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, C]),
    cmd(&[op::SYNC_CACHE_16, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, C]),
    cmd(&[op::WRITE_ATOMIC_16, 0xF8, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0xFF, 0xFF, 0, C]),
    cmd(&[op::WRITE_SAME_16, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, C]),
    sa_cmd(
        sa::READ_CAPACITY_16,
        &[op::SERVICE_ACTION_IN_16, sa::READ_CAPACITY_16, 0, 0, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, C],
    ),
    sa_cmd(
        sa::GET_LBA_STATUS,
        &[
            op::SERVICE_ACTION_IN_16,
            sa::GET_LBA_STATUS,
            0xFF,
            0xFF,
            0xFF,
            0xFF,
            0xFF,
            0xFF,
            0xFF,
            0xFF,
            0xFF,
            0xFF,
            0xFF,
            0xFF,
            0,
            C,
        ],
    ),
    cmd(&[op::REPORT_LUNS, 0, 0xFF, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, C]),
    sa_cmd(
        sa::REPORT_SUPPORTED_OPCODES,
        &[op::MAINTENANCE_IN, sa::REPORT_SUPPORTED_OPCODES, 0x87, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, C],
    ),
    sa_cmd(
        sa::REPORT_SUPPORTED_TMFS,
        &[op::MAINTENANCE_IN, sa::REPORT_SUPPORTED_TMFS, 0x80, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, C],
    ),
    cmd(&[op::READ_12, 0xFA, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, C]),
    cmd(&[op::WRITE_12, 0xFA, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, C]),
    cmd(&[op::WRITE_VERIFY_12, 0xF6, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, C]),
    cmd(&[op::VERIFY_12, 0xF6, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, C]),
    cmd(&[op::READ_DEFECT_DATA_12, 0x1F, 0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, C]),
];

/// Opcodes whose commands are told apart by a service action.
fn has_service_actions(opcode: u8) -> bool {
    matches!(
        opcode,
        op::SERVICE_ACTION_IN_16 | op::MAINTENANCE_IN | op::EXTENDED_COPY | op::RECEIVE_COPY_RESULTS | op::SANITIZE
    )
}

/// Writes a command timeouts descriptor (no timeouts specified); returns its length.
fn timeouts(out: &mut [u8]) -> usize {
    out[..12].fill(0);
    put16(out, 0, 0x0A);
    12
}

/// REPORT SUPPORTED OPERATION CODES: reporting options 000b (all), 001b (one opcode),
/// 010b (opcode + service action) and 011b (either).
pub(super) fn report_supported_opcodes(cdb: &[u8], buf: &mut [u8]) -> Res {
    let rctd = cdb[2] & 0x80 != 0;
    let alloc = be32(cdb, 6) as usize;
    let (req_op, req_sa) = (cdb[3], be16(cdb, 4));
    let n = match cdb[2] & 0x07 {
        0 => {
            let mut n = 4;
            for c in SUPPORTED {
                let d = &mut buf[n..n + 8];
                d.fill(0);
                d[0] = c.usage[0];
                put16(d, 2, u16::from(c.sa.unwrap_or(0)));
                d[5] = if rctd { 0x02 } else { 0 } | u8::from(c.sa.is_some());
                put16(d, 6, c.usage.len() as u16);
                n += 8;
                if rctd {
                    n += timeouts(&mut buf[n..]);
                }
            }
            put32(buf, 0, (n - 4) as u32);
            n
        }
        opts @ 1..=3 => {
            let with_sa = has_service_actions(req_op);
            match (opts, with_sa) {
                (1, true) => return Err(Sense::invalid_field_in_cdb(3, 7)),
                (2, false) => return Err(Sense::invalid_field_in_cdb(3, 7)),
                (3, false) if req_sa != 0 => return Err(Sense::invalid_field_in_cdb(4, 7)),
                _ => {}
            }
            let found =
                SUPPORTED.iter().find(|c| c.usage[0] == req_op && (!with_sa || c.sa.map(u16::from) == Some(req_sa)));
            buf[..4].fill(0);
            match found {
                Some(c) => {
                    buf[1] = if rctd { 0x80 } else { 0 } | 0x03; // SUPPORT: as the standard says
                    put16(buf, 2, c.usage.len() as u16);
                    buf[4..4 + c.usage.len()].copy_from_slice(c.usage);
                    let n = 4 + c.usage.len();
                    if rctd {
                        n + timeouts(&mut buf[n..])
                    } else {
                        n
                    }
                }
                None => {
                    buf[1] = 0x01; // SUPPORT: not supported
                    4
                }
            }
        }
        _ => return Err(Sense::invalid_field_in_cdb(2, 2)),
    };
    data_in(buf, n, alloc)
}

/// REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS: what iSCSI task management maps to.
pub(super) fn report_supported_tmfs(cdb: &[u8], buf: &mut [u8]) -> Res {
    let repd = cdb[2] & 0x80 != 0;
    let n = if repd { 16 } else { 4 };
    buf[..n].fill(0);
    // ABORT TASK, ABORT TASK SET, CLEAR TASK SET, LOGICAL UNIT RESET, TARGET RESET.
    buf[0] = 0x80 | 0x40 | 0x10 | 0x08 | 0x02;
    if repd {
        buf[3] = 0x0C;
    }
    data_in(buf, n, be32(cdb, 6) as usize)
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;
    use crate::scsi::{Disposition, SenseKey};

    fn sai(sa: u8, lba: u64, alloc: u32) -> [u8; 16] {
        cdb16(op::SERVICE_ACTION_IN_16, sa, lba, alloc)
    }

    fn rsoc(opts: u8, opcode: u8, sa: u16, alloc: u32) -> [u8; 12] {
        let mut c = [0u8; 12];
        c[0] = op::MAINTENANCE_IN;
        c[1] = sa::REPORT_SUPPORTED_OPCODES;
        c[2] = opts;
        c[3] = opcode;
        put16(&mut c, 4, sa);
        put32(&mut c, 6, alloc);
        c
    }

    #[test]
    fn read_capacity() {
        let (t, mut n) = setup();
        let mut buf = vec![0u8; 65536];
        let rc10 = [op::READ_CAPACITY_10, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(exec(&t, &mut n, &rc10, 0, &mut buf), Disposition::DataIn(8));
        assert_eq!(&buf[..8], &[0, 0, 0x03, 0xFF, 0, 0, 0x02, 0x00]);
        let bad = [op::READ_CAPACITY_10, 0, 0, 0, 0, 1, 0, 0, 0, 0];
        assert_eq!(sense(exec(&t, &mut n, &bad, 0, &mut buf)).asc, 0x24);

        assert_eq!(exec(&t, &mut n, &sai(sa::READ_CAPACITY_16, 0, 32), 0, &mut buf), Disposition::DataIn(32));
        assert_eq!(be64(&buf, 0), BLOCKS - 1);
        assert_eq!(be32(&buf, 8), 512);
        assert_eq!((buf[12], buf[13], buf[14], buf[15]), (0, PHYS_BLOCK_EXP, 0xC0, 0));
        assert_eq!(exec(&t, &mut n, &sai(sa::READ_CAPACITY_16, 0, 12), 0, &mut buf), Disposition::DataIn(12));
    }

    #[test]
    fn read_capacity_10_one_block() {
        let l = Lun::new(0, "small", None, crate::backing::Backing::new_mem(512).unwrap(), false, "t");
        let mut buf = [0u8; 8];
        assert_eq!(
            read_capacity_10(&[op::READ_CAPACITY_10, 0, 0, 0, 0, 0, 0, 0, 0, 0], &l, &mut buf),
            Ok(Disposition::DataIn(8))
        );
        assert_eq!(buf, [0, 0, 0, 0, 0, 0, 2, 0]);
    }

    #[test]
    fn report_luns_selects_and_cuts() {
        let (t, mut n) = setup();
        let mut buf = vec![0u8; 65536];
        let mut rl = [op::REPORT_LUNS, 0, 0, 0, 0, 0, 0, 0, 0, 0xFF, 0, 0];
        assert_eq!(exec(&t, &mut n, &rl, 0, &mut buf), Disposition::DataIn(24));
        assert_eq!(&buf[..24], &[0, 0, 0, 16, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
        rl[2] = 2;
        assert_eq!(exec(&t, &mut n, &rl, 0, &mut buf), Disposition::DataIn(24));
        rl[2] = 1;
        assert_eq!(exec(&t, &mut n, &rl, 0, &mut buf), Disposition::DataIn(8));
        assert_eq!(be32(&buf, 0), 0);
        rl[2] = 0x10;
        assert_eq!(sense(exec(&t, &mut n, &rl, 0, &mut buf)).asc, 0x24);
        let cut = [op::REPORT_LUNS, 0, 0, 0, 0, 0, 0, 0, 0, 16, 0, 0];
        assert_eq!(exec(&t, &mut n, &cut, 0, &mut buf), Disposition::DataIn(16));
        assert_eq!(be32(&buf, 0), 16, "full list length despite the cut");
        let short = [op::REPORT_LUNS, 0, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0];
        assert_eq!(sense(exec(&t, &mut n, &short, 0, &mut buf)).asc, 0x24);
        let big = LunTable::new(vec![lun(300, false)]);
        assert_eq!(exec(&big, &mut n, &cut, 7, &mut buf), Disposition::DataIn(16));
        assert_eq!(&buf[8..10], &[0x41, 0x2C]);
    }

    #[test]
    fn request_sense_formats() {
        let (t, mut n) = setup();
        let mut buf = vec![0u8; 65536];
        n.lun_reset(t.get(0).unwrap());
        let rs = [op::REQUEST_SENSE, 1, 0, 0, 252, 0];
        assert_eq!(exec(&t, &mut n, &rs, 0, &mut buf), Disposition::DataIn(8));
        assert_eq!(&buf[..4], &[0x72, 0x06, 0x29, 0x03]);
        assert_eq!(exec(&t, &mut n, &rs, 0, &mut buf), Disposition::DataIn(8));
        assert_eq!(&buf[..4], &[0x72, 0x00, 0x00, 0x00]);
        let rs = [op::REQUEST_SENSE, 0, 0, 0, 4, 0];
        assert_eq!(exec(&t, &mut n, &rs, 0, &mut buf), Disposition::DataIn(4));
    }

    #[test]
    fn get_lba_status() {
        let (t, mut n) = setup();
        let mut buf = vec![0u8; 65536];
        let l = t.get(0).unwrap();
        l.backing.write_at(&[7; 512 * 40], 30 * 512, false).unwrap();
        // One descriptor fits in 24 bytes: the deallocated run from LBA 24 to 30.
        assert_eq!(exec(&t, &mut n, &sai(sa::GET_LBA_STATUS, 24, 24), 0, &mut buf), Disposition::DataIn(24));
        assert_eq!(be32(&buf, 0), 20);
        assert_eq!((be64(&buf, 8), be32(&buf, 16), buf[20]), (24, 6, 1));
        // With room for more: mapped 30..70, then deallocated to the end.
        assert_eq!(exec(&t, &mut n, &sai(sa::GET_LBA_STATUS, 24, 1024), 0, &mut buf), Disposition::DataIn(56));
        assert_eq!(be32(&buf, 0), 52);
        assert_eq!((be64(&buf, 24), be32(&buf, 32), buf[36]), (30, 40, 0));
        assert_eq!((be64(&buf, 40), u64::from(be32(&buf, 48)), buf[52]), (70, BLOCKS - 70, 1));
        // The first descriptor always starts at the requested LBA.
        assert_eq!(exec(&t, &mut n, &sai(sa::GET_LBA_STATUS, 31, 24), 0, &mut buf), Disposition::DataIn(24));
        assert_eq!((be64(&buf, 8), be32(&buf, 16), buf[20]), (31, 39, 0));
        // An allocation length below one descriptor still reports the full length.
        assert_eq!(exec(&t, &mut n, &sai(sa::GET_LBA_STATUS, 0, 8), 0, &mut buf), Disposition::DataIn(8));
        assert_eq!(be32(&buf, 0), 20);
        assert_eq!(
            check(exec(&t, &mut n, &sai(sa::GET_LBA_STATUS, BLOCKS, 24), 0, &mut buf)),
            (SenseKey::IllegalRequest, 0x21, 0)
        );
    }

    #[test]
    fn verify_commands_report_dpo() {
        for opcode in
            [op::VERIFY_10, op::VERIFY_12, op::VERIFY_16, op::WRITE_VERIFY_10, op::WRITE_VERIFY_12, op::WRITE_VERIFY_16]
        {
            let c = SUPPORTED.iter().find(|c| c.usage[0] == opcode).unwrap();
            assert_eq!(c.usage[1] & 0x10, 0x10, "{opcode:#x}");
        }
    }

    #[test]
    fn supported_opcodes_all() {
        let (t, mut n) = setup();
        let mut buf = vec![0u8; 65536];
        let Disposition::DataIn(len) = exec(&t, &mut n, &rsoc(0, 0, 0, 65535), 0, &mut buf) else { panic!() };
        assert_eq!(len, 4 + 8 * SUPPORTED.len());
        assert_eq!(be32(&buf, 0) as usize, len - 4);
        let descs: Vec<&[u8]> = buf[4..len].chunks(8).collect();
        let rc16 = descs.iter().find(|d| d[0] == 0x9E && be16(d, 2) == 0x10).unwrap();
        assert_eq!((rc16[5], be16(rc16, 6)), (0x01, 16));
        let rd10 = descs.iter().find(|d| d[0] == op::READ_10).unwrap();
        assert_eq!((rd10[5], be16(rd10, 6)), (0x00, 10));
        // Every table entry's CDB usage data is as long as its CDB.
        for c in SUPPORTED {
            assert_eq!(Some(c.usage.len()), crate::scsi::cdb::cdb_len(c.usage[0]), "{:#x}", c.usage[0]);
        }
        // RCTD: a timeouts descriptor after each.
        let Disposition::DataIn(len) = exec(&t, &mut n, &rsoc(0x80, 0, 0, 65535), 0, &mut buf) else { panic!() };
        assert_eq!(len, 4 + 20 * SUPPORTED.len());
        assert_eq!((buf[4 + 5], be16(&buf, 4 + 8)), (0x02, 0x0A));
        assert_eq!(exec(&t, &mut n, &rsoc(0, 0, 0, 100), 0, &mut buf), Disposition::DataIn(100));
    }

    #[test]
    fn supported_opcodes_one() {
        let (t, mut n) = setup();
        let mut buf = vec![0u8; 65536];
        assert_eq!(exec(&t, &mut n, &rsoc(1, op::READ_10, 0, 512), 0, &mut buf), Disposition::DataIn(14));
        assert_eq!(&buf[..6], &[0, 0x03, 0, 10, op::READ_10, 0xFA]);
        assert_eq!(exec(&t, &mut n, &rsoc(0x81, op::WRITE_16, 0, 512), 0, &mut buf), Disposition::DataIn(32));
        assert_eq!((buf[1], be16(&buf, 20)), (0x83, 0x0A));
        assert_eq!(exec(&t, &mut n, &rsoc(1, 0x02, 0, 512), 0, &mut buf), Disposition::DataIn(4));
        assert_eq!(buf[1], 0x01);
        assert_eq!(sense(exec(&t, &mut n, &rsoc(1, 0x9E, 0x10, 512), 0, &mut buf)).asc, 0x24);
        assert_eq!(exec(&t, &mut n, &rsoc(2, 0x9E, 0x10, 512), 0, &mut buf), Disposition::DataIn(20));
        assert_eq!(&buf[..6], &[0, 0x03, 0, 16, 0x9E, 0x10]);
        assert_eq!(exec(&t, &mut n, &rsoc(2, 0xA3, 0x1F, 512), 0, &mut buf), Disposition::DataIn(4));
        assert_eq!(buf[1], 0x01);
        assert_eq!(sense(exec(&t, &mut n, &rsoc(2, op::READ_10, 0, 512), 0, &mut buf)).asc, 0x24);
        assert_eq!(exec(&t, &mut n, &rsoc(3, op::READ_10, 0, 512), 0, &mut buf), Disposition::DataIn(14));
        assert_eq!(exec(&t, &mut n, &rsoc(3, 0xA3, 0x0C, 512), 0, &mut buf), Disposition::DataIn(16));
        assert_eq!(sense(exec(&t, &mut n, &rsoc(4, 0, 0, 512), 0, &mut buf)).asc, 0x24);
    }

    #[test]
    fn read_defect_data_is_an_empty_list() {
        let (t, mut n) = setup();
        let mut buf = vec![0xAAu8; 64];
        let rdd10 = [op::READ_DEFECT_DATA_10, 0, 0x1D, 0, 0, 0, 0, 0, 32, 0];
        assert_eq!(exec(&t, &mut n, &rdd10, 0, &mut buf), Disposition::DataIn(4));
        assert_eq!(&buf[..4], &[0, 0x1D, 0, 0]);
        let mut rdd12 = [0u8; 12];
        rdd12[0] = op::READ_DEFECT_DATA_12;
        rdd12[1] = 0x0C;
        rdd12[9] = 4;
        assert_eq!(exec(&t, &mut n, &rdd12, 0, &mut buf), Disposition::DataIn(4), "cut to the allocation length");
        rdd12[9] = 32;
        assert_eq!(exec(&t, &mut n, &rdd12, 0, &mut buf), Disposition::DataIn(8));
        assert_eq!(&buf[..8], &[0, 0x0C, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn supported_tmfs() {
        let (t, mut n) = setup();
        let mut buf = vec![0u8; 64];
        let mut c = [op::MAINTENANCE_IN, sa::REPORT_SUPPORTED_TMFS, 0, 0, 0, 0, 0, 0, 0, 16, 0, 0];
        assert_eq!(exec(&t, &mut n, &c, 0, &mut buf), Disposition::DataIn(4));
        assert_eq!(buf[0], 0xDA);
        c[2] = 0x80;
        assert_eq!(exec(&t, &mut n, &c, 0, &mut buf), Disposition::DataIn(16));
        assert_eq!(buf[3], 0x0C);
    }
}
