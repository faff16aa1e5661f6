//! The memory allocator of the binaries that run a router (`switchyard`, the benchmarks).
//!
//! Events are allocated on one thread and freed on another (a consumer decodes, a lane
//! handles, the writer commits), which glibc's malloc serves slowly: it took about a sixth of
//! the lanes' CPU in a profile of the no-op drain, and the drain ran a fifth faster on
//! jemalloc (docs/benchmarks-log.md). Its background thread returns freed memory to the system
//! within a second, so that the memory plugin compilation used does not stay resident while the
//! router idles.

#[doc(hidden)]
pub use tikv_jemallocator::Jemalloc;

/// Make jemalloc the global allocator of the binary that invokes it, with the settings above.
#[macro_export]
macro_rules! global_allocator {
    () => {
        #[global_allocator]
        static ALLOCATOR: $crate::allocator::Jemalloc = $crate::allocator::Jemalloc;

        /// jemalloc's settings, read when it starts.
        #[allow(non_upper_case_globals)]
        #[unsafe(export_name = "_rjem_malloc_conf")]
        pub static malloc_conf: &[u8] =
            b"background_thread:true,max_background_threads:1,dirty_decay_ms:1000,muzzy_decay_ms:0\0";
    };
}
