"""README.md and docs/*.md run as written (issue 21): every fenced Python and shell snippet is run.

A page's snippets run in order, as a reader would follow it, in one scratch folder that mirrors the
repository (src, tests, benchmarks, docs and .ci linked; configs and examples copied, so a snippet
that writes there cannot touch the checkout), with the venv's `cogvlm` and `python` first on PATH,
HF_HUB_OFFLINE=1 and an empty Hugging Face home: only the shipped default model and the
repository's files are there, nothing is downloaded.

What a fence holds decides how it runs:
- ```python: a script that must exit 0, or a doctest session (`>>>` lines) whose shown outputs must
  match (ELLIPSIS on);
- ```bash, ```sh, ```shell: a script run by `bash -e -o pipefail`;
- ```console: `$ COMMAND` lines, each followed by its stdout as shown (ELLIPSIS on);
- ```text, ```json, ```yaml: shown data, never run; a fence without a language is refused.

Markers, an HTML comment on the line right before a fence:
- `<!-- not-run: REASON -->`: not run (a GPU, a 17B download, a long training run, a synopsis with
  placeholders...); the reason is required, and the snippet must still parse;
- `<!-- server -->` on a shell fence holding `--port 8000`: run in the background on a free port
  instead; the later snippets of the page that name 127.0.0.1:8000 are its clients and run against it.

`pip` is a stub: it accepts `pip install` of this project (`.`, `-e .`, `".[EXTRA]"`,
`"cogvlm[EXTRA]"`) with extras the package declares and installs nothing (the test's venv has them,
as CI's does); anything else fails, so such a snippet must be marked not-run.
"""

from __future__ import annotations

import doctest
import filecmp
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # about a minute; still CPU and offline, and CI runs it (see the last test)

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PYTHON, SHELL, CONSOLE = {"python"}, {"bash", "sh", "shell"}, {"console"}
SHOWN = {"text", "json", "yaml"}
LINKED, COPIED = ("src", "tests", "benchmarks", "docs", ".ci", "pyproject.toml", "README.md"), ("configs", "examples")
MARKER = re.compile(r"^<!--\s*(not-run|server)\s*(?::\s*(.*?))?\s*-->$")
FENCE = re.compile(r"^(\s*)(```|~~~)(\S*)\s*$")
CLIENT = "127.0.0.1:8000"
TIMEOUT_S = 300
BASH = ("bash", "-e", "-o", "pipefail")


@dataclass(frozen=True)
class Snippet:
    """One fenced block: where it is, its language, its marker (if any) and its text."""

    page: Path
    line: int
    lang: str
    marker: str | None
    reason: str | None
    text: str

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def snippets(page: Path) -> list[Snippet]:
    """Every fenced block of a page, with the marker on the line before it; orphan markers are errors."""
    lines = page.read_text().splitlines()
    found, i = [], 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        marker = MARKER.match(lines[i].strip())
        if marker and not (i + 1 < len(lines) and FENCE.match(lines[i + 1])):
            raise AssertionError(f"{page.relative_to(ROOT)}:{i + 1}: a marker must be on the line right before a fence")
        if not fence:
            i += 1
            continue
        indent, chars, lang = fence.groups()
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == chars), None)
        assert end is not None, f"{page.relative_to(ROOT)}:{i + 1}: unclosed fence"
        before = MARKER.match(lines[i - 1].strip()) if i else None
        text = "".join(f"{line.removeprefix(indent)}\n" for line in lines[i + 1 : end])
        kind, reason = (before.group(1), before.group(2)) if before else (None, None)
        found.append(Snippet(page, i + 1, lang.lower(), kind, reason, text))
        i = end + 1
    return found


def test_every_snippet_is_run_or_marked_with_a_reason() -> None:
    """A new snippet cannot escape: it runs, or says why not (and still parses); fences name a language."""
    problems = []
    for snippet in (s for page in PAGES for s in snippets(page)):
        runnable = snippet.lang in PYTHON | SHELL | CONSOLE
        if not runnable and snippet.lang not in SHOWN:
            problems.append(f"{snippet.where}: fence language {snippet.lang!r}; use python, bash, console or text")
        elif snippet.marker and not runnable:
            problems.append(f"{snippet.where}: a marker on a {snippet.lang!r} fence, which never runs")
        elif snippet.marker == "not-run" and not snippet.reason:
            problems.append(f"{snippet.where}: not-run needs a reason: <!-- not-run: REASON -->")
        elif snippet.marker == "server" and (snippet.lang not in SHELL or "--port 8000" not in snippet.text):
            problems.append(f"{snippet.where}: a server snippet is a shell fence with `--port 8000`")
        elif snippet.marker == "not-run":
            error = parse_error(snippet)
            if error:
                problems.append(f"{snippet.where}: does not parse: {error}")
    assert not problems, "\n".join(problems)


def parse_error(snippet: Snippet) -> str | None:
    """Why a snippet that is not run would not even parse (None when it does)."""
    if snippet.lang in PYTHON:
        try:
            if ">>>" in snippet.text:
                doctest.DocTestParser().get_examples(snippet.text)
            else:
                compile(snippet.text, snippet.where, "exec")
        except (SyntaxError, ValueError) as error:
            return str(error)
        return None
    script = "\n".join(command for command, _ in console_commands(snippet)) if snippet.lang in CONSOLE else snippet.text
    check = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True, timeout=60)
    return check.stderr.strip() or None if check.returncode else None


def console_commands(snippet: Snippet) -> list[tuple[str, str]]:
    """A console block as (command, its shown output) pairs; `\\` continues a command."""
    pairs: list[tuple[str, list[str]]] = []
    lines = iter(snippet.text.splitlines())
    for line in lines:
        if line.startswith("$ "):
            command = line[2:]
            while command.endswith("\\"):
                command += "\n" + next(lines)
            pairs.append((command, []))
        else:
            assert pairs, f"{snippet.where}: a console block starts with a `$ ` command"
            pairs[-1][1].append(line)
    return [(command, "".join(f"{line.rstrip()}\n" for line in shown)) for command, shown in pairs]


@pytest.fixture(scope="module")
def bin_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder for the front of PATH holding the `pip` stub."""
    folder = tmp_path_factory.mktemp("bin")
    extras = sorted(metadata.metadata("cogvlm").get_all("Provides-Extra") or [])
    stub = folder / "pip"
    stub.write_text(PIP_STUB.format(python=sys.executable, extras=extras))
    stub.chmod(0o755)
    return folder


PIP_STUB = '''#!{python}
"""`pip` in the docs' snippets: accept an install of this project with declared extras; install nothing."""
import re
import sys

specs = [arg.strip("'\\"") for arg in sys.argv[2:] if not arg.startswith("-")]
wrong = [
    spec
    for spec in specs
    if not (m := re.fullmatch(r"(\\.|cogvlm)(?:\\[([\\w,-]+)\\])?", spec))
    or not set(filter(None, (m.group(2) or "").split(","))) <= set({extras!r})
]
if sys.argv[1:2] != ["install"] or not specs or wrong:
    sys.exit(f"pip stub: {{sys.argv[1:]}}: only `pip install` of this project with its extras {extras} runs here")
'''


def environment(bin_dir: Path, home: Path) -> dict[str, str]:
    """The reader's shell: the venv first on PATH, offline, an empty Hugging Face home, no proxy for localhost.

    One OpenMP thread per process: on busy shared cores, torch's spinning threads made the 50-step
    training snippet take 73 s instead of 6 (the answers are the same with any number of threads)."""
    env = {k: v for k, v in os.environ.items() if k not in ("COGVLM_API_KEY", "HF_HUB_CACHE", "HF_TOKEN")}
    env.update(
        PATH=os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), env.get("PATH", "")]),
        HF_HUB_OFFLINE="1",
        HF_HOME=str(home),
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
        OMP_NUM_THREADS="1",
    )
    return env


def scratch_repo(folder: Path) -> Path:
    """A working folder that looks like the checkout: big or read-only parts linked, the rest copied."""
    folder.mkdir()
    for name in LINKED:
        (folder / name).symlink_to(ROOT / name)
    for name in COPIED:
        shutil.copytree(ROOT / name, folder / name)
    return folder


def run_snippet(snippet: Snippet, cwd: Path, env: dict[str, str], scripts: Path, port: int | None) -> str | None:
    """Run one snippet in the page's folder; None when it ran as shown, else what went wrong."""
    text = snippet.text.replace(CLIENT, f"127.0.0.1:{port}") if port else snippet.text
    script = scripts / f"line{snippet.line}"
    if snippet.lang in PYTHON:
        script.write_text(text)
        doctest_args = ["-m", "doctest", "-o", "ELLIPSIS"] if ">>>" in text else []
        done = subprocess.run(
            [sys.executable, *doctest_args, str(script)], **run_options(cwd, env), capture_output=True, text=True
        )
        return None if done.returncode == 0 else f"exit {done.returncode}\n{done.stdout}{done.stderr[-3000:]}"
    if snippet.lang in SHELL:
        script.write_text(text)
        done = subprocess.run([*BASH, str(script)], **run_options(cwd, env), capture_output=True)
        return None if done.returncode == 0 else f"exit {done.returncode}\n{done.stderr.decode()[-3000:]}"
    return run_console(snippet, cwd, env, script)


def run_console(snippet: Snippet, cwd: Path, env: dict[str, str], script: Path) -> str | None:
    """Run a console block's commands in one shell; each command's stdout must match what the page shows."""
    pairs = console_commands(snippet)
    separator = f"--- end of command {snippet.line} ---"
    script.write_text("".join(f"{command}\necho '{separator}'\n" for command, _ in pairs))
    done = subprocess.run([*BASH, str(script)], **run_options(cwd, env), capture_output=True)
    if done.returncode:
        return f"exit {done.returncode}\n{done.stderr.decode()[-3000:]}"
    outputs = done.stdout.decode().split(f"{separator}\n")
    checker = doctest.OutputChecker()
    for (command, want), got in zip(pairs, outputs):
        got = "".join(f"{line.rstrip()}\n" for line in got.splitlines())
        if not checker.check_output(want, got, doctest.ELLIPSIS):
            return f"`$ {command}` printed:\n{got}the page shows:\n{want}"
    return None


def run_options(cwd: Path, env: dict[str, str]) -> dict:
    """subprocess keywords for a snippet: its folder and environment, no stdin, a time limit."""
    return {"cwd": cwd, "env": env, "stdin": subprocess.DEVNULL, "timeout": TIMEOUT_S}


def free_port() -> int:
    """A port nobody listens on now, for a server snippet (never the fixed 8000 the pages show)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(snippet: Snippet, cwd: Path, env: dict[str, str], scripts: Path, port: int) -> subprocess.Popen:
    """Start a server snippet in the background on `port` and wait until /health answers 200."""
    script = scripts / f"line{snippet.line}"
    script.write_text(snippet.text.replace("--port 8000", f"--port {port}"))
    log = scripts / f"line{snippet.line}.log"
    with log.open("wb") as out:
        server = subprocess.Popen(
            [*BASH, str(script)],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline and server.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as answer:
                if answer.status == 200:
                    return server
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.2)
    stop(server)
    raise AssertionError(f"{snippet.where}: the server never answered /health:\n{log.read_text()[-3000:]}")


def stop(server: subprocess.Popen) -> None:
    """End a server snippet: its shell and the server it started (one process group)."""
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_page_runs_as_written(page: Path, bin_dir: Path, tmp_path: Path) -> None:
    """Run a page's snippets in order in one folder; each must succeed and print what the page shows.
    The commands that regenerate committed files (configs/, examples/) must reproduce them exactly."""
    cwd, scripts = scratch_repo(tmp_path / "repo"), tmp_path / "scripts"
    scripts.mkdir()
    env = environment(bin_dir, tmp_path / "hf-home")
    failures: list[str] = []
    servers: list[subprocess.Popen] = []
    port = None
    try:
        for snippet in snippets(page):
            if snippet.marker == "not-run" or snippet.lang not in PYTHON | SHELL | CONSOLE:
                continue
            if snippet.marker == "server":
                port = free_port()
                servers.append(start_server(snippet, cwd, env, scripts, port))
                continue
            error = run_snippet(snippet, cwd, env, scripts, port if CLIENT in snippet.text else None)
            if error:
                failures.append(f"{snippet.where}: {error}")
    finally:
        for server in servers:
            stop(server)
    for name in COPIED:
        for committed in (p for p in (ROOT / name).rglob("*") if p.is_file()):
            copy = cwd / committed.relative_to(ROOT)
            if not (copy.is_file() and filecmp.cmp(committed, copy, shallow=False)):
                failures.append(f"{page.relative_to(ROOT)}: its snippets changed {committed.relative_to(ROOT)}")
    assert not failures, "\n\n".join(failures)


def test_ci_runs_this_module() -> None:
    """The docs test must run in CI: `.ci/run` runs pytest over tests/, and `slow` is not deselected."""
    ci = (ROOT / ".ci" / "run").read_text()
    # pytest -q over tests/ (testpaths), xdist's worker options allowed; no paths, no -m, no -k
    whole = r"HF_HUB_OFFLINE=1 \S*python\S* -m pytest -q( -n \d+ --dist \w+)?\s*(#.*)?$"
    assert re.search(whole, ci, re.M), "CI no longer runs `pytest -q` over the whole suite"
    pyproject = (ROOT / "pyproject.toml").read_text()
    addopts = re.search(r'^addopts\s*=\s*"(.*)"', pyproject, re.M)
    assert addopts is None or "not slow" not in addopts.group(1), "CI would skip the slow docs test"
