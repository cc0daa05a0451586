//! The target: LUN table, reactors, the listener, sessions, and orderly shutdown.

use crate::backing::{self, BackingKind, OpenError};
use crate::config::{Config, ConfigError, LunConfig};
use crate::protocol::login::LoginConfig;
use crate::reactor::{Reactor, ReactorError};
use crate::scsi::{lun, Lun, LunTable};
use crate::session::{Limits, Mailbox, Msg, Shared, Waker};
use crossbeam_channel::Sender;
use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
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
    #[error("LUN {name:?} is out of the table, but {holders} command(s) still use its store after {secs} s")]
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
            let waker = Arc::new(Waker::new().map_err(ReactorError::EventFd)?);
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
            handles.push(Mailbox { tx, waker });
            reactors.push(thread);
        }
        // Offloaded work completes to its reactor's channel and wakes its ring.
        let routes: Vec<(Sender<Msg>, Arc<Waker>)> = handles.iter().map(|h| (h.tx.clone(), h.waker.clone())).collect();
        shared.set_reactors(handles);
        let threads = cfg.offload_threads.unwrap_or(crate::offload::DEFAULT_THREADS);
        let pool = crate::offload::Pool::new(threads, move |done| {
            let (tx, waker) = &routes[done.route.reactor];
            if tx.send(Msg::Offloaded(done)).is_ok() {
                waker.wake();
            }
        })
        .map_err(|e| TargetError::Thread(std::io::Error::other(e.to_string())))?;
        shared.set_offload(pool);
        let target = Self {
            shared,
            cfg: cfg.clone(),
            local,
            portal: Mutex::new(None),
            reactors: Mutex::new(reactors),
            iqn,
            created: Mutex::new(created),
            lun_changes: Mutex::new(()),
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
            drain(old)?;
        }
        Ok(lun)
    }

    /// Removes a LUN: new commands to it fail, commands in flight finish (waited for, up to
    /// a bound) and its file stays.
    pub fn remove_lun(&self, name: &str) -> Result<(), TargetError> {
        let guard = self.lun_changes.lock().expect("LUN change lock poisoned");
        let (table, _) = self.shared.lun_table();
        let old = table.by_name(name).cloned().ok_or_else(|| TargetError::LunNotFound { name: name.to_owned() })?;
        let luns = table.iter().filter(|l| l.name != name).cloned().collect();
        self.shared.publish_luns(LunTable::new(luns));
        self.shared.wake_reactors();
        drop(guard);
        drop(table);
        log::info!("LUN {} '{}' removed", old.id, old.name);
        drain(old)
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
            if let Err(e) = drain(l) {
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
        for r in self.shared.reactors() {
            r.send(Msg::Stop);
        }
        let reactors = std::mem::take(&mut *self.reactors.lock().expect("reactor list lock poisoned"));
        for r in reactors {
            let _ = r.join();
        }
        // After the reactors: they waited for their offloaded work before exiting.
        if let Some(pool) = self.shared.offload_pool() {
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
    let reactors = shared.reactors();
    assert!(!reactors.is_empty(), "reactors start before the acceptor");
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
