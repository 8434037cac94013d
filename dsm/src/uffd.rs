//! A thin, owned userfaultfd over the kernel uapi of `linux-raw-sys`.
//!
//! Why not the `userfaultfd` crate: it needs libclang at build time, closes
//! the fd in `into_raw_fd`, defaults to `UFFD_USER_MODE_ONLY` (syscalls that
//! touch the segment would get EFAULT instead of faulting into us) and has no
//! WP-mode CONTINUE. Here every fd is non-blocking (a blocking uffd reports
//! POLLERR to epoll at once), never user-mode-only, and owned.
//!
//! linux-raw-sys 0.12 has the structs but lacks a few mode bits and the
//! UFFDIO_POISON number; they are defined below from `linux/userfaultfd.h`.

use linux_raw_sys::general as uapi;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;
const UFFDIO_WRITEPROTECT_MODE_DONTWAKE: u64 = 1 << 1;
const UFFDIO_CONTINUE_MODE_WP: u64 = 1 << 1;

/// `_IOWR(UFFDIO, nr, size)` as `<asm-generic/ioctl.h>` builds it.
const fn iowr(nr: u32, size: usize) -> u64 {
    ((3u64) << 30) | ((size as u64) << 16) | ((uapi::UFFDIO as u64) << 8) | nr as u64
}
const UFFDIO_API: u64 = iowr(uapi::_UFFDIO_API, size_of::<uapi::uffdio_api>());
const UFFDIO_REGISTER: u64 = iowr(uapi::_UFFDIO_REGISTER, size_of::<uapi::uffdio_register>());
const UFFDIO_UNREGISTER: u64 =
    ((2u64) << 30) | ((size_of::<uapi::uffdio_range>() as u64) << 16) | (0xAA << 8) | 1;
const UFFDIO_WAKE: u64 =
    ((2u64) << 30) | ((size_of::<uapi::uffdio_range>() as u64) << 16) | (0xAA << 8) | 2;
const UFFDIO_WRITEPROTECT: u64 = iowr(
    uapi::_UFFDIO_WRITEPROTECT,
    size_of::<uapi::uffdio_writeprotect>(),
);
const UFFDIO_COPY: u64 = iowr(uapi::_UFFDIO_COPY, size_of::<uapi::uffdio_copy>());
const UFFDIO_CONTINUE: u64 = iowr(uapi::_UFFDIO_CONTINUE, size_of::<uapi::uffdio_continue>());
const UFFDIO_POISON: u64 = iowr(uapi::_UFFDIO_POISON, size_of::<uapi::uffdio_poison>());
/// `_IO(0xAA, 0)` on `/dev/userfaultfd`.
const USERFAULTFD_IOC_NEW: u64 = (0xAA << 8) as u64;

/// Features this project needs from the kernel.
pub const REQUIRED_FEATURES: u64 = (uapi::UFFD_FEATURE_MISSING_SHMEM
    | uapi::UFFD_FEATURE_MINOR_SHMEM
    | uapi::UFFD_FEATURE_WP_HUGETLBFS_SHMEM
    | uapi::UFFD_FEATURE_POISON) as u64;

/// Register for absent pages, present-but-unmapped pages and writes to
/// write-protected pages.
pub const MODE_ALL: u64 = (uapi::UFFDIO_REGISTER_MODE_MISSING
    | uapi::UFFDIO_REGISTER_MODE_WP
    | uapi::UFFDIO_REGISTER_MODE_MINOR) as u64;

/// A userfaultfd for the calling process that also handles faults taken
/// inside the kernel (a `read()` into a segment): by the syscall when the
/// process may, else through `/dev/userfaultfd` (`device` if given, an fd
/// of it the daemon opened, else opened here).
pub fn create_full(device: Option<std::os::fd::BorrowedFd<'_>>) -> io::Result<OwnedFd> {
    let flags = (libc::O_CLOEXEC | libc::O_NONBLOCK) as libc::c_long;
    // SAFETY: userfaultfd(2) takes a flags word and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
    if fd >= 0 {
        // SAFETY: the kernel just returned this fd to us; nobody else owns it.
        return Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) });
    }
    let syscall_err = io::Error::last_os_error();
    let opened;
    let dev = match device {
        Some(d) => d.as_raw_fd(),
        None => {
            opened = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/userfaultfd");
            match &opened {
                Ok(f) => f.as_raw_fd(),
                Err(_) => return Err(syscall_err),
            }
        }
    };
    // SAFETY: USERFAULTFD_IOC_NEW takes the flags as its argument and returns a new fd.
    let fd = unsafe { libc::ioctl(dev, USERFAULTFD_IOC_NEW as _, flags) };
    if fd < 0 {
        return Err(syscall_err);
    }
    // SAFETY: as above, a fresh fd from the kernel.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Last resort for an unprivileged process that has no access to
/// `/dev/userfaultfd`: user faults only. A syscall that touches a page not
/// present then fails with EFAULT instead of waiting.
pub fn create_user_only() -> io::Result<OwnedFd> {
    let flags = (libc::O_CLOEXEC | libc::O_NONBLOCK) as libc::c_long
        | uapi::UFFD_USER_MODE_ONLY as libc::c_long;
    // SAFETY: userfaultfd(2) takes a flags word and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd from the kernel.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// A userfaultfd for the calling process: one that handles kernel faults
/// if it can be had, else a user-faults-only one.
pub fn create_for_self() -> io::Result<OwnedFd> {
    create_full(None).or_else(|_| create_user_only())
}

/// What the kernel supports, probed on a throwaway fd (an API handshake can
/// only be done once per fd).
pub fn probe_features() -> io::Result<u64> {
    let fd = create_for_self()?;
    Uffd::from_fd(fd).api(0)
}

/// One event read from a uffd.
#[derive(Debug)]
pub enum Event {
    PageFault {
        addr: u64,
        write: bool,
        wp: bool,
        minor: bool,
    },
    Fork {
        child: OwnedFd,
    },
    Remove {
        start: u64,
        end: u64,
    },
    Unmap {
        start: u64,
        end: u64,
    },
    Remap {
        from: u64,
        to: u64,
        len: u64,
    },
    Unknown(u8),
}

/// An owned userfaultfd (possibly one another process created and sent us).
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
}

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl Uffd {
    pub fn from_fd(fd: OwnedFd) -> Uffd {
        Uffd { fd }
    }

    /// The API handshake; asks for `features` and returns what is granted.
    pub fn api(&self, features: u64) -> io::Result<u64> {
        let mut api = uapi::uffdio_api {
            api: uapi::UFFD_API as u64,
            features,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API reads and writes one uffdio_api that lives on our stack.
        check(unsafe { libc::ioctl(self.as_raw_fd(), UFFDIO_API as _, &mut api) })?;
        Ok(api.features)
    }

    pub fn register(&self, start: u64, len: u64, mode: u64) -> io::Result<()> {
        let mut reg = uapi::uffdio_register {
            range: uapi::uffdio_range { start, len },
            mode,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes one uffdio_register on our stack.
        check(unsafe { libc::ioctl(self.as_raw_fd(), UFFDIO_REGISTER as _, &mut reg) })
    }

    pub fn unregister(&self, start: u64, len: u64) -> io::Result<()> {
        let mut range = uapi::uffdio_range { start, len };
        // SAFETY: UFFDIO_UNREGISTER reads one uffdio_range on our stack.
        check(unsafe { libc::ioctl(self.as_raw_fd(), UFFDIO_UNREGISTER as _, &mut range) })
    }

    /// Fill absent pages with `src` (in our own memory) and map them into
    /// this uffd's process, write-protected if asked. On shmem the page also
    /// enters the shared page cache. Returns bytes copied; EEXIST means a
    /// page was present already.
    pub fn copy(&self, dst: u64, src: &[u8], write_protect: bool) -> io::Result<u64> {
        let mode = if write_protect {
            u64::from(uapi::UFFDIO_COPY_MODE_WP)
        } else {
            0
        };
        let mut arg = uapi::uffdio_copy {
            dst,
            src: src.as_ptr() as u64,
            len: src.len() as u64,
            mode,
            copy: 0,
        };
        // SAFETY: UFFDIO_COPY reads `len` bytes from `src`, a live slice, and
        // writes the result into the uffdio_copy on our stack.
        let ret = unsafe { libc::ioctl(self.as_raw_fd(), UFFDIO_COPY as _, &mut arg) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(arg.copy.max(0) as u64)
    }

    /// Map pages already in the shared page cache into this uffd's process
    /// (read-only if `write_protect`). Returns bytes mapped; EEXIST means a
    /// page was already mapped (another thread got there first).
    pub fn continue_(&self, start: u64, len: u64, write_protect: bool) -> io::Result<u64> {
        let mode = if write_protect {
            UFFDIO_CONTINUE_MODE_WP
        } else {
            0
        };
        let mut arg = uapi::uffdio_continue {
            range: uapi::uffdio_range { start, len },
            mode,
            mapped: 0,
        };
        // SAFETY: UFFDIO_CONTINUE reads and writes one uffdio_continue on our stack.
        let ret = unsafe { libc::ioctl(self.as_raw_fd(), UFFDIO_CONTINUE as _, &mut arg) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(arg.mapped.max(0) as u64)
    }

    /// Set (`protect`) or clear write protection on a range; clearing wakes
    /// the faulting threads unless `wake` is false.
    pub fn write_protect(&self, start: u64, len: u64, protect: bool, wake: bool) -> io::Result<()> {
        // The kernel refuses DONTWAKE together with WP (setting protection
        // wakes nobody anyway).
        let mode = match (protect, wake) {
            (true, _) => UFFDIO_WRITEPROTECT_MODE_WP,
            (false, true) => 0,
            (false, false) => UFFDIO_WRITEPROTECT_MODE_DONTWAKE,
        };
        let mut arg = uapi::uffdio_writeprotect {
            range: uapi::uffdio_range { start, len },
            mode,
        };
        // SAFETY: UFFDIO_WRITEPROTECT reads one uffdio_writeprotect on our stack.
        check(unsafe { libc::ioctl(self.as_raw_fd(), UFFDIO_WRITEPROTECT as _, &mut arg) })
    }

    pub fn wake(&self, start: u64, len: u64) -> io::Result<()> {
        let mut range = uapi::uffdio_range { start, len };
        // SAFETY: UFFDIO_WAKE reads one uffdio_range on our stack.
        check(unsafe { libc::ioctl(self.as_raw_fd(), UFFDIO_WAKE as _, &mut range) })
    }

    /// Make accesses to the range raise SIGBUS (and wake the faulters).
    pub fn poison(&self, start: u64, len: u64) -> io::Result<()> {
        let mut arg = uapi::uffdio_poison {
            range: uapi::uffdio_range { start, len },
            mode: 0,
            updated: 0,
        };
        // SAFETY: UFFDIO_POISON reads and writes one uffdio_poison on our stack.
        check(unsafe { libc::ioctl(self.as_raw_fd(), UFFDIO_POISON as _, &mut arg) })
    }

    /// Read every event queued now (non-blocking; an empty queue yields
    /// nothing). Stops at `max` events.
    pub fn read_events(&self, out: &mut Vec<Event>, max: usize) -> io::Result<()> {
        const BATCH: usize = 32;
        let msg_size = size_of::<uapi::uffd_msg>();
        let mut buf = [0u8; BATCH * 32];
        debug_assert_eq!(msg_size, 32);
        while out.len() < max {
            // SAFETY: reading into a stack buffer of the stated length.
            let n = unsafe { libc::read(self.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                let err = io::Error::last_os_error();
                return match err.raw_os_error() {
                    Some(libc::EAGAIN) => Ok(()),
                    Some(libc::EINTR) => continue,
                    _ => Err(err),
                };
            }
            if n == 0 {
                return Ok(());
            }
            for chunk in buf[..n as usize].chunks_exact(msg_size) {
                // SAFETY: the kernel wrote whole uffd_msg records; read_unaligned
                // copes with the packed layout.
                let msg: uapi::uffd_msg =
                    unsafe { std::ptr::read_unaligned(chunk.as_ptr().cast()) };
                out.push(decode(msg));
            }
            if (n as usize) < buf.len() {
                return Ok(());
            }
        }
        Ok(())
    }
}

fn decode(msg: uapi::uffd_msg) -> Event {
    match u32::from(msg.event) {
        uapi::UFFD_EVENT_PAGEFAULT => {
            // SAFETY: the event tag says the pagefault arm is the live one.
            let pf = unsafe { msg.arg.pagefault };
            let flags = pf.flags;
            Event::PageFault {
                addr: pf.address,
                write: flags & u64::from(uapi::UFFD_PAGEFAULT_FLAG_WRITE) != 0,
                wp: flags & u64::from(uapi::UFFD_PAGEFAULT_FLAG_WP) != 0,
                minor: flags & u64::from(uapi::UFFD_PAGEFAULT_FLAG_MINOR) != 0,
            }
        }
        uapi::UFFD_EVENT_FORK => {
            // SAFETY: the event tag says the fork arm is the live one; the
            // kernel installed the child's uffd in our fd table for us to own.
            let child = unsafe { OwnedFd::from_raw_fd(msg.arg.fork.ufd as RawFd) };
            Event::Fork { child }
        }
        uapi::UFFD_EVENT_REMOVE => {
            // SAFETY: the event tag selects the remove arm.
            let r = unsafe { msg.arg.remove };
            Event::Remove {
                start: r.start,
                end: r.end,
            }
        }
        uapi::UFFD_EVENT_UNMAP => {
            // SAFETY: unmap events use the remove arm's layout.
            let r = unsafe { msg.arg.remove };
            Event::Unmap {
                start: r.start,
                end: r.end,
            }
        }
        uapi::UFFD_EVENT_REMAP => {
            // SAFETY: the event tag selects the remap arm.
            let r = unsafe { msg.arg.remap };
            Event::Remap {
                from: r.from,
                to: r.to,
                len: r.len,
            }
        }
        other => Event::Unknown(other as u8),
    }
}

impl std::os::fd::AsFd for Uffd {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for Uffd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Register a shared uffd with the tokio reactor for readability.
pub fn async_uffd(
    uffd: std::sync::Arc<Uffd>,
) -> io::Result<tokio::io::unix::AsyncFd<std::sync::Arc<Uffd>>> {
    // SAFETY: the AsyncFd holds an Arc of the Uffd, which owns the fd, so
    // the fd stays open and the same while the AsyncFd exists.
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(uffd, tokio::io::Interest::READABLE) }
        .map_err(|e| e.into_parts().1)
}

/// True for errors that only mean the uffd's process has exited (its
/// memory is gone, so there is nothing left to protect or resolve).
pub fn process_gone(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ESRCH) | Some(libc::ENOENT))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_kernel_headers() {
        use linux_raw_sys::ioctl;
        assert_eq!(UFFDIO_API, u64::from(ioctl::UFFDIO_API));
        assert_eq!(UFFDIO_REGISTER, u64::from(ioctl::UFFDIO_REGISTER));
        assert_eq!(UFFDIO_UNREGISTER, u64::from(ioctl::UFFDIO_UNREGISTER));
        assert_eq!(UFFDIO_WAKE, u64::from(ioctl::UFFDIO_WAKE));
        assert_eq!(UFFDIO_WRITEPROTECT, u64::from(ioctl::UFFDIO_WRITEPROTECT));
        assert_eq!(UFFDIO_CONTINUE, u64::from(ioctl::UFFDIO_CONTINUE));
        assert_eq!(UFFDIO_COPY, u64::from(ioctl::UFFDIO_COPY));
        // _IOWR(0xAA, 8, struct uffdio_poison) from <linux/userfaultfd.h>.
        assert_eq!(UFFDIO_POISON, 0xC020_AA08);
    }
}
