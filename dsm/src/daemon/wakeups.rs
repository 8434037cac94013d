//! Keeping idle CPUs awake while faults come in bursts.
//!
//! Where idle CPUs halt (vCPUs, deep C-states), waking one costs ≈ 60 µs on
//! this machine kind (DESIGN.md §8), and one remote fault wakes up to three:
//! the faulting node's daemon, the home's daemon and the faulting thread.
//! While faults, coherence messages or semaphore operations come close
//! together, the daemon holds a `/dev/cpu_dma_latency` request of 0 µs, so
//! idle CPUs poll instead of halting; it lets go once they have stopped for
//! [`LINGER`]. An isolated event never takes the hold, so a quiet node costs
//! no power; a busy one pays polling CPUs for as long as the burst lasts
//! (`omctl status` shows the time held).
//!
//! The policy is a pure state machine ([`BurstPolicy`]); the device is at
//! the edge ([`LatencyRequest`]).

use std::io::Write;
use std::time::{Duration, Instant};

/// Two events this close together make a burst.
pub const BURST_GAP: Duration = Duration::from_millis(2);
/// The hold is let go this long after the last event of a burst.
pub const LINGER: Duration = Duration::from_millis(20);

/// `dsmd --low-latency`: when to keep idle CPUs out of deep sleep.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LowLatency {
    /// During bursts of faults (the default).
    #[default]
    Auto,
    /// Always, for as long as the daemon runs.
    Always,
    /// Never: every wake-up of a sleeping CPU is paid.
    Off,
}

/// What the hold must become.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    Hold,
    Release,
}

/// When to hold: from the second of two events less than [`BURST_GAP`]
/// apart until [`LINGER`] after the last one.
#[derive(Debug, Default)]
pub struct BurstPolicy {
    last_event: Option<Instant>,
    held_since: Option<Instant>,
    /// Time held by bursts that ended.
    held_before: Duration,
}

impl BurstPolicy {
    pub fn on_event(&mut self, now: Instant) -> Option<Change> {
        let previous = self.last_event.replace(now);
        if self.held_since.is_some() {
            return None;
        }
        let burst = previous.is_some_and(|p| now.saturating_duration_since(p) < BURST_GAP);
        burst.then(|| {
            self.held_since = Some(now);
            Change::Hold
        })
    }

    pub fn on_tick(&mut self, now: Instant) -> Option<Change> {
        let since = self.held_since?;
        let last = self.last_event.unwrap_or(since);
        if now.saturating_duration_since(last) < LINGER {
            return None;
        }
        self.held_since = None;
        self.held_before += last.saturating_duration_since(since) + LINGER;
        Some(Change::Release)
    }

    pub fn holding(&self) -> bool {
        self.held_since.is_some()
    }

    /// Total time held, up to `now`.
    pub fn held(&self, now: Instant) -> Duration {
        self.held_before
            + self
                .held_since
                .map_or(Duration::ZERO, |s| now.saturating_duration_since(s))
    }
}

/// This process's request on `/dev/cpu_dma_latency`: 0 µs while held, no
/// constraint otherwise; the kernel drops it when the daemon ends.
pub struct LatencyRequest {
    file: std::fs::File,
}

/// The kernel's "no constraint" value for a CPU latency request (µs).
const NO_CONSTRAINT_US: i32 = 2_000_000_000;

impl LatencyRequest {
    /// `None` where the device is absent or not writable (then the daemon
    /// runs as with `--low-latency off`, and says so).
    pub fn open() -> Option<LatencyRequest> {
        match std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/cpu_dma_latency")
        {
            Ok(file) => {
                let mut request = LatencyRequest { file };
                request.set(false).then_some(request)
            }
            Err(e) => {
                tracing::info!(
                    "cannot hold /dev/cpu_dma_latency ({e}): idle CPUs sleep as configured"
                );
                None
            }
        }
    }

    /// Hold (0 µs) or let go; false if the kernel refused.
    pub fn set(&mut self, hold: bool) -> bool {
        let value = if hold { 0 } else { NO_CONSTRAINT_US };
        match self.file.write_all(&value.to_ne_bytes()) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!("cpu_dma_latency request: {e}");
                false
            }
        }
    }
}

/// The policy and the device together, as the daemon uses them.
pub struct Wakeups {
    mode: LowLatency,
    policy: BurstPolicy,
    request: Option<LatencyRequest>,
    started: Instant,
    /// Woken when a hold starts, so the task that lets go runs only then.
    pub hold_started: std::rc::Rc<tokio::sync::Notify>,
}

impl Wakeups {
    pub fn new(mode: LowLatency) -> Wakeups {
        let mut request = match mode {
            LowLatency::Off => None,
            LowLatency::Auto | LowLatency::Always => LatencyRequest::open(),
        };
        if mode == LowLatency::Always {
            if let Some(r) = request.as_mut() {
                r.set(true);
            }
        }
        Wakeups {
            mode,
            policy: BurstPolicy::default(),
            request,
            started: Instant::now(),
            hold_started: Default::default(),
        }
    }

    /// A fault, a coherence message or a semaphore operation came in.
    pub fn event(&mut self) {
        if self.mode != LowLatency::Auto || self.request.is_none() {
            return;
        }
        if self.policy.on_event(Instant::now()) == Some(Change::Hold) {
            if let Some(r) = self.request.as_mut() {
                r.set(true);
            }
            self.hold_started.notify_one();
        }
    }

    /// Let go if the burst is over; whether a hold remains.
    pub fn tick(&mut self) -> bool {
        if self.policy.on_tick(Instant::now()) == Some(Change::Release) {
            if let Some(r) = self.request.as_mut() {
                r.set(false);
            }
        }
        self.policy.holding()
    }

    /// Milliseconds idle CPUs were kept polling by this daemon.
    pub fn held_ms(&self) -> u64 {
        let now = Instant::now();
        let held = match (self.mode, &self.request) {
            (_, None) | (LowLatency::Off, _) => Duration::ZERO,
            (LowLatency::Always, Some(_)) => now.saturating_duration_since(self.started),
            (LowLatency::Auto, Some(_)) => self.policy.held(now),
        };
        held.as_millis() as u64
    }
}

/// Let go of each hold once its burst is over.
pub async fn release_loop(core: std::rc::Rc<std::cell::RefCell<super::core::Core>>) {
    let started = core.borrow().wakeups.hold_started.clone();
    loop {
        started.notified().await;
        loop {
            tokio::time::sleep(LINGER / 4).await;
            if !core.borrow_mut().wakeups.tick() {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(base: Instant, us: u64) -> Instant {
        base + Duration::from_micros(us)
    }

    #[test]
    fn an_isolated_event_never_holds() {
        let t = Instant::now();
        let mut p = BurstPolicy::default();
        for i in 0..10 {
            // One event every 10 ms: never a burst.
            assert_eq!(p.on_event(at(t, i * 10_000)), None);
            assert_eq!(p.on_tick(at(t, i * 10_000 + 5_000)), None);
        }
        assert!(!p.holding());
        assert_eq!(p.held(at(t, 200_000)), Duration::ZERO);
    }

    #[test]
    fn a_burst_holds_until_it_has_been_quiet_for_the_linger() {
        let t = Instant::now();
        let mut p = BurstPolicy::default();
        assert_eq!(p.on_event(at(t, 0)), None);
        assert_eq!(p.on_event(at(t, 50)), Some(Change::Hold));
        // Events of the burst, ticks in between: held throughout.
        for i in 2..100 {
            assert_eq!(p.on_event(at(t, i * 50)), None);
            assert_eq!(p.on_tick(at(t, i * 50 + 25)), None);
        }
        let last = 99 * 50;
        assert_eq!(p.on_tick(at(t, last + 19_000)), None);
        assert_eq!(p.on_tick(at(t, last + 20_000)), Some(Change::Release));
        assert!(!p.holding());
        assert_eq!(p.on_tick(at(t, last + 40_000)), None, "released once");
        let held = p.held(at(t, last + 60_000));
        assert_eq!(held, Duration::from_micros(last - 50) + LINGER);
        // The next burst holds again.
        assert_eq!(p.on_event(at(t, 100_000)), None);
        assert_eq!(p.on_event(at(t, 100_100)), Some(Change::Hold));
    }
}
