//! Per-reactor I/O statistics: operation and byte counts and latency histograms per LUN.
//!
//! Each reactor records into its own histograms (no sharing, no locks); the control thread
//! asks every reactor for a copy and merges them.

use hdrhistogram::Histogram;
use std::time::Duration;

/// Latencies are recorded in nanoseconds, from 1 ns to 60 s, with 3 significant digits.
const MAX_LATENCY_NS: u64 = 60_000_000_000;

/// Counts and latencies of one kind of operation.
#[derive(Clone)]
pub struct OpStats {
    pub ops: u64,
    pub bytes: u64,
    pub latency_ns: Histogram<u64>,
}

impl Default for OpStats {
    fn default() -> Self {
        Self {
            ops: 0,
            bytes: 0,
            latency_ns: Histogram::new_with_bounds(1, MAX_LATENCY_NS, 3).expect("valid histogram bounds"),
        }
    }
}

impl OpStats {
    fn record(&mut self, bytes: u32, latency: Duration) {
        self.ops += 1;
        self.bytes += u64::from(bytes);
        let ns = (latency.as_nanos() as u64).clamp(1, MAX_LATENCY_NS);
        self.latency_ns.saturating_record(ns);
    }

    /// Adds another reactor's numbers to these.
    pub fn merge(&mut self, other: &OpStats) {
        self.ops += other.ops;
        self.bytes += other.bytes;
        // Same bounds on both sides: adding cannot fail.
        let _ = self.latency_ns.add(&other.latency_ns);
    }
}

/// Reads and writes of one LUN on one reactor.
#[derive(Clone, Default)]
pub struct LunStats {
    pub read: OpStats,
    pub write: OpStats,
}

/// A snapshot of one reactor's statistics.
#[derive(Clone, Default)]
pub struct ReactorStats {
    pub reactor: usize,
    pub connections: usize,
    /// (LUN id, stats) for every LUN this reactor served I/O for.
    pub luns: Vec<(u64, LunStats)>,
    /// Its task buffer memory (`limits.buffer_memory_mib`).
    pub buffers: crate::backing::pool::PoolStats,
}

/// The live statistics a reactor records into.
#[derive(Default)]
pub struct Stats {
    /// Indexed by LUN id; a LUN's entry is created at its first I/O here.
    luns: Vec<Option<Box<LunStats>>>,
    /// Reads and writes completed, all LUNs together.
    ios: u64,
}

impl Stats {
    fn lun(&mut self, id: u64) -> &mut LunStats {
        let i = id as usize;
        if self.luns.len() <= i {
            self.luns.resize_with(i + 1, || None);
        }
        self.luns[i].get_or_insert_with(Box::default)
    }

    pub fn record_read(&mut self, lun: u64, bytes: u32, latency: Duration) {
        self.ios += 1;
        self.lun(lun).read.record(bytes, latency);
    }

    pub fn record_write(&mut self, lun: u64, bytes: u32, latency: Duration) {
        self.ios += 1;
        self.lun(lun).write.record(bytes, latency);
    }

    /// Reads and writes completed so far.
    pub fn ios(&self) -> u64 {
        self.ios
    }

    pub fn snapshot(
        &self,
        reactor: usize,
        connections: usize,
        buffers: crate::backing::pool::PoolStats,
    ) -> ReactorStats {
        let luns = self.luns.iter().enumerate().filter_map(|(i, s)| s.as_ref().map(|s| (i as u64, (**s).clone())));
        ReactorStats { reactor, connections, luns: luns.collect(), buffers }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_and_merges() {
        let mut a = Stats::default();
        a.record_read(3, 4096, Duration::from_micros(50));
        a.record_read(3, 4096, Duration::from_micros(150));
        a.record_write(0, 512, Duration::from_millis(2));
        let snap = a.snapshot(1, 2, Default::default());
        assert_eq!(snap.luns.len(), 2);
        let (id, l3) = &snap.luns[1];
        assert_eq!(*id, 3);
        assert_eq!((l3.read.ops, l3.read.bytes), (2, 8192));
        let mut merged = l3.read.clone();
        merged.merge(&l3.read);
        assert_eq!(merged.ops, 4);
        assert_eq!(merged.latency_ns.len(), 4);
        let p50 = merged.latency_ns.value_at_quantile(0.5);
        assert!((49_000..=151_000).contains(&p50), "p50 {p50}");
    }
}
