//! `loadgen slowloris`: a slow-client flood. Keeps `--conns` connections each
//! sending an HTTP request head that never ends: the start of a head, then one
//! byte every `--gap` seconds; a connection the server answers or closes is
//! opened again at once. Prints `mode=slowloris open=N ...` once all N are
//! open, then a `mode=slowloris-progress` line every second for `--hold` s.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::sleep;

use crate::common::{OPEN_CONCURRENCY, connect_tcp, positive_count, secs};

#[derive(clap::Args)]
pub struct Args {
    /// Address to connect to.
    #[arg(long, value_name = "ADDR")]
    pub target: String,
    /// Connections to keep open.
    #[arg(long, default_value_t = 1, value_parser = positive_count)]
    pub conns: usize,
    /// Seconds to keep the flood up after all are open.
    #[arg(long, default_value_t = 60.0, value_parser = secs)]
    pub hold: f64,
    /// Seconds between two bytes of a head (0 means 1).
    #[arg(long, default_value_t = 0.5, value_parser = secs)]
    pub gap: f64,
}

/// Slow-client flood: `conns` connections, each sending the start of an
/// HTTP request head and then one more byte every `gap` seconds, never the
/// end of the head; one that the server answers (a 408, say) or closes is
/// replaced at once, so `conns` stay open (as an attacker would keep them).
pub async fn run(
    Args {
        target,
        conns,
        hold,
        gap,
    }: Args,
) {
    let gap = Duration::from_secs_f64(if gap > 0.0 { gap } else { 1.0 });
    let open = Arc::new(AtomicU64::new(0));
    let reopened = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let sem = Arc::new(tokio::sync::Semaphore::new(OPEN_CONCURRENCY));
    let head: Arc<[u8]> = format!("GET /slow HTTP/1.1\r\nHost: {target}\r\nX-Slow: ")
        .into_bytes()
        .into();
    let t0 = Instant::now();
    for i in 0..conns {
        let (open, reopened, errors, sem, head, target) = (
            open.clone(),
            reopened.clone(),
            errors.clone(),
            sem.clone(),
            head.clone(),
            target.clone(),
        );
        tokio::spawn(async move {
            // Spread the drips over the gap.
            let offset = gap.mul_f64((i % 1000) as f64 / 1000.0);
            let mut first = true;
            loop {
                let opened = {
                    let Ok(_permit) = sem.acquire().await else { return };
                    match connect_tcp(&target).await {
                        Ok(mut s) => match s.write_all(&head).await {
                            Ok(()) => Some(s),
                            Err(_) => None,
                        },
                        Err(_) => None,
                    }
                };
                let Some(mut s) = opened else {
                    errors.fetch_add(1, Relaxed);
                    sleep(Duration::from_millis(100)).await;
                    continue;
                };
                open.fetch_add(1, Relaxed);
                if !first {
                    reopened.fetch_add(1, Relaxed);
                }
                first = false;
                sleep(offset).await;
                let mut buf = [0u8; 512];
                loop {
                    tokio::select! {
                        // An answer or a close: this one is done.
                        _ = s.read(&mut buf) => break,
                        () = sleep(gap) => {
                            if s.write_all(b"a").await.is_err() {
                                break;
                            }
                        }
                    }
                }
                open.fetch_sub(1, Relaxed);
            }
        });
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while open.load(Relaxed) < conns as u64 && Instant::now() < deadline {
        sleep(Duration::from_millis(50)).await;
    }
    println!(
        "mode=slowloris open={} errors={} open_seconds={:.3}",
        open.load(Relaxed),
        errors.load(Relaxed),
        t0.elapsed().as_secs_f64()
    );
    let end = Instant::now() + Duration::from_secs_f64(hold);
    while Instant::now() < end {
        sleep(Duration::from_secs(1)).await;
        println!(
            "mode=slowloris-progress open={} reopened={} errors={}",
            open.load(Relaxed),
            reopened.load(Relaxed),
            errors.load(Relaxed)
        );
    }
}
