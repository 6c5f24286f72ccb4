//! Two futures run by one task, each polled only when a waker of its own fired.
//!
//! Why: a connection's reader and writer share one task (one task header and one
//! scheduler entry per connection rather than two, and one allocation). Polling
//! both on every wake-up would cost the fan-out: every frame queued wakes the
//! writer, and a poll of the reader takes locks (its socket's, its wait for
//! the next request). So each side gets its own waker, which marks that side and
//! wakes the task; a poll polls the sides marked, and the other one not at all.
//! The wakers share one small allocation, made at the first poll.

use std::future::Future;
use std::mem::ManuallyDrop;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::task::{Context, Poll, RawWaker, RawWakerVTable, Waker};

use futures_util::task::AtomicWaker;

const FIRST: u8 = 1;
const SECOND: u8 = 2;

/// Runs `first` and `second` together until both are done; resolves to the
/// output of `first`.
pub(crate) fn join<A: Future, B: Future<Output = ()>>(first: A, second: B) -> Join<A, B> {
    Join {
        first: Side::Running(first),
        second: Some(second),
        wakes: None,
    }
}

/// See [`join`].
#[must_use = "futures do nothing unless polled"]
pub(crate) struct Join<A: Future, B> {
    first: Side<A>,
    second: Option<B>,
    wakes: Option<Arc<Wakes>>,
}

enum Side<A: Future> {
    Running(A),
    Done(A::Output),
    Taken,
}

/// What the two sides' wakers share: which sides were woken, and the task's waker.
struct Wakes {
    woken: AtomicU8,
    task: AtomicWaker,
}

impl<A: Future, B: Future<Output = ()>> Future for Join<A, B> {
    type Output = A::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<A::Output> {
        // SAFETY: the sides are never moved: each is polled where it is, and
        // replaced (dropped in place) only once it is done; `wakes` is not pinned.
        let this = unsafe { self.get_unchecked_mut() };
        let wakes = this.wakes.get_or_insert_with(|| {
            Arc::new(Wakes {
                // Both sides start woken: each is polled once to begin.
                woken: AtomicU8::new(FIRST | SECOND),
                task: AtomicWaker::new(),
            })
        });
        // Registered before the marks are taken: a side woken after this look
        // wakes the task again.
        wakes.task.register(cx.waker());
        let woken = wakes.woken.swap(0, Ordering::AcqRel);
        if woken & FIRST != 0
            && let Side::Running(first) = &mut this.first
        {
            let waker = side_waker(wakes, &FIRST_VTABLE);
            // SAFETY: see above; `first` stays where it is until it is dropped.
            let first = unsafe { Pin::new_unchecked(first) };
            if let Poll::Ready(output) = first.poll(&mut Context::from_waker(&waker)) {
                this.first = Side::Done(output);
            }
        }
        if woken & SECOND != 0
            && let Some(second) = &mut this.second
        {
            let waker = side_waker(wakes, &SECOND_VTABLE);
            // SAFETY: as for `first`.
            let second = unsafe { Pin::new_unchecked(second) };
            // A panic of the second side (a connection's writer) ends it alone, as
            // when it was a task of its own: the first side (the session) still
            // ends, and cleans up, as it would without a writer.
            let polled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                second.poll(&mut Context::from_waker(&waker))
            }));
            match polled {
                Ok(Poll::Pending) => {}
                Ok(Poll::Ready(())) => this.second = None,
                Err(_) => {
                    tracing::error!(
                        "a connection's writer panicked; its session goes on without it"
                    );
                    this.second = None;
                }
            }
        }
        if this.second.is_some() || matches!(this.first, Side::Running(_)) {
            return Poll::Pending;
        }
        match std::mem::replace(&mut this.first, Side::Taken) {
            Side::Done(output) => Poll::Ready(output),
            _ => panic!("`Join` polled after it completed"),
        }
    }
}

/// A side's waker borrowing `wakes` (no count taken: it is not dropped; a clone
/// takes one).
fn side_waker(wakes: &Arc<Wakes>, vtable: &'static RawWakerVTable) -> ManuallyDrop<Waker> {
    let data = Arc::as_ptr(wakes).cast::<()>();
    // SAFETY: the vtable's functions treat `data` as the `Arc<Wakes>` it is.
    ManuallyDrop::new(unsafe { Waker::from_raw(RawWaker::new(data, vtable)) })
}

static FIRST_VTABLE: RawWakerVTable = RawWakerVTable::new(
    clone::<FIRST>,
    wake::<FIRST>,
    wake_by_ref::<FIRST>,
    drop_waker,
);
static SECOND_VTABLE: RawWakerVTable = RawWakerVTable::new(
    clone::<SECOND>,
    wake::<SECOND>,
    wake_by_ref::<SECOND>,
    drop_waker,
);

fn vtable(side: u8) -> &'static RawWakerVTable {
    match side {
        FIRST => &FIRST_VTABLE,
        _ => &SECOND_VTABLE,
    }
}

unsafe fn clone<const SIDE: u8>(data: *const ()) -> RawWaker {
    // SAFETY: `data` is a live `Arc<Wakes>` (the waker being cloned holds it).
    unsafe { Arc::increment_strong_count(data.cast::<Wakes>()) };
    RawWaker::new(data, vtable(SIDE))
}

unsafe fn wake<const SIDE: u8>(data: *const ()) {
    // SAFETY: the waker being consumed owns one count.
    let wakes = unsafe { Arc::from_raw(data.cast::<Wakes>()) };
    wakes.woken.fetch_or(SIDE, Ordering::AcqRel);
    wakes.task.wake();
}

unsafe fn wake_by_ref<const SIDE: u8>(data: *const ()) {
    // SAFETY: the waker is alive, and with it its count.
    let wakes = unsafe { &*data.cast::<Wakes>() };
    wakes.woken.fetch_or(SIDE, Ordering::AcqRel);
    wakes.task.wake();
}

unsafe fn drop_waker(data: *const ()) {
    // SAFETY: the waker being dropped owns one count.
    drop(unsafe { Arc::from_raw(data.cast::<Wakes>()) });
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    /// Counts its polls; ready once `ready` is set, woken through `waker`.
    struct Probe {
        polls: Arc<AtomicUsize>,
        ready: Arc<std::sync::atomic::AtomicBool>,
        waker: Arc<AtomicWaker>,
    }

    impl Future for Probe {
        type Output = ();
        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            self.polls.fetch_add(1, Ordering::SeqCst);
            self.waker.register(cx.waker());
            if self.ready.load(Ordering::SeqCst) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        }
    }

    fn probe() -> (
        Probe,
        Arc<AtomicUsize>,
        Arc<std::sync::atomic::AtomicBool>,
        Arc<AtomicWaker>,
    ) {
        let polls = Arc::new(AtomicUsize::new(0));
        let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let waker = Arc::new(AtomicWaker::new());
        let probe = Probe {
            polls: polls.clone(),
            ready: ready.clone(),
            waker: waker.clone(),
        };
        (probe, polls, ready, waker)
    }

    #[tokio::test]
    async fn a_side_is_polled_only_when_its_own_waker_fired() {
        let (a, a_polls, a_ready, a_waker) = probe();
        let (b, b_polls, b_ready, b_waker) = probe();
        let task = tokio::spawn(join(a, b));
        let settle = || async {
            for _ in 0..10 {
                tokio::task::yield_now().await;
            }
        };
        settle().await;
        assert_eq!(a_polls.load(Ordering::SeqCst), 1);
        assert_eq!(b_polls.load(Ordering::SeqCst), 1);
        for n in 2..5 {
            b_waker.wake();
            settle().await;
            assert_eq!(b_polls.load(Ordering::SeqCst), n, "the woken side");
            assert_eq!(a_polls.load(Ordering::SeqCst), 1, "not the other one");
        }
        a_waker.wake();
        settle().await;
        assert_eq!(a_polls.load(Ordering::SeqCst), 2);
        assert_eq!(b_polls.load(Ordering::SeqCst), 4);
        // Done only once both are.
        a_ready.store(true, Ordering::SeqCst);
        a_waker.wake();
        settle().await;
        assert!(!task.is_finished(), "the second side still runs");
        b_ready.store(true, Ordering::SeqCst);
        b_waker.wake();
        tokio::time::timeout(std::time::Duration::from_secs(1), task)
            .await
            .expect("both done")
            .unwrap();
    }

    #[tokio::test]
    async fn a_panic_of_the_second_side_ends_it_alone() {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(join(
            async move {
                let _ = rx.await;
                7
            },
            async {
                panic!("the writer broke");
            },
        ));
        tokio::task::yield_now().await;
        assert!(!task.is_finished(), "the first side goes on");
        tx.send(()).unwrap();
        assert_eq!(task.await.unwrap(), 7);
    }

    #[tokio::test]
    async fn resolves_to_the_first_sides_output_once_both_are_done() {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let joined = join(async { 7 }, async move {
            let _ = rx.await;
        });
        let task = tokio::spawn(joined);
        tokio::task::yield_now().await;
        assert!(!task.is_finished());
        tx.send(()).unwrap();
        assert_eq!(task.await.unwrap(), 7);
    }
}
