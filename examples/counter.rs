//! The library API in a few lines: attach the cluster-wide segment of a key
//! on whichever node this process runs and add to a shared counter.
//!
//! ```text
//! DSMD_SOCKET=/tmp/node1.sock cargo run --example counter -- 0x1234 1000
//! ```

use dsm::client::{Client, IPC_CREAT};
use std::sync::atomic::Ordering::SeqCst;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let key = args
        .next()
        .map(|k| i32::from_str_radix(k.trim_start_matches("0x"), 16))
        .transpose()?
        .unwrap_or(0x1234);
    let times: u64 = args.next().map(|n| n.parse()).transpose()?.unwrap_or(1000);

    let client = Client::connect_default()?; // $DSMD_SOCKET
    let id = client.get(key, 4096, IPC_CREAT | 0o600)?; // shmget
    let segment = client.attach(id, false)?; // shmat
    let counter = segment.atomic_u64(0);
    for _ in 0..times {
        counter.fetch_add(1, SeqCst);
    }
    let stat = client.stat(id)?; // shmctl(IPC_STAT)
    println!(
        "node {}: counter of key {key:#x} (segment {id}, home node {}, {} attached) is now {}",
        client.node(),
        stat.home,
        stat.nattch,
        counter.load(SeqCst)
    );
    Ok(()) // the segment detaches when `segment` drops
}
