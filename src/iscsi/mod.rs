//! The iSCSI engine: connections, their sessions' CmdSN window, tasks, Data-Out/R2T/Data-In
//! and task management. It works on plain operations and owns no ring and no socket: bytes
//! come in through [`conn::Conn::rx_space`]/[`conn::Conn::on_recv`], PDUs to send wait in its
//! [`tx::TxQueue`], backing-store work leaves as [`conn::IoReq`]s and comes back through
//! [`conn::Conn::io_done`]. The reactor ([`crate::reactor`]) moves those through its ring.
//!
//! - [`conn`]: framing, login/text/logout/NOP, the CmdSN window; `conn/command.rs` the SCSI
//!   data path, `conn/tmf.rs` task management and fencing;
//! - [`task`]: the task table; [`dataout`]: Data-Out acceptance by coverage; [`order`]: task
//!   attributes; [`tx`]: the transmit queue; [`stats`]: per-reactor I/O statistics.

pub mod conn;
pub mod dataout;
pub mod order;
pub mod stats;
pub mod task;
pub mod tx;

#[cfg(test)]
mod tests;
