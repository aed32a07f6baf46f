"""The block-sparse Triton kernels compiled ahead of time for GPUs, on any machine: the shared-memory table
kernels/shared_memory.py plans launches with.

Triton ships its own `ptxas`, so `triton.compile` turns our kernels into cubins for a GPU target with no GPU
and no CUDA toolkit (unset TRITON_INTERPRET in that process). `compiled.metadata.shared` is the shared memory
one program needs; a launch asking for more than the GPU has fails ("out of resource: shared memory"). The
tiles grow with block size x head dim and with the software-pipelining depth (`num_stages`), so the large
shapes `kernels/limits.py` allows do not fit every GPU:

- `python -m gorilla_dist.kernels.triton_aot` compiles every kernel x block size x head dim x dtype for
  sm_80 (A100) and sm_90 (H100) at `num_stages` 2 and 1 (960 variants; 934 compiled, the 26 larger than a
  shape that already exceeds its target are not: 44 min on 2 cores, the largest take minutes each) and
  writes `triton_shared_memory.json` beside this file (the table the package ships); `--sample N`
  recompiles N of them and compares with the table (the unit test does), `--show` prints the table with
  each GPU's limit and the plan.
- `shared_memory.launch_plan(block, head_dim, dtype, arch, limit)` reads the table: per kernel the deepest
  pipelining that fits, or, when a kernel does not fit at `num_stages=1`, None and the reason;
  `block_sparse_attention` then runs the block-gather path (any shape, more memory traffic) and says so once.

Compiled as launched: every flag on (ALiBi, tile bias, segment ids: the most live tiles), pointers and strides
16-byte aligned (what Triton specialises them to at run time for our contiguous tensors), `num_warps` 4 up to
head dim 64 and 8 above.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import random
import sys
import time
from concurrent.futures import ProcessPoolExecutor

from gorilla_dist.kernels.limits import BLOCK_SIZES, TRITON_HEAD_DIMS
from gorilla_dist.kernels.shared_memory import (ARCHS, DTYPES, KERNELS, SHARED_MEMORY, STAGES, TABLE, key,
                                                launch_plan, load_table, num_warps, parse_key)

_ALIGNED = 16


def _compile_key(k: str) -> int:
    return compile_variant(*parse_key(k))


def chains() -> list[tuple]:
    """(kernel, dtype, target, num_stages): each compiled over the shapes in order (_chain)."""
    return [(k, t, a, s) for a in ARCHS for t in DTYPES for k in KERNELS for s in STAGES]


def compile_variant(kernel: str, block: int, head_dim: int, dtype: str, arch: int, stages: int) -> int:
    """Compile one kernel for one GPU target here (no GPU needed) and return its shared memory in bytes."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from gorilla_dist.kernels import block_sparse

    fn = getattr(block_sparse, f"_{kernel}_kernel")
    if not isinstance(fn, triton.runtime.JITFunction):
        raise RuntimeError("the kernels were defined under TRITON_INTERPRET=1; compile in a process without it")
    element = "fp32" if dtype.startswith("fp32") else dtype
    constants = {"BLOCK": block, "HEAD_DIM": head_dim, "HAS_ALIBI": True, "HAS_BIAS": True, "HAS_SEG": True,
                 "UPCAST": False, "PRECISION": "tf32" if dtype == "fp32-tf32" else "ieee"}
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(inspect.signature(fn.fn).parameters):
        if name in constants:
            signature[name], constexprs[(i,)] = "constexpr", constants[name]
        elif name == "scale":
            signature[name] = "fp32"
        elif name.isupper() and name not in ("H", "GROUP"):  # a tensor
            signature[name] = ("*" + element if name in ("Q", "K", "V", "O", "DO", "DQ")
                               else "*i32" if name in ("NUM", "IDX", "QNUM", "QIDX", "QSLOT", "SEG") else "*fp32")
            attrs[(i,)] = [["tt.divisibility", _ALIGNED]]
        else:  # strides (s...) are multiples of 16 for head dims >= 16; counts are not
            signature[name] = "i32"
            if name.startswith("s"):
                attrs[(i,)] = [["tt.divisibility", _ALIGNED]]
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                              target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps(head_dim), "num_stages": stages})
    return int(compiled.metadata.shared)


def _chain(chain: tuple) -> dict[str, int | None]:
    """One kernel x dtype x target x depth over every shape, smallest tiles first. Shared memory grows with the
    block size and the head dim, so once a shape exceeds the target's limit every shape at least as large in
    both does too: those are not compiled (they are the slow ones: minutes each) and recorded as None."""
    kernel, dtype, arch, stages = chain
    limit, over, out = SHARED_MEMORY[arch], [], {}
    for block, head_dim in sorted(((b, d) for b in BLOCK_SIZES for d in TRITON_HEAD_DIMS), key=lambda s: s[0] * s[1]):
        k = key(kernel, block, head_dim, dtype, arch, stages)
        if any(block >= b and head_dim >= d for b, d in over):
            out[k] = None
            continue
        out[k] = compile_variant(kernel, block, head_dim, dtype, arch, stages)
        if out[k] > limit:
            over.append((block, head_dim))
    return out


def _in_workers(fn, items: list, jobs: int) -> list:
    """[fn(item) for item in items] in `jobs` processes, which define the kernels without TRITON_INTERPRET."""
    os.environ.pop("TRITON_INTERPRET", None)
    with ProcessPoolExecutor(jobs) as pool:
        return list(pool.map(fn, items))


def compile_all(chains: list[tuple], jobs: int) -> dict[str, int | None]:
    return {k: v for part in _in_workers(_chain, chains, jobs) for k, v in part.items()}


def _kb(n: int | None) -> str:
    return f"{n / 1024:.0f}" if n is not None else "over"


def show(table: dict) -> str:
    """One line per shape and GPU: each kernel's shared memory at num_stages 2 (1), the limit, the plan."""
    shared = table["shared_bytes"]
    lines = [f"Triton {table['triton']}: shared memory in KB at num_stages=2 (=1); plan: stages per kernel "
             "(fwd/dq/dkv) or gather"]
    for arch, gpu in ARCHS.items():
        limit = SHARED_MEMORY[arch]
        lines.append(f"sm_{arch} ({gpu}, limit {limit / 1024:.0f} KB)")
        for dtype in DTYPES:
            for block in BLOCK_SIZES:
                for d in TRITON_HEAD_DIMS:
                    kb = [f"{_kb(shared[key(k, block, d, dtype, arch, 2)]):>5} ({_kb(shared[key(k, block, d, dtype, arch, 1)]):>3})"
                          for k in KERNELS]
                    plan = launch_plan(block, d, dtype, arch, limit)
                    chosen = ("/".join(str(plan.options[k]["num_stages"]) for k in KERNELS) if plan.options
                              else "gather")
                    lines.append(f"  {dtype:9s} block {block:3d} head dim {d:3d}: {'  '.join(kb)}  -> {chosen}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gorilla_dist.kernels.triton_aot", description=__doc__.split("\n")[0])
    parser.add_argument("--sample", type=int, default=0,
                        help="compile N of the table's variants up to block 64 x head dim 64 and compare")
    parser.add_argument("--show", action="store_true", help="print the shipped table")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.show:
        print(show(load_table()))
        return 0
    import triton

    if args.sample:
        table = load_table()
        if table["triton"] != triton.__version__:
            print(f"the table was compiled with Triton {table['triton']}; this is {triton.__version__}: "
                  "regenerate it with python -m gorilla_dist.kernels.triton_aot", file=sys.stderr)
            return 1
        # among the shapes up to block 64 x head dim 64 (a second or two each; the largest take minutes)
        compiled = sorted(k for k, v in table["shared_bytes"].items()
                          if v is not None and parse_key(k)[1] * parse_key(k)[2] <= 64 * 64)
        chosen = random.Random(args.seed).sample(compiled, args.sample)
        got = dict(zip(chosen, _in_workers(_compile_key, chosen, args.jobs)))
        wrong = {k: (v, table["shared_bytes"][k]) for k, v in got.items() if v != table["shared_bytes"][k]}
        for k, v in got.items():
            print(f"{k}: {v} bytes (table {table['shared_bytes'][k]})")
        if wrong:
            print(f"{len(wrong)} of {len(got)} differ from the table: {wrong}", file=sys.stderr)
            return 1
        return 0
    start = time.time()
    shared = compile_all(chains(), args.jobs)
    table = {"triton": triton.__version__,
             "compiled": "HAS_ALIBI HAS_BIAS HAS_SEG on; 16-byte aligned pointers and strides; null: not compiled, "
                         "a smaller shape of the same kernel already exceeds the target's shared memory",
             "shared_bytes": dict(sorted(shared.items()))}
    TABLE.write_text(json.dumps(table, indent=0) + "\n")
    compiled = sum(v is not None for v in shared.values())
    print(f"{len(shared)} variants ({compiled} compiled, the others over their target) in {time.time() - start:.0f} s "
          f"-> {TABLE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
