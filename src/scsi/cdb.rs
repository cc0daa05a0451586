//! CDB decoding: big-endian field accessors at byte offsets, CDB lengths and the LBA / transfer
//! length of the block commands (SBC-3).
//!
//! The accessors index the slice directly: callers check the CDB against [`cdb_len`] first.

/// Operation codes the target knows.
pub mod op {
    pub const TEST_UNIT_READY: u8 = 0x00;
    pub const REQUEST_SENSE: u8 = 0x03;
    pub const READ_6: u8 = 0x08;
    pub const WRITE_6: u8 = 0x0A;
    pub const INQUIRY: u8 = 0x12;
    pub const MODE_SELECT_6: u8 = 0x15;
    pub const RESERVE_6: u8 = 0x16;
    pub const RELEASE_6: u8 = 0x17;
    pub const MODE_SENSE_6: u8 = 0x1A;
    pub const START_STOP_UNIT: u8 = 0x1B;
    pub const PREVENT_ALLOW: u8 = 0x1E;
    pub const READ_CAPACITY_10: u8 = 0x25;
    pub const READ_10: u8 = 0x28;
    pub const WRITE_10: u8 = 0x2A;
    pub const WRITE_VERIFY_10: u8 = 0x2E;
    pub const VERIFY_10: u8 = 0x2F;
    pub const PRE_FETCH_10: u8 = 0x34;
    pub const READ_DEFECT_DATA_10: u8 = 0x37;
    pub const SYNC_CACHE_10: u8 = 0x35;
    pub const WRITE_SAME_10: u8 = 0x41;
    pub const SANITIZE: u8 = 0x48;
    pub const UNMAP: u8 = 0x42;
    pub const MODE_SELECT_10: u8 = 0x55;
    pub const RESERVE_10: u8 = 0x56;
    pub const RELEASE_10: u8 = 0x57;
    pub const MODE_SENSE_10: u8 = 0x5A;
    pub const PERSISTENT_RESERVE_IN: u8 = 0x5E;
    pub const PERSISTENT_RESERVE_OUT: u8 = 0x5F;
    /// EXTENDED COPY (LID1 service action) and RECEIVE COPY RESULTS.
    pub const EXTENDED_COPY: u8 = 0x83;
    pub const RECEIVE_COPY_RESULTS: u8 = 0x84;
    pub const READ_16: u8 = 0x88;
    pub const COMPARE_AND_WRITE: u8 = 0x89;
    pub const WRITE_16: u8 = 0x8A;
    pub const ORWRITE_16: u8 = 0x8B;
    pub const WRITE_VERIFY_16: u8 = 0x8E;
    pub const VERIFY_16: u8 = 0x8F;
    pub const PRE_FETCH_16: u8 = 0x90;
    pub const SYNC_CACHE_16: u8 = 0x91;
    pub const WRITE_SAME_16: u8 = 0x93;
    pub const WRITE_ATOMIC_16: u8 = 0x9C;
    /// SERVICE ACTION IN(16): READ CAPACITY(16), GET LBA STATUS.
    pub const SERVICE_ACTION_IN_16: u8 = 0x9E;
    pub const REPORT_LUNS: u8 = 0xA0;
    /// MAINTENANCE IN: REPORT SUPPORTED OPERATION CODES / TASK MANAGEMENT FUNCTIONS.
    pub const MAINTENANCE_IN: u8 = 0xA3;
    pub const READ_12: u8 = 0xA8;
    pub const WRITE_12: u8 = 0xAA;
    pub const WRITE_VERIFY_12: u8 = 0xAE;
    pub const VERIFY_12: u8 = 0xAF;
    pub const READ_DEFECT_DATA_12: u8 = 0xB7;
}

/// Service actions of [`op::SERVICE_ACTION_IN_16`] and [`op::MAINTENANCE_IN`].
pub mod sa {
    pub const READ_CAPACITY_16: u8 = 0x10;
    pub const GET_LBA_STATUS: u8 = 0x12;
    pub const REPORT_SUPPORTED_OPCODES: u8 = 0x0C;
    pub const REPORT_SUPPORTED_TMFS: u8 = 0x0D;
}

pub fn be16(b: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([b[off], b[off + 1]])
}

pub fn be24(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes([0, b[off], b[off + 1], b[off + 2]])
}

pub fn be32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

pub fn be64(b: &[u8], off: usize) -> u64 {
    (u64::from(be32(b, off)) << 32) | u64::from(be32(b, off + 4))
}

pub fn put16(b: &mut [u8], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_be_bytes());
}

pub fn put32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_be_bytes());
}

pub fn put64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_be_bytes());
}

/// CDB length of an operation code by its group (SPC-4 4.2.5.1); `None` for the reserved and
/// vendor specific groups and variable-length CDBs, none of which the target supports.
pub fn cdb_len(opcode: u8) -> Option<usize> {
    match opcode >> 5 {
        0 => Some(6),
        1 | 2 => Some(10),
        4 => Some(16),
        5 => Some(12),
        _ => None,
    }
}

/// The service action of a CDB whose opcode carries one (5 bits of byte 1).
pub fn service_action(cdb: &[u8]) -> Option<u8> {
    match cdb[0] {
        op::SERVICE_ACTION_IN_16 | op::MAINTENANCE_IN => Some(cdb[1] & 0x1F),
        _ => None,
    }
}

/// Which field of a block command carries what.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockCdb {
    pub lba: u64,
    /// Transfer length / number of logical blocks as in the CDB (READ/WRITE(6) 0 already
    /// turned into 256).
    pub blocks: u32,
    /// Byte 1 (protect field, DPO, FUA, BYTCHK, UNMAP...); 0 for the 6-byte forms.
    pub flags: u8,
    /// Byte offset of the transfer length field, for field pointers.
    pub len_byte: u16,
}

impl BlockCdb {
    /// RDPROTECT / WRPROTECT / VRPROTECT / ORPROTECT (bits 7..5 of byte 1).
    pub fn protect(&self) -> u8 {
        self.flags >> 5
    }
    pub fn dpo(&self) -> bool {
        self.flags & 0x10 != 0
    }
    pub fn fua(&self) -> bool {
        self.flags & 0x08 != 0
    }
    /// VERIFY / WRITE AND VERIFY BYTCHK (bits 2..1 of byte 1).
    pub fn bytchk(&self) -> u8 {
        (self.flags >> 1) & 3
    }
}

/// Decodes the LBA and length of the READ, WRITE, WRITE AND VERIFY, VERIFY, ORWRITE, WRITE
/// SAME, COMPARE AND WRITE, PRE-FETCH and SYNCHRONIZE CACHE families. `None` for other
/// opcodes. The CDB must be at least [`cdb_len`] long.
pub fn decode_block(cdb: &[u8]) -> Option<BlockCdb> {
    use op::*;
    let d = match cdb[0] {
        READ_6 | WRITE_6 => {
            let n = cdb[4];
            BlockCdb {
                lba: u64::from(be24(cdb, 1) & 0x1F_FFFF),
                blocks: if n == 0 { 256 } else { u32::from(n) },
                flags: 0,
                len_byte: 4,
            }
        }
        READ_10 | WRITE_10 | WRITE_VERIFY_10 | VERIFY_10 | PRE_FETCH_10 | SYNC_CACHE_10 | WRITE_SAME_10 => {
            BlockCdb { lba: u64::from(be32(cdb, 2)), blocks: u32::from(be16(cdb, 7)), flags: cdb[1], len_byte: 7 }
        }
        READ_12 | WRITE_12 | WRITE_VERIFY_12 | VERIFY_12 => {
            BlockCdb { lba: u64::from(be32(cdb, 2)), blocks: be32(cdb, 6), flags: cdb[1], len_byte: 6 }
        }
        READ_16 | WRITE_16 | WRITE_VERIFY_16 | VERIFY_16 | ORWRITE_16 | PRE_FETCH_16 | SYNC_CACHE_16
        | WRITE_SAME_16 => BlockCdb { lba: be64(cdb, 2), blocks: be32(cdb, 10), flags: cdb[1], len_byte: 10 },
        COMPARE_AND_WRITE => BlockCdb { lba: be64(cdb, 2), blocks: u32::from(cdb[13]), flags: cdb[1], len_byte: 13 },
        WRITE_ATOMIC_16 => {
            BlockCdb { lba: be64(cdb, 2), blocks: u32::from(be16(cdb, 12)), flags: cdb[1], len_byte: 12 }
        }
        _ => return None,
    };
    Some(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cdb16(opcode: u8, flags: u8, lba: u64, len: u32) -> [u8; 16] {
        let mut c = [0u8; 16];
        c[0] = opcode;
        c[1] = flags;
        put64(&mut c, 2, lba);
        put32(&mut c, 10, len);
        c
    }

    #[test]
    fn accessors() {
        let b = [1, 2, 3, 4, 5, 6, 7, 8, 9];
        assert_eq!(be16(&b, 1), 0x0203);
        assert_eq!(be24(&b, 0), 0x010203);
        assert_eq!(be32(&b, 2), 0x03040506);
        assert_eq!(be64(&b, 1), 0x0203040506070809);
        let mut o = [0u8; 8];
        put16(&mut o, 0, 0xABCD);
        put32(&mut o, 2, 0x01020304);
        assert_eq!(o, [0xAB, 0xCD, 1, 2, 3, 4, 0, 0]);
        put64(&mut o, 0, 0x1122334455667788);
        assert_eq!(o, [0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88]);
    }

    #[test]
    fn lengths_by_group() {
        assert_eq!(cdb_len(op::READ_6), Some(6));
        assert_eq!(cdb_len(op::READ_10), Some(10));
        assert_eq!(cdb_len(op::MODE_SENSE_10), Some(10));
        assert_eq!(cdb_len(0x7F), None);
        assert_eq!(cdb_len(op::READ_16), Some(16));
        assert_eq!(cdb_len(op::REPORT_LUNS), Some(12));
        assert_eq!(cdb_len(0xC0), None);
        assert_eq!(cdb_len(0xE0), None);
    }

    #[test]
    fn six_byte_forms() {
        let d = decode_block(&[op::READ_6, 0xFF, 0x12, 0x34, 0, 0]).unwrap();
        assert_eq!((d.lba, d.blocks, d.flags), (0x1F1234, 256, 0));
        let d = decode_block(&[op::WRITE_6, 0x00, 0x00, 0x07, 9, 0]).unwrap();
        assert_eq!((d.lba, d.blocks, d.len_byte), (7, 9, 4));
    }

    #[test]
    fn ten_byte_forms() {
        for opc in [
            op::READ_10,
            op::WRITE_10,
            op::WRITE_VERIFY_10,
            op::VERIFY_10,
            op::PRE_FETCH_10,
            op::SYNC_CACHE_10,
            op::WRITE_SAME_10,
        ] {
            let c = [opc, 0x18, 0xDE, 0xAD, 0xBE, 0xEF, 0x00, 0x12, 0x34, 0x00];
            let d = decode_block(&c).unwrap();
            assert_eq!((d.lba, d.blocks, d.len_byte), (0xDEADBEEF, 0x1234, 7), "{opc:#x}");
            assert!(d.dpo() && d.fua());
        }
    }

    #[test]
    fn twelve_byte_forms() {
        for opc in [op::READ_12, op::WRITE_12, op::WRITE_VERIFY_12, op::VERIFY_12] {
            let c = [opc, 0xE2, 0, 0, 1, 0, 0x00, 0x01, 0x00, 0x02, 0, 0];
            let d = decode_block(&c).unwrap();
            assert_eq!((d.lba, d.blocks, d.len_byte), (256, 0x10002, 6), "{opc:#x}");
            assert_eq!(d.protect(), 7);
            assert_eq!(d.bytchk(), 1);
        }
    }

    #[test]
    fn sixteen_byte_forms() {
        for opc in [
            op::READ_16,
            op::WRITE_16,
            op::WRITE_VERIFY_16,
            op::VERIFY_16,
            op::ORWRITE_16,
            op::PRE_FETCH_16,
            op::SYNC_CACHE_16,
            op::WRITE_SAME_16,
        ] {
            let d = decode_block(&cdb16(opc, 0x06, u64::MAX - 1, 0xFFFF_FFFF)).unwrap();
            assert_eq!((d.lba, d.blocks, d.len_byte), (u64::MAX - 1, u32::MAX, 10), "{opc:#x}");
            assert_eq!(d.bytchk(), 3);
        }
        let mut c = cdb16(op::COMPARE_AND_WRITE, 0, 42, 0);
        c[13] = 5;
        let d = decode_block(&c).unwrap();
        assert_eq!((d.lba, d.blocks, d.len_byte), (42, 5, 13));
        let mut c = cdb16(op::WRITE_ATOMIC_16, 0x08, 7, 0);
        put16(&mut c, 12, 300);
        let d = decode_block(&c).unwrap();
        assert_eq!((d.lba, d.blocks, d.len_byte, d.fua()), (7, 300, 12, true));
    }

    #[test]
    fn non_block_commands() {
        assert_eq!(decode_block(&[op::INQUIRY, 0, 0, 0, 0, 0]), None);
        assert_eq!(decode_block(&cdb16(op::SERVICE_ACTION_IN_16, 0x10, 0, 0)), None);
    }

    #[test]
    fn service_actions() {
        assert_eq!(service_action(&cdb16(op::SERVICE_ACTION_IN_16, 0xF0, 0, 0)), Some(sa::READ_CAPACITY_16));
        assert_eq!(service_action(&cdb16(op::SERVICE_ACTION_IN_16, 0x12, 0, 0)), Some(sa::GET_LBA_STATUS));
        let mut m = [0u8; 12];
        m[0] = op::MAINTENANCE_IN;
        m[1] = 0x0C;
        assert_eq!(service_action(&m), Some(sa::REPORT_SUPPORTED_OPCODES));
        m[1] = 0x0D;
        assert_eq!(service_action(&m), Some(sa::REPORT_SUPPORTED_TMFS));
        assert_eq!(service_action(&cdb16(op::READ_16, 0x10, 0, 0)), None);
    }
}
