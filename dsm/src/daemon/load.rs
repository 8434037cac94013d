//! A node's load, as the balancer will weigh it (issue 13): the runnable
//! threads on the CPUs the node serves (`--cpus`), smoothed, per CPU and
//! scaled by the node's `--speed`; and its free memory. Sampled by a
//! thread of its own (a scan of /proc must not stall the daemon's event
//! loop), read by `omctl status`. The smoothing and the CPU lists are pure.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How often the sampler looks.
pub const SAMPLE_EVERY: Duration = Duration::from_millis(250);
/// Time constant of the smoothing: a step in load shows at 63 % after
/// this long (short: balancing wants a spread within seconds; the
/// balancer's margins and residency keep the noise from moving anything).
pub const SMOOTHING: Duration = Duration::from_millis(500);

/// CPUs, parsed from a list such as `0`, `0-3` or `0,2-3` (as `taskset
/// -c` and /sys/devices/system/cpu/online write them).
pub fn parse_cpu_list(list: &str) -> Result<Vec<usize>, String> {
    let mut cpus = Vec::new();
    for part in list.split(',').map(str::trim) {
        let (first, last) = match part.split_once('-') {
            Some((a, b)) => (a.trim(), b.trim()),
            None => (part, part),
        };
        let parse = |s: &str| {
            s.parse::<usize>()
                .ok()
                .filter(|&c| c < libc::CPU_SETSIZE as usize)
                .ok_or_else(|| format!("{list:?}: {s:?} is not a CPU number"))
        };
        let (first, last) = (parse(first)?, parse(last)?);
        if first > last {
            return Err(format!("{list:?}: {part:?} runs backwards"));
        }
        cpus.extend(first..=last);
    }
    cpus.sort_unstable();
    cpus.dedup();
    if cpus.is_empty() {
        return Err("an empty CPU list".into());
    }
    Ok(cpus)
}

/// `cpus` written back as a list with ranges (`0-3,6`).
pub fn format_cpu_list(cpus: &[usize]) -> String {
    let mut parts = Vec::new();
    let mut i = 0;
    while i < cpus.len() {
        let mut j = i;
        while j + 1 < cpus.len() && cpus[j + 1] == cpus[j] + 1 {
            j += 1;
        }
        parts.push(if i == j {
            cpus[i].to_string()
        } else {
            format!("{}-{}", cpus[i], cpus[j])
        });
        i = j + 1;
    }
    parts.join(",")
}

/// An exponentially smoothed value over irregular samples.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Smoothed {
    value: f64,
    started: bool,
}

impl Smoothed {
    /// Take `sample`, `elapsed` after the previous one.
    pub fn sample(&mut self, sample: f64, elapsed: Duration) {
        if !self.started {
            self.value = sample;
            self.started = true;
            return;
        }
        let keep = (-elapsed.as_secs_f64() / SMOOTHING.as_secs_f64()).exp();
        self.value = self.value * keep + sample * (1.0 - keep);
    }

    pub fn value(&self) -> f64 {
        self.value
    }
}

/// What the sampler last saw.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct NodeLoad {
    /// Smoothed runnable threads per CPU, divided by `speed`.
    pub load: f64,
    /// Memory the kernel says is available (MemAvailable), in KiB.
    pub free_kib: u64,
    /// A load was measured (a daemon just started has none: it must not
    /// say 0 and draw every process to it).
    pub measured: bool,
}

/// The load of `runnable` threads on `cpus` CPUs of relative `speed`.
pub fn scaled(runnable: f64, cpus: usize, speed: f64) -> f64 {
    runnable / (cpus.max(1) as f64 * speed.max(f64::MIN_POSITIVE))
}

/// Start the sampler for `cpus` (sorted) of relative `speed`; what it
/// sees is in the returned cell.
pub fn start_sampler(cpus: Vec<usize>, speed: f64) -> Arc<Mutex<NodeLoad>> {
    let seen = Arc::new(Mutex::new(NodeLoad::default()));
    let out = Arc::clone(&seen);
    let spawned = std::thread::Builder::new()
        .name("load sampler".into())
        .spawn(move || {
            let mut meter = RunnableMeter::new(cpus.clone());
            let mut smoothed = Smoothed::default();
            loop {
                if let Some((runnable, elapsed)) = meter.sample() {
                    smoothed.sample(runnable, elapsed);
                    let sample = NodeLoad {
                        load: scaled(smoothed.value(), cpus.len(), speed),
                        free_kib: available_kib().unwrap_or(0),
                        measured: true,
                    };
                    *out.lock().unwrap_or_else(|e| e.into_inner()) = sample;
                }
                std::thread::sleep(SAMPLE_EVERY);
            }
        });
    if let Err(e) = spawned {
        tracing::error!("no load sampler (the load reads 0): {e}");
    }
    seen
}

/// Cumulative time of one CPU, in clock ticks, from /proc/stat.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct CpuTicks {
    /// Running something: user, nice, system, irq, softirq, steal.
    busy: u64,
    /// All of it (busy, idle, iowait).
    total: u64,
}

/// The ticks of each of `cpus` (sorted) in /proc/stat's `text`.
fn cpu_ticks(text: &str, cpus: &[usize]) -> Vec<(usize, CpuTicks)> {
    let mut out = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("cpu") else {
            continue;
        };
        let mut fields = rest.split_whitespace();
        let Some(cpu) = fields.next().and_then(|c| c.parse::<usize>().ok()) else {
            continue; // the "cpu" line: all CPUs together
        };
        if cpus.binary_search(&cpu).is_err() {
            continue;
        }
        let t: Vec<u64> = fields.take(8).map(|v| v.parse().unwrap_or(0)).collect();
        let get = |i: usize| t.get(i).copied().unwrap_or(0);
        // user nice system idle iowait irq softirq steal (guest time is
        // counted in user already).
        let busy = get(0) + get(1) + get(2) + get(5) + get(6) + get(7);
        out.push((
            cpu,
            CpuTicks {
                busy,
                total: busy + get(3) + get(4),
            },
        ));
    }
    out
}

/// Threads running on average between two readings of `CpuTicks`.
fn busy_between(before: &[(usize, CpuTicks)], after: &[(usize, CpuTicks)]) -> f64 {
    after
        .iter()
        .filter_map(|(cpu, a)| {
            let (_, b) = before.iter().find(|(c, _)| c == cpu)?;
            let total = a.total.checked_sub(b.total).filter(|t| *t > 0)?;
            Some(a.busy.saturating_sub(b.busy) as f64 / total as f64)
        })
        .sum()
}

/// The average number of runnable threads on a node's CPUs between two
/// calls: the threads running (the CPUs' busy time, /proc/stat) plus
/// those waiting for a CPU there (the time each task spent waiting,
/// its schedstat). Both are integrals over the interval, so a process
/// that runs for a moment weighs what it ran: a count of the threads in
/// state R at an instant (what the run queue shows) caught the daemon's
/// own threads and every short command, and read an idle node at 0.2 to
/// 1.3 (issue 13's note).
struct RunnableMeter {
    cpus: Vec<usize>,
    ticks: Vec<(usize, CpuTicks)>,
    /// Nanoseconds each task (by tid) on these CPUs had waited for a CPU
    /// in its life, at the last reading.
    waited: HashMap<u32, u64>,
    /// Every task there was then, on any CPU: one not among them is new,
    /// and all it waited, it waited since.
    existed: HashSet<u32>,
    at: Option<Instant>,
}

impl RunnableMeter {
    fn new(cpus: Vec<usize>) -> RunnableMeter {
        RunnableMeter {
            cpus,
            ticks: Vec::new(),
            waited: HashMap::new(),
            existed: HashSet::new(),
            at: None,
        }
    }

    /// Runnable threads on average since the last call, and over how long
    /// (`None` at the first call, or if /proc/stat cannot be read).
    fn sample(&mut self) -> Option<(f64, Duration)> {
        let now = Instant::now();
        let ticks = cpu_ticks(&std::fs::read_to_string("/proc/stat").ok()?, &self.cpus);
        let (waited, existed) = waited_on(&self.cpus);
        let waiting_ns: u64 = waited
            .iter()
            .filter_map(|(tid, ns)| {
                // A task come from another CPU is counted from the next
                // reading on.
                let before = match self.waited.get(tid) {
                    Some(before) => *before,
                    None if !self.existed.contains(tid) => 0,
                    None => return None,
                };
                Some(ns.saturating_sub(before))
            })
            .sum();
        let busy = busy_between(&self.ticks, &ticks);
        let last = self.at.replace(now);
        self.ticks = ticks;
        self.waited = waited;
        self.existed = existed;
        let elapsed = now - last?;
        let waiting = waiting_ns as f64 / elapsed.as_nanos().max(1) as f64;
        Some((busy + waiting, elapsed))
    }
}

/// Nanoseconds each task now on one of `cpus` has waited for a CPU in
/// its life (schedstat's second field), by tid; and every task there is.
fn waited_on(cpus: &[usize]) -> (HashMap<u32, u64>, HashSet<u32>) {
    let mut out = HashMap::new();
    let mut existing = HashSet::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return (out, existing);
    };
    for p in procs.flatten() {
        let name = p.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for t in tasks.flatten() {
            let Some(tid) = t.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            existing.insert(tid);
            let Ok(stat) = std::fs::read_to_string(t.path().join("stat")) else {
                continue;
            };
            if cpu_of(&stat).is_none_or(|c| cpus.binary_search(&c).is_err()) {
                continue;
            }
            let Ok(schedstat) = std::fs::read_to_string(t.path().join("schedstat")) else {
                continue;
            };
            if let Some(ns) = schedstat
                .split_whitespace()
                .nth(1)
                .and_then(|v| v.parse().ok())
            {
                out.insert(tid, ns);
            }
        }
    }
    (out, existing)
}

/// A task's last CPU (field 39) from its stat line.
fn cpu_of(stat: &str) -> Option<usize> {
    let rest = stat.rsplit_once(')')?.1;
    // Fields 3..=39 follow the command: the CPU is the 37th of them.
    rest.split_whitespace().nth(36)?.parse().ok()
}

fn available_kib() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// The CPUs this process may run on now (its affinity).
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: a zeroed cpu_set_t is an empty set; sched_getaffinity fills
    // it (size passed).
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let r = unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if r != 0 {
        return vec![0];
    }
    // SAFETY: CPU_ISSET reads the set we own.
    (0..libc::CPU_SETSIZE as usize)
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .collect()
}

/// Run process `pid` (0: this one, all its threads to come) on `cpus`
/// only.
pub fn pin(pid: i32, cpus: &[usize]) -> std::io::Result<()> {
    // SAFETY: a zeroed cpu_set_t is an empty set, filled with CPU_SET.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &c in cpus {
        // SAFETY: c < CPU_SETSIZE (parse_cpu_list checks it).
        unsafe { libc::CPU_SET(c, &mut set) };
    }
    // SAFETY: sched_setaffinity reads the set of the size passed.
    let r = unsafe { libc::sched_setaffinity(pid, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_parse_and_print_as_taskset_writes_them() {
        assert_eq!(parse_cpu_list("0").unwrap(), vec![0]);
        assert_eq!(parse_cpu_list("0-3").unwrap(), vec![0, 1, 2, 3]);
        assert_eq!(parse_cpu_list("6, 0-1,1").unwrap(), vec![0, 1, 6]);
        assert!(parse_cpu_list("3-1").is_err());
        assert!(parse_cpu_list("x").is_err());
        assert!(parse_cpu_list("").is_err());
        assert!(parse_cpu_list("99999").is_err());
        assert_eq!(format_cpu_list(&[0, 1, 2, 3, 6, 8, 9]), "0-3,6,8-9");
        assert_eq!(format_cpu_list(&[1]), "1");
    }

    #[test]
    fn smoothing_follows_a_step_with_its_time_constant() {
        let mut s = Smoothed::default();
        s.sample(0.0, Duration::ZERO);
        let steps = (SMOOTHING.as_millis() / 250) as u32;
        for _ in 0..steps {
            s.sample(2.0, SMOOTHING / steps);
        }
        // One time constant after the step: 1 - 1/e of the way.
        assert!(
            (s.value() - 2.0 * (1.0 - (-1.0f64).exp())).abs() < 1e-9,
            "{}",
            s.value()
        );
        for _ in 0..40 {
            s.sample(2.0, Duration::from_millis(250));
        }
        assert!((s.value() - 2.0).abs() < 1e-3);
        // The first sample is taken as it is.
        let mut first = Smoothed::default();
        first.sample(3.0, Duration::from_secs(5));
        assert_eq!(first.value(), 3.0);
    }

    #[test]
    fn load_is_per_cpu_and_per_speed() {
        assert_eq!(scaled(4.0, 2, 1.0), 2.0);
        assert_eq!(scaled(4.0, 2, 2.0), 1.0);
        assert!(scaled(1.0, 0, 0.0).is_finite());
    }

    #[test]
    fn a_stat_line_gives_the_cpu() {
        // A comm with spaces and parentheses, as the kernel writes it.
        let mut line = String::from("42 (a (b) c) R");
        for field in 4..=52 {
            line.push_str(&format!(" {}", if field == 39 { 7 } else { field }));
        }
        assert_eq!(cpu_of(&line), Some(7));
        assert_eq!(cpu_of("42 (x) S"), None);
    }

    #[test]
    fn busy_time_is_read_per_cpu_from_proc_stat() {
        let before = "cpu  10 0 10 100 0 0 0 0 0 0\n\
                      cpu0 5 0 5 50 0 0 0 0 0 0\n\
                      cpu1 5 0 5 50 0 0 0 0 0 0\n\
                      intr 1 2 3\n";
        // CPU 1: 25 ticks, 20 busy (user, system, irq, softirq, steal), 5
        // idle or waiting for I/O; CPU 0: 25 ticks, all idle.
        let after = "cpu  30 0 20 130 0 0 0 0 0 0\n\
                     cpu0 5 0 5 75 0 0 0 0 0 0\n\
                     cpu1 18 1 7 53 2 1 1 2 4 0\n";
        let (b, a) = (cpu_ticks(before, &[1]), cpu_ticks(after, &[1]));
        assert_eq!(
            a,
            vec![(
                1,
                CpuTicks {
                    busy: 30,
                    total: 85
                }
            )]
        );
        assert!((busy_between(&b, &a) - 20.0 / 25.0).abs() < 1e-9);
        let both = |t| cpu_ticks(t, &[0, 1]);
        assert!((busy_between(&both(before), &both(after)) - 0.8).abs() < 1e-9);
        // No reading before, or a CPU gone: nothing counted, nothing
        // divided by zero.
        assert_eq!(busy_between(&[], &a), 0.0);
        assert_eq!(busy_between(&a, &a), 0.0);
    }

    #[test]
    fn threads_waiting_for_a_cpu_count_as_well_as_the_one_running() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let Some(&cpu) = allowed_cpus().first() else {
            panic!("no CPU allowed");
        };
        let stop = Arc::new(AtomicBool::new(false));
        // Two threads on one CPU: one runs, the other waits.
        let spinners: Vec<_> = (0..2)
            .map(|_| {
                let stop = Arc::clone(&stop);
                std::thread::spawn(move || {
                    let pinned = pin(0, &[cpu]).is_ok();
                    while pinned && !stop.load(Ordering::Relaxed) {}
                    pinned
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(50));
        let mut meter = RunnableMeter::new(vec![cpu]);
        assert!(meter.sample().is_none(), "the first reading is a baseline");
        std::thread::sleep(Duration::from_millis(500));
        let seen = meter.sample();
        stop.store(true, Ordering::Relaxed);
        let pinned = spinners.into_iter().all(|s| s.join().unwrap_or(false));
        assert!(pinned, "could not pin the spinners");
        let (runnable, elapsed) = seen.expect("a second reading");
        assert!(elapsed >= Duration::from_millis(500));
        // The CPU is busy at most 1: the rest is the one waiting (other
        // tests may add to it, never take away).
        assert!(runnable >= 1.6, "two spinners read as {runnable:.2}");
        assert!(available_kib().is_some_and(|k| k > 0));
    }
}
