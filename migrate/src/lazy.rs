//! Lazy transfer of private memory, the host's side: the restored
//! process's large anonymous regions start empty, registered with a
//! userfaultfd the process made; a fault on a page that stayed behind asks
//! the deputy for it (`PageRequest`) while the deputy streams every such page
//! meanwhile (`Pages`, then `PushDone`). A page that never existed is filled
//! with zeros. Children the process forks before the transfer ends get the
//! same service through the fork event's userfaultfd.

use std::os::fd::{AsFd, BorrowedFd};

use dsm::uffd::{Event, Uffd};

use crate::link::AgentMsg;
use crate::procfs::PAGE_SIZE;

/// Pages asked for on one fault (the faulting page and the ones after it).
const FAULT_BATCH_PAGES: u64 = 64;

struct LazyRun {
    addr: u64,
    len: u64,
    /// Allocated when the first page arrives.
    data: Vec<u8>,
    present: Vec<bool>,
    requested: Vec<bool>,
}

impl LazyRun {
    fn index(&self, page: u64) -> usize {
        ((page - self.addr) / PAGE_SIZE) as usize
    }
}

pub struct LazyMemory {
    uffds: Vec<Uffd>,
    runs: Vec<LazyRun>,
    /// Registered ranges (whole regions).
    regions: Vec<(u64, u64)>,
    done: bool,
}

const ZERO_PAGE: [u8; PAGE_SIZE as usize] = [0; PAGE_SIZE as usize];

/// UFFDIO_COPY of `data` at `addr`, skipping pages already there.
/// False if the uffd's process is gone.
fn copy_range(uffd: &Uffd, addr: u64, data: &[u8]) -> bool {
    let mut done = 0u64;
    while done < data.len() as u64 {
        match uffd.copy(addr + done, &data[done as usize..], false) {
            Ok(n) if n > 0 => done += n,
            Ok(_) => done += PAGE_SIZE,
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                // Copied up to the page that exists; skip that one.
                done += PAGE_SIZE;
            }
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => continue,
            Err(e) if dsm::uffd::process_gone(&e) => return false,
            Err(e) => {
                // Unmapped by the process meanwhile: nothing to fill.
                tracing::debug!(addr = addr + done, "lazy copy: {e}");
                done += PAGE_SIZE;
            }
        }
    }
    true
}

impl LazyMemory {
    pub fn new(uffd: Uffd, runs: &[(u64, u64)], regions: Vec<(u64, u64)>) -> LazyMemory {
        let mut runs: Vec<LazyRun> = runs
            .iter()
            .map(|&(addr, len)| LazyRun {
                addr,
                len,
                data: Vec::new(),
                present: vec![false; (len / PAGE_SIZE) as usize],
                requested: vec![false; (len / PAGE_SIZE) as usize],
            })
            .collect();
        runs.sort_by_key(|r| r.addr);
        LazyMemory {
            uffds: vec![uffd],
            runs,
            regions,
            done: false,
        }
    }

    /// The restored process's own userfaultfd (not its forked children's).
    pub fn uffd(&self) -> Option<BorrowedFd<'_>> {
        use std::os::fd::AsFd;
        self.uffds.first().map(|u| u.as_fd())
    }

    pub fn is_done(&self) -> bool {
        self.done
    }

    pub fn poll_set(&self) -> Vec<(BorrowedFd<'_>, i16)> {
        self.uffds
            .iter()
            .map(|u| (u.as_fd(), if self.done { 0 } else { libc::POLLIN }))
            .collect()
    }

    fn run_of(&self, page: u64) -> Option<usize> {
        let i = self.runs.partition_point(|r| r.addr <= page);
        let r = self.runs.get(i.checked_sub(1)?)?;
        (page < r.addr + r.len).then_some(i - 1)
    }

    /// Faults and forks of the processes served; requests for the deputy go
    /// to `out`.
    pub fn service(&mut self, revents: &[i16], out: &mut Vec<AgentMsg>) {
        let mut gone = Vec::new();
        for (u, &rev) in revents.iter().enumerate().take(self.uffds.len()) {
            if rev == 0 {
                continue;
            }
            let mut events = Vec::new();
            if let Err(e) = self.uffds[u].read_events(&mut events, 256) {
                tracing::debug!("lazy uffd: {e}");
                gone.push(u);
                continue;
            }
            for event in events {
                match event {
                    Event::PageFault { addr, .. } => {
                        if !self.fault(u, addr & !(PAGE_SIZE - 1), out) {
                            gone.push(u);
                        }
                    }
                    Event::Fork { child } => self.uffds.push(Uffd::from_fd(child)),
                    other => tracing::debug!(?other, "lazy uffd event"),
                }
            }
        }
        gone.sort_unstable();
        gone.dedup();
        for u in gone.into_iter().rev() {
            if u > 0 {
                self.uffds.remove(u);
            }
        }
    }

    fn fault(&mut self, u: usize, page: u64, out: &mut Vec<AgentMsg>) -> bool {
        let Some(ri) = self.run_of(page) else {
            // A page that never existed: zeros, as the kernel would give.
            return copy_range(&self.uffds[u], page, &ZERO_PAGE);
        };
        let run = &mut self.runs[ri];
        let i = run.index(page);
        if run.present[i] {
            let at = i * PAGE_SIZE as usize;
            let data = &run.data[at..at + PAGE_SIZE as usize];
            return copy_range(&self.uffds[u], page, data);
        }
        if !run.requested[i] {
            let mut n = 0;
            while n < FAULT_BATCH_PAGES as usize
                && i + n < run.present.len()
                && !run.present[i + n]
                && !run.requested[i + n]
            {
                run.requested[i + n] = true;
                n += 1;
            }
            out.push(AgentMsg::PageRequest {
                addr: page,
                len: n as u64 * PAGE_SIZE,
            });
        }
        true
    }

    /// Pages from the deputy: kept, and filled into every process served
    /// (waking whoever waits for them).
    pub fn on_pages(&mut self, addr: u64, bytes: &[u8]) {
        let Some(ri) = self.run_of(addr) else {
            tracing::warn!(addr, "pages outside the lazy runs");
            return;
        };
        let run = &mut self.runs[ri];
        let end = (addr + bytes.len() as u64).min(run.addr + run.len);
        if end <= addr {
            return;
        }
        if run.data.is_empty() {
            run.data = vec![0u8; run.len as usize];
        }
        let from = (addr - run.addr) as usize;
        let len = (end - addr) as usize;
        run.data[from..from + len].copy_from_slice(&bytes[..len]);
        let first = run.index(addr);
        for p in &mut run.present[first..first + len.div_ceil(PAGE_SIZE as usize)] {
            *p = true;
        }
        let data = &run.data[from..from + len];
        let uffds = &mut self.uffds;
        let mut alive = vec![true; uffds.len()];
        for (u, uffd) in uffds.iter().enumerate() {
            alive[u] = copy_range(uffd, addr, data);
        }
        let mut u = uffds.len();
        while u > 1 {
            u -= 1;
            if !alive[u] {
                uffds.remove(u);
            }
        }
    }

    /// Every page has come: the kernel takes the regions back.
    pub fn on_done(&mut self) {
        if let Some(missing) = self.runs.iter().find(|r| r.present.iter().any(|p| !p)) {
            tracing::error!(addr = missing.addr, "transfer ended with pages missing");
        }
        for uffd in &self.uffds {
            for &(start, end) in &self.regions {
                if let Err(e) = uffd.unregister(start, end - start) {
                    tracing::debug!(start, "lazy unregister: {e}");
                }
            }
        }
        self.done = true;
        self.runs.clear();
    }
}
