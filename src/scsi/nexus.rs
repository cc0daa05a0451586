//! Per I_T nexus SCSI state: the unit attention conditions each LUN owes this session, and
//! the inbox through which other sessions (on any reactor thread) hand it unit attentions.

use super::lun::{Lun, LunTable, MAX_LUN_ID};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};

/// Additional sense codes of the unit attentions the target establishes.
pub mod ua {
    /// POWER ON, RESET, OR BUS DEVICE RESET OCCURRED.
    pub const POWER_ON: (u8, u8) = (0x29, 0x00);
    /// BUS DEVICE RESET FUNCTION OCCURRED (LUN reset).
    pub const RESET: (u8, u8) = (0x29, 0x03);
    /// POWER ON, RESET, OR BUS DEVICE RESET OCCURRED, for a target (warm or cold) reset: the
    /// generic code of the reset family, the one initiators (libiscsi among them) expect after
    /// a reset of the whole target rather than of one LUN.
    pub const TARGET_RESET: (u8, u8) = (0x29, 0x00);
    /// REPORTED LUNS DATA HAS CHANGED.
    pub const LUNS_CHANGED: (u8, u8) = (0x3F, 0x0E);
    /// MODE PARAMETERS CHANGED (another nexus changed WCE or D_SENSE).
    pub const MODE_PARAMETERS_CHANGED: (u8, u8) = (0x2A, 0x01);
    /// RESERVATIONS PREEMPTED.
    pub const RESERVATIONS_PREEMPTED: (u8, u8) = (0x2A, 0x03);
    /// RESERVATIONS RELEASED.
    pub const RESERVATIONS_RELEASED: (u8, u8) = (0x2A, 0x04);
    /// REGISTRATIONS PREEMPTED.
    pub const REGISTRATIONS_PREEMPTED: (u8, u8) = (0x2A, 0x05);
}

/// Unit attentions other sessions established for one nexus, waiting for it to pick them up.
#[derive(Debug)]
pub struct Inbox {
    /// The initiator port name, `"<InitiatorName>,i,0x<ISID>"` (SPC-4 7.6.4.6).
    pub identity: Arc<str>,
    /// Set after `items` gained an entry: the nexus only locks when it sees this.
    flag: AtomicBool,
    items: Mutex<Vec<(u64, u8, u8)>>,
}

impl Inbox {
    fn new(identity: Arc<str>) -> Arc<Self> {
        Arc::new(Self { identity, flag: AtomicBool::new(false), items: Mutex::new(Vec::new()) })
    }

    #[cfg(test)]
    pub(crate) fn new_for_test(identity: &str) -> Arc<Self> {
        Self::new(identity.into())
    }

    fn post(&self, lun: u64, (asc, ascq): (u8, u8)) {
        let mut items = self.items.lock().unwrap_or_else(PoisonError::into_inner);
        if !items.contains(&(lun, asc, ascq)) {
            items.push((lun, asc, ascq));
        }
        drop(items);
        self.flag.store(true, Ordering::Release);
    }
}

/// The sessions that have used a LUN, so that one of them can reach the others.
#[derive(Debug, Default)]
pub struct Sessions {
    list: Mutex<Vec<Weak<Inbox>>>,
}

impl Sessions {
    fn attach(&self, inbox: &Arc<Inbox>) {
        let mut list = self.list.lock().unwrap_or_else(PoisonError::into_inner);
        list.retain(|w| w.strong_count() > 0);
        list.push(Arc::downgrade(inbox));
    }

    /// Establishes a unit attention for `lun` on every live attached session `to` selects.
    pub fn post(&self, lun: u64, ua: (u8, u8), to: impl Fn(&Inbox) -> bool) {
        let list = self.list.lock().unwrap_or_else(PoisonError::into_inner);
        for inbox in list.iter().filter_map(Weak::upgrade) {
            if to(&inbox) {
                inbox.post(lun, ua);
            }
        }
    }
}

/// Tells identity-less sessions (unit tests, tools) apart.
static ANONYMOUS: AtomicU64 = AtomicU64::new(0);

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
    /// Bit set: this LUN knows this session's inbox.
    attached: Box<[u64; WORDS]>,
    inbox: Arc<Inbox>,
}

impl Default for Nexus {
    fn default() -> Self {
        Self::new()
    }
}

impl Nexus {
    /// A fresh session: every LUN owes POWER ON, RESET, OR BUS DEVICE RESET OCCURRED once.
    /// Until [`Nexus::set_identity`] the session has a unique made-up initiator port name.
    pub fn new() -> Self {
        let n = ANONYMOUS.fetch_add(1, Ordering::Relaxed);
        Self {
            por_reported: Box::new([0; WORDS]),
            for_all: Vec::new(),
            pending: Vec::new(),
            attached: Box::new([0; WORDS]),
            inbox: Inbox::new(format!("anonymous,i,0x{n:012x}").into()),
        }
    }

    /// Names the I_T nexus after login: persistent reservations and the unit attentions they
    /// cause are addressed to the initiator port `"<InitiatorName>,i,0x<ISID hex>"`.
    pub fn set_identity(&mut self, initiator_name: &str, isid: [u8; 6]) {
        let hex: String = isid.iter().map(|b| format!("{b:02x}")).collect();
        self.inbox = Inbox::new(format!("{initiator_name},i,0x{hex}").into());
        *self.attached = [0; WORDS];
    }

    /// The initiator port name reservations know this session by.
    pub fn identity(&self) -> &Arc<str> {
        &self.inbox.identity
    }

    pub(crate) fn inbox(&self) -> &Arc<Inbox> {
        &self.inbox
    }

    /// Called for every command addressed to `lun`: makes the LUN know this session, and
    /// collects unit attentions other sessions left (one relaxed load when there are none).
    pub(crate) fn sync(&mut self, lun: &Lun) {
        if let Ok(i) = usize::try_from(lun.id) {
            if i < WORDS * 64 && self.attached[i / 64] & (1 << (i % 64)) == 0 {
                lun.sessions.attach(&self.inbox);
                self.attached[i / 64] |= 1 << (i % 64);
            }
        }
        if self.inbox.flag.load(Ordering::Relaxed) {
            self.inbox.flag.store(false, Ordering::Relaxed);
            let items = std::mem::take(&mut *self.inbox.items.lock().unwrap_or_else(PoisonError::into_inner));
            for (l, asc, ascq) in items {
                self.queue(l, (asc, ascq));
            }
        }
    }

    /// The set of LUNs changed: every LUN owes REPORTED LUNS DATA HAS CHANGED.
    pub fn luns_changed(&mut self) {
        self.queue_all(ua::LUNS_CHANGED);
    }

    /// A LOGICAL UNIT RESET arrived on this session: every session of the LUN, this one
    /// included, owes BUS DEVICE RESET FUNCTION OCCURRED (SAM-5 6.3.3), SPC-2 reservations
    /// end (persistent ones survive), and so does every PREVENT MEDIUM REMOVAL (SPC-4 6.15).
    pub fn lun_reset(&mut self, lun: &Lun) {
        self.reset(lun, ua::RESET);
    }

    fn reset(&mut self, lun: &Lun, code: (u8, u8)) {
        self.queue(lun.id, code);
        let me = &self.inbox;
        lun.sessions.post(lun.id, code, |i| !std::ptr::eq(i, &**me));
        lun.pr.reset();
        lun.medium.reset();
    }

    /// Establishes a unit attention for `lun` on every other session that used it (SPC-4
    /// 5.14: a change one I_T nexus makes that the others must learn of).
    pub fn notify_others(&self, lun: &Lun, code: (u8, u8)) {
        let me = &self.inbox;
        lun.sessions.post(lun.id, code, |i| !std::ptr::eq(i, &**me));
    }

    /// A target reset: a LUN reset of every LUN, reported with the generic reset code.
    pub fn target_reset(&mut self, table: &LunTable) {
        for lun in table.iter() {
            self.reset(lun, ua::TARGET_RESET);
        }
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
        n.lun_reset(t.get(1).unwrap());
        n.luns_changed();
        n.lun_reset(t.get(1).unwrap()); // duplicate: still one
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
        n.target_reset(&t);
        n.expand(&t);
        assert!(n.has_pending(3) && n.has_pending(7));
        assert_eq!(n.take(7), Some(ua::TARGET_RESET));
        assert_eq!(n.take(3), Some(ua::TARGET_RESET));
        assert_eq!(n.take(4), Some(ua::POWER_ON));
        assert_eq!(n.take(4), None);
    }

    #[test]
    fn resets_reach_every_session_of_the_lun() {
        let t = table(&[0, 1]);
        let (l0, l1) = (t.get(0).unwrap(), t.get(1).unwrap());
        let (mut a, mut b, mut c) = (Nexus::new(), Nexus::new(), Nexus::new());
        for n in [&mut a, &mut b, &mut c] {
            n.take(0);
            n.take(1);
        }
        a.sync(l0);
        b.sync(l0);
        c.sync(l1); // never used LUN 0
        a.lun_reset(l0);
        for n in [&mut a, &mut b, &mut c] {
            n.sync(l0);
        }
        assert_eq!(a.take(0), Some(ua::RESET));
        assert_eq!(b.take(0), Some(ua::RESET));
        assert_eq!(b.take(0), None);
        assert_eq!(c.take(0), None, "c was never attached to LUN 0 when it was reset");
        assert_eq!(c.take(1), None);
        b.target_reset(&t);
        a.sync(l1);
        c.sync(l1);
        assert_eq!(b.take(1), Some(ua::TARGET_RESET));
        assert_eq!(c.take(1), Some(ua::TARGET_RESET));
        assert_eq!(a.take(0), Some(ua::TARGET_RESET));
        // a attached to LUN 1 only after the reset was posted there.
        assert_eq!(a.take(1), None);
    }

    #[test]
    fn dropped_sessions_are_forgotten() {
        let t = table(&[0]);
        let l0 = t.get(0).unwrap();
        let mut a = Nexus::new();
        {
            let mut b = Nexus::new();
            b.sync(l0);
        }
        a.sync(l0);
        assert_eq!(l0.sessions.list.lock().unwrap().len(), 1);
    }

    #[test]
    fn identities() {
        let (mut a, b) = (Nexus::new(), Nexus::new());
        assert_ne!(a.identity(), b.identity());
        a.set_identity("iqn.1994-05.com.redhat:x", [0x23, 0x3d, 0, 0, 0, 1]);
        assert_eq!(&**a.identity(), "iqn.1994-05.com.redhat:x,i,0x233d00000001");
    }
}
