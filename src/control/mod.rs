//! The control API: HTTP/1.1 with JSON bodies (hyper) on the control socket,
//! a UNIX socket by default. It reads live state from the view the daemon
//! publishes (`RunningView`) and asks the daemon loop for every change; it
//! owns no state itself.

// Public for the fuzz targets (fuzz/): its request parsing.
pub mod api;
mod metrics;
pub mod status;

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::config::{Address, ControlConfig};
use crate::daemon::Shared;
use crate::sockets::stream::Listener;

/// How long a deploy (and `add`/`rm`, which deploy) waits for its new
/// backends unless told otherwise: one value, so `--help`, the client and a
/// request without `timeout` all agree.
pub const DEFAULT_DEPLOY_TIMEOUT: &str = "60s";
/// The longest a deploy may wait: a longer `--timeout` or `timeout` is
/// refused (422, exit 2), so no deploy can wait for ever.
pub const MAX_DEPLOY_TIMEOUT: Duration = crate::config::MAX_DAY_DURATION;

/// Who may use the API: a TCP control listener with a token configured
/// requires `Authorization: Bearer TOKEN`; a UNIX socket is guarded by its
/// file mode (0660) instead.
pub struct Access {
    token: Option<String>,
}

impl Access {
    pub fn from_config(config: &ControlConfig) -> Access {
        let tcp = matches!(config.listen, Address::Tcp(_));
        Access {
            token: config.token.clone().filter(|t| tcp && !t.is_empty()),
        }
    }

    fn allows(&self, authorization: Option<&str>) -> bool {
        match &self.token {
            None => true,
            Some(token) => authorization
                .and_then(bearer_token)
                .is_some_and(|given| constant_time_eq(given.as_bytes(), token.as_bytes())),
        }
    }
}

/// The token of an `Authorization: Bearer TOKEN` value. The scheme is
/// case-insensitive (RFC 9110 §11.1), followed by one or more spaces.
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Control connections served at once. Beyond it, a new connection
/// closes the oldest one that is not in a request (a silent or idle one);
/// if every one is in a request (long polls), accepting waits. Their
/// descriptors are part of the reserve of the derived daemon-wide limit.
pub const MAX_CONNECTIONS: usize = crate::proxy::limit::CONTROL_RESERVE;

/// Time for a request head to arrive, from the connection's start or the
/// end of the previous response (so also the keep-alive idle timeout). A
/// request's own handling (a deploy, `/wait-idle`) is not bounded by it.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(5);

/// How long an answer in flight gets when the API stops.
const STOP_WAIT: Duration = Duration::from_secs(1);

/// One open control connection, as the bound sees it.
struct Slot {
    /// Between a complete request head and the end of its answer.
    busy: AtomicBool,
    /// Closes the connection (shed to make room).
    shed: CancellationToken,
}

/// The open control connections, oldest first. Only the control socket
/// touches this lock, never a proxied connection.
#[derive(Default)]
struct Slots(Mutex<Vec<Arc<Slot>>>);

impl Slots {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Arc<Slot>>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Room for one more connection: at the bound, sheds the oldest one not
    /// in a request. False if all are in a request.
    fn make_room(&self) -> bool {
        let mut slots = self.lock();
        if slots.len() < MAX_CONNECTIONS {
            return true;
        }
        match slots.iter().position(|slot| !slot.busy.load(Relaxed)) {
            Some(index) => {
                slots.remove(index).shed.cancel();
                true
            }
            None => false,
        }
    }

    fn add(&self) -> Arc<Slot> {
        let slot = Arc::new(Slot {
            busy: AtomicBool::new(false),
            shed: CancellationToken::new(),
        });
        self.lock().push(slot.clone());
        slot
    }

    fn remove(&self, slot: &Arc<Slot>) {
        self.lock().retain(|other| !Arc::ptr_eq(other, slot));
    }
}

/// Marks a slot busy while a request is handled, on every path.
struct Busy(Arc<Slot>);

impl Busy {
    fn new(slot: &Arc<Slot>) -> Busy {
        slot.busy.store(true, Relaxed);
        Busy(slot.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.busy.store(false, Relaxed);
    }
}

/// Serves the API on the socket the daemon bound until `stop` is
/// cancelled: the daemon starts it (see `daemon::run`) and joins it.
pub async fn serve(listener: Listener, config: ControlConfig, shared: Arc<Shared>, stop: CancellationToken) {
    let access = Arc::new(Access::from_config(&config));
    let connections = TaskTracker::new();
    let slots = Arc::new(Slots::default());
    let mut failing = false;
    let acceptor = loop {
        match listener.acceptor() {
            Ok(acceptor) => break acceptor,
            // Out of descriptors at the start: as for a failed accept.
            Err(e) => {
                if !failing {
                    warn!(error = %e, "control socket: cannot watch it; retrying");
                    failing = true;
                }
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
            }
        }
    };
    'accepting: loop {
        while !slots.make_room() {
            // Every connection is in a request: wait for one to end.
            tokio::select! {
                () = stop.cancelled() => break 'accepting,
                () = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
        let accepted = tokio::select! {
            () = stop.cancelled() => break 'accepting,
            accepted = acceptor.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => {
                if failing {
                    info!("control socket: accepting again");
                    failing = false;
                }
                stream
            }
            Err(e) => {
                // Once per episode: out of descriptors, this would repeat
                // twenty times a second.
                if !failing {
                    warn!(error = %e, "control socket: accept failed; retrying");
                    failing = true;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let (access, shared, stop) = (access.clone(), shared.clone(), stop.clone());
        let slot = slots.add();
        let slots = slots.clone();
        connections.spawn(async move {
            let in_request = slot.clone();
            let service = service_fn(move |request| {
                let (access, shared) = (access.clone(), shared.clone());
                let busy = Busy::new(&in_request);
                async move {
                    let reply = api::handle(request, &access, &shared).await;
                    drop(busy);
                    Ok::<_, Infallible>(reply)
                }
            });
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEAD_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            let mut connection = std::pin::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                () = slot.shed.cancelled() => {}
                () = stop.cancelled() => {
                    // An answer being written still goes out (an upgrade's
                    // is written just as its old process stops serving).
                    connection.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(STOP_WAIT, connection).await;
                }
            }
            slots.remove(&slot);
        });
    }
    // Every connection task ends at `stop` (it selects on it), so this
    // wait is short; it makes the daemon's join of the API cover them.
    connections.close();
    connections.wait().await;
}
