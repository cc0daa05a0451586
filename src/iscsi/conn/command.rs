//! The SCSI data path of a connection: commands, Data-Out and R2T, backing I/O, Data-In,
//! status. Task management is in [`super::tmf`].

use super::*;
use crate::iscsi::dataout::{Accepted, DataOut, DataOutError, MAX_OUTSTANDING_R2T};
use crate::iscsi::order::{self, Running};
use crate::offload::{Job, Output, Route, Work};

const SECTOR: u32 = lun::BLOCK_SIZE;

/// Bytes a task's backing operation moves. Reads fetch whole sectors (O_DIRECT) into a buffer
/// sized for them and send `xfer`; writes store only whole blocks of what arrived — when the
/// initiator sends less than the CDB describes, the partial block is not written (what
/// libiscsi's residual tests and SAM expect).
fn io_len(task: &Task) -> u32 {
    match task.action {
        Action::Read { .. } => task.xfer.next_multiple_of(SECTOR),
        Action::Write { .. } => task.xfer - task.xfer % SECTOR,
        Action::Flush | Action::SlowPath | Action::Offload { .. } => 0,
    }
}

/// Whether a task's LUN is still the one the table serves under its number.
pub(super) fn lun_current(task: &Task, luns: &LunTable) -> bool {
    task.lun.as_ref().is_none_or(|l| luns.get(l.id).is_some_and(|cur| Arc::ptr_eq(cur, l)))
}

/// What runs on a LUN (by LUN field) of the session, for task attributes.
fn running_on(tasks: &TaskTable, lun: &[u8; 8]) -> Running {
    let mut r = Running::default();
    for (_, t) in tasks.slots().filter(|(_, t)| t.lun_field == *lun) {
        r.tasks = true;
        r.ordered |= t.ordered;
    }
    r
}

/// Largest Data-In an offloaded command may return (GET LBA STATUS): the reactor's scratch.
const OFFLOAD_DATA_IN_MAX: usize = 256 * 1024;

impl Conn {
    /// A SCSI Command in CmdSN order: runs now, or is held back by its task attribute (see
    /// [`crate::iscsi::order`]); SIMPLE commands with nothing ORDERED around take one branch.
    pub(super) fn scsi_command(&mut self, bhs: Bhs, ahs: &[u8], data: &[u8], env: &mut ConnEnv) {
        let attr = bhs.bytes()[1] & 0x07;
        if attr >= order::attr::ACA {
            return self.refuse_task_attribute(bhs, env);
        }
        if attr == order::attr::ORDERED || self.ordered_live > 0 || !self.order.is_empty() {
            let lun = bhs.lun();
            if self.order.must_hold(&lun, attr, running_on(&self.tasks, &lun)) {
                let mut pdu = Vec::with_capacity(BHS_LEN + ahs.len() + data.len());
                pdu.extend_from_slice(bhs.bytes());
                pdu.extend_from_slice(ahs);
                pdu.extend_from_slice(data);
                if self.order.hold_command(lun, bhs.itt(), attr == order::attr::ORDERED, pdu).is_err() {
                    self.scsi_response(bhs.itt(), status::TASK_SET_FULL, None, Residual::None);
                }
                return;
            }
        }
        self.scsi_command_run(bhs, ahs, data, env)
    }

    /// An ACA task (or a reserved attribute, 5-7): INQUIRY reports NormACA=0, so no ACA
    /// condition is ever established and SAM-5 (8.6.5) has such a command terminated with
    /// ILLEGAL REQUEST, INVALID MESSAGE ERROR, as LIO refuses it too. Its unsolicited Data-Out,
    /// if any, is dropped like that of any ended task.
    fn refuse_task_attribute(&mut self, bhs: Bhs, env: &mut ConnEnv) {
        let lun = lun::decode_lun(bhs.lun()).and_then(|id| Self::luns(&self.view, env.luns).get(id));
        let d_sense = lun.is_some_and(|l| l.d_sense());
        let sense = Sense::new(scsi::SenseKey::IllegalRequest, 0x49, 0x00);
        self.scsi_response(bhs.itt(), status::CHECK_CONDITION, Some((&sense, d_sense)), Residual::None);
    }

    /// Runs the held commands that may run now, with their unsolicited Data-Out, in order.
    pub fn release_ordered(&mut self, env: &mut ConnEnv) {
        while std::mem::take(&mut self.order_release) && !self.closing {
            loop {
                let tasks = &self.tasks;
                let Some((cmd, outs)) = self.order.next_runnable(|lun| running_on(tasks, lun)) else { break };
                for (i, h) in std::iter::once(&cmd).chain(&outs).enumerate() {
                    let hdr: &[u8; BHS_LEN] = h.pdu[..BHS_LEN].try_into().expect("held header");
                    let b = Bhs::new(hdr);
                    let ahs_end = BHS_LEN + b.ahs_len();
                    if i == 0 {
                        self.scsi_command_run(b, &h.pdu[BHS_LEN..ahs_end], &h.pdu[ahs_end..], env);
                    } else {
                        self.data_out(b, &h.pdu[ahs_end..], env);
                    }
                }
            }
        }
    }

    /// Whether held commands wait for a check that may now let them run.
    pub fn order_release_pending(&self) -> bool {
        self.order_release
    }

    fn scsi_command_run(&mut self, bhs: Bhs, ahs: &[u8], data: &[u8], env: &mut ConnEnv) {
        let neg = self.neg.as_ref().expect("full feature phase");
        if neg.session_type == SessionType::Discovery {
            return self.reject(bhs.bytes(), reject::PROTOCOL_ERROR);
        }
        let (immediate_ok, first_burst, initial_r2t) = (neg.immediate_data, neg.first_burst_length, neg.initial_r2t);
        let itt = bhs.itt();
        let edtl = bhs.expected_data_len();
        if !data.is_empty() && (!immediate_ok || !bhs.write_bit() || data.len() as u32 > edtl.min(first_burst)) {
            return self.reject(bhs.bytes(), reject::PROTOCOL_ERROR);
        }
        let mut cdb = [0u8; MAX_CDB];
        cdb[..16].copy_from_slice(bhs.cdb());
        let mut cdb_len = 16;
        if !ahs.is_empty() {
            // Extended CDB AHS (type 1): length, type, reserved, then the CDB bytes past 16.
            let ahs_len = usize::from(u16::from_be_bytes([ahs[0], ahs[1]]));
            if ahs[2] != 1 || ahs_len < 1 || 16 + ahs_len - 1 > MAX_CDB || 4 + ahs_len - 1 > ahs.len() {
                return self.reject(bhs.bytes(), reject::INVALID_PDU_FIELD);
            }
            cdb[16..16 + ahs_len - 1].copy_from_slice(&ahs[4..4 + ahs_len - 1]);
            cdb_len += ahs_len - 1;
        }
        let req = Request {
            cdb: &cdb[..cdb_len],
            lun: lun::decode_lun(bhs.lun()),
            expected_len: edtl,
            read: bhs.read_bit(),
            write: bhs.write_bit(),
        };
        let luns = Self::luns(&self.view, env.luns);
        let disposition = scsi::execute(&req, luns, &mut self.nexus, env.scratch);
        let d_sense = req.lun.and_then(|id| luns.get(id)).is_some_and(|l| l.d_sense());
        let (action, needed) = match disposition {
            Disposition::Good => return self.scsi_response(itt, status::GOOD, None, Residual::of(edtl, 0)),
            Disposition::Status(s) => return self.scsi_response(itt, s, None, Residual::None),
            Disposition::Check(sense) => {
                return self.scsi_response(itt, status::CHECK_CONDITION, Some((&sense, d_sense)), Residual::None)
            }
            Disposition::DataIn(n) => return self.data_in_inline(itt, bhs.lun(), edtl, n, env),
            Disposition::Read { offset, len } => (Action::Read { offset }, len),
            Disposition::Write { offset, len, fua } => (Action::Write { offset, fua }, len),
            Disposition::DataOut { len } => (Action::SlowPath, len),
            Disposition::Flush => (Action::Flush, 0),
            Disposition::Offload { lock } => (Action::Offload { lock }, 0),
            // Only a command's Data-Out phase asks for this (see `finish_slow_path`).
            Disposition::AbortNexuses(_) => return self.scsi_response(itt, status::GOOD, None, Residual::of(edtl, 0)),
        };
        let is_out = matches!(action, Action::Write { .. } | Action::SlowPath);
        if needed as usize > MAX_BUF {
            let sense = Sense::invalid_field_in_cdb(0, 7);
            return self.scsi_response(itt, status::CHECK_CONDITION, Some((&sense, d_sense)), Residual::None);
        }
        if self.tasks.in_use() == self.tasks.capacity() {
            return self.scsi_response(itt, status::TASK_SET_FULL, None, Residual::None);
        }
        let xfer = needed.min(edtl);
        let lun = req.lun.and_then(|id| Self::luns(&self.view, env.luns).get(id)).map(|l| env.lun_refs.get(l));
        // A write to a RAM LUN whose data all came as immediate data completes right here,
        // copied straight from the receive buffer: no task, no buffer, no second copy.
        if let (Action::Write { offset, .. }, Some(l)) = (action, &lun) {
            let all_immediate =
                data.len() as u32 >= xfer && (initial_r2t || bhs.final_bit() || data.len() as u32 >= edtl);
            if let (Backing::Mem(m), true) = (&l.backing, all_immediate) {
                let len = xfer - xfer % SECTOR;
                m.write(offset, &data[..len as usize]);
                env.stats.record_write(l.id, xfer, env.now.elapsed());
                return self.scsi_response(itt, status::GOOD, None, Residual::of(edtl, needed));
            }
        }
        // Reads from a RAM LUN need no buffer: Data-In goes out straight from the store. Not
        // with a data digest: it is computed when the PDU is queued, and a write landing
        // before the kernel sends the bytes would make it wrong, so those reads copy first.
        let from_ram = !self.data_digest
            && matches!((action, &lun), (Action::Read { .. }, Some(l)) if matches!(l.backing, Backing::Mem(_)));
        // Unsolicited data: immediate data, then (InitialR2T=No) Data-Out up to FirstBurstLength.
        // F=1 on the command says no unsolicited Data-Out follows its immediate data.
        let unsolicited = if initial_r2t || bhs.final_bit() { data.len() as u32 } else { edtl.min(first_burst) };
        // The buffer comes out of the reactor's budget now, when it is needed. Without room, a
        // command that has not started moving data waits in order; one whose data is already
        // arriving has nowhere to put it and is answered TASK SET FULL (the initiator retries;
        // the rest of its unsolicited Data-Out is dropped as data for an unknown task).
        let needs_buf = xfer > 0 && !from_ram;
        let mut buf = None;
        if needs_buf {
            buf = self.take_buf(xfer, false, env.pool).ok();
            if buf.is_none() && is_out && unsolicited > 0 {
                env.pool.refused();
                self.log_buffers_spent(env.pool, "answering TASK SET FULL");
                return self.scsi_response(itt, status::TASK_SET_FULL, None, Residual::None);
            }
        }
        let wait = needs_buf && buf.is_none();
        let mut task = Task::new(env.now);
        task.itt = itt;
        task.lun_field = bhs.lun();
        task.lun = lun;
        task.cdb = cdb;
        task.cdb_len = cdb_len as u8;
        task.expected_len = edtl;
        task.read_bit = req.read;
        task.write_bit = req.write;
        task.action = action;
        task.needed = needed;
        task.xfer = xfer;
        task.ordered = bhs.bytes()[1] & 0x07 == order::attr::ORDERED;
        task.immediate = bhs.immediate();
        self.outside_window += u32::from(task.immediate);
        self.ordered_live += u32::from(task.ordered);
        task.charged = buf.as_ref().map_or(0, |b| b.len() as u32);
        task.buf = buf;
        if is_out {
            task.dout = DataOut::new(data.len() as u32, unsolicited, unsolicited.max(xfer));
            task.r2t_next = unsolicited.min(xfer);
            task.stage = Stage::DataOut;
        }
        if wait {
            task.stage = Stage::WaitBuf;
        }
        let slot = self.tasks.insert(task).expect("a free slot was checked for");
        if wait {
            self.buf_wait.push_back(slot);
            env.pool.wait();
            self.log_buffers_spent(env.pool, "commands wait for buffers in order");
        } else if is_out {
            if !data.is_empty() {
                self.store_data_out(slot, 0, data);
            }
            self.send_r2ts(slot);
            self.maybe_data_complete(slot, env);
        } else {
            self.start_io(slot, env);
        }
    }

    /// Logs, once per connection, that the reactor's buffer budget is spent.
    fn log_buffers_spent(&mut self, pool: &BufPool, what: &str) {
        if self.limits_logged & limit::BUFFERS == 0 {
            self.limits_logged |= limit::BUFFERS;
            log::warn!(
                "{}: no buffer memory for a command (limits.buffer_memory_mib: {} MiB per reactor, a quarter \
                 of it per connection): {what}",
                self.peer,
                pool.stats().limit >> 20
            );
        }
    }

    /// Tasks waiting for buffer memory.
    pub fn waits_for_buffers(&self) -> bool {
        !self.buf_wait.is_empty()
    }

    /// A buffer for a task moving `xfer` bytes, within this connection's share of the budget
    /// and what the budget has left (`queued`: for a task that waited, see [`BufPool::take`]).
    /// Without one, says which limit stands in the way.
    fn take_buf(&mut self, xfer: u32, queued: bool, pool: &mut BufPool) -> Result<AlignedBuf, Grant> {
        let len = (xfer as usize).next_multiple_of(SECTOR as usize);
        let size = BufPool::charge_for(len);
        if !pool.fits(size) {
            return Err(Grant::Budget);
        }
        if self.buf_charged + size > pool.share() {
            return Err(Grant::OwnShare);
        }
        // Room in both, but `take` still refuses a new command while others wait.
        let buf = pool.take(len, queued).ok_or(Grant::Budget)?;
        self.buf_charged += buf.len();
        Ok(buf)
    }

    /// Gives waiting tasks their buffers, oldest first, while this connection's share and the
    /// reactor's budget have room, and starts them (R2Ts for writes, the read for reads).
    pub fn grant_buffers(&mut self, env: &mut ConnEnv) -> Grant {
        while let Some(&slot) = self.buf_wait.front() {
            let xfer = self.tasks.get(slot).expect("waiting tasks are live").xfer;
            let buf = match self.take_buf(xfer, true, env.pool) {
                Ok(buf) => buf,
                Err(left) => return left,
            };
            self.buf_wait.pop_front();
            env.pool.unwait();
            let task = self.tasks.get_mut(slot).expect("waiting tasks are live");
            task.charged = buf.len() as u32;
            task.buf = Some(buf);
            // The Data-Out timeout counts from the first R2T, not from the command.
            task.last_data = env.now;
            if matches!(task.action, Action::Write { .. } | Action::SlowPath) {
                task.stage = Stage::DataOut;
                self.send_r2ts(slot);
                self.maybe_data_complete(slot, env);
            } else {
                self.start_io(slot, env);
            }
        }
        Grant::Done
    }

    /// Sends Data-In from the scratch buffer (commands answered in place), with status.
    fn data_in_inline(&mut self, itt: u32, lun_field: [u8; 8], edtl: u32, n: usize, env: &mut ConnEnv) {
        let send = (n as u32).min(edtl);
        let residual = Residual::of(edtl, n as u32);
        if send == 0 {
            return self.scsi_response(itt, status::GOOD, None, residual);
        }
        let data = &env.scratch[..send as usize];
        self.queue_data_in(itt, lun_field, send, residual, None, |off, len| {
            TxData::Inline(data[off as usize..(off + len) as usize].to_vec())
        });
    }

    /// Copies accepted Data-Out bytes into the task's buffer; bytes past what the command
    /// needs are dropped (the initiator may send up to its Expected Data Transfer Length).
    fn store_data_out(&mut self, slot: u16, offset: u32, data: &[u8]) {
        let task = self.tasks.get_mut(slot).expect("live task");
        if offset >= task.xfer {
            return;
        }
        let n = (data.len() as u32).min(task.xfer - offset) as usize;
        let buf = task.buf.as_mut().expect("a task receiving data has a buffer");
        buf[offset as usize..offset as usize + n].copy_from_slice(&data[..n]);
    }

    /// Solicits the rest of a task's data, within MaxBurstLength and MaxOutstandingR2T.
    fn send_r2ts(&mut self, slot: u16) {
        let neg = self.neg.as_ref().expect("full feature phase");
        let (max_burst, max_r2t) = (neg.max_burst_length, neg.max_outstanding_r2t.clamp(1, MAX_OUTSTANDING_R2T));
        loop {
            let task = self.tasks.get_mut(slot).expect("live task");
            if task.aborted || task.dout.is_failed() || task.r2t_next >= task.xfer || task.dout.outstanding() >= max_r2t
            {
                return;
            }
            let offset = task.r2t_next;
            let len = (task.xfer - offset).min(max_burst);
            let r2t_sn = task.r2t_sn;
            let Some(ttt) = task.dout.open_r2t(slot, r2t_sn, offset, len) else { return };
            task.r2t_next += len;
            task.r2t_sn += 1;
            let (itt, lun_field) = (task.itt, task.lun_field);
            let mut b = BhsBuf::new(opcode::R2T);
            b.flags(0x80).lun(lun_field).itt(itt).ttt(ttt);
            b.stat_sn(self.stat_sn).exp_cmd_sn(self.exp_cmd_sn).max_cmd_sn(self.max_cmd_sn());
            b.sn36(r2t_sn).buffer_offset(offset).word44(len);
            self.push(b, TxData::None, None);
        }
    }

    /// Where a Data-Out's segment would land when it is the next PDU its sequence expects and
    /// lies wholly inside the task's buffer; None sends the PDU down the normal path (which
    /// answers whatever is wrong with it).
    pub(super) fn data_out_dst(&mut self, bhs: &Bhs, len: u32) -> Option<(u16, *mut u8)> {
        let slot = self.data_out_slot(bhs)?;
        let task = self.tasks.get_mut(slot).expect("found above");
        let offset = bhs.buffer_offset();
        if task.stage != Stage::DataOut || u64::from(offset) + u64::from(len) > u64::from(task.xfer) {
            return None;
        }
        task.dout.check(bhs.ttt(), bhs.data_sn(), offset, len, bhs.final_bit()).ok()?;
        let buf = task.buf.as_mut()?;
        // SAFETY: offset + len <= xfer <= the buffer's length.
        Some((slot, unsafe { buf.as_mut_ptr().add(offset as usize) }))
    }

    /// A Data-Out whose segment was received straight into the task's buffer: the sequence
    /// bookkeeping of [`Self::data_out`] without the copy.
    pub(super) fn data_out_in_place(&mut self, bhs: Bhs, slot: u16, len: u32, env: &mut ConnEnv) {
        let task = self.tasks.get_mut(slot).expect("a direct receive's task lives until it ends");
        // Checked by data_out_dst, and nothing of this connection ran in between.
        let aborted = task.aborted;
        match task.dout.accept(bhs.ttt(), bhs.data_sn(), bhs.buffer_offset(), len, bhs.final_bit()) {
            // Aborted from another connection while its data was arriving: the buffer could
            // not be freed under the receive; it can now.
            Ok(_) if aborted => self.free_task(slot, env.pool),
            Ok(a) => {
                task.last_data = env.now;
                self.data_out_sequence_end(slot, a, env)
            }
            Err(e) => self.protocol_error_close(bhs.bytes(), &e),
        }
    }

    /// The live task a Data-Out belongs to: by ITT for unsolicited data, else by the slot in
    /// its Target Transfer Tag (which must still hold that ITT).
    fn data_out_slot(&self, bhs: &Bhs) -> Option<u16> {
        let ttt = bhs.ttt();
        if ttt == RESERVED_TAG {
            return self.tasks.find_itt(bhs.itt());
        }
        let slot = (ttt & 0xFFFF) as u16;
        self.tasks.get(slot).filter(|t| t.itt == bhs.itt() && !t.aborted).map(|_| slot)
    }

    /// A Data-Out PDU: accepted only as the next PDU of one of its task's sequences (see
    /// [`crate::iscsi::dataout`]); anything else is a protocol error that ends the connection,
    /// so a write never starts with a byte that did not come from its command.
    pub(super) fn data_out(&mut self, bhs: Bhs, data: &[u8], env: &mut ConnEnv) {
        let Some(slot) = self.data_out_slot(&bhs) else {
            if bhs.ttt() == RESERVED_TAG && !self.order.is_empty() {
                let mut pdu = bhs.bytes().to_vec();
                pdu.extend_from_slice(data);
                if self.order.hold_data_out(bhs.itt(), &pdu) {
                    return; // unsolicited data of a held command: it follows the command
                }
            }
            // Data for a task that already ended (refused, aborted): drop it.
            log::debug!("{}: Data-Out for unknown task {:#x}", self.peer, bhs.itt());
            return;
        };
        let task = self.tasks.get_mut(slot).expect("found above");
        let offset = bhs.buffer_offset();
        let checked = if task.stage == Stage::DataOut {
            task.dout.check(bhs.ttt(), bhs.data_sn(), offset, data.len() as u32, bhs.final_bit())
        } else {
            Err(DataOutError::AfterComplete)
        };
        match checked {
            Ok(a) => {
                self.store_data_out(slot, offset, data);
                let task = self.tasks.get_mut(slot).expect("found above");
                task.dout.commit(a);
                task.last_data = env.now;
                self.data_out_sequence_end(slot, a, env);
            }
            Err(e @ DataOutError::DataSn { .. }) => {
                // A lost PDU (RFC 7143 §7.9): ERL 0 cannot ask for it again, so the command
                // fails once its sequences in progress have ended (§7.8).
                task.dout.abandon(bhs.ttt(), bhs.final_bit());
                self.protocol_error(&format_args!("ITT {:#x}: {e}", bhs.itt()));
                self.maybe_failed_data_settled(slot, env);
            }
            Err(DataOutError::Failed) => match task.dout.drain(bhs.ttt(), bhs.final_bit()) {
                // Data of a failed command: dropped, only its F bit counts.
                Ok(()) => self.maybe_failed_data_settled(slot, env),
                Err(e) => self.protocol_error_close(bhs.bytes(), &e),
            },
            Err(e) => self.protocol_error_close(bhs.bytes(), &e),
        }
    }

    /// Aborts the commands whose Data-Out made no progress for `limits.dataout_timeout_secs`:
    /// CHECK CONDITION, ABORTED COMMAND, INITIATOR RESPONSE TIMEOUT; later Data-Out for them
    /// is dropped as data for an unknown task. A peer stalled in the middle of a PDU received
    /// straight into a task's buffer loses the connection instead (the buffer is the kernel's
    /// until that receive completes).
    pub(super) fn dataout_timeouts(&mut self, now: Instant, pool: &mut BufPool) {
        let timeout = self.dataout_timeout;
        let expired: Vec<u16> = self
            .tasks
            .slots()
            .filter(|(_, t)| {
                t.stage == Stage::DataOut && !t.aborted && now.saturating_duration_since(t.last_data) > timeout
            })
            .map(|(s, _)| s)
            .collect();
        if expired.is_empty() {
            return;
        }
        if self.limits_logged & limit::DATA_OUT_TIMEOUT == 0 {
            self.limits_logged |= limit::DATA_OUT_TIMEOUT;
            log::warn!(
                "{}: no Data-Out for {timeout:?} (limits.dataout_timeout_secs): aborting the command",
                self.peer
            );
        }
        for slot in expired {
            if self.direct.as_ref().is_some_and(|d| d.slot == slot) {
                return self.close("Data-Out stalled in the middle of a PDU");
            }
            let task = self.tasks.get(slot).expect("listed above");
            let (itt, r2ts, d_sense) = (task.itt, task.r2t_sn, task.lun.as_ref().is_some_and(|l| l.d_sense()));
            self.free_task(slot, pool);
            let sense = Sense::aborted_command(0x4B, 0x06);
            self.scsi_response_after(itt, status::CHECK_CONDITION, Some((&sense, d_sense)), Residual::None, r2ts);
        }
    }

    /// A command failed by a DataSN error is answered once no Data-Out sequence of it is in
    /// progress: CHECK CONDITION, ABORTED COMMAND, PROTOCOL SERVICE CRC ERROR (RFC 7143
    /// §11.4.7.2). Its data is never written.
    fn maybe_failed_data_settled(&mut self, slot: u16, env: &mut ConnEnv) {
        let task = self.tasks.get(slot).expect("live task");
        if !task.dout.is_settled() {
            return;
        }
        let (itt, r2ts, d_sense) = (task.itt, task.r2t_sn, task.lun.as_ref().is_some_and(|l| l.d_sense()));
        self.free_task(slot, env.pool);
        let sense = Sense::aborted_command(0x47, 0x05);
        self.scsi_response_after(itt, status::CHECK_CONDITION, Some((&sense, d_sense)), Residual::None, r2ts);
    }

    /// After a Data-Out's data is in: the end of an R2T's sequence frees room for the next
    /// R2T, and the last byte starts the write.
    fn data_out_sequence_end(&mut self, slot: u16, a: Accepted, env: &mut ConnEnv) {
        if a.solicited && a.seq_done {
            self.send_r2ts(slot);
        }
        self.maybe_data_complete(slot, env);
    }

    /// Once all Data-Out is in, runs the write or the slow-path command.
    fn maybe_data_complete(&mut self, slot: u16, env: &mut ConnEnv) {
        let task = self.tasks.get(slot).expect("live task");
        if task.stage != Stage::DataOut || !task.dout.is_complete() {
            return;
        }
        if !lun_current(task, env.luns) {
            // The LUN was removed or replaced while the data came: the old store is fenced.
            return self.fail_fenced(slot, env);
        }
        if task.action == Action::SlowPath {
            return self.slow_path(slot, env);
        }
        self.start_io(slot, env);
    }

    fn slow_path(&mut self, slot: u16, env: &mut ConnEnv) {
        let task = self.tasks.get(slot).expect("live task");
        let req = Request {
            cdb: task.cdb(),
            lun: lun::decode_lun(task.lun_field),
            expected_len: task.expected_len,
            read: task.read_bit,
            write: task.write_bit,
        };
        let data_out: &[u8] = task.buf.as_ref().map_or(&[], |b| &b[..task.xfer as usize]);
        let luns = Self::luns(&self.view, env.luns);
        let disposition = scsi::execute_data_out(&req, luns, &mut self.nexus, data_out, env.scratch);
        if let Disposition::Offload { lock } = disposition {
            // Checked; the work itself (backing I/O) runs on a worker.
            let task = self.tasks.get_mut(slot).expect("live task");
            task.action = Action::Offload { lock };
            return self.start_io(slot, env);
        }
        self.finish_slow_path(slot, disposition, env);
    }

    /// Answers a slow-path command with its disposition and frees its task.
    pub(super) fn finish_slow_path(&mut self, slot: u16, disposition: Disposition, env: &mut ConnEnv) {
        let task = self.tasks.get(slot).expect("live task");
        if let Disposition::AbortNexuses(ids) = &disposition {
            let luns = task.lun.as_ref().map(|l| [l.id].into());
            let only = Some(ids.clone().into());
            let req = crate::session::AbortRequest { luns, only, except: self.token, close: false, reply: None };
            env.shared.abort_tasks(req);
        }
        let (itt, lun_field, edtl, needed) = (task.itt, task.lun_field, task.expected_len, task.needed);
        let (d_sense, r2ts) = (task.lun.as_ref().is_some_and(|l| l.d_sense()), task.r2t_sn);
        self.free_task(slot, env.pool);
        match disposition {
            Disposition::DataIn(n) => self.data_in_inline(itt, lun_field, edtl, n, env),
            Disposition::Check(sense) => {
                self.scsi_response_after(itt, status::CHECK_CONDITION, Some((&sense, d_sense)), Residual::None, r2ts)
            }
            Disposition::Status(s) => self.scsi_response_after(itt, s, None, Residual::None, r2ts),
            other => {
                debug_assert!(
                    matches!(other, Disposition::Good | Disposition::AbortNexuses(_)),
                    "slow path returned {other:?}"
                );
                self.scsi_response_after(itt, status::GOOD, None, Residual::of(edtl, needed), r2ts)
            }
        }
    }

    /// Starts the backing-store operation of a task: RAM stores complete in place, files go
    /// to the reactor's ring.
    fn start_io(&mut self, slot: u16, env: &mut ConnEnv) {
        let task = self.tasks.get_mut(slot).expect("live task");
        task.stage = Stage::Io;
        if let Action::Read { .. } = task.action {
            task.tx_reserved = task.xfer;
            self.tx_reserved += task.xfer as usize;
        }
        let Some(lun) = task.lun.clone() else {
            unreachable!("I/O dispositions come only for existing LUNs");
        };
        let len = io_len(task);
        let kind = match task.action {
            Action::Offload { lock } => return self.offload(slot, lock, env),
            Action::Read { .. } | Action::Write { .. } if len == 0 => return self.io_finished(slot, 0, env),
            Action::Read { .. } => IoKind::Read,
            Action::Write { fua, .. } => IoKind::Write { dsync: fua || !lun.write_cache() },
            Action::Flush => IoKind::Flush,
            Action::SlowPath => unreachable!("slow path runs synchronously"),
        };
        let offset = match task.action {
            Action::Read { offset } | Action::Write { offset, .. } => offset,
            _ => 0,
        };
        match &lun.backing {
            Backing::Mem(m) => {
                match (kind, task.buf.as_mut()) {
                    (IoKind::Write { .. }, buf) => m.write(offset, &buf.expect("buffer")[..len as usize]),
                    // A copy for a digested Data-In (see `scsi_command`).
                    (IoKind::Read, Some(buf)) => m.read(offset, &mut buf[..len as usize]),
                    _ => {}
                }
                self.io_finished(slot, len as i32, env);
            }
            Backing::File(f) => {
                let buf = task.buf.as_mut().map_or(std::ptr::null_mut(), |b| b.as_mut_ptr());
                env.io.push(IoReq { task: slot, kind, fd: f.fd(), buf, len, offset });
                self.work_inflight += 1;
            }
        }
    }

    /// Hands a task's work to the offload pool; its completion comes back through
    /// [`Conn::offload_done`]. The task (and the connection) stay alive until then, like a
    /// task with ring I/O in flight.
    fn offload(&mut self, slot: u16, lock: Option<crate::offload::LbaRange>, env: &mut ConnEnv) {
        let task = self.tasks.get_mut(slot).expect("live task");
        // The worker thread needs the shared `Arc` (the task's `LunRef` stays on this reactor).
        let lun = Arc::clone(task.lun.as_deref().expect("offloaded commands run on an existing LUN"));
        let (cdb, cdb_len, expected_len) = (task.cdb, usize::from(task.cdb_len), task.expected_len);
        let (read, write, xfer) = (task.read_bit, task.write_bit, task.xfer as usize);
        let buf = task.buf.take();
        let route = Route { reactor: env.reactor, conn: self.slot, task: slot };
        let lock = lock.map(|r| (lun.ranges.clone(), r));
        let work: Work = Box::new(move || {
            let req = Request { cdb: &cdb[..cdb_len], lun: Some(lun.id), expected_len, read, write };
            let data_out = buf.as_ref().map_or(&[][..], |b| &b[..xfer]);
            // Sized by the EDTL when the initiator reads; at least 64 bytes whatever its R
            // bit says, as the inline path's scratch serves a Data-In command whatever its R
            // bit (GET LBA STATUS without R crashed the target here: fuzz target `pdu`).
            let len = if read { (expected_len as usize).clamp(64, OFFLOAD_DATA_IN_MAX) } else { 64 };
            let mut data_in = vec![0u8; len];
            let disposition = scsi::execute_offloaded(&req, &lun, data_out, &mut data_in);
            match disposition {
                Disposition::DataIn(n) => data_in.truncate(n),
                _ => data_in.clear(),
            }
            Output { disposition, data_in, buf }
        });
        match env.shared.offload().submit(Job { route, lock, work }) {
            Ok(()) => self.work_inflight += 1,
            Err(e) => {
                log::info!("{}: {e}: BUSY", self.peer);
                self.finish_slow_path(slot, Disposition::Status(status::BUSY), env);
            }
        }
    }

    /// An offloaded job of task `slot` finished.
    pub fn offload_done(&mut self, slot: u16, out: Output, env: &mut ConnEnv) {
        self.work_inflight -= 1;
        let task = self.tasks.get_mut(slot).expect("offloaded work completes for a live task");
        if let Some(b) = out.buf {
            task.buf = Some(b); // recycled by free_task
        }
        if task.aborted || self.closing {
            return self.free_ended(slot, env);
        }
        if let Disposition::DataIn(n) = out.disposition {
            let n = n.min(out.data_in.len()).min(env.scratch.len());
            env.scratch[..n].copy_from_slice(&out.data_in[..n]);
        }
        self.finish_slow_path(slot, out.disposition, env);
    }

    /// A backing-store operation ([`IoReq`]) finished with `res` (bytes, or a negative errno).
    pub fn io_done(&mut self, slot: u16, res: i32, env: &mut ConnEnv) {
        self.work_inflight -= 1;
        self.io_finished(slot, res, env)
    }

    /// A task's backing work finished: on the ring, or in place (RAM, nothing to move).
    fn io_finished(&mut self, slot: u16, res: i32, env: &mut ConnEnv) {
        let task = self.tasks.get(slot).expect("I/O completes for a live task");
        if task.aborted || self.closing {
            return self.free_ended(slot, env);
        }
        let (itt, edtl, needed, xfer, lun_field) =
            (task.itt, task.expected_len, task.needed, task.xfer, task.lun_field);
        let (d_sense, r2ts) = (task.lun.as_ref().is_some_and(|l| l.d_sense()), task.r2t_sn);
        let action = task.action;
        if res < 0 || (res as u32) < io_len(task) {
            let err = if res < 0 {
                std::io::Error::from_raw_os_error(-res)
            } else {
                std::io::ErrorKind::UnexpectedEof.into()
            };
            log::warn!("{}: backing {:?} failed: {err}", self.peer, action);
            self.free_task(slot, env.pool);
            let sense = if matches!(action, Action::Read { .. }) { Sense::read_error() } else { Sense::write_error() };
            let residual = Residual::None;
            return self.scsi_response_after(itt, status::CHECK_CONDITION, Some((&sense, d_sense)), residual, r2ts);
        }
        if let Some(lun) = &task.lun {
            let latency = env.now.saturating_duration_since(task.started);
            match action {
                Action::Read { .. } => env.stats.record_read(lun.id, xfer, latency),
                Action::Write { .. } => env.stats.record_write(lun.id, xfer, latency),
                _ => {}
            }
        }
        match action {
            Action::Read { .. } if xfer > 0 => self.send_read_data(slot, lun_field, itt, edtl, needed, xfer),
            _ => {
                self.free_task(slot, env.pool);
                self.scsi_response_after(itt, status::GOOD, None, Residual::of(edtl, needed), r2ts);
            }
        }
    }

    /// Queues a read's Data-In PDUs straight from the task buffer, status in the last one.
    fn send_read_data(&mut self, slot: u16, lun_field: [u8; 8], itt: u32, edtl: u32, needed: u32, xfer: u32) {
        let task = self.tasks.get_mut(slot).expect("live task");
        task.stage = Stage::Sending;
        // Its status is about to be queued: the command is done for the CmdSN window, so that
        // status already tells the initiator it may send another (a window of one would
        // otherwise stay shut until the next NOP-In).
        self.outside_window += u32::from(!task.immediate);
        // From here the Data-In counts in the transmit queue itself.
        self.tx_reserved -= std::mem::take(&mut task.tx_reserved) as usize;
        let base = match (&task.buf, &task.lun, task.action) {
            (Some(buf), _, _) => buf.as_ptr(),
            (None, Some(lun), Action::Read { offset }) => match &lun.backing {
                Backing::Mem(m) => m.ptr_at(offset, xfer as usize),
                Backing::File(_) => unreachable!("file reads land in the task buffer"),
            },
            _ => unreachable!("a read task has a buffer or a RAM LUN"),
        };
        let residual = Residual::of(edtl, needed);
        self.queue_data_in(itt, lun_field, xfer, residual, Some(slot), |off, len| {
            // SAFETY: off + len <= xfer <= the buffer's (or the RAM range's) length; the task,
            // its buffer and its Arc<Lun> (so the RAM store) live until the last of these
            // PDUs is sent (`release`).
            TxData::Task { ptr: unsafe { base.add(off as usize) }, len }
        });
    }

    /// Queues `total` bytes as Data-In PDUs no larger than the initiator's
    /// MaxRecvDataSegmentLength, F at the end of each MaxBurstLength sequence, and the status
    /// (GOOD, with residuals) in the last one. `release` frees that task once it is sent.
    fn queue_data_in(
        &mut self,
        itt: u32,
        lun_field: [u8; 8],
        total: u32,
        residual: Residual,
        release: Option<u16>,
        mut data: impl FnMut(u32, u32) -> TxData,
    ) {
        let neg = self.neg.as_ref().expect("full feature phase");
        let (max_pdu, max_burst) = (neg.max_xmit_data_segment_length, neg.max_burst_length);
        let mut offset = 0u32;
        let mut data_sn = 0u32;
        while offset < total {
            let burst_left = max_burst - offset % max_burst;
            let len = (total - offset).min(max_pdu).min(burst_left);
            let last = offset + len == total;
            let mut b = BhsBuf::new(opcode::DATA_IN);
            b.lun(lun_field).itt(itt).ttt(RESERVED_TAG).sn36(data_sn).buffer_offset(offset);
            if last {
                b.flags(0x80 | 0x01 | residual.flags()).byte(3, status::GOOD).word44(residual.count());
                self.stamp_status(&mut b);
            } else {
                b.flags(if len == burst_left { 0x80 } else { 0 });
                b.exp_cmd_sn(self.exp_cmd_sn).max_cmd_sn(self.max_cmd_sn());
            }
            self.push(b, data(offset, len), if last { release } else { None });
            offset += len;
            data_sn += 1;
        }
    }

    /// Frees a task whose backing work ended after it was aborted (or its connection closed);
    /// another session's TMF that aborted it learns its I/O can no longer land.
    fn free_ended(&mut self, slot: u16, env: &mut ConnEnv) {
        let reply = self.tasks.get_mut(slot).and_then(|t| t.foreign_abort.take());
        self.free_task(slot, env.pool);
        if let Some(r) = reply {
            env.shared.abort_done(r);
        }
    }

    /// The last PDU of a task went out: free it.
    pub fn release_sent(&mut self, slot: u16, pool: &mut BufPool) {
        self.free_task(slot, pool);
    }

    /// Frees a task and recycles its buffer; an aborted task's end may complete a pending
    /// task management response.
    pub(super) fn free_task(&mut self, slot: u16, pool: &mut BufPool) {
        if let Some(mut t) = self.tasks.remove(slot) {
            self.tx_reserved -= t.tx_reserved as usize;
            self.ordered_live -= u32::from(t.ordered);
            self.outside_window -= u32::from(t.immediate || t.stage == Stage::Sending);
            // Run held commands from a safe point (the reactor's `after_events`), not here.
            self.order_release |= !self.order.is_empty();
            if t.stage == Stage::WaitBuf {
                if let Some(i) = self.buf_wait.iter().position(|&s| s == slot) {
                    self.buf_wait.remove(i);
                }
                pool.unwait();
            }
            self.buf_charged -= t.charged as usize;
            pool.give_back(t.buf.take(), t.charged as usize);
            if t.aborted {
                self.tmf_progress(t.abort_tmf);
            }
        }
    }
}
