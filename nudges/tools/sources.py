"""A rule's citations as a reader sees them: the seed passage paraphrased in our words (seeds/*.yaml), the
published evidence (seeds/evidence.yaml) or the reference the rule gives in full, each with its link."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

from ..rules.compiled import CompiledRule, RuleSet


@dataclass(frozen=True)
class Source:
    kind: str  # passage | evidence | reference
    label: str  # what it is: a record's title and passage location, a journal and year
    text: str | None  # the paraphrased passage, when a seed
    url: str | None
    ref: str  # the id cited (record#passage, evidence id, or the title)


def _load(path: Path) -> Any:
    try:
        return YAML(typ="safe").load(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _link(entry: dict[str, Any]) -> str | None:
    if entry.get("url"):
        return str(entry["url"])
    return f"https://doi.org/{entry['doi']}" if entry.get("doi") else None


def citations(ruleset: RuleSet, rule: CompiledRule) -> list[Source]:
    seeds_dir = ruleset.seeds_dir
    records: dict[str, Any] = {}
    evidence: dict[str, Any] = {}
    if seeds_dir is not None:
        listed = _load(seeds_dir / "evidence.yaml") or []
        evidence = {str(e["id"]): e for e in listed if isinstance(e, dict) and "id" in e}
    out: list[Source] = []
    for c in rule.model.citations:
        if c.seed and seeds_dir is not None:
            record_id, passage_id = c.seed.split("#")
            if record_id not in records:
                records[record_id] = _load(seeds_dir / f"{record_id}.yaml") or {}
            record = records[record_id]
            passage = next((p for p in record.get("passages") or () if isinstance(p, dict)
                            and p.get("id") == passage_id), {})
            label = f"{record.get('title', record_id)} ({record.get('publisher', '')} {record.get('year', '')})"
            if passage.get("location"):
                label += f", {passage['location']}"
            out.append(Source("passage", label.replace(" ()", ""), str(passage.get("paraphrase", "")).strip() or None,
                              _link(record), c.seed))
        elif c.evidence:
            entry = evidence.get(c.evidence, {})
            authors = ", ".join(entry.get("authors") or ())
            label = " ".join(str(v) for v in (entry.get("title", c.evidence), f"{authors}." if authors else "",
                                              entry.get("publisher", ""), entry.get("year", "")) if v)
            out.append(Source("evidence", label, None, _link(entry), c.evidence))
        else:
            label = " ".join(str(v) for v in (c.title, c.publisher, c.year) if v)
            out.append(Source("reference", label, None, c.url or (f"https://doi.org/{c.doi}" if c.doi else None),
                              str(c.title)))
    return out
