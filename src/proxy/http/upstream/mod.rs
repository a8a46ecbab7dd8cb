//! Connections to backends in mode http, driven by the client connection's
//! own task: the request goes out and the response comes back with no task
//! or channel in between. A backend keeps a bounded pool of idle keep-alive
//! connections; a connection returns to it only after its response was
//! read to the end (one cut short is closed), and a draining or killed
//! backend's pool is emptied and takes nothing back.
//!
//! Here: which connection a request goes down (the one its client
//! connection kept, a pooled one, a new one) and where it goes after. The
//! exchange on one connection is in `connection`, the request's way out in
//! `sending`.

mod connection;
mod sending;

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::BytesMut;

use crate::backends::{Backend, ConnectFailure, Role};
pub use connection::{BackendConnection, Failure};

/// First read size of a connection; doubled while reads fill it, up to
/// `MAX_READ` (large bodies move in large reads).
const FIRST_READ: usize = 8 * 1024;
const MAX_READ: usize = 256 * 1024;
/// An idle connection (kept or pooled) keeps a read buffer no larger than
/// this.
const MAX_IDLE_BUFFER: usize = 16 * 1024;

/// The backend connections a client connection keeps between its
/// requests (as HAProxy keeps a session's own connections), so that its
/// next request to the same backend takes no lock shared with other
/// connections and its kill watch stays registered for the same task. At
/// most `MAX_ATTACHED`; they go to their backends' pools when the client
/// connection ends.
#[derive(Default)]
pub struct Attached(Mutex<Vec<(Arc<Backend>, BackendConnection)>>);

/// Backend connections a client connection keeps between requests.
const MAX_ATTACHED: usize = 4;

impl Attached {
    /// The kept connection to `backend`, if any; connections kept for a
    /// backend that is draining now are closed.
    fn take(&self, backend: &Arc<Backend>) -> Option<BackendConnection> {
        let mut kept = self.lock();
        kept.retain(|(other, _)| {
            let draining = other.role() == Role::Draining;
            if draining {
                other.idle_http.uncount_kept();
            }
            !draining
        });
        let at = kept.iter().position(|(other, _)| Arc::ptr_eq(other, backend))?;
        backend.idle_http.uncount_kept();
        Some(kept.swap_remove(at).1)
    }

    /// Keeps `connection`, or hands it back when enough are kept.
    fn keep(&self, backend: &Arc<Backend>, connection: BackendConnection) -> Option<BackendConnection> {
        let mut kept = self.lock();
        if kept.len() >= MAX_ATTACHED || !backend.idle_http.count_kept() {
            return Some(connection);
        }
        kept.push((backend.clone(), connection));
        None
    }

    fn lock(&self) -> MutexGuard<'_, Vec<(Arc<Backend>, BackendConnection)>> {
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        for (backend, connection) in std::mem::take(&mut *self.lock()) {
            backend.idle_http.uncount_kept();
            if connection.reusable(&backend) && !connection.private {
                backend.put_idle(connection.into_idle());
            }
        }
    }
}

/// A connection to `backend` ready for a request: the one the client
/// connection kept, an idle one from the pool, else a new one (`fresh`). A
/// failed connect marks the backend down.
///
/// `proxy_header`: `send_proxy` is on, and this is the header naming the
/// client. A connection that carries one serves its client connection
/// only: a new one is made (the pool's began with nobody's header, or
/// another client's), kept for this client's next requests, and closed
/// with it, never pooled.
pub async fn connection(
    backend: &Arc<Backend>,
    attached: &Attached,
    proxy: &str,
    connect_timeout: Duration,
    proxy_header: Option<&[u8]>,
) -> Result<(BackendConnection, bool), ConnectFailure> {
    if let Some(mut kept) = attached.take(backend)
        && kept.is_live()
    {
        return Ok((kept, false));
    }
    while proxy_header.is_none()
        && let Some(idle) = backend.take_idle()
    {
        let mut idle = BackendConnection::resume(idle, backend);
        if idle.is_live() {
            return Ok((idle, false));
        }
    }
    let mut stream = backend.connect(proxy, connect_timeout).await?;
    if let Some(header) = proxy_header {
        // Refused at once, like a refused connect.
        crate::proxy::send_header(&mut stream, header)
            .await
            .map_err(|_| ConnectFailure::Refused)?;
    }
    let mut connection = BackendConnection::new(stream, backend);
    connection.private = proxy_header.is_some();
    Ok((connection, true))
}

/// A connection whose exchange ended cleanly stays with its client
/// connection for the next request, or goes back to its backend's pool
/// (closed instead if it is `private`).
pub fn release(backend: &Arc<Backend>, attached: &Attached, mut connection: BackendConnection) {
    if !connection.reusable(backend) {
        return;
    }
    if connection.buf.capacity() > MAX_IDLE_BUFFER {
        connection.buf = BytesMut::new();
        connection.read_size = FIRST_READ;
    }
    if let Some(spare) = attached.keep(backend, connection)
        && !spare.private
    {
        backend.put_idle(spare.into_idle());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backends::pool::{MAX_IDLE_PER_BACKEND, MAX_KEPT_PER_BACKEND};
    use crate::config::{Address, BackendConfig};
    use crate::sockets::stream::Stream;
    use tokio_util::sync::CancellationToken;

    fn backend(kill: &CancellationToken) -> Arc<Backend> {
        let config = BackendConfig {
            address: Address::parse("127.0.0.1:1").unwrap(),
            weight: 1,
        };
        Arc::new(Backend::new(&config, Role::Serving, kill.child_token()))
    }

    fn connection(backend: &Backend) -> BackendConnection {
        let (ours, _theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let stream = Stream::Unix(tokio::net::UnixStream::from_std(ours).unwrap());
        BackendConnection::new(stream, backend)
    }

    #[tokio::test]
    async fn kept_connections_are_bounded_per_client_and_counted_per_backend() {
        let kill = CancellationToken::new();
        let (a, b) = (backend(&kill), backend(&kill));
        let attached = Attached::default();
        for _ in 0..MAX_ATTACHED {
            assert!(attached.keep(&a, connection(&a)).is_none());
        }
        assert!(
            attached.keep(&b, connection(&b)).is_some(),
            "one client keeps at most {MAX_ATTACHED}"
        );
        assert_eq!(a.idle_http.kept(), MAX_ATTACHED);
        assert!(attached.take(&b).is_none());
        assert!(attached.take(&a).is_some());
        assert_eq!(a.idle_http.kept(), MAX_ATTACHED - 1);

        // A draining backend's kept connections are closed at the next take.
        a.set_role(Role::Draining);
        assert!(attached.take(&b).is_none());
        assert_eq!(a.idle_http.kept(), 0);

        // When the client connection ends, its kept connections go to the pool.
        assert!(attached.keep(&b, connection(&b)).is_none());
        drop(attached);
        assert_eq!(b.idle_http.kept(), 0);
        assert_eq!(b.idle_http.len(), 1);
    }

    #[tokio::test]
    async fn a_backend_is_kept_for_at_most_max_kept_per_backend_connections() {
        let kill = CancellationToken::new();
        let a = backend(&kill);
        let clients: Vec<Attached> = (0..MAX_KEPT_PER_BACKEND).map(|_| Attached::default()).collect();
        for client in &clients {
            assert!(client.keep(&a, connection(&a)).is_none());
        }
        let one_more = Attached::default();
        assert!(one_more.keep(&a, connection(&a)).is_some());
        drop(clients);
        assert_eq!(a.idle_http.kept(), 0);
        assert_eq!(a.idle_http.len(), MAX_KEPT_PER_BACKEND.min(MAX_IDLE_PER_BACKEND));
    }
}
