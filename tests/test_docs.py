"""The README and the pages in docs/ say only what exists, and their recipes work.

Every ``python -m clipstudy <command>`` names a command of the dispatcher, every ``make <target>`` a Makefile
target, every repository path a file or folder of the checkout, every ``clipstudy.<module>`` name something
importable, every relative link a page (and heading) that exists; every module file of clipstudy/ has its own line in
docs/architecture.md's module table; the configuration table of docs/reference.md is the code's; and the add-a-loss
recipe of docs/architecture.md, copied from the page, registers a loss that trains.

``python tests/test_docs.py`` prints the configuration table; ``--write`` puts it into docs/reference.md.
"""

from __future__ import annotations

import importlib
import json
import math
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
REFERENCE = ROOT / "docs" / "reference.md"
ARCHITECTURE = ROOT / "docs" / "architecture.md"
# folders whose paths the documents name; anything under them that a document names must exist
CHECKED_PREFIXES = (
    "clipstudy",
    "notebooks",
    "scripts",
    "docs",
    "tests",
    "benchmarks",
    "requirements",
    "reports/demo",
    ".ci",
)
FENCE = re.compile(r"^\s*```")


def doc_id(path: Path) -> str:
    return str(path.relative_to(ROOT))


def split_fenced(text: str) -> tuple[str, str]:
    """(prose, code): the lines outside fenced code blocks and the lines inside them."""
    prose, code, inside = [], [], False
    for line in text.splitlines():
        if FENCE.match(line):
            inside = not inside
            continue
        (code if inside else prose).append(line)
    return "\n".join(prose), "\n".join(code)


def code_text(text: str) -> list[str]:
    """Every inline code span outside fenced blocks, then every fenced block's lines: what a reader types."""
    prose, code = split_fenced(text)
    return re.findall(r"`([^`\n]+)`", prose) + code.splitlines()


def makefile_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    return {m.group(1) for m in re.finditer(r"^([A-Za-z][\w.-]*)\s*:(?!=)", text, re.M)}


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    prose, _ = split_fenced(path.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*$", prose, re.M):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        out.add(base if count == 0 else f"{base}-{count}")
    return out


@pytest.fixture(params=DOCS, ids=doc_id)
def doc(request) -> tuple[Path, str]:
    return request.param, request.param.read_text(encoding="utf-8")


def test_every_clipstudy_command_in_the_docs_exists(doc):
    from clipstudy.__main__ import COMMANDS

    path, text = doc
    named = re.findall(r"python -m clipstudy[ \t]+([a-z][\w-]*)", text)
    wrong = sorted(set(named) - set(COMMANDS))
    assert not wrong, f"{doc_id(path)}: `python -m clipstudy {wrong[0]}` is no command; commands: {sorted(COMMANDS)}"


def test_every_make_target_in_the_docs_exists(doc):
    path, text = doc
    targets = makefile_targets()
    named = [
        m for span in code_text(text) for m in re.findall(r"(?:^|[\s(;&|])make[ \t]+([A-Za-z][\w.-]*)(?![\w=])", span)
    ]
    wrong = sorted(set(named) - targets)
    assert not wrong, f"{doc_id(path)}: `make {wrong[0]}` is no target of the Makefile; targets: {sorted(targets)}"


def repository_paths(text: str) -> set[str]:
    """Paths under :data:`CHECKED_PREFIXES` that the text names, in code or in prose."""
    prefixes = "|".join(re.escape(p) for p in CHECKED_PREFIXES)
    found = re.findall(rf"(?<![\w./~$-])((?:{prefixes})(?:/[\w.*<>-]*)*)", text)
    return {p.rstrip(".") for p in found}


def path_exists(path: str) -> bool:
    """The path is in the checkout, or is a folder the Makefile makes (as `make lab`'s working copies)."""
    if "<" in path:  # a placeholder: the part before it must exist
        path = path[: path.index("<")].rsplit("/", 1)[0]
    if "*" in path:
        return any(ROOT.glob(path))
    made = re.search(rf"\?=\s*{re.escape(path.rstrip('/'))}/?\s*$", (ROOT / "Makefile").read_text(), re.M)
    return (ROOT / path).exists() or made is not None


def test_every_repository_path_in_the_docs_exists(doc):
    path, text = doc
    missing = sorted(p for p in repository_paths(text) if not path_exists(p))
    assert not missing, f"{doc_id(path)} names paths that are not in the repository: {missing}"


def test_every_file_named_alone_in_the_docs_exists(doc):
    """A bare module or script name (`coco.py`) names a file somewhere in the repository: retired names fail."""
    path, text = doc
    names = {span for span in code_text(text) if re.fullmatch(r"[\w-]+\.(py|ipynb)", span)}
    existing = {
        p.name
        for folder in ("clipstudy", "tests", "scripts", "benchmarks", "notebooks")
        for p in (ROOT / folder).rglob("*")
    }
    missing = sorted(names - existing)
    assert not missing, f"{doc_id(path)} names files the repository does not have: {missing}"


def resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attribute in parts[cut:]:
            if not hasattr(obj, attribute):
                return False
            obj = getattr(obj, attribute)
        return True
    return False


def test_every_clipstudy_module_name_in_the_docs_resolves(doc):
    path, text = doc
    names = set(re.findall(r"(?<![\w/.-])(clipstudy(?:\.\w+)+)", text))
    wrong = sorted(name for name in names if not resolves(name))
    assert not wrong, f"{doc_id(path)} names modules or objects that do not exist: {wrong}"


def test_every_relative_link_in_the_docs_resolves(doc):
    path, text = doc
    prose, _ = split_fenced(text)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", prose):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        if not linked.exists():
            broken.append(f"{target} (no file {linked.relative_to(ROOT) if linked.is_relative_to(ROOT) else linked})")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target} (no heading #{anchor} in {linked.relative_to(ROOT)})")
    assert not broken, f"{doc_id(path)}: broken links: {broken}"


def test_the_docs_link_checker_sees_links_and_anchors():
    """The checks above look where they should: the README links every page, and known anchors are found."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for page in ("user-guide", "reference", "protocol", "architecture", "testing", "results"):
        assert f"](docs/{page}.md" in readme, page
    assert "protocol-fidelity-the-options" in anchors(ROOT / "docs" / "protocol.md")
    assert slug("The paper-scale setting (profile `paper`)") == "the-paper-scale-setting-profile-paper"
    assert {"python -m clipstudy list", "make lint"} <= set(code_text("`python -m clipstudy list` and `make lint`"))


# ------------------------------------------------------------------ the module table
def module_table_rows() -> list[list[str]]:
    """The repository paths in the first cell of each row of docs/architecture.md's module table."""
    text = ARCHITECTURE.read_text(encoding="utf-8")
    found = re.search(r"^## The modules\n(.*?)(?=^## )", text, re.M | re.S)
    assert found, "docs/architecture.md: no '## The modules' section"
    rows = [line for line in found.group(1).splitlines() if line.startswith("| `")]
    return [re.findall(r"`([^`]+)`", row.split("|")[1]) for row in rows]


def test_every_module_file_has_its_own_line_in_the_architecture_table():
    """Every module file of clipstudy/ is named, alone, at the start of one row; no row names a retired module."""
    rows = module_table_rows()
    crowded = [names for names in rows if len(names) != 1]
    assert not crowded, f"docs/architecture.md's module table: one module per row, not {crowded}"
    listed = [names[0] for names in rows]
    modules = {str(path.relative_to(ROOT)) for path in (ROOT / "clipstudy").rglob("*.py")}
    missing = sorted(modules - set(listed))
    assert not missing, f"docs/architecture.md's module table lacks a line for {missing}"
    retired = sorted(name for name in listed if name.startswith("clipstudy/") and name not in modules)
    assert not retired, f"docs/architecture.md's module table names modules that do not exist: {retired}"
    repeated = sorted({name for name in listed if listed.count(name) > 1})
    assert not repeated, f"docs/architecture.md's module table names these twice: {repeated}"


# ------------------------------------------------------------------ the configuration table
def _cell(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return '""' if value == "" else str(value)


def config_fields_table() -> str:
    """Every field of RunConfig: its value in each profile and its help line, as docs/reference.md shows them."""
    from clipstudy.engine.config import FIELDS, PROFILES, RunConfig
    from clipstudy.engine.config_help import FIELD_HELP

    defaults = RunConfig().to_dict()
    profiles = ("paper", "demo", "smoke")
    lines = ["| field | " + " | ".join(profiles) + " | meaning |", "|---|" + "---|" * (len(profiles) + 1)]
    for name in FIELDS:
        values = [_cell({**defaults, **PROFILES[p]}[name]) for p in profiles]
        lines.append(f"| `{name}` | " + " | ".join(values) + f" | {FIELD_HELP[name]} |")
    return "\n".join(lines)


CONFIG_BLOCK = re.compile(r"(^<!-- config-fields:.*?-->\n)(.*?)(^<!-- /config-fields -->$)", re.M | re.S)


def test_the_configuration_table_is_the_codes():
    found = CONFIG_BLOCK.search(REFERENCE.read_text(encoding="utf-8"))
    assert found, "docs/reference.md: no <!-- config-fields: ... --> ... <!-- /config-fields --> block"
    assert found.group(2).strip() == config_fields_table(), (
        "docs/reference.md's configuration table differs from RunConfig, the profiles or FIELD_HELP: "
        "run `.venv/bin/python tests/test_docs.py --write`"
    )


# ------------------------------------------------------------------ the add-a-loss recipe
def recipe_source() -> str:
    """The add-a-loss code block of docs/architecture.md, as a reader copies it."""
    text = ARCHITECTURE.read_text(encoding="utf-8")
    found = re.search(r"^<!-- recipe: add-a-loss\b.*?-->\n```python\n(.*?)^```$", text, re.M | re.S)
    assert found, "docs/architecture.md: no ```python block right after <!-- recipe: add-a-loss ... -->"
    return found.group(1)


@pytest.fixture
def recipe_loss():
    """Run the recipe; yield the loss it registers; take it out of the registry afterwards."""
    import clipstudy.study.results  # noqa: F401  (its display-name tables are made at import: not with this loss)
    from clipstudy.core.losses import LOSSES

    before = set(LOSSES)
    try:
        exec(compile(recipe_source(), "docs/architecture.md (add-a-loss recipe)", "exec"), {"__name__": "recipe"})
        added = sorted(set(LOSSES) - before)
        assert added == ["clip-smooth"], f"the recipe should register one loss, clip-smooth; it registered {added}"
        yield added[0]
    finally:
        for name in set(LOSSES) - before:
            del LOSSES[name]


def test_the_add_a_loss_recipe_trains_and_checks_its_parameters(recipe_loss, demo_data_dir, tmp_path, capsys):
    from clipstudy.cli.commands import list_main
    from clipstudy.engine.config import ConfigError, make_config
    from clipstudy.engine.preflight import check_components
    from clipstudy.engine.train import train

    def config(**kw):
        return make_config("smoke", data=str(demo_data_dir), loss=recipe_loss, epochs=1, max_steps=2, threads=1, **kw)

    # as the page says: --loss clip-smooth --loss_params '{"smoothing": 0.2}'
    metrics = train(config(out=str(tmp_path / "run"), loss_params={"smoothing": 0.2}), progress=False)
    assert metrics["status"] == "completed" and metrics["loss"] == recipe_loss, metrics
    assert metrics["global_step"] == 2 and math.isfinite(metrics["average"])
    with pytest.raises(ConfigError, match="smoothing"):  # a bad value stops the run at start, named
        check_components(config(loss_params={"smoothing": 1.5}))
    with pytest.raises(ConfigError, match="smoothing"):  # a misspelt key names the accepted ones
        check_components(config(loss_params={"smoothin": 0.2}))
    list_main([])
    assert re.search(r"clip-smooth\s+CLIP \(smoothed\)\s+CLIP with label smoothing", capsys.readouterr().out)


def test_the_recipe_leaves_the_loss_registry_as_it_was():
    """Runs after the recipe's test (file order): its loss is gone, so no other test sees it."""
    from clipstudy.core.losses import LOSSES
    from clipstudy.study.results import LOSS_NAMES

    assert "clip-smooth" not in LOSSES and "clip-smooth" not in LOSS_NAMES


if __name__ == "__main__":
    table = config_fields_table()
    if sys.argv[1:] == ["--write"]:
        text = REFERENCE.read_text(encoding="utf-8")
        found = CONFIG_BLOCK.search(text)
        REFERENCE.write_text(text[: found.start(2)] + table + "\n" + text[found.end(2) :], encoding="utf-8")
        print(f"wrote the configuration table into {REFERENCE.relative_to(ROOT)}")
    else:
        print(table)
