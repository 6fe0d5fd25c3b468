"""Ahead-of-time compile every Triton kernel of the package for sm_80 and sm_90, with no GPU.

    python -m ahnet_fast.kernels.compile_check [--arch 80 90] [--verbose]

For each kernel configuration that the launchers can produce (each kernel module lists them in
``compile_specs()``), ``triton.compile`` builds PTX for a ``GPUTarget``, and the ptxas that ships
with Triton assembles it (``ptxas -v``) to report registers and spills. Prints one line per
kernel, configuration and architecture; exits non-zero on a compile error or any register spill.
"""
from __future__ import annotations

import argparse
import importlib
import os
import re
import subprocess
import sys
import tempfile

KERNEL_MODULES = ("ahnet_fast.kernels.triton.bn_relu", "ahnet_fast.kernels.triton.focal_loss",
                  "ahnet_fast.kernels.triton.pyramid_pool", "ahnet_fast.kernels.triton.aniso_conv")


def _ptxas() -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(path):
        raise FileNotFoundError(f"ptxas not found at {path}")
    return path


def _compile(fn, signature, constexprs, num_warps, arch):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = dict(signature)
    for name in constexprs:
        sig[name] = "constexpr"
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})


def _ptxas_report(ptx: str, arch: int) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) from ptxas -v."""
    gpu = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        out = subprocess.run([_ptxas(), "-v", "--gpu-name", gpu, path, "-o", os.path.join(d, "kernel.cubin")],
                             capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"ptxas failed: {out.stderr.strip()}")
    text = out.stderr + out.stdout
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    return (int(regs.group(1)) if regs else -1, int(spill.group(1)) if spill else 0,
            int(spill.group(2)) if spill else 0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("compile_check: unset TRITON_INTERPRET (interpreted kernels cannot be compiled)", file=sys.stderr)
        return 2
    try:
        import triton  # noqa: F401
    except ImportError:
        print("compile_check: triton is not installed (pip install 'triton>=3.1')", file=sys.stderr)
        return 2
    failures, rows = 0, 0
    print(f"{'kernel':<28} {'configuration':<28} {'arch':>5} {'regs':>5} {'spill st':>9} {'spill ld':>9}")
    for module_name in KERNEL_MODULES:
        module = importlib.import_module(module_name)
        for name, fn, signature, constexprs, num_warps in module.compile_specs():
            for arch in args.arch:
                rows += 1
                try:
                    compiled = _compile(fn, signature, constexprs, num_warps, arch)
                    regs, st, ld = _ptxas_report(compiled.asm["ptx"], arch)
                except Exception as exc:  # a compile error is a failure, reported and counted
                    failures += 1
                    print(f"{fn.__name__:<28} {name:<28} {'sm_' + str(arch):>5}  COMPILE ERROR: "
                          f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
                    continue
                flag = "  SPILLS" if st or ld else ""
                failures += bool(st or ld)
                print(f"{fn.__name__:<28} {name:<28} {'sm_' + str(arch):>5} {regs:>5} {st:>9} {ld:>9}{flag}")
    print(f"{rows} compilations, {failures} failures (compile errors or spills)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
