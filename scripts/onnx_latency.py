"""ONNX files timed by onnxruntime alone (numpy and onnxruntime, nothing of prune-sweep): the first file is the
base, every other is timed in alternation with it, one forward each per round, after a warm-up. Prints one
JSON object: per file its median, 25th and 75th percentile (ms) and its median over the base's.

    python scripts/onnx_latency.py base.onnx plans/latency0.6-knapsack/pruned.onnx --batch 32 --threads 1

`--clock cpu` times the process's CPU time instead of elapsed time (a shared machine's other processes do not
inflate it; equal to latency on an idle core with --threads 1).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import onnxruntime


def session(path: str, threads: int | None, clock: str) -> onnxruntime.InferenceSession:
    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if clock == "cpu":
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+", help="the base model's ONNX file first, then the files to compare")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--runs", type=int, default=40, help="timed forwards of each file per pair, at least")
    p.add_argument("--min-seconds", type=float, default=2.0, help="and at least this long per pair")
    args = p.parse_args()
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    images = np.random.default_rng(0).random((args.batch, 3, args.image_size, args.image_size), dtype=np.float32)
    sessions = [session(f, args.threads, args.clock) for f in args.files]

    def forward(s: onnxruntime.InferenceSession) -> float:
        t0 = clock()
        s.run(None, {"images": images})
        return 1000 * (clock() - t0)

    out = {"onnxruntime": onnxruntime.__version__, "batch": args.batch, "threads": args.threads,
           "clock": args.clock, "files": {}}
    base = sessions[0]
    for path, other in zip(args.files[1:], sessions[1:]):
        for s in (base, other):
            for _ in range(args.warmup):
                forward(s)
        times: list[list[float]] = [[], []]
        start = clock()
        while len(times[0]) < args.runs or clock() - start < args.min_seconds:
            for t, s in zip(times, (base, other)):
                t.append(forward(s))
        b, o = (np.asarray(t) for t in times)
        out["files"][path] = {"ms": float(np.median(o)), "low": float(np.percentile(o, 25)),
                              "high": float(np.percentile(o, 75)), "base_ms": float(np.median(b)),
                              "base_low": float(np.percentile(b, 25)), "base_high": float(np.percentile(b, 75)),
                              "kept": float(np.median(o) / np.median(b)), "runs": len(o)}
    json.dump(out, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
