//! Placeholder with the agreed interface; replaced by the real negotiation.
use std::sync::Arc;
pub struct LoginConfig {
    pub target_name: String,
    pub target_alias: Option<String>,
    pub portal_group_tag: u16,
    pub addresses: Vec<String>,
    pub max_recv_data_segment_length: u32,
    pub max_burst_length: u32,
    pub first_burst_length: u32,
    pub max_outstanding_r2t: u32,
    pub immediate_data: bool,
    pub initial_r2t: bool,
    pub header_digest: bool,
    pub data_digest: bool,
    pub max_connections: u32,
    pub error_recovery_level: u32,
}
impl Default for LoginConfig {
    fn default() -> Self {
        todo!()
    }
}
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum SessionType {
    Normal,
    Discovery,
}
#[derive(Clone, Debug)]
pub struct Negotiated {
    pub session_type: SessionType,
    pub initiator_name: String,
    pub initiator_alias: Option<String>,
    pub target_name: Option<String>,
    pub header_digest: bool,
    pub data_digest: bool,
    pub max_recv_data_segment_length: u32,
    pub max_xmit_data_segment_length: u32,
    pub max_burst_length: u32,
    pub first_burst_length: u32,
    pub immediate_data: bool,
    pub initial_r2t: bool,
    pub max_outstanding_r2t: u32,
    pub data_pdu_in_order: bool,
    pub data_sequence_in_order: bool,
    pub default_time2wait: u32,
    pub default_time2retain: u32,
    pub error_recovery_level: u32,
    pub max_connections: u32,
    pub ifmarker: bool,
    pub ofmarker: bool,
}
pub struct LoginRequest<'a> {
    pub transit: bool,
    pub cont: bool,
    pub csg: u8,
    pub nsg: u8,
    pub version_max: u8,
    pub version_min: u8,
    pub isid: [u8; 6],
    pub tsih: u16,
    pub itt: u32,
    pub cid: u16,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
    pub data: &'a [u8],
}
pub struct LoginResponse {
    pub transit: bool,
    pub cont: bool,
    pub csg: u8,
    pub nsg: u8,
    pub status_class: u8,
    pub status_detail: u8,
    pub data: Vec<u8>,
}
pub enum LoginOutcome {
    Continue,
    FullFeature,
    Failed,
}
pub struct Login {
    n: Option<Negotiated>,
}
impl Login {
    pub fn new(_cfg: Arc<LoginConfig>) -> Self {
        todo!()
    }
    pub fn step(&mut self, _req: &LoginRequest) -> (LoginResponse, LoginOutcome) {
        todo!()
    }
    pub fn negotiated(&self) -> &Negotiated {
        self.n.as_ref().unwrap()
    }
}
