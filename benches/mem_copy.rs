//! Copies in and out of a RAM store (`MemStore::write`/`read`, relaxed atomic words) against a
//! plain `copy_from_slice` between private buffers (what the store did before it had to be
//! sound under racing reactors), for a 4 KiB and a 128 KiB I/O. Both allocate nothing per copy
//! (checked).

mod support;

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use support::{check_allocs, CountingAlloc};
use uringtgt::backing::MemStore;

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

const STORE: usize = 8 << 20;
/// A 4 KiB-aligned store offset, as block I/O has.
const OFF: usize = 1 << 20;

fn copies(c: &mut Criterion) {
    let store = MemStore::new(STORE as u64).expect("RAM store");
    let mut plain = vec![0u8; STORE];
    for len in [4096usize, 128 << 10] {
        let mut io = vec![0x5au8; len];
        let mut g = c.benchmark_group(format!("mem_copy_{}k", len / 1024));
        g.throughput(Throughput::Bytes(len as u64));
        g.bench_function(BenchmarkId::new("write", "atomic"), |b| {
            b.iter(|| store.write(black_box(OFF as u64), black_box(&io)))
        });
        g.bench_function(BenchmarkId::new("write", "plain"), |b| {
            b.iter(|| black_box(&mut plain[OFF..OFF + len]).copy_from_slice(black_box(&io)))
        });
        g.bench_function(BenchmarkId::new("read", "atomic"), |b| {
            b.iter(|| store.read(black_box(OFF as u64), black_box(&mut io)))
        });
        g.bench_function(BenchmarkId::new("read", "plain"), |b| {
            b.iter(|| black_box(&mut io[..]).copy_from_slice(black_box(&plain[OFF..OFF + len])))
        });
        g.finish();
        check_allocs("MemStore::write", true, || store.write(OFF as u64, &io));
        check_allocs("MemStore::read", true, || store.read(OFF as u64, &mut io));
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).measurement_time(std::time::Duration::from_secs(2));
    targets = copies
}
criterion_main!(benches);
