//! Checkpoint/restore programs (tests/c/cr_*.c, see tests/c/cr.h): each
//! sets up one kind of process state, says "ready", waits for SIGTERM,
//! then checks the state and prints PASS. Each runs natively, under
//! `omrun`, under `omrun` moved to node 2 and home while it waits, and
//! moved to node 2 to check its state there (through its deputy for what
//! stays home): all four must print PASS.

use migshm::{c_program, omctl, omrun_command, uffd_or_skip, Cluster, Proc};
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(20);

#[derive(Clone, Copy, Debug)]
enum Mode {
    Native,
    UnderOmrun,
    Moved,
    /// Moved to node 2, and checks there.
    Away,
}

/// Run `program` in `mode`; what it printed after "ready", or why not.
fn run(cluster: &Cluster, program: &Path, mode: Mode) -> Result<String, String> {
    let dir = tempfile_dir(program, mode);
    let mut command = match mode {
        Mode::Native => Command::new(program),
        Mode::UnderOmrun | Mode::Moved | Mode::Away => {
            omrun_command(cluster.socket(1), None, program)
        }
    };
    command
        .arg(&dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    migshm::only_standard_fds(&mut command);
    let mut process = Proc::from(command.spawn().map_err(|e| format!("start: {e}"))?);
    let pid = process.child.id() as i32;
    let mut out = BufReader::new(process.child.stdout.take().ok_or("no stdout")?);
    let mut line = String::new();
    if out.read_line(&mut line).map_err(|e| e.to_string())? == 0 || line.trim() != "ready" {
        return Err(format!("did not say ready: {line:?}"));
    }
    let moves: &[&str] = match mode {
        Mode::Moved => &["2", "home"],
        Mode::Away => &["2"],
        _ => &[],
    };
    {
        for &to in moves {
            let (ok, stdout, stderr) = omctl(cluster.socket(1), &["migrate", &pid.to_string(), to]);
            if !ok {
                // SAFETY: ending the child we started.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                let _ = process.wait_timeout(WAIT);
                return Err(format!("migrate {to}: {} {}", stdout.trim(), stderr.trim()));
            }
        }
    }
    // SAFETY: signalling the child we started (its home pid).
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let status = process
        .wait_timeout(WAIT)
        .ok_or("did not end after SIGTERM")?;
    let mut rest = String::new();
    out.read_to_string(&mut rest).map_err(|e| e.to_string())?;
    let _ = std::fs::remove_dir_all(&dir);
    if status.success() && rest.lines().last() == Some("PASS") {
        Ok(rest)
    } else {
        Err(format!("{status:?}:\n{rest}"))
    }
}

fn tempfile_dir(program: &Path, mode: Mode) -> std::path::PathBuf {
    let name = program
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let dir = std::env::temp_dir().join(format!("migshm-cr-{name}-{mode:?}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("a directory for the program");
    dir
}

/// Program `name` natively, under omrun, and moved there and back.
fn passes_everywhere(name: &str) {
    if !uffd_or_skip() {
        return;
    }
    let program = c_program(name).unwrap_or_else(|e| panic!("compile {name}.c: {e}"));
    let cluster = Cluster::start(2).expect("start 2 daemons");
    let mut failures = Vec::new();
    for mode in [Mode::Native, Mode::UnderOmrun, Mode::Moved, Mode::Away] {
        if let Err(why) = run(&cluster, &program, mode) {
            failures.push(format!("{name} {mode:?}: {why}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn directories_move() {
    passes_everywhere("cr_dir");
}

#[test]
fn devices_move() {
    passes_everywhere("cr_devices");
}

#[test]
fn files_move_with_their_offsets_and_flags() {
    passes_everywhere("cr_files");
}

#[test]
fn cwd_umask_limits_and_environment_move() {
    passes_everywhere("cr_env");
}

/// Bytes relayed toward the copy that it has not read when it comes home
/// go back in front of what its pipe holds there.
#[test]
fn pipes_and_fifos_keep_the_bytes_in_flight() {
    passes_everywhere("cr_pipe");
}

#[test]
fn memory_of_every_kind_moves() {
    passes_everywhere("cr_memory");
}

#[test]
fn signal_state_and_pending_signals_move() {
    passes_everywhere("cr_signals");
}

#[test]
fn eventfds_are_served_at_home() {
    passes_everywhere("cr_eventfd");
}

#[test]
fn timerfds_are_served_at_home() {
    passes_everywhere("cr_timerfd");
}

#[test]
fn deleted_files_are_served_at_home() {
    passes_everywhere("cr_deleted");
}

#[test]
fn inotify_is_served_at_home() {
    passes_everywhere("cr_inotify");
}

#[test]
fn record_and_flock_locks_exclude_the_processes_at_home() {
    passes_everywhere("cr_locks");
}

#[test]
fn interval_timers_move_with_their_time_left() {
    passes_everywhere("cr_itimer");
}

#[test]
fn posix_timers_move_with_their_ids_and_time_left() {
    passes_everywhere("cr_posix_timer");
}

#[test]
fn sleeps_go_on_for_the_time_left() {
    passes_everywhere("cr_sleep");
}

#[test]
fn signalfds_are_made_again_with_their_mask() {
    passes_everywhere("cr_signalfd");
}

#[test]
fn socketpairs_keep_queued_bytes_and_shutdowns() {
    passes_everywhere("cr_socketpair");
}

#[test]
fn tcp_connections_and_listeners_move() {
    passes_everywhere("cr_tcp");
}

#[test]
fn duplicated_descriptors_still_share_their_open_file() {
    passes_everywhere("cr_dup");
}

#[test]
fn epoll_over_pipes_sockets_and_eventfds_moves() {
    passes_everywhere("cr_epoll");
}

#[test]
fn an_alarm_keeps_its_time_left() {
    passes_everywhere("cr_alarm");
}

#[test]
fn stdio_buffers_move_with_the_memory() {
    passes_everywhere("cr_stdio");
}

#[test]
fn a_large_heap_and_a_deep_stack_move() {
    passes_everywhere("cr_bigheap");
}

#[test]
fn a_pipe_from_a_child_at_home_keeps_every_line() {
    passes_everywhere("cr_pipe_child");
}

#[test]
fn an_eventfd_shared_with_a_child_at_home_is_one() {
    passes_everywhere("cr_eventfd_child");
}

#[test]
fn open_file_description_locks_exclude_the_processes_at_home() {
    passes_everywhere("cr_ofd_locks");
}

#[test]
fn command_line_environment_and_name_move() {
    passes_everywhere("cr_cmdline");
}

#[test]
fn the_program_break_moves() {
    passes_everywhere("cr_brk");
}

#[test]
fn thread_local_storage_moves() {
    passes_everywhere("cr_tls");
}

#[test]
fn descriptors_at_high_numbers_keep_their_numbers_and_holes() {
    passes_everywhere("cr_fd_holes");
}

#[test]
fn a_child_started_after_the_move_shares_memory_and_files() {
    passes_everywhere("cr_fork_after");
}

#[test]
fn a_full_pipe_keeps_every_byte() {
    passes_everywhere("cr_pipe_full");
}

#[test]
fn a_megabyte_from_a_child_at_home_arrives_whole() {
    passes_everywhere("cr_socket_big");
}

#[test]
fn a_large_deleted_file_is_read_and_written_whole() {
    passes_everywhere("cr_deleted_big");
}

#[test]
fn a_non_blocking_socket_stays_non_blocking() {
    passes_everywhere("cr_nonblock_socket");
}

#[test]
fn an_absolute_timerfd_expires_at_its_time() {
    passes_everywhere("cr_timerfd_abs");
}

#[test]
fn protections_of_mappings_move() {
    passes_everywhere("cr_mprotect");
}

#[test]
fn memfds_and_nameless_files_are_served_at_home() {
    passes_everywhere("cr_memfd");
}

#[test]
fn a_session_leader_stays_one() {
    passes_everywhere("cr_session");
}

#[test]
fn a_process_group_leader_stays_one() {
    passes_everywhere("cr_pgrp");
}

#[test]
fn unix_listeners_accept_connections_queued_before_and_made_after() {
    passes_everywhere("cr_unix_listen");
}

#[test]
fn sockets_shut_down_before_the_move_stay_shut() {
    passes_everywhere("cr_half_closed");
}

/// Children left at home are reaped through the deputy, those started away
/// where they run, "any child" on both sides.
#[test]
fn children_started_before_the_move_are_reaped_after_it() {
    passes_everywhere("cr_children");
}

/// The controlling terminal stays at home: its calls are carried out
/// there (settings, window size, session), its lines relayed.
#[test]
fn a_process_with_a_controlling_terminal_moves() {
    passes_everywhere("cr_tty");
}

/// Pids the process knew before the move are its home's: signals to them
/// (and group lookups) are made there, by the home process.
#[test]
fn signals_to_pids_known_before_the_move_reach_them_from_home() {
    passes_everywhere("cr_kill");
}

/// Datagram and seqpacket sockets keep their type and message boundaries.
#[test]
fn datagram_and_seqpacket_sockets_keep_their_messages() {
    passes_everywhere("cr_dgram");
}
