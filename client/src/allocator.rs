//! How a streaming program asks the C allocator to keep large freed
//! buffers instead of giving them back to the kernel at once.
//!
//! A stream moves 1 MiB frames: libzmq mallocs each frame it receives,
//! our clients and the broker malloc each frame they build, and each is
//! freed soon after (often by another thread). glibc serves such sizes
//! with `mmap` until a free raises its sliding threshold, and trims an
//! arena's top once more than twice that threshold is free, so most
//! frames landed on fresh pages: profiling a 1 GiB stream through the
//! broker found about one page fault per 4 KiB moved (~250,000 per GiB,
//! a third of the stream's CPU). With the thresholds fixed above a
//! frame, freed frames are reused while warm: a few thousand faults per
//! GiB, at the cost of up to `TRIM_THRESHOLD` of free memory kept per
//! allocator arena.
//!
//! Process-wide, so only programs call it (`zbroker`, `zpipes`, and the
//! benches that embed a broker beside ZPIPES clients), never the library
//! on its own.

/// Allocations at least this large get their own `mmap`: above the 1 MiB
/// (plus headers) frames the clients send, so those come from the heap.
pub const MMAP_THRESHOLD: usize = 2 << 20;
/// Free memory an arena keeps at its top before trimming: room for a
/// stream's frames in flight (a pipe's queue is 8 MiB by default).
pub const TRIM_THRESHOLD: usize = 16 << 20;

/// Sets glibc's `M_MMAP_THRESHOLD` and `M_TRIM_THRESHOLD` (elsewhere it
/// does nothing). Call it at the start of `main`, before other threads.
pub fn keep_freed_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes the allocator's parameters; both values
    // are in the ranges glibc documents (the mmap threshold at most 32 MiB).
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD as libc::c_int);
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD as libc::c_int);
    }
}
