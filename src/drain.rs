//! The one drain primitive: wait for work to finish, or cut it at a
//! deadline. A removed backend, a removed proxy, a closed listener and the
//! graceful stop all end the same way: their connections get until the
//! deadline, then their kill token is cancelled and they get a short
//! moment to close. Each caller says only what "finished" means, when the
//! deadline is, and what to log when it cuts.
//!
//! This module knows nothing of proxies or sockets; it sits at the bottom of
//! the layers with `sockets`.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// How a drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drained {
    /// Everything finished before the deadline.
    Finished,
    /// The deadline came first: the kill token was cancelled. `closed` says
    /// whether the work then finished within the kill wait.
    Cut { closed: bool },
}

/// Waits for `finished`; if `deadline` completes first, calls `on_cut`
/// (while the work is still running, so it can say how much is left),
/// cancels `kill`, and waits up to `kill_wait` for `finished`.
pub async fn drain(
    finished: impl Future<Output = ()>,
    deadline: impl Future<Output = ()>,
    kill: &CancellationToken,
    kill_wait: Duration,
    on_cut: impl FnOnce(),
) -> Drained {
    tokio::pin!(finished);
    tokio::select! {
        biased;
        () = &mut finished => return Drained::Finished,
        () = deadline => {}
    }
    on_cut();
    kill.cancel();
    let closed = tokio::time::timeout(kill_wait, finished).await.is_ok();
    Drained::Cut { closed }
}

/// [`drain`] with a plain timeout as the deadline and no wait after the cut.
pub async fn drain_within(
    finished: impl Future<Output = ()>,
    within: Duration,
    kill: &CancellationToken,
    on_cut: impl FnOnce(),
) -> Drained {
    drain(finished, tokio::time::sleep(within), kill, Duration::ZERO, on_cut).await
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering::SeqCst};

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn finished_before_the_deadline_cuts_nothing() {
        let kill = CancellationToken::new();
        let cut = AtomicBool::new(false);
        let work = tokio::time::sleep(Duration::from_secs(1));
        let outcome = drain_within(work, Duration::from_secs(5), &kill, || cut.store(true, SeqCst)).await;
        assert_eq!(outcome, Drained::Finished);
        assert!(!kill.is_cancelled());
        assert!(!cut.load(SeqCst));
    }

    #[tokio::test(start_paused = true)]
    async fn the_deadline_cancels_kill_and_waits_for_the_close() {
        let kill = CancellationToken::new();
        // Work that ends only when killed, the way a connection does.
        let work = {
            let kill = kill.clone();
            async move { kill.cancelled().await }
        };
        let started = tokio::time::Instant::now();
        let outcome = drain(
            work,
            tokio::time::sleep(Duration::from_secs(5)),
            &kill,
            Duration::from_secs(2),
            || {},
        )
        .await;
        assert_eq!(outcome, Drained::Cut { closed: true });
        assert!(kill.is_cancelled());
        assert_eq!(started.elapsed(), Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn work_that_ignores_the_kill_is_given_up_after_the_kill_wait() {
        let kill = CancellationToken::new();
        let started = tokio::time::Instant::now();
        let outcome = drain(
            std::future::pending(),
            tokio::time::sleep(Duration::from_secs(1)),
            &kill,
            Duration::from_secs(2),
            || {},
        )
        .await;
        assert_eq!(outcome, Drained::Cut { closed: false });
        assert_eq!(started.elapsed(), Duration::from_secs(3));
    }

    #[tokio::test(start_paused = true)]
    async fn on_cut_runs_before_the_kill() {
        let kill = CancellationToken::new();
        let seen_alive = Arc::new(AtomicBool::new(false));
        let outcome = drain_within(std::future::pending(), Duration::from_millis(10), &kill, || {
            seen_alive.store(!kill.is_cancelled(), SeqCst)
        })
        .await;
        assert_eq!(outcome, Drained::Cut { closed: false });
        assert!(seen_alive.load(SeqCst), "on_cut must see the work still running");
    }

    #[tokio::test(start_paused = true)]
    async fn an_early_deadline_such_as_a_second_signal_cuts_at_once() {
        let kill = CancellationToken::new();
        let started = tokio::time::Instant::now();
        let outcome = drain(
            std::future::pending(),
            std::future::ready(()),
            &kill,
            Duration::ZERO,
            || {},
        )
        .await;
        assert_eq!(outcome, Drained::Cut { closed: false });
        assert_eq!(started.elapsed(), Duration::ZERO);
    }
}
