//! What every mode shares: the backend's first-byte selectors and sizes, the
//! options of the timed modes and their value checks, the latency histogram,
//! the phases of a timed run, and small helpers for result lines and errors.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tokio::time::{sleep, timeout};

use crate::conn::TlsArgs;
use crate::procfs::CpuWindow;

pub const MODE_ECHO: u8 = b'E';
pub const MODE_SINK: u8 = b'S';
pub const MODE_TAG: u8 = b'T';
pub const MSG_LEN: usize = 64;
pub const BULK_CHUNK: usize = 64 * 1024;
pub const WARMUP: Duration = Duration::from_millis(500);
pub const OP_TIMEOUT: Duration = Duration::from_secs(5);
/// Same as interlude's listeners (the kernel caps it at net.core.somaxconn):
/// a resume connects every held client to the backend at once.
pub const BACKEND_BACKLOG: u32 = 4096;
/// Connections being opened at once (connect + first write), so listen
/// backlogs never overflow while a test sets up.
pub const OPEN_CONCURRENCY: usize = 64;

const PHASE_WARMUP: u8 = 0;
pub const PHASE_MEASURE: u8 = 1;
pub const PHASE_DONE: u8 = 2;

/// Options of the timed client modes (throughput, rr, connrate).
#[derive(clap::Args)]
pub struct TimedArgs {
    /// Address to connect to (the backend, or a proxy in front of it).
    #[arg(long, value_name = "ADDR")]
    pub target: String,
    /// Measured seconds, after a 0.5 s warm-up.
    #[arg(long, default_value_t = 3.0, value_parser = positive_secs)]
    pub seconds: f64,
    /// Concurrent connections (workers, for connrate).
    #[arg(long, default_value_t = 1, value_parser = positive_count)]
    pub conns: usize,
    /// Pid of the proxy under test: its CPU time over the measured window
    /// (utime + stime, all threads, clock ticks) goes on the result line as
    /// `proxy_ticks`.
    #[arg(long, value_name = "PID")]
    pub cpu_pid: Option<u32>,
    #[command(flatten)]
    pub tls: TlsArgs,
}

impl TimedArgs {
    /// Sets up `--tls` (exiting on a bad certificate) and hands the options on.
    pub fn start(self) -> Self {
        self.tls.install();
        self
    }
}

/// A count that must be at least 1.
pub fn positive_count(s: &str) -> Result<usize, String> {
    match s.parse() {
        Ok(0) => Err("must be at least 1".to_string()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("{e}")),
    }
}

/// Seconds: a finite number, 0 or more.
pub fn secs(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        Ok(_) => Err("must be a finite number of seconds, 0 or more".to_string()),
        Err(e) => Err(format!("{e}")),
    }
}

/// Seconds: a finite number above 0.
pub fn positive_secs(s: &str) -> Result<f64, String> {
    let v = secs(s)?;
    if v > 0.0 {
        Ok(v)
    } else {
        Err("must be more than 0 seconds".to_string())
    }
}

/// Latency histogram in microseconds: 1 us buckets below 10 ms, 100 us buckets
/// up to 1 s, one overflow bucket. Lock-free so tasks never need joining.
pub struct Hist {
    b: Vec<AtomicU64>,
}

const FINE_US: u64 = 10_000;
const COARSE_STEP_US: u64 = 100;
const MAX_US: u64 = 1_000_000;

impl Hist {
    pub fn new() -> Self {
        let n = FINE_US + (MAX_US - FINE_US) / COARSE_STEP_US + 1;
        Hist {
            b: (0..n).map(|_| AtomicU64::new(0)).collect(),
        }
    }
    pub fn record(&self, d: Duration) {
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
    pub fn quantile(&self, p: f64) -> u64 {
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
pub struct Run {
    pub phase: AtomicU8,
    pub ops: AtomicU64,
    pub errors: AtomicU64,
    printed: AtomicU64,
    pub hist: Hist,
}

impl Run {
    pub fn new() -> Arc<Self> {
        Arc::new(Run {
            phase: AtomicU8::new(PHASE_WARMUP),
            ops: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            printed: AtomicU64::new(0),
            hist: Hist::new(),
        })
    }
    pub fn measuring(&self) -> bool {
        self.phase.load(Relaxed) == PHASE_MEASURE
    }
    pub fn done(&self) -> bool {
        self.phase.load(Relaxed) == PHASE_DONE
    }
    pub fn error(&self, what: &str, e: impl std::fmt::Display) {
        // Print only the first few errors; count all of them.
        self.errors.fetch_add(1, Relaxed);
        if self.printed.fetch_add(1, Relaxed) < 3 {
            eprintln!("loadgen: {what}: {e}");
        }
    }
    /// Warm up, measure for `seconds`; the measured window's length, and the
    /// `proxy_ticks` field of `cpu_pid` over it (see `CpuWindow`).
    pub async fn window(&self, seconds: f64, cpu_pid: Option<u32>) -> (f64, String) {
        sleep(WARMUP).await;
        self.phase.store(PHASE_MEASURE, Relaxed);
        let cpu = CpuWindow::start(cpu_pid);
        let t0 = Instant::now();
        sleep(Duration::from_secs_f64(seconds)).await;
        self.phase.store(PHASE_DONE, Relaxed);
        let dt = t0.elapsed().as_secs_f64();
        (dt, cpu.finish())
    }
}

/// TCP connect (bounded by OP_TIMEOUT), with Nagle off.
pub async fn connect_tcp(target: &str) -> std::io::Result<TcpStream> {
    let s = timeout(OP_TIMEOUT, TcpStream::connect(target))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    s.set_nodelay(true)?;
    Ok(s)
}

pub fn bad_data(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

pub fn timed_out(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, format!("{what} timed out"))
}

/// A result-line value, `-` when it is unknown.
/// The `p` quantile (0 = first, 1 = last) of sorted microseconds, in
/// milliseconds with one decimal; `None` if there are none.
pub fn quantile_ms(sorted_us: &[u64], p: f64) -> Option<String> {
    let i = ((p * sorted_us.len() as f64).ceil() as usize).clamp(1, sorted_us.len().max(1)) - 1;
    sorted_us.get(i).map(|us| format!("{:.1}", *us as f64 / 1000.0))
}

pub fn show<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "-".to_string(), |v| v.to_string())
}
