#!/usr/bin/env bash
# The README's GPU section in one command, on one NVIDIA GPU (sized for about 8 minutes on an H100/H200; the
# report records how long each step took):
#
#   bash experiments/gpu_report.sh            # writes docs/gpu_report.md and docs/gpu_report/*.{json,md,txt}
#
# 1. selfcheck against the float64 oracle at lengths no tile divides: the fused "pallas" kernel (bfloat16: every
#    metric and the user-registered Huber distance; float32: l1, lp, dot, huber) and the blockwise kernel.
# 2. speed: forward and forward+backward, bfloat16, N = 4096, head_dim 64 and 128, every metric with "pallas",
#    beside jax.nn.dot_product_attention(implementation="cudnn"); the blockwise kernel for l1, chebyshev and dot.
# 3. memory against N: compiled temporaries of pallas (dot, l1) and cuDNN at N = 1024, 4096, 16384.
# 4. docs/gpu_report.md: the tables, and the ratios the README's targets are stated in.
#
# Environment: PYTHON (default python), OUT (default docs/gpu_report), PEAK_FP32_TFLOPS (the GPU's non-tensor
# float32 peak, counting an FMA as 2; default 67, the H100/H200 SXM figure). N, MEMORY_LENGTHS, BATCH, HEADS,
# DIMS, SELFCHECK_SHAPE, FUSED and BASELINE change the sizes and kernels; with DRY_RUN=1 the plumbing runs on a
# CPU at toy sizes with the blockwise kernel standing in for the fused one (the numbers then mean nothing):
#
#   DRY_RUN=1 OUT=/tmp/gpu_report bash experiments/gpu_report.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${OUT:-docs/gpu_report}
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
if [[ "${DRY_RUN:-0}" == 1 ]]; then
  : "${N:=64}" "${MEMORY_LENGTHS:=32,64}" "${BATCH:=1}" "${HEADS:=2}" "${DIMS:=8 16}" "${FUSED:=blockwise}"
  : "${BASELINE:=xla}" "${SELFCHECK_SHAPE:=--q_len=40 --kv_len=30 --block=16 --head_dim=8}"
else
  "$PY" -c 'import jax, sys; sys.exit(0 if jax.default_backend() == "gpu" else "gpu_report.sh needs a GPU; "
            "jax sees " + jax.default_backend())'
fi
N=${N:-4096}
MEMORY_LENGTHS=${MEMORY_LENGTHS:-1024,4096,16384}
BATCH=${BATCH:-2}
HEADS=${HEADS:-16}
DIMS=${DIMS:-64 128}
FUSED=${FUSED:-pallas}
BASELINE=${BASELINE:-cudnn}
# 32-wide tiles: several in each direction at these lengths, and small enough for the elementwise forms'
# [block_q, block_k, 8] difference tile to stay in registers.
SELFCHECK_SHAPE=${SELFCHECK_SHAPE:---q_len=300 --kv_len=200 --block=32 --head_dim=64}
FIRST_DIM=${DIMS%% *}
mkdir -p "$OUT"

stamp() { date +%s; }
T0=$(stamp)
# A failing selfcheck is reported (exit status 1 at the end) but does not stop the timings.
set +e
(
  rc=0
  # shellcheck disable=SC2086  # SELFCHECK_SHAPE is a list of flags
  "$PY" experiments/selfcheck.py --implementations="$FUSED" --dtypes=bfloat16 $SELFCHECK_SHAPE || rc=1
  "$PY" experiments/selfcheck.py --implementations="$FUSED" --dtypes=float32 --metrics=l1,lp,dot,huber \
    $SELFCHECK_SHAPE || rc=1
  "$PY" experiments/selfcheck.py --implementations=blockwise --dtypes=bfloat16 --metrics=l1,dot $SELFCHECK_SHAPE \
    --cases=gqa+bias,causal+bias,segments,lengths+mask || rc=1
  exit $rc
) 2>&1 | tee "$OUT/selfcheck.txt"
status=${PIPESTATUS[0]}
set -e
T1=$(stamp)

COMMON=(--dtype=bfloat16 --batch="$BATCH" --heads="$HEADS" --baseline_implementation="$BASELINE" --repeats=5
        --max_seconds_per_cell=10)
for dim in $DIMS; do
  "$PY" experiments/benchmark.py "${COMMON[@]}" --lengths="$N" --head_dim="$dim" --implementations="$FUSED" \
    --out="$OUT/speed_d$dim.json"
done
"$PY" experiments/benchmark.py "${COMMON[@]}" --lengths="$N" --head_dim="$FIRST_DIM" --implementations=blockwise \
  --metrics=l1,chebyshev,dot --out="$OUT/blockwise.json"
T2=$(stamp)
"$PY" experiments/benchmark.py "${COMMON[@]}" --lengths="$MEMORY_LENGTHS" --head_dim="$FIRST_DIM" \
  --implementations="$FUSED" --metrics=dot,l1 --repeats=1 --out="$OUT/memory.json"
T3=$(stamp)

"$PY" - "$OUT" "$((T1 - T0))" "$((T2 - T1))" "$((T3 - T2))" "${PEAK_FP32_TFLOPS:-67}" "$FUSED" $DIMS <<'EOF'
import json, pathlib, sys

out, fused = pathlib.Path(sys.argv[1]), sys.argv[6]
t_check, t_speed, t_memory = map(int, sys.argv[2:5])
peak = float(sys.argv[5])
dims = [int(d) for d in sys.argv[7:]]
load = lambda name: json.loads((out / name).read_text())
speed = {dim: load(f"speed_d{dim}.json") for dim in dims}
blockwise = load("blockwise.json")
first = speed[dims[0]]
machine, s = first["machine"], first["settings"]
n = first["rows"][0]["n"]

def cell(report, metric, phase):
  for row in report["rows"]:
    if row["metric"] == metric:
      return row[phase]
  return None

def ms(c):
  return "-" if c is None or c["seconds"] is None else f"{c['seconds'] * 1e3:.2f}"

def ratio(c):
  return "-" if c is None or c.get("time_ratio") is None else f"{c['time_ratio']:.2f}x"

lines = [f"# GPU report: {machine['device']}, jax {machine['jax']}", "",
         f"Written by `bash experiments/gpu_report.sh` (selfcheck {t_check} s, speed {t_speed} s, memory "
         f"{t_memory} s). {s['dtype']}, batch {s['batch']}, {s['heads']} heads, N = {n} queries and keys, not "
         f"causal, lp p={s['p']:g}; median of up to {s['repeats']} calls after a warm-up; ratios are to "
         f"`jax.nn.dot_product_attention(implementation={s['baseline_implementation']!r})` at the same shape "
         "(lower is better).", "",
         f"| metric | head_dim | {fused} fwd ms | {fused} fwd+bwd ms | fwd ratio | fwd+bwd ratio |",
         "|---|---|---|---|---|---|"]
for dim, report in speed.items():
  for metric in [r["metric"] for r in report["rows"] if r["implementation"] != "-"]:
    f, fb = cell(report, metric, "forward"), cell(report, metric, "forward_backward")
    lines.append(f"| {metric} | {dim} | {ms(f)} | {ms(fb)} | {ratio(f)} | {ratio(fb)} |")

lines += ["", f"Elementwise metrics beside the blockwise kernel (head_dim {dims[0]}). The score rate counts 3 operations "
          "(subtract, absolute value, add or max) per query-key pair and feature over the whole forward time, so "
          f"it is a lower bound; the peak is {peak:g} TFLOP/s float32 with an FMA counted as 2, i.e. "
          f"{peak / 2:g} T non-FMA operations/s.", "",
          f"| metric | {fused} fwd+bwd ms | blockwise fwd+bwd ms | speed-up | score rate (T op/s) | of peak |",
          "|---|---|---|---|---|---|"]
for metric in ("l1", "chebyshev", "dot"):
  p_f, p_fb = cell(first, metric, "forward"), cell(first, metric, "forward_backward")
  b_fb = cell(blockwise, metric, "forward_backward")
  up = (f"{b_fb['seconds'] / p_fb['seconds']:.1f}x" if b_fb and p_fb and b_fb["seconds"] and p_fb["seconds"]
        else "-")
  rate = frac = "-"
  if metric != "dot" and p_f and p_f["seconds"]:
    ops = 3 * s["batch"] * s["heads"] * n * n * s["head_dim"]
    rate = f"{ops / p_f['seconds'] / 1e12:.1f}"
    frac = f"{ops / p_f['seconds'] / (peak / 2 * 1e12):.0%}"
  lines.append(f"| {metric} | {ms(p_fb)} | {ms(b_fb)} | {up} | {rate} | {frac} |")

lines += ["", f"Memory against N (compiled temporaries; head_dim {dims[0]}):", "",
          (out / "memory.md").read_text(), "", f"Selfcheck (float64 oracle; `{out}/selfcheck.txt`):", ""]
summary = [l for l in (out / "selfcheck.txt").read_text().splitlines() if "cases passed" in l or "FAILED" in l]
lines += [f"    {l}" for l in summary]
for dim in dims:
  lines += ["", f"Full benchmark table, head_dim {dim}:", "", (out / f"speed_d{dim}.md").read_text()]
(out.parent / "gpu_report.md").write_text("\n".join(lines) + "\n")
print(f"wrote {out.parent / 'gpu_report.md'}")
EOF
exit $status
