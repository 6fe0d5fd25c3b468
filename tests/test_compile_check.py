"""The ahead-of-time compile check (ahnet_fast/kernels/compile_check.py) with the Triton installed in
this environment. scripts/compile_matrix.sh, which scripts/test.sh runs first, does the same for the
oldest supported Triton, 3.6 and the newest, each installed beside the package."""
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")
from ahnet_fast.kernels import compile_check  # noqa: E402

ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def test_every_variant_compiles_for_sm80_and_sm90_without_spills():
    out = subprocess.run([sys.executable, "-m", "ahnet_fast.kernels.compile_check"], capture_output=True, text=True,
                         env=ENV, timeout=1200)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    total = len(compile_check.all_specs()) * 2
    assert f"{total} compilations, 0 failures" in out.stdout
    # every kernel of every module is in it
    for name in ("conv_fwd_kernel", "conv_dgrad_kernel", "conv_wgrad_kernel", "wgrad_reduce_kernel", "bn_relu_stats_kernel",
                 "bn_relu_fwd_kernel", "bn_relu_grad_sums_kernel", "bn_relu_bwd_kernel", "focal_loss_fwd_kernel",
                 "pyramid_pool_pool0_kernel", "pyramid_pool_coarsen_kernel", "pyramid_pool_project_kernel", "pyramid_pool_upsample_kernel",
                 "pyramid_pool_route_kernel"):
        assert f"\n{name} " in out.stdout, name


def test_ptxas_report_parsing():
    text = ("ptxas info    : Compiling entry function 'k' for 'sm_90a'\n"
            "ptxas info    : Function properties for k\n"
            "    8 bytes stack frame, 12 bytes spill stores, 16 bytes spill loads\n"
            "ptxas info    : Used 255 registers, used 1 barriers, 392 bytes cmem[0]\n")
    assert compile_check._parse_ptxas(text) == (255, 12, 16)
    assert compile_check._parse_ptxas("nothing here") is None


def test_specs_are_distinct_and_integers_are_i32():
    seen = set()
    for module_name, index, kernel, config in compile_check.all_specs():
        assert (kernel, config) not in seen, (kernel, config)
        seen.add((kernel, config))
    import importlib

    for module_name in compile_check.KERNEL_MODULES:
        for name, fn, sig, constexprs, warps in importlib.import_module(module_name).compile_specs():
            # Triton types a Python int below 2**31 as i32 at launch: the check must compile what runs
            assert "i64" not in sig.values(), (fn.__name__, name)


def test_triton_site_that_holds_no_triton_is_refused(tmp_path):
    out = subprocess.run([sys.executable, "-m", "ahnet_fast.kernels.compile_check", "--triton-site", str(tmp_path)],
                         capture_output=True, text=True, env=ENV, timeout=120)
    assert out.returncode == 2
    assert "no triton package" in out.stderr


def test_interpreter_is_refused():
    out = subprocess.run([sys.executable, "-m", "ahnet_fast.kernels.compile_check"], capture_output=True, text=True,
                         env={**ENV, "TRITON_INTERPRET": "1"}, timeout=120)
    assert out.returncode == 2 and "TRITON_INTERPRET" in out.stderr
