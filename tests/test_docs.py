"""Every `seg-*` command in the docs is checked against the real CLIs, so the docs cannot drift.

The rule for doc authors (README.md, docs/*.md, benchmarks/**/*.md):
- Put shell commands in fenced ```sh blocks (```bash, ```shell and ```console are read the same
  way), one command per line; a trailing backslash continues a line, `#` starts a comment,
  `&&`, `||`, `;` and `|` separate commands. Do not write a prompt (`$ `) or `[optional]` brackets.
- Every command starting with `seg-` is parsed by its click command: the subcommand and the
  options must exist, required ones must be given, and values must convert (choices, ranges).
  Nothing heavy runs for that. Other commands (pip, python, cp) are not checked.
- The cheap ones also run, in a temporary directory: `--help`; `seg-run` on an .onnx model (or
  the default model) with its everyday options; `seg-train phantoms` (cut to 2 tiny cases);
  `seg-bench score`; `seg-train compare`. Placeholders need no care: a path that does not exist
  is made before the run, small: `*.onnx` a tiny model with a spec, a `.nii`/`.nii.gz` a phantom
  CT, a glob (`'scans/*.nii.gz'`) phantom CTs it matches, a `.json` a metrics file, anything
  else a directory of two labelled phantoms in the LiTS layout. The demo model is replaced by
  the tiny model too, so `seg-run --demo` runs in seconds.
- A line starting with `seg-` in a fenced block of another language fails: it would escape this check.
"""

from __future__ import annotations

import glob
import importlib
import json
import re
import shlex
import shutil
from importlib.metadata import entry_points
from pathlib import Path

import click
import pytest
from click.core import ParameterSource

from tests.conftest import run_main

ROOT = Path(__file__).resolve().parents[1]
SHELL_LANGS = {"sh", "bash", "shell", "console", "zsh"}
SEPARATORS = {"&&", "||", ";", "|", "&"}
REDIRECTS = re.compile(r"^\d*(>>?|<)")
FENCE = re.compile(r"^\s*(```+|~~~+)\s*([\w+-]*)")

# seg-run options that run quickly on a tiny model; any other option (a plan, a GPU, an extra
# installed elsewhere) is only parsed
SEG_RUN_CHEAP = {
    "inputs",
    "model",
    "out_dir",
    "demo",
    "backend",
    "provider",
    "threads",
    "streams",
    "batch_size",
    "skip_existing",
    "overlay",
    "no_postprocess",
    "fill_holes",
    "min_tumour_ml",
    "probabilities",
}


def doc_files() -> list[Path]:
    """The project's Markdown docs: README.md, docs/ and the benchmark reports' notes."""
    files = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), *sorted((ROOT / "benchmarks").rglob("*.md"))]
    return [f for f in files if f.is_file()]


def fenced_blocks(text: str) -> list[tuple[str, int, list[str]]]:
    """(language, line number of the first line inside, lines) of each fenced block."""
    blocks, lang, start, body, fence = [], None, 0, [], ""
    for number, line in enumerate(text.splitlines(), 1):
        m = FENCE.match(line)
        if fence:
            if m and m.group(1).startswith(fence) and not m.group(2):
                blocks.append((lang, start, body))
                fence = ""
            else:
                body.append(line)
        elif m:
            fence, lang, start, body = m.group(1), m.group(2).lower(), number + 1, []
    return blocks


def shell_commands(lines: list[str], first_line: int) -> list[tuple[int, list[str]]]:
    """(line number, argv) of every seg-* command in the lines of a shell block."""
    found = []
    joined, at = "", None
    for number, line in enumerate(lines, first_line):
        if at is None:
            at = number
        if line.rstrip().endswith("\\"):
            joined += line.rstrip()[:-1] + " "
            continue
        joined += line
        lexer = shlex.shlex(joined, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        tokens = list(lexer)
        joined, line_no, at = "", at, None
        segment: list[str] = []
        for tok in [*tokens, ";"]:
            if tok not in SEPARATORS:
                segment.append(tok)
                continue
            while segment and re.match(r"^[A-Za-z_]\w*=", segment[0]):  # VAR=value before a command
                segment.pop(0)
            cut = next((i for i, t in enumerate(segment) if REDIRECTS.match(t)), len(segment))
            segment = segment[:cut]
            if segment and segment[0].startswith("seg-"):
                found.append((line_no, segment))
            segment = []
    return found


def doc_commands(path: Path) -> list[tuple[int, list[str]]]:
    out = []
    for lang, start, lines in fenced_blocks(path.read_text(encoding="utf-8")):
        if lang in SHELL_LANGS:
            out += shell_commands(lines, start)
    return out


COMMANDS = [(f"{path.relative_to(ROOT)}:{line}", argv) for path in doc_files() for line, argv in doc_commands(path)]


def clis() -> dict[str, click.Command]:
    """The project's seg-* console scripts and the click command each one runs (its module's ``cli``)."""
    found = {}
    for ep in entry_points(group="console_scripts"):
        if ep.name.startswith("seg-") and ep.dist is not None and ep.dist.name == "unet-edge":
            found[ep.name] = importlib.import_module(ep.module).cli
    return found


def parse(argv: list[str]) -> tuple[click.Command, click.Context | None]:
    """Parse argv with the real click command, as the console script would; nothing is run.

    Returns the top-level command and the context of the command that would run (None for --help).
    """
    commands = clis()
    prog, args = argv[0], [a for a in argv[1:] if a != "--debug"]  # run_cli strips --debug anywhere
    if prog not in commands:
        raise click.UsageError(f"{prog} is not a console script of unet-edge (known: {sorted(commands)})")
    top = commands[prog]
    cmd, name, parent = top, prog, None
    if isinstance(top, click.Group):
        if not args or args[0] in ("-h", "--help"):
            return top, None
        parent = click.Context(top, info_name=prog)
        cmd = top.get_command(parent, args[0])
        if cmd is None:
            raise click.UsageError(f"{prog} has no subcommand {args[0]!r} (it has {sorted(top.commands)})")
        name, args = args[0], args[1:]
    if "-h" in args or "--help" in args:
        return top, None
    return top, cmd.make_context(name, list(args), parent=parent)


def given(ctx: click.Context) -> set[str]:
    """Names of the parameters the command line set."""
    return {p.name for p in ctx.command.params if ctx.get_parameter_source(p.name) == ParameterSource.COMMANDLINE}


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> Path:
    """Two labelled phantoms (64 px, 12 slices), LiTS layout, copied wherever a command wants data."""
    from runtime.phantoms import write_phantoms

    root = tmp_path_factory.mktemp("doc-cases")
    write_phantoms(root, cases=2, seed=3, size=64, slices=12, progress=False)
    return root


class Workspace:
    """A directory where a documented command runs, and the small files its placeholders stand for."""

    def __init__(self, root: Path, cases: Path):
        self.root, self.cases = root, cases

    def path(self, value) -> Path:
        p = Path(value)
        return p if p.is_absolute() else self.root / p

    def model(self, value) -> Path:
        from benchmarks.tiny_models import threshold_model

        p = self.path(value)
        if not p.exists():
            p.parent.mkdir(parents=True, exist_ok=True)
            threshold_model(p)
        return p

    def dataset(self, value) -> Path:
        p = self.path(value)
        if not p.exists():
            shutil.copytree(self.cases, p)
        return p

    def image(self, value) -> Path:
        p = self.path(value)
        if not p.exists():
            p.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(self.cases / "volume-0.nii.gz", p)
        return p

    def images(self, pattern: str) -> None:
        """Phantom CTs (no label maps) in the pattern's directory, named so that the pattern matches them."""
        parent, leaf = Path(pattern).parent, Path(pattern).name
        suffix = ".nii" if pattern.endswith(".nii") else ".nii.gz"
        wild = any(ch in leaf for ch in "*?[")
        sources = sorted(self.cases.glob("volume-*.nii.gz"))
        if any(ch in str(parent) for ch in "*?["):  # 'pats/*/ct.nii.gz': one folder per case
            for i, src in enumerate(sources):
                folder = self.path(re.sub(r"[*?]|\[[^]]*\]", f"case{i}", str(parent)))
                folder.mkdir(parents=True, exist_ok=True)
                shutil.copy(src, folder / (src.name[: -len(".nii.gz")] + suffix if wild else leaf))
        else:
            folder = self.path(parent)
            folder.mkdir(parents=True, exist_ok=True)
            for src in sources:
                shutil.copy(src, folder / (src.name[: -len(".nii.gz")] + suffix))
        if not glob.glob(str(self.path(pattern))):
            pytest.fail(f"cannot make placeholder volumes matching {pattern!r}; use a pattern like 'scans/*.nii.gz'")

    def scan_input(self, item: str) -> None:
        if any(ch in item for ch in "*?["):
            self.images(item)
        elif item.endswith((".nii", ".nii.gz")):
            self.image(item)
        else:
            self.dataset(item)

    def perfect_predictions(self, value) -> Path:
        """A directory of masks equal to the labels of the cases (as seg-run names them)."""
        p = self.path(value)
        if not p.exists():
            p.mkdir(parents=True)
            for src in self.cases.glob("segmentation-*.nii.gz"):
                shutil.copy(src, p / src.name.replace("segmentation-", "volume-").replace(".nii.gz", "_seg.nii.gz"))
        return p

    def metrics(self, value) -> Path:
        from benchmarks.parity import score

        p = self.path(value)
        if not p.exists():
            res = score(self.perfect_predictions(self.root / ".placeholder-preds"), self.cases)
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(json.dumps({"per_case": res["per_case"]}))
        return p


def runnable(argv: list[str], ctx: click.Context, ws: Workspace) -> list[str] | None:
    """The arguments to run this command with (placeholders made), or None if it is only parsed."""
    prog, args, params, names = argv[0], argv[1:], ctx.params, given(ctx)
    sub = ctx.info_name
    if prog == "seg-run":
        model = params.get("model")
        cheap = (
            names <= SEG_RUN_CHEAP
            and (model is None or str(model).endswith(".onnx"))
            and params.get("backend") in ("auto", "onnxruntime")
            and params.get("provider") in ("auto", "cpu")
        )
        if not cheap:
            return None
        if model is not None:
            ws.model(model)
        if not params.get("demo"):
            for item in params["inputs"]:
                ws.scan_input(item)
        return args
    if prog == "seg-train" and sub == "phantoms":
        return [*args, "--cases", str(min(2, params["cases"])), "--size", "64", "--slices", "12"]
    if prog == "seg-bench" and sub == "score":
        ws.perfect_predictions(params["pred_dir"])
        ws.dataset(params["label_dir"])
        return args
    if prog == "seg-train" and sub == "compare":
        for p in (params["base"], *params["others"]):
            ws.metrics(p)
        return args
    return None


@pytest.mark.parametrize("where,argv", COMMANDS, ids=[w for w, _ in COMMANDS])
def test_documented_command(where, argv, cases, tmp_path, monkeypatch, capsys):
    """The command parses with the real CLI; the cheap ones run on small placeholders and succeed."""
    shown = shlex.join(argv)
    ws = Workspace(tmp_path / "work", cases)
    ws.root.mkdir()
    monkeypatch.chdir(ws.root)
    for arg in argv[1:]:  # files an argument must name before it parses (click.Path(exists=True))
        if arg.endswith(".onnx") and not arg.startswith("-"):
            ws.model(arg)
        elif arg.endswith((".plan", ".pt")) and not arg.startswith("-"):
            ws.path(arg).parent.mkdir(parents=True, exist_ok=True)
            ws.path(arg).touch()
    try:
        top, ctx = parse(argv)
    except click.exceptions.Exit as exc:
        assert exc.exit_code == 0, f"{where}: {shown}"
        return
    except click.ClickException as exc:
        pytest.fail(f"{where}: `{shown}` does not parse: {exc.format_message()}")
    monkeypatch.setenv("UNET_EDGE_DEMO_MODEL", str(ws.model(tmp_path / "demo.onnx")))
    args = argv[1:] if ctx is None else runnable(argv, ctx, ws)
    if args is None:
        return
    code, out = run_main(top, args, capsys, prog=argv[0])
    assert code == 0, f"{where}: `{shown}` exited with {code}:\n{out[-2000:]}"
    if ctx is not None and argv[0] == "seg-run":
        out_dir = ws.path(ctx.params["out_dir"] or "seg-run-demo")
        assert list(out_dir.glob("*_seg.nii*")), f"{where}: `{shown}` wrote no mask in {out_dir}:\n{out[-2000:]}"
    if ctx is not None and ctx.info_name == "phantoms":
        assert list(ws.path(ctx.params["out_dir"]).glob("volume-*.nii.gz")), f"{where}: `{shown}` wrote no phantom"


def test_docs_hold_commands():
    """The extraction finds the README's commands, so an empty list cannot pass silently."""
    readme = {shlex.join(argv[:2]) for w, argv in COMMANDS if w.startswith("README.md:")}
    assert {"seg-run --demo", "seg-train phantoms", "seg-export onnx", "seg-bench latency"} <= readme


def test_no_seg_command_escapes_the_check():
    """No seg-* line in a block of another language, and no prompt before a command in a shell block."""
    for path in doc_files():
        for lang, start, lines in fenced_blocks(path.read_text(encoding="utf-8")):
            if lang in SHELL_LANGS:
                for number, line in enumerate(lines, start):
                    assert not re.match(r"^\s*[$%>] ", line), (
                        f"{path.relative_to(ROOT)}:{number}: drop the prompt, so that tests/test_docs.py sees the "
                        "command"
                    )
                continue
            for number, line in enumerate(lines, start):
                assert not line.lstrip().startswith("seg-"), (
                    f"{path.relative_to(ROOT)}:{number}: a seg-* command in a ```{lang or '(plain)'} block; "
                    "put commands in ```sh blocks so that tests/test_docs.py checks them"
                )


def test_each_doc_opens_with_a_paragraph():
    """Every doc under docs/ says what it is for in its first paragraph, right under the title."""
    for path in sorted((ROOT / "docs").rglob("*.md")):
        blocks = [b.strip() for b in re.split(r"\n\s*\n", path.read_text(encoding="utf-8")) if b.strip()]
        assert blocks and blocks[0].startswith("# "), f"{path.name}: starts with a '# ' title"
        first = blocks[1] if len(blocks[0].splitlines()) == 1 else "\n".join(blocks[0].splitlines()[1:])
        assert not re.match(r"^(#|```|~~~|\||[-*+] |\d+\. |>)", first), (
            f"{path.name}: the title is followed by a paragraph saying what the doc is for"
        )
        assert len(first.split()) >= 10, f"{path.name}: the opening paragraph is a sentence or more"


def test_extraction_rules(tmp_path):
    """Continuations, comments, chains and prompts-free blocks are read as the rule above says."""
    text = "\n".join(
        [
            "```sh",
            "pip install x && seg-run --demo   # a comment",
            "seg-train fit data --out runs/a \\",
            "    --epochs 2",
            "UNET_EDGE_DEMO_MODEL=m.onnx seg-run --demo > log.txt",
            "```",
            "```text",
            "seg-run not checked here",
            "```",
        ]
    )
    path = tmp_path / "x.md"
    path.write_text(text)
    assert doc_commands(path) == [
        (2, ["seg-run", "--demo"]),
        (3, ["seg-train", "fit", "data", "--out", "runs/a", "--epochs", "2"]),
        (5, ["seg-run", "--demo"]),
    ]


@pytest.mark.parametrize(
    "argv",
    [
        ["seg-run", "x.nii.gz", "--model", "m.onnx", "-o", "out", "--no-such-option"],
        ["seg-export", "quantize", "m.onnx", "--precision", "int4", "-o", "q.onnx"],
        ["seg-train", "no-such-subcommand"],
        ["seg-bench", "latency", "m.onnx", "--repeats", "0"],
        ["seg-export", "onnx", "runs/best.pt"],  # -o is required
        ["seg-nothing", "--help"],
    ],
)
def test_parse_refuses_what_the_cli_refuses(argv):
    with pytest.raises(click.ClickException):
        parse(argv)
