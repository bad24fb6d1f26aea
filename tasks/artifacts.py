"""Prefect artifacts of the stage tasks: tables of counts, markdown (curves, plots), links, and the
JSON-safe copies they are made from."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact


def jsonable(value: Any) -> Any:
    """A JSON-safe copy (paths and numpy scalars become strings / floats), for task results and artifacts."""
    return json.loads(json.dumps(value, default=_json_default))


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    return str(value)

def artifact_key(*parts: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    text = "-".join(parts).lower()
    return "".join(ch if ch.isalnum() else "-" for ch in text).strip("-")[:100]


def flatten_counts(counts: Mapping[str, Any], *, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    """Nested count dicts as (key path, value) pairs, e.g. {"dropped": {"afqmc": {"empty_side": 3}}}."""
    rows: list[tuple[tuple[str, ...], Any]] = []
    for key, value in counts.items():
        if isinstance(value, Mapping):
            rows += flatten_counts(value, prefix=(*prefix, str(key)))
        else:
            rows.append(((*prefix, str(key)), value))
    return rows


def counts_table(counts: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Rows for a table artifact: one per leaf count, its key path split into columns."""
    flat = flatten_counts(counts)
    depth = max((len(path) for path, _ in flat), default=0)
    table = []
    for path, value in flat:
        padded = list(path[:-1]) + [""] * (depth - len(path)) + [path[-1]]
        row = {f"level_{i + 1}": part for i, part in enumerate(padded[:-1])}
        row.update(name=padded[-1], count=value)
        table.append(row)
    return table


def publish_table(key: str, rows: list[dict[str, Any]], description: str) -> None:
    if rows:
        create_table_artifact(key=artifact_key(key), table=jsonable(rows), description=description)


def publish_markdown(key: str, markdown: str, description: str) -> None:
    create_markdown_artifact(key=artifact_key(key), markdown=markdown, description=description)


def publish_link(key: str, path: str | Path, description: str) -> None:
    path = Path(path).resolve()
    create_link_artifact(key=artifact_key(key), link=path.as_uri(), link_text=str(path), description=description)


def points_table_markdown(title: str, rows: list[dict[str, Any]], columns: list[str], *, max_rows: int = 40) -> str:
    """A markdown table of (at most `max_rows`, evenly spaced) points of a curve."""
    if not rows:
        return f"### {title}\n\n(no points recorded)\n"
    stride = max(1, -(-len(rows) // max_rows))
    picked = rows[::stride]
    if picked[-1] is not rows[-1]:
        picked.append(rows[-1])
    lines = [f"### {title}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in picked:
        lines.append("| " + " | ".join(_cell(row.get(column)) for column in columns) + " |")
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def read_jsonl(path: str | Path | None) -> list[dict[str, Any]]:
    if not path or not Path(path).is_file():
        return []
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def image_markdown(title: str, image: str | Path | None) -> str:
    """Markdown pointing at a plot on disk (the Prefect UI shows it when the path is reachable)."""
    if not image or not Path(image).is_file():
        return ""
    path = Path(image).resolve()
    return f"### {title}\n\n![{title}]({path.as_uri()})\n\n`{path}`\n"
