//! The medium of a removable LUN (`removable: true`): whether it is loaded, and which I_T
//! nexuses prevent its removal (SPC-4 6.15 PREVENT ALLOW MEDIUM REMOVAL, SBC-3 5.25 START STOP
//! UNIT).
//!
//! Prevention is per I_T nexus and the LU is prevented while any nexus holds it. A holder is
//! kept as a weak reference to its session's inbox, so I_T nexus loss and logout (the session
//! and its inbox dropped) end its prevention without any hook; a LUN reset or target reset
//! ends every prevention (SPC-4 6.15: "hard reset, logical unit reset or I_T nexus loss").

use super::nexus::Inbox;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};

/// Why a load or eject was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MediumError {
    /// An I_T nexus holds PREVENT MEDIUM REMOVAL.
    #[error("medium removal prevented")]
    RemovalPrevented,
}

#[derive(Debug)]
pub struct Medium {
    /// Loaded: the hot path reads this (one relaxed load) on removable LUNs only.
    present: AtomicBool,
    /// Sessions that sent PREVENT=1 and not PREVENT=0 since.
    preventers: Mutex<Vec<Weak<Inbox>>>,
}

impl Default for Medium {
    fn default() -> Self {
        Self { present: AtomicBool::new(true), preventers: Mutex::default() }
    }
}

impl Medium {
    /// Whether the medium is loaded.
    pub fn present(&self) -> bool {
        self.present.load(Ordering::Relaxed)
    }

    /// PREVENT ALLOW MEDIUM REMOVAL from `who`: `prevent` sets or clears its prevention.
    pub fn set_prevent(&self, who: &Arc<Inbox>, prevent: bool) {
        let mut list = self.preventers.lock().unwrap_or_else(PoisonError::into_inner);
        list.retain(|w| w.strong_count() > 0 && !std::ptr::eq(w.as_ptr(), Arc::as_ptr(who)));
        if prevent {
            list.push(Arc::downgrade(who));
        }
    }

    /// Whether a live I_T nexus prevents removal.
    pub fn prevented(&self) -> bool {
        let list = self.preventers.lock().unwrap_or_else(PoisonError::into_inner);
        list.iter().any(|w| w.strong_count() > 0)
    }

    /// START STOP UNIT with LOEJ=1: loads (`load`) or ejects the medium, refused while any
    /// nexus prevents removal. SBC-3 only names ejection, but a loader that may not open may
    /// not close either, and libiscsi's PreventAllow.Eject checks that both are refused.
    pub fn load_eject(&self, load: bool) -> Result<(), MediumError> {
        let list = self.preventers.lock().unwrap_or_else(PoisonError::into_inner);
        if list.iter().any(|w| w.strong_count() > 0) {
            return Err(MediumError::RemovalPrevented);
        }
        self.present.store(load, Ordering::Relaxed);
        Ok(())
    }

    /// A LUN or target reset: every prevention ends; the medium stays where it is.
    pub fn reset(&self) {
        self.preventers.lock().unwrap_or_else(PoisonError::into_inner).clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prevention_blocks_load_and_eject_until_every_holder_allows() {
        let m = Medium::default();
        let (a, b) = (Inbox::new_for_test("a,i,0x1"), Inbox::new_for_test("b,i,0x2"));
        assert!(m.present());
        m.set_prevent(&a, true);
        m.set_prevent(&a, true); // twice: still one entry, one ALLOW clears it
        m.set_prevent(&b, true);
        assert_eq!(m.load_eject(false), Err(MediumError::RemovalPrevented));
        assert!(m.present());
        m.set_prevent(&a, false);
        assert!(m.prevented(), "b still prevents");
        m.set_prevent(&b, false);
        assert!(!m.prevented());
        assert_eq!(m.load_eject(false), Ok(()));
        assert!(!m.present());
        m.set_prevent(&a, true);
        assert_eq!(m.load_eject(true), Err(MediumError::RemovalPrevented));
        m.set_prevent(&a, false);
        assert_eq!(m.load_eject(true), Ok(()));
        assert!(m.present());
    }

    #[test]
    fn nexus_loss_and_reset_end_prevention() {
        let m = Medium::default();
        let a = Inbox::new_for_test("a,i,0x1");
        m.set_prevent(&a, true);
        drop(a); // the session ended
        assert!(!m.prevented());
        assert_eq!(m.load_eject(false), Ok(()));
        let b = Inbox::new_for_test("b,i,0x2");
        m.set_prevent(&b, true);
        m.reset();
        assert!(!m.prevented());
        assert!(!m.present(), "a reset leaves the medium out");
        assert_eq!(m.load_eject(true), Ok(()));
    }
}
