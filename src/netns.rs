//! Network namespaces for tests that cut links (DESIGN.md §7): one per
//! node, each with an `eth0` at 10.77.0.N/24, joined by a bridge that
//! lives in a namespace of its own (nothing is added to the root
//! namespace). Cutting a node takes its port on the bridge down; a one-way
//! or partial cut is an nftables drop rule in one node's namespace.

use std::process::Command;

pub struct Namespaces {
    bridge: String,
    nodes: Vec<String>,
}

fn ip(args: &[&str]) -> std::io::Result<()> {
    let out = Command::new("ip").args(args).output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// Can this process make namespaces (root, with `ip`)? Prints why not.
pub fn available() -> bool {
    // SAFETY: geteuid takes nothing and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        println!("skipped: network namespaces need root");
        return false;
    }
    if Command::new("ip").arg("-V").output().is_err() {
        println!("skipped: no `ip` command (iproute2)");
        return false;
    }
    true
}

impl Namespaces {
    pub fn create(nodes: u8) -> std::io::Result<Namespaces> {
        use std::sync::atomic::{AtomicU32, Ordering};
        remove_stale();
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let tag = format!(
            "{}x{}",
            std::process::id() % 100_000,
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let mut ns = Namespaces {
            bridge: format!("mshm{tag}br"),
            nodes: Vec::new(),
        };
        ip(&["netns", "add", &ns.bridge])?;
        ip(&["-n", &ns.bridge, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &ns.bridge, "link", "set", "br0", "up"])?;
        for n in 1..=nodes {
            let name = format!("mshm{tag}n{n}");
            ip(&["netns", "add", &name])?;
            ns.nodes.push(name.clone());
            ip(&["-n", &name, "link", "set", "lo", "up"])?;
            let port = format!("v{n}");
            ip(&[
                "-n", &ns.bridge, "link", "add", &port, "type", "veth", "peer", "name", "eth0",
                "netns", &name,
            ])?;
            ip(&[
                "-n", &ns.bridge, "link", "set", &port, "master", "br0", "up",
            ])?;
            let address = format!("{}/24", Namespaces::address(n));
            ip(&["-n", &name, "addr", "add", &address, "dev", "eth0"])?;
            ip(&["-n", &name, "link", "set", "eth0", "up"])?;
        }
        Ok(ns)
    }

    /// Node `n`'s address on the bridge.
    pub fn address(n: u8) -> String {
        format!("10.77.0.{n}")
    }

    /// Node `n`'s namespace.
    pub fn name(&self, n: u8) -> &str {
        &self.nodes[usize::from(n - 1)]
    }

    /// Cut node `n` off from every other (its port on the bridge down).
    pub fn cut(&self, n: u8) -> std::io::Result<()> {
        ip(&["-n", &self.bridge, "link", "set", &format!("v{n}"), "down"])
    }

    /// Join node `n` again.
    pub fn heal(&self, n: u8) -> std::io::Result<()> {
        ip(&["-n", &self.bridge, "link", "set", &format!("v{n}"), "up"])
    }
}

fn nft(namespace: &str, script: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut child = Command::new("ip")
        .args(["netns", "exec", namespace, "nft", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(script.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "nft in {namespace}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// Can tests drop packets with nftables? Prints why not.
pub fn nft_available() -> bool {
    if Command::new("nft").arg("--version").output().is_err() {
        println!("skipped: no `nft` command (the nftables package)");
        return false;
    }
    true
}

impl Namespaces {
    /// Node `at` stops receiving anything from node `from` (an nftables
    /// drop rule on its input): a one-way cut; called for both nodes of a
    /// pair it cuts that pair only, the others still reach both.
    pub fn drop_from(&self, at: u8, from: u8) -> std::io::Result<()> {
        let table = format!("mshmcut{from}");
        nft(
            self.name(at),
            &format!(
                "table inet {table} {{\n chain input {{\n  type filter hook input priority 0; policy accept;\n  ip saddr {} drop\n }}\n}}\n",
                Namespaces::address(from)
            ),
        )
    }

    /// Node `at` no longer receives the end of any TCP stream from node
    /// `from` (segments with FIN or RST): a closed connection is not seen
    /// closed, as behind a middlebox that lost it.
    pub fn drop_ends_from(&self, at: u8, from: u8) -> std::io::Result<()> {
        let table = format!("mshmend{from}");
        nft(
            self.name(at),
            &format!(
                "table inet {table} {{\n chain input {{\n  type filter hook input priority 0; policy accept;\n  ip saddr {} tcp flags & (fin | rst) != 0 drop\n }}\n}}\n",
                Namespaces::address(from)
            ),
        )
    }

    /// Node `at` receives from node `from` again.
    pub fn undrop(&self, at: u8, from: u8) -> std::io::Result<()> {
        nft(self.name(at), &format!("delete table inet mshmcut{from}\n"))
    }

    /// Node `at` sees node `from`'s streams end again.
    pub fn undrop_ends(&self, at: u8, from: u8) -> std::io::Result<()> {
        nft(self.name(at), &format!("delete table inet mshmend{from}\n"))
    }
}

/// Namespaces left by a test process that died without cleaning up (its
/// pid is in the name, `mshm{pid}x…`).
fn remove_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(pid) = name
            .strip_prefix("mshm")
            .and_then(|rest| rest.split('x').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        // Names carry the pid modulo 100000: only remove when no process
        // with that pid (or those residues in range) is alive.
        let alive = std::path::Path::new(&format!("/proc/{pid}")).exists()
            || (1..4)
                .any(|k| std::path::Path::new(&format!("/proc/{}", pid + k * 100_000)).exists());
        if !alive {
            let _ = ip(&["netns", "del", name]);
        }
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for name in self.nodes.iter().chain(std::iter::once(&self.bridge)) {
            let _ = ip(&["netns", "del", name]);
        }
    }
}
