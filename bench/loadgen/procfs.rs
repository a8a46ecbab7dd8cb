//! What loadgen reads from /proc: a process's VmRSS and CPU time, the
//! connections to a backend port, and the kernel's SYN drop and retransmit
//! counters.

/// VmRSS of process `pid`, in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?;
    line.trim().trim_end_matches("kB").trim().parse().ok()
}

/// CPU time of process `pid`, all its threads, user plus system, in clock
/// ticks (`getconf CLK_TCK`): fields 14 and 15 of /proc/PID/stat.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses; the fields
    // after its last ')' start with the state (field 3).
    let mut rest = stat.get(stat.rfind(')')? + 1..)?.split_whitespace().skip(11);
    let utime: u64 = rest.next()?.parse().ok()?;
    let stime: u64 = rest.next()?.parse().ok()?;
    Some(utime + stime)
}

/// The CPU time a proxy spends over a measured window (`--cpu-pid`): sampled
/// at the window's edges rather than around the whole client run, so that
/// the warm-up, connection setup and teardown, which the run does not count
/// as operations, are left out.
pub struct CpuWindow {
    pid: Option<u32>,
    start: Option<u64>,
}

impl CpuWindow {
    pub fn start(pid: Option<u32>) -> Self {
        CpuWindow {
            pid,
            start: pid.and_then(cpu_ticks),
        }
    }
    /// ` proxy_ticks=N` for the result line, taken now; `-` when /proc could
    /// not be read, nothing at all without `--cpu-pid`.
    pub fn finish(&self) -> String {
        let Some(pid) = self.pid else {
            return String::new();
        };
        let ticks = match (self.start, cpu_ticks(pid)) {
            (Some(a), Some(b)) if b >= a => (b - a).to_string(),
            _ => "-".to_string(),
        };
        format!(" proxy_ticks={ticks}")
    }
}

/// CPU time of the processes in a pause/resume or floor test (clock ticks):
/// this loadgen (the clients), the proxy if any, the backend if given.
pub struct CpuTicks {
    client: Option<u64>,
    proxy: Option<u64>,
    backend: Option<u64>,
}

impl CpuTicks {
    pub fn read(proxy: Option<u32>, backend: Option<u32>) -> Self {
        CpuTicks {
            client: cpu_ticks(std::process::id()),
            proxy: proxy.and_then(cpu_ticks),
            backend: backend.and_then(cpu_ticks),
        }
    }

    /// The ticks spent since `before`, each `None` unless read both times.
    pub fn since(&self, before: &CpuTicks) -> Self {
        let d = |a: Option<u64>, b: Option<u64>| a.zip(b).map(|(a, b)| a.saturating_sub(b));
        CpuTicks {
            client: d(self.client, before.client),
            proxy: d(self.proxy, before.proxy),
            backend: d(self.backend, before.backend),
        }
    }
}

/// `client_ticks=N proxy_ticks=N backend_ticks=N`, `-` where unknown.
impl std::fmt::Display for CpuTicks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let show = |v: Option<u64>| v.map_or_else(|| "-".to_string(), |v| v.to_string());
        write!(
            f,
            "client_ticks={} proxy_ticks={} backend_ticks={}",
            show(self.client),
            show(self.proxy),
            show(self.backend)
        )
    }
}

/// Sockets on 127.0.0.1 with local port `port` that are established or being
/// established (accept queue included): the backend side of connections to it.
pub fn tcp_conns_to(port: u16) -> Option<u64> {
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    let suffix = format!(":{port:04X}");
    let n = table
        .lines()
        .skip(1)
        .filter(|line| {
            let mut fields = line.split_whitespace();
            let local = fields.nth(1);
            let state = fields.nth(1);
            local.is_some_and(|a| a.ends_with(&suffix)) && matches!(state, Some("01" | "03"))
        })
        .count();
    Some(n as u64)
}

/// Kernel counters that explain a slow resume: SYNs dropped by a listener
/// (full accept or SYN queue) and SYNs sent again (1 s, 3 s, ... later).
#[derive(Clone, Copy)]
pub struct SynStats {
    pub listen_drops: u64,
    pub syn_retrans: u64,
}

pub fn syn_stats() -> Option<SynStats> {
    let netstat = std::fs::read_to_string("/proc/net/netstat").ok()?;
    let mut tcp_ext = netstat.lines().filter(|l| l.starts_with("TcpExt:"));
    let (names, values) = (tcp_ext.next()?, tcp_ext.next()?);
    let get = |want: &str| {
        names
            .split_whitespace()
            .zip(values.split_whitespace())
            .find(|(name, _)| *name == want)
            .and_then(|(_, v)| v.parse().ok())
    };
    Some(SynStats {
        listen_drops: get("ListenDrops")?,
        syn_retrans: get("TCPSynRetrans")?,
    })
}
