//! sm_90a asynchronous PTX: label scoping in inline-asm blocks, mbarriers (phases, transaction counts, blocking
//! waits, happens-before for the race detector, deadlock reports), proxy fences, `elect.sync`, `setmaxnreg`,
//! `griddepcontrol` and clusters of one CTA. Hand-written PTX in the spellings nvcc 13 and CUTLASS emit
//! (../shared/HOPPER-ASYNC.md, appendix); every kernel stores one u32 `%v` per thread.

mod common;

use common::*;
use ptxsim::{Machine, Module, SimError};

/// A kernel whose threads run `body` and store `%v` to `out[tid]`; `in` points to the test's input words.
fn kernel(body: &str) -> String {
    format!(
        r#"
.version 8.0
.target sm_90a
.address_size 64
.visible .entry k(.param .u64 out, .param .u64 in)
{{
  .reg .b64 %out, %in, %off, %x;
  .reg .b32 %tid, %lane, %warp, %v, %t, %u;
  .reg .pred %p, %q;
  mov.u32 %tid, %tid.x;
  and.b32 %lane, %tid, 31;
  shr.u32 %warp, %tid, 5;
  ld.param.u64 %out, [out];
  ld.param.u64 %in, [in];
  mul.wide.u32 %off, %tid, 4;
  mov.u32 %v, 0;
  {body}
  add.s64 %out, %out, %off;
  st.global.u32 [%out], %v;
  ret;
}}
"#
    )
}

/// Runs `body` with `threads` threads in one block over the input words; returns every thread's `%v`.
fn run(body: &str, threads: u32, input: &[u32]) -> Result<Vec<u32>, SimError> {
    let module = Module::parse(&kernel(body)).unwrap_or_else(|e| panic!("{e}\n{body}"));
    let mut m = Machine::new();
    let inp = upload(&mut m, if input.is_empty() { &[0u32] } else { input });
    let out = poisoned(&mut m, threads as usize * 4);
    m.launch(&module, "k", [1, 1, 1], [threads, 1, 1], 0, &Params::new().ptr(out).ptr(inp).0)?;
    Ok(download(&m, out, threads as usize))
}

#[test]
fn labels_are_scoped_to_their_block() {
    // The same DONE label in two inline-asm blocks: each branch must land in its own block. With one label map per
    // function, the first branch would jump to the second block's DONE and skip the +10.
    let body = r#"
  ld.global.u32 %t, [%in];
  ld.global.u32 %u, [%in+4];
  { .reg .pred P1; setp.eq.u32 P1, %t, 0; @P1 bra DONE; add.u32 %v, %v, 1; DONE: }
  { .reg .pred P1; setp.eq.u32 P1, %u, 0; @P1 bra DONE; add.u32 %v, %v, 10; DONE: }
  { .reg .pred P1; mov.u32 %t, 0; LAB_WAIT: add.u32 %t, %t, 1; setp.ge.u32 P1, %t, 3; @P1 bra DONE; bra LAB_WAIT; DONE: add.u32 %v, %v, %t; }
  { .reg .pred P1; mov.u32 %t, 0; LAB_WAIT: add.u32 %t, %t, 100; setp.ge.u32 P1, %t, 200; @P1 bra DONE; bra LAB_WAIT; DONE: add.u32 %v, %v, %t; }
"#;
    assert_eq!(run(body, 1, &[0, 1]).unwrap(), vec![10 + 3 + 200]);
    assert_eq!(run(body, 1, &[1, 0]).unwrap(), vec![1 + 3 + 200]);
    // A label of an enclosing block is visible inside nested blocks.
    assert_eq!(run("bra OUTER; { { bra OUTER2; } } OUTER: mov.u32 %v, 7; OUTER2:", 1, &[]).unwrap(), vec![7]);
}

#[test]
fn branch_to_a_label_of_another_block_is_an_error() {
    let e = Module::parse(&kernel("{ INNER: add.u32 %v, %v, 1; } bra INNER;")).unwrap_err();
    assert!(e.message.contains("unknown label INNER"), "{e}");
    let e = Module::parse(&kernel("{ A: add.u32 %v, %v, 1; A: }")).unwrap_err();
    assert!(e.message.contains("label A declared twice"), "{e}");
}

/// Warp 0 produces 3 rounds into one shared slot, warp 1 consumes them; they synchronise only through a full and an
/// empty mbarrier (CUTLASS's wait loop, with its labels repeated in every inline-asm block). `{produce}` and
/// `{consume_wait}` are the pieces the planted-bug variants change.
fn pipeline(produce: &str, consume_wait: &str) -> String {
    format!(
        r#"
  .shared .align 8 .b8 smem[144];
  .reg .b32 %base, %full, %empty, %round, %addr, %par;
  mov.u32 %base, smem;
  add.u32 %full, %base, 128;
  add.u32 %empty, %base, 136;
  setp.ne.u32 %p, %tid, 0;
  @%p bra INIT_DONE;
  mbarrier.init.shared::cta.b64 [%full], 32;
  mbarrier.init.shared::cta.b64 [%empty], 32;
INIT_DONE:
  fence.mbarrier_init.release.cluster;
  bar.sync 0;
  xor.b32 %t, %lane, 5;
  shl.b32 %addr, %t, 2;
  add.u32 %addr, %addr, %base;
  mov.u32 %round, 0;
  setp.ne.u32 %p, %warp, 0;
  @%p bra CONSUMER;
PRODUCER:
  and.b32 %par, %round, 1;
  xor.b32 %par, %par, 1;
  {{ .reg .pred P1; LAB_WAIT: mbarrier.try_wait.parity.shared::cta.b64 P1, [%empty], %par; @P1 bra DONE; bra LAB_WAIT; DONE: }}
  mad.lo.u32 %u, %round, 1000, %t;
  {produce}
  add.u32 %round, %round, 1;
  setp.lt.u32 %q, %round, 3;
  @%q bra PRODUCER;
  bra.uni END;
CONSUMER:
  and.b32 %par, %round, 1;
  {consume_wait}
  ld.shared.u32 %u, [%addr];
  add.u32 %v, %v, %u;
  mbarrier.arrive.shared::cta.b64 _, [%empty];
  add.u32 %round, %round, 1;
  setp.lt.u32 %q, %round, 3;
  @%q bra CONSUMER;
END:
"#
    )
}

const PRODUCE: &str = "st.shared.u32 [%addr], %u; mbarrier.arrive.shared::cta.b64 _, [%full];";
const CONSUME_WAIT: &str = "{ .reg .pred P1; LAB_WAIT: mbarrier.try_wait.parity.shared::cta.b64 P1, [%full], %par; @P1 bra DONE; bra LAB_WAIT; DONE: }";

#[test]
fn warps_synchronised_only_by_mbarriers_exchange_data_without_races() {
    let got = run(&pipeline(PRODUCE, CONSUME_WAIT), 64, &[]).unwrap();
    // Producer lane l writes round*1000 + (l^5) to word l^5; consumer lane l reads word l^5 (written by lane l).
    for l in 0..32u32 {
        assert_eq!(got[l as usize], 0, "producer lane {l}");
        assert_eq!(got[32 + l as usize], 3000 + 3 * (l ^ 5), "consumer lane {l}");
    }
}

#[test]
fn planted_mbarrier_races_are_reported() {
    // The consumer reads the slot without waiting for the full barrier.
    let e = run(&pipeline(PRODUCE, ""), 64, &[]).unwrap_err();
    assert!(e.message.contains("shared-memory race") && e.message.contains("thread (0, 0, 0) wrote") && e.message.contains("mbarrier"), "{e}");
    assert_eq!(e.site.as_ref().unwrap().thread, [32, 0, 0], "{e}");
    // The producer arrives before it writes: the consumer's wait does not order the write before its read.
    let e = run(&pipeline("mbarrier.arrive.shared::cta.b64 _, [%full]; st.shared.u32 [%addr], %u;", CONSUME_WAIT), 64, &[]).unwrap_err();
    assert!(e.message.contains("shared-memory race") && e.message.contains("thread (0, 0, 0) wrote") && e.message.contains("mbarrier"), "{e}");
    // The producer skips the wait on the empty barrier: it overwrites the slot and arrives on the next phase of the
    // full barrier before the consumer has seen the first.
    let no_empty_wait = pipeline(PRODUCE, CONSUME_WAIT).replace("mbarrier.try_wait.parity.shared::cta.b64 P1, [%empty], %par;", "mov.pred P1, 1;");
    let e = run(&no_empty_wait, 64, &[]).unwrap_err();
    assert!(e.message.contains("arrive on phase 1 of the mbarrier at shared offset 0x80") && e.message.contains("ran ahead"), "{e}");
}

#[test]
fn mbarrier_states_transaction_counts_and_polls() {
    // libcu++ spellings: a state token from arrive.expect_tx, test_wait/try_wait on it, complete_tx, pending_count,
    // then an arrive with a count and a parity poll on the next phase.
    let body = r#"
  .shared .align 8 .b8 bar[8];
  .reg .b64 %st, %st2;
  .reg .b32 %b;
  mov.u32 %b, bar;
  mbarrier.init.shared.b64 [%b], 1;
  mbarrier.arrive.expect_tx.release.cta.shared::cta.b64 %st, [%b], 16;
  mbarrier.test_wait.shared::cta.b64 %p, [%b], %st;
  selp.u32 %v, 1, 0, %p;
  mbarrier.complete_tx.shared::cta.b64 [%b], 16;
  mbarrier.try_wait.shared::cta.b64 %p, [%b], %st;
  selp.u32 %t, 10, 0, %p;
  add.u32 %v, %v, %t;
  mbarrier.pending_count.b64 %t, %st;
  mad.lo.u32 %v, %t, 100, %v;
  mbarrier.arrive.shared::cta.b64 %st2, [%b], 1;
  mbarrier.test_wait.parity.shared::cta.b64 %p, [%b], 1;
  selp.u32 %t, 1000, 0, %p;
  add.u32 %v, %v, %t;
  mbarrier.expect_tx.relaxed.cta.shared::cta.b64 [%b], 32;
  mbarrier.complete_tx.relaxed.cta.shared::cta.b64 [%b], 32;
  mbarrier.arrive.expect_tx.shared::cta.b64 _, [%b], 0;
  mbarrier.try_wait.parity.shared::cta.b64 %p, [%b], 0, 10000000;
  selp.u32 %t, 10000, 0, %p;
  add.u32 %v, %v, %t;
"#;
    // The first test_wait cannot complete (16 bytes outstanding): with no other warp to run it returns false once.
    assert_eq!(run(body, 1, &[]).unwrap(), vec![10 + 100 + 1000 + 10000]);
}

#[test]
fn incomplete_transaction_count_is_a_deadlock_naming_the_barrier() {
    let body = r#"
  .shared .align 8 .b8 pad[16];
  .shared .align 8 .b8 bar[8];
  .reg .b32 %b;
  mov.u32 %b, bar;
  mbarrier.init.shared::cta.b64 [%b], 1;
  mbarrier.arrive.expect_tx.shared::cta.b64 _, [%b], 64;
  mbarrier.complete_tx.shared::cta.b64 [%b], 32;
  { .reg .pred P1; LAB_WAIT: mbarrier.try_wait.parity.shared::cta.b64 P1, [%b], 0; @P1 bra DONE; bra LAB_WAIT; DONE: }
"#;
    let e = run(body, 1, &[]).unwrap_err();
    assert!(e.message.contains("deadlock") && e.message.contains("mbarrier at shared offset 0x10"), "{e}");
    assert!(e.message.contains("0 of 1 arrivals missing, 32 transaction bytes outstanding"), "{e}");
    let line = kernel(body).lines().position(|l| l.contains("LAB_WAIT:")).unwrap() as u32 + 1;
    assert_eq!(e.site.unwrap().line, line);
}

/// Runs a one-thread (or `threads`-thread) kernel that must fail, returning the message.
fn failure(body: &str, threads: u32) -> String {
    run(body, threads, &[]).expect_err("the kernel must fail").to_string()
}

#[test]
fn mbarrier_misuse_is_reported() {
    let init = ".shared .align 8 .b8 bar[8]; .reg .b32 %b; mov.u32 %b, bar; mbarrier.init.shared::cta.b64 [%b], 1;";
    let e = failure(&format!("{init} mbarrier.init.shared::cta.b64 [%b], 1;"), 1);
    assert!(e.contains("initialised again"), "{e}");
    let e = failure(&format!("{init} mbarrier.arrive.shared::cta.b64 _, [%b], 2;"), 1);
    assert!(e.contains("arrive with count 2") && e.contains("1 of 1 arrivals pending"), "{e}");
    let e = failure(&format!("{init} st.shared.u32 [%b+4], 0;"), 1);
    assert!(e.contains("touches the initialised mbarrier at 0x0"), "{e}");
    let e = failure(&format!("{init} mbarrier.arrive.shared::cta.b64 _, [%b]; mbarrier.arrive.shared::cta.b64 _, [%b];"), 1);
    assert!(e.contains("before any test_wait/try_wait observed phase 0 complete"), "{e}");
    let e = failure(".shared .align 8 .b8 bar[8]; .reg .b32 %b; mov.u32 %b, bar; mbarrier.arrive.shared::cta.b64 _, [%b];", 1);
    assert!(e.contains("no initialised mbarrier"), "{e}");
    let e = failure(&format!("{init} mbarrier.test_wait.shared::cta.b64 %p, [%b], 5;"), 1);
    assert!(e.contains("which no mbarrier.arrive returned"), "{e}");
    let e = failure(&format!("{init} mbarrier.arrive.noComplete.shared::cta.b64 %x, [%b], 1;"), 1);
    assert!(e.contains("noComplete") && e.contains("completed phase 0"), "{e}");
    // Warp 1 arrives on a barrier warp 0 initialised, with no bar.sync in between.
    let e = failure(".shared .align 8 .b8 bar[8]; .reg .b32 %b; mov.u32 %b, bar; setp.eq.u32 %p, %tid, 0; @%p mbarrier.init.shared::cta.b64 [%b], 1; setp.eq.u32 %p, %tid, 32; @%p mbarrier.arrive.shared::cta.b64 _, [%b];", 64);
    assert!(e.contains("not ordered after its mbarrier.init by thread (0, 0, 0)"), "{e}");
}

#[test]
fn clusters_of_one_cta() {
    // Every thread zeroes the word it will read (ordered by bar.sync), writes its own word, arrives at the cluster
    // barrier, waits, then reads the other warp's word.
    let exchange = |wait: &str| {
        format!(
            r#"
  .shared .align 4 .b8 s[256];
  .reg .b32 %a;
  mov.u32 %a, s;
  add.u32 %u, %tid, 32;
  and.b32 %u, %u, 63;
  shl.b32 %u, %u, 2;
  add.u32 %u, %a, %u;
  st.shared.u32 [%u], 0;
  bar.sync 0;
  shl.b32 %t, %tid, 2;
  add.u32 %t, %a, %t;
  st.shared::cluster.u32 [%t], %tid;
  barrier.cluster.arrive.release.aligned;
  {wait}
  ld.shared::cta.u32 %v, [%u];
"#
        )
    };
    let got = run(&exchange("barrier.cluster.wait.acquire.aligned;"), 64, &[]).unwrap();
    assert_eq!(got, (0..64).map(|t| (t + 32) % 64).collect::<Vec<u32>>());
    // Without the wait, warp 0 reads word 32 before warp 1 writes it (our scheduler runs warp 0 first): a race.
    let e = run(&exchange(""), 64, &[]).unwrap_err();
    assert!(e.message.contains("shared-memory race") && e.message.contains("thread (0, 0, 0) read"), "{e}");
    // CUTLASS's consumer release without clusters: mapa to rank 0 and a cluster-scoped arrive; the special registers.
    let body = r#"
  .shared .align 8 .b8 bar[8];
  .reg .b32 %b, %r;
  mov.u32 %b, bar;
  mbarrier.init.shared::cta.b64 [%b], 1;
  fence.mbarrier_init.release.cluster;
  mapa.shared::cluster.u32 %r, %b, 0;
  mbarrier.arrive.release.cluster.shared::cluster.b64 _, [%r];
  mbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 %p, [%b], 0;
  selp.u32 %v, 1, 0, %p;
  mov.u32 %t, %cluster_nctarank;
  mad.lo.u32 %v, %t, 10, %v;
  mov.u32 %t, %cluster_nctaid.x;
  mad.lo.u32 %v, %t, 100, %v;
  mov.u32 %t, %clusterid.x;
  mad.lo.u32 %v, %t, 1000, %v;
  mov.u32 %t, %is_explicit_cluster;
  mad.lo.u32 %v, %t, 10000, %v;
  getctarank.shared::cluster.u32 %t, %b;
  mad.lo.u32 %v, %t, 100000, %v;
"#;
    assert_eq!(run(body, 1, &[]).unwrap(), vec![111]);
    let e = failure(".reg .b32 %r; mapa.shared::cluster.u32 %r, %tid, 1;", 1);
    assert!(e.contains("mapa to cluster rank 1"), "{e}");
}

#[test]
fn elect_setmaxnreg_griddepcontrol_and_fences() {
    let body = r#"
  griddepcontrol.wait;
  setmaxnreg.inc.sync.aligned.u32 232;
  { .reg .pred P; elect.sync _|P, 0xffffffff; selp.u32 %v, 1, 0, P; }
  fence.proxy.async.shared::cta;
  fence.proxy.async;
  fence.proxy.tensormap::generic.release.gpu;
  fence.proxy.tensormap::generic.acquire.gpu [%in], 128;
  fence.acq_rel.cluster;
  setmaxnreg.dec.sync.aligned.u32 40;
  griddepcontrol.launch_dependents;
"#;
    let got = run(body, 64, &[]).unwrap();
    assert_eq!(got.iter().filter(|&&v| v == 1).count(), 2, "one leader per warp: {got:?}");
    assert!(got[0] == 1 && got[32] == 1);
    let e = failure("setmaxnreg.dec.sync.aligned.u32 20;", 32);
    assert!(e.contains("setmaxnreg register count 20"), "{e}");
    let e = failure("setp.lt.u32 %p, %lane, 16; @%p setmaxnreg.inc.sync.aligned.u32 64;", 32);
    assert!(e.contains("every live lane of the warp converged"), "{e}");
}
