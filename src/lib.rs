//! uringtgt: a user-space iSCSI target (RFC 7143) serving SCSI disks (SPC-4/SBC-3)
//! from per-core io_uring reactors.
//!
//! Where things live:
//! - [`protocol`]: iSCSI PDUs, text keys, login negotiation, digests.
//! - [`iscsi`]: the iSCSI engine's ring-free logic (Data-Out acceptance).
//! - [`scsi`]: CDB decoding, command execution for a disk LUN, sense data, LUN tables.
//! - [`backing`]: the stores behind a LUN (O_DIRECT image files, RAM).
//! - [`offload`]: the worker pool and LBA range lock that keep blocking work off reactors.
//! - [`reactor`]: per-core threads, each owning an io_uring, its connections and buffers.
//! - [`target`]: the listener, reactor start-up and the shared target state.
//! - [`config`]: the YAML configuration and its defaults.
//! - [`control`]: the control plane (JSON-RPC on a Unix socket) and its client.
//! - [`images`]: disk image import: streaming decompression, hashing, sparse atomic writes.
//! - [`metrics`]: the Prometheus `/metrics` endpoint and the counters it adds.
//! - [`portals`]: the addresses a portal is reachable on (wildcard binds).
//! - [`uring_check`]: the start-up io_uring check and why it fails (sysctl, group, seccomp).

pub mod backing;
pub mod config;
pub mod control;
pub mod images;
pub mod iscsi;
pub mod metrics;
pub mod offload;
pub mod portals;
pub mod protocol;
pub mod reactor;
pub mod scsi;
pub mod session;
pub mod target;
pub mod uring_check;
