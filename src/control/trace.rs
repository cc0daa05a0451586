//! `trace_session {tsih, enable=true}`: switches the protocol trace of one session on or off
//! (see src/protocol/trace.rs and README "Protocol tracing").

use super::rpc::{decode_params, RpcError, INVALID_PARAMS};
use crate::target::Target;
use serde::Deserialize;
use serde_json::{json, Value};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TraceSession {
    tsih: u16,
    #[serde(default = "yes")]
    enable: bool,
}

fn yes() -> bool {
    true
}

/// Flips the session's trace switch: its connection logs (or stops logging) from its next PDU.
pub fn trace_session(target: &Target, params: Value) -> Result<Value, RpcError> {
    let p: TraceSession = decode_params(params, &["tsih", "enable"])?;
    let session = target.shared().sessions().into_iter().find(|s| s.tsih == p.tsih);
    let Some(s) = session else {
        return Err(RpcError::new(INVALID_PARAMS, format!("no session with TSIH {} (see list_sessions)", p.tsih)));
    };
    s.trace.set(p.enable);
    log::info!("trace of session {} ({}, {}) {}", s.tsih, s.initiator, s.peer, if p.enable { "on" } else { "off" });
    Ok(json!({"tsih": s.tsih, "initiator": s.initiator, "trace": p.enable}))
}
