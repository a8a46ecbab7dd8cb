//! `loadgen rr`: `--conns` keep-alive connections to the backend's echo, each
//! looping: write 64 bytes, read the 64-byte echo; req/s and latency.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::{MODE_ECHO, MSG_LEN, Run, TimedArgs};
use crate::conn::{connect, tls_note};

pub async fn run(
    TimedArgs {
        target,
        conns,
        seconds,
        cpu_pid,
        ..
    }: TimedArgs,
) {
    let run = Run::new();
    for _ in 0..conns {
        let (run, target) = (run.clone(), target.clone());
        tokio::spawn(async move {
            let mut s = match connect(&target).await {
                Ok(s) => s,
                Err(e) => return run.error("connect", e),
            };
            if let Err(e) = s.write_all(&[MODE_ECHO]).await {
                return run.error("write", e);
            }
            let req = [0x61u8; MSG_LEN];
            let mut resp = [0u8; MSG_LEN];
            while !run.done() {
                let t = Instant::now();
                if let Err(e) = s.write_all(&req).await {
                    return run.error("write", e);
                }
                if let Err(e) = s.read_exact(&mut resp).await {
                    return run.error("read", e);
                }
                if run.measuring() {
                    run.hist.record(t.elapsed());
                    run.ops.fetch_add(1, Relaxed);
                }
            }
        });
    }
    let (dt, cpu) = run.window(seconds, cpu_pid).await;
    let n = run.ops.load(Relaxed);
    println!(
        "mode=rr conns={conns} seconds={dt:.3} reqs={n} rps={:.0} p50_us={} p99_us={}{cpu}{} errors={}",
        n as f64 / dt,
        run.hist.quantile(0.50),
        run.hist.quantile(0.99),
        tls_note(),
        run.errors.load(Relaxed)
    );
}
