//! A blocking control client: one request at a time over the Unix socket.

use super::ControlError;
use serde_json::{json, Value};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Longer than the target's bounded wait for in-flight I/O when removing LUNs.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);
/// After an upload's last byte the server still fsyncs a possibly multi-GiB image.
const UPLOAD_ANSWER_TIMEOUT: Duration = Duration::from_secs(600);

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
        let id = self.send(method, params)?;
        self.answer(id)
    }

    /// Calls `upload_image` with `params` (whose `size` must be the number of bytes `payload`
    /// holds) and streams `payload` after the request line. The answer may take long: the
    /// server verifies and syncs the image after the last byte.
    ///
    /// When reading `payload` fails (an HTTP source that breaks off), the socket's write side is
    /// shut so the target sees a short upload at once instead of waiting out its stall timeout,
    /// and the read error is returned as [`ControlError::Payload`].
    pub fn upload(&mut self, params: Value, payload: &mut impl Read) -> Result<Value, ControlError> {
        let id = self.send("upload_image", params)?;
        let sent = copy_payload(payload, &mut &self.writer);
        self.finish_upload(id, sent)
    }

    /// [`Self::upload`] of a local file's first `len` bytes, sent with `sendfile(2)`: the bytes
    /// go from the page cache to the socket without a pass through this process.
    /// `progress` gets the bytes sent so far.
    pub fn upload_file(
        &mut self,
        params: Value,
        file: &std::fs::File,
        len: u64,
        mut progress: impl FnMut(u64),
    ) -> Result<Value, ControlError> {
        use std::os::fd::AsRawFd;
        let id = self.send("upload_image", params)?;
        let mut offset: libc::off_t = 0;
        let sent = loop {
            let left = len - offset as u64;
            if left == 0 {
                break Ok(());
            }
            // SAFETY: both descriptors are open for the call; `offset` is a valid off_t the
            // kernel advances.
            let n = unsafe {
                libc::sendfile(self.writer.as_raw_fd(), file.as_raw_fd(), &mut offset, left.min(8 << 20) as usize)
            };
            match n {
                0 => break Err(PayloadError::Read(io::Error::new(io::ErrorKind::UnexpectedEof, "file shrank"))),
                n if n > 0 => progress(offset as u64),
                _ => {
                    let e = io::Error::last_os_error();
                    match e.raw_os_error() {
                        Some(libc::EINTR) => {}
                        Some(libc::EPIPE | libc::ECONNRESET) => break Err(PayloadError::Write(e)),
                        _ => break Err(PayloadError::Read(e)),
                    }
                }
            }
        };
        self.finish_upload(id, sent)
    }

    /// After the payload: the answer, or why the payload could not be sent.
    fn finish_upload(&mut self, id: u64, sent: Result<(), PayloadError>) -> Result<Value, ControlError> {
        if let Err(PayloadError::Read(e)) = sent {
            let _ = self.writer.shutdown(std::net::Shutdown::Write);
            return Err(ControlError::Payload(e));
        }
        self.writer.set_read_timeout(Some(UPLOAD_ANSWER_TIMEOUT)).map_err(self.io_err("set timeout"))?;
        // The server may have answered an error and closed early (a broken pipe here): its
        // answer says why, so it wins over the send error.
        let answer = self.answer(id);
        self.writer.set_read_timeout(Some(ANSWER_TIMEOUT)).map_err(self.io_err("set timeout"))?;
        match (answer, sent) {
            (Err(ControlError::NoAnswer), Err(PayloadError::Write(e))) => Err(self.io_err("send image")(e)),
            (answer, _) => answer,
        }
    }

    fn io_err(&self, op: &'static str) -> impl FnOnce(io::Error) -> ControlError {
        let path = self.path.clone();
        move |source| ControlError::Io { path, op, source }
    }

    fn send(&mut self, method: &str, params: Value) -> Result<u64, ControlError> {
        let id = self.next_id;
        self.next_id += 1;
        let req = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
        writeln!(self.writer, "{req}").map_err(self.io_err("send"))?;
        Ok(id)
    }

    fn answer(&mut self, id: u64) -> Result<Value, ControlError> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => return Err(ControlError::NoAnswer),
            Ok(_) => {}
            // The server closed while we were still sending: nothing to read.
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Err(ControlError::NoAnswer),
            Err(e) => return Err(self.io_err("receive")(e)),
        }
        parse_response(&line, id)
    }
}

/// Which side of a payload copy failed.
enum PayloadError {
    Read(io::Error),
    Write(io::Error),
}

/// `io::copy` that tells a failing source from a failing socket. Large reads written straight
/// to the socket: no buffering layer, so no second copy.
fn copy_payload(payload: &mut impl Read, out: &mut impl Write) -> Result<(), PayloadError> {
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = match payload.read(&mut buf) {
            Ok(0) => return out.flush().map_err(PayloadError::Write),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(PayloadError::Read(e)),
        };
        out.write_all(&buf[..n]).map_err(PayloadError::Write)?;
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
