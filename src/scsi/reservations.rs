//! Reservations of one LUN: persistent reservations (SPC-4 5.13) and SPC-2 RESERVE / RELEASE.
//!
//! The state is shared by every session on every reactor, behind a mutex; the hot path only
//! reads [`Reservations::active`], a flag that is set while some reservation exists (mere
//! registrations never make a command conflict).
//!
//! Persist through power loss (APTPL, SPC-4 5.13.5): a LUN over an image file keeps its
//! registrations and reservation in a sidecar beside the image, `.<image file name>.pr`, while
//! the last REGISTER that changed them had APTPL set. The file is loaded when the LUN is built
//! ([`Reservations::open`]) and rewritten atomically after every change, on a worker thread
//! ([`Reservations::persist`]): a reactor only changes the state in memory.

use super::nexus::{ua, Inbox};
use super::{Disposition, Sense, SenseKey};
use serde::{Deserialize, Serialize};
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};

/// Persistent reservation types (SPC-4 table 212).
pub mod pr_type {
    pub const WRITE_EXCLUSIVE: u8 = 1;
    pub const EXCLUSIVE_ACCESS: u8 = 3;
    pub const WE_REGISTRANTS_ONLY: u8 = 5;
    pub const EA_REGISTRANTS_ONLY: u8 = 6;
    pub const WE_ALL_REGISTRANTS: u8 = 7;
    pub const EA_ALL_REGISTRANTS: u8 = 8;
}

/// PERSISTENT RESERVE OUT service actions.
pub mod out_sa {
    pub const REGISTER: u8 = 0;
    pub const RESERVE: u8 = 1;
    pub const RELEASE: u8 = 2;
    pub const CLEAR: u8 = 3;
    pub const PREEMPT: u8 = 4;
    pub const PREEMPT_AND_ABORT: u8 = 5;
    pub const REGISTER_AND_IGNORE: u8 = 6;
}

/// Why a reservation command failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrError {
    /// RESERVATION CONFLICT status.
    #[error("reservation conflict")]
    Conflict,
    /// CHECK CONDITION with this sense data.
    #[error("check condition: {0:?}")]
    Check(Sense),
}

/// Why the APTPL sidecar could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("{path}: cannot {op}: {source}")]
    Io { path: PathBuf, op: &'static str, source: io::Error },
    #[error("{path}: not a persistent reservation file of this version: {why}")]
    Corrupt { path: PathBuf, why: String },
    #[error("{path}: written for an earlier image file of that name (inode {was}, now {now})")]
    Stale { path: PathBuf, was: u64, now: u64 },
}

/// How a command is affected by reservations (SPC-4 table 61, SBC-3 table 13).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Never conflicts (INQUIRY, REPORT LUNS, PERSISTENT RESERVE IN...).
    Always,
    /// Reads the medium or device state: conflicts with Exclusive Access types.
    Read,
    /// Changes the medium or device state: conflicts with every type.
    Write,
    /// PERSISTENT RESERVE OUT: checked by its own rules, but blocked by SPC-2 reservations.
    ReserveOut,
    /// RESERVE / RELEASE (6/10): conflict while persistent reservations are in use.
    Legacy,
}

/// Unit attentions a reservation change owes other initiator ports.
pub type Notices = Vec<(Arc<str>, (u8, u8))>;

#[derive(Debug, Clone)]
struct Registration {
    key: u64,
    who: Arc<str>,
}

#[derive(Debug, Clone)]
struct Reservation {
    /// The holder; for the all-registrants types every registrant holds it.
    who: Arc<str>,
    ty: u8,
}

#[derive(Debug)]
struct Legacy {
    who: Arc<str>,
    /// The holding session: the reservation ends with it (I_T nexus loss).
    session: Weak<Inbox>,
}

/// Reservation state of a LUN.
#[derive(Debug, Default)]
pub struct PrState {
    generation: u32,
    regs: Vec<Registration>,
    res: Option<Reservation>,
    legacy: Option<Legacy>,
    /// The LUN can persist through power loss (PTPL_C): it has an image file to keep a
    /// sidecar beside.
    ptpl_capable: bool,
    /// The last REGISTER that changed a registration had APTPL set (PTPL_A).
    aptpl: bool,
    /// Bumped by every change the sidecar must follow; [`Reservations::persist`] writes the
    /// state as of its latest value.
    seq: u64,
}

fn valid_type(ty: u8) -> bool {
    matches!(ty, 1 | 3 | 5..=8)
}

fn all_registrants(ty: u8) -> bool {
    matches!(ty, pr_type::WE_ALL_REGISTRANTS | pr_type::EA_ALL_REGISTRANTS)
}

fn registrants_only(ty: u8) -> bool {
    matches!(ty, pr_type::WE_REGISTRANTS_ONLY | pr_type::EA_REGISTRANTS_ONLY)
}

/// Parameter list of PERSISTENT RESERVE OUT (the basic 24-byte form).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutParams {
    pub key: u64,
    pub sa_key: u64,
    pub aptpl: bool,
}

impl PrState {
    fn key_of(&self, who: &str) -> Option<u64> {
        self.regs.iter().find(|r| &*r.who == who).map(|r| r.key)
    }

    fn holds(&self, who: &str) -> bool {
        match &self.res {
            Some(r) if all_registrants(r.ty) => self.key_of(who).is_some(),
            Some(r) => &*r.who == who,
            None => false,
        }
    }

    fn legacy_holder(&self) -> Option<&Arc<str>> {
        self.legacy.as_ref().filter(|l| l.session.strong_count() > 0).map(|l| &l.who)
    }

    /// Whether a command of class `access` from `who` conflicts with the reservations.
    pub fn conflicts(&self, who: &str, access: Access) -> bool {
        if let Some(h) = self.legacy_holder() {
            // RESERVE from others is refused by `legacy_reserve`; their RELEASE is a no-op.
            if &**h != who && !matches!(access, Access::Always | Access::Legacy) {
                return true;
            }
        }
        if access == Access::Legacy {
            return !self.regs.is_empty();
        }
        let Some(r) = &self.res else { return false };
        let (writes, reads) = (access == Access::Write, access == Access::Read);
        if !writes && !reads {
            return false;
        }
        let exclusive_access = matches!(r.ty, 3 | 6 | 8);
        if !writes && !exclusive_access {
            return false;
        }
        let allowed = match r.ty {
            pr_type::WRITE_EXCLUSIVE | pr_type::EXCLUSIVE_ACCESS => &*r.who == who,
            _ => self.key_of(who).is_some(),
        };
        !allowed
    }

    /// Removes `who`'s registration, with what that does to the reservation (SPC-4 5.13.11.3).
    fn unregister(&mut self, who: &str, notices: &mut Notices) {
        let held = self.holds(who);
        self.regs.retain(|r| &*r.who != who);
        let Some(r) = &self.res else { return };
        if all_registrants(r.ty) {
            if self.regs.is_empty() {
                self.res = None;
            }
        } else if held {
            if registrants_only(r.ty) {
                for reg in &self.regs {
                    notices.push((reg.who.clone(), ua::RESERVATIONS_RELEASED));
                }
            }
            self.res = None;
        }
    }

    /// Removes every registration with `key` except `me`'s; true if there was one.
    fn remove_key(&mut self, key: u64, me: &str, notices: &mut Notices) -> bool {
        let before = self.regs.len();
        let mut removed = Vec::new();
        self.regs.retain(|r| {
            let drop = r.key == key && &*r.who != me;
            if drop {
                removed.push(r.who.clone());
            }
            !drop
        });
        let any = self.regs.len() != before || self.key_of(me) == Some(key);
        for who in removed {
            notices.push((who, ua::REGISTRATIONS_PREEMPTED));
        }
        any
    }

    /// PERSISTENT RESERVE OUT from `me`; returns the unit attentions it owes others.
    pub fn out(&mut self, me: &Arc<str>, sa: u8, scope_type: u8, p: &OutParams) -> Result<Notices, PrError> {
        let mut notices = Vec::new();
        let mine = self.key_of(me);
        if matches!(sa, out_sa::REGISTER | out_sa::REGISTER_AND_IGNORE) {
            if p.aptpl && !self.ptpl_capable {
                // No image to keep them beside (a RAM or block device LUN): PTPL_C = 0.
                return Err(PrError::Check(Sense::invalid_field_in_param_list(20, 0)));
            }
            if sa == out_sa::REGISTER && p.key != mine.unwrap_or(0) {
                return Err(PrError::Conflict);
            }
            match (mine, p.sa_key) {
                (None, 0) => return Ok(notices),
                (None, key) => self.regs.push(Registration { key, who: me.clone() }),
                (Some(_), 0) => self.unregister(me, &mut notices),
                (Some(_), key) => self.regs.iter_mut().filter(|r| r.who == *me).for_each(|r| r.key = key),
            }
            // SPC-4 6.16.3: the APTPL bit of the last REGISTER that changed something rules.
            self.aptpl = p.aptpl;
            self.generation = self.generation.wrapping_add(1);
            return Ok(notices);
        }
        if !matches!(
            sa,
            out_sa::RESERVE | out_sa::RELEASE | out_sa::CLEAR | out_sa::PREEMPT | out_sa::PREEMPT_AND_ABORT
        ) {
            // REGISTER AND MOVE and reserved service actions.
            return Err(PrError::Check(Sense::invalid_field_in_cdb(1, 4)));
        }
        let (scope, ty) = (scope_type >> 4, scope_type & 0x0F);
        if mine.is_none() || mine != Some(p.key) {
            return Err(PrError::Conflict);
        }
        let type_check = || {
            if scope != 0 {
                Err(PrError::Check(Sense::invalid_field_in_cdb(2, 7)))
            } else if !valid_type(ty) {
                Err(PrError::Check(Sense::invalid_field_in_cdb(2, 3)))
            } else {
                Ok(())
            }
        };
        match sa {
            out_sa::RESERVE => {
                type_check()?;
                match &self.res {
                    Some(r) if self.holds(me) && r.ty == ty => {}
                    Some(_) => return Err(PrError::Conflict),
                    None => self.res = Some(Reservation { who: me.clone(), ty }),
                }
            }
            out_sa::RELEASE => {
                let Some(r) = &self.res else { return Ok(notices) };
                if !self.holds(me) {
                    return Ok(notices);
                }
                type_check()?;
                if r.ty != ty {
                    // INVALID RELEASE OF PERSISTENT RESERVATION.
                    return Err(PrError::Check(Sense::new(super::SenseKey::IllegalRequest, 0x26, 0x04)));
                }
                if registrants_only(r.ty) || all_registrants(r.ty) {
                    for reg in self.regs.iter().filter(|reg| reg.who != *me) {
                        notices.push((reg.who.clone(), ua::RESERVATIONS_RELEASED));
                    }
                }
                self.res = None;
            }
            out_sa::CLEAR => {
                for reg in self.regs.iter().filter(|reg| reg.who != *me) {
                    notices.push((reg.who.clone(), ua::RESERVATIONS_PREEMPTED));
                }
                self.regs.clear();
                self.res = None;
                // Nothing is left to persist; as LIO does, CLEAR also ends APTPL.
                self.aptpl = false;
                self.generation = self.generation.wrapping_add(1);
            }
            _ => self.preempt(me, ty, p.sa_key, type_check, &mut notices)?,
        }
        Ok(notices)
    }

    /// PREEMPT (and PREEMPT AND ABORT, whose task aborts are left to the initiator's retries).
    fn preempt(
        &mut self,
        me: &Arc<str>,
        ty: u8,
        sa_key: u64,
        type_check: impl Fn() -> Result<(), PrError>,
        notices: &mut Notices,
    ) -> Result<(), PrError> {
        let res = self.res.clone();
        match res {
            Some(r) if all_registrants(r.ty) && sa_key == 0 => {
                type_check()?;
                let others: Vec<u64> = self.regs.iter().filter(|reg| reg.who != *me).map(|reg| reg.key).collect();
                for key in others {
                    self.remove_key(key, me, notices);
                }
                self.res = Some(Reservation { who: me.clone(), ty });
            }
            Some(r) if !all_registrants(r.ty) && self.key_of(&r.who) == Some(sa_key) => {
                type_check()?;
                self.remove_key(sa_key, me, notices);
                if r.ty != ty {
                    for reg in self.regs.iter().filter(|reg| reg.who != *me) {
                        if !notices.iter().any(|(w, _)| *w == reg.who) {
                            notices.push((reg.who.clone(), ua::RESERVATIONS_RELEASED));
                        }
                    }
                }
                self.res = Some(Reservation { who: me.clone(), ty });
            }
            _ => {
                if sa_key == 0 {
                    return Err(PrError::Check(Sense::invalid_field_in_param_list(8, 7)));
                }
                if !self.remove_key(sa_key, me, notices) {
                    return Err(PrError::Conflict);
                }
            }
        }
        self.generation = self.generation.wrapping_add(1);
        Ok(())
    }

    /// RESERVE(6/10) (SPC-2): conflicts checked by the caller with [`Access::Legacy`].
    pub fn legacy_reserve(&mut self, me: &Arc<Inbox>) -> Result<(), PrError> {
        match self.legacy_holder() {
            Some(h) if *h != me.identity => Err(PrError::Conflict),
            _ => {
                self.legacy = Some(Legacy { who: me.identity.clone(), session: Arc::downgrade(me) });
                Ok(())
            }
        }
    }

    /// RELEASE(6/10): only the holder's release ends the reservation.
    pub fn legacy_release(&mut self, me: &str) {
        if self.legacy_holder().is_some_and(|h| &**h == me) {
            self.legacy = None;
        }
    }

    fn active(&self) -> bool {
        self.res.is_some() || self.legacy_holder().is_some()
    }

    /// PERSISTENT RESERVE IN READ KEYS.
    pub fn read_keys(&self, buf: &mut [u8]) -> usize {
        self.header(buf, 8 * self.regs.len());
        let mut n = 8;
        for r in &self.regs {
            put(buf, n, &r.key.to_be_bytes());
            n += 8;
        }
        n
    }

    /// PERSISTENT RESERVE IN READ RESERVATION.
    pub fn read_reservation(&self, buf: &mut [u8]) -> usize {
        let Some(r) = &self.res else {
            self.header(buf, 0);
            return 8;
        };
        self.header(buf, 16);
        let key = if all_registrants(r.ty) { 0 } else { self.key_of(&r.who).unwrap_or(0) };
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&key.to_be_bytes());
        d[13] = r.ty;
        put(buf, 8, &d);
        24
    }

    /// PERSISTENT RESERVE IN READ FULL STATUS: one descriptor per registration, each with an
    /// iSCSI TransportID in the initiator port format.
    pub fn read_full_status(&self, buf: &mut [u8]) -> usize {
        let mut n = 8;
        for r in &self.regs {
            // TransportID: header, then the NUL-terminated name padded to a multiple of 4.
            let name_len = (r.who.len() + 1).div_ceil(4) * 4;
            let tid_len = 4 + name_len;
            let mut d = vec![0u8; 24 + tid_len];
            d[..8].copy_from_slice(&r.key.to_be_bytes());
            if self.holds(&r.who) {
                let ty = self.res.as_ref().map_or(0, |x| x.ty);
                d[12] = 0x01; // R_HOLDER
                d[13] = ty;
            }
            d[18..20].copy_from_slice(&1u16.to_be_bytes()); // RELATIVE TARGET PORT IDENTIFIER
            d[20..24].copy_from_slice(&(tid_len as u32).to_be_bytes());
            d[24] = 0x40 | 0x05; // FORMAT CODE 01b (initiator port), PROTOCOL IDENTIFIER iSCSI
            d[26..28].copy_from_slice(&(name_len as u16).to_be_bytes());
            d[28..28 + r.who.len()].copy_from_slice(r.who.as_bytes());
            put(buf, n, &d);
            n += d.len();
        }
        self.header(buf, n - 8);
        n
    }

    fn header(&self, buf: &mut [u8], additional: usize) {
        put(buf, 0, &self.generation.to_be_bytes());
        put(buf, 4, &(additional as u32).to_be_bytes());
    }

    /// PERSISTENT RESERVE IN REPORT CAPABILITIES: returns its length.
    pub fn report_capabilities(&self, buf: &mut [u8]) -> usize {
        report_capabilities(buf, self.ptpl_capable, self.aptpl)
    }

    /// Whether a change now must reach the sidecar: persistence is or was just in effect.
    pub fn persisting(&self) -> bool {
        self.ptpl_capable && self.aptpl
    }

    /// What the sidecar holds for this state, for the image file with inode `image_inode`:
    /// `None` when APTPL is off (no file).
    fn snapshot(&self, image_inode: u64) -> Option<Persisted> {
        if !self.aptpl {
            return None;
        }
        Some(Persisted {
            version: PERSIST_VERSION,
            image_inode,
            generation: self.generation,
            registrations: self
                .regs
                .iter()
                .map(|r| PersistedReg { key: r.key, initiator_port: r.who.to_string() })
                .collect(),
            reservation: self.res.as_ref().map(|r| PersistedRes { holder: r.who.to_string(), ty: r.ty }),
        })
    }

    /// The state a sidecar describes (APTPL on, as it was when written); checks that it is
    /// one this code could have produced.
    fn restore(p: Persisted, path: &Path) -> Result<PrState, PersistError> {
        let corrupt = |why: String| PersistError::Corrupt { path: path.to_owned(), why };
        if p.version != PERSIST_VERSION {
            return Err(corrupt(format!("version {}", p.version)));
        }
        let mut st = PrState { generation: p.generation, ptpl_capable: true, aptpl: true, ..Default::default() };
        for r in p.registrations {
            if r.key == 0 || r.initiator_port.is_empty() || st.key_of(&r.initiator_port).is_some() {
                return Err(corrupt(format!("bad registration {:?}", r.initiator_port)));
            }
            st.regs.push(Registration { key: r.key, who: r.initiator_port.into() });
        }
        if let Some(r) = p.reservation {
            if !valid_type(r.ty) || st.key_of(&r.holder).is_none() {
                return Err(corrupt(format!("bad reservation (type {}, holder {:?})", r.ty, r.holder)));
            }
            st.res = Some(Reservation { who: r.holder.into(), ty: r.ty });
        }
        Ok(st)
    }
}

/// Copies what fits of `data` to `buf[at..]`: the allocation length cuts the rest later.
fn put(buf: &mut [u8], at: usize, data: &[u8]) {
    if at < buf.len() {
        let n = data.len().min(buf.len() - at);
        buf[at..at + n].copy_from_slice(&data[..n]);
    }
}

/// Format version of the APTPL sidecar.
const PERSIST_VERSION: u32 = 1;

/// The APTPL sidecar's content (JSON): registrations by initiator port name (`iqn,i,0x<isid>`,
/// the I_T nexus identity reservations know a session by) and the reservation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Persisted {
    version: u32,
    /// The image file's inode: a sidecar left beside an earlier file of the same name (one
    /// deleted and created again, or replaced by an upload) does not describe this one.
    image_inode: u64,
    generation: u32,
    registrations: Vec<PersistedReg>,
    reservation: Option<PersistedRes>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PersistedReg {
    key: u64,
    initiator_port: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PersistedRes {
    holder: String,
    #[serde(rename = "type")]
    ty: u8,
}

/// The APTPL sidecar of the image at `image`: `.<file name>.pr` in the same directory.
pub fn sidecar_path(image: &Path) -> PathBuf {
    let name = image.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    image.with_file_name(format!(".{name}.pr"))
}

/// Removes the APTPL sidecar of `image`, if any (with the image it belongs to).
pub fn remove_sidecar(image: &Path) {
    let _ = fs::remove_file(sidecar_path(image));
}

/// Tells concurrent writers of one sidecar (an old and a new LUN over one image) apart.
static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// Replaces `path` with `text` so that a crash leaves the old file or the new one, whole:
/// temp file, fsync, rename, fsync of the directory.
fn write_atomic(path: &Path, text: &[u8]) -> Result<(), PersistError> {
    let err = |op: &'static str| move |source| PersistError::Io { path: path.to_owned(), op, source };
    let dir = path.parent().ok_or_else(|| err("find the directory of")(io::Error::other("no parent")))?;
    let n = TMP_SEQ.fetch_add(1, Ordering::Relaxed);
    let tmp = path.with_extension(format!("pr.tmp-{}-{n}", std::process::id()));
    let written = (|| {
        let mut f = fs::OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        f.write_all(text)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(err("write")(e));
    }
    fs::File::open(dir).and_then(|d| d.sync_all()).map_err(err("fsync the directory of"))
}

/// Removes `path` durably; a missing file is fine.
fn remove_durably(path: &Path) -> Result<(), PersistError> {
    let err = |op: &'static str| move |source| PersistError::Io { path: path.to_owned(), op, source };
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(err("remove")(e)),
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::File::open(dir).and_then(|d| d.sync_all()).map_err(err("fsync the directory of"))
}

/// Reads the sidecar of the image with inode `image_inode`: `Ok(None)` when there is none.
fn load(path: &Path, image_inode: u64) -> Result<Option<PrState>, PersistError> {
    let text = match fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(PersistError::Io { path: path.to_owned(), op: "read", source }),
    };
    let p: Persisted = serde_json::from_slice(&text)
        .map_err(|e| PersistError::Corrupt { path: path.to_owned(), why: e.to_string() })?;
    if p.image_inode != image_inode {
        return Err(PersistError::Stale { path: path.to_owned(), was: p.image_inode, now: image_inode });
    }
    PrState::restore(p, path).map(Some)
}

/// PERSISTENT RESERVE IN REPORT CAPABILITIES: returns its length.
pub fn report_capabilities(buf: &mut [u8], ptpl_c: bool, ptpl_a: bool) -> usize {
    let mut d = [0u8; 8];
    d[1] = 8;
    // CRH (SPC-2 reservations conflict per 5.13.3), ATP_C; no SIP_C; PTPL_C with an image.
    d[2] = 0x10 | 0x04 | u8::from(ptpl_c);
    // TMV; ALLOW COMMANDS 001b: TEST UNIT READY passes WE and EA; PTPL_A.
    d[3] = 0x80 | 0x10 | u8::from(ptpl_a);
    d[4] = 0x80 | 0x40 | 0x20 | 0x08 | 0x02; // WR_EX_AR, EX_AC_RO, WR_EX_RO, EX_AC, WR_EX
    d[5] = 0x01; // EX_AC_AR
    put(buf, 0, &d);
    8
}

/// A LUN's reservations.
#[derive(Debug, Default)]
pub struct Reservations {
    /// Some reservation exists: commands must be checked against it.
    active: AtomicBool,
    state: Mutex<PrState>,
    /// The APTPL sidecar, for a LUN over an image file.
    store: Option<Store>,
}

/// Where the state persists, and how far the file has caught up.
#[derive(Debug)]
struct Store {
    path: PathBuf,
    /// The image file's inode, recorded in the sidecar.
    image_inode: u64,
    /// Taken by workers only (never by a reactor) around each write: the `seq` of the state
    /// the file holds. A writer that finds it at or past its own change has nothing to do.
    written: Mutex<u64>,
    /// Outcomes of PERSISTENT RESERVE OUT commands waiting for their write, by the address of
    /// their Data-Out buffer (see [`Reservations::stash`]).
    pending: Mutex<Vec<(usize, Disposition)>>,
}

impl Reservations {
    /// The reservations of a LUN over the image `image` (`None`: a RAM LUN or a block device,
    /// which cannot persist through power loss): those its sidecar holds, if it has a
    /// readable one written for this very file. An unreadable, corrupt or stale sidecar is
    /// logged and left in place (the next APTPL write replaces it); the LUN then starts with
    /// no reservations.
    pub fn open(image: Option<&Path>) -> Self {
        let Some(image) = image else { return Self::default() };
        let image_inode = match fs::metadata(image) {
            Ok(m) => m.ino(),
            Err(e) => {
                log::error!("{}: cannot stat the image: {e}; APTPL is off for it", image.display());
                return Self::default();
            }
        };
        let path = sidecar_path(image);
        let mut st = match load(&path, image_inode) {
            Ok(Some(st)) => {
                log::info!(
                    "{}: restored {} persistent reservation registration(s){} (APTPL)",
                    path.display(),
                    st.regs.len(),
                    if st.res.is_some() { " and the reservation" } else { "" }
                );
                st
            }
            Ok(None) => PrState::default(),
            Err(e) => {
                log::error!("{e}; the LUN starts with no persistent reservations");
                PrState::default()
            }
        };
        st.ptpl_capable = true;
        let active = AtomicBool::new(st.active());
        let store = Store { path, image_inode, written: Mutex::new(0), pending: Mutex::new(Vec::new()) };
        Self { active, state: Mutex::new(st), store: Some(store) }
    }

    /// The hot-path test: one relaxed load.
    pub fn active(&self) -> bool {
        self.active.load(Ordering::Relaxed)
    }

    /// Runs `f` on the state under the lock, then republishes the hot-path flag.
    pub fn with<R>(&self, f: impl FnOnce(&mut PrState) -> R) -> R {
        let mut st: MutexGuard<'_, PrState> = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let r = f(&mut st);
        self.active.store(st.active(), Ordering::Relaxed);
        r
    }

    /// Whether a command conflicts; only consulted when [`Reservations::active`] or for the
    /// commands that touch reservations themselves.
    pub fn conflicts(&self, who: &str, access: Access) -> bool {
        self.with(|st| st.conflicts(who, access))
    }

    /// A LUN reset ends SPC-2 reservations; persistent ones survive it.
    pub fn reset(&self) {
        self.with(|st| st.legacy = None);
    }

    /// PERSISTENT RESERVE OUT from `me` on a reactor: changes the state in memory. Returns the
    /// unit attentions owed, and whether the change must reach the sidecar before the command
    /// completes (APTPL was or is now in effect).
    pub fn out(&self, me: &Arc<str>, sa: u8, scope_type: u8, p: &OutParams) -> Result<(Notices, bool), PrError> {
        self.with(|st| {
            let was = st.persisting();
            let notices = st.out(me, sa, scope_type, p)?;
            let persist = was || st.persisting();
            if persist {
                st.seq += 1;
            }
            Ok((notices, persist))
        })
    }

    /// Keeps the outcome of a PERSISTENT RESERVE OUT whose sidecar write runs on a worker,
    /// under the address of its Data-Out buffer: the task owns that buffer from its Data-Out
    /// phase through its worker job, so no other command in flight has the same key, and an
    /// older entry with that key is one whose command ended without its job (BUSY).
    pub fn stash(&self, buf: &[u8], outcome: Disposition) {
        if let Some(store) = &self.store {
            let mut pending = store.pending.lock().unwrap_or_else(PoisonError::into_inner);
            let key = buf.as_ptr() as usize;
            pending.retain(|(k, _)| *k != key);
            pending.push((key, outcome));
        }
    }

    /// The outcome [`Reservations::stash`] kept for the command with this Data-Out buffer.
    pub fn take_stashed(&self, buf: &[u8]) -> Option<Disposition> {
        let store = self.store.as_ref()?;
        let mut pending = store.pending.lock().unwrap_or_else(PoisonError::into_inner);
        let i = pending.iter().position(|(k, _)| *k == buf.as_ptr() as usize)?;
        Some(pending.swap_remove(i).1)
    }

    /// Brings the sidecar up to the current state: written atomically while APTPL is on,
    /// removed when it is off. Blocks on the file system: worker threads only.
    pub fn persist(&self) -> Result<(), PersistError> {
        let Some(store) = &self.store else { return Ok(()) };
        let mut written = store.written.lock().unwrap_or_else(PoisonError::into_inner);
        // The state is read after taking `written`, so a later writer never sees an older one.
        let (seq, snapshot) = self.with(|st| (st.seq, st.snapshot(store.image_inode)));
        if *written >= seq {
            return Ok(());
        }
        match snapshot {
            Some(p) => {
                let text = serde_json::to_vec_pretty(&p).expect("persisted state always serialises");
                write_atomic(&store.path, &text)?;
            }
            None => remove_durably(&store.path)?,
        }
        *written = seq;
        Ok(())
    }
}

/// Sense data of a PERSISTENT RESERVE OUT whose change could not be persisted (the change
/// stays in effect, as in LIO): HARDWARE ERROR, INTERNAL TARGET FAILURE.
pub fn persist_failed() -> Sense {
    Sense::new(SenseKey::HardwareError, 0x44, 0x00)
}

#[cfg(test)]
mod tests {
    use super::*;
    use pr_type::*;

    fn who(s: &str) -> Arc<str> {
        Arc::from(s)
    }

    fn p(key: u64, sa_key: u64) -> OutParams {
        OutParams { key, sa_key, aptpl: false }
    }

    fn reg(st: &mut PrState, w: &Arc<str>, key: u64) {
        assert_eq!(st.out(w, out_sa::REGISTER_AND_IGNORE, 0, &p(0, key)), Ok(vec![]));
    }

    fn keys(st: &PrState) -> Vec<u64> {
        st.regs.iter().map(|r| r.key).collect()
    }

    #[test]
    fn register_rules_and_generation() {
        let (a, b) = (who("a"), who("b"));
        let mut st = PrState::default();
        // Unregistered, zero key: nothing happens, no generation bump.
        assert_eq!(st.out(&a, out_sa::REGISTER, 0, &p(0, 0)), Ok(vec![]));
        assert_eq!(st.generation, 0);
        // Unregistered with a non-zero reservation key: conflict.
        assert_eq!(st.out(&a, out_sa::REGISTER, 0, &p(5, 1)), Err(PrError::Conflict));
        assert_eq!(st.out(&a, out_sa::REGISTER, 0, &p(0, 1)), Ok(vec![]));
        assert_eq!((keys(&st), st.generation), (vec![1], 1));
        // Re-register needs the current key; REGISTER AND IGNORE does not.
        assert_eq!(st.out(&a, out_sa::REGISTER, 0, &p(9, 2)), Err(PrError::Conflict));
        assert_eq!(st.out(&a, out_sa::REGISTER, 0, &p(1, 2)), Ok(vec![]));
        assert_eq!(st.out(&a, out_sa::REGISTER_AND_IGNORE, 0, &p(77, 3)), Ok(vec![]));
        reg(&mut st, &b, 4);
        assert_eq!((keys(&st), st.generation), (vec![3, 4], 4));
        assert_eq!(st.out(&a, out_sa::REGISTER, 0, &p(3, 0)), Ok(vec![]));
        assert_eq!(keys(&st), vec![4]);
        let aptpl = OutParams { key: 0, sa_key: 1, aptpl: true };
        assert!(matches!(st.out(&a, out_sa::REGISTER_AND_IGNORE, 0, &aptpl), Err(PrError::Check(s)) if s.asc == 0x26));
    }

    #[test]
    fn reserve_release_and_type_checks() {
        let (a, b) = (who("a"), who("b"));
        let mut st = PrState::default();
        assert_eq!(st.out(&a, out_sa::RESERVE, EXCLUSIVE_ACCESS, &p(0, 0)), Err(PrError::Conflict));
        reg(&mut st, &a, 1);
        reg(&mut st, &b, 2);
        let gen = st.generation;
        assert_eq!(st.out(&a, out_sa::RESERVE, EXCLUSIVE_ACCESS, &p(2, 0)), Err(PrError::Conflict), "wrong key");
        assert!(matches!(st.out(&a, out_sa::RESERVE, 2, &p(1, 0)), Err(PrError::Check(_))), "bad type");
        assert!(matches!(st.out(&a, out_sa::RESERVE, 0x13, &p(1, 0)), Err(PrError::Check(_))), "bad scope");
        assert_eq!(st.out(&a, out_sa::RESERVE, EXCLUSIVE_ACCESS, &p(1, 0)), Ok(vec![]));
        assert_eq!(st.out(&a, out_sa::RESERVE, EXCLUSIVE_ACCESS, &p(1, 0)), Ok(vec![]), "again: fine");
        assert_eq!(st.out(&a, out_sa::RESERVE, WRITE_EXCLUSIVE, &p(1, 0)), Err(PrError::Conflict));
        assert_eq!(st.out(&b, out_sa::RESERVE, EXCLUSIVE_ACCESS, &p(2, 0)), Err(PrError::Conflict));
        assert_eq!(st.generation, gen, "RESERVE does not bump the generation");
        let mut buf = [0u8; 64];
        assert_eq!(st.read_reservation(&mut buf), 24);
        assert_eq!((&buf[4..8], buf[15], buf[21]), (&[0, 0, 0, 16][..], 1, EXCLUSIVE_ACCESS));
        // A non-holder's release is a no-op; the holder's with the wrong type is an error.
        assert_eq!(st.out(&b, out_sa::RELEASE, WRITE_EXCLUSIVE, &p(2, 0)), Ok(vec![]));
        assert!(st.res.is_some());
        let r = st.out(&a, out_sa::RELEASE, WRITE_EXCLUSIVE, &p(1, 0));
        assert!(matches!(r, Err(PrError::Check(s)) if (s.asc, s.ascq) == (0x26, 0x04)));
        assert_eq!(st.out(&a, out_sa::RELEASE, EXCLUSIVE_ACCESS, &p(1, 0)), Ok(vec![]));
        assert!(st.res.is_none());
        assert_eq!(st.read_reservation(&mut buf), 8);
        // Registrants-only release tells the other registrants.
        assert_eq!(st.out(&a, out_sa::RESERVE, WE_REGISTRANTS_ONLY, &p(1, 0)), Ok(vec![]));
        assert_eq!(
            st.out(&a, out_sa::RELEASE, WE_REGISTRANTS_ONLY, &p(1, 0)),
            Ok(vec![(b.clone(), ua::RESERVATIONS_RELEASED)])
        );
    }

    #[test]
    fn conflict_table() {
        use Access::*;
        let (h, r, u) = (who("holder"), who("registrant"), who("stranger"));
        // (type, [holder, registrant, unregistered] x [read, write] allowed)
        let table = [
            (WRITE_EXCLUSIVE, [true, true, true, false, true, false]),
            (EXCLUSIVE_ACCESS, [true, true, false, false, false, false]),
            (WE_REGISTRANTS_ONLY, [true, true, true, true, true, false]),
            (EA_REGISTRANTS_ONLY, [true, true, true, true, false, false]),
            (WE_ALL_REGISTRANTS, [true, true, true, true, true, false]),
            (EA_ALL_REGISTRANTS, [true, true, true, true, false, false]),
        ];
        for (ty, want) in table {
            let mut st = PrState::default();
            reg(&mut st, &h, 1);
            reg(&mut st, &r, 2);
            st.out(&h, out_sa::RESERVE, ty, &p(1, 0)).unwrap();
            let got: Vec<bool> = [&h, &r, &u].iter().flat_map(|w| [Read, Write].map(|a| !st.conflicts(w, a))).collect();
            assert_eq!(got, want, "type {ty}");
            for w in [&h, &r, &u] {
                assert!(!st.conflicts(w, Always));
                assert!(!st.conflicts(w, ReserveOut));
                assert!(st.conflicts(w, Legacy), "RESERVE(6) with registrations");
            }
        }
    }

    #[test]
    fn unregistering_the_holder() {
        let (a, b) = (who("a"), who("b"));
        // Registrants only: the reservation goes, the others hear RESERVATIONS RELEASED.
        let mut st = PrState::default();
        reg(&mut st, &a, 1);
        reg(&mut st, &b, 2);
        st.out(&a, out_sa::RESERVE, EA_REGISTRANTS_ONLY, &p(1, 0)).unwrap();
        assert_eq!(st.out(&a, out_sa::REGISTER, 0, &p(1, 0)), Ok(vec![(b.clone(), ua::RESERVATIONS_RELEASED)]));
        assert!(st.res.is_none());
        // All registrants: it stays until the last registrant leaves.
        let mut st = PrState::default();
        reg(&mut st, &a, 1);
        reg(&mut st, &b, 2);
        st.out(&a, out_sa::RESERVE, WE_ALL_REGISTRANTS, &p(1, 0)).unwrap();
        let mut buf = [0u8; 64];
        st.read_reservation(&mut buf);
        assert_eq!(&buf[8..16], &[0; 8], "all-registrants key reads as 0");
        st.out(&a, out_sa::REGISTER, 0, &p(1, 0)).unwrap();
        assert!(st.res.is_some());
        assert!(st.holds("b"));
        st.out(&b, out_sa::RELEASE, WE_ALL_REGISTRANTS, &p(2, 0)).unwrap();
        assert!(st.res.is_none());
        // Exclusive access: silently released.
        let mut st = PrState::default();
        reg(&mut st, &a, 1);
        reg(&mut st, &b, 2);
        st.out(&a, out_sa::RESERVE, EXCLUSIVE_ACCESS, &p(1, 0)).unwrap();
        assert_eq!(st.out(&a, out_sa::REGISTER_AND_IGNORE, 0, &p(0, 0)), Ok(vec![]));
        assert!(st.res.is_none());
    }

    #[test]
    fn clear_and_preempt() {
        let (a, b, c) = (who("a"), who("b"), who("c"));
        let mut st = PrState::default();
        reg(&mut st, &a, 1);
        reg(&mut st, &b, 2);
        st.out(&b, out_sa::RESERVE, WRITE_EXCLUSIVE, &p(2, 0)).unwrap();
        let gen = st.generation;
        assert_eq!(st.out(&c, out_sa::CLEAR, 0, &p(0, 0)), Err(PrError::Conflict));
        assert_eq!(st.out(&a, out_sa::CLEAR, 0, &p(1, 0)), Ok(vec![(b.clone(), ua::RESERVATIONS_PREEMPTED)]));
        assert!(st.regs.is_empty() && st.res.is_none());
        assert_eq!(st.generation, gen + 1);

        // Preempt without a reservation: drops the registrations with that key.
        reg(&mut st, &a, 1);
        reg(&mut st, &b, 2);
        reg(&mut st, &c, 2);
        let gen = st.generation;
        let n = st.out(&a, out_sa::PREEMPT, EXCLUSIVE_ACCESS, &p(1, 2)).unwrap();
        assert_eq!(n, vec![(b.clone(), ua::REGISTRATIONS_PREEMPTED), (c.clone(), ua::REGISTRATIONS_PREEMPTED)]);
        assert_eq!((keys(&st), st.generation, st.res.is_none()), (vec![1], gen + 1, true));
        assert_eq!(st.out(&a, out_sa::PREEMPT, 0, &p(1, 9)), Err(PrError::Conflict), "no such key");
        assert!(matches!(st.out(&a, out_sa::PREEMPT, 0, &p(1, 0)), Err(PrError::Check(_))));

        // Preempting the holder takes over the reservation with the new type.
        reg(&mut st, &b, 2);
        reg(&mut st, &c, 3);
        st.out(&b, out_sa::RESERVE, WRITE_EXCLUSIVE, &p(2, 0)).unwrap();
        let n = st.out(&a, out_sa::PREEMPT_AND_ABORT, EXCLUSIVE_ACCESS, &p(1, 2)).unwrap();
        assert_eq!(n, vec![(b.clone(), ua::REGISTRATIONS_PREEMPTED), (c.clone(), ua::RESERVATIONS_RELEASED)]);
        assert!(st.holds("a"));
        assert_eq!(st.res.as_ref().unwrap().ty, EXCLUSIVE_ACCESS);
        assert_eq!(keys(&st), vec![1, 3]);

        // All registrants with key 0: everyone else goes.
        st.out(&a, out_sa::RELEASE, EXCLUSIVE_ACCESS, &p(1, 0)).unwrap();
        st.out(&a, out_sa::RESERVE, EA_ALL_REGISTRANTS, &p(1, 0)).unwrap();
        let n = st.out(&c, out_sa::PREEMPT, WRITE_EXCLUSIVE, &p(3, 0)).unwrap();
        assert_eq!(n, vec![(a.clone(), ua::REGISTRATIONS_PREEMPTED)]);
        assert_eq!(keys(&st), vec![3]);
        assert!(st.holds("c"));
    }

    #[test]
    fn unsupported_service_actions() {
        let a = who("a");
        let mut st = PrState::default();
        reg(&mut st, &a, 1);
        assert!(matches!(st.out(&a, 7, 0, &p(1, 2)), Err(PrError::Check(s)) if s.asc == 0x24));
        assert!(matches!(st.out(&a, 0x1F, 0, &p(1, 2)), Err(PrError::Check(s)) if s.asc == 0x24));
    }

    #[test]
    fn legacy_reservations() {
        let a = Inbox::new_for_test("a");
        let b = Inbox::new_for_test("b");
        let mut st = PrState::default();
        st.legacy_reserve(&a).unwrap();
        assert!(st.active());
        assert_eq!(st.legacy_reserve(&b), Err(PrError::Conflict));
        assert!(st.conflicts("b", Access::Read));
        assert!(st.conflicts("b", Access::ReserveOut));
        assert!(!st.conflicts("b", Access::Always));
        assert!(!st.conflicts("b", Access::Legacy), "RELEASE from others is a no-op");
        assert!(!st.conflicts("a", Access::Write));
        st.legacy_release("b");
        assert!(st.active());
        st.legacy_release("a");
        assert!(!st.active());
        // The holder's session ending ends the reservation.
        st.legacy_reserve(&b).unwrap();
        drop(b);
        assert!(!st.active());
        assert!(!st.conflicts("a", Access::Write));
    }

    #[test]
    fn full_status_and_keys_layout() {
        let (a, b) = (who("iqn.x,i,0x1"), who("b"));
        let mut st = PrState::default();
        reg(&mut st, &a, 0x1122);
        reg(&mut st, &b, 7);
        st.out(&a, out_sa::RESERVE, WRITE_EXCLUSIVE, &p(0x1122, 0)).unwrap();
        let mut buf = [0u8; 256];
        assert_eq!(st.read_keys(&mut buf), 24);
        assert_eq!(&buf[..8], &[0, 0, 0, 2, 0, 0, 0, 16]);
        assert_eq!(&buf[8..16], &0x1122u64.to_be_bytes());
        let n = st.read_full_status(&mut buf);
        // a: 24 + 4 + 12 (11 chars + NUL); b: 24 + 4 + 4.
        assert_eq!(n, 8 + 40 + 32);
        assert_eq!(&buf[4..8], &72u32.to_be_bytes());
        assert_eq!((buf[8 + 12], buf[8 + 13], buf[8 + 24]), (1, WRITE_EXCLUSIVE, 0x45));
        assert_eq!(&buf[8 + 28..8 + 39], b"iqn.x,i,0x1");
        assert_eq!(buf[48 + 12], 0, "b does not hold it");
        let mut small = [0u8; 10];
        assert_eq!(st.read_full_status(&mut small), 80, "cut data, full length");
        let mut caps = [0u8; 8];
        assert_eq!(st.report_capabilities(&mut caps), 8);
        assert_eq!((caps[2] & 0x01, caps[3] & 0x01), (0, 0), "PTPL_C, PTPL_A without an image");
    }

    fn aptpl(key: u64, sa_key: u64) -> OutParams {
        OutParams { key, sa_key, aptpl: true }
    }

    /// A LUN's reservations over `dir/disk.img` (the image itself need not exist here).
    fn on_image(dir: &Path) -> (Reservations, PathBuf) {
        let image = dir.join("disk.img");
        if !image.exists() {
            std::fs::write(&image, [0u8; 512]).unwrap();
        }
        (Reservations::open(Some(&image)), sidecar_path(&image))
    }

    #[test]
    fn aptpl_state_round_trips_through_the_sidecar() {
        let dir = tempfile::tempdir().unwrap();
        let (r, side) = on_image(dir.path());
        let (a, b) = (who("iqn.a,i,0x800000000001"), who("iqn.b,i,0x800000000002"));
        let mut caps = [0u8; 8];
        r.with(|st| st.report_capabilities(&mut caps));
        assert_eq!((caps[2] & 0x01, caps[3] & 0x01), (1, 0), "PTPL_C with an image, APTPL not yet on");
        // Without APTPL nothing is written.
        assert_eq!(r.out(&a, out_sa::REGISTER, 0, &p(0, 0xA1)).map(|x| x.1), Ok(false));
        r.persist().unwrap();
        assert!(!side.exists());
        assert_eq!(r.out(&a, out_sa::REGISTER, 0, &aptpl(0xA1, 0xA)).map(|x| x.1), Ok(true));
        assert_eq!(r.out(&b, out_sa::REGISTER_AND_IGNORE, 0, &aptpl(0, 0xB)).map(|x| x.1), Ok(true));
        assert_eq!(r.out(&a, out_sa::RESERVE, WE_REGISTRANTS_ONLY, &p(0xA, 0)).map(|x| x.1), Ok(true));
        r.persist().unwrap();
        r.with(|st| st.report_capabilities(&mut caps));
        assert_eq!(caps[3] & 0x01, 1, "PTPL_A");
        let text = std::fs::read_to_string(&side).unwrap();
        assert!(text.contains("iqn.b,i,0x800000000002"), "{text}");

        let (again, _) = on_image(dir.path());
        let mut want = [0u8; 256];
        let mut got = [0u8; 256];
        let n = r.with(|st| st.read_full_status(&mut want));
        assert_eq!(again.with(|st| st.read_full_status(&mut got)), n);
        assert_eq!(&got[..n], &want[..n], "same generation, keys, holder and type");
        assert!(again.active(), "the restored reservation is enforced at once");
        assert!(again.conflicts("iqn.c,i,0x1", Access::Write));
        assert!(!again.conflicts(&b, Access::Write));
        again.with(|st| st.report_capabilities(&mut caps));
        assert_eq!((caps[2] & 0x01, caps[3] & 0x01), (1, 1));
    }

    #[test]
    fn register_with_aptpl_off_removes_the_sidecar() {
        let dir = tempfile::tempdir().unwrap();
        let (r, side) = on_image(dir.path());
        let a = who("iqn.a,i,0x1");
        r.out(&a, out_sa::REGISTER, 0, &aptpl(0, 1)).unwrap();
        r.persist().unwrap();
        assert!(side.exists());
        // A change with APTPL=0 still has to reach the file: it goes.
        assert_eq!(r.out(&a, out_sa::REGISTER, 0, &p(1, 2)).map(|x| x.1), Ok(true));
        r.persist().unwrap();
        assert!(!side.exists());
        assert_eq!(r.out(&a, out_sa::REGISTER, 0, &p(2, 3)).map(|x| x.1), Ok(false), "off: no more writes");
        let (again, _) = on_image(dir.path());
        assert_eq!(again.with(|st| st.regs.len()), 0, "a restart forgets them");
        // CLEAR ends APTPL too.
        r.out(&a, out_sa::REGISTER, 0, &aptpl(3, 4)).unwrap();
        r.persist().unwrap();
        assert!(side.exists());
        r.out(&a, out_sa::CLEAR, 0, &p(4, 0)).unwrap();
        r.persist().unwrap();
        assert!(!side.exists());
        assert!(!r.with(|st| st.aptpl));
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left, ["disk.img"], "no temp files left");
    }

    #[test]
    fn a_corrupt_sidecar_starts_empty_and_is_not_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.img");
        std::fs::write(&image, [0u8; 512]).unwrap();
        let ino = std::fs::metadata(&image).unwrap().ino();
        let side = sidecar_path(&image);
        let head = |v: u32, i: u64| format!(r#"{{"version":{v},"image_inode":{i},"generation":1,"#);
        let bad: [String; 6] = [
            "{not json".into(),
            String::new(),
            head(9, ino) + r#""registrations":[],"reservation":null}"#,
            head(1, ino) + r#""registrations":[{"key":0,"initiator_port":"x"}],"reservation":null}"#,
            head(1, ino) + r#""registrations":[{"key":1,"initiator_port":"x"}],"reservation":{"holder":"y","type":1}}"#,
            // Well formed, but written for another file of that name.
            head(1, ino + 1) + r#""registrations":[{"key":1,"initiator_port":"x"}],"reservation":null}"#,
        ];
        let good = head(1, ino) + r#""registrations":[{"key":1,"initiator_port":"x"}],"reservation":null}"#;
        std::fs::write(&side, &good).unwrap();
        assert_eq!(on_image(dir.path()).0.with(|st| keys(st)), vec![1], "the control case loads");
        for text in bad {
            let text = text.as_bytes();
            std::fs::write(&side, text).unwrap();
            let (r, _) = on_image(dir.path());
            assert_eq!(r.with(|st| (st.regs.len(), st.res.is_some(), st.aptpl)), (0, false, false));
            assert!(!r.active());
            assert_eq!(std::fs::read(&side).unwrap(), text, "left for the operator to look at");
            // The LUN still works, and the next APTPL write replaces the file.
            r.out(&who("z"), out_sa::REGISTER, 0, &aptpl(0, 5)).unwrap();
            r.persist().unwrap();
            assert_eq!(on_image(dir.path()).0.with(|st| keys(st)), vec![5]);
        }
    }

    #[test]
    fn an_older_change_never_overwrites_a_newer_one() {
        let dir = tempfile::tempdir().unwrap();
        let (r, side) = on_image(dir.path());
        let a = who("a");
        r.out(&a, out_sa::REGISTER, 0, &aptpl(0, 1)).unwrap();
        r.out(&a, out_sa::REGISTER, 0, &aptpl(1, 2)).unwrap();
        // The first command's worker runs after the second's: both see the newest state.
        r.persist().unwrap();
        std::fs::remove_file(&side).unwrap();
        r.persist().unwrap();
        assert!(!side.exists(), "already written: the late writer has nothing to do");
        r.out(&a, out_sa::REGISTER, 0, &aptpl(2, 3)).unwrap();
        r.persist().unwrap();
        assert_eq!(on_image(dir.path()).0.with(|st| keys(st)), vec![3]);
    }

    #[test]
    fn a_failed_write_is_reported_and_retried() {
        let dir = tempfile::tempdir().unwrap();
        let (r, side) = on_image(dir.path());
        // A non-empty directory where the sidecar goes: the rename over it fails.
        std::fs::create_dir_all(side.join("x")).unwrap();
        r.out(&who("a"), out_sa::REGISTER, 0, &aptpl(0, 1)).unwrap();
        let e = r.persist().unwrap_err();
        assert!(e.to_string().contains(".disk.img.pr"), "{e}");
        std::fs::remove_dir_all(&side).unwrap();
        r.persist().unwrap();
        assert_eq!(on_image(dir.path()).0.with(|st| keys(st)), vec![1]);
    }

    #[test]
    fn a_new_file_under_the_same_name_does_not_inherit_reservations() {
        let dir = tempfile::tempdir().unwrap();
        let (r, side) = on_image(dir.path());
        r.out(&who("a"), out_sa::REGISTER, 0, &aptpl(0, 1)).unwrap();
        r.persist().unwrap();
        // Another file under the image's name (an upload replacing it, or the image deleted
        // and created again); the old one is kept so that its inode number stays taken.
        std::fs::rename(dir.path().join("disk.img"), dir.path().join("old.img")).unwrap();
        let (again, _) = on_image(dir.path());
        assert_eq!(again.with(|st| st.regs.len()), 0);
        assert!(side.exists(), "left until the next APTPL write");
    }

    #[test]
    fn stashed_outcomes_are_found_by_buffer() {
        let dir = tempfile::tempdir().unwrap();
        let (r, _) = on_image(dir.path());
        let (b1, b2) = ([0u8; 24], [0u8; 24]);
        r.stash(&b1, Disposition::Good);
        r.stash(&b2, Disposition::AbortNexuses(vec![who("x")]));
        r.stash(&b1, Disposition::AbortNexuses(vec![who("y")])); // replaces the stale one
        assert_eq!(r.take_stashed(&b1), Some(Disposition::AbortNexuses(vec![who("y")])));
        assert_eq!(r.take_stashed(&b1), None);
        assert_eq!(r.take_stashed(&b2), Some(Disposition::AbortNexuses(vec![who("x")])));
    }
}
