//! The target: LUN table, reactors, the listener, sessions, and orderly shutdown.

use crate::backing::{self, BackingKind, OpenError};
use crate::config::{self, Config, ConfigError, ConnLimits, LunConfig};
use crate::protocol::chap::AuthConfig;
use crate::protocol::login::LoginConfig;
use crate::reactor::{Msg, Reactor, ReactorError, ReactorStats, Waker};
use crate::scsi::{lun, Lun, LunTable};
use crossbeam_channel::Sender;
use std::collections::HashMap;
use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Errors starting or running the target.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The portal address cannot be bound (in use, not local, no permission).
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: String, source: std::io::Error },
    /// The configuration error names the LUN itself when it can (`lun x: ...`); only the
    /// others get the `LUN x:` prefix, so no message reads `LUN x: lun x: ...`.
    #[error("{}", lun_message(name, source))]
    Lun { name: String, source: ConfigError },
    /// A LUN's store cannot be opened, created or grown (the error names the LUN).
    #[error(transparent)]
    Store(#[from] OpenError),
    #[error("LUN {name}: no free LUN id")]
    NoLunId { name: String },
    #[error(transparent)]
    Reactor(#[from] ReactorError),
    /// io_uring is switched off here or lacks operations (with the cause and the fix).
    #[error(transparent)]
    Uring(#[from] crate::uring_check::UringError),
    #[error(transparent)]
    Metrics(#[from] crate::metrics::MetricsError),
    #[error("cannot start a thread: {0}")]
    Thread(std::io::Error),
    #[error("signal handling: {0}")]
    Signal(std::io::Error),
    #[error(transparent)]
    Control(#[from] crate::control::ControlError),
    /// `control_socket_group` names no group, or the socket cannot be given to it.
    #[error("control_socket_group {group:?}: {message}")]
    SocketGroup { group: String, message: String },
    /// No LUN has this name.
    #[error("no LUN named {name:?}")]
    LunNotFound { name: String },
    /// The requested LUN id belongs to another LUN.
    #[error("LUN id {id} is in use by LUN {by:?}")]
    LunIdInUse { id: u64, by: String },
    /// A removed or replaced LUN's store is still used by commands in flight.
    #[error(
        "LUN {name:?} is out of the table, but {holders} command(s) still use its store after {secs} s; \
         the store is closed when they end (remove_lun {name:?} waits for them again)"
    )]
    LunBusy { name: String, holders: usize, secs: u64 },
    /// Two LUNs over one image would corrupt each other's data.
    #[error("{path} is already exported by LUN {by:?}")]
    FileInUse { path: PathBuf, by: String },
}

fn lun_message(name: &str, source: &ConfigError) -> String {
    match source {
        ConfigError::Invalid { key, .. } if key.starts_with(&format!("lun {name}.")) => source.to_string(),
        _ => format!("LUN {name}: {source}"),
    }
}

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

struct ReactorHandle {
    tx: Sender<Msg>,
    waker: Arc<Waker>,
}

impl ReactorHandle {
    fn send(&self, msg: Msg) {
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
    sessions: Mutex<HashMap<u16, SessionInfo>>,
    /// Reinstatement fences: the token of a connection being closed, and the (reactor, token)
    /// of the login waiting for it to be gone. Changed under the `sessions` lock.
    fences: Mutex<HashMap<u64, (usize, u64)>>,
    next_tsih: Mutex<u16>,
    reactors: OnceLock<Vec<ReactorHandle>>,
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
            sessions: Mutex::new(HashMap::new()),
            fences: Mutex::new(HashMap::new()),
            next_tsih: Mutex::new(0),
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
        let _ = self.offload.set(pool);
        self
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
    fn admit_connection(&self) -> bool {
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

    fn close_conn(&self, reactor: usize, token: u64) {
        if let Some(r) = self.reactors.get().and_then(|rs| rs.get(reactor)) {
            r.send(Msg::Close(token));
        }
    }

    /// Registers a session at the end of a normal login; returns its TSIH and whether the
    /// login must wait for an old connection to be gone before it is answered (a
    /// [`Msg::Fenced`] to its reactor says when).
    ///
    /// TSIH 0 starts a new session; an older session of the same initiator and ISID is closed
    /// (session reinstatement, RFC 7143 §6.3.5). A non-zero TSIH must name that initiator's
    /// session, whose connection is then replaced. Either way the old connection's tasks all
    /// end (completed, or aborted with the connection) before the new login is answered, so
    /// no old write can land after the new session's.
    pub fn register_session(&self, mut info: SessionInfo) -> Result<(u16, bool), SessionError> {
        let mut sessions = self.sessions.lock().expect("session table lock poisoned");
        let same =
            |e: &SessionInfo| e.discovery == info.discovery && e.initiator == info.initiator && e.isid == info.isid;
        let fence = |old: &SessionInfo, new: &SessionInfo| {
            self.fences.lock().expect("fence lock poisoned").insert(old.token, (new.reactor, new.token));
            self.close_conn(old.reactor, old.token);
        };
        if info.tsih != 0 {
            let entry = sessions.get_mut(&info.tsih).filter(|e| same(e)).ok_or(SessionError::NoSuchSession)?;
            let fenced = entry.token != info.token;
            if fenced {
                fence(entry, &info);
            }
            let tsih = info.tsih;
            *entry = info;
            return Ok((tsih, fenced));
        }
        let mut fenced = false;
        if let Some(old) = sessions.iter().find(|(_, e)| !info.discovery && same(e)).map(|(t, _)| *t) {
            let e = sessions.remove(&old).expect("found above");
            fence(&e, &info);
            fenced = true;
        }
        if let (Some(max), false) = (self.admission.max_sessions_per_initiator, info.discovery) {
            let held = sessions.values().filter(|e| !e.discovery && e.initiator.eq_ignore_ascii_case(&info.initiator));
            if held.count() >= max as usize {
                return Err(SessionError::InitiatorSessionLimit(max));
            }
        }
        let mut next = self.next_tsih.lock().expect("TSIH lock poisoned");
        for _ in 0..u16::MAX {
            *next = next.wrapping_add(1).max(1);
            if !sessions.contains_key(&next) {
                info.tsih = *next;
                sessions.insert(*next, info);
                return Ok((*next, fenced));
            }
        }
        Err(SessionError::TooManySessions)
    }

    /// Forgets a session when its connection ends (unless another connection took it over),
    /// and lets a login waiting for this connection to be gone proceed. Called once the
    /// connection has no operation in flight.
    pub fn unregister_session(&self, tsih: u16, token: u64) {
        let mut sessions = self.sessions.lock().expect("session table lock poisoned");
        if sessions.get(&tsih).is_some_and(|e| e.token == token) {
            sessions.remove(&tsih);
        }
        if let Some((reactor, waiting)) = self.fences.lock().expect("fence lock poisoned").remove(&token) {
            if let Some(r) = self.reactors.get().and_then(|rs| rs.get(reactor)) {
                r.send(Msg::Fenced(waiting));
            }
        }
    }

    /// Sends `req` to every reactor; returns how many will acknowledge it.
    pub fn abort_tasks(&self, req: crate::reactor::AbortRequest) -> u32 {
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
    pub fn abort_done(&self, reply: crate::reactor::AbortReply) {
        if let Some(r) = self.reactors.get().and_then(|rs| rs.get(reply.reactor)) {
            r.send(Msg::AbortDone(reply));
        }
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
        let sessions = self.sessions.lock().expect("session table lock poisoned");
        let mut v: Vec<SessionInfo> = sessions.values().cloned().collect();
        v.sort_by_key(|s| s.tsih);
        v
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

    fn next_token(&self) -> u64 {
        self.next_token.fetch_add(1, Ordering::Relaxed)
    }
}

/// Opens the configured LUNs, giving each its own LUN id (explicit, or the lowest free one).
/// Also returns the image files this created, for `remove_created_on_close`.
pub fn build_luns(cfg: &Config) -> Result<(LunTable, Vec<PathBuf>), TargetError> {
    let iqn = cfg.target_iqn();
    let mut luns: Vec<Arc<Lun>> = Vec::new();
    let explicit: Vec<u64> = cfg.luns.iter().filter_map(|l| l.lun_id).collect();
    let mut created = Vec::new();
    for lc in &cfg.luns {
        let store = backing::open_lun_store(cfg, lc)?;
        let (backing, path) = (store.backing, store.path);
        if store.created {
            created.extend(path.clone());
        }
        let id = match lc.lun_id {
            Some(id) => id,
            None => (0..=lun::MAX_LUN_ID)
                .find(|id| !explicit.contains(id) && !luns.iter().any(|l| l.id == *id))
                .ok_or_else(|| TargetError::NoLunId { name: lc.name.clone() })?,
        };
        let read_only = lc.read_only;
        let lun = Lun::new(id, &lc.name, path, backing, read_only, &iqn)
            .with_initiators(lc.initiators.clone())
            .with_removable(lc.removable);
        luns.push(Arc::new(lun));
    }
    Ok((LunTable::new(luns), created))
}

/// How long removing a LUN waits for its in-flight commands to finish before reporting an
/// error (tasks waiting for Data-Out are failed at once; this bounds I/O in flight and Data-In
/// of the RAM store still being sent to a slow reader).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// The open portal: its listening socket and the thread accepting on it.
struct Portal {
    listener: Arc<TcpListener>,
    acceptor: JoinHandle<()>,
}

impl Portal {
    fn open(addr: &str, shared: &Arc<Shared>) -> Result<Self, TargetError> {
        let listener = TcpListener::bind(addr).map_err(|source| TargetError::Bind { addr: addr.to_owned(), source })?;
        Self::serve(listener, shared)
    }

    fn serve(listener: TcpListener, shared: &Arc<Shared>) -> Result<Self, TargetError> {
        let listener = Arc::new(listener);
        let acceptor = {
            let (listener, shared) = (listener.clone(), shared.clone());
            std::thread::Builder::new()
                .name("acceptor".into())
                .spawn(move || accept_loop(&listener, &shared))
                .map_err(TargetError::Thread)?
        };
        Ok(Self { listener, acceptor })
    }

    fn close(self) {
        // SAFETY: shutting down our own listening socket wakes the blocked accept().
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        let _ = self.acceptor.join();
    }
}

/// A running target: reactors, the portal (which `stop_portal` closes and `start_portal`
/// reopens on the same address) and the LUN table operations of the control plane.
pub struct Target {
    shared: Arc<Shared>,
    cfg: Config,
    /// The address the portal was first bound to (with the kernel's port when 0 was asked).
    local: SocketAddr,
    portal: Mutex<Option<Portal>>,
    reactors: Mutex<Vec<JoinHandle<()>>>,
    iqn: String,
    /// Image files created by this run, at start-up or by `add_lun`.
    created: Mutex<Vec<PathBuf>>,
    /// Serialises LUN table changes: each reads the table, changes it and publishes it whole.
    lun_changes: Mutex<()>,
    /// Removed or replaced LUNs, by name, whose drain timed out: `remove_lun` of the name waits
    /// for them again (gone means their last command has ended).
    draining: Mutex<Vec<(String, Weak<Lun>)>>,
}

impl Target {
    /// Opens the LUNs, binds the portal and starts the reactors and the acceptor.
    pub fn start(cfg: &Config) -> Result<Self, TargetError> {
        cfg.validate()?;
        // Before anything is opened: say why io_uring is unusable rather than a bare EPERM.
        crate::uring_check::check()?;
        crate::protocol::trace::set_initiators(&cfg.trace_initiators);
        let (luns, created) = build_luns(cfg)?;
        let host = cfg.resolve_host();
        let addr = if host.contains(':') { format!("[{host}]:{}", cfg.port) } else { format!("{host}:{}", cfg.port) };
        let listener = TcpListener::bind(&addr).map_err(|source| TargetError::Bind { addr: addr.clone(), source })?;
        let local = listener.local_addr().map_err(|source| TargetError::Bind { addr: addr.clone(), source })?;
        let iqn = cfg.target_iqn();
        // SendTargets lists every portal address (one for a specific bind, each interface's
        // for a wildcard one).
        let addresses = crate::portals::portals(local).iter().map(|a| format!("{a},1")).collect();
        let login = LoginConfig {
            target_name: iqn.clone(),
            addresses,
            auth: cfg.auth_config()?,
            acl: cfg.acl()?,
            ..LoginConfig::default()
        };
        let mut shared = Shared::new(login, luns).with_limits(cfg.limits.clone());
        shared.admission =
            Limits { max_connections: cfg.max_connections, max_sessions_per_initiator: cfg.max_sessions_per_initiator };
        let shared = Arc::new(shared);
        let mut handles = Vec::new();
        let mut reactors = Vec::new();
        let poll = cfg.poll_mode;
        for (id, cpu) in cfg.reactor_cpus().into_iter().enumerate() {
            let (tx, rx) = crossbeam_channel::unbounded();
            let waker = Arc::new(Waker::new()?);
            // The ring and its connections live and die on their own thread; set-up errors
            // come back through this channel.
            let (ready_tx, ready_rx) = crossbeam_channel::bounded(1);
            let (sh, wk) = (shared.clone(), waker.clone());
            let thread = std::thread::Builder::new()
                .name(format!("reactor-{id}"))
                .spawn(move || {
                    if !core_affinity::set_for_current(core_affinity::CoreId { id: cpu }) {
                        log::warn!("reactor {id}: cannot pin to CPU {cpu}");
                    }
                    match Reactor::new(id, sh, rx, wk, poll) {
                        Ok(reactor) => {
                            let _ = ready_tx.send(Ok(()));
                            reactor.run();
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                        }
                    }
                })
                .map_err(TargetError::Thread)?;
            ready_rx.recv().map_err(|_| TargetError::Thread(std::io::Error::other("reactor thread died")))??;
            handles.push(ReactorHandle { tx, waker });
            reactors.push(thread);
        }
        // Offloaded work completes to its reactor's channel and wakes its ring.
        let routes: Vec<(Sender<Msg>, Arc<Waker>)> = handles.iter().map(|h| (h.tx.clone(), h.waker.clone())).collect();
        let _ = shared.reactors.set(handles);
        let threads = cfg.offload_threads.unwrap_or(crate::offload::DEFAULT_THREADS);
        let pool = crate::offload::Pool::new(threads, move |done| {
            let (tx, waker) = &routes[done.route.reactor];
            if tx.send(Msg::Offloaded(done)).is_ok() {
                waker.wake();
            }
        })
        .map_err(|e| TargetError::Thread(std::io::Error::other(e.to_string())))?;
        let _ = shared.offload.set(pool);
        let target = Self {
            shared,
            cfg: cfg.clone(),
            local,
            portal: Mutex::new(None),
            reactors: Mutex::new(reactors),
            iqn,
            created: Mutex::new(created),
            lun_changes: Mutex::new(()),
            draining: Mutex::new(Vec::new()),
        };
        match Portal::serve(listener, &target.shared) {
            Ok(p) => *target.portal.lock().expect("portal lock poisoned") = Some(p),
            Err(e) => {
                target.shutdown();
                return Err(e);
            }
        }
        Ok(target)
    }

    /// The portal address (also while the portal is stopped).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The portal address to hand to initiators: never a wildcard (see [`crate::portals`]).
    pub fn advertised_addr(&self) -> SocketAddr {
        crate::portals::advertised(self.local)
    }

    /// Every address the portal is reachable on, the advertised one first.
    pub fn portals(&self) -> Vec<SocketAddr> {
        crate::portals::portals(self.local)
    }

    pub fn iqn(&self) -> &str {
        &self.iqn
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Image files this target created, at start-up or since.
    pub fn created_images(&self) -> Vec<PathBuf> {
        self.created.lock().expect("created list lock poisoned").clone()
    }

    /// Opens the portal on its address; `false` when it was already open.
    pub fn start_portal(&self) -> Result<bool, TargetError> {
        let mut portal = self.portal.lock().expect("portal lock poisoned");
        if portal.is_some() {
            return Ok(false);
        }
        *portal = Some(Portal::open(&self.local.to_string(), &self.shared)?);
        log::info!("portal open on {}", self.local);
        Ok(true)
    }

    /// Closes the portal and every connection (sessions end; LUNs stay); `false` when it was
    /// already closed.
    pub fn stop_portal(&self) -> bool {
        let mut portal = self.portal.lock().expect("portal lock poisoned");
        let Some(p) = portal.take() else { return false };
        p.close();
        self.shared.close_all_connections();
        log::info!("portal on {} closed, connections closed", self.local);
        true
    }

    pub fn portal_open(&self) -> bool {
        self.portal.lock().expect("portal lock poisoned").is_some()
    }

    /// Adds a LUN, or replaces the LUN of the same name (keeping its id unless `lun_id` asks
    /// for another). Returns the new LUN once published to the reactors.
    pub fn add_lun(&self, mut lc: LunConfig) -> Result<Arc<Lun>, TargetError> {
        lc.fill_defaults();
        let lun_err = |source| TargetError::Lun { name: lc.name.clone(), source };
        lc.validate(&format!("lun {}", lc.name)).map_err(lun_err)?;
        let guard = self.lun_changes.lock().expect("LUN change lock poisoned");
        let (table, _) = self.shared.lun_table();
        let old = table.by_name(&lc.name).cloned();
        let id = match lc.lun_id {
            Some(id) => match table.get(id) {
                Some(other) if other.name != lc.name => {
                    return Err(TargetError::LunIdInUse { id, by: other.name.clone() })
                }
                _ => id,
            },
            None => match &old {
                Some(o) => o.id,
                None => table.lowest_free_id().ok_or_else(|| TargetError::NoLunId { name: lc.name.clone() })?,
            },
        };
        // Checked before opening: opening may grow the file another LUN serves.
        if let Some(path) = self.existing_path(&lc) {
            check_file_free(&table, &lc.name, &path)?;
        }
        let store = backing::open_lun_store(&self.cfg, &lc)?;
        if let Some(path) = &store.path {
            // The canonical path, in case the file appeared since the check above.
            if let Err(e) = check_file_free(&table, &lc.name, path) {
                if store.created {
                    let _ = std::fs::remove_file(path);
                }
                return Err(e);
            }
            if store.created {
                self.created.lock().expect("created list lock poisoned").push(path.clone());
            }
        }
        let lun = Arc::new(
            Lun::new(id, &lc.name, store.path, store.backing, lc.read_only, &self.iqn)
                .with_initiators(lc.initiators.clone())
                .with_removable(lc.removable),
        );
        let luns = table.iter().filter(|l| l.name != lc.name).cloned().chain([lun.clone()]).collect();
        self.shared.publish_luns(LunTable::new(luns));
        self.shared.wake_reactors();
        drop(guard);
        drop(table);
        log::info!(
            "LUN {} '{}' {}: {} bytes, {:?}{}",
            lun.id,
            lun.name,
            if old.is_some() { "replaced" } else { "added" },
            lun.size_bytes(),
            lun.kind(),
            if lun.read_only { ", read-only" } else { "" }
        );
        if let Some(old) = old {
            self.drain_or_keep(old)?;
        }
        Ok(lun)
    }

    /// Removes a LUN: new commands to it fail, commands in flight finish (waited for, up to
    /// a bound) and its file stays. For a name whose earlier removal timed out, waits for
    /// those commands again.
    pub fn remove_lun(&self, name: &str) -> Result<(), TargetError> {
        let guard = self.lun_changes.lock().expect("LUN change lock poisoned");
        let (table, _) = self.shared.lun_table();
        let Some(old) = table.by_name(name).cloned() else {
            drop(guard);
            drop(table);
            return self.drain_earlier(name).unwrap_or_else(|| Err(TargetError::LunNotFound { name: name.to_owned() }));
        };
        let luns = table.iter().filter(|l| l.name != name).cloned().collect();
        self.shared.publish_luns(LunTable::new(luns));
        self.shared.wake_reactors();
        drop(guard);
        drop(table);
        log::info!("LUN {} '{}' removed", old.id, old.name);
        self.drain_or_keep(old)?;
        self.drain_earlier(name).unwrap_or(Ok(()))
    }

    /// [`drain`]; a store still held at the timeout is kept (weakly) under its name for
    /// [`Self::drain_earlier`].
    fn drain_or_keep(&self, lun: Arc<Lun>) -> Result<(), TargetError> {
        let (name, weak) = (lun.name.clone(), Arc::downgrade(&lun));
        drain(lun).inspect_err(|_| self.draining.lock().expect("drain list lock poisoned").push((name, weak)))
    }

    /// Waits again for the stores of earlier removals or replacements of `name` whose drain
    /// timed out; `None` when there are none. After one times out again, the others are kept
    /// without waiting.
    fn drain_earlier(&self, name: &str) -> Option<Result<(), TargetError>> {
        let earlier: Vec<Weak<Lun>> = {
            let mut draining = self.draining.lock().expect("drain list lock poisoned");
            let (mine, rest): (Vec<_>, Vec<_>) =
                std::mem::take(&mut *draining).into_iter().partition(|(n, _)| n == name);
            *draining = rest;
            mine.into_iter().map(|(_, weak)| weak).collect()
        };
        if earlier.is_empty() {
            return None;
        }
        let mut result = Ok(());
        for weak in earlier {
            // None: its last command has ended since.
            let Some(lun) = weak.upgrade() else { continue };
            if result.is_err() {
                self.draining.lock().expect("drain list lock poisoned").push((name.to_owned(), weak));
            } else {
                drop(weak);
                result = self.drain_or_keep(lun);
            }
        }
        Some(result)
    }

    /// Removes every LUN; returns their names.
    pub fn clear_luns(&self) -> Vec<String> {
        let guard = self.lun_changes.lock().expect("LUN change lock poisoned");
        let (table, _) = self.shared.lun_table();
        self.shared.publish_luns(LunTable::default());
        self.shared.wake_reactors();
        drop(guard);
        let old: Vec<Arc<Lun>> = table.iter().cloned().collect();
        drop(table);
        let names = old.iter().map(|l| l.name.clone()).collect();
        for l in old {
            log::info!("LUN {} '{}' removed", l.id, l.name);
            if let Err(e) = self.drain_or_keep(l) {
                log::warn!("{e}");
            }
        }
        names
    }

    /// The canonical path of the file or device `lc` names, if it exists now.
    fn existing_path(&self, lc: &LunConfig) -> Option<PathBuf> {
        let path = lc.file_path.as_ref()?;
        match (lc.backing, lc.is_block) {
            (BackingKind::Mem, _) => None,
            (BackingKind::File, true) => std::fs::canonicalize(path).ok(),
            (BackingKind::File, false) => std::fs::canonicalize(self.cfg.root_dir.join(path)).ok(),
        }
    }

    /// Closes the portal, logs every connection out and waits for the reactors to finish.
    pub fn shutdown(&self) {
        self.stop_portal();
        for r in self.shared.reactors.get().into_iter().flatten() {
            r.send(Msg::Stop);
        }
        let reactors = std::mem::take(&mut *self.reactors.lock().expect("reactor list lock poisoned"));
        for r in reactors {
            let _ = r.join();
        }
        // After the reactors: they waited for their offloaded work before exiting.
        if let Some(pool) = self.shared.offload.get() {
            pool.shutdown();
        }
    }

    /// [`Target::shutdown`], consuming the target.
    pub fn stop(self) {
        self.shutdown();
    }
}

/// Refuses a second LUN (of another name) over `path`.
fn check_file_free(table: &LunTable, name: &str, path: &PathBuf) -> Result<(), TargetError> {
    match table.iter().find(|l| l.name != name && l.path.as_ref() == Some(path)) {
        Some(other) => Err(TargetError::FileInUse { path: path.clone(), by: other.name.clone() }),
        None => Ok(()),
    }
}

/// Waits until nothing but `lun` itself holds the removed LUN: reactors have dropped the old
/// table, failed its tasks that waited for Data-Out, and its commands in flight (ring I/O,
/// offloaded work, Data-In from RAM) have finished, so nothing can touch the store any more.
/// Bounded, so a stuck peer cannot hang the control plane, but then an error: the store may
/// still be touched (it is closed whenever the last holder lets go).
fn drain(lun: Arc<Lun>) -> Result<(), TargetError> {
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    while Arc::strong_count(&lun) > 1 {
        if Instant::now() >= deadline {
            let holders = Arc::strong_count(&lun) - 1;
            return Err(TargetError::LunBusy { name: lun.name.clone(), holders, secs: DRAIN_TIMEOUT.as_secs() });
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

/// Hands each accepted connection to a reactor, round-robin, so one target's connections
/// spread over every core.
fn accept_loop(listener: &TcpListener, shared: &Shared) {
    let reactors = shared.reactors.get().expect("reactors start before the acceptor");
    let mut next = 0;
    // Refusals beyond max_connections are logged at most once a second, with their count.
    let mut refused = 0u64;
    let mut last_refusal_log: Option<Instant> = None;
    loop {
        match listener.accept() {
            Ok((stream, peer)) if !shared.admit_connection() => {
                drop(stream);
                refused += 1;
                if last_refusal_log.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                    log::warn!(
                        "{peer}: connection closed: max_connections ({}) open ({refused} refused since the last report)",
                        shared.admission.max_connections
                    );
                    refused = 0;
                    last_refusal_log = Some(Instant::now());
                }
            }
            Ok((stream, peer)) => {
                reactors[next % reactors.len()].send(Msg::Conn(stream, peer, shared.next_token()));
                next += 1;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)) => {
                log::warn!("accept: {e}; retrying");
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            Err(e) if matches!(e.raw_os_error(), Some(libc::ECONNABORTED | libc::EPERM | libc::EPROTO)) => continue,
            Err(_) => return, // the listener was shut down
        }
    }
}

/// A group name's (or a numeric id's) group id.
fn group_id(group: &str) -> Result<u32, String> {
    if let Ok(gid) = group.parse::<u32>() {
        return Ok(gid);
    }
    let name = std::ffi::CString::new(group).map_err(|_| "contains a NUL byte".to_string())?;
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: group is plain data, written by getgrnam_r before it is read.
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call: name NUL-terminated, buf of buf.len() bytes.
    let rc = unsafe { libc::getgrnam_r(name.as_ptr(), &mut grp, buf.as_mut_ptr(), buf.len(), &mut found) };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc).to_string());
    }
    if found.is_null() {
        return Err("no such group".to_string());
    }
    Ok(grp.gr_gid)
}

/// Blocks SIGINT and SIGTERM in this thread (and the threads it starts) and returns the set,
/// for `sigwait`.
fn block_stop_signals() -> Result<libc::sigset_t, TargetError> {
    // SAFETY: sigset_t is plain data, initialised by sigemptyset before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: set is a valid sigset_t; the calls only write to it and the thread's mask.
    let rc = unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut())
    };
    if rc != 0 {
        return Err(TargetError::Signal(std::io::Error::from_raw_os_error(rc)));
    }
    Ok(set)
}

/// Runs the target until SIGINT or SIGTERM: the `serve` command.
pub fn run(cfg: Config) -> Result<(), TargetError> {
    let set = block_stop_signals()?;
    // Bound before the target starts: a live socket means another target runs, and this one
    // should not start half-way.
    let socket = crate::control::ControlSocket::bind(&cfg.control_socket_path())?;
    if let Some(group) = &cfg.control_socket_group {
        let path = cfg.control_socket_path();
        let err = |message: String| TargetError::SocketGroup { group: group.clone(), message };
        let gid = group_id(group).map_err(err)?;
        std::os::unix::fs::chown(&path, None, Some(gid)).map_err(|e| err(format!("chown {}: {e}", path.display())))?;
        log::info!("control socket {} belongs to group {group} ({gid})", path.display());
    }
    // Leftovers of uploads a crash or kill interrupted; live imports of other processes stay.
    match crate::images::remove_stale_temp_files(&cfg.root_dir) {
        Ok(removed) => {
            for p in removed {
                log::info!("removed stale temp file {}", p.display());
            }
        }
        Err(e) => log::warn!("cannot clean up stale temp files: {e}"),
    }
    let target = Arc::new(Target::start(&cfg)?);
    let (luns, _) = target.shared.lun_table();
    for l in luns.iter() {
        log::info!(
            "LUN {} '{}': {} bytes, {:?}{}",
            l.id,
            l.name,
            l.size_bytes(),
            l.kind(),
            if l.read_only { ", read-only" } else { "" }
        );
    }
    drop(luns);
    let control = match crate::control::Server::start(socket, target.clone()) {
        Ok(c) => c,
        Err(e) => {
            target.shutdown();
            return Err(e.into());
        }
    };
    log::info!("root_dir {}, control socket {}", cfg.root_dir.display(), control.path().display());
    let metrics = match cfg.metrics_listen.as_deref().map(|a| crate::metrics::MetricsServer::start(a, target.clone())) {
        Some(Ok(m)) => {
            log::info!("metrics on http://{}/metrics", m.local_addr());
            Some(m)
        }
        Some(Err(e)) => {
            control.stop();
            target.shutdown();
            return Err(e.into());
        }
        None => None,
    };
    // Where initiators can connect: `host: ""` picks the default-route interface's address and
    // a wildcard bind listens on every interface, so neither is obvious from the config.
    let portals: Vec<String> = target.portals().iter().map(ToString::to_string).collect();
    let bound = if cfg.host.is_empty() { " (host \"\": the default-route interface's address)" } else { "" };
    log::info!("listening on {}{bound}; portal addresses: {}", target.local_addr(), portals.join(" "));
    // The readiness line scripts and tests wait for.
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "listening on {} {}", target.local_addr(), target.iqn());
    let _ = out.flush();
    drop(out);
    let mut sig = 0;
    // SAFETY: set holds the blocked signals; sig receives the one that arrived.
    unsafe { libc::sigwait(&set, &mut sig) };
    log::info!("signal {sig}: stopping");
    if let Some(m) = metrics {
        m.stop();
    }
    control.stop();
    target.shutdown();
    if cfg.remove_created_on_close {
        // Like the replaced driver: images this run created go; pre-existing ones stay.
        for path in target.created_images() {
            match std::fs::remove_file(&path) {
                Ok(()) => log::info!("removed {}", path.display()),
                Err(e) => log::warn!("cannot remove {}: {e}", path.display()),
            }
        }
    }
    Ok(())
}
