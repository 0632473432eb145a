//! What a connection waiting for its next request keeps outside its own task: a slot for its
//! waker (so a stopping server can wake it) and, from the moment bytes arrive, a read buffer
//! from this thread's spares. nginx likewise frees an idle keep-alive connection's header
//! buffer (`ngx_http_set_keepalive`). No mlua here.

use super::io::READ_CHUNK;
use bytes::BytesMut;
use std::cell::RefCell;

/// Read buffers a thread keeps for its connections' next reads.
const SPARES: usize = 16;

thread_local! {
    /// Read buffers let go by this thread's connections as they went idle. Under load a
    /// connection lets its buffer go after every response and takes one when the next request
    /// arrives; from here that is a pop and a push (the allocator's path for a 16 KiB block
    /// cost ~150 instructions per request more in callgrind).
    static SPARE: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
}

/// An empty read buffer: a spare one if a whole one is free, else a new one.
pub(super) fn take_spare() -> BytesMut {
    if let Some(mut b) = SPARE.with(|s| s.borrow_mut().pop()) {
        // The buffer's earlier bytes may still be someone's (a body slice the policy kept):
        // then it is dropped (freed when they are) and a new one taken.
        if b.try_reclaim(READ_CHUNK) {
            return b;
        }
    }
    BytesMut::with_capacity(READ_CHUNK)
}

/// Keeps `b` (empty) for a later `take_spare`, or frees it when enough are kept.
pub(super) fn put_spare(b: BytesMut) {
    SPARE.with(|s| {
        let mut s = s.borrow_mut();
        if s.len() < SPARES {
            s.push(b);
        }
    });
}

thread_local! {
    /// The wakers of this thread's connections waiting for a request head. A stopping server
    /// wakes them all (`wake_head_waiters`, from each worker's accept loop) and each looks at
    /// its own server's shutdown flag: a watch channel's `changed()` future in every waiting
    /// connection was 128 bytes of each idle connection's task.
    static HEAD_WAITERS: RefCell<Waiters> = const {
        RefCell::new(Waiters { chunks: Vec::new(), free: NO_SLOT })
    };
}

/// Slots per chunk of `Waiters`. In chunks rather than one vector: a vector grown to 10,000
/// slots was a block the allocator backs with huge pages (+4 MB resident for 10,000 idle
/// connections on 2 workers, measured).
const CHUNK: usize = 256;
const NO_SLOT: usize = usize::MAX;

enum Slot {
    Taken(Option<std::task::Waker>),
    /// Free, with the next free slot.
    Free(usize),
}

struct Waiters {
    chunks: Vec<Vec<Slot>>,
    /// The first free slot (`NO_SLOT`: none).
    free: usize,
}

impl Waiters {
    fn slot(&mut self, i: usize) -> &mut Slot {
        &mut self.chunks[i / CHUNK][i % CHUNK]
    }

    fn take(&mut self) -> usize {
        if self.free == NO_SLOT {
            let base = self.chunks.len() * CHUNK;
            let next = |k: usize| if k + 1 < CHUNK { base + k + 1 } else { NO_SLOT };
            self.chunks
                .push((0..CHUNK).map(|k| Slot::Free(next(k))).collect());
            self.free = base;
        }
        let i = self.free;
        if let Slot::Free(next) = std::mem::replace(self.slot(i), Slot::Taken(None)) {
            self.free = next;
        }
        i
    }

    fn give_back(&mut self, i: usize) {
        *self.slot(i) = Slot::Free(self.free);
        self.free = i;
    }
}

/// A `read_head`'s slot among `HEAD_WAITERS`, given back when the wait ends.
pub(super) struct HeadWaiter(pub(super) Option<usize>);

impl HeadWaiter {
    pub(super) fn register(&mut self, w: &std::task::Waker) {
        HEAD_WAITERS.with(|l| {
            let l = &mut *l.borrow_mut();
            let i = *self.0.get_or_insert_with(|| l.take());
            match l.slot(i) {
                Slot::Taken(Some(old)) if old.will_wake(w) => {}
                slot => *slot = Slot::Taken(Some(w.clone())),
            }
        });
    }
}

impl Drop for HeadWaiter {
    fn drop(&mut self) {
        if let Some(i) = self.0 {
            let _ = HEAD_WAITERS.try_with(|l| l.borrow_mut().give_back(i));
        }
    }
}

/// Wakes every connection of this thread that waits for a request head, so the ones whose
/// server is stopping close (the others wait on). Called by a worker's accept loop when its
/// server stops.
pub fn wake_head_waiters() {
    let woken: Vec<std::task::Waker> = HEAD_WAITERS.with(|l| {
        let l = &mut *l.borrow_mut();
        let slots = l.chunks.iter_mut().flat_map(|c| c.iter_mut());
        slots
            .filter_map(|s| match s {
                Slot::Taken(w) => w.take(),
                Slot::Free(_) => None,
            })
            .collect()
    });
    woken.into_iter().for_each(std::task::Waker::wake);
}
