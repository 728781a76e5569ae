//! The process's allocator: mimalloc, keeping freed memory for reuse a little longer than its
//! default before handing it back to the OS, and on small pages only.

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

/// Call first thing in `main`, before any other thread exists. `MIMALLOC_PURGE_DELAY` and
/// `MIMALLOC_ALLOW_THP` in the environment still win.
pub fn tune() {
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_none() {
        disable_transparent_huge_pages();
    }
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

/// With transparent huge pages on (`always`, as on Debian), the first touch of fresh heap
/// faults in and zeroes 2 MiB at a time: a write batch's few hundred KiB of scratch on a
/// thread whose heap had none free cost the kernel a whole huge page each time, 17% of the
/// embedded pipeline's CPU in a profile. Off for this process only (what
/// `MIMALLOC_ALLOW_THP=0` does): 57–63k → 73–74k events/s, 20–24 → 17 µs of CPU per event, in
/// interleaved runs of `cargo bench --bench ingest` with `CATALOG_BENCH_MIX=distinct`
/// (BENCHMARKS.md). The system's setting is left alone.
fn disable_transparent_huge_pages() {
    // A kernel without THP refuses, and then there is nothing to turn off: the result is moot.
    #[allow(unsafe_code)]
    // SAFETY: PR_SET_THP_DISABLE takes integer arguments only and sets one flag of this process.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}
