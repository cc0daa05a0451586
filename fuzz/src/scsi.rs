//! The `scsi` target: the CDB decoder and [`uringtgt::scsi::execute`] (then
//! [`uringtgt::scsi::execute_data_out`] for commands with a parameter list) on RAM LUNs, for
//! a sequence of commands from one I_T nexus. Reads and writes the execution hands back are
//! carried out on the RAM store, as the transport would.
//!
//! Input: `record*`, each `lun, flags, edtl (u32), cdb chunk, data chunk`. `flags` bit 0: R,
//! bit 1: W, bit 2: a LUN table change (unit attention) before the command, bit 3: descriptor
//! sense. The CDB is cut to 32 bytes (the longest an extended-CDB AHS brings); the data chunk
//! is the Data-Out, zero-extended or cut to what the command asks for.
//!
//! Checked: Data-In fits the scratch buffer, reads and writes stay inside the LUN, a parameter
//! list asked for is within the transport's 16 MiB buffer limit, sense encodes.

use crate::{put_chunk, Cursor};
use std::sync::Arc;
use uringtgt::backing::Backing;
use uringtgt::scsi::{self, Disposition, Lun, LunTable, Nexus, Request};

/// The reactor's Data-In scratch size.
const SCRATCH: usize = 256 * 1024;
/// The largest transfer the transport buffers (`BufPool`'s MAX_BUF).
const MAX_BUF: u32 = 16 << 20;
/// Extended CDBs longer than this are refused by the transport (task.rs MAX_CDB).
const MAX_CDB: usize = 32;

pub fn record(out: &mut Vec<u8>, lun: u8, flags: u8, edtl: u32, cdb: &[u8], data: &[u8]) {
    out.extend_from_slice(&[lun, flags]);
    out.extend_from_slice(&edtl.to_be_bytes());
    put_chunk(out, cdb);
    put_chunk(out, data);
}

fn luns() -> LunTable {
    let lun = |id, blocks: u64, ro| {
        Arc::new(Lun::new(id, &format!("ram{id}"), None, Backing::new_mem(blocks * 512).unwrap(), ro, crate::TARGET))
    };
    LunTable::new(vec![lun(0, 2048, false), lun(1, 128, true), lun(5, 16, false)])
}

pub fn run(input: &[u8]) {
    let table = luns();
    let mut nexus = Nexus::new();
    nexus.set_identity("iqn.2004-10.com.ubuntu:01:fuzz", [0x40, 0, 1, 0x37, 0, 0]);
    let mut scratch = vec![0u8; SCRATCH];
    let mut c = Cursor::new(input);
    while !c.is_empty() {
        let lun_byte = c.u8();
        let flags = c.u8();
        let edtl = c.u32();
        let cdb = c.chunk();
        let cdb = &cdb[..cdb.len().min(MAX_CDB)];
        let data = c.chunk();
        if flags & 4 != 0 {
            nexus.luns_changed();
        }
        if let Some(l) = table.iter().next() {
            l.d_sense.store(flags & 8 != 0, std::sync::atomic::Ordering::Relaxed);
        }
        let req = Request {
            cdb,
            lun: if lun_byte == 0xFF { None } else { Some(u64::from(lun_byte & 7)) },
            expected_len: edtl,
            read: flags & 1 != 0,
            write: flags & 2 != 0,
        };
        let lun = req.lun.and_then(|id| table.get(id)).cloned();
        let d = scsi::execute(&req, &table, &mut nexus, &mut scratch);
        check(&d, lun.as_deref(), &mut scratch, data);
        if let Disposition::Offload { .. } = d {
            offloaded(&req, lun.as_deref(), &[], &mut scratch, data);
        }
        if let Disposition::DataOut { len } = d {
            assert!(len <= MAX_BUF, "a parameter list of {len} bytes");
            let n = len.min(edtl) as usize;
            let mut out = data[..data.len().min(n)].to_vec();
            out.resize(n, 0);
            let d2 = scsi::execute_data_out(&req, &table, &mut nexus, &out, &mut scratch);
            assert!(!matches!(d2, Disposition::DataOut { .. }), "Data-Out asked twice");
            check(&d2, lun.as_deref(), &mut scratch, data);
            if let Disposition::Offload { .. } = d2 {
                offloaded(&req, lun.as_deref(), &out, &mut scratch, data);
            }
        }
    }
}

/// The work of a command the reactor would hand to the offload pool, run inline.
fn offloaded(req: &Request, lun: Option<&Lun>, out: &[u8], scratch: &mut [u8], data: &[u8]) {
    let lun = lun.expect("offloaded work runs on a LUN");
    let d = scsi::execute_offloaded(req, lun, out, scratch);
    assert!(!matches!(d, Disposition::Offload { .. } | Disposition::DataOut { .. }), "offloaded work asked again");
    check(&d, Some(lun), scratch, data);
}

fn check(d: &Disposition, lun: Option<&Lun>, scratch: &mut [u8], data: &[u8]) {
    match *d {
        Disposition::DataIn(n) => assert!(n <= scratch.len()),
        Disposition::Read { offset, len } => {
            let lun = lun.expect("a read from a LUN");
            assert!(offset.checked_add(u64::from(len)).is_some_and(|e| e <= lun.size_bytes()), "read past the end");
            assert!(len <= MAX_BUF, "read of {len} bytes");
            let mut buf = vec![0u8; len as usize];
            lun.backing.read_at(&mut buf, offset).expect("RAM read");
        }
        Disposition::Write { offset, len, .. } => {
            let lun = lun.expect("a write to a LUN");
            assert!(!lun.read_only, "a write to a read-only LUN");
            assert!(offset.checked_add(u64::from(len)).is_some_and(|e| e <= lun.size_bytes()), "write past the end");
            assert!(len <= MAX_BUF, "write of {len} bytes");
            let mut buf = data[..data.len().min(len as usize)].to_vec();
            buf.resize(len as usize, 0);
            lun.backing.write_at(&buf, offset, false).expect("RAM write");
        }
        Disposition::Check(ref sense) => {
            let mut out = [0u8; 252];
            let n = sense.encode(false, &mut out);
            assert!(n <= out.len());
            let n = sense.encode(true, &mut out);
            assert!(n <= out.len());
        }
        Disposition::Offload { lock } => {
            let lun = lun.expect("offloaded work runs on a LUN");
            if let Some(r) = lock {
                assert!(r.start <= r.end && r.end <= lun.num_blocks(), "range lock past the end");
            }
        }
        Disposition::Good
        | Disposition::Flush
        | Disposition::Status(_)
        | Disposition::DataOut { .. }
        | Disposition::AbortNexuses(_) => {}
    }
}
