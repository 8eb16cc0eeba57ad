"""The README's offline quick start runs verbatim, and its example outputs are what the tool prints."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SHARED_DATA

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")


def block_after(heading: str) -> str:
    """The first ```bash block after a heading."""
    section = README[README.index(heading):]
    match = re.search(r"```bash\n(.*?)```", section, re.S)
    assert match, f"no bash block after {heading!r}"
    return match.group(1)


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    """Run the offline quick start exactly as written, from a directory with ../shared beside it."""
    root = tmp_path_factory.mktemp("readme")
    (root / "shared").symlink_to(SHARED_DATA.parent, target_is_directory=True)
    work = root / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "LORA_CLI_BPE_DIR"}  # the block exports it itself
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # this environment's lora-cli
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", block_after("### Offline, in a minute")],
                            cwd=work, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return work, result


def test_offline_quickstart_runs_verbatim(quickstart) -> None:
    work, result = quickstart
    assert (work / "runs" / "tiny" / "adapter.safetensors").is_file()
    assert (work / "spam-adapter.safetensors").is_file()
    assert "trainable parameters: 295,426 of 16,582,914 (294,912 LoRA + 514 head)" in result.stderr
    assert "300 examples" in result.stdout and "confusion matrix" in result.stdout


def test_example_outputs_match(quickstart) -> None:
    """Each `$ lora-cli init|data ...` console example prints what the README shows."""
    _, result = quickstart
    examples = re.findall(r"```console\n\$ (lora-cli (?:init|data) [^\n]*)\n([^\n]+)\n```", README)
    assert len(examples) == 2
    for command, shown in examples:
        assert shown in result.stdout, (command, shown)
