//! Listening sockets and systemd: socket activation (descriptors passed in
//! `LISTEN_FDS`, adopted by the address they are bound to, never bound
//! again, UNIX socket files left alone), the fd store (`FDSTORE=1` with
//! `FDNAME=` for every listener, seen by a fake `NOTIFY_SOCKET` that takes
//! the descriptors as systemd does), a restart during which clients queue
//! on the stored sockets and are served by the next process, and reloads
//! that store a new listener and take a closed one out of the store.

use crate::common;

use std::ffi::OsStr;
use std::fs;
use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::time::Duration;

use common::notify::{Message, Notify};
use common::program;
use common::*;

/// A config with a TCP proxy `t` on `tcp` and a UNIX proxy `u` on `unix`,
/// both to the echo `server`.
fn two_listeners(dir: &Path, tcp: &str, unix: &str, server: &TestServer) -> String {
    format!(
        "{}proxies:\n{}{}",
        preamble(dir, "5s"),
        proxy_entry("t", tcp, &[server.address()], ""),
        proxy_entry("u", unix, &[server.address()], "")
    )
}

/// (device, inode) of the file at `path`.
fn identity(path: &Path) -> (u64, u64) {
    let meta = fs::symlink_metadata(path).unwrap_or_else(|e| panic!("stat {}: {e}", path.display()));
    (meta.dev(), meta.ino())
}

/// The inode of the socket `fd` (what `/proc/PID/fd` links show as `socket:[N]`).
fn socket_inode(fd: RawFd) -> u64 {
    fs::metadata(format!("/proc/self/fd/{fd}"))
        .unwrap_or_else(|e| panic!("stat fd {fd}: {e}"))
        .ino()
}

/// Whether process `pid` has a descriptor open on the socket with `inode`.
fn holds_socket(pid: i32, inode: u64) -> bool {
    let wanted = format!("socket:[{inode}]");
    let Ok(entries) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    entries
        .flatten()
        .any(|entry| fs::read_link(entry.path()).is_ok_and(|link| link.to_string_lossy() == wanted))
}

/// A client connected (and its bytes sent) while nobody accepts: the
/// connection waits in the listening socket's backlog.
fn queued_client(endpoint: &Endpoint, msg: &[u8], when: &str) -> Stream {
    let mut client = endpoint.connect().unwrap_or_else(|e| {
        panic!(
            "{when}: connecting to {} must queue, not fail: {e}",
            endpoint.config()
        )
    });
    client.set_timeouts(WAIT);
    client
        .write_all(msg)
        .unwrap_or_else(|e| panic!("{when}: write to the queued connection: {e}"));
    client
}

/// Reads the echo of `msg` on a client that was queued before a daemon ran.
fn expect_echo(daemon: &Daemon, client: &mut Stream, msg: &[u8], what: &str) {
    match read_exactly(client, msg.len()) {
        Ok(reply) if reply == msg => {}
        Ok(reply) => daemon.fail(&format!(
            "{what}: echoed {:?}, sent {:?}",
            String::from_utf8_lossy(&reply),
            String::from_utf8_lossy(msg)
        )),
        Err(e) => daemon.fail(&format!("{what}: no echo: {e}")),
    }
}

/// Socket activation: the test binds a TCP and a UNIX listener itself and
/// passes them (with one socket the config does not have) as descriptors
/// 3, 4, 5. Clients that connected before the daemon started are served;
/// the daemon binds nothing (the UNIX socket file keeps its inode, a second
/// bind of the TCP port would fail), closes the unknown socket, and leaves
/// the UNIX socket file in place when it stops.
#[test]
fn socket_activation_adopts_tcp_and_unix_listeners_by_address() {
    let dir = tempdir();
    let server = TestServer::echo_tcp();
    let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
    let tcp_addr = tcp.local_addr().unwrap();
    let path = dir.path().join("u.sock");
    let unix = UnixListener::bind(&path).unwrap();
    let unix_file = identity(&path);
    let extra = TcpListener::bind("127.0.0.1:0").unwrap();
    let extra_inode = socket_inode(extra.as_raw_fd());
    let config = write_config(
        dir.path(),
        &two_listeners(
            dir.path(),
            &format!("tcp://{tcp_addr}"),
            &format!("unix:{}", path.display()),
            &server,
        ),
    );

    let tcp_endpoint = Endpoint::Tcp(tcp_addr);
    let unix_endpoint = Endpoint::Unix(path.clone());
    let mut early_tcp = queued_client(&tcp_endpoint, b"queued on tcp", "before the daemon");
    let mut early_unix = queued_client(&unix_endpoint, b"queued on unix", "before the daemon");

    let mut daemon = Daemon::start_with_listen_fds(
        &config,
        &[tcp.as_raw_fd(), unix.as_raw_fd(), extra.as_raw_fd()],
        &[("LISTEN_FDNAMES", Some("web:local:spare"))],
    );
    daemon.wait_for_line("started: ", WAIT);
    daemon.wait_for_line("systemd passed 3 listening socket(s)", WAIT);
    expect_echo(
        &daemon,
        &mut early_tcp,
        b"queued on tcp",
        "TCP client queued before the start",
    );
    expect_echo(
        &daemon,
        &mut early_unix,
        b"queued on unix",
        "UNIX client queued before the start",
    );
    assert_echo(&mut tcp_endpoint.must_connect(), b"a new TCP client");
    assert_echo(&mut unix_endpoint.must_connect(), b"a new UNIX client");
    assert_eq!(
        identity(&path),
        unix_file,
        "the daemon replaced the UNIX socket file"
    );

    let closed = daemon.wait_for_line("closed the inherited socket \"spare\"", WAIT);
    assert!(
        closed.contains(&format!("tcp://{}", extra.local_addr().unwrap())),
        "{closed}"
    );
    if holds_socket(daemon.pid(), extra_inode) {
        daemon.fail("the daemon still holds the socket no listener took");
    }
    if !holds_socket(daemon.pid(), socket_inode(tcp.as_raw_fd())) {
        daemon.fail("the daemon does not hold the passed TCP socket");
    }

    daemon.signal(libc::SIGTERM);
    let status = daemon.wait_exit(WAIT);
    assert_eq!(status.code(), Some(0), "exit status {status}");
    assert!(
        path.exists(),
        "the daemon removed the UNIX socket file systemd passed it"
    );
    assert_eq!(identity(&path), unix_file);
    // The sockets are still the test's (systemd's): clients queue again.
    drop(queued_client(&tcp_endpoint, b"x", "after the daemon stopped"));
    drop(queued_client(&unix_endpoint, b"x", "after the daemon stopped"));
}

// ---------------------------------------------------------------------------
// The fd store, as the fake NOTIFY_SOCKET sees it

/// The `FDSTORE=1` messages among `messages`, by name, each checked: one
/// descriptor, sent by `pid`.
fn stored(daemon: &Daemon, messages: Vec<Message>) -> Vec<(String, OwnedFd)> {
    let mut stored = Vec::new();
    for mut message in messages.into_iter().filter(|m| m.has_line("FDSTORE=1")) {
        if message.fds.len() != 1 || message.pid != daemon.pid() {
            daemon.fail(&format!(
                "FDSTORE message {:?} carries {} descriptors from pid {} (daemon: {})",
                message.text,
                message.fds.len(),
                message.pid,
                daemon.pid()
            ));
        }
        let name = message
            .fd_name()
            .unwrap_or_else(|| daemon.fail(&format!("FDSTORE without FDNAME: {:?}", message.text)))
            .to_string();
        stored.push((name, message.fds.remove(0)));
    }
    stored
}

/// The address a socket is bound to, as a listen address.
fn bound_address(fd: &OwnedFd) -> String {
    let local = rustix::net::getsockname(fd).expect("getsockname");
    if let Ok(ip) = SocketAddr::try_from(local.clone()) {
        return format!("tcp://{ip}");
    }
    let unix = rustix::net::SocketAddrUnix::try_from(local).expect("a TCP or UNIX socket");
    format!(
        "unix:{}",
        String::from_utf8_lossy(unix.path_bytes().expect("a path"))
    )
}

/// The name the daemon stores a listener on `address` under: the address
/// with ':' and '%' percent-encoded.
fn fd_name(address: &str) -> String {
    address.replace('%', "%25").replace(':', "%3A")
}

/// The fd store across a restart: the daemon stores each listener
/// (`FDSTORE=1`, `FDNAME=` its address, the socket itself, from its own
/// pid) before `READY=1`; it stops, the test keeps the stored sockets (as
/// systemd does), and clients that connect while no daemon runs queue on
/// them (the UNIX socket file stays for them); the next daemon gets the
/// sockets back in `LISTEN_FDS` (with a stale one the config no longer
/// has, which it closes and removes from the store) and serves the
/// queued clients.
#[test]
fn stored_listeners_keep_clients_queued_across_a_restart() {
    let dir = tempdir();
    let server = TestServer::echo_tcp();
    let tcp_addr = free_tcp_addr();
    let path = dir.path().join("u.sock");
    let tcp_listen = format!("tcp://{tcp_addr}");
    let unix_listen = format!("unix:{}", path.display());
    let config = write_config(
        dir.path(),
        &two_listeners(dir.path(), &tcp_listen, &unix_listen, &server),
    );
    let mut notify = Notify::bind(dir.path());
    let notify_path = notify.path().to_string();
    let env = [("NOTIFY_SOCKET", Some(notify_path.as_str()))];

    let mut first = Daemon::start_with_env(dir.path(), &fs::read_to_string(&config).unwrap(), &env);
    let before_ready = notify.until_line(&first, "READY=1");
    let mut store = stored(&first, before_ready);
    store.sort_by(|a, b| a.0.cmp(&b.0));
    let names: Vec<&str> = store.iter().map(|(name, _)| name.as_str()).collect();
    let mut expected = vec![fd_name(&tcp_listen), fd_name(&unix_listen)];
    expected.sort();
    assert_eq!(names, expected, "stored names (seen: {:?})", notify.seen);
    for (name, fd) in &store {
        assert_eq!(fd_name(&bound_address(fd)), *name, "the socket stored as {name}");
    }
    let unix_file = identity(&path);

    first.signal(libc::SIGTERM);
    let status = first.wait_exit(WAIT);
    assert_eq!(status.code(), Some(0), "exit status {status}");
    assert!(
        path.exists(),
        "the stopping daemon removed the socket file of a stored UNIX listener"
    );

    // No daemon runs: the stored sockets queue new clients.
    let mut waiting_tcp = queued_client(&Endpoint::Tcp(tcp_addr), b"waited on tcp", "during the restart");
    let mut waiting_unix = queued_client(
        &Endpoint::Unix(path.clone()),
        b"waited on unix",
        "during the restart",
    );

    // A socket stored for an address the config has since dropped.
    let stale = TcpListener::bind("127.0.0.1:0").unwrap();
    let stale_name = fd_name(&format!("tcp://{}", stale.local_addr().unwrap()));
    let mut fds: Vec<RawFd> = store.iter().map(|(_, fd)| fd.as_raw_fd()).collect();
    fds.push(stale.as_raw_fd());
    let mut names: Vec<String> = store.iter().map(|(name, _)| name.clone()).collect();
    names.push(stale_name.clone());
    let listen_fdnames = names.join(":");
    let second = Daemon::start_with_listen_fds(
        &config,
        &fds,
        &[
            ("NOTIFY_SOCKET", Some(notify_path.as_str())),
            ("LISTEN_FDNAMES", Some(listen_fdnames.as_str())),
        ],
    );
    let messages = notify.until_line(&second, "READY=1");
    expect_echo(
        &second,
        &mut waiting_tcp,
        b"waited on tcp",
        "TCP client queued during the restart",
    );
    expect_echo(
        &second,
        &mut waiting_unix,
        b"waited on unix",
        "UNIX client queued during the restart",
    );
    assert_eq!(identity(&path), unix_file, "the UNIX socket was bound again");

    let removal = format!("FDSTOREREMOVE=1\nFDNAME={stale_name}\n");
    if !messages.iter().any(|m| m.text == removal) {
        second.fail(&format!(
            "no {removal:?} for the stale socket; seen: {:?}",
            notify.seen
        ));
    }
    if holds_socket(second.pid(), socket_inode(stale.as_raw_fd())) {
        second.fail("the daemon still holds the stale socket");
    }
    // It stores its listeners again (systemd ignores a socket it holds).
    let again = stored(&second, messages);
    assert_eq!(again.len(), 2, "seen: {:?}", notify.seen);
}

/// A reload that binds a new address stores that socket; one that drops an
/// address takes its socket out of the store (`FDSTOREREMOVE=1`, `FDNAME=`).
#[test]
fn reload_stores_a_new_listener_and_removes_a_closed_one() {
    let dir = tempdir();
    let server = TestServer::echo_tcp();
    let first_addr = free_tcp_addr();
    let second_addr = free_tcp_addr();
    let first_listen = format!("tcp://{first_addr}");
    let second_listen = format!("tcp://{second_addr}");
    let one = format!(
        "{}proxies:\n{}",
        preamble(dir.path(), "5s"),
        proxy_entry("p", &first_listen, &[server.address()], "")
    );
    let both = format!(
        "{one}{}",
        proxy_entry("q", &second_listen, &[server.address()], "")
    );
    let only_second = format!(
        "{}proxies:\n{}",
        preamble(dir.path(), "5s"),
        proxy_entry("q", &second_listen, &[server.address()], "")
    );
    let mut notify = Notify::bind(dir.path());
    let notify_path = notify.path().to_string();
    let daemon = Daemon::start_with_env(dir.path(), &one, &[("NOTIFY_SOCKET", Some(notify_path.as_str()))]);
    let at_start = stored(&daemon, notify.until_line(&daemon, "READY=1"));
    assert_eq!(at_start.len(), 1, "seen: {:?}", notify.seen);
    let config = daemon.config.clone().unwrap();

    replace_file(&config, &both);
    wait_generation(dir.path(), 2);
    let messages = notify.until_line(&daemon, "READY=1");
    let added = stored(&daemon, messages);
    match added.as_slice() {
        [(name, fd)] => {
            assert_eq!(*name, fd_name(&second_listen), "seen: {:?}", notify.seen);
            assert_eq!(bound_address(fd), second_listen);
        }
        _ => daemon.fail(&format!(
            "expected one FDSTORE for {second_listen}; seen: {:?}",
            notify.seen
        )),
    }

    replace_file(&config, &only_second);
    wait_generation(dir.path(), 3);
    let messages = notify.until_line(&daemon, "READY=1");
    let removal = format!("FDSTOREREMOVE=1\nFDNAME={}\n", fd_name(&first_listen));
    if !messages.iter().any(|m| m.text == removal) {
        daemon.fail(&format!("no {removal:?}; seen: {:?}", notify.seen));
    }
    assert!(
        stored(&daemon, messages).is_empty(),
        "a reload that binds nothing stored a socket: {:?}",
        notify.seen
    );
}

/// The `MAINPID=` message among `messages`: where it is, the pid it names
/// and the pid that sent it.
fn main_pid_announced(messages: &[Message]) -> Option<(usize, i32, i32)> {
    messages.iter().enumerate().find_map(|(at, m)| {
        let named = m.text.lines().find_map(|l| l.strip_prefix("MAINPID="))?;
        Some((at, named.parse().ok()?, m.pid))
    })
}

/// During an upgrade systemd hears, in this order: `MAINPID=` the new pid
/// from the old process, then `READY=1` and watchdog pings from the new
/// one (its `WATCHDOG_PID`, if any, is not the old pid's); the old process
/// never says `STOPPING=1` (the service goes on).
#[test]
fn an_upgrade_gives_systemd_the_new_main_pid_then_ready_and_pings_from_it() {
    let dir = tempdir();
    let server = TestServer::echo_tcp();
    // A UNIX listener: it goes to the fd store (a port-0 one would not).
    let listen = format!("unix:{}", dir.path().join("p.sock").display());
    let yaml = one_proxy_config(dir.path(), "5s", &listen, &[server.address()], "");
    let mut notify = Notify::bind(dir.path());
    let notify_path = notify.path().to_string();
    // Pings every second.
    let env = [
        ("NOTIFY_SOCKET", Some(notify_path.as_str())),
        ("WATCHDOG_USEC", Some("2000000")),
    ];
    let mut old = Daemon::start_with_env(dir.path(), &yaml, &env);
    let ready = notify.until_line(&old, "READY=1");
    assert!(ready.iter().any(|m| m.has_line("READY=1") && m.pid == old.pid()));
    let config = dir.path().join("interlude.yaml");

    let out = run_cli([OsStr::new("upgrade"), OsStr::new("-c"), config.as_os_str()]);
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    let upgraded = notify.until_line(&old, "READY=1");
    let (mainpid_at, new_pid, sender) = main_pid_announced(&upgraded)
        .unwrap_or_else(|| old.fail(&format!("no MAINPID= before READY=1: {:?}", notify.seen)));
    assert_eq!(sender, old.pid(), "MAINPID= comes from the old process");
    let _new = KillOnDrop(new_pid);
    assert_ne!(new_pid, old.pid());
    let ready = upgraded.last().expect("READY=1");
    assert_eq!(
        ready.pid, new_pid,
        "READY=1 comes from the new process: {:?}",
        notify.seen
    );
    assert!(
        mainpid_at < upgraded.len() - 1,
        "MAINPID= before READY=1: {:?}",
        notify.seen
    );
    // systemd (NotifyAccess=main) would drop what the new process says
    // before it is the main one: its fd store notes come after MAINPID=.
    let stored_by_new = upgraded
        .iter()
        .position(|m| m.pid == new_pid && m.has_line("FDSTORE=1"));
    assert!(
        stored_by_new.is_some_and(|at| at > mainpid_at),
        "the new process stores its listener after MAINPID=: {:?}",
        notify.seen
    );
    // Pings from the new process.
    let pings = notify.until_line(&old, "WATCHDOG=1");
    assert_eq!(pings.last().map(|m| m.pid), Some(new_pid), "{:?}", notify.seen);
    let exited = old.wait_exit(WAIT);
    assert!(exited.success(), "{exited:?}");
    // Whatever else comes for a while (pings go on every second), none
    // of it says the service stops.
    let until = std::time::Instant::now() + Duration::from_secs(3);
    while std::time::Instant::now() < until {
        let Some(message) = notify.recv(Duration::from_millis(1500)) else {
            break;
        };
        assert!(
            !message.has_line("STOPPING=1"),
            "STOPPING=1 from pid {}: {:?}",
            message.pid,
            notify.seen
        );
        if message.has_line("WATCHDOG=1") {
            assert_eq!(message.pid, new_pid, "a ping from another process");
        }
    }
    assert!(
        !notify.seen.iter().any(|m| m.contains("STOPPING=1")),
        "{:?}",
        notify.seen
    );
}

/// A listener handed over by an upgrade that the new process's config no
/// longer has is closed and taken out of the fd store (`FDSTOREREMOVE=1`),
/// by the new process once it is the main one, so systemd does not keep a
/// socket nobody serves.
#[test]
fn an_upgrade_takes_a_dropped_listener_out_of_the_fd_store() {
    let dir = tempdir();
    let server = TestServer::echo_tcp();
    let a = format!("unix:{}", dir.path().join("a.sock").display());
    let b = format!("unix:{}", dir.path().join("b.sock").display());
    let both = format!(
        "{}proxies:\n{}{}",
        preamble(dir.path(), "2s"),
        proxy_entry("a", &a, &[server.address()], ""),
        proxy_entry("b", &b, &[server.address()], "")
    );
    let config = write_config(dir.path(), &both);
    let only_a = format!(
        "{}proxies:\n{}",
        preamble(dir.path(), "2s"),
        proxy_entry("a", &a, &[server.address()], "")
    );
    let program = program::install(dir.path());
    let mut notify = Notify::bind(dir.path());
    let notify_path = notify.path().to_string();
    let env = [("NOTIFY_SOCKET", Some(notify_path.as_str()))];
    let mut old = Daemon::spawn_program(
        &program,
        [OsStr::new("run"), OsStr::new("-c"), config.as_os_str()],
        &env,
        None,
    );
    old.config = Some(config.clone());
    let started = notify.until_line(&old, "READY=1");
    assert!(
        started
            .iter()
            .any(|m| m.has_line("FDSTORE=1") && m.fd_name() == Some(fd_name(&b).as_str())),
        "the old process stores b: {:?}",
        notify.seen
    );
    // The new process reads a config of its own, without b.
    program::replace_with_binary_on(&program, dir.path(), &only_a);

    let out = run_cli([OsStr::new("upgrade"), OsStr::new("-c"), config.as_os_str()]);
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    let upgraded = notify.until_line(&old, "READY=1");
    let (main_pid_at, new_pid, _) =
        main_pid_announced(&upgraded).unwrap_or_else(|| old.fail(&format!("no MAINPID=: {:?}", notify.seen)));
    let _new = KillOnDrop(new_pid);
    let removed = upgraded
        .iter()
        .position(|m| m.has_line("FDSTOREREMOVE=1") && m.fd_name() == Some(fd_name(&b).as_str()));
    assert!(
        removed.is_some_and(|at| at > main_pid_at),
        "b taken out of the store after MAINPID=: {:?}",
        notify.seen
    );
    assert_eq!(upgraded[removed.unwrap_or(0)].pid, new_pid, "{:?}", notify.seen);
    assert!(
        !upgraded
            .iter()
            .any(|m| m.has_line("FDSTOREREMOVE=1") && m.fd_name() == Some(fd_name(&a).as_str())),
        "a stays in the store: {:?}",
        notify.seen
    );
}
