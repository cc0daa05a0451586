//! SCSI for disk LUNs (SPC-4 / SBC-3): CDB decoding, command execution, sense data.
//!
//! The transport (the reactor) hands a decoded [`Request`] to [`execute`] and acts on the
//! returned [`Disposition`]: hot-path reads, writes and flushes go through the reactor's ring;
//! commands whose work blocks (WRITE SAME, UNMAP, COMPARE AND WRITE, ORWRITE, VERIFY with data,
//! GET LBA STATUS) are checked here and return [`Disposition::Offload`], their work then runs
//! in [`execute_offloaded`] on a worker thread; everything else completes here, synchronously,
//! on plain data.

pub mod cdb;
pub mod commands;
pub mod lun;
pub mod medium;
pub mod nexus;
pub mod provisioning;
pub mod reservations;
pub mod sense;

pub use commands::{execute, execute_data_out, execute_offloaded};
pub use lun::{Lun, LunRef, LunRefs, LunTable};
pub use nexus::Nexus;
pub use sense::{Sense, SenseKey};

/// SCSI status codes (SAM-5) the target returns.
pub mod status {
    pub const GOOD: u8 = 0x00;
    pub const CHECK_CONDITION: u8 = 0x02;
    pub const CONDITION_MET: u8 = 0x04;
    pub const BUSY: u8 = 0x08;
    pub const RESERVATION_CONFLICT: u8 = 0x18;
    pub const TASK_SET_FULL: u8 = 0x28;
    pub const TASK_ABORTED: u8 = 0x40;
}

/// One SCSI command as the transport received it.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// The CDB (16 bytes from the BHS, longer with an extended-CDB AHS).
    pub cdb: &'a [u8],
    /// Decoded LUN number ([`lun::decode_lun`]); `None` for an address we cannot decode.
    pub lun: Option<u64>,
    /// Expected Data Transfer Length from the initiator.
    pub expected_len: u32,
    /// R bit: the initiator expects Data-In.
    pub read: bool,
    /// W bit: the initiator will send Data-Out.
    pub write: bool,
}

/// What the transport must do next with a command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disposition {
    /// Done: GOOD status, no data.
    Good,
    /// Done: GOOD status with the first `n` bytes of the `data_in` scratch buffer as Data-In
    /// (already cut to the CDB's allocation length; the transport applies residuals).
    DataIn(usize),
    /// Read `len` bytes at byte `offset` of the LUN's backing store and send them as Data-In,
    /// then GOOD.
    Read { offset: u64, len: u32 },
    /// Receive `len` bytes of Data-Out and write them at byte `offset`, then GOOD. With `fua`
    /// (or the LUN's write cache off) the data must be durable before status.
    Write { offset: u64, len: u32, fua: bool },
    /// Make every completed write durable (SYNCHRONIZE CACHE), then GOOD.
    Flush,
    /// Receive `len` bytes of Data-Out, then call [`execute_data_out`] with them.
    DataOut { len: u32 },
    /// CHECK CONDITION with this sense data.
    Check(Sense),
    /// Another status without sense data (RESERVATION CONFLICT, BUSY, TASK SET FULL...).
    Status(u8),
    /// Checked and ready, but the work blocks (backing I/O the ring cannot do, or many
    /// steps): the transport runs [`execute_offloaded`] on a worker thread (see
    /// [`crate::offload`]), holding `lock` (an LBA range of the LUN) exclusively meanwhile.
    Offload { lock: Option<crate::offload::LbaRange> },
    /// GOOD, after the tasks of these I_T nexuses (initiator port names, see
    /// [`Nexus::identity`]) on the command's LUN are aborted (PREEMPT AND ABORT).
    AbortNexuses(Vec<std::sync::Arc<str>>),
}
