//! A counting global allocator for the fuzzers: the peak of live bytes while one input is
//! checked (per thread, so parallel tests do not see each other's allocations), and a ceiling
//! on any single allocation. A binary opts in with
//! `#[global_allocator] static A: Counting = Counting;`; without it the counts stay at zero.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};

pub struct Counting;

thread_local! {
    // Signed: memory freed on another thread than the one that allocated it.
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
    static IN_HOOK: Cell<bool> = const { Cell::new(false) };
}

static INSTALLED: AtomicBool = AtomicBool::new(false);
static CEILING: AtomicUsize = AtomicUsize::new(usize::MAX);
static HOOK: AtomicUsize = AtomicUsize::new(0);

/// Refuses any single allocation above `bytes` (the process then aborts, as on memory
/// exhaustion), calling `hook` with the requested size first so the input can be saved.
pub fn set_ceiling(bytes: usize, hook: fn(usize)) {
    HOOK.store(hook as usize, Relaxed);
    CEILING.store(bytes, Relaxed);
}

/// Whether the running binary counts its allocations.
pub fn installed() -> bool {
    INSTALLED.load(Relaxed)
}

/// Starts a measurement on this thread: `peak_since` then gives the most bytes live at once
/// beyond those live now.
pub fn begin() -> isize {
    let live = LIVE.try_with(Cell::get).unwrap_or(0);
    let _ = PEAK.try_with(|p| p.set(live));
    live
}

pub fn peak_since(start: isize) -> usize {
    PEAK.try_with(Cell::get).unwrap_or(start).saturating_sub(start).max(0) as usize
}

fn grow(by: usize) {
    let _ = LIVE.try_with(|l| {
        let now = l.get().wrapping_add(by as isize);
        l.set(now);
        let _ = PEAK.try_with(|p| p.set(p.get().max(now)));
    });
}

fn shrink(by: usize) {
    let _ = LIVE.try_with(|l| l.set(l.get().wrapping_sub(by as isize)));
}

/// Whether `size` passes the ceiling; above it, the hook runs once (not for its own
/// allocations) before the caller returns null.
fn allowed(size: usize) -> bool {
    if size <= CEILING.load(Relaxed) {
        return true;
    }
    let hook = HOOK.load(Relaxed);
    if hook != 0 && !IN_HOOK.try_with(|h| h.replace(true)).unwrap_or(true) {
        // SAFETY: HOOK only ever holds a `fn(usize)` stored by `set_ceiling`.
        let f: fn(usize) = unsafe { std::mem::transmute::<usize, fn(usize)>(hook) };
        f(size);
        let _ = IN_HOOK.try_with(|h| h.set(false));
    }
    false
}

// SAFETY: every call is forwarded to `System` unchanged; the counters are plain
// thread-local integers (const-initialised, no destructor, so never torn down).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !INSTALLED.load(Relaxed) {
            INSTALLED.store(true, Relaxed);
        }
        if !allowed(layout.size()) {
            return std::ptr::null_mut();
        }
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grow(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !allowed(layout.size()) {
            return std::ptr::null_mut();
        }
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grow(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        shrink(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if !allowed(new_size) {
            return std::ptr::null_mut();
        }
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            // The old block counts until the new one exists (a moving realloc holds both).
            grow(new_size);
            shrink(layout.size());
        }
        p
    }
}
