//! How an adaptive reactor waits: when to spin on its completion queue and when to sleep in
//! `io_uring_enter`.
//!
//! Two layers. [`SpinPolicy`] decides, idle period by idle period, whether a spin is likely to
//! end in work (the gaps between completions are short). That is not enough: a gap of 30 µs
//! looks the same whether the initiator waits for our response to send the next command
//! (queue depth 1, where sleeping adds a wake-up to every round trip and halves the IOPS) or
//! sends on its own clock (a fixed rate, where spinning burns the whole gap and gains nothing).
//! [`ArmChooser`] tells them apart the only sure way, by trying: now and then it runs one short
//! epoch on another way of waiting (spin, sleep, and with `poll_mode: frugal` sleep in
//! batches) and compares the load the initiators offered (bytes received) with the epoch
//! before. The cheapest way that costs the initiators nothing measurable wins.

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

/// How an adaptive reactor waits when its completion queue is empty, dearest first (the
/// order matters: [`ArmChooser`] compares arms by it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Arm {
    /// Spin as [`SpinPolicy`] says, then sleep.
    Spin,
    /// Sleep as soon as the completion queue is empty (after a few dozen polls).
    Sleep,
    /// Sleep, and once woken let the kernel gather up to [`BATCH_CQES`] completions for at
    /// most [`BATCH_WAIT`] from the start of the wait: fewer wake-ups, each handling more.
    Batch,
}

/// What a batching wait gathers at most, and for how long (`min_wait_usec` of
/// `io_uring_enter`, kernel 6.12+): at a steady 30k commands/s a wake-up then handles about
/// eight commands instead of three, and the reactor's CPU falls by a third or more
/// (perf/RESULTS.md). The added latency is bounded by this wait, and fio sees it: hence
/// only in `frugal`, where the chooser still keeps it only if it costs no throughput.
pub(super) const BATCH_CQES: usize = 16;
pub(super) const BATCH_WAIT: Duration = Duration::from_micros(400);
/// Batching is tried only while reads and writes complete at least this often: below it
/// wake-ups cost little, and a slow closed loop (a device booting at queue depth 1 with
/// think time) would pay the wait on every command without the rate showing it.
const BATCH_MIN_IOPS: f64 = 5_000.0;

impl Arm {
    const ALL: [Arm; 3] = [Arm::Spin, Arm::Sleep, Arm::Batch];
}

/// Length of one measuring epoch. Long enough that a few hundred commands fall in it at
/// modest rates (rate noise of a few percent), short enough that a losing trial costs little.
const EPOCH: Duration = Duration::from_millis(50);
/// The first, unjudged part of a trial (see [`Phase::Trial`]): long enough for the commands a
/// switch delays (at most a [`BATCH_WAIT`]) to arrive.
const SETTLE: Duration = Duration::from_millis(10);
/// Epochs between trials: from `MIN_INTERVAL`, doubled by each trial that confirms the arm
/// in use, back to `MIN_INTERVAL` on a switch or when the load changes. At the maximum a
/// trial that loses (sleeping at queue depth 1 halves the rate) costs ~1% of throughput.
const MIN_INTERVAL: u32 = 4;
const MAX_INTERVAL: u32 = 64;
/// A cheaper arm is chosen when it keeps at least `1 - CHEAPER_LOSS` of the rate, a dearer
/// one when it brings more than `1 + DEARER_GAIN`. Asymmetric on purpose: at a saturated
/// queue sleeping loses ~5%, within two epochs' noise here (±3%), and must rarely win; at a
/// fixed rate the epochs agree within 1% and the cheaper arm must win.
const CHEAPER_LOSS: f64 = 0.01;
const DEARER_GAIN: f64 = 0.03;
/// A cheaper arm is tried only while the steady epochs' rates stay this close to each other
/// (mean relative change, each capped at 10% so that one change of load passes quickly,
/// weight 1/4 per epoch). An initiator on its own clock (a fixed rate, or idle) offers a
/// steady load; one that waits for us (any queue depth) offers what the host lets both sides
/// do, which on a noisy host swings far more than the few percent sleeping costs, so that a
/// single trial cannot be judged and the reactor keeps spinning.
const QUIET: f64 = 0.02;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    /// Epochs on the chosen arm until the next trial.
    Steady { left: u32 },
    /// A trial on arm `arm`: a short settling epoch ([`SETTLE`]), then one judged against
    /// `before`, the epoch before the trial. The settling one is not comparable: when the
    /// latency changes, commands move between epochs (a fixed-rate initiator's arrive later,
    /// then catch up).
    Trial { arm: Arm, before: f64, settled: bool },
}

/// One epoch's measurements.
#[derive(Debug, Clone, Copy)]
struct Epoch {
    /// Bytes received per second: the offered load, the same per command whichever arm runs
    /// (unlike completions, which batch differently when the reactor sleeps).
    rate: f64,
    /// Reads and writes completed per second.
    iops: f64,
}

/// Chooses the [`Arm`] of an adaptive reactor by measurement (see the module comment).
#[derive(Debug)]
pub(super) struct ArmChooser {
    /// The arm preferred by the last judged trial.
    chosen: Arm,
    phase: Phase,
    interval: u32,
    /// Whether [`Arm::Batch`] may be used: `poll_mode: frugal` and a kernel with
    /// `min_wait_usec`.
    can_batch: bool,
    /// Trials take the other arms in turn: the next one tried is the first after this index.
    last_tried: usize,
    /// Trials lost since the last switch: the interval grows only once every other arm has
    /// lost one, so a second candidate is not left waiting behind a doubled interval.
    lost: u32,
    epoch_start: Instant,
    epoch_bytes: u64,
    /// The reactor's I/O count when the epoch began.
    epoch_ios: u64,
    /// Rate of the last steady epoch, to notice a change of load.
    last_rate: f64,
    /// Mean relative change of the rate between steady epochs (see [`QUIET`]).
    noise: f64,
}

impl ArmChooser {
    pub(super) fn new(now: Instant, can_batch: bool) -> Self {
        Self {
            chosen: Arm::Spin,
            phase: Phase::Steady { left: MIN_INTERVAL },
            interval: MIN_INTERVAL,
            can_batch,
            last_tried: 0,
            lost: 0,
            epoch_start: now,
            epoch_bytes: 0,
            epoch_ios: 0,
            last_rate: 0.0,
            noise: 0.0,
        }
    }

    /// The arm to use now.
    pub(super) fn arm(&self) -> Arm {
        match self.phase {
            Phase::Trial { arm, .. } => arm,
            _ => self.chosen,
        }
    }

    fn epoch_len(&self) -> Duration {
        match self.phase {
            Phase::Trial { settled: false, .. } => SETTLE,
            _ => EPOCH,
        }
    }

    /// A receive completed with `bytes` from an initiator.
    pub(super) fn received(&mut self, bytes: usize) {
        self.epoch_bytes += bytes as u64;
    }

    /// Called when the reactor has work (the clock is read then anyway), with the count of
    /// reads and writes it has completed; ends the epoch when it is due and moves through the
    /// trial.
    pub(super) fn at(&mut self, now: Instant, ios: u64) {
        let elapsed = now.saturating_duration_since(self.epoch_start);
        if elapsed < self.epoch_len() {
            return;
        }
        let secs = elapsed.as_secs_f64();
        let e = Epoch { rate: self.epoch_bytes as f64 / secs, iops: ios.saturating_sub(self.epoch_ios) as f64 / secs };
        self.epoch_start = now;
        self.epoch_bytes = 0;
        self.epoch_ios = ios;
        self.phase = match self.phase {
            Phase::Steady { left } => self.steady(left, e),
            Phase::Trial { arm, before, settled: false } => Phase::Trial { arm, before, settled: true },
            Phase::Trial { arm, before, settled: true } => {
                self.judge(arm, before, e.rate);
                Phase::Steady { left: self.interval }
            }
        };
    }

    fn steady(&mut self, left: u32, e: Epoch) -> Phase {
        let top = e.rate.max(self.last_rate);
        let change = if top > 0.0 { (e.rate - self.last_rate).abs() / top } else { 0.0 };
        self.noise += (change.min(0.1) - self.noise) / 4.0;
        self.last_rate = e.rate;
        if change > 0.5 {
            // The load more than doubled or halved: try again soon.
            self.interval = MIN_INTERVAL;
        }
        // Batching is for a busy reactor only: once the I/O rate falls, stop at once (a
        // queue-depth-1 initiator arriving now would wait out every batch).
        if self.chosen == Arm::Batch && e.iops < BATCH_MIN_IOPS {
            self.switch(Arm::Sleep, format_args!("{:.0} IOPS, under {BATCH_MIN_IOPS}", e.iops));
            return Phase::Steady { left: self.interval };
        }
        let left = left.min(self.interval);
        if left > 0 {
            return Phase::Steady { left: left - 1 };
        }
        let batch_ok = self.can_batch && e.iops >= BATCH_MIN_IOPS;
        // Tried: the next cheaper arm (the rate only falls further beyond it: a longer wait
        // never speeds an initiator up) and every dearer one (sleeping and batching may both
        // lose to spinning while they tie with each other).
        let chosen = self.chosen as usize;
        let quiet = self.noise < QUIET;
        let next = (1..=Arm::ALL.len())
            .map(|k| (self.last_tried + k) % Arm::ALL.len())
            .find(|&i| (i < chosen || (i == chosen + 1 && quiet)) && (Arm::ALL[i] != Arm::Batch || batch_ok));
        let Some(i) = next else {
            return Phase::Steady { left: self.interval };
        };
        self.last_tried = i;
        Phase::Trial { arm: Arm::ALL[i], before: e.rate, settled: false }
    }

    fn judge(&mut self, arm: Arm, before: f64, trial: f64) {
        // The arms are declared dearest first.
        let better = if arm as usize > self.chosen as usize {
            trial >= before * (1.0 - CHEAPER_LOSS)
        } else {
            trial > before * (1.0 + DEARER_GAIN)
        };
        if better {
            self.switch(arm, format_args!("{trial:.0} B/s on it against {before:.0} B/s"));
        } else {
            self.lost += 1;
            if self.lost >= 2 {
                self.interval = (self.interval * 2).min(MAX_INTERVAL);
            }
        }
    }

    fn switch(&mut self, arm: Arm, why: std::fmt::Arguments) {
        log::debug!("reactor idle: {:?} -> {arm:?} ({why})", self.chosen);
        self.chosen = arm;
        self.interval = MIN_INTERVAL;
        self.lost = 0;
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

    /// An adaptive reactor's chooser on a simulated clock, with its I/O count.
    struct Sim {
        c: ArmChooser,
        now: Instant,
        ios: u64,
        /// Each epoch's rate is off by up to ± this share (the host's noise).
        noise: f64,
        rng: u64,
    }

    impl Sim {
        fn new(can_batch: bool) -> Self {
            let now = Instant::now();
            Self { c: ArmChooser::new(now, can_batch), now, ios: 0, noise: 0.0, rng: 0x9E37_79B9_7F4A_7C15 }
        }

        fn noisy(can_batch: bool, noise: f64) -> Self {
            Self { noise, ..Self::new(can_batch) }
        }

        /// Uniform in [-1, 1) (xorshift64).
        fn jitter(&mut self) -> f64 {
            self.rng ^= self.rng << 13;
            self.rng ^= self.rng >> 7;
            self.rng ^= self.rng << 17;
            (self.rng >> 11) as f64 / (1u64 << 52) as f64 - 1.0
        }

        /// Runs `epochs` epochs in which the initiators offer `load(arm) = (commands per
        /// second, bytes per command)`, each a read or write; returns the milliseconds spent
        /// on each arm (Spin, Sleep, Batch).
        fn run(&mut self, epochs: usize, load: impl Fn(Arm) -> (f64, usize)) -> [u128; 3] {
            let mut on = [0; 3];
            for _ in 0..epochs {
                let (arm, len) = (self.c.arm(), self.c.epoch_len());
                on[arm as usize] += len.as_millis();
                let (cmds, bytes) = load(arm);
                let cmds = cmds * (1.0 + self.noise * self.jitter());
                let n = (cmds * len.as_secs_f64()) as u64;
                self.c.received(bytes * n as usize);
                self.ios += n;
                self.now += len;
                self.c.at(self.now, self.ios);
            }
            on
        }
    }

    /// 4 KiB writes at a fixed 30k commands/s: the initiator sends on its own clock.
    fn fixed_rate(_: Arm) -> (f64, usize) {
        (30_000.0, 4144)
    }

    /// A queue-depth-1 initiator: a wake-up in every round trip halves its rate, a batching
    /// wait of up to 400 µs cuts it to a tenth.
    fn qd1(arm: Arm) -> (f64, usize) {
        match arm {
            Arm::Spin => (24_000.0, 48),
            Arm::Sleep => (11_000.0, 48),
            Arm::Batch => (2_200.0, 48),
        }
    }

    #[test]
    fn a_fixed_rate_that_waiting_does_not_slow_is_batched() {
        let mut sim = Sim::new(true);
        // Within a second: spin, sleep trial won, batch trial won.
        let [spin, sleep, batch] = sim.run(20, fixed_rate);
        assert_eq!(sim.c.chosen, Arm::Batch, "spun {spin} ms, slept {sleep} ms, batched {batch} ms");
        // Afterwards the dearer arms are only tried, ever more rarely: 5% of the time at most.
        let [spin, sleep, batch] = sim.run(2000, fixed_rate);
        assert!((spin + sleep) * 20 <= batch, "spun {spin} ms, slept {sleep} ms, batched {batch} ms");
    }

    #[test]
    fn without_batching_in_the_kernel_a_fixed_rate_is_slept_through() {
        let mut sim = Sim::new(false);
        let [_, _, batch] = sim.run(2000, fixed_rate);
        assert_eq!(sim.c.chosen, Arm::Sleep);
        assert_eq!(batch, 0);
    }

    #[test]
    fn a_queue_depth_one_initiator_keeps_the_reactor_spinning() {
        let mut sim = Sim::new(true);
        let [spin, sleep, batch] = sim.run(2000, qd1);
        assert_eq!(sim.c.chosen, Arm::Spin);
        assert_eq!(batch, 0);
        // The sleeping trials become rare: under 3% of the time.
        assert!(sleep * 100 < (spin + sleep) * 3, "slept {sleep} of {} ms", spin + sleep);
    }

    #[test]
    fn a_small_loss_from_sleeping_keeps_the_spin() {
        let mut sim = Sim::new(true);
        // A saturated queue: sleeping loses 6% of the rate.
        sim.run(500, |arm| (if arm == Arm::Spin { 100_000.0 } else { 94_000.0 }, 4144));
        assert_eq!(sim.c.chosen, Arm::Spin);
    }

    #[test]
    fn batching_that_costs_rate_is_not_kept() {
        let mut sim = Sim::new(true);
        // Sleeping is free, batching loses 10%.
        let load = |arm| (if arm == Arm::Batch { 90_000.0 } else { 100_000.0 }, 48);
        let [_, sleep, batch] = sim.run(2000, load);
        assert_eq!(sim.c.chosen, Arm::Sleep);
        assert!(batch * 20 < sleep, "batched {batch} ms, slept {sleep} ms");
    }

    #[test]
    fn a_batching_reactor_stops_when_a_queue_depth_one_initiator_arrives() {
        let mut sim = Sim::new(true);
        sim.run(200, fixed_rate);
        assert_eq!(sim.c.chosen, Arm::Batch);
        // The first epoch of the new load ends the batching; a few trials later it spins.
        sim.run(1, qd1);
        assert_eq!(sim.c.chosen, Arm::Sleep);
        let [_, _, batch] = sim.run(40, qd1);
        assert_eq!(sim.c.chosen, Arm::Spin);
        // At most one losing trial of batching on the way (from Sleep both ways are tried).
        assert!(batch <= (SETTLE + EPOCH).as_millis(), "batched {batch} ms");
    }

    #[test]
    fn slow_receives_are_never_batched() {
        let mut sim = Sim::new(true);
        // 2k commands/s on its own clock: no arm changes the rate, yet batching is not tried.
        let [_, _, batch] = sim.run(2000, |_| (2_000.0, 4144));
        assert_eq!(sim.c.chosen, Arm::Sleep);
        assert_eq!(batch, 0);
    }

    #[test]
    fn an_idle_reactor_sleeps_and_spins_again_when_spinning_pays() {
        let mut sim = Sim::new(true);
        sim.run(20, |_| (0.0, 0));
        assert_eq!(sim.c.chosen, Arm::Sleep);
        // Then a queue-depth-1 initiator logs in: within a few trials it spins.
        sim.run(40, qd1);
        assert_eq!(sim.c.chosen, Arm::Spin);
    }

    #[test]
    fn a_trial_is_judged_once_the_switch_has_settled() {
        let mut sim = Sim::new(true);
        sim.run(MIN_INTERVAL as usize + 1, fixed_rate);
        assert_eq!(sim.c.arm(), Arm::Sleep, "the trial runs on the cheaper arm");
        // Its first epoch comes up 4% short (commands delayed by the switch arrive in the
        // next one): not judged. The second matches: sleeping costs nothing.
        sim.run(1, |_| (28_800.0, 4144));
        assert_eq!(sim.c.chosen, Arm::Spin);
        sim.run(1, fixed_rate);
        assert_eq!(sim.c.chosen, Arm::Sleep);
    }

    #[test]
    fn host_noise_does_not_make_a_saturated_queue_sleep() {
        // Sleeping loses 5%, each epoch is off by up to ±3%: the reactor still spins nearly
        // all the time.
        let mut sim = Sim::noisy(true, 0.03);
        let load = |arm| (if arm == Arm::Spin { 100_000.0 } else { 95_000.0 }, 4144);
        let [spin, sleep, batch] = sim.run(4000, load);
        assert!((sleep + batch) * 10 < spin, "spun {spin}, slept {sleep}, batched {batch} ms");
    }

    #[test]
    fn a_load_that_swings_with_the_host_is_never_moved_off_the_spin() {
        // A saturated queue on a noisy host: each epoch ±20%; sleeping would lose 5%, which
        // no single trial can see. No cheaper arm is even tried.
        let mut sim = Sim::noisy(true, 0.20);
        let load = |arm| (if arm == Arm::Spin { 100_000.0 } else { 95_000.0 }, 4144);
        let [_, sleep, batch] = sim.run(4000, load);
        assert_eq!((sleep, batch), (0, 0));
    }

    #[test]
    fn host_noise_does_not_keep_a_fixed_rate_spinning() {
        let mut sim = Sim::noisy(true, 0.005);
        let [spin, sleep, batch] = sim.run(4000, fixed_rate);
        assert_eq!(sim.c.chosen, Arm::Batch);
        assert!(batch > 9 * (spin + sleep), "spun {spin}, slept {sleep}, batched {batch} ms");
    }

    #[test]
    fn epochs_end_only_after_their_length() {
        let now = Instant::now();
        let mut c = ArmChooser::new(now, true);
        for i in 0..1000 {
            c.received(4096);
            c.at(now + EPOCH / 2000 * i, i.into());
        }
        assert_eq!(c.phase, Phase::Steady { left: MIN_INTERVAL });
        assert_eq!(c.epoch_bytes, 4096 * 1000);
    }
}
