//! A connection's transmit queue: PDUs waiting to go out, gathered into one `sendmsg`.
//!
//! PDUs queued while a send is in flight wait in `pending`; the batch being sent lives in
//! `inflight`, which is never touched until its completion arrives, because the kernel holds
//! pointers into its headers.

use crate::protocol::digest;
use crate::protocol::pdu::{pad_len, BhsBuf, BHS_LEN};
use std::collections::VecDeque;

/// iovecs one `sendmsg` gathers at most.
pub const MAX_IOV: usize = 64;

/// Where a PDU's data segment comes from.
pub enum TxData {
    None,
    /// Small, owned data (login and text responses, sense data, command responses).
    Inline(Vec<u8>),
    /// A slice of a task's buffer; the task stays allocated until the PDU is sent.
    Task {
        ptr: *const u8,
        len: u32,
    },
}

pub struct TxPdu {
    hdr: [u8; BHS_LEN + 4],
    hdr_len: u8,
    data: TxData,
    trailer: [u8; 8],
    trailer_len: u8,
    /// Task slot to free once this PDU is on the wire.
    pub release: Option<u16>,
}

impl TxPdu {
    fn data_slice(&self) -> &[u8] {
        match &self.data {
            TxData::None => &[],
            TxData::Inline(v) => v,
            // SAFETY: the task owning this buffer is released only after this PDU has been
            // sent (`release`), so the pointer stays valid for the PDU's lifetime.
            TxData::Task { ptr, len } => unsafe { std::slice::from_raw_parts(*ptr, *len as usize) },
        }
    }

    fn wire_len(&self) -> usize {
        usize::from(self.hdr_len) + self.data_slice().len() + usize::from(self.trailer_len)
    }
}

pub struct TxQueue {
    pending: VecDeque<TxPdu>,
    inflight: Vec<TxPdu>,
    /// Bytes of `inflight[0]` already sent by earlier partial sends.
    front_sent: usize,
    /// Wire bytes of every PDU queued and not yet completely sent.
    queued: usize,
    busy: bool,
    iov: Box<[libc::iovec; MAX_IOV]>,
    msg: Box<libc::msghdr>,
}

impl Default for TxQueue {
    fn default() -> Self {
        Self::new()
    }
}

impl TxQueue {
    pub fn new() -> Self {
        let iov = Box::new([libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; MAX_IOV]);
        // SAFETY: msghdr is plain data; all-zero is a valid empty header.
        let msg: Box<libc::msghdr> = Box::new(unsafe { std::mem::zeroed() });
        Self {
            pending: VecDeque::with_capacity(256),
            inflight: Vec::with_capacity(MAX_IOV),
            front_sent: 0,
            queued: 0,
            busy: false,
            iov,
            msg,
        }
    }

    /// Queues a PDU. The header's DataSegmentLength is set here from `data`; digests are added
    /// when negotiated.
    pub fn push(
        &mut self,
        mut bhs: BhsBuf,
        data: TxData,
        header_digest: bool,
        data_digest: bool,
        release: Option<u16>,
    ) {
        let mut pdu =
            TxPdu { hdr: [0; BHS_LEN + 4], hdr_len: BHS_LEN as u8, data, trailer: [0; 8], trailer_len: 0, release };
        let dlen = pdu.data_slice().len();
        bhs.data_len(dlen as u32);
        pdu.hdr[..BHS_LEN].copy_from_slice(bhs.bytes());
        if header_digest {
            let crc = digest::header(&pdu.hdr[..BHS_LEN]);
            pdu.hdr[BHS_LEN..].copy_from_slice(&digest::to_wire(crc));
            pdu.hdr_len += 4;
        }
        let pad = pad_len(dlen);
        pdu.trailer_len = pad as u8;
        if data_digest && dlen > 0 {
            let crc = digest::data(&[pdu.data_slice(), &[0u8; 3][..pad]]);
            pdu.trailer[pad..pad + 4].copy_from_slice(&digest::to_wire(crc));
            pdu.trailer_len += 4;
        }
        self.queued += pdu.wire_len();
        self.pending.push_back(pdu);
    }

    /// Wire bytes queued and not yet sent (those of a partly sent PDU included).
    pub fn queued_bytes(&self) -> usize {
        self.queued
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty() && self.inflight.is_empty()
    }

    /// Prepares the next `sendmsg`: returns the msghdr to submit, or `None` when a send is
    /// already in flight or nothing is queued.
    pub fn prepare(&mut self) -> Option<*const libc::msghdr> {
        if self.busy {
            return None;
        }
        // Fill the batch with whole PDUs while their parts fit in the iovec array.
        let mut niov: usize = self.inflight.iter().map(Self::iov_count).sum();
        while let Some(next) = self.pending.front() {
            let need = Self::iov_count(next);
            if niov + need > MAX_IOV || self.inflight.len() == self.inflight.capacity() {
                break;
            }
            niov += need;
            self.inflight.push(self.pending.pop_front().expect("front exists"));
        }
        if self.inflight.is_empty() {
            return None;
        }
        let mut n = 0;
        let mut skip = self.front_sent;
        for pdu in &self.inflight {
            let trailer = &pdu.trailer[..usize::from(pdu.trailer_len)];
            for part in [&pdu.hdr[..usize::from(pdu.hdr_len)], pdu.data_slice(), trailer] {
                if part.is_empty() {
                    continue;
                }
                if skip >= part.len() {
                    skip -= part.len();
                    continue;
                }
                self.iov[n] = libc::iovec { iov_base: part[skip..].as_ptr() as *mut _, iov_len: part.len() - skip };
                skip = 0;
                n += 1;
            }
        }
        self.msg.msg_iov = self.iov.as_mut_ptr();
        self.msg.msg_iovlen = n;
        self.busy = true;
        Some(&*self.msg)
    }

    fn iov_count(pdu: &TxPdu) -> usize {
        1 + usize::from(!pdu.data_slice().is_empty()) + usize::from(pdu.trailer_len > 0)
    }

    /// Accounts for a completed send of `sent` bytes; calls `released` for each task slot whose
    /// last PDU is now on the wire.
    pub fn complete(&mut self, sent: usize, mut released: impl FnMut(u16)) {
        debug_assert!(self.busy);
        self.busy = false;
        let mut left = self.front_sent + sent;
        let mut done = 0;
        for pdu in &self.inflight {
            let len = pdu.wire_len();
            if left < len {
                break;
            }
            left -= len;
            done += 1;
            self.queued -= len;
            if let Some(slot) = pdu.release {
                released(slot);
            }
        }
        self.inflight.drain(..done);
        self.front_sent = left;
    }

    /// Drops everything queued (connection teardown), reporting releasable task slots.
    pub fn clear(&mut self, mut released: impl FnMut(u16)) {
        debug_assert!(!self.busy, "clearing a queue the kernel still reads");
        for pdu in self.inflight.drain(..).chain(self.pending.drain(..)) {
            if let Some(slot) = pdu.release {
                released(slot);
            }
        }
        self.front_sent = 0;
        self.queued = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::pdu::opcode;

    fn gather(q: &mut TxQueue) -> Vec<u8> {
        let msg = q.prepare().expect("something to send");
        // SAFETY: prepare() returned a msghdr whose iovecs point at live queue memory.
        let m = unsafe { &*msg };
        let mut out = Vec::new();
        for i in 0..m.msg_iovlen {
            // SAFETY: as above; each iovec describes a readable slice.
            let iov = unsafe { &*m.msg_iov.add(i) };
            // SAFETY: as above.
            out.extend_from_slice(unsafe { std::slice::from_raw_parts(iov.iov_base as *const u8, iov.iov_len) });
        }
        out
    }

    #[test]
    fn partial_sends_resume_where_they_stopped() {
        let mut q = TxQueue::new();
        let data = vec![7u8; 10];
        q.push(BhsBuf::new(opcode::NOP_IN), TxData::Inline(data), false, false, Some(3));
        q.push(BhsBuf::new(opcode::SCSI_RESPONSE), TxData::None, false, false, Some(4));
        assert_eq!(q.queued_bytes(), 48 + 12 + 48);
        let all = gather(&mut q);
        assert_eq!(all.len(), 48 + 12 + 48);
        assert_eq!(all[5..8], [0, 0, 10]);
        let mut freed = vec![];
        q.complete(50, |s| freed.push(s));
        assert!(freed.is_empty());
        assert_eq!(q.queued_bytes(), 48 + 12 + 48, "a partly sent PDU still counts whole");
        let rest = gather(&mut q);
        assert_eq!(rest, all[50..]);
        q.complete(rest.len(), |s| freed.push(s));
        assert_eq!(freed, vec![3, 4]);
        assert!(q.is_empty());
        assert_eq!(q.queued_bytes(), 0, "sent PDUs no longer count");
        assert!(q.prepare().is_none());
    }

    #[test]
    fn digests_and_padding() {
        let mut q = TxQueue::new();
        q.push(BhsBuf::new(opcode::DATA_IN), TxData::Inline(vec![1, 2, 3, 4, 5]), true, true, None);
        let wire = gather(&mut q);
        assert_eq!(wire.len(), 52 + 5 + 3 + 4);
        assert_eq!(digest::from_wire(wire[48..52].try_into().unwrap()), digest::header(&wire[..48]));
        assert_eq!(digest::from_wire(wire[60..64].try_into().unwrap()), digest::header(&wire[52..60]));
    }
}
