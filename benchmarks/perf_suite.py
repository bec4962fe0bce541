"""The performance suite: every benchmark in one command, each printing its own table of ratios
against a reference measured in the same run.

  P1 loader latency and RSS growth vs safetensors.torch.load_file   (bench_loader.py)
  P2 fault+unpin hit path, miss path, 100 GB reservation             (bench_vram.py)
  P3 all-resident step overhead vs plain torch modules               (bench_loader.py)
  P4 step time at 25/50/75 % resident vs max(compute, transfer)      (bench_overlap.py)
  P5 GGUF dequant throughput vs gguf's numpy reference and memcpy    (bench_gguf_dequant.py)
  P6 NF4 dequant throughput vs bitsandbytes' CPU kernel and memcpy   (bench_nf4.py)
  P5/P6 floor: the eager-torch ops under those goals, vs the same refs (bench_eager_floor.py)

    python benchmarks/perf_suite.py           # full sizes (P1 writes a >= 2 GB file; minutes)
    python benchmarks/perf_suite.py --quick   # tiny sizes: checks that everything runs
"""
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SUITE = [
    ("P1+P3", "bench_loader.py"),
    ("P2", "bench_vram.py"),
    ("P4", "bench_overlap.py"),
    ("P5", "bench_gguf_dequant.py"),
    ("P6", "bench_nf4.py"),
    ("P5/P6 floor", "bench_eager_floor.py"),
]


def main():
    quick = "--quick" in sys.argv[1:]
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}"
          f"{', quick sizes' if quick else ''}")
    failed = []
    for label, script in SUITE:
        print(f"\n=== {label}: {script}", flush=True)
        t = time.time()
        rc = subprocess.call([sys.executable, os.path.join(HERE, script)] + (["--quick"] if quick else []))
        print(f"--- {label} took {time.time() - t:.1f} s (exit {rc})", flush=True)
        if rc:
            failed.append(script)
    if failed:
        print("failed:", ", ".join(failed))
        sys.exit(1)


if __name__ == "__main__":
    main()
