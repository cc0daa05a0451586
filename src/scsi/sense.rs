//! Sense data (SPC-4 4.5): the conditions a command can fail with and their fixed (70h) and
//! descriptor (72h) encodings.

/// Sense keys (SPC-4 table 48).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum SenseKey {
    NoSense = 0x0,
    RecoveredError = 0x1,
    NotReady = 0x2,
    MediumError = 0x3,
    HardwareError = 0x4,
    IllegalRequest = 0x5,
    UnitAttention = 0x6,
    DataProtect = 0x7,
    BlankCheck = 0x8,
    CopyAborted = 0xA,
    AbortedCommand = 0xB,
    Miscompare = 0xE,
}

/// One sense condition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sense {
    pub key: SenseKey,
    pub asc: u8,
    pub ascq: u8,
    /// INFORMATION field (e.g. the first LBA of a miscompare).
    pub info: Option<u64>,
    /// Sense-key specific bytes (SKSV set), e.g. a field pointer.
    pub specific: Option<[u8; 3]>,
}

/// Length of fixed-format sense data as this module writes it.
pub const FIXED_LEN: usize = 18;
/// Longest sense data [`Sense::encode`] produces (descriptor format with both descriptors).
pub const MAX_LEN: usize = 8 + 12 + 8;

impl Sense {
    pub fn new(key: SenseKey, asc: u8, ascq: u8) -> Self {
        Self { key, asc, ascq, info: None, specific: None }
    }

    /// Writes fixed (0x70) or descriptor (0x72) format sense data, current errors; returns the
    /// number of bytes written (cut to `out.len()`).
    pub fn encode(&self, descriptor: bool, out: &mut [u8]) -> usize {
        let mut b = [0u8; MAX_LEN];
        let len = if descriptor {
            b[0] = 0x72;
            b[1] = self.key as u8;
            b[2] = self.asc;
            b[3] = self.ascq;
            let mut n = 8;
            if let Some(info) = self.info {
                // Information descriptor: type 00h, additional length 0Ah, VALID.
                b[n] = 0x00;
                b[n + 1] = 0x0A;
                b[n + 2] = 0x80;
                b[n + 4..n + 12].copy_from_slice(&info.to_be_bytes());
                n += 12;
            }
            if let Some(s) = self.specific {
                // Sense key specific descriptor: type 02h, additional length 06h.
                b[n] = 0x02;
                b[n + 1] = 0x06;
                b[n + 4] = s[0] | 0x80;
                b[n + 5] = s[1];
                b[n + 6] = s[2];
                n += 8;
            }
            b[7] = (n - 8) as u8;
            n
        } else {
            b[0] = 0x70;
            b[2] = self.key as u8;
            // The fixed format's INFORMATION is 4 bytes: a larger value is reported not valid.
            if let Some(info) = self.info.and_then(|i| u32::try_from(i).ok()) {
                b[0] |= 0x80;
                b[3..7].copy_from_slice(&info.to_be_bytes());
            }
            b[7] = (FIXED_LEN - 8) as u8;
            b[12] = self.asc;
            b[13] = self.ascq;
            if let Some(s) = self.specific {
                b[15] = s[0] | 0x80;
                b[16] = s[1];
                b[17] = s[2];
            }
            FIXED_LEN
        };
        let n = len.min(out.len());
        out[..n].copy_from_slice(&b[..n]);
        n
    }

    fn with_specific(mut self, s: [u8; 3]) -> Self {
        self.specific = Some(s);
        self
    }

    /// Field pointer sense-key specific bytes (SPC-4 4.5.2.4.2): `cdb` sets C/D, `bit` (0..=7)
    /// is the bit pointer (the field's most significant bit).
    fn field_pointer(cdb: bool, byte: u16, bit: u8) -> [u8; 3] {
        let [hi, lo] = byte.to_be_bytes();
        [(if cdb { 0x40 } else { 0 }) | 0x08 | (bit & 7), hi, lo]
    }

    /// NO SENSE, no additional sense information (REQUEST SENSE with nothing pending).
    pub fn no_sense() -> Self {
        Self::new(SenseKey::NoSense, 0x00, 0x00)
    }
    /// ILLEGAL REQUEST, LOGICAL UNIT NOT SUPPORTED.
    pub fn lun_not_supported() -> Self {
        Self::new(SenseKey::IllegalRequest, 0x25, 0x00)
    }
    /// MEDIUM ERROR, UNRECOVERED READ ERROR.
    pub fn read_error() -> Self {
        Self::new(SenseKey::MediumError, 0x11, 0x00)
    }
    /// MEDIUM ERROR, WRITE ERROR.
    pub fn write_error() -> Self {
        Self::new(SenseKey::MediumError, 0x0C, 0x00)
    }
    /// ILLEGAL REQUEST, INVALID COMMAND OPERATION CODE (field pointer: byte 0).
    pub fn invalid_opcode() -> Self {
        Self::new(SenseKey::IllegalRequest, 0x20, 0x00)
    }
    /// ILLEGAL REQUEST, INVALID FIELD IN CDB pointing at `byte`, `bit` of the CDB.
    pub fn invalid_field_in_cdb(byte: u16, bit: u8) -> Self {
        Self::new(SenseKey::IllegalRequest, 0x24, 0x00).with_specific(Self::field_pointer(true, byte, bit))
    }
    /// ILLEGAL REQUEST, INVALID FIELD IN PARAMETER LIST pointing at `byte`, `bit` of the
    /// parameter list.
    pub fn invalid_field_in_param_list(byte: u16, bit: u8) -> Self {
        Self::new(SenseKey::IllegalRequest, 0x26, 0x00).with_specific(Self::field_pointer(false, byte, bit))
    }
    /// ILLEGAL REQUEST, PARAMETER LIST LENGTH ERROR.
    pub fn parameter_list_length_error() -> Self {
        Self::new(SenseKey::IllegalRequest, 0x1A, 0x00)
    }
    /// ILLEGAL REQUEST, LOGICAL BLOCK ADDRESS OUT OF RANGE.
    pub fn lba_out_of_range() -> Self {
        Self::new(SenseKey::IllegalRequest, 0x21, 0x00)
    }
    /// ILLEGAL REQUEST, SAVING PARAMETERS NOT SUPPORTED.
    pub fn saving_params_not_supported() -> Self {
        Self::new(SenseKey::IllegalRequest, 0x39, 0x00)
    }
    /// DATA PROTECT, WRITE PROTECTED.
    pub fn write_protected() -> Self {
        Self::new(SenseKey::DataProtect, 0x27, 0x00)
    }
    /// MISCOMPARE, MISCOMPARE DURING VERIFY OPERATION; `offset` is the Data-Out byte offset of
    /// the first difference.
    pub fn miscompare(offset: u64) -> Self {
        Self { info: Some(offset), ..Self::new(SenseKey::Miscompare, 0x1D, 0x00) }
    }
    /// UNIT ATTENTION with the given additional sense code.
    pub fn unit_attention(asc: u8, ascq: u8) -> Self {
        Self::new(SenseKey::UnitAttention, asc, ascq)
    }
    /// NOT READY with the given additional sense code (e.g. 04h/01h becoming ready).
    pub fn not_ready(asc: u8, ascq: u8) -> Self {
        Self::new(SenseKey::NotReady, asc, ascq)
    }
    /// NOT READY, MEDIUM NOT PRESENT (a removable LUN's medium was ejected).
    pub fn medium_not_present() -> Self {
        Self::not_ready(0x3A, 0x00)
    }
    /// ILLEGAL REQUEST, MEDIUM REMOVAL PREVENTED (START STOP UNIT LOEJ under PREVENT).
    pub fn medium_removal_prevented() -> Self {
        Self::new(SenseKey::IllegalRequest, 0x53, 0x02)
    }
    /// NOT READY, SANITIZE IN PROGRESS with the progress indication (`progress`/65536 done).
    pub fn sanitize_in_progress(progress: u16) -> Self {
        let [hi, lo] = progress.to_be_bytes();
        Self::not_ready(0x04, 0x1B).with_specific([0x80, hi, lo])
    }
    /// NOT READY, LOGICAL UNIT IS IN PROCESS OF BECOMING READY.
    pub fn not_ready_becoming_ready() -> Self {
        Self::not_ready(0x04, 0x01)
    }
    /// ABORTED COMMAND with the given additional sense code (transport failures, e.g. 47h/05h
    /// protocol service CRC error, 0Ch/0Dh too much write data).
    pub fn aborted_command(asc: u8, ascq: u8) -> Self {
        Self::new(SenseKey::AbortedCommand, asc, ascq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_format_basic() {
        let mut out = [0xAAu8; 32];
        let n = Sense::lba_out_of_range().encode(false, &mut out);
        assert_eq!(n, 18);
        assert_eq!(out[0], 0x70);
        assert_eq!(out[2], 0x05);
        assert_eq!(out[7], 10);
        assert_eq!((out[12], out[13]), (0x21, 0x00));
        assert_eq!(&out[3..7], &[0, 0, 0, 0]);
        assert_eq!(&out[15..18], &[0, 0, 0]);
        assert_eq!(out[18], 0xAA, "nothing written past the sense data");
    }

    #[test]
    fn fixed_format_information_and_field_pointer() {
        let mut out = [0u8; 18];
        Sense::miscompare(0x1234).encode(false, &mut out);
        assert_eq!(out[0], 0xF0, "VALID set");
        assert_eq!(out[2], 0x0E);
        assert_eq!(&out[3..7], &[0, 0, 0x12, 0x34]);
        assert_eq!((out[12], out[13]), (0x1D, 0x00));

        Sense::invalid_field_in_cdb(0x0102, 5).encode(false, &mut out);
        assert_eq!(out[0], 0x70);
        assert_eq!(&out[15..18], &[0x80 | 0x40 | 0x08 | 5, 0x01, 0x02]);
        Sense::invalid_field_in_param_list(3, 7).encode(false, &mut out);
        assert_eq!((out[12], out[15], out[16], out[17]), (0x26, 0x80 | 0x08 | 7, 0, 3));
    }

    #[test]
    fn fixed_format_large_information_is_not_valid() {
        let mut out = [0u8; 18];
        Sense::miscompare(1 << 33).encode(false, &mut out);
        assert_eq!(out[0], 0x70);
        assert_eq!(&out[3..7], &[0, 0, 0, 0]);
    }

    #[test]
    fn descriptor_format() {
        let mut out = [0u8; 64];
        let n = Sense::write_protected().encode(true, &mut out);
        assert_eq!(n, 8);
        assert_eq!(&out[..8], &[0x72, 0x07, 0x27, 0x00, 0, 0, 0, 0]);

        let n = Sense::miscompare(1 << 40).encode(true, &mut out);
        assert_eq!(n, 20);
        assert_eq!(out[7], 12);
        assert_eq!(&out[8..12], &[0x00, 0x0A, 0x80, 0x00]);
        assert_eq!(&out[12..20], &(1u64 << 40).to_be_bytes());

        let mut s = Sense::invalid_field_in_cdb(2, 7);
        s.info = Some(9);
        let n = s.encode(true, &mut out);
        assert_eq!(n, 28);
        assert_eq!(out[7], 20);
        assert_eq!(&out[20..28], &[0x02, 0x06, 0, 0, 0xCF, 0x00, 0x02, 0x00]);
    }

    #[test]
    fn encode_cuts_to_the_buffer() {
        let mut out = [0u8; 8];
        assert_eq!(Sense::read_error().encode(false, &mut out), 8);
        assert_eq!(out[0], 0x70);
        assert_eq!(out[2], 0x03);
    }
}
