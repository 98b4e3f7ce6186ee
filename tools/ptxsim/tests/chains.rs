//! The dependence chains behind the timing model's critical-path term (`counters::BlockChains`): loads that do not
//! depend on each other overlap, a load whose address comes from an earlier load waits for it, each loop iteration
//! (basic block) waits for its own loads, and a block barrier makes a warp wait for the others' chains.

mod common;

use common::{upload, Params};
use ptxsim::timing::{CHAIN_CYCLES, CHAIN_GLOBAL_CYCLES};
use ptxsim::{Counters, Machine, Module};

const PTX: &str = r#"
.version 8.0
.target sm_90
.address_size 64

// Four loads from independent addresses, summed and stored: one memory latency on the chain.
.visible .entry independent(.param .u64 p) {
    .reg .b64 %rd<8>;
    .reg .b32 %r<8>;
    ld.param.u64 %rd0, [p];
    cvta.to.global.u64 %rd1, %rd0;
    ld.global.u32 %r0, [%rd1];
    ld.global.u32 %r1, [%rd1+128];
    ld.global.u32 %r2, [%rd1+256];
    ld.global.u32 %r3, [%rd1+384];
    add.s32 %r4, %r0, %r1;
    add.s32 %r5, %r2, %r3;
    add.s32 %r6, %r4, %r5;
    st.global.u32 [%rd1+512], %r6;
    ret;
}

// A pointer chase: each load's address is the value the previous one loaded: four latencies.
.visible .entry chase(.param .u64 p) {
    .reg .b64 %rd<8>;
    ld.param.u64 %rd0, [p];
    cvta.to.global.u64 %rd1, %rd0;
    ld.global.u64 %rd2, [%rd1];
    ld.global.u64 %rd3, [%rd2];
    ld.global.u64 %rd4, [%rd3];
    ld.global.u64 %rd5, [%rd4];
    st.global.u64 [%rd1+64], %rd5;
    ret;
}

// A loop of 3 iterations, each loading an independent address and accumulating it: the warp issues in order, so
// every iteration's branch waits for its add, which waits for its load: three latencies.
.visible .entry looped(.param .u64 p) {
    .reg .b64 %rd<8>;
    .reg .b32 %r<8>;
    .reg .pred %p<2>;
    ld.param.u64 %rd0, [p];
    cvta.to.global.u64 %rd1, %rd0;
    mov.u32 %r0, 0;
    mov.u32 %r1, 0;
$L_loop:
    ld.global.u32 %r2, [%rd1];
    add.s32 %r0, %r0, %r2;
    add.s64 %rd1, %rd1, 128;
    add.s32 %r1, %r1, 1;
    setp.lt.s32 %p0, %r1, 3;
    @%p0 bra $L_loop;
    st.global.u32 [%rd1], %r0;
    ret;
}

// Two warps: warp 1 loads a value and stores it to shared memory before the barrier; warp 0 then reads it and
// loads from global memory after the barrier. Warp 0's chain holds warp 1's load (through the barrier) and its own.
.visible .entry barrier(.param .u64 p) {
    .reg .b64 %rd<8>;
    .reg .b32 %r<8>;
    .reg .pred %p<2>;
    .shared .align 4 .b32 s[32];
    ld.param.u64 %rd0, [p];
    cvta.to.global.u64 %rd1, %rd0;
    mov.u32 %r0, %tid.x;
    setp.lt.u32 %p0, %r0, 32;
    @%p0 bra $L_after;
    ld.global.u32 %r1, [%rd1];
    sub.u32 %r3, %r0, 32;
    shl.b32 %r3, %r3, 2;
    mov.u32 %r4, s;
    add.u32 %r5, %r4, %r3;
    st.shared.u32 [%r5], %r1;
$L_after:
    bar.sync 0;
    @!%p0 bra $L_done;
    ld.global.u32 %r2, [%rd1+128];
    st.global.u32 [%rd1+256], %r2;
$L_done:
    ret;
}

// Warp-specialised roles: warp 0 loads once, warp 1 chases two pointers, warp 2 exits. Warp 1 holds the block's
// longest chain.
.visible .entry roles(.param .u64 p) {
    .reg .b64 %rd<8>;
    .reg .b32 %r<8>;
    .reg .pred %p<4>;
    ld.param.u64 %rd0, [p];
    cvta.to.global.u64 %rd1, %rd0;
    mov.u32 %r0, %tid.x;
    setp.ge.u32 %p1, %r0, 64;
    @%p1 bra $L_end;
    setp.lt.u32 %p0, %r0, 32;
    @%p0 bra $L_one;
    ld.global.u64 %rd2, [%rd1];
    ld.global.u64 %rd3, [%rd2];
    st.global.u64 [%rd1+64], %rd3;
    bra.uni $L_end;
$L_one:
    ld.global.u64 %rd4, [%rd1+128];
    st.global.u64 [%rd1+192], %rd4;
$L_end:
    ret;
}
"#;

fn run(entry: &str, threads: u32) -> Counters {
    let module = Module::parse(PTX).expect("chains PTX parses");
    let mut m = Machine::new();
    let buffer = upload(&mut m, &[0u64; 128]);
    // The chase follows pointers: every word holds the buffer's own address.
    m.write(buffer, bytemuck::cast_slice(&[buffer; 128])).unwrap();
    m.launch(&module, entry, [1, 1, 1], [threads, 1, 1], 0, &Params::new().ptr(buffer).0).unwrap()
}

#[test]
fn independent_loads_overlap_on_the_chain() {
    let c = run("independent", 32);
    assert_eq!(c.chain_globals_max, 1);
    // The loads issue one a cycle, the adds follow the last load, then the store: far less than 4 latencies.
    assert!(c.chain_cycles_max < 30, "{} cycles besides the load", c.chain_cycles_max);
}

#[test]
fn dependent_loads_serialize_on_the_chain() {
    let c = run("chase", 32);
    assert_eq!(c.chain_globals_max, 4);
    assert_eq!((c.chain_globals_sum, c.blocks_run), (4, 1));
}

#[test]
fn each_loop_iteration_waits_for_its_loads() {
    let c = run("looped", 32);
    assert_eq!(c.chain_globals_max, 3);
    // Each iteration: the add after its load and the branch after the add, in order.
    assert!(c.chain_cycles_max >= 3 * CHAIN_CYCLES[ptxsim::ir::Class::Integer as usize]);
}

#[test]
fn a_block_barrier_passes_the_other_warps_chains_on() {
    let c = run("barrier", 64);
    assert_eq!(c.chain_globals_max, 2, "warp 1's load before the barrier, warp 0's after it");
    // The barrier's resume cost is on the chain too.
    let weighted = c.chain_cycles_max + c.chain_globals_max * CHAIN_GLOBAL_CYCLES;
    assert!(weighted >= 2 * CHAIN_GLOBAL_CYCLES + CHAIN_CYCLES[ptxsim::ir::Class::Sync as usize]);
}

#[test]
fn the_longest_chain_names_its_warp() {
    let c = run("roles", 96);
    assert_eq!((c.chain_globals_max, c.chain_longest_warp), (2, 1), "warp 1's two dependent loads");
    assert_eq!(run("chase", 32).chain_longest_warp, 0);
}
