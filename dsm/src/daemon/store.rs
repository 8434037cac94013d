//! This node's memory: each segment's memfd (the node copy), the home copies
//! of segments homed here, and the local processes that map them, each with
//! its userfaultfd. Implements the engine's [`PageStore`] and applies its
//! fault resolutions through the processes' uffds.

use crate::coherence::{Access, PageStore, Resolution};
use crate::ids::{PageKey, SegmentId, PAGE_SIZE};
use crate::memfd::Memfd;
use crate::uffd::Uffd;
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::Arc;

pub type ProcId = u64;

/// A fault waiting in the engine: which process, which page address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Waiter {
    pub proc: ProcId,
    pub addr: u64,
    /// A read-only mapping (PROT_READ, registered without WP): mapped as is.
    pub readonly: bool,
}

/// One process's mapping of one segment.
#[derive(Clone, Copy, Debug)]
pub struct MappingRecord {
    pub proc: ProcId,
    pub seg: SegmentId,
    pub addr: u64,
    pub len: u64,
    pub readonly: bool,
    /// Segment page mapped at `addr`.
    pub pgoff: u64,
    /// The process's attachment this piece belongs to.
    pub handle: u64,
}

impl MappingRecord {
    /// The address of segment page `page` in this piece, if it maps it.
    pub fn addr_of(&self, page: u64) -> Option<u64> {
        let pages = self.len / PAGE_SIZE as u64;
        (page >= self.pgoff && page < self.pgoff + pages)
            .then(|| self.addr + (page - self.pgoff) * PAGE_SIZE as u64)
    }

    /// The pages of the run `[first, first + count)` this piece maps, as
    /// (address, bytes).
    pub fn run(&self, first: u64, count: u64) -> Option<(u64, u64)> {
        let pages = self.len / PAGE_SIZE as u64;
        let start = first.max(self.pgoff);
        let end = (first + count).min(self.pgoff + pages);
        (start < end).then(|| {
            (
                self.addr + (start - self.pgoff) * PAGE_SIZE as u64,
                (end - start) * PAGE_SIZE as u64,
            )
        })
    }

    /// The segment page at `addr` (inside this piece).
    pub fn page_at(&self, addr: u64) -> u64 {
        self.pgoff + (addr - self.addr) / PAGE_SIZE as u64
    }
}

/// A node's copy of a segment.
pub struct LocalSegment {
    pub memfd: Memfd,
    pub size: u64,
    pub mappings: Vec<MappingRecord>,
    /// The home was lost: the id answers EIDRM, pages held here stay usable.
    pub home_lost: bool,
}

impl LocalSegment {
    /// A descriptor of the node copy for a process to map.
    pub fn memfd_dup(&self) -> std::io::Result<std::os::fd::OwnedFd> {
        use std::os::fd::AsFd;
        self.memfd.as_fd().try_clone_to_owned()
    }
}

pub struct LocalProcess {
    pub pid: i32,
    /// Names the process for the guardian (no pid reuse race).
    pub pidfd: std::os::fd::OwnedFd,
    pub uffd: Arc<Uffd>,
    /// In the guardian's hands (while it maps a segment; see
    /// `Core::release_if_unmapped`).
    pub guarded: bool,
    /// Page faults it made on DSM segments (the balancer's measure of its
    /// sharing).
    pub faults: u64,
}

#[derive(Default)]
pub struct NodeStore {
    pub segments: HashMap<SegmentId, LocalSegment>,
    pub home_copies: HashMap<SegmentId, Memfd>,
    pub procs: HashMap<ProcId, LocalProcess>,
    pub faults_served: u64,
}

fn offset(page: PageKey) -> u64 {
    u64::from(page.page.0) * PAGE_SIZE as u64
}

fn read_page(memfd: &Memfd, page: PageKey) -> Bytes {
    read_run(memfd, page, 1)
        .pop()
        .unwrap_or_else(|| Bytes::from(vec![0u8; PAGE_SIZE]))
}

impl PageStore for NodeStore {
    fn protect_local(&mut self, page: PageKey) {
        self.protect_local_run(page, 1);
    }

    fn read_local(&mut self, page: PageKey) -> Bytes {
        match self.segments.get(&page.seg) {
            Some(seg) => read_page(&seg.memfd, page),
            None => {
                tracing::error!(?page, "read of a segment with no node copy");
                Bytes::from(vec![0u8; PAGE_SIZE])
            }
        }
    }

    fn write_local(&mut self, page: PageKey, data: &[u8]) {
        let Some(seg) = self.segments.get(&page.seg) else {
            return;
        };
        if let Err(e) = seg.memfd.write_at(offset(page), data) {
            tracing::error!(?page, "pwrite of a page failed: {e}");
        }
    }

    fn punch_local(&mut self, page: PageKey) {
        let Some(seg) = self.segments.get(&page.seg) else {
            return;
        };
        if let Err(e) = seg.memfd.punch(offset(page), PAGE_SIZE as u64) {
            tracing::error!(?page, "punch failed: {e}");
        }
    }

    fn zero_local_run(&mut self, first: PageKey, count: u32) {
        let Some(seg) = self.segments.get(&first.seg) else {
            return;
        };
        let len = u64::from(count) * PAGE_SIZE as u64;
        if let Err(e) = seg.memfd.allocate(offset(first), len) {
            // Out of memory or over a limit: write the zeros instead, which
            // fails (and says so) the same way if memory is really gone.
            tracing::warn!(?first, count, "fallocate of fresh pages failed: {e}");
            let zeros = vec![0u8; PAGE_SIZE];
            for page in crate::coherence::run(first, count) {
                self.write_local(page, &zeros);
            }
        }
    }

    fn read_home(&mut self, page: PageKey) -> Bytes {
        match self.home_copies.get(&page.seg) {
            Some(memfd) => read_page(memfd, page),
            None => {
                tracing::error!(?page, "read of a home copy that does not exist");
                Bytes::from(vec![0u8; PAGE_SIZE])
            }
        }
    }

    fn protect_local_run(&mut self, first: PageKey, count: u32) {
        let Some(seg) = self.segments.get(&first.seg) else {
            return;
        };
        for m in seg.mappings.iter().filter(|m| !m.readonly) {
            let Some(proc) = self.procs.get(&m.proc) else {
                continue;
            };
            let Some((addr, len)) = m.run(u64::from(first.page.0), u64::from(count)) else {
                continue;
            };
            if let Err(e) = proc.uffd.write_protect(addr, len, true, false) {
                // A process that already exited has no mapping left to protect.
                if crate::uffd::process_gone(&e) {
                    tracing::debug!(
                        ?first,
                        count,
                        pid = proc.pid,
                        "write-protect, process gone: {e}"
                    );
                } else {
                    tracing::error!(?first, count, pid = proc.pid, "write-protect failed: {e}");
                }
            }
        }
    }

    fn read_local_run(&mut self, first: PageKey, count: u32) -> Vec<Bytes> {
        match self.segments.get(&first.seg) {
            Some(seg) => read_run(&seg.memfd, first, count),
            None => crate::coherence::run(first, count)
                .map(|p| self.read_local(p))
                .collect(),
        }
    }

    fn write_local_run(&mut self, first: PageKey, data: &[Bytes]) {
        if let Some(seg) = self.segments.get(&first.seg) {
            write_run(&seg.memfd, first, data);
        }
    }

    fn read_home_run(&mut self, first: PageKey, count: u32) -> Vec<Bytes> {
        match self.home_copies.get(&first.seg) {
            Some(memfd) => read_run(memfd, first, count),
            None => crate::coherence::run(first, count)
                .map(|p| self.read_home(p))
                .collect(),
        }
    }

    fn write_home_run(&mut self, first: PageKey, data: &[Bytes]) {
        if let Some(memfd) = self.home_copies.get(&first.seg) {
            write_run(memfd, first, data);
        }
    }

    fn write_home(&mut self, page: PageKey, data: &[u8]) {
        let Some(memfd) = self.home_copies.get(&page.seg) else {
            return;
        };
        if let Err(e) = memfd.write_at(offset(page), data) {
            tracing::error!(?page, "pwrite of a home copy failed: {e}");
        }
    }
}

fn read_run(memfd: &Memfd, first: PageKey, count: u32) -> Vec<Bytes> {
    let len = count as usize * PAGE_SIZE;
    let buf = memfd.read_bytes(offset(first), len).unwrap_or_else(|e| {
        tracing::error!(?first, count, "pread of a run failed: {e}");
        Bytes::from(vec![0u8; len])
    });
    (0..count as usize)
        .map(|i| buf.slice(i * PAGE_SIZE..(i + 1) * PAGE_SIZE))
        .collect()
}

fn write_run(memfd: &Memfd, first: PageKey, data: &[Bytes]) {
    let bufs: Vec<&[u8]> = data.iter().map(|b| b.as_ref()).collect();
    if let Err(e) = memfd.write_vectored_at(offset(first), &bufs) {
        tracing::error!(?first, count = data.len(), "pwritev of a run failed: {e}");
    }
}

impl NodeStore {
    /// The mapping of `proc` that contains `addr`, if any.
    pub fn mapping_at(&self, proc: ProcId, addr: u64) -> Option<MappingRecord> {
        self.segments
            .values()
            .flat_map(|s| s.mappings.iter())
            .find(|m| m.proc == proc && addr >= m.addr && addr < m.addr + m.len)
            .copied()
    }

    /// Carry out a resolution on the waiting process.
    pub fn apply(&mut self, res: &Resolution<Waiter>) {
        let Some(proc) = self.procs.get(&res.waiter.proc) else {
            return;
        };
        self.faults_served += 1;
        let addr = res.waiter.addr;
        let page = PAGE_SIZE as u64;
        // Read-only mappings are registered without WP; PROT_READ keeps
        // them read-only anyway.
        let protect = !res.waiter.readonly;
        let result = match res.access {
            Access::ReadOnly => match proc.uffd.continue_(addr, page, protect) {
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => proc.uffd.wake(addr, page),
                other => other.map(|_| ()),
            },
            Access::Writable => match proc.uffd.continue_(addr, page, false) {
                // Already mapped, write-protected: lift the protection, which
                // also wakes the writer.
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) && protect => {
                    proc.uffd.write_protect(addr, page, false, true)
                }
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => proc.uffd.wake(addr, page),
                other => other.map(|_| ()),
            },
            Access::Poison => match proc.uffd.poison(addr, page) {
                // A write-protect marker left on the empty PTE by an earlier
                // invalidation blocks POISON: clear it, then poison.
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) && protect => proc
                    .uffd
                    .write_protect(addr, page, false, false)
                    .and_then(|()| proc.uffd.poison(addr, page)),
                other => other,
            },
        };
        if let Err(e) = result {
            if crate::uffd::process_gone(&e) {
                tracing::debug!(pid = proc.pid, addr, ?res.access, "fault of an exited process: {e}");
            } else {
                // Never leave a thread blocked on a fault we failed to
                // resolve: a SIGBUS is a defined failure, a hang is not.
                tracing::error!(pid = proc.pid, addr, ?res.access, "resolving a fault failed, poisoning: {e}");
                if let Err(e) = proc.uffd.poison(addr, page) {
                    tracing::error!(pid = proc.pid, addr, "poison failed too: {e}");
                    let _ = proc.uffd.wake(addr, page);
                }
            }
        }
        // The neighbours this piece of the mapping has (a piece may end
        // before the segment does).
        let room = self
            .mapping_at(res.waiter.proc, addr)
            .map_or(0, |m| (m.addr + m.len).saturating_sub(addr + page) / page);
        let also = u64::from(res.also_mapped).min(room);
        if also > 0 && res.access != Access::Poison {
            // Read-ahead, or fault-around on pages held Exclusive: map the
            // neighbours into the same process now (read-only, or as the
            // faulting page was), so that it does not fault on each one.
            // EEXIST (the first was mapped already) and EAGAIN (the
            // kernel stopped at one that was: a partial run) only mean
            // some of them need no mapping.
            let len = also * page;
            let wp = protect && res.access == Access::ReadOnly;
            if let Err(e) = proc.uffd.continue_(addr + page, len, wp) {
                let some_mapped = matches!(e.raw_os_error(), Some(libc::EEXIST | libc::EAGAIN));
                if !some_mapped && !crate::uffd::process_gone(&e) {
                    tracing::warn!(pid = proc.pid, addr, "mapping read-ahead pages: {e}");
                }
            }
        }
    }
}
