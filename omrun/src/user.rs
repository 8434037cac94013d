//! The program's memory as the kernel sees it from a system call: every
//! pointer a program passes is copied in or out with `process_vm_readv` /
//! `process_vm_writev` on this very process, so a bad pointer gives EFAULT
//! (what `copy_from_user`/`copy_to_user` give) instead of crashing the
//! program inside the interposer. Pages of DSM segments that are not
//! present fault into the daemon as they would for the kernel's copy.

use std::mem::{size_of, MaybeUninit};

fn transfer(local: libc::iovec, remote: libc::iovec, write: bool) -> Result<(), i32> {
    let want = local.iov_len;
    if want == 0 {
        return Ok(());
    }
    // The process may move between any two instructions, and its pid with
    // it: the copy is done again if the pid changed meanwhile (it may have
    // gone to the process as it was before the move, which no longer
    // runs; doing it again is harmless either way).
    loop {
        // SAFETY: getpid has no preconditions.
        let me = unsafe { libc::getpid() };
        // SAFETY: `local` describes a live buffer of ours of `iov_len`
        // bytes; the kernel checks `remote` (the program's address) and
        // fails with EFAULT rather than touching an unmapped or forbidden
        // range.
        let n = unsafe {
            if write {
                libc::process_vm_writev(me, &local, 1, &remote, 1, 0)
            } else {
                libc::process_vm_readv(me, &local, 1, &remote, 1, 0)
            }
        };
        // SAFETY: as above.
        if unsafe { libc::getpid() } != me {
            continue;
        }
        if n == want as isize {
            return Ok(());
        }
        // A partial copy means the range crossed into a bad page.
        return Err(libc::EFAULT);
    }
}

/// Copy `count` values of `T` from the program's address `at`.
pub fn read_slice<T: Copy>(at: usize, count: usize) -> Result<Vec<T>, i32> {
    let bytes = count.checked_mul(size_of::<T>()).ok_or(libc::EFAULT)?;
    let mut out: Vec<T> = Vec::with_capacity(count);
    transfer(
        libc::iovec {
            iov_base: out.as_mut_ptr().cast(),
            iov_len: bytes,
        },
        libc::iovec {
            iov_base: at as *mut libc::c_void,
            iov_len: bytes,
        },
        false,
    )?;
    // SAFETY: the kernel wrote all `count` values (a full copy), and T is
    // plain data (Copy, read as the C side laid it out).
    unsafe { out.set_len(count) };
    Ok(out)
}

/// Copy one `T` from the program's address `at`.
pub fn read<T: Copy>(at: usize) -> Result<T, i32> {
    let mut value = MaybeUninit::<T>::uninit();
    transfer(
        libc::iovec {
            iov_base: value.as_mut_ptr().cast(),
            iov_len: size_of::<T>(),
        },
        libc::iovec {
            iov_base: at as *mut libc::c_void,
            iov_len: size_of::<T>(),
        },
        false,
    )?;
    // SAFETY: fully written by the kernel; T is plain data.
    Ok(unsafe { value.assume_init() })
}

/// Copy `values` to the program's address `at`.
pub fn write_slice<T: Copy>(at: usize, values: &[T]) -> Result<(), i32> {
    let bytes = std::mem::size_of_val(values);
    transfer(
        libc::iovec {
            iov_base: values.as_ptr() as *mut libc::c_void,
            iov_len: bytes,
        },
        libc::iovec {
            iov_base: at as *mut libc::c_void,
            iov_len: bytes,
        },
        true,
    )
}

/// Copy one `T` to the program's address `at`.
pub fn write<T: Copy>(at: usize, value: &T) -> Result<(), i32> {
    write_slice(at, std::slice::from_ref(value))
}
