//! The PROXY protocol (HAProxy's, versions 1 and 2): the header a proxy
//! sends ahead of a connection's bytes to say who the client is. This
//! module owns its wire format both ways (encoding a header for a backend,
//! decoding one a trusted load balancer sent) and the networks a header
//! is accepted from (`Cidr`). It knows nothing of configs or proxies.
//!
//! Decoding is strict and bounded: a v1 line is at most 107 bytes, a v2
//! header at most `V2_MAX_LEN`; TLVs are skipped. `parse` says how many
//! more bytes a header needs at least, so a reader can take exactly the
//! header off a socket and leave the bytes after it for whoever is next
//! (`read_header`).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

use tokio::io::{AsyncRead, AsyncReadExt};

use super::stream::Peer;

/// The 12 bytes a v2 header starts with.
const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// What a v1 line starts with.
const V1_PREFIX: &[u8; 6] = b"PROXY ";
/// The longest v1 line, CRLF included (the spec's worst case, TCP6).
pub const V1_MAX_LEN: usize = 107;
/// The longest v2 header accepted: its 16 bytes and what follows them
/// (addresses and TLVs). The spec allows 64 KiB; real senders add a few
/// TLVs at most.
pub const V2_MAX_LEN: usize = 16 + 4096;

/// Which version of the protocol to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

/// What a received header says about the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    /// The client and the address it connected to.
    Inet {
        source: SocketAddr,
        destination: SocketAddr,
    },
    /// A UNIX socket client (v2 `AF_UNIX`).
    Unix,
    /// No client address: v1 `UNKNOWN`, v2 `LOCAL` or `AF_UNSPEC` (the
    /// sender's own connection, e.g. a health check): the connection's
    /// own addresses stand.
    Local,
}

/// Why bytes are not a PROXY header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderError {
    /// Neither a v1 nor a v2 signature.
    NoSignature,
    /// A v1 line with no CRLF within 107 bytes.
    V1TooLong,
    /// A v1 line that does not follow the grammar.
    V1Malformed(&'static str),
    /// A v2 version or command other than 2 / LOCAL, PROXY.
    V2VersionOrCommand(u8),
    /// A v2 family or transport this end does not take.
    V2Family(u8),
    /// A v2 length longer than `V2_MAX_LEN` allows.
    V2TooLong(usize),
    /// A v2 length too short for its address family.
    V2Short,
}

impl fmt::Display for HeaderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HeaderError::NoSignature => f.write_str("no PROXY protocol signature"),
            HeaderError::V1TooLong => f.write_str("PROXY v1 line longer than 107 bytes"),
            HeaderError::V1Malformed(why) => write!(f, "malformed PROXY v1 line: {why}"),
            HeaderError::V2VersionOrCommand(b) => write!(f, "PROXY v2 version/command byte {b:#04x}"),
            HeaderError::V2Family(b) => write!(f, "PROXY v2 family/protocol byte {b:#04x} not supported"),
            HeaderError::V2TooLong(n) => write!(f, "PROXY v2 header of {n} bytes is too long"),
            HeaderError::V2Short => f.write_str("PROXY v2 address block too short for its family"),
        }
    }
}

impl std::error::Error for HeaderError {}

/// What `parse` made of the bytes so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// A whole header, `len` bytes long: what follows is the connection's.
    Done { header: Header, len: usize },
    /// At least this many more bytes belong to the header (never more than
    /// it has left, so reading exactly this many cannot overshoot it).
    Need(usize),
}

/// Decodes the start of `buf` as a v1 or v2 header.
pub fn parse(buf: &[u8]) -> Result<Parsed, HeaderError> {
    // The first 6 bytes tell the versions apart ("PROXY " or "\r\n\r\n\0\r").
    let head = buf.len().min(6);
    let v1 = buf[..head] == V1_PREFIX[..head];
    let v2 = buf[..head] == V2_SIGNATURE[..head];
    if !v1 && !v2 {
        return Err(HeaderError::NoSignature);
    }
    if buf.len() < 6 {
        return Ok(Parsed::Need(6 - buf.len()));
    }
    if v1 { parse_v1(buf) } else { parse_v2(buf) }
}

fn parse_v1(buf: &[u8]) -> Result<Parsed, HeaderError> {
    let window = &buf[..buf.len().min(V1_MAX_LEN)];
    let Some(end) = window.windows(2).position(|w| w == b"\r\n") else {
        if buf.len() >= V1_MAX_LEN {
            return Err(HeaderError::V1TooLong);
        }
        // A CR last may be the CRLF's first half; a shorter line than
        // "PROXY UNKNOWN\r\n" (15) cannot be whole.
        return Ok(Parsed::Need((15usize.saturating_sub(buf.len())).max(1)));
    };
    let line = std::str::from_utf8(&buf[6..end]).map_err(|_| HeaderError::V1Malformed("not ASCII"))?;
    let len = end + 2;
    if line == "UNKNOWN" || line.starts_with("UNKNOWN ") {
        return Ok(Parsed::Done {
            header: Header::Local,
            len,
        });
    }
    let mut fields = line.split(' ');
    let family = fields.next().unwrap_or("");
    let (Some(src), Some(dst), Some(sport), Some(dport), None) = (
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
    ) else {
        return Err(HeaderError::V1Malformed("expected 5 fields after PROXY"));
    };
    let (source, destination): (IpAddr, IpAddr) = match family {
        "TCP4" => (v1_ip::<Ipv4Addr>(src)?.into(), v1_ip::<Ipv4Addr>(dst)?.into()),
        "TCP6" => (v1_ip::<Ipv6Addr>(src)?.into(), v1_ip::<Ipv6Addr>(dst)?.into()),
        _ => return Err(HeaderError::V1Malformed("protocol is not TCP4, TCP6 or UNKNOWN")),
    };
    let header = Header::Inet {
        source: SocketAddr::new(source, v1_port(sport)?),
        destination: SocketAddr::new(destination, v1_port(dport)?),
    };
    Ok(Parsed::Done { header, len })
}

fn v1_ip<T: FromStr>(text: &str) -> Result<T, HeaderError> {
    text.parse().map_err(|_| HeaderError::V1Malformed("bad address"))
}

/// A decimal port, without the leading zeros the spec forbids.
fn v1_port(text: &str) -> Result<u16, HeaderError> {
    let digits = !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit());
    if !digits || (text.len() > 1 && text.starts_with('0')) {
        return Err(HeaderError::V1Malformed("bad port"));
    }
    text.parse().map_err(|_| HeaderError::V1Malformed("bad port"))
}

fn parse_v2(buf: &[u8]) -> Result<Parsed, HeaderError> {
    let signed = buf.len().min(12);
    if buf[..signed] != V2_SIGNATURE[..signed] {
        return Err(HeaderError::NoSignature);
    }
    if buf.len() < 16 {
        return Ok(Parsed::Need(16 - buf.len()));
    }
    let version_command = buf[12];
    let local = match version_command {
        0x20 => true,
        0x21 => false,
        other => return Err(HeaderError::V2VersionOrCommand(other)),
    };
    let family = buf[13];
    let rest = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    let len = 16 + rest;
    if len > V2_MAX_LEN {
        return Err(HeaderError::V2TooLong(len));
    }
    if buf.len() < len {
        return Ok(Parsed::Need(len - buf.len()));
    }
    let block = &buf[16..len];
    if local {
        // The sender's own connection: the addresses, if any, are ignored.
        return Ok(Parsed::Done {
            header: Header::Local,
            len,
        });
    }
    let header = match family {
        // AF_UNSPEC: the receiver uses the connection's own addresses.
        0x00 => Header::Local,
        // AF_INET, STREAM.
        0x11 => {
            let a = block.get(..12).ok_or(HeaderError::V2Short)?;
            let ip = |at: usize| Ipv4Addr::new(a[at], a[at + 1], a[at + 2], a[at + 3]);
            let port = |at: usize| u16::from_be_bytes([a[at], a[at + 1]]);
            Header::Inet {
                source: SocketAddr::new(ip(0).into(), port(8)),
                destination: SocketAddr::new(ip(4).into(), port(10)),
            }
        }
        // AF_INET6, STREAM.
        0x21 => {
            let a = block.get(..36).ok_or(HeaderError::V2Short)?;
            let ip = |at: usize| {
                let mut octets = [0u8; 16];
                octets.copy_from_slice(&a[at..at + 16]);
                Ipv6Addr::from(octets)
            };
            let port = |at: usize| u16::from_be_bytes([a[at], a[at + 1]]);
            Header::Inet {
                source: SocketAddr::new(ip(0).into(), port(32)),
                destination: SocketAddr::new(ip(16).into(), port(34)),
            }
        }
        // AF_UNIX, STREAM.
        0x31 => {
            block.get(..216).ok_or(HeaderError::V2Short)?;
            Header::Unix
        }
        other => return Err(HeaderError::V2Family(other)),
    };
    Ok(Parsed::Done { header, len })
}

/// Why a header could not be read off a connection.
#[derive(Debug)]
pub enum ReadError {
    Io(std::io::Error),
    /// The connection ended before its header did.
    Closed,
    Invalid(HeaderError),
}

impl fmt::Display for ReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReadError::Io(e) => write!(f, "reading the PROXY header: {e}"),
            ReadError::Closed => f.write_str("connection closed before its PROXY header ended"),
            ReadError::Invalid(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for ReadError {}

/// Reads one header off `reader`, exactly: not a byte of what follows it.
/// Unbounded in time (the caller bounds it).
pub async fn read_header<R: AsyncRead + Unpin>(reader: &mut R) -> Result<Header, ReadError> {
    let mut buf = [0u8; V2_MAX_LEN];
    let mut have = 0;
    loop {
        match parse(&buf[..have]).map_err(ReadError::Invalid)? {
            Parsed::Done { header, .. } => return Ok(header),
            Parsed::Need(more) => {
                let want = &mut buf[have..have + more];
                let mut filled = 0;
                while filled < want.len() {
                    match reader.read(&mut want[filled..]).await.map_err(ReadError::Io)? {
                        0 => return Err(ReadError::Closed),
                        n => filled += n,
                    }
                }
                have += more;
            }
        }
    }
}

/// A header to write, on the stack: the longest (v1 TCP6) is 104 bytes.
#[derive(Clone, Copy)]
pub struct Encoded {
    bytes: [u8; V1_MAX_LEN],
    len: usize,
}

impl Encoded {
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }

    fn push(&mut self, data: &[u8]) {
        self.bytes[self.len..self.len + data.len()].copy_from_slice(data);
        self.len += data.len();
    }
}

impl fmt::Debug for Encoded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Encoded({:?})", self.as_bytes())
    }
}

impl fmt::Write for Encoded {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        if self.len + s.len() > self.bytes.len() {
            return Err(fmt::Error);
        }
        self.push(s.as_bytes());
        Ok(())
    }
}

/// The header for a connection from `source` to `destination`, or with
/// `None` for one without a client address (a UNIX socket client, a
/// health check): v1 `UNKNOWN`, v2 `LOCAL`. Mixed families are written as
/// IPv6, the IPv4 side mapped.
pub fn encode(version: Version, addresses: Option<(SocketAddr, SocketAddr)>) -> Encoded {
    let mut out = Encoded {
        bytes: [0; V1_MAX_LEN],
        len: 0,
    };
    let addresses = addresses.map(|(source, destination)| match (source, destination) {
        (SocketAddr::V4(_), SocketAddr::V4(_)) | (SocketAddr::V6(_), SocketAddr::V6(_)) => {
            (source, destination)
        }
        _ => (mapped(source), mapped(destination)),
    });
    match version {
        Version::V1 => {
            use fmt::Write;
            let written = match addresses {
                None => out.write_str("PROXY UNKNOWN\r\n"),
                Some((s, d)) => {
                    let family = if s.is_ipv4() { "TCP4" } else { "TCP6" };
                    write!(
                        out,
                        "PROXY {family} {} {} {} {}\r\n",
                        s.ip(),
                        d.ip(),
                        s.port(),
                        d.port()
                    )
                }
            };
            // The longest line fits by the spec's arithmetic.
            debug_assert!(written.is_ok());
        }
        Version::V2 => {
            out.push(&V2_SIGNATURE);
            match addresses {
                None => out.push(&[0x20, 0x00, 0, 0]),
                Some((SocketAddr::V4(s), SocketAddr::V4(d))) => {
                    out.push(&[0x21, 0x11, 0, 12]);
                    out.push(&s.ip().octets());
                    out.push(&d.ip().octets());
                    out.push(&s.port().to_be_bytes());
                    out.push(&d.port().to_be_bytes());
                }
                Some((s, d)) => {
                    out.push(&[0x21, 0x21, 0, 36]);
                    out.push(&v6(s.ip()).octets());
                    out.push(&v6(d.ip()).octets());
                    out.push(&s.port().to_be_bytes());
                    out.push(&d.port().to_be_bytes());
                }
            }
        }
    }
    out
}

fn v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(ip) => ip.to_ipv6_mapped(),
        IpAddr::V6(ip) => ip,
    }
}

fn mapped(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(IpAddr::V6(v6(addr.ip())), addr.port())
}

/// The header that tells a backend about `client`, who connected to
/// `local` (this end's address; `None` on a UNIX listener, then the
/// unspecified address of the client's family stands in): a UNIX client
/// has no address to tell, so v1 `UNKNOWN` / v2 `LOCAL`.
pub fn encode_for(version: Version, client: &Peer, local: Option<SocketAddr>) -> Encoded {
    let addresses = match client {
        Peer::Tcp(source) => {
            let unspecified = || match source {
                SocketAddr::V4(_) => SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), 0),
                SocketAddr::V6(_) => SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), 0),
            };
            Some((*source, local.unwrap_or_else(unspecified)))
        }
        Peer::Unix => None,
    };
    encode(version, addresses)
}

/// A network an address may belong to: `10.0.0.0/8`, `::1/128`, or a bare
/// address (all its bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

/// Why text is not a CIDR.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CidrError(pub String);

impl fmt::Display for CidrError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:?} is not an address or network (e.g. 10.0.0.0/8, ::1/128, 192.0.2.7)",
            self.0
        )
    }
}

impl std::error::Error for CidrError {}

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(text: &str) -> Result<Cidr, CidrError> {
        let bad = || CidrError(text.to_string());
        let (ip, prefix) = match text.split_once('/') {
            Some((ip, prefix)) => (ip, Some(prefix)),
            None => (text, None),
        };
        let network: IpAddr = ip.parse().map_err(|_| bad())?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) if !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()) => {
                p.parse::<u8>().map_err(|_| bad())?
            }
            Some(_) => return Err(bad()),
        };
        if prefix > max {
            return Err(bad());
        }
        Ok(Cidr { network, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl Cidr {
    /// Whether `ip` is in this network; an IPv4-mapped IPv6 address counts
    /// as its IPv4 address.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let bits = |prefix: u8, width: u32| -> u128 {
            if prefix == 0 {
                0
            } else {
                (!0u128 << (width - u32::from(prefix))) & (!0u128 >> (128 - width))
            }
        };
        match (self.network, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = bits(self.prefix, 32);
                u128::from(u32::from(net)) & mask == u128::from(u32::from(ip)) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = bits(self.prefix, 128);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn done(buf: &[u8]) -> (Header, usize) {
        match parse(buf).unwrap() {
            Parsed::Done { header, len } => (header, len),
            Parsed::Need(n) => panic!("needs {n} more"),
        }
    }

    fn inet(source: &str, destination: &str) -> Header {
        Header::Inet {
            source: source.parse().unwrap(),
            destination: destination.parse().unwrap(),
        }
    }

    #[test]
    fn v1_examples_from_the_spec() {
        let line = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\nGET / HTTP/1.1\r\n";
        assert_eq!(done(line), (inet("192.168.0.1:56324", "192.168.0.11:443"), 47));
        let line = b"PROXY TCP6 ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n";
        assert!(parse(line).is_err());
        let worst = b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n";
        assert_eq!(worst.len(), 104);
        let (header, len) = done(worst);
        assert_eq!(len, 104);
        assert!(matches!(header, Header::Inet { .. }));
        assert_eq!(done(b"PROXY UNKNOWN\r\n"), (Header::Local, 15));
        let unknown = b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n";
        assert_eq!(done(unknown).0, Header::Local);
    }

    #[test]
    fn v1_is_strict() {
        for bad in [
            &b"PROXY TCP4 192.168.0.1 192.168.0.11 56324\r\n"[..],
            b"PROXY TCP4 192.168.0.1  192.168.0.11 56324 443\r\n",
            b"PROXY TCP4 ::1 ::1 1 2\r\n",
            b"PROXY TCP6 1.2.3.4 1.2.3.4 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 1.2.3.4 01 2\r\n",
            b"PROXY TCP4 1.2.3.4 1.2.3.4 1 65536\r\n",
            b"PROXY TCP4 1.2.3.4 1.2.3.4 +1 2\r\n",
            b"PROXY UDP4 1.2.3.4 1.2.3.4 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2 3\r\n",
            b"proxy TCP4 1.2.3.4 1.2.3.4 1 2\r\n",
            b"GET / HTTP/1.1\r\n",
        ] {
            assert!(parse(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        assert_eq!(parse(&[b'x'; 200][..]), Err(HeaderError::NoSignature));
        let mut long = b"PROXY UNKNOWN ".to_vec();
        long.resize(V1_MAX_LEN, b'a');
        assert_eq!(parse(&long), Err(HeaderError::V1TooLong));
    }

    /// A reader asking for exactly `Need` bytes never takes the byte after
    /// the header, however the header's bytes arrive.
    #[test]
    fn need_never_overshoots() {
        let v1 = encode(
            Version::V1,
            Some(("1.2.3.4:5".parse().unwrap(), "6.7.8.9:10".parse().unwrap())),
        );
        let v2 = encode(
            Version::V2,
            Some(("[::1]:5".parse().unwrap(), "[::2]:10".parse().unwrap())),
        );
        let unknown = encode(Version::V1, None);
        let local = encode(Version::V2, None);
        for header in [v1, v2, unknown, local] {
            let bytes = header.as_bytes();
            let mut have = 0;
            loop {
                match parse(&bytes[..have]).unwrap() {
                    Parsed::Done { len, .. } => {
                        assert_eq!(len, bytes.len());
                        break;
                    }
                    Parsed::Need(n) => {
                        assert!(
                            n >= 1 && have + n <= bytes.len(),
                            "{have}+{n} over {}",
                            bytes.len()
                        );
                        have += n;
                    }
                }
            }
        }
    }

    #[test]
    fn v2_round_trips_and_the_spec_layout() {
        let (s, d): (SocketAddr, SocketAddr) = (
            "192.168.0.1:56324".parse().unwrap(),
            "192.168.0.11:443".parse().unwrap(),
        );
        let header = encode(Version::V2, Some((s, d)));
        let bytes = header.as_bytes();
        assert_eq!(&bytes[..12], b"\x0D\x0A\x0D\x0A\x00\x0D\x0A\x51\x55\x49\x54\x0A");
        assert_eq!(&bytes[12..16], &[0x21, 0x11, 0x00, 0x0C]);
        assert_eq!(&bytes[16..20], &[192, 168, 0, 1]);
        assert_eq!(&bytes[24..28], &[0xDC, 0x04, 0x01, 0xBB]);
        assert_eq!(
            done(bytes),
            (
                Header::Inet {
                    source: s,
                    destination: d
                },
                28
            )
        );
        let (s, d): (SocketAddr, SocketAddr) =
            ("[2001:db8::1]:1".parse().unwrap(), "[::1]:2".parse().unwrap());
        let header = encode(Version::V2, Some((s, d)));
        assert_eq!(header.as_bytes().len(), 52);
        assert_eq!(
            done(header.as_bytes()),
            (
                Header::Inet {
                    source: s,
                    destination: d
                },
                52
            )
        );
        let local = encode(Version::V2, None);
        assert_eq!(local.as_bytes().len(), 16);
        assert_eq!(done(local.as_bytes()), (Header::Local, 16));
        // Mixed families: written as IPv6, the IPv4 side mapped.
        let mixed = encode(
            Version::V2,
            Some(("1.2.3.4:1".parse().unwrap(), "[::1]:2".parse().unwrap())),
        );
        assert_eq!(done(mixed.as_bytes()).0, inet("[::ffff:1.2.3.4]:1", "[::1]:2"));
    }

    #[test]
    fn v1_round_trips() {
        let header = encode(
            Version::V1,
            Some((
                "192.168.0.1:56324".parse().unwrap(),
                "192.168.0.11:443".parse().unwrap(),
            )),
        );
        assert_eq!(
            header.as_bytes(),
            b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"
        );
        let header = encode(
            Version::V1,
            Some(("[::1]:1".parse().unwrap(), "[2001:db8::2]:2".parse().unwrap())),
        );
        assert_eq!(header.as_bytes(), b"PROXY TCP6 ::1 2001:db8::2 1 2\r\n");
        assert_eq!(encode(Version::V1, None).as_bytes(), b"PROXY UNKNOWN\r\n");
    }

    #[test]
    fn v2_skips_tlvs_and_is_strict() {
        let mut with_tlv = V2_SIGNATURE.to_vec();
        with_tlv.extend_from_slice(&[0x21, 0x11, 0, 12 + 7]);
        with_tlv.extend_from_slice(&[127, 0, 0, 2, 127, 0, 0, 1, 0, 80, 0, 81]);
        with_tlv.extend_from_slice(&[0x04, 0, 4, 0xde, 0xad, 0xbe, 0xef]); // PP2_TYPE_NOOP
        with_tlv.extend_from_slice(b"after");
        assert_eq!(done(&with_tlv), (inet("127.0.0.2:80", "127.0.0.1:81"), 35));
        let mut v = with_tlv.clone();
        v[12] = 0x11; // version 1 in binary
        assert_eq!(parse(&v), Err(HeaderError::V2VersionOrCommand(0x11)));
        let mut v = with_tlv.clone();
        v[12] = 0x22; // command 2
        assert!(parse(&v).is_err());
        let mut v = with_tlv.clone();
        v[13] = 0x12; // UDP
        assert_eq!(parse(&v), Err(HeaderError::V2Family(0x12)));
        let mut v = with_tlv.clone();
        v[15] = 4; // shorter than an IPv4 block
        assert_eq!(parse(&v), Err(HeaderError::V2Short));
        let mut v = with_tlv.clone();
        v[14] = 0xff;
        assert!(matches!(parse(&v), Err(HeaderError::V2TooLong(_))));
        let mut v = with_tlv;
        v[11] = b'x';
        assert_eq!(parse(&v), Err(HeaderError::NoSignature));
        // AF_UNSPEC with PROXY: the connection's own addresses.
        let mut unspec = V2_SIGNATURE.to_vec();
        unspec.extend_from_slice(&[0x21, 0x00, 0, 0]);
        assert_eq!(done(&unspec), (Header::Local, 16));
    }

    #[tokio::test]
    async fn read_header_leaves_what_follows() {
        for version in [Version::V1, Version::V2] {
            let header = encode(
                version,
                Some(("10.1.2.3:4000".parse().unwrap(), "10.0.0.1:80".parse().unwrap())),
            );
            let (mut near, mut far) = tokio::io::duplex(256);
            let mut sent = header.as_bytes().to_vec();
            sent.extend_from_slice(b"hello");
            tokio::io::AsyncWriteExt::write_all(&mut far, &sent)
                .await
                .unwrap();
            let got = read_header(&mut near).await.unwrap();
            assert_eq!(got, inet("10.1.2.3:4000", "10.0.0.1:80"));
            let mut rest = [0u8; 5];
            near.read_exact(&mut rest).await.unwrap();
            assert_eq!(&rest, b"hello");
        }
        let (mut near, mut far) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut far, b"PROXY TCP4")
            .await
            .unwrap();
        drop(far);
        assert!(matches!(read_header(&mut near).await, Err(ReadError::Closed)));
    }

    #[test]
    fn cidrs() {
        let net: Cidr = "10.0.0.0/8".parse().unwrap();
        assert!(net.contains("10.200.1.1".parse().unwrap()));
        assert!(!net.contains("11.0.0.1".parse().unwrap()));
        assert!(net.contains("::ffff:10.0.0.1".parse().unwrap()));
        let one: Cidr = "127.0.0.1".parse().unwrap();
        assert!(one.contains("127.0.0.1".parse().unwrap()));
        assert!(!one.contains("127.0.0.2".parse().unwrap()));
        let v6: Cidr = "::1/128".parse().unwrap();
        assert!(v6.contains("::1".parse().unwrap()));
        assert!(!v6.contains("127.0.0.1".parse().unwrap()));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("8.8.8.8".parse().unwrap()));
        let net6: Cidr = "2001:db8::/32".parse().unwrap();
        assert!(net6.contains("2001:db8:1::5".parse().unwrap()));
        assert!(!net6.contains("2001:db9::".parse().unwrap()));
        for bad in [
            "",
            "10.0.0.0/33",
            "::/129",
            "10.0.0/8",
            "10.0.0.0/",
            "10.0.0.0/+8",
            "host",
            "10.0.0.0/8/8",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }
}
