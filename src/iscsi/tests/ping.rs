//! NOP-In pings of an idle session (RFC 7143 §11.19), on the rig's clock: after NOP_INTERVAL
//! without traffic the target pings; a session that answers stays up however long it idles,
//! one that does not is dropped once NOP_TIMEOUT has passed.

use super::super::conn::{NOP_INTERVAL, NOP_TIMEOUT};
use super::*;
use std::time::Duration;

const SECOND: Duration = Duration::from_secs(1);

impl Rig {
    /// The reactor's periodic tick, at the rig's `now`.
    fn tick(&mut self, c: usize) {
        let now = self.now;
        self.slots[c].conn.tick(now, &mut self.pool);
        self.settle();
    }
}

/// The target's ping: a NOP-In with the reserved ITT and a Target Transfer Tag to echo.
fn assert_ping(pdus: &[Pdu]) -> Pdu {
    assert_eq!(pdus.len(), 1, "one ping");
    let p = &pdus[0];
    assert_eq!(p.opcode(), opcode::NOP_IN);
    assert_eq!(p.itt(), RESERVED_TAG, "a ping is not an answer");
    assert_ne!(p.ttt(), RESERVED_TAG, "a ping asks for an answer");
    p.clone()
}

#[test]
fn an_idle_session_that_answers_pings_stays_up() {
    let mut rig = Rig::new();
    let c = rig.logged_in(ISID_A, &Keys::default());
    rig.now += NOP_INTERVAL - SECOND;
    rig.tick(c);
    assert!(rig.recv(c).is_empty(), "pinged before NOP_INTERVAL");
    // An hour of idling, answering every ping when it comes.
    for _ in 0..(3600 / (NOP_INTERVAL + SECOND).as_secs()) {
        rig.now += NOP_INTERVAL + SECOND;
        rig.tick(c);
        let ping = assert_ping(&rig.recv(c));
        // Unanswered for less than NOP_TIMEOUT: no second ping, no drop.
        rig.now += NOP_TIMEOUT / 2;
        rig.tick(c);
        assert!(rig.recv(c).is_empty(), "a second ping while one is outstanding");
        assert!(!rig.gone(c));
        let sn = rig.slots[c].cmd_sn;
        assert!(rig.send(c, &nop_out(RESERVED_TAG, ping.ttt(), sn), &[]));
        assert!(rig.recv(c).is_empty(), "the answer to a ping was answered");
        // The ping did not take a StatSN (§11.19): the next status carries the same one.
        assert_eq!(rig.ping(c).stat_sn(), ping.stat_sn());
    }
    assert!(!rig.gone(c));
    let (itt, sn) = (rig.next_itt(c), rig.take_cmd_sn(c));
    let rsp = rig.command_response(c, &command(itt, sn, RAM_LUN, &TEST_UNIT_READY, 0, Dir::None, true), &[]);
    assert_eq!(rsp.status(), status::GOOD, "the session still works");
}

#[test]
fn a_session_that_does_not_answer_a_ping_is_dropped_after_the_nop_timeout() {
    let mut rig = Rig::new();
    let c = rig.logged_in(ISID_A, &Keys::default());
    rig.now += NOP_INTERVAL + SECOND;
    rig.tick(c);
    assert_ping(&rig.recv(c));
    rig.now += NOP_TIMEOUT;
    rig.tick(c);
    assert!(!rig.gone(c), "dropped before NOP_TIMEOUT had passed");
    rig.now += SECOND;
    rig.tick(c);
    assert!(rig.gone(c), "still up {:?} after an unanswered ping", NOP_TIMEOUT + SECOND);
    assert_eq!(rig.sessions(), 0, "the session outlived its connection");
}
