//! `loadgen serve`: the backend. The first byte of each connection picks what
//! it does: echo, sink, answer a tag byte, or serve HTTP/1.1 with keep-alive
//! (canned responses for `/small`, `/1m` and a 404). A PROXY protocol v2
//! header before it is skipped.

use std::io;
use std::process::exit;
use std::sync::OnceLock;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::time::sleep;

use crate::common::{BACKEND_BACKLOG, BULK_CHUNK, MODE_ECHO, MODE_SINK, MODE_TAG, secs};
use crate::http::{
    HTTP_LARGE_LEN, HTTP_LARGE_PATH, HTTP_MAX_HEAD, HTTP_SMALL_LEN, HTTP_SMALL_PATH, find, http_framing,
};

#[derive(clap::Args)]
pub struct Args {
    /// Addresses to listen on, comma-separated (all bound before any accepts).
    #[arg(long, value_name = "ADDR[,ADDR...]")]
    pub listen: String,
    /// Exit by itself after this many seconds (an orphaned backend goes away).
    #[arg(long, default_value_t = 1800.0, value_parser = secs)]
    pub lifetime: f64,
    /// The byte a 'T' connection is answered with.
    #[arg(long, default_value = "-", value_parser = tag_byte)]
    pub tag: u8,
}

/// `--tag`: a single ASCII character.
fn tag_byte(s: &str) -> Result<u8, String> {
    match s.as_bytes() {
        &[c] => Ok(c),
        _ => Err("needs a single ASCII character".to_string()),
    }
}

pub async fn run(
    Args {
        listen,
        lifetime,
        tag,
    }: Args,
) {
    // Bind every address before accepting on any, so a failure leaves nothing half up.
    let listeners: Vec<_> = listen
        .split(',')
        .map(|addr| {
            listen_tcp(addr).unwrap_or_else(|e| {
                eprintln!("loadgen serve: listen on {addr}: {e}");
                exit(1)
            })
        })
        .collect();
    eprintln!("loadgen serve: listening on {listen}");
    // Safety net: an orphaned backend exits by itself.
    tokio::spawn(async move {
        sleep(Duration::from_secs_f64(lifetime)).await;
        eprintln!("loadgen serve: lifetime reached, exiting");
        exit(0);
    });
    let mut accepting = tokio::task::JoinSet::new();
    for l in listeners {
        accepting.spawn(accept_loop(l, tag));
    }
    while accepting.join_next().await.is_some() {}
}

async fn accept_loop(l: TcpListener, tag: u8) {
    loop {
        match l.accept().await {
            Ok((s, _)) => {
                let _ = s.set_nodelay(true);
                tokio::spawn(handle(s, tag));
            }
            Err(e) => {
                // e.g. EMFILE: back off instead of spinning.
                eprintln!("loadgen serve: accept: {e}");
                sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

fn listen_tcp(listen: &str) -> io::Result<TcpListener> {
    let addr: std::net::SocketAddr = listen
        .parse()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{e}")))?;
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKEND_BACKLOG)
}

async fn handle(mut s: TcpStream, tag: u8) {
    let mut mode = [0u8; 1];
    if s.read_exact(&mut mode).await.is_err() {
        return;
    }
    // A PROXY protocol v2 header (a proxy with `send_proxy: v2` /
    // `send-proxy-v2` in front): skipped, then the mode byte follows.
    if mode[0] == b'\r' {
        let mut header = [0u8; 15];
        if s.read_exact(&mut header).await.is_err() {
            return;
        }
        let mut rest = vec![0u8; usize::from(u16::from_be_bytes([header[13], header[14]]))];
        if s.read_exact(&mut rest).await.is_err() || s.read_exact(&mut mode).await.is_err() {
            return;
        }
    }
    match mode[0] {
        MODE_ECHO => {
            let mut buf = vec![0u8; 8 * 1024];
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if s.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                }
            }
        }
        MODE_SINK => {
            let mut buf = vec![0u8; BULK_CHUNK];
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        }
        MODE_TAG => {
            let _ = s.write_all(&[tag]).await;
        }
        b'G' | b'H' | b'P' => serve_http(s, mode[0]).await,
        _ => {}
    }
}

/// The backend's canned responses: [small, 1 MiB, 404] x [keep-alive,
/// close, HTTP/1.0 keep-alive], each with the length of its head (for HEAD).
fn http_response(body: usize, conn: usize) -> (&'static [u8], usize) {
    static RESPONSES: OnceLock<Vec<(Vec<u8>, usize)>> = OnceLock::new();
    let all = RESPONSES.get_or_init(|| {
        let mut v = Vec::new();
        for (status, len, fill) in [
            ("200 OK", HTTP_SMALL_LEN, b's'),
            ("200 OK", HTTP_LARGE_LEN, b'L'),
            ("404 Not Found", 10, b'?'),
        ] {
            for conn in ["", "Connection: close\r\n", "Connection: keep-alive\r\n"] {
                let mut r = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {len}\r\n{conn}\r\n"
                )
                .into_bytes();
                let head = r.len();
                r.resize(head + len, fill);
                v.push((r, head));
            }
        }
        v
    });
    let (r, head) = &all[body * 3 + conn];
    (r, *head)
}

/// The backend side of HTTP: requests one after the other on a keep-alive
/// connection (pipelined ones too); a request body with Content-Length is read
/// and discarded; chunked request bodies are not supported (400, close).
async fn serve_http(mut s: TcpStream, first: u8) {
    let mut buf = vec![0u8; HTTP_MAX_HEAD];
    buf[0] = first;
    let (mut start, mut end) = (0, 1);
    loop {
        let head_end = loop {
            if let Some(i) = find(&buf[start..end], b"\r\n\r\n") {
                break start + i + 4;
            }
            if start > 0 {
                buf.copy_within(start..end, 0);
                end -= start;
                start = 0;
            }
            if end == buf.len() {
                return; // head too large
            }
            match s.read(&mut buf[end..]).await {
                Ok(0) | Err(_) => return,
                Ok(n) => end += n,
            }
        };
        let head = &buf[start..head_end];
        let line_end = head.iter().position(|&b| b == b'\r').unwrap_or(head.len());
        let mut words = head[..line_end].split(|&b| b == b' ');
        let (method, path, version) = (words.next(), words.next(), words.next());
        let http10 = version == Some(b"HTTP/1.0");
        let head_only = method == Some(b"HEAD");
        let which = match path {
            Some(p) if p == HTTP_SMALL_PATH.as_bytes() => 0,
            Some(p) if p == HTTP_LARGE_PATH.as_bytes() => 1,
            _ => 2,
        };
        let Ok(f) = http_framing(head, http10) else { return };
        start = head_end;
        if f.chunked {
            let (r, _) = http_response(2, 1);
            let _ = s.write_all(r).await;
            return;
        }
        // Discard the request body.
        let mut body = f.content_length.unwrap_or(0);
        while body > 0 {
            if start == end {
                start = 0;
                end = match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
            }
            let take = body.min((end - start) as u64);
            start += take as usize;
            body -= take;
        }
        let conn = if f.close {
            1
        } else if f.keep_alive_10 {
            2
        } else {
            0
        };
        let (r, head_len) = http_response(which, conn);
        let r = if head_only { &r[..head_len] } else { r };
        if s.write_all(r).await.is_err() {
            return;
        }
        if f.close {
            let _ = s.shutdown().await;
            return;
        }
    }
}
