//! L2 prefetches (`cp.async.bulk.prefetch.L2.global`, `prefetch{.global}.L2`): no architectural effect, but their
//! 32-byte sectors are counted (`Counters::prefetch_sectors`) for the timing model, exactly, and only where memory is
//! allocated (a prefetch of an unmapped address is dropped, as on a GPU).

mod common;

use common::*;
use ptxsim::{Machine, Module};

/// Every thread bulk-prefetches `[bulk_at, bulk_at + bulk_bytes)`, then prefetches the L2 lines holding
/// `line_at + 8 * tid` (the `.global` form with an eviction hint) and `line_at + 1024 + 8 * tid` (the generic form).
const PREFETCHES: &str = r#"
.version 8.0
.target sm_90a
.address_size 64
.visible .entry prefetches(.param .u64 bulk_at, .param .u64 line_at, .param .u32 bulk_bytes)
{
  .reg .b64 %bulk, %line, %off;
  .reg .b32 %bytes, %tid;
  ld.param.u64 %bulk, [bulk_at];
  ld.param.u64 %line, [line_at];
  ld.param.u32 %bytes, [bulk_bytes];
  mov.u32 %tid, %tid.x;
  mul.wide.u32 %off, %tid, 8;
  add.s64 %line, %line, %off;
  cp.async.bulk.prefetch.L2.global [%bulk], %bytes;
  prefetch.global.L2::evict_last [%line];
  prefetch.L2 [%line+1024];
  ret;
}
"#;

fn run(m: &mut Machine, bulk_at: u64, line_at: u64, bulk_bytes: i32) -> Result<ptxsim::Counters, ptxsim::SimError> {
    let module = Module::parse(PREFETCHES).unwrap();
    m.launch(&module, "prefetches", [1, 1, 1], [64, 1, 1], 0, &Params::new().ptr(bulk_at).ptr(line_at).i32(bulk_bytes).0)
}

#[test]
fn prefetched_sectors_are_counted_once_each() {
    let mut m = Machine::new();
    // Uninitialised memory: a prefetch reads nothing, so it is no uninitialised read.
    let (bulk, lines) = (m.alloc(8192), m.alloc(4096));
    let c = run(&mut m, bulk + 256, lines, 4096).unwrap();
    // The bulk range: 4096 bytes = 128 sectors, the same for all 64 threads. The lines: 64 threads x 8 bytes = 512
    // bytes = 4 lines of 4 sectors, twice (the .global and the generic form, 1 KiB apart).
    assert_eq!(c.prefetch_sectors.len(), 128 + 16 + 16);
    assert_eq!(c.prefetch_requests, 3 * 64);
    // No data moved to the SMs: no load or store traffic, no distinct sectors of the launch's own.
    assert_eq!((c.global_requests, c.global_bytes_read, c.distinct_sectors.len(), c.async_copy_sectors), (0, 0, 0, 0));
    // A line prefetch counts the whole 128-byte line of its address, even one 8-byte word into it.
    let c = run(&mut m, bulk, lines + 8, 16).unwrap();
    assert_eq!(c.prefetch_sectors.len(), 1 + 4 * 5 + 4 * 5, "lines+8 .. lines+8+512 spans 5 lines");
}

#[test]
fn unmapped_prefetches_count_nothing_and_do_not_fail() {
    let mut m = Machine::new();
    let buffer = m.alloc(8192);
    // A bulk range whose last 3 KiB lie past the allocation (in the gap after it), and lines at addresses no
    // allocation holds: only the 1 KiB inside counts.
    let c = run(&mut m, buffer + 8192 - 1024, 0x100, 4096).unwrap();
    assert_eq!(c.prefetch_sectors.len(), 1024 / 32);
    assert_eq!(c.prefetch_requests, 3 * 64);
    // Wholly unmapped (far above every allocation): nothing.
    let c = run(&mut m, 0x7000_0000_0000, 0x7000_0000_0000, 1 << 20).unwrap();
    assert!(c.prefetch_sectors.is_empty());
}

#[test]
fn a_misaligned_bulk_prefetch_is_an_error() {
    let mut m = Machine::new();
    let buffer = m.alloc(4096);
    let e = run(&mut m, buffer, buffer, 24).unwrap_err();
    assert!(e.message.contains("multiples of 16"), "{e}");
    let e = run(&mut m, buffer + 8, buffer, 32).unwrap_err();
    assert!(e.message.contains("multiples of 16"), "{e}");
}
