//! `loadgen held` and `loadgen http-held` (interlude only): pause the proxy at
//! run time, open `--conns` connections that are held (each sends 'E' plus one
//! byte, or one whole `GET /small`), measure VmRSS, check that none reached
//! the backend, then `POST /resume` and time until every client got its echo
//! or its 200 response.

use std::io;
use std::process::exit;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::time::{sleep, timeout};

use crate::common::{
    MODE_ECHO, OP_TIMEOUT, OPEN_CONCURRENCY, positive_count, quantile_ms, secs, show, timed_out,
};
use crate::conn::{Conn, connect};
use crate::control::{control, control_exchange, json_value};
use crate::http::{HTTP_SMALL_LEN, HTTP_SMALL_PATH, HttpConn, http_request};
use crate::procfs::{CpuTicks, SynStats, rss_kib, syn_stats, tcp_conns_to};

#[derive(clap::Args)]
pub struct Args {
    /// Address of the proxy under test.
    #[arg(long, value_name = "ADDR")]
    pub target: String,
    /// Connections (held requests, for http-held) to open.
    #[arg(long, default_value_t = 1, value_parser = positive_count)]
    pub conns: usize,
    /// interlude's control socket.
    #[arg(long, value_name = "PATH")]
    pub control_unix: String,
    /// Seconds to wait after opening, before VmRSS is read again.
    #[arg(long, default_value_t = 2.0, value_parser = secs)]
    pub settle: f64,
    /// The proxy's pid, to read its VmRSS before and after.
    #[arg(long, value_name = "PID")]
    pub rss_pid: Option<u32>,
    /// The backend's port, to check that no connection reached it.
    #[arg(long, value_name = "PORT")]
    pub backend_port: Option<u16>,
    /// The backend's pid, to read its CPU time over the resume.
    #[arg(long, value_name = "PID")]
    pub backend_pid: Option<u32>,
    /// Seconds to wait after the resume for every client.
    #[arg(long, default_value_t = 30.0, value_parser = secs)]
    pub wait: f64,
}

/// What the held connections report, shared with the main task.
struct Held {
    opened: AtomicU64,
    open_errors: AtomicU64,
    /// Echoes that arrived before the resume was sent: a held connection
    /// reached the backend.
    early: AtomicU64,
    echoed: AtomicU64,
    /// Closed or reset after opening, without an echo.
    lost: AtomicU64,
    /// http-held: a response after the resume that is not a 200 with the
    /// 64-byte body.
    bad: AtomicU64,
    printed: AtomicU64,
    /// Microseconds from the resume to each echo (exact: a resume can take
    /// longer than the histogram of the timed modes covers).
    echo_us: std::sync::Mutex<Vec<u64>>,
    /// Set right before the resume request is written.
    resumed_at: OnceLock<Instant>,
}

impl Held {
    fn note(&self, what: &str, e: impl std::fmt::Display) {
        if self.printed.fetch_add(1, Relaxed) < 5 {
            eprintln!("loadgen held: {what}: {e}");
        }
    }
    fn settled(&self) -> u64 {
        self.early.load(Relaxed)
            + self.echoed.load(Relaxed)
            + self.lost.load(Relaxed)
            + self.bad.load(Relaxed)
    }
}

/// A setup step failed: no measurement, one result line all the same.
fn held_failed(conns: usize, why: &str) -> ! {
    eprintln!("loadgen held: {why}");
    println!("mode=held conns={conns} failed=1 errors=1");
    exit(0)
}

/// A held client: raw bytes (held) or one HTTP request (http-held).
enum HeldConn {
    Raw(Conn),
    Http(HttpConn),
}

/// `held` and `http-held`. With `http` each connection sends one `GET /small`
/// (a whole request, which interlude holds) and must get a 200 with the
/// 64-byte body after the resume; "echo" below then means that response.
pub async fn run(o: Args, http: bool) {
    let (target, conns, control_path) = (o.target.clone(), o.conns, o.control_unix.clone());
    match control(&control_path, "POST", "/pause").await {
        Ok((200, body)) if json_value(&body, "paused") == Some("true") => {}
        Ok((code, body)) => held_failed(conns, &format!("POST /pause answered {code}: {}", body.trim())),
        Err(e) => held_failed(conns, &format!("POST /pause on {control_path}: {e}")),
    }
    let rss_before = o.rss_pid.and_then(rss_kib);
    let backend_before = o.backend_port.and_then(tcp_conns_to);

    // Open the connections; each sends the echo selector and one byte (or its
    // HTTP request), which interlude keeps while holding, then waits for the echo.
    let h = Arc::new(Held {
        opened: AtomicU64::new(0),
        open_errors: AtomicU64::new(0),
        early: AtomicU64::new(0),
        echoed: AtomicU64::new(0),
        lost: AtomicU64::new(0),
        bad: AtomicU64::new(0),
        printed: AtomicU64::new(0),
        echo_us: std::sync::Mutex::new(Vec::with_capacity(conns)),
        resumed_at: OnceLock::new(),
    });
    let sem = Arc::new(tokio::sync::Semaphore::new(OPEN_CONCURRENCY));
    let req: Arc<[u8]> = http_request(HTTP_SMALL_PATH, &target).into();
    let t_open = Instant::now();
    for _ in 0..conns {
        let (sem, h, target, req) = (sem.clone(), h.clone(), target.clone(), req.clone());
        tokio::spawn(async move {
            let permit = sem.acquire_owned().await.unwrap();
            let opened = async {
                if http {
                    let mut c = HttpConn::connect(&target).await?;
                    timeout(OP_TIMEOUT, async {
                        c.s.write_all(&req).await?;
                        c.s.flush().await
                    })
                    .await
                    .map_err(|_| timed_out("write"))??;
                    Ok::<_, io::Error>(HeldConn::Http(c))
                } else {
                    let mut s = connect(&target).await?;
                    timeout(OP_TIMEOUT, s.write_all(&[MODE_ECHO, b'h']))
                        .await
                        .map_err(|_| timed_out("write"))??;
                    Ok(HeldConn::Raw(s))
                }
            }
            .await;
            drop(permit);
            let mut conn = match opened {
                Ok(c) => c,
                Err(e) => {
                    h.open_errors.fetch_add(1, Relaxed);
                    return h.note("open", e);
                }
            };
            h.opened.fetch_add(1, Relaxed);
            // Ok(None): the echo or a 200 with the right body; Ok(Some(why)): another response.
            let outcome = match &mut conn {
                HeldConn::Raw(s) => {
                    let mut b = [0u8; 1];
                    s.read_exact(&mut b).await.map(|_| None)
                }
                HeldConn::Http(c) => c.response(&|_| {}).await.map(|r| {
                    (r.status != 200 || r.body != HTTP_SMALL_LEN as u64)
                        .then(|| format!("status {}, body of {} bytes", r.status, r.body))
                }),
            };
            match (outcome, h.resumed_at.get()) {
                (Ok(None), Some(t0)) => {
                    let us = t0.elapsed().as_micros() as u64;
                    h.echo_us.lock().unwrap().push(us);
                    h.echoed.fetch_add(1, Relaxed);
                }
                (Ok(why), None) => {
                    h.early.fetch_add(1, Relaxed);
                    let what = if http { "a response" } else { "the echo" };
                    let why = why.map_or_else(String::new, |w| format!(" ({w})"));
                    h.note(
                        "held connection",
                        format!("{what} arrived before the resume{why}"),
                    );
                }
                (Ok(Some(why)), Some(_)) => {
                    h.bad.fetch_add(1, Relaxed);
                    h.note("held request", why);
                }
                (Err(e), _) => {
                    h.lost.fetch_add(1, Relaxed);
                    h.note("held connection", e);
                }
            }
            // Keep the connection open until the process exits, so closes
            // do not load the machine while other echoes are still on the way.
            std::future::pending::<()>().await;
            drop(conn);
        });
    }
    let open_deadline = Instant::now() + Duration::from_secs(60);
    while (h.opened.load(Relaxed) + h.open_errors.load(Relaxed)) < conns as u64
        && Instant::now() < open_deadline
    {
        sleep(Duration::from_millis(10)).await;
    }
    let open_seconds = t_open.elapsed().as_secs_f64();
    sleep(Duration::from_secs_f64(o.settle)).await;

    // Before the resume: nothing may have reached the backend.
    let opened = h.opened.load(Relaxed);
    let rss_after = o.rss_pid.and_then(rss_kib);
    let backend_held = o
        .backend_port
        .and_then(tcp_conns_to)
        .zip(backend_before)
        .map(|(now, before)| now.saturating_sub(before));
    let status = match control(&control_path, "GET", "/status").await {
        Ok((200, body)) => Some(body),
        Ok((code, body)) => {
            eprintln!("loadgen held: GET /status answered {code}: {}", body.trim());
            None
        }
        Err(e) => {
            eprintln!("loadgen held: GET /status: {e}");
            None
        }
    };
    // The proxy's first "held"/"active" (its own counters, before its backends').
    let status_u64 = |key: &str| {
        status
            .as_deref()
            .and_then(|b| json_value(b, key))
            .and_then(|v| v.parse::<u64>().ok())
    };
    let (status_held, status_active) = (status_u64("held"), status_u64("active"));
    let lost_before = h.lost.load(Relaxed);
    let early = h.early.load(Relaxed);
    let syn_before = syn_stats();
    let cpu_before = CpuTicks::read(o.rss_pid, o.backend_pid);

    // Resume: the clock starts right before the request is written.
    let mut ctl = match timeout(OP_TIMEOUT, UnixStream::connect(&control_path)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => held_failed(conns, &format!("connect {control_path}: {e}")),
        Err(_) => held_failed(conns, &format!("connect {control_path}: timed out")),
    };
    let t0 = Instant::now();
    let _ = h.resumed_at.set(t0);
    let resume = timeout(OP_TIMEOUT, control_exchange(&mut ctl, "POST", "/resume")).await;
    let resume_code = match resume {
        Ok(Ok((code, body))) => {
            if code != 200 {
                eprintln!("loadgen held: POST /resume answered {code}: {}", body.trim());
            }
            Some(code)
        }
        Ok(Err(e)) => {
            eprintln!("loadgen held: POST /resume: {e}");
            None
        }
        Err(_) => {
            eprintln!("loadgen held: POST /resume: no answer within {OP_TIMEOUT:?}");
            None
        }
    };
    let wait = o.wait;
    let wait_deadline = t0 + Duration::from_secs_f64(wait);
    while h.settled() < opened && Instant::now() < wait_deadline {
        sleep(Duration::from_millis(2)).await;
    }
    // CPU time over the resume: the proxy's is what a resume costs beyond
    // the floor's client and backend.
    let cpu = CpuTicks::read(o.rss_pid, o.backend_pid).since(&cpu_before);
    let syn = syn_stats().zip(syn_before).map(|(a, b)| SynStats {
        listen_drops: a.listen_drops.saturating_sub(b.listen_drops),
        syn_retrans: a.syn_retrans.saturating_sub(b.syn_retrans),
    });

    let echoed = h.echoed.load(Relaxed);
    let lost = h.lost.load(Relaxed);
    let bad = h.bad.load(Relaxed);
    let missing = opened.saturating_sub(h.settled());
    let open_errors = h.open_errors.load(Relaxed);
    let mut errors = open_errors + h.early.load(Relaxed) + lost + bad + missing;
    if resume_code != Some(200) {
        errors += 1;
        eprintln!("loadgen held: the resume request failed");
    }
    if backend_held != Some(0) {
        errors += 1;
        eprintln!(
            "loadgen held: {} connection(s) reached the backend before the resume",
            show(backend_held)
        );
    }
    if status_held != Some(opened) || status_active != Some(0) {
        errors += 1;
        eprintln!(
            "loadgen held: before the resume interlude reported held={} active={}, expected held={opened} active=0",
            show(status_held),
            show(status_active)
        );
    }
    if missing > 0 {
        eprintln!("loadgen held: {missing} client(s) got no echo within {wait:.0} s of the resume");
    }
    let kib_per_conn = rss_before
        .zip(rss_after)
        .filter(|_| opened > 0)
        .map(|(b, a)| format!("{:.2}", (a as f64 - b as f64) / opened as f64));
    let done = echoed > 0 && missing == 0;
    let mut echo_us = std::mem::take(&mut *h.echo_us.lock().unwrap());
    echo_us.sort_unstable();
    let ms = |p: f64| quantile_ms(&echo_us, p);
    println!(
        "mode={} conns={conns} open={opened} open_errors={open_errors} open_seconds={open_seconds:.3} \
         settle_seconds={} rss_before_kib={} rss_after_kib={} kib_per_conn={} status_held={} \
         status_active={} backend_conns_before_resume={} early_echoes={early} lost_before_resume={lost_before} \
         resume_status={} echoed={echoed} lost={lost} bad_responses={bad} missing={missing} first_ms={} p50_ms={} p99_ms={} \
         resume_ms={} listen_drops={} syn_retrans={} {cpu} errors={errors}",
        if http { "http_held" } else { "held" },
        o.settle,
        show(rss_before),
        show(rss_after),
        show(kib_per_conn),
        show(status_held),
        show(status_active),
        show(backend_held),
        show(resume_code),
        show(ms(0.0)),
        show(ms(0.50)),
        show(ms(0.99)),
        show(ms(1.0).filter(|_| done)),
        show(syn.map(|s| s.listen_drops)),
        show(syn.map(|s| s.syn_retrans)),
    );
}
