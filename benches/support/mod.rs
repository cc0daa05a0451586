//! Shared by the benches: a global allocator that counts allocations, so a bench can prove
//! that a hot-path operation allocates nothing (criterion only measures time).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};

/// Counts every allocation (and reallocation) and forwards it to the system allocator.
pub struct CountingAlloc;

static ALLOCS: AtomicU64 = AtomicU64::new(0);

// SAFETY: every method forwards to `System` with the caller's arguments unchanged; the
// counter is a relaxed atomic and does not allocate.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as ours, forwarded.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as ours, forwarded.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as ours, forwarded.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours, forwarded.
        unsafe { System.dealloc(ptr, layout) }
    }
}

/// Allocations (and reallocations) by every thread of the process so far.
pub fn allocations() -> u64 {
    ALLOCS.load(Ordering::Relaxed)
}

/// Iterations the allocation check runs; enough to catch an allocation that happens only
/// now and then (a Vec growing, a cache refilling).
const CHECK_ITERS: u64 = 10_000;

/// Heap allocations per call of `f`, averaged over [`CHECK_ITERS`] calls after one warm-up
/// call (first-use set-up, such as a unit attention being reported, is not the hot path).
pub fn allocs_per_iter(mut f: impl FnMut()) -> f64 {
    f();
    let before = allocations();
    for _ in 0..CHECK_ITERS {
        f();
    }
    let n = allocations() - before;
    n as f64 / CHECK_ITERS as f64
}

/// Prints the allocations per call of `f`; panics when a hot-path operation allocates.
pub fn check_allocs(name: &str, hot_path: bool, f: impl FnMut()) {
    let per_iter = allocs_per_iter(f);
    println!("allocations/iter {name}: {per_iter}");
    assert!(!hot_path || per_iter == 0.0, "hot-path operation {name} allocates: {per_iter} per iteration");
}
