"""The README's rule catalog, generated from the rules so it can never drift from them."""

from __future__ import annotations

from pathlib import Path

from ruamel.yaml import YAML

from ..rules.compiled import RuleSet

BEGIN = "<!-- catalog:begin -->"
END = "<!-- catalog:end -->"


def _evidence_titles(seeds_dir: Path) -> dict[str, str]:
    path = seeds_dir / "evidence.yaml"
    if not path.exists():
        return {}
    entries = YAML(typ="safe").load(path.read_text(encoding="utf-8")) or []
    return {str(e["id"]): f"{e.get('publisher', '')} {e.get('year', '')}".strip() for e in entries
            if isinstance(e, dict) and "id" in e}


def catalog_markdown(ruleset: RuleSet) -> str:
    evidence = _evidence_titles(ruleset.directory.parent / "seeds")
    lines = ["| Rule | Hooks | What it nudges | Latest change | Source passages | Evidence |",
             "|---|---|---|---|---|---|"]
    for rule in ruleset.rules:
        if rule.status != "active":
            continue
        model = rule.model
        seeds = ", ".join(f"`{c.seed}`" for c in model.citations if c.seed) or "—"
        published = []
        for c in model.citations:
            if c.evidence:
                published.append(f"{evidence.get(c.evidence, c.evidence)} (`{c.evidence}`)")
            elif c.title:
                label = f"{c.publisher or ''} {c.year or ''}".strip() or c.title
                link = c.url or (f"https://doi.org/{c.doi}" if c.doi else None)
                published.append(f"[{label}]({link})" if link else label)
        hooks = ", ".join(sorted(model.hooks))
        latest = model.changes[0] if model.changes else None
        change = f"{latest.version} ({latest.date}): {latest.what}" if latest else f"{model.version}"
        lines.append(f"| `{rule.id}` | {hooks} | {model.title} | {change.replace('|', '/')} | {seeds} | "
                     f"{'; '.join(published) or '—'} |")
    return "\n".join(lines)


def replace_catalog(readme: str, table: str) -> str:
    start, end = readme.index(BEGIN) + len(BEGIN), readme.index(END)
    return readme[:start] + "\n" + table + "\n" + readme[end:]
