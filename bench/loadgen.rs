//! Load generator and backend for `bench/run`. Uses only tokio and std.
//!
//! Subcommands:
//!   serve      --listen ADDR [--lifetime SECS]     backend: the first byte of each
//!              connection picks the mode: 'E' echo, 'S' sink (read and discard).
//!   throughput --target ADDR --seconds N --conns N  bulk upload to the sink
//!   rr         --target ADDR --seconds N --conns N  64-byte request/response (echo)
//!   connrate   --target ADDR --seconds N --conns N  connect, 64 B echo, close
//!   idle       --target ADDR --conns N [--hold SECS] open N idle connections, hold
//!   freeports  --count N                           print N free loopback TCP ports
//!
//! Every client mode prints exactly one `key=value ...` line on stdout. Timed modes
//! run a fixed warm-up (not counted), then measure over `--seconds`, then exit
//! without waiting for in-flight operations, so a run never outlasts its budget.

use std::process::exit;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{sleep, timeout};

const MODE_ECHO: u8 = b'E';
const MODE_SINK: u8 = b'S';
const MSG_LEN: usize = 64;
const BULK_CHUNK: usize = 64 * 1024;
const WARMUP: Duration = Duration::from_millis(500);
const OP_TIMEOUT: Duration = Duration::from_secs(5);

const PHASE_WARMUP: u8 = 0;
const PHASE_MEASURE: u8 = 1;
const PHASE_DONE: u8 = 2;

struct Opts {
    listen: Option<String>,
    target: Option<String>,
    seconds: f64,
    conns: usize,
    threads: usize,
    hold: f64,
    lifetime: f64,
    count: usize,
}

fn usage() -> ! {
    eprintln!(
        "usage: loadgen serve --listen ADDR [--lifetime SECS]\n       \
         loadgen throughput|rr|connrate --target ADDR [--seconds N] [--conns N]\n       \
         loadgen idle --target ADDR --conns N [--hold SECS]\n       \
         loadgen freeports [--count N]\n       \
         common: [--threads N] (tokio worker threads, default 2)"
    );
    exit(2)
}

fn parse_num<T: std::str::FromStr>(flag: &str, v: Option<String>) -> T {
    match v.as_deref().map(str::parse) {
        Some(Ok(n)) => n,
        _ => {
            eprintln!("loadgen: {flag} needs a numeric value");
            usage()
        }
    }
}

fn parse_args() -> (String, Opts) {
    let mut args = std::env::args().skip(1);
    let cmd = args.next().unwrap_or_else(|| usage());
    let mut o = Opts {
        listen: None,
        target: None,
        seconds: 3.0,
        conns: 1,
        threads: 2,
        hold: 60.0,
        lifetime: 1800.0,
        count: 1,
    };
    while let Some(flag) = args.next() {
        match flag.as_str() {
            "--listen" => o.listen = args.next(),
            "--target" => o.target = args.next(),
            "--seconds" => o.seconds = parse_num(&flag, args.next()),
            "--conns" => o.conns = parse_num(&flag, args.next()),
            "--threads" => o.threads = parse_num(&flag, args.next()),
            "--hold" => o.hold = parse_num(&flag, args.next()),
            "--lifetime" => o.lifetime = parse_num(&flag, args.next()),
            "--count" => o.count = parse_num(&flag, args.next()),
            _ => {
                eprintln!("loadgen: unknown argument {flag}");
                usage()
            }
        }
    }
    if o.conns == 0 || o.threads == 0 || o.seconds.is_nan() || o.seconds <= 0.0 {
        usage()
    }
    (cmd, o)
}

fn main() {
    let (cmd, o) = parse_args();
    if cmd == "freeports" {
        freeports(o.count);
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(o.threads)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let target = || o.target.clone().unwrap_or_else(|| usage());
    match cmd.as_str() {
        "serve" => rt.block_on(serve(o.listen.clone().unwrap_or_else(|| usage()), o.lifetime)),
        "throughput" => rt.block_on(throughput(target(), o.conns, o.seconds)),
        "rr" => rt.block_on(rr(target(), o.conns, o.seconds)),
        "connrate" => rt.block_on(connrate(target(), o.conns, o.seconds)),
        "idle" => rt.block_on(idle(target(), o.conns, o.hold)),
        _ => usage(),
    }
    // Do not wait for tasks still blocked in I/O: the measurement is over.
    exit(0);
}

fn freeports(count: usize) {
    // Keep all listeners open until every port is known, so they are distinct.
    let ls: Vec<_> = (0..count)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0"))
        .collect();
    let ports: Vec<String> = ls
        .iter()
        .map(|l| l.local_addr().unwrap().port().to_string())
        .collect();
    println!("{}", ports.join(" "));
}

// ---------------------------------------------------------------- backend

async fn serve(listen: String, lifetime: f64) {
    let l = TcpListener::bind(&listen).await.unwrap_or_else(|e| {
        eprintln!("loadgen serve: bind {listen}: {e}");
        exit(1)
    });
    eprintln!("loadgen serve: listening on {listen}");
    // Safety net: an orphaned backend exits by itself.
    tokio::spawn(async move {
        sleep(Duration::from_secs_f64(lifetime)).await;
        eprintln!("loadgen serve: lifetime reached, exiting");
        exit(0);
    });
    loop {
        match l.accept().await {
            Ok((s, _)) => {
                let _ = s.set_nodelay(true);
                tokio::spawn(handle(s));
            }
            Err(e) => {
                // e.g. EMFILE: back off instead of spinning.
                eprintln!("loadgen serve: accept: {e}");
                sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

async fn handle(mut s: TcpStream) {
    let mut mode = [0u8; 1];
    if s.read_exact(&mut mode).await.is_err() {
        return;
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
        _ => {}
    }
}

// ---------------------------------------------------------------- helpers

/// Latency histogram in microseconds: 1 us buckets below 10 ms, 100 us buckets
/// up to 1 s, one overflow bucket. Lock-free so tasks never need joining.
struct Hist {
    b: Vec<AtomicU64>,
}

const FINE_US: u64 = 10_000;
const COARSE_STEP_US: u64 = 100;
const MAX_US: u64 = 1_000_000;

impl Hist {
    fn new() -> Self {
        let n = FINE_US + (MAX_US - FINE_US) / COARSE_STEP_US + 1;
        Hist {
            b: (0..n).map(|_| AtomicU64::new(0)).collect(),
        }
    }
    fn record(&self, d: Duration) {
        let us = d.as_micros().min(u64::MAX as u128) as u64;
        let i = if us < FINE_US {
            us
        } else if us < MAX_US {
            FINE_US + (us - FINE_US) / COARSE_STEP_US
        } else {
            self.b.len() as u64 - 1
        };
        self.b[i as usize].fetch_add(1, Relaxed);
    }
    /// Upper bound (in us) of the bucket holding the p-quantile.
    fn quantile(&self, p: f64) -> u64 {
        let counts: Vec<u64> = self.b.iter().map(|c| c.load(Relaxed)).collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return 0;
        }
        let want = ((p * total as f64).ceil() as u64).max(1);
        let mut acc = 0;
        for (i, c) in counts.iter().enumerate() {
            acc += c;
            if acc >= want {
                let i = i as u64;
                return if i < FINE_US {
                    i
                } else {
                    FINE_US + (i - FINE_US + 1) * COARSE_STEP_US
                };
            }
        }
        MAX_US
    }
}

/// Shared state of a timed run: warm-up, then a measured window, then done.
struct Run {
    phase: AtomicU8,
    ops: AtomicU64,
    errors: AtomicU64,
    printed: AtomicU64,
    hist: Hist,
}

impl Run {
    fn new() -> Arc<Self> {
        Arc::new(Run {
            phase: AtomicU8::new(PHASE_WARMUP),
            ops: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            printed: AtomicU64::new(0),
            hist: Hist::new(),
        })
    }
    fn measuring(&self) -> bool {
        self.phase.load(Relaxed) == PHASE_MEASURE
    }
    fn done(&self) -> bool {
        self.phase.load(Relaxed) == PHASE_DONE
    }
    fn error(&self, what: &str, e: impl std::fmt::Display) {
        // Print only the first few errors; count all of them.
        self.errors.fetch_add(1, Relaxed);
        if self.printed.fetch_add(1, Relaxed) < 3 {
            eprintln!("loadgen: {what}: {e}");
        }
    }
    /// Warm up, measure for `seconds`, return the measured window length.
    async fn window(&self, seconds: f64) -> f64 {
        sleep(WARMUP).await;
        self.phase.store(PHASE_MEASURE, Relaxed);
        let t0 = Instant::now();
        sleep(Duration::from_secs_f64(seconds)).await;
        self.phase.store(PHASE_DONE, Relaxed);
        t0.elapsed().as_secs_f64()
    }
}

async fn connect(target: &str) -> std::io::Result<TcpStream> {
    let s = timeout(OP_TIMEOUT, TcpStream::connect(target))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    s.set_nodelay(true)?;
    Ok(s)
}

// ---------------------------------------------------------------- clients

async fn throughput(target: String, conns: usize, seconds: f64) {
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
    let t0 = Instant::now();
    sleep(Duration::from_secs_f64(seconds)).await;
    let b1 = bytes.load(Relaxed);
    let dt = t0.elapsed().as_secs_f64();
    stop.store(true, Relaxed);
    let b = b1 - b0;
    println!(
        "mode=throughput conns={conns} seconds={dt:.3} bytes={b} mbps={:.1} errors={}",
        b as f64 / dt / 1e6,
        run.errors.load(Relaxed)
    );
}

async fn rr(target: String, conns: usize, seconds: f64) {
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
    let dt = run.window(seconds).await;
    let n = run.ops.load(Relaxed);
    println!(
        "mode=rr conns={conns} seconds={dt:.3} reqs={n} rps={:.0} p50_us={} p99_us={} errors={}",
        n as f64 / dt,
        run.hist.quantile(0.50),
        run.hist.quantile(0.99),
        run.errors.load(Relaxed)
    );
}

async fn one_conn(target: &str) -> std::io::Result<()> {
    let mut s = connect(target).await?;
    let mut req = [0x62u8; 1 + MSG_LEN];
    req[0] = MODE_ECHO;
    let mut resp = [0u8; MSG_LEN];
    let io = async {
        s.write_all(&req).await?;
        s.read_exact(&mut resp).await?;
        Ok::<_, std::io::Error>(())
    };
    timeout(OP_TIMEOUT, io)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "echo timed out"))??;
    Ok(()) // dropping the stream closes it (client side closes first)
}

async fn connrate(target: String, workers: usize, seconds: f64) {
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
    let dt = run.window(seconds).await;
    let n = run.ops.load(Relaxed);
    println!(
        "mode=connrate conns={workers} seconds={dt:.3} ok={n} cps={:.0} p50_us={} p99_us={} errors={}",
        n as f64 / dt,
        run.hist.quantile(0.50),
        run.hist.quantile(0.99),
        run.errors.load(Relaxed)
    );
}

async fn idle(target: String, conns: usize, hold: f64) {
    // Open with bounded concurrency so listen backlogs never overflow; each
    // connection does one 1-byte echo so it is established end to end.
    let sem = Arc::new(tokio::sync::Semaphore::new(64));
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
