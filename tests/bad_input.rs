//! Hostile or broken input: fake local clients and fake peers send
//! truncated, oversized and garbage frames and unknown ids. Each gets an
//! error or a closed connection; the daemon logs it and keeps serving.

use dsm::client::Client;
use dsm::coherence::CohMsg;
use dsm::ids::{IpcId, IpcKey, IpcKind, NodeId, PageIndex, PageKey, SegmentId};
use dsm::wire::{
    self, ClientReply, ClientRequest, Control, Hello, PeerFrame, RpcRequest, RpcResponse,
};
use migshm::{binary, uffd_or_skip, Cluster, ClusterOptions};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::Duration;

fn still_serves(cluster: &Cluster, node: u8) {
    let client = Client::connect(cluster.socket(node)).expect("daemon no longer accepts clients");
    let nodes = client.nodes().expect("daemon no longer answers");
    assert_eq!(nodes.len(), cluster.nodes.len());
    for n in 1..=cluster.nodes.len() as u8 {
        assert!(
            !cluster.log(n).contains("panicked"),
            "node {n} panicked:\n{}",
            cluster.log(n)
        );
    }
}

/// True if the peer closed the connection (EOF or reset) within a few seconds.
fn closed_by_peer(stream: &mut impl Read) -> bool {
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                return false
            }
            Err(_) => return true,
        }
    }
}

fn client_call(stream: &mut UnixStream, id: u64, req: &ClientRequest) -> ClientReply {
    stream.write_all(&wire::encode_client(id, req)).unwrap();
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).unwrap();
    let mut body = vec![0u8; u32::from_le_bytes(len) as usize];
    stream.read_exact(&mut body).unwrap();
    let (reply_id, reply): (u64, ClientReply) = wire::decode_client(&body).unwrap();
    assert_eq!(reply_id, id);
    reply
}

#[test]
fn fake_clients_get_errors_and_the_daemon_keeps_serving() {
    if !uffd_or_skip() {
        return;
    }
    let cluster = Cluster::start(2).expect("start cluster");
    let socket = cluster.socket(1);
    let connect = || {
        let s = UnixStream::connect(socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s
    };

    // Oversized length header: closed.
    let mut s = connect();
    s.write_all(&u32::MAX.to_le_bytes()).unwrap();
    assert!(closed_by_peer(&mut s), "oversized frame was not refused");

    // Garbage body: an error reply, then closed.
    let mut s = connect();
    s.write_all(&[5, 0, 0, 0, 0xff, 0xfe, 0xfd, 0xfc, 0xfb])
        .unwrap();
    let mut len = [0u8; 4];
    s.read_exact(&mut len).unwrap();
    let mut body = vec![0u8; u32::from_le_bytes(len) as usize];
    s.read_exact(&mut body).unwrap();
    let (_, reply): (u64, ClientReply) = wire::decode_client(&body).unwrap();
    assert_eq!(reply, ClientReply::Err(libc::EBADMSG));
    assert!(closed_by_peer(&mut s));

    // Truncated frame, then the client vanishes mid-request.
    let mut s = connect();
    s.write_all(&[100, 0, 0, 0, 1, 2, 3]).unwrap();
    drop(s);

    // Unknown ids and out-of-order requests: the errno Linux would give.
    let mut s = connect();
    let foreign = SegmentId::new(NodeId(99), 5).0; // a node not in the cluster
    let shmmax: u64 = std::fs::read_to_string("/proc/sys/kernel/shmmax")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(u64::MAX);
    let cases = [
        (
            ClientRequest::ShmAttach {
                id: 0x0100_0000 + 4242,
                readonly: false,
            },
            libc::EINVAL,
        ),
        (
            ClientRequest::ShmAttach {
                id: -7,
                readonly: true,
            },
            libc::EINVAL,
        ),
        (ClientRequest::ShmStat { id: foreign }, libc::EINVAL),
        (ClientRequest::ShmRemove { id: 0 }, libc::EINVAL),
        (
            ClientRequest::ShmDetach {
                id: 0x0100_0001,
                handle: 4096,
            },
            libc::EINVAL,
        ),
        (
            ClientRequest::ShmViews {
                id: 0x0100_0001,
                handle: 1,
                views: vec![wire::View {
                    addr: 4096,
                    len: 4096,
                    pgoff: 0,
                }],
            },
            libc::EINVAL,
        ),
        (ClientRequest::ShmMemfd { id: 0x0100_0001 }, libc::EINVAL),
        (
            ClientRequest::ShmMapped {
                id: 0x0100_0001,
                addr: 4096,
                len: 4096,
                readonly: false,
                with_uffd: true,
                handle: 1,
            },
            libc::EINVAL,
        ),
        (
            ClientRequest::Adopt {
                attachments: vec![],
            },
            libc::EINVAL,
        ),
        (
            ClientRequest::ShmGet {
                key: 0,
                size: 1 << 62,
                flags: 0o1600,
                home: None,
                space: dsm::sysv::ShmSpace::SysV,
            },
            // Above SHMMAX: EINVAL; within it (the default) but more than
            // can be backed: ENOMEM, as Linux answers.
            if shmmax < 1 << 62 {
                libc::EINVAL
            } else {
                libc::ENOMEM
            },
        ),
        (
            ClientRequest::Hello {
                version: 999,
                link: None,
            },
            libc::EPROTONOSUPPORT,
        ),
    ];
    for (i, (req, errno)) in cases.into_iter().enumerate() {
        let reply = client_call(&mut s, i as u64 + 1, &req);
        assert_eq!(reply, ClientReply::Err(errno), "{req:?}");
    }
    drop(s);

    still_serves(&cluster, 1);
    assert!(
        cluster.log(1).contains("malformed request"),
        "the garbage was not logged"
    );
}

/// Read one length-delimited (u32 BE) peer frame.
fn read_peer_frame(s: &mut TcpStream) -> std::io::Result<PeerFrame> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len)?;
    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut body)?;
    wire::decode_peer(body.into()).map_err(std::io::Error::other)
}

fn write_peer_frame(s: &mut TcpStream, frame: &[u8]) {
    let _ = s.write_all(&(frame.len() as u32).to_be_bytes());
    let _ = s.write_all(frame);
}

/// Handshake with a daemon, pretending to be `node`, with `secret`.
fn fake_peer(addr: &str, node: u8, secret: Option<&[u8]>) -> (TcpStream, bool) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let incarnation = 0xfeed_0000 + u64::from(std::process::id());
    let hello = Hello {
        magic: wire::MAGIC,
        version: wire::PROTOCOL_VERSION,
        node: NodeId(node),
        incarnation,
        nonce: [7; 32],
    };
    write_peer_frame(&mut s, &wire::encode_control(&Control::Hello(hello)));
    let Ok(PeerFrame::Control(Control::Hello(theirs))) = read_peer_frame(&mut s) else {
        return (s, false);
    };
    let mac = secret
        .map(|k| wire::auth_mac(k, &theirs.nonce, NodeId(node), incarnation))
        .unwrap_or_default();
    write_peer_frame(&mut s, &wire::encode_control(&Control::Auth { mac }));
    // The daemon sends its own answer before checking ours: accepted means
    // it then serves a request.
    if !matches!(
        read_peer_frame(&mut s),
        Ok(PeerFrame::Control(Control::Auth { .. }))
    ) {
        return (s, false);
    }
    write_peer_frame(
        &mut s,
        &wire::encode_control(&Control::Request {
            id: 1,
            body: RpcRequest::KeyLookup {
                key: IpcKey {
                    kind: IpcKind::Segment,
                    key: 1,
                },
            },
        }),
    );
    loop {
        match read_peer_frame(&mut s) {
            Ok(PeerFrame::Control(Control::Response { id: 1, .. })) => return (s, true),
            Ok(_) => continue,
            Err(_) => return (s, false),
        }
    }
}

#[test]
fn fake_peers_are_refused_or_answered_and_the_daemon_keeps_serving() {
    if !uffd_or_skip() {
        return;
    }
    let mut cluster = Cluster::start(3).expect("start cluster");
    // Node 1 dies; a fake "node 1" (a new incarnation) talks to node 2.
    cluster.kill(1);
    let addr = cluster.node(2).listen.clone();

    // Garbage before the handshake: closed.
    let mut s = TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"\x00\x00\x00\x05hello, anyone?").unwrap();
    assert!(closed_by_peer(&mut s));

    // Oversized frame length: closed.
    let mut s = TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(&u32::MAX.to_be_bytes()).unwrap();
    assert!(closed_by_peer(&mut s));

    // Another protocol version: refused.
    let mut s = TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let hello = Hello {
        magic: wire::MAGIC,
        version: 999,
        node: NodeId(1),
        incarnation: 1,
        nonce: [0; 32],
    };
    write_peer_frame(&mut s, &wire::encode_control(&Control::Hello(hello)));
    let _ = read_peer_frame(&mut s);
    assert!(closed_by_peer(&mut s));

    // A proper handshake, then unknown ids and garbage.
    let (mut s, accepted) = fake_peer(&addr, 1, None);
    assert!(accepted, "handshake refused:\n{}", cluster.log(2));
    let unknown = PageKey {
        seg: SegmentId::new(NodeId(2), 77),
        page: PageIndex(3),
    };
    write_peer_frame(
        &mut s,
        &wire::encode_coherence(&CohMsg::Read {
            page: unknown,
            prefetch: 4,
        }),
    );
    write_peer_frame(
        &mut s,
        &wire::encode_control(&Control::Request {
            id: 9,
            body: RpcRequest::KeyLookup {
                key: IpcKey {
                    kind: IpcKind::SemSet,
                    key: 12345,
                },
            },
        }),
    );
    write_peer_frame(
        &mut s,
        &wire::encode_control(&Control::Request {
            id: 10,
            body: RpcRequest::SegStat {
                id: IpcId(5),
                cred: dsm::sysv::Credentials::root(1),
            },
        }),
    );
    let mut got_unavailable = false;
    let mut answers = Vec::new();
    while !(got_unavailable && answers.len() == 2) {
        match read_peer_frame(&mut s).expect("no answer from the daemon") {
            PeerFrame::Coh(CohMsg::Unavailable { page }) => got_unavailable = page == unknown,
            PeerFrame::Control(Control::Response { id, body }) => answers.push((id, body)),
            _ => {}
        }
    }
    answers.sort_by_key(|a| a.0);
    assert_eq!(
        answers,
        vec![
            (9, RpcResponse::KeyAbsent),
            (10, RpcResponse::Err(libc::EINVAL))
        ]
    );
    // A ping is answered at once with its own time; a pong for a ping the
    // daemon never sent (a time still to come) extends no lease.
    write_peer_frame(
        &mut s,
        &wire::encode_control(&Control::Pong { echo_ns: u64::MAX }),
    );
    write_peer_frame(
        &mut s,
        &wire::encode_control(&Control::Ping { sent_ns: 4242 }),
    );
    loop {
        match read_peer_frame(&mut s).expect("no pong from the daemon") {
            PeerFrame::Control(Control::Pong { echo_ns: 4242 }) => break,
            _ => continue,
        }
    }
    assert!(
        cluster.log(2).contains("pong for a ping not sent yet"),
        "{}",
        cluster.log(2)
    );
    // A truncated coherence frame: the link is closed.
    write_peer_frame(&mut s, &[2, 40, 0, 1, 2]);
    assert!(closed_by_peer(&mut s));

    still_serves(&cluster, 2);
    assert!(
        cluster.log(2).contains("bad frame from peer"),
        "{}",
        cluster.log(2)
    );
}

#[test]
fn a_peer_with_the_wrong_secret_is_refused() {
    if !uffd_or_skip() {
        return;
    }
    let secret = "correct horse battery staple 0123";
    let mut cluster = Cluster::start_with(ClusterOptions {
        secret: Some(secret.into()),
        ..Default::default()
    })
    .expect("a cluster with a secret starts and links up");
    cluster.kill(1);
    let addr = cluster.node(2).listen.clone();
    let (_, accepted) = fake_peer(&addr, 1, Some(b"wrong secret, 32 bytes long......"));
    assert!(!accepted, "a wrong secret was accepted");
    let (_, accepted) = fake_peer(&addr, 1, None);
    assert!(
        !accepted,
        "no secret was accepted by a cluster that has one"
    );
    assert!(
        cluster.log(2).contains("wrong cluster secret"),
        "{}",
        cluster.log(2)
    );
    // The right secret is accepted.
    let (_, accepted) = fake_peer(&addr, 1, Some(secret.as_bytes()));
    assert!(accepted);
    still_serves(&cluster, 2);
}

#[test]
fn bad_command_lines_fail_with_one_line() {
    let dsmd = binary("dsmd");
    let dir = std::env::temp_dir().join(format!("migshm-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("s.sock");
    let sock = sock.to_str().unwrap();
    let cases: Vec<Vec<&str>> = vec![
        vec![],
        vec!["--node", "0", "--listen", "127.0.0.1:1", "--socket", sock],
        vec!["--node", "1", "--listen", "nowhere", "--socket", sock],
        vec![
            "--node",
            "1",
            "--listen",
            "127.0.0.1:1",
            "--socket",
            sock,
            "--peer",
            "2",
        ],
        vec![
            "--node",
            "1",
            "--listen",
            "127.0.0.1:1",
            "--socket",
            sock,
            "--peer",
            "1=127.0.0.1:2",
        ],
        vec!["--node", "1", "--listen", "0.0.0.0:7000", "--socket", sock],
        vec!["--node", "1", "--bogus"],
        vec!["--config", "/nonexistent/dsmd.toml"],
    ];
    for args in cases {
        let out = Command::new(&dsmd).args(&args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert_eq!(
            stderr.trim_end().lines().count(),
            1,
            "{args:?}: not one line: {stderr}"
        );
        assert!(stderr.starts_with("dsmd: "), "{args:?}: {stderr}");
    }
    // A TOML file with the same keys is read.
    let toml = dir.join("bad.toml");
    std::fs::write(
        &toml,
        "node = 1\nlisten = \"10.1.2.3:7000\"\nsocket = \"/tmp/x.sock\"\n",
    )
    .unwrap();
    let out = Command::new(&dsmd)
        .arg("--config")
        .arg(&toml)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("without --secret-file"));
    let out = Command::new(binary("omctl"))
        .args(["--socket", "/nonexistent.sock", "nodes"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stderr)
            .trim_end()
            .lines()
            .count(),
        1
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Semaphore requests from fake clients and fake peers: the kernel's errno
/// or nothing at all, the set unchanged, the daemon still serving.
#[test]
fn bad_semaphore_requests_change_nothing() {
    if !uffd_or_skip() {
        return;
    }
    let mut cluster = Cluster::start(2).expect("start cluster");
    let sems = semaphore::Semaphores::connect(cluster.socket(2)).unwrap();
    let set = sems.get(0, 2, 0o600).unwrap();
    set.set_all(&[0, 5]).unwrap();
    let connect = || {
        let s = UnixStream::connect(cluster.socket(2)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s
    };
    let sop = |num: u16, op: i16| semaphore::SemBuf { num, op, flags: 0 };
    let semop = |id: i32, sops: Vec<semaphore::SemBuf>| ClientRequest::SemOp {
        id,
        sops,
        timeout_ns: None,
        euid: 0,
        egid: 0,
    };

    // Unknown ids and bad arrays: the errno Linux gives.
    let mut s = connect();
    let foreign = IpcId::new(NodeId(99), 5).0;
    let cases = [
        (semop(foreign, vec![sop(0, 1)]), libc::EINVAL),
        (semop(-3, vec![sop(0, 1)]), libc::EINVAL),
        (semop(set.id(), vec![sop(7, 1)]), libc::EFBIG),
        (semop(set.id(), vec![]), libc::EINVAL),
        (semop(set.id(), vec![sop(1, i16::MAX)]), libc::ERANGE),
        (ClientRequest::SemRegion { id: foreign }, libc::ENOENT),
        (
            ClientRequest::SemCtl {
                id: set.id(),
                cmd: wire::SemCtl::SetVal {
                    semnum: 2,
                    value: 1,
                },
            },
            libc::EINVAL,
        ),
        (
            ClientRequest::SemGet {
                key: 0,
                nsems: -1,
                flags: 0o1600,
                home: None,
            },
            libc::EINVAL,
        ),
    ];
    // A cancel with nothing pending is ignored, not answered.
    s.write_all(&wire::encode_client(99, &ClientRequest::SemCancel))
        .unwrap();
    for (i, (req, errno)) in cases.into_iter().enumerate() {
        let reply = client_call(&mut s, i as u64 + 1, &req);
        assert_eq!(reply, ClientReply::Err(errno), "{req:?}");
    }

    // A client that sends another request while its semop waits is cut
    // off, and its operation withdrawn; so is one that vanishes.
    let mut s = connect();
    s.write_all(&wire::encode_client(1, &semop(set.id(), vec![sop(0, -1)])))
        .unwrap();
    let mut other = connect();
    other
        .write_all(&wire::encode_client(1, &semop(set.id(), vec![sop(0, -1)])))
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while set.get_ncnt(0).unwrap() != 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the waits never queued"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    s.write_all(&wire::encode_client(2, &ClientRequest::Nodes))
        .unwrap();
    assert!(closed_by_peer(&mut s));
    drop(other);
    while set.get_ncnt(0).unwrap() != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the waits were not withdrawn"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(set.get_all().unwrap(), vec![0, 5]);

    // A fake peer (a new life of node 1, after node 1 dies) sends
    // semaphore notices about sets and waits that do not exist, and a set
    // that does not hold together.
    cluster.kill(1);
    let addr = cluster.node(2).listen.clone();
    let (mut p, accepted) = fake_peer(&addr, 1, None);
    assert!(accepted, "handshake refused:\n{}", cluster.log(2));
    let cred = dsm::sysv::Credentials::root(1);
    let notices = [
        wire::Notice::SemOp {
            origin: NodeId(1),
            wait: 5,
            set: IpcId::new(NodeId(2), 4242),
            sops: vec![sop(0, 1)],
            pid: 1,
            cred: cred.clone(),
            owner: NodeId(3),
        },
        wire::Notice::SemResult {
            wait: 77,
            result: wire::SemResult::Done,
        },
        wire::Notice::SemReturn {
            set: IpcId(set.id()),
            state: Box::new(
                semaphore::engine::SemSet::create(
                    0,
                    1,
                    0o600,
                    &cred,
                    &semaphore::engine::SemLimits::from_proc(),
                    0,
                )
                .unwrap(),
            ),
        },
        wire::Notice::SemCancel {
            origin: NodeId(1),
            set: IpcId(set.id()),
            wait: 1234,
        },
        wire::Notice::SemProcessExited {
            origin: NodeId(1),
            set: IpcId(set.id()),
            pid: 4321,
        },
        wire::Notice::SemRecall {
            set: IpcId(set.id()),
        },
    ];
    for n in notices {
        write_peer_frame(&mut p, &wire::encode_control(&Control::Notice(n)));
    }
    loop {
        match read_peer_frame(&mut p).expect("no answer to the unknown set") {
            PeerFrame::Control(Control::Notice(wire::Notice::SemResult { wait: 5, result })) => {
                assert_eq!(result, wire::SemResult::Failed(libc::EINVAL));
                break;
            }
            _ => continue,
        }
    }
    assert_eq!(
        set.get_all().unwrap(),
        vec![0, 5],
        "a fake notice changed the set"
    );
    still_serves(&cluster, 2);
}

/// Set in the copy of this test binary that `adopting_what_one_may_not_attach_is_refused`
/// runs as another user: the daemon's socket and the segment to claim.
const ADOPT_AS_OTHER_USER: &str = "MIGSHM_TEST_ADOPT_AS_OTHER_USER";

/// A process may adopt (as a forked child does) only what its parent has,
/// what a migrator granted it, or what it could attach itself: a process
/// of another user claiming a root-only segment it never had gets EACCES,
/// and the segment stays unattached.
#[test]
fn adopting_what_one_may_not_attach_is_refused() {
    if std::env::var_os(ADOPT_AS_OTHER_USER).is_some() || !uffd_or_skip() {
        return;
    }
    let cluster = Cluster::start(1).expect("start");
    let admin = Client::connect(cluster.socket(1)).expect("connect");
    let id = admin
        .get(0, 4096, dsm::client::IPC_CREAT | 0o600)
        .expect("shmget");
    let out = {
        use std::os::unix::process::CommandExt;
        Command::new(std::env::current_exe().expect("test binary"))
            .args(["--exact", "claim_a_segment_as_another_user", "--nocapture"])
            .env(
                ADOPT_AS_OTHER_USER,
                format!("{} {id}", cluster.socket(1).display()),
            )
            .uid(65534)
            .gid(65534)
            .output()
            .expect("run as nobody")
    };
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains(&format!("adopt answer: Err({})", libc::EACCES)),
        "{text}"
    );
    assert_eq!(admin.stat(id).expect("stat").nattch, 0);
    admin.remove(id).expect("IPC_RMID");
    still_serves(&cluster, 1);
}

/// The other user's side of `adopting_what_one_may_not_attach_is_refused`
/// (does nothing in a normal run).
#[test]
fn claim_a_segment_as_another_user() {
    let Some(setup) = std::env::var_os(ADOPT_AS_OTHER_USER) else {
        return;
    };
    let setup = setup.to_string_lossy().into_owned();
    let (socket, id) = setup.split_once(' ').expect("socket and id");
    let mut stream = UnixStream::connect(socket).expect("connect");
    let hello = ClientRequest::Hello {
        version: wire::PROTOCOL_VERSION,
        link: None,
    };
    assert!(matches!(
        client_call(&mut stream, 1, &hello),
        ClientReply::Welcome { .. }
    ));
    let uffd = dsm::uffd::create_user_only().expect("userfaultfd");
    let claim = ClientRequest::Adopt {
        attachments: vec![wire::AttachmentRecord {
            id: id.parse().expect("id"),
            addr: 0x7f00_0000_0000,
            len: 4096,
            readonly: false,
            pgoff: 0,
            handle: 1,
        }],
    };
    let (reply, _) = dsm::client::exchange(
        std::os::fd::AsFd::as_fd(&stream),
        2,
        &claim,
        Some(std::os::fd::AsFd::as_fd(&uffd)),
    )
    .expect("an answer");
    println!("adopt answer: {reply:?}");
}
