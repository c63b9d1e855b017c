//! The allocator of rudder's binaries: mimalloc, with purged pages reset instead of decommitted.
//!
//! Training allocates and frees gigabytes of large tensors per step. glibc's malloc returns
//! them to the kernel each time (mmap/munmap, page faults, TLB shootdowns between threads);
//! mimalloc keeps them, but its purge still hands freed pages back with `MADV_DONTNEED`
//! ("decommit"), so each 4 KiB comes back as a page fault on a zeroed page (a LoRA step took
//! 4.6 s instead of 3.5 s). Resetting instead (`MADV_FREE`) lets the kernel take the pages back
//! under memory pressure only. A binary declares
//! `#[global_allocator] static A: rudder_nn::alloc::MiMalloc = rudder_nn::alloc::MiMalloc;`
//! and calls [`reset_instead_of_decommit`] first thing in `main`.

pub use mimalloc::MiMalloc;

unsafe extern "C" {
    fn mi_option_set(option: std::ffi::c_int, value: std::ffi::c_long);
}

/// `mi_option_purge_decommits` in mimalloc v2 and v3.
const PURGE_DECOMMITS: std::ffi::c_int = 5;

/// Purged pages are reset (`MADV_FREE`), not decommitted (see the module docs).
pub fn reset_instead_of_decommit() {
    // SAFETY: sets one integer option in mimalloc's static option table; libmimalloc-sys is
    // linked through the mimalloc dependency of this crate.
    unsafe { mi_option_set(PURGE_DECOMMITS, 0) }
}
