//! The process's allocator. Every binary that links this crate (the agent, the CNI plugin,
//! the benchmarks) gets it, so the benchmarks measure what the agent runs.

// The compiler allocates many small, short-lived objects (label maps, keys, peer sets):
// glibc's allocator spent about 40 % of a compile in malloc and free; with mimalloc a compile
// took half the time.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc v3's number for `mi_option_arena_eager_commit` (`mi_option_e` in its
/// `include/mimalloc.h`; the crate does not name it). A test checks its default.
const MI_OPTION_ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;

/// Commits arenas as they are used rather than whole (the agent's RSS at rest was about
/// 8 MiB lower in one `bench --only control --quick` run). Call it first thing in `main`, before arenas are made.
pub fn commit_on_use() {
    // SAFETY: setting an option has no precondition; it applies to arenas made later.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_ARENA_EAGER_COMMIT, 0) }
}

/// Gives the pages that are free back to the system. mimalloc returns them only while it
/// allocates, and an agent at rest allocates nothing: without this, a compile's peak would
/// stay resident until the next change.
pub fn return_freed_memory() {
    // SAFETY: a collection has no precondition.
    unsafe { libmimalloc_sys::mi_collect(true) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_option_number_is_the_one_mimalloc_v3_uses() {
        // SAFETY: reading an option has no precondition.
        let eager = unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_ARENA_EAGER_COMMIT) };
        // Its default in v3's src/options.c (tests do not run `main`, which changes it).
        assert_eq!(eager, 2);
    }
}
