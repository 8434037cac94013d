//! Links to the other daemons: TCP, length-delimited frames, a versioned and
//! authenticated handshake, one reader and one writer task per link.
//!
//! The lower node id dials the higher one, so each pair has one link.

use super::core::SharedCore;
use crate::ids::NodeId;
use crate::wire::{self, Control, Hello, PeerFrame, MAGIC, PEER_FRAME_MAX, PROTOCOL_VERSION};
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::codec::{Framed, FramedParts, LengthDelimitedCodec};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);

/// How often a reader with nothing to read checks its link is still wanted.
const READ_CHECK: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("timed out")]
    Timeout,
    #[error("connection closed")]
    Closed,
    #[error("bad frame: {0}")]
    Wire(#[from] wire::WireError),
    #[error("unexpected frame during handshake")]
    Unexpected,
    #[error("protocol {0:?} version {1} (we speak {PROTOCOL_VERSION})")]
    Version([u8; 4], u32),
    #[error("node {0} is not in this cluster, or not the one expected")]
    UnknownNode(NodeId),
    #[error("authentication failed: wrong cluster secret")]
    BadSecret,
}

pub fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .max_frame_length(PEER_FRAME_MAX)
        .new_codec()
}

async fn next_control(
    framed: &mut Framed<TcpStream, LengthDelimitedCodec>,
) -> Result<Control, HandshakeError> {
    let frame = framed.next().await.ok_or(HandshakeError::Closed)??;
    match wire::decode_peer(frame.freeze())? {
        PeerFrame::Control(c) => Ok(c),
        PeerFrame::Coh(_) => Err(HandshakeError::Unexpected),
    }
}

pub struct Identity {
    pub me: NodeId,
    pub incarnation: u64,
    pub secret: Option<Vec<u8>>,
    pub members: Vec<NodeId>,
}

/// Both sides: Hello (version, id, incarnation, nonce), then Auth (a MAC of
/// the other side's nonce). Returns the peer's id and incarnation.
pub async fn handshake(
    framed: &mut Framed<TcpStream, LengthDelimitedCodec>,
    id: &Identity,
    expect: Option<NodeId>,
) -> Result<(NodeId, u64), HandshakeError> {
    let fut = async {
        let nonce: [u8; 32] = rand::random();
        let hello = Hello {
            magic: MAGIC,
            version: PROTOCOL_VERSION,
            node: id.me,
            incarnation: id.incarnation,
            nonce,
        };
        framed
            .send(wire::encode_control(&Control::Hello(hello)))
            .await?;
        let Control::Hello(theirs) = next_control(framed).await? else {
            return Err(HandshakeError::Unexpected);
        };
        if theirs.magic != MAGIC || theirs.version != PROTOCOL_VERSION {
            return Err(HandshakeError::Version(theirs.magic, theirs.version));
        }
        if !id.members.contains(&theirs.node)
            || theirs.node == id.me
            || expect.is_some_and(|e| e != theirs.node)
        {
            return Err(HandshakeError::UnknownNode(theirs.node));
        }
        let mac = match &id.secret {
            Some(secret) => wire::auth_mac(secret, &theirs.nonce, id.me, id.incarnation),
            None => vec![],
        };
        framed
            .send(wire::encode_control(&Control::Auth { mac }))
            .await?;
        let Control::Auth { mac } = next_control(framed).await? else {
            return Err(HandshakeError::Unexpected);
        };
        let ok = match &id.secret {
            Some(secret) => {
                wire::auth_verify(secret, &nonce, theirs.node, theirs.incarnation, &mac)
            }
            None => mac.is_empty(),
        };
        if !ok {
            return Err(HandshakeError::BadSecret);
        }
        Ok((theirs.node, theirs.incarnation))
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, fut)
        .await
        .map_err(|_| HandshakeError::Timeout)?
}

/// Run an authenticated link until it ends; then the peer is lost.
/// `hello_sent`: no later than our Hello left, which the peer heard.
async fn run_link(
    core: SharedCore,
    framed: Framed<TcpStream, LengthDelimitedCodec>,
    node: NodeId,
    incarnation: u64,
    hello_sent: Instant,
) {
    let (tx, rx) = mpsc::unbounded_channel::<Vec<Bytes>>();
    let Some(generation) = core
        .borrow_mut()
        .peer_connected(node, incarnation, hello_sent, tx)
    else {
        return;
    };
    // Reading keeps the codec (and what it already buffered during the
    // handshake); writing is our own, vectored, so pages are not copied.
    let parts = framed.into_parts();
    let (read_half, write_half) = parts.io.into_split();
    // Built from parts so frames already buffered are decoded at once.
    let mut read_parts = FramedParts::new::<Bytes>(read_half, codec());
    read_parts.read_buf = parts.read_buf;
    let mut stream = Framed::from_parts(read_parts);
    let writer = tokio::task::spawn_local(write_frames(write_half, rx));
    loop {
        // A link fenced for silence (the other side may be unreachable, so
        // no end of stream may ever come) is left within a beat.
        let next = match tokio::time::timeout(READ_CHECK, stream.next()).await {
            Ok(next) => next,
            Err(_) if core.borrow().is_current(node, generation) => continue,
            Err(_) => break,
        };
        match next {
            Some(Ok(frame)) => {
                let result = core
                    .borrow_mut()
                    .on_peer_frame(node, generation, frame.freeze());
                if let Err(e) = result {
                    tracing::error!(?node, "bad frame from peer, closing the link: {e}");
                    break;
                }
            }
            Some(Err(e)) => {
                tracing::warn!(?node, "link error: {e}");
                break;
            }
            None => break,
        }
        if !core.borrow().is_current(node, generation) {
            break; // declared lost meanwhile (heartbeat)
        }
    }
    writer.abort();
    core.borrow_mut().link_closed(node, generation);
}

/// Most slices handed to one `writev` (the kernel's IOV_MAX is 1024).
const IOV_BATCH: usize = 512;

/// Write queued frames (each a list of parts) with their length prefixes,
/// as many per `writev` as are queued.
async fn write_frames(
    mut out: tokio::net::tcp::OwnedWriteHalf,
    mut rx: mpsc::UnboundedReceiver<Vec<Bytes>>,
) {
    use tokio::io::AsyncWriteExt;
    while let Some(first) = rx.recv().await {
        let mut frames = vec![first];
        let mut slices_needed = 1 + frames[0].len();
        while slices_needed < IOV_BATCH {
            match rx.try_recv() {
                Ok(f) => {
                    slices_needed += 1 + f.len();
                    frames.push(f);
                }
                Err(_) => break,
            }
        }
        let heads: Vec<[u8; 4]> = frames
            .iter()
            .map(|f| (f.iter().map(Bytes::len).sum::<usize>() as u32).to_be_bytes())
            .collect();
        let mut slices: Vec<std::io::IoSlice<'_>> = Vec::with_capacity(slices_needed);
        for (head, frame) in heads.iter().zip(&frames) {
            slices.push(std::io::IoSlice::new(head));
            slices.extend(frame.iter().map(|b| std::io::IoSlice::new(b)));
        }
        let mut pending = &mut slices[..];
        while !pending.is_empty() {
            let window = pending.len().min(IOV_BATCH);
            match out.write_vectored(&pending[..window]).await {
                Ok(0) | Err(_) => return,
                Ok(n) => std::io::IoSlice::advance_slices(&mut pending, n),
            }
        }
    }
}

/// Accept links from lower-numbered nodes.
pub async fn accept_loop(core: SharedCore, listener: TcpListener, id: std::rc::Rc<Identity>) {
    loop {
        let (stream, addr) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let core = core.clone();
        let id = id.clone();
        tokio::task::spawn_local(async move {
            let _ = stream.set_nodelay(true);
            let mut framed = Framed::new(stream, codec());
            let hello_sent = Instant::now();
            match handshake(&mut framed, &id, None).await {
                Ok((node, _)) if node > id.me => {
                    tracing::warn!(%addr, ?node, "higher node dialed us; it should wait for our call");
                }
                Ok((node, incarnation)) => {
                    run_link(core, framed, node, incarnation, hello_sent).await
                }
                Err(e) => tracing::warn!(%addr, "peer refused: {e}"),
            }
        });
    }
}

/// Keep a link to a higher-numbered node, redialing after any loss.
pub async fn dial_loop(
    core: SharedCore,
    node: NodeId,
    address: SocketAddr,
    id: std::rc::Rc<Identity>,
) {
    let mut backoff = Duration::from_millis(20);
    loop {
        match TcpStream::connect(address).await {
            Ok(stream) => {
                let _ = stream.set_nodelay(true);
                let mut framed = Framed::new(stream, codec());
                let hello_sent = Instant::now();
                match handshake(&mut framed, &id, Some(node)).await {
                    Ok((_, incarnation)) => {
                        backoff = Duration::from_millis(20);
                        run_link(core.clone(), framed, node, incarnation, hello_sent).await;
                    }
                    Err(e) => tracing::warn!(?node, "handshake failed: {e}"),
                }
            }
            Err(e) => tracing::debug!(?node, "connect {address}: {e}"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_millis(500));
    }
}
