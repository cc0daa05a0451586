//! Sense data (SPC-4 4.5). Placeholder: the SCSI work replaces this file.

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

impl Sense {
    pub fn new(key: SenseKey, asc: u8, ascq: u8) -> Self {
        Self { key, asc, ascq, info: None, specific: None }
    }
    /// Writes fixed (0x70) or descriptor (0x72) format sense data; returns its length.
    pub fn encode(&self, descriptor: bool, out: &mut [u8]) -> usize {
        let _ = descriptor;
        out[0] = 0x70;
        out[2] = self.key as u8;
        out[7] = 10;
        out[12] = self.asc;
        out[13] = self.ascq;
        18
    }
    pub fn lun_not_supported() -> Self {
        Self::new(SenseKey::IllegalRequest, 0x25, 0x00)
    }
    pub fn read_error() -> Self {
        Self::new(SenseKey::MediumError, 0x11, 0x00)
    }
    pub fn write_error() -> Self {
        Self::new(SenseKey::MediumError, 0x0C, 0x00)
    }
    pub fn invalid_opcode() -> Self {
        Self::new(SenseKey::IllegalRequest, 0x20, 0x00)
    }
}
