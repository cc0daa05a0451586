//! Command execution. Placeholder: the SCSI work replaces this file.
use super::{Disposition, LunTable, Nexus, Request, Sense};

pub fn execute(req: &Request, table: &LunTable, nexus: &mut Nexus, data_in: &mut [u8]) -> Disposition {
    let _ = (req, table, nexus, data_in);
    Disposition::Check(Sense::invalid_opcode())
}

pub fn execute_data_out(
    req: &Request,
    table: &LunTable,
    nexus: &mut Nexus,
    data_out: &[u8],
    data_in: &mut [u8],
) -> Disposition {
    let _ = (req, table, nexus, data_out, data_in);
    Disposition::Check(Sense::invalid_opcode())
}
