//! The deputy's side of forwarded calls (`forward.rs`): each carried out
//! on its duplicate of the home process's descriptor, which shares the
//! original's offset, status flags and open-file locks.
//!
//! With `ptrace.rs` and `seccomp.rs`, the only modules of the crate with
//! `unsafe`.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::forward::{Call, FLOCK_LEN, ITIMERSPEC_LEN, MOST_BYTES};

/// Sizes of the buffers `fstat` and `statx` fill.
const STAT_LEN: usize = std::mem::size_of::<libc::stat>();
const STATX_LEN: usize = 256;

/// What a call returned: its value (a negative errno on failure) and the
/// bytes it filled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub result: i64,
    pub data: Vec<u8>,
}

/// System call `nr` with `args`; its result, a negative errno on failure.
/// Every caller passes for each pointer argument a live buffer at least
/// as long as the call uses.
fn raw(nr: libc::c_long, args: &[usize]) -> i64 {
    let arg = |i: usize| args.get(i).copied().unwrap_or(0);
    // SAFETY: see above: descriptors and integers, and pointers to live
    // buffers of the lengths the call is given.
    let r = unsafe { libc::syscall(nr, arg(0), arg(1), arg(2), arg(3), arg(4), arg(5)) };
    if r < 0 {
        -i64::from(
            std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO),
        )
    } else {
        r
    }
}

/// Carry out `call` on `fd`. Record locks are not carried out here (see
/// `Call::is_record_lock`).
pub fn run_on(fd: BorrowedFd<'_>, call: &Call) -> Outcome {
    let fd = fd.as_raw_fd() as usize;
    let value = |result: i64| Outcome {
        result,
        data: Vec::new(),
    };
    // A call that fills `len` bytes at the address in `buf`'s place.
    let filling = |len: usize, args: &dyn Fn(usize) -> (libc::c_long, Vec<usize>)| {
        let mut buf = vec![0u8; len];
        let (nr, args) = args(buf.as_mut_ptr() as usize);
        let result = raw(nr, &args);
        Outcome { result, data: buf }
    };
    match call {
        Call::Read { len } => {
            let mut out = filling((*len).min(MOST_BYTES) as usize, &|buf| {
                (
                    libc::SYS_read,
                    vec![fd, buf, (*len).min(MOST_BYTES) as usize],
                )
            });
            out.data.truncate(out.result.max(0) as usize);
            out
        }
        Call::Pread { len, offset } => {
            let n = (*len).min(MOST_BYTES) as usize;
            let mut out = filling(n, &|buf| {
                (libc::SYS_pread64, vec![fd, buf, n, *offset as usize])
            });
            out.data.truncate(out.result.max(0) as usize);
            out
        }
        Call::Write { data } => value(raw(
            libc::SYS_write,
            &[fd, data.as_ptr() as usize, data.len()],
        )),
        Call::Pwrite { data, offset } => value(raw(
            libc::SYS_pwrite64,
            &[fd, data.as_ptr() as usize, data.len(), *offset as usize],
        )),
        Call::Lseek { offset, whence } => value(raw(
            libc::SYS_lseek,
            &[fd, *offset as usize, *whence as usize],
        )),
        Call::Fstat => filling(STAT_LEN, &|buf| (libc::SYS_fstat, vec![fd, buf])),
        Call::Statx { flags, mask } => filling(STATX_LEN, &|buf| {
            (
                libc::SYS_statx,
                vec![
                    fd,
                    c"".as_ptr() as usize,
                    *flags as usize,
                    *mask as usize,
                    buf,
                ],
            )
        }),
        Call::Ftruncate { len } => value(raw(libc::SYS_ftruncate, &[fd, *len as usize])),
        Call::Fsync { data_only } => {
            let nr = if *data_only {
                libc::SYS_fdatasync
            } else {
                libc::SYS_fsync
            };
            value(raw(nr, &[fd]))
        }
        Call::Fallocate { mode, offset, len } => value(raw(
            libc::SYS_fallocate,
            &[fd, *mode as usize, *offset as usize, *len as usize],
        )),
        Call::Fadvise {
            offset,
            len,
            advice,
        } => value(raw(
            libc::SYS_fadvise64,
            &[fd, *offset as usize, *len as usize, *advice as usize],
        )),
        Call::Flock { op } => value(raw(libc::SYS_flock, &[fd, *op as usize])),
        Call::Lock { cmd, flock } => {
            let mut buf = flock.clone();
            buf.resize(FLOCK_LEN, 0);
            let result = raw(
                libc::SYS_fcntl,
                &[fd, *cmd as usize, buf.as_mut_ptr() as usize],
            );
            Outcome { result, data: buf }
        }
        Call::Fcntl { cmd, arg } => {
            value(raw(libc::SYS_fcntl, &[fd, *cmd as usize, *arg as usize]))
        }
        Call::Ioctl { request, arg } => {
            let mut buf = arg.clone();
            let result = raw(
                libc::SYS_ioctl,
                &[fd, *request as usize, buf.as_mut_ptr() as usize],
            );
            Outcome { result, data: buf }
        }
        Call::IoctlValue { request, arg } => value(raw(
            libc::SYS_ioctl,
            &[fd, *request as usize, *arg as usize],
        )),
        Call::TimerGet => filling(ITIMERSPEC_LEN, &|buf| {
            (libc::SYS_timerfd_gettime, vec![fd, buf])
        }),
        Call::TimerSet { flags, new } => {
            let mut new = new.clone();
            new.resize(ITIMERSPEC_LEN, 0);
            filling(ITIMERSPEC_LEN, &|old| {
                (
                    libc::SYS_timerfd_settime,
                    vec![fd, *flags as usize, new.as_ptr() as usize, old],
                )
            })
        }
        Call::WatchAdd { path, mask } => match std::ffi::CString::new(path.as_str()) {
            Ok(path) => value(raw(
                libc::SYS_inotify_add_watch,
                &[fd, path.as_ptr() as usize, *mask as usize],
            )),
            Err(_) => value(-i64::from(libc::EINVAL)),
        },
        Call::WatchRemove { wd } => value(raw(libc::SYS_inotify_rm_watch, &[fd, *wd as usize])),
        Call::Close => value(0),
        // Made in the home process (`home_calls.rs`), never on a descriptor.
        Call::Wait { .. } | Call::ByPid { .. } => value(-i64::from(libc::EINVAL)),
    }
}

/// The signal that interrupts a worker's call the host gave up on.
const INTERRUPT: libc::c_int = libc::SIGUSR2;

extern "C" fn on_interrupt(_: libc::c_int) {}

/// Make `INTERRUPT` end a waiting call with EINTR (a handler, without
/// SA_RESTART) instead of ending the process.
pub fn catch_interruptions() -> std::io::Result<()> {
    // SAFETY: the action is zeroed then filled; the handler does nothing.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_interrupt as extern "C" fn(libc::c_int) as usize;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(INTERRUPT, &action, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Interrupt what `thread` waits in (see `catch_interruptions`).
pub fn interrupt_thread(thread: libc::pthread_t) {
    // SAFETY: the thread is one of ours, detached but alive until it has
    // reported its result (a finished one is no longer asked).
    unsafe { libc::pthread_kill(thread, INTERRUPT) };
}

/// `run_on` for a call that may wait: first until the descriptor is
/// ready, then the call itself, going on after an interruption unless
/// `cancelled` (then it ends with EINTR).
pub fn run_until_done(fd: BorrowedFd<'_>, call: &Call, cancelled: &AtomicBool) -> Outcome {
    let events = match call {
        Call::Read { .. } | Call::Pread { .. } => libc::POLLIN,
        Call::Write { .. } | Call::Pwrite { .. } => libc::POLLOUT,
        _ => 0,
    };
    loop {
        if cancelled.load(Ordering::Acquire) {
            return Outcome {
                result: -i64::from(libc::EINTR),
                data: Vec::new(),
            };
        }
        if events != 0 {
            let mut p = libc::pollfd {
                fd: fd.as_raw_fd(),
                events,
                revents: 0,
            };
            // SAFETY: one live pollfd.
            if unsafe { libc::poll(&mut p, 1, -1) } < 0 {
                continue;
            }
        }
        let outcome = run_on(fd, call);
        if outcome.result == -i64::from(libc::EINTR) {
            continue;
        }
        return outcome;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_runs_on_a_duplicate_as_on_the_original() {
        use std::io::Write;
        let mut file = tempfile_in_tmp();
        file.write_all(b"hello").unwrap();
        let fd = std::os::fd::AsFd::as_fd(&file);
        let read = run_on(fd, &Call::Pread { len: 10, offset: 1 });
        assert_eq!(
            read,
            Outcome {
                result: 4,
                data: b"ello".to_vec()
            }
        );
        assert_eq!(
            run_on(
                fd,
                &Call::Lseek {
                    offset: 0,
                    whence: libc::SEEK_CUR
                }
            )
            .result,
            5
        );
        let bad = run_on(
            fd,
            &Call::Lseek {
                offset: -9,
                whence: libc::SEEK_SET,
            },
        );
        assert_eq!(bad.result, -i64::from(libc::EINVAL));
    }

    fn tempfile_in_tmp() -> std::fs::File {
        let path = std::env::temp_dir().join(format!("migshm-forward-{}", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let _ = std::fs::remove_file(&path);
        file
    }
}
