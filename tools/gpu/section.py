#!/usr/bin/env python3
"""Writes the docs/perf.md section of one tools/gpu/run.sh run (perf-section.md) and the synthetic model's JSON
reports gathered into one file (synthetic.json), from the records run.sh kept: steps.tsv (step, status, seconds,
note), records.tsv (one line per command: step, name, exit status, seconds, libtest passed / failed / ignored, skip
lines, log, JSON or verdicts path, command), the Hopper probe's verdicts (dump, question, counts, outcome,
conclusion), the commands as run, and the binaries' MANIFEST. Python's standard library only.
Prints the section too, so it is in the device tool's output tail. Exits 1 when a record cannot be read."""

import argparse
import datetime
import json
import os
import re
import sys

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# The synthetic report's families of kernel time per decode step, in the order; others follow as found.
FAMILIES = ["attention_projections", "absorption", "mla", "routing", "routed_experts", "shared_expert",
            "norms_and_small_ops", "head", "sampling"]


def read_tsv(path, columns):
    rows = []
    if not os.path.exists(path):
        return rows
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            fields = line.rstrip("\n").split("\t")
            if len(fields) != columns:
                raise ValueError(f"{path}:{number}: {len(fields)} fields, expected {columns}")
            rows.append(fields)
    return rows


def read_text(path):
    if not path or not os.path.exists(path):
        return ""
    with open(path, encoding="utf-8", errors="replace") as f:
        return ANSI.sub("", f.read())


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def number(value, digits=1):
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:,.{digits}f}" if isinstance(value, float) else f"{value:,}"
    return "—" if value is None else str(value)


def format_name(report, fmt="?"):
    """The report's format, with "PDL off" when it ran without programmatic dependent launches (`--no-pdl`) and "L2
    prefetch off" without the decode step's L2 prefetches (`--no-l2-prefetch`: the cross-kernel plan and the dense
    decode GEMMs' own k range)."""
    return (
        report.get("format", fmt)
        + (", PDL off" if report.get("programmatic_launches") is False else "")
        + (", L2 prefetch off" if report.get("l2_prefetch") is False else "")
    )


def label(report):
    """nvfp4 (128 experts), bf16 (32 experts), nvfp4, PDL off (128 experts)."""
    return f"{format_name(report)} ({report.get('experts', '?')} experts)"


def criterion_results(text):
    """(id, median time, median throughput) of each benchmark in criterion's output. An id longer than 23
    characters stands on its own line just before its `time:` line."""
    results, previous = [], ""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"^(\S.*?)?\s*time:\s+\[(.+?)\]", line)
        if m:
            bench_id = (m.group(1) or previous).strip()
            parts = m.group(2).split()
            median = " ".join(parts[2:4]) if len(parts) == 6 else m.group(2)
            throughput = ""
            if i + 1 < len(lines):
                t = re.match(r"^\s+thrpt:\s+\[(.+?)\]", lines[i + 1])
                if t:
                    tparts = t.group(1).split()
                    throughput = " ".join(tparts[2:4]) if len(tparts) == 6 else t.group(1)
            results.append((bench_id, median, throughput))
        if line.strip():
            previous = line
    return results


def bench_own_lines(text):
    """The benches' own summary lines (GB/s, TFLOP/s, % of the ceilings), not criterion's progress or estimates."""
    keep = []
    for line in text.splitlines():
        if not line or line[0].isspace() or line.startswith(("Benchmarking", "Found ", "Testing ", "Success", "==>", "+ ")):
            continue
        if re.search(r"GB/s|GiB/s|TFLOP/s|tokens/s|% of", line) and "time:" not in line:
            keep.append(line)
    return keep


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    for name in ["device-name", "device-detail", "backend", "budget", "total", "dry-run", "records", "steps", "commands",
                 "manifest", "invocation", "out", "bin-dir", "work"]:
        ap.add_argument("--" + name, required=True)
    a = ap.parse_args()
    dry_run = a.dry_run == "1"

    steps = read_tsv(a.steps, 4)
    records = read_tsv(a.records, 10)
    manifest = dict(line.split(" ", 1) for line in read_text(a.manifest).splitlines() if " " in line)
    now = datetime.datetime.now(datetime.timezone.utc)

    md = [f"## GPU run {now:%Y-%m-%d %H:%M} UTC ({a.device_name})", ""]
    what = "dry run: the commands below were printed, not run" if dry_run else f"{a.total} s of a {a.budget} s budget"
    md.append(f"`{a.invocation}` on the {a.backend} backend ({what}). Device: {a.device_detail}.")
    if manifest:
        md.append(f"Binaries: commit {manifest.get('commit', '?')} ({manifest.get('uncommitted_files', '?')} files uncommitted), "
                  f"built {manifest.get('built', '?')}, {manifest.get('rustc', '?')}, source hash {manifest.get('source_hash', '?')}.")
    md.append("")
    md.append(table(["step", "status", "seconds", "note"], [(s, st, sec, note) for s, st, sec, note in steps]))
    md.append("")

    tests = [r for r in records if r[0] == "tests"]
    if tests or any(s[0] == "tests" for s in steps):
        twin = "gpu::" if a.backend == "gpu" else "sim::"
        md += [f"### Tests (the `{twin}` twins)", ""]
        if tests:
            rows, totals = [], [0, 0, 0, 0, 0]
            for _, name, rc, sec, passed, failed, ignored, skipped, _, _ in tests:
                counts = [int(passed or 0), int(failed or 0), int(ignored or 0), int(skipped or 0), int(sec or 0)]
                totals = [t + c for t, c in zip(totals, counts)]
                verdict = "cut at the deadline" if rc == "124" else ("ok" if rc == "0" and counts[3] == 0 and counts[0] > 0 else f"FAILED (exit {rc})")
                rows.append([name] + counts + [verdict])
            rows.append(["**total**"] + totals + [""])
            md.append(table(["test file", "passed", "failed", "ignored", "skipped", "seconds", "result"], rows))
        else:
            md.append("Not run (see the steps table).")
        md.append("")

    probe = [r for r in records if r[0] == "probe"]
    if probe or any(s[0] == "probe" for s in steps):
        md += ["### Hopper probe (HOPPER-ASYNC.md's UNVERIFIED items)", ""]
        settled = [r for r in probe if r[1] == "settle"]
        verdicts = read_tsv(settled[-1][8], 5) if settled else []
        if a.backend == "gpu":
            md.append("The probe program (tools/ptxsim/tests/fixtures/hopper.cu) ran on the GPU; `small4 hopper-probe settle` "
                      "reran each probe on the interpreter with the dump's inputs and compared the words bit for bit (the "
                      "random-data probes under both `TensorArith` models). The dumps are in hopper-probe.tar: copy them into "
                      "tools/ptxsim/tests/fixtures/, where tests/hopper_nvcc.rs checks the interpreter against every recorded one.")
        else:
            md.append("Rehearsal: `small4 hopper-probe simulate` ran the probe's kernels on the interpreter (the PTX nvcc made "
                      "of the probe, `TensorArith::HopperTruncated`) in place of the GPU, so every verdict must say the dump "
                      "matches the interpreter's model.")
        md.append("")
        if verdicts:
            md.append(table(["dump", "what it settles", "words equal bit for bit", "verdict"],
                            [(f"`{dump}`", question, counts, outcome) for dump, question, counts, outcome, _ in verdicts]))
            md += ["", "Verdicts:", ""]
            md += [f"- `{dump}`: {conclusion}" for dump, _, _, _, conclusion in verdicts]
        else:
            md.append("No verdicts (see the steps table and run.log).")
        md.append("")

    synthetic = [r for r in records if r[0] == "synthetic"]
    if synthetic or any(s[0] == "synthetic" for s in steps):
        md += ["### Synthetic model (`small4 bench --synthetic`, batch 1)", ""]
        reports = []
        for _, fmt, rc, sec, _, _, _, _, path, _ in synthetic:
            report = None
            if os.path.exists(path):
                try:
                    with open(path, encoding="utf-8") as f:
                        report = json.load(f)
                except json.JSONDecodeError as e:
                    print(f"section.py: {path}: not JSON ({e})", file=sys.stderr)
            reports.append((fmt, rc, sec, report))
        rows = []
        for fmt, rc, sec, r in reports:
            if r is None:
                status = "cut at the deadline" if rc == "124" else f"failed (exit {rc}), no report"
                rows.append([fmt, status] + ["—"] * 7 + [sec])
                continue
            rows.append([format_name(r, fmt), r.get("backend", "?"), number(r.get("layers")), number(r.get("experts")),
                         number(r.get("prefill_tokens_per_s")), number(r.get("decode_ms_per_step"), 3),
                         number(r.get("decode_tokens_per_s")), number(r.get("launches_per_decode_step")),
                         number(r.get("host_syncs_per_decode_step")), sec])
        if rows:
            md.append(table(["format", "backend", "layers", "experts", "prefill tokens/s", "decode ms/step", "decode tokens/s",
                             "launches/step", "host syncs/step", "seconds"], rows))
        else:
            md.append("Not run (see the steps table).")
        # Per family: launches of a decode step, and on a GPU their time (CUDA events around each launch of an
        # eager profiling step).
        profiled = [(label(r), r.get("launches_per_family") or {}, r.get("kernel_us_per_decode_step"))
                    for _, _, _, r in reports if r and (r.get("launches_per_family") or r.get("kernel_us_per_decode_step"))]
        if profiled:
            seen = {f for _, launches, us in profiled for f in list(launches) + list(us or {})}
            families = [f for f in FAMILIES if f in seen] + sorted(seen - set(FAMILIES))
            timed = any(isinstance(us, dict) for _, _, us in profiled)
            cell = lambda launches, us, f: (f"{number((us or {}).get(f))} µs, " if timed else "") + f"{number(launches.get(f, 0))} launches"
            md += ["", "Per decode step by kernel family" + (" (time from the eager profiling step's CUDA events):" if timed else ":"), ""]
            rows = [[f.replace("_", " ")] + [cell(launches, us, f) for _, launches, us in profiled] for f in families]
            if timed:
                rows.append(["**total**"] + [f"{number(sum((us or {}).values()))} µs" for _, _, us in profiled])
            md.append(table(["family"] + [name for name, _, _ in profiled], rows))
        gathered = [r for _, _, _, r in reports if r is not None]
        if gathered:
            with open(os.path.join(a.out, "synthetic.json"), "w", encoding="utf-8") as f:
                json.dump(gathered, f, indent=1)
        md.append("")

    benches = [r for r in records if r[0] == "benches"]
    if benches or any(s[0] == "benches" for s in steps):
        md += ["### Criterion benches", ""]
        rows, own, ran_once = [], [], 0
        for _, name, rc, sec, _, _, _, skipped, path, _ in benches:
            text = read_text(path)
            results = criterion_results(text)
            ran_once += text.count("\nSuccess")
            rows += [[name, i, t, thr] for i, t, thr in results]
            own += bench_own_lines(text)
            if rc != "0" or skipped not in ("", "0"):
                reason = "cut at the deadline" if rc == "124" else (f"exit {rc}" if rc != "0" else "skipped: needs a real GPU")
                rows.append([name, f"({reason})", "", ""])
        if a.backend == "sim" and benches:
            md.append(f"Criterion's test mode on the interpreter: {ran_once} benchmarks ran once (no figures); the GPU "
                      "benches print their skip line by design.")
            md.append("")
        if rows:
            md.append(table(["bench", "id", "time (median)", "throughput (median)"], rows))
        elif not benches:
            md.append("Not run (see the steps table).")
        if own:
            md += ["", "The benches' own figures:", "", "```"] + own + ["```"]
        md.append("")

    commands = read_text(a.commands).strip()
    if commands:
        # Written from the repository root: B is the binaries' folder, W the run's scratch folder.
        if a.bin_dir:
            commands = commands.replace(a.bin_dir + "/", "B/")
        commands = commands.replace(a.work + "/", "W/")
        md += ["### Commands", "", f"In the repository root; B = {a.bin_dir or 'the staged binaries'}, W = a scratch folder.",
               "", "```", commands, "```", ""]

    text = "\n".join(md)
    path = os.path.join(a.out, "perf-section.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    try:
        main()
    except (OSError, ValueError) as e:
        print(f"section.py: {e}", file=sys.stderr)
        sys.exit(1)
