//! Sessions: the target-wide registry of logged-in sessions (TSIH allocation, session
//! reinstatement and its fence, `max_sessions_per_initiator`), and [`shared`]: the state every
//! reactor and connection sees (LUN table, login configuration, limits, reactor mailboxes).
//!
//! Below both the iSCSI engine ([`crate::iscsi`]) and the reactors ([`crate::reactor`]); the
//! registry itself is plain data under one lock, decided here and acted on by the caller.

pub mod shared;

pub use shared::{AbortReply, AbortRequest, Limits, Mailbox, Msg, Shared, Waker};

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;

/// Why a login cannot join or start a session.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SessionError {
    /// A non-zero TSIH that names no session of this initiator.
    #[error("no session with that TSIH for this initiator")]
    NoSuchSession,
    #[error("too many sessions")]
    TooManySessions,
    /// `max_sessions_per_initiator` reached.
    #[error("initiator already has {0} sessions (max_sessions_per_initiator)")]
    InitiatorSessionLimit(u32),
}

/// A logged-in session, as registered at the end of its login.
#[derive(Debug, Clone)]
pub struct SessionInfo {
    /// The TSIH: as requested by the initiator at login (0 = new session), as assigned once
    /// registered.
    pub tsih: u16,
    pub initiator: String,
    /// How it authenticated: `None`, or e.g. `CHAP SHA-256, mutual`.
    pub auth: String,
    pub isid: [u8; 6],
    /// Discovery sessions get a TSIH but never reinstate (or get reinstated by) others.
    pub discovery: bool,
    pub peer: SocketAddr,
    pub reactor: usize,
    /// The connection's token.
    pub token: u64,
    /// Negotiated login keys.
    pub negotiated: Vec<(&'static str, String)>,
    /// The connection's protocol trace switch (`trace_session`).
    pub trace: crate::protocol::trace::Switch,
    /// The address the initiator reached the portal on (never a wildcard).
    pub portal: Option<SocketAddr>,
}

/// An ISID as logs and `list_sessions` print it: 12 hex digits.
pub fn isid_hex(isid: &[u8; 6]) -> String {
    isid.iter().map(|b| format!("{b:02x}")).collect()
}

/// What [`Sessions::register`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Registered {
    pub tsih: u16,
    /// The (reactor, token) of an older connection of this session to close first: the new
    /// login is answered only once it is gone ([`Sessions::unregister`] names the waiter).
    pub close: Option<(usize, u64)>,
}

/// Every logged-in session, by TSIH, and the reinstatement fences.
#[derive(Default)]
pub struct Sessions {
    inner: Mutex<Registry>,
}

#[derive(Default)]
struct Registry {
    by_tsih: HashMap<u16, SessionInfo>,
    /// Reinstatement fences: the token of a connection being closed, and the (reactor, token)
    /// of the login waiting for it to be gone.
    fences: HashMap<u64, (usize, u64)>,
    next_tsih: u16,
}

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.inner.lock().expect("session table lock poisoned")
    }

    /// Registers a session at the end of a normal login.
    ///
    /// TSIH 0 starts a new session; an older session of the same initiator and ISID is
    /// replaced (session reinstatement, RFC 7143 §6.3.5). A non-zero TSIH must name that
    /// initiator's session, whose connection is then replaced. Either way the old connection
    /// is returned in [`Registered::close`] and fenced: its tasks all end (completed, or
    /// aborted with the connection) before the new login is answered, so no old write can land
    /// after the new session's. A login refused here closes nothing.
    pub fn register(&self, mut info: SessionInfo, max_per_initiator: Option<u32>) -> Result<Registered, SessionError> {
        let mut reg = self.lock();
        let same =
            |e: &SessionInfo| e.discovery == info.discovery && e.initiator == info.initiator && e.isid == info.isid;
        if info.tsih != 0 {
            let entry = reg.by_tsih.get_mut(&info.tsih).filter(|e| same(e)).ok_or(SessionError::NoSuchSession)?;
            let close = (entry.token != info.token).then_some((entry.reactor, entry.token));
            let tsih = info.tsih;
            let waiter = (info.reactor, info.token);
            *entry = info;
            if let Some((_, old)) = close {
                reg.fences.insert(old, waiter);
            }
            return Ok(Registered { tsih, close });
        }
        let old = reg.by_tsih.iter().find(|(_, e)| !info.discovery && same(e)).map(|(t, _)| *t);
        if let (Some(max), false) = (max_per_initiator, info.discovery) {
            // The session being reinstated does not count: it is replaced.
            let held = reg
                .by_tsih
                .iter()
                .filter(|(t, e)| Some(**t) != old && !e.discovery && e.initiator.eq_ignore_ascii_case(&info.initiator))
                .count();
            if held >= max as usize {
                return Err(SessionError::InitiatorSessionLimit(max));
            }
        }
        let close = old.map(|t| {
            let e = reg.by_tsih.remove(&t).expect("found above");
            (e.reactor, e.token)
        });
        if reg.by_tsih.len() >= usize::from(u16::MAX) {
            return Err(SessionError::TooManySessions);
        }
        let mut tsih = reg.next_tsih;
        loop {
            tsih = tsih.wrapping_add(1).max(1);
            if !reg.by_tsih.contains_key(&tsih) {
                break;
            }
        }
        reg.next_tsih = tsih;
        if let Some((_, old_token)) = close {
            reg.fences.insert(old_token, (info.reactor, info.token));
        }
        info.tsih = tsih;
        reg.by_tsih.insert(tsih, info);
        Ok(Registered { tsih, close })
    }

    /// Forgets a session when its connection (`token`) ends, unless another connection took
    /// it over; returns the (reactor, token) of a login that waited for this connection to be
    /// gone. Called once the connection has no operation in flight.
    pub fn unregister(&self, tsih: u16, token: u64) -> Option<(usize, u64)> {
        let mut reg = self.lock();
        if reg.by_tsih.get(&tsih).is_some_and(|e| e.token == token) {
            reg.by_tsih.remove(&tsih);
        }
        reg.fences.remove(&token)
    }

    /// Every logged-in session, ordered by TSIH.
    pub fn list(&self) -> Vec<SessionInfo> {
        let mut v: Vec<SessionInfo> = self.lock().by_tsih.values().cloned().collect();
        v.sort_by_key(|s| s.tsih);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(initiator: &str, isid: u8, token: u64) -> SessionInfo {
        SessionInfo {
            tsih: 0,
            initiator: initiator.into(),
            auth: "None".into(),
            isid: [0x80, 0, 0, 0, 0, isid],
            discovery: false,
            peer: "127.0.0.1:1".parse().unwrap(),
            reactor: (token % 2) as usize,
            token,
            negotiated: Vec::new(),
            trace: Default::default(),
            portal: None,
        }
    }

    #[test]
    fn new_sessions_get_distinct_nonzero_tsihs() {
        let s = Sessions::default();
        let a = s.register(info("iqn.a", 1, 10), None).unwrap();
        let b = s.register(info("iqn.a", 2, 11), None).unwrap();
        assert!(a.tsih != 0 && b.tsih != 0 && a.tsih != b.tsih);
        assert_eq!((a.close, b.close), (None, None));
        assert_eq!(s.list().iter().map(|i| i.token).collect::<Vec<_>>(), [10, 11]);
    }

    #[test]
    fn same_initiator_and_isid_reinstates_and_fences_the_old_connection() {
        let s = Sessions::default();
        let old = s.register(info("iqn.a", 1, 10), None).unwrap();
        let new = s.register(info("iqn.a", 1, 21), None).unwrap();
        assert_eq!(new.close, Some((0, 10)), "the old connection is closed first");
        assert_ne!(new.tsih, old.tsih);
        assert_eq!(s.list().len(), 1);
        // The old connection's end releases the waiting login, once.
        assert_eq!(s.unregister(old.tsih, 10), Some((1, 21)));
        assert_eq!(s.unregister(old.tsih, 10), None);
        assert_eq!(s.list().len(), 1, "the new session stays");
    }

    #[test]
    fn a_nonzero_tsih_must_name_the_initiators_session() {
        let s = Sessions::default();
        let a = s.register(info("iqn.a", 1, 10), None).unwrap();
        let mut other = info("iqn.b", 1, 11);
        other.tsih = a.tsih;
        assert_eq!(s.register(other, None), Err(SessionError::NoSuchSession));
        let mut stray = info("iqn.a", 1, 12);
        stray.tsih = a.tsih.wrapping_add(7);
        assert_eq!(s.register(stray, None), Err(SessionError::NoSuchSession));
        let mut again = info("iqn.a", 1, 13);
        again.tsih = a.tsih;
        assert_eq!(s.register(again, None), Ok(Registered { tsih: a.tsih, close: Some((0, 10)) }));
        assert_eq!(s.unregister(a.tsih, 10), Some((1, 13)));
        assert_eq!(s.list()[0].token, 13, "the connection that took the session over keeps it");
    }

    #[test]
    fn discovery_sessions_never_reinstate() {
        let s = Sessions::default();
        let mut d = info("iqn.a", 1, 10);
        d.discovery = true;
        s.register(d.clone(), Some(1)).unwrap();
        d.token = 11;
        assert_eq!(s.register(d, Some(1)).unwrap().close, None);
        assert_eq!(s.register(info("iqn.a", 1, 12), Some(1)).unwrap().close, None, "normal and discovery differ");
        assert_eq!(s.list().len(), 3);
    }

    #[test]
    fn the_per_initiator_limit_refuses_without_closing_anything() {
        let s = Sessions::default();
        s.register(info("iqn.a", 1, 10), Some(2)).unwrap();
        s.register(info("iqn.a", 2, 11), Some(2)).unwrap();
        assert_eq!(s.register(info("iqn.a", 3, 12), Some(2)), Err(SessionError::InitiatorSessionLimit(2)));
        // Initiator names compare without case for the limit (RFC 3722 names are lower case).
        assert_eq!(s.register(info("IQN.A", 3, 12), Some(2)), Err(SessionError::InitiatorSessionLimit(2)));
        assert_eq!(s.list().len(), 2, "the refused login closed nothing");
        // Reinstating one of the two is not a third session.
        assert_eq!(s.register(info("iqn.a", 2, 13), Some(2)).unwrap().close, Some((1, 11)));
        s.register(info("iqn.b", 1, 14), Some(2)).unwrap();
    }

    #[test]
    fn tsihs_wrap_around_skipping_zero_and_live_ones() {
        let s = Sessions::default();
        let first = s.register(info("iqn.a", 1, 10), None).unwrap().tsih;
        s.lock().next_tsih = u16::MAX - 1;
        assert_eq!(s.register(info("iqn.a", 2, 11), None).unwrap().tsih, u16::MAX);
        let wrapped = s.register(info("iqn.a", 3, 12), None).unwrap().tsih;
        assert_ne!(wrapped, 0);
        assert_ne!(wrapped, first, "a live TSIH is skipped");
    }
}
