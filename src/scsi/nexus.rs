//! Per I_T nexus SCSI state: the unit attention conditions each LUN owes this session.

use super::lun::{LunTable, MAX_LUN_ID};

/// Additional sense codes of the unit attentions the target establishes.
pub mod ua {
    /// POWER ON, RESET, OR BUS DEVICE RESET OCCURRED.
    pub const POWER_ON: (u8, u8) = (0x29, 0x00);
    /// BUS DEVICE RESET FUNCTION OCCURRED (LUN or target reset).
    pub const RESET: (u8, u8) = (0x29, 0x03);
    /// REPORTED LUNS DATA HAS CHANGED.
    pub const LUNS_CHANGED: (u8, u8) = (0x3F, 0x0E);
}

const WORDS: usize = (MAX_LUN_ID as usize + 1) / 64;

/// SCSI state of one session (I_T nexus).
///
/// The power-on unit attention every LUN owes a new session is a bitset of LUNs that have
/// reported it (so LUNs added later owe it too). Other unit attentions queue in order and are
/// only looked at when the queue is non-empty, so the common command allocates nothing.
#[derive(Debug)]
pub struct Nexus {
    /// Bit set: this LUN has reported its power-on unit attention.
    por_reported: Box<[u64; WORDS]>,
    /// Unit attentions for every LUN, not yet expanded against a LUN table.
    for_all: Vec<(u8, u8)>,
    /// Pending unit attentions per LUN, oldest first.
    pending: Vec<(u64, u8, u8)>,
}

impl Default for Nexus {
    fn default() -> Self {
        Self::new()
    }
}

impl Nexus {
    /// A fresh session: every LUN owes POWER ON, RESET, OR BUS DEVICE RESET OCCURRED once.
    pub fn new() -> Self {
        Self { por_reported: Box::new([0; WORDS]), for_all: Vec::new(), pending: Vec::new() }
    }

    /// The set of LUNs changed: every LUN owes REPORTED LUNS DATA HAS CHANGED.
    pub fn luns_changed(&mut self) {
        self.queue_all(ua::LUNS_CHANGED);
    }

    /// A LUN RESET task management function hit `lun`.
    pub fn lun_reset(&mut self, lun: u64) {
        self.queue(lun, ua::RESET);
    }

    /// A target reset: every LUN owes BUS DEVICE RESET FUNCTION OCCURRED.
    pub fn target_reset(&mut self) {
        self.queue_all(ua::RESET);
    }

    fn queue_all(&mut self, (asc, ascq): (u8, u8)) {
        if !self.for_all.contains(&(asc, ascq)) {
            self.for_all.push((asc, ascq));
        }
    }

    fn queue(&mut self, lun: u64, (asc, ascq): (u8, u8)) {
        if !self.pending.contains(&(lun, asc, ascq)) {
            self.pending.push((lun, asc, ascq));
        }
    }

    /// Turns unit attentions queued for every LUN into per-LUN ones for the LUNs in `table`.
    pub(crate) fn expand(&mut self, table: &LunTable) {
        if self.for_all.is_empty() {
            return;
        }
        let all = std::mem::take(&mut self.for_all);
        for (asc, ascq) in all {
            for lun in table.iter() {
                self.queue(lun.id, (asc, ascq));
            }
        }
    }

    /// Clears a unit attention for every LUN (REPORT LUNS clears REPORTED LUNS DATA HAS
    /// CHANGED, SPC-4 6.33).
    pub(crate) fn clear_all(&mut self, (asc, ascq): (u8, u8)) {
        if !self.pending.is_empty() {
            self.pending.retain(|p| (p.1, p.2) != (asc, ascq));
        }
    }

    /// Whether `lun` has a unit attention pending (after [`Nexus::expand`]).
    pub fn has_pending(&self, lun: u64) -> bool {
        !self.por_done(lun) || self.pending.iter().any(|p| p.0 == lun)
    }

    fn por_done(&self, lun: u64) -> bool {
        match usize::try_from(lun) {
            Ok(i) if i < WORDS * 64 => self.por_reported[i / 64] & (1 << (i % 64)) != 0,
            _ => true,
        }
    }

    /// Takes the oldest unit attention pending for `lun` (ASC, ASCQ), clearing it.
    pub fn take(&mut self, lun: u64) -> Option<(u8, u8)> {
        if !self.por_done(lun) {
            let i = lun as usize;
            self.por_reported[i / 64] |= 1 << (i % 64);
            return Some(ua::POWER_ON);
        }
        if self.pending.is_empty() {
            return None;
        }
        let i = self.pending.iter().position(|p| p.0 == lun)?;
        let (_, asc, ascq) = self.pending.remove(i);
        Some((asc, ascq))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backing::Backing;
    use crate::scsi::Lun;
    use std::sync::Arc;

    fn table(ids: &[u64]) -> LunTable {
        LunTable::new(
            ids.iter()
                .map(|&id| Arc::new(Lun::new(id, &format!("l{id}"), None, Backing::new_mem(4096).unwrap(), false, "t")))
                .collect(),
        )
    }

    #[test]
    fn power_on_once_per_lun() {
        let mut n = Nexus::new();
        assert!(n.has_pending(0));
        assert_eq!(n.take(0), Some(ua::POWER_ON));
        assert_eq!(n.take(0), None);
        assert!(!n.has_pending(0));
        assert_eq!(n.take(MAX_LUN_ID), Some(ua::POWER_ON));
        assert_eq!(n.take(MAX_LUN_ID + 1), None, "no UA for impossible LUNs");
        assert_eq!(n.take(5), Some(ua::POWER_ON));
    }

    #[test]
    fn queued_in_order_and_per_lun() {
        let t = table(&[0, 1, 2]);
        let mut n = Nexus::new();
        n.take(0);
        n.take(1);
        n.lun_reset(1);
        n.luns_changed();
        n.lun_reset(1); // duplicate: still one
        n.expand(&t);
        assert_eq!(n.take(0), Some(ua::LUNS_CHANGED));
        assert_eq!(n.take(0), None);
        assert_eq!(n.take(1), Some(ua::RESET));
        assert_eq!(n.take(1), Some(ua::LUNS_CHANGED));
        assert_eq!(n.take(1), None);
        // LUN 2 never reported its power-on UA: that comes first.
        assert_eq!(n.take(2), Some(ua::POWER_ON));
        assert_eq!(n.take(2), Some(ua::LUNS_CHANGED));
        assert_eq!(n.take(2), None);
    }

    #[test]
    fn target_reset_hits_every_lun_in_the_table() {
        let t = table(&[3, 7]);
        let mut n = Nexus::new();
        n.take(3);
        n.take(7);
        n.target_reset();
        n.expand(&t);
        assert!(n.has_pending(3) && n.has_pending(7));
        assert_eq!(n.take(7), Some(ua::RESET));
        assert_eq!(n.take(3), Some(ua::RESET));
        assert_eq!(n.take(4), Some(ua::POWER_ON));
        assert_eq!(n.take(4), None);
    }
}
