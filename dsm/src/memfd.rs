//! A node's copy of a segment (a memfd) and process mappings of it.
//!
//! The daemon never touches a segment through a mapping (reading a hole that
//! way would insert a zero page into the shared cache, DESIGN.md fact 6): it
//! uses `pread`/`pwrite` on the fd and `fallocate(PUNCH_HOLE)` to drop pages.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// A sealed-size shmem file holding one node's copy of a segment.
#[derive(Debug)]
pub struct Memfd {
    fd: OwnedFd,
    len: u64,
}

impl Memfd {
    pub fn create(name: &str, len: u64) -> io::Result<Memfd> {
        let cname = CString::new(name).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: memfd_create takes a NUL-terminated name and flags; returns a new fd.
        let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the fd was just created and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let len_off =
            libc::off_t::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: ftruncate on an fd we own.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), len_off) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Memfd { fd, len })
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// `pread` until `len` bytes or the end of the file; returns bytes read.
    ///
    /// # Safety
    /// `dst` must be valid for writes of `len` bytes.
    unsafe fn pread_full(&self, offset: u64, dst: *mut u8, len: usize) -> io::Result<usize> {
        let mut done = 0;
        while done < len {
            // SAFETY: `dst + done .. dst + len` is writable (the caller's promise).
            let n = unsafe {
                libc::pread(
                    self.fd.as_raw_fd(),
                    dst.add(done).cast(),
                    len - done,
                    (offset + done as u64) as libc::off_t,
                )
            };
            match n {
                n if n > 0 => done += n as usize,
                0 => break,
                _ => {
                    let e = io::Error::last_os_error();
                    if e.raw_os_error() != Some(libc::EINTR) {
                        return Err(e);
                    }
                }
            }
        }
        Ok(done)
    }

    /// Fill `buf` from `offset`; beyond the end reads as zeros, as a mapping
    /// would show.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        // SAFETY: `buf` is a live, writable slice of its length.
        let n = unsafe { self.pread_full(offset, buf.as_mut_ptr(), buf.len())? };
        buf[n..].fill(0);
        Ok(())
    }

    /// Read `len` bytes from `offset` into a new buffer (holes and the part
    /// beyond the end read as zeros), without zero-filling it first.
    pub fn read_bytes(&self, offset: u64, len: usize) -> io::Result<bytes::Bytes> {
        let mut buf: Vec<u8> = Vec::with_capacity(len);
        // SAFETY: the spare capacity holds at least `len` writable bytes.
        let n = unsafe { self.pread_full(offset, buf.as_mut_ptr(), len)? };
        for b in &mut buf.spare_capacity_mut()[n..len] {
            b.write(0);
        }
        // SAFETY: bytes 0..n were written by pread and n..len just above.
        unsafe { buf.set_len(len) };
        Ok(bytes::Bytes::from(buf))
    }

    pub fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut done = 0;
        while done < data.len() {
            let rest = &data[done..];
            // SAFETY: pwrite from the live slice `rest` of the stated length.
            let n = unsafe {
                libc::pwrite(
                    self.fd.as_raw_fd(),
                    rest.as_ptr().cast(),
                    rest.len(),
                    (offset + done as u64) as libc::off_t,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::EINTR) {
                    return Err(e);
                }
                continue;
            }
            done += n as usize;
        }
        Ok(())
    }

    /// Write several buffers back to back from `offset` (one `pwritev` per
    /// batch of up to 512 buffers).
    pub fn write_vectored_at(&self, offset: u64, bufs: &[&[u8]]) -> io::Result<()> {
        let mut offset = offset;
        for batch in bufs.chunks(512) {
            let iov: Vec<libc::iovec> = batch
                .iter()
                .map(|b| libc::iovec {
                    iov_base: b.as_ptr() as *mut libc::c_void,
                    iov_len: b.len(),
                })
                .collect();
            let total: usize = batch.iter().map(|b| b.len()).sum();
            // SAFETY: every iovec points at a live slice of the stated length.
            let n = unsafe {
                libc::pwritev(
                    self.fd.as_raw_fd(),
                    iov.as_ptr(),
                    iov.len() as i32,
                    offset as libc::off_t,
                )
            };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            if (n as usize) < total {
                // Short write (rare for shmem): finish each buffer's rest.
                let written = n as usize;
                let mut pos = 0usize;
                for b in batch {
                    let end = pos + b.len();
                    if end > written {
                        let skip = written.saturating_sub(pos);
                        self.write_at(offset + (pos + skip) as u64, &b[skip..])?;
                    }
                    pos = end;
                }
            }
            offset += total as u64;
        }
        Ok(())
    }

    /// Drop the pages of a range from the node's copy: every mapping loses
    /// them and the next access faults (MISSING).
    pub fn punch(&self, offset: u64, len: u64) -> io::Result<()> {
        // SAFETY: fallocate on an fd we own, with a range inside the file.
        let ret = unsafe {
            libc::fallocate(
                self.fd.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Memfd {
    /// Allocate the pages of a range (zeros where there was a hole, data
    /// kept where there was some), without copying anything in.
    pub fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        // SAFETY: fallocate on an fd we own, with a range inside the file;
        // KEEP_SIZE so a range past the end never grows it.
        let ret = unsafe {
            libc::fallocate(
                self.fd.as_raw_fd(),
                libc::FALLOC_FL_KEEP_SIZE,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl AsFd for Memfd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// A `MAP_SHARED` mapping of a memfd into this process, unmapped on drop.
#[derive(Debug)]
pub struct Mapping {
    addr: *mut libc::c_void,
    len: usize,
}

// SAFETY: the mapping is plain shared memory; access to its bytes is
// governed by whoever hands out references (atomics or copies).
unsafe impl Send for Mapping {}
// SAFETY: as above; the struct itself is immutable.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Map `len` bytes of `fd` shared, read-only or read-write, at `hint` if
    /// given (`MAP_FIXED_NOREPLACE`) or where the kernel chooses.
    pub fn map(
        fd: BorrowedFd<'_>,
        len: usize,
        writable: bool,
        hint: Option<usize>,
    ) -> io::Result<Mapping> {
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        let mut flags = libc::MAP_SHARED;
        let addr = match hint {
            Some(a) => {
                flags |= libc::MAP_FIXED_NOREPLACE;
                a as *mut libc::c_void
            }
            None => std::ptr::null_mut(),
        };
        let ptr =
            raw::mmap(addr as usize, len, prot, flags, fd.as_raw_fd(), 0)? as *mut libc::c_void;
        if hint.is_some_and(|a| a != ptr as usize) {
            // Old kernels ignore NOREPLACE and treat it as a hint.
            // Unmapping the mapping we just made.
            let _ = raw::munmap(ptr as usize, len);
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        Ok(Mapping { addr: ptr, len })
    }

    pub fn addr(&self) -> usize {
        self.addr as usize
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.addr.cast()
    }
}

impl Mapping {
    /// Keep the pages mapped past this value's life (their owner tracks
    /// them from now on, as pieces that may be reshaped).
    pub fn leak(self) -> (usize, usize) {
        let me = std::mem::ManuallyDrop::new(self);
        (me.addr as usize, me.len)
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // Unmapping exactly the range this value mapped.
        let _ = raw::munmap(self.addr as usize, self.len);
    }
}

/// The mapping system calls themselves, not libc's functions: inside the
/// preload library those are the interposer's, which tracks DSM mappings
/// and must not see its own.
pub mod raw {
    use std::io;

    fn check(r: libc::c_long) -> io::Result<usize> {
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r as usize)
        }
    }

    pub fn mmap(
        addr: usize,
        len: usize,
        prot: i32,
        flags: i32,
        fd: i32,
        offset: u64,
    ) -> io::Result<usize> {
        // SAFETY: mmap creates a mapping; callers pass MAP_FIXED only over
        // ranges they own (a DSM piece they replace).
        check(unsafe { libc::syscall(libc::SYS_mmap, addr, len, prot, flags, fd, offset) })
    }

    pub fn munmap(addr: usize, len: usize) -> io::Result<()> {
        // SAFETY: callers unmap only ranges they mapped (DSM pieces).
        check(unsafe { libc::syscall(libc::SYS_munmap, addr, len) }).map(|_| ())
    }

    pub fn mprotect(addr: usize, len: usize, prot: i32) -> io::Result<()> {
        // SAFETY: changes protections of the caller's own range only.
        check(unsafe { libc::syscall(libc::SYS_mprotect, addr, len, prot) }).map(|_| ())
    }
}

/// Largest run buffer glibc should keep in the heap rather than mmap afresh.
const HEAP_BUFFER_MAX: libc::c_int = 64 << 20;

/// Keep freed page-run buffers (up to `PREFETCH_PAGES_MAX` pages, 2 MiB) in
/// the heap for reuse. By default glibc serves such sizes with a fresh `mmap`
/// and returns them with `munmap`, so every run read for a peer paid a page
/// fault and a page clear per 4 KiB before the copy: a third of the home's
/// CPU in a remote scan.
pub fn reuse_page_buffers() {
    // SAFETY: mallopt only changes allocator tunables; called before any
    // thread of the daemon starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, HEAP_BUFFER_MAX);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 2 * HEAP_BUFFER_MAX);
    }
}
