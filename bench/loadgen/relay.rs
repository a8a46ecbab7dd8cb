//! `loadgen relay`: the least a TCP proxy can do, as a ceiling for the
//! small-request rows of `bench/run`.
//!
//! One thread per `--threads`, each with its own epoll and its own
//! listening socket on the same address (`SO_REUSEPORT`: the kernel spreads
//! the clients about evenly, by a hash of each one's address and port, and
//! no thread is woken for another's client). A client is accepted, its
//! backend connected with a blocking `connect` (on loopback it completes in
//! the call), and from then on each readable side is read once into a stack
//! buffer and written whole to the other: per request a read and a write
//! each way plus a share of `epoll_wait`, no allocation per request, no
//! timer, no state shared between threads. It has none of a real proxy's
//! duties (limits, timeouts, health, pause, logging, a backend that is slow
//! to accept), so no proxy doing the same syscalls can spend less CPU per
//! small request: interlude measured against it shows how much is left to
//! win above the kernel's share.
//!
//! Two shortcuts make it a ceiling for small requests only, not for bulk
//! transfers or for every client:
//! - a write the peer cannot take at once blocks the whole thread in `poll`
//!   until it can (the bench's small-request loads never fill a socket);
//! - an end of stream on either side closes both at once, which could cut
//!   off a reply still on its way after a half-close (the bench's clients
//!   never half-close).

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use rustix::event::epoll::{self, CreateFlags, EventData, EventFlags};
use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::io::Errno;
use rustix::net::{SendFlags, SocketFlags};

#[derive(clap::Args)]
pub struct Args {
    /// Address to listen on.
    #[arg(long)]
    pub listen: SocketAddr,
    /// The backend every client is relayed to.
    #[arg(long)]
    pub backend: SocketAddr,
    /// Exit by itself after this many seconds.
    #[arg(long, default_value_t = 1800)]
    pub lifetime: u64,
}

/// The listening socket's key in its thread's epoll (descriptors are below it).
const LISTENER: u64 = u64::MAX;

pub fn run(args: Args, threads: usize) {
    // All bound before any thread starts, so the port is listening on
    // every socket when the caller sees it listening.
    let listeners: Vec<TcpListener> = (0..threads)
        .map(|_| listen(args.listen).unwrap_or_else(|e| die(&format!("listen on {}: {e}", args.listen))))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(args.lifetime);
    std::thread::scope(|scope| {
        for listener in &listeners {
            scope.spawn(move || {
                if let Err(e) = relay(listener, args.backend, deadline) {
                    die(&format!("relay: {e}"));
                }
            });
        }
    });
}

/// A non-blocking listening socket on `address` that shares the port.
fn listen(address: SocketAddr) -> std::io::Result<TcpListener> {
    use rustix::net::{AddressFamily, SocketType, ipproto, sockopt};
    let family = if address.is_ipv4() {
        AddressFamily::INET
    } else {
        AddressFamily::INET6
    };
    let socket = rustix::net::socket_with(
        family,
        SocketType::STREAM,
        SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
        Some(ipproto::TCP),
    )?;
    sockopt::set_socket_reuseaddr(&socket, true)?;
    sockopt::set_socket_reuseport(&socket, true)?;
    rustix::net::bind(&socket, &address)?;
    rustix::net::listen(&socket, crate::common::BACKEND_BACKLOG as i32)?;
    Ok(TcpListener::from(socket))
}

fn die(what: &str) -> ! {
    eprintln!("loadgen relay: {what}");
    std::process::exit(1)
}

/// One thread's loop until `deadline`.
fn relay(listener: &TcpListener, backend: SocketAddr, deadline: Instant) -> std::io::Result<()> {
    let ep = epoll::create(CreateFlags::CLOEXEC)?;
    epoll::add(&ep, listener, EventData::new_u64(LISTENER), EventFlags::IN)?;
    // Indexed by descriptor: this thread's sockets and each one's peer.
    let mut sockets: Vec<Option<(OwnedFd, RawFd)>> = Vec::new();
    let mut events: Vec<epoll::Event> = Vec::with_capacity(256);
    let mut buf = [0u8; 16 * 1024];
    let tick = Timespec {
        tv_sec: 1,
        tv_nsec: 0,
    };
    while Instant::now() < deadline {
        events.clear();
        match epoll::wait(&ep, rustix::buffer::spare_capacity(&mut events), Some(&tick)) {
            Ok(_) | Err(Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
        // An event for a socket closed earlier in this batch finds its slot
        // empty; if an accept in the batch reused the descriptor, the read
        // below is on the new socket and finds data or EAGAIN. Either way no
        // byte goes astray.
        for event in &events {
            let key = event.data.u64();
            if key == LISTENER {
                accept(listener, backend, &ep, &mut sockets);
                continue;
            }
            let fd = key as RawFd;
            let Some(Some((socket, peer))) = sockets.get(fd as usize) else {
                continue;
            };
            let peer = *peer;
            let forwarded = match rustix::io::read(socket, &mut buf) {
                Ok(0) => false,
                Ok(n) => match sockets.get(peer as usize) {
                    Some(Some((to, _))) => write_all(to, &buf[..n]),
                    _ => false,
                },
                Err(Errno::AGAIN | Errno::INTR) => true,
                Err(_) => false,
            };
            if !forwarded {
                // Dropping both closes them, which takes them off the epoll.
                sockets[fd as usize] = None;
                if let Some(slot) = sockets.get_mut(peer as usize) {
                    *slot = None;
                }
            }
        }
    }
    Ok(())
}

/// Accepts what is queued and connects each client to the backend.
fn accept(
    listener: &TcpListener,
    backend: SocketAddr,
    ep: &OwnedFd,
    sockets: &mut Vec<Option<(OwnedFd, RawFd)>>,
) {
    loop {
        let client = match rustix::net::accept_with(listener, SocketFlags::NONBLOCK | SocketFlags::CLOEXEC) {
            Ok(client) => client,
            Err(Errno::INTR | Errno::CONNABORTED) => continue,
            Err(Errno::AGAIN) => return,
            Err(e) => {
                // Out of descriptors, say: the listener stays readable, so
                // pause rather than spin on it.
                eprintln!("loadgen relay: accept: {e}");
                std::thread::sleep(Duration::from_millis(10));
                return;
            }
        };
        let server = match TcpStream::connect(backend).and_then(|server| {
            server.set_nonblocking(true)?;
            Ok(server)
        }) {
            Ok(server) => OwnedFd::from(server),
            Err(e) => {
                eprintln!("loadgen relay: connect to {backend}: {e}");
                continue;
            }
        };
        // Not fatal: without it a small write may wait for an ACK (Nagle),
        // which the bench would show as latency.
        let _ = rustix::net::sockopt::set_tcp_nodelay(&client, true);
        let _ = rustix::net::sockopt::set_tcp_nodelay(&server, true);
        let (c, s) = (client.as_raw_fd(), server.as_raw_fd());
        let high = c.max(s) as usize;
        if sockets.len() <= high {
            sockets.resize_with(high + 1, || None);
        }
        let ok = epoll::add(ep, &client, EventData::new_u64(c as u64), EventFlags::IN).is_ok()
            && epoll::add(ep, &server, EventData::new_u64(s as u64), EventFlags::IN).is_ok();
        if ok {
            sockets[c as usize] = Some((client, s));
            sockets[s as usize] = Some((server, c));
        }
    }
}

/// Writes all of `data`, waiting in `poll` while the socket is full.
fn write_all(to: &OwnedFd, mut data: &[u8]) -> bool {
    while !data.is_empty() {
        // NOSIGNAL: a peer gone is an error here, not a SIGPIPE.
        match rustix::net::send(to, data, SendFlags::NOSIGNAL) {
            Ok(n) => data = &data[n..],
            Err(Errno::INTR) => {}
            Err(Errno::AGAIN) => {
                let mut fds = [PollFd::from_borrowed_fd(to.as_fd(), PollFlags::OUT)];
                match rustix::event::poll(&mut fds, None) {
                    Ok(_) | Err(Errno::INTR) => {}
                    Err(_) => return false,
                }
            }
            Err(_) => return false,
        }
    }
    true
}
