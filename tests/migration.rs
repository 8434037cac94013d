//! Checkpoint and restore of single-threaded processes (`migrate` crate).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use migshm::{c_program, eventually};

fn output(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// The loop numbers printed, in order, with the pid each was printed by.
fn loops(out: &str) -> Vec<(u64, i32, i32)> {
    out.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            match f.as_slice() {
                ["loop", n, "pid", p, "usr1", u] => {
                    Some((n.parse().ok()?, p.parse().ok()?, u.parse().ok()?))
                }
                _ => None,
            }
        })
        .collect()
}

fn start_loop(dir: &Path, heap: usize) -> Child {
    let prog = c_program("migrate_loop").expect("compile migrate_loop.c");
    let out = std::fs::File::create(dir.join("out")).expect("create output file");
    let mut command = Command::new(prog);
    // Only the three standard descriptors: the test harness leaks others
    // (a jobserver pipe) that would be a reason not to migrate.
    // SAFETY: close_range is async-signal-safe.
    unsafe {
        use std::os::unix::process::CommandExt;
        command.pre_exec(|| {
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
            Ok(())
        });
    }
    command
        .arg(heap.to_string())
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(Stdio::null())
        .spawn()
        .expect("start migrate_loop")
}

fn wait_status(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let mut status = None;
    eventually(limit, || {
        status = child.try_wait().ok().flatten();
        status.is_some()
    });
    status
}

/// The process is checkpointed mid-loop, the original killed, and the image
/// restored into a new process that carries on: every loop reads back what
/// it wrote (heap, stack, FP state), its signal handlers work, its output
/// file continues at the right offset, and it exits with its own status.
#[test]
fn restored_process_carries_on() {
    let dir = tempdir("restore");
    let mut original = start_loop(&dir, 1 << 20);
    let out = dir.join("out");
    assert!(
        eventually(Duration::from_secs(10), || loops(&output(&out)).len() >= 2),
        "the loop never got going: {}",
        output(&out)
    );
    let pid = original.id() as i32;
    let mut tracee = migrate::ptrace::Tracee::seize(pid).expect("seize");
    let image = migrate::checkpoint(&mut tracee).expect("checkpoint");
    assert!(image.private_bytes() >= 1 << 20, "heap pages saved");
    // The original never runs again.
    tracee.forget();
    migrate::ptrace::kill(pid, libc::SIGKILL).expect("kill the original");
    let _ = original.wait();
    let before = loops(&output(&out)).last().copied().expect("a loop line");

    let encoded = image.encode().expect("encode");
    let image = migrate::Image::decode(&encoded).expect("decode");
    let mut restored = migrate::restore_fresh(&image).expect("restore").child;
    let new_pid = restored.id() as i32;
    assert!(
        eventually(Duration::from_secs(10), || loops(&output(&out))
            .iter()
            .any(|l| l.1 == new_pid)),
        "the restored process printed nothing: {}",
        output(&out)
    );
    migrate::ptrace::kill(new_pid, libc::SIGUSR1).expect("SIGUSR1");
    assert!(
        eventually(Duration::from_secs(10), || loops(&output(&out))
            .iter()
            .any(|l| l.1 == new_pid && l.2 == 1)),
        "the handler did not run in the restored process: {}",
        output(&out)
    );
    migrate::ptrace::kill(new_pid, libc::SIGTERM).expect("SIGTERM");
    let status = wait_status(&mut restored, Duration::from_secs(10)).expect("it ends");
    let text = output(&out);
    assert_eq!(status.code(), Some(42), "exit status; output:\n{text}");
    let seen = loops(&text);
    for pair in seen.windows(2) {
        assert!(
            pair[0].0 < pair[1].0,
            "loop numbers go on: {pair:?}\n{text}"
        );
    }
    let after = seen
        .iter()
        .find(|l| l.1 == new_pid)
        .expect("a restored line");
    assert!(after.0 >= before.0, "{before:?} then {after:?}");
    assert!(text.contains("done "), "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}

fn tempdir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("migshm-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}
