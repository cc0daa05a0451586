//! Placeholder (interface only).
use crate::backing::{Backing, BackingKind};
use std::path::PathBuf;
#[derive(Debug, thiserror::Error)]
#[error("config")]
pub struct ConfigError;
pub struct Config {
    pub luns: Vec<LunConfig>,
    pub port: u16,
    pub poll_mode: crate::reactor::PollMode,
    pub remove_created_on_close: bool,
}
pub struct LunConfig {
    pub name: String,
    pub lun_id: Option<u64>,
    pub read_only: bool,
    pub backing: BackingKind,
}
impl Config {
    pub fn validate(&self) -> Result<(), ConfigError> {
        todo!()
    }
    pub fn target_iqn(&self) -> String {
        todo!()
    }
    pub fn resolve_host(&self) -> String {
        todo!()
    }
    pub fn reactor_cpus(&self) -> Vec<usize> {
        todo!()
    }
}
pub fn open_lun_backing(_c: &Config, _l: &LunConfig) -> Result<(Backing, Option<PathBuf>), ConfigError> {
    todo!()
}
pub fn remove_created_images(_c: &Config) {}
