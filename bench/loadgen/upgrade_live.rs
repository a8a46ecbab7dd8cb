//! `loadgen upgrade --load live`: established connections across one
//! upgrade of the proxy (interlude moves them to the new process; HAProxy's
//! stay in its old worker).
//!
//! 1. Opens `--idle` idle connections (64 at a time; each sends `E` and one
//!    byte and reads the echo, so it is set up end to end, then stays silent)
//!    and `--conns` streaming ones: each sends an 8-byte sequence number
//!    every 5-10 ms (the period differs per stream) and a reader reads the
//!    echoes, checks the number (the next expected one; anything else counts
//!    as reordered, a gap as lost) and timestamps each.
//! 2. After the warm-up and `--calm` seconds: reads the serving process's
//!    VmRSS, upgrades once (as `--load conn`), reads the new process's VmRSS
//!    as soon as the upgrade returned, waits for the old process to exit (at
//!    most `--wait` seconds after the upgrade returned), `--calm` seconds
//!    more, then the new process's VmRSS again.
//! 3. Stops the writers, waits (at most 5 s) for every echo, then checks
//!    every idle connection: one byte written, its echo read (5 s).
//!
//! The stall: the longest gap between two successive echoes of one stream
//! that overlaps the window from the start of the upgrade until the old
//! process exited (or the wait ran out); `calm_gap_ms` is the same outside.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::time::{MissedTickBehavior, interval, sleep, timeout};

use crate::common::{MODE_ECHO, OP_TIMEOUT, OPEN_CONCURRENCY, WARMUP, connect_tcp, show, timed_out};
use crate::control::{control, json_value};
use crate::procfs::rss_kib;
use crate::upgrade::{Args, Upgrader, ended, note_pid, upgrade_failed, us};

/// A streaming message: its sequence number.
const SEQ_LEN: usize = 8;

#[derive(Default)]
struct Streams {
    stop: AtomicBool,
    /// Writes or reads that failed (reset, closed, timed out).
    errors: AtomicU64,
    /// Echoes whose number was not the next one expected.
    reordered: AtomicU64,
    sent: AtomicU64,
    received: AtomicU64,
    printed: AtomicU64,
}

impl Streams {
    fn fail(&self, what: &str, e: &io::Error) {
        self.errors.fetch_add(1, Relaxed);
        if self.printed.fetch_add(1, Relaxed) < 5 {
            eprintln!("loadgen upgrade live: {what}: {e}");
        }
    }
}

/// Connect, `E` plus one byte, read the echo: a connection set up end to end.
async fn open_one(target: &str) -> io::Result<TcpStream> {
    let mut s = connect_tcp(target).await?;
    let mut b = [0u8; 1];
    timeout(OP_TIMEOUT, async {
        s.write_all(&[MODE_ECHO, b'i']).await?;
        s.read_exact(&mut b).await
    })
    .await
    .map_err(|_| timed_out("first echo"))??;
    if b[0] != b'i' {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "first echo differs"));
    }
    Ok(s)
}

/// Opens `n` connections, `OPEN_CONCURRENCY` at a time; returns those open.
async fn open_many(target: &str, n: usize) -> (Vec<TcpStream>, u64) {
    let sem = Arc::new(tokio::sync::Semaphore::new(OPEN_CONCURRENCY));
    let mut tasks = Vec::with_capacity(n);
    for _ in 0..n {
        let (sem, target) = (sem.clone(), target.to_string());
        tasks.push(tokio::spawn(async move {
            let _permit = sem.acquire_owned().await.map_err(io::Error::other)?;
            open_one(&target).await
        }));
    }
    let mut open = Vec::with_capacity(n);
    let mut errors = 0u64;
    for t in tasks {
        match t.await {
            Ok(Ok(s)) => open.push(s),
            Ok(Err(e)) => {
                if errors < 5 {
                    eprintln!("loadgen upgrade live: opening: {e}");
                }
                errors += 1;
            }
            Err(_) => errors += 1,
        }
    }
    (open, errors)
}

/// Sends a numbered message every `period` until told to stop.
async fn writer(mut w: OwnedWriteHalf, period: Duration, streams: Arc<Streams>, sent: Arc<AtomicU64>) {
    let mut tick = interval(period);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut seq = 0u64;
    while !streams.stop.load(Relaxed) {
        tick.tick().await;
        match timeout(OP_TIMEOUT, w.write_all(&seq.to_be_bytes())).await {
            Ok(Ok(())) => {
                seq += 1;
                sent.store(seq, Relaxed);
                streams.sent.fetch_add(1, Relaxed);
            }
            Ok(Err(e)) => return streams.fail("write", &e),
            Err(_) => return streams.fail("write", &timed_out("write")),
        }
    }
}

/// Reads the echoes, checks their numbers and timestamps each, until the
/// writer stopped and every message sent came back (or one is 5 s late).
async fn reader(
    mut r: OwnedReadHalf,
    streams: Arc<Streams>,
    sent: Arc<AtomicU64>,
    times: Arc<Mutex<Vec<u64>>>,
    base: Instant,
) {
    let mut expected = 0u64;
    let mut b = [0u8; SEQ_LEN];
    loop {
        if streams.stop.load(Relaxed) && expected >= sent.load(Relaxed) {
            return;
        }
        match timeout(OP_TIMEOUT, r.read_exact(&mut b)).await {
            Ok(Ok(_)) => {
                let t = us(base);
                let got = u64::from_be_bytes(b);
                if got != expected {
                    streams.reordered.fetch_add(1, Relaxed);
                    if streams.printed.fetch_add(1, Relaxed) < 5 {
                        eprintln!("loadgen upgrade live: echo {got}, expected {expected}");
                    }
                }
                expected = got + 1;
                streams.received.fetch_add(1, Relaxed);
                if let Ok(mut v) = times.lock() {
                    v.push(t);
                }
            }
            Ok(Err(e)) => return streams.fail("read", &e),
            Err(_) => return streams.fail("read", &timed_out("echo")),
        }
    }
}

/// One byte written on an idle connection, its echo read.
async fn check_idle(mut s: TcpStream) -> io::Result<()> {
    let mut b = [0u8; 1];
    timeout(OP_TIMEOUT, async {
        s.write_all(b"j").await?;
        s.read_exact(&mut b).await
    })
    .await
    .map_err(|_| timed_out("idle echo"))??;
    if b[0] != b'j' {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "idle echo differs"));
    }
    Ok(())
}

/// Descriptors open in `pid` (what an old process still holds), if readable.
fn open_fds(pid: i32) -> Option<usize> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
}

fn mib(kib: Option<u64>) -> Option<String> {
    kib.map(|k| format!("{:.1}", k as f64 / 1024.0))
}

pub async fn run(a: Args, upgrader: Upgrader) {
    let wait = Duration::from_secs_f64(a.wait);
    let calm = Duration::from_secs_f64(a.calm);
    let pids_file = a.pids_file.as_deref();
    let old = match upgrader.pid().await {
        Ok(p) => p,
        Err(e) => upgrade_failed(&format!("the proxy's pid: {e}")),
    };
    note_pid(pids_file, old);
    let mut errors = 0u64;

    let t_open = Instant::now();
    let (idle, idle_open_errors) = open_many(&a.target, a.idle).await;
    let open_seconds = t_open.elapsed().as_secs_f64();
    eprintln!(
        "loadgen upgrade live: {} idle connections open in {open_seconds:.2} s ({idle_open_errors} failed)",
        idle.len()
    );
    let (streams_open, stream_open_errors) = open_many(&a.target, a.conns).await;
    errors += idle_open_errors + stream_open_errors;

    let base = Instant::now();
    let streams = Arc::new(Streams::default());
    let mut times = Vec::with_capacity(a.conns);
    let mut tasks = Vec::with_capacity(2 * a.conns);
    for (i, s) in streams_open.into_iter().enumerate() {
        let (r, w) = s.into_split();
        let t = Arc::new(Mutex::new(Vec::with_capacity(4096)));
        times.push(t.clone());
        let sent = Arc::new(AtomicU64::new(0));
        let period = Duration::from_millis(5 + (i % 6) as u64);
        tasks.push(tokio::spawn(writer(w, period, streams.clone(), sent.clone())));
        tasks.push(tokio::spawn(reader(r, streams.clone(), sent, t, base)));
    }
    sleep(WARMUP).await;
    let from = us(base);
    sleep(calm).await;

    let rss_before = rss_kib(old as u32);
    let fds_before = open_fds(old);
    if let Err(e) = upgrader.prepare() {
        upgrade_failed(&format!("replacing the binary: {e}"));
    }
    let t0 = Instant::now();
    let w0 = us(base);
    let upgraded = upgrader.upgrade(old, wait).await;
    let returned = t0.elapsed();
    let new = match upgraded {
        Ok(new) => {
            note_pid(pids_file, new);
            Some(new)
        }
        Err(e) => {
            eprintln!("loadgen upgrade live: {e}");
            errors += 1;
            None
        }
    };
    let rss_serving = new.and_then(|p| rss_kib(p as u32));
    let gone = loop {
        if ended(old) {
            break Some(t0.elapsed());
        }
        if new.is_none() || t0.elapsed() >= returned + wait {
            break None;
        }
        sleep(Duration::from_millis(2)).await;
    };
    let w1 = us(base);
    let old_fds_left = if gone.is_none() { open_fds(old) } else { None };
    eprintln!(
        "loadgen upgrade live: pid {old} -> {}: serving after {:.1} ms, old one {}",
        new.map_or("-".to_string(), |p| p.to_string()),
        returned.as_secs_f64() * 1000.0,
        gone.map_or(
            format!(
                "still running {:.1} s after the upgrade returned ({} fds open)",
                wait.as_secs_f64(),
                show(old_fds_left.map(|n| n.to_string()))
            ),
            |d| format!("gone after {:.1} ms", d.as_secs_f64() * 1000.0)
        )
    );
    sleep(calm).await;
    let rss_after = new.and_then(|p| rss_kib(p as u32));
    let fds_after = new.and_then(open_fds);
    // interlude: the connections the new process reports.
    let active = match (&upgrader, new) {
        (Upgrader::Interlude { control: path, .. }, Some(_)) => match control(path, "GET", "/status").await {
            Ok((200, body)) => json_value(&body, "active").map(str::to_string),
            _ => None,
        },
        _ => None,
    };
    let to = us(base);

    // Stop the writers; the readers end once every echo came back.
    streams.stop.store(true, Relaxed);
    let drained = timeout(OP_TIMEOUT + Duration::from_secs(1), async {
        for t in tasks {
            let _ = t.await;
        }
    })
    .await
    .is_ok();
    let sent = streams.sent.load(Relaxed);
    let received = streams.received.load(Relaxed);
    let lost = sent.saturating_sub(received);

    // Every idle connection: still open, and it echoes one byte.
    let sem = Arc::new(tokio::sync::Semaphore::new(256));
    let mut checks = Vec::with_capacity(idle.len());
    for s in idle {
        let sem = sem.clone();
        checks.push(tokio::spawn(async move {
            let _permit = sem.acquire_owned().await.map_err(io::Error::other)?;
            check_idle(s).await
        }));
    }
    let (mut idle_ok, mut idle_failed) = (0u64, 0u64);
    for c in checks {
        match c.await {
            Ok(Ok(())) => idle_ok += 1,
            Ok(Err(e)) => {
                if idle_failed < 5 {
                    eprintln!("loadgen upgrade live: idle connection: {e}");
                }
                idle_failed += 1;
            }
            Err(_) => idle_failed += 1,
        }
    }

    // The longest gap between two echoes of one stream overlapping the
    // window, and the longest outside it.
    let (mut stall, mut calm_gap) = (0u64, 0u64);
    for t in &times {
        let v = t.lock().map(|v| v.clone()).unwrap_or_default();
        let mut prev = from;
        for t in v.into_iter().filter(|&t| t > from && t <= to).chain([to]) {
            let gap = t - prev;
            if t > w0 && prev < w1 {
                stall = stall.max(gap);
            } else {
                calm_gap = calm_gap.max(gap);
            }
            prev = t;
        }
    }
    let stream_errors = streams.errors.load(Relaxed);
    let reordered = streams.reordered.load(Relaxed);
    let ms = |d: Option<Duration>| d.map(|d| format!("{:.1}", d.as_secs_f64() * 1000.0));
    println!(
        "mode=upgrade load=live idle={} idle_open={} streams={} open_seconds={open_seconds:.3} upgraded={} \
         serve_ms={} old_exit_ms={} old_alive={} old_fds_left={} stall_ms={:.1} calm_gap_ms={:.1} \
         sent={sent} received={received} lost={lost} reordered={reordered} stream_errors={stream_errors} drained={} \
         idle_ok={idle_ok} idle_failed={idle_failed} rss_before_mib={} rss_serving_mib={} rss_after_mib={} \
         fds_before={} fds_after={} active={} old_pid={old} new_pid={} errors={errors}",
        a.idle,
        idle_ok + idle_failed,
        a.conns,
        u8::from(new.is_some()),
        show(new.map(|_| format!("{:.1}", returned.as_secs_f64() * 1000.0))),
        show(ms(gone)),
        u8::from(gone.is_none()),
        show(old_fds_left.map(|n| n.to_string())),
        stall as f64 / 1000.0,
        calm_gap as f64 / 1000.0,
        u8::from(drained),
        show(mib(rss_before)),
        show(mib(rss_serving)),
        show(mib(rss_after)),
        show(fds_before.map(|n| n.to_string())),
        show(fds_after.map(|n| n.to_string())),
        show(active),
        show(new.map(|p| p.to_string())),
    );
}
