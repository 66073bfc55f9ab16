"""Every command in README.md runs as written and exits as the README says.

The commands are the fenced ```bash blocks (one command per line; `\\` continues a line, a trailing
`# comment` is not part of the command) and the ```python blocks (one program each). Plain ```
blocks show sample output and are not run. A command is expected to exit 0 unless its own comment
says `exits N` (or `must fail`: exit 1, a failed check, never a config error).

Each command runs from the repository root with .venv/bin first on PATH, with small settings
appended (or replacing the README's own value of the same key: `SHRINK`), and with every output
under a temporary folder: `out_dir=` is set, and `results/runs/` (the default out_dir) in a command
means that folder, so a block can name a run folder (`hydra.run.dir=results/runs/x`) and use it
in its next command. The commands of one block share that folder and run in order. Nothing is
written into the checkout: a `report` that would rebuild a committed folder in place, or a
`compare` without `-o` (its table would go to ./compare.md), is refused.

A block that cannot run on a CPU-only machine without internet is skipped only by an explicit
marker on the line before its fence: `<!-- readme-test: skip: REASON -->`.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT, _free_port_pair

README = ROOT / "README.md"
VENV_BIN = ROOT / ".venv" / "bin"

#: fence languages: these run; a plain fence is sample output; any other language is an error
RUN_LANGS = ("bash", "python")
SHOWN_LANGS = ("",)
#: at most this many skipped blocks (the GPU set-up, the SLURM example, and a second environment
#: from the registry, which CI builds and runs as `make release-check`)
MAX_SKIPPED = 3

#: small settings for every Hydra run (appended, or replacing the command's own value)
SHRINK: dict[str, str] = {
    "measure.convergence.epochs": "1",
    "measure.convergence.seeds": "[0]",
    "measure.convergence.iwae_k": "10",
    "measure.convergence.elbo_samples": "2",
    "measure.gradflow.train_steps": "2",
    "measure.conformance.steps": "2",
    "measure.throughput.batch_sizes": "[8]",
    "measure.throughput.repeats": "2",
    "measure.throughput.steps": "1",
    "measure.throughput.warmup": "0",
    "measure.throughput.matmul_n": "16",
    "measure.throughput.matmul_repeats": "1",
    "measure.gaps.n_train": "64",
    "measure.gaps.train_steps": "20",
    "measure.gaps.epochs": "1",
    "measure.gaps.n_test": "4",
    "measure.gaps.iwae_k": "20",
    "measure.gaps.elbo_samples": "20",
    "measure.gaps.local_samples": "5",
    "measure.snr.ks": "[1,3,10]",  # the toy is judged: K = 1..10 with enough draws resolves its encoder
    "measure.snr.draws": "20000",
    "measure.snr.samples": "0",
    "measure.snr.trained_epochs": "1",
    "measure.snr.trained_ks": "[1,10]",
    "measure.snr.trained_draws": "20",
    "progress": "false",
}
#: and for the conv VAE (`+experiment=conv`, `model=conv`), its layers at a test's size: the same
#: code paths, a fraction of the compute (the frameworks' compiles stay)
CONV_SHRINK: dict[str, str] = {"model.filters": "[4,8]", "model.dense": "8"}
#: what the test passes to `make test`: one quick test file (never this one)
MAKE_TEST_PYTEST = "-q -p no:cacheprovider tests/test_reference.py"
#: make variables of the make that runs pytest must not reach the make a README command runs
#: (`make test PYTEST=...` would otherwise run the whole suite again, this test included)
MAKE_ENV = ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES", "ARGS", "PYTEST", "DIR", "REGRESS_DIR", "REGRESS_REF")


def _mnist_npz(path: Path) -> None:
    """A small stand-in for a user's MNIST file: x_train (N, 28, 28) and x_test, uint8."""
    rng = np.random.default_rng(0)
    np.savez(path, x_train=rng.integers(0, 256, (60, 28, 28), dtype=np.uint8),
             x_test=rng.integers(0, 256, (20, 28, 28), dtype=np.uint8))


#: a user's file named in a command -> (the file the test writes instead, how). Each key must occur
#: in the README (test_user_files_occur_in_the_readme), so this table cannot go stale.
USER_FILES: dict[str, tuple[str, Callable[[Path], None]]] = {
    "/data/mnist.npz": ("mnist.npz", _mnist_npz),
}
#: the default out_dir: in a command it means the block's temporary folder
RUNS = "results/runs/"
#: the local SLURM cluster's folder (`scripts/slurm-local`): a block's own, under its temporary folder
SLURM_DIR = ".slurm-local/"


class ReadmeError(ValueError):
    pass


@dataclass(frozen=True)
class Block:
    lang: str
    line: int  # the opening fence, 1-based
    text: str
    skip: str | None  # the reason of a skip marker


@dataclass(frozen=True)
class Command:
    block: int  # index of its block among the blocks that run
    index: int  # position within the block
    line: int  # README line where it starts
    lang: str
    text: str  # as written: continuations joined, trailing comment removed
    comment: str
    expect: int
    skip: str | None = None

    @property
    def id(self) -> str:
        words = self.text if self.lang == "bash" else "python-block"
        words = re.sub(r"(^|\s)\.venv/bin/", r"\1", words)
        slug = re.sub(r"[^A-Za-z0-9=.,_+/-]+", "-", words).strip("-")[:70]
        return f"L{self.line}-{slug}"


FENCE = re.compile(r"^ {0,3}(?P<fence>`{3,})(?P<lang>[^`\s]*)\s*$")
MARKER = re.compile(r"^\s*<!--\s*readme-test:(?P<body>.*?)-->\s*$")


def parse_blocks(md: str) -> list[Block]:
    """The fenced blocks, with the skip marker that stands directly before a fence."""
    lines = md.splitlines()
    blocks: list[Block] = []
    used_markers: set[int] = set()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, lang = m["fence"], m["lang"].lower()
        j = i + 1
        while j < len(lines) and lines[j].strip() != fence:
            j += 1
        if j == len(lines):
            raise ReadmeError(f"README line {i + 1}: the fence is never closed")
        if lang not in RUN_LANGS + SHOWN_LANGS:
            raise ReadmeError(f"README line {i + 1}: a ```{lang} block: use ```bash or ```python (run by the test) "
                              "or a plain ``` (sample output)")
        k = i - 1
        while k >= 0 and not lines[k].strip():
            k -= 1
        skip = None
        if k >= 0 and (mk := MARKER.match(lines[k])):
            used_markers.add(k)
            body = mk["body"].strip()
            sm = re.fullmatch(r"skip\s*:\s*(?P<reason>.*)", body)
            if not sm:
                raise ReadmeError(f"README line {k + 1}: unknown marker {body!r}; the form is <!-- readme-test: skip: REASON -->")
            skip = sm["reason"].strip()
            if not skip:
                raise ReadmeError(f"README line {k + 1}: a skip marker needs a reason: <!-- readme-test: skip: REASON -->")
            if lang not in RUN_LANGS:
                raise ReadmeError(f"README line {k + 1}: a skip marker before a block that does not run")
        blocks.append(Block(lang, i + 1, "\n".join(lines[i + 1 : j]), skip))
        i = j + 1
    for n, line in enumerate(lines):
        if MARKER.match(line) and n not in used_markers:
            raise ReadmeError(f"README line {n + 1}: a readme-test marker must stand directly before a fence")
    return blocks


def split_comment(line: str) -> tuple[str, str]:
    """(code, comment) of one shell line: a `#` outside quotes at a word start begins a comment."""
    quote = ""
    escaped = False
    for i, ch in enumerate(line):
        if escaped:
            escaped = False
        elif ch == "\\" and quote != "'":
            escaped = True
        elif quote:
            if ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip(), line[i + 1 :].strip()
    return line.rstrip(), ""


def expected_exit(comment: str) -> int:
    """The exit code a command's own comment promises: `exits N`, `must fail` (1), else 0."""
    if m := re.search(r"\bexits (\d+)\b", comment):
        return int(m[1])
    if re.search(r"\bmust fail\b", comment):
        return 1
    return 0


def split_bash(block: Block) -> list[tuple[int, str, str]]:
    """(line, command, comment) for each command of a bash block."""
    out: list[tuple[int, str, str]] = []
    parts: list[str] = []
    start = 0
    for n, raw in enumerate(block.text.splitlines(), block.line + 1):
        line = raw.rstrip()
        if not parts:
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            start = n
        if line.endswith("\\"):  # continues on the next line
            code, comment = split_comment(line[:-1])
            if comment:
                raise ReadmeError(f"README line {n}: a comment before a line continuation")
            parts.append(code.strip())
            continue
        code, comment = split_comment(line)
        parts.append(code.strip())
        out.append((start, " ".join(p for p in parts if p), comment))
        parts = []
    if parts:
        raise ReadmeError(f"README line {start}: the block ends inside a continued command")
    return out


def extract(md: str) -> list[Command]:
    """Every command of the README, in order; those of skipped blocks carry the reason."""
    cmds: list[Command] = []
    runnable = [b for b in parse_blocks(md) if b.lang in RUN_LANGS]
    for bi, b in enumerate(runnable):
        if b.lang == "python":
            cmds.append(Command(bi, 0, b.line + 1, "python", b.text, "", 0, b.skip))
            continue
        for ci, (line, text, comment) in enumerate(split_bash(b)):
            cmds.append(Command(bi, ci, line, "bash", text, comment, expected_exit(comment), b.skip))
    return cmds


def normalize(cmd: str) -> str:
    """A command compared with inline mentions: one space between words, no .venv/bin/ prefix."""
    return re.sub(r"(^|\s)\.venv/bin/", r"\1", " ".join(cmd.split()))


# ---- running a command -------------------------------------------------------------------------

def set_overrides(args: list[str], values: dict[str, str]) -> list[str]:
    """Hydra overrides: replace the value of a key the command sets, append the others."""
    out, seen = [], set()
    for a in args:
        if "=" in a and not a.startswith("-"):
            key = a.split("=", 1)[0]
            bare = key.lstrip("+~")
            if bare in values:
                out.append(f"{key}={values[bare]}")
                seen.add(bare)
                continue
        out.append(a)
    return out + [f"{k}={v}" for k, v in values.items() if k not in seen]


def is_vaebench(prog: str) -> bool:
    return prog in ("vaebench", ".venv/bin/vaebench")


def prepare(cmd: Command, tmp: Path, files: Path) -> tuple[list[str], dict[str, str], Path]:
    """(argv, extra environment, cwd) that run `cmd` with small settings and outputs under `tmp`."""
    if cmd.lang == "python":  # a notebook snippet: it may write files into its folder, so it runs in tmp
        return [str(VENV_BIN / "python"), "-c", cmd.text], {}, tmp
    tokens = shlex.split(cmd.text)
    for op in ("|", "||", "&&", ";", ">", ">>", "<", "&"):
        if op in tokens:
            raise ReadmeError(f"README line {cmd.line}: `{op}` in a command: the test runs one program per command")
    mapped = []
    for t in tokens:
        for literal, (name, _) in USER_FILES.items():
            t = t.replace(literal, str(files / name))
        mapped.append(t.replace(RUNS, f"{tmp}/").replace(SLURM_DIR, f"{tmp}/slurm/"))
    env: dict[str, str] = {}
    while mapped and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", mapped[0]):
        k, v = mapped.pop(0).split("=", 1)
        env[k] = v
    prog, args = mapped[0], mapped[1:]
    inside = f"{tmp}/"
    if is_vaebench(prog):
        if args and args[0] == "report":
            dirs = [a for a in args[1:] if not a.startswith("-")]
            if "-o" not in args and "--out" not in args and not all(d.startswith(inside) for d in dirs):
                raise ReadmeError(f"README line {cmd.line}: `vaebench report` without -o would rebuild a folder of the "
                                  "checkout in place; give -o results/runs/NAME or report a run the block made")
        elif args and args[0] == "compare":
            if "-o" not in args and "--out" not in args:
                raise ReadmeError(f"README line {cmd.line}: `vaebench compare` without -o writes ./compare.md into the "
                                  "checkout; give -o results/runs/NAME.md")
        elif args and args[0] == "history":
            if "-o" not in args and "--out" not in args:
                raise ReadmeError(f"README line {cmd.line}: `vaebench history` without -o writes ./history/ into the "
                                  "checkout; give -o results/runs/NAME")
        elif args and args[0] == "env":
            raise ReadmeError(f"README line {cmd.line}: `vaebench env` builds a 3 GB environment from the registry: put "
                              "it in a block marked skip (CI builds one in `make release-check`)")
        elif not any(a.startswith("--") for a in args):  # a run or a sweep (not --help, --cfg ...)
            for a in args:
                if a.startswith(("hydra.run.dir=", "hydra.sweep.dir=")) and not a.split("=", 1)[1].startswith(inside):
                    raise ReadmeError(f"README line {cmd.line}: {a}: a run folder must be under results/runs/")
            conv = any(a.lstrip("+") in ("experiment=conv", "model=conv") for a in args)
            args = set_overrides(args, {**SHRINK, **(CONV_SHRINK if conv else {}), "out_dir": str(tmp)})
        return [prog, *args], env, ROOT
    if prog == "scripts/slurm-local":  # the block's own cluster, in its folder, on free ports
        if args[:1] not in (["start"], ["stop"], ["status"]):
            raise ReadmeError(f"README line {cmd.line}: the test runs `scripts/slurm-local` start, status and stop only")
        env.update(SLURM_LOCAL_DIR=f"{tmp}/slurm", SLURM_LOCAL_PORT=str(_free_port_pair()))
        return [str(ROOT / prog), *args], env, ROOT
    if prog == "make":
        targets = [a for a in args if "=" not in a and not a.startswith("-")]
        make_vars = {a.split("=", 1)[0] for a in args if "=" in a}
        if targets == ["run"]:
            shrink = " ".join(shlex.quote(o) for o in set_overrides([], {**SHRINK, "out_dir": str(tmp)}))
            if "ARGS" in make_vars:
                args = [f"{a} {shrink}" if a.startswith("ARGS=") else a for a in args]
            else:
                env["ARGS"] = f"{env.get('ARGS', '')} {shrink}".strip()
        elif targets == ["test"]:
            args = [a for a in args if not a.startswith("PYTEST=")]
            env["PYTEST"] = MAKE_TEST_PYTEST
        elif targets == ["gpu-reference"]:
            if not any(a.startswith("ARGS=") and "--dry-run" in a for a in args):
                raise ReadmeError(f"README line {cmd.line}: `make gpu-reference` needs a GPU: only its dry run "
                                  "(ARGS=--dry-run) runs here")
        elif targets == ["release-check"]:  # builds a 3 GB environment from the registry: CI's .ci/run runs it
            if any(a.startswith("ARGS=") for a in args):
                raise ReadmeError(f"README line {cmd.line}: the test runs `make release-check` as a dry run; give it no ARGS")
            env["ARGS"] = f"--dry-run --out {tmp}/release-check"
        elif targets != ["help"]:
            raise ReadmeError(f"README line {cmd.line}: the test does not know how to run `make {' '.join(targets)}` "
                              "with small settings: teach tests/test_readme.py")
        # a stale stamp (pyproject edited since the install) would reinstall from the network
        return ["make", "-o", ".venv/.installed", *args], env, ROOT
    raise ReadmeError(f"README line {cmd.line}: the test does not know how to run `{prog}` with small settings: "
                      "teach tests/test_readme.py")


@dataclass
class Ran:
    argv: list[str]
    returncode: int
    output: str
    seconds: float


#: README commands run side by side, this many at a time (a CLI run spends much of its time
#: importing and compiling on one core); the commands of a block that uses a run folder an
#: earlier one made keep their order, one after another
JOBS = int(os.environ.get("VAEBENCH_README_JOBS", "2"))


@dataclass
class Runner:
    """Runs the README's commands; a block's commands share one folder and run in order, so
    a command that uses the previous one's run folder can be run (and selected) on its own.
    `start` runs the selected commands ahead, JOBS at a time: a block whose commands name a run
    folder (`results/runs/`) or resume one is one unit, in order; any other command is a unit of
    its own. `run` then waits for its command."""

    base: Path
    commands: list[Command]
    done: dict[tuple[int, int], Ran] = field(default_factory=dict)
    units: dict[tuple[int, int], Future[None]] = field(default_factory=dict)

    def files(self) -> Path:
        folder = self.base / "user-files"
        if not folder.exists():
            folder.mkdir(parents=True)
            for name, make in USER_FILES.values():
                make(folder / name)
        return folder

    def start(self, wanted: list[Command], pool: ThreadPoolExecutor) -> None:
        self.files()
        chains: list[list[Command]] = []
        for block in dict.fromkeys(c.block for c in wanted):
            last = max(c.index for c in wanted if c.block == block)
            cmds = [c for c in self.commands if c.block == block and c.index <= last and not c.skip]
            if any(RUNS in c.text or "resume=" in c.text for c in cmds):  # they use what an earlier one made
                chains.append(cmds)
            else:
                chains.extend([c] for c in cmds)
        for chain in chains:
            fut = pool.submit(lambda ch=chain: [self._run(c) for c in ch] and None)
            for c in chain:
                self.units[(c.block, c.index)] = fut

    def run(self, cmd: Command) -> Ran:
        key = (cmd.block, cmd.index)
        if key in self.units:
            self.units[key].result()
        if key in self.done:
            return self.done[key]
        for before in self.commands:
            if before.block == cmd.block and before.index < cmd.index:
                self.run(before)
        return self._run(cmd)

    def _run(self, cmd: Command) -> Ran:
        key = (cmd.block, cmd.index)
        tmp = self.base / f"block-L{min(c.line for c in self.commands if c.block == cmd.block)}"
        tmp.mkdir(parents=True, exist_ok=True)
        argv, extra, cwd = prepare(cmd, tmp, self.files())
        env = {k: v for k, v in os.environ.items() if k not in MAKE_ENV}
        env.update(PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", PYTHONUNBUFFERED="1", **extra)
        t0 = time.perf_counter()
        try:
            r = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
            ran = Ran(argv, r.returncode, r.stdout + r.stderr, time.perf_counter() - t0)
        except subprocess.TimeoutExpired as exc:
            out = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            ran = Ran(argv, -1, f"{out}\n(timed out after 900 s)", time.perf_counter() - t0)
        self.done[key] = ran
        return ran


def _without_slurm(commands: list[Command]) -> list[Command]:
    """A block that starts the local SLURM cluster is skipped where SLURM is not installed (as
    the cluster tests are), unless VAEBENCH_REQUIRE_SLURM=1 (CI, which installs it)."""
    import shutil

    if shutil.which("slurmctld") or os.environ.get("VAEBENCH_REQUIRE_SLURM") == "1":
        return commands
    import dataclasses

    blocks = {c.block for c in commands if c.text.startswith("scripts/slurm-local")}
    return [dataclasses.replace(c, skip=c.skip or "SLURM is not installed (scripts/slurm-local install)")
            if c.block in blocks else c for c in commands]


COMMANDS = _without_slurm(extract(README.read_text(encoding="utf-8")))


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Runner]:
    """The README runner, with this session's selected commands already started (JOBS at a time)."""
    r = Runner(tmp_path_factory.mktemp("readme"), COMMANDS)
    wanted = [it.callspec.params["cmd"] for it in request.session.items
              if getattr(it, "originalname", "") == "test_readme_command" and hasattr(it, "callspec")]
    with ThreadPoolExecutor(max(1, JOBS)) as pool:
        r.start([c for c in wanted if not c.skip], pool)
        yield r
        for f in r.units.values():
            f.cancel()


def _params() -> list[object]:
    out: list[object] = []
    for c in COMMANDS:
        marks = [pytest.mark.skip(reason=f"README line {c.line}: {c.skip}")] if c.skip else []
        out.append(pytest.param(c, id=c.id, marks=marks))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("cmd", _params())
def test_readme_command(cmd: Command, runner: Runner) -> None:
    r = runner.run(cmd)  # after the block's earlier commands, whose folders it may use
    print(f"README line {cmd.line}: exit {r.returncode} in {r.seconds:.1f} s: {shlex.join(r.argv)}")
    earlier = [f"README line {c.line} exited {runner.done[(c.block, c.index)].returncode}, not {c.expect}"
               for c in COMMANDS if c.block == cmd.block and c.index < cmd.index
               and runner.done[(c.block, c.index)].returncode != c.expect]
    assert r.returncode == cmd.expect, (
        f"README line {cmd.line}: `{cmd.text}` exited {r.returncode}; the README promises {cmd.expect}.\n"
        + (f"(earlier in its block: {'; '.join(earlier)})\n" if earlier else "")
        + f"ran as: {shlex.join(r.argv)}\n--- output (tail) ---\n{r.output[-4000:]}")


# ---- the extractor itself, the markers, the substitutions, links -------------------------------

SAMPLE = """\
# Title

```bash
make run    # the default suite
# a comment line
vaebench measure=gradflow model.stop_gradient_z=true   # negative control: exits 1
vaebench measure=conformance \\
    measure.conformance.plant=lr 'measure.snr.ks=[1,10]'  # must fail
vaebench report "a # b"   # a hash inside quotes is not a comment
```

```
sample output: not a command
```

<!-- readme-test: skip: needs a CUDA machine -->
```bash
.venv/bin/vaebench framework.device=gpu
```

```python
print("hello")
```
"""


def test_extractor_on_a_sample() -> None:
    cmds = extract(SAMPLE)
    assert [(c.text, c.expect, c.skip) for c in cmds] == [
        ("make run", 0, None),
        ("vaebench measure=gradflow model.stop_gradient_z=true", 1, None),
        ("vaebench measure=conformance measure.conformance.plant=lr 'measure.snr.ks=[1,10]'", 1, None),
        ('vaebench report "a # b"', 0, None),
        (".venv/bin/vaebench framework.device=gpu", 0, "needs a CUDA machine"),
        ('print("hello")', 0, None),
    ]
    assert [c.line for c in cmds] == [4, 6, 7, 9, 18, 22]
    assert cmds[2].id.startswith("L7-vaebench-measure=conformance-measure.conformance.plant=lr")


@pytest.mark.parametrize("bad, message", [
    pytest.param("<!-- readme-test: skip -->\n```bash\nmake run\n```\n", "unknown marker", id="skip-without-colon"),
    pytest.param("<!-- readme-test: skip: -->\n```bash\nmake run\n```\n", "needs a reason", id="skip-without-reason"),
    pytest.param("<!-- readme-test: skip:   -->\n\n```bash\nmake run\n```\n", "needs a reason", id="skip-blank-reason"),
    pytest.param("<!-- readme-test: skip: no GPU -->\ntext\n```bash\nmake run\n```\n", "directly before a fence",
                 id="marker-away-from-fence"),
    pytest.param("```sh\nmake run\n```\n", "```sh block", id="unknown-language"),
    pytest.param("```bash\nmake run\n", "never closed", id="unclosed-fence"),
    pytest.param("```bash\nvaebench \\\n```\n", "inside a continued command", id="dangling-continuation"),
])
def test_extractor_refuses(bad: str, message: str) -> None:
    with pytest.raises(ReadmeError, match=re.escape(message)):
        extract(bad)


def test_the_readme_commands_are_found() -> None:
    """A README edit that hides its commands from the extractor fails here."""
    texts = {normalize(c.text): c for c in COMMANDS if c.lang == "bash"}
    assert len(COMMANDS) >= 20
    assert texts["make run"].expect == 0 and texts["make test"].expect == 0
    assert texts["vaebench measure=gradflow model.stop_gradient_z=true"].expect == 1
    assert any(c.expect == 1 and "measure.conformance.plant=" in c.text for c in COMMANDS)
    assert any("hydra/launcher=joblib" in c.text and not c.skip for c in COMMANDS)
    assert any(c.lang == "python" and "load_backend" in c.text and not c.skip for c in COMMANDS)
    assert all(c.expect in (0, 1) for c in COMMANDS)


def test_skipped_blocks_are_few_and_say_why(capsys: pytest.CaptureFixture[str]) -> None:
    skipped = [b for b in parse_blocks(README.read_text(encoding="utf-8")) if b.skip]
    with capsys.disabled():
        for b in skipped:
            print(f"\nREADME block at line {b.line} is not run: {b.skip}")
    assert len(skipped) <= MAX_SKIPPED, [f"line {b.line}: {b.skip}" for b in skipped]


def test_every_command_can_be_prepared(tmp_path: Path) -> None:
    """No placeholder, no unknown program, no write into the checkout (fast: nothing runs)."""
    for c in COMMANDS:
        if c.skip:
            continue
        if c.lang == "bash":
            assert not re.search(r"\.\.\.|<[a-z-]+>|…", c.text), f"README line {c.line}: a placeholder in {c.text!r}"
        argv, _, _ = prepare(c, tmp_path, tmp_path)
        if c.lang == "bash" and is_vaebench(argv[0]) and argv[1:2] not in (["report"], ["compare"], ["history"]) \
                and not any(a.startswith("--") for a in argv[1:]):
            assert f"out_dir={tmp_path}" in argv and "measure.convergence.epochs=1" in argv


def test_shrink_replaces_a_key_the_command_sets() -> None:
    args = set_overrides(["measure=snr", "measure.snr.draws=600000", "+measure.convergence.epochs=30"],
                         {"measure.snr.draws": "200", "measure.convergence.epochs": "1", "progress": "false"})
    assert args == ["measure=snr", "measure.snr.draws=200", "+measure.convergence.epochs=1", "progress=false"]


def test_shrink_keys_are_config_keys() -> None:
    """A renamed setting fails here at once, not only when the slow commands run."""
    from tests.conftest import make_config

    for keys, config in ((SHRINK, make_config()), (CONV_SHRINK, make_config(model={"kind": "conv"}))):
        for key in keys:
            node: object = config
            for part in key.split("."):
                assert hasattr(node, part), f"SHRINK names {key}, which the config schema lacks"
                node = getattr(node, part)


def test_user_files_occur_in_the_readme() -> None:
    md = README.read_text(encoding="utf-8")
    for literal in USER_FILES:
        assert literal in md, f"USER_FILES names {literal}, which the README no longer uses: remove it from the table"


def _prose(md: str) -> str:
    """The README without its fenced blocks."""
    out, fence = [], ""
    for line in md.splitlines():
        m = FENCE.match(line)
        if fence:
            if line.strip() == fence:
                fence = ""
        elif m:
            fence = m["fence"]
        else:
            out.append(line)
    return "\n".join(out)


#: inline spans that name a subcommand rather than give a command
NAMES = {"vaebench report", "vaebench compare"}
PROGRAMS = ("vaebench", "make", "python", "python3", "pip", "pytest")


def test_inline_commands_are_run() -> None:
    """A complete command in the prose (in backticks) must also stand in a block the test runs."""
    md = README.read_text(encoding="utf-8")
    run = {normalize(c.text) for c in COMMANDS if c.lang == "bash" and not c.skip}
    missing = []
    for span in re.findall(r"`([^`]+)`", _prose(md)):
        text = normalize(span)
        words = text.split()
        if len(words) >= 2 and words[0] in PROGRAMS and text not in NAMES and text not in run:
            missing.append(text)
    assert not missing, f"commands in the prose that no block runs (put them in a ```bash block): {missing}"


def _tracked() -> set[str] | None:
    """Files git tracks or would track (not ignored); None outside a git checkout. In a fresh clone,
    as in CI, a file that exists is a committed one."""
    if not (ROOT / ".git").exists():
        return None
    r = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                       capture_output=True, text=True)
    return set(r.stdout.splitlines()) if r.returncode == 0 else None


#: backtick spans that start like this are paths in the repository
REPO_PATHS = ("results/reference/", "conf/", "harness/", "impls/", "tests/", ".ci/")


def test_links_and_paths_exist() -> None:
    """Every relative link or image, and every repository path in backticks, exists and is not
    ignored by git (so a fresh clone has it)."""
    md = README.read_text(encoding="utf-8")
    prose = _prose(md)
    links = [t.split("#")[0] for t in re.findall(r"!?\[[^\]]*\]\(([^)\s]+)[^)]*\)", prose)]
    links = [t for t in links if t and not re.match(r"^[a-z][a-z0-9+.-]*:", t)]
    paths = [s.strip() for s in re.findall(r"`([^`\s]+)`", prose)
             if s.startswith(REPO_PATHS) and not re.search(r"[<>*{}]|\.\.\.", s)]
    assert links, "no relative links found: the link pattern is broken"
    tracked = _tracked()
    bad = []
    for p in dict.fromkeys(links + paths):
        target = ROOT / p
        if not target.exists():
            bad.append(f"{p}: does not exist")
        elif tracked is not None:
            rel = p.rstrip("/")
            if rel not in tracked and not any(t.startswith(rel + "/") for t in tracked):
                bad.append(f"{p}: ignored by git: a fresh clone lacks it")
    assert not bad, bad

