//! systemd's side of inherited sockets: the descriptors it passes at start
//! (`LISTEN_FDS`, `LISTEN_FDNAMES`, `LISTEN_PID`: an `interlude.socket`
//! unit's, or the fd store's after a restart), read into an [`Inherited`]
//! pool, and the fd store names (`FDNAME=`) this daemon gives its listening
//! sockets. Adoption goes by the address a socket is bound to; the name
//! serves to remove a socket from the store again.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;

use super::address::Address;
use super::inherited::{Inherited, InheritedSocket, claim};

/// The longest `FDNAME=` systemd accepts (`FDNAME_MAX`).
const FD_NAME_MAX: usize = 255;

/// The sockets systemd passed to this process, and what to log about them
/// once the log is up.
#[derive(Debug, Default)]
pub struct Passed {
    pub sockets: Inherited,
    /// One line naming the sockets passed; `None` if none were.
    pub summary: Option<String>,
    /// Descriptors or variables that could not be used.
    pub problems: Vec<String>,
}

impl Passed {
    /// Logs what was passed (the log is set up after the sockets are read).
    pub fn log(&self) {
        if let Some(summary) = &self.summary {
            tracing::info!("{summary}");
        }
        for problem in &self.problems {
            tracing::warn!("{problem}");
        }
    }
}

/// The sockets systemd passed to this process, as a pool to take listeners
/// from.
///
/// The variables are removed from the environment, so that no process this
/// one starts takes them for its own. Must run before any thread that reads
/// the environment starts (it is the first thing the daemon does).
///
/// Two descriptors for one socket (a socket unit's, and the same socket in
/// the fd store, where the daemon put it) are one listener: the later one,
/// the fd store's, is kept, so that its name is the one removed from the
/// store should the config drop that address.
pub fn from_environment() -> Passed {
    // SAFETY: the daemon calls this first, before its async runtime, its
    // log writer or any other thread of its own exists (jemalloc's
    // background thread never reads the environment), so nothing reads
    // the environment while it changes.
    let passed = unsafe { sd_notify::listen_fds_with_names_and_unset_env() };
    let passed: Vec<(i32, String)> = match passed {
        Ok(passed) => passed.collect(),
        Err(e) => {
            return Passed {
                problems: vec![format!(
                    "ignoring the sockets systemd passed (LISTEN_FDS, LISTEN_FDNAMES): {e}"
                )],
                ..Passed::default()
            };
        }
    };
    let mut report = Passed::default();
    if passed.is_empty() {
        return report;
    }
    let mut sockets: Vec<(Option<(u64, u64)>, InheritedSocket)> = Vec::new();
    for (raw, name) in passed {
        let fd = match claim(raw) {
            Ok(fd) => fd,
            Err(e) => {
                report.problems.push(format!(
                    "cannot use descriptor {raw} ({name}) that systemd passed: {e}"
                ));
                continue;
            }
        };
        // A socket's identity is its inode; fstat on a copy, closed at once.
        let identity = fd
            .try_clone()
            .ok()
            .and_then(|copy| std::fs::File::from(copy).metadata().ok())
            .map(|meta| (meta.dev(), meta.ino()));
        // systemd names an unnamed descriptor "unknown".
        let name = (!name.is_empty() && name != "unknown").then_some(name);
        if identity.is_some() {
            sockets.retain(|(seen, _)| *seen != identity);
        }
        sockets.push((identity, InheritedSocket::from_systemd(fd, name)));
    }
    let names: Vec<String> = sockets
        .iter()
        .map(|(_, socket)| describe(socket.name.as_deref()))
        .collect();
    if !names.is_empty() {
        report.summary = Some(format!(
            "systemd passed {} listening socket(s), adopted by the address they are bound to: {}",
            names.len(),
            names.join(", ")
        ));
    }
    for (_, socket) in sockets {
        report.sockets.push(socket);
    }
    report
}

/// A passed socket's name for the log: the address an fd store name
/// stands for, or the name as given.
pub fn describe(name: Option<&str>) -> String {
    match name {
        None => "unnamed".to_string(),
        Some(name) => match address_of_fd_name(name) {
            Some(address) => format!("{name:?} ({address})"),
            None => format!("{name:?}"),
        },
    }
}

/// The fd store name for a listener on `address`: the address as the config
/// spells it, percent-encoded where systemd does not allow a character in
/// `FDNAME=` (':' separates names in `LISTEN_FDNAMES`; control characters
/// and non-ASCII bytes are refused) and '%' itself. A name that would be
/// longer than systemd allows is cut and ends in a hash of the whole, so
/// that it stays unique.
pub fn fd_name(address: &Address) -> String {
    let spelled: Vec<u8> = match address {
        Address::Unix(path) => [b"unix:".as_slice(), path.as_os_str().as_bytes()].concat(),
        Address::Tcp(_) => address.to_string().into_bytes(),
    };
    let mut name = String::with_capacity(spelled.len());
    for &byte in &spelled {
        if byte == b':' || byte == b'%' || !(b' '..0x7f).contains(&byte) {
            name.push_str(&format!("%{byte:02X}"));
        } else {
            name.push(char::from(byte));
        }
    }
    if name.len() > FD_NAME_MAX {
        let hash = format!("~{:016x}", fnv1a(&spelled));
        name.truncate(FD_NAME_MAX - hash.len());
        // Never leave half an escape behind the cut.
        if let Some(percent) = name.get(name.len().saturating_sub(2)..).and_then(|t| t.find('%')) {
            name.truncate(name.len() - 2 + percent);
        }
        name.push_str(&hash);
    }
    name
}

/// The listen address an fd store name from [`fd_name`] stands for, if it
/// is one (a cut name, or a socket unit's, is not).
pub fn address_of_fd_name(name: &str) -> Option<String> {
    if !(name.starts_with("tcp%3A") || name.starts_with("unix%3A")) {
        return None;
    }
    let bytes = name.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while at < bytes.len() {
        if bytes[at] == b'%' {
            let hex = std::str::from_utf8(bytes.get(at + 1..at + 3)?).ok()?;
            decoded.push(u8::from_str_radix(hex, 16).ok()?);
            at += 3;
        } else {
            if bytes[at] == b'~' {
                // A cut name ends in a hash: not an address.
                return None;
            }
            decoded.push(bytes[at]);
            at += 1;
        }
    }
    Some(OsStr::from_bytes(&decoded).to_string_lossy().into_owned())
}

/// FNV-1a, 64 bits: stable across builds (a later version must compute the
/// same name to remove what this one stored).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Address {
        Address::parse(text).expect("a valid address")
    }

    #[test]
    fn names_are_valid_for_systemd_and_decode_to_the_address() {
        for text in [
            "tcp://127.0.0.1:8080",
            "tcp://[::1]:443",
            "tcp://localhost:80",
            "unix:/run/interlude/a b%c:d.sock",
        ] {
            let address = parse(text);
            let name = fd_name(&address);
            assert!(
                name.bytes().all(|b| (b' '..0x7f).contains(&b) && b != b':'),
                "{name:?}"
            );
            assert_eq!(address_of_fd_name(&name).as_deref(), Some(text), "{name:?}");
        }
        assert_eq!(
            fd_name(&parse("tcp://127.0.0.1:8080")),
            "tcp%3A//127.0.0.1%3A8080"
        );
    }

    #[test]
    fn a_long_name_is_cut_with_a_hash_and_stays_unique() {
        let a = parse(&format!("unix:/{}", ":".repeat(100)));
        let b = parse(&format!("unix:/{}x", ":".repeat(99)));
        let (name_a, name_b) = (fd_name(&a), fd_name(&b));
        assert!(name_a.len() <= FD_NAME_MAX && name_b.len() <= FD_NAME_MAX);
        assert_ne!(name_a, name_b);
        assert_eq!(address_of_fd_name(&name_a), None);
    }

    #[test]
    fn socket_unit_names_are_not_addresses() {
        assert_eq!(address_of_fd_name("interlude.socket"), None);
        assert_eq!(address_of_fd_name("unknown"), None);
    }
}
