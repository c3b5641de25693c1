"""Every fenced block of README.md and docs/*.md, run or checked as the reader would use it.

The docs describe their blocks in a way this test reads:

* a YAML or Python block whose first line is a comment naming a path (``# my-recipes/x.yaml``) is a
  file the reader saves there; it is written to a scratch checkout (``configs/`` copied, cwd there);
* a YAML block whose first line is ``# excerpt of <recipe>`` quotes a shipped recipe: every key in
  it must hold that value in the recipe (after ``extends``);
* a TOML block is an entry-point declaration: it must parse and use lift3d's group;
* each command of a bash block runs in the scratch checkout, in order: ``python launch.py ...`` with
  ``--dry-run`` appended (in-process, ``exp_root_dir`` under tmp_path), the toy prior's command
  line for real (it renders one small image), ``make ...`` as ``make -n`` (its ``launch.py`` lines
  dry-run in turn), ``source .venv/bin/activate`` against what ``make setup`` creates. A
  ``launch.py`` command after ``hf download <id>`` in the docs passes when its dry run gets as far
  as the weights check and stops there for exactly an id the docs download (the weights cannot be
  here; the config has parsed strictly, every stage's slots included, by then).

A recipe file no command uses is dry-run with ``--train``. Anything else fails, naming the doc and
line, until the docs or this test say how to check it.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

import lift3d.launch as launch
import lift3d.registry as registry
from lift3d.config import load_config
from lift3d.utils.hub import MissingWeightsError

REPO = Path(__file__).resolve().parents[2]
DOCS = ["README.md"] + sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md"))
SHIPPED_EXAMPLE = REPO / "extensions" / "lift3d_example_guidance"
DRY_RUN_OK = "[lift3d] dry run OK"

# Commands that are checked, not run, and why; a make target the docs add needs its line here.
NOT_RUN = {
    "make test": "it runs this very suite; `make -n test` checks the target exists and runs pytest",
    "make demo": "it trains for a minute; `make -n demo` gives its launch.py command, which is dry-run",
    "make app": "it serves the web page until stopped; `make -n app` checks the target exists (tests/app drive the page)",
    "make setup": "it installs torch; `make -n setup` checks it creates the .venv the docs activate",
    "source .venv/bin/activate": "it changes the reader's shell; checked against what `make setup` creates",
    "hf download": "it downloads gigabytes; checked: the `hf` command exists beside this Python (huggingface_hub "
                   "installs it), takes `download`, and the id is one a shipped recipe reads",
}


@dataclass
class Block:
    doc: str
    line: int  # 1-based line of the opening fence
    lang: str
    text: str

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line}"

    @property
    def label(self) -> str:
        """The first line's comment (``my-recipes/x.yaml``, ``excerpt of ...``), or ''."""
        first = self.text.split("\n", 1)[0].strip()
        return first[1:].strip() if first.startswith("#") else ""


def doc_blocks(doc: str) -> list[Block]:
    lines = (REPO / doc).read_text().splitlines()
    out, i = [], 0
    while i < len(lines):
        m = re.match(r"^(\s*)```(\S*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        indent, lang, start, body = len(m.group(1)), m.group(2), i, []
        i += 1
        while i < len(lines) and not re.match(r"^\s*```\s*$", lines[i]):
            body.append(lines[i][indent:] if lines[i][:indent].strip() == "" else lines[i])
            i += 1
        if i == len(lines):
            raise AssertionError(f"{doc}:{start + 1}: code block never closed")
        out.append(Block(doc, start + 1, lang, "\n".join(body) + "\n"))
        i += 1
    return out


def shell_commands(block: Block) -> list[list[str]]:
    joined = re.sub(r"\\\n\s*", " ", block.text)
    return [argv for line in joined.splitlines() if (argv := shlex.split(line, comments=True))]


def _path_label(block: Block, suffixes: tuple[str, ...]) -> str | None:
    label = block.label
    return label if re.fullmatch(r"[\w./-]+", label or "-") and label.endswith(suffixes) else None


def _is_subset(part, whole, where: str = "") -> list[str]:
    """Keys of ``part`` whose values ``whole`` does not hold (lists item by item)."""
    if isinstance(part, dict):
        if not isinstance(whole, dict):
            return [f"{where or '<root>'}: the recipe has {whole!r}, not a mapping"]
        bad = []
        for k, v in part.items():
            sub = f"{where}.{k}" if where else str(k)
            bad += [f"{sub}: not in the recipe"] if k not in whole else _is_subset(v, whole[k], sub)
        return bad
    if isinstance(part, list) and isinstance(whole, list) and len(part) == len(whole) and \
            any(isinstance(v, dict) for v in part):
        return [b for i, (p, w) in enumerate(zip(part, whole)) for b in _is_subset(p, w, f"{where}[{i}]")]
    return [] if part == whole else [f"{where}: the doc says {part!r}, the recipe has {whole!r}"]


class DocRunner:
    """Runs one doc's blocks in a scratch checkout."""

    def __init__(self, doc: str, root: Path, out: Path):
        self.doc, self.root, self.out = doc, root, out
        self.used_configs: set[str] = set()
        self.downloaded: set[str] = set()  # ids of `hf download` commands read so far
        self.failures: list[str] = []

    def fail(self, block: Block, what: str) -> None:
        self.failures.append(f"{block.where}: {what}")

    # ---- blocks that are files, excerpts, declarations

    def write_files(self, blocks: list[Block]) -> list[tuple[Block, str]]:
        files = []
        for b in blocks:
            if b.lang not in ("yaml", "python"):
                continue
            path = _path_label(b, (".yaml", ".yml", ".py"))
            if path is None:
                continue
            dest = (self.root / path).resolve()
            assert self.root in dest.parents, f"{b.where}: {path} would be written outside the checkout"
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(b.text)
            files.append((b, path))
        return files

    def check_excerpt(self, b: Block, recipe: str) -> None:
        try:
            raw, _ = load_config(REPO / recipe)
        except Exception as exc:  # noqa: BLE001 - reported with the doc's line
            return self.fail(b, f"'# excerpt of {recipe}': cannot load it: {exc}")
        whole = OmegaConf.to_container(raw, resolve=False)
        for bad in _is_subset(yaml.safe_load(b.text), whole):
            self.fail(b, f"excerpt of {recipe} is not true of it: {bad}")

    def check_toml(self, b: Block) -> None:
        try:
            data = tomllib.loads(b.text)
        except tomllib.TOMLDecodeError as exc:
            return self.fail(b, f"TOML does not parse: {exc}")
        groups = data.get("project", {}).get("entry-points", {})
        if not groups:
            return self.fail(b, "a TOML block here is an entry-point declaration; this one declares none")
        for group, entries in groups.items():
            if group != registry.ENTRY_POINT_GROUP:
                self.fail(b, f"entry-point group {group!r}: lift3d reads {registry.ENTRY_POINT_GROUP!r}")
            for name, target in entries.items():
                if not re.fullmatch(r"[\w.]+(:[\w.]+)?", target):
                    self.fail(b, f"entry point {name} = {target!r} is not 'module' or 'module:attr'")

    # ---- commands

    def run_command(self, b: Block, argv: list[str]) -> None:
        cmd = " ".join(argv)
        if argv[0].endswith("/python") or argv[0].endswith("/python3"):
            return self.fail(b, f"`{cmd}`: write `python` (README's quick start activates .venv), not {argv[0]}")
        if argv[0] in ("python", "python3") and argv[1:2] == ["launch.py"]:
            return self.dry_run(b, argv[2:])
        if argv[0] in ("python", "python3") and argv[1:3] == ["-m", "lift3d.priors.toyworld"]:
            from lift3d.priors.toyworld.__main__ import main

            if argv[3:4] != ["render-image"]:
                return self.fail(b, f"`{cmd}`: only render-image is cheap enough to run here; say how to check it")
            code = main(argv[3:])
            if code:
                self.fail(b, f"`{cmd}` exited with {code}")
            return None
        if argv[0] == "make":
            return self.make(b, argv)
        if argv[:2] == ["source", ".venv/bin/activate"]:
            setup = self._make_n(b, ["setup"])  # NOT_RUN says why
            if setup is not None and not re.search(r"-m venv \.venv\b", setup):
                self.fail(b, "`source .venv/bin/activate`: `make setup` does not create .venv: " + setup)
            return None
        if argv[:2] == ["hf", "download"]:
            return self.hf_download(b, argv)
        self.fail(b, f"`{cmd}`: this test does not know how to check it (add a handler, or a NOT_RUN reason)")

    def hf_download(self, b: Block, argv: list[str]) -> None:
        hf = Path(sys.executable).with_name("hf")
        if not hf.is_file():
            return self.fail(b, f"`{' '.join(argv)}`: no `hf` command beside {sys.executable}")
        proc = subprocess.run([str(hf), "download", "--help"], capture_output=True, text=True)
        if proc.returncode != 0:
            return self.fail(b, f"`hf download --help` failed: {proc.stderr.strip()[:200]}")
        repo_id = argv[2] if len(argv) > 2 else ""
        recipes = "\n".join(p.read_text() for p in (REPO / "configs").glob("*.yaml"))
        if not repo_id or repo_id not in recipes:
            self.fail(b, f"`{' '.join(argv)}`: no recipe in configs/ reads {repo_id!r}")
        self.downloaded.add(repo_id)

    def _make_n(self, b: Block, args: list[str]) -> str | None:
        if shutil.which("make") is None:
            warnings.warn(f"{b.where}: `make {' '.join(args)}` not checked: make is not installed", stacklevel=1)
            return None
        proc = subprocess.run(["make", "-n", "-B", "-C", str(REPO), *args], capture_output=True, text=True)
        if proc.returncode != 0:
            self.fail(b, f"`make {' '.join(args)}`: `make -n` failed: {proc.stderr.strip()}")
            return None
        return proc.stdout

    def make(self, b: Block, argv: list[str]) -> None:
        targets = [a for a in argv[1:] if "=" not in a]
        unexplained = [t for t in targets if f"make {t}" not in NOT_RUN]
        if unexplained:
            return self.fail(b, f"`{' '.join(argv)}`: add why `make {unexplained[0]}` is not run to NOT_RUN")
        out = self._make_n(b, argv[1:])
        if out is None:
            return
        if "test" in targets and "pytest" not in out:
            self.fail(b, "`make test` does not run pytest")
        for line in out.splitlines():
            if "launch.py" not in line:
                continue
            words = shlex.split(line)
            if "launch.py" in words:
                self.dry_run(b, words[words.index("launch.py") + 1:], via=f"make {' '.join(argv[1:])}")

    def dry_run(self, b: Block, args: list[str], via: str = "") -> None:
        shown = "python launch.py " + " ".join(shlex.quote(a) for a in args)
        args = [re.sub(r"<([\w -]+)>", lambda m: m.group(1).replace(" ", "_"), a) for a in args]
        if "--config" in args:
            self.used_configs.add(str(Path(args[args.index("--config") + 1])))
        for a in args:
            if a.startswith("resume="):
                self._placeholder_checkpoint(Path(a.split("=", 1)[1]), args)
        argv = args + [f"exp_root_dir={self.out}", "--dry-run"]
        stdout = io.StringIO()
        try:
            with contextlib.redirect_stdout(stdout):
                code = launch.run(argv)
        except MissingWeightsError as exc:
            if any(f"`hf download {i}`" in str(exc) for i in self.downloaded):
                return None  # the docs told the reader to download exactly these weights first
            return self.fail(b, f"`{shown}` needs weights the docs do not download first: {exc}")
        except Exception as exc:  # noqa: BLE001 - every failure is reported with the doc's line
            return self.fail(b, f"`{shown}`{' (from ' + via + ')' if via else ''} fails its dry run: "
                                f"{type(exc).__name__}: {exc}")
        if code != 0 or DRY_RUN_OK not in stdout.getvalue():
            self.fail(b, f"`{shown}`: dry run returned {code}, printed {stdout.getvalue()[-500:]!r}")

    def _placeholder_checkpoint(self, ckpt: Path, args: list[str]) -> None:
        """A doc's ``resume=outputs/<name>/<trial>/ckpts/last.ckpt`` names the folder an earlier
        ``--train`` made; a dry run makes none, so an untrained system's checkpoint stands in."""
        ckpt = self.root / ckpt
        if ckpt.exists():
            return
        import torch

        from lift3d.registry import find, load_plugins

        load_plugins(self.root)
        overrides = [a for a in args if "=" in a and not a.startswith(("resume=", "-"))]
        cfg, _, prov = launch.load_experiment(args[args.index("--config") + 1], overrides)
        system = find(cfg.system_type, "system")(cfg.system, cfg_key="system", prov=prov, seed=cfg.seed)
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state_dict": system.state_dict(), "global_step": 0, "epoch": 0,
                    "lift3d": {"stage_index": 0, "stage_name": system.stage.name, "guidance_states": {}}}, ckpt)

    # ---- the whole doc

    def run(self) -> None:
        blocks = doc_blocks(self.doc)
        files = self.write_files(blocks)
        file_blocks = {id(b) for b, _ in files}
        for b in blocks:
            if id(b) in file_blocks:
                continue
            if b.lang == "yaml" and b.label.startswith("excerpt of "):
                self.check_excerpt(b, b.label[len("excerpt of "):].split()[0])
            elif b.lang == "toml":
                self.check_toml(b)
            elif b.lang in ("bash", "sh", "console"):
                for argv in shell_commands(b):
                    self.run_command(b, argv)
            else:
                self.fail(b, f"a ```{b.lang} block this test cannot check: start it with '# <path>' (a file the "
                             "reader saves) or '# excerpt of <recipe>', or make it a bash command")
        for b, path in files:
            if path.endswith((".yaml", ".yml")) and path not in self.used_configs:
                self.dry_run(b, ["--config", path, "--train"])


pytestmark = pytest.mark.usefixtures("fresh_plugins")


@pytest.mark.parametrize("doc", DOCS)
def test_doc_blocks_run_verbatim(doc, tmp_path, monkeypatch):
    root = tmp_path / "checkout"
    shutil.copytree(REPO / "configs", root / "configs")
    monkeypatch.chdir(root)
    monkeypatch.delenv("LIFT3D_EXTENSIONS", raising=False)
    runner = DocRunner(doc, root.resolve(), tmp_path / "outputs")
    if any(b.label.startswith("extensions/") and _path_label(b, (".py",)) for b in doc_blocks(doc)):
        # The doc writes its own plugin under the shipped example's name and tells the reader to
        # move the example out of extensions/ first: as if it were, it counts as already imported.
        registry._loaded_plugin_paths.add(str(SHIPPED_EXAMPLE.resolve()))
    runner.run()
    assert not runner.failures, f"{doc}: blocks that do not work as written:\n" + "\n".join(runner.failures)


def test_docs_say_python_not_a_venv_path():
    """The README's quick start activates .venv once; after that every command is plain `python`."""
    for doc in DOCS:
        text = (REPO / doc).read_text()
        for m in re.finditer(r"\S*venv/bin/python\S*", text):
            line = text.count("\n", 0, m.start()) + 1
            raise AssertionError(f"{doc}:{line}: {m.group(0)!r}: write `python` (the quick start activates .venv)")
    readme = (REPO / "README.md").read_text()
    assert "source .venv/bin/activate" in readme, "README.md never says how to activate .venv"
    assert readme.index("source .venv/bin/activate") < readme.index("python launch.py"), \
        "README.md uses `python launch.py` before it says to activate .venv"


def test_the_readme_turntable_matches_the_demo_recipe():
    """`make demo`'s turntable: the README's frame count is the demo recipe's data.n_test_views."""
    demo = re.search(r"^DEMO_CONFIG \?= (\S+)", (REPO / "Makefile").read_text(), re.M).group(1)
    raw, _ = load_config(REPO / demo)
    frames = OmegaConf.select(raw, "data.n_test_views")
    claims = re.findall(r"(\d+)-frame", (REPO / "README.md").read_text())
    assert claims, "README.md no longer states the demo's turntable length; drop this test with it"
    assert all(int(c) == frames for c in claims), \
        f"README.md says {claims}-frame turntable; {demo} renders data.n_test_views={frames}"
