//! `loadgen http-rr` and `loadgen http-download`: keep-alive HTTP/1.1 load,
//! one request at a time per connection; req/s, latency and body MB/s.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use tokio::time::{sleep, timeout};

use crate::common::{OP_TIMEOUT, PHASE_DONE, PHASE_MEASURE, Run, TimedArgs, WARMUP};
use crate::conn::tls_note;
use crate::http::{HttpConn, http_expected_len, http_request};
use crate::procfs::CpuWindow;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub timed: TimedArgs,
    /// Path to request (default /small for http-rr, /1m for http-download).
    #[arg(long)]
    pub path: Option<String>,
}

/// `conns` keep-alive connections, each looping `GET path` one request at a
/// time. A response that asks to close (`Connection: close`) is not an
/// error: the next request goes on a new connection (counted in
/// `reconnects`). A status other than 200, a body of the wrong length, a
/// broken connection or a request taking more than 5 s is one.
pub async fn run(a: Args, default_path: &str) {
    let path = a.path.unwrap_or_else(|| default_path.to_string());
    let TimedArgs {
        target,
        conns,
        seconds,
        cpu_pid,
        ..
    } = a.timed.start();
    let run = Run::new();
    let bytes = Arc::new(AtomicU64::new(0));
    let reconnects = Arc::new(AtomicU64::new(0));
    let req: Arc<[u8]> = http_request(&path, &target).into();
    let expect = http_expected_len(&path);
    for _ in 0..conns {
        let (run, bytes, reconnects, req, target) = (
            run.clone(),
            bytes.clone(),
            reconnects.clone(),
            req.clone(),
            target.clone(),
        );
        tokio::spawn(async move {
            let mut conn: Option<HttpConn> = None;
            let mut first = true;
            let count = |n: u64| {
                bytes.fetch_add(n, Relaxed);
            };
            while !run.done() {
                if conn.is_none() {
                    match HttpConn::connect(&target).await {
                        Ok(c) => conn = Some(c),
                        Err(e) => {
                            run.error("connect", e);
                            sleep(Duration::from_millis(10)).await;
                            continue;
                        }
                    }
                    if !first {
                        reconnects.fetch_add(1, Relaxed);
                    }
                    first = false;
                }
                let Some(c) = conn.as_mut() else { continue };
                let t = Instant::now();
                match timeout(OP_TIMEOUT, c.exchange(&req, &count)).await {
                    Ok(Ok(r)) => {
                        if r.close {
                            conn = None;
                        }
                        if r.status != 200 {
                            run.error("response", format!("status {}", r.status));
                        } else if expect.is_some_and(|n| n != r.body) {
                            run.error("response", format!("body of {} bytes", r.body));
                        } else if run.measuring() {
                            run.hist.record(t.elapsed());
                            run.ops.fetch_add(1, Relaxed);
                        }
                    }
                    Ok(Err(e)) => {
                        if !run.done() {
                            run.error("request", e);
                        }
                        conn = None;
                        sleep(Duration::from_millis(1)).await;
                    }
                    Err(_) => {
                        run.error("request", "no complete response within 5 s");
                        conn = None;
                    }
                }
            }
        });
    }
    sleep(WARMUP).await;
    let (b0, r0) = (bytes.load(Relaxed), reconnects.load(Relaxed));
    run.phase.store(PHASE_MEASURE, Relaxed);
    let cpu = CpuWindow::start(cpu_pid);
    let t0 = Instant::now();
    sleep(Duration::from_secs_f64(seconds)).await;
    run.phase.store(PHASE_DONE, Relaxed);
    let dt = t0.elapsed().as_secs_f64();
    let cpu = cpu.finish();
    let (b, r) = (bytes.load(Relaxed) - b0, reconnects.load(Relaxed) - r0);
    let n = run.ops.load(Relaxed);
    println!(
        "mode=http path={path} conns={conns} seconds={dt:.3} reqs={n} rps={:.0} p50_us={} p99_us={} \
         bytes={b} mbps={:.1} reconnects={r}{cpu}{} errors={}",
        n as f64 / dt,
        run.hist.quantile(0.50),
        run.hist.quantile(0.99),
        b as f64 / dt / 1e6,
        tls_note(),
        run.errors.load(Relaxed)
    );
}
