//! The PROXY protocol against real implementations: nginx (`listen ...
//! proxy_protocol`) behind `send_proxy: v1` and `v2`, in mode tcp and mode
//! http, sees the test client's address; HAProxy (`send-proxy-v2`) in
//! front of `accept_proxy` gets the real client into `X-Forwarded-For`;
//! untrusted sources, malformed and missing headers are closed, counted in
//! `interlude_proxy_protocol_errors_total` and never reach a backend; a
//! paused proxy holds a client after reading its header and sends the
//! header's address on at the resume; a UNIX socket listener takes the
//! header from every client.
//!
//! The test client connects from 127.0.0.2, so that the address a backend
//! is told differs from interlude's own (127.0.0.1). nginx and HAProxy are
//! started here, on ephemeral ports with their own temp configs; a test
//! that needs one that is not installed says so and passes.

use crate::common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::http::*;
use common::*;

const NGINX: &str = "/usr/sbin/nginx";
const HAPROXY: &str = "/usr/sbin/haproxy";

/// Whether `binary` is installed; if not, says that the test is skipped.
fn installed(binary: &str, test: &str) -> bool {
    let found = Path::new(binary).exists();
    if !found {
        eprintln!("{test}: skipped, {binary} is not installed (Debian: nginx-light, haproxy)");
    }
    found
}

/// A TCP connection to `to` from `source` (another loopback address).
fn connect_from(source: &str, to: SocketAddr) -> TcpStream {
    use rustix::net::{AddressFamily, SocketType, bind, connect, socket};
    let fd = socket(AddressFamily::INET, SocketType::STREAM, None).expect("socket");
    let from: SocketAddr = format!("{source}:0").parse().expect("source address");
    bind(&fd, &from).unwrap_or_else(|e| panic!("bind {from}: {e}"));
    connect(&fd, &to).unwrap_or_else(|e| panic!("connect {to} from {source}: {e}"));
    let stream = TcpStream::from(fd);
    stream.set_read_timeout(Some(WAIT)).expect("read timeout");
    stream.set_write_timeout(Some(WAIT)).expect("write timeout");
    stream
}

fn tcp_addr(endpoint: &Endpoint) -> SocketAddr {
    match endpoint {
        Endpoint::Tcp(addr) => *addr,
        Endpoint::Unix(path) => panic!("{} is not a TCP listener", path.display()),
    }
}

/// A program this test started, killed (by its pid) when dropped.
struct Started {
    child: Child,
    name: &'static str,
}

impl Drop for Started {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Started {
    fn spawn(name: &'static str, command: &mut Command, port: SocketAddr) -> Started {
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("start {name}: {e}"));
        let mut started = Started { child, name };
        poll_until(&format!("{name} listening on {port}"), WAIT, || {
            if let Ok(Some(status)) = started.child.try_wait() {
                panic!("{} exited at start: {status}", started.name);
            }
            TcpStream::connect(port).ok()
        });
        started
    }
}

/// nginx answering every request with the PROXY header's client address
/// (`ADDR PORT`), on `listen ... proxy_protocol`.
fn start_nginx(dir: &Path) -> (Started, SocketAddr) {
    let prefix = dir.join("nginx");
    std::fs::create_dir_all(prefix.join("tmp")).expect("nginx prefix");
    let port = free_tcp_addr();
    let p = prefix.display();
    let conf = format!(
        "worker_processes 1;\nerror_log {p}/error.log info;\npid {p}/nginx.pid;\nevents {{ worker_connections 64; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {p}/tmp/body;\n  proxy_temp_path {p}/tmp/proxy;\n\
         fastcgi_temp_path {p}/tmp/fastcgi;\n  uwsgi_temp_path {p}/tmp/uwsgi;\n  scgi_temp_path {p}/tmp/scgi;\n\
         server {{\n    listen {port} proxy_protocol;\n    location / {{ return 200 \"$proxy_protocol_addr $proxy_protocol_port\"; }}\n  }}\n}}\n"
    );
    let conf_path = prefix.join("nginx.conf");
    std::fs::write(&conf_path, conf).expect("nginx.conf");
    let mut command = Command::new(NGINX);
    command
        .arg("-e")
        .arg(prefix.join("error.log"))
        .arg("-p")
        .arg(&prefix)
        .arg("-c")
        .arg(&conf_path)
        // One process: killing it at the end leaves no worker behind.
        .args(["-g", "daemon off; master_process off;"]);
    (Started::spawn("nginx", &mut command, port), port)
}

/// `GET /` over `stream` (HTTP/1.0, so the answer ends at the close): the
/// response's body.
fn get_body(mut stream: TcpStream) -> String {
    stream
        .write_all(b"GET / HTTP/1.0\r\nHost: test\r\n\r\n")
        .expect("send the request");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).expect("read the answer");
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no head in {answer:?}"));
    assert!(
        head.starts_with("HTTP/1.") && head[8..].starts_with(" 200"),
        "{answer}"
    );
    body.to_string()
}

/// nginx behind `send_proxy: v1` and `v2`, mode tcp and mode http: the
/// address nginx reads from the header is the test client's (127.0.0.2
/// and its port), not interlude's.
#[test]
fn nginx_sees_the_client_behind_send_proxy() {
    if !installed(NGINX, "nginx_sees_the_client_behind_send_proxy") {
        return;
    }
    let dir = tempdir();
    let (_nginx, nginx) = start_nginx(dir.path());
    for mode in ["tcp", "http"] {
        for version in ["v1", "v2"] {
            let extra = format!("mode: {mode}\nsend_proxy: {version}");
            let yaml = one_proxy_config(
                dir.path(),
                "5s",
                "tcp://127.0.0.1:0",
                &[format!("tcp://{nginx}")],
                &extra,
            );
            let daemon = Daemon::start(dir.path(), &yaml);
            let listen = tcp_addr(&daemon.listen_addr("p"));
            let client = connect_from("127.0.0.2", listen);
            let port = client.local_addr().expect("local address").port();
            let seen = get_body(client);
            assert_eq!(
                seen,
                format!("127.0.0.2 {port}"),
                "mode {mode}, send_proxy {version}"
            );
            drop(daemon);
        }
    }
}

/// HAProxy (`send-proxy-v2`) in front of a mode http proxy with
/// `accept_proxy`: the backend's `X-Forwarded-For` is the client that
/// connected to HAProxy, not HAProxy.
#[test]
fn haproxy_in_front_gives_the_real_client() {
    if !installed(HAPROXY, "haproxy_in_front_gives_the_real_client") {
        return;
    }
    let dir = tempdir();
    let backend = HttpBackend::tcp("app", |_| Reply::ok("ok"));
    let extra = "mode: http\naccept_proxy: true\ntrusted_proxies: [127.0.0.1/32]";
    let yaml = one_proxy_config(dir.path(), "5s", "tcp://127.0.0.1:0", &[backend.address()], extra).replacen(
        "  level: info\n",
        "  level: info\n  access: true\n",
        1,
    );
    let daemon = Daemon::start(dir.path(), &yaml);
    let interlude = tcp_addr(&daemon.listen_addr("p"));
    let front = free_tcp_addr();
    let conf = format!(
        "global\n  maxconn 100\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\
         frontend f\n  bind {front}\n  default_backend b\nbackend b\n  server s {interlude} send-proxy-v2\n"
    );
    let conf_path = dir.path().join("haproxy.cfg");
    std::fs::write(&conf_path, conf).expect("haproxy.cfg");
    let _haproxy = Started::spawn(
        "haproxy",
        Command::new(HAPROXY).arg("-db").arg("-f").arg(&conf_path),
        front,
    );
    let client = connect_from("127.0.0.2", front);
    assert_eq!(get_body(client), "ok");
    let request = backend.wait_requests(1, WAIT).remove(0);
    assert_eq!(
        request.header("x-forwarded-for"),
        Some("127.0.0.2"),
        "{:?}",
        request.headers
    );
    assert_eq!(
        request.header("forwarded"),
        Some("for=127.0.0.2;proto=http;host=\"test\""),
        "{:?}",
        request.headers
    );
    // The access line names the client, not HAProxy.
    let access = daemon.wait_for_line(" access ", WAIT);
    assert!(access.contains(" client=127.0.0.2:"), "{access}");
    assert_eq!(proxy_protocol_errors(dir.path()), 0);
}

fn proxy_protocol_errors(dir: &Path) -> u64 {
    let (code, body) = http(dir, "GET", "/metrics");
    assert_eq!(code, 200, "{body}");
    let series = "interlude_proxy_protocol_errors_total{proxy=\"p\"}";
    body.lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in the metrics:\n{body}"))
}

/// Waits until the daemon closes `stream` (EOF or reset), failing after
/// `WAIT`; returns how long that took.
fn closed_within(mut stream: TcpStream) -> Duration {
    let started = Instant::now();
    let mut buf = [0u8; 64];
    match stream.read(&mut buf) {
        Ok(0) => started.elapsed(),
        Ok(n) => panic!("the daemon answered {:?}", String::from_utf8_lossy(&buf[..n])),
        Err(e) if is_closed_error(&e) => started.elapsed(),
        Err(e) => panic!("not closed within {WAIT:?}: {e}"),
    }
}

/// `accept_proxy` refuses: a valid header from a source outside
/// `trusted_proxies`, a malformed header from a trusted one, and a trusted
/// client that sends none within `connect_timeout` (1s). Each is closed,
/// counted, and never reaches the backend.
#[test]
fn accept_proxy_refuses_untrusted_malformed_and_missing_headers() {
    let dir = tempdir();
    let server = TestServer::echo_tcp();
    let extra = "accept_proxy: true\ntrusted_proxies: ['127.0.0.2/32', '::1']";
    let yaml = one_proxy_config(dir.path(), "5s", "tcp://127.0.0.1:0", &[server.address()], extra);
    let _daemon = Daemon::start(dir.path(), &yaml);
    let listen = tcp_addr(&_daemon.listen_addr("p"));
    let header = b"PROXY TCP4 198.51.100.7 127.0.0.1 4444 80\r\nhello";

    let mut untrusted = connect_from("127.0.0.1", listen);
    untrusted.write_all(header).expect("send");
    closed_within(untrusted);
    assert_eq!(proxy_protocol_errors(dir.path()), 1);

    let mut malformed = connect_from("127.0.0.2", listen);
    malformed
        .write_all(b"PROXY TCP4 198.51.100.7 127.0.0.1 4444\r\nhello")
        .expect("send");
    closed_within(malformed);
    assert_eq!(proxy_protocol_errors(dir.path()), 2);

    let mut not_proxy = connect_from("127.0.0.2", listen);
    not_proxy.write_all(b"GET / HTTP/1.1\r\n\r\n").expect("send");
    closed_within(not_proxy);
    assert_eq!(proxy_protocol_errors(dir.path()), 3);

    let silent = connect_from("127.0.0.2", listen);
    let waited = closed_within(silent);
    assert!(
        waited >= Duration::from_millis(900),
        "closed after {waited:?}, before connect_timeout"
    );
    assert_eq!(proxy_protocol_errors(dir.path()), 4);
    assert_eq!(server.accepted(), 0, "a refused connection reached the backend");

    // The same header from the trusted source is served.
    let mut trusted = connect_from("127.0.0.2", listen);
    trusted.write_all(header).expect("send");
    let mut echoed = [0u8; 5];
    trusted.read_exact(&mut echoed).expect("echo");
    assert_eq!(&echoed, b"hello");
    assert_eq!(proxy_protocol_errors(dir.path()), 4);
}

/// A backend that answers with the PROXY line it received, then echoes
/// the next 5 bytes.
fn answer_proxy_line(stream: Stream) {
    let Stream::Tcp(stream) = stream else {
        return;
    };
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let mut writer = stream;
    let _ = writer.write_all(line.as_bytes());
    let mut rest = [0u8; 5];
    if reader.read_exact(&mut rest).is_ok() {
        let _ = writer.write_all(&rest);
    }
}

/// A UNIX socket listener with `accept_proxy` (no `trusted_proxies`: its
/// clients have no address to match): a client with a v2 header is the
/// header's client for `send_proxy`; one without is closed and counted.
#[test]
fn a_unix_listener_takes_the_header_from_every_client() {
    let dir = tempdir();
    let server = TestServer::tcp(answer_proxy_line);
    let listen = format!("unix:{}/p.sock", dir.path().display());
    let extra = "accept_proxy: true\nsend_proxy: v1";
    let yaml = one_proxy_config(dir.path(), "5s", &listen, &[server.address()], extra);
    let daemon = Daemon::start(dir.path(), &yaml);
    let endpoint = daemon.listen_addr("p");

    let mut client = endpoint.must_connect();
    let header = interlude::sockets::proxy_protocol::encode(
        interlude::sockets::proxy_protocol::Version::V2,
        Some((
            "[2001:db8::7]:4444".parse().expect("source"),
            "[2001:db8::1]:443".parse().expect("destination"),
        )),
    );
    client.write_all(header.as_bytes()).expect("send the header");
    client.write_all(b"hello").expect("send");
    let mut answer = Vec::new();
    let mut byte = [0u8; 1];
    while !answer.ends_with(b"hello") {
        client.read_exact(&mut byte).expect("the backend's answer");
        answer.push(byte[0]);
    }
    // The listener is a UNIX socket: no address of its own to name.
    assert_eq!(
        String::from_utf8_lossy(&answer),
        "PROXY TCP6 2001:db8::7 :: 4444 0\r\nhello"
    );

    let mut without = endpoint.must_connect();
    without.write_all(b"hello").expect("send");
    let mut rest = Vec::new();
    let _ = without.read_to_end(&mut rest);
    assert!(rest.is_empty(), "answered {rest:?}");
    assert_eq!(proxy_protocol_errors(dir.path()), 1);
    assert_eq!(server.accepted(), 1);
}

/// A paused proxy with `accept_proxy` and `send_proxy`: the client's header
/// is read before it is held (the backend is not contacted), and at the
/// resume the backend is told the header's client, then gets the bytes the
/// client sent while held.
#[test]
fn a_held_client_keeps_its_proxy_header_address() {
    let dir = tempdir();
    // Answers with the PROXY line it received, then echoes.
    let server = TestServer::tcp(answer_proxy_line);
    let extra = "accept_proxy: true\ntrusted_proxies: [127.0.0.1]\nsend_proxy: v1";
    let yaml = one_proxy_config(dir.path(), "5s", "tcp://127.0.0.1:0", &[server.address()], extra);
    let daemon = Daemon::start(dir.path(), &yaml);
    let listen = tcp_addr(&daemon.listen_addr("p"));
    let (code, body) = http(dir.path(), "POST", "/pause");
    assert_eq!(code, 200, "{body}");

    let mut client = connect_from("127.0.0.1", listen);
    client
        .write_all(b"PROXY TCP4 198.51.100.7 192.0.2.1 4444 80\r\nhello")
        .expect("send");
    wait_held(dir.path(), "p", 1);
    assert_eq!(server.accepted(), 0, "a held client reached the backend");
    let (code, body) = http(dir.path(), "POST", "/resume");
    assert_eq!(code, 200, "{body}");

    let mut reader = BufReader::new(client);
    let mut line = String::new();
    reader.read_line(&mut line).expect("the backend's PROXY line");
    assert_eq!(
        line,
        format!(
            "PROXY TCP4 198.51.100.7 {} 4444 {}\r\n",
            listen.ip(),
            listen.port()
        )
    );
    let mut rest = [0u8; 5];
    reader.read_exact(&mut rest).expect("echo");
    assert_eq!(&rest, b"hello");
    assert_eq!(proxy_protocol_errors(dir.path()), 0);
}
