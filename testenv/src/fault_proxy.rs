//! A TCP proxy the tests control, in front of a real PostgreSQL or Redis (never a mock of
//! them): it listens on 127.0.0.1 (a port of its own, kept for its lifetime) and forwards to
//! `upstream` while its mode is [`Mode::Pass`]; the other modes are the shapes a network fault
//! takes. Switching the mode also acts on the connections already open.
//!
//! | mode | new connections | open connections |
//! |---|---|---|
//! | `Pass` | forwarded | forwarded |
//! | `Refuse` | refused by the kernel: the listener is closed and the port held by a socket bound to it that never listens (it listens again when the mode leaves `Refuse`) | reset (RST), as when the server is gone |
//! | `AcceptThenClose` | accepted, then closed at once (FIN), as a load balancer with no backend does | closed (FIN) |
//! | `Reset` | accepted, then reset (RST: linger 0, then dropped) | reset (RST) mid-stream |
//! | `Blackhole` | accepted; what they send is read and discarded, nothing is ever answered | the same, from now on |
//! | `Trickle` | forwarded one byte at a time, [`TRICKLE_DELAY`] apart, both ways | the same, from now on |
//! | `Garbage` | every read from the client is answered with random bytes (never a valid RESP or PostgreSQL reply: the first byte is a control byte), and nothing reaches the upstream | the same, from now on |
//!
//! A trickled connection goes back to full speed when the mode returns to `Pass`. A connection
//! that was blackholed or answered with garbage is reset (RST) at the next mode change: bytes
//! were lost or invented, so its stream cannot resume (as after a middlebox that ate them).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;

/// The pause between two bytes in [`Mode::Trickle`].
pub const TRICKLE_DELAY: Duration = Duration::from_millis(20);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Pass,
    Refuse,
    AcceptThenClose,
    Reset,
    Blackhole,
    Trickle,
    Garbage,
}

impl Mode {
    /// Every fault shape (not `Pass`).
    pub const FAULTS: [Mode; 6] = [
        Mode::Refuse,
        Mode::AcceptThenClose,
        Mode::Reset,
        Mode::Blackhole,
        Mode::Trickle,
        Mode::Garbage,
    ];
}

/// What the proxy did, for tests that check a mode had its effect.
#[derive(Debug, Default)]
pub struct Stats {
    /// Connections accepted (in any mode).
    pub accepted: AtomicU64,
    /// Bytes read from clients and thrown away (blackhole, garbage).
    pub discarded: AtomicU64,
    /// Bytes forwarded one at a time (trickle).
    pub trickled: AtomicU64,
    /// Garbage bytes sent to clients.
    pub garbage: AtomicU64,
}

pub struct FaultProxy {
    pub addr: SocketAddr,
    pub upstream: SocketAddr,
    mode: watch::Sender<Mode>,
    pub stats: Arc<Stats>,
    task: tokio::task::JoinHandle<()>,
}

fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    bound(addr)?.listen(1024)
}

/// A socket bound to `addr` (with `SO_REUSEADDR`, so the proxy's own closed connections in
/// `TIME_WAIT` do not stand in the way), not listening.
fn bound(addr: SocketAddr) -> std::io::Result<TcpSocket> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    Ok(socket)
}

impl FaultProxy {
    /// A proxy in `Pass` mode in front of `upstream`.
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = listen("127.0.0.1:0".parse().expect("addr")).expect("bind the proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let (mode, watch) = watch::channel(Mode::Pass);
        let stats = Arc::new(Stats::default());
        let task = tokio::spawn(accept_loop(listener, addr, upstream, watch, stats.clone()));
        Self {
            addr,
            upstream,
            mode,
            stats,
            task,
        }
    }

    /// `redis://127.0.0.1:{port}` through the proxy.
    pub fn redis_url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    pub fn set(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }

    pub fn mode(&self) -> Mode {
        *self.mode.borrow()
    }

    pub fn discarded(&self) -> u64 {
        self.stats.discarded.load(Ordering::Relaxed)
    }

    pub fn trickled(&self) -> u64 {
        self.stats.trickled.load(Ordering::Relaxed)
    }

    pub fn garbage(&self) -> u64 {
        self.stats.garbage.load(Ordering::Relaxed)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
        // Open connections end with the mode channel: reset them.
        self.mode.send_replace(Mode::Reset);
    }
}

async fn accept_loop(
    listener: TcpListener,
    addr: SocketAddr,
    upstream: SocketAddr,
    mut watch: watch::Receiver<Mode>,
    stats: Arc<Stats>,
) {
    let mut listener = Some(listener);
    // While refusing: the port, bound and not listening. The kernel refuses connections to a
    // port nobody listens on, and a port left free would be anybody's: another test's
    // `bind(0)` or outgoing connection could take it for minutes, and the proxy could not
    // listen there again (a worker behind it would never see its dependency come back).
    let mut held: Option<TcpSocket> = None;
    loop {
        let mode = *watch.borrow_and_update();
        match (mode, listener.is_some()) {
            (Mode::Refuse, true) => {
                // Closing the listening socket makes the kernel refuse new connections; the
                // next turn holds the port again at once (a listener cannot stop listening
                // and keep it).
                listener = None;
                continue;
            }
            (Mode::Refuse, false) if held.is_none() => match bound(addr) {
                Ok(socket) => held = Some(socket),
                Err(_) => {
                    // Not held (the port is in use): try again shortly.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            (Mode::Refuse, false) => {}
            (_, false) => match held.take().map_or_else(|| listen(addr), |s| s.listen(1024)) {
                Ok(bound) => listener = Some(bound),
                Err(_) => {
                    // The port is still in TIME_WAIT or similar: try again shortly.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            (_, true) => {}
        }
        tokio::select! {
            changed = watch.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            accepted = async {
                match &listener {
                    Some(l) => l.accept().await,
                    None => std::future::pending().await,
                }
            } => {
                if let Ok((client, _)) = accepted {
                    stats.accepted.fetch_add(1, Ordering::Relaxed);
                    tokio::spawn(connection(client, upstream, watch.clone(), stats.clone()));
                }
            }
        }
    }
}

fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

fn garbage_bytes(n: usize) -> Vec<u8> {
    let mut bytes: Vec<u8> = (0..n.clamp(16, 256))
        .map(|_| rand::random::<u8>())
        .collect();
    // A control byte first: no RESP type marker, no PostgreSQL message or SSL answer.
    bytes[0] = rand::random::<u8>() % 0x08 + 0x01;
    bytes
}

/// One client connection, for its whole life, following the mode.
async fn connection(
    mut client: TcpStream,
    upstream: SocketAddr,
    mut watch: watch::Receiver<Mode>,
    stats: Arc<Stats>,
) {
    let mut up: Option<TcpStream> = None;
    let mut from_client = vec![0u8; 16 * 1024];
    let mut from_up = vec![0u8; 16 * 1024];
    // The mode this connection last acted on: a change that lands between a read and the next
    // look at the mode is seen here, not only by `changed()`.
    let mut acted: Option<Mode> = None;
    loop {
        let mode = *watch.borrow_and_update();
        if matches!(acted, Some(Mode::Blackhole | Mode::Garbage)) && acted != Some(mode) {
            // Bytes were eaten (or garbage sent): the stream cannot resume.
            if let Some(up) = up.take() {
                reset(up);
            }
            reset(client);
            return;
        }
        acted = Some(mode);
        match mode {
            Mode::Refuse | Mode::Reset => {
                if let Some(up) = up.take() {
                    reset(up);
                }
                reset(client);
                return;
            }
            Mode::AcceptThenClose => {
                let _ = client.shutdown().await;
                return;
            }
            Mode::Blackhole | Mode::Garbage => {
                tokio::select! {
                    _ = watch.changed() => {
                        // Bytes were eaten (or garbage sent): the stream cannot resume.
                        if let Some(up) = up.take() {
                            reset(up);
                        }
                        reset(client);
                        return;
                    }
                    read = client.read(&mut from_client) => match read {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            stats.discarded.fetch_add(n as u64, Ordering::Relaxed);
                            if mode == Mode::Garbage {
                                let bytes = garbage_bytes(n);
                                // Counted before the write: a client may read them (and look
                                // at the count) before `write_all` returns here.
                                stats.garbage.fetch_add(bytes.len() as u64, Ordering::Relaxed);
                                if client.write_all(&bytes).await.is_err() {
                                    return;
                                }
                            }
                        }
                    },
                }
            }
            Mode::Pass | Mode::Trickle => {
                let upstream_conn = match up.as_mut() {
                    Some(conn) => conn,
                    None => match TcpStream::connect(upstream).await {
                        Ok(conn) => up.insert(conn),
                        Err(_) => {
                            reset(client);
                            return;
                        }
                    },
                };
                let trickle = mode == Mode::Trickle;
                tokio::select! {
                    changed = watch.changed() => {
                        if changed.is_err() {
                            reset(client);
                            return;
                        }
                    }
                    read = client.read(&mut from_client) => match read {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if forward(&from_client[..n], upstream_conn, trickle, &watch, &stats).await.is_err() {
                                reset(client);
                                return;
                            }
                        }
                    },
                    read = upstream_conn.read(&mut from_up) => match read {
                        Ok(0) | Err(_) => {
                            let _ = client.shutdown().await;
                            return;
                        }
                        Ok(n) => {
                            if forward(&from_up[..n], &mut client, trickle, &watch, &stats).await.is_err() {
                                return;
                            }
                        }
                    },
                }
            }
        }
    }
}

/// Forwards one read's bytes, one at a time while trickling. A trickled chunk stops trickling
/// as soon as the mode leaves `Trickle` (the rest goes at once), so a connection is back to
/// full speed when the fault ends, not after the 16 KiB it was in the middle of (minutes at
/// [`TRICKLE_DELAY`] a byte).
async fn forward(
    bytes: &[u8],
    to: &mut TcpStream,
    trickle: bool,
    mode: &watch::Receiver<Mode>,
    stats: &Stats,
) -> std::io::Result<()> {
    if !trickle {
        return to.write_all(bytes).await;
    }
    for (i, byte) in bytes.iter().enumerate() {
        if *mode.borrow() != Mode::Trickle {
            return to.write_all(&bytes[i..]).await;
        }
        // Counted before the write, as the garbage is.
        stats.trickled.fetch_add(1, Ordering::Relaxed);
        to.write_all(std::slice::from_ref(byte)).await?;
        to.flush().await?;
        tokio::time::sleep(TRICKLE_DELAY).await;
    }
    Ok(())
}

/// A loopback echo server (for the proxy's own tests).
pub async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
    let addr = listener.local_addr().expect("echo addr");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                while let Ok(n) = stream.read(&mut buf).await {
                    if n == 0 || stream.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}
