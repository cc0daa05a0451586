//! The target: LUN table, reactors, the listener, sessions, and orderly shutdown.

use crate::config::{self, Config, ConfigError};
use crate::protocol::login::LoginConfig;
use crate::reactor::{Msg, Reactor, ReactorError, ReactorStats, Waker};
use crate::scsi::{lun, Lun, LunTable};
use crossbeam_channel::Sender;
use std::collections::HashMap;
use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::thread::JoinHandle;

/// Errors starting or running the target.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The portal address cannot be bound (in use, not local, no permission).
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: String, source: std::io::Error },
    #[error("LUN {name}: {source}")]
    Lun { name: String, source: ConfigError },
    #[error("LUN {name}: no free LUN id")]
    NoLunId { name: String },
    #[error(transparent)]
    Reactor(#[from] ReactorError),
    #[error("cannot start a thread: {0}")]
    Thread(std::io::Error),
    #[error("signal handling: {0}")]
    Signal(std::io::Error),
}

/// Why a login cannot join or start a session.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SessionError {
    /// A non-zero TSIH that names no session of this initiator.
    #[error("no session with that TSIH for this initiator")]
    NoSuchSession,
    #[error("too many sessions")]
    TooManySessions,
}

/// A logged-in session, as registered at the end of its login.
#[derive(Debug, Clone)]
pub struct SessionInfo {
    /// The TSIH: as requested by the initiator at login (0 = new session), as assigned once
    /// registered.
    pub tsih: u16,
    pub initiator: String,
    pub isid: [u8; 6],
    /// Discovery sessions get a TSIH but never reinstate (or get reinstated by) others.
    pub discovery: bool,
    pub peer: SocketAddr,
    pub reactor: usize,
    /// The connection's token.
    pub token: u64,
    /// Negotiated login keys.
    pub negotiated: Vec<(&'static str, String)>,
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
    login: Arc<LoginConfig>,
    luns: RwLock<Arc<LunTable>>,
    lun_gen: AtomicU64,
    sessions: Mutex<HashMap<u16, SessionInfo>>,
    next_tsih: Mutex<u16>,
    reactors: OnceLock<Vec<ReactorHandle>>,
    next_token: AtomicU64,
}

impl Shared {
    pub fn new(login: LoginConfig, luns: LunTable) -> Self {
        Self {
            login: Arc::new(login),
            luns: RwLock::new(Arc::new(luns)),
            lun_gen: AtomicU64::new(1),
            sessions: Mutex::new(HashMap::new()),
            next_tsih: Mutex::new(0),
            reactors: OnceLock::new(),
            next_token: AtomicU64::new(1),
        }
    }

    pub fn login_config(&self) -> Arc<LoginConfig> {
        self.login.clone()
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

    /// Registers a session at the end of a normal login; returns its TSIH.
    ///
    /// TSIH 0 starts a new session; an older session of the same initiator and ISID is closed
    /// (session reinstatement, RFC 7143 §6.3.5). A non-zero TSIH must name that initiator's
    /// session, whose connection is then replaced.
    pub fn register_session(&self, mut info: SessionInfo) -> Result<u16, SessionError> {
        let mut sessions = self.sessions.lock().expect("session table lock poisoned");
        let same =
            |e: &SessionInfo| e.discovery == info.discovery && e.initiator == info.initiator && e.isid == info.isid;
        if info.tsih != 0 {
            let entry = sessions.get_mut(&info.tsih).filter(|e| same(e)).ok_or(SessionError::NoSuchSession)?;
            if entry.token != info.token {
                self.close_conn(entry.reactor, entry.token);
            }
            let tsih = info.tsih;
            *entry = info;
            return Ok(tsih);
        }
        if let Some(old) = sessions.iter().find(|(_, e)| !info.discovery && same(e)).map(|(t, _)| *t) {
            let e = sessions.remove(&old).expect("found above");
            self.close_conn(e.reactor, e.token);
        }
        let mut next = self.next_tsih.lock().expect("TSIH lock poisoned");
        for _ in 0..u16::MAX {
            *next = next.wrapping_add(1).max(1);
            if !sessions.contains_key(&next) {
                info.tsih = *next;
                sessions.insert(*next, info);
                return Ok(*next);
            }
        }
        Err(SessionError::TooManySessions)
    }

    /// Forgets a session when its connection ends (unless another connection took it over).
    pub fn unregister_session(&self, tsih: u16, token: u64) {
        let mut sessions = self.sessions.lock().expect("session table lock poisoned");
        if sessions.get(&tsih).is_some_and(|e| e.token == token) {
            sessions.remove(&tsih);
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
        let store =
            config::open_lun_store(cfg, lc).map_err(|source| TargetError::Lun { name: lc.name.clone(), source })?;
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
        luns.push(Arc::new(Lun::new(id, &lc.name, path, backing, read_only, &iqn)));
    }
    Ok((LunTable::new(luns), created))
}

/// A running target: reactors and the acceptor thread.
pub struct Target {
    shared: Arc<Shared>,
    listener: Arc<TcpListener>,
    local: SocketAddr,
    reactors: Vec<JoinHandle<()>>,
    acceptor: Option<JoinHandle<()>>,
    iqn: String,
    /// Image files created at start-up.
    created: Vec<PathBuf>,
}

impl Target {
    /// Opens the LUNs, binds the portal and starts the reactors and the acceptor.
    pub fn start(cfg: &Config) -> Result<Self, TargetError> {
        cfg.validate()?;
        let (luns, created) = build_luns(cfg)?;
        let host = cfg.resolve_host();
        let addr = if host.contains(':') { format!("[{host}]:{}", cfg.port) } else { format!("{host}:{}", cfg.port) };
        let listener = TcpListener::bind(&addr).map_err(|source| TargetError::Bind { addr: addr.clone(), source })?;
        let local = listener.local_addr().map_err(|source| TargetError::Bind { addr: addr.clone(), source })?;
        let iqn = cfg.target_iqn();
        let login =
            LoginConfig { target_name: iqn.clone(), addresses: vec![format!("{local},1")], ..LoginConfig::default() };
        let shared = Arc::new(Shared::new(login, luns));
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
        let _ = shared.reactors.set(handles);
        let listener = Arc::new(listener);
        let acceptor = {
            let (listener, shared) = (listener.clone(), shared.clone());
            std::thread::Builder::new()
                .name("acceptor".into())
                .spawn(move || accept_loop(&listener, &shared))
                .map_err(TargetError::Thread)?
        };
        Ok(Self { shared, listener, local, reactors, acceptor: Some(acceptor), iqn, created })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    pub fn iqn(&self) -> &str {
        &self.iqn
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Image files this target created when it started.
    pub fn created_images(&self) -> &[PathBuf] {
        &self.created
    }

    /// Stops accepting, logs every connection out and waits for the reactors to finish.
    pub fn stop(mut self) {
        // SAFETY: shutting down our own listening socket wakes the blocked accept().
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
        for r in self.shared.reactors.get().into_iter().flatten() {
            r.send(Msg::Stop);
        }
        for r in self.reactors.drain(..) {
            let _ = r.join();
        }
    }
}

/// Hands each accepted connection to a reactor, round-robin, so one target's connections
/// spread over every core.
fn accept_loop(listener: &TcpListener, shared: &Shared) {
    let reactors = shared.reactors.get().expect("reactors start before the acceptor");
    let mut next = 0;
    loop {
        match listener.accept() {
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
    let target = Target::start(&cfg)?;
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
    // The readiness line scripts and tests wait for.
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "listening on {} {}", target.local_addr(), target.iqn());
    let _ = out.flush();
    drop(out);
    let mut sig = 0;
    // SAFETY: set holds the blocked signals; sig receives the one that arrived.
    unsafe { libc::sigwait(&set, &mut sig) };
    log::info!("signal {sig}: stopping");
    let created = target.created_images().to_vec();
    target.stop();
    if cfg.remove_created_on_close {
        // Like the replaced driver: images this run created go; pre-existing ones stay.
        for path in created {
            match std::fs::remove_file(&path) {
                Ok(()) => log::info!("removed {}", path.display()),
                Err(e) => log::warn!("cannot remove {}: {e}", path.display()),
            }
        }
    }
    Ok(())
}
