//! Per-core reactors: each thread owns one io_uring, its sockets, its buffer pool, and the
//! connections of the iSCSI engine ([`crate::iscsi`]) it drives.
//!
//! One loop iteration: submit what is queued, gather completions, let each connection advance
//! its state machine, then queue what the connections produced (receives, sends, backing I/O).
//! Every operation is a typed [`Op`] carried in its `user_data` (a connection slot and a task
//! slot, never a pointer). A connection's memory (receive buffer, send headers, task buffers)
//! stays owned until every operation referencing it has completed, even after the peer is
//! gone: the slot counts its receives and sends, the connection its backing work.

use crate::backing::pool::BufPool;
use crate::iscsi::conn::{Conn, ConnEnv, Grant, IoKind, IoReq, NOP_TIMEOUT};
use crate::iscsi::stats;
use crate::scsi::{LunRefs, LunTable};
use crate::session::{Msg, Shared, Waker};
use crossbeam_channel::Receiver;
use io_uring::{opcode, types, IoUring};
use std::collections::VecDeque;
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

mod fixed;
mod spin;
use fixed::FixedFiles;
use spin::{Arm, ArmChooser, SpinPolicy, BATCH_CQES, BATCH_WAIT, SPIN};

/// How a reactor waits for work (see the `poll_mode` configuration key).
pub use crate::config::PollMode;

/// Submission queue entries per ring.
const RING_ENTRIES: u32 = 1024;
/// Data-In scratch: large enough for REPORT LUNS of every possible LUN.
const SCRATCH: usize = 256 * 1024;
/// What a ring operation is for, carried in its `user_data`: the completion is routed by it,
/// never through a pointer. Connection and task are slab indices (the reactor's connection
/// table, the connection's task table); a freed slot is only reused once every operation
/// naming it has completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    /// A receive on connection `conn`'s socket, into its receive buffer (or a task buffer).
    Recv { conn: u32 },
    /// A `sendmsg` of connection `conn`'s transmit queue.
    Send { conn: u32 },
    /// Backing I/O of task `task` of connection `conn` ([`IoReq`]).
    Io { conn: u32, task: u16 },
    /// The read posted on the reactor's eventfd ([`Waker`]).
    Wake,
    /// The periodic timeout that drives the connections' timers.
    Tick,
    /// Cancellation of the wake read or the tick at shutdown.
    Cancel,
}

impl Op {
    const RECV: u64 = 1;
    const SEND: u64 = 2;
    const IO: u64 = 3;
    const WAKE: u64 = 4;
    const TICK: u64 = 5;
    const CANCEL: u64 = 6;

    /// Kind in bits 0-7, task in 8-23, connection in 24-55.
    fn user_data(self) -> u64 {
        let (kind, conn, task) = match self {
            Op::Recv { conn } => (Self::RECV, conn, 0),
            Op::Send { conn } => (Self::SEND, conn, 0),
            Op::Io { conn, task } => (Self::IO, conn, task),
            Op::Wake => (Self::WAKE, 0, 0),
            Op::Tick => (Self::TICK, 0, 0),
            Op::Cancel => (Self::CANCEL, 0, 0),
        };
        kind | (u64::from(task) << 8) | (u64::from(conn) << 24)
    }

    fn from_user_data(ud: u64) -> Option<Self> {
        let (conn, task) = ((ud >> 24) as u32, ((ud >> 8) & 0xFFFF) as u16);
        Some(match ud & 0xFF {
            Self::RECV => Op::Recv { conn },
            Self::SEND => Op::Send { conn },
            Self::IO => Op::Io { conn, task },
            Self::WAKE => Op::Wake,
            Self::TICK => Op::Tick,
            Self::CANCEL => Op::Cancel,
            _ => return None,
        })
    }
}

/// Errors setting up a reactor.
#[derive(Debug, thiserror::Error)]
pub enum ReactorError {
    /// The kernel refused the io_uring (too old, or io_uring disabled by sysctl).
    #[error("cannot create an io_uring: {0}")]
    Ring(std::io::Error),
    /// An operation the data path needs is not supported by this kernel.
    #[error("this kernel's io_uring lacks {0}")]
    MissingOp(&'static str),
    #[error("cannot create an eventfd: {0}")]
    EventFd(std::io::Error),
}

/// What a reactor lends a connection for one event: its fields borrowed one by one, so the
/// connection itself (in `conns`) can be borrowed mutably at the same time.
macro_rules! conn_env {
    ($r:expr) => {
        ConnEnv {
            luns: &$r.luns,
            lun_refs: &$r.lun_refs,
            pool: &mut $r.pool,
            scratch: &mut $r.scratch,
            io: &mut $r.io,
            shared: &$r.shared,
            stats: &mut $r.stats,
            reactor: $r.id,
            now: Instant::now(),
        }
    };
}

/// A connection and its transport: the socket, and the ring operations on it.
struct Slot {
    conn: Box<Conn>,
    stream: TcpStream,
    /// Receives and sends posted on the socket (they reference the connection's buffers).
    ring_ops: u32,
    recv_posted: bool,
    /// The socket was shut down after the connection started closing.
    shut: bool,
    touched: bool,
    /// In the reactor's queue of connections whose tasks wait for buffer memory.
    buf_queued: bool,
}

impl Slot {
    /// No operation references the connection's memory any more: it may be freed.
    fn idle(&self) -> bool {
        self.ring_ops == 0 && self.conn.work_inflight() == 0
    }
}

pub struct Reactor {
    id: usize,
    // Field order fixes drop order: the ring goes first, before the memory its (already
    // completed or cancelled) operations pointed at.
    ring: IoUring,
    conns: Vec<Option<Slot>>,
    free_slots: Vec<u32>,
    touched: Vec<u32>,
    pool: BufPool,
    files: FixedFiles,
    /// The LUN table changed and the fixed-file table has not caught up yet.
    files_stale: bool,
    /// Connections whose tasks wait for buffer memory, in the order they started waiting.
    buf_waiters: VecDeque<u32>,
    stats: stats::Stats,
    scratch: Box<[u8]>,
    io: Vec<IoReq>,
    released: Vec<u16>,
    cqes: Vec<(u64, i32)>,
    shared: Arc<Shared>,
    rx: Receiver<Msg>,
    waker: Arc<Waker>,
    wake_buf: Box<u64>,
    tick_ts: Box<types::Timespec>,
    /// Wake read and tick timeout are posted (they reference wake_buf / tick_ts).
    aux_inflight: u32,
    luns: Arc<LunTable>,
    lun_refs: LunRefs,
    lun_gen: u64,
    poll: PollMode,
    /// How this (non-busy) reactor waits when idle: spin, sleep or batch, chosen by trying
    /// ([`spin`]).
    idle: ArmChooser,
    stopping: bool,
}

impl Reactor {
    pub fn new(
        id: usize,
        shared: Arc<Shared>,
        rx: Receiver<Msg>,
        waker: Arc<Waker>,
        poll: PollMode,
    ) -> Result<Self, ReactorError> {
        // A completion queue far larger than the submission queue: every connection keeps a
        // receive, a send and its backing I/O in flight, and completions must never overflow.
        // COOP_TASKRUN + TASKRUN_FLAG: the kernel flags pending completion work in the shared
        // ring instead of interrupting us, so a spinning reactor enters the kernel only when
        // there is something to submit or reap.
        let ring = IoUring::builder()
            .setup_single_issuer()
            .setup_coop_taskrun()
            .setup_taskrun_flag()
            .setup_cqsize(RING_ENTRIES * 16)
            .build(RING_ENTRIES)
            .or_else(|_| IoUring::new(RING_ENTRIES))
            .map_err(ReactorError::Ring)?;

        let mut probe = io_uring::Probe::new();
        ring.submitter().register_probe(&mut probe).map_err(ReactorError::Ring)?;
        for (code, name) in [
            (opcode::Recv::CODE, "RECV"),
            (opcode::SendMsg::CODE, "SENDMSG"),
            (opcode::Read::CODE, "READ"),
            (opcode::Write::CODE, "WRITE"),
            (opcode::Fsync::CODE, "FSYNC"),
            (opcode::Timeout::CODE, "TIMEOUT"),
            (opcode::AsyncCancel::CODE, "ASYNC_CANCEL"),
        ] {
            if !probe.is_supported(code) {
                return Err(ReactorError::MissingOp(name));
            }
        }
        let (luns, lun_gen) = shared.lun_table();
        let mut pool = BufPool::new(shared.limits().buffer_memory_mib as usize * (1 << 20));
        fixed::enable_fixed_buffers(&ring.submitter(), &mut pool);
        let mut files = FixedFiles::new(&ring.submitter());
        files.sync(&backing_fds(&luns), &ring.submitter());
        // Batching adds latency: only where asked for (`frugal`) and the kernel has it.
        let can_batch = poll == PollMode::Frugal && ring.params().is_feature_min_timeout();
        Ok(Self {
            id,
            ring,
            conns: Vec::new(),
            free_slots: Vec::new(),
            touched: Vec::with_capacity(256),
            pool,
            files,
            files_stale: false,
            buf_waiters: VecDeque::new(),
            stats: stats::Stats::default(),
            scratch: vec![0u8; SCRATCH].into_boxed_slice(),
            io: Vec::with_capacity(RING_ENTRIES as usize),
            released: Vec::with_capacity(64),
            cqes: Vec::with_capacity(RING_ENTRIES as usize * 2),
            shared,
            rx,
            waker,
            wake_buf: Box::new(0),
            tick_ts: Box::new(types::Timespec::new().sec(1)),
            aux_inflight: 0,
            lun_refs: LunRefs::new(&luns),
            luns,
            lun_gen,
            poll,
            idle: ArmChooser::new(Instant::now(), can_batch),
            stopping: false,
        })
    }

    fn push(&mut self, sqe: io_uring::squeue::Entry) {
        // SAFETY: every entry built here points at memory owned by the reactor or by a
        // connection/task that outlives the operation (see the module doc).
        while unsafe { self.ring.submission().push(&sqe) }.is_err() {
            // Queue full: hand what is there to the kernel and retry.
            if let Err(e) = self.ring.submit() {
                log::error!("reactor {}: io_uring submit failed: {e}", self.id);
            }
        }
    }

    fn arm_wake(&mut self) {
        let e = opcode::Read::new(types::Fd(self.waker.fd()), (&mut *self.wake_buf as *mut u64).cast(), 8)
            .build()
            .user_data(Op::Wake.user_data());
        self.push(e);
        self.aux_inflight += 1;
    }

    fn arm_tick(&mut self) {
        let e = opcode::Timeout::new(&*self.tick_ts).build().user_data(Op::Tick.user_data());
        self.push(e);
        self.aux_inflight += 1;
    }

    /// Runs until told to stop and every connection is gone.
    pub fn run(mut self) {
        self.arm_wake();
        self.arm_tick();
        let mut last_activity = Instant::now();
        let mut idle_spins = 0u32;
        let mut spin = SpinPolicy::new();
        let (mut spin_for, mut slept) = (SPIN, false);
        let adaptive = self.poll != PollMode::Busy;
        loop {
            // Reading the clock every spin costs more than the spin: look every 64.
            let wait =
                adaptive && idle_spins >= 64 && idle_spins.is_multiple_of(64) && last_activity.elapsed() >= spin_for;
            slept |= wait;
            let res = if wait && self.idle.arm() == Arm::Batch {
                let args = types::SubmitArgs::new().min_wait_usec(BATCH_WAIT.as_micros() as u32);
                self.ring.submitter().submit_with_args(BATCH_CQES, &args).map(Some)
            } else if wait {
                self.ring.submit_and_wait(1).map(Some)
            } else if self.needs_enter() {
                self.ring.submit().map(Some)
            } else {
                Ok(None) // nothing to submit, no kernel work pending: poll the CQ only
            };
            if let Err(e) = res {
                if !matches!(e.raw_os_error(), Some(libc::EINTR | libc::EBUSY | libc::ETIME)) {
                    log::error!("reactor {}: io_uring_enter failed: {e}", self.id);
                }
            }
            if self.files_stale {
                self.sync_files();
            }
            self.cqes.clear();
            self.cqes.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
            if self.cqes.is_empty() {
                if idle_spins == 0 {
                    spin_for = match self.idle.arm() {
                        Arm::Spin => spin.begin_idle(),
                        Arm::Sleep | Arm::Batch => Duration::ZERO,
                    };
                    slept = false;
                }
                idle_spins = idle_spins.wrapping_add(1);
            } else {
                let now = Instant::now();
                if idle_spins > 0 {
                    spin.end_idle(now.saturating_duration_since(last_activity), spin_for, slept);
                }
                idle_spins = 0;
                last_activity = now;
                if adaptive {
                    self.idle.at(now, self.stats.ios());
                }
            }
            let cqes = std::mem::take(&mut self.cqes);
            for &(ud, res) in &cqes {
                self.complete(ud, res);
            }
            self.cqes = cqes;
            self.refresh_luns();
            self.after_events();
            if self.stopping && self.conns.iter().all(Option::is_none) && self.aux_inflight == 0 {
                break;
            }
        }
        log::debug!("reactor {} stopped", self.id);
    }

    /// Brings the fixed-file table to the current LUN table, once every queued operation has
    /// reached the kernel: those name their file by slot, and a slot cleared or refilled
    /// under a queued operation would fail it or, worse, point it at another LUN's file.
    /// (The kernel resolves a slot when it takes the operation, and keeps that file alive
    /// until the operation ends.) Until then a new LUN's I/O uses its plain descriptor.
    fn sync_files(&mut self) {
        if self.files_stale && self.ring.submission().is_empty() {
            self.files.sync(&backing_fds(&self.luns), &self.ring.submitter());
            self.files_stale = false;
        }
    }

    /// Whether the kernel must be entered: entries to submit, completion work it flagged, or
    /// completions that overflowed the CQ.
    fn needs_enter(&mut self) -> bool {
        let sq = self.ring.submission();
        !sq.is_empty() || sq.taskrun() || sq.cq_overflow()
    }

    fn complete(&mut self, ud: u64, res: i32) {
        let op = Op::from_user_data(ud).unwrap_or_else(|| panic!("unknown operation in completion {ud:#x}"));
        let idx = match op {
            Op::Wake => {
                self.aux_inflight -= 1;
                self.drain_messages();
                if !self.stopping {
                    self.arm_wake();
                }
                return;
            }
            Op::Tick => {
                self.aux_inflight -= 1;
                let now = Instant::now();
                for slot in self.conns.iter_mut().flatten() {
                    slot.conn.tick(now, &mut self.pool);
                }
                self.touch_all();
                if !self.stopping {
                    self.arm_tick();
                }
                return;
            }
            Op::Cancel => return,
            Op::Recv { conn } => {
                if res > 0 {
                    self.idle.received(res as usize);
                }
                conn
            }
            Op::Send { conn } | Op::Io { conn, .. } => conn,
        };
        let Some(Some(slot)) = self.conns.get_mut(idx as usize) else {
            panic!("completion {ud:#x} for a free connection slot");
        };
        let conn = &mut slot.conn;
        if !matches!(op, Op::Io { .. }) {
            slot.ring_ops -= 1;
        }
        if !slot.touched {
            slot.touched = true;
            self.touched.push(idx);
        }
        let mut env = conn_env!(self);
        match op {
            Op::Recv { .. } => {
                slot.recv_posted = false;
                if res > 0 && !conn.closing {
                    conn.on_recv(res as usize, &mut env);
                } else if res <= 0 {
                    let why = if res == 0 {
                        "peer closed".to_string()
                    } else {
                        std::io::Error::from_raw_os_error(-res).to_string()
                    };
                    conn.close(&why);
                }
            }
            Op::Send { .. } => {
                self.released.clear();
                let released = &mut self.released;
                if res < 0 {
                    conn.tx.complete(0, |_| {});
                    conn.close(&std::io::Error::from_raw_os_error(-res).to_string());
                } else {
                    conn.tx.complete(res as usize, |s| released.push(s));
                }
                for &s in released.iter() {
                    conn.release_sent(s, env.pool);
                }
                conn.sent(&mut env);
            }
            Op::Io { task, .. } => conn.io_done(task, res, &mut env),
            Op::Wake | Op::Tick | Op::Cancel => unreachable!("handled above"),
        }
        self.submit_io(idx);
    }

    fn touch_all(&mut self) {
        for (i, slot) in self.conns.iter_mut().enumerate() {
            if let Some(slot) = slot {
                if !slot.touched {
                    slot.touched = true;
                    self.touched.push(i as u32);
                }
            }
        }
    }

    fn drain_messages(&mut self) {
        while let Ok(msg) = self.rx.try_recv() {
            match msg {
                Msg::Conn(stream, peer, token) => {
                    if self.stopping {
                        continue;
                    }
                    let _ = stream.set_nodelay(true);
                    set_user_timeout(&stream, NOP_TIMEOUT);
                    let local = stream.local_addr().ok();
                    let mut conn = Box::new(Conn::new(peer, local, token, &self.shared, Instant::now()));
                    let idx = self.free_slots.pop().unwrap_or_else(|| {
                        self.conns.push(None);
                        (self.conns.len() - 1) as u32
                    });
                    conn.slot = idx;
                    self.conns[idx as usize] = Some(Slot {
                        conn,
                        stream,
                        ring_ops: 0,
                        recv_posted: false,
                        shut: false,
                        touched: true,
                        buf_queued: false,
                    });
                    self.touched.push(idx);
                }
                Msg::Close(token) => {
                    for slot in self.conns.iter_mut().flatten() {
                        if slot.conn.token == token {
                            slot.conn.close("session reinstated by a new login");
                        }
                    }
                    self.touch_all();
                }
                Msg::CloseAll => {
                    for slot in self.conns.iter_mut().flatten() {
                        slot.conn.close("portal stopped");
                    }
                    self.touch_all();
                }
                Msg::Refresh => {}
                Msg::Offloaded(done) => self.offloaded(done),
                Msg::AbortTasks(req) => {
                    let mut more = 0;
                    for slot in self.conns.iter_mut().flatten() {
                        if slot.conn.token != req.except {
                            let mut env = conn_env!(self);
                            let (luns, only) = (req.luns.as_deref(), req.only.as_deref());
                            more += slot.conn.abort_foreign(luns, only, req.reply, &mut env);
                            if req.close {
                                slot.conn.close("target cold reset");
                            }
                        }
                    }
                    self.touch_all();
                    if let Some(reply) = req.reply {
                        // Sent before any of those tasks' own acknowledgements (same thread).
                        self.shared.abort_done(crate::session::AbortReply { more, ..reply });
                    }
                }
                Msg::Fenced(token) => {
                    for slot in self.conns.iter_mut().flatten() {
                        if slot.conn.token == token {
                            slot.conn.release_login(&self.luns);
                        }
                    }
                    self.touch_all();
                }
                Msg::AbortDone(reply) => {
                    if let Some(Some(slot)) = self.conns.get_mut(reply.conn as usize) {
                        if slot.conn.token == reply.token {
                            slot.conn.abort_acknowledged(&reply);
                            if !slot.touched {
                                slot.touched = true;
                                self.touched.push(reply.conn);
                            }
                        }
                    }
                }
                Msg::Stats(reply) => {
                    let live = self.conns.iter().flatten().count();
                    let _ = reply.send(self.stats.snapshot(self.id, live, self.pool.stats()));
                }
                Msg::Stop => {
                    self.stopping = true;
                    for slot in self.conns.iter_mut().flatten() {
                        slot.conn.close("target stopping");
                    }
                    self.touch_all();
                    // The wake read and the tick reference reactor memory: cancel them.
                    for op in [Op::Wake, Op::Tick] {
                        let e = opcode::AsyncCancel::new(op.user_data()).build().user_data(Op::Cancel.user_data());
                        self.push(e);
                    }
                }
            }
        }
    }

    /// Routes an offloaded job's completion to its task. The connection is still there: its
    /// [`Conn::work_inflight`] counts the job, so it cannot have been freed.
    fn offloaded(&mut self, done: crate::offload::Completion) {
        let idx = done.route.conn;
        let Some(Some(slot)) = self.conns.get_mut(idx as usize) else {
            panic!("offload completion for a free connection slot {idx}");
        };
        if !slot.touched {
            slot.touched = true;
            self.touched.push(idx);
        }
        let mut env = conn_env!(self);
        slot.conn.offload_done(done.route.task, done.output, &mut env);
        self.submit_io(idx);
    }

    fn refresh_luns(&mut self) {
        if self.shared.lun_generation() == self.lun_gen {
            return;
        }
        (self.luns, self.lun_gen) = self.shared.lun_table();
        self.lun_refs = LunRefs::new(&self.luns);
        self.files_stale = true;
        let _ = self.ring.submit();
        self.sync_files();
        for slot in self.conns.iter_mut().flatten() {
            slot.conn.luns_changed(&self.luns);
            let mut env = conn_env!(self);
            slot.conn.fence_removed_luns(&mut env);
        }
        self.touch_all();
    }

    /// Posts receives and sends for every connection touched in this iteration, submits the
    /// backing I/O they asked for, and frees connections that are done.
    fn after_events(&mut self) {
        if self.pool.waiting() > 0 || !self.buf_waiters.is_empty() {
            self.grant_buffers();
        }
        let touched = std::mem::take(&mut self.touched);
        for &idx in &touched {
            // Commands held back by task attributes whose turn may have come (rare).
            if let Some(slot) = self.conns[idx as usize].as_mut().filter(|s| s.conn.order_release_pending()) {
                let mut env = conn_env!(self);
                slot.conn.release_ordered(&mut env);
                self.submit_io(idx);
            }
        }
        for &idx in &touched {
            let Some(slot) = self.conns[idx as usize].as_mut() else { continue };
            slot.touched = false;
            if slot.conn.wants_close() {
                slot.conn.close("logout or failed login");
            }
            if slot.conn.closing {
                if !slot.shut {
                    slot.shut = true;
                    // Wakes a posted receive with 0 bytes; a posted send fails.
                    let _ = slot.stream.shutdown(std::net::Shutdown::Both);
                }
                if slot.idle() {
                    let mut slot = self.conns[idx as usize].take().expect("checked");
                    let mut env = conn_env!(self);
                    slot.conn.teardown(&mut env);
                    self.free_slots.push(idx);
                }
                continue;
            }
            let fd = types::Fd(slot.stream.as_raw_fd());
            let conn = &mut slot.conn;
            let mut sqes: [Option<io_uring::squeue::Entry>; 2] = [None, None];
            if !slot.recv_posted && conn.wants_recv() {
                let (ptr, len) = conn.rx_space();
                sqes[0] =
                    Some(opcode::Recv::new(fd, ptr, len as u32).build().user_data(Op::Recv { conn: idx }.user_data()));
                slot.recv_posted = true;
                slot.ring_ops += 1;
            }
            if let Some(msg) = conn.tx.prepare() {
                let send = opcode::SendMsg::new(fd, msg).flags(libc::MSG_NOSIGNAL as u32).build();
                sqes[1] = Some(send.user_data(Op::Send { conn: idx }.user_data()));
                slot.ring_ops += 1;
            }
            for e in sqes.into_iter().flatten() {
                self.push(e);
            }
        }
        self.touched = touched;
        self.touched.clear();
        if self.stopping {
            // Connections closed while stopping must still be reaped.
            for i in 0..self.conns.len() {
                if let Some(slot) = self.conns[i].as_mut() {
                    if !slot.touched {
                        slot.touched = true;
                        self.touched.push(i as u32);
                    }
                }
            }
        }
    }

    /// Hands freed buffer memory to the tasks waiting for it: connection by connection in the
    /// order they started waiting, each connection's tasks oldest first; stops at the first
    /// that does not fit in what the budget has left, so a large command is not starved by
    /// smaller ones behind it (one over its connection's own share is passed over instead).
    fn grant_buffers(&mut self) {
        for i in 0..self.touched.len() {
            let idx = self.touched[i];
            if let Some(slot) = self.conns[idx as usize].as_mut() {
                if !slot.buf_queued && slot.conn.waits_for_buffers() {
                    slot.buf_queued = true;
                    self.buf_waiters.push_back(idx);
                }
            }
        }
        let mut i = 0;
        while i < self.buf_waiters.len() {
            let idx = self.buf_waiters[i];
            let Some(slot) = self.conns[idx as usize].as_mut().filter(|s| s.buf_queued) else {
                self.buf_waiters.remove(i); // gone (its slot may hold a newer connection)
                continue;
            };
            // A closing connection's waiting tasks end at its teardown.
            let grant = if slot.conn.closing {
                Grant::Done
            } else {
                let mut env = conn_env!(self);
                let grant = slot.conn.grant_buffers(&mut env);
                if !slot.touched {
                    slot.touched = true;
                    self.touched.push(idx);
                }
                self.submit_io(idx);
                grant
            };
            match grant {
                Grant::Done => {
                    if let Some(slot) = self.conns[idx as usize].as_mut() {
                        slot.buf_queued = false;
                    }
                    self.buf_waiters.remove(i);
                }
                // Over its own share: the connections behind it may go first.
                Grant::OwnShare => i += 1,
                Grant::Budget => return,
            }
        }
    }

    /// Submits the backing I/O a connection asked for while handling one event.
    fn submit_io(&mut self, conn_idx: u32) {
        fixed::apply_buffer_updates(&self.ring.submitter(), &mut self.pool);
        let reqs = std::mem::take(&mut self.io);
        for r in &reqs {
            let ud = Op::Io { conn: conn_idx, task: r.task }.user_data();
            let e = self.io_entry(r);
            self.push(e.user_data(ud));
        }
        self.io = reqs;
        self.io.clear();
    }

    /// The ring operation for a backing-store request: on the fixed file and through the fixed
    /// buffer registered for it, where they are.
    fn io_entry(&self, r: &IoReq) -> io_uring::squeue::Entry {
        // A fixed file is named by its slot in the fd field, flagged FIXED_FILE.
        // While the table lags the LUNs (`sync_files`), its slots may name files that are gone.
        let slot = if self.files_stale { None } else { self.files.slot(r.fd) };
        let (fd, flags) = match slot {
            Some(slot) => (types::Fd(slot as i32), io_uring::squeue::Flags::FIXED_FILE),
            None => (types::Fd(r.fd), io_uring::squeue::Flags::empty()),
        };
        let fixed = self.pool.fixed_index(r.buf);
        let dsync = |f| if f { libc::RWF_DSYNC } else { 0 };
        match (r.kind, fixed) {
            (IoKind::Read, Some(i)) => opcode::ReadFixed::new(fd, r.buf, r.len, i).offset(r.offset).build(),
            (IoKind::Read, None) => opcode::Read::new(fd, r.buf, r.len).offset(r.offset).build(),
            (IoKind::Write { dsync: d }, Some(i)) => {
                opcode::WriteFixed::new(fd, r.buf, r.len, i).offset(r.offset).rw_flags(dsync(d)).build()
            }
            (IoKind::Write { dsync: d }, None) => {
                opcode::Write::new(fd, r.buf, r.len).offset(r.offset).rw_flags(dsync(d)).build()
            }
            (IoKind::Flush, _) => opcode::Fsync::new(fd).flags(types::FsyncFlags::DATASYNC).build(),
        }
        .flags(flags)
    }
}

/// The descriptors of a LUN table's backing files.
fn backing_fds(luns: &LunTable) -> Vec<i32> {
    luns.iter()
        .filter_map(|l| match &l.backing {
            crate::backing::Backing::File(f) => Some(f.fd()),
            _ => None,
        })
        .collect()
}

/// Bounds how long sent data may stay unacknowledged before the kernel drops the connection:
/// a dead peer is noticed even while a send is outstanding (when NOP-In pings are not sent).
fn set_user_timeout(stream: &TcpStream, timeout: Duration) {
    let ms = timeout.as_millis() as libc::c_uint;
    // SAFETY: setsockopt reads a c_uint from a live local for the given length.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_USER_TIMEOUT,
            (&ms as *const libc::c_uint).cast(),
            std::mem::size_of::<libc::c_uint>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        log::debug!("TCP_USER_TIMEOUT: {}", std::io::Error::last_os_error());
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_operation_survives_its_user_data() {
        use super::Op;
        let ops = [
            Op::Recv { conn: 0 },
            Op::Send { conn: u32::MAX },
            Op::Io { conn: 77_000, task: u16::MAX },
            Op::Io { conn: 1, task: 0 },
            Op::Wake,
            Op::Tick,
            Op::Cancel,
        ];
        for op in ops {
            assert_eq!(Op::from_user_data(op.user_data()), Some(op));
        }
        assert_eq!(Op::from_user_data(0), None);
        assert_eq!(Op::from_user_data(0xFF), None);
    }
}
