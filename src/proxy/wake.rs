//! `PollWhenWoken`: poll a future only after its own waker fired.
//!
//! A connection task waits on its two copy directions and on a cancellation
//! token shared by every connection of the proxy. `select!` and `join!` poll
//! every branch on every wake: polling a waiting token takes the lock of its
//! waiter list (shared across connections), and polling the direction that
//! did not wake re-registers its socket readiness. Wrapped, each is polled
//! once to register, then only when it actually fires.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker};

pub struct PollWhenWoken<F> {
    inner: Pin<Box<F>>,
    /// The flag and the waker built on it, for the task that polls us.
    flag: Option<(Arc<FlagWaker>, Waker)>,
}

struct FlagWaker {
    woken: AtomicBool,
    task: Waker,
}

impl Wake for FlagWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake_by_ref();
    }
}

impl<F: Future> PollWhenWoken<F> {
    pub fn new(inner: F) -> Self {
        PollWhenWoken {
            inner: Box::pin(inner),
            flag: None,
        }
    }
}

impl<F: Future> Future for PollWhenWoken<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.get_mut();
        match &this.flag {
            // Same task, not woken by the inner future: nothing can have changed.
            Some((flag, _)) if flag.task.will_wake(cx.waker()) => {
                // A plain load first: most polls find it unset, and a
                // swap is a locked instruction on every one of them.
                if !flag.woken.load(Ordering::Relaxed) || !flag.woken.swap(false, Ordering::Acquire) {
                    return Poll::Pending;
                }
            }
            _ => {
                let flag = Arc::new(FlagWaker {
                    woken: AtomicBool::new(false),
                    task: cx.waker().clone(),
                });
                let waker = Waker::from(flag.clone());
                this.flag = Some((flag, waker));
            }
        }
        let Some((_, waker)) = &this.flag else {
            return Poll::Pending;
        };
        this.inner.as_mut().poll(&mut Context::from_waker(waker))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Counts its polls; ready once `ready` is set and it has been woken.
    struct Probe {
        polls: Arc<AtomicUsize>,
        waker: Arc<std::sync::Mutex<Option<Waker>>>,
        ready: Arc<AtomicBool>,
    }

    impl Future for Probe {
        type Output = ();
        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            self.polls.fetch_add(1, Ordering::SeqCst);
            if self.ready.load(Ordering::SeqCst) {
                return Poll::Ready(());
            }
            *self.waker.lock().unwrap() = Some(cx.waker().clone());
            Poll::Pending
        }
    }

    #[test]
    fn polls_the_inner_future_only_when_it_woke() {
        let polls = Arc::new(AtomicUsize::new(0));
        let inner_waker = Arc::new(std::sync::Mutex::new(None));
        let ready = Arc::new(AtomicBool::new(false));
        let mut wrapped = PollWhenWoken::new(Probe {
            polls: polls.clone(),
            waker: inner_waker.clone(),
            ready: ready.clone(),
        });
        struct Task;
        impl Wake for Task {
            fn wake(self: Arc<Self>) {}
        }
        let task = Waker::from(Arc::new(Task));
        let mut cx = Context::from_waker(&task);
        for _ in 0..5 {
            assert!(Pin::new(&mut wrapped).poll(&mut cx).is_pending());
        }
        assert_eq!(
            polls.load(Ordering::SeqCst),
            1,
            "registered once, then left alone"
        );
        ready.store(true, Ordering::SeqCst);
        inner_waker.lock().unwrap().take().unwrap().wake();
        assert!(Pin::new(&mut wrapped).poll(&mut cx).is_ready());
        assert_eq!(polls.load(Ordering::SeqCst), 2);
    }
}
