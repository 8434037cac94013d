//! Process descriptors: learn that a process exited, however it died, and
//! never confuse it with a later process that reuses its pid.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

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
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, zero timeout.
    let n = unsafe { libc::poll(&mut pfd, 1, 0) };
    n > 0 && pfd.revents & libc::POLLIN != 0
}

/// Wait until the process behind `fd` exits.
pub async fn exited(fd: OwnedFd) {
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

/// Which of `fds` (pidfds) belong to processes that exited: one `poll` for
/// all of them.
pub fn exited_among(fds: &[std::os::fd::BorrowedFd<'_>]) -> Vec<usize> {
    if fds.is_empty() {
        return Vec::new();
    }
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|fd| libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: `pfds` is a valid array of pfds.len() pollfds; zero timeout.
    let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, 0) };
    if n <= 0 {
        return Vec::new();
    }
    pfds.iter()
        .enumerate()
        .filter(|(_, p)| p.revents & libc::POLLIN != 0)
        .map(|(i, _)| i)
        .collect()
}
