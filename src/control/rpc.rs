//! JSON-RPC 2.0 framing: parsing one request line, and the response lines sent back.
//!
//! Parsing never touches a socket: it takes the bytes of one line and returns a request or
//! the error object to answer with.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

/// The longest request line accepted, newline excluded.
pub const MAX_LINE: usize = 1 << 20;

/// Standard JSON-RPC 2.0 codes.
pub const PARSE_ERROR: i64 = -32700;
pub const INVALID_REQUEST: i64 = -32600;
pub const METHOD_NOT_FOUND: i64 = -32601;
pub const INVALID_PARAMS: i64 = -32602;
pub const INTERNAL_ERROR: i64 = -32603;
/// Application codes, in the range JSON-RPC leaves to implementations.
pub const LUN_NOT_FOUND: i64 = -32001;
/// The LUN id, or the image file, belongs to another LUN.
pub const LUN_CONFLICT: i64 = -32002;
/// The path escapes root_dir, is not a regular file, or is a block device not allow-listed.
pub const PATH_REJECTED: i64 = -32003;
pub const IO_ERROR: i64 = -32004;
/// Not enough free disk space or RAM, or no free LUN id.
pub const NO_SPACE: i64 = -32005;
/// The image's size cannot be served as asked (missing with size 0, odd size, would shrink).
pub const BAD_IMAGE: i64 = -32006;
/// The portal cannot be opened.
pub const PORTAL_ERROR: i64 = -32007;
/// Too many control clients are connected.
pub const BUSY: i64 = -32008;
/// The uploaded or imported data is unusable: truncated or corrupt compressed stream, fewer or
/// more bytes than announced, a client that went away mid-stream, an empty image.
pub const BAD_UPLOAD: i64 = -32009;
/// The image's SHA-256 is not the one given.
pub const DIGEST_MISMATCH: i64 = -32010;
/// `image_info` of a name without an image file.
pub const IMAGE_NOT_FOUND: i64 = -32011;

/// A JSON-RPC error object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RpcError {
    pub code: i64,
    pub message: String,
}

impl RpcError {
    pub fn new(code: i64, message: impl Into<String>) -> Self {
        Self { code, message: message.into() }
    }

    pub fn invalid_params(message: impl Into<String>) -> Self {
        Self::new(INVALID_PARAMS, message)
    }
}

/// A well-formed request. `id` is `None` for a notification, which gets no response.
#[derive(Debug, PartialEq)]
pub struct Request {
    pub id: Option<Value>,
    pub method: String,
    /// `Null` (absent), an object or an array.
    pub params: Value,
}

/// Parses one request line. On error, returns the id to answer with (`null` when the request's
/// own id is unknown or unusable) and the error.
pub fn parse_request(line: &[u8]) -> Result<Request, (Value, RpcError)> {
    let value: Value = serde_json::from_slice(line)
        .map_err(|e| (Value::Null, RpcError::new(PARSE_ERROR, format!("parse error: {e}"))))?;
    let invalid = |id: Value, msg: &str| (id, RpcError::new(INVALID_REQUEST, format!("invalid request: {msg}")));
    let Value::Object(mut obj) = value else {
        return Err(invalid(Value::Null, "not a JSON object (batches are not supported)"));
    };
    let id = match obj.remove("id") {
        None => None,
        Some(id @ (Value::Null | Value::Number(_) | Value::String(_))) => Some(id),
        Some(_) => return Err(invalid(Value::Null, "id must be a string, a number or null")),
    };
    let reply_id = id.clone().unwrap_or(Value::Null);
    if obj.get("jsonrpc") != Some(&json!("2.0")) {
        return Err(invalid(reply_id, "\"jsonrpc\" must be \"2.0\""));
    }
    let method = match obj.remove("method") {
        Some(Value::String(m)) => m,
        _ => return Err(invalid(reply_id, "\"method\" must be a string")),
    };
    let params = match obj.remove("params") {
        // Explicit null is what many clients send for "no params".
        None | Some(Value::Null) => Value::Null,
        Some(p @ (Value::Object(_) | Value::Array(_))) => p,
        Some(_) => return Err(invalid(reply_id, "\"params\" must be an object or an array")),
    };
    Ok(Request { id, method, params })
}

/// Decodes `params` (named, or positional in the order of `names`) into `T`.
pub fn decode_params<T: DeserializeOwned>(params: Value, names: &[&str]) -> Result<T, RpcError> {
    let obj = match params {
        Value::Null => Value::Object(Map::new()),
        Value::Array(items) => {
            if items.len() > names.len() {
                return Err(RpcError::invalid_params(format!(
                    "{} positional parameters given, at most {} accepted ({})",
                    items.len(),
                    names.len(),
                    names.join(", ")
                )));
            }
            Value::Object(names.iter().map(|n| n.to_string()).zip(items).collect())
        }
        obj => obj,
    };
    serde_json::from_value(obj).map_err(|e| RpcError::invalid_params(format!("invalid params: {e}")))
}

/// For methods without parameters: absent, `{}` or `[]`.
pub fn no_params(params: &Value) -> Result<(), RpcError> {
    match params {
        Value::Null => Ok(()),
        Value::Object(o) if o.is_empty() => Ok(()),
        Value::Array(a) if a.is_empty() => Ok(()),
        _ => Err(RpcError::invalid_params("this method takes no parameters")),
    }
}

/// One response line (without the newline; JSON text never contains a raw newline).
pub fn response(id: &Value, result: Result<Value, RpcError>) -> String {
    let v = match result {
        Ok(result) => json!({"jsonrpc": "2.0", "id": id, "result": result}),
        Err(error) => json!({"jsonrpc": "2.0", "id": id, "error": error}),
    };
    v.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err_code(line: &str) -> (Value, i64) {
        let (id, e) = parse_request(line.as_bytes()).unwrap_err();
        (id, e.code)
    }

    #[test]
    fn parses_requests() {
        let r = parse_request(br#"{"jsonrpc":"2.0","id":7,"method":"list_luns"}"#).unwrap();
        assert_eq!(r, Request { id: Some(json!(7)), method: "list_luns".into(), params: Value::Null });
        let r = parse_request(br#"{"jsonrpc":"2.0","id":"a","method":"x","params":["n"]}"#).unwrap();
        assert_eq!((r.id, r.params), (Some(json!("a")), json!(["n"])));
        let r = parse_request(br#"{"jsonrpc":"2.0","method":"x","params":{}}"#).unwrap();
        assert_eq!(r.id, None, "a notification");
        let r = parse_request(br#"{"jsonrpc":"2.0","id":null,"method":"x","params":null}"#).unwrap();
        assert_eq!((r.id, r.params), (Some(Value::Null), Value::Null));
    }

    #[test]
    fn rejects_bad_requests_with_codes() {
        assert_eq!(err_code("garbage"), (Value::Null, PARSE_ERROR));
        assert_eq!(err_code("{\"jsonrpc\":"), (Value::Null, PARSE_ERROR));
        assert_eq!(parse_request(b"\xff\xfe").unwrap_err().1.code, PARSE_ERROR);
        assert_eq!(err_code("[1,2]"), (Value::Null, INVALID_REQUEST));
        assert_eq!(err_code("42"), (Value::Null, INVALID_REQUEST));
        assert_eq!(err_code(r#"{"jsonrpc":"2.0","id":{},"method":"x"}"#), (Value::Null, INVALID_REQUEST));
        assert_eq!(err_code(r#"{"jsonrpc":"1.0","id":3,"method":"x"}"#), (json!(3), INVALID_REQUEST));
        assert_eq!(err_code(r#"{"jsonrpc":"2.0","id":3,"method":5}"#), (json!(3), INVALID_REQUEST));
        assert_eq!(err_code(r#"{"jsonrpc":"2.0","id":3,"method":"x","params":1}"#), (json!(3), INVALID_REQUEST));
    }

    #[derive(Deserialize, Debug, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct P {
        name: String,
        #[serde(default)]
        size_mb: u64,
    }

    #[test]
    fn params_by_name_or_position() {
        let p: P = decode_params(json!({"name": "a"}), &["name", "size_mb"]).unwrap();
        assert_eq!(p, P { name: "a".into(), size_mb: 0 });
        let p: P = decode_params(json!(["a", 3]), &["name", "size_mb"]).unwrap();
        assert_eq!(p, P { name: "a".into(), size_mb: 3 });
        let e = |v| decode_params::<P>(v, &["name", "size_mb"]).unwrap_err();
        assert_eq!(e(json!(["a", 3, 4])).code, INVALID_PARAMS);
        assert_eq!(e(json!({"name": "a", "colour": 1})).code, INVALID_PARAMS);
        assert_eq!(e(json!({"name": 1})).code, INVALID_PARAMS);
        assert_eq!(e(json!({"name": "a", "size_mb": -1})).code, INVALID_PARAMS);
        assert_eq!(e(Value::Null).code, INVALID_PARAMS, "name is required");
        assert!(no_params(&json!({})).is_ok() && no_params(&json!([])).is_ok() && no_params(&Value::Null).is_ok());
        assert_eq!(no_params(&json!({"a": 1})).unwrap_err().code, INVALID_PARAMS);
    }

    #[test]
    fn a_large_numeric_id_comes_back_as_the_same_number() {
        // Found by fuzz/ (target rpc): an id beyond 64 bits is a float; read inexactly, the
        // response carried a neighbouring number, and a client could not match its answer.
        for id in ["107777777777777777777777777777777", "1.0777777777777779e32", "0.30000000000000004", "-4.5e-300"] {
            let line = format!(r#"{{"jsonrpc":"2.0","id":{id},"method":"x"}}"#);
            let req = parse_request(line.as_bytes()).unwrap();
            let sent: f64 = id.parse().unwrap();
            let answer: Value = serde_json::from_str(&response(req.id.as_ref().unwrap(), Ok(json!(1)))).unwrap();
            assert_eq!(answer["id"].as_f64(), Some(sent), "id {id}");
        }
    }

    #[test]
    fn responses_are_one_line() {
        let ok = response(&json!(1), Ok(json!({"path": "a\nb"})));
        assert!(!ok.contains('\n'));
        assert_eq!(serde_json::from_str::<Value>(&ok).unwrap()["result"]["path"], "a\nb");
        let err = response(&Value::Null, Err(RpcError::new(LUN_NOT_FOUND, "no LUN named \"x\"")));
        let v: Value = serde_json::from_str(&err).unwrap();
        assert_eq!((v["id"].clone(), v["error"]["code"].clone()), (Value::Null, json!(LUN_NOT_FOUND)));
        assert_eq!(v["jsonrpc"], "2.0");
    }
}
