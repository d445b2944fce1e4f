//! The listening sockets: the proxy address, bound once per worker, and the admin
//! address.
//!
//! With several workers each one accepts on a socket of its own, all bound to the same
//! address with `SO_REUSEPORT`. The kernel spreads new connections over them by a hash of
//! the client's address and port, and a connection then lives on the worker that
//! accepted it: no thread hands it to another, no two threads wake for the same client.
//! (One shared socket would wake every worker's epoll for each connection, and a hand-off
//! from one accepting thread would cost a cross-thread wake-up per connection.)
//!
//! `SO_REUSEPORT` lets any process of the same user join the group, so a second wsgate
//! started by mistake on the same port would silently take half of the connections.
//! Before binding the group, wsgate therefore binds the address once *without* it: that
//! fails with "address in use" while anything listens there, as a single socket would.

use std::net::{SocketAddr, TcpListener};

use socket2::{Domain, Protocol, SockRef, Socket, TcpKeepalive, Type};

use crate::config::Config;
use crate::error::Error;

/// Pending connections the kernel may queue per listening socket. The default (128)
/// overflows when a few hundred clients reconnect at once (a pod restart), and each
/// dropped SYN costs the client a 1 s retransmission. The kernel caps it at somaxconn.
const LISTEN_BACKLOG: i32 = 4096;

/// Idle time before the first TCP keepalive probe, on both legs. Keepalive finds a peer
/// that vanished while the connection is idle at the TCP level.
pub const TCP_KEEPALIVE_IDLE: std::time::Duration = std::time::Duration::from_secs(30);
/// Time between keepalive probes.
const TCP_KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);
/// Unanswered probes before the kernel drops the connection.
const TCP_KEEPALIVE_RETRIES: u32 = 3;
/// How long sent data may stay unacknowledged before the kernel drops the connection
/// (TCP_USER_TIMEOUT). Without it a peer that vanished with data in flight is only
/// noticed after ~15 minutes of retransmissions. Matches the keepalive budget above.
const TCP_USER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// The listening sockets, bound before serving so that tests can bind port 0 and read
/// the address back. They are plain non-blocking std sockets: each is registered with
/// the runtime of the worker that serves it.
#[derive(Debug)]
pub struct Listeners {
    /// The proxy address, one socket per worker (`workers`), all on the same port.
    pub proxy: Vec<TcpListener>,
    /// `admin.listen`, unless it is off.
    pub admin: Option<TcpListener>,
}

impl Listeners {
    /// Binds `listen` once per worker and `admin.listen`.
    pub fn bind(config: &Config) -> Result<Listeners, Error> {
        let proxy = bind_group(config.listen, config.workers.count())
            .map_err(|source| bind_error("listen", config.listen, source))?;
        let admin = config
            .admin
            .listen
            .map(|addr| bind_one(addr, false).map_err(|e| bind_error("admin.listen", addr, e)))
            .transpose()?;
        Ok(Listeners { proxy, admin })
    }

    /// The proxy's bound address (the port the kernel chose, for port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        match self.proxy.first() {
            Some(l) => l.local_addr(),
            None => Err(std::io::ErrorKind::NotConnected.into()),
        }
    }
}

fn bind_error(what: &'static str, addr: SocketAddr, source: std::io::Error) -> Error {
    Error::Bind { what, addr, source }
}

/// File descriptors wsgate sets aside from the open-file limit besides its two per
/// WebSocket: listeners, the backend pools, logs, and each worker's splice pipes.
pub fn reserved_descriptors(workers: usize) -> usize {
    64 + workers * crate::splice::MAX_DESCRIPTORS
}

/// How many WebSockets the process's open-file limit (its soft limit, as it is now)
/// allows `workers` workers: two sockets each, after the reserved descriptors.
pub fn websocket_capacity(workers: usize) -> Option<usize> {
    let (soft, _) = rlimit::getrlimit(rlimit::Resource::NOFILE).ok()?;
    let soft = usize::try_from(soft).unwrap_or(usize::MAX);
    Some(soft.saturating_sub(reserved_descriptors(workers)) / 2)
}

/// `count` sockets listening on `addr`; with more than one they share the port through
/// `SO_REUSEPORT`. Each is tuned with [`tune`], which accepted sockets inherit.
fn bind_group(addr: SocketAddr, count: usize) -> std::io::Result<Vec<TcpListener>> {
    if count <= 1 {
        return Ok(vec![tune(bind_one(addr, false)?)]);
    }
    if addr.port() != 0 {
        // Fails while anyone listens on the address; released before the group binds.
        drop(bind_one(addr, false)?);
    }
    let first = bind_one(addr, true)?;
    // For port 0 the first bind chose the port (never one another group shares).
    let addr = first.local_addr()?;
    let mut group = vec![tune(first)];
    for _ in 1..count {
        group.push(tune(bind_one(addr, true)?));
    }
    Ok(group)
}

/// A non-blocking socket listening on `addr`.
fn bind_one(addr: SocketAddr, reuse_port: bool) -> std::io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    // Restarts must not wait for the previous process's TIME_WAIT sockets.
    socket.set_reuse_address(true)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}

fn tune(listener: TcpListener) -> TcpListener {
    // Linux copies these to every accepted socket: six system calls fewer per client.
    tune_socket(SockRef::from(&listener));
    listener
}

/// Sets the socket options both legs need: TCP_NODELAY (frames are latency-sensitive,
/// and Nagle plus delayed ACK stalls a splice of compressed traffic), keepalive and
/// TCP_USER_TIMEOUT. Failures leave the defaults, which still work.
pub fn tune_socket(sock: SockRef<'_>) {
    let _ = sock.set_tcp_nodelay(true);
    let keepalive = TcpKeepalive::new()
        .with_time(TCP_KEEPALIVE_IDLE)
        .with_interval(TCP_KEEPALIVE_INTERVAL)
        .with_retries(TCP_KEEPALIVE_RETRIES);
    let _ = sock.set_tcp_keepalive(&keepalive);
    #[cfg(any(target_os = "linux", target_os = "android"))]
    let _ = sock.set_tcp_user_timeout(Some(TCP_USER_TIMEOUT));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loopback(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn one_worker_binds_one_socket_and_several_share_one_port() {
        let one = bind_group(loopback(0), 1).unwrap();
        assert_eq!(one.len(), 1);
        let group = bind_group(loopback(0), 3).unwrap();
        assert_eq!(group.len(), 3);
        let port = group[0].local_addr().unwrap().port();
        assert_ne!(port, 0);
        for l in &group {
            assert_eq!(l.local_addr().unwrap().port(), port);
        }
    }

    #[test]
    fn a_group_refuses_a_port_someone_listens_on() {
        // A plain listener, as another program (or another wsgate with one worker) has.
        let taken = TcpListener::bind(loopback(0)).unwrap();
        let addr = taken.local_addr().unwrap();
        let err = bind_group(addr, 2).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);
        // Nor can anyone join a port a group holds without SO_REUSEPORT: a second wsgate
        // with several workers fails at its probe.
        let group = bind_group(loopback(0), 2).unwrap();
        let addr = group[0].local_addr().unwrap();
        assert_eq!(
            bind_group(addr, 2).unwrap_err().kind(),
            std::io::ErrorKind::AddrInUse
        );
        assert_eq!(
            bind_group(addr, 1).unwrap_err().kind(),
            std::io::ErrorKind::AddrInUse
        );
    }

    #[test]
    fn listeners_are_non_blocking_and_accepted_sockets_inherit_nodelay() {
        let group = bind_group(loopback(0), 2).unwrap();
        let addr = group[0].local_addr().unwrap();
        // Nothing is waiting: a blocking socket would hang here.
        for l in &group {
            assert_eq!(
                l.accept().unwrap_err().kind(),
                std::io::ErrorKind::WouldBlock
            );
        }
        let _client = std::net::TcpStream::connect(addr).unwrap();
        // The connection went to one socket of the group; find it (bounded: the
        // handshake completed before connect returned).
        let accepted = (0..1000)
            .find_map(|_| group.iter().find_map(|l| l.accept().ok()))
            .map(|(s, _)| s)
            .unwrap();
        assert!(SockRef::from(&accepted).tcp_nodelay().unwrap());
        assert!(SockRef::from(&accepted).keepalive().unwrap());
    }
}
