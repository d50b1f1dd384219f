//! The process allocator between the stages of a generation.
//!
//! glibc's malloc raises its mmap threshold as large blocks are freed, so after a UNet forward
//! many of its freed buffers stay in the heap, counted in the process's resident memory, instead
//! of going back to the system. [`release_free_memory`] hands them back (`malloc_trim(0)`), which
//! the pipeline does between the denoising loop and the VAE decode: the decode's own buffers then
//! come from the pages just released instead of adding to them. Measured on the SD 1.5 pipeline
//! at 512x512 (docs/performance.md): peak RSS 4.85 GiB before. Lowering the mmap threshold instead
//! (`MALLOC_MMAP_THRESHOLD_=1048576`) gave a similar peak but made every large buffer a fresh
//! mapping to fault in, 20% slower.
//!
//! The other way round, [`reuse_freed_memory`] keeps large freed buffers in the heap for the
//! next op to reuse rather than unmapping them and faulting fresh zeroed pages in again (a
//! UNet's feed-forward activations are 84 MB at 512 px, above glibc's largest automatic mmap
//! threshold of 32 MiB, so each was a new mapping at every layer): the `kiln` CLI sets it at
//! start.

/// Returns memory that the allocator holds but no one uses to the operating system, where the
/// allocator allows it (glibc); elsewhere it does nothing.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `malloc_trim` only releases free memory of the allocator's own heaps; it touches no
    // live allocation and may be called at any time from any thread.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Makes the allocator keep freed blocks of any size for reuse (glibc: the mmap threshold at
/// 1 GiB and the trim threshold at 2 GiB), so that the large activations of one layer reuse
/// the last layer's pages instead of mapping and faulting in fresh ones; memory goes back to
/// the system at [`release_free_memory`] (the pipeline calls it before the VAE decode) and at
/// exit. Measured on the SD 1.5 UNet at 512 px (docs/performance.md): 2-5% faster in two
/// alternations; a 20-step generation's peak RSS 18 MB (0.4%) higher. Process-wide, so it is left to the application (the `kiln` CLI calls it);
/// elsewhere than glibc it does nothing. `KILN_REUSE_MEMORY=0` in the environment turns it off.
pub fn reuse_freed_memory() {
    if std::env::var("KILN_REUSE_MEMORY").is_ok_and(|v| v == "0") {
        return;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `mallopt` only changes the allocator's thresholds; it may be called at any time.
    unsafe {
        // glibc refuses thresholds above its heap size where that is smaller: keep its largest
        // automatic one then
        if libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30) == 0 {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        }
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}
