//! `loadgen throughput`: bulk upload to the backend's sink, 64 KiB writes as
//! fast as they go, on `--conns` connections; MB/s over the measured window.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::time::sleep;

use crate::common::{BULK_CHUNK, MODE_SINK, Run, TimedArgs, WARMUP};
use crate::conn::{connect, tls_note};
use crate::procfs::CpuWindow;

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
    let bytes = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    for _ in 0..conns {
        let (run, bytes, stop, target) = (run.clone(), bytes.clone(), stop.clone(), target.clone());
        tokio::spawn(async move {
            let mut s = match connect(&target).await {
                Ok(s) => s,
                Err(e) => return run.error("connect", e),
            };
            if let Err(e) = s.write_all(&[MODE_SINK]).await {
                return run.error("write", e);
            }
            let buf = vec![0x5au8; BULK_CHUNK];
            while !stop.load(Relaxed) {
                match s.write(&buf).await {
                    Ok(n) => {
                        bytes.fetch_add(n as u64, Relaxed);
                    }
                    Err(e) => return run.error("write", e),
                }
            }
        });
    }
    // Bytes written during the window; socket buffers are full at both ends of
    // the window (steady state), so this equals what the sink received.
    sleep(WARMUP).await;
    let b0 = bytes.load(Relaxed);
    let cpu = CpuWindow::start(cpu_pid);
    let t0 = Instant::now();
    sleep(Duration::from_secs_f64(seconds)).await;
    let b1 = bytes.load(Relaxed);
    let dt = t0.elapsed().as_secs_f64();
    let cpu = cpu.finish();
    stop.store(true, Relaxed);
    let b = b1 - b0;
    println!(
        "mode=throughput conns={conns} seconds={dt:.3} bytes={b} mbps={:.1}{cpu}{} errors={}",
        b as f64 / dt / 1e6,
        tls_note(),
        run.errors.load(Relaxed)
    );
}
