#!/usr/bin/env bash
# One command for a lent GPU (issue 16, item 6): the `gpu::` twin of every kernel test (fails if one skipped), the
# Hopper probe (issue 17 item 4: the program of tools/ptxsim/tests/fixtures/hopper.cu, its dumps compared with the
# interpreter's models by `small4 hopper-probe settle`, one verdict per item HOPPER-ASYNC.md marks UNVERIFIED), the
# full-size synthetic model (`small4 bench --synthetic`: nvfp4 and int4 at full size, bf16 and fp8 with fewer experts)
# and the criterion benches, each step timed against one budget, and a dated markdown section for docs/perf.md.
# `--backend sim` rehearses every step on the PTX interpreter (the `sim::` twins, the probe's kernels from its PTX, a
# tiny synthetic model, the benches in criterion's test mode) so each command line is exercised before a GPU is lent. How a session runs it with the
# device tool: tools/gpu/README.md.
#
# Binaries: a lent GPU machine has no Rust toolchain and no network, so the usual path is `--build-only` here (cargo
# release build of the tests, benches and CLI, stripped, and nvcc's build of the probe program and its PTX, packed into
# .gpu-bin/, carried), then the run there.
# Where cargo is present and no pack is asked for, the script builds itself (nothing downloads with SMALL4_OFFLINE=1).
set -euo pipefail

usage() {
    cat <<'EOF'
usage: tools/gpu/run.sh [--backend gpu|sim] [--out DIR] [--steps LIST] [--tests LIST] [--formats LIST] [--budget SECONDS]
                        [--bin DIR | --use-pack] [--build-only] [--dry-run] [--allow-stale]

  --backend gpu|sim  gpu (default): the gpu:: twins, the full-size synthetic model, benches with short timings.
                     sim: the same commands on the PTX interpreter (sim:: twins, a tiny synthetic model, benches
                     in criterion's --test mode, where the GPU benches print their skip line).
  --out DIR          where perf-section.md and the logs go (default: $OUT if set, else target/gpu-run).
  --steps LIST       comma-separated subset of tests,probe,synthetic,benches (default: all four, in that order).
  --tests LIST       comma-separated test files (default: every tests/*.rs that instantiates backend_tests!).
  --formats LIST     comma-separated synthetic formats among nvfp4,int4,bf16,fp8 (default: all four).
  --budget SECONDS   total time for every step, the build or unpack included (default 480: 8 minutes; sim: 7200,
                     with no cap per step).
  --bin DIR          run the binaries staged in DIR (DIR/small4, DIR/tests/NAME, DIR/benches/NAME) instead.
  --use-pack         use the carried .gpu-bin/bin.tar.xz even where cargo is present (rehearses the GPU path).
  --build-only       build with cargo, stage, and pack .gpu-bin/ to carry to a GPU machine; run nothing else.
  --dry-run          print every command and write the section without running the steps.
  --allow-stale      run binaries whose source hash differs from this tree's (otherwise an error).
  --offline          set SMALL4_OFFLINE=1 and pass --offline to cargo (a machine without network).
EOF
}

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$repo"

backend=gpu out_dir="" steps="tests,probe,synthetic,benches" test_list="" formats="nvfp4,int4,bf16,fp8" budget=480 bin_dir="" use_pack=0 build_only=0
dry_run=0 allow_stale=0 offline=0 budget_given=0
original_args=("$@")
while [[ $# -gt 0 ]]; do
    case $1 in
        --backend) backend=${2:?--backend needs gpu or sim}; shift 2 ;;
        --out) out_dir=${2:?--out needs a directory}; shift 2 ;;
        --steps) steps=${2:?--steps needs a list}; shift 2 ;;
        --tests) test_list=${2:?--tests needs a list}; shift 2 ;;
        --formats) formats=${2:?--formats needs a list}; shift 2 ;;
        --budget) budget=${2:?--budget needs seconds} budget_given=1; shift 2 ;;
        --bin) bin_dir=${2:?--bin needs a directory}; shift 2 ;;
        --use-pack) use_pack=1; shift ;;
        --build-only) build_only=1; shift ;;
        --dry-run) dry_run=1; shift ;;
        --allow-stale) allow_stale=1; shift ;;
        --offline) offline=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "run.sh: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
    esac
done
case $backend in gpu) twin=gpu ;; sim) twin=sim ;; *) echo "run.sh: --backend is gpu or sim, not '$backend'" >&2; exit 2 ;; esac
[[ $budget =~ ^[0-9]+$ && $budget -gt 0 ]] || { echo "run.sh: --budget takes whole seconds, not '$budget'" >&2; exit 2; }
for step in ${steps//,/ }; do
    case $step in tests|probe|synthetic|benches) ;; *) echo "run.sh: unknown step '$step' (tests, probe, synthetic, benches)" >&2; exit 2 ;; esac
done
for format in ${formats//,/ }; do
    case $format in nvfp4|int4|bf16|fp8) ;; *) echo "run.sh: unknown synthetic format '$format' (nvfp4, int4, bf16, fp8)" >&2; exit 2 ;; esac
done
[[ -n $bin_dir && $use_pack == 1 ]] && { echo "run.sh: --bin and --use-pack exclude each other" >&2; exit 2; }

# ---- What runs -------------------------------------------------------------------------------------------------------

# The synthetic runs: "format experts [flags]" (empty or "all" experts: the real preset's 128). An 80 GB H100 holds nvfp4 (70.8 GB of
# weights by `small4 plan`) and int4 (65.3 GB) at full size; bf16 experts are 1.81 GB each over the 36 layers and fp8
# 0.91 GB, so bf16 keeps 32 of 128 (58 GB of experts) and fp8 64 (58 GB). Batch-1 decode reads 4 routed experts a
# layer whatever the count, so tokens/s at fewer experts is the full model's.
synthetic_runs_gpu=("nvfp4 " "int4 " "bf16 32" "fp8 64")
# Then, after the logits check and only with what the step's cap leaves (cut at the deadline, it fails nothing), nvfp4
# again with programmatic dependent launches off (`--no-pdl`): the decode step without the launch overlap, against the
# first run's with it; then without L2 prefetch (`--no-l2-prefetch`): the step whose latency-bound launches do not
# pull wo's weights into L2 and whose dense decode GEMMs do not prefetch their own k range before their wait.
synthetic_comparison_runs_gpu=("nvfp4 all --no-pdl" "nvfp4 all --no-l2-prefetch")
synthetic_args_gpu=(--prompt-len 4096 --decode-steps 64 --warmup-steps 4)
# The rehearsal: the same four formats as one layer of eight experts of the tiny preset's dimensions, few tokens
# (one layer at the real dimensions did not finish in 10 minutes on the interpreter on 2 busy cores).
synthetic_runs_sim=("nvfp4 8" "int4 8" "bf16 8" "fp8 8")
synthetic_comparison_runs_sim=("nvfp4 8 --no-pdl" "nvfp4 8 --no-l2-prefetch")
synthetic_args_sim=(--preset tiny --layers 1 --prompt-len 4 --decode-steps 2 --warmup-steps 1)
# Criterion: short timings so the benches fit (the router, attention, moe and vision benches hold ~50 benchmarks).
bench_args_gpu=(--bench --warm-up-time 0.5 --measurement-time 1 --sample-size 10 --noplot)
# On the interpreter criterion's test mode runs each benchmark once; the GPU benches say SKIPPED (gpu_or_skip).
bench_args_sim=("${bench_args_gpu[@]}" --test)
# Step caps in seconds (a step also never runs past the total budget): the synthetic model is the headline figure,
# so it runs before the open-ended benches, which get what is left. The probe is a second of GPU work (13 launches
# of one block) and the interpreter's rerun of its kernels on the dumps' inputs (about 15 s of one CPU core here).
declare -A step_cap=([tests]=150 [probe]=60 [synthetic]=200 [benches]=400)
# The interpreter is no GPU: a rehearsal's steps have no caps of their own, and its budget is two hours unless given.
if [[ $backend == sim ]]; then
    ((budget_given)) || budget=7200
    step_cap=([tests]=$budget [probe]=$budget [synthetic]=$budget [benches]=$budget)
fi

if [[ -n $test_list ]]; then
    read -r -a test_targets <<<"${test_list//,/ }"
else
    mapfile -t test_targets < <(grep -l 'backend_tests!' tests/*.rs | xargs -n1 basename | sed 's/\.rs$//' | LC_ALL=C sort)
fi
mapfile -t bench_targets < <(ls benches/*.rs | xargs -n1 basename | sed 's/\.rs$//' | LC_ALL=C sort)
for t in "${test_targets[@]}"; do
    [[ -f tests/$t.rs ]] || { echo "run.sh: --tests names '$t' but tests/$t.rs does not exist" >&2; exit 2; }
done

# ---- Helpers ---------------------------------------------------------------------------------------------------------

start_s=$(date +%s)
elapsed() { echo $(($(date +%s) - start_s)); }
budget_left() { echo $((budget - $(elapsed))); }
show() { printf '+'; printf ' %q' "$@"; printf '\n'; }

# The inputs of the binaries: a stale pack (built from other sources than this tree's) is refused.
source_hash() {
    local roots=() root
    for root in src cuda tests benches tools/ptxsim tools/gen capi build.rs Cargo.toml Cargo.lock; do
        [[ -e $root ]] && roots+=("$root")
    done
    find "${roots[@]}" -type f ! -path '*/target/*' ! -name '*.swp' -print0 | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16
}

work=$(mktemp -d "${TMPDIR:-/tmp}/small4-gpu-run.XXXXXX")
trap 'rm -rf "$work"' EXIT
records=$work/records.tsv   # step, name, rc, seconds, passed, failed, ignored, skipped, log, command
step_records=$work/steps.tsv  # step, status, seconds, note
commands=$work/commands.txt
: >"$records"; : >"$step_records"; : >"$commands"

record_step() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$step_records"; }
log_command() { printf '%q ' "$@" | sed 's/ $//' >>"$commands"; echo >>"$commands"; }

# Runs one command of a step under the step's deadline; its output goes to the console and to LOG.
# Sets run_rc (124: cut by the deadline) and run_seconds.
run_logged() {
    local deadline=$1 log=$2; shift 2
    local left=$((deadline - $(date +%s)))
    show "$@"
    log_command "$@"
    if ((left <= 0)); then
        echo "not run: the step's time is spent" | tee -a "$log"
        run_rc=124 run_seconds=0
        return
    fi
    local t0; t0=$(date +%s)
    set +e
    timeout --kill-after=10 "${left}s" "$@" 2>&1 | tee -a "$log"
    run_rc=${PIPESTATUS[0]}
    set -e
    run_seconds=$(($(date +%s) - t0))
    ((run_rc == 124)) && echo "CUT: the command ran into the step's deadline after ${run_seconds} s" | tee -a "$log"
    return 0
}

# The step's deadline: its cap or the budget's end, whichever comes first; empty when nothing is left.
step_deadline() {
    local cap=$1 left; left=$(budget_left)
    ((left < 5)) && return 0
    ((cap < left)) && left=$cap
    echo $(($(date +%s) + left))
}

banner() { echo; echo "==== $1 ($(elapsed) s of the ${budget} s budget used)"; }

# ---- Step 1: binaries ------------------------------------------------------------------------------------------------

pack_dir=$repo/.gpu-bin
target_dir=${CARGO_TARGET_DIR:-$repo/target}

# The CUDA compiler, found as build.rs finds it: $NVCC, $CUDA_HOME/bin/nvcc, nvcc on PATH, then the toolchain
# build.rs provisions ($SMALL4_TOOLCHAIN_DIR, default .toolchain).
find_nvcc() {
    local candidate
    for candidate in "${NVCC:-}" "${CUDA_HOME:+$CUDA_HOME/bin/nvcc}" "$(command -v nvcc || true)" \
        "${SMALL4_TOOLCHAIN_DIR:-$repo/.toolchain}/cuda/nvidia/cu13/bin/nvcc"; do
        [[ -n $candidate && -x $candidate ]] && { echo "$candidate"; return 0; }
    done
    return 1
}

probe_source=tools/ptxsim/tests/fixtures/hopper.cu
# The Hopper probe program (issue 17 item 4) and the PTX nvcc makes of it, into $1: hopper-probe runs on the GPU,
# hopper-probe.ptx is what the interpreter runs for the comparison (and for the whole probe on --backend sim).
# Seconds; static cudart, so the GPU machine needs only its driver.
build_probe() {
    local stage=$1 nvcc
    nvcc=$(find_nvcc) || nvcc=nvcc
    local flags=(-O3 -DPROBE_MAIN -gencode=arch=compute_90a,code=sm_90a)
    local cmds=("$nvcc ${flags[*]} $probe_source -o $stage/hopper-probe" "$nvcc ${flags[*]} -ptx $probe_source -o $stage/hopper-probe.ptx")
    local c
    for c in "${cmds[@]}"; do
        echo "+ $c"; echo "$c" >>"$commands"
        ((dry_run)) && continue
        $c || { echo "the probe's build failed: $c"; return 1; }
    done
}

# cargo release build of the test files, the benches and the CLI; stages the stripped executables into $1, with the
# probe program beside them.
cargo_build_and_stage() {
    local stage=$1 messages=$work/cargo-messages.json
    local cargo_flags=(--release -p small4)
    ((offline)) && { export SMALL4_OFFLINE=1; cargo_flags+=(--offline); }
    local test_flags=()
    for t in "${test_targets[@]}"; do test_flags+=(--test "$t"); done
    # One cargo run: the integration tests make cargo build the small4 CLI too (CARGO_BIN_EXE_small4), with the same
    # features, so no second build of the library is needed.
    local build_cmds=("cargo test ${cargo_flags[*]} --no-run ${test_flags[*]} --benches --message-format=json-render-diagnostics")
    if ((dry_run)); then
        for c in "${build_cmds[@]}"; do echo "+ $c"; echo "$c" >>"$commands"; done
        build_probe "$stage"
        return 0
    fi
    : >"$messages"
    for c in "${build_cmds[@]}"; do
        echo "+ $c"; echo "$c" >>"$commands"
        $c >>"$messages" || { echo "the build failed: $c"; return 1; }
    done
    rm -rf "$stage"; mkdir -p "$stage/tests" "$stage/benches"
    # One line per executable: kind, target name, path (the last artifact of a target wins).
    python3 - "$messages" >"$work/executables.tsv" <<'EOF' || return 1
import json, sys
found = {}
for line in open(sys.argv[1]):
    msg = json.loads(line)
    if msg.get("reason") == "compiler-artifact" and msg.get("executable"):
        kind = msg["target"]["kind"][0]
        if kind == "bin" and msg["profile"]["test"]:
            continue  # the binary's own unit-test harness, not the CLI
        found[(kind, msg["target"]["name"])] = msg["executable"]
for (kind, name), path in sorted(found.items()):
    print(f"{kind}\t{name}\t{path}")
EOF
    local kind name path dest
    while IFS=$'\t' read -r kind name path; do
        case $kind in test) dest=$stage/tests/$name ;; bench) dest=$stage/benches/$name ;; bin) dest=$stage/$name ;; *) continue ;; esac
        cp "$path" "$dest" || return 1
        strip "$dest" 2>/dev/null || true
    done <"$work/executables.tsv"
    build_probe "$stage" || return 1
    {
        echo "source_hash $(source_hash)"
        echo "commit $(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)"
        echo "uncommitted_files $(git status --porcelain 2>/dev/null | wc -l)"
        echo "built $(date -u '+%Y-%m-%d %H:%M UTC') on $(uname -n) ($(uname -m))"
        echo "rustc $(rustc --version 2>/dev/null || echo unknown)"
    } >"$stage/MANIFEST"
}

check_stage() {
    local stage=$1 missing=0
    [[ -x $stage/small4 ]] || { echo "missing: $stage/small4"; missing=1; }
    for step in ${steps//,/ }; do
        case $step in
            tests) for t in "${test_targets[@]}"; do [[ -x $stage/tests/$t ]] || { echo "missing: $stage/tests/$t"; missing=1; }; done ;;
            benches) for b in "${bench_targets[@]}"; do [[ -x $stage/benches/$b ]] || { echo "missing: $stage/benches/$b"; missing=1; }; done ;;
            probe)
                [[ -f $stage/hopper-probe.ptx ]] || { echo "missing: $stage/hopper-probe.ptx"; missing=1; }
                [[ $backend == sim || -x $stage/hopper-probe ]] || { echo "missing: $stage/hopper-probe"; missing=1; } ;;
        esac
    done
    ((missing == 0)) || { echo "the staged binaries in $stage lack what the steps need"; return 1; }
    if [[ -f $stage/MANIFEST ]]; then
        sed 's/^/  /' "$stage/MANIFEST"
        local built_from; built_from=$(awk '$1 == "source_hash" { print $2 }' "$stage/MANIFEST")
        local here; here=$(source_hash)
        if [[ -n $built_from && $built_from != "$here" ]]; then
            echo "the binaries were built from sources with hash $built_from, this tree's is $here"
            ((allow_stale)) || { echo "refusing stale binaries (rebuild with --build-only, or pass --allow-stale)"; return 1; }
            echo "running them anyway (--allow-stale)"
        fi
    fi
}

if ((build_only)); then
    command -v cargo >/dev/null || { echo "run.sh --build-only needs cargo" >&2; exit 1; }
    banner "build: cargo release build of ${#test_targets[@]} test files, ${#bench_targets[@]} benches and the small4 CLI"
    stage=$target_dir/gpu-bin
    cargo_build_and_stage "$stage"
    ((dry_run)) && exit 0
    check_stage "$stage"
    mkdir -p "$pack_dir"
    echo "packing $stage into $pack_dir/bin.tar.xz (xz with a 64 MiB window: the binaries share most of their bytes)"
    tar -C "$stage" -cf - . | xz -T1 --lzma2=preset=6,dict=64MiB >"$pack_dir/bin.tar.xz"
    cp "$stage/MANIFEST" "$pack_dir/MANIFEST"
    size=$(stat -c %s "$pack_dir/bin.tar.xz")
    echo "$pack_dir/bin.tar.xz: $((size / 1048576)) MiB ($(($(du -sb "$stage" | cut -f1) / 1048576)) MiB unpacked); $(elapsed) s"
    ((size < 60 * 1048576)) || { echo "the pack is over 60 MiB: the device tool carries 64 MiB in all" >&2; exit 1; }
    exit 0
fi

if [[ -z $out_dir ]]; then out_dir=${OUT:-$target_dir/gpu-run}; fi
mkdir -p "$out_dir"
out_dir=$(cd "$out_dir" && pwd)
# ---- Step 2: the gpu:: (or sim::) twin of every kernel test -----------------------------------------------------------

run_tests() {
    local log=$out_dir/tests.log deadline
    : >"$log"
    deadline=$(step_deadline "${step_cap[tests]}")
    if [[ -z $deadline ]]; then record_step tests "not run: budget spent" 0 ""; return 1; fi
    local t0 status=ok; t0=$(date +%s)
    for t in "${test_targets[@]}"; do
        local cmd=("$bin_dir/tests/$t" "${twin}::" --show-output)
        if ((dry_run)); then show "${cmd[@]}"; log_command "${cmd[@]}"; continue; fi
        local part=$work/test-$t.log
        : >"$part"
        echo "==> tests/$t ${twin}::" >>"$log"
        run_logged "$deadline" "$part" "${cmd[@]}"
        cat "$part" >>"$log"
        # libtest's summary line, and the skip lines: a gpu:: twin without a GPU prints "SKIPPED gpu::NAME ...: needs
        # a real GPU (...)" (backend_tests! in tests/common) and device::gpu_or_skip "SKIPPED WHAT: needs a real GPU".
        # Every line holding an upper-case SKIPPED counts (test names are snake case, so none is a name), wherever it
        # lands: in --show-output's captured output, or on stderr mid-line after libtest's "test NAME ... ".
        local summary passed failed ignored skipped
        summary=$(grep -E '^test result: ' "$part" | tail -1 || true)
        passed=$(sed -nE 's/.* ([0-9]+) passed.*/\1/p' <<<"$summary"); passed=${passed:-0}
        failed=$(sed -nE 's/.* ([0-9]+) failed.*/\1/p' <<<"$summary"); failed=${failed:-0}
        ignored=$(sed -nE 's/.* ([0-9]+) ignored.*/\1/p' <<<"$summary"); ignored=${ignored:-0}
        skipped=$(grep -c 'SKIPPED' "$part" || true)
        printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' tests "$t" "$run_rc" "$run_seconds" "$passed" "$failed" "$ignored" \
            "$skipped" "$part" "${cmd[*]}" >>"$records"
        local verdict=ok
        if ((run_rc == 124)); then verdict="CUT at the deadline"
        elif ((run_rc != 0 || failed > 0)); then verdict=FAILED
        elif ((skipped > 0)); then verdict="FAILED: $skipped ${twin}:: test(s) skipped"
        elif [[ -z $summary ]]; then verdict="FAILED: no libtest summary"
        elif ((passed == 0)); then verdict="FAILED: no ${twin}:: test ran"
        fi
        echo "tests/$t: $passed passed, $failed failed, $ignored ignored, $skipped skipped in ${run_seconds} s: $verdict"
        [[ $verdict == ok ]] || status=failed
    done
    ((dry_run)) && status="dry run"
    record_step tests "$status" $(($(date +%s) - t0)) "${#test_targets[@]} test files, ${twin}:: twins"
    [[ $status != failed ]]
}

# ---- Step 2b: the Hopper probe (issue 17 item 4) --------------------------------------------------------------------

# On a GPU the probe program writes its dumps; on the interpreter `small4 hopper-probe simulate` writes the same files
# from the probe's PTX (TensorArith::HopperTruncated), so the rehearsal runs the whole path. Either way `small4
# hopper-probe settle` reruns every probe on the interpreter with the dumps' inputs and prints one verdict per item
# (exit 0: all match the interpreter's models, 3: one differs, 1: one not compared). A difference on a GPU is a
# result, not a failed step (the verdict says which model the hardware follows); on the interpreter it is a failure.
# The dumps, the probe's console and the verdicts come back in hopper-probe.tar (fixtures for tests/hopper_nvcc.rs).
run_probe() {
    local log=$work/probe.log deadline dumps=$work/hopper-probe verdicts=$work/probe-verdicts.tsv
    : >"$log"
    deadline=$(step_deadline "${step_cap[probe]}")
    if [[ -z $deadline ]]; then record_step probe "not run: budget spent" 0 ""; return 1; fi
    local t0 status=ok; t0=$(date +%s)
    local ptx=$bin_dir/hopper-probe.ptx
    local make_dumps
    if [[ $backend == gpu ]]; then make_dumps=("$bin_dir/hopper-probe" "$dumps")
    else make_dumps=("$small4" hopper-probe simulate --ptx "$ptx" --out "$dumps"); fi
    local settle=("$small4" hopper-probe settle --ptx "$ptx" --dumps "$dumps" --tsv "$verdicts")
    if ((dry_run)); then
        show "${make_dumps[@]}"; log_command "${make_dumps[@]}"
        show "${settle[@]}"; log_command "${settle[@]}"
        record_step probe "dry run" 0 ""
        return 0
    fi
    mkdir -p "$dumps"
    # On a GPU the probe gets 30 s at most (a second's work), so that a hung probe (a phase that never completes)
    # still leaves settle its time.
    local probe_deadline=$deadline
    if [[ $backend == gpu ]] && (($(date +%s) + 30 < deadline)); then probe_deadline=$(($(date +%s) + 30)); fi
    run_logged "$probe_deadline" "$log" "${make_dumps[@]}"
    printf '%s\t%s\t%s\t%s\t\t\t\t\t%s\t%s\n' probe dumps "$run_rc" "$run_seconds" "$dumps" "${make_dumps[*]}" >>"$records"
    echo "probe dumps (${make_dumps[0]##*/}): exit $run_rc in ${run_seconds} s"
    # A probe that failed or hung part way still leaves the dumps it wrote: settle compares those (the others read
    # "NOT SETTLED: no dump").
    local probe_rc=$run_rc note
    run_logged "$deadline" "$log" "${settle[@]}"
    printf '%s\t%s\t%s\t%s\t\t\t\t\t%s\t%s\n' probe settle "$run_rc" "$run_seconds" "$verdicts" "${settle[*]}" >>"$records"
    local differ; differ=$(grep -c $'\tDIFFERS\t' "$verdicts" 2>/dev/null || true)
    case $run_rc in
        0) note="every dump matches the interpreter's model" ;;
        3) note="$differ dump(s) DIFFER from the interpreter's model: see the verdicts"
           [[ $backend == sim ]] && status=failed ;;
        124) status=failed note="settle cut at the deadline" ;;
        *) status=failed note="settle exited $run_rc (a dump missing or not comparable: see the verdicts)" ;;
    esac
    if ((probe_rc != 0)); then status=failed note="the probe exited $probe_rc; $note"; fi
    echo "probe settle: ${run_seconds} s: $note"
    tar -C "$work" -cf "$out_dir/hopper-probe.tar" hopper-probe probe.log $([[ -f $verdicts ]] && echo probe-verdicts.tsv) || status=failed
    record_step probe "$status" $(($(date +%s) - t0)) "$note"
    [[ $status != failed ]]
}

# ---- Step 3: the synthetic model (small4 bench --synthetic) ---------------------------------------------------------

# One `small4 bench --synthetic` run of the step: "format experts [flags]" as in synthetic_runs_gpu, then the common
# arguments. Sets synthetic_verdict: ok, "dry run", "not asked for" (format not in --formats), or why it failed.
synthetic_bench() {
    local deadline=$1 log=$2 run=$3 format experts flags
    shift 3
    read -r format experts flags <<<"$run"
    synthetic_verdict="not asked for"
    [[ ,$formats, == *,$format,* ]] || return 0
    [[ $experts == all ]] && experts=""
    local json=$work/synthetic-$format${flags:+${flags// /}}.json
    local cmd=("$small4" bench --backend "$backend" --synthetic --format "$format")
    [[ -n $experts ]] && cmd+=(--experts "$experts")
    # shellcheck disable=SC2206 # the flags are words
    [[ -n $flags ]] && cmd+=($flags)
    cmd+=("$@" --json "$json")
    if ((dry_run)); then show "${cmd[@]}"; log_command "${cmd[@]}"; synthetic_verdict="dry run"; return 0; fi
    echo "==> synthetic $format${experts:+, $experts experts}${flags:+ $flags}" >>"$log"
    run_logged "$deadline" "$log" "${cmd[@]}"
    synthetic_verdict=ok
    if ((run_rc == 124)); then synthetic_verdict="CUT at the deadline"
    elif ((run_rc != 0)); then synthetic_verdict="FAILED (exit $run_rc)"
    elif [[ ! -s $json ]]; then synthetic_verdict="FAILED: no JSON written"
    fi
    printf '%s\t%s\t%s\t%s\t\t\t\t\t%s\t%s\n' synthetic "$format" "$run_rc" "$run_seconds" "$json" "${cmd[*]}" >>"$records"
    echo "synthetic $format${flags:+ $flags}: ${run_seconds} s: $synthetic_verdict"
}

run_synthetic() {
    local log=$out_dir/synthetic.log deadline
    : >"$log"
    deadline=$(step_deadline "${step_cap[synthetic]}")
    if [[ -z $deadline ]]; then record_step synthetic "not run: budget spent" 0 ""; return 1; fi
    local t0 status=ok; t0=$(date +%s)
    local runs comparisons args
    if [[ $backend == gpu ]]; then runs=("${synthetic_runs_gpu[@]}") comparisons=("${synthetic_comparison_runs_gpu[@]}") args=("${synthetic_args_gpu[@]}")
    else runs=("${synthetic_runs_sim[@]}") comparisons=("${synthetic_comparison_runs_sim[@]}") args=("${synthetic_args_sim[@]}"); fi
    if ((dry_run == 0)) && ! "$small4" bench --help | grep -q -- '--synthetic'; then
        echo "small4 bench has no --synthetic flag in this build (issue 16 item 1 not merged): nothing to run" | tee -a "$log"
        record_step synthetic "failed: small4 bench has no --synthetic" $(($(date +%s) - t0)) ""
        return 1
    fi
    local run
    for run in "${runs[@]}"; do
        synthetic_bench "$deadline" "$log" "$run" "${args[@]}"
        [[ $synthetic_verdict == ok || $synthetic_verdict == "dry run" || $synthetic_verdict == "not asked for" ]] || status=failed
    done
    # The first full-size numerical check of the engine (issue 20): the same synthetic model's logits on this backend
    # and on the CPU reference (streaming: the weights are generated as they are read), compared position by position.
    # The interpreter rehearses it on the tiny preset's dimensions (one layer, four experts). The gate only catches gross
    # errors (0.5 absolute, 2 of 3 argmaxes); the figures `compare` prints are the result.
    local cmp_model=(--synthetic --format nvfp4)
    [[ $backend == sim ]] && cmp_model=(--synthetic --layers 1 --experts 4 --format nvfp4 --preset tiny)
    local engine_npy=$work/logits-$backend.npy reference_npy=$work/logits-reference.npy
    local cmds=(
        "$small4 logits ${cmp_model[*]} --prompt-ids 1,2,3 --backend $backend --out $engine_npy"
        "$small4 logits ${cmp_model[*]} --prompt-ids 1,2,3 --backend reference --out $reference_npy"
        "$small4 compare $engine_npy $reference_npy --max-abs 0.5 --min-argmax-agree 0.66"
    )
    local line
    for line in "${cmds[@]}"; do
        local cmd; read -r -a cmd <<<"$line"
        if ((dry_run)); then show "${cmd[@]}"; log_command "${cmd[@]}"; continue; fi
        echo "==> ${cmd[*]}" >>"$log"
        run_logged "$deadline" "$log" "${cmd[@]}"
        echo "logits check: ${cmd[1]}: exit $run_rc"
        if ((run_rc != 0)); then status=failed; break; fi
    done
    # The comparison runs: a crash fails the step, a run the deadline cut does not (it had only what was left).
    for run in "${comparisons[@]}"; do
        [[ $status == failed ]] && break
        if ((dry_run == 0 && $(date +%s) + 5 >= deadline)); then echo "synthetic $run: not run, the step's time is spent"; continue; fi
        synthetic_bench "$deadline" "$log" "$run" "${args[@]}"
        [[ $synthetic_verdict == FAILED* ]] && status=failed
    done
    ((dry_run)) && status="dry run"
    record_step synthetic "$status" $(($(date +%s) - t0)) "formats $formats"
    [[ $status != failed ]]
}

# ---- Step 4: criterion benches ---------------------------------------------------------------------------------------

run_benches() {
    local log=$out_dir/benches.log deadline
    : >"$log"
    deadline=$(step_deadline "${step_cap[benches]}")
    if [[ -z $deadline ]]; then record_step benches "not run: budget spent" 0 ""; return 1; fi
    local t0 status=ok; t0=$(date +%s)
    local args
    if [[ $backend == gpu ]]; then args=("${bench_args_gpu[@]}"); else args=("${bench_args_sim[@]}"); fi
    export CRITERION_HOME=$work/criterion
    for b in "${bench_targets[@]}"; do
        local cmd=("$bin_dir/benches/$b" "${args[@]}")
        if ((dry_run)); then show "${cmd[@]}"; log_command "${cmd[@]}"; continue; fi
        local part=$work/bench-$b.log
        : >"$part"
        echo "==> benches/$b" >>"$log"
        run_logged "$deadline" "$part" "${cmd[@]}"
        cat "$part" >>"$log"
        local skipped verdict=ok
        skipped=$(grep -c 'SKIPPED' "$part" || true)
        if ((run_rc == 124)); then verdict="CUT at the deadline"
        elif ((run_rc != 0)); then verdict="FAILED (exit $run_rc)"
        elif ((skipped > 0)) && [[ $backend == gpu ]]; then verdict="FAILED: skipped (no GPU)"
        elif ((skipped > 0)); then verdict="ok (GPU bench: skips on the interpreter by design)"
        fi
        printf '%s\t%s\t%s\t%s\t\t\t\t%s\t%s\t%s\n' benches "$b" "$run_rc" "$run_seconds" "$skipped" "$part" "${cmd[*]}" >>"$records"
        echo "benches/$b: ${run_seconds} s: $verdict"
        [[ $verdict == ok* ]] || status=failed
    done
    ((dry_run)) && status="dry run"
    record_step benches "$status" $(($(date +%s) - t0)) "${#bench_targets[@]} benches"
    [[ $status != failed ]]
}

run_log=$out_dir/run.log

main() {
    echo "tools/gpu/run.sh ${original_args[*]}"
    echo "started $(date -u '+%Y-%m-%d %H:%M:%S UTC') on $(uname -n), backend $backend, budget ${budget} s, output $out_dir"
    ((dry_run)) && echo "DRY RUN: every command is printed, none of the steps runs"

    # The device, for the heading.
    local device_name device_detail
    if [[ $backend == gpu ]] && command -v nvidia-smi >/dev/null && nvidia-smi >/dev/null 2>&1; then
        device_name=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
        device_detail="$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -1), $(nvidia-smi | grep -o 'CUDA Version: [0-9.]*' | head -1)"
    elif [[ $backend == gpu ]]; then
        device_name="no GPU found"
        device_detail="nvidia-smi found no GPU on $(uname -n): every gpu:: test will skip and the run fails"
    else
        device_name="PTX interpreter rehearsal"
        device_detail="the sim backend on $(uname -n) ($(nproc) CPU cores): times are the interpreter's, not a GPU's"
    fi
    echo "device: $device_detail"

    banner "step 1: binaries"
    local step_t0 binaries_note binaries_ok=1 overall=0
    step_t0=$(date +%s)
    if [[ -n $bin_dir ]]; then
        bin_dir=$(cd "$bin_dir" && pwd)
        binaries_note="staged in $bin_dir (--bin)"
    elif command -v cargo >/dev/null && ((use_pack == 0)); then
        bin_dir=$target_dir/gpu-bin
        binaries_note="cargo release build here, staged in $bin_dir"
        cargo_build_and_stage "$bin_dir" || binaries_ok=0
    elif [[ -f $pack_dir/bin.tar.xz ]]; then
        bin_dir=$work/bin
        binaries_note="the carried pack .gpu-bin/bin.tar.xz, unpacked"
        show tar -xJf "$pack_dir/bin.tar.xz" -C "$bin_dir"
        if ((dry_run == 0)); then
            mkdir -p "$bin_dir"
            if command -v xz >/dev/null; then
                tar -xJf "$pack_dir/bin.tar.xz" -C "$bin_dir" || binaries_ok=0
            else
                python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' "$pack_dir/bin.tar.xz" "$bin_dir" || binaries_ok=0
            fi
        fi
    else
        binaries_note="none: cargo is not installed here and there is no .gpu-bin/bin.tar.xz (run tools/gpu/run.sh --build-only on a machine with cargo and carry .gpu-bin: tools/gpu/README.md)"
        binaries_ok=0
    fi
    echo "binaries: $binaries_note"
    if ((dry_run)); then
        record_step binaries "dry run" 0 "$binaries_note"
        binaries_ok=1
    elif ((binaries_ok)) && check_stage "$bin_dir"; then
        record_step binaries ok $(($(date +%s) - step_t0)) "$binaries_note"
    else
        record_step binaries failed $(($(date +%s) - step_t0)) "$binaries_note"
        binaries_ok=0 overall=1
    fi
    if [[ -f $bin_dir/MANIFEST ]]; then cp "$bin_dir/MANIFEST" "$work/MANIFEST"; fi
    echo "step 1 took $(($(date +%s) - step_t0)) s"
    small4=$bin_dir/small4

    local step
    for step in tests probe synthetic benches; do
        [[ ,$steps, == *,$step,* ]] || continue
        banner "step: $step"
        if ((binaries_ok == 0)); then
            echo "not run: no binaries"
            record_step "$step" "not run: no binaries" 0 ""
            continue
        fi
        step_t0=$(date +%s)
        "run_$step" || overall=1
        echo "step $step took $(($(date +%s) - step_t0)) s"
    done

    local total; total=$(elapsed)
    banner "done: ${total} s"
    if ((total > budget)); then
        echo "OVER BUDGET: ${total} s against ${budget} s"
        overall=1
    fi

    # ---- Step 5: the section for docs/perf.md ----------------------------------------------------------------------
    python3 "$repo/tools/gpu/section.py" \
        --device-name "$device_name" --device-detail "$device_detail" --backend "$backend" --budget "$budget" \
        --total "$total" --dry-run "$dry_run" --records "$records" --steps "$step_records" --commands "$commands" \
        --manifest "$work/MANIFEST" --invocation "tools/gpu/run.sh ${original_args[*]}" --bin-dir "$bin_dir" --work "$work" \
        --out "$out_dir" || overall=1
    echo "section: $out_dir/perf-section.md; logs: $(cd "$out_dir" && ls | tr '\n' ' ')"
    if ((overall)); then echo "RESULT: FAILED (see the lines above)"; else echo "RESULT: ok"; fi
    return "$overall"
}

# The whole console goes to run.log too (the device tool shows only the output's tail).
set +e
main 2>&1 | tee "$run_log"
status=${PIPESTATUS[0]}
exit "$status"
