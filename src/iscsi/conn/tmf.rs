//! Task management of a connection (RFC 7143 §11.5): ABORT TASK, ABORT/CLEAR TASK SET,
//! LOGICAL UNIT RESET, TARGET WARM/COLD RESET, and the fencing that reaches this session from
//! elsewhere (another session's reset, PREEMPT AND ABORT, a removed or replaced LUN).
//! A response waits until every aborted task's in-flight I/O has completed.

use super::command::lun_current;
use super::*;

/// Task management functions (RFC 7143 §11.5.1).
mod function {
    pub const ABORT_TASK: u8 = 1;
    pub const ABORT_TASK_SET: u8 = 2;
    pub const CLEAR_ACA: u8 = 3;
    pub const CLEAR_TASK_SET: u8 = 4;
    pub const LOGICAL_UNIT_RESET: u8 = 5;
    pub const TARGET_WARM_RESET: u8 = 6;
    pub const TARGET_COLD_RESET: u8 = 7;
    pub const TASK_REASSIGN: u8 = 8;
}

/// Task management responses (RFC 7143 §11.6.1).
mod response {
    pub const COMPLETE: u8 = 0;
    pub const NO_TASK: u8 = 1;
    pub const NO_LUN: u8 = 2;
    pub const REASSIGN_UNSUPPORTED: u8 = 4;
    pub const UNSUPPORTED: u8 = 5;
}

impl Conn {
    /// Ends a task whose LUN was removed or replaced: LOGICAL UNIT NOT SUPPORTED.
    pub(super) fn fail_fenced(&mut self, slot: u16, env: &mut ConnEnv) {
        self.finish_slow_path(slot, Disposition::Check(Sense::lun_not_supported()), env);
    }

    /// The LUN table changed: tasks of a LUN that is gone (removed, or replaced by a new
    /// store) that still wait for Data-Out end now, so nothing they receive can reach the old
    /// store and `remove_lun` need not wait for the initiator; so do those still waiting for
    /// buffer memory. Tasks with I/O in flight end when it completes; the one whose data is
    /// being received straight into its buffer is failed when that PDU is in
    /// ([`Self::maybe_data_complete`] checks again).
    pub fn fence_removed_luns(&mut self, env: &mut ConnEnv) {
        let direct = self.direct.as_ref().map(|d| d.slot);
        let fenced: Vec<u16> = self
            .tasks
            .slots()
            .filter(|&(s, t)| matches!(t.stage, Stage::DataOut | Stage::WaitBuf) && !t.aborted && Some(s) != direct)
            .filter(|(_, t)| !lun_current(t, env.luns))
            .map(|(s, _)| s)
            .collect();
        for slot in fenced {
            self.fail_fenced(slot, env);
        }
    }

    /// Task management of another session reached this one (LOGICAL UNIT RESET, TARGET
    /// RESET, PREEMPT AND ABORT): its tasks on `luns` (every LUN when `None`) are aborted
    /// without a response (TAS=0; the unit attention tells the initiator), and only when
    /// this session's I_T nexus is one of `only` if given. Returns how many of them still
    /// have backing I/O in flight: with a `reply`, each acknowledges it once its I/O has ended
    /// (its write may still land until then, so the TMF's response waits for it).
    pub fn abort_foreign(
        &mut self,
        luns: Option<&[u64]>,
        only: Option<&[Arc<str>]>,
        reply: Option<crate::session::AbortReply>,
        env: &mut ConnEnv,
    ) -> u32 {
        if only.is_some_and(|ids| !ids.contains(self.nexus.identity())) {
            return 0;
        }
        let mut in_flight = 0;
        self.order.abort(|h| luns.is_none_or(|ids| lun::decode_lun(h.lun).is_some_and(|id| ids.contains(&id))));
        let direct = self.direct.as_ref().map(|d| d.slot);
        let hit: Vec<u16> = self
            .tasks
            .slots()
            .filter(|(_, t)| !t.aborted && t.stage != Stage::Sending)
            .filter(|(_, t)| luns.is_none_or(|ids| t.lun.as_ref().is_some_and(|l| ids.contains(&l.id))))
            .map(|(s, _)| s)
            .collect();
        for slot in hit {
            let task = self.tasks.get_mut(slot).expect("live task");
            if matches!(task.stage, Stage::DataOut | Stage::WaitBuf) && Some(slot) != direct {
                self.free_task(slot, env.pool);
            } else {
                // I/O in flight (or data arriving into its buffer): freed when it ends.
                task.aborted = true;
                task.abort_tmf = RESERVED_TAG;
                if task.stage == Stage::Io && reply.is_some() {
                    task.foreign_abort = reply;
                    in_flight += 1;
                }
            }
        }
        in_flight
    }

    pub(super) fn task_mgmt(&mut self, bhs: Bhs, env: &mut ConnEnv) {
        let function = bhs.tmf_function();
        let lun_id = lun::decode_lun(bhs.lun());
        let lun_exists = lun_id.is_some_and(|id| Self::luns(&self.view, env.luns).get(id).is_some());
        let mut waiting = 0;
        let response = match function {
            function::ABORT_TASK => {
                let rtt = bhs.word20();
                match self.tasks.find_itt(rtt) {
                    Some(slot) => {
                        waiting += self.abort(slot, bhs.itt(), env.pool);
                        response::COMPLETE
                    }
                    None if self.order.abort(|h| h.itt == rtt) > 0 => response::COMPLETE,
                    // RFC 7143 §11.6.1: a command not received yet (its CmdSN still inside
                    // the window) counts as received and aborted; one already completed, or
                    // outside the window, does not exist.
                    None => {
                        let ref_sn = bhs.ref_cmd_sn();
                        if pdu::sn_le(self.exp_cmd_sn, ref_sn) && pdu::sn_le(ref_sn, self.max_cmd_sn()) {
                            // A tombstone keeps its place in the CmdSN sequence.
                            self.parked.insert(ref_sn, None);
                            response::COMPLETE
                        } else {
                            response::NO_TASK
                        }
                    }
                }
            }
            function::ABORT_TASK_SET | function::CLEAR_TASK_SET | function::LOGICAL_UNIT_RESET if !lun_exists => {
                response::NO_LUN
            }
            function::ABORT_TASK_SET | function::CLEAR_TASK_SET | function::LOGICAL_UNIT_RESET => {
                let field = bhs.lun();
                let slots: Vec<u16> =
                    self.tasks.slots().filter(|(_, t)| t.lun_field == field).map(|(s, _)| s).collect();
                for s in slots {
                    waiting += self.abort(s, bhs.itt(), env.pool);
                }
                self.order.abort(|h| h.lun == field);
                if function == function::LOGICAL_UNIT_RESET {
                    if let Some(l) = lun_id.and_then(|id| Self::luns(&self.view, env.luns).get(id)) {
                        self.nexus.lun_reset(l);
                    }
                    // Every other I_T nexus's tasks on the LUN too, on every reactor; the
                    // response waits until each reactor has aborted them.
                    let luns = lun_id.map(|id| [id].into());
                    waiting += self.abort_other_nexuses(luns, false, bhs.itt(), env);
                }
                response::COMPLETE
            }
            function::TARGET_WARM_RESET | function::TARGET_COLD_RESET => {
                let slots: Vec<u16> = self.tasks.slots().map(|(s, _)| s).collect();
                for s in slots {
                    waiting += self.abort(s, bhs.itt(), env.pool);
                }
                self.order.abort(|_| true);
                self.nexus.target_reset(Self::luns(&self.view, env.luns));
                // The LUNs known to this initiator (RFC 7143 §11.5.1): its view, or all.
                let luns = self.view.as_ref().map(|v| v.iter().map(|l| l.id).collect());
                // A cold reset also ends every session of the target: the others' connections
                // close once their tasks are aborted, this one once its response is sent.
                let cold = function == function::TARGET_COLD_RESET;
                waiting += self.abort_other_nexuses(luns, cold, bhs.itt(), env);
                if cold {
                    self.close_after_send = true;
                }
                response::COMPLETE
            }
            function::TASK_REASSIGN => response::REASSIGN_UNSUPPORTED,
            function::CLEAR_ACA => response::UNSUPPORTED,
            _ => response::UNSUPPORTED,
        };
        if waiting > 0 {
            self.pending_tmfs.push(PendingTmf { itt: bhs.itt(), response, waiting });
        } else {
            self.tmf_response(bhs.itt(), response);
        }
    }

    /// Aborts a task: it sends nothing more. Returns 1 when it must still be waited for (its
    /// backing I/O or Data-In is in flight), 0 when it was freed now.
    fn abort(&mut self, slot: u16, tmf_itt: u32, pool: &mut BufPool) -> u32 {
        let task = self.tasks.get_mut(slot).expect("live task");
        if task.aborted {
            return 0; // an earlier TMF already waits for it
        }
        match task.stage {
            Stage::DataOut | Stage::WaitBuf => {
                self.free_task(slot, pool);
                0
            }
            Stage::Io | Stage::Sending => {
                task.aborted = true;
                task.abort_tmf = tmf_itt;
                1
            }
        }
    }

    /// Asks every reactor to abort the tasks other sessions have on `luns` (all LUNs when
    /// `None`), and with `close` to close their connections; returns how many
    /// acknowledgements the TMF `tmf_itt` now waits for.
    fn abort_other_nexuses(&mut self, luns: Option<Arc<[u64]>>, close: bool, tmf_itt: u32, env: &mut ConnEnv) -> u32 {
        let reply =
            crate::session::AbortReply { reactor: env.reactor, conn: self.slot, token: self.token, tmf_itt, more: 0 };
        let req = crate::session::AbortRequest { luns, only: None, except: self.token, close, reply: Some(reply) };
        env.shared.abort_tasks(req)
    }

    /// An aborted task ended, or a reactor acknowledged aborting other sessions' tasks: the
    /// TMF that waits for them may now answer.
    pub fn tmf_progress(&mut self, tmf_itt: u32) {
        let Some(i) = self.pending_tmfs.iter().position(|p| p.itt == tmf_itt) else { return };
        let p = &mut self.pending_tmfs[i];
        p.waiting -= 1;
        if p.waiting == 0 {
            let p = self.pending_tmfs.remove(i);
            self.tmf_response(p.itt, p.response);
        }
    }

    /// A reactor acknowledged aborting other sessions' tasks for the TMF `reply` names, or one
    /// of those tasks' I/O ended ([`crate::session::AbortReply::more`]).
    pub fn abort_acknowledged(&mut self, reply: &crate::session::AbortReply) {
        if let Some(p) = self.pending_tmfs.iter_mut().find(|p| p.itt == reply.tmf_itt) {
            p.waiting += reply.more;
        }
        self.tmf_progress(reply.tmf_itt);
    }

    fn tmf_response(&mut self, itt: u32, response: u8) {
        let mut b = BhsBuf::new(opcode::TASK_MGMT_RESPONSE);
        b.flags(0x80).byte(2, response).itt(itt);
        self.stamp_status(&mut b);
        self.push(b, TxData::None, None);
    }
}
