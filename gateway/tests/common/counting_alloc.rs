// A global allocator that counts each thread's allocations (and reallocations), then hands on to
// the system's. A test binary that includes this module (`#[path]`) counts with it; an unsafe
// trait impl, hence the allow.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // `try_with`: the thread's locals may be gone while it exits.
        let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static COUNTING: Counting = Counting;

/// Allocations this thread has made so far (a zeroed allocation goes through `alloc`).
pub fn so_far() -> u64 {
    ALLOCATIONS.with(|n| n.get())
}

/// Allocations `f` makes on this thread.
#[allow(dead_code)]
pub fn allocations(f: impl FnOnce()) -> u64 {
    let before = so_far();
    f();
    so_far() - before
}
