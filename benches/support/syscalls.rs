//! Kernel event counts per thread of this process, through perf_event_open(2) on tracepoints:
//! every system call (`raw_syscalls:sys_enter`), `io_uring_enter` calls
//! (`syscalls:sys_enter_io_uring_enter`) and io_uring requests submitted
//! (`io_uring:io_uring_submit_req`). Counting needs tracefs and the right to open kernel
//! tracepoint counters (root, CAP_PERFMON or a low `perf_event_paranoid`); where it is not
//! allowed, [`Counters::open`] says why and the bench prints that instead of numbers.

use std::fs::{self, File};
use std::io::Read;
use std::os::fd::FromRawFd;

/// The events counted, by tracefs name.
pub const EVENTS: [&str; 3] =
    ["raw_syscalls/sys_enter", "syscalls/sys_enter_io_uring_enter", "io_uring/io_uring_submit_req"];

const PERF_TYPE_TRACEPOINT: u32 = 2;
const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 8;
/// `perf_event_attr` up to `sample_max_stack` (PERF_ATTR_SIZE_VER5); the kernel takes any
/// size it knows.
const ATTR_SIZE: usize = 112;

/// One thread's counters: its name (`comm`) and one open counter per event of [`EVENTS`].
struct ThreadCounters {
    name: String,
    files: Vec<File>,
}

/// Counters on every thread of the process that existed when they were opened; the thread
/// that opens them is named `initiator (bench)`, the others by their `comm`.
pub struct Counters {
    threads: Vec<ThreadCounters>,
}

/// Counts since [`Counters::open`], summed per thread name: (name, one count per event).
pub type Snapshot = Vec<(String, [u64; 3])>;

fn tracepoint_id(event: &str) -> Result<u64, String> {
    for root in ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"] {
        if let Ok(s) = fs::read_to_string(format!("{root}/events/{event}/id")) {
            return s.trim().parse().map_err(|e| format!("tracepoint {event}: id {s:?}: {e}"));
        }
    }
    Err(format!("tracepoint {event} not found (is tracefs mounted at /sys/kernel/tracing?)"))
}

/// A counting (not sampling) tracepoint counter on one thread, enabled at once.
fn open_counter(tid: i32, id: u64) -> std::io::Result<File> {
    // perf_event_attr, written at its byte offsets: type, size, config; every other field
    // zero (enabled, no sampling, kernel events included).
    let mut attr = [0u64; ATTR_SIZE / 8];
    attr[0] = u64::from(PERF_TYPE_TRACEPOINT) | ((ATTR_SIZE as u64) << 32);
    attr[1] = id;
    // SAFETY: `attr` is a zero-initialised buffer of ATTR_SIZE bytes that lives across the
    // call; the other arguments are plain integers (pid = the thread, cpu = -1: any CPU,
    // group_fd = -1: no group).
    let fd =
        unsafe { libc::syscall(libc::SYS_perf_event_open, attr.as_ptr(), tid, -1i32, -1i32, PERF_FLAG_FD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: perf_event_open returned a new descriptor that nothing else owns.
    Ok(unsafe { File::from_raw_fd(fd as i32) })
}

impl Counters {
    /// Opens the counters on every current thread of this process.
    pub fn open() -> Result<Self, String> {
        let ids = EVENTS.iter().map(|e| tracepoint_id(e)).collect::<Result<Vec<_>, _>>()?;
        let mut threads = Vec::new();
        // SAFETY: gettid has no preconditions.
        let me = unsafe { libc::gettid() };
        for entry in fs::read_dir("/proc/self/task").map_err(|e| format!("/proc/self/task: {e}"))? {
            let Ok(entry) = entry else { continue };
            let Some(tid) = entry.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
            let name = if tid == me {
                "initiator (bench)".to_string()
            } else {
                fs::read_to_string(entry.path().join("comm")).unwrap_or_default().trim().to_string()
            };
            let files = ids
                .iter()
                .map(|&id| open_counter(tid, id))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("perf_event_open on thread {tid} ({name}): {e}"))?;
            threads.push(ThreadCounters { name, files });
        }
        Ok(Self { threads })
    }

    /// Counts so far, summed over threads of the same name.
    pub fn read(&mut self) -> Snapshot {
        let mut out: Snapshot = Vec::new();
        for t in &mut self.threads {
            let mut counts = [0u64; 3];
            for (c, f) in counts.iter_mut().zip(&mut t.files) {
                let mut b = [0u8; 8];
                // A thread that has ended keeps its last count.
                if f.read_exact(&mut b).is_ok() {
                    *c = u64::from_ne_bytes(b);
                }
            }
            match out.iter_mut().find(|(n, _)| *n == t.name) {
                Some((_, sum)) => sum.iter_mut().zip(counts).for_each(|(s, c)| *s += c),
                None => out.push((t.name.clone(), counts)),
            }
        }
        out
    }
}

/// `after - before`, per thread name.
pub fn delta(before: &Snapshot, after: &Snapshot) -> Snapshot {
    after
        .iter()
        .map(|(name, a)| {
            let b = before.iter().find(|(n, _)| n == name).map_or([0; 3], |(_, c)| *c);
            (name.clone(), [a[0] - b[0], a[1] - b[1], a[2] - b[2]])
        })
        .collect()
}
