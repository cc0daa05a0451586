//! Work that must not run on a reactor: a small bounded pool of worker threads for backing
//! operations the ring cannot do (or that take many steps), with completions routed back to
//! the task that asked, and a per-LUN LBA range lock that serialises overlapping commands
//! without ever blocking a thread.
//!
//! A reactor submits a [`Job`]: the work (a closure producing an [`Output`]), the [`Route`]
//! back to its task, and optionally an LBA range of a [`RangeLock`]. The job runs when its
//! range is free (queued in the lock otherwise, and resumed by whoever releases the
//! conflicting range). The finished job's [`Completion`] goes to the pool's `deliver`
//! function, which sends it to the reactor's message channel and wakes the reactor's ring
//! (the eventfd it always has a read posted on): the reactor never waits for a worker.
//!
//! To run a new long command off the reactor, return [`crate::scsi::Disposition::Offload`]
//! from its first phase and add its work to `crate::scsi::execute_offloaded`.

mod range_lock;

pub use range_lock::{LbaRange, RangeLock};

use crate::backing::AlignedBuf;
use crate::scsi::{Disposition, Sense};
use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

/// Default number of worker threads (`offload_threads`).
pub const DEFAULT_THREADS: usize = 2;
/// Jobs that may be outstanding (queued, waiting for a range, or running) per worker; beyond
/// that a submission is refused and the command ends with BUSY status.
pub const JOBS_PER_THREAD: usize = 32;

/// Where a job's completion goes: a task slot of a connection slot of a reactor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    pub reactor: usize,
    pub conn: u32,
    pub task: u16,
}

/// What a job produced.
pub struct Output {
    /// The command's outcome.
    pub disposition: Disposition,
    /// Data-In for [`Disposition::DataIn`] (the first `n` bytes are sent).
    pub data_in: Vec<u8>,
    /// The task's buffer (its Data-Out), handed back for reuse.
    pub buf: Option<AlignedBuf>,
}

/// A finished job, on its way back to its task.
pub struct Completion {
    pub route: Route,
    pub output: Output,
}

/// The work of a job, run on a worker thread.
pub type Work = Box<dyn FnOnce() -> Output + Send>;

/// One unit of work for the pool.
pub struct Job {
    pub route: Route,
    /// The LBA range the work needs to itself, and the lock of its LUN.
    pub lock: Option<(Arc<RangeLock<Job>>, LbaRange)>,
    pub work: Work,
}

/// Errors of the pool.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OffloadError {
    /// The pool holds its maximum of outstanding jobs.
    #[error("{0} offloaded jobs are outstanding; refusing more")]
    Busy(usize),
    #[error("cannot start a worker thread: {0}")]
    Thread(String),
}

struct Queue {
    ready: VecDeque<Job>,
    outstanding: usize,
    stop: bool,
}

type Deliver = Box<dyn Fn(Completion) + Send + Sync>;

struct Inner {
    queue: Mutex<Queue>,
    ready: Condvar,
    capacity: usize,
    deliver: Deliver,
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push_ready(&self, jobs: impl IntoIterator<Item = Job>) {
        let mut q = self.lock();
        for j in jobs {
            q.ready.push_back(j);
            self.ready.notify_one();
        }
    }
}

/// The worker pool of a target.
pub struct Pool {
    inner: Arc<Inner>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// No workers: jobs run inside `submit` (see [`Pool::inline`]).
    inline: bool,
}

impl Pool {
    /// Starts `threads` workers; finished jobs are handed to `deliver` on the worker.
    pub fn new(threads: usize, deliver: impl Fn(Completion) + Send + Sync + 'static) -> Result<Self, OffloadError> {
        let threads = threads.max(1);
        let inner = Arc::new(Inner {
            queue: Mutex::new(Queue { ready: VecDeque::new(), outstanding: 0, stop: false }),
            ready: Condvar::new(),
            capacity: threads * JOBS_PER_THREAD,
            deliver: Box::new(deliver),
        });
        let pool = Self { inner, threads: Mutex::new(Vec::new()), inline: false };
        for i in 0..threads {
            let inner = pool.inner.clone();
            let t = std::thread::Builder::new()
                .name(format!("offload-{i}"))
                .spawn(move || worker(&inner))
                .map_err(|e| OffloadError::Thread(e.to_string()))?;
            pool.threads.lock().unwrap_or_else(|e| e.into_inner()).push(t);
        }
        Ok(pool)
    }

    /// A pool without threads: each job runs on the thread that submits it, and is delivered,
    /// before `submit` returns. For driving a connection without reactors (the fuzz harness),
    /// where a run must be reproducible; a target always uses [`Pool::new`].
    pub fn inline(deliver: impl Fn(Completion) + Send + Sync + 'static) -> Self {
        let inner = Arc::new(Inner {
            queue: Mutex::new(Queue { ready: VecDeque::new(), outstanding: 0, stop: false }),
            ready: Condvar::new(),
            capacity: JOBS_PER_THREAD,
            deliver: Box::new(deliver),
        });
        Self { inner, threads: Mutex::new(Vec::new()), inline: true }
    }

    /// Queues a job; it runs once its range (if any) is free. Never blocks on a range or on
    /// a worker; refused when the pool is at capacity.
    pub fn submit(&self, job: Job) -> Result<(), OffloadError> {
        {
            let mut q = self.inner.lock();
            if q.outstanding >= self.inner.capacity {
                return Err(OffloadError::Busy(q.outstanding));
            }
            q.outstanding += 1;
        }
        let job = match &job.lock {
            Some((lock, range)) => {
                let (lock, range) = (lock.clone(), *range);
                match lock.acquire(range, job) {
                    Some(job) => job,
                    None => return Ok(()), // resumed by the release of the conflicting range
                }
            }
            None => job,
        };
        self.inner.push_ready([job]);
        if self.inline {
            // Every job runs to its end here, so no range stays held past this loop.
            loop {
                let Some(job) = self.inner.lock().ready.pop_front() else { break };
                run(&self.inner, job);
            }
        }
        Ok(())
    }

    /// Jobs submitted and not yet completed.
    pub fn outstanding(&self) -> usize {
        self.inner.lock().outstanding
    }

    /// Lets the workers finish what is queued, then stops them.
    pub fn shutdown(&self) {
        self.inner.lock().stop = true;
        self.inner.ready.notify_all();
        for t in std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner())) {
            let _ = t.join();
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn worker(inner: &Inner) {
    loop {
        let job = {
            let mut q = inner.lock();
            loop {
                if let Some(j) = q.ready.pop_front() {
                    break j;
                }
                if q.stop {
                    return;
                }
                q = inner.ready.wait(q).unwrap_or_else(|e| e.into_inner());
            }
        };
        run(inner, job);
    }
}

/// Runs one job, frees its range (readying the jobs that waited for it) and delivers it.
fn run(inner: &Inner, job: Job) {
    let Job { route, lock, work } = job;
    let output = std::panic::catch_unwind(std::panic::AssertUnwindSafe(work)).unwrap_or_else(|_| {
        log::error!("offloaded job for task {route:?} panicked");
        Output {
            // INTERNAL TARGET FAILURE.
            disposition: Disposition::Check(Sense::new(crate::scsi::SenseKey::HardwareError, 0x44, 0x00)),
            data_in: Vec::new(),
            buf: None,
        }
    });
    if let Some((lock, range)) = lock {
        inner.push_ready(lock.release(range));
    }
    inner.lock().outstanding -= 1;
    (inner.deliver)(Completion { route, output });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    fn route(task: u16) -> Route {
        Route { reactor: 0, conn: 0, task }
    }

    fn good() -> Output {
        Output { disposition: Disposition::Good, data_in: Vec::new(), buf: None }
    }

    fn pool(threads: usize) -> (Pool, crossbeam_channel::Receiver<Completion>) {
        let (tx, rx) = crossbeam_channel::unbounded();
        let p = Pool::new(threads, move |c| tx.send(c).unwrap()).unwrap();
        (p, rx)
    }

    #[test]
    fn jobs_run_off_thread_and_complete_to_their_route() {
        let (p, rx) = pool(2);
        let me = std::thread::current().id();
        for t in 0..5u16 {
            let work: Work = Box::new(move || {
                assert_ne!(std::thread::current().id(), me, "ran on the submitting thread");
                Output { disposition: Disposition::DataIn(usize::from(t)), data_in: vec![t as u8], buf: None }
            });
            p.submit(Job { route: route(t), lock: None, work }).unwrap();
        }
        let mut seen: Vec<u16> = (0..5)
            .map(|_| {
                let c = rx.recv_timeout(Duration::from_secs(5)).unwrap();
                assert_eq!(c.output.disposition, Disposition::DataIn(usize::from(c.route.task)));
                assert_eq!(c.output.data_in, vec![c.route.task as u8]);
                c.route.task
            })
            .collect();
        seen.sort();
        assert_eq!(seen, vec![0, 1, 2, 3, 4]);
        assert_eq!(p.outstanding(), 0);
    }

    #[test]
    fn submissions_beyond_capacity_are_refused_not_queued() {
        let (p, rx) = pool(1);
        let (hold_tx, hold_rx) = crossbeam_channel::bounded::<()>(0);
        let hold_rx = Arc::new(Mutex::new(hold_rx));
        for t in 0..JOBS_PER_THREAD as u16 {
            let h = hold_rx.clone();
            let work: Work = Box::new(move || {
                let _ = h.lock().unwrap().recv();
                good()
            });
            p.submit(Job { route: route(t), lock: None, work }).unwrap();
        }
        let extra = Job { route: route(999), lock: None, work: Box::new(good) };
        assert_eq!(p.submit(extra), Err(OffloadError::Busy(JOBS_PER_THREAD)));
        drop(hold_tx); // every held job returns
        for _ in 0..JOBS_PER_THREAD {
            rx.recv_timeout(Duration::from_secs(5)).unwrap();
        }
        assert_eq!(p.outstanding(), 0);
        p.submit(Job { route: route(1000), lock: None, work: Box::new(good) }).unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap().route.task, 1000);
    }

    #[test]
    fn overlapping_jobs_run_one_at_a_time_in_order() {
        let (p, rx) = pool(4);
        let lock: Arc<RangeLock<Job>> = Arc::new(RangeLock::default());
        let running = Arc::new(AtomicUsize::new(0));
        let order = Arc::new(Mutex::new(Vec::new()));
        for t in 0..8u16 {
            let (running, order) = (running.clone(), order.clone());
            let work: Work = Box::new(move || {
                assert_eq!(running.fetch_add(1, Ordering::SeqCst), 0, "two overlapping jobs at once");
                std::thread::sleep(Duration::from_millis(5));
                order.lock().unwrap().push(t);
                running.fetch_sub(1, Ordering::SeqCst);
                good()
            });
            // Every range overlaps the next: 0..10, 5..15, 10..20 ...
            let range = LbaRange::new(u64::from(t) * 5, 10);
            p.submit(Job { route: route(t), lock: Some((lock.clone(), range)), work }).unwrap();
        }
        for _ in 0..8 {
            rx.recv_timeout(Duration::from_secs(5)).unwrap();
        }
        assert_eq!(*order.lock().unwrap(), (0..8).collect::<Vec<u16>>());
        assert_eq!(lock.counts(), (0, 0));
    }

    #[test]
    fn disjoint_jobs_overlap_in_time() {
        let (p, rx) = pool(2);
        let lock: Arc<RangeLock<Job>> = Arc::new(RangeLock::default());
        let barrier = Arc::new(std::sync::Barrier::new(2));
        for t in 0..2u16 {
            let b = barrier.clone();
            // Both must be running at once to pass the barrier.
            let work: Work = Box::new(move || {
                b.wait();
                good()
            });
            let range = LbaRange::new(u64::from(t) * 100, 10);
            p.submit(Job { route: route(t), lock: Some((lock.clone(), range)), work }).unwrap();
        }
        for _ in 0..2 {
            rx.recv_timeout(Duration::from_secs(5)).unwrap();
        }
    }

    #[test]
    fn an_inline_pool_runs_each_job_inside_submit() {
        let (tx, rx) = crossbeam_channel::unbounded();
        let p = Pool::inline(move |c| tx.send(c).unwrap());
        let lock: Arc<RangeLock<Job>> = Arc::new(RangeLock::default());
        let me = std::thread::current().id();
        for t in 0..3u16 {
            let work: Work = Box::new(move || {
                assert_eq!(std::thread::current().id(), me, "an inline job ran on another thread");
                Output { disposition: Disposition::DataIn(usize::from(t)), data_in: Vec::new(), buf: None }
            });
            // The same range each time: held only while its job runs.
            p.submit(Job { route: route(t), lock: Some((lock.clone(), LbaRange::new(0, 8))), work }).unwrap();
            assert_eq!(rx.try_recv().unwrap().route.task, t, "not delivered before submit returned");
            assert_eq!(p.outstanding(), 0);
            assert_eq!(lock.counts(), (0, 0));
        }
    }

    #[test]
    fn a_panicking_job_still_completes_and_releases_its_range() {
        let (p, rx) = pool(1);
        let lock: Arc<RangeLock<Job>> = Arc::new(RangeLock::default());
        let work: Work = Box::new(|| panic!("boom"));
        p.submit(Job { route: route(1), lock: Some((lock.clone(), LbaRange::new(0, 8))), work }).unwrap();
        p.submit(Job { route: route(2), lock: Some((lock.clone(), LbaRange::new(0, 8))), work: Box::new(good) })
            .unwrap();
        let first = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(first.route.task, 1);
        assert!(matches!(first.output.disposition, Disposition::Check(ref s) if s.asc == 0x44));
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap().route.task, 2);
    }
}
