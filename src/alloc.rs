//! The process's allocator: mimalloc, keeping freed memory for reuse a little longer than its
//! default before handing it back to the OS.

use libmimalloc_sys::{mi_option_get, mi_option_set, mi_option_t};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc.h (v3, which libmimalloc-sys builds by default): the
/// crate leaves its options without constants.
const PURGE_DELAY: mi_option_t = 15;
const MIMALLOC_DEFAULT_PURGE_DELAY_MS: std::ffi::c_long = 10;
/// With the 10 ms default, memory freed by one write batch went back to the OS and the next
/// batch faulted it in again: the kernel zeroing those pages was 11% of the embedded
/// pipeline's CPU. A second's delay: 45.8–47.2k → 48.8–50.9k events/s in three interleaved
/// pairs (BENCHMARKS.md).
const PURGE_DELAY_MS: std::ffi::c_long = 1000;

/// Call first thing in `main`, before any other thread exists. `MIMALLOC_PURGE_DELAY` in the
/// environment still wins.
pub fn tune() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
        return;
    }
    #[allow(unsafe_code)]
    // SAFETY: the option calls read and store one integer; they are not thread safe, which is
    // why this runs before the runtime or any other thread starts. Checking the default first
    // makes sure index 15 is still the purge delay in the mimalloc this was built with.
    unsafe {
        if mi_option_get(PURGE_DELAY) == MIMALLOC_DEFAULT_PURGE_DELAY_MS {
            mi_option_set(PURGE_DELAY, PURGE_DELAY_MS);
        }
    }
}
