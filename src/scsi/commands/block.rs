//! Block commands (SBC-3): the hot-path READ / WRITE / SYNCHRONIZE CACHE family, which only
//! turns CDBs into byte ranges, and the slow-path commands with parameter data (WRITE SAME,
//! UNMAP, COMPARE AND WRITE, ORWRITE, VERIFY with BYTCHK) that run against the backing store.
//! Those are checked on the reactor (`*_data` functions return [`Disposition::Offload`] with
//! the LBA range they change) and do their I/O in the `*_work` functions on a worker thread.

use super::{check_range, Res};
use crate::offload::LbaRange;
use crate::scsi::cdb::{self, decode_block, op, BlockCdb};
use crate::scsi::lun::BLOCK_SIZE;
use crate::scsi::{Disposition, Lun, Sense};

/// MAXIMUM TRANSFER LENGTH (block limits VPD) for reads, writes, VERIFY and ORWRITE: 16 MiB,
/// the largest buffer the transport's pool serves.
pub const MAX_TRANSFER_BLOCKS: u32 = 32768;
/// MAXIMUM COMPARE AND WRITE LENGTH.
pub const MAX_CAW_BLOCKS: u8 = 64;
/// MAXIMUM UNMAP LBA COUNT: 512 MiB per UNMAP command.
pub const MAX_UNMAP_BLOCKS: u32 = 1 << 20;
/// MAXIMUM UNMAP BLOCK DESCRIPTOR COUNT.
pub const MAX_UNMAP_DESCRIPTORS: u32 = 256;
/// MAXIMUM WRITE SAME LENGTH: 16 MiB, no more than a READ or WRITE moves, so initiators can
/// check a WRITE SAME with one READ.
pub const MAX_WRITE_SAME_BLOCKS: u64 = MAX_TRANSFER_BLOCKS as u64;
/// MAXIMUM ATOMIC TRANSFER LENGTH (block limits VPD): 1 MiB per WRITE ATOMIC(16), written
/// with one call under the LUN's read-modify-write lock. No alignment or granularity rules.
pub const MAX_ATOMIC_BLOCKS: u32 = 2048;

const BS: u64 = BLOCK_SIZE as u64;
/// Largest buffer WRITE SAME writes its pattern from in one call.
const WRITE_SAME_CHUNK: usize = 1 << 20;

fn decode(cdb: &[u8]) -> Result<BlockCdb, Sense> {
    decode_block(cdb).ok_or_else(Sense::invalid_opcode)
}

/// Rejects a non-zero RDPROTECT / WRPROTECT / VRPROTECT / ORPROTECT: no protection information.
fn no_protect(d: &BlockCdb) -> Result<(), Sense> {
    if d.protect() != 0 {
        return Err(Sense::invalid_field_in_cdb(1, 7));
    }
    Ok(())
}

fn writable(lun: &Lun) -> Result<(), Sense> {
    if lun.read_only {
        return Err(Sense::write_protected());
    }
    Ok(())
}

fn max_transfer(d: &BlockCdb) -> Result<(), Sense> {
    if d.blocks > MAX_TRANSFER_BLOCKS {
        return Err(Sense::invalid_field_in_cdb(d.len_byte, 7));
    }
    Ok(())
}

/// READ(6/10/12/16).
pub(super) fn read(cdb: &[u8], lun: &Lun) -> Res {
    let d = decode(cdb)?;
    no_protect(&d)?;
    max_transfer(&d)?;
    check_range(lun, d.lba, u64::from(d.blocks))?;
    if d.blocks == 0 {
        return Ok(Disposition::Good);
    }
    Ok(Disposition::Read { offset: d.lba * BS, len: d.blocks * BLOCK_SIZE })
}

fn write_check(cdb: &[u8], lun: &Lun) -> Result<BlockCdb, Sense> {
    let d = decode(cdb)?;
    no_protect(&d)?;
    let verify = matches!(cdb[0], op::WRITE_VERIFY_10 | op::WRITE_VERIFY_12 | op::WRITE_VERIFY_16);
    if verify && d.bytchk() > 1 {
        return Err(Sense::invalid_field_in_cdb(1, 2));
    }
    max_transfer(&d)?;
    check_range(lun, d.lba, u64::from(d.blocks))?;
    writable(lun)?;
    Ok(d)
}

/// WRITE(6/10/12/16): a byte range for the transport.
pub(super) fn write(cdb: &[u8], lun: &Lun) -> Res {
    let d = write_check(cdb, lun)?;
    if d.blocks == 0 {
        return Ok(Disposition::Good);
    }
    let fua = d.fua() || !lun.write_cache();
    Ok(Disposition::Write { offset: d.lba * BS, len: d.blocks * BLOCK_SIZE, fua })
}

/// WRITE AND VERIFY(10/12/16): the transport's write, always FUA, so status reports the data
/// on the medium: the backing store's write is its own verification (an error fails the
/// command), and the Data-Out keeps the hot path's residual handling.
pub(super) fn write_verify(cdb: &[u8], lun: &Lun) -> Res {
    let d = write_check(cdb, lun)?;
    if d.blocks == 0 {
        return Ok(Disposition::Good);
    }
    Ok(Disposition::Write { offset: d.lba * BS, len: d.blocks * BLOCK_SIZE, fua: true })
}

/// SYNCHRONIZE CACHE(10/16): a whole-store flush; 0 blocks means "to the end".
pub(super) fn sync_cache(cdb: &[u8], lun: &Lun) -> Res {
    let d = decode(cdb)?;
    check_range(lun, d.lba, u64::from(d.blocks))?;
    Ok(Disposition::Flush)
}

/// PRE-FETCH(10/16): nothing to do beyond the range check; GOOD says "not guaranteed cached".
pub(super) fn prefetch(cdb: &[u8], lun: &Lun) -> Res {
    let d = decode(cdb)?;
    check_range(lun, d.lba, u64::from(d.blocks))?;
    Ok(Disposition::Good)
}

/// VERIFY(10/12/16). BYTCHK 00b reads the range (a read failure is a MEDIUM ERROR with the
/// first LBA of the chunk that failed); 01b compares the Data-Out with the medium; 11b compares
/// one block against every block.
pub(super) fn verify(cdb: &[u8], lun: &Lun) -> Res {
    let d = verify_check(cdb, lun)?;
    if d.blocks == 0 {
        return Ok(Disposition::Good);
    }
    match d.bytchk() {
        // Reads only: no range to hold.
        0 => Ok(Disposition::Offload { lock: None }),
        1 => Ok(Disposition::DataOut { len: d.blocks * BLOCK_SIZE }),
        _ => Ok(Disposition::DataOut { len: BLOCK_SIZE }),
    }
}

fn verify_check(cdb: &[u8], lun: &Lun) -> Result<BlockCdb, Sense> {
    let d = decode(cdb)?;
    no_protect(&d)?;
    if d.bytchk() == 2 {
        return Err(Sense::invalid_field_in_cdb(1, 2));
    }
    check_range(lun, d.lba, u64::from(d.blocks))?;
    max_transfer(&d)?;
    Ok(d)
}

/// Reads `blocks` blocks from `lba` in [`WRITE_SAME_CHUNK`] steps, for VERIFY's medium check.
fn read_through(lun: &Lun, lba: u64, blocks: u32) -> Result<(), Sense> {
    let total = u64::from(blocks) * BS;
    let mut buf = vec![0u8; (total as usize).min(WRITE_SAME_CHUNK)];
    let mut done = 0u64;
    while done < total {
        let n = (total - done).min(buf.len() as u64) as usize;
        lun.backing
            .read_at(&mut buf[..n], lba * BS + done)
            .map_err(|_| Sense { info: Some(lba + done / BS), ..Sense::read_error() })?;
        done += n as u64;
    }
    Ok(())
}

pub(super) fn verify_data(cdb: &[u8], lun: &Lun, data: &[u8]) -> Res {
    let d = verify_check(cdb, lun)?;
    let want = if d.bytchk() == 1 { d.blocks as usize * BS as usize } else { BS as usize };
    if data.len() < want {
        return Err(Sense::invalid_field_in_cdb(d.len_byte, 7));
    }
    // Reads only: no range to hold (a racing write is the initiator's business, as for READ).
    Ok(Disposition::Offload { lock: None })
}

pub(super) fn verify_work(cdb: &[u8], lun: &Lun, data: &[u8]) -> Res {
    let d = verify_check(cdb, lun)?;
    if d.bytchk() == 0 {
        read_through(lun, d.lba, d.blocks)?;
        return Ok(Disposition::Good);
    }
    let len = d.blocks as usize * BLOCK_SIZE as usize;
    let mut medium = vec![0u8; len];
    lun.backing.read_at(&mut medium, d.lba * BS).map_err(|_| Sense::read_error())?;
    if d.bytchk() == 1 {
        let data = data.get(..len).ok_or_else(|| Sense::invalid_field_in_cdb(d.len_byte, 7))?;
        compare(&medium, data)?;
    } else {
        let block = data.get(..BS as usize).ok_or_else(|| Sense::invalid_field_in_cdb(d.len_byte, 7))?;
        for (i, m) in medium.chunks(BS as usize).enumerate() {
            compare(m, block).map_err(|mut s| {
                s.info = s.info.map(|o| o + i as u64 * BS);
                s
            })?;
        }
    }
    Ok(Disposition::Good)
}

/// MISCOMPARE with the offset of the first differing byte.
fn compare(medium: &[u8], data: &[u8]) -> Result<(), Sense> {
    match medium.iter().zip(data).position(|(a, b)| a != b) {
        Some(i) => Err(Sense::miscompare(i as u64)),
        None => Ok(()),
    }
}

/// What a WRITE SAME CDB asks for, after its checks.
struct WriteSame {
    offset: u64,
    len: u64,
    unmap: bool,
    ndob: bool,
}

fn write_same_check(cdb: &[u8], lun: &Lun) -> Result<WriteSame, Sense> {
    let d = decode(cdb)?;
    no_protect(&d)?;
    if d.flags & 0x10 != 0 {
        // ANCHOR: anchored LBAs are not supported (ANC_SUP = 0).
        return Err(Sense::invalid_field_in_cdb(1, 4));
    }
    if d.flags & 0x06 != 0 {
        // PBDATA / LBDATA (obsolete in WRITE SAME(16)): no per-block data substitution.
        return Err(Sense::invalid_field_in_cdb(1, 2));
    }
    let ndob = cdb[0] == op::WRITE_SAME_16 && d.flags & 0x01 != 0;
    let num = lun.num_blocks();
    if d.lba > num {
        return Err(Sense::lba_out_of_range());
    }
    // WSNZ = 0: zero blocks means "to the end of the medium".
    let blocks = if d.blocks == 0 { num - d.lba } else { u64::from(d.blocks) };
    if blocks > MAX_WRITE_SAME_BLOCKS {
        return Err(Sense::invalid_field_in_cdb(d.len_byte, 7));
    }
    check_range(lun, d.lba, blocks)?;
    writable(lun)?;
    Ok(WriteSame { offset: d.lba * BS, len: blocks * BS, unmap: d.flags & 0x08 != 0, ndob })
}

impl WriteSame {
    fn range(&self) -> LbaRange {
        LbaRange::new(self.offset / BS, self.len / BS)
    }
}

/// WRITE SAME(10/16).
pub(super) fn write_same(cdb: &[u8], lun: &Lun, expected_len: u32) -> Res {
    let ws = write_same_check(cdb, lun)?;
    if ws.ndob {
        // NDOB: no Data-Out, the block is all zeroes.
        if ws.len == 0 {
            return Ok(Disposition::Good);
        }
        return Ok(Disposition::Offload { lock: Some(ws.range()) });
    }
    if expected_len != BLOCK_SIZE {
        // Exactly one block of Data-Out; anything else cannot be the pattern.
        return Err(Sense::invalid_field_in_cdb(if cdb[0] == op::WRITE_SAME_10 { 7 } else { 10 }, 7));
    }
    if ws.len == 0 {
        return Ok(Disposition::Good);
    }
    Ok(Disposition::DataOut { len: BLOCK_SIZE })
}

pub(super) fn write_same_data(cdb: &[u8], lun: &Lun, data: &[u8]) -> Res {
    let ws = write_same_check(cdb, lun)?;
    data.get(..BS as usize).ok_or_else(Sense::parameter_list_length_error)?;
    Ok(Disposition::Offload { lock: Some(ws.range()) })
}

/// WRITE SAME's work, with its Data-Out (empty with NDOB).
pub(super) fn write_same_work(cdb: &[u8], lun: &Lun, data: &[u8]) -> Res {
    let ws = write_same_check(cdb, lun)?;
    let zeroes = [0u8; BS as usize];
    let pattern =
        if ws.ndob { &zeroes[..] } else { data.get(..BS as usize).ok_or_else(Sense::parameter_list_length_error)? };
    write_pattern(lun, &ws, pattern)?;
    Ok(Disposition::Good)
}

/// Unmaps (UNMAP bit: discarded blocks read as zeroes, LBPRZ) or writes the
/// pattern over the range in large chunks.
fn write_pattern(lun: &Lun, ws: &WriteSame, pattern: &[u8]) -> Result<(), Sense> {
    // With UNMAP set the blocks are deallocated whatever the pattern, as LIO and tgt do and
    // libiscsi's conformance tests expect: with LBPRZ=1 they then read back as zeroes.
    if ws.unmap {
        return lun.backing.discard(ws.offset, ws.len).map_err(|_| Sense::write_error());
    }
    let chunk = (ws.len as usize).min(WRITE_SAME_CHUNK);
    let buf = pattern.repeat(chunk / pattern.len());
    let fua = !lun.write_cache();
    let mut done = 0u64;
    while done < ws.len {
        let n = (ws.len - done).min(buf.len() as u64) as usize;
        lun.backing.write_at(&buf[..n], ws.offset + done, fua).map_err(|_| Sense::write_error())?;
        done += n as u64;
    }
    Ok(())
}

/// UNMAP: needs its parameter list.
pub(super) fn unmap(cdb: &[u8], lun: &Lun) -> Res {
    let len = unmap_check(cdb, lun)?;
    if len == 0 {
        return Ok(Disposition::Good);
    }
    Ok(Disposition::DataOut { len: u32::from(len) })
}

fn unmap_check(cdb: &[u8], lun: &Lun) -> Result<u16, Sense> {
    if cdb[1] & 0x01 != 0 {
        return Err(Sense::invalid_field_in_cdb(1, 0)); // ANCHOR
    }
    writable(lun)?;
    Ok(cdb::be16(cdb, 7))
}

/// UNMAP's checks: every descriptor valid; the range to hold covers them all.
pub(super) fn unmap_data(cdb: &[u8], lun: &Lun, data: &[u8]) -> Res {
    let descriptors = unmap_descriptors(cdb, lun, data)?;
    let (mut start, mut end) = (u64::MAX, 0u64);
    for desc in descriptors.filter(|d| cdb::be32(d, 8) != 0) {
        let (lba, n) = (cdb::be64(desc, 0), u64::from(cdb::be32(desc, 8)));
        start = start.min(lba);
        end = end.max(lba + n);
    }
    if end == 0 {
        return Ok(Disposition::Good);
    }
    Ok(Disposition::Offload { lock: Some(LbaRange { start, end }) })
}

/// The validated block descriptors of an UNMAP parameter list.
fn unmap_descriptors<'a>(cdb: &[u8], lun: &Lun, data: &'a [u8]) -> Result<std::slice::ChunksExact<'a, u8>, Sense> {
    let len = usize::from(unmap_check(cdb, lun)?);
    let data = &data[..len.min(data.len())];
    if data.len() < 8 {
        return Err(Sense::parameter_list_length_error());
    }
    let bd_len = usize::from(cdb::be16(data, 2)).min(data.len() - 8);
    let descriptors = data[8..8 + bd_len].chunks_exact(16);
    if descriptors.len() > MAX_UNMAP_DESCRIPTORS as usize {
        return Err(Sense::invalid_field_in_param_list(2, 7));
    }
    // Validate every descriptor before discarding anything.
    let mut total = 0u64;
    for (i, desc) in descriptors.clone().enumerate() {
        let (lba, n) = (cdb::be64(desc, 0), cdb::be32(desc, 8));
        check_range(lun, lba, u64::from(n))?;
        total += u64::from(n);
        if total > u64::from(MAX_UNMAP_BLOCKS) {
            return Err(Sense::invalid_field_in_param_list((8 + i * 16 + 8) as u16, 7));
        }
    }
    Ok(descriptors)
}

pub(super) fn unmap_work(cdb: &[u8], lun: &Lun, data: &[u8]) -> Res {
    for desc in unmap_descriptors(cdb, lun, data)? {
        let (lba, n) = (cdb::be64(desc, 0), cdb::be32(desc, 8));
        if n != 0 {
            lun.backing.discard(lba * BS, u64::from(n) * BS).map_err(|_| Sense::write_error())?;
        }
    }
    Ok(Disposition::Good)
}

fn compare_and_write_check(cdb: &[u8], lun: &Lun) -> Result<BlockCdb, Sense> {
    let d = decode(cdb)?;
    no_protect(&d)?;
    if d.blocks > u32::from(MAX_CAW_BLOCKS) {
        return Err(Sense::invalid_field_in_cdb(13, 7));
    }
    check_range(lun, d.lba, u64::from(d.blocks))?;
    writable(lun)?;
    Ok(d)
}

/// COMPARE AND WRITE: Data-Out holds the verify blocks, then the write blocks.
pub(super) fn compare_and_write(cdb: &[u8], lun: &Lun, expected_len: u32) -> Res {
    let d = compare_and_write_check(cdb, lun)?;
    let len = 2 * d.blocks * BLOCK_SIZE;
    // Checked before the zero-block case: a one-byte NUMBER OF LOGICAL BLOCKS that wrapped
    // (256 blocks sent as 0) must not pass as "nothing to do".
    if expected_len != len {
        return Err(Sense::invalid_field_in_cdb(13, 7));
    }
    if d.blocks == 0 {
        return Ok(Disposition::Good);
    }
    Ok(Disposition::DataOut { len })
}

pub(super) fn compare_and_write_data(cdb: &[u8], lun: &Lun, data: &[u8]) -> Res {
    let d = compare_and_write_check(cdb, lun)?;
    let half = d.blocks as usize * BS as usize;
    data.get(..2 * half).ok_or_else(|| Sense::invalid_field_in_cdb(13, 7))?;
    // Atomic against other offloaded commands on these blocks (COMPARE AND WRITE, ORWRITE,
    // WRITE SAME, UNMAP) of every session: the range is held until the write is done. Plain
    // writes racing with it are the initiator's business (SBC leaves overlapping commands'
    // order to the task set).
    Ok(Disposition::Offload { lock: Some(LbaRange::new(d.lba, u64::from(d.blocks))) })
}

pub(super) fn compare_and_write_work(cdb: &[u8], lun: &Lun, data: &[u8]) -> Res {
    let d = compare_and_write_check(cdb, lun)?;
    let half = d.blocks as usize * BS as usize;
    let data = data.get(..2 * half).ok_or_else(|| Sense::invalid_field_in_cdb(13, 7))?;
    let mut medium = vec![0u8; half];
    lun.backing.read_at(&mut medium, d.lba * BS).map_err(|_| Sense::read_error())?;
    compare(&medium, &data[..half])?;
    let fua = d.fua() || !lun.write_cache();
    lun.backing.write_at(&data[half..], d.lba * BS, fua).map_err(|_| Sense::write_error())?;
    Ok(Disposition::Good)
}

fn write_atomic_check(cdb: &[u8], lun: &Lun) -> Result<BlockCdb, Sense> {
    let d = decode(cdb)?;
    no_protect(&d)?;
    if d.blocks > MAX_ATOMIC_BLOCKS {
        return Err(Sense::invalid_field_in_cdb(d.len_byte, 7));
    }
    check_range(lun, d.lba, u64::from(d.blocks))?;
    writable(lun)?;
    Ok(d)
}

/// WRITE ATOMIC(16): the Data-Out lands in one buffer and is written with one call.
pub(super) fn write_atomic(cdb: &[u8], lun: &Lun) -> Res {
    let d = write_atomic_check(cdb, lun)?;
    if d.blocks == 0 {
        return Ok(Disposition::Good);
    }
    Ok(Disposition::DataOut { len: d.blocks * BLOCK_SIZE })
}

pub(super) fn write_atomic_data(cdb: &[u8], lun: &Lun, data: &[u8]) -> Res {
    let d = write_atomic_check(cdb, lun)?;
    let len = d.blocks as usize * BS as usize;
    data.get(..len).ok_or_else(|| Sense::invalid_field_in_cdb(d.len_byte, 7))?;
    // Holds the range like COMPARE AND WRITE, ORWRITE, WRITE SAME and UNMAP: none of them
    // sees half of this write.
    Ok(Disposition::Offload { lock: Some(LbaRange::new(d.lba, u64::from(d.blocks))) })
}

pub(super) fn write_atomic_work(cdb: &[u8], lun: &Lun, data: &[u8]) -> Res {
    let d = write_atomic_check(cdb, lun)?;
    let len = d.blocks as usize * BS as usize;
    let data = data.get(..len).ok_or_else(|| Sense::invalid_field_in_cdb(d.len_byte, 7))?;
    let fua = d.fua() || !lun.write_cache();
    lun.backing.write_at(data, d.lba * BS, fua).map_err(|_| Sense::write_error())?;
    Ok(Disposition::Good)
}

fn orwrite_check(cdb: &[u8], lun: &Lun) -> Result<BlockCdb, Sense> {
    let d = decode(cdb)?;
    no_protect(&d)?;
    check_range(lun, d.lba, u64::from(d.blocks))?;
    writable(lun)?;
    max_transfer(&d)?;
    Ok(d)
}

/// ORWRITE(16): the medium becomes medium OR Data-Out.
pub(super) fn orwrite(cdb: &[u8], lun: &Lun) -> Res {
    let d = orwrite_check(cdb, lun)?;
    if d.blocks == 0 {
        return Ok(Disposition::Good);
    }
    Ok(Disposition::DataOut { len: d.blocks * BLOCK_SIZE })
}

pub(super) fn orwrite_data(cdb: &[u8], lun: &Lun, data: &[u8]) -> Res {
    let d = orwrite_check(cdb, lun)?;
    let len = d.blocks as usize * BS as usize;
    data.get(..len).ok_or_else(|| Sense::invalid_field_in_cdb(d.len_byte, 7))?;
    Ok(Disposition::Offload { lock: Some(LbaRange::new(d.lba, u64::from(d.blocks))) })
}

pub(super) fn orwrite_work(cdb: &[u8], lun: &Lun, data: &[u8]) -> Res {
    let d = orwrite_check(cdb, lun)?;
    let len = d.blocks as usize * BS as usize;
    let data = data.get(..len).ok_or_else(|| Sense::invalid_field_in_cdb(d.len_byte, 7))?;
    let mut medium = vec![0u8; len];
    lun.backing.read_at(&mut medium, d.lba * BS).map_err(|_| Sense::read_error())?;
    medium.iter_mut().zip(data).for_each(|(m, b)| *m |= b);
    let fua = d.fua() || !lun.write_cache();
    lun.backing.write_at(&medium, d.lba * BS, fua).map_err(|_| Sense::write_error())?;
    Ok(Disposition::Good)
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;
    use crate::scsi::{execute, LunTable, Nexus, SenseKey};
    use std::sync::atomic::Ordering;

    const OOB: (SenseKey, u8, u8) = (SenseKey::IllegalRequest, 0x21, 0x00);
    const WP: (SenseKey, u8, u8) = (SenseKey::DataProtect, 0x27, 0x00);

    fn run(t: &LunTable, n: &mut Nexus, cdb: &[u8], lun: u64) -> Disposition {
        exec(t, n, cdb, lun, &mut [0u8; 64])
    }

    fn fill(t: &LunTable, lba: u64, data: &[u8]) {
        t.get(0).unwrap().backing.write_at(data, lba * BS, false).unwrap();
    }

    fn medium(t: &LunTable, lba: u64, blocks: usize) -> Vec<u8> {
        let mut v = vec![0u8; blocks * BS as usize];
        t.get(0).unwrap().backing.read_at(&mut v, lba * BS).unwrap();
        v
    }

    #[test]
    fn reads_in_every_form() {
        let (t, mut n) = setup();
        let want = Disposition::Read { offset: 10 * 512, len: 3 * 512 };
        assert_eq!(run(&t, &mut n, &[op::READ_6, 0, 0, 10, 3, 0], 0), want);
        assert_eq!(run(&t, &mut n, &cdb10(op::READ_10, 0x18, 10, 3), 0), want);
        assert_eq!(run(&t, &mut n, &cdb12(op::READ_12, 0x08, 10, 3), 0), want);
        assert_eq!(run(&t, &mut n, &cdb16(op::READ_16, 0x10, 10, 3), 0), want);
        // READ(6) length 0 is 256 blocks.
        assert_eq!(run(&t, &mut n, &[op::READ_6, 0, 0, 0, 0, 0], 0), Disposition::Read { offset: 0, len: 256 * 512 });
        assert_eq!(run(&t, &mut n, &cdb10(op::READ_10, 0, 0, 0), 1), Disposition::Good);
        assert_eq!(run(&t, &mut n, &cdb16(op::READ_16, 0, BLOCKS, 0), 0), Disposition::Good);
    }

    #[test]
    fn read_range_and_field_checks() {
        let (t, mut n) = setup();
        let last = BLOCKS - 1;
        assert_eq!(
            run(&t, &mut n, &cdb16(op::READ_16, 0, last, 1), 0),
            Disposition::Read { offset: last * 512, len: 512 }
        );
        assert_eq!(check(run(&t, &mut n, &cdb16(op::READ_16, 0, last, 2), 0)), OOB);
        assert_eq!(check(run(&t, &mut n, &cdb16(op::READ_16, 0, BLOCKS + 1, 0), 0)), OOB);
        assert_eq!(check(run(&t, &mut n, &cdb16(op::READ_16, 0, u64::MAX, 1), 0)), OOB);
        assert_eq!(check(run(&t, &mut n, &cdb16(op::READ_16, 0, 1 << 63, 1), 0)), OOB);
        assert_eq!(check(run(&t, &mut n, &cdb10(op::READ_10, 0, BLOCKS as u32, 1), 0)), OOB);
        assert_eq!(check(run(&t, &mut n, &[op::READ_6, 0, 0x04, 0, 1, 0], 0)), OOB);
        let s = sense(run(&t, &mut n, &cdb10(op::READ_10, 0x20, 0, 1), 0));
        assert_eq!((s.asc, s.specific), (0x24, Some([0x4F, 0, 1])));
        let s = sense(run(&t, &mut n, &cdb12(op::READ_12, 0, 0, MAX_TRANSFER_BLOCKS + 1), 0));
        assert_eq!((s.asc, s.specific), (0x24, Some([0x4F, 0, 6])));
    }

    #[test]
    fn writes_in_every_form() {
        let (t, mut n) = setup();
        let w = |fua| Disposition::Write { offset: 5 * 512, len: 2 * 512, fua };
        assert_eq!(run(&t, &mut n, &[op::WRITE_6, 0, 0, 5, 2, 0], 0), w(false));
        assert_eq!(run(&t, &mut n, &cdb10(op::WRITE_10, 0x10, 5, 2), 0), w(false));
        assert_eq!(run(&t, &mut n, &cdb10(op::WRITE_10, 0x08, 5, 2), 0), w(true));
        assert_eq!(run(&t, &mut n, &cdb12(op::WRITE_12, 0x0A, 5, 2), 0), w(true));
        assert_eq!(run(&t, &mut n, &cdb16(op::WRITE_16, 0x08, 5, 2), 0), w(true));
        let wv = w(true);
        assert_eq!(run(&t, &mut n, &cdb10(op::WRITE_VERIFY_10, 0x12, 5, 2), 0), wv);
        assert_eq!(run(&t, &mut n, &cdb12(op::WRITE_VERIFY_12, 0, 5, 2), 0), wv);
        assert_eq!(run(&t, &mut n, &cdb16(op::WRITE_VERIFY_16, 0, 5, 2), 0), wv);
        assert_eq!(run(&t, &mut n, &cdb16(op::WRITE_VERIFY_16, 0, 5, 0), 0), Disposition::Good);
        assert_eq!(run(&t, &mut n, &cdb10(op::WRITE_10, 0, 5, 0), 0), Disposition::Good);
        assert_eq!(
            run(&t, &mut n, &[op::WRITE_6, 0, 0, 0, 0, 0], 0),
            Disposition::Write { offset: 0, len: 256 * 512, fua: false }
        );
        // Write cache off: every write is FUA.
        t.get(0).unwrap().write_cache.store(false, Ordering::Relaxed);
        assert_eq!(run(&t, &mut n, &cdb10(op::WRITE_10, 0, 5, 2), 0), w(true));
    }

    #[test]
    fn write_checks() {
        let (t, mut n) = setup();
        assert_eq!(check(run(&t, &mut n, &cdb10(op::WRITE_10, 0, 0, 1), 1)), WP);
        assert_eq!(check(run(&t, &mut n, &cdb16(op::WRITE_16, 0, 0, 1), 1)), WP);
        assert_eq!(check(run(&t, &mut n, &cdb10(op::WRITE_VERIFY_10, 0, 0, 1), 1)), WP);
        assert_eq!(check(run(&t, &mut n, &cdb16(op::WRITE_16, 0, BLOCKS, 1), 0)), OOB);
        assert_eq!(check(run(&t, &mut n, &cdb12(op::WRITE_12, 0, u32::MAX, 2), 0)), OOB);
        let s = sense(run(&t, &mut n, &cdb16(op::WRITE_16, 0x40, 0, 1), 0));
        assert_eq!((s.asc, s.specific), (0x24, Some([0x4F, 0, 1])));
        let s = sense(run(&t, &mut n, &cdb10(op::WRITE_VERIFY_10, 0x04, 0, 1), 0));
        assert_eq!((s.asc, s.specific), (0x24, Some([0x4A, 0, 1])));
    }

    #[test]
    fn sync_cache_and_prefetch() {
        let (t, mut n) = setup();
        assert_eq!(run(&t, &mut n, &cdb10(op::SYNC_CACHE_10, 0x02, 0, 0), 0), Disposition::Flush);
        assert_eq!(run(&t, &mut n, &cdb16(op::SYNC_CACHE_16, 0, 10, 20), 1), Disposition::Flush);
        assert_eq!(check(run(&t, &mut n, &cdb16(op::SYNC_CACHE_16, 0, BLOCKS - 1, 2), 0)), OOB);
        assert_eq!(run(&t, &mut n, &cdb10(op::PRE_FETCH_10, 0x02, 0, 1), 0), Disposition::Good);
        assert_eq!(run(&t, &mut n, &cdb16(op::PRE_FETCH_16, 0, BLOCKS - 1, 1), 0), Disposition::Good);
        assert_eq!(check(run(&t, &mut n, &cdb16(op::PRE_FETCH_16, 0, BLOCKS, 1), 0)), OOB);
    }

    #[test]
    fn verify_without_and_with_bytchk() {
        let (t, mut n) = setup();
        fill(&t, 4, &[0x5A; 1024]);
        assert_eq!(run(&t, &mut n, &cdb10(op::VERIFY_10, 0x10, 4, 2), 0), Disposition::Good);
        assert_eq!(check(run(&t, &mut n, &cdb16(op::VERIFY_16, 0, BLOCKS, 1), 0)), OOB);
        assert_eq!(sense(run(&t, &mut n, &cdb12(op::VERIFY_12, 0x20, 0, 1), 0)).asc, 0x24);
        assert_eq!(sense(run(&t, &mut n, &cdb12(op::VERIFY_12, 0x04, 0, 1), 0)).asc, 0x24);
        assert_eq!(run(&t, &mut n, &cdb10(op::VERIFY_10, 0x02, 4, 0), 0), Disposition::Good);

        let mut data = vec![0x5A; 1024];
        assert_eq!(exec_out(&t, &mut n, &cdb10(op::VERIFY_10, 0x02, 4, 2), 0, &data), Disposition::Good);
        assert_eq!(exec_out(&t, &mut n, &cdb12(op::VERIFY_12, 0x02, 4, 2), 0, &data), Disposition::Good);
        data[700] = 0;
        let s = sense(exec_out(&t, &mut n, &cdb16(op::VERIFY_16, 0x02, 4, 2), 0, &data));
        assert_eq!((s.key, s.asc, s.info), (SenseKey::Miscompare, 0x1D, Some(700)));
        // BYTCHK 11b: one block compared with each.
        assert_eq!(exec_out(&t, &mut n, &cdb10(op::VERIFY_10, 0x06, 4, 2), 0, &[0x5A; 512]), Disposition::Good);
        let s = sense(exec_out(&t, &mut n, &cdb10(op::VERIFY_10, 0x06, 5, 2), 0, &[0x5A; 512]));
        assert_eq!(s.info, Some(512), "block 6 is zero");
    }

    #[test]
    fn write_same_writes_the_pattern() {
        let (t, mut n) = setup();
        let pat: Vec<u8> = (0..512u32).map(|i| i as u8).collect();
        assert_eq!(exec_out(&t, &mut n, &cdb10(op::WRITE_SAME_10, 0, 3, 5), 0, &pat), Disposition::Good);
        let m = medium(&t, 2, 7);
        assert!(m[..512].iter().all(|&b| b == 0));
        for blk in m[512..3072].chunks(512) {
            assert_eq!(blk, &pat[..]);
        }
        assert!(m[3072..].iter().all(|&b| b == 0));
        // 0 blocks: to the end of the medium.
        assert_eq!(exec_out(&t, &mut n, &cdb16(op::WRITE_SAME_16, 0, BLOCKS - 2, 0), 0, &pat), Disposition::Good);
        assert_eq!(medium(&t, BLOCKS - 2, 2), [pat.clone(), pat.clone()].concat());
        // UNMAP deallocates whatever the pattern: the blocks read back as zeroes (LBPRZ).
        fill(&t, 20, &pat);
        assert_eq!(exec_out(&t, &mut n, &cdb16(op::WRITE_SAME_16, 0x08, 20, 1), 0, &pat), Disposition::Good);
        assert!(medium(&t, 20, 1).iter().all(|&b| b == 0));
    }

    #[test]
    fn write_same_unmaps_zeroes_and_ndob() {
        let (t, mut n) = setup();
        fill(&t, 0, &[0xFF; 8192]);
        assert_eq!(exec_out(&t, &mut n, &cdb10(op::WRITE_SAME_10, 0x08, 1, 2), 0, &[0; 512]), Disposition::Good);
        let m = medium(&t, 0, 4);
        assert!(m[..512].iter().all(|&b| b == 0xFF));
        assert!(m[512..1536].iter().all(|&b| b == 0));
        assert!(m[1536..].iter().all(|&b| b == 0xFF));
        // NDOB: no Data-Out at all.
        assert_eq!(run(&t, &mut n, &cdb16(op::WRITE_SAME_16, 0x09, 5, 3), 0), Disposition::Good);
        assert!(medium(&t, 5, 3).iter().all(|&b| b == 0));
        assert!(medium(&t, 8, 1).iter().all(|&b| b == 0xFF));
        assert_eq!(run(&t, &mut n, &cdb16(op::WRITE_SAME_16, 0x01, 8, 1), 0), Disposition::Good);
        assert!(medium(&t, 8, 1).iter().all(|&b| b == 0));
    }

    #[test]
    fn write_same_checks() {
        let (t, mut n) = setup();
        let ws16 = |flags, lba, len| cdb16(op::WRITE_SAME_16, flags, lba, len);
        let r =
            |cdb: &[u8], lun, exp| execute(&req_len(cdb, lun, exp), &t, &mut Nexus::new_past_power_on(), &mut [0; 64]);
        assert_eq!(check(exec_out(&t, &mut n, &ws16(0, BLOCKS - 1, 2), 0, &[0; 512])), OOB);
        assert_eq!(check(exec_out(&t, &mut n, &ws16(0, BLOCKS + 1, 0), 0, &[0; 512])), OOB);
        assert_eq!(check(exec_out(&t, &mut n, &ws16(0, 1 << 63, 0), 0, &[0; 512])), OOB);
        assert_eq!(check(exec_out(&t, &mut n, &ws16(0, u64::MAX, 0), 0, &[0; 512])), OOB);
        assert_eq!(check(exec_out(&t, &mut n, &ws16(0x08, 0, 1), 1, &[0; 512])), WP);
        assert_eq!(sense(exec_out(&t, &mut n, &ws16(0x10, 0, 1), 0, &[0; 512])).specific, Some([0x4C, 0, 1]));
        assert_eq!(sense(exec_out(&t, &mut n, &ws16(0x18, 0, 1), 0, &[0; 512])).specific, Some([0x4C, 0, 1]));
        assert_eq!(sense(exec_out(&t, &mut n, &ws16(0x20, 0, 1), 0, &[0; 512])).asc, 0x24);
        assert_eq!(
            sense(exec_out(&t, &mut n, &ws16(0, 0, MAX_WRITE_SAME_BLOCKS as u32 + 1), 0, &[0; 512])).specific,
            Some([0x4F, 0, 10])
        );
        // The Data-Out must be exactly one block.
        assert_eq!(sense(r(&ws16(0, 0, 1), 0, 256)).asc, 0x24);
        assert_eq!(sense(r(&ws16(0, 0, 1), 0, 1024)).asc, 0x24);
        assert_eq!(sense(r(&cdb10(op::WRITE_SAME_10, 0, 0, 1), 0, 0)).asc, 0x24);
        assert_eq!(r(&ws16(0, 0, 1), 0, 512), Disposition::DataOut { len: 512 });
    }

    fn req_len(cdb: &[u8], lun: u64, expected_len: u32) -> crate::scsi::Request<'_> {
        crate::scsi::Request { cdb, lun: Some(lun), expected_len, read: false, write: true }
    }

    impl Nexus {
        fn new_past_power_on() -> Self {
            let mut n = Nexus::new();
            n.take(0);
            n.take(1);
            n
        }
    }

    fn unmap_list(descs: &[(u64, u32)]) -> Vec<u8> {
        let len = 8 + 16 * descs.len();
        let mut v = vec![0u8; len];
        cdb::put16(&mut v, 0, (len - 2) as u16);
        cdb::put16(&mut v, 2, (16 * descs.len()) as u16);
        for (i, &(lba, n)) in descs.iter().enumerate() {
            cdb::put64(&mut v, 8 + 16 * i, lba);
            cdb::put32(&mut v, 16 + 16 * i, n);
        }
        v
    }

    fn unmap_cdb(len: usize) -> [u8; 10] {
        cdb10(op::UNMAP, 0, 0, len as u16)
    }

    #[test]
    fn unmap_discards_ranges() {
        let (t, mut n) = setup();
        fill(&t, 0, &[0xEE; 16 * 512]);
        let list = unmap_list(&[(1, 2), (6, 1), (9, 0)]);
        assert_eq!(exec_out(&t, &mut n, &unmap_cdb(list.len()), 0, &list), Disposition::Good);
        let m = medium(&t, 0, 10);
        let zero = |b: usize| m[b * 512..(b + 1) * 512].iter().all(|&x| x == 0);
        assert_eq!(
            (0..10).map(zero).collect::<Vec<_>>(),
            [false, true, true, false, false, false, true, false, false, false]
        );
        // No descriptors, and no parameter list at all.
        let list = unmap_list(&[]);
        assert_eq!(exec_out(&t, &mut n, &unmap_cdb(list.len()), 0, &list), Disposition::Good);
        assert_eq!(run(&t, &mut n, &unmap_cdb(0), 0), Disposition::Good);
    }

    #[test]
    fn unmap_checks() {
        let (t, mut n) = setup();
        fill(&t, 0, &[0xEE; 512]);
        // One bad descriptor: nothing is discarded.
        let list = unmap_list(&[(0, 1), (BLOCKS - 1, 2)]);
        assert_eq!(check(exec_out(&t, &mut n, &unmap_cdb(list.len()), 0, &list)), OOB);
        assert!(medium(&t, 0, 1).iter().all(|&b| b == 0xEE));
        let list = unmap_list(&[(0, 1)]);
        assert_eq!(check(exec_out(&t, &mut n, &unmap_cdb(list.len()), 1, &list)), WP);
        assert_eq!(sense(exec_out(&t, &mut n, &cdb10(op::UNMAP, 1, 0, 24), 0, &list)).specific, Some([0x48, 0, 1]));
        assert_eq!(check(exec_out(&t, &mut n, &unmap_cdb(4), 0, &list[..4])), (SenseKey::IllegalRequest, 0x1A, 0));
        let many: Vec<(u64, u32)> = (0..=MAX_UNMAP_DESCRIPTORS as u64).map(|i| (i, 0)).collect();
        let list = unmap_list(&many);
        assert_eq!(sense(exec_out(&t, &mut n, &unmap_cdb(list.len()), 0, &list)).asc, 0x26);
    }

    #[test]
    fn compare_and_write() {
        let (t, mut n) = setup();
        fill(&t, 7, &[b'A'; 1024]);
        let caw = |lba, nlb: u8| {
            let mut c = cdb16(op::COMPARE_AND_WRITE, 0, lba, 0);
            c[13] = nlb;
            c
        };
        let mut data = [vec![b'A'; 1024], vec![b'B'; 1024]].concat();
        data[1000] = b'C';
        let s = sense(exec_out(&t, &mut n, &caw(7, 2), 0, &data));
        assert_eq!((s.key, s.asc, s.ascq, s.info), (SenseKey::Miscompare, 0x1D, 0, Some(1000)));
        assert!(medium(&t, 7, 2).iter().all(|&b| b == b'A'));
        data[1000] = b'A';
        assert_eq!(exec_out(&t, &mut n, &caw(7, 2), 0, &data), Disposition::Good);
        assert!(medium(&t, 7, 2).iter().all(|&b| b == b'B'));

        assert_eq!(run(&t, &mut n, &caw(0, 0), 0), Disposition::Good);
        // 0 blocks with Data-Out (256 blocks wrapped into the one-byte field): rejected.
        let mut nx = Nexus::new_past_power_on();
        let s = sense(execute(&req_len(&caw(0, 0), 0, 2 * 256 * 512), &t, &mut nx, &mut [0; 64]));
        assert_eq!(s.specific, Some([0x4F, 0, 13]));
        assert_eq!(check(exec_out(&t, &mut n, &caw(BLOCKS - 1, 2), 0, &[0; 2048])), OOB);
        assert_eq!(check(exec_out(&t, &mut n, &caw(0, 1), 1, &[0; 1024])), WP);
        let s = sense(exec_out(&t, &mut n, &caw(0, MAX_CAW_BLOCKS + 1), 0, &[0; 1024]));
        assert_eq!(s.specific, Some([0x4F, 0, 13]));
        // Wrong Data-Out size.
        let c = caw(0, 4);
        let mut nx = Nexus::new_past_power_on();
        assert_eq!(sense(execute(&req_len(&c, 0, 3 * 512), &t, &mut nx, &mut [0; 64])).asc, 0x24);
        assert_eq!(sense(execute(&req_len(&c, 0, 16 * 512), &t, &mut nx, &mut [0; 64])).asc, 0x24);
    }

    #[test]
    fn orwrite() {
        let (t, mut n) = setup();
        fill(&t, 3, &[0x0F; 512]);
        assert_eq!(exec_out(&t, &mut n, &cdb16(op::ORWRITE_16, 0, 3, 1), 0, &[0xA0; 512]), Disposition::Good);
        assert!(medium(&t, 3, 1).iter().all(|&b| b == 0xAF));
        assert_eq!(run(&t, &mut n, &cdb16(op::ORWRITE_16, 0, 3, 0), 0), Disposition::Good);
        assert_eq!(check(exec_out(&t, &mut n, &cdb16(op::ORWRITE_16, 0, BLOCKS, 1), 0, &[0; 512])), OOB);
        assert_eq!(check(exec_out(&t, &mut n, &cdb16(op::ORWRITE_16, 0, 0, 1), 1, &[0; 512])), WP);
        assert_eq!(sense(exec_out(&t, &mut n, &cdb16(op::ORWRITE_16, 0x20, 0, 1), 0, &[0; 512])).asc, 0x24);
    }

    #[test]
    fn write_atomic_writes_all_or_refuses() {
        let (t, mut n) = setup();
        let wa = |flags, lba, blocks: u16| {
            let mut c = cdb16(op::WRITE_ATOMIC_16, flags, lba, 0);
            cdb::put16(&mut c, 12, blocks);
            c
        };
        assert_eq!(exec_out(&t, &mut n, &wa(0x18, 4, 3), 0, &[0x6B; 1536]), Disposition::Good);
        assert!(medium(&t, 4, 3).iter().all(|&b| b == 0x6B));
        assert!(medium(&t, 3, 1).iter().all(|&b| b == 0) && medium(&t, 7, 1).iter().all(|&b| b == 0));
        assert_eq!(run(&t, &mut n, &wa(0, 0, 0), 0), Disposition::Good);
        assert_eq!(check(run(&t, &mut n, &wa(0, BLOCKS + 1, 0), 0)), OOB);
        assert_eq!(check(run(&t, &mut n, &wa(0, u64::MAX, 1), 0)), OOB);
        assert_eq!(check(exec_out(&t, &mut n, &wa(0, BLOCKS - 1, 2), 0, &[0; 1024])), OOB);
        assert_eq!(check(exec_out(&t, &mut n, &wa(0, 0, 1), 1, &[0; 512])), WP);
        assert_eq!(sense(run(&t, &mut n, &wa(0x20, 0, 1), 0)).specific, Some([0x4F, 0, 1]));
        let too_long = MAX_ATOMIC_BLOCKS as u16 + 1;
        assert_eq!(sense(run(&t, &mut n, &wa(0, 0, too_long), 0)).specific, Some([0x4F, 0, 12]));
    }

    #[test]
    fn verify_bytchk_0_reads_the_range() {
        let (t, mut n) = setup();
        assert_eq!(run(&t, &mut n, &cdb16(op::VERIFY_16, 0, 0, BLOCKS as u32), 0), Disposition::Good);
        assert_eq!(run(&t, &mut n, &cdb10(op::VERIFY_10, 0, BLOCKS as u32 - 1, 1), 0), Disposition::Good);
        assert_eq!(check(run(&t, &mut n, &cdb10(op::VERIFY_10, 0, BLOCKS as u32 - 1, 2), 0)), OOB);
    }
}
