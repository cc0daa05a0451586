//! A blocking control client: one request at a time over the Unix socket.

use super::ControlError;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Longer than the target's bounded wait for in-flight I/O when removing LUNs.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);

pub struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    path: PathBuf,
    next_id: u64,
}

impl Client {
    pub fn connect(path: &Path) -> Result<Self, ControlError> {
        let io_err = |op| move |source| ControlError::Io { path: path.to_owned(), op, source };
        let writer = UnixStream::connect(path).map_err(io_err("connect"))?;
        writer.set_read_timeout(Some(ANSWER_TIMEOUT)).map_err(io_err("set timeout"))?;
        let reader = BufReader::new(writer.try_clone().map_err(io_err("clone socket"))?);
        Ok(Self { reader, writer, path: path.to_owned(), next_id: 1 })
    }

    /// Calls `method` and returns its result, or the server's error as [`ControlError::Server`].
    pub fn call(&mut self, method: &str, params: Value) -> Result<Value, ControlError> {
        let id = self.next_id;
        self.next_id += 1;
        let req = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
        let io_err = |op| {
            let path = self.path.clone();
            move |source| ControlError::Io { path, op, source }
        };
        writeln!(self.writer, "{req}").map_err(io_err("send"))?;
        let mut line = String::new();
        if self.reader.read_line(&mut line).map_err(io_err("receive"))? == 0 {
            return Err(ControlError::NoAnswer);
        }
        parse_response(&line, id)
    }
}

/// The result of a response line to request `id`.
fn parse_response(line: &str, id: u64) -> Result<Value, ControlError> {
    let bad = |m: &str| ControlError::BadResponse(format!("{m}: {}", line.trim_end()));
    let mut v: Value = serde_json::from_str(line).map_err(|_| bad("not JSON"))?;
    if let Some(err) = v.get("error") {
        let code = err.get("code").and_then(Value::as_i64).ok_or_else(|| bad("error without a code"))?;
        let message = err.get("message").and_then(Value::as_str).unwrap_or("(no message)").to_owned();
        return Err(ControlError::Server { code, message });
    }
    if v.get("id") != Some(&json!(id)) {
        return Err(bad("answer to another request"));
    }
    v.get_mut("result").map(Value::take).ok_or_else(|| bad("neither result nor error"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_decode() {
        assert_eq!(parse_response(r#"{"jsonrpc":"2.0","id":3,"result":[1]}"#, 3).unwrap(), json!([1]));
        match parse_response(r#"{"jsonrpc":"2.0","id":3,"error":{"code":-32001,"message":"no LUN"}}"#, 3) {
            Err(ControlError::Server { code, message }) => assert_eq!((code, message.as_str()), (-32001, "no LUN")),
            other => panic!("{other:?}"),
        }
        assert!(matches!(parse_response("nope", 1), Err(ControlError::BadResponse(_))));
        assert!(matches!(parse_response(r#"{"id":2,"result":1}"#, 1), Err(ControlError::BadResponse(_))));
        assert!(matches!(parse_response(r#"{"id":1}"#, 1), Err(ControlError::BadResponse(_))));
    }
}
