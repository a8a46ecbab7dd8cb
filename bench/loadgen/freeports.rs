//! `loadgen freeports`: print free loopback TCP ports for `bench/run` to give
//! its listeners, below the kernel's ephemeral port range.

#[derive(clap::Args)]
pub struct Args {
    /// Ports to print (distinct, on one line).
    #[arg(long, default_value_t = 1)]
    pub count: usize,
}

pub fn run(count: usize) {
    // Pick ports below the kernel's ephemeral range: a port from that range may
    // be taken by an outgoing connection before the process meant to listen on
    // it binds it (EADDRINUSE). Keep all listeners open until every port is
    // known, so they are distinct.
    const LOWEST: u32 = 10_000;
    let ephemeral_low: u32 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768);
    let mut ls = Vec::with_capacity(count);
    if ephemeral_low > LOWEST + 1000 {
        let span = ephemeral_low - LOWEST;
        let seed = std::process::id()
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos());
        for i in 0..span {
            if ls.len() == count {
                break;
            }
            let port = LOWEST + (seed.wrapping_add(i)) % span;
            if let Ok(l) = std::net::TcpListener::bind(("127.0.0.1", port as u16)) {
                ls.push(l);
            }
        }
    }
    while ls.len() < count {
        ls.push(std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0"));
    }
    let ports: Vec<String> = ls
        .iter()
        .map(|l| l.local_addr().unwrap().port().to_string())
        .collect();
    // Close them before printing: the caller may bind a port as soon as it
    // has read the line, while this process could still be exiting.
    drop(ls);
    println!("{}", ports.join(" "));
}
