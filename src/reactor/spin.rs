//! How an adaptive reactor waits: when to spin on its completion queue and when to sleep in
//! `io_uring_enter`.
//!
//! Two layers. [`SpinPolicy`] decides, idle period by idle period, whether a spin is likely to
//! end in work (the gaps between completions are short). That is not enough: a gap of 30 µs
//! looks the same whether the initiator waits for our response to send the next command
//! (queue depth 1, where sleeping adds a wake-up to every round trip and halves the IOPS) or
//! sends on its own clock (a fixed rate, where spinning burns the whole gap and gains nothing).
//! [`ArmChooser`] tells them apart the only sure way, by trying: now and then it runs one short
//! epoch with spinning forbidden and compares the load the initiators offered (bytes received)
//! with the epochs around it. If sleeping costs nothing measurable, the reactor sleeps; if
//! spinning (tried the same way) brings more work, it spins again.

use std::time::{Duration, Instant};

/// How long an adaptive reactor keeps spinning after its last completion, at most.
pub(super) const SPIN: Duration = Duration::from_micros(50);
/// An adaptive reactor spins only while the next completion typically comes sooner than this
/// after the last: about a wake-up's latency here. Then the initiator is waiting on us in a
/// tight loop (low queue depth, or a saturated queue) and sleeping would add more latency than
/// the gap itself; longer gaps (a moderate, steady rate) are slept through, so such a reactor
/// does not burn its core between commands. At 25 µs a QD1 initiator whose turnaround had
/// grown to ~30 µs (a busier host) lost the spin: 10.7k IOPS, level with tgt, against 24.3k at
/// 40 µs, while a 30k IOPS fixed rate costs no more CPU (fio's rate limiting sends in bursts).
const SPIN_WORTH: Duration = Duration::from_micros(40);
/// While sleeping through its gaps, an adaptive reactor still spins one idle period in this
/// many, to notice when the gaps have become short again (a slept gap says nothing about that).
const PROBE_EVERY: u32 = 16;

/// Decides how long an adaptive reactor spins in each idle period before it sleeps.
///
/// Only periods ended while spinning teach it the true gap (one slept through lasts as long as
/// the wake-up, whatever the gap was); a spin that runs out counts as a gap of [`SPIN`].
#[derive(Debug)]
pub(super) struct SpinPolicy {
    /// Exponentially weighted mean idle gap in nanoseconds (weight 1/8 per gap learnt).
    mean_gap_ns: u64,
    /// Idle periods slept through since the last probe spin.
    slept: u32,
}

impl SpinPolicy {
    pub(super) fn new() -> Self {
        Self { mean_gap_ns: 0, slept: 0 }
    }

    /// An idle period begins: how long to spin in it before sleeping.
    pub(super) fn begin_idle(&mut self) -> Duration {
        if self.mean_gap_ns < SPIN_WORTH.as_nanos() as u64 {
            return SPIN;
        }
        self.slept += 1;
        if self.slept >= PROBE_EVERY {
            self.slept = 0;
            return SPIN;
        }
        Duration::ZERO
    }

    /// The idle period ended after `gap`; `spun` is what [`Self::begin_idle`] allowed and
    /// `slept` whether the reactor went to sleep in it.
    pub(super) fn end_idle(&mut self, gap: Duration, spun: Duration, slept: bool) {
        let learnt = match (slept, spun.is_zero()) {
            (false, _) => gap,
            (true, false) => spun,
            (true, true) => return,
        };
        let g = u64::try_from(learnt.as_nanos()).unwrap_or(u64::MAX);
        self.mean_gap_ns = self.mean_gap_ns - self.mean_gap_ns / 8 + g / 8;
    }
}

/// Whether an adaptive reactor may spin in its idle periods at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Arm {
    /// Spin as [`SpinPolicy`] says.
    Spin,
    /// Sleep as soon as the completion queue is empty (after a few dozen polls).
    Sleep,
}

impl Arm {
    fn other(self) -> Self {
        match self {
            Arm::Spin => Arm::Sleep,
            Arm::Sleep => Arm::Spin,
        }
    }
}

/// Length of one measuring epoch. Long enough that a few hundred commands fall in it at
/// modest rates (rate noise of a few percent), short enough that a losing trial costs little.
const EPOCH: Duration = Duration::from_millis(50);
/// Epochs between trials: from `MIN_INTERVAL`, doubled by each trial that confirms the arm
/// in use, back to `MIN_INTERVAL` on a switch or when the load changes. At the maximum a
/// trial that loses (sleeping at queue depth 1 halves the rate) costs ~1% of throughput.
const MIN_INTERVAL: u32 = 4;
const MAX_INTERVAL: u32 = 64;
/// Sleeping is chosen when it keeps at least `1 - TOLERANCE` of the spinning rate; spinning
/// when it brings more than `1 + TOLERANCE` of the sleeping rate. Below this, the difference
/// is the host's noise, and sleeping saves the core.
const TOLERANCE: f64 = 0.03;
/// A trial is judged only if the epochs before and after it (same arm) agree within this:
/// otherwise the load changed under it and the comparison means nothing.
const STEADY: f64 = 0.20;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    /// Epochs on the chosen arm until the next trial.
    Steady { left: u32 },
    /// The trial epoch, on the other arm; `before` is the rate of the epoch before it.
    Trial { before: f64 },
    /// Back on the chosen arm for one epoch, to compare against.
    After { before: f64, trial: f64 },
}

/// Chooses the [`Arm`] of an adaptive reactor by measurement (see the module comment).
#[derive(Debug)]
pub(super) struct ArmChooser {
    /// The arm preferred by the last judged trial.
    chosen: Arm,
    phase: Phase,
    interval: u32,
    epoch_start: Instant,
    epoch_bytes: u64,
    /// Rate of the last steady epoch, to notice a change of load.
    last_rate: f64,
}

impl ArmChooser {
    pub(super) fn new(now: Instant) -> Self {
        Self {
            chosen: Arm::Spin,
            phase: Phase::Steady { left: MIN_INTERVAL },
            interval: MIN_INTERVAL,
            epoch_start: now,
            epoch_bytes: 0,
            last_rate: 0.0,
        }
    }

    /// The arm to use now.
    pub(super) fn arm(&self) -> Arm {
        match self.phase {
            Phase::Trial { .. } => self.chosen.other(),
            _ => self.chosen,
        }
    }

    /// Bytes received from initiators: the offered load, the same per command whichever
    /// arm runs (unlike completions, which batch differently when the reactor sleeps).
    pub(super) fn received(&mut self, bytes: usize) {
        self.epoch_bytes += bytes as u64;
    }

    /// Called when the reactor has work (the clock is read then anyway); ends the epoch when
    /// it is due and moves through the trial.
    pub(super) fn at(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.epoch_start);
        if elapsed < EPOCH {
            return;
        }
        let rate = self.epoch_bytes as f64 / elapsed.as_secs_f64();
        self.epoch_start = now;
        self.epoch_bytes = 0;
        self.phase = match self.phase {
            Phase::Steady { left } => {
                let changed = rate > 2.0 * self.last_rate || self.last_rate > 2.0 * rate;
                self.last_rate = rate;
                if changed {
                    self.interval = MIN_INTERVAL;
                }
                match left.min(self.interval) {
                    0 => Phase::Trial { before: rate },
                    n => Phase::Steady { left: n - 1 },
                }
            }
            Phase::Trial { before } => Phase::After { before, trial: rate },
            Phase::After { before, trial } => {
                self.last_rate = rate;
                self.judge(before, trial, rate);
                Phase::Steady { left: self.interval }
            }
        };
    }

    fn judge(&mut self, before: f64, trial: f64, after: f64) {
        let reference = (before + after) / 2.0;
        if (before - after).abs() > STEADY * reference {
            self.interval = MIN_INTERVAL;
            return;
        }
        let other = self.chosen.other();
        let better = match other {
            Arm::Sleep => trial >= reference * (1.0 - TOLERANCE),
            Arm::Spin => trial > reference * (1.0 + TOLERANCE),
        };
        if better {
            log::debug!("reactor idle: {other:?} ({trial:.0} B/s against {reference:.0} B/s)");
            self.chosen = other;
            self.interval = MIN_INTERVAL;
        } else {
            self.interval = (self.interval * 2).min(MAX_INTERVAL);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `n` idle periods of `gap` through the policy as the reactor loop would.
    fn idle_periods(p: &mut SpinPolicy, gap: Duration, n: usize) -> usize {
        let mut spun_periods = 0;
        for _ in 0..n {
            let spun = p.begin_idle();
            if !spun.is_zero() {
                spun_periods += 1;
            }
            // Caught while spinning only when the gap ends within the spin.
            p.end_idle(gap, spun, gap > spun);
        }
        spun_periods
    }

    #[test]
    fn adaptive_reactor_spins_while_work_comes_back_to_back() {
        let mut p = SpinPolicy::new();
        assert_eq!(idle_periods(&mut p, Duration::from_micros(2), 1000), 1000);
    }

    #[test]
    fn adaptive_reactor_keeps_spinning_for_a_queue_depth_one_round_trip() {
        let mut p = SpinPolicy::new();
        assert_eq!(idle_periods(&mut p, Duration::from_micros(18), 1000), 1000);
        // ... also when the initiator's turnaround is slower (a busy host).
        assert_eq!(idle_periods(&mut p, Duration::from_micros(32), 1000), 1000);
    }

    #[test]
    fn adaptive_reactor_sleeps_through_gaps_of_a_moderate_rate() {
        let mut p = SpinPolicy::new();
        // 22k IOPS spread evenly: a command every ~45 µs. After learning, only probes spin.
        idle_periods(&mut p, Duration::from_micros(45), 100);
        let spun = idle_periods(&mut p, Duration::from_micros(45), 1600);
        assert_eq!(spun, 1600 / PROBE_EVERY as usize);
        // Gaps longer than a spin: the probes run out and it stays asleep.
        let spun = idle_periods(&mut p, Duration::from_millis(1), 1600);
        assert_eq!(spun, 1600 / PROBE_EVERY as usize);
    }

    #[test]
    fn adaptive_reactor_goes_back_to_spinning_when_gaps_shorten() {
        let mut p = SpinPolicy::new();
        idle_periods(&mut p, Duration::from_millis(5), 200);
        assert_eq!(p.begin_idle(), Duration::ZERO);
        // Slept periods teach nothing; the probes do, and a few dozen probes are enough.
        let mut periods = 0;
        while p.mean_gap_ns >= SPIN_WORTH.as_nanos() as u64 {
            idle_periods(&mut p, Duration::from_micros(3), 1);
            periods += 1;
            assert!(periods < 64 * PROBE_EVERY as usize, "still asleep after {periods} short gaps");
        }
        assert_eq!(idle_periods(&mut p, Duration::from_micros(3), 100), 100);
    }

    /// Drives the chooser through `epochs` epochs in which the initiators offer
    /// `rate(arm)` bytes per second; returns how many epochs ran on each arm.
    fn run(c: &mut ArmChooser, now: &mut Instant, epochs: usize, rate: impl Fn(Arm) -> f64) -> (usize, usize) {
        let (mut spin, mut sleep) = (0, 0);
        for _ in 0..epochs {
            let arm = c.arm();
            match arm {
                Arm::Spin => spin += 1,
                Arm::Sleep => sleep += 1,
            }
            c.received((rate(arm) * EPOCH.as_secs_f64()) as usize);
            *now += EPOCH;
            c.at(*now);
        }
        (spin, sleep)
    }

    #[test]
    fn a_fixed_rate_that_sleeping_does_not_slow_is_slept_through() {
        let mut now = Instant::now();
        let mut c = ArmChooser::new(now);
        // 30k 4 KiB writes per second whichever arm: the initiator sends on its own clock.
        run(&mut c, &mut now, 20, |_| 30_000.0 * 4144.0);
        assert_eq!(c.chosen, Arm::Sleep);
        // Afterwards spinning is only tried, ever more rarely.
        let (spin, sleep) = run(&mut c, &mut now, 2000, |_| 30_000.0 * 4144.0);
        assert!(spin <= 2000 / 20, "spun {spin} of {} epochs", spin + sleep);
    }

    #[test]
    fn a_queue_depth_one_initiator_keeps_the_reactor_spinning() {
        let mut now = Instant::now();
        let mut c = ArmChooser::new(now);
        // Sleeping adds a wake-up to every round trip: 24k commands/s spinning, 11k asleep.
        let qd1 = |arm| if arm == Arm::Spin { 24_000.0 * 48.0 } else { 11_000.0 * 48.0 };
        let (spin, sleep) = run(&mut c, &mut now, 2000, qd1);
        assert_eq!(c.chosen, Arm::Spin);
        // The sleeping trials become rare: under 3% of the time.
        assert!(sleep * 100 < (spin + sleep) * 3, "slept {sleep} of {} epochs", spin + sleep);
    }

    #[test]
    fn a_small_loss_from_sleeping_keeps_the_spin() {
        let mut now = Instant::now();
        let mut c = ArmChooser::new(now);
        // A saturated queue: sleeping loses 6% of the rate.
        run(&mut c, &mut now, 500, |arm| if arm == Arm::Spin { 100.0e6 } else { 94.0e6 });
        assert_eq!(c.chosen, Arm::Spin);
    }

    #[test]
    fn an_idle_reactor_sleeps_and_spins_again_when_spinning_pays() {
        let mut now = Instant::now();
        let mut c = ArmChooser::new(now);
        run(&mut c, &mut now, 20, |_| 0.0);
        assert_eq!(c.chosen, Arm::Sleep);
        // Then a queue-depth-1 initiator logs in: within a few trials it spins.
        run(&mut c, &mut now, 40, |arm| if arm == Arm::Spin { 2.0e6 } else { 1.0e6 });
        assert_eq!(c.chosen, Arm::Spin);
    }

    #[test]
    fn a_trial_is_not_judged_while_the_load_changes() {
        let mut now = Instant::now();
        let mut c = ArmChooser::new(now);
        // The load triples across the trial: the trial epoch alone would look like sleeping
        // costs nothing, but the epochs around it disagree, so the spin stays.
        for _ in 0..=MIN_INTERVAL {
            c.received(1_000_000);
            now += EPOCH;
            c.at(now);
        }
        assert_eq!(c.arm(), Arm::Sleep, "the trial epoch runs on the other arm");
        c.received(2_000_000);
        now += EPOCH;
        c.at(now);
        c.received(3_000_000);
        now += EPOCH;
        c.at(now);
        assert_eq!(c.chosen, Arm::Spin);
        assert_eq!(c.arm(), Arm::Spin);
    }

    #[test]
    fn epochs_end_only_after_their_length() {
        let now = Instant::now();
        let mut c = ArmChooser::new(now);
        for i in 0..1000 {
            c.received(4096);
            c.at(now + EPOCH / 2000 * i);
        }
        assert_eq!(c.phase, Phase::Steady { left: MIN_INTERVAL });
        assert_eq!(c.epoch_bytes, 4096 * 1000);
    }
}
