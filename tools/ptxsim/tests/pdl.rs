//! Programmatic dependent launch (`Machine::programmatic`): `griddepcontrol` runs as instructions, and the
//! accesses an overlap with the previous grid would make unsafe are reported. One planted bug per rule (a load of
//! what the previous launch wrote, a store or atomic to what it read or wrote, a cp.async of its output, all before
//! the thread's `griddepcontrol.wait`; `launch_dependents` before the wait; a grid where nobody waits), and the
//! correct pattern (prefetch read-only data, wait, trigger, read the predecessor's output), which must pass.

mod common;

use common::*;
use ptxsim::{Counters, Machine, Module, SimError};

/// A kernel of one block over four u32 buffers `a`, `b`, `c`, `d`: `%pa`..`%pd` point at thread `tid`'s word.
fn kernel(body: &str) -> Module {
    let src = format!(
        r#"
.version 8.0
.target sm_90a
.address_size 64
.visible .entry k(.param .u64 a, .param .u64 b, .param .u64 c, .param .u64 d)
{{
  .reg .b64 %a, %b, %c, %d, %off, %pa, %pb, %pc, %pd;
  .reg .b32 %tid, %t, %u, %s;
  .reg .pred %p;
  mov.u32 %tid, %tid.x;
  ld.param.u64 %a, [a];
  ld.param.u64 %b, [b];
  ld.param.u64 %c, [c];
  ld.param.u64 %d, [d];
  mul.wide.u32 %off, %tid, 4;
  add.s64 %pa, %a, %off;
  add.s64 %pb, %b, %off;
  add.s64 %pc, %c, %off;
  add.s64 %pd, %d, %off;
  {body}
  ret;
}}
"#
    );
    Module::parse(&src).unwrap_or_else(|e| panic!("{e}\n{body}"))
}

const THREADS: u32 = 64;

/// The predecessor: reads `b` (its input), writes `a` (its output).
const PRODUCER: &str = "ld.global.u32 %t, [%pb]; add.u32 %t, %t, 1; st.global.u32 [%pa], %t;";

/// The correct dependent: reads the weights `c` (nothing writes them) before the wait, then the producer's `a`.
const CONSUMER: &str = r#"
  ld.global.u32 %u, [%pc];
  griddepcontrol.wait;
  griddepcontrol.launch_dependents;
  ld.global.u32 %t, [%pa];
  add.u32 %t, %t, %u;
  st.global.u32 [%pd], %t;
"#;

struct Buffers {
    a: u64,
    b: u64,
    c: u64,
    d: u64,
}

impl Buffers {
    fn new(m: &mut Machine) -> Buffers {
        let words = |base: u32| (0..THREADS).map(|i| base + i).collect::<Vec<u32>>();
        Buffers { a: upload(m, &words(1000)), b: upload(m, &words(0)), c: upload(m, &words(100)), d: poisoned(m, THREADS as usize * 4) }
    }
    fn params(&self) -> Vec<u8> {
        Params::new().ptr(self.a).ptr(self.b).ptr(self.c).ptr(self.d).0
    }
}

/// Launches `body` over the four buffers, programmatic or not.
fn launch(m: &mut Machine, programmatic: bool, body: &str, bufs: &Buffers) -> Result<Counters, SimError> {
    m.programmatic = programmatic;
    m.launch(&kernel(body), "k", [1, 1, 1], [THREADS, 1, 1], 0, &bufs.params())
}

/// Runs the producer, then `body` launched programmatically right after it; returns the machine and buffers.
fn after_producer(body: &str) -> (Result<(), SimError>, Machine, Buffers) {
    let mut m = Machine::new();
    let bufs = Buffers::new(&mut m);
    launch(&mut m, false, PRODUCER, &bufs).unwrap();
    let r = launch(&mut m, true, body, &bufs).map(|_| ());
    (r, m, bufs)
}

fn hazard(body: &str) -> SimError {
    let (r, ..) = after_producer(body);
    let e = r.expect_err("the planted hazard must be reported");
    assert!(e.to_string().contains("programmatic launch hazard"), "{e}");
    e
}

#[test]
fn prefetch_wait_then_read_passes_and_computes() {
    let (r, m, bufs) = after_producer(CONSUMER);
    r.unwrap();
    let out: Vec<u32> = download(&m, bufs.d, THREADS as usize);
    let want: Vec<u32> = (0..THREADS).map(|i| (i + 1) + (100 + i)).collect();
    assert_eq!(out, want);
}

#[test]
fn griddepcontrol_is_counted_as_instructions() {
    let mut m = Machine::new();
    let bufs = Buffers::new(&mut m);
    let plain = launch(&mut m, false, PRODUCER, &bufs).unwrap();
    let with = launch(&mut m, true, CONSUMER, &bufs).unwrap();
    assert!(!plain.programmatic && with.programmatic);
    // Same preamble; the consumer has 2 griddepcontrol + 2 loads + add + store against the producer's load, add, store.
    assert_eq!(with.warp_instructions - plain.warp_instructions, 3 * (THREADS as u64 / 32));
}

#[test]
fn load_of_the_previous_output_before_the_wait() {
    let e = hazard("ld.global.u32 %t, [%pa]; griddepcontrol.wait; st.global.u32 [%pd], %t;");
    let s = e.to_string();
    assert!(s.contains("load of") && s.contains("(k) wrote") && s.contains("thread (0, 0, 0)"), "{s}");
    assert!(e.site.is_some_and(|site| site.kernel == "k"), "the error names the kernel and thread");
}

#[test]
fn stores_and_atomics_on_the_previous_bytes_before_the_wait() {
    for (body, did) in [
        ("mov.u32 %t, 7; st.global.u32 [%pa], %t; griddepcontrol.wait;", "(k) wrote"),
        ("mov.u32 %t, 7; st.global.u32 [%pb], %t; griddepcontrol.wait;", "(k) read"),
        ("atom.global.add.u32 %t, [%pb], 1; griddepcontrol.wait;", "(k) read"),
    ] {
        let s = hazard(body).to_string();
        assert!(s.contains("store/atomic to") && s.contains(did), "{body}: {s}");
    }
}

#[test]
fn cp_async_of_the_previous_output_issued_before_the_wait() {
    // The copy would land after the wait; it is the issue that races with the producer.
    let body = r#"
  .shared .align 16 .b8 stage[256];
  .reg .b32 %sa;
  mov.u32 %sa, stage;
  mad.lo.u32 %sa, %tid, 4, %sa;
  cp.async.ca.shared.global [%sa], [%pa], 4;
  cp.async.commit_group;
  griddepcontrol.wait;
  cp.async.wait_all;
  ld.shared.u32 %t, [%sa];
  st.global.u32 [%pd], %t;
"#;
    let s = hazard(body).to_string();
    assert!(s.contains("asynchronous copy") && s.contains("wrote"), "{s}");
}

#[test]
fn launch_dependents_before_the_wait() {
    let s = hazard("griddepcontrol.launch_dependents; griddepcontrol.wait; ld.global.u32 %t, [%pa]; st.global.u32 [%pd], %t;").to_string();
    assert!(s.contains("launch_dependents before"), "{s}");
}

#[test]
fn a_grid_where_no_thread_waits() {
    let s = hazard("ld.global.u32 %t, [%pc]; st.global.u32 [%pd], %t;").to_string();
    assert!(s.contains("no thread of kernel k executed griddepcontrol.wait"), "{s}");
}

#[test]
fn bytes_next_to_the_previous_output_in_one_sector_are_not_a_hazard() {
    // The producer writes byte 0 of each word; the dependent reads byte 1 and stores to byte 2 of the same words
    // (same 32-byte sectors) before its wait: no byte overlaps, so no hazard.
    let mut m = Machine::new();
    let bufs = Buffers::new(&mut m);
    launch(&mut m, false, "mov.u32 %t, 5; st.global.u8 [%pa], %t;", &bufs).unwrap();
    let body = "ld.global.u8 %t, [%pa+1]; st.global.u8 [%pa+2], %t; griddepcontrol.wait; ld.global.u8 %t, [%pa]; st.global.u32 [%pd], %t;";
    launch(&mut m, true, body, &bufs).unwrap();
    assert_eq!(download::<u32>(&m, bufs.d, THREADS as usize), vec![5; THREADS as usize]);
    // A 2-byte load that covers the written byte is caught.
    launch(&mut m, false, "mov.u32 %t, 5; st.global.u8 [%pa+1], %t;", &bufs).unwrap();
    let e = launch(&mut m, true, "ld.global.u16 %t, [%pa]; griddepcontrol.wait;", &bufs);
    let s = e.expect_err("byte 1 was written").to_string();
    assert!(s.contains("byte 1 of a 2-byte read"), "{s}");
}

#[test]
fn only_the_directly_preceding_launch_counts() {
    // producer -> consumer (programmatic, correct) -> a third launch reading the producer's output before its wait:
    // the consumer waited for the producer before triggering, so the producer has completed; only the consumer's
    // accesses matter (it wrote d).
    let (r, mut m, bufs) = after_producer(CONSUMER);
    r.unwrap();
    let third = "ld.global.u32 %t, [%pa]; griddepcontrol.wait; st.global.u32 [%pb], %t;";
    launch(&mut m, true, third, &bufs).unwrap();
    let (r, mut m, bufs) = after_producer(CONSUMER);
    r.unwrap();
    let reads_consumer_output = "ld.global.u32 %t, [%pd]; griddepcontrol.wait;";
    let e = launch(&mut m, true, reads_consumer_output, &bufs).unwrap_err();
    assert!(e.to_string().contains("load of"), "{e}");
}

#[test]
fn host_operations_and_plain_launches_are_not_checked() {
    // A host copy between the launches orders them: nothing of the producer is still running.
    let body = "ld.global.u32 %t, [%pa]; griddepcontrol.wait; st.global.u32 [%pd], %t;";
    for host_op in 0..3 {
        let mut m = Machine::new();
        let bufs = Buffers::new(&mut m);
        launch(&mut m, false, PRODUCER, &bufs).unwrap();
        match host_op {
            0 => m.write(bufs.c, &[0u8; 4]).unwrap(),
            1 => m.memset(bufs.c, 0, 4).unwrap(),
            _ => m.synchronize(),
        }
        launch(&mut m, true, body, &bufs).unwrap();
    }
    // A plain launch is ordered after its predecessor whatever it does.
    let mut m = Machine::new();
    let bufs = Buffers::new(&mut m);
    launch(&mut m, false, PRODUCER, &bufs).unwrap();
    launch(&mut m, false, "ld.global.u32 %t, [%pa]; st.global.u32 [%pb], %t;", &bufs).unwrap();
}

#[test]
fn threads_that_exit_without_waiting_are_fine() {
    // Half the threads have nothing to do and exit before the wait; the others wait and read.
    let body = "setp.ge.u32 %p, %tid, 32; @%p ret; griddepcontrol.wait; ld.global.u32 %t, [%pa]; st.global.u32 [%pd], %t;";
    let (r, m, bufs) = after_producer(body);
    r.unwrap();
    let out: Vec<u32> = download(&m, bufs.d, 32);
    assert_eq!(out, (1..=32).collect::<Vec<u32>>());
}

#[test]
fn loads_before_the_wait_are_counted_apart() {
    // The consumer loads 64 threads x 4 bytes of `c` before its wait (8 sectors, two warp requests of 4) and as
    // many of `a` after it: only the first count as pre-wait loads, and its one block issued some.
    let mut m = Machine::new();
    let bufs = Buffers::new(&mut m);
    let producer = launch(&mut m, false, PRODUCER, &bufs).unwrap();
    assert_eq!((producer.pre_wait_sectors, producer.pre_wait_blocks, producer.follows_launch), (0, 0, false), "no wait: nothing before it");
    let consumer = launch(&mut m, true, CONSUMER, &bufs).unwrap();
    assert_eq!((consumer.pre_wait_sectors, consumer.pre_wait_blocks), (8, 1));
    assert!(consumer.follows_launch, "programmatic right after the producer");
    // The same kernel launched plainly still counts its pre-wait loads (they are the kernel's), but follows nothing.
    let plain = launch(&mut m, false, CONSUMER, &bufs).unwrap();
    assert_eq!((plain.pre_wait_sectors, plain.follows_launch), (8, false));
    // After a host operation a programmatic launch has no running predecessor.
    m.synchronize();
    assert!(!launch(&mut m, true, CONSUMER, &bufs).unwrap().follows_launch);
    // A kernel that waits first loads nothing before it.
    let waits_first = "griddepcontrol.wait; ld.global.u32 %t, [%pc]; st.global.u32 [%pd], %t;";
    let c = launch(&mut m, true, waits_first, &bufs).unwrap();
    assert_eq!((c.pre_wait_sectors, c.pre_wait_blocks), (0, 0));
}

#[test]
fn l2_prefetches_before_the_wait_are_pre_wait_traffic_and_later_loads_find_them() {
    // Thread 0 asks L2 for the whole of `c` (64 words: 256 bytes, 8 sectors) before its wait; after it every thread
    // loads its word of `c` and of `a`. The prefetch's 8 sectors are pre-wait traffic, but nothing waits for a
    // prefetch, so the block is not one that loads before its wait; the 8 sectors of `c` the threads load later are
    // the prefetched loads, `a`'s are not.
    let prefetch_then_wait = |prefetch_after_wait: bool| {
        let prefetch = "setp.eq.u32 %p, %tid, 0; @%p cp.async.bulk.prefetch.L2.global [%c], 256;";
        let wait = "griddepcontrol.wait; griddepcontrol.launch_dependents;";
        let (first, second) = if prefetch_after_wait { (wait, prefetch) } else { (prefetch, wait) };
        format!("{first} {second} ld.global.u32 %u, [%pc]; ld.global.u32 %t, [%pa]; add.u32 %t, %t, %u; st.global.u32 [%pd], %t;")
    };
    let mut m = Machine::new();
    let bufs = Buffers::new(&mut m);
    launch(&mut m, false, PRODUCER, &bufs).unwrap();
    let before = launch(&mut m, true, &prefetch_then_wait(false), &bufs).unwrap();
    assert_eq!((before.pre_wait_sectors, before.pre_wait_blocks, before.prefetch_requests), (8, 0, 1));
    assert_eq!((before.prefetch_sectors.len(), before.prefetched_loads.len(), before.distinct_sectors.len()), (8, 8, 24));
    let out: Vec<u32> = download(&m, bufs.d, THREADS as usize);
    assert_eq!(out, (0..THREADS).map(|i| (i + 1) + (100 + i)).collect::<Vec<u32>>(), "a hint: the same result");
    // Issued after the wait it is no pre-wait traffic; the loads after it still find it.
    launch(&mut m, false, PRODUCER, &bufs).unwrap();
    let after = launch(&mut m, true, &prefetch_then_wait(true), &bufs).unwrap();
    assert_eq!((after.pre_wait_sectors, after.prefetched_loads.len()), (0, 8));
}
