//! `omrun-bench`: real programs natively and under `omrun`, in the same
//! run, on this machine: Apache (static file and a PHP page with opcache in
//! a SysV segment, SysV accept mutex) loaded by `ab`, and PostgreSQL 15
//! with SysV shared memory loaded by `pgbench`. Prints a table, then (last
//! line) one JSON object with each figure and its ratio to native.
//!
//! Needs apache2, ab, libapache2-mod-php and postgresql-15 (as
//! `scripts/test.sh` installs them) and root.

use migshm::programs::{
    ab, apache_conf, apache_installed, free_port, pg_init, pgbench, pgbench_figures,
    postgres_installed, start_apache, start_postgres, Group, Under, MOD_PHP,
};
use migshm::Cluster;
use std::path::Path;
use std::time::Duration;

const AB_REQUESTS: u32 = 20_000;
const AB_CONCURRENCY: u32 = 8;
const PGBENCH_SECONDS: &str = "8";
const ROUNDS: usize = 3;

fn fail(msg: &str) -> ! {
    eprintln!("omrun-bench: {msg}");
    std::process::exit(1)
}

fn stop(mut g: Group, signal: i32) {
    if g.stop(signal, Duration::from_secs(30)).is_none() {
        eprintln!("omrun-bench: a server did not stop; killed");
    }
}

/// Requests per second of Apache for a static page and a PHP page.
fn apache_rates(under: Under<'_>, dir: &Path) -> (f64, Option<f64>) {
    let _ = std::fs::remove_dir_all(dir);
    let ports = [free_port(), free_port()];
    let conf = apache_conf(dir, ports);
    let apache = start_apache(under, &conf, ports[0]).unwrap_or_else(|e| fail(&e));
    // Warm up (workers started, opcache filled), then measure.
    let _ = ab(
        &format!("http://127.0.0.1:{}/index.html", ports[0]),
        2000,
        AB_CONCURRENCY,
    );
    let (done, failed, rate) = ab(
        &format!("http://127.0.0.1:{}/index.html", ports[0]),
        AB_REQUESTS,
        AB_CONCURRENCY,
    );
    if done != AB_REQUESTS || failed != 0 {
        fail(&format!("apache: {done} requests, {failed} failed"));
    }
    let php = Path::new(MOD_PHP).exists().then(|| {
        let url = format!("http://127.0.0.1:{}/info.php", ports[1]);
        let _ = ab(&url, 2000, AB_CONCURRENCY);
        let (done, failed, rate) = ab(&url, AB_REQUESTS, AB_CONCURRENCY);
        if done != AB_REQUESTS || failed != 0 {
            fail(&format!("php: {done} requests, {failed} failed"));
        }
        rate
    });
    stop(apache, libc::SIGTERM);
    (rate, php)
}

/// pgbench TPS of PostgreSQL (scale 10, 4 clients).
fn pg_tps(under: Under<'_>, dir: &Path, ids: (u32, u32)) -> f64 {
    let data = pg_init(dir, ids).unwrap_or_else(|e| fail(&e));
    let port = free_port();
    let server = start_postgres(under, &data, port, ids).unwrap_or_else(|e| fail(&e));
    let (ok, report) = pgbench(port, &["-i", "-s", "10", "-q"]);
    if !ok {
        fail(&format!("pgbench -i: {report}"));
    }
    let (ok, report) = pgbench(port, &["-c", "4", "-j", "2", "-T", PGBENCH_SECONDS]);
    let (failed, tps) = pgbench_figures(&report);
    if !ok || failed != Some(0) {
        fail(&format!("pgbench: {report}"));
    }
    stop(server, libc::SIGINT);
    let _ = std::fs::remove_dir_all(dir);
    tps.unwrap_or_else(|| fail("no tps in pgbench's report"))
}

fn json_num(v: Option<f64>) -> String {
    v.map_or("null".into(), |x| format!("{x:.2}"))
}

fn main() {
    if !apache_installed() {
        fail("apache2 and ab are needed (scripts/test.sh installs them)");
    }
    let Some(pg_ids) = postgres_installed() else {
        fail("postgresql-15 is needed (scripts/test.sh installs it)");
    };
    if let Err(e) = dsm::uffd::probe_features() {
        fail(&format!("userfaultfd is not usable here: {e}"));
    }
    let cluster = Cluster::start(2).unwrap_or_else(|e| fail(&format!("cluster: {e}")));
    let base = std::env::temp_dir().join(format!("omrun-bench-{}", std::process::id()));
    let node1 = Under::Omrun {
        socket: cluster.socket(1),
        home: None,
    };
    // The same program on node 1, its objects homed on node 2.
    let node1_homed_2 = Under::Omrun {
        socket: cluster.socket(1),
        home: Some(2),
    };

    // Rounds alternate the three ways of running, and each figure is the
    // median of its rounds: this 2-vCPU VM drifts by ±15 % within minutes.
    let mut runs: [Vec<(f64, Option<f64>, f64)>; 3] = Default::default();
    for _ in 0..ROUNDS {
        for (i, under) in [Under::Native, node1, node1_homed_2]
            .into_iter()
            .enumerate()
        {
            let (static_rps, php_rps) = apache_rates(under, &base.join(format!("apache-{i}")));
            let tps = pg_tps(under, &base.join(format!("pg-{i}")), pg_ids);
            runs[i].push((static_rps, php_rps, tps));
        }
    }
    let median = |v: Vec<f64>| -> f64 {
        let mut v = v;
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let figures = |i: usize| {
        let r = &runs[i];
        let php: Vec<f64> = r.iter().filter_map(|x| x.1).collect();
        (
            median(r.iter().map(|x| x.0).collect()),
            (!php.is_empty()).then(|| median(php)),
            median(r.iter().map(|x| x.2).collect()),
        )
    };
    let (apache_native, php_native, pg_native) = figures(0);
    let (apache_omrun, php_omrun, pg_omrun) = figures(1);
    let (apache_remote, php_remote, pg_remote) = figures(2);
    drop(cluster);
    let _ = std::fs::remove_dir_all(&base);

    let ratio = |a: f64, b: f64| a / b;
    println!("omrun-bench: native vs omrun on node 1 of a 2-node loopback cluster, same run, median of {ROUNDS} alternating rounds");
    println!(
        "{:<40} {:>12} {:>12} {:>8}",
        "program", "native", "omrun", "ratio"
    );
    println!(
        "{:<40} {:>12.0} {:>12.0} {:>8.2}",
        "apache static page, requests/s",
        apache_native,
        apache_omrun,
        ratio(apache_omrun, apache_native)
    );
    if let (Some(n), Some(o)) = (php_native, php_omrun) {
        println!(
            "{:<40} {:>12.0} {:>12.0} {:>8.2}",
            "apache PHP page (opcache shm), req/s",
            n,
            o,
            ratio(o, n)
        );
    }
    println!(
        "{:<40} {:>12.0} {:>12.0} {:>8.2}",
        "pgbench (scale 10, 4 clients), tps",
        pg_native,
        pg_omrun,
        ratio(pg_omrun, pg_native)
    );
    println!("objects homed on node 2, program on node 1:");
    println!(
        "{:<40} {:>12.0} {:>12.0} {:>8.2}",
        "  apache static page, requests/s",
        apache_native,
        apache_remote,
        ratio(apache_remote, apache_native)
    );
    if let (Some(n), Some(o)) = (php_native, php_remote) {
        println!(
            "{:<40} {:>12.0} {:>12.0} {:>8.2}",
            "  apache PHP page, requests/s",
            n,
            o,
            ratio(o, n)
        );
    }
    println!(
        "{:<40} {:>12.0} {:>12.0} {:>8.2}",
        "  pgbench, tps",
        pg_native,
        pg_remote,
        ratio(pg_remote, pg_native)
    );
    let php_ratio = php_native.zip(php_omrun).map(|(n, o)| ratio(o, n));
    println!(
        "{{\"apache_native_rps\":{:.0},\"apache_omrun_rps\":{:.0},\"apache_ratio\":{:.2},\"php_native_rps\":{},\"php_omrun_rps\":{},\"php_ratio\":{},\"pgbench_native_tps\":{:.1},\"pgbench_omrun_tps\":{:.1},\"pgbench_ratio\":{:.2},\"apache_remote_home_rps\":{:.0},\"apache_remote_home_ratio\":{:.2},\"php_remote_home_rps\":{},\"pgbench_remote_home_tps\":{:.1},\"pgbench_remote_home_ratio\":{:.2}}}",
        apache_native,
        apache_omrun,
        ratio(apache_omrun, apache_native),
        json_num(php_native),
        json_num(php_omrun),
        json_num(php_ratio),
        pg_native,
        pg_omrun,
        ratio(pg_omrun, pg_native),
        apache_remote,
        ratio(apache_remote, apache_native),
        json_num(php_remote),
        pg_remote,
        ratio(pg_remote, pg_native)
    );
}
