//! The global allocator: mimalloc, entered through its plain (unaligned) calls when the
//! alignment asked for is one mimalloc gives every block anyway.
//!
//! The `mimalloc` crate sends every Rust allocation through `mi_malloc_aligned`, whose generic
//! path showed up at 5-8 calls per proxied request in an instruction profile (callgrind);
//! `mi_malloc` takes the small-object fast path directly.

use libmimalloc_sys as mi;
use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

/// Every mimalloc block is aligned to the machine word, and blocks of 16 bytes or more to 16
/// (mimalloc's `MI_MAX_ALIGN_SIZE`).
#[inline]
fn plain(l: &Layout) -> bool {
    l.align() <= 8 || (l.align() <= 16 && l.size() >= 16)
}

pub struct Alloc;

extern "C" {
    // In every libmimalloc build (the crate declares it only behind its "extended" feature).
    fn mi_collect(force: bool);
}

/// Returns the memory this thread's heap holds free to the system. mimalloc keeps freed pages
/// for reuse; after a policy call that was stopped holding tens of MB (a runaway allocation,
/// up to `lua_memory_limit`), that kept the process's RSS at its peak for good (measured: 20
/// aborted 32 MB allocations on 2 workers left 50-67 MB resident; with this, the baseline).
pub fn release_free_memory() {
    // SAFETY: mi_collect takes no pointers; it frees what the calling thread's heap holds
    // unused, and is safe to call at any time outside an allocation.
    unsafe { mi_collect(true) }
}

unsafe impl GlobalAlloc for Alloc {
    #[inline]
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        // SAFETY: this function's contract (its `# Safety` section, or the raw-code rules
        // of capi.rs for C functions Lua calls) is what every operation below relies on.
        unsafe {
            if plain(&l) {
                mi::mi_malloc(l.size()) as *mut u8
            } else {
                mi::mi_malloc_aligned(l.size(), l.align()) as *mut u8
            }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        // SAFETY: this function's contract (its `# Safety` section, or the raw-code rules
        // of capi.rs for C functions Lua calls) is what every operation below relies on.
        unsafe {
            if plain(&l) {
                mi::mi_zalloc(l.size()) as *mut u8
            } else {
                mi::mi_zalloc_aligned(l.size(), l.align()) as *mut u8
            }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, p: *mut u8, _l: Layout) {
        // SAFETY: this function's contract (its `# Safety` section, or the raw-code rules
        // of capi.rs for C functions Lua calls) is what every operation below relies on.
        unsafe {
            mi::mi_free(p as *mut c_void);
        }
    }

    #[inline]
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: this function's contract (its `# Safety` section, or the raw-code rules
        // of capi.rs for C functions Lua calls) is what every operation below relies on.
        unsafe {
            if l.align() <= 8 || (l.align() <= 16 && new_size >= 16) {
                mi::mi_realloc(p as *mut c_void, new_size) as *mut u8
            } else {
                mi::mi_realloc_aligned(p as *mut c_void, new_size, l.align()) as *mut u8
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_have_the_alignment_asked_for() {
        for (size, align) in [
            (1, 1),
            (8, 8),
            (16, 16),
            (24, 16),
            (8, 16),
            (100, 64),
            (5000, 4096),
        ] {
            let l = Layout::from_size_align(size, align).unwrap();
            // SAFETY: `l` has a non-zero size; each block is freed once with its own layout.
            unsafe {
                let p = Alloc.alloc(l);
                assert!(!p.is_null());
                assert_eq!(p as usize % align, 0, "size {size} align {align}");
                let q = Alloc.realloc(p, l, size * 3);
                assert_eq!(q as usize % align, 0, "realloc size {size} align {align}");
                Alloc.dealloc(q, Layout::from_size_align(size * 3, align).unwrap());
            }
        }
    }
}
