"""bf16 vs float32 matmul speed on this CPU: the measurement behind ``auto`` dtypes (qlora/train/precision.py).

    .venv/bin/python bench/matmul_dtypes.py            # writes bench/results/matmul-dtypes-cpu.{json,md}

For each dtype, a (512 x 576) @ (576 x 1536) matmul (SmolLM2-135M's MLP up-projection on 512 tokens),
best of 5 timings of 20 calls, with oneDNN on (what torch uses where the CPU has avx512_bf16 or AMX)
and off (torch's element-wise bf16 fallback, what a CPU without them gets). Each setting runs in its
own process: oneDNN's switch is read when a kernel is first chosen.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
from pathlib import Path

from _machine import device_name, package_versions  # bench/ siblings: the script's folder is on the path

ROOT = Path(__file__).resolve().parent
SHAPE = (512, 576, 1536)


def _measure(onednn: bool) -> dict:
    import time

    import torch

    from qlora.train.precision import native_bf16

    m, k, n = SHAPE
    with torch.backends.mkldnn.flags(enabled=onednn):
        out = {"onednn": onednn, "native_bf16": native_bf16("cpu"), "threads": torch.get_num_threads()}
        for dtype in (torch.float32, torch.bfloat16):
            a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
            a @ b
            best = float("inf")
            for _ in range(5):
                t = time.perf_counter()
                for _ in range(20):
                    a @ b
                best = min(best, (time.perf_counter() - t) / 20)
            out[str(dtype).removeprefix("torch.")] = round(2 * m * k * n / best / 1e9, 1)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results-dir", type=Path, default=ROOT / "results")
    ap.add_argument("--child", choices=["on", "off"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(_measure(args.child == "on")))
        return 0
    rows = []
    for flag in ("on", "off"):
        done = subprocess.run([sys.executable, __file__, "--child", flag], capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    res = {"command": "python bench/matmul_dtypes.py", "date": datetime.date.today().isoformat(),
           "device_name": device_name("cpu"), "versions": package_versions("torch"), "shape": SHAPE, "rows": rows}
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / "matmul-dtypes-cpu.json").write_text(json.dumps(res, indent=1) + "\n")
    lines = [f"# bf16 vs float32 matmul on the CPU ({res['device_name']})", "",
             f"{res['date']}, `{res['command']}`, torch {res['versions'].get('torch')}, "
             f"({SHAPE[0]} x {SHAPE[1]}) @ ({SHAPE[1]} x {SHAPE[2]}), best of 5 x 20 calls.", "",
             "| oneDNN | native bf16 (qlora's check) | threads | float32 GFLOP/s | bfloat16 GFLOP/s | bf16 / fp32 |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {'on' if r['onednn'] else 'off'} | {r['native_bf16']} | {r['threads']} | {r['float32']} | "
                     f"{r['bfloat16']} | {r['bfloat16'] / r['float32']:.2f}x |")
    (args.results_dir / "matmul-dtypes-cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
