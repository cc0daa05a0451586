//! Per I_T nexus SCSI state. Placeholder: the SCSI work replaces this file.

/// SCSI state of one session (I_T nexus).
#[derive(Debug, Default)]
pub struct Nexus {}

impl Nexus {
    pub fn new() -> Self {
        Self {}
    }
    pub fn luns_changed(&mut self) {}
    pub fn lun_reset(&mut self, _lun: u64) {}
    pub fn target_reset(&mut self) {}
}
