"""Ahead-of-time compile every Triton kernel of the package for sm_80 and sm_90, with no GPU.

    python -m ahnet_fast.kernels.compile_check [--arch 80 90] [--triton-site DIR] [--jobs N]

For each kernel configuration that the launchers can produce (each kernel module lists them in
``compile_specs()``), ``triton.compile`` builds the kernel for a ``GPUTarget``; the ptxas that ships
with Triton assembles it, and its ``-v`` report (registers, spill stores and loads) is read back.
Prints one line per kernel, configuration and architecture; exits non-zero on a compile error or
any register spill.

``--triton-site DIR`` checks against a Triton installed beside the package
(``pip install --no-deps --target DIR triton==X``) instead of the one in the environment: each Triton
version lowers the same kernel differently (3.6 rejects fp32 dots with K < 16 that 3.8 accepts, and
spills tiles that 3.8 fits in registers), so a check against one version proves nothing about
another. ``scripts/compile_matrix.sh`` runs it for every supported version.

Integer arguments are declared as i32, as Triton types a Python int below 2**31 at launch. float64
is not compiled: on a GPU the ops route it to ATen by reason (ops/_registry.py).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import importlib
import io
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile

KERNEL_MODULES = ("ahnet_fast.kernels.triton.bn_relu", "ahnet_fast.kernels.triton.focal_loss",
                  "ahnet_fast.kernels.triton.pyramid_pool", "ahnet_fast.kernels.triton.aniso_conv")

_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def _ptxas() -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(path):
        raise FileNotFoundError(f"ptxas not found at {path}")
    return path


def _parse_ptxas(text: str) -> tuple[int, int, int] | None:
    """(registers, spill store bytes, spill load bytes) from a ptxas -v report, None if it has none."""
    regs = _PTXAS_REGS.findall(text)
    if not regs:
        return None
    spills = _PTXAS_SPILLS.findall(text)
    return (max(int(r) for r in regs), max((int(s) for s, _ in spills), default=0),
            max((int(ld) for _, ld in spills), default=0))


def _ptxas_report(ptx: str, arch: int) -> tuple[int, int, int]:
    """ptxas -v run on the PTX by hand: for a Triton whose compile printed no ptxas report."""
    gpu = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        out = subprocess.run([_ptxas(), "-v", "--gpu-name", gpu, path, "-o", os.path.join(d, "kernel.cubin")],
                             capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"ptxas failed: {out.stderr.strip()}")
    report = _parse_ptxas(out.stderr + out.stdout)
    return report if report is not None else (-1, 0, 0)


def compile_spec(fn, signature, constexprs, num_warps, arch, num_stages=None):
    """triton.compile of one configuration for sm_<arch>: (compiled kernel, ptxas report)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = dict(signature)
    for name in constexprs:
        sig[name] = "constexpr"
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs)
    # Triton prints ptxas's -v report while it compiles when TRITON_DUMP_PTXAS_LOG=1 (set by main
    # together with a private, empty cache, so that nothing is a cache hit): one ptxas run, not two
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps, **({"num_stages": num_stages} if num_stages else {})})
    report = _parse_ptxas(log.getvalue())
    if report is None:
        report = _ptxas_report(compiled.asm["ptx"], arch)
    return compiled, report


def all_specs(modules=KERNEL_MODULES):
    """[(module name, index, kernel name, configuration name)] of every distinct configuration (a
    tile that serves two channel ranges is built once: a second build would be a cache hit)."""
    out, seen = [], set()
    for module_name in modules:
        module = importlib.import_module(module_name)
        for i, (name, fn, sig, constexprs, warps) in enumerate(module.compile_specs()):
            key = (fn.__name__, tuple(sorted(sig.items())), tuple(sorted(constexprs.items())), warps)
            if key not in seen:
                seen.add(key)
                out.append((module_name, i, fn.__name__, name))
    return out


def _check_one(task):
    """Worker: compile one (module, spec index, arch); returns a result row."""
    module_name, index, arch = task
    module = importlib.import_module(module_name)
    name, fn, signature, constexprs, num_warps = module.compile_specs()[index]
    row = {"kernel": fn.__name__, "config": name, "arch": arch, "warps": num_warps}
    try:
        _, (regs, st, ld) = compile_spec(fn, signature, constexprs, num_warps, arch)
    except Exception as exc:  # a compile error is a failure, reported and counted
        first = str(exc).strip().splitlines()
        row["error"] = f"{type(exc).__name__}: {first[-1] if first else ''}"
        return row
    row.update(regs=regs, spill_stores=st, spill_loads=ld)
    return row


def _worker_init(site):
    if site:
        sys.path.insert(0, site)


def _reexec_with_site(site: str, argv) -> int:
    """Runs this check in a fresh interpreter whose first import path is ``site``: triton must be
    imported from there before anything (torch included) imports another one."""
    env = dict(os.environ)
    env["PYTHONPATH"] = site + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["AHNET_FAST_COMPILE_CHECK_SITE"] = site
    return subprocess.call([sys.executable, "-m", "ahnet_fast.kernels.compile_check", *argv], env=env)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--triton-site", default=None,
                        help="a directory holding a Triton (pip install --no-deps --target DIR triton==X)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compilations")
    parser.add_argument("--kernel", default=None, help="only kernels whose name contains this")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("compile_check: unset TRITON_INTERPRET (interpreted kernels cannot be compiled)", file=sys.stderr)
        return 2
    site = os.path.abspath(args.triton_site) if args.triton_site else None
    if site and os.environ.get("AHNET_FAST_COMPILE_CHECK_SITE") != site:
        if not os.path.isdir(os.path.join(site, "triton")):
            print(f"compile_check: no triton package in {site} (pip install --no-deps --target {site} triton==X)",
                  file=sys.stderr)
            return 2
        # a private, empty cache and ptxas's report printed by Triton (see compile_spec)
        return _reexec_with_site(site, [a for a in argv])
    try:
        import triton
    except ImportError:
        print("compile_check: triton is not installed (pip install 'triton>=3.5')", file=sys.stderr)
        return 2
    if site and not os.path.abspath(triton.__file__).startswith(site):
        print(f"compile_check: imported triton from {triton.__file__}, not from {site}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="ahnet_fast_triton_cache_") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
        return _run(args, site, triton.__version__)


def _run(args, site, version) -> int:
    specs = [s for s in all_specs() if args.kernel is None or args.kernel in s[2]]
    tasks = [(module_name, index, arch) for module_name, index, _, _ in specs for arch in args.arch]
    print(f"Triton {version} ({site or 'installed'}): {len(tasks)} compilations, {args.jobs} at a time", flush=True)
    print(f"{'kernel':<28} {'configuration':<34} {'arch':>5} {'warps':>5} {'regs':>5} {'spill st':>9} {'spill ld':>9}")
    if args.jobs > 1:
        ctx = multiprocessing.get_context("spawn")  # a clean interpreter: no forked compiler state
        pool = concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=ctx, initializer=_worker_init,
                                                      initargs=(site,))
        results = pool.map(_check_one, tasks, chunksize=4)
    else:
        pool = None
        results = map(_check_one, tasks)
    failures = 0
    try:
        for row in results:
            head = f"{row['kernel']:<28} {row['config']:<34} {'sm_' + str(row['arch']):>5} {row['warps']:>5}"
            if "error" in row:
                failures += 1
                print(f"{head}  COMPILE ERROR: {row['error']}", flush=True)
                continue
            spilled = row["spill_stores"] or row["spill_loads"]
            failures += bool(spilled)
            print(f"{head} {row['regs']:>5} {row['spill_stores']:>9} {row['spill_loads']:>9}"
                  f"{'  SPILLS' if spilled else ''}", flush=True)
    finally:
        if pool is not None:
            pool.shutdown()
    print(f"Triton {version}: {len(tasks)} compilations, {failures} failures (compile errors or spills)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
