"""README.md and docs/*.md checked against the code, so the manual cannot drift from it.

A renamed flag, a removed subcommand, a config key that moved sections or a page that was
renamed all leave the prose looking fine while the commands in it stop working. These tests read
the Markdown with the same parser GitHub-style renderers use (markdown-it, shipped with rich) and
ask cadence's own argparse parser and config schema about every command, config fragment and
link in it. Nothing is trained and nothing is written outside pytest's tmp_path: once cadence
is imported, the checks take well under a second, plus the first import of cadence.bench (for
the comparison spec) where no other test has paid for it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import re
import shlex
import typing
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from markdown_it import MarkdownIt

from cadence.cli.main import build_parser
from cadence.config import Config, ConfigError, parse_override, recipe_names
from cadence.config.typed import build_typed

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"

# Tokens that mark a synopsis rather than a command someone would type: optional parts in
# brackets, alternatives, ellipses and upper-case metavariables (CONFIG, RUN_DIR, KEY=VALUE, N).
_METAVAR = re.compile(r"[A-Z][A-Z0-9_]*(=[A-Z][A-Z0-9_]*)?")
_CONTROL = {"&&", "||", ";", "&", "|"}
_HEREDOC = re.compile(r"<<-?\s*['\"]?(\w+)['\"]?")
_ENV_ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=")
# Sections a config YAML may hold besides the Config fields; read by their commands, not Config.
_CONFIG_EXTRAS = {"search", "description"}


@dataclasses.dataclass(frozen=True)
class Block:
    page: Path
    line: int  # 1-based line of the block's first content line
    lang: str
    text: str
    inline: bool = False  # quoted in prose: may name a command without its required arguments


@dataclasses.dataclass(frozen=True)
class Command:
    page: Path
    line: int
    argv: tuple[str, ...]  # what follows `cadence` (or `-m cadence`)
    inline: bool = False

    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}: cadence {shlex.join(self.argv)}"


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


@cache
def _tokens(page: Path) -> list[Any]:
    return MarkdownIt("commonmark").enable("table").parse(page.read_text(encoding="utf-8"))


def code_blocks() -> list[Block]:
    """Fenced and indented code blocks of every page (an indented block holds the README's
    first commands)."""
    blocks = []
    for page in pages():
        for tok in _tokens(page):
            if tok.type in ("fence", "code_block") and tok.map:
                first = tok.map[0] + (2 if tok.type == "fence" else 1)
                lang = tok.info.split()[0].lower() if tok.info.strip() else ""
                blocks.append(Block(page, first, lang, tok.content))
    return blocks


def inline_commands() -> list[Block]:
    """Commands quoted in the prose (`cadence train --set ...`), as one-line blocks."""
    found = []
    for page in pages():
        for tok in _tokens(page):
            for child in tok.children or []:
                if child.type == "code_inline" and child.content.startswith("cadence "):
                    line = tok.map[0] + 1 if tok.map else 0
                    found.append(Block(page, line, "", child.content, inline=True))
    return found


def _strip_comment(line: str) -> str:
    """Drop a shell comment: a `#` at a word's start, outside quotes (as bash reads it)."""
    quote = ""
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def _logical_lines(block: Block) -> Iterator[tuple[int, str]]:
    """(line number, text) of each shell line: continuations joined, heredoc bodies skipped,
    and only the `$ ` lines where a block shows prompts (the rest is output)."""
    raw = block.text.splitlines()
    prompted = any(line.startswith("$ ") for line in raw)
    heredoc_end = None
    pending: list[str] = []
    start = 0
    for offset, line in enumerate(raw):
        number = block.line + offset
        if heredoc_end is not None:
            if line.strip() == heredoc_end:
                heredoc_end = None
            continue
        if not pending:
            start = number
            if prompted:
                if not line.startswith("$ "):
                    continue
                line = line[2:]
        if line.endswith("\\"):
            pending.append(line[:-1])
            continue
        text = " ".join([*pending, line]).strip()
        pending = []
        match = _HEREDOC.search(text)
        if match:
            heredoc_end = match.group(1)
        yield start, text


def _is_placeholder(token: str) -> bool:
    return (
        "..." in token
        or token.startswith("[")
        or ("|" in token and token != "|")
        or _METAVAR.fullmatch(token) is not None
    )


def _invocations(tokens: list[str]) -> Iterator[list[str]]:
    """The arguments of each `cadence` call in a shell line (`a && cadence ...`, `torchrun ...
    -m cadence ...`), each cut at the next control operator or redirection."""
    segment: list[str] = []
    for token in [*tokens, ";"]:
        if token not in _CONTROL:
            segment.append(token)
            continue
        words = [t for t in segment if not t.startswith((">", "<", "2>"))]
        while words and _ENV_ASSIGNMENT.match(words[0]):
            words = words[1:]
        if words and words[0] == "cadence":
            yield words[1:]
        elif "-m" in words[:-1] and words[words.index("-m") + 1] == "cadence":
            yield words[words.index("-m") + 2 :]
        segment = []


@cache
def commands() -> tuple[list[Command], list[str], list[tuple[str, str]]]:
    """Every concrete `cadence` command in the docs, the lines that could not be read, and the
    synopsis lines (place, text) that were not parsed as commands."""
    found, unreadable, synopses = [], [], []
    mentions = re.compile(r"(^|[\s;&|])cadence(\s|$)")
    for block in code_blocks() + inline_commands():
        if block.lang not in ("", "bash", "sh", "shell", "console", "text"):
            continue
        for number, text in _logical_lines(block):
            if not mentions.search(text):
                continue
            where = f"{block.page.relative_to(ROOT)}:{number}"
            try:
                tokens = shlex.split(_strip_comment(text))
            except ValueError as exc:
                unreadable.append(f"{where}: {exc}: {text}")
                continue
            if any(_is_placeholder(t) for t in tokens):
                synopses.append((where, _strip_comment(text)))
                continue
            found.extend(
                Command(block.page, number, tuple(a), block.inline) for a in _invocations(tokens)
            )
    return found, unreadable, synopses


def _strict(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The real parser, except that abbreviated flags are refused: a doc spelling `--max-new`
    would run today and break when another flag shares the prefix."""
    parser.allow_abbrev = False
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _strict(sub)
    return parser


def _parse(parser: argparse.ArgumentParser, argv: tuple[str, ...]) -> argparse.Namespace | str:
    """The namespace, or argparse's own error message (it exits rather than raising)."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            return parser.parse_args(list(argv))
    except SystemExit as exc:
        if exc.code == 0:  # --help
            return argparse.Namespace()
        return err.getvalue().strip().splitlines()[-1]


def check_keys(parts: list[str]) -> str | None:
    """Why a dotted key is not a Config key, or None: each part must be a field of the section
    above it; a free-form mapping (model.hf_config) accepts any keys below it."""
    cls: Any = Config
    for i, part in enumerate(parts):
        fields = {f.name for f in dataclasses.fields(cls)}
        if part not in fields:
            where = ".".join(parts[:i]) or "config"
            return f"{'.'.join(parts)}: {where} has no key {part!r}"
        tp = typing.get_type_hints(cls)[part]
        if not dataclasses.is_dataclass(tp):
            free_form = typing.get_origin(tp) is dict or any(
                typing.get_origin(a) is dict for a in typing.get_args(tp)
            )
            if i < len(parts) - 1 and not free_form:
                return f"{'.'.join(parts)}: {'.'.join(parts[: i + 1])} is not a section"
            return None
        cls = tp
    return f"{'.'.join(parts)}: is a section, not a key"


def _nest(parts: list[str], value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {parts[-1]: value}
    for part in reversed(parts[:-1]):
        out = {part: out}
    return out


def check_override(text: str) -> str | None:
    """Why `--set TEXT` would be refused for its key or the value's type, or None. Only the
    key's own rules: whether the value suits the workload or a file exists is the run's to
    check, and the docs name files the reader creates."""
    try:
        parts, value = parse_override(text)
    except ConfigError as exc:
        return str(exc)
    problem = check_keys(parts)
    if problem:
        return problem
    try:
        build_typed(Config, _nest(parts, value))
    except ConfigError as exc:
        return str(exc)
    return None


# ---------------------------------------------------------------- the tests


def test_docs_exist_and_readme_is_a_front_page() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(readme) < 200, f"README.md has {len(readme)} lines; move detail into docs/"
    assert sorted(DOCS.glob("*.md")), "docs/ holds no pages"


def test_every_command_parses() -> None:
    found, unreadable, _ = commands()
    assert len(found) >= 40, f"only {len(found)} commands found: is the extraction broken?"
    parser = _strict(build_parser())
    problems = list(unreadable)
    for command in found:
        result = _parse(parser, command.argv)
        if isinstance(result, str):
            if not (command.inline and "arguments are required" in result):
                problems.append(f"{command.where()}\n    {result}")
            continue
        for text in getattr(result, "overrides", None) or []:
            problem = check_override(text)
            if problem:
                problems.append(f"{command.where()}\n    --set {text}: {problem}")
    assert not problems, "commands in the docs that cadence refuses:\n" + "\n".join(problems)


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def test_synopsis_lines_name_real_commands_and_flags() -> None:
    """A synopsis is not parsed, but its command and every `--flag` in it must exist."""
    _, _, synopses = commands()
    assert synopses, "no synopsis lines found"
    subcommands = _subcommands(build_parser())
    problems = []
    for where, text in synopses:
        for part in re.split(r"(?:^|\s)cadence\s+", text)[1:]:
            name = part.split()[0] if part.split() else ""
            if name not in subcommands:
                problems.append(f"{where}: cadence {name}: no such command")
                continue
            options = subcommands[name]._option_string_actions
            unknown = [f for f in re.findall(r"--[a-z][a-z0-9-]*", part) if f not in options]
            if unknown:
                problems.append(f"{where}: cadence {name} has no {', '.join(unknown)}")
    assert not problems, "synopses that do not match the CLI:\n" + "\n".join(problems)


def yaml_examples() -> list[tuple[str, Any]]:
    """(page:line, data) of every YAML block; an invalid one fails here, naming its place."""
    found = []
    for block in code_blocks():
        if block.lang in ("yaml", "yml"):
            where = f"{block.page.relative_to(ROOT)}:{block.line}"
            try:
                found.append((where, yaml.safe_load(block.text)))
            except yaml.YAMLError as exc:
                raise AssertionError(f"{where}: invalid YAML: {exc}") from None
    return found


def _is_spec(data: Any) -> bool:
    return isinstance(data, dict) and "strategies" in data


def _check_yaml(data: Any) -> str | None:
    """Why a YAML example would be refused by the reader it is written for, or None.

    A block of config sections is a config (or part of one): its keys and value types must
    load; a `search:` section in it, or a block of dotted keys alone, is a search space.
    Comparison specs have a test of their own; anything else only has to be YAML."""
    from cadence.tune.space import parse_space

    if not isinstance(data, dict) or not data or _is_spec(data):
        return None
    keys = {str(k) for k in data}
    sections = {f.name for f in dataclasses.fields(Config)}
    try:
        if keys <= sections | _CONFIG_EXTRAS:
            build_typed(Config, {k: v for k, v in data.items() if k not in _CONFIG_EXTRAS})
            if "search" in data:
                parse_space(data["search"])
        elif all("." in k for k in keys):
            parse_space(data)
    except ConfigError as exc:
        return str(exc)
    return None


def test_yaml_examples_load() -> None:
    examples = yaml_examples()
    assert examples, "no YAML examples found"
    problems = [f"{where}: {p}" for where, data in examples if (p := _check_yaml(data))]
    assert not problems, "YAML examples cadence refuses:\n" + "\n".join(problems)


def test_compare_spec_examples_load(tmp_path: Path) -> None:
    """The comparison spec in the docs, through `cadence compare`'s own reader (the first
    import of cadence.bench brings matplotlib: most of this test's time)."""
    from cadence.bench.spec import load_spec

    specs = [(where, data) for where, data in yaml_examples() if _is_spec(data)]
    assert specs, "no comparison spec example found"
    problems = []
    for i, (where, data) in enumerate(specs):
        path = tmp_path / f"spec{i}.yaml"
        path.write_text(yaml.safe_dump(data))
        try:
            load_spec(path)
        except ConfigError as exc:
            problems.append(f"{where}: {exc}")
    assert not problems, "comparison specs cadence refuses:\n" + "\n".join(problems)


def test_recipes_page_names_every_recipe() -> None:
    text = (DOCS / "recipes.md").read_text(encoding="utf-8")
    missing = [name for name in recipe_names() if f"`{name}`" not in text]
    assert not missing, f"docs/recipes.md does not describe the recipes {missing}"


def test_python_blocks_compile() -> None:
    problems = []
    blocks = [b for b in code_blocks() if b.lang in ("python", "py")]
    assert blocks, "no Python examples found"
    for block in blocks:
        name = f"{block.page.relative_to(ROOT)}:{block.line}"
        try:
            compile(block.text, name, "exec")
        except SyntaxError as exc:
            problems.append(f"{name} (+{(exc.lineno or 1) - 1} lines): {exc.msg}")
    assert not problems, "\n".join(problems)


def _inline_text(token: Any) -> str:
    return "".join(c.content for c in token.children or [] if c.type in ("text", "code_inline"))


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens, repeats
    numbered."""
    seen: dict[str, int] = {}
    tokens = _tokens(page)
    for i, tok in enumerate(tokens):
        if tok.type != "heading_open":
            continue
        slug = re.sub(r"[^\w\- ]", "", _inline_text(tokens[i + 1]).strip().lower()).replace(
            " ", "-"
        )
        count = seen.get(slug, 0)
        seen[slug if not count else f"{slug}-{count}"] = 0
        seen[slug] = count + 1
    return set(seen)


def links(page: Path) -> Iterator[tuple[int, str]]:
    """(line, target) of every link and image; the line is the one that spells the target."""
    text = page.read_text(encoding="utf-8").splitlines()
    for tok in _tokens(page):
        if tok.type != "inline" or not tok.map:
            continue
        for child in tok.children or []:
            href = child.attrs.get("href") or child.attrs.get("src")
            if child.type in ("link_open", "image") and isinstance(href, str):
                lines = range(tok.map[0], tok.map[1])
                line = next((n for n in lines if f"]({href}" in text[n]), tok.map[0])
                yield line + 1, href


def _resolve(page: Path, href: str) -> tuple[Path, str] | None:
    """The file and anchor a relative link points at; None for web and mail links."""
    if re.match(r"[a-z][a-z0-9+.-]*:", href, re.I):
        return None
    path, _, anchor = href.partition("#")
    return (page.parent / path).resolve() if path else page, anchor


def test_relative_links_resolve() -> None:
    problems = []
    for page in pages():
        for line, href in links(page):
            target = _resolve(page, href)
            if target is None:
                continue
            path, anchor = target
            where = f"{page.relative_to(ROOT)}:{line}: {href}"
            if not path.exists():
                problems.append(f"{where}: no such file")
            elif anchor and path.suffix == ".md" and anchor not in anchors(path):
                problems.append(f"{where}: no heading with that anchor in {path.name}")
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_every_docs_page_is_on_the_readme_map() -> None:
    readme = ROOT / "README.md"
    linked = {t[0] for _, href in links(readme) if (t := _resolve(readme, href))}
    missing = [p.name for p in sorted(DOCS.glob("*.md")) if p.resolve() not in linked]
    assert not missing, f"docs pages the README does not link to: {missing}"


def test_extraction_reads_shell_as_written() -> None:
    """The extractor itself: continuations, comments, prompts, chains and synopses."""
    text = (
        "$ cadence train --set a.b=1 \\\n    --run-dir runs/x   # a comment\n"
        "cadence: error: output, not a command\n"
        "$ cd x && cadence list recipes | head\n"
        "$ cadence export RUN_DIR --format safetensors|onnx\n"
        "$ torchrun --nproc-per-node 2 -m cadence train --nproc 2\n"
    )
    block = Block(ROOT / "README.md", 10, "", text)
    lines = list(_logical_lines(block))
    assert [n for n, _ in lines] == [10, 13, 14, 15]
    argvs = [a for _, t in lines for a in _invocations(shlex.split(_strip_comment(t)))]
    assert argvs[0] == ["train", "--set", "a.b=1", "--run-dir", "runs/x"]
    assert argvs[1] == ["list", "recipes"]
    assert argvs[-1] == ["train", "--nproc", "2"]
    assert any(_is_placeholder(t) for t in shlex.split(lines[2][1]))
    assert check_override("optimizer.lr=0.1") is None
    assert check_override("optimizer.lrr=0.1") is not None
    assert check_override("model.hf_config.hidden_size=64") is None
    assert check_override("optimizer.lr.x=1") is not None
