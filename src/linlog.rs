//! Logs of reads and writes of the first word of pages, taken by test
//! processes on several nodes, and a checker that they are linearizable
//! per page: a read returns a value no older than the latest write that
//! completed before the read started. All processes run on one machine,
//! so CLOCK_MONOTONIC orders them.
//!
//! The log is a shared mapping of a file, so what a process logged
//! survives its death by SIGBUS or SIGKILL.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// Records a log holds at most (24 MiB of file, sparse).
const CAPACITY: usize = 1 << 20;
const WORDS_PER_RECORD: usize = 3;
const READ: u64 = 1 << 32;
const WRITE: u64 = 2 << 32;

/// CLOCK_MONOTONIC in nanoseconds: one clock for every process here
/// (`Instant` does not expose its origin).
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the local.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// One process's log, being written.
pub struct Log {
    map: dsm::memfd::Mapping,
    next: usize,
}

impl Log {
    pub fn create(path: &Path) -> std::io::Result<Log> {
        use std::os::fd::AsFd;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        let bytes = 8 + CAPACITY * WORDS_PER_RECORD * 8;
        file.set_len(bytes as u64)?;
        let map = dsm::memfd::Mapping::map(file.as_fd(), bytes, true, None)?;
        Ok(Log { map, next: 0 })
    }

    fn words(&self) -> &[AtomicU64] {
        // SAFETY: the mapping is live while `self` is, page-aligned, and
        // holds `len / 8` words, accessed only as atomics.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr().cast(), self.map.len() / 8) }
    }

    fn push(&mut self, kind: u64, page: u32, value: u64, time: u64) {
        if self.next == CAPACITY {
            return;
        }
        let base = 1 + self.next * WORDS_PER_RECORD;
        let words = self.words();
        words[base].store(kind | u64::from(page), Ordering::Relaxed);
        words[base + 1].store(value, Ordering::Relaxed);
        words[base + 2].store(time, Ordering::Relaxed);
        // The count last: a record counted is complete.
        words[0].store(self.next as u64 + 1, Ordering::Release);
        self.next += 1;
    }

    /// No room for more records (a process stops then, so that what it
    /// did is all logged).
    pub fn is_full(&self) -> bool {
        self.next == CAPACITY
    }

    /// A write of `value` just completed.
    pub fn wrote(&mut self, page: u32, value: u64) {
        self.push(WRITE, page, value, now_ns());
    }

    /// A read that started at `started` returned `value`.
    pub fn read(&mut self, page: u32, value: u64, started: u64) {
        self.push(READ, page, value, started);
    }
}

/// One logged operation.
#[derive(Clone, Copy, Debug)]
pub struct Record {
    pub write: bool,
    pub page: u32,
    pub value: u64,
    /// End of a write, start of a read.
    pub time: u64,
}

/// Read back a log file.
pub fn load(path: &Path) -> std::io::Result<Vec<Record>> {
    let bytes = std::fs::read(path)?;
    let word = |i: usize| -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&bytes[i * 8..i * 8 + 8]);
        u64::from_ne_bytes(b)
    };
    if bytes.len() < 8 {
        return Ok(vec![]);
    }
    let count = (word(0) as usize).min((bytes.len() / 8 - 1) / WORDS_PER_RECORD);
    Ok((0..count)
        .map(|i| {
            let base = 1 + i * WORDS_PER_RECORD;
            let head = word(base);
            Record {
                write: head & WRITE != 0,
                page: head as u32,
                value: word(base + 1),
                time: word(base + 2),
            }
        })
        .collect())
}

/// What a check found.
#[derive(Debug, Default)]
pub struct Checked {
    pub reads: usize,
    pub writes: usize,
}

/// Every read of every log returns a value that was written (or the
/// initial 0) and no older than the newest write of that page that
/// completed before the read started. Each page has one writer, whose
/// values increase by one from 1.
pub fn check(logs: &[Vec<Record>]) -> Result<Checked, String> {
    use std::collections::HashMap;
    let mut writes: HashMap<u32, Vec<(u64, u64)>> = HashMap::new();
    let mut checked = Checked::default();
    for r in logs.iter().flatten().filter(|r| r.write) {
        writes.entry(r.page).or_default().push((r.time, r.value));
        checked.writes += 1;
    }
    for list in writes.values_mut() {
        list.sort_unstable();
    }
    for r in logs.iter().flatten().filter(|r| !r.write) {
        checked.reads += 1;
        let list = writes.get(&r.page).map(Vec::as_slice).unwrap_or(&[]);
        let done_before = list.partition_point(|(end, _)| *end < r.time);
        let newest_done = if done_before == 0 {
            0
        } else {
            list[done_before - 1].1
        };
        let highest = list.last().map_or(0, |w| w.1);
        if r.value < newest_done {
            return Err(format!(
                "page {}: a read at {} ns returned {} though {} was written by {} ns",
                r.page,
                r.time,
                r.value,
                newest_done,
                list[done_before - 1].0
            ));
        }
        if r.value > highest {
            return Err(format!(
                "page {}: a read returned {}, never written (highest {highest})",
                r.page, r.value
            ));
        }
    }
    Ok(checked)
}
