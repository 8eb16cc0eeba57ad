"""The README's shell examples run, in order, and print what the README shows.

Every ```bash and ```console block of README.md is executed in document order in one scratch
directory with ../shared beside it and the repository's scripts/ in it, as if typed into one shell: variables a ```bash block exports
stay set for the blocks after it. A ```console block holds `$ COMMAND` lines, each followed by
the output the README shows for it (stdout and stderr together, as a terminal shows them); the
command's real output must match it line by line and word by word, numbers included, except
  - numbers with a decimal point or a percent sign (times, losses, accuracies, file sizes in MB),
  - every number in the output of `train`, `eval`, `predict` and `plot`, which depend on the
    trained weights and on the machine (the words, labels and layout must still match),
  - hex digests of 12 to 64 digits (fingerprints of float weights).
Box-drawing rules and runs of spaces are compared loosely (a wider number widens a table).

A block that cannot run offline is preceded by `<!-- offline: skip: REASON -->`; the block between
the `<!-- test-command -->` markers is CI's own command and never runs here. The outputs were
recorded on the CPU, so the examples run with CUDA hidden.

Run `python tests/test_readme.py` to print every console example with the output it prints now,
and `python tests/test_readme.py --update` to write those outputs into README.md (after a deliberate
change of output; review the diff).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import SHARED_DATA

README_PATH = Path(__file__).resolve().parents[1] / "README.md"
README = README_PATH.read_text(encoding="utf-8")
MAX_SKIPPED = 9  # blocks that need the internet, a GPU cluster or a fresh virtual environment

TEST_COMMAND = re.compile(r"<!-- test-command -->.*?<!-- /test-command -->", re.S)
BLOCK = re.compile(
    r"^(?:<!--\s*offline:\s*skip:\s*(?P<reason>.*?)\s*-->[ \t]*\n)?```(?P<lang>bash|sh|shell|console)[ \t]*\n(?P<body>.*?)^```",
    re.S | re.M,
)
SKIP_MARKER = re.compile(r"<!--\s*offline:\s*skip")
LOOSE_COMMANDS = {"train", "eval", "predict", "plot"}
NUMBER = re.compile(r"\d[\d,]*(?:\.\d+)?(?:e[-+]?\d+)?")
DIGEST = re.compile(r"(?<![0-9a-z])(?=[0-9]*[a-f])[0-9a-f]{12,64}(?![0-9a-z])")  # fingerprints, or their first 12 digits
RULE = re.compile(r"[\u2500-\u257f]+")


@dataclass
class Block:
    lang: str
    body: str
    line: int  # 1-based line of the opening fence in README.md
    skip_reason: str | None

    @property
    def commands(self) -> list[tuple[str, str]]:
        """(command, expected output) pairs of a console block."""
        pairs: list[tuple[str, list[str]]] = []
        for text in self.body.splitlines():
            if text.startswith("$ "):
                pairs.append((text[2:], []))
            else:
                assert pairs, f"README.md:{self.line}: console block output before any `$ ` command"
                pairs[-1][1].append(text)
        return [(cmd, "\n".join(out)) for cmd, out in pairs]


def readme_blocks(text: str = README) -> list[Block]:
    without_ci = TEST_COMMAND.sub(lambda m: "\n" * m.group(0).count("\n"), text)  # CI's command never runs here
    return [Block(m["lang"], m["body"], without_ci.count("\n", 0, m.start("lang")) + 1, m["reason"])
            for m in BLOCK.finditer(without_ci)]


# ---------------------------------------------------------------- comparing outputs


def _tokens(line: str) -> list[str]:
    return RULE.sub("\u2500", line).split()


def _token_pattern(token: str, loose: bool) -> re.Pattern:
    parts, end = [], 0
    for m in re.finditer(f"(?P<digest>{DIGEST.pattern})|(?P<number>{NUMBER.pattern})", token):
        parts.append(re.escape(token[end:m.start()]))
        after = token[m.end():m.end() + 1]
        if m["digest"]:
            parts.append("[0-9a-f]{%d}" % len(m["digest"]))
        elif loose or "." in m["number"] or after == "%":
            parts.append(f"(?:{NUMBER.pattern})")
        else:
            parts.append(re.escape(m["number"]))
        end = m.end()
    parts.append(re.escape(token[end:]))
    return re.compile("".join(parts))


def output_mismatch(command: str, expected: str, actual: str) -> str | None:
    """None if `actual` is what the README shows for `command` (see the module docstring), else why not."""
    words = shlex.split(command.split(";")[0])
    loose = len(words) > 1 and words[0] == "lora-cli" and words[1] in LOOSE_COMMANDS
    want = [line for line in expected.splitlines() if line.strip()]
    got = [line for line in actual.splitlines() if line.strip()]
    if len(want) != len(got):
        return f"{len(got)} lines printed, the README shows {len(want)}"
    for n, (w, g) in enumerate(zip(want, got), 1):
        wt, gt = _tokens(w), _tokens(g)
        same = len(wt) == len(gt) and all(a == b or _token_pattern(a, loose).fullmatch(b) for a, b in zip(wt, gt))
        if not same:
            return f"line {n}: the README shows\n  {w}\nbut the command printed\n  {g}"
    return None


# ---------------------------------------------------------------- running the blocks


@dataclass
class Run:
    block: Block
    command: str
    expected: str | None  # None for a bash block
    output: str
    returncode: int
    seconds: float


@dataclass
class Session:
    work: Path
    runs: list[Run] = field(default_factory=list)
    skipped: list[Block] = field(default_factory=list)


def run_readme(root: Path, blocks: list[Block] | None = None) -> Session:
    """Run the blocks in order in root/work, with root/shared -> the shared data; stop at the first failure."""
    (root / "shared").symlink_to(SHARED_DATA.parent, target_is_directory=True)
    work = root / "work"
    work.mkdir()
    (work / "scripts").symlink_to(README_PATH.parent / "scripts", target_is_directory=True)  # as in the repository root
    state = root / "shell-state.sh"  # `export -p` after each bash block: one shell session across blocks
    state.write_text("")
    env = {k: v for k, v in os.environ.items()
           if k not in ("LORA_CLI_BPE_DIR", "FORCE_COLOR", "NO_COLOR", "COLUMNS", "TTY_COMPATIBLE")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # this environment's lora-cli
    env["CUDA_VISIBLE_DEVICES"] = ""
    session = Session(work)
    for block in blocks if blocks is not None else readme_blocks():
        if block.skip_reason is not None:
            session.skipped.append(block)
            continue
        if block.lang == "console":
            steps = [(f"source {shlex.quote(str(state))}\n{cmd}", cmd, expected) for cmd, expected in block.commands]
        else:
            script = f"source {shlex.quote(str(state))}\nset -euo pipefail\n{block.body}\nexport -p > {shlex.quote(str(state))}\n"
            steps = [(script, block.body, None)]
        for script, command, expected in steps:
            start = time.perf_counter()
            r = subprocess.run(["bash", "-c", script], cwd=work, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            session.runs.append(Run(block, command, expected, r.stdout, r.returncode, time.perf_counter() - start))
            if r.returncode != 0:
                return session
    return session


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> Session:
    return run_readme(tmp_path_factory.mktemp("readme"))


def test_every_example_runs(session: Session) -> None:
    failed = [r for r in session.runs if r.returncode != 0]
    assert not failed, (f"README.md:{failed[0].block.line}: `{failed[0].command}` exited with "
                        f"{failed[0].returncode}:\n{failed[0].output}")
    runnable = [b.line for b in readme_blocks() if b.skip_reason is None]
    assert sorted({r.block.line for r in session.runs}) == runnable


def test_console_outputs_match(session: Session) -> None:
    checked = 0
    for r in session.runs:
        if r.expected is None:
            continue
        problem = output_mismatch(r.command, r.expected, r.output)
        assert problem is None, f"README.md:{r.block.line}: `$ {r.command}`: {problem}\n--- printed:\n{r.output}"
        checked += 1
    assert checked >= 12, "every command has an example with its output"


def test_every_command_has_an_example() -> None:
    shown = {shlex.split(cmd)[1] for b in readme_blocks() if b.lang == "console" for cmd, _ in b.commands
             if cmd.startswith("lora-cli ")}
    from lora_cli.cli.commands import app

    commands = {c.name or c.callback.__name__.replace("_", "-") for c in app.registered_commands} | {"data"}
    assert commands - shown <= {"download"}, f"no console example for {sorted(commands - shown - {'download'})}"
    assert any("lora-cli download" in b.body for b in readme_blocks() if b.skip_reason)  # shown, but needs the internet


def test_skipped_blocks_are_few_and_say_why() -> None:
    blocks = readme_blocks()
    skipped = [b for b in blocks if b.skip_reason is not None]
    assert 0 < len(skipped) <= MAX_SKIPPED, [b.line for b in skipped]
    for b in skipped:
        assert len(b.skip_reason.split()) >= 3, f"README.md:{b.line}: say why the block cannot run offline"
    # every marker belongs to a block (a marker a line too early would silently run nothing)
    without_ci = TEST_COMMAND.sub("", README)
    assert len(SKIP_MARKER.findall(without_ci)) == len(skipped)
    # CI's test command is never run here, and no other shell block escapes the parser
    assert "pytest" not in "".join(b.body for b in blocks if b.skip_reason is None)
    fences = re.findall(r"^```(\w*)", TEST_COMMAND.sub("", README), re.M)
    assert fences.count("bash") + fences.count("console") + fences.count("sh") + fences.count("shell") == len(blocks)


def test_offline_quickstart(session: Session) -> None:
    work = session.work
    assert (work / "runs" / "tiny" / "adapter.safetensors").is_file()
    assert (work / "spam-adapter.safetensors").is_file()
    quickstart = next(r for r in session.runs if "lora-cli init --preset gpt2-tiny --out gpt2-tiny.safetensors" in r.command)
    assert "trainable parameters: 295,426 of 16,582,914 (294,912 LoRA + 514 head)" in quickstart.output
    assert ["examples", "300"] in [line.split() for line in quickstart.output.splitlines()]
    assert "confusion matrix" in quickstart.output


def test_comparison_rules() -> None:
    """The comparison is strict where outputs are deterministic and loose only where documented."""
    cmd = "lora-cli init --preset gpt2-tiny --out x.safetensors"
    assert output_mismatch(cmd, "wrote x: 29,153,280 parameters, 1.19 MB", "wrote x: 29,153,280 parameters, 1.2 MB") is None
    assert output_mismatch(cmd, "wrote x: 29,153,280 parameters", "wrote x: 29,153,281 parameters")
    assert output_mismatch(cmd, "seed 7", "seed 8")
    assert output_mismatch(cmd, "a\nb", "a")
    assert output_mismatch(cmd, "rank 16", "rank 16 extra")
    assert output_mismatch("lora-cli eval --adapter a", "ham  124  25", "ham  3  146") is None
    assert output_mismatch("lora-cli eval --adapter a", "ham  124  25", "spam  124  25")
    assert output_mismatch(cmd, "fingerprint c3416045f14e,", "fingerprint a006264e50e6,") is None
    assert output_mismatch(cmd, "fingerprint c3416045f14e,", "fingerprint a006264e50e,")
    table = "a   b\n\u2500\u2500\u2500\u2500\u2500\nx   9"
    assert output_mismatch("lora-cli eval", table, "a    b\n\u2500\u2500\u2500\u2500\u2500\u2500\nx   10") is None


def update_readme(session: Session) -> int:
    """Write the outputs of `session` into README.md's console blocks (read afresh); the number of blocks changed."""
    outputs = {}
    for r in session.runs:
        if r.expected is not None:
            outputs.setdefault(r.block.line, []).append(f"$ {r.command}\n" + "".join(
                line.rstrip() + "\n" for line in r.output.splitlines()))
    text = README_PATH.read_text(encoding="utf-8")
    blocks = readme_blocks(text)
    changed = 0
    for block in reversed(blocks):  # from the end, so earlier offsets stay valid
        new = "".join(outputs.get(block.line, []))
        if block.lang != "console" or not new or new == block.body:
            continue
        assert [c for c, _ in block.commands] == [c.splitlines()[0][2:] for c in outputs[block.line]]
        start = _line_offset(text, block.line + 1)
        end = start + len(block.body)
        assert text[start:end] == block.body
        text = text[:start] + new + text[end:]
        changed += 1
    README_PATH.write_text(text, encoding="utf-8")
    return changed


def _line_offset(text: str, line: int) -> int:
    offset = 0
    for _ in range(line - 1):
        offset = text.index("\n", offset) + 1
    return offset


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("LORA_CLI_HOME", str(Path(tmp) / "home"))
        result = run_readme(Path(tmp))
        if result.runs and result.runs[-1].returncode:
            r = result.runs[-1]
            sys.exit(f"README.md:{r.block.line}: `{r.command}` exited with {r.returncode}:\n{r.output}")
        if "--update" in sys.argv:
            print(f"updated {update_readme(result)} console blocks of {README_PATH}")
        else:
            for r in result.runs:
                if r.expected is not None:
                    print(f"README.md:{r.block.line} ({r.seconds:.1f} s)\n$ {r.command}\n{r.output}")
        print(f"{sum(r.seconds for r in result.runs):.0f} s in all; the bash blocks "
              f"{sum(r.seconds for r in result.runs if r.expected is None):.0f} s", file=sys.stderr)
