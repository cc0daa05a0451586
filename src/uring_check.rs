//! Start-up check that this process may use io_uring, and a diagnosis naming the cause and the
//! fix when it may not.
//!
//! Three things switch io_uring off on hosts people actually run: the `kernel.io_uring_disabled`
//! sysctl (RHEL-family kernels ship it at 2), `kernel.io_uring_group` (with the sysctl at 1, only
//! members of that group may create rings) and container seccomp filters (Docker's and
//! containerd's default profiles deny io_uring_setup/enter/register since 2023). The kernel
//! answers all three with the same EPERM, so [`diagnose`] tells them apart from what the host
//! shows: the sysctls, this process's groups and its seccomp mode. It is a pure function of
//! those inputs; [`Host::read`] gathers them.

use io_uring::{opcode, IoUring};
use std::io;
use std::path::Path;

/// The seccomp profile shipped for containers (Docker's default plus the io_uring calls).
pub const SECCOMP_PROFILE: &str = "dist/seccomp-uringtgt.json";

/// Why io_uring cannot be used here, with the fix.
#[derive(Debug, thiserror::Error)]
pub enum UringError {
    /// Creating a ring failed; the message is the diagnosis.
    #[error("cannot create an io_uring: {source}: {diagnosis}")]
    Setup { source: io::Error, diagnosis: String },
    /// The kernel's io_uring lacks operations the reactors submit.
    #[error("this kernel's io_uring lacks {}: the reactors need them (Linux 5.6 or later has all of them)", .missing.join(", "))]
    MissingOps { missing: Vec<&'static str> },
    /// The probe itself failed (kernels before 5.6 have no IORING_REGISTER_PROBE).
    #[error("cannot probe io_uring's operations: {0} (Linux 5.6 or later is needed)")]
    Probe(io::Error),
}

/// The operations the reactors submit, by opcode, with the kernel's names.
pub const REQUIRED_OPS: &[(u8, &str)] = &[
    (opcode::Recv::CODE, "IORING_OP_RECV"),
    (opcode::SendMsg::CODE, "IORING_OP_SENDMSG"),
    (opcode::Read::CODE, "IORING_OP_READ"),
    (opcode::Write::CODE, "IORING_OP_WRITE"),
    (opcode::Fsync::CODE, "IORING_OP_FSYNC"),
    (opcode::Timeout::CODE, "IORING_OP_TIMEOUT"),
    (opcode::AsyncCancel::CODE, "IORING_OP_ASYNC_CANCEL"),
];

/// What the host says about io_uring and this process.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Host {
    /// `kernel.io_uring_disabled` (0, 1, 2); `None` on kernels without the sysctl (before 6.6).
    pub disabled: Option<u8>,
    /// `kernel.io_uring_group`: the gid allowed when `disabled` is 1; -1 means none.
    pub group: Option<i64>,
    /// The name of that group, from /etc/group.
    pub group_name: Option<String>,
    /// This process's real, effective and supplementary group ids.
    pub groups: Vec<u32>,
    /// `Seccomp:` of /proc/self/status: 0 none, 1 strict, 2 filter.
    pub seccomp: Option<u8>,
}

impl Host {
    /// Reads the sysctls, /etc/group and /proc/self/status.
    pub fn read() -> Self {
        let sysctl = |name: &str| std::fs::read_to_string(Path::new("/proc/sys/kernel").join(name)).ok();
        let disabled = sysctl("io_uring_disabled").and_then(|s| s.trim().parse().ok());
        let group: Option<i64> = sysctl("io_uring_group").and_then(|s| s.trim().parse().ok());
        let group_name = group
            .filter(|g| *g >= 0)
            .and_then(|g| std::fs::read_to_string("/etc/group").ok().and_then(|t| group_name(&t, g as u32)));
        let seccomp = std::fs::read_to_string("/proc/self/status").ok().and_then(|s| seccomp_mode(&s));
        Self { disabled, group, group_name, groups: process_groups(), seccomp }
    }
}

/// The name of group `gid` in an /etc/group text.
pub fn group_name(etc_group: &str, gid: u32) -> Option<String> {
    etc_group.lines().find_map(|line| {
        let mut f = line.split(':');
        let name = f.next()?;
        let id: u32 = f.nth(1)?.parse().ok()?;
        (id == gid).then(|| name.to_owned())
    })
}

/// The `Seccomp:` mode of a /proc/PID/status text.
pub fn seccomp_mode(status: &str) -> Option<u8> {
    status.lines().find_map(|l| l.strip_prefix("Seccomp:")).and_then(|v| v.trim().parse().ok())
}

fn process_groups() -> Vec<u32> {
    // SAFETY: getgid/getegid have no preconditions.
    let mut groups = unsafe { vec![libc::getgid(), libc::getegid()] };
    // SAFETY: a size of 0 only asks for the count.
    let n = unsafe { libc::getgroups(0, std::ptr::null_mut()) };
    if n > 0 {
        let mut extra = vec![0 as libc::gid_t; n as usize];
        // SAFETY: extra has room for n gids.
        let got = unsafe { libc::getgroups(n, extra.as_mut_ptr()) };
        if got > 0 {
            extra.truncate(got as usize);
            groups.extend(extra);
        }
    }
    groups
}

/// Why `io_uring_setup` failed with `err` on `host`, and what to do about it.
pub fn diagnose(err: &io::Error, host: &Host) -> String {
    let errno = err.raw_os_error();
    let refused = matches!(errno, Some(libc::EPERM | libc::EACCES | libc::ENOSYS));
    let fix_sysctl = "enable it with `sysctl -w kernel.io_uring_disabled=0` (and keep it across reboots with \
                      `echo kernel.io_uring_disabled=0 > /etc/sysctl.d/90-io_uring.conf`)";
    match host.disabled {
        Some(2) if refused => {
            return format!("io_uring is disabled on this host (kernel.io_uring_disabled = 2); {fix_sysctl}");
        }
        Some(1) if refused => {
            let group = host.group.unwrap_or(-1);
            if group < 0 {
                return format!(
                    "io_uring is limited to processes with CAP_SYS_ADMIN (kernel.io_uring_disabled = 1, \
                     kernel.io_uring_group = -1); allow a group with `sysctl -w kernel.io_uring_group=GID` and run \
                     uringtgt in it, or {fix_sysctl}"
                );
            }
            let name = host.group_name.clone().unwrap_or_else(|| group.to_string());
            if !host.groups.contains(&(group as u32)) {
                return format!(
                    "io_uring is limited to the group {name} (gid {group}; kernel.io_uring_disabled = 1, \
                     kernel.io_uring_group = {group}) and this process is not in it; run uringtgt with that group \
                     (`usermod -aG {name} USER`, or `SupplementaryGroups={name}` in the systemd unit), or {fix_sysctl}"
                );
            }
            // In the group, yet refused: fall through to the other causes.
        }
        _ => {}
    }
    if refused && host.seccomp == Some(2) {
        return format!(
            "a seccomp filter denies the io_uring system calls (Seccomp: 2 in /proc/self/status, \
             kernel.io_uring_disabled = {}); Docker's and containerd's default profiles deny them since 2023: run the \
             container with `--security-opt seccomp={SECCOMP_PROFILE}` (the default profile plus io_uring_setup, \
             io_uring_enter and io_uring_register)",
            host.disabled.map_or_else(|| "absent".to_owned(), |d| d.to_string())
        );
    }
    match errno {
        Some(libc::ENOSYS) => "this kernel has no io_uring (built without CONFIG_IO_URING, or older than 5.1)".into(),
        Some(libc::EPERM | libc::EACCES) => format!(
            "the kernel refused it, though kernel.io_uring_disabled is {} and no seccomp filter is set: look for a \
             security module (SELinux, AppArmor) denying io_uring",
            host.disabled.map_or_else(|| "absent".to_owned(), |d| d.to_string())
        ),
        Some(libc::ENOMEM) => "out of locked memory: kernels before 5.12 count rings against RLIMIT_MEMLOCK; raise \
                               it (`ulimit -l`, or LimitMEMLOCK= in the systemd unit)"
            .into(),
        Some(libc::EMFILE | libc::ENFILE) => "out of file descriptors (raise `ulimit -n`, LimitNOFILE=)".into(),
        _ => "unexpected error from io_uring_setup".into(),
    }
}

/// The required operations `supported` says are missing, by name.
pub fn missing_ops(supported: impl Fn(u8) -> bool) -> Vec<&'static str> {
    REQUIRED_OPS.iter().filter(|(code, _)| !supported(*code)).map(|(_, name)| *name).collect()
}

/// Creates a small ring and probes it: Ok when the reactors can run here, otherwise the cause
/// and the fix.
pub fn check() -> Result<(), UringError> {
    let ring = IoUring::new(4).map_err(|source| {
        let diagnosis = diagnose(&source, &Host::read());
        UringError::Setup { source, diagnosis }
    })?;
    let mut probe = io_uring::Probe::new();
    ring.submitter().register_probe(&mut probe).map_err(UringError::Probe)?;
    let missing = missing_ops(|code| probe.is_supported(code));
    if !missing.is_empty() {
        return Err(UringError::MissingOps { missing });
    }
    log::debug!("io_uring: the kernel supports all {} operations the reactors use", REQUIRED_OPS.len());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eperm() -> io::Error {
        io::Error::from_raw_os_error(libc::EPERM)
    }

    fn host(disabled: Option<u8>) -> Host {
        Host { disabled, seccomp: Some(0), groups: vec![1000], ..Host::default() }
    }

    #[test]
    fn sysctl_2_names_the_sysctl_and_its_fix() {
        let d = diagnose(&eperm(), &host(Some(2)));
        assert!(d.contains("kernel.io_uring_disabled = 2"), "{d}");
        assert!(d.contains("sysctl -w kernel.io_uring_disabled=0"), "{d}");
        assert!(!d.contains("seccomp"), "{d}");
    }

    #[test]
    fn sysctl_2_wins_over_a_seccomp_filter() {
        let mut h = host(Some(2));
        h.seccomp = Some(2);
        assert!(diagnose(&eperm(), &h).contains("kernel.io_uring_disabled = 2"));
    }

    #[test]
    fn group_limit_names_the_group_when_not_a_member() {
        let h = Host { group: Some(990), group_name: Some("iouring".into()), ..host(Some(1)) };
        let d = diagnose(&eperm(), &h);
        assert!(d.contains("group iouring (gid 990"), "{d}");
        assert!(d.contains("SupplementaryGroups=iouring"), "{d}");
        assert!(d.contains("usermod -aG iouring"), "{d}");
    }

    #[test]
    fn group_limit_without_a_name_uses_the_gid() {
        let h = Host { group: Some(990), ..host(Some(1)) };
        assert!(diagnose(&eperm(), &h).contains("group 990 (gid 990"));
    }

    #[test]
    fn group_minus_one_means_cap_sys_admin_only() {
        let h = Host { group: Some(-1), ..host(Some(1)) };
        let d = diagnose(&eperm(), &h);
        assert!(d.contains("CAP_SYS_ADMIN"), "{d}");
        assert!(d.contains("kernel.io_uring_group=GID"), "{d}");
    }

    #[test]
    fn a_member_of_the_group_behind_seccomp_gets_the_seccomp_fix() {
        let h = Host { group: Some(1000), seccomp: Some(2), ..host(Some(1)) };
        let d = diagnose(&eperm(), &h);
        assert!(d.contains("--security-opt seccomp=dist/seccomp-uringtgt.json"), "{d}");
    }

    #[test]
    fn seccomp_filter_with_io_uring_enabled() {
        for errno in [libc::EPERM, libc::ENOSYS] {
            let h = Host { seccomp: Some(2), ..host(Some(0)) };
            let d = diagnose(&io::Error::from_raw_os_error(errno), &h);
            assert!(d.contains("seccomp filter"), "{d}");
            assert!(d.contains("--security-opt seccomp=dist/seccomp-uringtgt.json"), "{d}");
        }
        // Kernels before 6.6 have no sysctl at all.
        let h = Host { seccomp: Some(2), ..host(None) };
        assert!(diagnose(&eperm(), &h).contains("kernel.io_uring_disabled = absent"));
    }

    #[test]
    fn other_causes_are_named() {
        let enosys = io::Error::from_raw_os_error(libc::ENOSYS);
        assert!(diagnose(&enosys, &host(None)).contains("CONFIG_IO_URING"));
        assert!(diagnose(&eperm(), &host(Some(0))).contains("security module"));
        let enomem = io::Error::from_raw_os_error(libc::ENOMEM);
        assert!(diagnose(&enomem, &host(Some(0))).contains("LimitMEMLOCK"));
        // ENOMEM is not a refusal: a disabled sysctl is not blamed for it.
        assert!(diagnose(&enomem, &host(Some(2))).contains("RLIMIT_MEMLOCK"));
    }

    #[test]
    fn parses_proc_and_etc_group() {
        let status = "Name:\tx\nSeccomp:\t2\nSeccomp_filters:\t1\n";
        assert_eq!(seccomp_mode(status), Some(2));
        assert_eq!(seccomp_mode("Name:\tx\n"), None);
        let groups = "root:x:0:\niouring:x:990:alice,bob\nbad line\n";
        assert_eq!(group_name(groups, 990).as_deref(), Some("iouring"));
        assert_eq!(group_name(groups, 0).as_deref(), Some("root"));
        assert_eq!(group_name(groups, 5), None);
    }

    #[test]
    fn missing_ops_are_named() {
        assert!(missing_ops(|_| true).is_empty());
        let m = missing_ops(|code| code != opcode::SendMsg::CODE && code != opcode::AsyncCancel::CODE);
        assert_eq!(m, vec!["IORING_OP_SENDMSG", "IORING_OP_ASYNC_CANCEL"]);
        let e = UringError::MissingOps { missing: m };
        assert!(e.to_string().contains("lacks IORING_OP_SENDMSG, IORING_OP_ASYNC_CANCEL"), "{e}");
    }

    #[test]
    fn this_kernel_passes_the_probe() {
        // The machine that runs the tests runs the target too: its kernel must pass.
        check().unwrap();
    }
}
