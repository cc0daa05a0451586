//! The iSCSI engine's protocol logic, free of rings and sockets so it can be unit-tested as
//! plain data. First piece: Data-Out acceptance ([`dataout`]).

pub mod dataout;
pub mod order;
