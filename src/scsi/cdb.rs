//! CDB decoding. Placeholder: the SCSI work replaces this file.
