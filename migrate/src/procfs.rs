//! What /proc says about a process: its memory map, page residency, file
//! descriptors and the fields of `stat` and `status` a checkpoint needs.

use std::fs;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};

use crate::image::FileIdentity;

pub const PAGE_SIZE: u64 = 4096;

/// One line of /proc/PID/maps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapEntry {
    pub start: u64,
    pub end: u64,
    pub read: bool,
    pub write: bool,
    pub exec: bool,
    pub shared: bool,
    pub offset: u64,
    pub dev: (u32, u32),
    pub inode: u64,
    pub path: String,
}

impl MapEntry {
    pub fn prot(&self) -> u32 {
        let mut p = 0;
        if self.read {
            p |= libc::PROT_READ;
        }
        if self.write {
            p |= libc::PROT_WRITE;
        }
        if self.exec {
            p |= libc::PROT_EXEC;
        }
        p as u32
    }

    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }
}

fn bad(what: &str, line: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("unexpected {what}: {line:?}"),
    )
}

pub fn parse_maps_line(line: &str) -> io::Result<MapEntry> {
    // "start-end perms offset major:minor inode   path"
    let mut rest = line;
    let mut field = || -> io::Result<&str> {
        rest = rest.trim_start();
        let end = rest.find(' ').unwrap_or(rest.len());
        let (f, r) = rest.split_at(end);
        rest = r;
        if f.is_empty() {
            Err(bad("maps line", line))
        } else {
            Ok(f)
        }
    };
    let range = field()?;
    let perms = field()?.as_bytes().to_vec();
    let offset = field()?;
    let dev = field()?;
    let inode = field()?;
    let path = rest.trim_start().to_string();
    let (start, end) = range.split_once('-').ok_or_else(|| bad("range", line))?;
    let hex = |s: &str| u64::from_str_radix(s, 16).map_err(|_| bad("hex number", line));
    let (major, minor) = dev.split_once(':').ok_or_else(|| bad("device", line))?;
    if perms.len() != 4 {
        return Err(bad("permissions", line));
    }
    Ok(MapEntry {
        start: hex(start)?,
        end: hex(end)?,
        read: perms[0] == b'r',
        write: perms[1] == b'w',
        exec: perms[2] == b'x',
        shared: perms[3] == b's',
        offset: hex(offset)?,
        dev: (hex(major)? as u32, hex(minor)? as u32),
        inode: inode.parse().map_err(|_| bad("inode", line))?,
        path,
    })
}

pub fn maps(pid: i32) -> io::Result<Vec<MapEntry>> {
    fs::read_to_string(format!("/proc/{pid}/maps"))?
        .lines()
        .map(parse_maps_line)
        .collect()
}

/// Pages of [start, end) whose content belongs to the process itself:
/// present or swapped, and for file mappings not the file's own page.
/// Returns maximal runs as (address, length).
pub fn own_page_runs(
    pid: i32,
    start: u64,
    end: u64,
    file_backed: bool,
) -> io::Result<Vec<(u64, u64)>> {
    const PRESENT: u64 = 1 << 63;
    const SWAPPED: u64 = 1 << 62;
    const FILE_OR_SHARED: u64 = 1 << 61;
    let pagemap = fs::File::open(format!("/proc/{pid}/pagemap"))?;
    let pages = ((end - start) / PAGE_SIZE) as usize;
    let mut raw = vec![0u8; pages * 8];
    pagemap.read_exact_at(&mut raw, start / PAGE_SIZE * 8)?;
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for (i, entry) in raw.chunks_exact(8).enumerate() {
        let e = u64::from_le_bytes(entry.try_into().unwrap_or([0; 8]));
        let resident = e & (PRESENT | SWAPPED) != 0;
        let own = resident && !(file_backed && e & FILE_OR_SHARED != 0);
        if !own {
            continue;
        }
        let addr = start + i as u64 * PAGE_SIZE;
        match runs.last_mut() {
            Some((a, len)) if *a + *len == addr => *len += PAGE_SIZE,
            _ => runs.push((addr, PAGE_SIZE)),
        }
    }
    Ok(runs)
}

/// Identity of the file at `path` (following symlinks, so /proc/PID/exe
/// works too), recorded under the name `name`.
pub fn file_identity(path: &str, name: &str) -> io::Result<FileIdentity> {
    let m = fs::metadata(path)?;
    Ok(FileIdentity {
        path: name.to_string(),
        dev: m.dev(),
        inode: m.ino(),
        size: m.size(),
        mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
    })
}

/// Fields of /proc/PID/stat, numbered as in proc(5) (1-based).
pub fn stat_fields(pid: i32) -> io::Result<Vec<u64>> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after_comm = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| bad("stat", &stat))?;
    // Index N holds field N; 1 (pid), 2 (comm) and 3 (state, a letter)
    // are not numbers a checkpoint needs.
    let mut fields = vec![0u64; 4];
    fields.extend(
        after_comm
            .split_whitespace()
            .skip(1)
            .map(|f| f.parse::<i64>().map(|v| v as u64).unwrap_or(0)),
    );
    Ok(fields)
}

/// The children of single-threaded process `pid` (zombies included: a
/// child leaves the list when it is reaped).
pub fn children(pid: i32) -> Vec<i32> {
    fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .map(|t| {
            t.split_whitespace()
                .filter_map(|c| c.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The parent of `pid` (field 4 of its stat).
pub fn parent(pid: i32) -> Option<i32> {
    stat_fields(pid).ok()?.get(4).map(|&p| p as i32)
}

/// The process group of `pid` (field 5 of its stat).
pub fn group(pid: i32) -> Option<i32> {
    stat_fields(pid).ok()?.get(5).map(|&g| g as i32)
}

/// Process `pid`'s state letter (R, S, Z, T…), if it exists.
pub fn state(pid: i32) -> Option<char> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// One line of /proc/PID/status, by its key ("Uid", "Umask", …).
pub fn status_field(pid: i32, key: &str) -> io::Result<String> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    field_of_status(&status, key).map(str::to_string)
}

/// The value of line `key` of a /proc/PID/status text.
fn field_of_status<'a>(status: &'a str, key: &str) -> io::Result<&'a str> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .map(str::trim)
        .ok_or_else(|| bad("status key", key))
}

/// Open file descriptors with their /proc target, flags and offset.
pub fn fds(pid: i32) -> io::Result<Vec<(i32, String, i32, u64)>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(format!("/proc/{pid}/fd"))? {
        let entry = entry?;
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let target = match fs::read_link(entry.path()) {
            Ok(t) => t.to_string_lossy().into_owned(),
            // Closed while we looked.
            Err(_) => continue,
        };
        let info = fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).unwrap_or_default();
        let value = |key: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        let flags = i32::from_str_radix(&value("flags"), 8).unwrap_or(0);
        let pos = value("pos").parse().unwrap_or(0);
        out.push((fd, target, flags, pos));
    }
    out.sort();
    Ok(out)
}

/// Signals whose action is not the default (caught or ignored), as a mask
/// with bit N-1 for signal N.
pub fn non_default_signals(pid: i32) -> io::Result<u64> {
    let [caught, ignored] = signal_masks(pid, ["SigCgt", "SigIgn"])?;
    Ok(caught | ignored)
}

/// Signal mask lines of /proc/PID/status ("SigBlk", "SigIgn", …), from one
/// read of it.
fn signal_masks<const N: usize>(pid: i32, keys: [&str; N]) -> io::Result<[u64; N]> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let mut masks = [0; N];
    for (mask, key) in masks.iter_mut().zip(keys) {
        *mask = u64::from_str_radix(field_of_status(&status, key)?, 16)
            .map_err(|_| bad("signal mask", key))?;
    }
    Ok(masks)
}

/// Whether signal `signo`, sent to `pid` (single-threaded, not traced)
/// now, would interrupt a system call it waits in: not blocked, and not
/// discarded when sent (ignored, or by default as SIGCHLD is).
pub fn signal_interrupts(pid: i32, signo: i32) -> io::Result<bool> {
    let Some(bit) = u32::try_from(signo - 1)
        .ok()
        .and_then(|n| 1u64.checked_shl(n))
    else {
        return Ok(false);
    };
    let [blocked, ignored, caught] = signal_masks(pid, ["SigBlk", "SigIgn", "SigCgt"])?;
    let default_ignored = [libc::SIGCHLD, libc::SIGURG, libc::SIGWINCH, libc::SIGCONT];
    let discarded = ignored & bit != 0 || (caught & bit == 0 && default_ignored.contains(&signo));
    Ok(signo == libc::SIGKILL || (blocked & bit == 0 && !discarded))
}

pub fn thread_count(pid: i32) -> io::Result<usize> {
    Ok(fs::read_dir(format!("/proc/{pid}/task"))?.count())
}

/// What epoll descriptor `fd` of `pid` watches: (descriptor, events,
/// data) per target, from its fdinfo.
pub fn epoll_targets(pid: i32, fd: i32) -> io::Result<Vec<(i32, u32, u64)>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}"))?;
    let mut out = Vec::new();
    for line in text.lines().filter(|l| l.starts_with("tfd:")) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let value = |key: &str| {
            fields
                .iter()
                .position(|f| *f == key)
                .and_then(|i| fields.get(i + 1))
                .copied()
        };
        let parsed = (|| {
            Some((
                value("tfd:")?.parse().ok()?,
                u32::from_str_radix(value("events:")?, 16).ok()?,
                u64::from_str_radix(value("data:")?, 16).ok()?,
            ))
        })();
        out.push(parsed.ok_or_else(|| bad("epoll fdinfo", line))?);
    }
    Ok(out)
}

/// `/proc/PID/syscall` held open: read again from offset 0 it is made
/// anew, so a look every millisecond (the host's, at a process with
/// listeners) costs one `pread`, not an open, a statx, reads and a close
/// (which were 4 % of a CPU per moved Apache child).
pub struct SyscallProbe {
    pid: i32,
    file: Option<fs::File>,
}

impl SyscallProbe {
    pub fn new(pid: i32) -> SyscallProbe {
        SyscallProbe { pid, file: None }
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The system call the process is blocked in, with its arguments
    /// (`None`: running, not in a call, or gone).
    pub fn blocked(&mut self) -> Option<(i64, [u64; 6])> {
        use std::os::unix::fs::FileExt;
        if self.file.is_none() {
            self.file = fs::File::open(format!("/proc/{}/syscall", self.pid)).ok();
        }
        // "nr" and six arguments, stack and instruction pointers, in hex:
        // well under 200 bytes.
        let mut buf = [0u8; 256];
        let n = match self.file.as_ref()?.read_at(&mut buf, 0) {
            Ok(n) => n,
            Err(_) => {
                // Opened again next time (an access check can fail once
                // while the process changes credentials).
                self.file = None;
                return None;
            }
        };
        parse_syscall(std::str::from_utf8(&buf[..n]).ok()?)
    }
}

fn parse_syscall(text: &str) -> Option<(i64, [u64; 6])> {
    let mut fields = text.split_whitespace();
    let nr: i64 = fields.next()?.parse().ok()?;
    if nr < 0 {
        return None;
    }
    let mut args = [0u64; 6];
    for a in &mut args {
        *a = u64::from_str_radix(fields.next()?.trim_start_matches("0x"), 16).ok()?;
    }
    Some((nr, args))
}

/// The mask of signalfd `fd` of process `pid` (its fdinfo's "sigmask").
pub fn signalfd_mask(pid: i32, fd: i32) -> io::Result<u64> {
    let info = fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}"))?;
    info.lines()
        .find_map(|l| l.strip_prefix("sigmask:"))
        .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
        .ok_or_else(|| bad("fdinfo", &info))
}

/// The POSIX timers of process `pid` (/proc/PID/timers), their settings
/// not read (empty).
pub fn posix_timers(pid: i32) -> io::Result<Vec<crate::image::PosixTimer>> {
    let text = fs::read_to_string(format!("/proc/{pid}/timers"))?;
    parse_posix_timers(&text)
}

pub fn parse_posix_timers(text: &str) -> io::Result<Vec<crate::image::PosixTimer>> {
    let mut timers = Vec::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        let Some(id) = line.strip_prefix("ID: ") else {
            continue;
        };
        let mut field = |key: &str| -> io::Result<String> {
            let l = lines.next().unwrap_or_default();
            l.strip_prefix(key)
                .map(str::to_string)
                .ok_or_else(|| bad("timers", l))
        };
        // "signal: 35/000000000000002a", "notify: signal/pid.9002",
        // "ClockID: 1".
        let signal = field("signal: ")?;
        let notify = field("notify: ")?;
        let clock = field("ClockID: ")?;
        let (signo, value) = signal
            .split_once('/')
            .ok_or_else(|| bad("timers", &signal))?;
        let notify = match notify.split('/').next() {
            Some("signal") => libc::SIGEV_SIGNAL,
            Some("thread") => libc::SIGEV_THREAD_ID,
            Some("none") => libc::SIGEV_NONE,
            _ => return Err(bad("timers", &notify)),
        };
        timers.push(crate::image::PosixTimer {
            id: id.trim().parse().map_err(|_| bad("timers", line))?,
            clock: clock.trim().parse().map_err(|_| bad("timers", &clock))?,
            notify,
            signo: signo.trim().parse().map_err(|_| bad("timers", &signal))?,
            value: u64::from_str_radix(value.trim(), 16).map_err(|_| bad("timers", &signal))?,
            setting: Vec::new(),
        });
    }
    Ok(timers)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One probe, read again and again, follows the process from call to
    /// call and says nothing once it is gone.
    #[test]
    fn a_syscall_probe_reads_each_call_anew() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("sleep");
        let pid = child.id() as i32;
        let mut probe = SyscallProbe::new(pid);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        // clock_nanosleep (230) once it sleeps; execve and the loader first.
        while probe.blocked().map(|(nr, _)| nr) != Some(230) {
            assert!(
                std::time::Instant::now() < deadline,
                "{:?}",
                probe.blocked()
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(probe.blocked(), None);
    }

    #[test]
    fn maps_lines_parse() {
        let e = parse_maps_line(
            "7f1c2a000000-7f1c2a022000 r-xp 00028000 fd:01 1311  /usr/lib/x86_64-linux-gnu/libc.so.6",
        )
        .unwrap();
        assert_eq!(
            (e.start, e.end, e.offset),
            (0x7f1c2a000000, 0x7f1c2a022000, 0x28000)
        );
        assert!(e.read && !e.write && e.exec && !e.shared);
        assert_eq!((e.dev, e.inode), ((0xfd, 1), 1311));
        assert_eq!(e.path, "/usr/lib/x86_64-linux-gnu/libc.so.6");
        let anon = parse_maps_line("7ffd1000-7ffd2000 rw-s 00000000 00:01 5 /memfd:a b (deleted)")
            .unwrap();
        assert!(anon.shared);
        assert_eq!(anon.path, "/memfd:a b (deleted)");
        let bare = parse_maps_line("1000-2000 ---p 00000000 00:00 0").unwrap();
        assert_eq!(bare.path, "");
        assert_eq!(bare.prot(), 0);
        assert!(parse_maps_line("garbage").is_err());
        assert!(parse_maps_line("1000-2000 rw 0 0:0 0").is_err());
    }

    #[test]
    fn own_maps_and_pages() {
        let me = std::process::id() as i32;
        let maps = maps(me).unwrap();
        assert!(maps.iter().any(|m| m.path == "[stack]"));
        let heap_data = vec![7u8; 64 << 10];
        let addr = heap_data.as_ptr() as u64;
        let m = maps
            .iter()
            .find(|m| m.start <= addr && addr < m.end)
            .unwrap();
        let runs = own_page_runs(me, m.start, m.end, m.inode != 0).unwrap();
        let page = addr / PAGE_SIZE * PAGE_SIZE;
        assert!(runs.iter().any(|(a, l)| *a <= page && page < a + l));
        assert!(stat_fields(me).unwrap()[28] > 0);
        assert!(status_field(me, "Umask").is_ok());
    }

    #[test]
    fn posix_timers_parse() {
        let text = "ID: 2\nsignal: 12/0000000000000000\nnotify: signal/pid.9002\nClockID: 7\n\
                    ID: 0\nsignal: 35/000000000000002a\nnotify: thread/tid.9002\nClockID: 1\n";
        let timers = parse_posix_timers(text).unwrap();
        assert_eq!(timers.len(), 2);
        assert_eq!((timers[0].id, timers[0].signo, timers[0].clock), (2, 12, 7));
        assert_eq!(timers[1].notify, libc::SIGEV_THREAD_ID);
        assert_eq!(timers[1].value, 42);
        assert!(parse_posix_timers("ID: 1\nsignal: x\n").is_err());
    }
}
