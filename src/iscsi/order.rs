//! Task attributes within a session (SAM-5 8.6, the ATTR field of the SCSI Command PDU,
//! RFC 7143 §11.2.1.2). Each I_T nexus has its own task set (the control mode page reports
//! TST 001b), so ordering is kept per session and per LUN:
//!
//! - an ORDERED command starts only once every earlier task of its LUN has ended, and the
//!   SIMPLE (or untagged) commands after it start only once it has ended;
//! - a HEAD OF QUEUE command starts at once, ahead of any held command;
//! - everything else is SIMPLE: it starts at once unless an ORDERED one holds it back.
//!
//! Commands that must wait are held here as whole PDUs (with their immediate data, and the
//! unsolicited Data-Out that follows them), and handed back in arrival order when they may
//! run. Only sessions that use ORDERED pay for it; SIMPLE commands with nothing held take one
//! branch.

use std::collections::VecDeque;

/// ATTR values of the SCSI Command PDU (byte 1, bits 0-2).
pub mod attr {
    pub const UNTAGGED: u8 = 0;
    pub const SIMPLE: u8 = 1;
    pub const ORDERED: u8 = 2;
    pub const HEAD_OF_QUEUE: u8 = 3;
    pub const ACA: u8 = 4;
}

/// What runs now on one LUN of the session.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Running {
    /// Some task of the LUN has not ended.
    pub tasks: bool,
    /// One of those tasks is ORDERED.
    pub ordered: bool,
}

/// A held PDU: a command, or unsolicited Data-Out of a held command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    pub lun: [u8; 8],
    pub itt: u32,
    pub ordered: bool,
    pub data_out: bool,
    /// The PDU: BHS, AHS, data segment.
    pub pdu: Vec<u8>,
}

/// More commands held than the session may have in flight.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0} commands already wait behind ORDERED ones")]
pub struct OrderError(pub usize);

/// Commands of one session held back by task attributes.
#[derive(Debug, Default)]
pub struct OrderQueue {
    held: VecDeque<Held>,
    /// Commands among `held`.
    commands: usize,
    /// Commands held at most (the session's command window): beyond, TASK SET FULL.
    limit: usize,
}

impl OrderQueue {
    pub fn new(limit: usize) -> Self {
        Self { held: VecDeque::new(), commands: 0, limit }
    }

    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// Commands held (they count against the session's command window like running ones).
    pub fn commands(&self) -> usize {
        self.commands
    }

    fn holds_lun(&self, lun: &[u8; 8]) -> bool {
        self.held.iter().any(|h| !h.data_out && h.lun == *lun)
    }

    /// Whether a command with attribute `attr` for `lun` must wait, given what runs there.
    pub fn must_hold(&self, lun: &[u8; 8], attr: u8, running: Running) -> bool {
        match attr {
            attr::HEAD_OF_QUEUE => false,
            attr::ORDERED => running.tasks || self.holds_lun(lun),
            _ => running.ordered || self.holds_lun(lun),
        }
    }

    /// Holds a command PDU.
    pub fn hold_command(&mut self, lun: [u8; 8], itt: u32, ordered: bool, pdu: Vec<u8>) -> Result<(), OrderError> {
        if self.commands >= self.limit {
            return Err(OrderError(self.commands));
        }
        self.commands += 1;
        self.held.push_back(Held { lun, itt, ordered, data_out: false, pdu });
        Ok(())
    }

    /// Holds an unsolicited Data-Out when its command (`itt`) is held; false when it is not
    /// (the Data-Out is then for no task at all).
    pub fn hold_data_out(&mut self, itt: u32, pdu: &[u8]) -> bool {
        let Some(lun) = self.held.iter().find(|h| !h.data_out && h.itt == itt).map(|h| h.lun) else {
            return false;
        };
        self.held.push_back(Held { lun, itt, ordered: false, data_out: true, pdu: pdu.to_vec() });
        true
    }

    /// Drops the held commands `abort` picks, with their Data-Out; returns how many commands.
    pub fn abort(&mut self, mut abort: impl FnMut(&Held) -> bool) -> usize {
        let itts: Vec<u32> = self.held.iter().filter(|h| !h.data_out && abort(h)).map(|h| h.itt).collect();
        self.held.retain(|h| !itts.contains(&h.itt));
        self.commands -= itts.len();
        itts.len()
    }

    /// The first held command that may run now (nothing of its LUN held before it, and what
    /// runs there does not hold it back), taken out with its Data-Out PDUs in order. `running`
    /// tells what runs on a LUN; call again after running the command, as that changes.
    pub fn next_runnable(&mut self, running: impl Fn(&[u8; 8]) -> Running) -> Option<(Held, Vec<Held>)> {
        let mut blocked: Vec<[u8; 8]> = Vec::new();
        let mut pick = None;
        for (i, h) in self.held.iter().enumerate() {
            if h.data_out || blocked.contains(&h.lun) {
                continue;
            }
            let r = running(&h.lun);
            let waits = if h.ordered { r.tasks } else { r.ordered };
            if waits {
                blocked.push(h.lun);
            } else {
                pick = Some(i);
                break;
            }
        }
        let cmd = self.held.remove(pick?).expect("index found above");
        self.commands -= 1;
        let mut outs = Vec::new();
        let mut i = 0;
        while i < self.held.len() {
            if self.held[i].data_out && self.held[i].itt == cmd.itt {
                outs.push(self.held.remove(i).expect("in range"));
            } else {
                i += 1;
            }
        }
        Some((cmd, outs))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const L0: [u8; 8] = [0; 8];
    const L1: [u8; 8] = [0, 1, 0, 0, 0, 0, 0, 0];
    const IDLE: Running = Running { tasks: false, ordered: false };
    const BUSY: Running = Running { tasks: true, ordered: false };
    const ORDERED_RUNS: Running = Running { tasks: true, ordered: true };

    fn q() -> OrderQueue {
        OrderQueue::new(4)
    }

    #[test]
    fn simple_and_head_of_queue_never_wait_for_simple_tasks() {
        let q = q();
        for a in [attr::UNTAGGED, attr::SIMPLE, attr::HEAD_OF_QUEUE, attr::ACA] {
            assert!(!q.must_hold(&L0, a, BUSY), "attr {a}");
        }
    }

    #[test]
    fn ordered_waits_for_earlier_tasks_of_its_lun_only() {
        let q = q();
        assert!(q.must_hold(&L0, attr::ORDERED, BUSY));
        assert!(!q.must_hold(&L0, attr::ORDERED, IDLE));
    }

    #[test]
    fn simple_waits_behind_a_running_or_held_ordered_command() {
        let mut q = q();
        assert!(q.must_hold(&L0, attr::SIMPLE, ORDERED_RUNS));
        assert!(!q.must_hold(&L0, attr::HEAD_OF_QUEUE, ORDERED_RUNS));
        q.hold_command(L0, 1, true, vec![1]).unwrap();
        assert!(q.must_hold(&L0, attr::SIMPLE, IDLE), "behind the held ORDERED");
        assert!(!q.must_hold(&L1, attr::SIMPLE, IDLE), "another LUN is not held back");
        assert!(q.must_hold(&L0, attr::ORDERED, IDLE), "ORDERED after ORDERED keeps the order");
    }

    #[test]
    fn released_in_arrival_order_per_lun_with_their_data_out() {
        let mut q = q();
        q.hold_command(L0, 1, true, vec![1]).unwrap();
        q.hold_command(L0, 2, false, vec![2]).unwrap();
        assert!(q.hold_data_out(2, &[22]));
        assert!(q.hold_data_out(1, &[11]));
        assert!(!q.hold_data_out(9, &[99]), "Data-Out of no held command");
        // The LUN is busy: the ORDERED head waits, and so does the SIMPLE behind it.
        assert_eq!(q.next_runnable(|_| BUSY), None);
        let (c, outs) = q.next_runnable(|_| IDLE).unwrap();
        assert_eq!((c.itt, outs.iter().map(|h| h.pdu[0]).collect::<Vec<_>>()), (1, vec![11]));
        // Now the ORDERED one runs: the SIMPLE one still waits for it to end.
        assert_eq!(q.next_runnable(|_| ORDERED_RUNS), None);
        let (c, outs) = q.next_runnable(|_| BUSY).unwrap();
        assert_eq!((c.itt, outs[0].pdu.clone()), (2, vec![22]));
        assert!(q.is_empty());
    }

    #[test]
    fn a_lun_that_waits_does_not_hold_back_another() {
        let mut q = q();
        q.hold_command(L0, 1, true, vec![]).unwrap();
        q.hold_command(L1, 2, true, vec![]).unwrap();
        let running = |l: &[u8; 8]| if *l == L0 { BUSY } else { IDLE };
        assert_eq!(q.next_runnable(running).unwrap().0.itt, 2);
        assert_eq!(q.next_runnable(running), None);
    }

    #[test]
    fn aborted_commands_go_with_their_data_out_and_the_queue_is_bounded() {
        let mut q = q();
        for itt in 0..4 {
            q.hold_command(L0, itt, itt == 0, vec![]).unwrap();
        }
        assert!(q.hold_data_out(3, &[3]));
        assert_eq!(q.hold_command(L0, 9, false, vec![]), Err(OrderError(4)));
        assert_eq!(q.abort(|h| h.itt >= 2), 2);
        assert_eq!((q.held.len(), q.commands()), (2, 2), "the aborted commands' Data-Out went too");
        assert_eq!(q.abort(|h| h.lun == L0), 2);
        assert!(q.is_empty());
    }
}
