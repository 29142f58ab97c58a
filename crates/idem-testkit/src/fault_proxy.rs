//! A TCP fault proxy for outage tests: put it between a client and a real service and
//! cut the service off in the two ways a dead dependency shows up.
//!
//! - [`Mode::Refuse`]: the listener is closed (new connections are refused, as when
//!   the process is down) and open connections are reset.
//! - [`Mode::Reset`]: new connections are accepted, then reset at once (as behind a
//!   load balancer whose backend is gone); open connections are reset.
//! - [`Mode::Up`]: bytes flow both ways.
//!
//! ```no_run
//! # async fn demo() {
//! use idem_testkit::fault_proxy::{FaultProxy, Mode};
//!
//! let proxy = FaultProxy::start("127.0.0.1:6379").await;
//! let url = format!("redis://127.0.0.1:{}", proxy.port()); // connect through this
//! proxy.set(Mode::Refuse); // the service is "down"
//! proxy.set(Mode::Up); // and back
//! # }
//! ```

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// What the proxy does with connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Forward.
    Up,
    /// Listener closed: connections refused.
    Refuse,
    /// Connections accepted, then reset.
    Reset,
}

/// A running proxy on `127.0.0.1:<port>`. Stops when dropped.
#[derive(Debug)]
pub struct FaultProxy {
    port: u16,
    mode: watch::Sender<Mode>,
    task: JoinHandle<()>,
}

impl FaultProxy {
    /// A proxy forwarding to `upstream` (e.g. `127.0.0.1:6379`), up.
    ///
    /// # Panics
    ///
    /// If `upstream` is not `ip:port` or no loopback port can be bound.
    pub async fn start(upstream: &str) -> FaultProxy {
        let upstream: SocketAddr = upstream.parse().expect("upstream is ip:port");
        let listener = bind(0).expect("bind a loopback port for the fault proxy");
        let port = listener.local_addr().expect("local addr").port();
        let (mode, rx) = watch::channel(Mode::Up);
        let task = tokio::spawn(serve(listener, port, upstream, rx));
        FaultProxy { port, mode, task }
    }

    /// The proxy's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Switches the mode (takes effect at once for open connections).
    pub fn set(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn bind(port: u16) -> std::io::Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(SocketAddr::from(([127, 0, 0, 1], port)))?;
    socket.listen(1024)
}

fn reset(stream: TcpStream) {
    // SO_LINGER 0: close sends RST instead of FIN.
    let _ = stream.set_zero_linger();
    drop(stream);
}

async fn serve(
    listener: TcpListener,
    port: u16,
    upstream: SocketAddr,
    mut rx: watch::Receiver<Mode>,
) {
    let mut listener = Some(listener);
    loop {
        let mode = *rx.borrow_and_update();
        match mode {
            Mode::Refuse => listener = None,
            Mode::Up | Mode::Reset if listener.is_none() => {
                // The port was ours a moment ago; retry briefly if the kernel lags.
                let mut tries = 0;
                listener = loop {
                    match bind(port) {
                        Ok(l) => break Some(l),
                        Err(e) if tries > 500 => {
                            panic!("fault proxy cannot rebind port {port}: {e}")
                        }
                        Err(_) => {
                            tries += 1;
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    }
                };
            }
            _ => {}
        }
        let Some(l) = &listener else {
            if rx.changed().await.is_err() {
                return;
            }
            continue;
        };
        tokio::select! {
            changed = rx.changed() => if changed.is_err() { return },
            accepted = l.accept() => {
                let Ok((client, _)) = accepted else { continue };
                if mode == Mode::Reset {
                    reset(client);
                } else {
                    tokio::spawn(pipe(client, upstream, rx.clone()));
                }
            }
        }
    }
}

async fn pipe(mut client: TcpStream, upstream: SocketAddr, mut rx: watch::Receiver<Mode>) {
    let Ok(mut server) = TcpStream::connect(upstream).await else {
        reset(client);
        return;
    };
    let cut = {
        let copy = tokio::io::copy_bidirectional(&mut client, &mut server);
        let down = rx.wait_for(|m| *m != Mode::Up);
        tokio::select! {
            _ = copy => false,
            _ = down => true,
        }
    };
    if cut {
        reset(client);
        reset(server);
    }
}
