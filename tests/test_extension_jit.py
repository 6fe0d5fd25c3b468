"""Installs without the compiled extension (a plain `pip install .`, a wheel from an isolated build)
get the kernels built just in time on first import, once, with a clear message, and a clear warning
where that cannot be done.

The builds here compile two small sources (AHNET_FAST_JIT_SOURCES) instead of all of csrc/, which
takes minutes on 2 cores; the mechanism (sources shipped in the wheel, cache folder, lock, loading,
registration) is the same."""
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUBSET = "ops.cpp,transposed_conv.cpp"

PROBE = """
import sys, warnings
# this environment's editable install of the repository adds a finder that would resolve
# ahnet_fast._C to the repository's build even for the wheel's package: without it, the wheel's
# package is what a user of that wheel has
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
import torch
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import ahnet_fast
from ahnet_fast._extension import extension_origin, extension_error
print("ORIGIN", extension_origin())
print("FILE", ahnet_fast.__file__)
try:
    print("KERNEL", torch._C._dispatch_has_kernel_for_dispatch_key("ahnet_fast::transposed_conv_shuffle", "CPU"))
except RuntimeError:  # no extension: the op's schema is not even defined
    print("KERNEL", False)
for w in caught:
    if "no compiled kernels" in str(w.message):
        print("WARNING", w.message)
x = torch.randn(1, 8, 3, 3, 2)
w = torch.randn(8, 2, 2, 2, 2)
y = ahnet_fast.ops.transposed_conv(x, w, None, (2, 2, 2))
ref = torch.nn.functional.conv_transpose3d(x, w, stride=2)
print("CLOSE", torch.allclose(y, ref, atol=1e-5))
"""


def _run(env_extra, cwd, path_first=None, **kw):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AHNET_FAST")}
    env.update(env_extra)
    if path_first:
        env["PYTHONPATH"] = path_first
    return subprocess.Popen([sys.executable, "-c", PROBE], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def _finish(proc):
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    return dict(line.split(" ", 1) for line in out.splitlines() if " " in line), err


@pytest.fixture(scope="module")
def wheel_site(tmp_path_factory):
    """A wheel built as an isolated build without torch would build it (no extension), installed
    into a folder of its own."""
    tmp = tmp_path_factory.mktemp("wheel")
    # built from a copy of what the package is made of: pip builds in the source folder (build/, the
    # egg-info), and pytest-xdist workers that each run this fixture must not build in the same one
    source = tmp / "source"
    source.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(os.path.join(ROOT, name), source / name)
    for folder in ("ahnet_fast", "csrc"):
        shutil.copytree(os.path.join(ROOT, folder), source / folder,
                        ignore=shutil.ignore_patterns("__pycache__", "*.so", "_csrc"))
    env = dict(os.environ, AHNET_FAST_NO_EXTENSION="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp / "dist"), str(source)], check=True, env=env, capture_output=True)
    (wheel,) = (tmp / "dist").glob("ahnet_fast-*.whl")
    site = tmp / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, env=env, capture_output=True)
    return wheel, site


def test_the_wheel_ships_the_sources_and_no_binary(wheel_site):
    wheel, _ = wheel_site
    names = zipfile.ZipFile(wheel).namelist()
    assert not any("_C." in n and n.endswith(".so") for n in names)
    repo_sources = {os.path.relpath(os.path.join(d, f), os.path.join(ROOT, "csrc"))
                    for d, _, files in os.walk(os.path.join(ROOT, "csrc")) for f in files if f.endswith((".cpp", ".h"))}
    shipped = {n.split("ahnet_fast/_csrc/", 1)[1] for n in names if "ahnet_fast/_csrc/" in n}
    assert shipped == repo_sources


def test_first_import_builds_once_for_concurrent_processes_then_reuses(wheel_site, tmp_path):
    _, site = wheel_site
    env = {"AHNET_FAST_JIT_SOURCES": SUBSET, "AHNET_FAST_CACHE": str(tmp_path / "cache")}
    # two processes started together (as torchrun starts ranks): one builds, the other waits for it
    procs = [_run(env, tmp_path, str(site)) for _ in range(2)]
    results = [_finish(p) for p in procs]
    for fields, err in results:
        assert fields["ORIGIN"] == "just in time" and fields["KERNEL"] == "True" and fields["CLOSE"] == "True"
        assert fields["FILE"].startswith(str(site))
        assert "WARNING" not in fields
    assert any("installed without its compiled extension; compiling the CPU kernels" in err for _, err in results)
    builds = list((tmp_path / "cache" / "extension").glob("*/ahnet_fast_C.so"))
    assert len(builds) == 1
    fields, err = _finish(_run(env, tmp_path, str(site)))  # cached: no message, no compile
    assert fields["ORIGIN"] == "just in time" and "compiling" not in err


def test_no_compiler_or_jit_off_warns_and_falls_back(wheel_site, tmp_path):
    _, site = wheel_site
    empty = tmp_path / "empty-path"
    empty.mkdir()
    env = {"AHNET_FAST_JIT_SOURCES": SUBSET, "AHNET_FAST_CACHE": str(tmp_path / "cache"), "PATH": str(empty),
           "CXX": "/nonexistent/c++"}
    fields, _ = _finish(_run(env, tmp_path, str(site)))
    assert fields["ORIGIN"] == "None" and fields["CLOSE"] == "True"  # the reference path, same result
    assert "no C++ compiler found" in fields["WARNING"] and "installed without its compiled extension" in \
        fields["WARNING"]
    fields, _ = _finish(_run({"AHNET_FAST_JIT": "0"}, tmp_path, str(site)))
    assert fields["ORIGIN"] == "None" and "AHNET_FAST_JIT=0" in fields["WARNING"]
