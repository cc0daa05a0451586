//! One iSCSI connection and its session (MaxConnections=1): the login phase, then the full
//! feature phase — SCSI commands, Data-Out/R2T, Data-In, task management, NOP, text, logout.
//!
//! A connection never touches the ring itself. It consumes received bytes, produces PDUs in
//! its [`TxQueue`] and backing-store requests in [`ConnEnv::io`]; the reactor turns those into
//! submissions and feeds completions back. That keeps the state machine testable as plain data.

use super::stats::Stats;
use super::task::{Action, Stage, Task, TaskTable, MAX_CDB};
use super::tx::{TxData, TxQueue};
use crate::backing::pool::{BufPool, MAX_BUF};
use crate::backing::{AlignedBuf, Backing};
use crate::iscsi::order::OrderQueue;
use crate::protocol::login::{Login, LoginOutcome, LoginRequest, Negotiated, SessionType};
use crate::protocol::pdu::{self, opcode, reject, Bhs, BhsBuf, Layout, BHS_LEN, RESERVED_TAG};
use crate::protocol::trace::{self, Dir};
use crate::protocol::{digest, text};
use crate::scsi::{self, lun, status, Disposition, LunRefs, LunTable, Nexus, Request, Sense};
use crate::session::{SessionError, SessionInfo, Shared};
use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Task slots beyond the CmdSN window (`limits.max_cmds_per_session`): room for immediate
/// commands.
const IMMEDIATE_SLOTS: usize = 32;
/// Data segment we accept per PDU; declared at login.
pub const MAX_RECV_DSL: u32 = 256 * 1024;
/// Receive buffer: a full PDU (header, AHS, digests, data) plus room to batch small ones.
const RX_BUF: usize = 2 * MAX_RECV_DSL as usize;
/// Before login completes the initiator may send at most 8192 data bytes per PDU.
const LOGIN_DSL: u32 = 8192;
/// Receive buffer until login completes: one login PDU (header, AHS, digests, 8 KiB of data).
/// The full-size buffer and the task table come with the full feature phase, so an accepted
/// socket that never logs in holds little.
const LOGIN_RX_BUF: usize = 16 * 1024;
/// Idle time before the target pings with a NOP-In, and how long the answer may take.
pub const NOP_INTERVAL: Duration = Duration::from_secs(5);
pub const NOP_TIMEOUT: Duration = Duration::from_secs(15);
const LOGIN_TIMEOUT: Duration = Duration::from_secs(15);
/// A login refused for authentication or authorization gets its answer this late (at the
/// first reactor tick after it, so 1 to 2 s), which slows down guessing secrets. The reactor
/// keeps running meanwhile.
const AUTH_FAILURE_DELAY: Duration = Duration::from_secs(1);
/// Target Transfer Tag of our NOP-In pings (never a task's TTT: those have bit 31 clear).
const PING_TTT: u32 = 0x8000_0000;
/// Data-Out segments at least this long are received straight into their task's buffer
/// rather than through the receive buffer and a copy; shorter ones are not worth the extra
/// receive a split costs.
const DIRECT_RX_MIN: usize = 32 * 1024;
/// A connection logs its peer's protocol errors at most this often (with a count of the rest),
/// so a peer cannot make the log grow without bound.
const PROTO_LOG_INTERVAL: Duration = Duration::from_secs(1);

/// A backing-store operation for the reactor to submit on its ring.
#[derive(Debug, Clone, Copy)]
pub struct IoReq {
    pub task: u16,
    pub kind: IoKind,
    pub fd: i32,
    pub buf: *mut u8,
    pub len: u32,
    pub offset: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoKind {
    Read,
    Write { dsync: bool },
    Flush,
}

/// What the reactor lends a connection while it handles an event.
pub struct ConnEnv<'a> {
    pub luns: &'a Arc<LunTable>,
    /// This reactor's handles on the LUNs of `luns`, which tasks hold.
    pub lun_refs: &'a LunRefs,
    pub pool: &'a mut BufPool,
    /// Data-In scratch for commands answered in place (INQUIRY, MODE SENSE...).
    pub scratch: &'a mut [u8],
    pub io: &'a mut Vec<IoReq>,
    pub shared: &'a Shared,
    pub stats: &'a mut Stats,
    pub reactor: usize,
    pub now: Instant,
}

/// A Data-Out PDU whose data segment is being received straight into its task's buffer.
struct DirectRx {
    bhs: [u8; BHS_LEN],
    slot: u16,
    /// Where the segment goes: the task buffer at the PDU's buffer offset.
    dst: *mut u8,
    len: usize,
    /// Bytes of the segment in place so far.
    got: usize,
    /// Padding and data digest that follow the segment, read from the receive buffer.
    tail: usize,
}

enum Phase {
    Login(Box<Login>),
    FullFeature,
}

/// A task management response waiting for aborted tasks' in-flight I/O to finish.
struct PendingTmf {
    itt: u32,
    response: u8,
    waiting: u32,
}

pub struct Conn {
    pub peer: SocketAddr,
    /// The address the initiator reached us on (for the session list and SendTargets).
    local: Option<SocketAddr>,
    /// Unique id, for closing it from elsewhere (session reinstatement).
    pub token: u64,
    /// Its slot in the reactor's connection table (routes offloaded work back to it).
    pub slot: u32,
    phase: Phase,
    neg: Option<Negotiated>,
    header_digest: bool,
    data_digest: bool,
    rx: Option<AlignedBuf>,
    rx_start: usize,
    rx_end: usize,
    /// A large Data-Out segment in flight into its task's buffer (the next receive goes there).
    direct: Option<DirectRx>,
    pub tx: TxQueue,
    tasks: TaskTable,
    nexus: Nexus,
    isid: [u8; 6],
    tsih: u16,
    exp_cmd_sn: u32,
    stat_sn: u32,
    /// Commands that arrived ahead of ExpCmdSN, by CmdSN; `None` marks a CmdSN aborted before
    /// its command arrived (it still fills its place in the sequence).
    parked: BTreeMap<u32, Option<Vec<u8>>>,
    /// Commands held back by their task attributes (ORDERED), see [`crate::iscsi::order`].
    order: OrderQueue,
    /// ORDERED tasks in the task table.
    ordered_live: u32,
    /// Tasks in the table that hold no place in the CmdSN window: immediate commands (they
    /// have slots of their own) and reads whose status is queued (done, for the initiator).
    outside_window: u32,
    /// A task ended while commands were held: see whether they may run now.
    order_release: bool,
    text: Option<text::TextNegotiator>,
    pending_tmfs: Vec<PendingTmf>,
    last_rx: Instant,
    ping_sent: Option<Instant>,
    started: Instant,
    /// Close once the transmit queue drains (after a logout response or a login failure).
    close_after_send: bool,
    /// The final login response of a reinstatement, held until the old connection is gone
    /// ([`Conn::release_login`]).
    deferred_login: Option<(BhsBuf, Vec<u8>)>,
    /// A refused login's response, held back until the instant given (see AUTH_FAILURE_DELAY).
    delayed_login_failure: Option<(Instant, BhsBuf)>,
    /// The LUNs this session sees when some LUN is mapped to other initiators only (`None`:
    /// the reactor's whole table), and the (id, instance) pairs of that view.
    view: Option<Arc<LunTable>>,
    view_fingerprint: Vec<(u64, u64)>,
    /// Being torn down: no new work; the reactor frees it once no operation references its
    /// memory (its own receives and sends, and [`Conn::work_inflight`]).
    pub closing: bool,
    /// Backing I/O and offloaded jobs handed out and not completed yet: they reference task
    /// buffers, so the connection outlives them.
    work_inflight: u32,
    /// Protocol errors of the peer: all of them, those not logged yet, and when one was last
    /// logged.
    proto_errors: u64,
    proto_unlogged: u64,
    proto_logged_at: Option<Instant>,
    /// Protocol trace switch (src/protocol/trace.rs); shared with the session entry.
    trace: trace::Switch,
    /// Commands a session may have outstanding (the CmdSN window).
    queue_depth: u32,
    dataout_timeout: Duration,
    /// Bytes queued for sending beyond which requests are not read.
    tx_limit: usize,
    tx_stall_timeout: Duration,
    /// Since when the transmit queue has been over `tx_limit`.
    tx_full_since: Option<Instant>,
    /// Data-In bytes of reads in progress (not queued yet): they count against `tx_limit`.
    tx_reserved: usize,
    /// Received PDUs wait for the transmit queue to drain.
    held_back: bool,
    /// Limits already logged for this connection ([`limit`] bits): each is logged once.
    limits_logged: u8,
    /// Tasks waiting for buffer memory ([`Stage::WaitBuf`]), oldest first.
    buf_wait: VecDeque<u16>,
    /// Bytes of the reactor's buffer budget its tasks hold (at most [`BufPool::share`]).
    buf_charged: usize,
}

/// What [`Conn::grant_buffers`] left waiting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grant {
    /// Every waiting task has its buffer.
    Done,
    /// The oldest waiting task does not fit in this connection's share: others may go first.
    OwnShare,
    /// The oldest waiting task does not fit in what the budget has left: everyone waits.
    Budget,
}

/// Bits of [`Conn::limits_logged`].
mod limit {
    pub const TX_QUEUE: u8 = 1;
    pub const DATA_OUT_TIMEOUT: u8 = 2;
    pub const BUFFERS: u8 = 4;
}

impl Conn {
    /// A connection from `peer` that reached the portal at `local`, before its login. The
    /// transport (socket options, receives, sends, shutdown) is the caller's.
    pub fn new(peer: SocketAddr, local: Option<SocketAddr>, token: u64, shared: &Shared, now: Instant) -> Self {
        let limits = shared.limits();
        Self {
            local,
            peer,
            token,
            slot: 0,
            phase: Phase::Login(Box::new(Login::with_peer(shared.login_config(), peer.ip()))),
            neg: None,
            header_digest: false,
            data_digest: false,
            rx: Some(AlignedBuf::new(LOGIN_RX_BUF)),
            rx_start: 0,
            rx_end: 0,
            direct: None,
            tx: TxQueue::new(),
            tasks: TaskTable::with_capacity(0),
            nexus: Nexus::new(),
            isid: [0; 6],
            tsih: 0,
            exp_cmd_sn: 0,
            stat_sn: 0,
            parked: BTreeMap::new(),
            order: OrderQueue::new(limits.max_cmds_per_session as usize),
            ordered_live: 0,
            outside_window: 0,
            order_release: false,
            text: None,
            pending_tmfs: Vec::new(),
            last_rx: now,
            ping_sent: None,
            started: now,
            close_after_send: false,
            deferred_login: None,
            delayed_login_failure: None,
            view: None,
            view_fingerprint: Vec::new(),
            closing: false,
            work_inflight: 0,
            proto_errors: 0,
            proto_unlogged: 0,
            proto_logged_at: None,
            trace: trace::Switch::new(),
            queue_depth: limits.max_cmds_per_session,
            dataout_timeout: Duration::from_secs(limits.dataout_timeout_secs),
            tx_limit: limits.max_tx_queue_kib as usize * 1024,
            tx_stall_timeout: Duration::from_secs(limits.tx_stall_timeout_secs),
            tx_full_since: None,
            tx_reserved: 0,
            held_back: false,
            limits_logged: 0,
            buf_wait: VecDeque::new(),
            buf_charged: 0,
        }
    }

    /// Backing I/O and offloaded jobs not completed yet.
    pub fn work_inflight(&self) -> u32 {
        self.work_inflight
    }

    /// Where the next receive may write.
    pub fn rx_space(&mut self) -> (*mut u8, usize) {
        if let Some(d) = self.direct.as_ref().filter(|d| d.got < d.len) {
            // SAFETY: got < len and [dst, dst+len) lies inside the task's buffer (checked when
            // the direct receive began); the task cannot end before this PDU is complete.
            return (unsafe { d.dst.add(d.got) }, d.len - d.got);
        }
        let rx = self.rx.as_mut().expect("rx buffer present between events");
        if self.rx_start == self.rx_end {
            self.rx_start = 0;
            self.rx_end = 0;
        } else if self.rx_start > 0 && rx.len() - self.rx_end < BHS_LEN + 1024 + MAX_RECV_DSL as usize {
            // Not enough room for a whole PDU after the partial one: move it to the front.
            rx.copy_within(self.rx_start..self.rx_end, 0);
            self.rx_end -= self.rx_start;
            self.rx_start = 0;
        }
        // SAFETY: rx_end <= len, so the pointer stays inside (or one past) the allocation.
        (unsafe { rx.as_mut_ptr().add(self.rx_end) }, rx.len() - self.rx_end)
    }

    /// Starts an orderly close: the reactor then shuts the socket down and frees the
    /// connection once its in-flight operations complete.
    pub fn close(&mut self, why: &str) {
        if !self.closing {
            log::debug!("{}: closing connection: {why}", self.peer);
            self.closing = true;
        }
    }

    /// Frees task state at teardown; returns buffers to the pool. Only when no ring operation
    /// references the connection any more.
    pub fn teardown(&mut self, env: &mut ConnEnv) {
        debug_assert_eq!(self.work_inflight, 0);
        self.pending_tmfs.clear();
        self.tx.clear(|_| {});
        let slots: Vec<u16> = self.tasks.slots().map(|(s, _)| s).collect();
        for s in slots {
            self.free_task(s, env.pool);
        }
        if self.tsih != 0 {
            env.shared.unregister_session(self.tsih, self.token);
        }
        env.shared.connection_closed();
        if self.proto_unlogged > 0 {
            log::warn!(
                "{}: {} more protocol errors before the connection ended ({} in all)",
                self.peer,
                self.proto_unlogged,
                self.proto_errors
            );
        }
    }

    /// Counts a protocol error of the peer and logs it, unless one was logged less than
    /// [`PROTO_LOG_INTERVAL`] ago; then the next line says how many were not.
    fn protocol_error(&mut self, what: &dyn std::fmt::Display) {
        self.proto_errors += 1;
        let now = Instant::now();
        if self.proto_logged_at.is_some_and(|at| now.duration_since(at) < PROTO_LOG_INTERVAL) {
            self.proto_unlogged += 1;
            return;
        }
        if self.proto_unlogged > 0 {
            log::warn!("{}: {what} (and {} more protocol errors not logged)", self.peer, self.proto_unlogged);
        } else {
            log::warn!("{}: {what}", self.peer);
        }
        self.proto_unlogged = 0;
        self.proto_logged_at = Some(now);
    }

    /// A PDU that breaks the protocol in a way ErrorRecoveryLevel 0 cannot recover from (no
    /// retransmission exists): it is rejected with "protocol error" and the connection ends
    /// once the Reject is sent, which ends every task of the session (RFC 7143 §7.1, §11.17).
    pub(super) fn protocol_error_close(&mut self, rejected: &[u8; BHS_LEN], why: &dyn std::fmt::Display) {
        self.protocol_error(why);
        self.push_reject(rejected, reject::PROTOCOL_ERROR);
        self.close_after_send = true;
    }

    /// Whether a receive should be posted: not once the connection only waits to send its
    /// last PDUs (after a logout, a failed login or a protocol error).
    pub fn wants_recv(&self) -> bool {
        !self.close_after_send && !self.tx_full()
    }

    /// `n` bytes arrived in the receive buffer.
    pub fn on_recv(&mut self, n: usize, env: &mut ConnEnv) {
        self.last_rx = env.now;
        self.ping_sent = None;
        match self.direct.as_mut() {
            Some(d) if d.got < d.len => {
                d.got += n;
                if d.got < d.len {
                    return;
                }
            }
            _ => self.rx_end += n,
        }
        self.parse(env);
    }

    /// Handles the complete PDUs in the receive buffer, unless the transmit queue is over its
    /// limit: then they wait until it drains ([`Self::sent`]).
    fn parse(&mut self, env: &mut ConnEnv) {
        let rx = self.rx.take().expect("rx buffer present");
        while !self.closing && !self.close_after_send && !self.tx_full() {
            if self.direct.is_some() {
                if !self.finish_direct(&rx, env) {
                    break;
                }
                continue;
            }
            let avail = &rx[self.rx_start..self.rx_end];
            let Some(bhs) = Bhs::parse(avail) else { break };
            let layout = Layout::of(&bhs, self.header_digest, self.data_digest);
            let limit = if matches!(self.phase, Phase::Login(_)) { LOGIN_DSL } else { MAX_RECV_DSL };
            if layout.data_len as u32 > limit || layout.header_len > BHS_LEN + 1024 {
                crate::metrics::protocol_error("data_too_long");
                let err = pdu::PduError::DataTooLong { len: layout.data_len as u32, max: limit };
                self.protocol_error(&err);
                self.close(&err.to_string());
                break;
            }
            if avail.len() < layout.total() {
                if layout.data_len >= DIRECT_RX_MIN
                    && avail.len() >= layout.data_offset()
                    && avail.len() < layout.data_offset() + layout.data_len
                    && matches!(self.phase, Phase::FullFeature)
                {
                    self.start_direct(&bhs, &layout, &rx);
                }
                break;
            }
            let pdu_bytes = &avail[..layout.total()];
            if self.header_digest {
                let received = digest::from_wire(pdu_bytes[layout.header_len..][..4].try_into().expect("4"));
                let computed = digest::header(&pdu_bytes[..layout.header_len]);
                if received != computed {
                    // Without a trustworthy header the stream cannot be resynchronised (ERL 0).
                    crate::metrics::protocol_error("header_digest");
                    let err = pdu::PduError::HeaderDigest { received, computed };
                    self.protocol_error(&err);
                    self.close(&err.to_string());
                    break;
                }
            }
            let data = &pdu_bytes[layout.data_offset()..][..layout.data_len];
            self.rx_start += layout.total();
            if layout.data_digest_len > 0 {
                let at = layout.data_offset() + layout.data_len + layout.pad_len;
                let received = digest::from_wire(pdu_bytes[at..at + 4].try_into().expect("4"));
                let pad = &pdu_bytes[layout.data_offset() + layout.data_len..at];
                let computed = digest::data(&[data, pad]);
                if received != computed {
                    let err = pdu::PduError::DataDigest { received, computed };
                    if bhs.opcode() == opcode::DATA_OUT {
                        // ERL 0 cannot ask for the data again (no SNACK recovery): a task
                        // would wait for it forever, so the connection ends.
                        crate::metrics::protocol_error("data_digest");
                        self.protocol_error(&err);
                        self.close(&err.to_string());
                        break;
                    }
                    self.protocol_error(&err);
                    self.push_reject(bhs.bytes(), reject::DATA_DIGEST_ERROR);
                    continue;
                }
            }
            let ahs = &pdu_bytes[BHS_LEN..layout.header_len];
            self.handle_pdu(bhs, ahs, data, env);
        }
        self.rx = Some(rx);
        self.held_back = self.tx_full();
        if self.rx_start == self.rx_end {
            self.rx_start = 0;
            self.rx_end = 0;
        }
        if matches!(self.phase, Phase::FullFeature) && self.tasks.capacity() == 0 {
            self.enter_full_feature();
        }
    }

    /// Login is complete: the full-size receive buffer (keeping any bytes already received)
    /// and the task table.
    fn enter_full_feature(&mut self) {
        let old = self.rx.take().expect("rx buffer present");
        let mut rx = AlignedBuf::new(RX_BUF);
        let n = self.rx_end - self.rx_start;
        rx[..n].copy_from_slice(&old[self.rx_start..self.rx_end]);
        (self.rx_start, self.rx_end) = (0, n);
        self.rx = Some(rx);
        self.tasks = TaskTable::with_capacity(self.queue_depth as usize + IMMEDIATE_SLOTS);
        self.buf_wait = VecDeque::with_capacity(self.tasks.capacity());
    }

    /// Whether the transmit queue (with the Data-In of reads in progress) is over its limit:
    /// requests are not read meanwhile.
    fn tx_full(&self) -> bool {
        self.tx.queued_bytes() + self.tx_reserved > self.tx_limit
    }

    /// A send completed: requests held back by a full transmit queue may go on.
    pub fn sent(&mut self, env: &mut ConnEnv) {
        if !self.held_back || self.closing || self.tx_full() {
            return;
        }
        self.held_back = false;
        self.tx_full_since = None;
        // A direct receive still filling its task buffer resumes with its next receive.
        if self.direct.as_ref().is_none_or(|d| d.got >= d.len) {
            self.parse(env);
        }
    }

    /// A Data-Out whose header is in but whose large data segment is not: when it is valid
    /// for its task, the rest of the segment is received straight into the task's buffer.
    /// Anything unusual (bad digest, unknown task, out-of-order DataSN) is left to the normal
    /// path, which sees the whole PDU and answers it.
    fn start_direct(&mut self, bhs: &Bhs, layout: &Layout, rx: &[u8]) {
        if bhs.opcode() != opcode::DATA_OUT {
            return;
        }
        let avail = &rx[self.rx_start..self.rx_end];
        if self.header_digest {
            let received = digest::from_wire(avail[layout.header_len..][..4].try_into().expect("4"));
            if received != digest::header(&avail[..layout.header_len]) {
                return;
            }
        }
        let Some((slot, dst)) = self.data_out_dst(bhs, layout.data_len as u32) else { return };
        let present = &avail[layout.data_offset()..];
        // SAFETY: dst has room for data_len bytes (data_out_dst) and present.len() < data_len.
        unsafe { std::ptr::copy_nonoverlapping(present.as_ptr(), dst, present.len()) };
        self.direct = Some(DirectRx {
            bhs: *bhs.bytes(),
            slot,
            dst,
            len: layout.data_len,
            got: present.len(),
            tail: layout.pad_len + layout.data_digest_len,
        });
        self.rx_start = 0;
        self.rx_end = 0;
    }

    /// Completes a direct Data-Out once its padding and digest are in the receive buffer.
    /// Returns false while they are not.
    fn finish_direct(&mut self, rx: &[u8], env: &mut ConnEnv) -> bool {
        let d = self.direct.as_ref().expect("direct receive");
        if self.rx_end - self.rx_start < d.tail {
            return false;
        }
        let d = self.direct.take().expect("direct receive");
        let tail = &rx[self.rx_start..self.rx_start + d.tail];
        self.rx_start += d.tail;
        // SAFETY: the segment was received into [dst, dst+len) of the live task's buffer.
        let data = unsafe { std::slice::from_raw_parts(d.dst, d.len) };
        if self.data_digest {
            let (pad, wire) = tail.split_at(d.tail - 4);
            let received = digest::from_wire(wire.try_into().expect("4"));
            let computed = digest::data(&[data, pad]);
            if received != computed {
                crate::metrics::protocol_error("data_digest");
                let err = pdu::PduError::DataDigest { received, computed };
                self.protocol_error(&err);
                self.close(&err.to_string());
                return false;
            }
        }
        let bhs = Bhs::new(&d.bhs);
        if self.trace.on() {
            trace::pdu(Dir::In, self.peer, self.tsih, &d.bhs, &[], d.len);
        }
        self.data_out_in_place(bhs, d.slot, d.len as u32, env);
        true
    }

    fn handle_pdu(&mut self, bhs: Bhs, ahs: &[u8], data: &[u8], env: &mut ConnEnv) {
        if matches!(self.phase, Phase::Login(_)) {
            self.trace.login_pdu(data);
        }
        if self.trace.on() {
            trace::pdu(Dir::In, self.peer, self.tsih, bhs.bytes(), data, data.len());
        }
        if matches!(self.phase, Phase::Login(_)) {
            if self.delayed_login_failure.is_some() {
                // The login has failed; nothing more is read until its answer is sent.
            } else if bhs.opcode() == opcode::LOGIN_REQUEST {
                self.login(bhs, data, env);
            } else {
                crate::metrics::protocol_error("non_login_pdu_during_login");
                self.close("non-login PDU during login");
            }
            return;
        }
        match bhs.opcode() {
            opcode::DATA_OUT => self.data_out(bhs, data, env),
            opcode::SNACK_REQUEST => self.reject(bhs.bytes(), reject::PROTOCOL_ERROR),
            opcode::LOGIN_REQUEST => self.reject(bhs.bytes(), reject::PROTOCOL_ERROR),
            opcode::SCSI_COMMAND
            | opcode::NOP_OUT
            | opcode::TASK_MGMT_REQUEST
            | opcode::TEXT_REQUEST
            | opcode::LOGOUT_REQUEST => self.ordered(bhs, ahs, data, env),
            _ => self.reject(bhs.bytes(), reject::COMMAND_NOT_SUPPORTED),
        }
    }

    fn max_cmd_sn(&self) -> u32 {
        let busy = self.tasks.in_use() - self.outside_window as usize + self.order.commands();
        let free = self.queue_depth.saturating_sub(busy as u32);
        self.exp_cmd_sn.wrapping_add(free).wrapping_sub(1)
    }

    /// Applies CmdSN ordering (RFC 7143 §4.2.2.1) to a command-carrying PDU.
    fn ordered(&mut self, bhs: Bhs, ahs: &[u8], data: &[u8], env: &mut ConnEnv) {
        if bhs.immediate() {
            return self.command(bhs, ahs, data, env);
        }
        let sn = bhs.cmd_sn();
        if !pdu::sn_le(self.exp_cmd_sn, sn) || !pdu::sn_le(sn, self.max_cmd_sn()) {
            // Outside the window (a full window holds no CmdSN, not even ExpCmdSN): RFC 7143
            // §4.2.2.1 says to silently ignore it.
            log::debug!("{}: dropping CmdSN {sn} outside [{}, {}]", self.peer, self.exp_cmd_sn, self.max_cmd_sn());
            return;
        }
        if sn == self.exp_cmd_sn {
            self.exp_cmd_sn = self.exp_cmd_sn.wrapping_add(1);
            // A tombstone here means ABORT TASK already took this CmdSN.
            if self.parked.remove(&sn).is_none() {
                self.command(bhs, ahs, data, env);
            }
            // Commands parked behind this one may now run; aborted ones just advance.
            while let Some(entry) = self.parked.remove(&self.exp_cmd_sn) {
                self.exp_cmd_sn = self.exp_cmd_sn.wrapping_add(1);
                if let Some(pdu) = entry {
                    let hdr: &[u8; BHS_LEN] = pdu[..BHS_LEN].try_into().expect("parked header");
                    let b = Bhs::new(hdr);
                    let ahs_end = BHS_LEN + b.ahs_len();
                    self.command(b, &pdu[BHS_LEN..ahs_end], &pdu[ahs_end..], env);
                }
            }
        } else if let std::collections::btree_map::Entry::Vacant(slot) = self.parked.entry(sn) {
            let mut pdu = Vec::with_capacity(BHS_LEN + ahs.len() + data.len());
            pdu.extend_from_slice(bhs.bytes());
            pdu.extend_from_slice(ahs);
            pdu.extend_from_slice(data);
            slot.insert(Some(pdu));
        }
    }

    fn command(&mut self, bhs: Bhs, ahs: &[u8], data: &[u8], env: &mut ConnEnv) {
        if self.closing {
            return;
        }
        match bhs.opcode() {
            opcode::SCSI_COMMAND => self.scsi_command(bhs, ahs, data, env),
            opcode::NOP_OUT => self.nop_out(bhs, data),
            opcode::TASK_MGMT_REQUEST => self.task_mgmt(bhs, env),
            opcode::TEXT_REQUEST => self.text_request(bhs, data, env),
            opcode::LOGOUT_REQUEST => self.logout(bhs),
            _ => unreachable!("only ordered opcodes get here"),
        }
    }

    // ---- transmit helpers ----

    fn push(&mut self, bhs: BhsBuf, data: TxData, release: Option<u16>) {
        if self.trace.on() {
            let (seg, len) = match &data {
                TxData::Inline(v) => (&v[..], v.len()),
                TxData::Task { len, .. } => (&[][..], *len as usize),
                TxData::None => (&[][..], 0),
            };
            trace::pdu(Dir::Out, self.peer, self.tsih, &bhs.0, seg, len);
        }
        self.tx.push(bhs, data, self.header_digest, self.data_digest, release);
    }

    /// Fills StatSN (advancing it), ExpCmdSN and MaxCmdSN of a status-carrying PDU.
    fn stamp_status(&mut self, b: &mut BhsBuf) {
        b.stat_sn(self.stat_sn).exp_cmd_sn(self.exp_cmd_sn).max_cmd_sn(self.max_cmd_sn());
        self.stat_sn = self.stat_sn.wrapping_add(1);
    }

    /// Rejects a PDU (a protocol error of the peer, logged within the rate limit).
    fn reject(&mut self, rejected: &[u8; BHS_LEN], reason: u8) {
        let opcode = rejected[0] & 0x3F;
        self.protocol_error(&format_args!("rejected a PDU with opcode {opcode:#04x}: reason {reason:#04x}"));
        self.push_reject(rejected, reason);
    }

    fn push_reject(&mut self, rejected: &[u8; BHS_LEN], reason: u8) {
        crate::metrics::protocol_error(crate::metrics::reject_kind(reason));
        let mut b = BhsBuf::new(opcode::REJECT);
        b.flags(0x80).byte(2, reason).itt(RESERVED_TAG);
        self.stamp_status(&mut b);
        self.push(b, TxData::Inline(rejected.to_vec()), None);
    }

    fn scsi_response(&mut self, itt: u32, status: u8, sense: Option<(&Sense, bool)>, residual: Residual) {
        self.scsi_response_after(itt, status, sense, residual, 0);
    }

    /// A SCSI Response whose ExpDataSN counts the R2Ts sent for the command (RFC 7143 §11.4.8).
    fn scsi_response_after(
        &mut self,
        itt: u32,
        status: u8,
        sense: Option<(&Sense, bool)>,
        residual: Residual,
        exp_data_sn: u32,
    ) {
        let mut b = BhsBuf::new(opcode::SCSI_RESPONSE);
        b.flags(0x80 | residual.flags()).byte(3, status).itt(itt).word44(residual.count()).sn36(exp_data_sn);
        self.stamp_status(&mut b);
        let data = match sense {
            Some((s, descriptor)) => {
                let mut v = vec![0u8; 2 + 252];
                let n = s.encode(descriptor, &mut v[2..]);
                v[..2].copy_from_slice(&(n as u16).to_be_bytes());
                v.truncate(2 + n);
                TxData::Inline(v)
            }
            None => TxData::None,
        };
        self.push(b, data, None);
    }

    // ---- login ----

    fn login(&mut self, bhs: Bhs, data: &[u8], env: &mut ConnEnv) {
        let Phase::Login(login) = &mut self.phase else { return };
        let req = LoginRequest {
            transit: bhs.login_transit(),
            cont: bhs.continue_bit(),
            csg: bhs.login_csg(),
            nsg: bhs.login_nsg(),
            version_max: bhs.version_max(),
            version_min: bhs.version_min(),
            isid: bhs.isid(),
            tsih: bhs.tsih(),
            itt: bhs.itt(),
            cid: bhs.cid(),
            cmd_sn: bhs.cmd_sn(),
            exp_stat_sn: bhs.exp_stat_sn(),
            data,
        };
        let (mut rsp, mut outcome) = login.step(&req);
        self.isid = req.isid;
        if self.neg.is_none() {
            // The initiator's first CmdSN starts the window; StatSN starts anywhere we like.
            self.exp_cmd_sn = req.cmd_sn;
            self.stat_sn = req.exp_stat_sn;
        }
        let mut fenced = false;
        if matches!(outcome, LoginOutcome::FullFeature) {
            let neg = login.negotiated().clone();
            {
                let info = SessionInfo {
                    tsih: req.tsih,
                    initiator: neg.initiator_name.clone(),
                    auth: neg.auth.clone(),
                    isid: req.isid,
                    discovery: neg.session_type == SessionType::Discovery,
                    peer: self.peer,
                    reactor: env.reactor,
                    token: self.token,
                    negotiated: neg.pairs(),
                    trace: self.trace.clone(),
                    portal: self.local,
                };
                match env.shared.register_session(info) {
                    Ok((tsih, f)) => (self.tsih, fenced) = (tsih, f),
                    Err(e) => {
                        log::info!("{}: login refused: {e}", self.peer);
                        let (class, detail) = match e {
                            SessionError::NoSuchSession => (0x02, 0x0A),
                            // Out of resources (RFC 7143 §11.13.5).
                            SessionError::TooManySessions | SessionError::InitiatorSessionLimit(_) => (0x03, 0x02),
                        };
                        rsp.status_class = class;
                        rsp.status_detail = detail;
                        rsp.transit = false;
                        rsp.data.clear();
                        outcome = LoginOutcome::Failed;
                    }
                }
            }
            if matches!(outcome, LoginOutcome::FullFeature) {
                log::info!(
                    "{}: {} login from {} (ISID {}, TSIH {})",
                    self.peer,
                    if neg.session_type == SessionType::Normal { "session" } else { "discovery" },
                    neg.initiator_name,
                    crate::session::isid_hex(&req.isid),
                    self.tsih
                );
                self.nexus.set_identity(&neg.initiator_name, req.isid);
                self.neg = Some(neg);
            }
        }
        let refused_auth =
            matches!(outcome, LoginOutcome::Failed) && matches!((rsp.status_class, rsp.status_detail), (2, 1) | (2, 2));
        if let (LoginOutcome::Failed, Some(e)) = (outcome, login.error()) {
            let initiator = &login.negotiated().initiator_name;
            let initiator = if initiator.is_empty() { "an unnamed initiator" } else { initiator.as_str() };
            log::info!("{}: login from {initiator} refused: {e}", self.peer);
        }
        let mut b = BhsBuf::new(opcode::LOGIN_RESPONSE);
        let flags = (u8::from(rsp.transit) << 7) | (u8::from(rsp.cont) << 6) | (rsp.csg << 2) | rsp.nsg;
        b.flags(flags).byte(2, 0).byte(3, 0).isid_tsih(req.isid, self.tsih).itt(req.itt);
        b.byte(36, rsp.status_class).byte(37, rsp.status_detail);
        if rsp.status_class == 0 {
            self.stamp_status(&mut b);
        } else {
            b.stat_sn(self.stat_sn).exp_cmd_sn(self.exp_cmd_sn).max_cmd_sn(self.exp_cmd_sn);
        }
        if refused_auth {
            // A failure response carries no data; tick() sends it and closes.
            self.delayed_login_failure = Some((env.now + AUTH_FAILURE_DELAY, b));
            return;
        }
        if fenced {
            // Reinstatement: answered once the old connection's tasks have all ended.
            log::debug!("{}: login waits for the old connection of this session to end", self.peer);
            self.deferred_login = Some((b, rsp.data));
            return;
        }
        self.push(b, TxData::Inline(rsp.data), None);
        match outcome {
            LoginOutcome::Continue => {}
            LoginOutcome::Failed => {
                crate::metrics::login_failed(rsp.status_class, rsp.status_detail);
                self.close_after_send = true;
            }
            LoginOutcome::FullFeature => {
                let neg = self.neg.as_ref().expect("set above");
                // Digests start with the first PDU after the final login response.
                self.header_digest = neg.header_digest;
                self.data_digest = neg.data_digest;
                self.phase = Phase::FullFeature;
                self.update_view(env.luns);
            }
        }
    }

    /// The old connection a reinstating login waited for is gone: answer the login and enter
    /// the full feature phase.
    pub fn release_login(&mut self, luns: &Arc<LunTable>) {
        let Some((b, data)) = self.deferred_login.take() else { return };
        if self.closing {
            return;
        }
        // Digests start with the first PDU after the final login response (none yet here).
        self.push(b, TxData::Inline(data), None);
        let neg = self.neg.as_ref().expect("a deferred login finished negotiating");
        self.header_digest = neg.header_digest;
        self.data_digest = neg.data_digest;
        self.phase = Phase::FullFeature;
        self.update_view(luns);
    }

    // ---- NOP ----

    fn nop_out(&mut self, bhs: Bhs, data: &[u8]) {
        if bhs.ttt() != RESERVED_TAG {
            // The answer to our ping: liveness is already noted by the receive.
            return;
        }
        if bhs.itt() == RESERVED_TAG {
            return; // a one-way ping from the initiator needs no answer
        }
        let mut b = BhsBuf::new(opcode::NOP_IN);
        b.flags(0x80).lun(bhs.lun()).itt(bhs.itt()).ttt(RESERVED_TAG);
        self.stamp_status(&mut b);
        let echo = data.len().min(self.max_xmit() as usize);
        self.push(b, TxData::Inline(data[..echo].to_vec()), None);
    }

    fn max_xmit(&self) -> u32 {
        self.neg.as_ref().map_or(LOGIN_DSL, |n| n.max_xmit_data_segment_length)
    }

    /// Periodic liveness and timeout checks.
    pub fn tick(&mut self, now: Instant, pool: &mut BufPool) {
        if self.closing {
            return;
        }
        if self.tx_full() {
            let since = *self.tx_full_since.get_or_insert(now);
            if self.limits_logged & limit::TX_QUEUE == 0 {
                self.limits_logged |= limit::TX_QUEUE;
                log::warn!(
                    "{}: transmit queue over limits.max_tx_queue_kib ({} KiB): not reading requests until it drains",
                    self.peer,
                    self.tx_limit / 1024
                );
            }
            if now.duration_since(since) > self.tx_stall_timeout {
                log::warn!(
                    "{}: transmit queue stalled for {:?}: dropping the connection",
                    self.peer,
                    self.tx_stall_timeout
                );
                return self.close("transmit queue stalled");
            }
        } else {
            self.tx_full_since = None;
        }
        self.dataout_timeouts(now, pool);
        if self.closing {
            return;
        }
        match self.phase {
            Phase::Login(_) if self.delayed_login_failure.is_some_and(|(due, _)| now >= due) => {
                let (_, b) = self.delayed_login_failure.take().expect("checked above");
                self.push(b, TxData::None, None);
                self.close_after_send = true;
            }
            Phase::Login(_) if now.duration_since(self.started) > LOGIN_TIMEOUT => self.close("login timed out"),
            Phase::Login(_) => {}
            Phase::FullFeature => match self.ping_sent {
                Some(at) if now.duration_since(at) > NOP_TIMEOUT => self.close("no answer to NOP-In ping"),
                Some(_) => {}
                None if now.duration_since(self.last_rx) > NOP_INTERVAL && self.tx.is_empty() => {
                    // StatSN is not advanced by an unsolicited NOP-In (RFC 7143 §11.19).
                    let mut b = BhsBuf::new(opcode::NOP_IN);
                    b.flags(0x80).itt(RESERVED_TAG).ttt(PING_TTT);
                    b.stat_sn(self.stat_sn).exp_cmd_sn(self.exp_cmd_sn).max_cmd_sn(self.max_cmd_sn());
                    self.push(b, TxData::None, None);
                    self.ping_sent = Some(now);
                }
                None => {}
            },
        }
    }

    // ---- text and logout ----

    fn text_request(&mut self, bhs: Bhs, data: &[u8], env: &mut ConnEnv) {
        let session_type = self.neg.as_ref().expect("full feature phase").session_type;
        let max_xmit = self.max_xmit();
        let local = self.local;
        let negotiator = self.text.get_or_insert_with(|| {
            let cfg = env.shared.login_config();
            // Every portal address (RFC 7143 TargetAddress, one per address), the one this
            // connection reached us on first: the address the initiator already knows works.
            let tpgt = cfg.portal_group_tag;
            let mut addresses = cfg.addresses.clone();
            if let Some(a) = local {
                let own = format!("{a},{tpgt}");
                addresses.retain(|x| *x != own);
                addresses.insert(0, own);
            }
            // An initiator outside the ACLs is not shown the target at all.
            let authorized = self.neg.as_ref().is_some_and(|n| n.authorized);
            let addresses = if authorized { addresses } else { Vec::new() };
            let target_name = if authorized { cfg.target_name.as_str() } else { "" };
            text::TextNegotiator::new(session_type, target_name, &addresses, max_xmit)
        });
        let req = text::TextRequest {
            final_bit: bhs.final_bit(),
            cont: bhs.continue_bit(),
            itt: bhs.itt(),
            ttt: bhs.ttt(),
            data,
        };
        let rsp = match negotiator.step(&req) {
            Ok(r) => r,
            Err(e) => {
                self.protocol_error(&format_args!("bad text request: {e}"));
                return self.push_reject(bhs.bytes(), reject::PROTOCOL_ERROR);
            }
        };
        if let Some(neg) = self.neg.as_mut() {
            neg.max_xmit_data_segment_length = negotiator.max_xmit_data_segment_length();
        }
        let mut b = BhsBuf::new(opcode::TEXT_RESPONSE);
        let flags = (u8::from(rsp.final_bit) << 7) | (u8::from(rsp.cont) << 6);
        b.flags(flags).lun(bhs.lun()).itt(bhs.itt()).ttt(rsp.ttt);
        self.stamp_status(&mut b);
        self.push(b, TxData::Inline(rsp.data), None);
    }

    fn logout(&mut self, bhs: Bhs) {
        // 0: close the session, 1: close this connection — both end everything with one
        // connection per session. 2 (recovery) needs ERL 2.
        let response = match bhs.logout_reason() {
            0 | 1 => 0,
            _ => 2,
        };
        let mut b = BhsBuf::new(opcode::LOGOUT_RESPONSE);
        b.flags(0x80).byte(2, response).itt(bhs.itt()).time2(0, 0);
        self.stamp_status(&mut b);
        self.push(b, TxData::None, None);
        if response == 0 {
            self.close_after_send = true;
        }
    }

    /// Whether the connection asked to close once its queue is sent.
    pub fn wants_close(&self) -> bool {
        self.close_after_send && self.tx.is_empty() && self.pending_tmfs.is_empty()
    }

    /// A table change (LUN added, removed or replaced): a session whose view of the LUNs
    /// changed gets a unit attention; one that sees the same LUNs as before gets none.
    pub fn luns_changed(&mut self, table: &Arc<LunTable>) {
        if matches!(self.phase, Phase::FullFeature) && self.update_view(table) {
            self.nexus.luns_changed();
        }
    }

    /// Recomputes the LUNs this session sees; returns whether they changed.
    fn update_view(&mut self, table: &Arc<LunTable>) -> bool {
        let Some(neg) = &self.neg else { return false };
        let (view, fingerprint) = table.view_for(&neg.initiator_name);
        self.view = view.map(Arc::new);
        let changed = fingerprint != self.view_fingerprint;
        self.view_fingerprint = fingerprint;
        changed
    }

    /// The LUN table commands of this session run against.
    fn luns<'t>(view: &'t Option<Arc<LunTable>>, all: &'t Arc<LunTable>) -> &'t Arc<LunTable> {
        view.as_ref().unwrap_or(all)
    }
}

/// Residual reporting of a SCSI Response or final Data-In.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Residual {
    None,
    /// Fewer bytes moved than the Expected Data Transfer Length.
    Under(u32),
    /// The command wanted more than the Expected Data Transfer Length.
    Over(u32),
}

impl Residual {
    fn of(expected: u32, needed: u32) -> Self {
        match expected.cmp(&needed) {
            std::cmp::Ordering::Equal => Residual::None,
            std::cmp::Ordering::Greater => Residual::Under(expected - needed),
            std::cmp::Ordering::Less => Residual::Over(needed - expected),
        }
    }

    fn flags(self) -> u8 {
        match self {
            Residual::None => 0,
            Residual::Under(_) => 0x02,
            Residual::Over(_) => 0x04,
        }
    }

    fn count(self) -> u32 {
        match self {
            Residual::None => 0,
            Residual::Under(n) | Residual::Over(n) => n,
        }
    }
}

mod command;
mod tmf;
