//! iSCSI (RFC 7143): PDUs, text keys, login negotiation, digests.

pub mod acl;
pub mod chap;
pub mod digest;
pub mod login;
pub mod pdu;
pub mod text;
pub mod trace;
