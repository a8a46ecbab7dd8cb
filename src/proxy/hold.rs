//! A held connection: accepted, not forwarded. It waits for its release
//! while watching the client, so bytes the client sends are kept (up to a
//! small bound, then the client is back-pressured) and a client that leaves
//! is noticed at once, before any backend is contacted.

use std::io;

use tokio::io::AsyncReadExt;
use tokio_util::sync::CancellationToken;

use super::gate::HeldTicket;
use super::wake::PollWhenWoken;
use crate::sockets::stream::{Client, Stream};

/// Bytes kept per held connection; beyond this the client waits for us.
pub const HELD_BUFFER_LIMIT: usize = 16 * 1024;

/// How a hold ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Hold {
    /// Resumed: forward now, sending the kept bytes first.
    Released,
    /// The client closed or reset its connection while held.
    ClientLeft,
    /// The daemon is stopping or the proxy went away: close, never forward.
    Closed,
    /// An upgrade takes the held client to the new process.
    Moving,
}

/// Waits for the release of `ticket`, unless the proxy closes its held
/// clients first, an upgrade wants it (`moving`, for a client that can
/// move) or `client_leaves` (it watches the client) returns.
pub async fn hold(
    ticket: &mut HeldTicket,
    closing: &CancellationToken,
    moving: Option<&CancellationToken>,
    client_leaves: impl Future,
) -> Hold {
    // Only a client that can move pays for watching the token.
    let moving = async {
        match moving {
            Some(token) => PollWhenWoken::new(token.cancelled()).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        biased;
        () = PollWhenWoken::new(closing.cancelled()) => Hold::Closed,
        released = ticket.released() => if released { Hold::Released } else { Hold::Closed },
        () = moving => Hold::Moving,
        _ = client_leaves => Hold::ClientLeft,
    }
}

/// Returns when the client closes or resets; meanwhile reads what it sends
/// into `early` until the bound, then only listens for a hang-up.
pub async fn client_leaves(client: &mut Client, early: &mut Vec<u8>) -> io::Result<()> {
    loop {
        if early.len() >= HELD_BUFFER_LIMIT {
            return client.socket().hung_up().await;
        }
        let n = match client {
            Client::Plain(socket) => {
                socket.readable().await?;
                match read_into(socket, early) {
                    Err(e)
                        if e.kind() == io::ErrorKind::WouldBlock
                            || e.kind() == io::ErrorKind::Interrupted =>
                    {
                        continue;
                    }
                    result => result?,
                }
            }
            Client::Tls(session) => {
                // Decrypted bytes, straight into `early` (no buffer in the
                // future's state, so a held session stays small).
                let room = (HELD_BUFFER_LIMIT - early.len()) as u64;
                (&mut **session).take(room).read_buf(early).await?
            }
        };
        if n == 0 {
            return Ok(());
        }
    }
}

/// One read through a stack buffer, so an idle held connection owns no
/// heap buffer and a chatty one owns only what it sent.
fn read_into(client: &Stream, early: &mut Vec<u8>) -> io::Result<usize> {
    let mut chunk = [0u8; 4096];
    let room = (HELD_BUFFER_LIMIT - early.len()).min(chunk.len());
    let n = client.try_read(&mut chunk[..room])?;
    early.extend_from_slice(&chunk[..n]);
    Ok(n)
}
