"""The README against the code: the configuration table and the defaults written in it,
and the example files it names. Each test fails when one of them drifts from the other."""

import ast
import collections
import dataclasses
import re
from pathlib import Path
from typing import Any

import grpc
import pytest

import poolkit

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")

# Rows of the configuration table whose text spells out a nested config's defaults.
NESTED = {
    "health_check": poolkit.HealthCheck,
    "failure_accrual": poolkit.FailureAccrual,
    "retry_budget": poolkit.RetryBudget,
}


def section(title: str) -> str:
    """The README's text under `## title`, up to the next `## ` heading."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", README, re.MULTILINE | re.DOTALL)
    assert match is not None, f"the README has no '## {title}' section"
    return match.group(1)


CONFIGURATION = section("Configuration")
# | `field` | default | meaning |
ROWS = re.findall(r"^\| `(\w+)` \| (.*?) \| (.*) \|$", CONFIGURATION, re.MULTILINE)


def row(field: str) -> tuple[str, str]:
    """The default cell and the meaning cell of `field`'s row."""
    cells = [(default, meaning) for name, default, meaning in ROWS if name == field]
    assert len(cells) == 1, f"{len(cells)} rows for {field!r}"
    return cells[0]


def declared_default(field: dataclasses.Field[Any]) -> Any:
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def defaults_of(cls: type) -> dict[str, Any]:
    return {field.name: declared_default(field) for field in dataclasses.fields(cls)}


def evaluate(node: ast.expr) -> Any:
    """A default as the README writes it: a Python literal, `{UNAVAILABLE, ...}` for a set
    of status codes, or `HealthCheck(...)` for one of poolkit's config classes."""
    if isinstance(node, ast.Set) and all(isinstance(element, ast.Name) for element in node.elts):
        return frozenset(grpc.StatusCode[element.id] for element in node.elts if isinstance(element, ast.Name))
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        cls = getattr(poolkit, node.func.id)
        keywords = {keyword.arg: evaluate(keyword.value) for keyword in node.keywords if keyword.arg}
        assert not node.args, f"{ast.unparse(node)}: poolkit's config classes take keywords only"
        assert len(keywords) == len(node.keywords), f"{ast.unparse(node)}: no **mapping here"
        return cls(**keywords)
    return ast.literal_eval(node)


def same(written: Any, actual: Any) -> bool:
    """Equal as a reader would take them: 0.030 is 0.03, but True is not 1, and
    `HealthCheck()` is an instance of that very class built with no arguments."""
    if isinstance(written, bool) or isinstance(actual, bool):
        return type(written) is type(actual) and written == actual
    if dataclasses.is_dataclass(written) or dataclasses.is_dataclass(actual):
        return type(written) is type(actual) and written == actual
    return bool(written == actual)


def spans(text: str) -> list[ast.AST]:
    """The code spans of `text` that parse as Python, as parsed (others are prose)."""
    parsed = []
    for span in re.findall(r"`([^`\n]+)`", text):
        try:
            module = ast.parse(span)
        except SyntaxError:
            continue
        if len(module.body) == 1:
            parsed.append(module.body[0])
    return parsed


def written_defaults(text: str) -> list[tuple[str, str, Any]]:
    """Every `name=value` span of `text`: (name, the value as written, its value)."""
    return [
        (statement.targets[0].id, ast.unparse(statement.value), evaluate(statement.value))
        for statement in spans(text)
        if isinstance(statement, ast.Assign) and isinstance(statement.targets[0], ast.Name)
    ]


def mentioned(text: str) -> set[str]:
    """Names written as `name` or `name=value` in `text`."""
    names = {name for name, _, _ in written_defaults(text)}
    for statement in spans(text):
        if isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Name):
            names.add(statement.value.id)
    return names


def check_written_defaults(text: str, cls: type) -> None:
    defaults = defaults_of(cls)
    for name, as_written, value in written_defaults(text):
        assert name in defaults, f"the README writes `{name}={as_written}`: {cls.__name__} has no field {name!r}"
        assert same(value, defaults[name]), (
            f"the README writes `{name}={as_written}`: {cls.__name__}.{name} defaults to {defaults[name]!r}"
        )
    missing = set(defaults) - mentioned(text)
    assert not missing, f"the README does not mention {cls.__name__}'s {sorted(missing)}"


def test_the_configuration_table_lists_every_field_once() -> None:
    counts = collections.Counter(name for name, _, _ in ROWS)
    fields = [field.name for field in dataclasses.fields(poolkit.PoolConfig)]
    assert [name for name in fields if counts[name] != 1] == [], "fields without exactly one row"
    assert sorted(set(counts) - set(fields)) == [], "rows for fields PoolConfig does not have"


@pytest.mark.parametrize("field", dataclasses.fields(poolkit.PoolConfig), ids=lambda field: field.name)
def test_the_configuration_table_shows_each_default(field: dataclasses.Field[Any]) -> None:
    cell = row(field.name)[0]
    match = re.fullmatch(r"`([^`]+)`", cell)
    assert match is not None, f"{field.name}'s default cell is not one code span: {cell!r}"
    written = evaluate(ast.parse(match.group(1), mode="eval").body)
    actual = declared_default(field)
    assert same(written, actual), f"the README says {field.name} defaults to {cell}; PoolConfig says {actual!r}"


@pytest.mark.parametrize(("field", "cls"), NESTED.items(), ids=list(NESTED))
def test_a_nested_configs_row_gives_its_fields_real_defaults(field: str, cls: type) -> None:
    check_written_defaults(row(field)[1], cls)


def test_the_failure_codes_listed_are_the_default_ones() -> None:
    match = re.search(r"`failure_codes` \(([A-Z_, ]+)\)", row("failure_accrual")[1])
    assert match is not None, "the failure_accrual row no longer lists failure_codes as (CODE, ...)"
    listed = {grpc.StatusCode[name] for name in match.group(1).split(", ")}
    assert listed == poolkit.FailureAccrual().failure_codes


def test_the_retry_policy_paragraph_gives_every_field_its_real_default() -> None:
    paragraph = re.search(r"^`RetryPolicy` fields.*?(?=\n\n)", CONFIGURATION, re.MULTILINE | re.DOTALL)
    assert paragraph is not None, "no paragraph starting '`RetryPolicy` fields' under ## Configuration"
    check_written_defaults(paragraph.group(0), poolkit.RetryPolicy)
    calls = [s.value for s in spans(paragraph.group(0)) if isinstance(s, ast.Expr) and isinstance(s.value, ast.Call)]
    hedging = [call for call in calls if isinstance(call.func, ast.Name) and call.func.id == "Hedging"]
    assert hedging, "the paragraph no longer shows Hedging(...) with its defaults"
    for call in hedging:
        # Hedging(delay=None, min_samples=20): the same check, one keyword at a time.
        check_written_defaults(" ".join(f"`{ast.unparse(keyword)}`" for keyword in call.keywords), poolkit.Hedging)


def test_every_example_is_in_the_readme() -> None:
    examples = sorted(path.name for path in (ROOT / "examples").glob("*.py"))
    assert examples, "no examples found"
    assert [name for name in examples if f"examples/{name}" not in README] == []


def test_every_example_the_readme_names_exists() -> None:
    named = set(re.findall(r"\bexamples/[\w-]+(?:\.[\w-]+)*", README))
    assert named, "the README names no example file"
    assert sorted(path for path in named if not (ROOT / path).is_file()) == []
