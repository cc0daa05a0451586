//! The control socket and the threads serving it.
//!
//! One listener thread accepts; each client gets its own thread (up to [`MAX_CLIENTS`]), so a
//! slow method such as `remove_lun` (which waits for in-flight I/O) never stalls other
//! clients. Requests on one connection are answered in order. LUN table changes are
//! serialised by the target itself.

use super::rpc::{self, RpcError, MAX_LINE};
use super::{images, methods, ControlError};
use crate::target::Target;
use serde_json::Value;
use std::fs;
use std::io::{self, BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Control clients served at once; more are answered with an error and disconnected.
pub const MAX_CLIENTS: usize = 64;
/// An upload whose client sends nothing for this long fails (and its connection closes).
const UPLOAD_STALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Socket file mode: owner and group may connect.
const SOCKET_MODE: u32 = 0o660;

/// The bound control socket, not yet served.
pub struct ControlSocket {
    listener: UnixListener,
    path: PathBuf,
    /// Device and inode of our socket file, so exit removes only our own.
    id: (u64, u64),
}

impl ControlSocket {
    /// Binds `path` with mode 0660, creating its directory if missing. A stale socket (nobody
    /// accepts on it) is replaced; a live one, or a file that is not a socket, is an error.
    pub fn bind(path: &Path) -> Result<Self, ControlError> {
        let io_err = |op: &'static str| move |source| ControlError::Io { path: path.to_owned(), op, source };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir).map_err(io_err("create socket directory"))?;
        }
        match fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_socket() => match UnixStream::connect(path) {
                Ok(_) => return Err(ControlError::SocketInUse { path: path.to_owned() }),
                Err(e) if matches!(e.kind(), io::ErrorKind::ConnectionRefused | io::ErrorKind::NotFound) => {
                    log::info!("{}: replacing a stale control socket", path.display());
                    match fs::remove_file(path) {
                        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(io_err("remove stale socket")(e)),
                        _ => {}
                    }
                }
                Err(e) => return Err(io_err("probe existing socket")(e)),
            },
            Ok(_) => return Err(ControlError::NotASocket { path: path.to_owned() }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("stat")(e)),
        }
        // The umask keeps the socket from ever being reachable by others between bind and chmod.
        // SAFETY: umask(2) cannot fail; it changes the process's mask, restored right after.
        let old = unsafe { libc::umask(0o117) };
        let bound = UnixListener::bind(path);
        // SAFETY: as above, restoring the previous mask.
        unsafe { libc::umask(old) };
        let listener = bound.map_err(io_err("bind"))?;
        fs::set_permissions(path, fs::Permissions::from_mode(SOCKET_MODE)).map_err(io_err("chmod"))?;
        let meta = fs::symlink_metadata(path).map_err(io_err("stat"))?;
        Ok(Self { listener, path: path.to_owned(), id: (meta.dev(), meta.ino()) })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ControlSocket {
    /// Removes the socket file, unless it is no longer ours.
    fn drop(&mut self) {
        if fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.id) {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// The running control plane.
pub struct Server {
    socket: Arc<ControlSocket>,
    stopping: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    /// Starts the listener thread on `socket`, serving `target`.
    pub fn start(socket: ControlSocket, target: Arc<Target>) -> Result<Self, ControlError> {
        let socket = Arc::new(socket);
        let stopping = Arc::new(AtomicBool::new(false));
        let thread = {
            let (socket, stopping) = (socket.clone(), stopping.clone());
            std::thread::Builder::new()
                .name("control".into())
                .spawn(move || accept_loop(&socket.listener, &stopping, &target))
                .map_err(ControlError::Thread)?
        };
        Ok(Self { socket, stopping, thread: Some(thread) })
    }

    pub fn path(&self) -> &Path {
        self.socket.path()
    }

    /// Stops accepting and removes the socket file. Clients already connected keep their
    /// threads until they hang up or the process exits.
    pub fn stop(mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        // SAFETY: shutting down our own listening socket makes the blocked accept() fail.
        unsafe { libc::shutdown(self.socket.listener.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn accept_loop(listener: &UnixListener, stopping: &AtomicBool, target: &Arc<Target>) {
    let clients = Arc::new(AtomicUsize::new(0));
    loop {
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(_) if stopping.load(Ordering::SeqCst) => return,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                // Out of descriptors or memory: back off instead of spinning.
                log::warn!("control socket accept: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if stopping.load(Ordering::SeqCst) {
            return;
        }
        if clients.fetch_add(1, Ordering::SeqCst) >= MAX_CLIENTS {
            clients.fetch_sub(1, Ordering::SeqCst);
            let busy = RpcError::new(rpc::BUSY, format!("too many control clients (at most {MAX_CLIENTS})"));
            let _ = writeln!(&stream, "{}", rpc::response(&Value::Null, Err(busy)));
            continue;
        }
        let (target, clients) = (target.clone(), clients.clone());
        let spawned = std::thread::Builder::new().name("control-client".into()).spawn(move || {
            serve_client(stream, &target);
            clients.fetch_sub(1, Ordering::SeqCst);
        });
        if let Err(e) = spawned {
            log::warn!("cannot start a control client thread: {e}");
        }
    }
}

/// What [`LineReader::next_line`] read.
#[derive(Debug, PartialEq)]
enum Line {
    /// A whole line (newline stripped) is in the buffer.
    Complete,
    /// The line passed [`MAX_LINE`]; its rest is skipped by the following calls.
    TooLong,
    Eof,
}

/// Reads newline-delimited requests without ever buffering more than [`MAX_LINE`] bytes.
struct LineReader<R> {
    inner: BufReader<R>,
    /// Inside an over-long line: skip up to its newline.
    skipping: bool,
    max: usize,
}

impl<R: io::Read> LineReader<R> {
    fn new(inner: R, max: usize) -> Self {
        Self { inner: BufReader::new(inner), skipping: false, max }
    }

    fn next_line(&mut self, line: &mut Vec<u8>) -> io::Result<Line> {
        line.clear();
        loop {
            let buf = self.inner.fill_buf()?;
            if buf.is_empty() {
                // A last line without a newline still counts.
                return Ok(if line.is_empty() || self.skipping { Line::Eof } else { Line::Complete });
            }
            let (chunk, found) = match buf.iter().position(|&b| b == b'\n') {
                Some(i) => (i, true),
                None => (buf.len(), false),
            };
            let used = chunk + usize::from(found);
            if self.skipping {
                self.skipping = !found;
            } else if line.len() + chunk > self.max {
                line.clear();
                self.skipping = !found;
                self.inner.consume(used);
                return Ok(Line::TooLong);
            } else {
                line.extend_from_slice(&buf[..chunk]);
                if found {
                    self.inner.consume(used);
                    return Ok(Line::Complete);
                }
            }
            self.inner.consume(used);
        }
    }
}

/// Answers one client's requests, in order, until it hangs up.
fn serve_client(stream: UnixStream, target: &Target) {
    let Ok(read_half) = stream.try_clone() else { return };
    let mut reader = LineReader::new(read_half, MAX_LINE);
    let mut writer = io::BufWriter::new(stream);
    let mut line = Vec::new();
    loop {
        let (answer, close) = match reader.next_line(&mut line) {
            Ok(Line::Eof) | Err(_) => return,
            Ok(Line::TooLong) => (
                Some(rpc::response(
                    &Value::Null,
                    Err(RpcError::new(rpc::INVALID_REQUEST, format!("request line longer than {MAX_LINE} bytes"))),
                )),
                false,
            ),
            Ok(Line::Complete) => handle_line(&line, target, &mut reader.inner),
        };
        if let Some(a) = answer {
            if writeln!(writer, "{a}").and_then(|()| writer.flush()).is_err() {
                return;
            }
        }
        if close {
            return;
        }
    }
}

/// The response line to one request line (`None` for blank lines and notifications), and
/// whether the connection must close after it (an upload's payload was not read to its end).
fn handle_line(line: &[u8], target: &Target, conn: &mut BufReader<UnixStream>) -> (Option<String>, bool) {
    if line.iter().all(u8::is_ascii_whitespace) {
        return (None, false);
    }
    match rpc::parse_request(line) {
        Err((id, e)) => (Some(rpc::response(&id, Err(e))), false),
        Ok(req) => {
            log::debug!("control: {} {}", req.method, req.params);
            let (result, close) = if req.method == "upload_image" {
                // The payload follows on this connection, through the same buffered reader
                // (it may already hold the first bytes). A client that stalls must not pin
                // this thread forever.
                let _ = conn.get_ref().set_read_timeout(Some(UPLOAD_STALL_TIMEOUT));
                let up = images::upload_image(target, req.params, conn);
                let _ = conn.get_ref().set_read_timeout(None);
                (up.result, up.close)
            } else {
                (methods::call(target, &req.method, req.params), false)
            };
            match &result {
                // The answer `ctl upload` expects before every first upload: not worth an INFO line.
                Err(e) if e.code == rpc::IMAGE_NOT_FOUND => {
                    log::debug!("control: {}: {} ({})", req.method, e.message, e.code)
                }
                Err(e) => log::info!("control: {} failed: {} ({})", req.method, e.message, e.code),
                Ok(_) => {}
            }
            (req.id.map(|id| rpc::response(&id, result)), close)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(input: &[u8], max: usize) -> Vec<(Line, Vec<u8>)> {
        let mut r = LineReader::new(input, max);
        // A tiny buffer would be more thorough, but BufReader's default still splits the
        // over-long lines below across reads.
        let mut out = Vec::new();
        let mut line = Vec::new();
        loop {
            let l = r.next_line(&mut line).unwrap();
            if l == Line::Eof {
                return out;
            }
            out.push((l, line.clone()));
        }
    }

    #[test]
    fn splits_lines_and_keeps_a_last_unterminated_one() {
        let got = lines(b"a\n\nbc\nlast", 10);
        let want: Vec<(Line, Vec<u8>)> = vec![
            (Line::Complete, b"a".to_vec()),
            (Line::Complete, b"".to_vec()),
            (Line::Complete, b"bc".to_vec()),
            (Line::Complete, b"last".to_vec()),
        ];
        assert_eq!(got, want);
    }

    #[test]
    fn over_long_lines_are_reported_once_and_skipped() {
        let mut input = vec![b'x'; 20_000];
        input.extend_from_slice(b"\nok\n");
        input.extend(vec![b'y'; 11]);
        input.extend_from_slice(b"\n");
        let got = lines(&input, 10);
        let want: Vec<(Line, Vec<u8>)> =
            vec![(Line::TooLong, vec![]), (Line::Complete, b"ok".to_vec()), (Line::TooLong, vec![])];
        assert_eq!(got, want);
        // Exactly at the limit is fine.
        assert_eq!(lines(b"0123456789\n", 10), vec![(Line::Complete, b"0123456789".to_vec())]);
        // An over-long tail with no newline ends the stream.
        assert_eq!(lines(&[b'z'; 100], 10), vec![(Line::TooLong, vec![])]);
    }

    #[test]
    fn stale_socket_is_replaced_and_live_one_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/c.sock");
        let first = ControlSocket::bind(&path).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, SOCKET_MODE);
        assert!(matches!(ControlSocket::bind(&path), Err(ControlError::SocketInUse { .. })));
        drop(first);
        assert!(!path.exists(), "removed on drop");
        // Like a crashed run: the file stays, nobody accepts.
        drop(UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let second = ControlSocket::bind(&path).unwrap();
        drop(second);
        fs::write(&path, b"not a socket").unwrap();
        assert!(matches!(ControlSocket::bind(&path), Err(ControlError::NotASocket { .. })));
        assert!(path.exists());
    }
}
