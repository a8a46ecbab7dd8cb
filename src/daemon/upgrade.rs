//! `interlude upgrade`: replacing this process by the binary now at the
//! path it was started from, without refusing a connection or losing a
//! held client (the messages are `handover.rs`'s).
//!
//! The old process launches the new one with the same arguments and one
//! end of a private socket, offers it every listening socket, the control
//! socket and the run-time state, and waits for `ready` (or its failure, or
//! the timeout: then the new process is ended and nothing changed). Then it
//! stops accepting (the new process accepts on the same sockets), sends its
//! held clients over, waits until they are adopted, tells systemd the new
//! main pid and commits. Until the commit every step can be undone: the
//! accept loops restart on the sockets they had and the held clients are
//! held here again. After it, the old process hands its live connections
//! over (`relocate.rs`), lets what cannot move (TLS) finish and exits;
//! what it still holds (TLS clients) it releases when the new process says
//! their proxy resumed.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::process::ExitStatus;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::process::Child;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::Daemon;
use super::commands::Command;
use super::handover::{
    self, Channel, HANDOVER_FD_ENV, HandoverError, HeldClient, MAX_FDS, MAX_PACKET, Message, Offer,
    SocketEntry, Span,
};
use super::listeners::{HaltedListener, RunningListener, routes_for};
use super::state::State;
use crate::config::Mode;
use crate::proxy::Proxy;
use crate::proxy::gate::MovedClient;
use crate::proxy::http;
use crate::proxy::listener::{Permits, Routes};
use crate::sockets::inherited::{Inherited, InheritedSocket};
use crate::sockets::stream::{Peer, Stream};
use crate::telemetry::systemd;

/// How long the new process has to read the offer, and the old one to
/// send held clients and hear they were adopted.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// How long held clients get to leave their hold once asked to move.
const COLLECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long an ended new process gets to exit before it is waited for no more.
const END_WAIT: Duration = Duration::from_secs(5);

/// Room in a packet of held clients for all but the clients' entries: the
/// length prefix, the version and the message's own fields.
const ENVELOPE_ROOM: usize = 256;

/// How long handing over the held clients may take in all, from the first
/// packet to `adopted`: the loop waits meanwhile, and systemd's watchdog
/// must not find it silent (pinged before; `WatchdogSec=` is 30 s).
const HAND_OVER_TIMEOUT: Duration = Duration::from_secs(10);

/// The new process until the upgrade commits: ended (SIGKILL) if dropped
/// before, whatever drops it (a stop during the upgrade, a failure), so
/// that no process is left holding the sockets.
pub struct NewProcess {
    child: Child,
    /// Its pid, taken at the start (tokio forgets it once reaped).
    pid: u32,
    committed: bool,
}

impl NewProcess {
    fn new(child: Child) -> NewProcess {
        NewProcess {
            pid: child.id().unwrap_or(0),
            child,
            committed: false,
        }
    }

    /// The upgrade committed: the new process lives on (tokio reaps it if
    /// it exits while this one still runs).
    fn committed(mut self) {
        self.committed = true;
    }

    /// Ends the new process and waits (bounded) for it to exit.
    async fn end(mut self) {
        let _ = self.child.start_kill();
        if tokio::time::timeout(END_WAIT, self.child.wait()).await.is_err() {
            warn!("upgrade: the new process did not exit after SIGKILL");
        }
    }
}

impl Drop for NewProcess {
    fn drop(&mut self) {
        if !self.committed {
            // Nothing to do if it has exited already.
            let _ = self.child.start_kill();
        }
    }
}

/// How this process was started: the executable's path as it was then
/// (after a package upgrade `/proc/self/exe` names the deleted old file,
/// while the path names the new one) and its arguments.
struct Launch {
    exe: PathBuf,
    args: Vec<OsString>,
}

static LAUNCH: OnceLock<Result<Launch, String>> = OnceLock::new();

/// Started by an upgrade under systemd's watchdog: the old process left
/// `WATCHDOG_PID` (its own pid) out of this one's environment; naming this
/// process there makes the watchdog its own, for itself and for what
/// reads the environment after it.
pub fn claim_watchdog() {
    if std::env::var_os("WATCHDOG_USEC").is_some() {
        // SAFETY: called at the start of `start_and_serve`, before any
        // thread is started, so nothing reads the environment meanwhile.
        unsafe { std::env::set_var("WATCHDOG_PID", std::process::id().to_string()) };
    }
}

/// Remembers how this process was started; call first thing at start.
pub fn remember_launch() {
    LAUNCH.get_or_init(|| {
        let mut args = std::env::args_os();
        // The path it was started by, when that is absolute (systemd's
        // `ExecStart=` is): a symbolic link (`/usr/bin/interlude` to a
        // versioned directory) is followed again at the upgrade, to where
        // it points then. Else the resolved path of this executable.
        let exe = match args.next().map(PathBuf::from) {
            Some(path) if path.is_absolute() => path,
            _ => std::env::current_exe().map_err(|e| format!("cannot tell this program's path: {e}"))?,
        };
        Ok(Launch {
            exe,
            args: args.collect(),
        })
    });
}

/// What the old process answers when the new one serves.
#[derive(Debug, Clone)]
pub struct Upgraded {
    pub pid: u32,
    pub previous_pid: u32,
    pub version: String,
}

/// Why an upgrade did not happen (the old process serves on, unchanged).
#[derive(Debug)]
pub enum UpgradeError {
    /// Another upgrade is under way.
    InProgress,
    /// A deploy or a reload is under way (says which): the new process
    /// would start from a state that is about to change.
    Busy(String),
    /// The new process could not be started.
    Launch(String),
    /// The new process said why it could not start.
    Refused(String),
    /// The new process exited before it was ready.
    Exited(String),
    /// The new process was not ready in time.
    TimedOut(Duration),
    /// The conversation with the new process broke.
    Handover(HandoverError),
}

impl std::fmt::Display for UpgradeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpgradeError::InProgress => f.write_str("an upgrade is already in progress"),
            UpgradeError::Busy(what) => write!(f, "{what} is in progress; upgrade when it is done"),
            UpgradeError::Launch(why) => write!(f, "cannot start the new process: {why}"),
            UpgradeError::Refused(why) => write!(f, "the new process failed: {why}"),
            UpgradeError::Exited(status) => {
                write!(f, "the new process exited before it was ready ({status})")
            }
            UpgradeError::TimedOut(after) => write!(
                f,
                "the new process was not ready within {}; it was ended",
                humantime::format_duration(*after)
            ),
            UpgradeError::Handover(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for UpgradeError {}

impl From<HandoverError> for UpgradeError {
    fn from(e: HandoverError) -> Self {
        UpgradeError::Handover(e)
    }
}

pub type UpgradeReply = oneshot::Sender<Result<Upgraded, UpgradeError>>;

/// A new process that reported ready.
pub struct Successor {
    channel: Channel,
    process: NewProcess,
    version: String,
    /// Its handover protocol version (a message kind later than it knows
    /// is not sent to it).
    protocol: u32,
}

/// What the old process keeps after the commit.
pub(super) struct HandedOver {
    /// The conversation, for `resumed` messages.
    pub channel: Channel,
    /// Sockets no longer accepted on, with their HTTP connections.
    pub halted: Vec<HaltedListener>,
    /// The new process's handover protocol version: whether it takes
    /// live connections.
    pub protocol: u32,
}

impl Daemon {
    /// Starts an upgrade; its outcome comes back as `UpgradeStarted`.
    pub(super) fn upgrade(&mut self, timeout: Duration, reply: UpgradeReply) {
        if self.upgrading.is_some() {
            let _ = reply.send(Err(UpgradeError::InProgress));
            return;
        }
        if let Some(busy) = self.busy() {
            let _ = reply.send(Err(UpgradeError::Busy(busy)));
            return;
        }
        let (offer, fds) = match self.offer() {
            Ok(offer) => offer,
            Err(e) => {
                let _ = reply.send(Err(UpgradeError::Launch(format!(
                    "cannot share the sockets: {e}"
                ))));
                return;
            }
        };
        let commands = self.command_sender.clone();
        let stop = self.kill_all.clone();
        self.tasks.spawn(async move {
            let outcome = match launch().await {
                Ok((channel, process)) => {
                    info!(pid = process.pid, "upgrade: new process started; handing over");
                    tokio::select! {
                        outcome = handshake(channel, process, offer, fds, timeout) => outcome,
                        // Stopping: the new process is ended as it is dropped.
                        () = stop.cancelled() => return,
                    }
                }
                Err(e) => Err(e),
            };
            // Stopping, the loop is gone: a ready process is dropped, and so ended.
            let _ = commands.send(Command::UpgradeStarted(Box::new(outcome))).await;
        });
        self.upgrading = Some(reply);
    }

    /// What an upgrade must wait for: a deploy waiting for its backends'
    /// health, or a reload being read.
    fn busy(&self) -> Option<String> {
        if let Some(running) = self.running.proxies.iter().find(|r| r.deploying.is_some()) {
            return Some(format!("a deploy of proxy {}", running.proxy.name));
        }
        self.reloads.in_progress().then(|| "a reload".to_string())
    }

    /// The offer: every listening socket and the control socket (by the
    /// address the config writes), and the run-time state.
    fn offer(&self) -> io::Result<(Message, Vec<OwnedFd>)> {
        let mut fds = Vec::new();
        let mut listeners = Vec::new();
        for listener in &self.running.listeners {
            listeners.push(SocketEntry {
                address: listener.key.address().to_string(),
                proxy: listener.key.owner().map(str::to_string),
                fd: fds.len(),
            });
            fds.push(listener.socket().try_clone_to_owned()?);
        }
        let control = SocketEntry {
            address: self.config.control.listen.to_string(),
            proxy: None,
            fd: fds.len(),
        };
        fds.push(self.control_socket.try_clone()?);
        if fds.len() > MAX_FDS {
            return Err(io::Error::other(format!(
                "{} sockets are more than one handover message carries ({MAX_FDS})",
                fds.len()
            )));
        }
        let offer = Offer {
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            generation: self.view.borrow().generation,
            state: self.current_state(),
            listeners,
            control: Some(control),
        };
        Ok((Message::Offer(offer), fds))
    }

    /// The new process is ready (or failed): hand over, or carry on.
    /// Returns what the old process keeps once it has handed over.
    pub(super) async fn upgrade_started(
        &mut self,
        outcome: Result<Successor, UpgradeError>,
    ) -> Option<HandedOver> {
        let reply = self.upgrading.take()?;
        let successor = match outcome {
            Ok(successor) => successor,
            Err(e) => {
                warn!(error = %e, "upgrade failed; this process carries on");
                let _ = reply.send(Err(e));
                self.start_reload();
                return None;
            }
        };
        // The old process stops accepting; the new one starts only at the
        // commit (until then this one may still take the upgrade back, and
        // what the new one had accepted would be lost): clients queue in
        // the kernel meanwhile.
        if self.announced {
            self.watchdog_round();
        }
        let mut halted = Vec::with_capacity(self.running.listeners.len());
        for listener in self.running.listeners.drain(..) {
            halted.push(listener.halt().await);
        }
        let moved = self.collect_held().await;
        let staying: Vec<String> = self
            .running
            .proxies
            .iter()
            .filter(|running| running.proxy.gate.held() > 0)
            .map(|running| running.proxy.name.to_string())
            .collect();
        let count = moved.len();
        if self.announced {
            self.watchdog_round();
        }
        let pid = successor.process.pid;
        let sent = async {
            send_held(&successor.channel, &moved, staying, self.current_state()).await?;
            // systemd hears of the new main pid before the new process can
            // speak as it (`NotifyAccess=main` drops what it says before).
            systemd::main_pid(pid);
            successor.channel.send(&Message::Commit, &[], &[]).await
        };
        let sent = match tokio::time::timeout(HAND_OVER_TIMEOUT, sent).await {
            Ok(sent) => sent,
            Err(_) => Err(HandoverError::Io(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "handing over {count} held clients took more than {}",
                    humantime::format_duration(HAND_OVER_TIMEOUT)
                ),
            ))),
        };
        if let Err(e) = sent {
            warn!(error = %e, "upgrade failed while handing over; this process carries on");
            systemd::main_pid(std::process::id());
            // The new process has accepted nothing (it starts at the
            // commit it did not get); the held clients' sockets are still
            // open here.
            successor.process.end().await;
            self.undo(halted, moved);
            let _ = reply.send(Err(UpgradeError::Handover(e)));
            self.start_reload();
            return None;
        }
        successor.process.committed();
        drop(moved);
        crate::sockets::stream::keep_socket_files();
        info!(
            pid,
            version = %successor.version,
            protocol = successor.protocol,
            held = count,
            "upgrade: the new process serves; this one finishes its connections and exits"
        );
        let _ = reply.send(Ok(Upgraded {
            pid,
            previous_pid: std::process::id(),
            version: successor.version,
        }));
        Some(HandedOver {
            channel: successor.channel,
            halted,
            protocol: successor.protocol,
        })
    }

    /// Asks every proxy's movable held clients to leave their hold and
    /// waits (bounded) until each has.
    async fn collect_held(&mut self) -> Vec<MovedClient> {
        let (sink, mut arriving) = mpsc::unbounded_channel();
        for running in &self.running.proxies {
            running.proxy.gate.start_moving(sink.clone());
        }
        drop(sink);
        let deadline = Instant::now() + COLLECT_TIMEOUT;
        let mut moved = Vec::new();
        loop {
            while let Ok(client) = arriving.try_recv() {
                moved.push(client);
            }
            let waiting: u64 = self
                .running
                .proxies
                .iter()
                .map(|r| r.proxy.gate.movable_held())
                .sum();
            if waiting == 0 {
                break;
            }
            if Instant::now() >= deadline {
                warn!(
                    waiting,
                    "upgrade: some held clients did not leave their hold in time; they stay here"
                );
                break;
            }
            tokio::select! {
                Some(client) = arriving.recv() => moved.push(client),
                () = tokio::time::sleep(Duration::from_millis(5)) => {}
            }
        }
        for running in &self.running.proxies {
            running.proxy.gate.stop_moving();
        }
        // Any sent before the call closed.
        while let Ok(client) = arriving.try_recv() {
            moved.push(client);
        }
        moved
    }

    /// Puts everything back as it was before a failed hand-over: accept
    /// again on the same sockets, hold the clients here again.
    fn undo(&mut self, halted: Vec<HaltedListener>, moved: Vec<MovedClient>) {
        for halted in halted {
            let (key, listener, site) = halted.into_parts();
            // Its HTTP connections carry on; the stop waits for them.
            let retiring = site.clone();
            self.retiring
                .spawn(async move { retiring.connections.wait().await });
            site.connections.close();
            if let Some(routes) = routes_for(&key, &self.running.proxies) {
                self.running.listeners.push(RunningListener::start(
                    key,
                    listener,
                    routes,
                    self.daemon_limit.limit.clone(),
                    &self.watchdog_ticks,
                    self.kill_all.child_token(),
                    &self.accepting,
                    self.departures.clone(),
                    self.workers.clone(),
                ));
            }
        }
        for running in &mut self.running.proxies {
            let listeners = &self.running.listeners;
            running.take_address(listeners);
        }
        for client in moved {
            self.serve_moved(client);
        }
    }

    /// Serves a held client handed over (by the previous process, or back
    /// from a failed upgrade) on its proxy, on the next connection worker
    /// (its socket leaves this runtime's reactor for the worker's); false
    /// if there is nowhere to serve it. A mode http client is served by
    /// its proxy's listening socket, from the bytes of its held request.
    /// Counted in its proxy's (or site's) connections from this call on, so
    /// that a stop waits for it.
    fn serve_moved(&self, client: MovedClient) -> bool {
        let Some(running) = self.running.proxies.iter().find(|r| r.proxy.name == client.proxy) else {
            warn!(proxy = %client.proxy, "a held client handed over for a proxy this config does not have; closing it");
            return false;
        };
        let MovedClient {
            proxy: name,
            socket,
            early,
            peer,
        } = client;
        let socket = match socket.into_std() {
            Ok(socket) => socket,
            Err(e) => {
                warn!(proxy = %name, error = %e, "cannot take a held client off this runtime; closing it");
                return false;
            }
        };
        let registered = move |socket| {
            Stream::from_std(socket)
                .inspect_err(
                    |e| warn!(proxy = %name, error = %e, "cannot register a held client; closing it"),
                )
                .ok()
        };
        match running.config.mode {
            Mode::Tcp => {
                let proxy = running.proxy.clone();
                let counted = proxy.connections.token();
                self.workers.run(move || {
                    let _counted = counted;
                    if let Some(socket) = registered(socket) {
                        proxy
                            .connections
                            .spawn(proxy.clone().serve_moved(socket, peer, early));
                    }
                });
                true
            }
            Mode::Http => {
                let Some(listener) = self.running.listeners.iter().find(|l| l.key == running.key) else {
                    warn!(proxy = %running.proxy.name, "a held request handed over for a proxy that listens nowhere; closing it");
                    return false;
                };
                let site = listener.site.clone();
                let Routes::Http(hosts) = site.routes.borrow().clone() else {
                    warn!(proxy = %running.proxy.name, "a held request handed over for a socket no longer mode http; closing it");
                    return false;
                };
                let permits = Permits::admitted(&site);
                let counted = site.connections.token();
                self.workers.run(move || {
                    let _counted = counted;
                    if let Some(socket) = registered(socket) {
                        let serving =
                            http::serve_connection(site.clone(), hosts, socket, peer, permits, early);
                        site.connections.spawn(serving);
                    }
                });
                true
            }
        }
    }

    /// The new process's side: held clients from the previous process.
    pub(super) fn adopt_held(&self, clients: Vec<MovedClient>) -> u64 {
        clients
            .into_iter()
            .map(|client| u64::from(self.serve_moved(client)))
            .sum()
    }

    /// The new process's side: the previous process's run-time state as it
    /// was at the hand-over (a pause set during the upgrade included), and
    /// the proxies it still holds clients of.
    pub(super) fn handover_done(&mut self, staying: Vec<String>, state: Option<State>) {
        if let Some(state) = state {
            for running in &self.running.proxies {
                let name = running.proxy.name.to_string();
                let paused_here = running.proxy.gate.state().runtime.is_some();
                match state.paused.get(&name) {
                    Some(record) if !paused_here => {
                        let _ = self.running.pause(std::slice::from_ref(&name), &record.by);
                    }
                    None if paused_here => {
                        let _ = self.running.resume(std::slice::from_ref(&name), "upgrade");
                    }
                    _ => {}
                }
            }
            drop(self.persist());
        }
        self.predecessor_holds.extend(staying);
    }

    /// Tells the previous process which of the proxies it still holds
    /// clients of are open here, so it releases them.
    pub(super) fn tell_predecessor(&mut self) {
        if self.predecessor_holds.is_empty() {
            return;
        }
        let Some(to_predecessor) = &self.to_predecessor else {
            return;
        };
        let proxies = &self.running.proxies;
        let open: Vec<String> = self
            .predecessor_holds
            .iter()
            .filter(|name| {
                proxies
                    .iter()
                    .find(|r| *r.proxy.name == ***name)
                    .is_none_or(|r| !r.proxy.gate.state().paused())
            })
            .cloned()
            .collect();
        for name in open {
            self.predecessor_holds.remove(&name);
            let _ = to_predecessor.send(name);
        }
    }
}

/// The old process's side after the commit: releases the clients it still
/// holds of a proxy once the new process says that proxy resumed; ends
/// when the new process closes the conversation or at `end`.
pub(super) async fn release_when_resumed(
    channel: Arc<Channel>,
    proxies: Vec<Arc<Proxy>>,
    end: CancellationToken,
) {
    loop {
        let received = tokio::select! {
            () = end.cancelled() => return,
            received = channel.recv() => received,
        };
        match received.map(|packet| packet.message) {
            Ok(Message::Resumed { proxy }) => {
                if let Some(proxy) = proxies.iter().find(|p| *p.name == *proxy) {
                    info!(proxy = %proxy.name, held = proxy.gate.held(), "resumed in the new process: releasing the clients held here");
                    proxy.gate.set_declared(false);
                    proxy.gate.set_runtime(None);
                }
            }
            Ok(other) => warn!(
                kind = other.kind(),
                "upgrade: unexpected message from the new process; ignored"
            ),
            Err(HandoverError::UnknownKind(kind)) => {
                warn!(
                    kind,
                    "upgrade: a message this version does not know, from the new process; ignored"
                );
            }
            Err(_) => return,
        }
    }
}

/// How often, and how far apart, starting the new binary is tried again
/// while its file is busy (`ETXTBSY`).
const TEXT_BUSY_TRIES: u32 = 20;
const TEXT_BUSY_PAUSE: Duration = Duration::from_millis(50);

/// Starts the binary at the path this process was started from, with the
/// same arguments and the new end of a handover socket.
async fn launch() -> Result<(Channel, NewProcess), UpgradeError> {
    let launch = match LAUNCH.get() {
        Some(Ok(launch)) => launch,
        Some(Err(why)) => return Err(UpgradeError::Launch(why.clone())),
        None => {
            return Err(UpgradeError::Launch(
                "the program's path was not recorded at start".into(),
            ));
        }
    };
    let (channel, theirs) = handover::pair().map_err(|e| UpgradeError::Launch(e.to_string()))?;
    let mut command = tokio::process::Command::new(&launch.exe);
    command
        .args(&launch.args)
        .env(
            HANDOVER_FD_ENV,
            std::os::fd::AsRawFd::as_raw_fd(&theirs).to_string(),
        )
        // systemd's watchdog is the new process's once it is the main pid;
        // without WATCHDOG_PID it applies to whoever reads it.
        .env_remove("WATCHDOG_PID")
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_PID")
        .env_remove("LISTEN_FDNAMES")
        .stdin(std::process::Stdio::null())
        // `NewProcess` ends it unless the upgrade commits.
        .kill_on_drop(false);
    let mut busy = 0;
    let child = loop {
        match command.spawn() {
            Ok(child) => break child,
            // The file was just written (a package upgrade renames it in
            // place) and a process forked meanwhile still holds it open
            // for writing: exec(2) refuses until that process execs.
            Err(e)
                if rustix::io::Errno::from_io_error(&e) == Some(rustix::io::Errno::TXTBSY)
                    && busy < TEXT_BUSY_TRIES =>
            {
                busy += 1;
                tokio::time::sleep(TEXT_BUSY_PAUSE).await;
            }
            Err(e) => return Err(UpgradeError::Launch(format!("{}: {e}", launch.exe.display()))),
        }
    };
    drop(theirs);
    Ok((channel, NewProcess::new(child)))
}

/// Sends the offer and waits for `ready`, the new process's failure, its
/// exit or the timeout; on failure the new process is ended.
async fn handshake(
    channel: Channel,
    mut process: NewProcess,
    offer: Message,
    fds: Vec<OwnedFd>,
    timeout: Duration,
) -> Result<Successor, UpgradeError> {
    let talk = async {
        let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(AsFd::as_fd).collect();
        channel.send(&offer, &[], &borrowed).await?;
        answer(channel.recv().await)
    };
    let outcome = tokio::select! {
        outcome = talk => outcome,
        status = process.child.wait() => Err(exited(status)),
        () = tokio::time::sleep(timeout) => Err(UpgradeError::TimedOut(timeout)),
    };
    drop(fds);
    match outcome {
        Ok((version, protocol)) => Ok(Successor {
            channel,
            process,
            version,
            protocol,
        }),
        Err(e @ (UpgradeError::Exited(_) | UpgradeError::Handover(_))) => {
            // A process that fails says why before it exits (and it may
            // exit before the offer is even sent): that is the error. Once
            // it has exited, its end is closed and the read returns at
            // once, with its last words or end-of-file; the bound is for a
            // busy machine, where the runtime may be slow to get round to it.
            let said = tokio::time::timeout(Duration::from_secs(2), last_words(&channel)).await;
            let status = match &e {
                UpgradeError::Exited(_) => None,
                _ => tokio::time::timeout(END_WAIT, process.child.wait()).await.ok(),
            };
            process.end().await;
            Err(match (said.map(answer), status) {
                (Ok(Err(refused @ UpgradeError::Refused(_))), _) => refused,
                (_, Some(status)) => exited(status),
                _ => e,
            })
        }
        Err(e) => {
            process.end().await;
            Err(e)
        }
    }
}

/// What a new process that failed said before it closed its end. If it
/// exited with our offer unread, the kernel reports a reset before the
/// packets still queued for us: read on past it, once.
async fn last_words(channel: &Channel) -> Result<handover::Packet, HandoverError> {
    match channel.recv().await {
        Err(HandoverError::Closed) => channel.recv().await,
        said => said,
    }
}

/// The new process's answer to the offer: its version and its protocol
/// version, if it is ready.
fn answer(received: Result<handover::Packet, HandoverError>) -> Result<(String, u32), UpgradeError> {
    let packet = received?;
    match packet.message {
        Message::Ready { version, .. } => Ok((version, packet.version)),
        Message::Failed { error } => Err(UpgradeError::Refused(error)),
        other => Err(UpgradeError::Handover(HandoverError::Unexpected {
            expected: "ready",
            got: other.kind().to_string(),
        })),
    }
}

fn exited(status: io::Result<ExitStatus>) -> UpgradeError {
    UpgradeError::Exited(match status {
        Ok(status) => status.to_string(),
        Err(e) => e.to_string(),
    })
}

/// Sends the held clients in packets (descriptors and bytes within a
/// packet's limits), then `done`, and waits for `adopted`.
async fn send_held(
    channel: &Channel,
    moved: &[MovedClient],
    staying: Vec<String>,
    state: State,
) -> Result<(), HandoverError> {
    let mut rest = moved;
    while !rest.is_empty() {
        // As many clients as fit one packet, measured: each one's entry in
        // the header (its proxy's name is as long as the config made it)
        // and its bytes in the payload.
        let mut clients = Vec::new();
        let mut payload = Vec::new();
        let mut header = ENVELOPE_ROOM;
        for client in rest.iter().take(MAX_FDS) {
            let entry = HeldClient {
                client_address: client.peer.tcp(),
                proxy: client.proxy.to_string(),
                fd: clients.len(),
                early: Span {
                    offset: payload.len(),
                    len: client.early.len(),
                },
            };
            let entry_size = serde_json::to_vec(&entry).map_or(usize::MAX, |json| json.len() + 1);
            let fits = header
                .saturating_add(entry_size)
                .saturating_add(payload.len() + client.early.len())
                <= MAX_PACKET;
            // A first client that does not fit alone fails in `send`, saying so.
            if !fits && !clients.is_empty() {
                break;
            }
            header = header.saturating_add(entry_size);
            payload.extend_from_slice(&client.early);
            clients.push(entry);
        }
        let (batch, after) = rest.split_at(clients.len());
        let fds: Vec<BorrowedFd<'_>> = batch.iter().map(|client| client.socket.as_fd()).collect();
        channel.send(&Message::Held { clients }, &payload, &fds).await?;
        rest = after;
    }
    channel
        .send(
            &Message::Done {
                staying,
                state: Some(state),
            },
            &[],
            &[],
        )
        .await?;
    let adopted = tokio::time::timeout(STEP_TIMEOUT, channel.recv())
        .await
        .map_err(|_| {
            HandoverError::Io(io::Error::new(
                io::ErrorKind::TimedOut,
                "no answer to the held clients",
            ))
        })??;
    match adopted.message {
        Message::Adopted { count } => {
            if count != moved.len() as u64 {
                warn!(
                    sent = moved.len(),
                    adopted = count,
                    "upgrade: the new process did not take every held client"
                );
            }
            Ok(())
        }
        other => Err(HandoverError::Unexpected {
            expected: "adopted",
            got: other.kind().to_string(),
        }),
    }
}

/// The previous process's offer, as the new process starts from it.
pub struct Predecessor {
    pub channel: Channel,
    pub pid: u32,
    /// Its handover protocol version.
    pub protocol: u32,
    pub generation: u64,
    pub state: State,
}

/// The handover socket named in the environment, if an upgrade started
/// this process. Claimed before anything else opens a descriptor.
pub fn handover_socket() -> Option<io::Result<OwnedFd>> {
    let raw = std::env::var(HANDOVER_FD_ENV).ok()?;
    // SAFETY: called once, first thing in `startup::run`, before any thread
    // is started, so nothing reads the environment meanwhile. Removed, the
    // number is claimed once, and not passed on to what this process starts.
    unsafe { std::env::remove_var(HANDOVER_FD_ENV) };
    Some(
        raw.parse()
            .map_err(|_| io::Error::other(format!("{HANDOVER_FD_ENV}={raw} is not a descriptor")))
            .and_then(crate::sockets::inherited::claim),
    )
}

/// Tells the previous process that this one cannot start, on the way out.
pub fn refuse(socket: BorrowedFd<'_>, error: &str) {
    let message = Message::Failed {
        error: error.to_string(),
    };
    if let Err(e) = handover::send_blocking(socket, &message) {
        eprintln!("interlude: cannot tell the previous process why: {e}");
    }
}

/// Reads the previous process's offer: its sockets (into `inherited`, to
/// adopt by address) and its run-time state.
pub async fn receive_offer(socket: OwnedFd, inherited: &mut Inherited) -> Result<Predecessor, HandoverError> {
    let channel = Channel::new(socket)?;
    let packet = tokio::time::timeout(STEP_TIMEOUT, channel.recv())
        .await
        .map_err(|_| {
            HandoverError::Io(io::Error::new(
                io::ErrorKind::TimedOut,
                "no offer from the previous process",
            ))
        })??;
    let Message::Offer(offer) = packet.message else {
        return Err(HandoverError::Unexpected {
            expected: "offer",
            got: packet.message.kind().to_string(),
        });
    };
    let mut fds: Vec<Option<OwnedFd>> = packet.fds.into_iter().map(Some).collect();
    for entry in offer.listeners.iter().chain(offer.control.iter()) {
        let fd = fds
            .get_mut(entry.fd)
            .and_then(Option::take)
            .ok_or_else(|| HandoverError::Malformed(format!("no descriptor for {}", entry.address)))?;
        inherited.push(InheritedSocket::handed_over(
            fd,
            entry.address.clone(),
            entry.proxy.clone(),
        ));
    }
    Ok(Predecessor {
        channel,
        pid: offer.pid,
        protocol: packet.version,
        generation: offer.generation,
        state: offer.state,
    })
}

/// The new process's side of the rest of the conversation: held clients
/// in, `adopted` out, the commit; then `resumed` for the proxies whose
/// clients the previous process still holds, until either side closes.
pub async fn follow(
    channel: Channel,
    commands: mpsc::Sender<Command>,
    mut resumed: mpsc::UnboundedReceiver<String>,
    stop: CancellationToken,
) {
    let mut committed = false;
    loop {
        let received = tokio::select! {
            () = stop.cancelled() => return,
            Some(proxy) = resumed.recv() => {
                if let Err(e) = channel.send(&Message::Resumed { proxy }, &[], &[]).await {
                    info!(error = %e, "the previous process is gone; it holds no more clients");
                    return;
                }
                continue;
            }
            received = channel.recv() => received,
        };
        let packet = match received {
            Ok(packet) => packet,
            Err(HandoverError::Closed) if !committed => {
                // It would have ended this process to take the upgrade
                // back: it is gone (it crashed), and this one serves.
                warn!("upgrade: the previous process went away before stepping aside; serving");
                let _ = commands.send(Command::HandoverCommitted).await;
                return;
            }
            Err(HandoverError::Closed) => return,
            Err(HandoverError::UnknownKind(kind)) => {
                warn!(
                    kind,
                    "upgrade: a message this version does not know, from the previous process; ignored"
                );
                continue;
            }
            Err(e) => {
                warn!(error = %e, "upgrade: the conversation with the previous process broke");
                return;
            }
        };
        let command = match packet.message {
            Message::Held { clients } => {
                Command::AdoptHeld(held_clients(clients, &packet.payload, packet.fds))
            }
            Message::Done { staying, state } => {
                let (reply, adopted) = oneshot::channel();
                if commands
                    .send(Command::HandoverDone {
                        staying,
                        state,
                        reply,
                    })
                    .await
                    .is_err()
                {
                    return;
                }
                let count = adopted.await.unwrap_or(0);
                if let Err(e) = channel.send(&Message::Adopted { count }, &[], &[]).await {
                    warn!(error = %e, "upgrade: cannot confirm the held clients to the previous process");
                    return;
                }
                continue;
            }
            Message::Commit => {
                committed = true;
                Command::HandoverCommitted
            }
            Message::Live { connections } => Command::AdoptLive(super::relocate::live_connections(
                connections,
                &packet.payload,
                packet.fds,
            )),
            other => {
                warn!(
                    kind = other.kind(),
                    "upgrade: unexpected message from the previous process; ignored"
                );
                continue;
            }
        };
        if commands.send(command).await.is_err() {
            return;
        }
    }
}

/// Held clients as they arrived: each descriptor made a stream again.
fn held_clients(clients: Vec<HeldClient>, payload: &[u8], fds: Vec<OwnedFd>) -> Vec<MovedClient> {
    let mut fds: Vec<Option<OwnedFd>> = fds.into_iter().map(Some).collect();
    let mut adopted = Vec::with_capacity(clients.len());
    for client in clients {
        let Some(fd) = fds.get_mut(client.fd).and_then(Option::take) else {
            warn!(proxy = %client.proxy, "a held client arrived without its socket");
            continue;
        };
        let early = client.early.of(payload).unwrap_or_default().to_vec();
        match Stream::adopt(fd) {
            Ok(socket) => adopted.push(MovedClient {
                peer: client.client_address.map_or_else(|| socket.peer(), Peer::Tcp),
                proxy: client.proxy.into(),
                socket,
                early,
            }),
            Err(e) => warn!(proxy = %client.proxy, error = %e, "a held client's socket cannot be used"),
        }
    }
    adopted
}

/// The proxies named in `staying` that the old process still holds
/// clients of, kept until they resume here.
pub type PredecessorHolds = BTreeSet<String>;

#[cfg(test)]
mod tests {
    use super::*;

    /// A new process that fails with our offer unread in its socket: its
    /// reason still comes through, behind the reset the kernel reports
    /// first.
    #[tokio::test]
    async fn a_failure_is_read_when_the_offer_went_unread() {
        let (ours, theirs) = handover::pair().expect("pair");
        let theirs = Channel::new(theirs).expect("channel");
        // Any message stands in for the offer: it is never read.
        ours.send(&Message::Commit, &[], &[]).await.expect("offer");
        let failed = Message::Failed {
            error: "unknown field `bogus_key`".into(),
        };
        theirs.send(&failed, &[], &[]).await.expect("failed");
        drop(theirs);
        let said = last_words(&ours).await.expect("its last words");
        assert_eq!(said.message, failed);
    }
}
