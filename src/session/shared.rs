//! What every reactor and connection shares: the LUN table (swapped whole, read through a
//! generation counter), the login configuration, limits, the offload pool, the session
//! registry, and the reactors' mailboxes (messages between threads, each with its waker).

use super::{SessionError, SessionInfo, Sessions};
use crate::config::{self, ConnLimits};
use crate::iscsi::stats::ReactorStats;
use crate::protocol::chap::AuthConfig;
use crate::protocol::login::LoginConfig;
use crate::scsi::LunTable;
use crossbeam_channel::Sender;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, RwLock};

/// Messages to a reactor from other threads.
pub enum Msg {
    /// A new connection to adopt, with its unique token.
    Conn(TcpStream, SocketAddr, u64),
    /// Close the connection with this token (session reinstatement elsewhere).
    Close(u64),
    /// Close every connection but keep running (the portal was stopped).
    CloseAll,
    /// Nothing but a wake-up: look at the shared LUN table now.
    Refresh,
    /// Work a connection handed to the offload pool is done.
    Offloaded(crate::offload::Completion),
    /// Abort tasks of other sessions (task management of one session reaching all).
    AbortTasks(AbortRequest),
    /// A reactor finished an [`Msg::AbortTasks`]: the TMF it names may progress.
    AbortDone(AbortReply),
    /// The old connection a reinstating login (this token) waited for is gone.
    Fenced(u64),
    /// Send a snapshot of this reactor's statistics.
    Stats(crossbeam_channel::Sender<ReactorStats>),
    /// Close every connection and exit.
    Stop,
}

/// Aborting tasks of every session on some LUNs (or every LUN) but the requester's.
#[derive(Debug, Clone)]
pub struct AbortRequest {
    /// The LUN ids; `None` for every LUN (target reset by a session that sees them all).
    pub luns: Option<Arc<[u64]>>,
    /// Only the sessions of these I_T nexuses (PREEMPT AND ABORT); `None` for all.
    pub only: Option<Arc<[Arc<str>]>>,
    /// The connection token of the requester, which aborted its own tasks itself.
    pub except: u64,
    /// TARGET COLD RESET: every other connection (any session, discovery too, or still
    /// logging in) is then closed (RFC 7143 §11.5.1).
    pub close: bool,
    /// Where to acknowledge, for a TMF response that waits for every reactor.
    pub reply: Option<AbortReply>,
}

/// The task management request waiting for an [`AbortRequest`].
#[derive(Debug, Clone, Copy)]
pub struct AbortReply {
    pub reactor: usize,
    pub conn: u32,
    pub token: u64,
    pub tmf_itt: u32,
    /// In a reactor's acknowledgement: how many of the tasks it aborted still had backing I/O
    /// in flight; each acknowledges once more (with 0 here) when that I/O has ended.
    pub more: u32,
}

/// The waker of a reactor: an eventfd its ring always has a read posted on.
pub struct Waker(OwnedFd);

impl Waker {
    pub fn new() -> std::io::Result<Self> {
        // SAFETY: eventfd has no memory preconditions; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor we own.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// The eventfd, for the reactor's ring to post its read on.
    pub fn fd(&self) -> i32 {
        self.0.as_raw_fd()
    }

    pub fn wake(&self) {
        let one = 1u64;
        // SAFETY: writes 8 bytes from a live u64 to our eventfd.
        unsafe { libc::write(self.0.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }
}

/// A reactor's mailbox: its channel and the waker that makes its ring look at it.
#[derive(Clone)]
pub struct Mailbox {
    pub tx: Sender<Msg>,
    pub waker: Arc<Waker>,
}

impl Mailbox {
    pub fn send(&self, msg: Msg) {
        if self.tx.send(msg).is_ok() {
            self.waker.wake();
        }
    }
}

/// State shared by every reactor. Nothing here is touched on the I/O path: the LUN table is
/// read through a generation counter, sessions only at login.
pub struct Shared {
    /// Swapped whole by `set_auth`: a connection keeps the one it started its login with.
    login: RwLock<Arc<LoginConfig>>,
    luns: RwLock<Arc<LunTable>>,
    lun_gen: AtomicU64,
    sessions: Sessions,
    reactors: OnceLock<Vec<Mailbox>>,
    next_token: AtomicU64,
    limits: ConnLimits,
    /// Worker threads for commands whose work would block a reactor.
    offload: OnceLock<crate::offload::Pool>,
    /// Open iSCSI connections, counted by the acceptor and decremented at teardown.
    connections: AtomicUsize,
    pub admission: Limits,
}

/// Admission limits (README "Security").
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_connections: usize,
    pub max_sessions_per_initiator: Option<u32>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_connections: config::DEFAULT_MAX_CONNECTIONS, max_sessions_per_initiator: None }
    }
}

impl Shared {
    pub fn new(login: LoginConfig, luns: LunTable) -> Self {
        Self {
            login: RwLock::new(Arc::new(login)),
            luns: RwLock::new(Arc::new(luns)),
            lun_gen: AtomicU64::new(1),
            sessions: Sessions::default(),
            reactors: OnceLock::new(),
            next_token: AtomicU64::new(1),
            connections: AtomicUsize::new(0),
            admission: Limits::default(),
            limits: ConnLimits::default(),
            offload: OnceLock::new(),
        }
    }

    /// Sets the per-connection limits (before any connection exists).
    pub fn with_limits(mut self, limits: ConnLimits) -> Self {
        self.limits = limits;
        self
    }

    pub fn limits(&self) -> &ConnLimits {
        &self.limits
    }

    /// Gives connections driven without [`Target::start`] (the fuzz harness) an offload pool;
    /// a started target makes its own.
    pub fn with_offload(self, pool: crate::offload::Pool) -> Self {
        self.set_offload(pool);
        self
    }

    /// Sets the offload pool, once (a started target does it before the portal opens).
    pub fn set_offload(&self, pool: crate::offload::Pool) {
        let _ = self.offload.set(pool);
    }

    /// The offload pool, if set.
    pub fn offload_pool(&self) -> Option<&crate::offload::Pool> {
        self.offload.get()
    }

    /// The offload pool (started with the reactors, before the portal opens).
    pub fn offload(&self) -> &crate::offload::Pool {
        self.offload.get().expect("the offload pool starts before any connection")
    }

    pub fn login_config(&self) -> Arc<LoginConfig> {
        self.login.read().expect("login config lock poisoned").clone()
    }

    /// New credentials for logins that start from now on; sessions logged in stay.
    pub fn set_auth(&self, auth: AuthConfig) {
        let mut login = self.login.write().expect("login config lock poisoned");
        let mut next = LoginConfig::clone(&login);
        next.auth = auth;
        *login = Arc::new(next);
    }

    /// One more connection, unless `max_connections` are open.
    pub fn admit_connection(&self) -> bool {
        let max = self.admission.max_connections;
        self.connections.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1)).is_ok()
    }

    /// A connection admitted by the acceptor is gone.
    pub fn connection_closed(&self) {
        let _ = self.connections.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }

    /// The current LUN table and its generation.
    pub fn lun_table(&self) -> (Arc<LunTable>, u64) {
        let t = self.luns.read().expect("LUN table lock poisoned");
        (t.clone(), self.lun_gen.load(Ordering::Acquire))
    }

    pub fn lun_generation(&self) -> u64 {
        self.lun_gen.load(Ordering::Acquire)
    }

    /// Publishes a new LUN table; reactors pick it up between commands.
    pub fn publish_luns(&self, table: LunTable) {
        let mut t = self.luns.write().expect("LUN table lock poisoned");
        *t = Arc::new(table);
        self.lun_gen.fetch_add(1, Ordering::AcqRel);
    }

    /// Hands the reactors' mailboxes over, once, before the portal opens.
    pub fn set_reactors(&self, mailboxes: Vec<Mailbox>) {
        let _ = self.reactors.set(mailboxes);
    }

    /// The reactors' mailboxes (empty before they start).
    pub fn reactors(&self) -> &[Mailbox] {
        self.reactors.get().map_or(&[][..], Vec::as_slice)
    }

    fn send_to(&self, reactor: usize, msg: Msg) {
        if let Some(r) = self.reactors().get(reactor) {
            r.send(msg);
        }
    }

    /// Registers a session at the end of a normal login (see [`Sessions::register`]); returns
    /// its TSIH and whether the login must wait for an old connection to be gone before it is
    /// answered (a [`Msg::Fenced`] to its reactor says when).
    pub fn register_session(&self, info: SessionInfo) -> Result<(u16, bool), SessionError> {
        let r = self.sessions.register(info, self.admission.max_sessions_per_initiator)?;
        if let Some((reactor, token)) = r.close {
            self.send_to(reactor, Msg::Close(token));
        }
        Ok((r.tsih, r.close.is_some()))
    }

    /// Forgets a session when its connection ends (unless another connection took it over),
    /// and lets a login waiting for this connection to be gone proceed. Called once the
    /// connection has no operation in flight.
    pub fn unregister_session(&self, tsih: u16, token: u64) {
        if let Some((reactor, waiting)) = self.sessions.unregister(tsih, token) {
            self.send_to(reactor, Msg::Fenced(waiting));
        }
    }

    /// Sends `req` to every reactor; returns how many will acknowledge it.
    pub fn abort_tasks(&self, req: AbortRequest) -> u32 {
        let reactors = self.reactors.get().map_or(&[][..], Vec::as_slice);
        for r in reactors {
            r.send(Msg::AbortTasks(req.clone()));
        }
        if req.reply.is_some() {
            reactors.len() as u32
        } else {
            0
        }
    }

    /// A reactor finished its part of an abort: tells the reactor of the TMF waiting for it.
    pub fn abort_done(&self, reply: AbortReply) {
        self.send_to(reply.reactor, Msg::AbortDone(reply));
    }

    /// Closes every connection on every reactor (LUNs and reactors stay).
    pub fn close_all_connections(&self) {
        for r in self.reactors.get().into_iter().flatten() {
            r.send(Msg::CloseAll);
        }
    }

    /// Wakes every reactor so it picks up a newly published LUN table now rather than at
    /// its next event.
    pub fn wake_reactors(&self) {
        for r in self.reactors.get().into_iter().flatten() {
            r.send(Msg::Refresh);
        }
    }

    /// Every logged-in session, ordered by TSIH.
    pub fn sessions(&self) -> Vec<SessionInfo> {
        self.sessions.list()
    }

    /// A statistics snapshot from every reactor (those that answer within a second).
    pub fn collect_stats(&self) -> Vec<ReactorStats> {
        let Some(reactors) = self.reactors.get() else { return Vec::new() };
        let (tx, rx) = crossbeam_channel::bounded(reactors.len());
        for r in reactors {
            r.send(Msg::Stats(tx.clone()));
        }
        drop(tx);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
        let mut out: Vec<ReactorStats> = (0..reactors.len()).filter_map(|_| rx.recv_deadline(deadline).ok()).collect();
        out.sort_by_key(|s| s.reactor);
        out
    }

    /// A fresh connection token.
    pub fn next_token(&self) -> u64 {
        self.next_token.fetch_add(1, Ordering::Relaxed)
    }
}
