//! iSCSI PDU headers (RFC 7143 §11): the 48-byte Basic Header Segment.
//!
//! Fields are read and written at their byte offsets through small accessors; a BHS is never
//! cast to a packed struct (unaligned references are undefined behaviour, and offsets read
//! straight from the RFC's tables are easier to check).

use thiserror::Error;

/// Length of the Basic Header Segment.
pub const BHS_LEN: usize = 48;
/// Value of an unused Initiator or Target Task Tag.
pub const RESERVED_TAG: u32 = 0xFFFF_FFFF;
/// Largest data segment length the 24-bit field can carry.
pub const MAX_DATA_SEGMENT: u32 = (1 << 24) - 1;

/// PDU opcodes (RFC 7143 §11.1.1.1).
pub mod opcode {
    pub const NOP_OUT: u8 = 0x00;
    pub const SCSI_COMMAND: u8 = 0x01;
    pub const TASK_MGMT_REQUEST: u8 = 0x02;
    pub const LOGIN_REQUEST: u8 = 0x03;
    pub const TEXT_REQUEST: u8 = 0x04;
    pub const DATA_OUT: u8 = 0x05;
    pub const LOGOUT_REQUEST: u8 = 0x06;
    pub const SNACK_REQUEST: u8 = 0x10;

    pub const NOP_IN: u8 = 0x20;
    pub const SCSI_RESPONSE: u8 = 0x21;
    pub const TASK_MGMT_RESPONSE: u8 = 0x22;
    pub const LOGIN_RESPONSE: u8 = 0x23;
    pub const TEXT_RESPONSE: u8 = 0x24;
    pub const DATA_IN: u8 = 0x25;
    pub const LOGOUT_RESPONSE: u8 = 0x26;
    pub const R2T: u8 = 0x31;
    pub const ASYNC_MESSAGE: u8 = 0x32;
    pub const REJECT: u8 = 0x3F;
}

/// Reject reasons (RFC 7143 §11.17.1).
pub mod reject {
    pub const DATA_DIGEST_ERROR: u8 = 0x02;
    pub const SNACK_REJECT: u8 = 0x03;
    pub const PROTOCOL_ERROR: u8 = 0x04;
    pub const COMMAND_NOT_SUPPORTED: u8 = 0x05;
    pub const IMMEDIATE_COMMAND_REJECT: u8 = 0x06;
    pub const TASK_IN_PROGRESS: u8 = 0x07;
    pub const INVALID_DATA_ACK: u8 = 0x08;
    pub const INVALID_PDU_FIELD: u8 = 0x09;
    pub const OUT_OF_RESOURCES: u8 = 0x0A;
    pub const WAITING_FOR_LOGOUT: u8 = 0x0C;
}

/// Errors in a received header.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum PduError {
    /// The header digest does not match its contents.
    #[error("header digest mismatch: received {received:#010x}, computed {computed:#010x}")]
    HeaderDigest { received: u32, computed: u32 },
    /// The data digest does not match the data segment.
    #[error("data digest mismatch: received {received:#010x}, computed {computed:#010x}")]
    DataDigest { received: u32, computed: u32 },
    /// The data segment is longer than we declared we accept.
    #[error("data segment of {len} bytes exceeds MaxRecvDataSegmentLength {max}")]
    DataTooLong { len: u32, max: u32 },
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([b[off], b[off + 1]])
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

/// A received BHS, read in place.
#[derive(Clone, Copy)]
pub struct Bhs<'a>(&'a [u8; BHS_LEN]);

impl<'a> Bhs<'a> {
    pub fn new(b: &'a [u8; BHS_LEN]) -> Self {
        Self(b)
    }

    /// Reads the BHS at the start of `b`; `None` when fewer than 48 bytes are there.
    pub fn parse(b: &'a [u8]) -> Option<Self> {
        b.get(..BHS_LEN).map(|s| Self(s.try_into().expect("48 bytes")))
    }

    pub fn bytes(&self) -> &'a [u8; BHS_LEN] {
        self.0
    }

    pub fn opcode(&self) -> u8 {
        self.0[0] & 0x3F
    }

    /// I bit: immediate delivery.
    pub fn immediate(&self) -> bool {
        self.0[0] & 0x40 != 0
    }

    /// F bit: final PDU.
    pub fn final_bit(&self) -> bool {
        self.0[1] & 0x80 != 0
    }

    /// Byte 1, for opcode-specific flags.
    pub fn flags(&self) -> u8 {
        self.0[1]
    }

    /// TotalAHSLength in bytes.
    pub fn ahs_len(&self) -> usize {
        usize::from(self.0[4]) * 4
    }

    pub fn data_len(&self) -> u32 {
        u32::from_be_bytes([0, self.0[5], self.0[6], self.0[7]])
    }

    /// The LUN field, raw (bytes 8..16).
    pub fn lun(&self) -> [u8; 8] {
        self.0[8..16].try_into().expect("8 bytes")
    }

    pub fn itt(&self) -> u32 {
        u32_at(self.0, 16)
    }

    /// Bytes 20..24: Target Transfer Tag (Data-Out, NOP-Out, Text), Expected Data Transfer
    /// Length (SCSI Command), Referenced Task Tag (Task Management).
    pub fn word20(&self) -> u32 {
        u32_at(self.0, 20)
    }

    pub fn ttt(&self) -> u32 {
        self.word20()
    }

    pub fn expected_data_len(&self) -> u32 {
        self.word20()
    }

    /// CmdSN of initiator requests (bytes 24..28).
    pub fn cmd_sn(&self) -> u32 {
        u32_at(self.0, 24)
    }

    /// ExpStatSN of initiator requests (bytes 28..32).
    pub fn exp_stat_sn(&self) -> u32 {
        u32_at(self.0, 28)
    }

    /// The CDB of a SCSI Command (bytes 32..48).
    pub fn cdb(&self) -> &'a [u8] {
        &self.0[32..48]
    }

    /// DataSN of a Data-Out (bytes 36..40).
    pub fn data_sn(&self) -> u32 {
        u32_at(self.0, 36)
    }

    /// Buffer Offset of a Data-Out (bytes 40..44).
    pub fn buffer_offset(&self) -> u32 {
        u32_at(self.0, 40)
    }

    /// RefCmdSN of a Task Management request (bytes 32..36).
    pub fn ref_cmd_sn(&self) -> u32 {
        u32_at(self.0, 32)
    }

    /// Function of a Task Management request.
    pub fn tmf_function(&self) -> u8 {
        self.0[1] & 0x7F
    }

    /// Reason code of a Logout request.
    pub fn logout_reason(&self) -> u8 {
        self.0[1] & 0x7F
    }

    /// CID of Login and Logout requests (bytes 20..22).
    pub fn cid(&self) -> u16 {
        u16_at(self.0, 20)
    }

    /// Login: T (transit) bit.
    pub fn login_transit(&self) -> bool {
        self.0[1] & 0x80 != 0
    }

    /// Login and Text: C (continue) bit.
    pub fn continue_bit(&self) -> bool {
        self.0[1] & 0x40 != 0
    }

    pub fn login_csg(&self) -> u8 {
        (self.0[1] >> 2) & 0x3
    }

    pub fn login_nsg(&self) -> u8 {
        self.0[1] & 0x3
    }

    pub fn version_max(&self) -> u8 {
        self.0[2]
    }

    pub fn version_min(&self) -> u8 {
        self.0[3]
    }

    pub fn isid(&self) -> [u8; 6] {
        self.0[8..14].try_into().expect("6 bytes")
    }

    pub fn tsih(&self) -> u16 {
        u16_at(self.0, 14)
    }

    /// SCSI Command: R bit.
    pub fn read_bit(&self) -> bool {
        self.0[1] & 0x40 != 0
    }

    /// SCSI Command: W bit.
    pub fn write_bit(&self) -> bool {
        self.0[1] & 0x20 != 0
    }
}

/// A BHS being built for sending. Starts zeroed with the opcode set; setters write fields at
/// their offsets.
#[derive(Clone, Copy)]
pub struct BhsBuf(pub [u8; BHS_LEN]);

impl BhsBuf {
    pub fn new(opcode: u8) -> Self {
        let mut b = [0u8; BHS_LEN];
        b[0] = opcode;
        Self(b)
    }

    fn put_u32(&mut self, off: usize, v: u32) -> &mut Self {
        self.0[off..off + 4].copy_from_slice(&v.to_be_bytes());
        self
    }

    fn put_u16(&mut self, off: usize, v: u16) -> &mut Self {
        self.0[off..off + 2].copy_from_slice(&v.to_be_bytes());
        self
    }

    pub fn flags(&mut self, f: u8) -> &mut Self {
        self.0[1] = f;
        self
    }

    pub fn byte(&mut self, off: usize, v: u8) -> &mut Self {
        self.0[off] = v;
        self
    }

    pub fn data_len(&mut self, len: u32) -> &mut Self {
        debug_assert!(len <= MAX_DATA_SEGMENT);
        self.0[5..8].copy_from_slice(&len.to_be_bytes()[1..]);
        self
    }

    pub fn lun(&mut self, lun: [u8; 8]) -> &mut Self {
        self.0[8..16].copy_from_slice(&lun);
        self
    }

    pub fn itt(&mut self, itt: u32) -> &mut Self {
        self.put_u32(16, itt)
    }

    pub fn ttt(&mut self, ttt: u32) -> &mut Self {
        self.put_u32(20, ttt)
    }

    pub fn stat_sn(&mut self, sn: u32) -> &mut Self {
        self.put_u32(24, sn)
    }

    pub fn exp_cmd_sn(&mut self, sn: u32) -> &mut Self {
        self.put_u32(28, sn)
    }

    pub fn max_cmd_sn(&mut self, sn: u32) -> &mut Self {
        self.put_u32(32, sn)
    }

    /// DataSN (Data-In), R2TSN (R2T), ExpDataSN (SCSI Response).
    pub fn sn36(&mut self, sn: u32) -> &mut Self {
        self.put_u32(36, sn)
    }

    pub fn buffer_offset(&mut self, off: u32) -> &mut Self {
        self.put_u32(40, off)
    }

    /// Residual Count (SCSI Response, Data-In) or Desired Data Transfer Length (R2T).
    pub fn word44(&mut self, v: u32) -> &mut Self {
        self.put_u32(44, v)
    }

    /// Login response: ISID and TSIH.
    pub fn isid_tsih(&mut self, isid: [u8; 6], tsih: u16) -> &mut Self {
        self.0[8..14].copy_from_slice(&isid);
        self.put_u16(14, tsih)
    }

    /// Logout response: Time2Wait and Time2Retain.
    pub fn time2(&mut self, wait: u16, retain: u16) -> &mut Self {
        self.put_u16(40, wait).put_u16(42, retain)
    }

    pub fn bytes(&self) -> &[u8; BHS_LEN] {
        &self.0
    }
}

/// Where a PDU's parts lie after its BHS, given the negotiated digests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// BHS + AHS length.
    pub header_len: usize,
    /// Header digest length (0 or 4).
    pub header_digest_len: usize,
    pub data_len: usize,
    /// Zero padding after the data, to a 4-byte boundary.
    pub pad_len: usize,
    /// Data digest length (0, or 4 when there is data).
    pub data_digest_len: usize,
}

impl Layout {
    pub fn of(bhs: &Bhs, header_digest: bool, data_digest: bool) -> Self {
        let data_len = bhs.data_len() as usize;
        Self {
            header_len: BHS_LEN + bhs.ahs_len(),
            header_digest_len: if header_digest { 4 } else { 0 },
            data_len,
            pad_len: pad_len(data_len),
            data_digest_len: if data_digest && data_len > 0 { 4 } else { 0 },
        }
    }

    /// Offset of the data segment from the start of the PDU.
    pub fn data_offset(&self) -> usize {
        self.header_len + self.header_digest_len
    }

    /// Total bytes on the wire.
    pub fn total(&self) -> usize {
        self.data_offset() + self.data_len + self.pad_len + self.data_digest_len
    }
}

/// Padding that brings `len` to a multiple of 4.
pub fn pad_len(len: usize) -> usize {
    (4 - len % 4) % 4
}

/// Serial number arithmetic (RFC 1982, 32 bits): `a < b`.
pub fn sn_lt(a: u32, b: u32) -> bool {
    a != b && b.wrapping_sub(a) < 1 << 31
}

/// `a <= b` in serial number arithmetic.
pub fn sn_le(a: u32, b: u32) -> bool {
    a == b || sn_lt(a, b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_fields_at_offsets() {
        let mut b = BhsBuf::new(opcode::SCSI_COMMAND | 0x40);
        b.flags(0x80 | 0x40).data_len(0x01_02_03).lun([0, 5, 0, 0, 0, 0, 0, 0]).itt(0xAABBCCDD).ttt(4096);
        b.stat_sn(7).exp_cmd_sn(8);
        b.0[32] = 0x28;
        let bhs = Bhs::new(&b.0);
        assert_eq!(bhs.opcode(), opcode::SCSI_COMMAND);
        assert!(bhs.immediate() && bhs.final_bit() && bhs.read_bit() && !bhs.write_bit());
        assert_eq!(bhs.data_len(), 0x01_02_03);
        assert_eq!(bhs.lun(), [0, 5, 0, 0, 0, 0, 0, 0]);
        assert_eq!(bhs.itt(), 0xAABBCCDD);
        assert_eq!(bhs.expected_data_len(), 4096);
        assert_eq!(bhs.cmd_sn(), 7);
        assert_eq!(bhs.exp_stat_sn(), 8);
        assert_eq!(bhs.cdb()[0], 0x28);
    }

    #[test]
    fn login_fields() {
        let mut b = BhsBuf::new(opcode::LOGIN_REQUEST | 0x40);
        b.flags(0x80 | (1 << 2) | 3).isid_tsih([0x80, 1, 2, 3, 4, 5], 9);
        b.0[20..22].copy_from_slice(&7u16.to_be_bytes());
        let bhs = Bhs::new(&b.0);
        assert!(bhs.login_transit() && !bhs.continue_bit());
        assert_eq!((bhs.login_csg(), bhs.login_nsg()), (1, 3));
        assert_eq!(bhs.isid(), [0x80, 1, 2, 3, 4, 5]);
        assert_eq!(bhs.tsih(), 9);
        assert_eq!(bhs.cid(), 7);
    }

    #[test]
    fn layout_with_digests_and_padding() {
        let mut b = BhsBuf::new(opcode::DATA_OUT);
        b.data_len(5).byte(4, 2);
        let l = Layout::of(&Bhs::new(&b.0), true, true);
        assert_eq!(l.header_len, 56);
        assert_eq!(l.data_offset(), 60);
        assert_eq!(l.pad_len, 3);
        assert_eq!(l.total(), 60 + 5 + 3 + 4);
        b.data_len(0);
        assert_eq!(Layout::of(&Bhs::new(&b.0), false, true).total(), 56);
    }

    #[test]
    fn serial_number_arithmetic() {
        assert!(sn_lt(1, 2));
        assert!(sn_lt(u32::MAX, 0));
        assert!(!sn_lt(2, 1));
        assert!(!sn_lt(5, 5));
        assert!(sn_le(5, 5));
        assert!(sn_lt(0x7FFF_FFF0, 0x8000_0010));
    }
}
