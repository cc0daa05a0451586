//! `uringtgt`: the command line. `serve` loads the configuration, applies the flags over it and
//! runs the target until it stops.

use clap::{Args, Parser, Subcommand};
use std::error::Error;
use std::path::PathBuf;
use std::process::ExitCode;
use uringtgt::config::{Config, ConfigError, LunConfig, PollMode};
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
    Serve(ServeArgs),
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
    #[arg(long, value_name = "N", conflicts_with = "cpus")]
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
}

/// What stops `uringtgt` with exit status 1.
#[derive(Debug, thiserror::Error)]
enum CliError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Target(#[from] TargetError),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let res = match cli.command {
        Command::Serve(args) => serve(args),
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
    }
    cfg.validate()?;
    Ok(cfg)
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
            Command::Serve(a) => a,
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
        let err = build_config(&args(&["--lun", "name=a", "--lun", "name=a"])).unwrap_err();
        assert!(err.to_string().contains("luns[1].name"), "{err}");
    }

    #[test]
    fn reactors_and_cpus_flags_conflict() {
        assert!(Cli::try_parse_from(["uringtgt", "serve", "--reactors", "2", "--cpus", "0"]).is_err());
    }

    #[test]
    fn chain_skips_repeated_causes() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "gone");
        let e = ConfigError::Io { path: "/x".into(), op: "read config", source: io };
        assert_eq!(error_chain(&e), "/x: read config: gone");
    }
}
