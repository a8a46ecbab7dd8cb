//! `loadgen upgrade`: replaces the proxy's process `--upgrades` times while a
//! load runs through it, and reports what the clients saw.
//!
//! The load (`--load`): `conn`, `--conns` workers each looping connect, a
//! 64-byte echo, close; or `http`, `--conns` keep-alive HTTP/1.1 connections
//! each looping `GET /small`. Every failure counts: refused, reset, closed
//! early (a short read, or a keep-alive connection closed under a request),
//! timed out (5 s), a wrong answer.
//!
//! The upgrade: interlude (`--program`, `--binary`, `--config`,
//! `--control-unix`): the daemon runs from `--program`, a copy of the binary;
//! each round copies `--binary` next to it and renames the copy over it (as a
//! package upgrade does), then runs `PROGRAM upgrade -c CONFIG`, which
//! returns once the new process serves; its wall time is the round's
//! `serve` time. The pids come from `GET /status`. HAProxy
//! (`--haproxy-master`): `reload` on the master CLI, then `show proc` until
//! it lists a new worker; that is the round's `serve` time.
//!
//! Each round is a window from the start of the upgrade until the old process
//! (interlude's previous pid, HAProxy's previous worker) has exited, or
//! `--wait` seconds after the upgrade returned. The stall of a round is the
//! longest time any worker went without completing an operation, over the
//! gaps that overlap the window; `calm_gap_ms` is the same over the time
//! outside the windows (the noise floor). `--calm` seconds pass before the
//! first round and after each one.

use std::io;
use std::path::Path;
use std::process::exit;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::time::{sleep, timeout};

use crate::common::{MODE_ECHO, MSG_LEN, OP_TIMEOUT, WARMUP, connect_tcp, positive_count, secs, show};
use crate::control::{control, json_value};
use crate::http::{HTTP_SMALL_LEN, HTTP_SMALL_PATH, HttpConn, http_request};

#[derive(clap::Args)]
pub struct Args {
    /// Address of the proxy under test.
    #[arg(long, value_name = "ADDR")]
    pub target: String,
    /// The load: new connections (echo) or keep-alive HTTP requests.
    #[arg(long, value_enum)]
    pub load: Load,
    /// Workers (conn), keep-alive connections (http) or streaming connections (live).
    #[arg(long, default_value_t = 16, value_parser = positive_count)]
    pub conns: usize,
    /// live: idle connections opened (and checked after the upgrade) beside the streaming ones.
    #[arg(long, default_value_t = 0)]
    pub idle: usize,
    /// Upgrades to do, one after the other.
    #[arg(long, default_value_t = 3, value_parser = positive_count)]
    pub upgrades: usize,
    /// Seconds of load before the first upgrade and after each one.
    #[arg(long, default_value_t = 1.0, value_parser = secs)]
    pub calm: f64,
    /// Seconds to wait, after an upgrade returned, for the old process to exit.
    #[arg(long, default_value_t = 10.0, value_parser = secs)]
    pub wait: f64,
    /// interlude: the file the daemon runs from (replaced before each upgrade).
    #[arg(long, value_name = "PATH", requires_all = ["binary", "config", "control_unix"])]
    pub program: Option<String>,
    /// interlude: the binary copied over --program before each upgrade.
    #[arg(long, value_name = "PATH")]
    pub binary: Option<String>,
    /// interlude: its config (for `interlude upgrade -c CONFIG`).
    #[arg(long, value_name = "PATH")]
    pub config: Option<String>,
    /// interlude: its control socket (for the pids, from GET /status).
    #[arg(long, value_name = "PATH")]
    pub control_unix: Option<String>,
    /// HAProxy: its master CLI socket (`haproxy -W -S PATH`).
    #[arg(long, value_name = "PATH", conflicts_with = "program")]
    pub haproxy_master: Option<String>,
    /// Append every pid of the proxy seen (one a line), for the caller's cleanup.
    #[arg(long, value_name = "PATH")]
    pub pids_file: Option<String>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum Load {
    Conn,
    Http,
    /// Established connections across one upgrade: `--idle` idle ones and
    /// `--conns` streaming numbered messages (see `upgrade_live.rs`).
    Live,
}

/// How a round replaces the proxy's process.
pub(crate) enum Upgrader {
    Interlude {
        program: String,
        binary: String,
        config: String,
        control: String,
    },
    Haproxy {
        master: String,
    },
}

impl Upgrader {
    /// The pid serving now: interlude's daemon, HAProxy's current worker.
    pub(crate) async fn pid(&self) -> io::Result<i32> {
        match self {
            Upgrader::Interlude { control: path, .. } => {
                let (code, body) = control(path, "GET", "/status").await?;
                json_value(&body, "pid")
                    .and_then(|v| v.parse().ok())
                    .filter(|_| code == 200)
                    .ok_or_else(|| io::Error::other(format!("GET /status: {code} without a pid")))
            }
            Upgrader::Haproxy { master } => {
                let text = master_cli(master, "show proc").await?;
                current_worker(&text)
                    .ok_or_else(|| io::Error::other(format!("show proc: no worker in {text:?}")))
            }
        }
    }

    /// What happens before the clock starts: interlude's binary is replaced
    /// (a copy renamed over the file it runs from).
    pub(crate) fn prepare(&self) -> io::Result<()> {
        if let Upgrader::Interlude { program, binary, .. } = self {
            let staged = format!("{program}.loadgen-new");
            std::fs::copy(binary, &staged)?;
            std::fs::rename(&staged, program)?;
        }
        Ok(())
    }

    /// Upgrades, returning once the new process serves; `old` is the pid
    /// serving before. Returns the new pid.
    pub(crate) async fn upgrade(&self, old: i32, wait: Duration) -> io::Result<i32> {
        match self {
            Upgrader::Interlude { program, config, .. } => {
                let out = tokio::process::Command::new(program)
                    .args(["upgrade", "--timeout", "30s", "-c", config])
                    .kill_on_drop(true)
                    .output()
                    .await?;
                if !out.status.success() {
                    return Err(io::Error::other(format!(
                        "interlude upgrade: {}: {}",
                        out.status,
                        String::from_utf8_lossy(&out.stderr).trim()
                    )));
                }
                let new = self.pid().await?;
                if new == old {
                    return Err(io::Error::other(format!(
                        "interlude upgrade returned, pid still {old}"
                    )));
                }
                Ok(new)
            }
            Upgrader::Haproxy { master } => {
                // HAProxy 2.6 answers nothing: the master re-executes itself
                // and the connection ends.
                let _ = master_cli(master, "reload").await;
                let t0 = Instant::now();
                loop {
                    if let Ok(text) = master_cli(master, "show proc").await
                        && let Some(pid) = current_worker(&text).filter(|&p| p != old)
                    {
                        return Ok(pid);
                    }
                    if t0.elapsed() > wait {
                        return Err(io::Error::other("no new HAProxy worker after reload"));
                    }
                    sleep(Duration::from_millis(2)).await;
                }
            }
        }
    }
}

/// One command on HAProxy's master CLI (non-interactive: it answers once
/// the client has shut its side down, then closes).
async fn master_cli(path: &str, command: &str) -> io::Result<String> {
    timeout(OP_TIMEOUT, async {
        let mut s = UnixStream::connect(path).await?;
        s.write_all(format!("{command}\n").as_bytes()).await?;
        s.shutdown().await?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    })
    .await
    .map_err(|_| {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!("master CLI {command:?} timed out"),
        )
    })?
}

/// The first pid listed under `# workers` in `show proc` (old workers have
/// a section of their own).
fn current_worker(show_proc: &str) -> Option<i32> {
    let mut lines = show_proc.lines().skip_while(|l| !l.starts_with("# workers"));
    lines.next()?;
    let line = lines.next().filter(|l| !l.starts_with('#'))?;
    line.split_whitespace().next()?.parse().ok()
}

/// Whether a process has ended (gone, or a zombie not yet reaped).
pub(crate) fn ended(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
    }
}

/// The clients' tallies.
#[derive(Default)]
struct Tally {
    stop: AtomicBool,
    ok: AtomicU64,
    refused: AtomicU64,
    reset: AtomicU64,
    /// Closed early: a short read, or a keep-alive connection closed under a request.
    eof: AtomicU64,
    timeout: AtomicU64,
    /// A wrong answer (HTTP status or body length).
    bad: AtomicU64,
    other: AtomicU64,
    /// http: a response with `Connection: close` (not a failure).
    reconnects: AtomicU64,
    printed: AtomicU64,
}

impl Tally {
    fn fail(&self, e: &io::Error) {
        use io::ErrorKind::*;
        let counter = match e.kind() {
            ConnectionRefused => &self.refused,
            ConnectionReset | ConnectionAborted | BrokenPipe => &self.reset,
            UnexpectedEof => &self.eof,
            TimedOut => &self.timeout,
            InvalidData => &self.bad,
            _ => &self.other,
        };
        counter.fetch_add(1, Relaxed);
        if self.printed.fetch_add(1, Relaxed) < 5 {
            eprintln!("loadgen upgrade: {e}");
        }
    }
    fn failed(&self) -> u64 {
        [
            &self.refused,
            &self.reset,
            &self.eof,
            &self.timeout,
            &self.bad,
            &self.other,
        ]
        .iter()
        .map(|c| c.load(Relaxed))
        .sum()
    }
}

/// Microseconds since `base`.
pub(crate) fn us(base: Instant) -> u64 {
    base.elapsed().as_micros() as u64
}

/// Connect, one 64-byte echo, close.
async fn one_conn(target: &str) -> io::Result<()> {
    let mut s = connect_tcp(target).await?;
    let mut req = [0x75u8; 1 + MSG_LEN];
    req[0] = MODE_ECHO;
    let mut resp = [0u8; MSG_LEN];
    timeout(OP_TIMEOUT, async {
        s.write_all(&req).await?;
        s.read_exact(&mut resp).await
    })
    .await
    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "echo timed out"))??;
    if resp[..] != req[1..] {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "echo differs"));
    }
    Ok(())
}

/// A worker of the `conn` load: every completed echo's time goes to `done`.
async fn conn_worker(target: String, tally: Arc<Tally>, done: Arc<Mutex<Vec<u64>>>, base: Instant) {
    while !tally.stop.load(Relaxed) {
        match one_conn(&target).await {
            Ok(()) => {
                tally.ok.fetch_add(1, Relaxed);
                if let Ok(mut d) = done.lock() {
                    d.push(us(base));
                }
            }
            Err(e) => {
                tally.fail(&e);
                sleep(Duration::from_millis(1)).await;
            }
        }
    }
}

/// A keep-alive connection of the `http` load, looping `GET /small`; a
/// response with `Connection: close` makes it reconnect (not a failure).
async fn http_worker(target: String, tally: Arc<Tally>, done: Arc<Mutex<Vec<u64>>>, base: Instant) {
    let req = http_request(HTTP_SMALL_PATH, &target);
    let mut conn: Option<HttpConn> = None;
    let mut first = true;
    while !tally.stop.load(Relaxed) {
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match HttpConn::connect(&target).await {
                Ok(c) => {
                    if !first {
                        tally.reconnects.fetch_add(1, Relaxed);
                    }
                    first = false;
                    conn.insert(c)
                }
                Err(e) => {
                    tally.fail(&e);
                    sleep(Duration::from_millis(1)).await;
                    continue;
                }
            },
        };
        let result = match timeout(OP_TIMEOUT, c.exchange(&req, &|_| {})).await {
            Ok(Ok(r)) => {
                if r.close {
                    conn = None;
                }
                if r.status != 200 || r.body != HTTP_SMALL_LEN as u64 {
                    Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("status {}, body of {} bytes", r.status, r.body),
                    ))
                } else {
                    Ok(())
                }
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no complete response within 5 s",
            )),
        };
        match result {
            Ok(()) => {
                tally.ok.fetch_add(1, Relaxed);
                if let Ok(mut d) = done.lock() {
                    d.push(us(base));
                }
            }
            Err(e) => {
                if !tally.stop.load(Relaxed) {
                    tally.fail(&e);
                }
                conn = None;
                sleep(Duration::from_millis(1)).await;
            }
        }
    }
}

pub(crate) fn upgrade_failed(why: &str) -> ! {
    eprintln!("loadgen upgrade: {why}");
    println!("mode=upgrade failed=- errors=1");
    exit(0)
}

pub(crate) fn note_pid(file: Option<&str>, pid: i32) {
    let Some(file) = file else { return };
    let line = format!("{pid}\n");
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(Path::new(file))
        .and_then(|mut f| std::io::Write::write_all(&mut f, line.as_bytes()));
    if let Err(e) = written {
        eprintln!("loadgen upgrade: {file}: {e}");
    }
}

fn median(v: &[f64]) -> Option<f64> {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => None,
        n if n % 2 == 1 => Some(s[n / 2]),
        n => Some((s[n / 2 - 1] + s[n / 2]) / 2.0),
    }
}

fn list(v: &[f64]) -> String {
    if v.is_empty() {
        return "-".to_string();
    }
    v.iter().map(|x| format!("{x:.1}")).collect::<Vec<_>>().join(",")
}

pub async fn run(a: Args) {
    let upgrader = match (
        a.program.clone(),
        a.binary.clone(),
        a.config.clone(),
        a.control_unix.clone(),
        a.haproxy_master.clone(),
    ) {
        (Some(program), Some(binary), Some(config), Some(control), None) => Upgrader::Interlude {
            program,
            binary,
            config,
            control,
        },
        (None, _, _, _, Some(master)) => Upgrader::Haproxy { master },
        _ => upgrade_failed("needs --program, --binary, --config and --control-unix, or --haproxy-master"),
    };
    if let Load::Live = a.load {
        return crate::upgrade_live::run(a, upgrader).await;
    }
    let wait = Duration::from_secs_f64(a.wait);
    let calm = Duration::from_secs_f64(a.calm);
    let pids_file = a.pids_file.as_deref();
    let mut pid = match upgrader.pid().await {
        Ok(p) => p,
        Err(e) => upgrade_failed(&format!("the proxy's pid: {e}")),
    };
    note_pid(pids_file, pid);
    let mut pids = vec![pid];

    let base = Instant::now();
    let tally = Arc::new(Tally::default());
    let mut done = Vec::with_capacity(a.conns);
    for _ in 0..a.conns {
        let d = Arc::new(Mutex::new(Vec::with_capacity(1 << 16)));
        done.push(d.clone());
        let (target, tally) = (a.target.clone(), tally.clone());
        match a.load {
            Load::Conn => tokio::spawn(conn_worker(target, tally, d, base)),
            Load::Http | Load::Live => tokio::spawn(http_worker(target, tally, d, base)),
        };
    }
    sleep(WARMUP).await;
    let from = us(base);
    sleep(calm).await;

    // Per round: the window (us since base), the serve and old-exit times (ms).
    let mut windows = Vec::new();
    let (mut serve, mut old_exit) = (Vec::new(), Vec::new());
    let mut errors = 0u64;
    for round in 1..=a.upgrades {
        if let Err(e) = upgrader.prepare() {
            eprintln!("loadgen upgrade: round {round}: replacing the binary: {e}");
            errors += 1;
            break;
        }
        let t0 = Instant::now();
        let w0 = us(base);
        let new = match upgrader.upgrade(pid, wait).await {
            Ok(new) => new,
            Err(e) => {
                eprintln!("loadgen upgrade: round {round}: {e}");
                windows.push((w0, us(base)));
                errors += 1;
                break;
            }
        };
        let returned = t0.elapsed();
        serve.push(returned.as_secs_f64() * 1000.0);
        note_pid(pids_file, new);
        pids.push(new);
        // Until the old process is gone, or `wait` after the upgrade returned.
        let gone = loop {
            if ended(pid) {
                break Some(t0.elapsed());
            }
            if t0.elapsed() >= returned + wait {
                break None;
            }
            sleep(Duration::from_millis(2)).await;
        };
        windows.push((w0, us(base)));
        match gone {
            Some(d) => old_exit.push(d.as_secs_f64() * 1000.0),
            None => eprintln!(
                "loadgen upgrade: round {round}: old pid {pid} still running {:.1} s after the upgrade returned",
                wait.as_secs_f64()
            ),
        }
        eprintln!(
            "loadgen upgrade: round {round}: pid {pid} -> {new}: serving after {:.1} ms, old one {}",
            returned.as_secs_f64() * 1000.0,
            gone.map_or("still running".to_string(), |d| format!(
                "gone after {:.1} ms",
                d.as_secs_f64() * 1000.0
            ))
        );
        pid = new;
        sleep(calm).await;
    }
    let to = us(base);
    tally.stop.store(true, Relaxed);

    // Gaps between successive completions of each worker (from `from`, with
    // an open gap up to `to`): the longest overlapping each window, and the
    // longest outside them.
    let mut stall = vec![0u64; windows.len()];
    let mut calm_gap = 0u64;
    for d in &done {
        let times = d.lock().map(|v| v.clone()).unwrap_or_default();
        let mut prev = from;
        for t in times.into_iter().filter(|&t| t > from && t <= to).chain([to]) {
            let gap = t - prev;
            let mut inside = false;
            for (i, &(w0, w1)) in windows.iter().enumerate() {
                if t > w0 && prev < w1 {
                    inside = true;
                    stall[i] = stall[i].max(gap);
                }
            }
            if !inside {
                calm_gap = calm_gap.max(gap);
            }
            prev = t;
        }
    }
    let stall_ms: Vec<f64> = stall.iter().map(|&v| v as f64 / 1000.0).collect();
    let max = |v: &[f64]| v.iter().copied().reduce(f64::max);
    let f = |v: Option<f64>| v.map(|v| format!("{v:.1}"));
    if serve.len() < a.upgrades {
        errors += 1;
    }
    let ops = tally.ok.load(Relaxed);
    let n = |c: &AtomicU64| c.load(Relaxed);
    println!(
        "mode=upgrade load={} conns={} upgrades={} done={} seconds={:.3} ops={ops} failed={} refused={} reset={} \
         eof={} timeout={} bad={} other={} reconnects={} stall_ms={} stall_all={} calm_gap_ms={:.1} \
         serve_median_ms={} serve_max_ms={} serve_all={} old_exit_all={} pids={} final_pid={pid} errors={errors}",
        match a.load {
            Load::Conn => "conn",
            Load::Http | Load::Live => "http",
        },
        a.conns,
        a.upgrades,
        serve.len(),
        (to - from) as f64 / 1e6,
        tally.failed(),
        n(&tally.refused),
        n(&tally.reset),
        n(&tally.eof),
        n(&tally.timeout),
        n(&tally.bad),
        n(&tally.other),
        n(&tally.reconnects),
        show(f(max(&stall_ms))),
        list(&stall_ms),
        calm_gap as f64 / 1000.0,
        show(f(median(&serve))),
        show(f(max(&serve))),
        list(&serve),
        list(&old_exit),
        pids.iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
    );
}
