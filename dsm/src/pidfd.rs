//! Process descriptors: learn that a process exited, however it died, and
//! never confuse it with a later process that reuses its pid.

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};

/// A pidfd for `pid` (ESRCH if it is already gone).
pub fn open(pid: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor
    // or -1; it touches no memory of ours.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Has the process behind `fd` exited (a pidfd turns readable then)?
pub fn has_exited(fd: &OwnedFd) -> bool {
    readable_now(fd.as_fd())
}

/// Is `fd` readable right now (for a pidfd: its process exited; for a
/// socket: data or its end)?
pub fn readable_now(fd: std::os::fd::BorrowedFd<'_>) -> bool {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, zero timeout.
    let n = unsafe { libc::poll(&mut pfd, 1, 0) };
    n > 0 && pfd.revents & libc::POLLIN != 0
}

/// Send `signal` to the process behind `fd` (never to a later process
/// that reuses its pid).
pub fn send_signal(fd: &OwnedFd, signal: i32) -> std::io::Result<()> {
    // SAFETY: pidfd_send_signal takes a pidfd, a signal number, a null
    // siginfo and flags; it touches no memory of ours.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Wait until the process behind `fd` exits.
pub async fn exited(fd: OwnedFd) {
    readable(fd).await
}

/// Wait until `fd` turns readable (a pidfd: its process exited; a socket
/// whose other end never writes: that end is gone).
pub async fn readable(fd: OwnedFd) {
    // SAFETY: the AsyncFd owns the pidfd, so it stays open and the same for
    // the AsyncFd's whole life.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
    };
    match registered {
        Ok(afd) => {
            let _ = afd.readable().await;
        }
        Err(e) => {
            let (fd, e) = e.into_parts();
            tracing::warn!("cannot register a pidfd ({e}); polling it");
            while !has_exited(&fd) {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

/// A set of pidfds that says, in one call and whatever its size, which of
/// them belong to processes that exited (an epoll set, level-triggered).
pub struct ExitSet {
    epoll: OwnedFd,
}

impl ExitSet {
    pub fn new() -> std::io::Result<ExitSet> {
        // SAFETY: epoll_create1 takes flags and returns a new fd or -1.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: the kernel just returned this fd and nothing else owns it.
        let epoll = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(ExitSet { epoll })
    }

    /// Watch `fd`; `token` is what [`ExitSet::exited`] reports for it.
    pub fn add(&self, fd: &OwnedFd, token: u64) -> std::io::Result<()> {
        self.add_fd(fd.as_fd(), token)
    }

    /// Watch any descriptor for readability under `token`.
    pub fn add_fd(&self, fd: std::os::fd::BorrowedFd<'_>, token: u64) -> std::io::Result<()> {
        let mut event = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: token,
        };
        // SAFETY: a valid epoll fd, a valid fd to add, a valid event.
        let r = unsafe {
            libc::epoll_ctl(
                self.epoll.as_raw_fd(),
                libc::EPOLL_CTL_ADD,
                fd.as_raw_fd(),
                &mut event,
            )
        };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Stop watching `fd` (before closing it).
    pub fn remove(&self, fd: &OwnedFd) {
        self.remove_fd(fd.as_fd())
    }

    /// Stop watching a descriptor added with [`ExitSet::add_fd`].
    pub fn remove_fd(&self, fd: std::os::fd::BorrowedFd<'_>) {
        // SAFETY: a valid epoll fd and fd; the event may be null for DEL.
        unsafe {
            libc::epoll_ctl(
                self.epoll.as_raw_fd(),
                libc::EPOLL_CTL_DEL,
                fd.as_raw_fd(),
                std::ptr::null_mut(),
            )
        };
    }

    /// The tokens of the watched processes that exited (each stays
    /// reported until removed), without waiting.
    pub fn exited(&self) -> Vec<u64> {
        self.wait(0)
    }

    /// The tokens of the descriptors that are readable, waiting up to
    /// `timeout_ms` (-1: until one is) for one to be.
    pub fn wait(&self, timeout_ms: i32) -> Vec<u64> {
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 64];
        // SAFETY: a valid epoll fd and a buffer of 64 events.
        let n = unsafe {
            libc::epoll_wait(
                self.epoll.as_raw_fd(),
                events.as_mut_ptr(),
                events.len() as i32,
                timeout_ms,
            )
        };
        events[..n.max(0) as usize].iter().map(|e| e.u64).collect()
    }
}
