"""Time and peak memory of the frequency analysis filter K_sigma f (analysis/frequency.py) at large N.

    python benchmarks/bench_frequency.py --device cpu --n 20000                      # the chunked torch path
    python benchmarks/bench_frequency.py --device cuda --n 100000 --backends torch,triton
    python benchmarks/bench_frequency.py --sm90                                      # offline compile check, no GPU

Each (backend) runs in a fresh subprocess so that its peak memory is its own: on the CPU the peak resident set size
above the baseline after the inputs exist (ru_maxrss), on CUDA torch.cuda.max_memory_allocated above the inputs.
The dense N x N filter needs N^2 * 4 bytes per sigma in fp32 (1.6 GB at N = 20,000, 40 GB at 100,000); it is
printed for comparison, not run. --sm90 compiles the Triton kernel's shipped tile configs for sm_90 (GPUTarget, no
GPU needed) and reports registers and spills from ptxas.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _child(args) -> dict:
    import resource

    import torch

    sys.path.insert(0, ROOT)
    from muscle_kernels.analysis.frequency import low_frequency_part

    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(args.n, args.d, generator=g) / args.d**0.5).to(device)
    f = torch.softmax(torch.randn(args.n, args.c, generator=g), 1).to(device)
    sigmas = [float(s) for s in args.sigmas.split(",")]
    if device.type == "cuda":
        low_frequency_part(x[:256], f[:256], sigmas, backend=args.backend)  # compile / warm up outside the timing
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        out = low_frequency_part(x, f, sigmas, backend=args.backend, chunk=args.chunk)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        del out
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return dict(
        backend=args.backend,
        device=str(device),
        n=args.n,
        d=args.d,
        c=args.c,
        sigmas=len(sigmas),
        chunk=args.chunk,
        seconds=min(times),
        peak_mib=peak / 2**20,
        threads=torch.get_num_threads(),
    )


def _sm90():

    import triton
    from triton.backends.compiler import GPUTarget

    sys.path.insert(0, ROOT)
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from sm90_report import ptxas_usage

    from muscle_kernels.analysis.frequency_triton import _lowpass_kernel, tile_config

    fn = _lowpass_kernel
    print("| sigmas | dtype | BLOCK_M x N x D | warps | regs | spills (bytes) | smem KiB |")
    print("|--------|-------|-----------------|-------|------|----------------|----------|")
    for n_s, dt in [(1, "fp32"), (2, "fp32"), (5, "fp32"), (5, "bf16"), (8, "bf16"), (16, "fp32")]:
        s_pad, bm, bn, bd, warps = tile_config(n_s, 384, interpret=False)
        meta = dict(NUM_S=n_s, S_PAD=s_pad, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, BLOCK_C=16)
        sig, const, attrs = {}, {}, {}
        for i, a in enumerate(fn.arg_names):
            if a in meta:
                sig[a], const[a] = "constexpr", meta[a]
            elif a.endswith("_ptr"):
                sig[a] = f"*{dt}" if a in ("x_ptr", "f_ptr") else "*fp32"
                attrs[(i,)] = [["tt.divisibility", 16]]
            elif a in ("stride_xd", "stride_fc", "stride_oc"):  # contiguous rows: the runtime specialises 1
                sig[a], const[a] = "constexpr", 1
            else:
                sig[a] = "i32"
        target = GPUTarget("cuda", 90, 32)
        backend = triton.compiler.make_backend(target)
        opts = backend.parse_options({"num_warps": warps, "num_stages": 2})
        ck = triton.compile(triton.compiler.ASTSource(fn, sig, const, attrs), target=target, options=opts.__dict__)
        regs, spills = ptxas_usage(ck.asm["ptx"])
        print(
            f"| {n_s} | {dt} | {bm}x{bn}x{bd} | {warps} | {regs} | {spills} | {ck.metadata.shared / 1024:.1f} |",
            flush=True,
        )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--n", type=int, default=20000)
    p.add_argument("--d", type=int, default=384, help="input dimension (MiniLM's hidden size by default)")
    p.add_argument("--c", type=int, default=2, help="output columns (classes)")
    p.add_argument("--sigmas", default="0.02,0.05,0.1,0.2,0.5")
    p.add_argument("--chunk", type=int, default=1024, help="rows per chunk of the torch path")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--backends", default=None, help="comma-separated (default: torch on cpu, torch,triton on cuda)")
    p.add_argument("--backend", default=None, help=argparse.SUPPRESS)  # the child's
    p.add_argument("--sm90", action="store_true", help="compile the kernel for sm_90 offline and report spills")
    p.add_argument("--json", default=None, help="also append the result rows to this JSON-lines file")
    args = p.parse_args(argv)
    if args.sm90:
        _sm90()
        return 0
    if args.backend:
        print(json.dumps(_child(args)))
        return 0
    backends = (args.backends or ("torch" if args.device == "cpu" else "torch,triton")).split(",")
    n_s = len(args.sigmas.split(","))
    print(
        f"N = {args.n}, d = {args.d}, c = {args.c}, {n_s} sigmas on {args.device}; the dense filter would need "
        f"{args.n**2 * 4 / 1e9:.1f} GB per sigma in fp32 ({n_s * args.n**2 * 4 / 1e9:.1f} GB for all)"
    )
    print("| backend | device | N | d | sigmas | time s | peak MiB above inputs | threads |")
    print("|---------|--------|---|---|--------|--------|-----------------------|---------|")
    failed = 0
    for backend in backends:
        cmd = [sys.executable, os.path.abspath(__file__), "--backend", backend] + [
            a for a in (argv if argv is not None else sys.argv[1:])
        ]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            print(f"| {backend} | failed: {res.stderr.strip().splitlines()[-1] if res.stderr else res.returncode} |")
            failed += 1
            continue
        r = json.loads(res.stdout.strip().splitlines()[-1])
        print(
            f"| {r['backend']} | {r['device']} | {r['n']} | {r['d']} | {r['sigmas']} | {r['seconds']:.2f} | "
            f"{r['peak_mib']:.0f} | {r['threads']} |",
            flush=True,
        )
        if args.json:
            with open(args.json, "a") as fh:
                fh.write(json.dumps(r) + "\n")
    return failed


if __name__ == "__main__":
    sys.exit(main())
