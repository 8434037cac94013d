//! The kernel behaviour the fault path is built on, checked on this machine:
//! a memfd mapping registered MISSING|WP|MINOR, served from another thread
//! with `pwrite` + `UFFDIO_CONTINUE`, write-protection per mapping, punch as
//! invalidation, and POISON as SIGBUS.

use dsm::memfd::{Mapping, Memfd};
use dsm::uffd::{self, Event, Uffd};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

const PAGE: u64 = 4096;

fn uffd_available() -> bool {
    match uffd::probe_features() {
        Ok(f) if f & uffd::REQUIRED_FEATURES == uffd::REQUIRED_FEATURES => true,
        Ok(f) => {
            println!("SKIP: userfaultfd lacks required features (have {f:#x})");
            false
        }
        Err(e) => {
            println!("SKIP: userfaultfd unavailable: {e}");
            false
        }
    }
}

/// Wait for the next page fault on `uffd` (polling; the test has time).
fn next_fault(uffd: &Uffd) -> (u64, bool, bool, bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut events = Vec::new();
    loop {
        uffd.read_events(&mut events, 1).expect("read uffd");
        if let Some(Event::PageFault {
            addr,
            write,
            wp,
            minor,
        }) = events.pop()
        {
            return (addr, write, wp, minor);
        }
        assert!(Instant::now() < deadline, "no fault arrived");
        std::thread::sleep(Duration::from_micros(200));
    }
}

#[test]
fn memfd_faults_are_served_with_continue_and_write_protect() {
    if !uffd_available() {
        return;
    }
    let memfd = Memfd::create("uffd-kernel-test", 4 * PAGE).unwrap();
    let map = Mapping::map(memfd.as_fd(), 4 * PAGE as usize, true, None).unwrap();
    let base = map.addr() as u64;
    let uffd = Uffd::from_fd(uffd::create_for_self().unwrap());
    let granted = uffd.api(uffd::REQUIRED_FEATURES).unwrap();
    assert_eq!(granted & uffd::REQUIRED_FEATURES, uffd::REQUIRED_FEATURES);
    uffd.register(base, 4 * PAGE, uffd::MODE_ALL).unwrap();

    // A read of an absent page raises MISSING; the handler fills the page
    // with pwrite and maps it read-only with CONTINUE(WP).
    let word = map.addr();
    // SAFETY: the mapping is live for the whole test and 8-byte aligned.
    let reader =
        std::thread::spawn(move || unsafe { (*(word as *const AtomicU64)).load(Ordering::SeqCst) });
    let (addr, write, wp, minor) = next_fault(&uffd);
    assert_eq!(
        (addr & !(PAGE - 1), write, wp, minor),
        (base, false, false, false)
    );
    memfd.write_at(0, &42u64.to_le_bytes()).unwrap();
    uffd.continue_(base, PAGE, true).unwrap();
    assert_eq!(reader.join().unwrap(), 42);

    // A write to the now write-protected page raises a WP fault; clearing the
    // protection lets it through.
    // SAFETY: as above.
    let writer = std::thread::spawn(move || unsafe {
        (*(word as *const AtomicU64)).store(7, Ordering::SeqCst)
    });
    let (addr, write, wp, _) = next_fault(&uffd);
    assert_eq!((addr & !(PAGE - 1), write, wp), (base, true, true));
    uffd.write_protect(base, PAGE, false, true).unwrap();
    writer.join().unwrap();
    let mut buf = [0u8; 8];
    memfd.read_at(0, &mut buf).unwrap();
    assert_eq!(u64::from_le_bytes(buf), 7);

    // Punching the page drops it from every mapping: the next access is a
    // MISSING fault again, never a silent zero page.
    memfd.punch(0, PAGE).unwrap();
    // SAFETY: as above.
    let reader =
        std::thread::spawn(move || unsafe { (*(word as *const AtomicU64)).load(Ordering::SeqCst) });
    let (addr, _, _, minor) = next_fault(&uffd);
    assert_eq!((addr & !(PAGE - 1), minor), (base, false));
    memfd.write_at(0, &9u64.to_le_bytes()).unwrap();
    uffd.continue_(base, PAGE, false).unwrap();
    assert_eq!(reader.join().unwrap(), 9);

    // A page present in the cache but not mapped by this process raises a
    // MINOR fault.
    memfd.write_at(PAGE, &5u64.to_le_bytes()).unwrap();
    let second = (base + PAGE) as usize;
    // SAFETY: inside the live mapping.
    let reader = std::thread::spawn(move || unsafe {
        (*(second as *const AtomicU64)).load(Ordering::SeqCst)
    });
    let (addr, _, _, minor) = next_fault(&uffd);
    assert_eq!((addr & !(PAGE - 1), minor), (base + PAGE, true));
    uffd.continue_(base + PAGE, PAGE, true).unwrap();
    assert_eq!(reader.join().unwrap(), 5);
    // Mapping it twice is EEXIST: another thread got there first.
    let again = uffd.continue_(base + PAGE, PAGE, true).unwrap_err();
    assert_eq!(again.raw_os_error(), Some(libc::EEXIST));
}

#[test]
fn poison_turns_an_access_into_sigbus() {
    if !uffd_available() {
        return;
    }
    // In a child process, so the SIGBUS kills only it.
    // SAFETY: the child only touches memory and calls _exit.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        let code = std::panic::catch_unwind(|| {
            let memfd = Memfd::create("poison-test", PAGE).unwrap();
            let map = Mapping::map(memfd.as_fd(), PAGE as usize, true, None).unwrap();
            let uffd = Uffd::from_fd(uffd::create_for_self().unwrap());
            uffd.api(uffd::REQUIRED_FEATURES).unwrap();
            uffd.register(map.addr() as u64, PAGE, uffd::MODE_ALL)
                .unwrap();
            uffd.poison(map.addr() as u64, PAGE).unwrap();
            // SAFETY: reading the live mapping; the poison makes this SIGBUS.
            unsafe { std::ptr::read_volatile(map.as_ptr()) }
        });
        // SAFETY: _exit in the forked child.
        unsafe { libc::_exit(if code.is_ok() { 0 } else { 2 }) };
    }
    let mut status = 0;
    // SAFETY: waiting for our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    assert!(libc::WIFSIGNALED(status), "child exited with {status:#x}");
    assert_eq!(libc::WTERMSIG(status), libc::SIGBUS);
}

#[test]
fn continue_maps_a_run_of_pages_into_a_read_only_mapping() {
    if !uffd_available() {
        return;
    }
    let memfd = Memfd::create("uffd-ro-run", 8 * PAGE).unwrap();
    let map = Mapping::map(memfd.as_fd(), 8 * PAGE as usize, false, None).unwrap();
    let base = map.addr() as u64;
    let uffd = Uffd::from_fd(uffd::create_for_self().unwrap());
    uffd.api(uffd::REQUIRED_FEATURES).unwrap();
    let mode = u64::from(
        linux_raw_sys::general::UFFDIO_REGISTER_MODE_MISSING
            | linux_raw_sys::general::UFFDIO_REGISTER_MODE_MINOR,
    );
    uffd.register(base, 8 * PAGE, mode).unwrap();
    for p in 0..8 {
        memfd.write_at(p * PAGE, &(p + 1).to_le_bytes()).unwrap();
    }
    let mapped = uffd.continue_(base, 8 * PAGE, false);
    println!("CONTINUE of 8 pages on a read-only mapping: {mapped:?}");
    assert_eq!(mapped.unwrap(), 8 * PAGE);
    for p in 0..8u64 {
        // SAFETY: inside the live mapping; mapped above, so no fault.
        let v = unsafe { std::ptr::read_volatile((base + p * PAGE) as *const u64) };
        assert_eq!(v, p + 1);
    }
}

#[test]
fn copy_with_write_protect_fills_the_shared_cache_read_only() {
    if !uffd_available() {
        return;
    }
    let memfd = Memfd::create("uffd-copy", 2 * PAGE).unwrap();
    let map = Mapping::map(memfd.as_fd(), 2 * PAGE as usize, true, None).unwrap();
    let base = map.addr() as u64;
    let uffd = Uffd::from_fd(uffd::create_for_self().unwrap());
    uffd.api(uffd::REQUIRED_FEATURES).unwrap();
    uffd.register(base, 2 * PAGE, uffd::MODE_ALL).unwrap();
    let mut page = vec![0u8; PAGE as usize];
    page[..8].copy_from_slice(&31u64.to_le_bytes());
    assert_eq!(uffd.copy(base, &page, true).unwrap(), PAGE);
    // The data is in the shared cache (visible through the fd) ...
    let mut buf = [0u8; 8];
    memfd.read_at(0, &mut buf).unwrap();
    assert_eq!(u64::from_le_bytes(buf), 31);
    // ... a second copy over it is EEXIST ...
    assert_eq!(
        uffd.copy(base, &page, true).unwrap_err().raw_os_error(),
        Some(libc::EEXIST)
    );
    // ... and the mapping is read-only: a write raises a WP fault.
    let addr = map.addr();
    // SAFETY: inside the live mapping.
    let writer = std::thread::spawn(move || unsafe {
        (*(addr as *const AtomicU64)).store(5, Ordering::SeqCst)
    });
    let (fault, write, wp, _) = next_fault(&uffd);
    assert_eq!((fault & !(PAGE - 1), write, wp), (base, true, true));
    uffd.write_protect(base, PAGE, false, true).unwrap();
    writer.join().unwrap();
    memfd.read_at(0, &mut buf).unwrap();
    assert_eq!(u64::from_le_bytes(buf), 5);
}
