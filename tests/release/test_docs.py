"""The docs say what the code does: the configuration reference is generated from the settings
classes and must be fresh, and every command, file, setting and metric README.md and docs/ name
must exist (each `make` target in the Makefile, each `tuneloop ...` command and its flags by
running its `--help`, each path in the tree)."""

from __future__ import annotations

import importlib
import re
import runpy
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
# The generated reference is checked by being regenerated, not read as prose.
DOCS = [ROOT / "README.md", *sorted(p for p in (ROOT / "docs").glob("*.md") if p.name != "configuration.md")]
TOP = ("services", "tests", "charts", "deploy", "docs", "scripts", "bench", "protos", "examples")
# Written by a command the docs describe, so absent from a fresh checkout.
GENERATED = {"bench/results.json"}
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
# A code span may wrap onto the next line of its paragraph.
SPAN = re.compile(r"(?<!`)`((?:[^`\n]|\n(?!\n))+)`(?!`)")


def test_configuration_reference_is_fresh(tmp_path: Path) -> None:
    out = tmp_path / "configuration.md"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_config_docs.py"), str(out)], check=True)
    assert out.read_text() == (ROOT / "docs" / "configuration.md").read_text(), "stale: run `make docs`"


def test_every_setting_is_described() -> None:
    undocumented = [line for line in (ROOT / "docs" / "configuration.md").read_text().splitlines()
                    if line.startswith("| `") and line.rstrip().endswith("|  |")]
    assert not undocumented, undocumented


# ---- what the docs name ---------------------------------------------------------------------


def _prose(text: str) -> str:
    return FENCE.sub("", text)


def commands() -> Iterator[tuple[str, str]]:
    """(doc name, command line): every line of a fenced shell block and every code span."""
    for doc in DOCS:
        text = doc.read_text()
        for lang, body in FENCE.findall(text):
            if lang in ("bash", "sh", "shell", "console"):
                # A trailing backslash continues the command on the next line.
                for line in body.replace("\\\n", " ").splitlines():
                    if line.split("#")[0].strip():
                        yield doc.name, line.split("  #")[0].strip()
        for span in SPAN.findall(_prose(text)):
            yield doc.name, " ".join(span.replace("\\|", "|").split())


def _words(line: str) -> list[str]:
    """A command line's words, environment assignments in front of it dropped."""
    words = line.split()
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
        words.pop(0)
    return words


@cache
def make_targets() -> set[str]:
    return set(re.findall(r"^([\w.-]+):(?!=)", (ROOT / "Makefile").read_text(), re.MULTILINE))


@cache
def cli():  # noqa: ANN201 - click's Group, imported lazily
    import typer

    from tuneloop.cli import app

    return typer.main.get_command(app)


def _check_tuneloop(words: list[str]) -> tuple[list[list[str]], str | None]:
    """The command paths `words` (what follows `tuneloop`) name, one per alternative where the
    last subcommand word gives several (`train sft|dpo`), and what is wrong with them."""
    paths: list[list[str]] = [[]]
    command = cli()
    rest = list(words)
    while rest and hasattr(command, "commands"):  # a group
        word = rest[0]
        if word in ("...", "…"):
            return paths, None
        if word.startswith("-"):
            break
        alternatives = word.split("|")
        missing = [a for a in alternatives if a not in command.commands]
        if missing:
            return paths, f"no subcommand {' or '.join(missing)} of `tuneloop {' '.join(paths[0])}`"
        paths = [[*paths[0], a] for a in alternatives]
        command = command.commands[alternatives[0]]
        rest.pop(0)
    options = _options(command)
    for word in rest:
        flag = word.strip("[]").split("=")[0]
        if flag.startswith("-") and flag not in options:
            return paths, f"`tuneloop {' '.join(paths[0])}` has no option {flag}"
    return paths, None


def _options(command) -> set[str]:  # noqa: ANN001
    return {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}


def _problems() -> Iterator[str]:
    values = yaml.safe_load((ROOT / "charts" / "tuneloop" / "values.yaml").read_text())
    profiles = {profile["name"] for part in yaml.safe_load_all((ROOT / "skaffold.yaml").read_text())
                if isinstance(part, dict) for profile in part.get("profiles", [])}
    tuneloop_paths: list[list[str]] = []
    for doc, line in commands():
        words = _words(line)
        if not words:
            continue
        head = words[0]
        if head == "make":
            # Words with "=" set make variables (`make demo BEHAVIOUR=concise`).
            for target in (w for w in words[1:] if not w.startswith("-") and "=" not in w):
                if target not in make_targets():
                    yield f"{doc}: `{line}`: no make target {target!r}"
        elif head == "tuneloop" or (head == "torchrun" and "tuneloop.trainer.cli" in words):
            rest = words[1:] if head == "tuneloop" else ["train", *words[words.index("tuneloop.trainer.cli") + 1:]]
            paths, problem = _check_tuneloop(rest)
            if problem:
                yield f"{doc}: `{line}`: {problem}"
            tuneloop_paths += paths
        elif head in ("helm", "skaffold"):
            for flag, value in zip(words, words[1:], strict=False):
                if flag == "--set" and _lookup(values, value.split("=")[0]) is None:
                    yield f"{doc}: `{line}`: the chart has no value {value.split('=')[0]}"
                if head == "skaffold" and flag == "-p" and value not in profiles:
                    yield f"{doc}: `{line}`: skaffold has no profile {value!r}"
        elif head == "--set":
            for key in re.findall(r"--set ([\w.]+)=", line):
                if _lookup(values, key) is None:
                    yield f"{doc}: `{line}`: the chart has no value {key}"
        elif head == "pytest":
            for path in (w for w in words[1:] if not w.startswith("-")):
                if not (ROOT / path.split("::")[0]).exists():
                    yield f"{doc}: `{line}`: no test file {path}"
    # Running --help proves the command loads and parses, not only that it is declared.
    from typer.testing import CliRunner

    from tuneloop.cli import app

    for path in sorted({tuple(p) for p in tuneloop_paths}):
        result = CliRunner().invoke(app, [*path, "--help"])
        if result.exit_code != 0:
            yield f"`tuneloop {' '.join(path)} --help` exits {result.exit_code}: {result.output[-300:]}"


def _lookup(values: dict, key: str) -> object | None:
    node: object = values
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node if node is not None else ""


def test_every_command_the_docs_give_exists() -> None:
    problems = list(_problems())
    assert not problems, "\n".join(problems)


def test_every_file_the_docs_name_exists() -> None:
    missing = []
    for doc in DOCS:
        text = doc.read_text()
        named = [s for s in SPAN.findall(_prose(text)) if re.fullmatch(rf"(?:{'|'.join(TOP)})(?:/[\w.@-]+)*/?", s)]
        named += [w for _, body in FENCE.findall(text) for w in re.findall(rf"\b(?:{'|'.join(TOP)})/[\w./-]+", body)]
        for target in re.findall(r"\]\(([^)#\s]+)(#[^)\s]*)?\)", text):
            if not re.match(r"\w+://", target[0]):
                named.append(target[0])
                if target[1]:
                    anchors = {_anchor(h) for h in re.findall(r"^#+ (.+)$", (doc.parent / target[0]).read_text()
                                                             if (doc.parent / target[0]).is_file() else "", re.M)}
                    if target[1][1:] not in anchors:
                        missing.append(f"{doc.name}: {target[0]}{target[1]} (no such heading)")
        for path in named:
            if path.rstrip("/") not in GENERATED and not (doc.parent / path).exists() and not (ROOT / path).exists():
                missing.append(f"{doc.name}: {path}")
        for anchor in re.findall(r"\]\(#([^)]+)\)", text):
            if anchor not in {_anchor(h) for h in re.findall(r"^#+ (.+)$", _prose(text), re.M)}:
                missing.append(f"{doc.name}: #{anchor} (no such heading)")
    assert not missing, missing


def _anchor(heading: str) -> str:
    """The anchor GitHub gives a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_setting_the_docs_name_exists() -> None:
    reference = runpy.run_path(str(ROOT / "scripts" / "gen_config_docs.py"))["render"]()
    source = "\n".join(p.read_text() for p in (ROOT / "services").rglob("*.py"))
    unknown = []
    for doc in DOCS:
        for name in set(re.findall(r"\bTUNELOOP_[A-Z0-9_*]+[A-Z0-9]", doc.read_text())):
            pattern = re.compile(re.escape(name).replace(r"\*", r"[A-Z0-9_]+"))
            if not pattern.search(reference) and not pattern.search(source):
                unknown.append(f"{doc.name}: {name}")
    assert not unknown, unknown


def test_every_metric_and_module_the_docs_name_exists() -> None:
    source = "\n".join(p.read_text() for p in (ROOT / "services").rglob("*.py"))
    unknown = []
    for doc in DOCS:
        for span in SPAN.findall(_prose(doc.read_text())):
            metric = re.fullmatch(r"(tuneloop_[a-z0-9_]+)(\{.*\})?", span)
            # prometheus_client adds a counter's _total itself.
            if metric and metric.group(1) not in source and metric.group(1).removesuffix("_total") not in source:
                unknown.append(f"{doc.name}: metric {span}")
            ref = re.fullmatch(r"tuneloop((?:\.\w+)+)", span)
            if ref and not re.search(r"\.v\d+\b", span) and (ROOT / "services" / ref.group(1).split(".")[1]).is_dir():
                if not _resolves(span):
                    unknown.append(f"{doc.name}: {span}")
    assert not unknown, unknown


def _resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for cut in range(len(parts), 1, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_python_examples_compile(doc: Path) -> None:
    for lang, body in FENCE.findall(doc.read_text()):
        if lang == "python":
            compile(body, str(doc), "exec")
