//! The memory limit of an engine's JavaScript runtime, enforced by its allocator: it counts the
//! bytes the runtime holds, refuses what goes past the limit, and remembers that it refused.

use std::cell::Cell;
use std::rc::Rc;

use rquickjs::allocator::{Allocator, RustAllocator};

/// What a runtime's allocator has seen, shared with the engine that owns the runtime.
///
/// QuickJS's own limit refuses silently, so a mutator that catches the "out of memory" error
/// could go on as if nothing happened; the mark left here is checked after each mutation.
/// Counting here also tells the engine what its runtime holds without walking its objects.
#[derive(Debug, Default)]
pub(super) struct MemoryGauge {
    /// Bytes the runtime holds now.
    held: Cell<usize>,
    /// Set when an allocation was refused; cleared by the engine.
    refused: Cell<bool>,
}

impl MemoryGauge {
    pub(super) fn held(&self) -> usize {
        self.held.get()
    }

    /// Whether an allocation was refused since the last call (and clears the mark).
    pub(super) fn take_refused(&self) -> bool {
        self.refused.replace(false)
    }
}

/// Rust's allocator, bounded at `limit` bytes (headers included).
pub(super) struct LimitedAllocator {
    limit: usize,
    gauge: Rc<MemoryGauge>,
}

impl LimitedAllocator {
    pub(super) fn new(limit: usize, gauge: Rc<MemoryGauge>) -> LimitedAllocator {
        LimitedAllocator { limit, gauge }
    }

    /// Whether `more` bytes may be taken on top of what is held after giving back `less`.
    fn admits(&self, more: usize, less: usize) -> bool {
        let after = self.gauge.held.get().saturating_sub(less);
        if after.saturating_add(more) <= self.limit {
            return true;
        }
        self.gauge.refused.set(true);
        false
    }

    fn count(&self, ptr: *mut u8, released: usize) -> *mut u8 {
        if !ptr.is_null() {
            // SAFETY: `ptr` was just returned by `RustAllocator`.
            let size = unsafe { RustAllocator::usable_size(ptr) };
            let held = self.gauge.held.get().saturating_sub(released);
            self.gauge.held.set(held + size);
        }
        ptr
    }
}

// SAFETY: every allocation is made, resized and freed by `RustAllocator`; this only refuses
// some and counts the rest.
unsafe impl Allocator for LimitedAllocator {
    fn alloc(&mut self, size: usize) -> *mut u8 {
        if !self.admits(size, 0) {
            return std::ptr::null_mut();
        }
        let ptr = RustAllocator.alloc(size);
        self.count(ptr, 0)
    }

    fn calloc(&mut self, count: usize, size: usize) -> *mut u8 {
        if !self.admits(count.saturating_mul(size), 0) {
            return std::ptr::null_mut();
        }
        let ptr = RustAllocator.calloc(count, size);
        self.count(ptr, 0)
    }

    unsafe fn dealloc(&mut self, ptr: *mut u8) {
        // SAFETY: the caller hands back a pointer this allocator returned.
        let size = unsafe { RustAllocator::usable_size(ptr) };
        self.gauge
            .held
            .set(self.gauge.held.get().saturating_sub(size));
        // SAFETY: as above.
        unsafe { RustAllocator.dealloc(ptr) }
    }

    unsafe fn realloc(&mut self, ptr: *mut u8, new_size: usize) -> *mut u8 {
        // SAFETY: the caller hands back a pointer this allocator returned.
        let old_size = unsafe { RustAllocator::usable_size(ptr) };
        if new_size > old_size && !self.admits(new_size, old_size) {
            return std::ptr::null_mut();
        }
        // SAFETY: as above.
        let moved = unsafe { RustAllocator.realloc(ptr, new_size) };
        if moved.is_null() {
            return moved; // the old block is still held
        }
        self.count(moved, old_size)
    }

    unsafe fn usable_size(ptr: *mut u8) -> usize {
        // SAFETY: the caller hands a pointer this allocator returned.
        unsafe { RustAllocator::usable_size(ptr) }
    }
}
