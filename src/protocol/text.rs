//! Placeholder.
use crate::protocol::login::SessionType;
#[derive(Debug, thiserror::Error)]
#[error("text")]
pub struct TextError;
pub struct TextExchange;
impl TextExchange {
    pub fn new(_t: SessionType) -> Self {
        todo!()
    }
    pub fn request(
        &mut self,
        _c: bool,
        _f: bool,
        _ttt: u32,
        _d: &[u8],
        _max: usize,
    ) -> Result<(Vec<u8>, bool), TextError> {
        todo!()
    }
}
