//! The control methods: each takes the target and its JSON params and returns a JSON result or
//! the JSON-RPC error to answer with. Target and configuration errors are mapped to error codes
//! here, at the edge.

use super::rpc::{self, decode_params, no_params, RpcError};
use crate::backing::{BackingKind, OpenError};
use crate::config::{AuthSection, ChapSection, ConfigError, LunConfig};
use crate::iscsi::stats::{OpStats, ReactorStats};
use crate::scsi::Lun;
use crate::session::SessionInfo;
use crate::target::{Target, TargetError};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Every method, for `rpc.discover`-style listings and error messages.
pub const METHODS: &[&str] = &[
    "get_host",
    "get_port",
    "get_target_iqn",
    "get_portals",
    "start",
    "stop",
    "add_lun",
    "remove_lun",
    "list_luns",
    "clear_all_luns",
    "get_stats",
    "list_sessions",
    "image_info",
    "upload_image",
    "import_image",
    "get_auth",
    "set_auth",
    "trace_session",
];

/// `add_lun` parameters; positional order is the replaced driver's (name, file_path, size_mb,
/// is_block) followed by the new ones.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddLun {
    name: String,
    #[serde(default)]
    file_path: Option<PathBuf>,
    #[serde(default)]
    size_mb: u64,
    #[serde(default)]
    is_block: bool,
    #[serde(default)]
    read_only: bool,
    #[serde(default)]
    backing: BackingKind,
    #[serde(default)]
    lun_id: Option<u64>,
    #[serde(default)]
    removable: bool,
    /// Initiator names that see the LUN; empty: all.
    #[serde(default)]
    initiators: Vec<String>,
}
const ADD_LUN_PARAMS: &[&str] =
    &["name", "file_path", "size_mb", "is_block", "read_only", "backing", "lun_id", "removable", "initiators"];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RemoveLun {
    name: String,
}

/// Runs one method.
pub fn call(target: &Target, method: &str, params: Value) -> Result<Value, RpcError> {
    match method {
        // Never a wildcard: the address a device can be handed (see crate::portals).
        "get_host" => no_params(&params).map(|()| json!(target.advertised_addr().ip().to_string())),
        "get_portals" => {
            no_params(&params).map(|()| Value::Array(target.portals().iter().map(|a| json!(a.to_string())).collect()))
        }
        "get_port" => no_params(&params).map(|()| json!(target.local_addr().port())),
        "get_target_iqn" => no_params(&params).map(|()| json!(target.iqn())),
        "start" => {
            no_params(&params)?;
            let started = target.start_portal().map_err(map_target_error)?;
            Ok(json!({"address": target.advertised_addr().to_string(), "started": started}))
        }
        "stop" => {
            no_params(&params)?;
            Ok(json!({"stopped": target.stop_portal()}))
        }
        "add_lun" => {
            let p: AddLun = decode_params(params, ADD_LUN_PARAMS)?;
            let file_path = p.file_path.filter(|f| !f.as_os_str().is_empty());
            // Refused here so the path code is left to real path rejections.
            if p.backing == BackingKind::Mem && file_path.is_some() {
                return Err(RpcError::invalid_params("a mem LUN has no file_path"));
            }
            let lc = LunConfig {
                name: p.name,
                // The replaced driver's callers pass "" for "no file".
                file_path,
                size_mb: p.size_mb,
                backing: p.backing,
                read_only: p.read_only,
                lun_id: p.lun_id,
                is_block: p.is_block,
                removable: p.removable,
                initiators: p.initiators,
            };
            let lun = target.add_lun(lc).map_err(map_target_error)?;
            Ok(lun_info(&lun))
        }
        "remove_lun" => {
            let p: RemoveLun = decode_params(params, &["name"])?;
            target.remove_lun(&p.name).map_err(map_target_error)?;
            Ok(json!({"removed": p.name}))
        }
        "list_luns" => {
            no_params(&params)?;
            let (table, _) = target.shared().lun_table();
            Ok(Value::Array(table.iter().map(|l| lun_info(l)).collect()))
        }
        "clear_all_luns" => {
            no_params(&params)?;
            Ok(json!({"removed": target.clear_luns()}))
        }
        "get_stats" => {
            no_params(&params)?;
            Ok(stats(target))
        }
        "list_sessions" => {
            no_params(&params)?;
            Ok(Value::Array(target.shared().sessions().iter().map(session_info).collect()))
        }
        "get_auth" => {
            no_params(&params)?;
            Ok(auth_info(target))
        }
        "set_auth" => {
            let p: SetAuth = decode_params(params, &["chap", "mutual_chap", "discovery"])?;
            let section = p.chap.is_some().then_some(AuthSection {
                chap: p.chap,
                mutual_chap: p.mutual_chap,
                discovery: p.discovery,
            });
            let auth =
                crate::config::resolve_auth(section.as_ref()).map_err(|e| RpcError::invalid_params(e.to_string()))?;
            target.shared().set_auth(auth);
            log::info!("set_auth: new logins use the new credentials");
            Ok(auth_info(target))
        }
        "image_info" => super::images::image_info(target, params),
        "import_image" => super::images::import_image(target, params),
        "trace_session" => super::trace::trace_session(target, params),
        // Needs the connection for its payload: the server calls images::upload_image itself.
        "upload_image" => Err(RpcError::new(rpc::INTERNAL_ERROR, "upload_image is served by the connection")),
        _ => Err(RpcError::new(
            rpc::METHOD_NOT_FOUND,
            format!("method not found: {method:?} (methods: {})", METHODS.join(", ")),
        )),
    }
}

/// `set_auth` parameters: the `auth` keys; no `chap` turns authentication off (demo mode).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetAuth {
    #[serde(default)]
    chap: Option<ChapSection>,
    #[serde(default)]
    mutual_chap: Option<ChapSection>,
    #[serde(default)]
    discovery: bool,
}

/// `get_auth`: the users and switches in force for new logins, never a secret.
fn auth_info(target: &Target) -> Value {
    let login = target.shared().login_config();
    let user = |c: &Option<crate::protocol::chap::Credentials>| c.as_ref().map(|c| json!({"username": c.username}));
    json!({
        "chap": user(&login.auth.chap),
        "mutual_chap": user(&login.auth.mutual),
        "discovery": login.auth.discovery,
        "allowed_initiators": login.acl.initiators,
        "allowed_networks": login.acl.networks.iter().map(ToString::to_string).collect::<Vec<_>>(),
    })
}

/// A LUN as `list_luns` and `add_lun` show it.
pub fn lun_info(l: &Lun) -> Value {
    let mut v = json!({
        "name": l.name,
        "path": l.path.as_ref().map(|p| p.display().to_string()),
        "size": l.size_bytes(),
        "lun_id": l.id,
        "is_block": l.is_block,
        "read_only": l.read_only,
        "backing": l.kind(),
    });
    // Only mapped LUNs carry the key: the answer for the others stays as it was.
    if !l.initiators.is_empty() {
        v["initiators"] = json!(l.initiators);
    }
    // Likewise only removable LUNs carry theirs.
    if l.removable {
        v["removable"] = json!(true);
    }
    v
}

/// The error code and message for a failed target operation.
pub fn map_target_error(e: TargetError) -> RpcError {
    let code = match &e {
        TargetError::Lun { source, .. } | TargetError::Store(OpenError::Config(source)) => match source {
            ConfigError::Invalid { key, .. } if key.ends_with(".file_path") => rpc::PATH_REJECTED,
            ConfigError::Invalid { .. } => rpc::INVALID_PARAMS,
            ConfigError::Io { .. } | ConfigError::Yaml { .. } => rpc::INTERNAL_ERROR,
        },
        TargetError::Store(e) => match e {
            OpenError::PathRejected { .. } => rpc::PATH_REJECTED,
            OpenError::NoSpace { .. } => rpc::NO_SPACE,
            OpenError::BadImage { .. } => rpc::BAD_IMAGE,
            OpenError::Io { .. } | OpenError::Store { .. } | OpenError::Config(_) => rpc::IO_ERROR,
        },
        TargetError::LunNotFound { .. } => rpc::LUN_NOT_FOUND,
        TargetError::LunIdInUse { .. } | TargetError::FileInUse { .. } => rpc::LUN_CONFLICT,
        TargetError::NoLunId { .. } => rpc::NO_SPACE,
        TargetError::Bind { .. } => rpc::PORTAL_ERROR,
        _ => rpc::INTERNAL_ERROR,
    };
    // A configuration error already names its LUN (and an OpenError always does).
    let message = match e {
        TargetError::Lun { source, .. } => source.to_string(),
        e => e.to_string(),
    };
    RpcError::new(code, message)
}

/// Counts and latency percentiles, in microseconds.
fn op_json(o: &OpStats) -> Value {
    let h = &o.latency_ns;
    let us = |ns: u64| ns as f64 / 1000.0;
    let q = |quantile: f64| if o.ops == 0 { 0.0 } else { us(h.value_at_quantile(quantile)) };
    json!({
        "ops": o.ops,
        "bytes": o.bytes,
        "latency_us": {
            "p50": q(0.5),
            "p90": q(0.9),
            "p99": q(0.99),
            "p99_9": q(0.999),
            "max": if o.ops == 0 { 0.0 } else { us(h.max()) },
        },
    })
}

/// Merged read and write statistics.
#[derive(Default, Clone)]
struct Rw {
    read: OpStats,
    write: OpStats,
}

impl Rw {
    fn add(&mut self, read: &OpStats, write: &OpStats) {
        self.read.merge(read);
        self.write.merge(write);
    }
}

/// Per LUN (merged over reactors) and per reactor (merged over LUNs, with a per-LUN breakdown).
fn stats(target: &Target) -> Value {
    let (table, _) = target.shared().lun_table();
    let name = |id: u64| table.get(id).map(|l| l.name.clone());
    let snapshots: Vec<ReactorStats> = target.shared().collect_stats();
    let mut per_lun: BTreeMap<u64, Rw> = BTreeMap::new();
    let mut reactors = Vec::new();
    for r in &snapshots {
        let mut total = Rw::default();
        let mut luns = Vec::new();
        for (id, s) in &r.luns {
            per_lun.entry(*id).or_default().add(&s.read, &s.write);
            total.add(&s.read, &s.write);
            luns.push(json!({"lun_id": id, "name": name(*id), "read": op_json(&s.read), "write": op_json(&s.write)}));
        }
        reactors.push(json!({
            "reactor": r.reactor,
            "connections": r.connections,
            "buffers": {
                "limit_bytes": r.buffers.limit,
                "in_use_bytes": r.buffers.reserved,
                "cached_bytes": r.buffers.cached,
                "waiting": r.buffers.waiting,
                "waits": r.buffers.waits,
                "task_set_full": r.buffers.refused,
                "fixed_bytes": r.buffers.fixed,
            },
            "read": op_json(&total.read),
            "write": op_json(&total.write),
            "luns": luns,
        }));
    }
    // LUNs without I/O yet are listed too, with zeros.
    for l in table.iter() {
        per_lun.entry(l.id).or_default();
    }
    let luns: Vec<Value> = per_lun
        .iter()
        .map(|(id, s)| json!({"lun_id": id, "name": name(*id), "read": op_json(&s.read), "write": op_json(&s.write)}))
        .collect();
    json!({"luns": luns, "reactors": reactors})
}

fn session_info(s: &SessionInfo) -> Value {
    let isid = crate::session::isid_hex(&s.isid);
    let negotiated: Map<String, Value> = s.negotiated.iter().map(|(k, v)| ((*k).to_owned(), json!(v))).collect();
    json!({
        "tsih": s.tsih,
        "initiator": s.initiator,
        "isid": isid,
        "auth": s.auth,
        "address": s.peer.to_string(),
        "portal": s.portal.map(|a| a.to_string()),
        "reactor": s.reactor,
        "discovery": s.discovery,
        "negotiated": negotiated,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;

    fn code(e: TargetError) -> i64 {
        map_target_error(e).code
    }

    fn lun_err(source: ConfigError) -> TargetError {
        TargetError::Lun { name: "a".into(), source }
    }

    #[test]
    fn target_errors_map_to_codes() {
        let invalid = |key: &str| ConfigError::Invalid { key: key.into(), message: "bad".into() };
        assert_eq!(code(lun_err(invalid("lun a.file_path"))), rpc::PATH_REJECTED);
        assert_eq!(code(lun_err(invalid("lun a.name"))), rpc::INVALID_PARAMS);
        assert_eq!(code(TargetError::Store(invalid("lun a.size_mb").into())), rpc::INVALID_PARAMS);
        let msg = |m: &str| (String::from("a"), m.to_owned());
        let (lun, message) = msg("outside root_dir");
        assert_eq!(code(OpenError::PathRejected { lun, message }.into()), rpc::PATH_REJECTED);
        let (lun, message) = msg("full");
        assert_eq!(code(OpenError::NoSpace { lun, message }.into()), rpc::NO_SPACE);
        let (lun, message) = msg("refusing to shrink");
        assert_eq!(code(OpenError::BadImage { lun, message }.into()), rpc::BAD_IMAGE);
        let io = OpenError::Io { lun: "a".into(), path: "/x".into(), op: "stat", source: io::Error::other("boom") };
        assert_eq!(code(io.into()), rpc::IO_ERROR);
        assert_eq!(code(TargetError::LunNotFound { name: "a".into() }), rpc::LUN_NOT_FOUND);
        assert_eq!(code(TargetError::LunIdInUse { id: 1, by: "b".into() }), rpc::LUN_CONFLICT);
        assert_eq!(code(TargetError::FileInUse { path: "/x".into(), by: "b".into() }), rpc::LUN_CONFLICT);
        assert_eq!(code(TargetError::NoLunId { name: "a".into() }), rpc::NO_SPACE);
        let bind = TargetError::Bind { addr: "1.2.3.4:1".into(), source: io::Error::other("x") };
        assert_eq!(code(bind), rpc::PORTAL_ERROR);
    }

    #[test]
    fn config_messages_are_not_doubled() {
        let e = map_target_error(OpenError::BadImage { lun: "a".into(), message: "too small".into() }.into());
        assert_eq!(e.message, "lun a: too small");
        let e = map_target_error(lun_err(ConfigError::Invalid { key: "lun a.name".into(), message: "bad".into() }));
        assert_eq!(e.message, "lun a.name: bad");
        let e = map_target_error(TargetError::LunIdInUse { id: 3, by: "b".into() });
        assert_eq!(e.message, "LUN id 3 is in use by LUN \"b\"");
    }

    #[test]
    fn latency_is_reported_in_microseconds() {
        let mut o = OpStats::default();
        assert_eq!(op_json(&o)["latency_us"]["max"], json!(0.0));
        o.ops = 1;
        o.bytes = 4096;
        o.latency_ns.record(250_000).unwrap();
        let v = op_json(&o);
        let p50 = v["latency_us"]["p50"].as_f64().unwrap();
        assert!((249.0..=251.0).contains(&p50), "{p50}");
        assert_eq!((v["ops"].clone(), v["bytes"].clone()), (json!(1), json!(4096)));
    }
}
