//! `loadgen connrate`: `--conns` workers, each looping: connect (and, with
//! `--tls`, a full handshake), one 64-byte echo, close; conn/s.

use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::{sleep, timeout};

use crate::common::{MODE_ECHO, MSG_LEN, OP_TIMEOUT, Run, TimedArgs};
use crate::conn::{connect, tls_note};

async fn one_conn(target: &str) -> std::io::Result<()> {
    let mut s = connect(target).await?;
    let mut req = [0x62u8; 1 + MSG_LEN];
    req[0] = MODE_ECHO;
    let mut resp = [0u8; MSG_LEN];
    let io = async {
        s.write_all(&req).await?;
        s.flush().await?; // TLS: the record is out (a no-op on plain TCP)
        s.read_exact(&mut resp).await?;
        if s.is_tls() {
            // close_notify, as a well-behaved TLS client ends a connection.
            s.shutdown().await?;
        }
        Ok::<_, std::io::Error>(())
    };
    timeout(OP_TIMEOUT, io)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "echo timed out"))??;
    Ok(()) // dropping the stream closes it (client side closes first)
}

pub async fn run(
    TimedArgs {
        target,
        conns: workers,
        seconds,
        cpu_pid,
        ..
    }: TimedArgs,
) {
    let run = Run::new();
    for _ in 0..workers {
        let (run, target) = (run.clone(), target.clone());
        tokio::spawn(async move {
            while !run.done() {
                let t = Instant::now();
                match one_conn(&target).await {
                    Ok(()) => {
                        if run.measuring() {
                            run.hist.record(t.elapsed());
                            run.ops.fetch_add(1, Relaxed);
                        }
                    }
                    Err(e) => {
                        run.error("conn", e);
                        sleep(Duration::from_millis(1)).await;
                    }
                }
            }
        });
    }
    let (dt, cpu) = run.window(seconds, cpu_pid).await;
    let n = run.ops.load(Relaxed);
    println!(
        "mode=connrate conns={workers} seconds={dt:.3} ok={n} cps={:.0} p50_us={} p99_us={}{cpu}{} errors={}",
        n as f64 / dt,
        run.hist.quantile(0.50),
        run.hist.quantile(0.99),
        tls_note(),
        run.errors.load(Relaxed)
    );
}
