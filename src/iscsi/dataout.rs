//! Data-Out acceptance for one command: which bytes of its buffer have arrived, checked PDU by
//! PDU against the sequences the target expects (RFC 7143 §4.2.5.2, §11.7, §11.8).
//!
//! The session negotiates DataPDUInOrder=Yes and DataSequenceInOrder=Yes, so each sequence —
//! the unsolicited one (immediate data, then Data-Out with the reserved Target Transfer Tag up
//! to the first burst) and one per R2T — is received at strictly increasing offsets, DataSN
//! counting from 0, the F bit on exactly its last PDU. Sequences cover disjoint ranges and a
//! PDU is accepted only at its sequence's next offset, so no byte is accepted twice and the
//! command's data is complete exactly when the accepted byte count reaches the total: every
//! byte of the buffer then came from this command. Each check is O(1).
//!
//! A DataSN out of sequence means an earlier PDU was lost to a digest error (RFC 7143 §7.9);
//! at ErrorRecoveryLevel 0 no recovery R2T can ask for it again, so the command fails
//! (§7.8: a SCSI Response with "protocol service CRC error", sent once the F bit has arrived
//! on every sequence in progress): [`DataOut::abandon`] marks it, [`DataOut::drain`] follows
//! the rest of its PDUs without accepting their data. Any other break of these rules (an
//! overlap, a gap, an over-run, a misplaced F bit, an unknown transfer tag) is a protocol
//! error: the caller rejects the PDU ("protocol error") and ends the connection.

use crate::protocol::pdu::RESERVED_TAG;

/// R2Ts a command may have outstanding at once, whatever MaxOutstandingR2T allows.
pub const MAX_OUTSTANDING_R2T: u32 = 16;

/// Why a Data-Out PDU was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DataOutError {
    /// The Target Transfer Tag names no R2T that is outstanding for this command.
    #[error("Data-Out with Target Transfer Tag {ttt:#x}, which no outstanding R2T carries")]
    UnknownTransfer { ttt: u32 },
    /// Unsolicited Data-Out where the command allows none (or after its unsolicited part ended).
    #[error("unsolicited Data-Out where none is expected")]
    UnexpectedUnsolicited,
    /// DataSN out of sequence (a lost, repeated or reordered PDU).
    #[error("Data-Out DataSN {got} where {want} was due")]
    DataSn { got: u32, want: u32 },
    /// Buffer offset other than the sequence's next one: a gap or an overlap.
    #[error("Data-Out at buffer offset {got} where {want} was due")]
    Offset { got: u32, want: u32 },
    /// Data past the end of the sequence (the R2T's range or the first burst).
    #[error("Data-Out up to offset {end} beyond its sequence's end {limit}")]
    Overrun { end: u64, limit: u32 },
    /// F set before the sequence's last byte.
    #[error("Data-Out F bit at offset {at}, before its sequence's end {end}")]
    EarlyFinal { at: u32, end: u32 },
    /// The sequence's last byte arrived without F.
    #[error("Data-Out reached its sequence's end {end} without the F bit")]
    MissingFinal { end: u32 },
    /// Data-Out for a command whose data has all arrived.
    #[error("Data-Out after all of the command's data arrived")]
    AfterComplete,
    /// The command already failed (see [`DataOut::abandon`]): its data is only drained.
    #[error("Data-Out for a command that already failed")]
    Failed,
}

/// One Data-Out sequence in progress.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Seq {
    ttt: u32,
    /// Offset the next PDU must carry.
    next: u32,
    end: u32,
    data_sn: u32,
    live: bool,
}

impl Seq {
    fn check(&self, data_sn: u32, offset: u32, len: u32, final_bit: bool) -> Result<u32, DataOutError> {
        if data_sn != self.data_sn {
            return Err(DataOutError::DataSn { got: data_sn, want: self.data_sn });
        }
        if offset != self.next {
            return Err(DataOutError::Offset { got: offset, want: self.next });
        }
        let end = u64::from(offset) + u64::from(len);
        if end > u64::from(self.end) {
            return Err(DataOutError::Overrun { end, limit: self.end });
        }
        let end = end as u32;
        match (final_bit, end == self.end) {
            (true, false) => Err(DataOutError::EarlyFinal { at: end, end: self.end }),
            (false, true) => Err(DataOutError::MissingFinal { end: self.end }),
            _ => Ok(end),
        }
    }
}

/// Which sequence an accepted PDU belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SeqRef {
    Unsolicited,
    R2t(u8),
}

/// A Data-Out PDU found valid by [`DataOut::check`], to be applied with [`DataOut::commit`]
/// once its data is in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accepted {
    seq: SeqRef,
    len: u32,
    end: u32,
    /// The PDU ends its sequence (F bit): an R2T's sequence frees room for another R2T.
    pub seq_done: bool,
    /// Whether the sequence is an R2T's (not the unsolicited one).
    pub solicited: bool,
}

/// The Data-Out state of one command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataOut {
    unsolicited: Seq,
    r2ts: [Seq; MAX_OUTSTANDING_R2T as usize],
    outstanding: u32,
    received: u32,
    total: u32,
    failed: bool,
}

impl DataOut {
    /// A command whose first `immediate` bytes came as immediate data, whose unsolicited data
    /// ends at `unsolicited_end` (≥ `immediate`), and which transfers `total` bytes in all
    /// (≥ `unsolicited_end`; the rest is solicited with R2Ts).
    pub fn new(immediate: u32, unsolicited_end: u32, total: u32) -> Self {
        debug_assert!(immediate <= unsolicited_end && unsolicited_end <= total);
        let unsolicited = Seq {
            ttt: RESERVED_TAG,
            next: immediate,
            end: unsolicited_end,
            data_sn: 0,
            live: unsolicited_end > immediate,
        };
        Self {
            unsolicited,
            r2ts: [Seq::default(); MAX_OUTSTANDING_R2T as usize],
            outstanding: 0,
            received: immediate,
            total,
            failed: false,
        }
    }

    /// A command without Data-Out.
    pub fn none() -> Self {
        Self::new(0, 0, 0)
    }

    /// Every byte of the command's data has arrived.
    pub fn is_complete(&self) -> bool {
        self.received >= self.total
    }

    pub fn received(&self) -> u32 {
        self.received
    }

    /// R2Ts sent whose sequence has not ended.
    pub fn outstanding(&self) -> u32 {
        self.outstanding
    }

    /// Opens the sequence of an R2T for `len` bytes at `offset` and returns its Target
    /// Transfer Tag: the task's slot in the low 16 bits, the sequence's index in bits 16-19,
    /// the R2TSN's low bits above (bit 31 stays clear: the target's pings use it). None when
    /// [`MAX_OUTSTANDING_R2T`] sequences are open.
    pub fn open_r2t(&mut self, task_slot: u16, r2t_sn: u32, offset: u32, len: u32) -> Option<u32> {
        let i = self.r2ts.iter().position(|s| !s.live)?;
        let ttt = u32::from(task_slot) | ((i as u32) << 16) | ((r2t_sn & 0x7FF) << 20);
        self.r2ts[i] = Seq { ttt, next: offset, end: offset + len, data_sn: 0, live: true };
        self.outstanding += 1;
        Some(ttt)
    }

    /// Whether a Data-Out PDU (its Target Transfer Tag, DataSN, buffer offset, data length and
    /// F bit) is the next one its sequence expects. Changes nothing.
    pub fn check(
        &self,
        ttt: u32,
        data_sn: u32,
        offset: u32,
        len: u32,
        final_bit: bool,
    ) -> Result<Accepted, DataOutError> {
        if self.failed {
            return Err(DataOutError::Failed);
        }
        if self.is_complete() {
            return Err(DataOutError::AfterComplete);
        }
        let (seq, r) = self.sequence(ttt)?;
        let end = r.check(data_sn, offset, len, final_bit)?;
        Ok(Accepted { seq, len, end, seq_done: final_bit, solicited: matches!(seq, SeqRef::R2t(_)) })
    }

    /// The live sequence a Target Transfer Tag names.
    fn sequence(&self, ttt: u32) -> Result<(SeqRef, &Seq), DataOutError> {
        Ok(if ttt == RESERVED_TAG {
            if !self.unsolicited.live {
                return Err(DataOutError::UnexpectedUnsolicited);
            }
            (SeqRef::Unsolicited, &self.unsolicited)
        } else {
            let i = ((ttt >> 16) & 0xF) as usize;
            match self.r2ts.get(i) {
                Some(s) if s.live && s.ttt == ttt => (SeqRef::R2t(i as u8), s),
                _ => return Err(DataOutError::UnknownTransfer { ttt }),
            }
        })
    }

    fn end_sequence(&mut self, seq: SeqRef) {
        match seq {
            SeqRef::Unsolicited => self.unsolicited.live = false,
            SeqRef::R2t(i) => {
                self.r2ts[usize::from(i)].live = false;
                self.outstanding -= 1;
            }
        }
    }

    /// The command fails (a DataSN error): no more of its data is accepted and no R2T is
    /// sent; the PDU that failed it (`ttt`, `final_bit`) may end its sequence.
    pub fn abandon(&mut self, ttt: u32, final_bit: bool) {
        self.failed = true;
        if let (Ok((seq, _)), true) = (self.sequence(ttt), final_bit) {
            self.end_sequence(seq);
        }
    }

    pub fn is_failed(&self) -> bool {
        self.failed
    }

    /// A Data-Out of a failed command: its data is dropped, its F bit ends its sequence. An
    /// unknown transfer tag is still a protocol error.
    pub fn drain(&mut self, ttt: u32, final_bit: bool) -> Result<(), DataOutError> {
        let (seq, _) = self.sequence(ttt)?;
        if final_bit {
            self.end_sequence(seq);
        }
        Ok(())
    }

    /// No sequence is in progress: a failed command may now be answered.
    pub fn is_settled(&self) -> bool {
        !self.unsolicited.live && self.outstanding == 0
    }

    /// Applies a PDU accepted by [`Self::check`] (with no other change in between).
    pub fn commit(&mut self, a: Accepted) {
        let s = match a.seq {
            SeqRef::Unsolicited => &mut self.unsolicited,
            SeqRef::R2t(i) => &mut self.r2ts[usize::from(i)],
        };
        debug_assert!(s.live && s.next + a.len == a.end);
        s.next = a.end;
        s.data_sn += 1;
        self.received += a.len;
        if a.seq_done {
            self.end_sequence(a.seq);
        }
    }

    /// Checks and applies in one step (for callers that copy the data first).
    pub fn accept(
        &mut self,
        ttt: u32,
        data_sn: u32,
        offset: u32,
        len: u32,
        final_bit: bool,
    ) -> Result<Accepted, DataOutError> {
        let a = self.check(ttt, data_sn, offset, len, final_bit)?;
        self.commit(a);
        Ok(a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const U: u32 = RESERVED_TAG;

    #[test]
    fn immediate_data_alone_completes() {
        let d = DataOut::new(4096, 4096, 4096);
        assert!(d.is_complete());
        assert_eq!(d.check(U, 0, 4096, 512, true), Err(DataOutError::AfterComplete));
    }

    #[test]
    fn unsolicited_then_solicited_in_order() {
        // 8 KiB immediate, first burst to 16 KiB, 32 KiB in all.
        let mut d = DataOut::new(8192, 16384, 32768);
        d.accept(U, 0, 8192, 4096, false).unwrap();
        let a = d.accept(U, 1, 12288, 4096, true).unwrap();
        assert!(a.seq_done && !a.solicited);
        assert_eq!(d.check(U, 2, 16384, 4096, false), Err(DataOutError::UnexpectedUnsolicited));
        let ttt = d.open_r2t(7, 0, 16384, 16384).unwrap();
        assert_eq!(ttt & 0xFFFF, 7);
        assert_eq!(ttt & 0x8000_0000, 0);
        assert_eq!(d.outstanding(), 1);
        d.accept(ttt, 0, 16384, 8192, false).unwrap();
        assert!(!d.is_complete());
        let a = d.accept(ttt, 1, 24576, 8192, true).unwrap();
        assert!(a.seq_done && a.solicited);
        assert_eq!(d.outstanding(), 0);
        assert!(d.is_complete());
        assert_eq!(d.received(), 32768);
    }

    #[test]
    fn several_outstanding_r2ts_interleaved() {
        let mut d = DataOut::new(0, 0, 3 * 4096);
        let t: Vec<u32> = (0..3).map(|i| d.open_r2t(1, i, i * 4096, 4096).unwrap()).collect();
        assert_eq!(d.outstanding(), 3);
        // Each sequence in order, the sequences interleaved and finished out of order.
        d.accept(t[2], 0, 8192, 2048, false).unwrap();
        d.accept(t[0], 0, 0, 2048, false).unwrap();
        d.accept(t[0], 1, 2048, 2048, true).unwrap();
        d.accept(t[1], 0, 4096, 4096, true).unwrap();
        assert!(!d.is_complete());
        d.accept(t[2], 1, 10240, 2048, true).unwrap();
        assert!(d.is_complete());
        assert_eq!(d.outstanding(), 0);
        // A finished sequence's tag is dead.
        assert_eq!(d.check(t[0], 2, 4096, 1, true), Err(DataOutError::AfterComplete));
    }

    #[test]
    fn finished_slots_are_reused_with_new_tags() {
        let mut d = DataOut::new(0, 0, 20 * 512);
        let mut tags = Vec::new();
        for i in 0..MAX_OUTSTANDING_R2T {
            tags.push(d.open_r2t(3, i, i * 512, 512).unwrap());
        }
        assert_eq!(d.open_r2t(3, 16, 16 * 512, 512), None, "all sequences open");
        d.accept(tags[5], 0, 5 * 512, 512, true).unwrap();
        let again = d.open_r2t(3, 16, 16 * 512, 512).unwrap();
        assert_ne!(again, tags[5], "a reused index gets a new tag");
        assert_eq!(d.check(tags[5], 1, 6 * 512, 512, true), Err(DataOutError::UnknownTransfer { ttt: tags[5] }));
        d.accept(again, 0, 16 * 512, 512, true).unwrap();
    }

    #[test]
    fn a_failed_command_drains_until_every_sequence_ends() {
        // Unsolicited data plus two R2Ts in flight when DataSN breaks in the first R2T.
        let mut d = DataOut::new(0, 4096, 12288);
        let t0 = d.open_r2t(0, 0, 4096, 4096).unwrap();
        let t1 = d.open_r2t(0, 1, 8192, 4096).unwrap();
        assert_eq!(d.check(t0, 1, 4096, 4096, true), Err(DataOutError::DataSn { got: 1, want: 0 }));
        d.abandon(t0, true);
        assert!(d.is_failed() && !d.is_settled());
        assert_eq!(d.check(t1, 0, 8192, 4096, true), Err(DataOutError::Failed), "no data is accepted any more");
        d.drain(t1, false).unwrap();
        d.drain(t1, true).unwrap();
        assert!(!d.is_settled(), "the unsolicited sequence is still open");
        assert_eq!(d.drain(t0, true), Err(DataOutError::UnknownTransfer { ttt: t0 }), "an ended sequence");
        d.drain(U, true).unwrap();
        assert!(d.is_settled());
        assert!(!d.is_complete(), "a failed command never completes");
        // A failing PDU without F leaves its sequence open.
        let mut d = DataOut::new(0, 0, 8192);
        let t = d.open_r2t(0, 0, 0, 8192).unwrap();
        d.abandon(t, false);
        assert!(!d.is_settled());
        d.drain(t, true).unwrap();
        assert!(d.is_settled());
    }

    /// Stands for the tag of the case's R2T.
    const R2T: u32 = 0xAAAA_AAAA;
    /// The R2T's tag with another generation's bits (a reused slot's old tag).
    const STALE: u32 = 0xBBBB_BBBB;

    /// A Data-Out PDU: tag, DataSN, buffer offset, length, F bit.
    type Pdu = (u32, u32, u32, u32, bool);

    /// A command's transfer, the PDUs it accepted, and one it must refuse.
    struct Refusal {
        what: &'static str,
        /// Immediate data, end of the unsolicited part, total (as [`DataOut::new`] takes them).
        lens: (u32, u32, u32),
        /// An R2T's offset and length, opened first.
        r2t: Option<(u32, u32)>,
        accepted: &'static [Pdu],
        pdu: Pdu,
        want: DataOutError,
    }

    const REFUSALS: &[Refusal] = &[
        Refusal {
            // The raw-initiator case: both halves of a 64 KiB R2T sent at offset 0.
            what: "overlap",
            lens: (0, 0, 65536),
            r2t: Some((0, 65536)),
            accepted: &[(R2T, 0, 0, 32768, false)],
            pdu: (R2T, 1, 0, 32768, true),
            want: DataOutError::Offset { got: 0, want: 32768 },
        },
        Refusal {
            what: "gap",
            lens: (0, 0, 65536),
            r2t: Some((0, 65536)),
            accepted: &[(R2T, 0, 0, 16384, false)],
            pdu: (R2T, 1, 32768, 32768, true),
            want: DataOutError::Offset { got: 32768, want: 16384 },
        },
        Refusal {
            what: "unsolicited Data-Out not where immediate data ended",
            lens: (4096, 8192, 8192),
            r2t: None,
            accepted: &[],
            pdu: (U, 0, 0, 4096, true),
            want: DataOutError::Offset { got: 0, want: 4096 },
        },
        Refusal {
            what: "over-run of an R2T",
            lens: (0, 0, 8192),
            r2t: Some((0, 4096)),
            accepted: &[],
            pdu: (R2T, 0, 0, 8192, true),
            want: DataOutError::Overrun { end: 8192, limit: 4096 },
        },
        Refusal {
            what: "over-run of the first burst",
            lens: (0, 4096, 8192),
            r2t: None,
            accepted: &[],
            pdu: (U, 0, 0, 4097, true),
            want: DataOutError::Overrun { end: 4097, limit: 4096 },
        },
        Refusal {
            what: "an offset that would wrap",
            lens: (0, 4096, 4096),
            r2t: None,
            accepted: &[],
            pdu: (U, 0, u32::MAX, 2, true),
            want: DataOutError::Offset { got: u32::MAX, want: 0 },
        },
        // libiscsi's iSCSIDataSnInvalid cases: 1 first, 27, -1, and 0 twice.
        Refusal {
            what: "DataSN 1 first",
            lens: (0, 0, 8192),
            r2t: Some((0, 8192)),
            accepted: &[],
            pdu: (R2T, 1, 0, 4096, false),
            want: DataOutError::DataSn { got: 1, want: 0 },
        },
        Refusal {
            what: "DataSN 27",
            lens: (0, 0, 8192),
            r2t: Some((0, 8192)),
            accepted: &[],
            pdu: (R2T, 27, 0, 4096, false),
            want: DataOutError::DataSn { got: 27, want: 0 },
        },
        Refusal {
            what: "DataSN -1",
            lens: (0, 0, 8192),
            r2t: Some((0, 8192)),
            accepted: &[],
            pdu: (R2T, u32::MAX, 0, 4096, false),
            want: DataOutError::DataSn { got: u32::MAX, want: 0 },
        },
        Refusal {
            what: "DataSN 0 twice",
            lens: (0, 0, 8192),
            r2t: Some((0, 8192)),
            accepted: &[(R2T, 0, 0, 4096, false)],
            pdu: (R2T, 0, 4096, 4096, true),
            want: DataOutError::DataSn { got: 0, want: 1 },
        },
        Refusal {
            // Each R2T's sequence numbers its PDUs from 0, whatever the unsolicited one sent.
            what: "an R2T's DataSN continuing the unsolicited sequence's",
            lens: (0, 4096, 8192),
            r2t: Some((4096, 4096)),
            accepted: &[(U, 0, 0, 4096, true)],
            pdu: (R2T, 1, 4096, 4096, true),
            want: DataOutError::DataSn { got: 1, want: 0 },
        },
        Refusal {
            what: "F before the R2T's end",
            lens: (0, 0, 8192),
            r2t: Some((0, 8192)),
            accepted: &[],
            pdu: (R2T, 0, 0, 4096, true),
            want: DataOutError::EarlyFinal { at: 4096, end: 8192 },
        },
        Refusal {
            what: "no F at the R2T's end",
            lens: (0, 0, 8192),
            r2t: Some((0, 8192)),
            accepted: &[],
            pdu: (R2T, 0, 0, 8192, false),
            want: DataOutError::MissingFinal { end: 8192 },
        },
        Refusal {
            what: "no F at the first burst's end",
            lens: (0, 4096, 4096),
            r2t: None,
            accepted: &[],
            pdu: (U, 0, 0, 4096, false),
            want: DataOutError::MissingFinal { end: 4096 },
        },
        Refusal {
            what: "a tag no R2T carries",
            lens: (0, 0, 8192),
            r2t: None,
            accepted: &[],
            pdu: (5, 0, 0, 512, false),
            want: DataOutError::UnknownTransfer { ttt: 5 },
        },
        Refusal {
            what: "an R2T's slot with another generation",
            lens: (0, 0, 8192),
            r2t: Some((0, 8192)),
            accepted: &[],
            pdu: (STALE, 0, 0, 512, false),
            want: DataOutError::UnknownTransfer { ttt: STALE },
        },
        Refusal {
            what: "unsolicited Data-Out where the command allows none",
            lens: (0, 0, 8192),
            r2t: Some((0, 8192)),
            accepted: &[],
            pdu: (U, 0, 0, 512, false),
            want: DataOutError::UnexpectedUnsolicited,
        },
        Refusal {
            what: "Data-Out after immediate data completed the command",
            lens: (4096, 4096, 4096),
            r2t: None,
            accepted: &[],
            pdu: (U, 0, 4096, 512, true),
            want: DataOutError::AfterComplete,
        },
    ];

    #[test]
    fn data_out_breaking_the_rules_is_refused_and_changes_nothing() {
        for case in REFUSALS {
            let (immediate, unsolicited_end, total) = case.lens;
            let mut d = DataOut::new(immediate, unsolicited_end, total);
            let r2t = case.r2t.map_or(0, |(offset, len)| d.open_r2t(5, 0, offset, len).unwrap());
            let tag = |t: u32| match t {
                R2T => r2t,
                STALE => r2t ^ 0x0010_0000,
                t => t,
            };
            for &(t, sn, offset, len, f) in case.accepted {
                d.accept(tag(t), sn, offset, len, f).unwrap_or_else(|e| panic!("{}: {e}", case.what));
            }
            let want = match case.want {
                DataOutError::UnknownTransfer { ttt } => DataOutError::UnknownTransfer { ttt: tag(ttt) },
                e => e,
            };
            let before = d.clone();
            let (t, sn, offset, len, f) = case.pdu;
            assert_eq!(d.check(tag(t), sn, offset, len, f), Err(want), "{}", case.what);
            assert_eq!(d, before, "{}: a refused PDU changed the state", case.what);
        }
    }
}
