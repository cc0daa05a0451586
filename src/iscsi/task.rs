//! A SCSI task in progress on a connection: its command, buffer and data-transfer state.

use crate::backing::AlignedBuf;
use crate::iscsi::dataout::DataOut;
use crate::scsi::LunRef;
use std::time::Instant;

/// What a task is waiting for or doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Waiting for buffer memory (the reactor's budget is spent): nothing solicited or
    /// started yet; it resumes in order when room comes back (`Conn::grant_buffers`).
    WaitBuf,
    /// Receiving Data-Out (immediate, unsolicited, then solicited by R2Ts).
    DataOut,
    /// A backing-store operation is in flight on the ring or on the offload pool.
    Io,
    /// Data-In and status are queued for sending; freed when the last byte is sent.
    Sending,
}

/// What the task does once its data is in (writes) or its read completes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Read `len` bytes at `offset`, send them as Data-In.
    Read { offset: u64 },
    /// Write the received data at `offset`.
    Write { offset: u64, fua: bool },
    /// Hand the received parameter data to the SCSI slow path.
    SlowPath,
    /// Flush the backing store.
    Flush,
    /// Run the command's work on the offload pool (see [`crate::offload`]), holding `lock`.
    Offload { lock: Option<crate::offload::LbaRange> },
}

/// Longest CDB we accept (16 in the BHS plus an extended-CDB AHS).
pub const MAX_CDB: usize = 32;

pub struct Task {
    pub itt: u32,
    pub lun_field: [u8; 8],
    pub lun: Option<LunRef>,
    pub cdb: [u8; MAX_CDB],
    pub cdb_len: u8,
    pub expected_len: u32,
    pub read_bit: bool,
    pub write_bit: bool,
    pub stage: Stage,
    pub action: Action,
    /// The data buffer (Data-In source or Data-Out destination).
    pub buf: Option<AlignedBuf>,
    /// Bytes of the reactor's buffer budget this task holds (its buffer's length), given
    /// back when it ends even if the buffer itself did not come back.
    pub charged: u32,
    /// Bytes the command itself transfers (from the CDB).
    pub needed: u32,
    /// Bytes that actually move: min(needed, expected_len).
    pub xfer: u32,
    /// Which Data-Out bytes have arrived, sequence by sequence.
    pub dout: DataOut,
    /// Next buffer offset to solicit with an R2T.
    pub r2t_next: u32,
    /// R2Ts sent for the command (the next R2TSN).
    pub r2t_sn: u32,
    /// When the command arrived, for latency statistics.
    pub started: Instant,
    /// Data-In bytes this read will queue, counted against the connection's transmit limit
    /// from when its read starts until they are queued.
    pub tx_reserved: u32,
    /// When its last Data-Out arrived (or the command, before any): for the Data-Out timeout.
    pub last_data: Instant,
    /// Its task attribute is ORDERED: later SIMPLE commands of its LUN wait for it.
    pub ordered: bool,
    /// Sent as an immediate command: it takes no place in the CmdSN window.
    pub immediate: bool,
    /// Aborted by task management: no further PDUs, freed when quiet.
    pub aborted: bool,
    /// ITT of the task management request that aborted it and waits for it to end.
    pub abort_tmf: u32,
    /// Aborted by another session's task management while its backing I/O was in flight:
    /// where to acknowledge once that I/O has ended.
    pub foreign_abort: Option<crate::session::AbortReply>,
}

impl Task {
    pub fn new(started: Instant) -> Self {
        Self {
            itt: 0,
            lun_field: [0; 8],
            lun: None,
            cdb: [0; MAX_CDB],
            cdb_len: 0,
            expected_len: 0,
            read_bit: false,
            write_bit: false,
            stage: Stage::DataOut,
            action: Action::Flush,
            buf: None,
            charged: 0,
            needed: 0,
            xfer: 0,
            dout: DataOut::none(),
            r2t_next: 0,
            r2t_sn: 0,
            started,
            last_data: started,
            tx_reserved: 0,
            ordered: false,
            immediate: false,
            aborted: false,
            abort_tmf: 0,
            foreign_abort: None,
        }
    }

    pub fn cdb(&self) -> &[u8] {
        &self.cdb[..usize::from(self.cdb_len)]
    }
}

/// Fixed-capacity task table indexed by slot; slots are reused through a free list so the
/// I/O path never allocates.
pub struct TaskTable {
    slots: Vec<Option<Task>>,
    free: Vec<u16>,
}

impl TaskTable {
    pub fn with_capacity(n: usize) -> Self {
        assert!(n <= usize::from(u16::MAX));
        Self { slots: (0..n).map(|_| None).collect(), free: (0..n as u16).rev().collect() }
    }

    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    pub fn in_use(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    pub fn insert(&mut self, task: Task) -> Option<u16> {
        let slot = self.free.pop()?;
        self.slots[usize::from(slot)] = Some(task);
        Some(slot)
    }

    pub fn get(&self, slot: u16) -> Option<&Task> {
        self.slots.get(usize::from(slot)).and_then(Option::as_ref)
    }

    pub fn get_mut(&mut self, slot: u16) -> Option<&mut Task> {
        self.slots.get_mut(usize::from(slot)).and_then(Option::as_mut)
    }

    pub fn remove(&mut self, slot: u16) -> Option<Task> {
        let t = self.slots.get_mut(usize::from(slot))?.take()?;
        self.free.push(slot);
        Some(t)
    }

    /// The slot of the live task with this Initiator Task Tag. Tasks whose status is already
    /// queued are finished for the initiator, which may reuse their tag at once.
    pub fn find_itt(&self, itt: u32) -> Option<u16> {
        self.slots
            .iter()
            .position(|t| matches!(t, Some(t) if t.itt == itt && !t.aborted && t.stage != Stage::Sending))
            .map(|i| i as u16)
    }

    /// Slots of every live task, for task management.
    pub fn slots(&self) -> impl Iterator<Item = (u16, &Task)> {
        self.slots.iter().enumerate().filter_map(|(i, t)| t.as_ref().map(|t| (i as u16, t)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_reused() {
        let mut t = TaskTable::with_capacity(2);
        let a = t.insert(Task::new(Instant::now())).unwrap();
        let b = t.insert(Task { itt: 9, ..Task::new(Instant::now()) }).unwrap();
        t.insert(Task { itt: 9, stage: Stage::Sending, ..Task::new(Instant::now()) }).ok_or(()).unwrap_err();
        assert!(t.insert(Task::new(Instant::now())).is_none(), "table is full");
        assert_eq!(t.find_itt(9), Some(b));
        t.remove(a);
        assert_eq!(t.in_use(), 1);
        assert_eq!(t.insert(Task::new(Instant::now())), Some(a));
    }
}
