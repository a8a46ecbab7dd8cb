//! What the held modes read from /proc: a process's VmRSS, the connections
//! to a backend port, and the kernel's SYN drop and retransmit counters.

/// VmRSS of process `pid`, in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?;
    line.trim().trim_end_matches("kB").trim().parse().ok()
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
