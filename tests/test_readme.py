"""The shell examples of the README and of docs/ run, in order, and print what the pages show.

Every ```bash and ```console block of README.md and then of the pages in DOCS (in that order; the
command reference continues in the directory of the README's quick start) is executed in document
order in one scratch directory with ../shared beside it and the repository's scripts/ in it, as if
typed into one shell: variables a ```bash block exports stay set for the blocks after it, in the
same page or the next. A ```console block holds `$ COMMAND` lines, each followed by
the output the page shows for it (stdout and stderr together, as a terminal shows them); the
command's real output must match it line by line and word by word, numbers included, except
  - numbers with a decimal point or a percent sign (times, losses, accuracies, file sizes in MB),
  - every number in the output of `train`, `eval`, `predict` and `plot`, which depend on the
    trained weights and on the machine, and of `curl` (a server's answers also carry ids and times);
    the words, labels and layout must still match,
  - hex digests of 12 to 64 digits (fingerprints of float weights).
Box-drawing rules and runs of spaces are compared loosely (a wider number widens a table).

A block that cannot run offline is preceded by `<!-- offline: skip: REASON -->`; the block between
the `<!-- test-command -->` markers is CI's own command and never runs here. The outputs were
recorded on the CPU, so the examples run with CUDA hidden.

Run `python tests/test_readme.py` to print every console example with the output it prints now,
and `python tests/test_readme.py --update` to write those outputs into the pages they come from
(after a deliberate change of output; review the diff).
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

from conftest import SHARED_DATA

ROOT = Path(__file__).resolve().parents[1]
README_PATH = ROOT / "README.md"
# The pages whose examples run, in the order they run: one shell session over all of them.
DOCS = [README_PATH] + [ROOT / "docs" / name for name in ("commands.md", "reliability.md", "scaling.md", "benchmarks.md",
                                                          "serving.md")]
MAX_SKIPPED = 11  # blocks, on all the pages together, that need the internet, a GPU cluster or a fresh virtual environment

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
    line: int  # 1-based line of the opening fence in its page
    skip_reason: str | None
    path: Path = README_PATH  # the page

    @property
    def where(self) -> str:
        """PAGE:LINE of the opening fence, the page relative to the repository root."""
        return f"{self.path.relative_to(ROOT).as_posix()}:{self.line}"

    @property
    def commands(self) -> list[tuple[str, str]]:
        """(command, expected output) pairs of a console block."""
        pairs: list[tuple[str, list[str]]] = []
        for text in self.body.splitlines():
            if text.startswith("$ "):
                pairs.append((text[2:], []))
            else:
                assert pairs, f"{self.where}: console block output before any `$ ` command"
                pairs[-1][1].append(text)
        return [(cmd, "\n".join(out)) for cmd, out in pairs]


def page_blocks(path: Path, text: str | None = None) -> list[Block]:
    """The shell blocks of one page (read from disk unless `text` is given), in document order."""
    text = path.read_text(encoding="utf-8") if text is None else text
    without_ci = TEST_COMMAND.sub(lambda m: "\n" * m.group(0).count("\n"), text)  # CI's command never runs here
    return [Block(m["lang"], m["body"], without_ci.count("\n", 0, m.start("lang")) + 1, m["reason"], path)
            for m in BLOCK.finditer(without_ci)]


def doc_blocks() -> list[Block]:
    """The shell blocks of every page in DOCS, in the order they run."""
    return [block for path in DOCS for block in page_blocks(path)]


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
    """None if `actual` is what the page shows for `command` (see the module docstring), else why not."""
    words = shlex.split(command.split(";")[0])
    loose = words[:1] == ["curl"] or len(words) > 1 and words[0] == "lora-cli" and words[1] in LOOSE_COMMANDS
    want = [line for line in expected.splitlines() if line.strip()]
    got = [line for line in actual.splitlines() if line.strip()]
    if len(want) != len(got):
        return f"{len(got)} lines printed, the page shows {len(want)}"
    for n, (w, g) in enumerate(zip(want, got), 1):
        wt, gt = _tokens(w), _tokens(g)
        same = len(wt) == len(gt) and all(a == b or _token_pattern(a, loose).fullmatch(b) for a, b in zip(wt, gt))
        if not same:
            return f"line {n}: the page shows\n  {w}\nbut the command printed\n  {g}"
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
    for block in blocks if blocks is not None else doc_blocks():
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


def test_every_example_runs_and_prints_what_the_pages_show(tmp_path: Path) -> None:
    """One test, not several sharing a module fixture: pytest-xdist may send a module's tests to different
    workers, and each would then run the whole session (minutes of commands) again."""
    session = run_readme(tmp_path)
    failed = [r for r in session.runs if r.returncode != 0]
    assert not failed, (f"{failed[0].block.where}: `{failed[0].command}` exited with "
                        f"{failed[0].returncode}:\n{failed[0].output}")
    runnable = [b.where for b in doc_blocks() if b.skip_reason is None]
    assert list(dict.fromkeys(r.block.where for r in session.runs)) == runnable
    checked = 0
    for r in session.runs:
        if r.expected is None:
            continue
        problem = output_mismatch(r.command, r.expected, r.output)
        assert problem is None, f"{r.block.where}: `$ {r.command}`: {problem}\n--- printed:\n{r.output}"
        checked += 1
    assert checked >= 12, "every command has an example with its output"
    # the offline quick start: its files, and what it printed
    assert (session.work / "runs" / "tiny" / "adapter.safetensors").is_file()
    assert (session.work / "spam-adapter.safetensors").is_file()
    quickstart = next(r for r in session.runs if "lora-cli init --preset gpt2-tiny --out gpt2-tiny.safetensors" in r.command)
    assert "trainable parameters: 295,426 of 16,582,914 (294,912 LoRA + 514 head)" in quickstart.output
    assert ["examples", "300"] in [line.split() for line in quickstart.output.splitlines()]
    assert "confusion matrix" in quickstart.output


def test_every_command_has_an_example() -> None:
    shown = {shlex.split(cmd)[1] for b in doc_blocks() if b.lang == "console" for cmd, _ in b.commands
             if cmd.startswith("lora-cli ")}
    from lora_cli.cli.commands import app

    commands = {c.name or c.callback.__name__.replace("_", "-") for c in app.registered_commands} | {"data"}
    assert commands - shown <= {"download"}, f"no console example for {sorted(commands - shown - {'download'})}"
    assert any("lora-cli download" in b.body for b in doc_blocks() if b.skip_reason)  # shown, but needs the internet


def test_skipped_blocks_are_few_and_say_why() -> None:
    skipped = [b for b in doc_blocks() if b.skip_reason is not None]
    assert 0 < len(skipped) <= MAX_SKIPPED, [b.where for b in skipped]
    for b in skipped:
        assert len(b.skip_reason.split()) >= 3, f"{b.where}: say why the block cannot run offline"
    for path in DOCS:
        blocks = page_blocks(path)
        without_ci = TEST_COMMAND.sub("", path.read_text(encoding="utf-8"))
        # every marker belongs to a block (a marker a line too early would silently run nothing)
        assert len(SKIP_MARKER.findall(without_ci)) == sum(b.skip_reason is not None for b in blocks), path.name
        # CI's test command is never run here, and no other shell block escapes the parser
        assert "pytest" not in "".join(b.body for b in blocks if b.skip_reason is None), path.name
        fences = re.findall(r"^```(\w*)", without_ci, re.M)
        assert fences.count("bash") + fences.count("console") + fences.count("sh") + fences.count("shell") == len(blocks), path.name
    assert "<!-- test-command -->" in README_PATH.read_text(encoding="utf-8")  # .ci/run reads it there


def test_readme_links_every_command_to_its_reference() -> None:
    """The README's command table names every command, and each link lands on a heading of docs/commands.md."""
    from lora_cli.cli.commands import app, data_app

    readme = README_PATH.read_text(encoding="utf-8")
    rows = re.findall(r"^\| `([a-z -]+)` \| .+ \| \[[^]]+\]\(docs/commands\.md#([a-z0-9-]+)\) \|$", readme, re.M)
    commands = ({c.name or c.callback.__name__.replace("_", "-") for c in app.registered_commands}
                | {f"data {c.name}" for c in data_app.registered_commands})
    assert {name for name, _ in rows} == commands
    reference = (ROOT / "docs" / "commands.md").read_text(encoding="utf-8")
    anchors = {_anchor(h) for h in re.findall(r"^#+ (.+)$", reference, re.M)}
    for name, anchor in rows:
        assert anchor in anchors, f"README.md: `{name}` links to docs/commands.md#{anchor}, which is no heading"


def test_relative_links_resolve() -> None:
    """Every relative link of the pages names a file that exists, and an anchor in a page, a heading of it."""
    for page in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            path = (page.parent / file).resolve() if file else page
            assert path.exists(), f"{page.relative_to(ROOT)}: the link {target} names no file"
            if anchor:
                headings = re.findall(r"^#+ (.+)$", path.read_text(encoding="utf-8"), re.M)
                assert anchor in {_anchor(h) for h in headings}, f"{page.relative_to(ROOT)}: the link {target} names no heading"


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation but hyphens dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


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


def update_pages(session: Session) -> int:
    """Write the outputs of `session` into the console blocks of the pages they ran from (each read afresh);
    the number of blocks changed."""
    outputs: dict[tuple[Path, int], list[str]] = {}
    for r in session.runs:
        if r.expected is not None:
            outputs.setdefault((r.block.path, r.block.line), []).append(f"$ {r.command}\n" + "".join(
                line.rstrip() + "\n" for line in r.output.splitlines()))
    changed = 0
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        page_changed = 0
        for block in reversed(page_blocks(path, text)):  # from the end, so earlier offsets stay valid
            new = "".join(outputs.get((path, block.line), []))
            if block.lang != "console" or not new or new == block.body:
                continue
            assert [c for c, _ in block.commands] == [c.splitlines()[0][2:] for c in outputs[(path, block.line)]]
            start = _line_offset(text, block.line + 1)
            end = start + len(block.body)
            assert text[start:end] == block.body
            text = text[:start] + new + text[end:]
            page_changed += 1
        if page_changed:
            path.write_text(text, encoding="utf-8")
            changed += page_changed
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
            sys.exit(f"{r.block.where}: `{r.command}` exited with {r.returncode}:\n{r.output}")
        if "--update" in sys.argv:
            print(f"updated {update_pages(result)} console blocks of {', '.join(p.name for p in DOCS)}")
        else:
            for r in result.runs:
                if r.expected is not None:
                    print(f"{r.block.where} ({r.seconds:.1f} s)\n$ {r.command}\n{r.output}")
        print(f"{sum(r.seconds for r in result.runs):.0f} s in all; the bash blocks "
              f"{sum(r.seconds for r in result.runs if r.expected is None):.0f} s", file=sys.stderr)
