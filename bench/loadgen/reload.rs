//! `loadgen reload-latency` (interlude only): the proxy at `--target`
//! forwards to a backend tagged 'A' (`--config-a`) or 'B' (`--config-b`).
//! Each round writes the other file to a temp file next to `--config`, renames
//! it over `--config`, sends SIGHUP to `--pid` and times until a new
//! connection is answered by the other backend (one connection at a time,
//! back to back).

use std::io;
use std::process::exit;
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal, kill_process};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::{sleep, timeout};

use crate::common::{MODE_TAG, OP_TIMEOUT, connect_tcp, positive_count, secs, show, timed_out};

#[derive(clap::Args)]
pub struct Args {
    /// Address of the proxy under test.
    #[arg(long, value_name = "ADDR")]
    pub target: String,
    /// interlude's pid (it gets the SIGHUPs).
    #[arg(long)]
    pub pid: i32,
    /// The config file interlude reads.
    #[arg(long, value_name = "PATH")]
    pub config: String,
    /// A config that forwards to the backend tagged A.
    #[arg(long, value_name = "PATH")]
    pub config_a: String,
    /// A config that forwards to the backend tagged B.
    #[arg(long, value_name = "PATH")]
    pub config_b: String,
    /// Reloads to time.
    #[arg(long, default_value_t = 10, value_parser = positive_count)]
    pub rounds: usize,
    /// Seconds between two rounds.
    #[arg(long, default_value_t = 0.5, value_parser = secs)]
    pub gap: f64,
    /// Seconds a round may take before it counts as failed.
    #[arg(long, default_value_t = 5.0, value_parser = secs)]
    pub wait: f64,
}

/// The tag of the backend that answers a new connection through `target`.
async fn backend_tag(target: &str) -> io::Result<u8> {
    let mut s = connect_tcp(target).await?;
    let mut tag = [0u8; 1];
    timeout(OP_TIMEOUT, async {
        s.write_all(&[MODE_TAG]).await?;
        s.read_exact(&mut tag).await
    })
    .await
    .map_err(|_| timed_out("tag query"))??;
    Ok(tag[0])
}

/// Replaces `config` with the contents of `from` in one step: a temp file in
/// the same directory renamed over it, so the daemon never reads half a file.
fn install_config(from: &str, config: &std::path::Path) -> io::Result<()> {
    let text = std::fs::read(from)?;
    let name = config
        .file_name()
        .map_or_else(Default::default, |n| n.to_string_lossy());
    let tmp = config.with_file_name(format!(".{name}.loadgen-tmp"));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, config)
}

fn reload_failed(rounds: usize, why: &str) -> ! {
    eprintln!("loadgen reload-latency: {why}");
    println!("mode=reload rounds={rounds} failed=1 errors=1");
    exit(0)
}

pub async fn run(
    Args {
        target,
        pid: raw_pid,
        config,
        config_a,
        config_b,
        rounds,
        gap,
        wait,
    }: Args,
) {
    let wait = Duration::from_secs_f64(wait);
    let pid = Pid::from_raw(raw_pid).unwrap_or_else(|| reload_failed(rounds, "--pid must be above 0"));
    let mut current = match backend_tag(&target).await {
        Ok(tag @ (b'A' | b'B')) => tag,
        Ok(tag) => reload_failed(
            rounds,
            &format!("{target} answers with tag {:?}, not A or B", tag as char),
        ),
        Err(e) => reload_failed(rounds, &format!("{target}: {e}")),
    };
    let mut ms = Vec::with_capacity(rounds);
    let mut attempts = Vec::with_capacity(rounds);
    let (mut errors, mut printed) = (0u64, 0u32);
    let mut note = |what: String| {
        if printed < 5 {
            eprintln!("loadgen reload-latency: {what}");
        }
        printed += 1;
    };
    for round in 1..=rounds {
        let (want, file) = if current == b'A' {
            (b'B', &config_b)
        } else {
            (b'A', &config_a)
        };
        if let Err(e) = install_config(file, std::path::Path::new(&config)) {
            reload_failed(rounds, &format!("{file} -> {config}: {e}"));
        }
        // The clock starts right before the signal is sent.
        let t0 = Instant::now();
        if let Err(e) = kill_process(pid, Signal::HUP) {
            let e = io::Error::from(e);
            reload_failed(rounds, &format!("kill -HUP {raw_pid}: {e}"));
        }
        let mut n = 0u64;
        let served = loop {
            n += 1;
            match backend_tag(&target).await {
                Ok(tag) if tag == want => break Some(t0.elapsed()),
                Ok(tag) if tag == current => {}
                Ok(tag) => {
                    errors += 1;
                    note(format!("round {round}: unexpected tag {:?}", tag as char));
                }
                Err(e) => {
                    // A refused or dropped connection during a reload is a finding.
                    errors += 1;
                    note(format!("round {round}: {e}"));
                    sleep(Duration::from_millis(1)).await;
                }
            }
            if t0.elapsed() >= wait {
                break None;
            }
        };
        let Some(d) = served else {
            errors += 1;
            note(format!(
                "round {round}: backend {} did not answer within {wait:?} of SIGHUP",
                want as char
            ));
            break;
        };
        ms.push(d.as_secs_f64() * 1000.0);
        attempts.push(n);
        current = want;
        // Let the file watcher's own (no-op) reload of this change pass
        // before the next round (it waits for 200 ms of quiet).
        sleep(Duration::from_secs_f64(gap)).await;
    }
    let all = ms.iter().map(|v| format!("{v:.2}")).collect::<Vec<_>>().join(",");
    let mut sorted = ms.clone();
    sorted.sort_by(f64::total_cmp);
    let median = match sorted.len() {
        0 => None,
        n if n % 2 == 1 => Some(sorted[n / 2]),
        n => Some((sorted[n / 2 - 1] + sorted[n / 2]) / 2.0),
    };
    let f = |v: Option<f64>| v.map(|v| format!("{v:.2}"));
    attempts.sort_unstable();
    if ms.len() < rounds {
        errors += 1;
    }
    println!(
        "mode=reload rounds={rounds} ok={} median_ms={} max_ms={} min_ms={} attempts_median={} all_ms={} errors={errors}",
        ms.len(),
        show(f(median)),
        show(f(sorted.last().copied())),
        show(f(sorted.first().copied())),
        show(attempts.get(attempts.len() / 2)),
        if all.is_empty() { "-" } else { &all },
    );
}
