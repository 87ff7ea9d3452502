//! Where NBD servers listen and clients connect: a UNIX socket path or a TCP host and port.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// QAPI's `SocketAddress` for NBD (`type=unix` or `type=inet`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Address {
    Unix(PathBuf),
    Inet { host: String, port: String },
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Address::Unix(path) => write!(f, "unix:{}", path.display()),
            Address::Inet { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

/// A connected stream socket, blocking (the handshake uses it as such; io_uring then reads and
/// writes it without blocking the ring).
pub(crate) enum Socket {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Socket {
    pub(crate) fn set_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Socket::Unix(s) => {
                s.set_read_timeout(timeout)?;
                s.set_write_timeout(timeout)
            }
            Socket::Tcp(s) => {
                s.set_read_timeout(timeout)?;
                s.set_write_timeout(timeout)
            }
        }
    }

    pub(crate) fn into_fd(self) -> OwnedFd {
        match self {
            Socket::Unix(s) => s.into(),
            Socket::Tcp(s) => s.into(),
        }
    }
}

impl Read for Socket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Socket::Unix(s) => s.read(buf),
            Socket::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Socket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Socket::Unix(s) => s.write(buf),
            Socket::Tcp(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Address {
    /// Connects, retrying until `open_timeout` has passed (zero: one attempt, as QEMU's
    /// `open-timeout=0`).
    pub(crate) fn connect(&self, open_timeout: Duration) -> io::Result<Socket> {
        let deadline = Instant::now() + open_timeout;
        loop {
            match self.connect_once() {
                Ok(socket) => return Ok(socket),
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    fn connect_once(&self) -> io::Result<Socket> {
        match self {
            Address::Unix(path) => UnixStream::connect(path).map(Socket::Unix),
            Address::Inet { host, port } => {
                let stream = TcpStream::connect(inet(host, port)?.as_slice())?;
                stream.set_nodelay(true)?;
                Ok(Socket::Tcp(stream))
            }
        }
    }

    pub(crate) fn listen(&self) -> io::Result<Listener> {
        match self {
            Address::Unix(path) => UnixListener::bind(path).map(Listener::Unix),
            Address::Inet { host, port } => {
                TcpListener::bind(inet(host, port)?.as_slice()).map(Listener::Tcp)
            }
        }
    }
}

fn inet(host: &str, port: &str) -> io::Result<Vec<std::net::SocketAddr>> {
    let port: u16 = port
        .parse()
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, format!("bad port '{port}'")))?;
    Ok((host, port).to_socket_addrs()?.collect())
}

/// A listening socket.
pub(crate) enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

impl Listener {
    pub(crate) fn accept(&self) -> io::Result<Socket> {
        match self {
            Listener::Unix(l) => l.accept().map(|(s, _)| Socket::Unix(s)),
            Listener::Tcp(l) => {
                let (s, _) = l.accept()?;
                s.set_nodelay(true)?;
                Ok(Socket::Tcp(s))
            }
        }
    }
}

impl AsFd for Listener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Listener::Unix(l) => l.as_fd(),
            Listener::Tcp(l) => l.as_fd(),
        }
    }
}
