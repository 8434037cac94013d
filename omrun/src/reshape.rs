//! A program reshaping its mappings of DSM segments (SysV attachments,
//! anonymous shared memory, POSIX objects): `munmap` of part or all of
//! one, `mremap`, `mprotect`, `madvise`, `mmap(MAP_FIXED)` over one, and
//! `fallocate`/`ftruncate` of a POSIX object. Each keeps the kernel's
//! meaning; the client library keeps the pieces (what the daemon serves)
//! in step, so no page is ever mapped without being served (which the
//! kernel would fill with zeros).

use crate::runtime::{errno_of, lock, Runtime, SHARED_ANONYMOUS};
use std::sync::atomic::{AtomicBool, Ordering};

/// Whether this process has ever had a DSM mapping (checked first by every
/// reshaping call, so programs without any pay one load).
pub static ANY_DSM: AtomicBool = AtomicBool::new(false);

pub fn note_dsm_mapping() {
    ANY_DSM.store(true, Ordering::Release);
}

/// The runtime, if the range overlaps a DSM piece.
fn runtime_for(addr: usize, len: usize) -> Option<&'static Runtime> {
    if !ANY_DSM.load(Ordering::Acquire) {
        return None;
    }
    let rt = crate::runtime::runtime()?;
    rt.segments.maps_any(addr, len).then_some(rt)
}

/// Forget the attachments of which nothing is mapped any more.
fn prune(rt: &Runtime) {
    lock(&rt.attached).retain(|a| a.is_mapped());
    lock(&SHARED_ANONYMOUS).retain(|a| a.is_mapped());
}

/// `munmap` of a range with DSM pieces in it: `None` if there are none.
pub fn munmap(addr: usize, len: usize) -> Option<Result<(), i32>> {
    let rt = runtime_for(addr, len)?;
    if !addr.is_multiple_of(4096) || len == 0 {
        return Some(Err(libc::EINVAL));
    }
    Some((|| {
        dsm::memfd::raw::munmap(addr, len).map_err(|e| e.raw_os_error().unwrap_or(libc::EINVAL))?;
        let told = rt.segments.unmapped(addr, len).map_err(|e| errno_of(&e));
        prune(rt);
        told
    })())
}

/// The kernel mapped something else over `[addr, addr + len)`
/// (`mmap(MAP_FIXED)`): the DSM pieces there are gone.
pub fn mapped_over(addr: usize, len: usize) {
    if let Some(rt) = runtime_for(addr, len) {
        let _ = rt.segments.unmapped(addr, len);
        prune(rt);
    }
}

/// `mremap` of a DSM piece: `None` if the range holds none.
pub fn mremap(
    addr: usize,
    old_len: usize,
    new_len: usize,
    flags: i32,
    new_addr: usize,
) -> Option<Result<usize, i32>> {
    let rt = runtime_for(addr, old_len.max(1))?;
    let moved = rt.segments.remap(addr, old_len, new_len, flags, new_addr);
    prune(rt);
    Some(moved)
}

/// `mprotect` over DSM pieces: a piece attached read-only cannot become
/// writable (EACCES, as for a SysV `SHM_RDONLY` attachment, whose file is
/// open read-only). `None`: nothing to refuse, the kernel does it.
pub fn mprotect(addr: usize, len: usize, prot: i32) -> Option<i32> {
    let rt = runtime_for(addr, len)?;
    let refused =
        prot & libc::PROT_WRITE != 0 && rt.segments.pieces_in(addr, len).iter().any(|p| p.readonly);
    refused.then_some(libc::EACCES)
}

/// `madvise(MADV_REMOVE)` over DSM pieces frees their pages, so they read
/// as zeros afterwards, on every node: here the range is written with
/// zeros through the coherence protocol (the node copy must never lose a
/// page behind its back). Parts of the range outside DSM pieces go to the
/// kernel. `None` if there is no DSM piece in the range.
pub fn madvise_remove(addr: usize, len: usize) -> Option<Result<(), i32>> {
    let rt = runtime_for(addr, len)?;
    let end = addr.saturating_add(len);
    let mut pieces = rt.segments.pieces_in(addr, len);
    pieces.sort_by_key(|p| p.addr);
    if pieces.iter().any(|p| p.readonly) {
        return Some(Err(libc::EACCES));
    }
    Some((|| {
        let mut at = addr;
        for p in &pieces {
            let start = (p.addr as usize).max(addr);
            let stop = ((p.addr + p.len) as usize).min(end);
            if at < start {
                kernel_madvise(at, start - at, libc::MADV_REMOVE)?;
            }
            zero(start, stop - start)?;
            at = stop;
        }
        if at < end {
            kernel_madvise(at, end - at, libc::MADV_REMOVE)?;
        }
        Ok(())
    })())
}

fn kernel_madvise(addr: usize, len: usize, advice: i32) -> Result<(), i32> {
    // SAFETY: madvise on the program's own range, as it asked.
    let r = unsafe { libc::syscall(libc::SYS_madvise, addr, len, advice) };
    if r < 0 {
        // SAFETY: errno of this thread, just set.
        return Err(unsafe { *libc::__errno_location() });
    }
    Ok(())
}

/// Write zeros over `[addr, addr + len)` (a mapping that is not writable
/// now gives EACCES, as MADV_REMOVE does on one).
fn zero(addr: usize, len: usize) -> Result<(), i32> {
    const CHUNK: usize = 1 << 20;
    let zeros = vec![0u8; CHUNK.min(len)];
    let mut done = 0;
    while done < len {
        let n = CHUNK.min(len - done);
        crate::user::write_slice(addr + done, &zeros[..n]).map_err(|_| libc::EACCES)?;
        done += n;
    }
    Ok(())
}

/// `fallocate(PUNCH_HOLE or ZERO_RANGE)` of a POSIX object that is a
/// cluster segment: the range reads as zeros in every mapping on every
/// node. `None` if `fd` is no such object (the kernel does it all).
pub fn posix_zero_range(fd: i32, offset: u64, len: u64) -> Option<Result<(), i32>> {
    if !ANY_DSM.load(Ordering::Acquire) {
        return None;
    }
    let name = crate::runtime::posix_shm_name(fd)?;
    let rt = crate::runtime::runtime()?;
    let (size, _) = crate::runtime::posix_shm_stat(rt, &name)?;
    Some((|| {
        let id = crate::runtime::posix_segment(rt, &name).map_err(|e| errno_of(&e))?;
        let seg = rt.segments.attach(id, false).map_err(|e| errno_of(&e))?;
        let start = offset.min(size);
        let stop = offset.saturating_add(len).min(size);
        let zeroed = zero(
            seg.as_ptr() as usize + start as usize,
            (stop - start) as usize,
        );
        drop(seg);
        zeroed
    })())
}

/// `ftruncate` of a POSIX object that is a cluster segment: a segment's
/// size is fixed (every node maps it so), so a change of size is refused
/// with EPERM, what Linux answers for a memfd sealed against growing and
/// shrinking; the same size is fine. `None` if `fd` is no such object.
pub fn posix_truncate(fd: i32, size: u64) -> Option<i32> {
    if !ANY_DSM.load(Ordering::Acquire) {
        return None;
    }
    let name = crate::runtime::posix_shm_name(fd)?;
    let rt = crate::runtime::runtime()?;
    let (current, _) = crate::runtime::posix_shm_stat(rt, &name)?;
    (current != size).then_some(libc::EPERM)
}
