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
