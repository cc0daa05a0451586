//! Unit tests of the connection engine with no ring and no socket.
//!
//! A [`Rig`] plays the reactor for one or more [`Conn`]s: it feeds them whole PDUs through
//! `rx_space`/`on_recv`, gathers what their transmit queues send (the iovecs of each
//! `prepare()`d msghdr, as a completed `sendmsg` would have taken them) and parses it back into
//! [`Pdu`]s, holds the file LUN's backing I/O ([`IoReq`]s) until a test completes it — in any
//! order, at any time: the slow store — and delivers what [`Shared`] sends to its one reactor
//! (closing a reinstated session's connection, aborts across sessions, the release of a fenced
//! login) the way `reactor::Reactor` does. Time is the rig's `now`, moved by the tests.
//!
//! The initiator side is built here from the crate's [`BhsBuf`] where request and response
//! share a field's offset, and at byte offsets (RFC 7143 §11) where they do not.

mod budget;
mod cmdsn;
mod dataout;
mod ping;
mod r2t;
mod reinstate;
mod tmf;
mod window;

use super::conn::{Conn, ConnEnv, Grant, IoKind, IoReq};
use super::stats::Stats;
use crate::backing::pool::BufPool;
use crate::backing::Backing;
use crate::config::ConnLimits;
use crate::protocol::login::LoginConfig;
use crate::protocol::pdu::{opcode, pad_len, Bhs, BhsBuf, BHS_LEN, RESERVED_TAG};
use crate::protocol::text;
use crate::scsi::{lun, status, Lun, LunRefs, LunTable};
use crate::session::{AbortReply, Mailbox, Msg, Shared, Waker};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

const TARGET: &str = "iqn.2024-06.dev.uringtgt:unit";
const INITIATOR: &str = "iqn.2024-06.dev.uringtgt:unit-initiator";
/// A RAM LUN: its I/O completes in place.
const RAM_LUN: u64 = 0;
/// A LUN on a temporary file: its I/O leaves as [`IoReq`]s the test completes.
const FILE_LUN: u64 = 1;
const BS: u32 = 512;
const LUN_BYTES: u64 = 8 << 20;
const ISID_A: [u8; 6] = [0x40, 0, 0, 0, 0, 0xA];
const ISID_B: [u8; 6] = [0x40, 0, 0, 0, 0, 0xB];

/// Task management functions (RFC 7143 §11.5.1) and responses (§11.6.1).
const ABORT_TASK: u8 = 1;
const LOGICAL_UNIT_RESET: u8 = 5;
const TMF_COMPLETE: u8 = 0;

fn put_u32(b: &mut [u8; BHS_LEN], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

fn get_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// A PDU the target sent.
#[derive(Clone)]
struct Pdu {
    bhs: [u8; BHS_LEN],
    data: Vec<u8>,
}

impl Pdu {
    fn bhs(&self) -> Bhs<'_> {
        Bhs::new(&self.bhs)
    }
    fn opcode(&self) -> u8 {
        self.bhs().opcode()
    }
    fn itt(&self) -> u32 {
        self.bhs().itt()
    }
    fn ttt(&self) -> u32 {
        self.bhs().ttt()
    }
    fn stat_sn(&self) -> u32 {
        get_u32(&self.bhs, 24)
    }
    fn exp_cmd_sn(&self) -> u32 {
        get_u32(&self.bhs, 28)
    }
    fn max_cmd_sn(&self) -> u32 {
        get_u32(&self.bhs, 32)
    }
    /// DataSN (Data-In), R2TSN (R2T), ExpDataSN (SCSI Response).
    fn sn36(&self) -> u32 {
        get_u32(&self.bhs, 36)
    }
    fn buffer_offset(&self) -> u32 {
        get_u32(&self.bhs, 40)
    }
    /// Desired Data Transfer Length (R2T), Residual Count (responses).
    fn word44(&self) -> u32 {
        get_u32(&self.bhs, 44)
    }
    /// SCSI status (SCSI Response, Data-In with S).
    fn status(&self) -> u8 {
        self.bhs[3]
    }
    /// Response (SCSI Response, TMF Response), reason (Reject).
    fn response(&self) -> u8 {
        self.bhs[2]
    }
    fn has_status(&self) -> bool {
        self.opcode() == opcode::SCSI_RESPONSE || (self.opcode() == opcode::DATA_IN && self.bhs[1] & 0x01 != 0)
    }
    /// Sense key, ASC and ASCQ of a SCSI Response's fixed-format sense data.
    fn sense(&self) -> (u8, u8, u8) {
        assert_eq!(self.opcode(), opcode::SCSI_RESPONSE, "sense comes in a SCSI Response");
        let s = &self.data[2..];
        (s[2] & 0x0F, s[12], s[13])
    }
}

/// What an initiator offers at login (answers are the lower/AND/OR of both sides).
#[derive(Clone, Copy)]
struct Keys {
    initial_r2t: bool,
    immediate_data: bool,
    max_outstanding_r2t: u32,
    max_burst: u32,
    first_burst: u32,
}

impl Default for Keys {
    fn default() -> Self {
        Keys {
            initial_r2t: true,
            immediate_data: true,
            max_outstanding_r2t: 1,
            max_burst: 256 << 10,
            first_burst: 64 << 10,
        }
    }
}

/// InitialR2T=Yes, ImmediateData=No: every byte of a write is solicited by an R2T.
fn solicited_only() -> Keys {
    Keys { initial_r2t: true, immediate_data: false, ..Keys::default() }
}

fn login_pdu(isid: [u8; 6], itt: u32, cmd_sn: u32, keys: &Keys) -> ([u8; BHS_LEN], Vec<u8>) {
    let yn = |b: bool| if b { "Yes" } else { "No" };
    let (r2t, burst, first) =
        (keys.max_outstanding_r2t.to_string(), keys.max_burst.to_string(), keys.first_burst.to_string());
    let pairs = [
        ("InitiatorName", INITIATOR),
        ("TargetName", TARGET),
        ("SessionType", "Normal"),
        ("HeaderDigest", "None"),
        ("DataDigest", "None"),
        ("ErrorRecoveryLevel", "0"),
        ("InitialR2T", yn(keys.initial_r2t)),
        ("ImmediateData", yn(keys.immediate_data)),
        ("MaxOutstandingR2T", &r2t),
        ("MaxBurstLength", &burst),
        ("FirstBurstLength", &first),
        ("MaxRecvDataSegmentLength", "65536"),
        ("DataPDUInOrder", "Yes"),
        ("DataSequenceInOrder", "Yes"),
        ("MaxConnections", "1"),
    ];
    let data = text::encode(&pairs).expect("valid keys");
    // T=1, CSG=1 (operational), NSG=3 (full feature): no security phase without CHAP.
    let mut b = BhsBuf::new(opcode::LOGIN_REQUEST | 0x40);
    b.flags(0x80 | (1 << 2) | 3).itt(itt).data_len(data.len() as u32);
    let mut b = b.0;
    b[8..14].copy_from_slice(&isid);
    put_u32(&mut b, 24, cmd_sn);
    (b, data)
}

/// Data transfer direction of a SCSI Command (its R and W bits).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Dir {
    None,
    Read,
    Write,
}

/// A SCSI Command BHS, SIMPLE task attribute; F set unless unsolicited Data-Out follows.
fn command(itt: u32, cmd_sn: u32, lun: u64, cdb: &[u8], edtl: u32, dir: Dir, final_bit: bool) -> [u8; BHS_LEN] {
    let rw = match dir {
        Dir::None => 0,
        Dir::Read => 0x40,
        Dir::Write => 0x20,
    };
    let mut b = BhsBuf::new(opcode::SCSI_COMMAND);
    b.flags(if final_bit { 0x80 } else { 0 } | rw | 1).lun(lun::encode_lun(lun)).itt(itt);
    let mut b = b.0;
    put_u32(&mut b, 20, edtl); // Expected Data Transfer Length
    put_u32(&mut b, 24, cmd_sn);
    b[32..32 + cdb.len()].copy_from_slice(cdb);
    b
}

fn read10(lba: u32, blocks: u16) -> [u8; 10] {
    let mut cdb = [0u8; 10];
    cdb[0] = 0x28;
    cdb[2..6].copy_from_slice(&lba.to_be_bytes());
    cdb[7..9].copy_from_slice(&blocks.to_be_bytes());
    cdb
}

fn write10(lba: u32, blocks: u16) -> [u8; 10] {
    let mut cdb = read10(lba, blocks);
    cdb[0] = 0x2A;
    cdb
}

const TEST_UNIT_READY: [u8; 6] = [0; 6];

/// A Data-Out PDU header (its data segment length is set by [`Rig::send`]).
fn data_out(lun: u64, itt: u32, ttt: u32, data_sn: u32, offset: u32, final_bit: bool) -> [u8; BHS_LEN] {
    let mut b = BhsBuf::new(opcode::DATA_OUT);
    b.flags(if final_bit { 0x80 } else { 0 }).lun(lun::encode_lun(lun)).itt(itt).ttt(ttt);
    b.sn36(data_sn).buffer_offset(offset);
    b.0
}

/// An immediate Task Management Function Request; `rtt`/`ref_cmd_sn` name the task for ABORT TASK.
fn tmf(function: u8, lun: u64, itt: u32, cmd_sn: u32, rtt: u32, ref_cmd_sn: u32) -> [u8; BHS_LEN] {
    let mut b = BhsBuf::new(opcode::TASK_MGMT_REQUEST | 0x40);
    b.flags(0x80 | function).lun(lun::encode_lun(lun)).itt(itt).ttt(rtt);
    let mut b = b.0;
    put_u32(&mut b, 24, cmd_sn);
    put_u32(&mut b, 32, ref_cmd_sn);
    b
}

/// An immediate NOP-Out: a ping (`ttt` reserved, answered with a NOP-In) or the answer to the
/// target's ping (`itt` reserved, `ttt` the ping's).
fn nop_out(itt: u32, ttt: u32, cmd_sn: u32) -> [u8; BHS_LEN] {
    let mut b = BhsBuf::new(opcode::NOP_OUT | 0x40);
    b.flags(0x80).lun(lun::encode_lun(0)).itt(itt).ttt(ttt);
    let mut b = b.0;
    put_u32(&mut b, 24, cmd_sn);
    b
}

/// A connection and what the rig knows of it.
struct Slot {
    conn: Conn,
    /// Bytes sent by the target, not yet parsed.
    wire: Vec<u8>,
    /// PDUs sent by the target, not yet looked at by the test.
    inbox: VecDeque<Pdu>,
    /// Torn down: the reactor would have freed it.
    gone: bool,
    /// The initiator's next CmdSN, for tests that do not number commands themselves.
    cmd_sn: u32,
    next_itt: u32,
}

struct Rig {
    shared: Shared,
    luns: Arc<LunTable>,
    lun_refs: LunRefs,
    pool: BufPool,
    scratch: Vec<u8>,
    io: Vec<IoReq>,
    stats: Stats,
    mail: crossbeam_channel::Receiver<Msg>,
    /// The rig's clock: every event happens at `now`.
    now: Instant,
    slots: Vec<Slot>,
    /// Backing I/O handed out and not completed, with the connection that asked for it.
    pending: Vec<(usize, IoReq)>,
    /// Most bytes one receive hands over: small pieces split PDUs, and large Data-Out segments
    /// are then received straight into their task's buffer.
    piece: usize,
    _file: tempfile::NamedTempFile,
}

impl Rig {
    fn new() -> Self {
        Self::with_limits(ConnLimits::default())
    }

    fn with_limits(limits: ConnLimits) -> Self {
        let file = tempfile::NamedTempFile::new().expect("temp file");
        file.as_file().set_len(LUN_BYTES).expect("size the file LUN");
        let lun = |id, name: &str, backing| Arc::new(Lun::new(id, name, None, backing, false, TARGET));
        let table = LunTable::new(vec![
            lun(RAM_LUN, "ram0", Backing::new_mem(LUN_BYTES).expect("RAM store")),
            lun(FILE_LUN, "file0", Backing::open_file(file.path(), false).expect("file store")),
        ]);
        let login = LoginConfig { target_name: TARGET.to_string(), ..LoginConfig::default() };
        let pool = BufPool::new(limits.buffer_memory_mib as usize * (1 << 20));
        let shared = Shared::new(login, table.clone()).with_limits(limits);
        let (tx, mail) = crossbeam_channel::unbounded();
        shared.set_reactors(vec![Mailbox { tx, waker: Arc::new(Waker::new().expect("eventfd")) }]);
        Rig {
            shared,
            lun_refs: LunRefs::new(&table),
            luns: Arc::new(table),
            pool,
            scratch: vec![0; 256 << 10],
            io: Vec::new(),
            stats: Stats::default(),
            mail,
            now: Instant::now(),
            slots: Vec::new(),
            pending: Vec::new(),
            piece: usize::MAX,
            _file: file,
        }
    }

    /// A new connection (not logged in); returns its index.
    fn connect(&mut self) -> usize {
        let token = self.shared.next_token();
        let peer = format!("127.0.0.1:{}", 40000 + self.slots.len()).parse().expect("address");
        let mut conn = Conn::new(peer, Some("127.0.0.1:3260".parse().expect("address")), token, &self.shared, self.now);
        conn.slot = self.slots.len() as u32;
        self.slots.push(Slot {
            conn,
            wire: Vec::new(),
            inbox: VecDeque::new(),
            gone: false,
            cmd_sn: 1,
            next_itt: 0x100,
        });
        self.slots.len() - 1
    }

    /// Runs `f` on connection `c` with the environment the reactor would lend it; the backing
    /// I/O it asks for joins the pending list.
    fn with_conn<R>(&mut self, c: usize, f: impl FnOnce(&mut Conn, &mut ConnEnv) -> R) -> R {
        let Rig { shared, luns, lun_refs, pool, scratch, io, stats, slots, now, pending, .. } = self;
        assert!(!slots[c].gone, "connection {c} is gone");
        let mut env = ConnEnv {
            luns: &*luns,
            lun_refs: &*lun_refs,
            pool,
            scratch,
            io,
            shared: &*shared,
            stats,
            reactor: 0,
            now: *now,
        };
        let r = f(&mut slots[c].conn, &mut env);
        pending.extend(io.drain(..).map(|r| (c, r)));
        r
    }

    /// Sends one PDU (padding added, no digests) and lets everything settle. Returns false
    /// when the connection stopped reading before all of it went in.
    fn send(&mut self, c: usize, bhs: &[u8; BHS_LEN], data: &[u8]) -> bool {
        let mut wire = bhs.to_vec();
        wire[5..8].copy_from_slice(&(data.len() as u32).to_be_bytes()[1..]);
        wire.extend_from_slice(data);
        wire.resize(wire.len() + pad_len(data.len()), 0);
        let all_in = self.feed(c, &wire);
        self.settle();
        all_in
    }

    /// Receives `bytes` as the reactor does: into `rx_space`, then `on_recv`, while the
    /// connection wants to receive.
    fn feed(&mut self, c: usize, bytes: &[u8]) -> bool {
        let mut at = 0;
        while at < bytes.len() {
            let slot = &mut self.slots[c];
            if slot.gone || slot.conn.closing || !slot.conn.wants_recv() {
                return false;
            }
            let (ptr, space) = slot.conn.rx_space();
            assert!(space > 0, "no receive space on an open connection");
            let n = space.min(bytes.len() - at).min(self.piece);
            // SAFETY: rx_space hands out `space` writable bytes at `ptr`, and n <= space.
            unsafe { std::ptr::copy_nonoverlapping(bytes[at..].as_ptr(), ptr, n) };
            at += n;
            self.with_conn(c, |conn, env| conn.on_recv(n, env));
        }
        true
    }

    /// Does what the reactor does between events until nothing changes: delivers messages,
    /// runs held commands, sends what is queued, closes and tears down connections.
    fn settle(&mut self) {
        loop {
            let mut busy = self.pump();
            // Tasks waiting for buffer memory: as the reactor does, connection by connection
            // (it keeps the order they started waiting in; here index order), stopping at the
            // first whose oldest waiting task does not fit in what the budget has left.
            for c in 0..self.slots.len() {
                let conn = &self.slots[c].conn;
                if self.slots[c].gone || conn.closing || !conn.waits_for_buffers() {
                    continue;
                }
                let before = self.pool.stats().waiting;
                let grant = self.with_conn(c, |conn, env| conn.grant_buffers(env));
                busy |= self.pool.stats().waiting != before;
                if grant == Grant::Budget {
                    break;
                }
            }
            for c in 0..self.slots.len() {
                if self.slots[c].gone {
                    continue;
                }
                if self.slots[c].conn.order_release_pending() {
                    self.with_conn(c, |conn, env| conn.release_ordered(env));
                    busy = true;
                }
                if !self.slots[c].conn.closing {
                    busy |= self.flush(c);
                }
                let conn = &mut self.slots[c].conn;
                if conn.wants_close() {
                    conn.close("logout or failed login");
                }
                if conn.closing && conn.work_inflight() == 0 {
                    self.with_conn(c, |conn, env| conn.teardown(env));
                    self.slots[c].gone = true;
                    busy = true;
                }
            }
            if !busy {
                return;
            }
        }
    }

    /// Delivers the messages [`Shared`] sent to the rig's reactor (see `Reactor::drain_messages`).
    fn pump(&mut self) -> bool {
        let mut any = false;
        while let Ok(msg) = self.mail.try_recv() {
            any = true;
            match msg {
                Msg::Close(token) => {
                    for s in self.slots.iter_mut().filter(|s| !s.gone && s.conn.token == token) {
                        s.conn.close("session reinstated by a new login");
                    }
                }
                Msg::AbortTasks(req) => {
                    let mut more = 0;
                    for c in 0..self.slots.len() {
                        if self.slots[c].gone || self.slots[c].conn.token == req.except {
                            continue;
                        }
                        let (luns, only) = (req.luns.as_deref(), req.only.as_deref());
                        more += self.with_conn(c, |conn, env| conn.abort_foreign(luns, only, req.reply, env));
                        if req.close {
                            self.slots[c].conn.close("target cold reset");
                        }
                    }
                    if let Some(reply) = req.reply {
                        self.shared.abort_done(AbortReply { more, ..reply });
                    }
                }
                Msg::AbortDone(reply) => {
                    let s = &mut self.slots[reply.conn as usize];
                    if !s.gone && s.conn.token == reply.token {
                        s.conn.abort_acknowledged(&reply);
                    }
                }
                Msg::Fenced(token) => {
                    let luns = self.luns.clone();
                    for s in self.slots.iter_mut().filter(|s| !s.gone && s.conn.token == token) {
                        s.conn.release_login(&luns);
                    }
                }
                Msg::Refresh => {}
                _ => panic!("the engine sent its reactor an unexpected message"),
            }
        }
        any
    }

    /// Sends what connection `c` queued, as completed `sendmsg`s, and parses it.
    fn flush(&mut self, c: usize) -> bool {
        let mut any = false;
        loop {
            let slot = &mut self.slots[c];
            let Some(msg) = slot.conn.tx.prepare() else { break };
            let mut sent = 0;
            // SAFETY: the queue's msghdr and the iovecs it points to stay valid and unchanged
            // until `complete`; each iovec describes readable bytes.
            unsafe {
                let m = &*msg;
                for i in 0..m.msg_iovlen {
                    let iov = &*m.msg_iov.add(i);
                    slot.wire.extend_from_slice(std::slice::from_raw_parts(iov.iov_base as *const u8, iov.iov_len));
                    sent += iov.iov_len;
                }
            }
            let mut released = Vec::new();
            slot.conn.tx.complete(sent, |s| released.push(s));
            for s in released {
                slot.conn.release_sent(s, &mut self.pool);
            }
            self.with_conn(c, |conn, env| conn.sent(env));
            self.parse(c);
            any = true;
        }
        any
    }

    fn parse(&mut self, c: usize) {
        let slot = &mut self.slots[c];
        while let Some(b) = Bhs::parse(&slot.wire) {
            assert_eq!(b.ahs_len(), 0, "the target sends no AHS");
            let dlen = b.data_len() as usize;
            let total = BHS_LEN + dlen + pad_len(dlen);
            assert!(slot.wire.len() >= total, "a send ended inside a PDU");
            let bhs: [u8; BHS_LEN] = slot.wire[..BHS_LEN].try_into().expect("BHS");
            let data = slot.wire[BHS_LEN..BHS_LEN + dlen].to_vec();
            slot.wire.drain(..total);
            slot.inbox.push_back(Pdu { bhs, data });
        }
        assert!(slot.wire.is_empty(), "a send ended inside a BHS");
    }

    /// Everything connection `c` sent since the last call.
    fn recv(&mut self, c: usize) -> Vec<Pdu> {
        self.slots[c].inbox.drain(..).collect()
    }

    /// The one PDU connection `c` sent since the last call.
    fn recv_one(&mut self, c: usize) -> Pdu {
        let mut v = self.recv(c);
        assert_eq!(v.len(), 1, "expected one PDU, got opcodes {:02x?}", v.iter().map(Pdu::opcode).collect::<Vec<_>>());
        v.pop().expect("one")
    }

    fn gone(&self, c: usize) -> bool {
        self.slots[c].gone
    }

    fn next_itt(&mut self, c: usize) -> u32 {
        let s = &mut self.slots[c];
        s.next_itt += 1;
        s.next_itt
    }

    /// The next CmdSN of connection `c`, taken.
    fn take_cmd_sn(&mut self, c: usize) -> u32 {
        let s = &mut self.slots[c];
        s.cmd_sn = s.cmd_sn.wrapping_add(1);
        s.cmd_sn.wrapping_sub(1)
    }

    /// Logs connection `c` in (ISID `isid`, CmdSN 1) and returns the final login response, or
    /// None when none came (a reinstatement waits for the old connection).
    fn login_request(&mut self, c: usize, isid: [u8; 6], keys: &Keys) -> Option<Pdu> {
        let (bhs, data) = login_pdu(isid, 0x1, 1, keys);
        assert!(self.send(c, &bhs, &data));
        let mut got = self.recv(c);
        assert!(got.len() <= 1, "one login response at most");
        got.pop()
    }

    /// A new connection in full feature phase, past the power-on unit attention of both LUNs.
    fn logged_in(&mut self, isid: [u8; 6], keys: &Keys) -> usize {
        let c = self.connect();
        let rsp = self.login_request(c, isid, keys).expect("a login response");
        assert_login_accepted(&rsp);
        for lun in [RAM_LUN, FILE_LUN] {
            self.clear_unit_attention(c, lun);
        }
        c
    }

    /// TEST UNIT READY until GOOD (a unit attention is reported once).
    fn clear_unit_attention(&mut self, c: usize, lun: u64) {
        for _ in 0..4 {
            let (itt, sn) = (self.next_itt(c), self.take_cmd_sn(c));
            let rsp = self.command_response(c, &command(itt, sn, lun, &TEST_UNIT_READY, 0, Dir::None, true), &[]);
            if rsp.status() == status::GOOD {
                return;
            }
            assert_eq!(rsp.sense().0, 0x06, "only unit attentions before GOOD");
        }
        panic!("TEST UNIT READY never GOOD");
    }

    /// Sends a command that completes at once and returns its SCSI Response.
    fn command_response(&mut self, c: usize, bhs: &[u8; BHS_LEN], data: &[u8]) -> Pdu {
        assert!(self.send(c, bhs, data));
        let rsp = self.recv_one(c);
        assert_eq!(rsp.opcode(), opcode::SCSI_RESPONSE);
        assert_eq!(rsp.itt(), Bhs::new(bhs).itt());
        rsp
    }

    /// Sends an immediate NOP-Out ping and returns the NOP-In (its ExpCmdSN and MaxCmdSN show
    /// the CmdSN window without spending a CmdSN).
    fn ping(&mut self, c: usize) -> Pdu {
        let (itt, sn) = (self.next_itt(c), self.slots[c].cmd_sn);
        assert!(self.send(c, &nop_out(itt, RESERVED_TAG, sn), &[]));
        let nop = self.recv_one(c);
        assert_eq!((nop.opcode(), nop.itt()), (opcode::NOP_IN, itt), "the ping's answer");
        nop
    }

    /// Backing I/O requests handed out and not completed: (connection, request).
    fn pending_io(&self) -> Vec<(usize, IoReq)> {
        self.pending.clone()
    }

    /// Completes pending request `i` (in [`Self::pending_io`] order) by doing it on the file,
    /// as the ring would, and hands the result to its connection.
    fn complete_io(&mut self, i: usize) {
        let (_, r) = self.pending[i];
        let len = r.len as usize;
        // SAFETY: the request's buffer is its task's, which the connection keeps (and does not
        // touch) until io_done; `len` bytes of it are the request's. The fd is the file LUN's,
        // open as long as the LUN table the rig holds.
        let res = unsafe {
            match r.kind {
                IoKind::Read => libc::pread(r.fd, r.buf.cast(), len, r.offset as libc::off_t),
                IoKind::Write { .. } => libc::pwrite(r.fd, r.buf.cast(), len, r.offset as libc::off_t),
                IoKind::Flush => libc::fdatasync(r.fd) as isize,
            }
        };
        let res =
            if res < 0 { -std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO) } else { res as i32 };
        self.finish_io(i, res);
    }

    /// Ends pending request `i` with `res` (bytes or a negative errno) without doing it.
    fn finish_io(&mut self, i: usize, res: i32) {
        let (c, r) = self.pending.remove(i);
        self.with_conn(c, |conn, env| conn.io_done(r.task, res, env));
        self.settle();
    }

    /// Index in [`Self::pending_io`] of the request at byte `offset` of the file LUN.
    fn io_at(&self, offset: u64) -> usize {
        self.pending.iter().position(|(_, r)| r.offset == offset).expect("a pending request at that offset")
    }

    /// Removes LUN `id` from the table, as `remove_lun` does: every connection sees the new
    /// table and fences what it had on the old LUN (see `Reactor::refresh_luns`).
    fn remove_lun(&mut self, id: u64) {
        let kept: Vec<Arc<Lun>> = self.luns.iter().filter(|l| l.id != id).cloned().collect();
        self.luns = Arc::new(LunTable::new(kept));
        self.lun_refs = LunRefs::new(&self.luns);
        let luns = self.luns.clone();
        for c in 0..self.slots.len() {
            if !self.slots[c].gone {
                self.slots[c].conn.luns_changed(&luns);
                self.with_conn(c, |conn, env| conn.fence_removed_luns(env));
            }
        }
        self.settle();
    }

    fn lun(&self, id: u64) -> &Arc<Lun> {
        self.luns.get(id).expect("LUN")
    }

    fn read_lun(&self, id: u64, offset: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.lun(id).backing.read_at(&mut v, offset).expect("read back");
        v
    }

    fn write_lun(&self, id: u64, offset: u64, data: &[u8]) {
        self.lun(id).backing.write_at(data, offset, false).expect("write");
    }

    /// Connection `c`'s own teardown ran and `Shared` forgot its session.
    fn sessions(&self) -> usize {
        self.shared.sessions().len()
    }
}

fn assert_login_accepted(rsp: &Pdu) {
    assert_eq!(rsp.opcode(), opcode::LOGIN_RESPONSE);
    assert_eq!((rsp.bhs[36], rsp.bhs[37]), (0, 0), "login status success");
    assert!(rsp.bhs().login_transit() && rsp.bhs().login_nsg() == 3, "the login reached full feature phase");
}

/// Bytes `len` long with a pattern particular to `seed`.
fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u32).wrapping_mul(31).wrapping_add(u32::from(seed) * 7919) as u8 ^ seed).collect()
}

/// Data-In payload of `pdus` for `itt`, in buffer-offset order, checked to be contiguous, and
/// the PDU that carries its status.
fn data_in_of(pdus: &[Pdu], itt: u32) -> (Vec<u8>, Pdu) {
    let mut data = Vec::new();
    let mut status = None;
    for p in pdus.iter().filter(|p| p.opcode() == opcode::DATA_IN && p.itt() == itt) {
        assert_eq!(p.buffer_offset() as usize, data.len(), "Data-In in order and contiguous");
        data.extend_from_slice(&p.data);
        if p.has_status() {
            status = Some(p.clone());
        }
    }
    (data, status.expect("a Data-In with status"))
}
