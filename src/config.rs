//! The YAML configuration: the keys of the Jumpstarter iSCSI driver it replaces (unchanged), the
//! target's own keys, and the LUNs exported at start.
//!
//! A file is either a plain configuration or a Jumpstarter exporter config, whose iSCSI export's
//! `config:` block is used. [`crate::backing::open_lun_store`] turns a [`LunConfig`] into an
//! open store.

use crate::backing::BackingKind;
use crate::protocol::acl::{Acl, Cidr};
use crate::protocol::chap::{self, AuthConfig, Credentials, Secret};
use crate::scsi::lun::MAX_LUN_ID;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fs;
use std::io;
use std::net::{IpAddr, UdpSocket};
use std::path::{Component, Path, PathBuf};

/// Reactors beyond this are a typo, not a deployment.
const MAX_REACTORS: usize = 1024;
/// Most offload worker threads a target may start.
const MAX_OFFLOAD_THREADS: usize = 64;
/// `sun_path` holds 108 bytes including the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;
/// RFC 7143 section 4.2.7.1: iSCSI names are at most 223 bytes.
const MAX_ISCSI_NAME: usize = 223;

/// Errors of loading and checking the configuration; each names the file or the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Reading the configuration file (or a secret file) failed.
    #[error("{path}: {op}: {source}")]
    Io { path: PathBuf, op: &'static str, source: io::Error },
    /// The YAML is malformed, a key is unknown, or a value has the wrong type (the message
    /// carries the key path and the line and column).
    #[error("{origin}: {source}")]
    Yaml { origin: String, source: serde_norway::Error },
    /// A key has a value uringtgt cannot use.
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key: key.into(), message: message.into() }
}

fn io_err(path: &Path, op: &'static str) -> impl FnOnce(io::Error) -> ConfigError {
    let path = path.to_owned();
    move |source| ConfigError::Io { path, op, source }
}

/// How reactors wait for work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum PollMode {
    /// Reactors spin between commands or sleep until work arrives, whichever their
    /// initiators do not notice (measured: `src/reactor/spin.rs`).
    #[default]
    Adaptive,
    /// Reactors spin and never sleep: lower latency, one busy core each.
    Busy,
    /// As `adaptive`, and under a steady load of 5k+ IOPS also sleeps in batches of up to
    /// 400 µs where that costs no throughput: the least CPU, at up to 400 µs more latency.
    Frugal,
}

/// The whole configuration. Field names are the YAML keys.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where image files live; created if missing.
    pub root_dir: PathBuf,
    pub iqn_prefix: String,
    pub target_name: String,
    /// Portal address; empty means the default-route interface's address (see [`Config::resolve_host`]).
    pub host: String,
    pub port: u16,
    /// Delete image files created by this run when the target stops.
    pub remove_created_on_close: bool,
    /// Block devices that LUNs with `is_block` may export (compared after resolving symlinks).
    pub block_device_allowlist: Vec<PathBuf>,
    /// The control-plane Unix socket; `None` means `<root_dir>/uringtgt.sock`.
    pub control_socket: Option<PathBuf>,
    /// Number of reactors; `None` means one per CPU of the affinity mask.
    pub reactors: Option<usize>,
    /// Explicit CPUs to pin one reactor each to; excludes `reactors`.
    pub cpus: Option<Vec<usize>>,
    pub poll_mode: PollMode,
    /// Worker threads for commands whose work would block a reactor (WRITE SAME, UNMAP,
    /// COMPARE AND WRITE, ...); `None` means [`crate::offload::DEFAULT_THREADS`].
    pub offload_threads: Option<usize>,
    /// Log filter (`error`, `warn`, `info`, `debug`, `trace`, `off`); the CLI and RUST_LOG win.
    pub log_level: Option<String>,
    /// LUNs exported at start.
    pub luns: Vec<LunConfig>,
    // ---- access control (README "Security") ----
    /// CHAP credentials; `None`: no authentication (demo mode).
    pub auth: Option<AuthSection>,
    /// Initiator names that may log in; empty: any.
    pub allowed_initiators: Vec<String>,
    /// Source address blocks (CIDR) that may log in; empty: any.
    pub allowed_networks: Vec<String>,
    /// Group that owns the control socket (name or numeric id); `None`: the process's group.
    pub control_socket_group: Option<String>,
    /// Open iSCSI connections at most; further ones are closed at once.
    pub max_connections: usize,
    /// Sessions one initiator name may hold at once; `None`: no limit.
    pub max_sessions_per_initiator: Option<u32>,
    // ---- observability (README "Protocol tracing", "Metrics") ----
    /// Initiator IQNs whose sessions are traced PDU by PDU from their first login PDU.
    pub trace_initiators: Vec<String>,
    /// `ADDRESS:PORT` of the Prometheus `/metrics` endpoint; `None`: off.
    pub metrics_listen: Option<String>,
    /// Directories besides root_dir that `import_image` may read source files from (compared
    /// after resolving symlinks); empty means root_dir only.
    pub import_dirs: Vec<PathBuf>,
    /// The `--lun` specs the last entries of `luns` came from, so errors name the flag rather
    /// than an index into a list the user never wrote.
    #[serde(skip)]
    pub lun_flags: Vec<String>,
    /// Per-connection resource bounds.
    pub limits: ConnLimits,
}

/// The `auth:` key.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSection {
    /// What initiators must prove.
    pub chap: Option<ChapSection>,
    /// What the target proves to initiators that ask (mutual CHAP).
    pub mutual_chap: Option<ChapSection>,
    /// Discovery sessions authenticate too.
    #[serde(default)]
    pub discovery: bool,
}

/// A CHAP user: `{username, secret}` or `{username, secret_file}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChapSection {
    pub username: String,
    #[serde(default)]
    pub secret: Option<SecretText>,
    /// A file holding the secret (one trailing newline ignored); mode 0600 or stricter.
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
}

/// A secret as written in the configuration: prints and serialises as `<redacted>`.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct SecretText(String);

impl SecretText {
    pub fn new(s: impl Into<String>) -> Self {
        SecretText(s.into())
    }
}

impl std::fmt::Debug for SecretText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl Serialize for SecretText {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("<redacted>")
    }
}

/// Default of `max_connections`.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;

impl Default for Config {
    fn default() -> Self {
        Self {
            root_dir: PathBuf::from("/var/lib/iscsi"),
            iqn_prefix: "iqn.2024-06.dev.jumpstarter".into(),
            target_name: "target1".into(),
            host: String::new(),
            port: 3260,
            remove_created_on_close: false,
            block_device_allowlist: Vec::new(),
            control_socket: None,
            reactors: None,
            cpus: None,
            poll_mode: PollMode::Adaptive,
            offload_threads: None,
            log_level: None,
            luns: Vec::new(),
            auth: None,
            allowed_initiators: Vec::new(),
            allowed_networks: Vec::new(),
            control_socket_group: None,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_sessions_per_initiator: None,
            trace_initiators: Vec::new(),
            metrics_listen: None,
            import_dirs: Vec::new(),
            lun_flags: Vec::new(),
            limits: ConnLimits::default(),
        }
    }
}

/// What one connection (one session: MaxConnections=1) may hold; the `limits` block.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConnLimits {
    /// Commands a session may have outstanding: the CmdSN window (MaxCmdSN) is sized from it.
    pub max_cmds_per_session: u32,
    /// A command waiting for Data-Out that makes no progress for this long is aborted.
    pub dataout_timeout_secs: u64,
    /// Bytes of PDUs queued for sending beyond which the connection stops reading requests
    /// until the queue drains.
    pub max_tx_queue_kib: u32,
    /// A connection whose queue stays over `max_tx_queue_kib` this long is dropped.
    pub tx_stall_timeout_secs: u64,
    /// Task buffer memory per reactor (MiB): a command that finds it spent waits in order, or
    /// is answered TASK SET FULL when its data is already arriving.
    pub buffer_memory_mib: u32,
}

impl Default for ConnLimits {
    fn default() -> Self {
        Self {
            max_cmds_per_session: 128,
            dataout_timeout_secs: 30,
            max_tx_queue_kib: 16 * 1024,
            tx_stall_timeout_secs: 30,
            buffer_memory_mib: (crate::backing::pool::BufPool::DEFAULT_LIMIT >> 20) as u32,
        }
    }
}

impl ConnLimits {
    /// Most commands per session: task slots are preallocated per connection.
    pub const MAX_CMDS: u32 = 1024;
    /// Largest buffer budget per reactor: 1 TiB, far past any machine's memory, but it keeps
    /// the byte count in range everywhere.
    pub const MAX_BUFFER_MIB: u32 = 1 << 20;

    fn validate(&self) -> Result<(), ConfigError> {
        if !(1..=Self::MAX_CMDS).contains(&self.max_cmds_per_session) {
            return Err(invalid("limits.max_cmds_per_session", format!("must be 1 to {}", Self::MAX_CMDS)));
        }
        if self.dataout_timeout_secs == 0 {
            return Err(invalid("limits.dataout_timeout_secs", "must be at least 1"));
        }
        if self.max_tx_queue_kib < 64 {
            return Err(invalid("limits.max_tx_queue_kib", "must be at least 64"));
        }
        if self.tx_stall_timeout_secs == 0 {
            return Err(invalid("limits.tx_stall_timeout_secs", "must be at least 1"));
        }
        let min_mib = (crate::backing::pool::MAX_BUF >> 20) as u32;
        if !(min_mib..=Self::MAX_BUFFER_MIB).contains(&self.buffer_memory_mib) {
            return Err(invalid(
                "limits.buffer_memory_mib",
                format!("must be {min_mib} (the largest command) to {}", Self::MAX_BUFFER_MIB),
            ));
        }
        Ok(())
    }
}

/// One LUN to export.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LunConfig {
    /// The operator's name for it: `[A-Za-z0-9._-]+`, unique.
    pub name: String,
    /// Image path relative to root_dir (default `<name>.img`); for `is_block`, the absolute
    /// device path. Unused by `mem` LUNs.
    #[serde(default)]
    pub file_path: Option<PathBuf>,
    /// Size in MiB; 0 means the existing file's size. Required for new files and `mem` LUNs.
    #[serde(default)]
    pub size_mb: u64,
    #[serde(default)]
    pub backing: BackingKind,
    #[serde(default)]
    pub read_only: bool,
    /// LUN number; `None` means the lowest free one.
    #[serde(default)]
    pub lun_id: Option<u64>,
    /// Export an allow-listed block device instead of an image file.
    #[serde(default)]
    pub is_block: bool,
    /// Removable medium (an installer ISO, say): INQUIRY RMB=1, START STOP UNIT ejects and
    /// loads it, PREVENT ALLOW MEDIUM REMOVAL holds it.
    #[serde(default)]
    pub removable: bool,
    /// Initiator names that see this LUN; empty: every initiator.
    #[serde(default)]
    pub initiators: Vec<String>,
}

impl Config {
    /// Parses and checks a configuration (plain, or a Jumpstarter exporter config).
    pub fn from_yaml_str(s: &str) -> Result<Config, ConfigError> {
        Self::parse(s, "config")
    }

    /// Reads, parses and checks a configuration file. Relative paths in it (`root_dir`,
    /// `control_socket`, `import_dirs`) are resolved against the file's directory, as most
    /// daemons do, so the file means the same from any working directory.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = fs::read_to_string(path).map_err(io_err(path, "read config"))?;
        let origin = path.display().to_string();
        let mut cfg = Self::parse_unchecked(&text, &origin)?;
        // Canonical, so the paths printed and used carry no `..` of a relative --config.
        let file = fs::canonicalize(path).map_err(io_err(path, "resolve config path"))?;
        if let Some(dir) = file.parent() {
            cfg.resolve_relative_paths(dir);
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// Makes `root_dir`, `control_socket` and `import_dirs` absolute, relative ones taken
    /// against `base` (the config file's directory, or for flags the working directory).
    pub fn resolve_relative_paths(&mut self, base: &Path) {
        let abs = |p: &Path| if p.is_relative() && !p.as_os_str().is_empty() { base.join(p) } else { p.to_owned() };
        self.root_dir = abs(&self.root_dir);
        if let Some(sock) = &self.control_socket {
            self.control_socket = Some(abs(sock));
        }
        for d in &mut self.import_dirs {
            *d = abs(d);
        }
    }

    fn parse(s: &str, origin: &str) -> Result<Config, ConfigError> {
        let cfg = Self::parse_unchecked(s, origin)?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn parse_unchecked(s: &str, origin: &str) -> Result<Config, ConfigError> {
        let yaml_err = |origin: String| move |source| ConfigError::Yaml { origin, source };
        let doc: serde_norway::Value = serde_norway::from_str(s).map_err(yaml_err(origin.to_owned()))?;
        let mut cfg = match &doc {
            // An empty file is a configuration of defaults.
            serde_norway::Value::Null => Config::default(),
            serde_norway::Value::Mapping(m) if m.contains_key("export") => {
                let file: ExporterFile = serde_norway::from_str(s).map_err(yaml_err(origin.to_owned()))?;
                file.export.0.ok_or_else(|| {
                    invalid(
                        "export",
                        "no export has an iSCSI type (e.g. jumpstarter_driver_iscsi.driver.ISCSI), nested \
                         children: included",
                    )
                })?
            }
            // Parsed again from the text so errors carry their line and column.
            _ => serde_norway::from_str(s).map_err(yaml_err(origin.to_owned()))?,
        };
        for lun in &mut cfg.luns {
            lun.fill_defaults();
        }
        Ok(cfg)
    }

    /// Checks every value; the first problem is returned, naming its key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.root_dir.as_os_str().is_empty() {
            return Err(invalid("root_dir", "must not be empty"));
        }
        validate_iqn(&self.iqn_prefix, &self.target_name)?;
        if !self.host.is_empty() && self.host.parse::<IpAddr>().is_err() {
            return Err(invalid(
                "host",
                format!("not an IP address: {:?} (leave empty for the default-route address)", self.host),
            ));
        }
        for (i, p) in self.block_device_allowlist.iter().enumerate() {
            if !p.is_absolute() {
                return Err(invalid(
                    format!("block_device_allowlist[{i}]"),
                    format!("must be an absolute path: {}", p.display()),
                ));
            }
        }
        for (i, p) in self.import_dirs.iter().enumerate() {
            if p.as_os_str().is_empty() {
                return Err(invalid(format!("import_dirs[{i}]"), "must not be empty"));
            }
        }
        if let Some(p) = &self.control_socket {
            if p.as_os_str().is_empty() {
                return Err(invalid("control_socket", "must not be empty"));
            }
        }
        let sock = self.control_socket_path();
        if sock.as_os_str().len() > MAX_SOCKET_PATH {
            let key = if self.control_socket.is_some() { "control_socket" } else { "root_dir" };
            return Err(invalid(
                key,
                format!(
                    "control socket path {} is longer than the {MAX_SOCKET_PATH} bytes a Unix socket address holds",
                    sock.display()
                ),
            ));
        }
        self.validate_reactors()?;
        self.limits.validate()?;
        if let Some(n) = self.offload_threads {
            if !(1..=MAX_OFFLOAD_THREADS).contains(&n) {
                return Err(invalid("offload_threads", format!("{n} is not between 1 and {MAX_OFFLOAD_THREADS}")));
            }
        }
        if let Some(level) = &self.log_level {
            if level.parse::<log::LevelFilter>().is_err() {
                return Err(invalid(
                    "log_level",
                    format!("{level:?} is not one of off, error, warn, info, debug, trace"),
                ));
            }
        }
        self.validate_access()?;
        self.validate_observability()?;
        self.validate_luns()
    }

    /// `trace_initiators` and `metrics_listen`.
    fn validate_observability(&self) -> Result<(), ConfigError> {
        for (i, name) in self.trace_initiators.iter().enumerate() {
            if name.is_empty() || name.contains(char::is_whitespace) {
                return Err(invalid(format!("trace_initiators[{i}]"), format!("not an iSCSI name: {name:?}")));
            }
        }
        if let Some(addr) = &self.metrics_listen {
            if addr.parse::<std::net::SocketAddr>().is_err() {
                return Err(invalid(
                    "metrics_listen",
                    format!("not an ADDRESS:PORT: {addr:?} (e.g. 127.0.0.1:9460, [::1]:9460)"),
                ));
            }
        }
        Ok(())
    }

    /// The access-control keys, short of reading secret files (see [`Config::auth_config`]).
    fn validate_access(&self) -> Result<(), ConfigError> {
        if let Some(auth) = &self.auth {
            let Some(chap) = &auth.chap else {
                return Err(invalid("auth.chap", "required: mutual_chap and discovery need the initiator's CHAP user"));
            };
            chap.validate("auth.chap")?;
            if let Some(m) = &auth.mutual_chap {
                m.validate("auth.mutual_chap")?;
            }
        }
        for (i, name) in self.allowed_initiators.iter().enumerate() {
            if name.is_empty() || name.len() > MAX_ISCSI_NAME || name.contains(|c: char| c.is_whitespace() || c == ',')
            {
                return Err(invalid(format!("allowed_initiators[{i}]"), format!("{name:?} is not an iSCSI name")));
            }
        }
        self.acl()?;
        if self.max_connections == 0 {
            return Err(invalid("max_connections", "must be at least 1"));
        }
        if self.max_sessions_per_initiator == Some(0) {
            return Err(invalid("max_sessions_per_initiator", "must be at least 1 (leave it out for no limit)"));
        }
        if let Some(g) = &self.control_socket_group {
            if g.is_empty() {
                return Err(invalid("control_socket_group", "must not be empty"));
            }
        }
        Ok(())
    }

    /// `allowed_initiators` and `allowed_networks`, parsed.
    pub fn acl(&self) -> Result<Acl, ConfigError> {
        let networks = self
            .allowed_networks
            .iter()
            .enumerate()
            .map(|(i, n)| n.parse::<Cidr>().map_err(|e| invalid(format!("allowed_networks[{i}]"), e.to_string())))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Acl { initiators: self.allowed_initiators.clone(), networks })
    }

    /// The CHAP credentials, with secret files read and checked (mode 0600 or stricter,
    /// 12 to 255 bytes). Errors name the key, never the secret.
    pub fn auth_config(&self) -> Result<AuthConfig, ConfigError> {
        resolve_auth(self.auth.as_ref())
    }

    fn validate_reactors(&self) -> Result<(), ConfigError> {
        match (self.reactors, &self.cpus) {
            (Some(_), Some(_)) => Err(invalid("reactors", "set either reactors or cpus, not both")),
            (Some(0), None) => Err(invalid("reactors", "must be at least 1")),
            (Some(n), None) if n > MAX_REACTORS => Err(invalid("reactors", format!("{n} is more than {MAX_REACTORS}"))),
            (_, Some(cpus)) => {
                if cpus.is_empty() {
                    return Err(invalid("cpus", "must list at least one CPU"));
                }
                let allowed = affinity_cpus();
                for (i, cpu) in cpus.iter().enumerate() {
                    if cpus[..i].contains(cpu) {
                        return Err(invalid("cpus", format!("CPU {cpu} is listed twice")));
                    }
                    if !allowed.contains(cpu) {
                        return Err(invalid(
                            "cpus",
                            format!("CPU {cpu} is not in this process's affinity mask (allowed: {})", join(&allowed)),
                        ));
                    }
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn validate_luns(&self) -> Result<(), ConfigError> {
        let mut names = HashMap::new();
        let mut ids = HashMap::new();
        let mut files: HashMap<PathBuf, &str> = HashMap::new();
        for (i, lun) in self.luns.iter().enumerate() {
            let key = self.lun_key(i);
            lun.validate(&key)?;
            if let Some(first) = names.insert(lun.name.as_str(), i) {
                return Err(invalid(
                    field_key(&key, "name"),
                    format!("{:?} is already the name of {}", lun.name, self.lun_key(first)),
                ));
            }
            if let Some(id) = lun.lun_id {
                if let Some(first) = ids.insert(id, i) {
                    return Err(invalid(
                        field_key(&key, "lun_id"),
                        format!("{id} is already the lun_id of {}", self.lun_key(first)),
                    ));
                }
            }
            // Two LUNs over one image would corrupt each other's data.
            if let Some(path) = lun.image_path() {
                let path: PathBuf = path.components().filter(|c| *c != Component::CurDir).collect();
                if let Some(other) = files.insert(path.clone(), &lun.name) {
                    return Err(invalid(
                        field_key(&key, "file_path"),
                        format!("{} is already exported by lun {other}", path.display()),
                    ));
                }
            }
        }
        Ok(())
    }

    /// How errors name `luns[i]`: its index in the file, or the `--lun` flag it came from.
    fn lun_key(&self, i: usize) -> String {
        let first_flag = self.luns.len().saturating_sub(self.lun_flags.len());
        match i.checked_sub(first_flag).and_then(|k| self.lun_flags.get(k)) {
            Some(spec) => format!("--lun {spec}"),
            None => format!("luns[{i}]"),
        }
    }

    /// The target's IQN, `iqn_prefix:target_name`, lower-cased: iSCSI names compare
    /// case-insensitively and are exchanged in lower case (RFC 3722).
    pub fn target_iqn(&self) -> String {
        format!("{}:{}", self.iqn_prefix, self.target_name).to_lowercase()
    }

    pub fn control_socket_path(&self) -> PathBuf {
        self.control_socket.clone().unwrap_or_else(|| self.root_dir.join("uringtgt.sock"))
    }

    /// The portal address: `host`, or when empty the address of the interface the default route
    /// leaves through, or `0.0.0.0` when there is no default route.
    pub fn resolve_host(&self) -> String {
        if !self.host.is_empty() {
            return self.host.clone();
        }
        default_route_addr().map_or_else(|| "0.0.0.0".to_owned(), |ip| ip.to_string())
    }

    /// The CPU each reactor is pinned to: `cpus`, or the first `reactors` CPUs of the affinity
    /// mask, cycling through the mask when there are more reactors than CPUs.
    pub fn reactor_cpus(&self) -> Vec<usize> {
        if let Some(cpus) = &self.cpus {
            return cpus.clone();
        }
        let mask = affinity_cpus();
        let n = self.reactors.unwrap_or(mask.len());
        mask.iter().copied().cycle().take(n).collect()
    }
}

impl LunConfig {
    /// Parses a `--lun` value: comma-separated `key=value` pairs with the YAML keys, e.g.
    /// `name=disk0,file_path=disk0.img,size_mb=64,backing=file,read_only=true,lun_id=3,is_block=false`.
    pub fn parse_spec(spec: &str) -> Result<LunConfig, ConfigError> {
        let key = |k: &str| format!("--lun {spec}: {k}");
        let mut name = None;
        let mut lun = LunConfig {
            name: String::new(),
            file_path: None,
            size_mb: 0,
            backing: BackingKind::File,
            read_only: false,
            lun_id: None,
            is_block: false,
            removable: false,
            initiators: Vec::new(),
        };
        for pair in spec.split(',').filter(|p| !p.is_empty()) {
            let Some((k, v)) = pair.split_once('=') else {
                return Err(invalid(format!("--lun {spec}"), format!("{pair:?} is not key=value")));
            };
            let num = |v: &str| v.parse::<u64>().map_err(|_| invalid(key(k), format!("not a whole number: {v:?}")));
            let flag = |v: &str| v.parse::<bool>().map_err(|_| invalid(key(k), format!("not true or false: {v:?}")));
            match k {
                "name" => name = Some(v.to_owned()),
                "file_path" => lun.file_path = Some(PathBuf::from(v)),
                "size_mb" => lun.size_mb = num(v)?,
                "backing" => {
                    lun.backing = match v {
                        "file" => BackingKind::File,
                        "mem" => BackingKind::Mem,
                        _ => return Err(invalid(key(k), format!("{v:?} is not file or mem"))),
                    }
                }
                "read_only" => lun.read_only = flag(v)?,
                "lun_id" => lun.lun_id = Some(num(v)?),
                "is_block" => lun.is_block = flag(v)?,
                "removable" => lun.removable = flag(v)?,
                // Repeatable: initiator=iqn.a,initiator=iqn.b
                "initiator" => lun.initiators.push(v.to_owned()),
                _ => {
                    return Err(invalid(
                        format!("--lun {spec}"),
                        format!(
                            "unknown key {k:?}, expected one of name, file_path, size_mb, backing, read_only, lun_id, is_block, initiator, removable"
                        ),
                    ))
                }
            }
        }
        lun.name = name.ok_or_else(|| invalid(format!("--lun {spec}"), "name is required"))?;
        lun.fill_defaults();
        lun.validate(&format!("--lun {spec}"))?;
        Ok(lun)
    }

    /// `file_path` defaults to `<name>.img` for image-file LUNs.
    pub fn fill_defaults(&mut self) {
        if self.file_path.is_none() && self.backing == BackingKind::File && !self.is_block {
            self.file_path = Some(PathBuf::from(format!("{}.img", self.name)));
        }
    }

    /// The image path relative to root_dir, for image-file LUNs.
    pub fn image_path(&self) -> Option<PathBuf> {
        if self.backing != BackingKind::File || self.is_block {
            return None;
        }
        Some(self.file_path.clone().unwrap_or_else(|| PathBuf::from(format!("{}.img", self.name))))
    }

    /// Checks this LUN on its own; `key` prefixes error keys (`luns[1]`, `--lun ...`).
    pub fn validate(&self, key: &str) -> Result<(), ConfigError> {
        let k = |field: &str| field_key(key, field);
        if self.name.is_empty() {
            return Err(invalid(k("name"), "must not be empty"));
        }
        if let Some(c) = self.name.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))) {
            return Err(invalid(k("name"), format!("{:?} contains {c:?}; allowed are A-Z a-z 0-9 . _ -", self.name)));
        }
        if let Some(id) = self.lun_id {
            if id > MAX_LUN_ID {
                return Err(invalid(k("lun_id"), format!("{id} is above the highest LUN number, {MAX_LUN_ID}")));
            }
        }
        validate_initiator_list(&self.initiators, &k("initiators"))?;
        if self.size_mb > u64::MAX >> 20 {
            return Err(invalid(k("size_mb"), format!("{} MiB does not fit in 64 bits of bytes", self.size_mb)));
        }
        match (self.backing, self.is_block) {
            (BackingKind::Mem, _) => {
                if self.size_mb == 0 {
                    return Err(invalid(k("size_mb"), "a mem LUN needs a size above 0"));
                }
                if self.is_block {
                    return Err(invalid(k("is_block"), "a mem LUN cannot be a block device"));
                }
                if let Some(p) = &self.file_path {
                    return Err(invalid(k("file_path"), format!("a mem LUN has no file: {}", p.display())));
                }
            }
            (BackingKind::File, true) => {
                let Some(p) = &self.file_path else {
                    return Err(invalid(k("file_path"), "a block LUN needs the device's absolute path"));
                };
                if !p.is_absolute() {
                    return Err(invalid(
                        k("file_path"),
                        format!("a block device path must be absolute: {}", p.display()),
                    ));
                }
                if self.size_mb != 0 {
                    return Err(invalid(k("size_mb"), "a block device has a fixed size; leave size_mb at 0"));
                }
            }
            (BackingKind::File, false) => {
                if let Some(p) = &self.file_path {
                    check_relative(p).map_err(|m| invalid(k("file_path"), m))?;
                }
            }
        }
        Ok(())
    }
}

/// `luns[1].name`, or for a flag `--lun name=a,size_mb=1: name` (as [`LunConfig::parse_spec`]
/// words its errors).
fn field_key(key: &str, field: &str) -> String {
    if key.starts_with("--") {
        format!("{key}: {field}")
    } else {
        format!("{key}.{field}")
    }
}

/// An `auth` section (of the configuration or of `set_auth`) checked, with its secret files
/// read; `None` is demo mode. Errors name the key, never the secret.
pub fn resolve_auth(auth: Option<&AuthSection>) -> Result<AuthConfig, ConfigError> {
    let Some(auth) = auth else { return Ok(AuthConfig::default()) };
    let Some(chap) = &auth.chap else {
        return Err(invalid("auth.chap", "required: mutual_chap and discovery need the initiator's CHAP user"));
    };
    let chap = chap.credentials("auth.chap")?;
    let mutual = auth.mutual_chap.as_ref().map(|c| c.credentials("auth.mutual_chap")).transpose()?;
    // RFC 7143 §12.1.3: a secret must not authenticate both directions.
    if mutual.as_ref().is_some_and(|m| m.secret == chap.secret) {
        return Err(invalid("auth.mutual_chap", "the secret must differ from auth.chap's"));
    }
    Ok(AuthConfig { chap: Some(chap), mutual, discovery: auth.discovery })
}

/// A list of initiator names (a LUN's `initiators`).
pub fn validate_initiator_list(names: &[String], key: &str) -> Result<(), ConfigError> {
    for (i, name) in names.iter().enumerate() {
        if name.is_empty() || name.len() > MAX_ISCSI_NAME || name.contains(|c: char| c.is_whitespace() || c == ',') {
            return Err(invalid(format!("{key}[{i}]"), format!("{name:?} is not an iSCSI name")));
        }
    }
    Ok(())
}

impl ChapSection {
    /// Checks what can be checked without reading `secret_file`.
    fn validate(&self, key: &str) -> Result<(), ConfigError> {
        if self.username.is_empty() {
            return Err(invalid(format!("{key}.username"), "must not be empty"));
        }
        if self.username.len() > 255 || self.username.contains(|c: char| c.is_control()) {
            return Err(invalid(format!("{key}.username"), "must be at most 255 printable characters"));
        }
        match (&self.secret, &self.secret_file) {
            (Some(_), Some(_)) => Err(invalid(key, "set either secret or secret_file, not both")),
            (None, None) => Err(invalid(key, "needs secret or secret_file")),
            (Some(s), None) => check_secret_len(s.0.len(), &format!("{key}.secret")),
            (None, Some(p)) if p.as_os_str().is_empty() => {
                Err(invalid(format!("{key}.secret_file"), "must not be empty"))
            }
            (None, Some(_)) => Ok(()),
        }
    }

    /// The credentials, reading `secret_file` if that is where the secret is.
    fn credentials(&self, key: &str) -> Result<Credentials, ConfigError> {
        self.validate(key)?;
        let secret = match (&self.secret, &self.secret_file) {
            (Some(s), _) => Secret::new(s.0.as_bytes()),
            (None, Some(path)) => read_secret_file(path, &format!("{key}.secret_file"))?,
            (None, None) => unreachable!("validate() demands one"),
        };
        Ok(Credentials { username: self.username.clone(), secret })
    }
}

fn check_secret_len(len: usize, key: &str) -> Result<(), ConfigError> {
    if len < chap::MIN_SECRET_LEN {
        return Err(invalid(
            key,
            format!("{len} bytes; a CHAP secret needs at least {} (RFC 7143 §12.1.3)", chap::MIN_SECRET_LEN),
        ));
    }
    if len > chap::MAX_SECRET_LEN {
        return Err(invalid(key, format!("{len} bytes; at most {} are accepted", chap::MAX_SECRET_LEN)));
    }
    Ok(())
}

/// Reads a secret file: it must be a regular file nobody but its owner can read or write
/// (mode 0600 or stricter). One trailing newline (`\n` or `\r\n`) is not part of the secret.
fn read_secret_file(path: &Path, key: &str) -> Result<Secret, ConfigError> {
    use std::os::unix::fs::PermissionsExt;
    let meta = fs::metadata(path).map_err(io_err(path, "read secret file"))?;
    if !meta.is_file() {
        return Err(invalid(key, format!("{} is not a regular file", path.display())));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(invalid(
            key,
            format!(
                "{} has mode {mode:04o}; it must be 0600 or stricter (chmod 600 {})",
                path.display(),
                path.display()
            ),
        ));
    }
    let mut bytes = fs::read(path).map_err(io_err(path, "read secret file"))?;
    if bytes.ends_with(b"\n") {
        bytes.pop();
        if bytes.ends_with(b"\r") {
            bytes.pop();
        }
    }
    check_secret_len(bytes.len(), key)?;
    Ok(Secret::new(bytes))
}

/// An image path must stay below root_dir by construction: relative, no `..`, not empty.
fn check_relative(p: &Path) -> Result<(), String> {
    if p.as_os_str().is_empty() {
        return Err("must not be empty".into());
    }
    if p.is_absolute() {
        return Err(format!("absolute paths are not allowed: {}", p.display()));
    }
    if p.components().any(|c| c == Component::ParentDir) {
        return Err(format!("'..' is not allowed: {}", p.display()));
    }
    if p.file_name().is_none() {
        return Err(format!("does not name a file: {}", p.display()));
    }
    Ok(())
}

/// iSCSI names: `iqn.yyyy-mm.<reversed domain>[:...]`, characters a-z 0-9 `-` `.` `:`
/// (upper case is accepted and lower-cased, as the old driver's LIO did).
fn validate_iqn(prefix: &str, target_name: &str) -> Result<(), ConfigError> {
    let bad_char = |s: &str| s.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | ':')));
    if let Some(c) = bad_char(prefix) {
        return Err(invalid("iqn_prefix", format!("{prefix:?} contains {c:?}; iSCSI names allow a-z 0-9 - . :")));
    }
    let date_ok = prefix.len() > 12
        && prefix[..4].eq_ignore_ascii_case("iqn.")
        && prefix.as_bytes()[4..8].iter().all(u8::is_ascii_digit)
        && prefix.as_bytes()[8] == b'-'
        && prefix.as_bytes()[9..11].iter().all(u8::is_ascii_digit)
        && prefix.as_bytes()[11] == b'.';
    if !date_ok {
        return Err(invalid("iqn_prefix", format!("{prefix:?} is not of the form iqn.yyyy-mm.reversed.domain")));
    }
    if target_name.is_empty() {
        return Err(invalid("target_name", "must not be empty"));
    }
    if let Some(c) = bad_char(target_name) {
        return Err(invalid("target_name", format!("{target_name:?} contains {c:?}; iSCSI names allow a-z 0-9 - . :")));
    }
    let len = prefix.len() + 1 + target_name.len();
    if len > MAX_ISCSI_NAME {
        return Err(invalid("target_name", format!("the target IQN would be {len} bytes, more than {MAX_ISCSI_NAME}")));
    }
    Ok(())
}

/// A Jumpstarter exporter config; of its keys only `export:` matters here.
#[derive(Deserialize)]
struct ExporterFile {
    export: IscsiExport,
}

/// The `config:` block of the first export whose `type` names iSCSI, if any.
struct IscsiExport(Option<Config>);

/// One export: its `config:` when its `type` names iSCSI, else the first iSCSI export among
/// its `children:` (a composite driver nests the drivers it groups), searched depth first.
struct ExportEntry(Option<Config>);

fn is_iscsi_type(ty: &str) -> bool {
    ty.to_ascii_lowercase().contains("iscsi")
}

impl<'de> Deserialize<'de> for IscsiExport {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = IscsiExport;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a mapping of export names to {type, config}")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<IscsiExport, A::Error> {
                let mut found = None;
                while let Some((_, entry)) = map.next_entry::<serde_norway::Value, ExportEntry>()? {
                    if found.is_none() {
                        found = entry.0;
                    }
                }
                Ok(IscsiExport(found))
            }
        }
        d.deserialize_map(V)
    }
}

impl<'de> Deserialize<'de> for ExportEntry {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::{Error, IgnoredAny};
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = ExportEntry;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an export: {type, config}")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<ExportEntry, A::Error> {
                let mut ty: Option<String> = None;
                let mut config: Option<Config> = None;
                let mut children: Option<Config> = None;
                // `config` before `type`: kept as a value until the type is known.
                let mut early: Option<serde_norway::Value> = None;
                while let Some(key) = map.next_key::<String>()? {
                    match (key.as_str(), ty.as_deref()) {
                        ("type", _) => ty = Some(map.next_value()?),
                        // Parsed straight from the text so errors keep their key path and line.
                        ("config", Some(t)) if is_iscsi_type(t) => {
                            config = Some(map.next_value::<Option<Config>>()?.unwrap_or_default())
                        }
                        ("config", None) => early = Some(map.next_value()?),
                        ("children", _) => {
                            if let Some(found) = map.next_value::<Option<IscsiExport>>()?.and_then(|c| c.0) {
                                children.get_or_insert(found);
                            }
                        }
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                if !ty.as_deref().is_some_and(is_iscsi_type) {
                    return Ok(ExportEntry(children));
                }
                if let Some(v) = early.filter(|v| !v.is_null()) {
                    config = Some(serde_norway::from_value(v).map_err(|e| A::Error::custom(format!("config: {e}")))?);
                }
                Ok(ExportEntry(Some(config.unwrap_or_default())))
            }
        }
        d.deserialize_map(V)
    }
}

/// The local address a UDP socket "connected" to a public address gets: connect() on UDP sends
/// nothing, it only asks the kernel for the route.
pub(crate) fn default_route_addr() -> Option<IpAddr> {
    let sock = UdpSocket::bind("0.0.0.0:0").ok()?;
    sock.connect("8.8.8.8:53").ok()?;
    let ip = sock.local_addr().ok()?.ip();
    (!ip.is_unspecified()).then_some(ip)
}

/// CPU ids this process may run on, ascending.
fn affinity_cpus() -> Vec<usize> {
    let mut ids: Vec<usize> = core_affinity::get_core_ids().unwrap_or_default().into_iter().map(|c| c.id).collect();
    ids.sort_unstable();
    if ids.is_empty() {
        // No affinity information: assume the CPUs std sees are 0..n.
        ids = (0..std::thread::available_parallelism().map_or(1, |n| n.get())).collect();
    }
    ids
}

fn join(v: &[usize]) -> String {
    v.iter().map(ToString::to_string).collect::<Vec<_>>().join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(yaml: &str) -> String {
        Config::from_yaml_str(yaml).unwrap_err().to_string()
    }

    #[test]
    fn limits_block_defaults_and_checks() {
        let c = Config::from_yaml_str("").unwrap();
        assert_eq!(c.limits, ConnLimits::default());
        assert_eq!(c.limits.max_cmds_per_session, 128);
        let c = Config::from_yaml_str("limits:\n  dataout_timeout_secs: 5\n").unwrap();
        assert_eq!(c.limits.dataout_timeout_secs, 5);
        assert_eq!(c.limits.max_tx_queue_kib, 16 * 1024, "unset keys keep their defaults");
        assert!(err("limits:\n  max_cmds_per_session: 0\n").contains("limits.max_cmds_per_session"));
        assert_eq!(c.limits.buffer_memory_mib, 256);
        assert!(err("limits:\n  buffer_memory_mib: 8\n").contains("must be 16 (the largest command)"));
        let c = Config::from_yaml_str("limits:\n  buffer_memory_mib: 16\n").unwrap();
        assert_eq!(c.limits.buffer_memory_mib, 16);
        assert!(err("limits:\n  max_cmds_per_session: 5000\n").contains("limits.max_cmds_per_session"));
        assert!(err("limits:\n  max_tx_queue_kib: 1\n").contains("limits.max_tx_queue_kib"));
        assert!(err("limits:\n  tx_stall_timeout_secs: 0\n").contains("limits.tx_stall_timeout_secs"));
        assert!(err("limits:\n  bogus: 1\n").contains("bogus"));
    }

    #[test]
    fn defaults_match_the_old_driver() {
        let c = Config::from_yaml_str("").unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.root_dir, PathBuf::from("/var/lib/iscsi"));
        assert_eq!(c.target_iqn(), "iqn.2024-06.dev.jumpstarter:target1");
        assert_eq!(c.port, 3260);
        assert_eq!(c.host, "");
        assert!(!c.remove_created_on_close);
        assert!(c.block_device_allowlist.is_empty());
        assert_eq!(c.control_socket_path(), PathBuf::from("/var/lib/iscsi/uringtgt.sock"));
        assert_eq!(c.poll_mode, PollMode::Adaptive);
    }

    #[test]
    fn every_poll_mode_parses() {
        for (yaml, mode) in [("adaptive", PollMode::Adaptive), ("busy", PollMode::Busy), ("frugal", PollMode::Frugal)] {
            let c = Config::from_yaml_str(&format!("poll_mode: {yaml}\n")).unwrap();
            assert_eq!(c.poll_mode, mode);
        }
    }

    #[test]
    fn full_config_parses() {
        let c = Config::from_yaml_str(
            "root_dir: /srv/img\niqn_prefix: iqn.2020-01.org.example\ntarget_name: Lab\nhost: 127.0.0.1\nport: 3261\n\
             remove_created_on_close: true\nblock_device_allowlist: [/dev/null]\ncontrol_socket: /run/u.sock\n\
             reactors: 3\npoll_mode: busy\nlog_level: debug\nluns:\n  - {name: disk0, size_mb: 64}\n\
             \x20 - {name: ram, backing: mem, size_mb: 8, lun_id: 5, read_only: true}\n",
        )
        .unwrap();
        assert_eq!(c.target_iqn(), "iqn.2020-01.org.example:lab");
        assert_eq!(c.port, 3261);
        assert_eq!(c.reactors, Some(3));
        assert_eq!(c.poll_mode, PollMode::Busy);
        assert_eq!(c.control_socket_path(), PathBuf::from("/run/u.sock"));
        assert_eq!(c.luns[0].file_path, Some(PathBuf::from("disk0.img")));
        assert_eq!(c.luns[0].backing, BackingKind::File);
        assert_eq!(c.luns[1].file_path, None);
        assert_eq!((c.luns[1].backing, c.luns[1].lun_id, c.luns[1].read_only), (BackingKind::Mem, Some(5), true));
    }

    #[test]
    fn exporter_config_uses_the_iscsi_export() {
        let c = Config::from_yaml_str(
            "apiVersion: jumpstarter.dev/v1alpha1\nkind: ExporterConfig\nendpoint: grpc.example:443\nexport:\n  power:\n    \
             type: jumpstarter_driver_power.driver.MockPower\n    config: {voltage: 5}\n  storage:\n    \
             type: jumpstarter_driver_iscsi.driver.ISCSI\n    config:\n      root_dir: /var/lib/iscsi\n      \
             target_name: demo\n      port: 3262\n",
        )
        .unwrap();
        assert_eq!(c.target_iqn(), "iqn.2024-06.dev.jumpstarter:demo");
        assert_eq!(c.port, 3262);
        let bare = Config::from_yaml_str("export:\n  iscsi:\n    type: ISCSI\n").unwrap();
        assert_eq!(bare, Config::default());
        assert!(err("export:\n  p:\n    type: Power\n").starts_with("export: no export has an iSCSI type"));
        let e = err("export:\n  iscsi:\n    type: x.ISCSI\n    config: {colour: red}\n");
        assert!(e.contains("export.iscsi.config: unknown field `colour`") && e.contains("line 4"), "{e}");
        let e = err("export:\n  iscsi:\n    type: x.ISCSI\n    config:\n      luns: [{name: a, backing: x}]\n");
        assert!(e.contains("export.iscsi.config.luns[0].backing: unknown variant `x`"), "{e}");
        // config before type still works.
        let c = Config::from_yaml_str("export:\n  iscsi:\n    config: {port: 1}\n    type: ISCSI\n").unwrap();
        assert_eq!(c.port, 1);
        let e = err("export:\n  iscsi:\n    config: {prot: 1}\n    type: ISCSI\n");
        assert!(e.contains("prot"), "{e}");
        // Nested under a composite's children, at any depth.
        let nested = "export:\n  dut:\n    type: jumpstarter_driver_composite.driver.Composite\n    children:\n      \
                      power:\n        type: MockPower\n      box:\n        type: Composite\n        children:\n          \
                      storage:\n            type: jumpstarter_driver_iscsi.driver.ISCSI\n            config: {port: 7}\n";
        assert_eq!(Config::from_yaml_str(nested).unwrap().port, 7);
    }

    #[test]
    fn shipped_examples_parse() {
        let demo = Config::from_yaml_str(include_str!("../examples/demo.yaml")).unwrap();
        assert_eq!(demo.target_iqn(), "iqn.2024-06.dev.jumpstarter:demo");
        assert_eq!((demo.resolve_host(), demo.port), ("127.0.0.1".to_owned(), 3260));
        assert_eq!(
            demo.luns.iter().map(|l| (l.backing, l.size_mb)).collect::<Vec<_>>(),
            [(BackingKind::File, 64), (BackingKind::Mem, 64)]
        );
        let exp = Config::from_yaml_str(include_str!("../examples/jumpstarter-exporter.yaml")).unwrap();
        assert_eq!(exp.target_iqn(), "iqn.2024-06.dev.jumpstarter:demo");
        assert_eq!(exp.luns[0].file_path, Some(PathBuf::from("disk0.img")));
    }

    #[test]
    fn unknown_and_mistyped_keys_are_named() {
        let e = err("port: 3260\nprot: 1\n");
        assert!(e.contains("unknown field `prot`") && e.contains("line 2"), "{e}");
        let e = err("luns:\n  - {name: a, sise_mb: 1}\n");
        assert!(e.contains("luns[0]") && e.contains("sise_mb"), "{e}");
        let e = err("port: 70000\n");
        assert!(e.contains("port") && e.contains("70000"), "{e}");
        let e = err("poll_mode: bussy\n");
        assert!(e.contains("poll_mode") && e.contains("bussy"), "{e}");
        let e = err("luns:\n  - {name: a, backing: disk}\n");
        assert!(e.contains("luns[0].backing") && e.contains("disk"), "{e}");
        assert!(err("port: [1\n").starts_with("config: "));
    }

    #[test]
    fn bad_values_are_named() {
        let cases = [
            (
                "luns:\n  - {name: a}\n  - {name: b, file_path: /etc/passwd}\n",
                "luns[1].file_path: absolute paths are not allowed: /etc/passwd",
            ),
            ("luns:\n  - {name: a, file_path: x/../../b.img}\n", "luns[0].file_path: '..' is not allowed"),
            ("luns:\n  - {name: 'a b'}\n", "luns[0].name: \"a b\" contains ' '"),
            ("luns:\n  - {name: ''}\n", "luns[0].name: must not be empty"),
            (
                "luns:\n  - {name: a}\n  - {name: a, file_path: b.img}\n",
                "luns[1].name: \"a\" is already the name of luns[0]",
            ),
            ("luns:\n  - {name: a, lun_id: 1}\n  - {name: b, lun_id: 1}\n", "luns[1].lun_id: 1 is already"),
            ("luns:\n  - {name: a, lun_id: 16384}\n", "luns[0].lun_id: 16384 is above"),
            ("luns:\n  - {name: a, backing: mem}\n", "luns[0].size_mb: a mem LUN needs a size"),
            ("luns:\n  - {name: a, backing: mem, size_mb: 1, file_path: a.img}\n", "luns[0].file_path: a mem LUN"),
            (
                "luns:\n  - {name: a}\n  - {name: b, file_path: ./a.img}\n",
                "luns[1].file_path: a.img is already exported",
            ),
            ("luns:\n  - {name: a, is_block: true, file_path: sda}\n", "luns[0].file_path: a block device path must"),
            ("reactors: 0\n", "reactors: must be at least 1"),
            ("reactors: 2\ncpus: [0]\n", "reactors: set either"),
            ("cpus: []\n", "cpus: must list"),
            ("cpus: [0, 0]\n", "cpus: CPU 0 is listed twice"),
            ("cpus: [100000]\n", "cpus: CPU 100000 is not in this process's affinity mask"),
            ("host: example.com\n", "host: not an IP address"),
            ("iqn_prefix: foo.bar\n", "iqn_prefix: \"foo.bar\" is not of the form"),
            ("target_name: 'a/b'\n", "target_name: \"a/b\" contains '/'"),
            ("target_name: ''\n", "target_name: must not be empty"),
            ("block_device_allowlist: [dev/sda]\n", "block_device_allowlist[0]: must be an absolute path"),
            ("log_level: loud\n", "log_level: \"loud\" is not one of"),
            ("root_dir: /tmp\ncontrol_socket: ''\n", "control_socket: must not be empty"),
        ];
        for (yaml, want) in cases {
            let e = err(yaml);
            assert!(e.starts_with(want), "{yaml:?}: got {e:?}, want {want:?}");
        }
        let long = format!("root_dir: /{}\n", "d".repeat(120));
        assert!(err(&long).starts_with("root_dir: control socket path"));
    }

    #[test]
    fn lun_specs_parse_like_yaml() {
        let l = LunConfig::parse_spec(
            "name=disk0,file_path=img/disk0.img,size_mb=64,backing=file,read_only=true,lun_id=3,is_block=false,removable=true",
        )
        .unwrap();
        assert_eq!(
            l,
            LunConfig {
                name: "disk0".into(),
                file_path: Some("img/disk0.img".into()),
                size_mb: 64,
                backing: BackingKind::File,
                read_only: true,
                lun_id: Some(3),
                is_block: false,
                removable: true,
                initiators: Vec::new(),
            }
        );
        assert_eq!(LunConfig::parse_spec("name=d").unwrap().file_path, Some("d.img".into()));
        assert_eq!(LunConfig::parse_spec("name=r,backing=mem,size_mb=1").unwrap().file_path, None);
        let e = |s: &str| LunConfig::parse_spec(s).unwrap_err().to_string();
        assert!(e("size_mb=1").ends_with("name is required"));
        assert!(e("name=a,size=1").contains("unknown key \"size\""));
        assert!(e("name=a,size_mb=x").contains("size_mb: not a whole number"));
        assert!(e("name=a,read_only=yes").contains("read_only: not true or false"));
        assert!(e("name=a,removable=1").contains("removable: not true or false"));
        assert!(e("name=a,backing=disk").contains("backing: \"disk\" is not file or mem"));
        assert!(e("name=a,file_path=/etc/passwd").contains("file_path: absolute paths are not allowed"));
        assert!(e("name=a,oops").contains("\"oops\" is not key=value"));
    }

    #[test]
    fn reactor_cpus_follow_the_affinity_mask() {
        let mask = affinity_cpus();
        assert!(!mask.is_empty());
        assert_eq!(Config::default().reactor_cpus(), mask);
        let c = Config { reactors: Some(mask.len() * 2 + 1), ..Config::default() };
        let cpus = c.reactor_cpus();
        assert_eq!(cpus.len(), mask.len() * 2 + 1);
        assert_eq!(cpus[mask.len()], mask[0]);
        assert_eq!(Config { reactors: Some(1), ..Config::default() }.reactor_cpus(), vec![mask[0]]);
        assert_eq!(Config { cpus: Some(vec![mask[0]]), ..Config::default() }.reactor_cpus(), vec![mask[0]]);
    }

    #[test]
    fn host_resolution() {
        let c = Config { host: "127.0.0.1".into(), ..Config::default() };
        assert_eq!(c.resolve_host(), "127.0.0.1");
        // Without a default route this is 0.0.0.0; either way an address.
        let h = Config::default().resolve_host();
        assert!(h.parse::<IpAddr>().is_ok(), "{h}");
    }

    #[test]
    fn load_reports_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("none.yaml");
        let e = Config::load(&missing).unwrap_err().to_string();
        assert!(e.starts_with(&format!("{}: read config: ", missing.display())), "{e}");
        let bad = dir.path().join("bad.yaml");
        fs::write(&bad, "port: 1\nbogus: 2\n").unwrap();
        let e = Config::load(&bad).unwrap_err().to_string();
        assert!(e.starts_with(&format!("{}: ", bad.display())) && e.contains("bogus"), "{e}");
    }
}
