//! `uringtgt`: the command line. `serve` loads the configuration, applies the flags over it and
//! runs the target until it stops.

use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};
use std::error::Error;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use uringtgt::config::{Config, ConfigError, LunConfig, PollMode};
use uringtgt::control::{rpc, Client, ControlError};
use uringtgt::images::{self, Compression, ImageError, Progress};
use uringtgt::target::{self, TargetError};

/// A user-space iSCSI target (RFC 7143) on per-core io_uring reactors.
#[derive(Parser)]
#[command(name = "uringtgt", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the configured target.
    Serve(Box<ServeArgs>),
    /// Talk to a running target over its control socket.
    Ctl(Box<CtlArgs>),
}

#[derive(Args)]
struct CtlArgs {
    /// Control socket (default: the configuration's control_socket, <root_dir>/uringtgt.sock).
    #[arg(long, value_name = "PATH", global = true)]
    socket: Option<PathBuf>,
    /// Configuration file whose control_socket (or root_dir) locates the socket.
    #[arg(long, value_name = "FILE", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: CtlCommand,
}

#[derive(Subcommand)]
enum CtlCommand {
    /// Export an image file (relative to root_dir), a RAM disk or an allow-listed block device;
    /// an existing name is replaced.
    AddLun {
        name: String,
        /// Image path relative to root_dir (default <NAME>.img); with --block, the device path.
        path: Option<PathBuf>,
        /// Size in MiB; 0 uses the existing file's size.
        #[arg(long, default_value_t = 0)]
        size_mb: u64,
        #[arg(long)]
        read_only: bool,
        #[arg(long, value_parser = ["file", "mem"], default_value = "file")]
        backing: String,
        /// LUN number (default: the LUN's current one, or the lowest free one).
        #[arg(long)]
        lun_id: Option<u64>,
        /// Export an allow-listed block device.
        #[arg(long)]
        block: bool,
        /// Removable medium (INQUIRY RMB=1): initiators can eject and load it.
        #[arg(long)]
        removable: bool,
        /// Only this initiator sees the LUN (repeatable; default: every initiator).
        #[arg(long = "initiator", value_name = "IQN")]
        initiators: Vec<String>,
    },
    /// Upload an image (raw, or .gz .xz .bz2 .zst) from a file or an HTTP(S) URL into root_dir
    /// and export it as a LUN. A local file is hashed first and not sent when the target
    /// already holds an identical image; a URL is streamed straight through (no temp copy, no
    /// pre-hash: that would download it twice) and the target computes the digest. Prints
    /// `host:port iqn lun_id`.
    Upload(UploadArgs),
    /// Open the portal (idempotent), upload an image as `upload` does and print `host:port iqn`,
    /// then the LUN id on a second line. Other LUNs are left alone.
    Serve(UploadArgs),
    /// Stop exporting a LUN (its file stays).
    RemoveLun {
        name: String,
    },
    /// The exported LUNs.
    ListLuns {
        #[arg(long)]
        json: bool,
    },
    /// Remove every LUN.
    ClearLuns,
    /// I/O statistics per LUN and per reactor.
    Stats {
        #[arg(long)]
        json: bool,
        /// Print them again every second, until Ctrl-C (or --count refreshes).
        #[arg(long)]
        watch: bool,
        /// With --watch: stop after N refreshes.
        #[arg(long, value_name = "N", requires = "watch")]
        count: Option<u64>,
    },
    /// Trace a session's PDUs in the target's log (one line each), or stop tracing it (--off).
    TraceSession {
        /// The session's TSIH, as `sessions` lists it.
        tsih: u16,
        #[arg(long)]
        off: bool,
    },
    /// Logged-in sessions.
    Sessions {
        #[arg(long)]
        json: bool,
    },
    GetHost,
    GetPort,
    GetTargetIqn,
    /// Every address the portal is reachable on, one per line (a wildcard bind lists each
    /// interface's address).
    GetPortals {
        #[arg(long)]
        json: bool,
    },
    /// Size and (while it is known) SHA-256 of the image <root_dir>/<NAME>.img.
    ImageInfo {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Import an image file already on the target's machine (under root_dir or an import_dirs
    /// directory) and export it as a LUN. Prints `host:port iqn lun_id`, then what happened.
    ImportImage(ImportArgs),
    /// Open the portal (after stop).
    Start,
    /// Close the portal and log every session out; LUNs stay.
    Stop,
    /// The CHAP users and ACLs in force for new logins (never a secret).
    GetAuth,
    /// Replace the CHAP credentials for new logins; logged-in sessions keep running. Without
    /// --chap-user, authentication is turned off (demo mode).
    SetAuth {
        #[arg(long, value_name = "NAME", requires = "chap_secret_file")]
        chap_user: Option<String>,
        /// File with the secret, read by the target (mode 0600).
        #[arg(long, value_name = "FILE", requires = "chap_user")]
        chap_secret_file: Option<PathBuf>,
        #[arg(long, value_name = "NAME", requires_all = ["mutual_chap_secret_file", "chap_user"])]
        mutual_chap_user: Option<String>,
        #[arg(long, value_name = "FILE", requires = "mutual_chap_user")]
        mutual_chap_secret_file: Option<PathBuf>,
        /// Discovery sessions authenticate too.
        #[arg(long, requires = "chap_user")]
        discovery_auth: bool,
    },
}

/// What `ctl upload` and `ctl serve` take.
#[derive(Args)]
struct UploadArgs {
    /// The image: a file, or an http:// or https:// URL whose server sends a Content-Length.
    #[arg(value_name = "FILE|URL")]
    file: String,
    #[command(flatten)]
    image: ImageArgs,
    /// An HTTP request header for a URL source, e.g. 'Authorization: Bearer T' (repeatable).
    #[arg(long = "header", value_name = "'NAME: VALUE'")]
    headers: Vec<String>,
    /// For an https:// URL: trust the CA certificates in this PEM file instead of the built-in
    /// Mozilla roots (default: $SSL_CERT_FILE when set).
    #[arg(long, value_name = "FILE")]
    cacert: Option<PathBuf>,
    /// Only this initiator sees the LUN (repeatable; default: every initiator).
    #[arg(long = "initiator", value_name = "IQN")]
    initiators: Vec<String>,
}

/// What `ctl upload`, `ctl serve` and `ctl import-image` share: the image's name and LUN.
#[derive(Args)]
struct ImageArgs {
    /// Image and LUN name (default: the source's base name without .img and compression
    /// suffixes).
    #[arg(long)]
    name: Option<String>,
    /// LUN size in MiB; 0 means the image size rounded up to 512 bytes.
    #[arg(long, default_value_t = 0)]
    size_mb: u64,
    /// Replace the image even when an identical one is in place.
    #[arg(long)]
    force: bool,
    #[arg(long)]
    read_only: bool,
    /// none, gz, xz, bz2 or zstd (default: from the source's extension).
    #[arg(long)]
    compression: Option<String>,
}

impl ImageArgs {
    /// `--name`, or the one `source` gives.
    fn name_for(&self, source: &str) -> String {
        self.name.clone().unwrap_or_else(|| images::name_from_source(source))
    }

    /// The request parameters both `upload_image` and `import_image` take.
    fn params(&self, name: &str) -> Value {
        json!({"name": name, "size_mb": self.size_mb, "force": self.force, "read_only": self.read_only})
    }
}

/// What `ctl import-image` takes.
#[derive(Args)]
struct ImportArgs {
    /// The file on the target's machine: absolute, or relative to root_dir.
    #[arg(value_name = "SRC")]
    src_path: PathBuf,
    #[command(flatten)]
    image: ImageArgs,
    /// Expected SHA-256 of the uncompressed image (hex); a mismatch keeps the old image.
    #[arg(long)]
    sha256: Option<String>,
}

/// Flags override the configuration file's keys of the same name.
#[derive(Args)]
struct ServeArgs {
    /// YAML configuration (plain, or a Jumpstarter exporter config); defaults when omitted.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Portal address; "" means the default-route interface's address.
    #[arg(long)]
    host: Option<String>,
    #[arg(long)]
    port: Option<u16>,
    /// Directory holding the image files.
    #[arg(long, value_name = "DIR")]
    root_dir: Option<PathBuf>,
    #[arg(long, value_name = "PREFIX")]
    iqn_prefix: Option<String>,
    /// The target IQN is <iqn-prefix>:<target-name>.
    #[arg(long, value_name = "NAME")]
    target_name: Option<String>,
    /// Number of reactors (replaces the file's reactors or cpus).
    #[arg(long, value_name = "N")]
    reactors: Option<usize>,
    /// CPUs to pin one reactor each to, e.g. 0,1 (replaces the file's reactors or cpus).
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    cpus: Option<Vec<usize>>,
    #[arg(long, value_enum)]
    poll_mode: Option<PollMode>,
    /// Control-plane Unix socket (default <root-dir>/uringtgt.sock).
    #[arg(long, value_name = "PATH")]
    control_socket: Option<PathBuf>,
    /// A LUN to export besides the file's, e.g. name=disk0,size_mb=64 (repeatable).
    #[arg(long = "lun", value_name = "SPEC")]
    luns: Vec<String>,
    /// Log filter (error, warn, info, debug, trace, or a RUST_LOG-style filter); default info.
    #[arg(long, value_name = "FILTER")]
    log_level: Option<String>,
    /// CHAP user initiators must log in as (replaces the file's auth.chap).
    #[arg(long, value_name = "NAME", requires = "chap_secret_file")]
    chap_user: Option<String>,
    /// File holding that user's CHAP secret (mode 0600, 12 to 255 bytes).
    #[arg(long, value_name = "FILE", requires = "chap_user")]
    chap_secret_file: Option<PathBuf>,
    /// Mutual CHAP: the user the target answers initiators' challenges as.
    #[arg(long, value_name = "NAME", requires_all = ["mutual_chap_secret_file", "chap_user"])]
    mutual_chap_user: Option<String>,
    /// File holding the target's mutual CHAP secret (mode 0600).
    #[arg(long, value_name = "FILE", requires = "mutual_chap_user")]
    mutual_chap_secret_file: Option<PathBuf>,
    /// Discovery sessions authenticate with CHAP too.
    #[arg(long, requires = "chap_user")]
    discovery_auth: bool,
    /// An initiator name allowed to log in (repeatable; adds to allowed_initiators).
    #[arg(long = "allow-initiator", value_name = "IQN")]
    allow_initiators: Vec<String>,
    /// A source address block allowed to log in, e.g. 10.0.0.0/8 (repeatable; adds to
    /// allowed_networks).
    #[arg(long = "allow-network", value_name = "CIDR")]
    allow_networks: Vec<String>,
    /// Trace every PDU of this initiator's sessions in the log (repeatable; adds to the file's
    /// trace_initiators).
    #[arg(long = "trace-initiator", value_name = "IQN")]
    trace_initiators: Vec<String>,
    /// Serve Prometheus metrics on http://ADDRESS:PORT/metrics, e.g. 127.0.0.1:9460.
    #[arg(long, value_name = "ADDRESS:PORT")]
    metrics_listen: Option<String>,
}

/// What stops `uringtgt` with exit status 1.
#[derive(Debug, thiserror::Error)]
enum CliError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Target(#[from] TargetError),
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("{path}: {source}")]
    Read { path: String, source: std::io::Error },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let res = match cli.command {
        Command::Serve(args) => serve(*args),
        Command::Ctl(args) => ctl(*args),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("uringtgt: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

fn serve(args: ServeArgs) -> Result<(), CliError> {
    let cfg = build_config(&args)?;
    init_logging(args.log_level.as_deref(), cfg.log_level.as_deref());
    target::run(cfg)?;
    Ok(())
}

fn ctl(args: CtlArgs) -> Result<(), CliError> {
    let socket = match (&args.socket, &args.config) {
        (Some(s), _) => s.clone(),
        // Relative paths in the file are taken against its directory, so this works from anywhere.
        (None, Some(file)) => Config::load(file)?.control_socket_path(),
        (None, None) => Config::default().control_socket_path(),
    };
    match &args.command {
        CtlCommand::Upload(req) => {
            let mut client = Client::connect(&socket)?;
            let result = upload(&mut client, req).map_err(|e| naming_source(e, &req.file))?;
            print!("{}", upload_output(&result));
            return Ok(());
        }
        CtlCommand::Serve(req) => {
            let mut client = Client::connect(&socket)?;
            client.call("start", Value::Null)?;
            let result = upload(&mut client, req).map_err(|e| naming_source(e, &req.file))?;
            print!("{}", serve_output(&result));
            return Ok(());
        }
        CtlCommand::Stats { json, watch: true, count } => return watch_stats(&socket, *json, *count),
        _ => {}
    }
    let (method, params) = ctl_request(&args.command);
    let mut client = Client::connect(&socket)?;
    let result = client.call(method, params).map_err(CliError::from);
    let result = match &args.command {
        CtlCommand::ImportImage(a) => result.map_err(|e| naming_source(e, &a.src_path.to_string_lossy()))?,
        _ => result?,
    };
    print!("{}", ctl_output(&args.command, &result));
    Ok(())
}

/// The target's answer to a failed upload (a truncated or corrupt stream, a digest mismatch)
/// prefixed with the file or URL it came from, unless it names it already.
fn naming_source(e: CliError, src: &str) -> CliError {
    match e {
        CliError::Control(ControlError::Server { code, message }) if !message.contains(src) => {
            CliError::Control(ControlError::Server { code, message: format!("{src}: {message}") })
        }
        e => e,
    }
}

/// The method and params a `ctl` subcommand calls.
fn ctl_request(cmd: &CtlCommand) -> (&'static str, Value) {
    match cmd {
        CtlCommand::AddLun { name, path, size_mb, read_only, backing, lun_id, block, removable, initiators } => {
            let mut p = json!({"name": name, "size_mb": size_mb, "read_only": read_only, "backing": backing,
                               "is_block": block});
            if *removable {
                p["removable"] = json!(true);
            }
            if !initiators.is_empty() {
                p["initiators"] = json!(initiators);
            }
            if let Some(path) = path {
                p["file_path"] = json!(path);
            }
            if let Some(id) = lun_id {
                p["lun_id"] = json!(id);
            }
            ("add_lun", p)
        }
        CtlCommand::RemoveLun { name } => ("remove_lun", json!({"name": name})),
        CtlCommand::GetAuth => ("get_auth", Value::Null),
        CtlCommand::SetAuth {
            chap_user,
            chap_secret_file,
            mutual_chap_user,
            mutual_chap_secret_file,
            discovery_auth,
        } => {
            // The target reads the files: send absolute paths (it may run elsewhere in the tree).
            let abs = |p: &PathBuf| std::path::absolute(p).unwrap_or_else(|_| p.clone());
            let user = |u: &Option<String>, f: &Option<PathBuf>| match (u, f) {
                (Some(u), Some(f)) => json!({"username": u, "secret_file": abs(f)}),
                _ => Value::Null,
            };
            let p = json!({"chap": user(chap_user, chap_secret_file),
                           "mutual_chap": user(mutual_chap_user, mutual_chap_secret_file),
                           "discovery": discovery_auth});
            ("set_auth", p)
        }
        CtlCommand::ListLuns { .. } => ("list_luns", Value::Null),
        CtlCommand::ClearLuns => ("clear_all_luns", Value::Null),
        CtlCommand::Stats { .. } => ("get_stats", Value::Null),
        CtlCommand::Sessions { .. } => ("list_sessions", Value::Null),
        CtlCommand::GetHost => ("get_host", Value::Null),
        CtlCommand::GetPort => ("get_port", Value::Null),
        CtlCommand::GetTargetIqn => ("get_target_iqn", Value::Null),
        CtlCommand::GetPortals { .. } => ("get_portals", Value::Null),
        CtlCommand::Start => ("start", Value::Null),
        CtlCommand::Stop => ("stop", Value::Null),
        CtlCommand::TraceSession { tsih, off } => ("trace_session", json!({"tsih": tsih, "enable": !off})),
        CtlCommand::ImageInfo { name, .. } => ("image_info", json!({"name": name})),
        CtlCommand::ImportImage(a) => {
            let mut p = a.image.params(&a.image.name_for(&a.src_path.to_string_lossy()));
            p["src_path"] = json!(a.src_path);
            if let Some(c) = &a.image.compression {
                p["compression"] = json!(c);
            }
            if let Some(d) = &a.sha256 {
                p["sha256"] = json!(d);
            }
            ("import_image", p)
        }
        // Stream a file: served by upload(), not a single call.
        CtlCommand::Upload(_) | CtlCommand::Serve(_) => ("upload_image", Value::Null),
    }
}

/// Uploads a local file (see [`upload_file`]) or streams a URL's body.
fn upload(client: &mut Client, req: &UploadArgs) -> Result<Value, CliError> {
    let headers = req.headers.iter().map(|h| images::parse_header(h)).collect::<Result<Vec<_>, _>>()?;
    let name = req.image.name_for(&req.file);
    images::validate_name(&name)?;
    // Checked before a URL is fetched: a bad value should not cost a request.
    let compression = req.image.compression.as_deref().map(str::parse::<Compression>).transpose()?;
    // SSL_CERT_FILE as OpenSSL, curl and Python read it; --cacert wins. Only for URLs: the
    // variable set in a CI's environment must not fail a local file's upload.
    let ssl_cert_file = || std::env::var_os("SSL_CERT_FILE").filter(|v| !v.is_empty()).map(PathBuf::from);
    let ca_file = req.cacert.clone().or_else(|| images::is_url(&req.file).then(ssl_cert_file).flatten());
    let src = images::open_source(&req.file, &images::FetchOptions { headers, ca_file })?;
    let compression = compression.unwrap_or(src.compression);
    let mut params = req.image.params(&name);
    params["compression"] = json!(compression.as_str());
    params["size"] = json!(0);
    if !req.initiators.is_empty() {
        params["initiators"] = json!(req.initiators);
    }
    if images::is_url(&req.file) {
        // No pre-hash (it would download the image twice) and so no `sha256`: the target
        // computes it, and skips the write when it equals the image in place.
        send(client, params, src)
    } else {
        upload_file(client, req, params, src, compression)
    }
}

/// Uploads a local file. When the target holds an image of that name that this one could
/// equal (a compressed file, or a raw one of the same size), the file is hashed locally first
/// and an identical image is only re-exported (a 0-byte conditional upload). Otherwise (a
/// first upload, another size, `--force`) it streams at once, with no local pass over the
/// file: the target computes the SHA-256 as the bytes arrive and returns it.
fn upload_file(
    client: &mut Client,
    req: &UploadArgs,
    mut params: Value,
    src: images::Source,
    compression: Compression,
) -> Result<Value, CliError> {
    let name = params["name"].clone();
    let len = src.len.unwrap_or(0);
    let in_place = if req.image.force {
        None
    } else {
        match client.call("image_info", json!({"name": name})) {
            Ok(info) => Some(info),
            Err(ControlError::Server { code: rpc::IMAGE_NOT_FOUND, .. }) => None,
            Err(e) => return Err(e.into()),
        }
    };
    let may_match = in_place.as_ref().is_some_and(|info| {
        info["sha256"].is_string() && (compression != Compression::None || info["image_bytes"] == json!(len))
    });
    if may_match {
        let file =
            std::fs::File::open(&req.file).map_err(|source| CliError::Read { path: req.file.clone(), source })?;
        let bar = progress_bar(len, "hashing");
        let (bytes, digest) = images::digest_image(Progress::new(file, |n| bar.set_position(n)), compression)?;
        bar.finish_and_clear();
        let sha256 = images::to_hex(&digest);
        log::debug!("{name}: {bytes} bytes uncompressed, sha256 {sha256}");
        params["sha256"] = json!(sha256);
        if in_place.as_ref().is_some_and(|info| info["sha256"] == json!(sha256)) {
            match client.upload(params.clone(), &mut std::io::empty()) {
                Ok(result) => return Ok(result),
                // Changed meanwhile, or another LUN size: send the bytes.
                Err(ControlError::Server { code: rpc::DIGEST_MISMATCH | rpc::BAD_UPLOAD, .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    match src.len {
        Some(len) => send_file(client, params, &req.file, len),
        None => send(client, params, src),
    }
}

/// Sends a local file as the upload's payload (with `sendfile`), with a progress bar.
fn send_file(client: &mut Client, mut params: Value, path: &str, len: u64) -> Result<Value, CliError> {
    let file = std::fs::File::open(path).map_err(|source| CliError::Read { path: path.to_owned(), source })?;
    params["size"] = json!(len);
    let bar = progress_bar(len, "uploading");
    let result = client.upload_file(params, &file, len, |n| bar.set_position(n));
    bar.finish_and_clear();
    Ok(result?)
}

/// Sends `src` as the upload's payload with a progress bar.
fn send(client: &mut Client, mut params: Value, src: images::Source) -> Result<Value, CliError> {
    let len = src.len.unwrap_or(0);
    params["size"] = json!(len);
    let bar = progress_bar(len, "uploading");
    let result = client.upload(params, &mut Progress::new(src.reader, |n| bar.set_position(n)));
    bar.finish_and_clear();
    Ok(result?)
}

/// Bytes, rate and ETA on stderr; hidden when stdout is not a terminal (scripts, CI logs).
fn progress_bar(len: u64, what: &'static str) -> ProgressBar {
    if !std::io::stdout().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    let template = "{msg:9} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}";
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(what);
    bar
}

/// `host:port iqn lun_id`, then what happened.
fn upload_output(r: &Value) -> String {
    let s = |v: &Value| v.as_str().map_or_else(|| v.to_string(), str::to_owned);
    let what = if r["skipped"] == json!(true) { "skipped: identical image already in place" } else { "uploaded" };
    format!(
        "{} {} {}\n{}: {} bytes, sha256 {}, {what}\n",
        s(&r["address"]),
        s(&r["iqn"]),
        s(&r["lun_id"]),
        s(&r["name"]),
        s(&r["bytes"]),
        s(&r["sha256"])
    )
}

/// `host:port iqn` (the replaced system's `serve` line), then the LUN id.
fn serve_output(r: &Value) -> String {
    let s = |v: &Value| v.as_str().map_or_else(|| v.to_string(), str::to_owned);
    format!("{} {}\n{}\n", s(&r["address"]), s(&r["iqn"]), s(&r["lun_id"]))
}

/// What `ctl` prints for a result: JSON when asked, otherwise readable lines.
fn ctl_output(cmd: &CtlCommand, result: &Value) -> String {
    let s = |v: &Value| v.as_str().map_or_else(|| v.to_string(), str::to_owned);
    match cmd {
        CtlCommand::ListLuns { json: true }
        | CtlCommand::Stats { json: true, .. }
        | CtlCommand::Sessions { json: true }
        | CtlCommand::ImageInfo { json: true, .. }
        | CtlCommand::GetPortals { json: true } => {
            format!("{result}\n")
        }
        CtlCommand::ListLuns { json: false } => lun_table(result),
        CtlCommand::AddLun { .. } => lun_table(&json!([result])),
        CtlCommand::Stats { json: false, .. } => stats_table(result),
        CtlCommand::TraceSession { .. } => format!(
            "session {} ({}): trace {}\n",
            s(&result["tsih"]),
            s(&result["initiator"]),
            if result["trace"] == json!(true) { "on" } else { "off" }
        ),
        CtlCommand::Sessions { json: false } => sessions_table(result),
        CtlCommand::RemoveLun { name } => format!("removed {name}\n"),
        CtlCommand::ClearLuns => {
            let names: Vec<String> = result["removed"].as_array().into_iter().flatten().map(s).collect();
            format!("removed {} LUN(s){}{}\n", names.len(), if names.is_empty() { "" } else { ": " }, names.join(" "))
        }
        CtlCommand::Start => format!("portal open on {}\n", s(&result["address"])),
        CtlCommand::Stop => "portal closed\n".to_owned(),
        CtlCommand::GetHost | CtlCommand::GetPort | CtlCommand::GetTargetIqn => format!("{}\n", s(result)),
        CtlCommand::Upload(_) | CtlCommand::ImportImage(_) => upload_output(result),
        CtlCommand::ImageInfo { json: false, .. } => image_info_output(result),
        CtlCommand::GetPortals { json: false } => {
            result.as_array().into_iter().flatten().map(|a| s(a) + "\n").collect()
        }
        CtlCommand::Serve(_) => serve_output(result),
        CtlCommand::GetAuth | CtlCommand::SetAuth { .. } => auth_output(result),
    }
}

/// `image_info` as `key: value` lines.
fn image_info_output(r: &Value) -> String {
    let s = |v: &Value| v.as_str().map_or_else(|| v.to_string(), str::to_owned);
    let unknown = "unknown (not imported, or changed since)";
    let opt = |v: &Value| if v.is_null() { unknown.to_owned() } else { s(v) };
    format!(
        "name: {}\npath: {}\nsize: {}\nimage_bytes: {}\nsha256: {}\n",
        s(&r["name"]),
        s(&r["path"]),
        s(&r["size"]),
        opt(&r["image_bytes"]),
        opt(&r["sha256"])
    )
}

/// `get_auth`/`set_auth`: one line per setting (there is never a secret to show).
fn auth_output(r: &Value) -> String {
    let user = |v: &Value| v["username"].as_str().map_or_else(|| "-".to_owned(), str::to_owned);
    let list = |v: &Value| {
        let items: Vec<String> =
            v.as_array().into_iter().flatten().filter_map(|x| x.as_str().map(str::to_owned)).collect();
        if items.is_empty() {
            "any".to_owned()
        } else {
            items.join(" ")
        }
    };
    let chap = if r["chap"].is_null() { "off (demo mode: no authentication)".to_owned() } else { user(&r["chap"]) };
    format!(
        "chap: {chap}\nmutual_chap: {}\ndiscovery: {}\nallowed_initiators: {}\nallowed_networks: {}\n",
        user(&r["mutual_chap"]),
        r["discovery"],
        list(&r["allowed_initiators"]),
        list(&r["allowed_networks"])
    )
}

/// Rows padded to their columns' widths.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        format!("{}\n", padded.join("  ").trim_end())
    };
    let mut out = line(header.to_vec());
    for r in rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

fn lun_table(luns: &Value) -> String {
    let s = |v: &Value| v.as_str().map_or_else(|| v.to_string(), str::to_owned);
    let rows: Vec<Vec<String>> = luns
        .as_array()
        .into_iter()
        .flatten()
        .map(|l| {
            let mut flags = Vec::new();
            if l["read_only"] == json!(true) {
                flags.push("ro");
            }
            if l["is_block"] == json!(true) {
                flags.push("block");
            }
            if l["removable"] == json!(true) {
                flags.push("removable");
            }
            vec![
                s(&l["lun_id"]),
                s(&l["name"]),
                s(&l["backing"]),
                s(&l["size"]),
                flags.join(","),
                if l["path"].is_null() { "-".to_owned() } else { s(&l["path"]) },
            ]
        })
        .collect();
    table(&["LUN", "NAME", "BACKING", "SIZE", "FLAGS", "PATH"], &rows)
}

fn stats_table(stats: &Value) -> String {
    let s = |v: &Value| v.as_str().map_or_else(|| v.to_string(), str::to_owned);
    let op = |o: &Value| {
        let l = &o["latency_us"];
        vec![s(&o["ops"]), s(&o["bytes"]), s(&l["p50"]), s(&l["p99"]), s(&l["p99_9"]), s(&l["max"])]
    };
    let mut rows = Vec::new();
    let mut push = |what: String, v: &Value| {
        for dir in ["read", "write"] {
            let mut r = vec![what.clone(), dir.to_owned()];
            r.extend(op(&v[dir]));
            rows.push(r);
        }
    };
    for l in stats["luns"].as_array().into_iter().flatten() {
        push(format!("lun {} {}", s(&l["lun_id"]), if l["name"].is_null() { "-".into() } else { s(&l["name"]) }), l);
    }
    for r in stats["reactors"].as_array().into_iter().flatten() {
        push(format!("reactor {} ({} conns)", s(&r["reactor"]), s(&r["connections"])), r);
    }
    let ops = table(&["WHAT", "OP", "OPS", "BYTES", "P50_US", "P99_US", "P99.9_US", "MAX_US"], &rows);
    // Each reactor's task buffer memory (limits.buffer_memory_mib).
    let mib = |v: &Value| v.as_u64().map_or_else(|| "-".into(), |b| format!("{:.1}", b as f64 / (1u64 << 20) as f64));
    let buffers: Vec<Vec<String>> = stats["reactors"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            let b = &r["buffers"];
            vec![
                s(&r["reactor"]),
                mib(&b["limit_bytes"]),
                mib(&b["in_use_bytes"]),
                mib(&b["cached_bytes"]),
                s(&b["waiting"]),
                s(&b["waits"]),
                s(&b["task_set_full"]),
            ]
        })
        .collect();
    let buf_headers = ["REACTOR", "BUFFER_MIB", "IN_USE_MIB", "CACHED_MIB", "WAITING", "WAITS", "TASK_SET_FULL"];
    format!("{ops}\n{}", table(&buf_headers, &buffers))
}

fn sessions_table(sessions: &Value) -> String {
    let s = |v: &Value| v.as_str().map_or_else(|| v.to_string(), str::to_owned);
    let rows: Vec<Vec<String>> = sessions
        .as_array()
        .into_iter()
        .flatten()
        .map(|x| {
            vec![
                s(&x["tsih"]),
                s(&x["initiator"]),
                s(&x["isid"]),
                s(&x["address"]),
                s(&x["portal"]),
                s(&x["reactor"]),
                if x["discovery"] == json!(true) { "discovery".into() } else { "normal".into() },
            ]
        })
        .collect();
    table(&["TSIH", "INITIATOR", "ISID", "ADDRESS", "PORTAL", "REACTOR", "TYPE"], &rows)
}

// ---- ctl stats --watch ----

/// Set by SIGINT while `ctl stats --watch` runs.
static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    INTERRUPTED.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// `ctl stats --watch`: the stats table (or JSON line) once a second, each under a header line
/// with the time and refresh number, until SIGINT (exit 0) or `count` refreshes. On a terminal
/// the screen is cleared before each refresh.
fn watch_stats(socket: &std::path::Path, json: bool, count: Option<u64>) -> Result<(), CliError> {
    use std::io::Write;
    use std::sync::atomic::Ordering;
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe { libc::signal(libc::SIGINT, on_sigint as *const () as libc::sighandler_t) };
    let mut client = Client::connect(socket)?;
    let clear = std::io::stdout().is_terminal() && !json;
    let start = std::time::Instant::now();
    let mut n = 0u64;
    while !INTERRUPTED.load(Ordering::Relaxed) {
        let result = client.call("get_stats", Value::Null)?;
        n += 1;
        let mut out = std::io::stdout().lock();
        if clear {
            let _ = write!(out, "\x1b[2J\x1b[H");
        }
        let body = if json { format!("{result}\n") } else { stats_table(&result) };
        let _ = write!(out, "--- refresh {n} at {:.1} s (Ctrl-C stops)\n{body}", start.elapsed().as_secs_f64());
        let _ = out.flush();
        drop(out);
        if count.is_some_and(|c| n >= c) {
            break;
        }
        // A second between refreshes, in slices so Ctrl-C ends it at once.
        let next = start + std::time::Duration::from_secs(n);
        while !INTERRUPTED.load(Ordering::Relaxed) && std::time::Instant::now() < next {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
    Ok(())
}

/// The file (or defaults) with the flags applied, checked as a whole.
fn build_config(args: &ServeArgs) -> Result<Config, ConfigError> {
    let mut cfg = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    if let Some(v) = &args.host {
        cfg.host = v.clone();
    }
    if let Some(v) = args.port {
        cfg.port = v;
    }
    if let Some(v) = &args.root_dir {
        cfg.root_dir = v.clone();
    }
    if let Some(v) = &args.iqn_prefix {
        cfg.iqn_prefix = v.clone();
    }
    if let Some(v) = &args.target_name {
        cfg.target_name = v.clone();
    }
    // reactors and cpus exclude each other: a flag for one replaces the file's choice of either.
    // Both flags at once is refused here, in the one-line format, rather than by clap.
    if args.reactors.is_some() && args.cpus.is_some() {
        return Err(ConfigError::Invalid {
            key: "--reactors".into(),
            message: "cannot be combined with --cpus (set one: N reactors, or one per listed CPU)".into(),
        });
    }
    if let Some(v) = args.reactors {
        cfg.reactors = Some(v);
        cfg.cpus = None;
    }
    if let Some(v) = &args.cpus {
        cfg.cpus = Some(v.clone());
        cfg.reactors = None;
    }
    if let Some(v) = args.poll_mode {
        cfg.poll_mode = v;
    }
    if let Some(v) = &args.control_socket {
        cfg.control_socket = Some(v.clone());
    }
    for spec in &args.luns {
        cfg.luns.push(LunConfig::parse_spec(spec)?);
        cfg.lun_flags.push(spec.clone());
    }
    // The file's relative paths are already taken against its directory; the flags' against
    // the working directory. Absolute from here on, so the paths printed at start are too.
    if let Ok(cwd) = std::env::current_dir() {
        cfg.resolve_relative_paths(&cwd);
    }
    apply_access_flags(args, &mut cfg);
    cfg.trace_initiators.extend(args.trace_initiators.iter().cloned());
    if let Some(v) = &args.metrics_listen {
        cfg.metrics_listen = Some(v.clone());
    }
    cfg.validate()?;
    Ok(cfg)
}

/// The CHAP and ACL flags of `serve` over the file's `auth`, `allowed_initiators` and
/// `allowed_networks`.
fn apply_access_flags(args: &ServeArgs, cfg: &mut Config) {
    use uringtgt::config::{AuthSection, ChapSection};
    let section = |user: &str, file: &PathBuf| ChapSection {
        username: user.to_owned(),
        secret: None,
        secret_file: Some(file.clone()),
    };
    if let (Some(user), Some(file)) = (&args.chap_user, &args.chap_secret_file) {
        let auth = cfg.auth.get_or_insert_with(AuthSection::default);
        auth.chap = Some(section(user, file));
        if args.discovery_auth {
            auth.discovery = true;
        }
    }
    if let (Some(user), Some(file), Some(auth)) = (&args.mutual_chap_user, &args.mutual_chap_secret_file, &mut cfg.auth)
    {
        auth.mutual_chap = Some(section(user, file));
    }
    cfg.allowed_initiators.extend(args.allow_initiators.iter().cloned());
    cfg.allowed_networks.extend(args.allow_networks.iter().cloned());
}

/// Precedence: --log-level, then RUST_LOG, then the file's log_level, then info.
fn init_logging(flag: Option<&str>, file: Option<&str>) {
    let env = std::env::var("RUST_LOG").ok().filter(|s| !s.is_empty());
    let filter = flag.map(str::to_owned).or(env).or(file.map(str::to_owned)).unwrap_or_else(|| "info".to_owned());
    env_logger::Builder::new().parse_filters(&filter).format_timestamp_millis().init();
}

/// The error and every cause on one line, skipping causes a message already includes.
fn error_chain(e: &dyn Error) -> String {
    let mut line = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let msg = c.to_string();
        if !line.contains(&msg) {
            line.push_str(": ");
            line.push_str(&msg);
        }
        cause = c.source();
    }
    line.replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> ServeArgs {
        let argv = ["uringtgt", "serve"].iter().chain(extra).copied();
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Serve(a) => *a,
            Command::Ctl(_) => unreachable!("parsed serve"),
        }
    }

    #[test]
    fn flags_override_defaults() {
        let cfg = build_config(&args(&[
            "--host",
            "127.0.0.1",
            "--port",
            "3261",
            "--root-dir",
            "/tmp/x",
            "--target-name",
            "t2",
            "--cpus",
            "0",
            "--poll-mode",
            "busy",
            "--lun",
            "name=a,size_mb=1,backing=mem",
            "--lun",
            "name=b",
        ]))
        .unwrap();
        assert_eq!(cfg.host, "127.0.0.1");
        assert_eq!(cfg.port, 3261);
        assert_eq!(cfg.target_iqn(), "iqn.2024-06.dev.jumpstarter:t2");
        assert_eq!(cfg.cpus, Some(vec![0]));
        assert_eq!(cfg.poll_mode, PollMode::Busy);
        assert_eq!(cfg.control_socket_path(), PathBuf::from("/tmp/x/uringtgt.sock"));
        assert_eq!(cfg.luns.len(), 2);
        assert_eq!(cfg.luns[1].file_path, Some(PathBuf::from("b.img")));
    }

    #[test]
    fn duplicate_cli_luns_are_refused() {
        let err = build_config(&args(&["--lun", "name=a", "--lun", "name=a,size_mb=1"])).unwrap_err();
        assert_eq!(err.to_string(), "--lun name=a,size_mb=1: name: \"a\" is already the name of --lun name=a");
    }

    #[test]
    fn reactors_and_cpus_flags_conflict() {
        let err = build_config(&args(&["--reactors", "2", "--cpus", "0"])).unwrap_err().to_string();
        assert!(err.starts_with("--reactors: cannot be combined with --cpus"), "{err}");
    }

    #[test]
    fn chain_skips_repeated_causes() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "gone");
        let e = ConfigError::Io { path: "/x".into(), op: "read config", source: io };
        assert_eq!(error_chain(&e), "/x: read config: gone");
    }

    fn ctl_cmd(argv: &[&str]) -> CtlCommand {
        let argv = ["uringtgt", "ctl"].iter().chain(argv).copied();
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Ctl(a) => a.command,
            Command::Serve(_) => unreachable!("parsed ctl"),
        }
    }

    #[test]
    fn ctl_subcommands_build_requests() {
        let (m, p) =
            ctl_request(&ctl_cmd(&["add-lun", "d", "d.img", "--size-mb", "8", "--read-only", "--lun-id", "3"]));
        assert_eq!(m, "add_lun");
        assert_eq!(
            p,
            json!({"name": "d", "file_path": "d.img", "size_mb": 8, "read_only": true, "backing": "file",
                   "is_block": false, "lun_id": 3})
        );
        let (_, p) = ctl_request(&ctl_cmd(&["add-lun", "iso", "--read-only", "--removable"]));
        assert_eq!(p["removable"], json!(true));
        let (_, p) = ctl_request(&ctl_cmd(&["add-lun", "r", "--backing", "mem", "--size-mb", "1"]));
        assert!(p.get("file_path").is_none() && p["backing"] == "mem");
        assert_eq!(ctl_request(&ctl_cmd(&["remove-lun", "d"])), ("remove_lun", json!({"name": "d"})));
        assert_eq!(ctl_request(&ctl_cmd(&["clear-luns"])).0, "clear_all_luns");
        assert_eq!(ctl_request(&ctl_cmd(&["stats", "--json"])).0, "get_stats");
        assert!(Cli::try_parse_from(["uringtgt", "ctl", "add-lun", "x", "--backing", "disk"]).is_err());
    }

    /// Every method of the control plane's dispatch table is reachable from a `ctl` subcommand:
    /// each subcommand is parsed with a placeholder value for its required arguments and the
    /// methods it calls are collected.
    #[test]
    fn ctl_covers_every_method() {
        use clap::CommandFactory;
        let cli = Cli::command();
        let ctl = cli.find_subcommand("ctl").expect("ctl subcommand");
        let mut called = std::collections::BTreeSet::new();
        for sub in ctl.get_subcommands() {
            let mut argv = vec![sub.get_name().to_owned()];
            // "1" parses as every positional's type (names, paths, TSIH numbers).
            for _ in sub.get_arguments().filter(|a| a.is_positional() && a.is_required_set()) {
                argv.push("1".to_owned());
            }
            let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
            let cmd = ctl_cmd(&argv);
            called.insert(ctl_request(&cmd).0);
            // `ctl serve` opens the portal before uploading.
            if matches!(cmd, CtlCommand::Serve(_)) {
                called.insert("start");
            }
        }
        let missing: Vec<&&str> =
            uringtgt::control::methods::METHODS.iter().filter(|m| !called.contains(**m)).collect();
        assert!(missing.is_empty(), "methods without a ctl subcommand: {missing:?}");
    }

    #[test]
    fn ctl_prints_tables() {
        let luns = json!([{"name": "d", "path": "/r/d.img", "size": 512, "lun_id": 0, "is_block": false,
                           "read_only": true, "backing": "file"}]);
        let out = ctl_output(&CtlCommand::ListLuns { json: false }, &luns);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "LUN  NAME  BACKING  SIZE  FLAGS  PATH");
        assert_eq!(lines[1], "0    d     file     512   ro     /r/d.img");
        let out = ctl_output(&CtlCommand::ListLuns { json: true }, &luns);
        assert_eq!(serde_json::from_str::<Value>(&out).unwrap(), luns);
        assert_eq!(ctl_output(&CtlCommand::GetTargetIqn, &json!("iqn.x:y")), "iqn.x:y\n");
    }
}
