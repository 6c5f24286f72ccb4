//! A deflate bomb does not make the node allocate past the message bound: the
//! whole process's heap is counted (a global allocator that tracks live bytes and
//! their peak) while a node in this process receives compressed messages that
//! would inflate to 32 MiB each. Its own test binary, so nothing else allocates
//! meanwhile.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use common::TestNode;
use common::raw::{BROWSER_OFFER, RawClient, deflate};

/// The system allocator, counting live bytes and their peak.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call goes to the system allocator unchanged; only counters move.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract is the system allocator's.
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(live, Ordering::Relaxed);
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as above.
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            if new_size >= layout.size() {
                let grown = new_size - layout.size();
                let live = LIVE.fetch_add(grown, Ordering::Relaxed) + grown;
                PEAK.fetch_max(live, Ordering::Relaxed);
            } else {
                LIVE.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
            }
        }
        new
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const MAX_MESSAGE: usize = 64 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deflate_bomb_allocates_no_more_than_the_bound() {
    let node = TestNode::start(&["--max-message-bytes", "65536"]).await;
    // Made before measuring: the test's own 32 MiB.
    let bomb = deflate(&vec![b'{'; 32 << 20]);
    assert!(bomb.len() < MAX_MESSAGE, "{}", bomb.len());

    let mut peaks = Vec::new();
    for _ in 0..4 {
        let mut client = RawClient::connect(
            node.addr,
            "channel=a",
            &[("Sec-WebSocket-Extensions", BROWSER_OFFER)],
        )
        .await;
        client.json().await;
        let before = LIVE.load(Ordering::Relaxed);
        PEAK.store(before, Ordering::Relaxed);
        client.send(true, true, 1, &bomb).await;
        assert_eq!(client.close_code().await, Some(1009));
        peaks.push(PEAK.load(Ordering::Relaxed) - before);
    }
    // What one bomb makes the node hold at most: its compressed bytes, the output
    // bounded at 64 KiB + 1, the frame handed to tungstenite, the thread's inflater
    // (~48 KB, once per thread), the close. Inflated, it would be 32 MiB.
    let worst = *peaks.iter().max().unwrap();
    eprintln!("peak heap growth per bomb: {peaks:?} bytes");
    assert!(
        worst < 8 * MAX_MESSAGE,
        "a bomb grew the heap by {worst} bytes: {peaks:?}"
    );
}
