//! `loadgen relay`: the least a TCP proxy can do, as a ceiling for the
//! small-request rows of `bench/run`.
//!
//! One thread per `--threads`, each with its own epoll and its own
//! listening socket on the same address (`SO_REUSEPORT`: the kernel spreads
//! the clients evenly, and no thread is woken for another's client).
//! A client is accepted, its backend connected with a blocking `connect`
//! (on loopback it completes in the call), and from then on each readable
//! side is read once into a stack buffer and written whole to the other:
//! per request a read and a write each way plus a share of `epoll_wait`,
//! no allocation, no timer, no state shared between threads. It has none of
//! a real proxy's duties (limits, timeouts, health, pause, logging, a
//! backend that is slow to accept), so no proxy doing the same syscalls can
//! spend less CPU per request: interlude measured against it shows how much
//! is left to win above the kernel's share.
//!
//! A write the peer cannot take at once blocks the thread in `poll` until it
//! can (fine for the bench's loads: 64-byte requests, and bulk rows are not
//! what it bounds).

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use rustix::event::epoll::{self, CreateFlags, EventData, EventFlags};
use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::io::Errno;
use rustix::net::SocketFlags;

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
    rustix::net::listen(&socket, 4096)?;
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
            Err(_) => return,
        };
        let Ok(server) = TcpStream::connect(backend) else {
            continue;
        };
        if server.set_nonblocking(true).is_err() {
            continue;
        }
        let server = OwnedFd::from(server);
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
        match rustix::io::write(to, data) {
            Ok(n) => data = &data[n..],
            Err(Errno::INTR) => {}
            Err(Errno::AGAIN) => {
                let mut fds = [PollFd::from_borrowed_fd(to.as_fd(), PollFlags::OUT)];
                if rustix::event::poll(&mut fds, None).is_err() {
                    return false;
                }
            }
            Err(_) => return false,
        }
    }
    true
}
