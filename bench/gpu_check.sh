#!/usr/bin/env bash
# The GPU checks in one go, on one CUDA GPU, in about 8 minutes; one JSON of results.
#
#     bench/gpu_check.sh [OUT_JSON]          (default: gpu_check.json)
#
# Run from anywhere in a checkout, with a Python whose torch sees CUDA and which has
# functrain's dependencies (pip install -e ".[test]" on the GPU machine; PYTHON=... picks
# the interpreter; SIZE=small smoke-tests the script itself, even on a CPU). Nothing is downloaded: the checkout is put on PYTHONPATH. Steps, each
# with its own time limit, each recorded even when an earlier one failed:
#   1. tests/test_cuda.py: bf16 + compile and fp16 (loss scaler) resumed bitwise on CUDA,
#      the determinism settings recorded, a CUDA snapshot read without a GPU, and
#      torch.cuda.set_sync_debug_mode("error") over plain steps (no host sync; eager and
#      compiled);
#   2. bench/step.py at GPT-2 small size, bf16 + compile: tokens/s against the hand-written
#      loop, their ratio and MFU (--peak-tflops, default H100/H200 bf16 dense);
#   3. bench/step.py at GPT-2 small size, bf16 eager: peak CUDA memory of the functrain
#      step against the hand-written loop.
set -u
cd "$(dirname "$0")/.."
out=${1:-gpu_check.json}
py=${PYTHON:-python}
size=${SIZE:-gpt2}
work=$(mktemp -d)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONWARNINGS=ignore

timeout 330 "$py" -m pytest -q -p no:cacheprovider tests/test_cuda.py \
    --junitxml="$work/cuda.xml" >"$work/cuda.log" 2>&1
echo $? >"$work/cuda.rc"
timeout 150 "$py" bench/step.py --size "$size" --precision bf16 --compile --steps 20 \
    --rounds 3 --no-memory --json "$work/speed.json" >"$work/speed.log" 2>&1
echo $? >"$work/speed.rc"
timeout 90 "$py" bench/step.py --size "$size" --precision bf16 --steps 5 --rounds 1 \
    --json "$work/memory.json" >"$work/memory.log" 2>&1
echo $? >"$work/memory.rc"

"$py" - "$work" "$out" <<'EOF'
import json, pathlib, platform, sys, xml.etree.ElementTree as ET

work, out = pathlib.Path(sys.argv[1]), sys.argv[2]
found = {"python": platform.python_version()}
try:
    import torch

    found["torch"] = torch.__version__
    found["cuda_version"] = torch.version.cuda
    found["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
except Exception as err:  # noqa: BLE001 -- reported, not raised
    found["torch"] = f"not importable: {err}"
for step in ("cuda", "speed", "memory"):
    rc = (work / f"{step}.rc").read_text().strip()
    part = {"exit": int(rc), "timed_out": rc == "124"}
    log = (work / f"{step}.log").read_text(errors="replace")
    part["log_tail"] = log[-3000:]
    if step == "cuda" and (work / "cuda.xml").exists():
        tests = {}
        for case in ET.parse(work / "cuda.xml").getroot().iter("testcase"):
            kinds = [c.tag for c in case if c.tag in ("failure", "error", "skipped")]
            tests[case.get("name")] = kinds[0] if kinds else "passed"
        part["tests"] = tests
    if (work / f"{step}.json").exists():
        part["figures"] = json.loads((work / f"{step}.json").read_text())
    found[step] = part
found["ok"] = all(found[s]["exit"] == 0 for s in ("cuda", "speed", "memory")) and all(
    v == "passed" for v in found["cuda"].get("tests", {"none": "missing"}).values()
)
pathlib.Path(out).write_text(json.dumps(found, indent=1))
print(f"gpu_check: {'ok' if found['ok'] else 'FAILED'}: {out}")
EOF
