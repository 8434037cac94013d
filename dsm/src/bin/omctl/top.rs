//! `omctl top`: every node's load, capacity, free memory, guests, faults
//! and pages per second, and the moves of the last minute, redrawn every
//! second (what openMosix's `mosmon` and `mtop` showed). `--once` prints
//! one frame and ends, for scripts.

use dsm::client::Client;
use dsm::wire::TopFrame;
use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

const REFRESH: Duration = Duration::from_secs(1);
/// Clear the screen, cursor home.
const CLEAR: &str = "\x1b[H\x1b[2J";

/// One frame as text; the first node of `frame` is the one asked.
pub fn render(frame: &TopFrame, now: &str) -> String {
    let mut out = String::new();
    let asked = frame.nodes.first().map_or(0, |n| n.node.0);
    out.push_str(&format!(
        "migshm top  node {asked}  {now}  {} nodes known\n\n",
        frame.nodes.len()
    ));
    out.push_str(&format!(
        "{:<5} {:>6} {:>6} {:>9} {:>6} {:>6} {:>9} {:>8} {:<10} {:>6}\n",
        "node",
        "load",
        "cpus",
        "free_mib",
        "guests",
        "procs",
        "faults/s",
        "pages/s",
        "state",
        "age_s"
    ));
    let mut nodes = frame.nodes.clone();
    nodes.sort_by_key(|n| n.node);
    for n in &nodes {
        let state = match (n.blocked, n.balancing) {
            (true, _) => "blocked",
            (false, true) => "balancing",
            (false, false) => "no-balance",
        };
        out.push_str(&format!(
            "{:<5} {:>6.2} {:>6.2} {:>9} {:>6} {:>6} {:>9} {:>8} {:<10} {:>6.1}\n",
            n.node,
            f64::from(n.load_milli) / 1000.0,
            f64::from(n.capacity_milli) / 1000.0,
            n.free_kib / 1024,
            n.guests,
            n.procs,
            n.faults_per_s,
            n.pages_per_s,
            state,
            f64::from(n.age_ms) / 1000.0
        ));
    }
    out.push_str(&format!(
        "\nmoves in the last minute: {}\n",
        frame.moves.len()
    ));
    for m in frame.moves.iter().take(20) {
        out.push_str(&format!(
            "  {:>5.1}s ago  pid {:<8} home {:<3} {} -> {}  {}\n",
            f64::from(m.ago_ms) / 1000.0,
            m.home_pid,
            m.home,
            m.from,
            m.to,
            m.cause.as_str()
        ));
    }
    out
}

fn clock() -> String {
    // HH:MM:SS UTC, from the system clock.
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let day = secs % 86_400;
    format!("{:02}:{:02}:{:02} UTC", day / 3600, day / 60 % 60, day % 60)
}

pub fn run(client: Client, socket: &Path, once: bool) -> ExitCode {
    if once {
        return match client.top() {
            Ok(frame) => {
                print!("{}", render(&frame, &clock()));
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("omctl: top: {e}");
                ExitCode::FAILURE
            }
        };
    }
    // Live until interrupted (Ctrl-C ends it, the terminal as it was: no
    // mode is changed). A daemon that goes away is shown, and waited for.
    let mut current = Some(client);
    loop {
        if current.is_none() {
            current = Client::connect(socket).ok();
        }
        let text = match current.as_ref().map(Client::top) {
            Some(Ok(frame)) => render(&frame, &clock()),
            Some(Err(e)) => {
                current = None;
                format!(
                    "migshm top  {}\n\nno answer from {}: {e}\n",
                    clock(),
                    socket.display()
                )
            }
            None => format!(
                "migshm top  {}\n\nno dsmd at {}\n",
                clock(),
                socket.display()
            ),
        };
        let mut stdout = std::io::stdout().lock();
        if write!(stdout, "{CLEAR}{text}")
            .and_then(|()| stdout.flush())
            .is_err()
        {
            return ExitCode::SUCCESS;
        }
        drop(stdout);
        std::thread::sleep(REFRESH);
    }
}
