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
