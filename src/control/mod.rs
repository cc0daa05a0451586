//! The control plane: newline-delimited JSON-RPC 2.0 on a Unix socket, served by a control
//! thread (never a reactor), and the client `uringtgt ctl` uses.
//!
//! - [`rpc`]: request parsing, responses, error codes.
//! - [`methods`]: the methods and the mapping of target errors to codes.
//! - [`images`]: `image_info`, `upload_image` and `import_image`.
//! - [`server`]: the socket, its listener thread and one thread per client.
//! - [`client`]: a blocking client.
//! - [`trace`]: `trace_session`, the per-session protocol trace switch.

pub mod client;
pub mod images;
pub mod methods;
pub mod rpc;
pub mod server;
pub mod trace;

pub use client::Client;
pub use server::{ControlSocket, Server};

use std::io;
use std::path::PathBuf;

/// Errors of the control socket, on the server side (creating and serving it) and the client
/// side (`uringtgt ctl`).
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Another process accepts connections on the socket.
    #[error("{path}: another uringtgt is serving this control socket")]
    SocketInUse { path: PathBuf },
    /// Something that is not a socket sits where the socket goes; it is not deleted.
    #[error("{path}: exists and is not a socket; refusing to replace it")]
    NotASocket { path: PathBuf },
    #[error("{path}: {op}: {source}")]
    Io { path: PathBuf, op: &'static str, source: io::Error },
    #[error("cannot start the control thread: {0}")]
    Thread(io::Error),
    /// The server closed the connection before answering.
    #[error("the target closed the control connection without answering")]
    NoAnswer,
    /// The answer is not a JSON-RPC response to the request.
    #[error("malformed response from the target: {0}")]
    BadResponse(String),
    /// Reading the image to upload failed; the message names the source.
    #[error("{0}")]
    Payload(io::Error),
    /// The server answered with an error.
    #[error("{message}")]
    Server { code: i64, message: String },
}
