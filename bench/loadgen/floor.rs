//! `loadgen floor` and `loadgen http-floor`: the no-proxy floor of the held
//! tests. `--conns` clients, their sockets created and their tasks waiting
//! at a start line, all connect to the backend directly at once and do the
//! held test's exchange ('E' plus one byte echoed, or one `GET /small`
//! answered 200 with the 64-byte body); timed from the start until the last
//! one is served. A resume releases as many clients to the backend at once,
//! so this is what the same machine and backend take without a proxy.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;
use tokio::sync::watch;
use tokio::time::{sleep, timeout};

use crate::common::{MODE_ECHO, bad_data, positive_count, quantile_ms, secs, show, timed_out};
use crate::conn::Conn;
use crate::http::{HTTP_SMALL_LEN, HTTP_SMALL_PATH, HttpConn, http_request};
use crate::procfs::{CpuTicks, SynStats, syn_stats};

#[derive(clap::Args)]
pub struct Args {
    /// The backend's address (no proxy in between).
    #[arg(long, value_name = "ADDR")]
    pub target: SocketAddr,
    /// Clients connecting at once.
    #[arg(long, default_value_t = 1, value_parser = positive_count)]
    pub conns: usize,
    /// The backend's pid, to read its CPU time over the run.
    #[arg(long, value_name = "PID")]
    pub backend_pid: Option<u32>,
    /// Seconds to wait after the start for every client.
    #[arg(long, default_value_t = 30.0, value_parser = secs)]
    pub wait: f64,
}

/// `floor` and `http-floor` (`http`: one `GET /small` per client).
pub async fn run(o: Args, http: bool) {
    let Args {
        target,
        conns,
        backend_pid,
        wait,
    } = o;
    let mode = if http { "http_floor" } else { "floor" };
    // Every socket exists before the start: the clock then covers only the
    // connects and exchanges, as a resume's does (its clients are long
    // connected to the proxy).
    let mut sockets = Vec::with_capacity(conns);
    let mut socket_errors = 0u64;
    let new_socket = if target.is_ipv4() {
        TcpSocket::new_v4
    } else {
        TcpSocket::new_v6
    };
    for _ in 0..conns {
        match new_socket() {
            Ok(s) => sockets.push(s),
            Err(e) => {
                if socket_errors == 0 {
                    eprintln!("loadgen {mode}: socket: {e}");
                }
                socket_errors += 1;
            }
        }
    }
    let served = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let waiting = Arc::new(AtomicU64::new(0));
    let printed = Arc::new(AtomicU64::new(0));
    let served_us = Arc::new(std::sync::Mutex::new(Vec::with_capacity(conns)));
    let (start_tx, start_rx) = watch::channel(None::<Instant>);
    let req: Arc<[u8]> = http_request(HTTP_SMALL_PATH, &target.to_string()).into();
    let deadline = Duration::from_secs_f64(wait);
    let tasks = sockets.len() as u64;
    for socket in sockets {
        let (served, failed, waiting, printed, served_us, req) = (
            served.clone(),
            failed.clone(),
            waiting.clone(),
            printed.clone(),
            served_us.clone(),
            req.clone(),
        );
        let mut start = start_rx.clone();
        tokio::spawn(async move {
            waiting.fetch_add(1, Relaxed);
            let Ok(t0) = start
                .wait_for(Option::is_some)
                .await
                .map(|t| (*t).unwrap_or_else(Instant::now))
            else {
                return;
            };
            let exchange = async {
                let s = socket.connect(target).await?;
                s.set_nodelay(true)?;
                let mut s = Conn::Plain(s);
                if http {
                    let mut c = HttpConn::new(s);
                    let r = c.exchange(&req, &|_| {}).await?;
                    if r.status != 200 || r.body != HTTP_SMALL_LEN as u64 {
                        return Err(bad_data(&format!(
                            "status {}, body of {} bytes",
                            r.status, r.body
                        )));
                    }
                    Ok::<Kept, io::Error>(Box::new(c) as Kept)
                } else {
                    s.write_all(&[MODE_ECHO, b'f']).await?;
                    let mut b = [0u8; 1];
                    s.read_exact(&mut b).await?;
                    Ok(Box::new(s) as Kept)
                }
            };
            match timeout(deadline, exchange)
                .await
                .unwrap_or_else(|_| Err(timed_out("exchange")))
            {
                Ok(conn) => {
                    let us = t0.elapsed().as_micros() as u64;
                    served_us.lock().unwrap().push(us);
                    served.fetch_add(1, Relaxed);
                    // Stay open until the process exits, as the held
                    // test's clients do: no closes while others are served.
                    std::future::pending::<()>().await;
                    drop(conn);
                }
                Err(e) => {
                    failed.fetch_add(1, Relaxed);
                    if printed.fetch_add(1, Relaxed) < 5 {
                        eprintln!("loadgen {mode}: client: {e}");
                    }
                }
            }
        });
    }
    // Every task at the start line, then go.
    let ready_deadline = Instant::now() + Duration::from_secs(30);
    while waiting.load(Relaxed) < tasks && Instant::now() < ready_deadline {
        sleep(Duration::from_millis(5)).await;
    }
    let ready = waiting.load(Relaxed);
    let syn_before = syn_stats();
    let cpu_before = CpuTicks::read(None, backend_pid);
    let t0 = Instant::now();
    let _ = start_tx.send(Some(t0));
    let end = t0 + deadline + Duration::from_secs(1);
    while served.load(Relaxed) + failed.load(Relaxed) < tasks && Instant::now() < end {
        sleep(Duration::from_millis(2)).await;
    }
    let cpu = CpuTicks::read(None, backend_pid).since(&cpu_before);
    let syn = syn_stats().zip(syn_before).map(|(a, b)| SynStats {
        listen_drops: a.listen_drops.saturating_sub(b.listen_drops),
        syn_retrans: a.syn_retrans.saturating_sub(b.syn_retrans),
    });
    let served_n = served.load(Relaxed);
    let failed_n = failed.load(Relaxed);
    let missing = tasks.saturating_sub(served_n + failed_n);
    let errors = socket_errors + failed_n + missing;
    let mut us = std::mem::take(&mut *served_us.lock().unwrap());
    us.sort_unstable();
    let ms = |p: f64| quantile_ms(&us, p);
    let done = served_n > 0 && errors == 0;
    println!(
        "mode={mode} conns={conns} ready={ready} served={served_n} failed={failed_n} missing={missing} \
         socket_errors={socket_errors} first_ms={} p50_ms={} p99_ms={} last_ms={} listen_drops={} syn_retrans={} \
         {cpu} errors={errors}",
        show(ms(0.0)),
        show(ms(0.50)),
        show(ms(0.99)),
        show(ms(1.0).filter(|_| done)),
        show(syn.map(|s| s.listen_drops)),
        show(syn.map(|s| s.syn_retrans)),
    );
}

/// A served client's connection, kept open (never read again) until the
/// process exits.
type Kept = Box<dyn std::any::Any + Send>;
