//! `loadgen idle`: open `--conns` connections (64 at a time, one 1-byte echo
//! each so they are set up end to end), print the result line, then hold them
//! for `--hold` seconds or until killed (the RSS-per-connection rows).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::{sleep, timeout};

use crate::common::{MODE_ECHO, OP_TIMEOUT, OPEN_CONCURRENCY, positive_count, secs};
use crate::conn::connect;

#[derive(clap::Args)]
pub struct Args {
    /// Address to connect to.
    #[arg(long, value_name = "ADDR")]
    pub target: String,
    /// Connections to open.
    #[arg(long, default_value_t = 1, value_parser = positive_count)]
    pub conns: usize,
    /// Seconds to hold them after the result line.
    #[arg(long, default_value_t = 60.0, value_parser = secs)]
    pub hold: f64,
}

pub async fn run(Args { target, conns, hold }: Args) {
    // Open with bounded concurrency so listen backlogs never overflow; each
    // connection does one 1-byte echo so it is established end to end.
    let sem = Arc::new(tokio::sync::Semaphore::new(OPEN_CONCURRENCY));
    let t0 = Instant::now();
    let mut tasks = Vec::with_capacity(conns);
    for _ in 0..conns {
        let (sem, target) = (sem.clone(), target.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = sem.acquire_owned().await.unwrap();
            let mut s = connect(&target).await?;
            let mut b = [0u8; 1];
            timeout(OP_TIMEOUT, async {
                s.write_all(&[MODE_ECHO, b'i']).await?;
                s.read_exact(&mut b).await
            })
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "echo timed out"))??;
            Ok::<_, std::io::Error>(s)
        }));
    }
    let mut open = Vec::with_capacity(conns);
    let mut errors = 0u64;
    for t in tasks {
        match t.await {
            Ok(Ok(s)) => open.push(s),
            Ok(Err(e)) => {
                if errors < 5 {
                    eprintln!("loadgen idle: {e}");
                }
                errors += 1;
            }
            Err(_) => errors += 1,
        }
    }
    println!(
        "mode=idle open={} errors={errors} open_seconds={:.3}",
        open.len(),
        t0.elapsed().as_secs_f64()
    );
    // Hold the connections until killed (or the bounded hold time passes).
    sleep(Duration::from_secs_f64(hold)).await;
    drop(open);
}
