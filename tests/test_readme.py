"""The README's Python examples run as written (with the checkpoint files they name made up here)."""
import os
import re

import pytest
import torch

from tests._torchvision_like import RefResNet50

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def python_blocks():
    with open(README) as f:
        return re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)


def ahnet_fast_commands():
    """Every complete ``ahnet-fast ...`` line of the README's bash blocks (continuations joined;
    lines with an ellipsis are sketches, not commands)."""
    with open(README) as f:
        blocks = re.findall(r"```bash\n(.*?)```", f.read(), flags=re.S)
    lines = [ln.strip() for b in blocks for ln in re.sub(r"\\\n\s*", " ", b).splitlines()]
    return [ln for ln in lines if ln.startswith("ahnet-fast ") and "..." not in ln and "…" not in ln]


@pytest.mark.parametrize("command", ahnet_fast_commands())
def test_readme_commands_name_only_options_that_exist(command):
    import shlex

    from ahnet_fast.cli import build_parser

    argv = shlex.split(command, comments=True)[1:]
    if argv[0] == "bench":
        pytest.skip("bench hands its arguments to the benchmark's own parser")
    build_parser().parse_args(argv)  # argparse exits (SystemExit) on an unknown option or a bad value


def test_readme_has_examples():
    assert len(python_blocks()) >= 2


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_example_runs(index, tmp_path, monkeypatch):
    monai_nets = pytest.importorskip("monai.networks.nets")
    monkeypatch.chdir(tmp_path)
    torch.save(monai_nets.AHNet(out_channels=3).state_dict(), "monai_ahnet.pt")
    torch.save(RefResNet50().state_dict(), "resnet50-0676ba61.pth")
    exec(compile(python_blocks()[index], f"README.md example {index}", "exec"), {})


def test_results_table_is_generated_from_the_committed_json():
    """The README's results table is what benchmarks/report.py makes of benchmarks/results/*.json."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "benchmarks/report.py", "--check"], capture_output=True, text=True)
    assert out.returncode == 0, "README's results table is stale: run python benchmarks/report.py"


# A measured figure: a ratio, a time, a size, a rate or a share. Outside the generated blocks the
# README may state only rules and tolerances (the phrases below), never a measurement.
FIGURE = re.compile(r"\d+(?:\.\d+)?\s?(?:[–-]\s?\d+(?:\.\d+)?\s?)?(?:×(?![\w(])|x\b|ms\b|%|MiB\b|GiB\b|KiB\b|MB\b|GB\b|"
                    r"KB\b|GFLOP/s|GB/s|minutes?\b|seconds?\b|s per\b|hours?\b)")
RULES = ("2× ATen's own", "2× MONAI's own", "2× rule", "4 × reductions")


def _outside_generated(text):
    text = re.sub(r"<!-- results:begin -->.*?<!-- results:end -->", "", text, flags=re.S)
    return re.sub(r"<!-- generated:(\w+) -->.*?<!-- /generated:\1 -->", "", text, flags=re.S)


def figures_without_a_source(text):
    found = []
    for line in _outside_generated(text).splitlines():
        for m in FIGURE.finditer(line):
            context = line[m.start():m.end() + 12]
            if not any(context.startswith(rule) for rule in RULES):
                found.append(line.strip())
    return found


def test_every_figure_in_the_readme_comes_from_a_committed_result():
    """Measured numbers live only in the blocks benchmarks/report.py generates from committed JSON."""
    with open(README) as f:
        found = figures_without_a_source(f.read())
    assert not found, "README figures outside the generated blocks:\n" + "\n".join(found)


def test_the_figure_scan_sees_figures():
    sample = "It is 1.53× faster and uses 0.41x the memory (323 MiB, 12 ms, 5–6 GB/s, 28%).\n" \
             "<!-- generated:e2e -->\n| 2.00x |\n<!-- /generated:e2e -->\nwithin 2× MONAI's own error"
    assert len(figures_without_a_source(sample)) == 6


def _report_module(tmp_path, monkeypatch):
    import importlib.util
    import sys

    bench = os.path.join(os.path.dirname(README), "benchmarks")
    monkeypatch.syspath_prepend(bench)
    spec = importlib.util.spec_from_file_location("report_under_test", os.path.join(bench, "report.py"))
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    monkeypatch.setattr(report, "HERE", str(tmp_path))
    (tmp_path / "results").mkdir()
    assert "report_under_test" not in sys.modules
    return report


def test_report_refuses_a_fraction_of_the_roof_above_100_percent(tmp_path, monkeypatch):
    import json

    report = _report_module(tmp_path, monkeypatch)
    row = dict(op="bn_add_relu", shape="256 @32x32x8", flops=0, min_bytes=10**8, ms=2.9, gflops_per_s=0.0,
               gbytes_per_s=34.4, bound="memory", fraction_of_roof=1.37, speedup=1.6, baseline="F.batch_norm")
    (tmp_path / "results" / "roofline_cpu_2026-01-01.json").write_text(json.dumps(dict(
        date="2026-01-01", device="cpu", threads=2, torch="x", ceilings={"matmul_fp32_GFLOPs": 300, "copy_GBps": 25},
        results=[row])))
    with pytest.raises(SystemExit, match="above 100% of the roof"):
        report.roofline_table()
    row["fraction_of_roof"] = 0.9
    (tmp_path / "results" / "roofline_cpu_2026-01-01.json").write_text(json.dumps(dict(
        date="2026-01-01", device="cpu", threads=2, torch="x", ceilings={"matmul_fp32_GFLOPs": 300, "copy_GBps": 25},
        results=[row], extension=True)))
    assert any("| bn_add_relu |" in line for line in report.roofline_table())


def test_report_says_where_the_time_goes_and_what_would_reach_a_missed_target(tmp_path, monkeypatch):
    """The alternatives block's profile table scales each kind's profiled time to the row's median and
    puts the step's FLOPs at the measured GEMM rate beside it; for a missed speed target it says what
    the matrix products at 90% of that rate would leave for the other kinds of work."""
    import json

    report = _report_module(tmp_path, monkeypatch)

    def row(impl, ms, self_s=None, mm_gflop=0.0):
        r = dict(mode="train", shape=[1, 1, 128, 128, 32], impl=impl, median_ms=ms, p20_ms=ms, p80_ms=ms,
                 peak_bytes=2 ** 20, first_loss=1.0, precision="fp32", compile_s=None, flops=8 * 10 ** 10)
        if self_s:  # profiled at half the speed of the timed steps: the shares count, not the sums
            r["profile"] = dict(self_s=self_s, matmul_gflop=mm_gflop,
                                matmul_gflops_per_s=mm_gflop / self_s.get("matrix products", 1.0))
        return r

    rows = [row("MONAI", 1200, {"convolutions (oneDNN/ATen)": 2.0, "other": 0.4}),
            row("MONAI+compile", 800, {"convolutions (oneDNN/ATen)": 1.4, "other": 0.2}),
            row("ahnet_fast", 1000, {"matrix products": 1.2, "other": 0.8}, mm_gflop=60.0)]
    (tmp_path / "results" / "e2e_alternatives_cpu_2026-01-01.json").write_text(json.dumps(dict(
        date="2026-01-01", device="cpu", threads=2, torch="x", results=rows,
        ceilings={"matmul_fp32_GFLOPs": 200.0, "copy_GBps": 20.0})))
    text = "\n".join(report.alternatives_block())
    # 80 GFLOP at 200 GFLOP/s: a 400 ms roof, 40% of ahnet_fast's 1000 ms; its matrix products 60% of it
    assert "| matrix products | convolutions (oneDNN/ATen) | other |" in text  # the kinds some row spent time on
    assert "| 1x1x128x128x32 | ahnet_fast | 1000 | 80.0 | 400 | 40% | 600 | — | 400 |" in text
    # matrix products: 60 GFLOP in 600 ms (100 GFLOP/s, 50% of the GEMM rate); at 180 GFLOP/s 333 ms,
    # the step 1000 - 600 + 333 = 733 ms; the target needs 800 / 1.3 = 615 ms: 118 ms more elsewhere
    assert "1x1x128x128x32, fp32: ahnet_fast 1000 ms against MONAI+compile 800 ms, 0.80x (target 1.3x: missed)" in text
    assert "run at 100 GFLOP/s (profiled time scaled to the median), 50% of the GEMM rate, for 600 ms" in text
    assert "they would take 333 ms and the step 733 ms (1.09x)" in text
    assert "118 ms more from the other kinds of work, which take 400 ms now" in text
