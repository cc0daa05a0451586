//! INQUIRY: standard data and the vital product data pages of a disk LUN (SPC-4 6.6, 7.8;
//! SBC-3 6.6).

use super::block::{
    MAX_ATOMIC_BLOCKS, MAX_CAW_BLOCKS, MAX_TRANSFER_BLOCKS, MAX_UNMAP_BLOCKS, MAX_UNMAP_DESCRIPTORS,
    MAX_WRITE_SAME_BLOCKS,
};
use super::{data_in, Res};
use crate::scsi::cdb::{be16, put16, put32, put64};
use crate::scsi::lun::GRANULARITY_BLOCKS;
use crate::scsi::{Lun, Sense};

pub const VENDOR: &str = "URINGTGT";
pub const PRODUCT: &str = "uringtgt disk";

/// VPD pages served, ascending.
const VPD_PAGES: [u8; 6] = [0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2];
/// Version descriptors: SAM-5, iSCSI, SPC-4, SBC-3.
const VERSION_DESCRIPTORS: [u16; 4] = [0x00A0, 0x0960, 0x0460, 0x04C0];
const STD_LEN: usize = 96;

/// Copies `s` into `out` as space-padded ASCII (SPC-4 4.4.1).
fn ascii(out: &mut [u8], s: &str) {
    out.fill(b' ');
    let n = s.len().min(out.len());
    out[..n].copy_from_slice(&s.as_bytes()[..n]);
}

/// The 4-byte PRODUCT REVISION LEVEL from a version: as much of it as fits, without a dangling
/// separator (`0.1.0` → `0.1`, not `0.1.`).
fn product_revision(version: &str) -> &str {
    version[..version.len().min(4)].trim_end_matches(['.', '-', '+'])
}

/// INQUIRY; `lun` is `None` for a LUN address with no logical unit behind it.
pub(super) fn inquiry(cdb: &[u8], lun: Option<&Lun>, buf: &mut [u8]) -> Res {
    let evpd = cdb[1] & 0x01 != 0;
    let page = cdb[2];
    let alloc = usize::from(be16(cdb, 3));
    if cdb[1] & 0x02 != 0 {
        return Err(Sense::invalid_field_in_cdb(1, 1)); // CMDDT (obsolete)
    }
    if !evpd {
        if page != 0 {
            return Err(Sense::invalid_field_in_cdb(2, 7));
        }
        let n = standard(lun, buf);
        return data_in(buf, n, alloc);
    }
    let lun = lun.ok_or_else(Sense::lun_not_supported)?;
    buf[..4].fill(0);
    buf[1] = page;
    let body = &mut buf[4..];
    let len = match page {
        0x00 => {
            body[..VPD_PAGES.len()].copy_from_slice(&VPD_PAGES);
            VPD_PAGES.len()
        }
        0x80 => {
            body[..lun.serial.len()].copy_from_slice(lun.serial.as_bytes());
            lun.serial.len()
        }
        0x83 => device_identification(lun, body),
        0xB0 => block_limits(body),
        0xB1 => {
            body[..0x3C].fill(0);
            put16(body, 0, 0x0001); // MEDIUM ROTATION RATE: non-rotating
                                    // WABEREQ 01b: reads after a SANITIZE BLOCK ERASE succeed (they return zeroes);
                                    // WACEREQ 00b: CRYPTO ERASE is not supported.
            body[3] = 0x40;
            0x3C
        }
        0xB2 => {
            body[..4].fill(0);
            // LBPU, LBPWS, LBPWS10, LBPRZ=001b; no ANC_SUP, no DP.
            body[1] = 0x80 | 0x40 | 0x20 | 0x04;
            body[2] = 0x02; // PROVISIONING TYPE: thin
            4
        }
        _ => return Err(Sense::invalid_field_in_cdb(2, 7)),
    };
    put16(buf, 2, len as u16);
    data_in(buf, 4 + len, alloc)
}

/// Standard INQUIRY data; returns its length.
fn standard(lun: Option<&Lun>, buf: &mut [u8]) -> usize {
    let b = &mut buf[..STD_LEN];
    b.fill(0);
    // Peripheral qualifier 011b / type 1Fh: no logical unit at this address.
    b[0] = if lun.is_some() { 0x00 } else { 0x7F };
    if lun.is_some_and(|l| l.removable) {
        b[1] = 0x80; // RMB: removable medium
    }
    b[2] = 0x06; // SPC-4
    b[3] = 0x10 | 0x02; // HISUP, response data format 2
    b[4] = (STD_LEN - 5) as u8;
    b[5] = 0x08; // 3PC: EXTENDED COPY
    b[7] = 0x02; // CMDQUE
    ascii(&mut b[8..16], VENDOR);
    ascii(&mut b[16..32], PRODUCT);
    ascii(&mut b[32..36], product_revision(env!("CARGO_PKG_VERSION")));
    for (i, v) in VERSION_DESCRIPTORS.iter().enumerate() {
        put16(b, 58 + 2 * i, *v);
    }
    STD_LEN
}

/// Device Identification VPD: the NAA identifier and a T10 vendor ID, both logical unit
/// designators; returns the page length.
fn device_identification(lun: &Lun, body: &mut [u8]) -> usize {
    // NAA: binary code set, association LU, type 3.
    body[..4].copy_from_slice(&[0x01, 0x03, 0x00, 0x08]);
    put64(body, 4, lun.naa);
    // T10 vendor ID: ASCII code set, association LU, type 1; vendor then serial.
    let id_len = 8 + lun.serial.len();
    body[12..16].copy_from_slice(&[0x02, 0x01, 0x00, id_len as u8]);
    ascii(&mut body[16..24], VENDOR);
    body[24..24 + lun.serial.len()].copy_from_slice(lun.serial.as_bytes());
    16 + id_len
}

/// Block Limits VPD (SBC-3 6.6.4); returns the page length.
fn block_limits(body: &mut [u8]) -> usize {
    let b = &mut body[..0x3C];
    b.fill(0);
    b[1] = MAX_CAW_BLOCKS;
    put16(b, 2, GRANULARITY_BLOCKS as u16); // OPTIMAL TRANSFER LENGTH GRANULARITY
    put32(b, 4, MAX_TRANSFER_BLOCKS);
    put32(b, 8, MAX_TRANSFER_BLOCKS); // OPTIMAL TRANSFER LENGTH
    put32(b, 16, MAX_UNMAP_BLOCKS);
    put32(b, 20, MAX_UNMAP_DESCRIPTORS);
    put32(b, 24, GRANULARITY_BLOCKS); // OPTIMAL UNMAP GRANULARITY
    put32(b, 28, 0x8000_0000); // UGAVALID, alignment 0
    put64(b, 32, MAX_WRITE_SAME_BLOCKS);
    // MAXIMUM ATOMIC TRANSFER LENGTH; ATOMIC ALIGNMENT and ATOMIC TRANSFER LENGTH GRANULARITY
    // 0 (none), no atomic boundaries.
    put32(b, 40, MAX_ATOMIC_BLOCKS);
    0x3C
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;
    use crate::scsi::cdb::{be32, be64, op};
    use crate::scsi::Disposition;

    fn inq(evpd: bool, page: u8, alloc: u16) -> [u8; 6] {
        let [hi, lo] = alloc.to_be_bytes();
        [op::INQUIRY, u8::from(evpd), page, hi, lo, 0]
    }

    fn get(evpd: bool, page: u8) -> Vec<u8> {
        let (t, mut n) = setup();
        let mut buf = vec![0u8; 65536];
        let Disposition::DataIn(len) = exec(&t, &mut n, &inq(evpd, page, 0xFFFF), 0, &mut buf) else {
            panic!("no data")
        };
        buf.truncate(len);
        buf
    }

    #[test]
    fn standard_data() {
        let d = get(false, 0);
        assert_eq!(d.len(), 96);
        assert_eq!(&d[..8], &[0x00, 0x00, 0x06, 0x12, 91, 0x08, 0x00, 0x02], "3PC set");
        assert_eq!(&d[8..16], b"URINGTGT");
        assert_eq!(&d[16..32], b"uringtgt disk   ");
        let rev = product_revision(env!("CARGO_PKG_VERSION"));
        assert_eq!(&d[32..32 + rev.len()], rev.as_bytes());
        assert!(!rev.ends_with('.') && d[32 + rev.len()..36].iter().all(|&b| b == b' '), "{rev:?}");
        assert_eq!(product_revision("0.1.0"), "0.1");
        assert_eq!(product_revision("0.12.3"), "0.12");
        assert_eq!(product_revision("10.2.3"), "10.2");
        assert_eq!(&d[58..66], &[0x00, 0xA0, 0x09, 0x60, 0x04, 0x60, 0x04, 0xC0]);
        assert!(d[66..].iter().all(|&b| b == 0));
    }

    #[test]
    fn allocation_length_and_bad_fields() {
        let (t, mut n) = setup();
        let mut buf = vec![0u8; 65536];
        assert_eq!(exec(&t, &mut n, &inq(false, 0, 5), 0, &mut buf), Disposition::DataIn(5));
        assert_eq!(exec(&t, &mut n, &inq(true, 0x83, 2), 0, &mut buf), Disposition::DataIn(2));
        assert_eq!(sense(exec(&t, &mut n, &inq(false, 0x80, 96), 0, &mut buf)).specific, Some([0x4F, 0, 2]));
        assert_eq!(sense(exec(&t, &mut n, &inq(true, 0x81, 96), 0, &mut buf)).asc, 0x24);
        assert_eq!(sense(exec(&t, &mut n, &[op::INQUIRY, 2, 0, 0, 96, 0], 0, &mut buf)).specific, Some([0x49, 0, 1]));
        // EVPD for a missing LUN.
        assert_eq!(sense(exec(&t, &mut n, &inq(true, 0x00, 96), 4, &mut buf)).asc, 0x25);
    }

    #[test]
    fn supported_pages() {
        let d = get(true, 0x00);
        assert_eq!(d, [0, 0, 0, 6, 0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2]);
    }

    #[test]
    fn unit_serial() {
        let (t, _) = setup();
        let d = get(true, 0x80);
        let serial = &t.get(0).unwrap().serial;
        assert_eq!(&d[..4], &[0, 0x80, 0, serial.len() as u8]);
        assert_eq!(&d[4..], serial.as_bytes());
    }

    #[test]
    fn device_identification_page() {
        let (t, _) = setup();
        let l = t.get(0).unwrap();
        let d = get(true, 0x83);
        assert_eq!(&d[..2], &[0, 0x83]);
        assert_eq!(usize::from(be16(&d, 2)), d.len() - 4);
        assert_eq!(&d[4..8], &[0x01, 0x03, 0x00, 0x08]);
        assert_eq!(be64(&d, 8), l.naa);
        assert_eq!(d[8] >> 4, 3, "NAA 3");
        assert_eq!(&d[16..20], &[0x02, 0x01, 0x00, 24]);
        assert_eq!(&d[20..28], b"URINGTGT");
        assert_eq!(&d[28..44], l.serial.as_bytes());
        assert_eq!(d.len(), 44);
    }

    #[test]
    fn block_limits_page() {
        let d = get(true, 0xB0);
        assert_eq!(d.len(), 64);
        assert_eq!(&d[..4], &[0, 0xB0, 0, 0x3C]);
        assert_eq!(d[4] & 1, 0, "WSNZ clear");
        assert_eq!(d[5], MAX_CAW_BLOCKS);
        assert_eq!(be16(&d, 6), 8);
        assert_eq!(be32(&d, 8), MAX_TRANSFER_BLOCKS);
        assert_eq!(be32(&d, 20), MAX_UNMAP_BLOCKS);
        assert_eq!(be32(&d, 24), MAX_UNMAP_DESCRIPTORS);
        assert_eq!(be32(&d, 28), 8);
        assert_eq!(be32(&d, 32), 0x8000_0000);
        assert_eq!(be64(&d, 36), MAX_WRITE_SAME_BLOCKS);
        assert_eq!(be32(&d, 44), MAX_ATOMIC_BLOCKS);
        assert_eq!((be32(&d, 48), be32(&d, 52)), (0, 0), "no atomic alignment or granularity");
    }

    #[test]
    fn characteristics_and_provisioning_pages() {
        let d = get(true, 0xB1);
        assert_eq!(&d[..6], &[0, 0xB1, 0, 0x3C, 0, 1]);
        assert_eq!(d.len(), 64);
        let d = get(true, 0xB2);
        assert_eq!(d, [0, 0xB2, 0, 4, 0, 0xE4, 0x02, 0]);
    }
}
