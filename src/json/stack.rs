//! How deep the encoder and decoder may recurse on this thread's native stack.
//!
//! Both walk nested tables by recursion, as cjson does. At the default depth limit (1000) that
//! fits any thread luaproxy runs Lua on; a program that raises `encode_max_depth` or
//! `decode_max_depth` could overflow the stack (a crash, not an error), so past
//! `CHECKED_BEYOND` levels each level checks the room left and stops with an error first.

/// Levels that never need a check: the default depth limit.
pub const CHECKED_BEYOND: usize = 1000;

/// Native stack kept free below the deepest level (for Lua's own calls and signal handlers).
const RESERVE: usize = 256 * 1024;

/// The lowest usable address of this thread's stack, looked up on first need.
#[derive(Default)]
pub struct Guard {
    low: Option<usize>,
}

impl Guard {
    /// Whether the caller may go one level deeper.
    #[inline(never)]
    pub fn room(&mut self) -> bool {
        let probe = 0u8;
        let here = std::hint::black_box(&probe) as *const u8 as usize;
        let low = *self
            .low
            .get_or_insert_with(|| stack_low().unwrap_or(usize::MAX));
        here > low.saturating_add(RESERVE)
    }
}

#[cfg(target_os = "linux")]
fn stack_low() -> Option<usize> {
    // SAFETY: pthread_getattr_np fills the attribute object it is given, which is destroyed
    // after reading; nothing else is touched.
    unsafe {
        let mut attr: libc::pthread_attr_t = std::mem::zeroed();
        if libc::pthread_getattr_np(libc::pthread_self(), &mut attr) != 0 {
            return None;
        }
        let (mut addr, mut size) = (std::ptr::null_mut(), 0usize);
        let r = libc::pthread_attr_getstack(&attr, &mut addr, &mut size);
        libc::pthread_attr_destroy(&mut attr);
        (r == 0 && !addr.is_null()).then_some(addr as usize)
    }
}

/// Elsewhere the bound is unknown: no level past `CHECKED_BEYOND` is allowed.
#[cfg(not(target_os = "linux"))]
fn stack_low() -> Option<usize> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dive(g: &mut Guard, n: usize) -> usize {
        let pad = std::hint::black_box([0u8; 512]);
        if !g.room() {
            return n;
        }
        dive(g, n + 1) + pad[0] as usize
    }

    #[test]
    fn stops_before_the_stack_ends() {
        // A 1 MiB thread: the guard stops the dive well before an overflow would crash.
        let n = std::thread::Builder::new()
            .stack_size(1 << 20)
            .spawn(|| dive(&mut Guard::default(), 0))
            .unwrap()
            .join()
            .unwrap();
        assert!(n > 100, "{n}");
        let mut g = Guard::default();
        assert!(g.room());
    }
}
