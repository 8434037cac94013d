//! A node's load, as the balancer will weigh it (issue 13): the runnable
//! threads on the CPUs the node serves (`--cpus`), smoothed, per CPU and
//! scaled by the node's `--speed`; and its free memory. Sampled by a
//! thread of its own (a scan of /proc must not stall the daemon's event
//! loop), read by `omctl status`. The smoothing and the CPU lists are pure.

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
            let mut smoothed = Smoothed::default();
            let mut last = Instant::now();
            loop {
                let runnable = runnable_on(&cpus) as f64;
                let now = Instant::now();
                smoothed.sample(runnable, now - last);
                last = now;
                let sample = NodeLoad {
                    load: scaled(smoothed.value(), cpus.len(), speed),
                    free_kib: available_kib().unwrap_or(0),
                };
                *out.lock().unwrap_or_else(|e| e.into_inner()) = sample;
                std::thread::sleep(SAMPLE_EVERY);
            }
        });
    if let Err(e) = spawned {
        tracing::error!("no load sampler (the load reads 0): {e}");
    }
    seen
}

/// Threads now runnable (state R) whose CPU is one of `cpus`, the thread
/// counting left out.
fn runnable_on(cpus: &[usize]) -> usize {
    // "PID/task/TID"
    let me = std::fs::read_link("/proc/thread-self")
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_owned()));
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let mut count = 0;
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
            if me.as_deref() == Some(t.file_name().as_os_str()) {
                continue;
            }
            let Ok(stat) = std::fs::read_to_string(t.path().join("stat")) else {
                continue;
            };
            if let Some((state, cpu)) = state_and_cpu(&stat) {
                if state == 'R' && cpus.binary_search(&cpu).is_ok() {
                    count += 1;
                }
            }
        }
    }
    count
}

/// A task's state (field 3) and last CPU (field 39) from its stat line.
fn state_and_cpu(stat: &str) -> Option<(char, usize)> {
    let rest = stat.rsplit_once(')')?.1;
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    // Fields 4..=39 follow the state: the CPU is the 36th of them.
    let cpu = fields.nth(35)?.parse().ok()?;
    Some((state, cpu))
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
    fn a_stat_line_gives_state_and_cpu() {
        // A comm with spaces and parentheses, as the kernel writes it.
        let mut line = String::from("42 (a (b) c) R");
        for field in 4..=52 {
            line.push_str(&format!(" {}", if field == 39 { 7 } else { field }));
        }
        assert_eq!(state_and_cpu(&line), Some(('R', 7)));
        assert_eq!(state_and_cpu("42 (x) S"), None);
    }

    #[test]
    fn a_busy_thread_is_counted_on_its_cpus() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let cpus = allowed_cpus();
        assert!(!cpus.is_empty());
        let stop = Arc::new(AtomicBool::new(false));
        let spin = {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || while !stop.load(Ordering::Relaxed) {})
        };
        std::thread::sleep(Duration::from_millis(20));
        let seen = (0..50).map(|_| runnable_on(&cpus)).max().unwrap_or(0);
        stop.store(true, Ordering::Relaxed);
        let _ = spin.join();
        assert!(seen >= 1, "the spinning thread was not counted");
        assert!(available_kib().is_some_and(|k| k > 0));
    }
}
