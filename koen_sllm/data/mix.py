"""Mixing: choose documents so that languages (or sources) reach target shares.

Weights are target shares of *characters* (the unit available before a
tokenizer exists). Documents are never repeated: the group that is scarcest
relative to its weight is used in full and the others are sampled down, with
a fixed seed. Groups present in the data but absent from the weights are left
out and reported; weights for groups that have no data are reported and the
remaining weights renormalized ("where the data allows").
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from koen_sllm.data import DataError
from koen_sllm.data.ingest import IngestStats, content_hash, file_stamp, format_summary, iter_documents

DEFAULT_MIX = "ko=0.6,en=0.4"
MIX_FORMAT = 1


def parse_mix(spec: Optional[str]) -> Optional[dict[str, float]]:
    """ "ko=0.6,en=0.4" -> {"ko": 0.6, "en": 0.4}; "natural" (or empty) -> None, i.e. keep everything."""
    if spec is None or spec.strip().lower() in ("", "natural", "none", "all"):
        return None
    weights: dict[str, float] = {}
    for item in spec.split(","):
        key, sep, value = item.partition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = -1.0
        if not sep or not key.strip() or weight < 0:
            raise DataError(f"--mix {spec!r}: {item.strip()!r} is not KEY=WEIGHT with WEIGHT >= 0; "
                            "example: --mix ko=0.6,en=0.4 (or --mix natural)")
        weights[key.strip()] = weight
    if sum(weights.values()) <= 0:
        raise DataError(f"--mix {spec!r}: the weights sum to zero")
    return weights


@dataclass
class MixPlan:
    weights: Optional[dict]
    available: dict  # group -> chars
    targets: dict  # group -> chars to select
    excluded: list = field(default_factory=list)  # groups with data but no weight
    missing: list = field(default_factory=list)  # weighted groups without data


def plan_mix(available: dict[str, int], weights: Optional[dict[str, float]]) -> MixPlan:
    if weights is None:
        return MixPlan(None, dict(available), dict(available))
    present = {g: w for g, w in weights.items() if w > 0 and available.get(g, 0) > 0}
    missing = sorted(g for g, w in weights.items() if w > 0 and available.get(g, 0) == 0)
    excluded = sorted(g for g in available if g not in present)
    if not present:
        raise DataError(f"the mix {weights} selects nothing: the data has {sorted(available)}; "
                        "use --mix natural or weights for these groups")
    total_w = sum(present.values())
    shares = {g: w / total_w for g, w in present.items()}
    # The largest total every group can supply at its share, without repeats.
    total = min(available[g] / s for g, s in shares.items())
    targets = {g: min(available[g], s * total) for g, s in shares.items()}
    return MixPlan(dict(weights), dict(available), targets, excluded, missing)


def select_documents(groups: dict[str, list[tuple[int, int]]], plan: MixPlan, seed: int) -> list[int]:
    """Indices of the chosen documents, in a seeded shuffled order.

    ``groups`` maps a group to its documents as (index, chars). A group whose
    target is (within rounding) all of it is taken whole.
    """
    rng = random.Random(seed)
    chosen: list[int] = []
    for group in sorted(plan.targets):
        docs = list(groups.get(group, []))
        target = plan.targets[group]
        if target >= plan.available[group] * (1 - 1e-9):
            chosen.extend(i for i, _ in docs)
            continue
        rng.shuffle(docs)
        taken = 0
        for index, chars in docs:
            if taken >= target:
                break
            chosen.append(index)
            taken += chars
    rng.shuffle(chosen)
    return chosen


def describe(plan: MixPlan, selected: dict[str, int]) -> list[str]:
    """Report lines: target vs achieved share per group, what was left out and why."""
    total = sum(selected.values()) or 1
    lines = []
    wsum = sum(w for g, w in (plan.weights or {}).items() if g in plan.targets) or 1.0
    for group in sorted(plan.targets, key=lambda g: -selected.get(g, 0)):
        want = f"{100.0 * plan.weights[group] / wsum:5.1f}%" if plan.weights else "natural"
        lines.append(f"  {group:<24} target {want:>7}  achieved {100.0 * selected.get(group, 0) / total:5.1f}%  "
                     f"({selected.get(group, 0):,} of {plan.available[group]:,} chars used)")
    if plan.excluded:
        lines.append(f"  left out (no weight): {', '.join(f'{g} ({plan.available[g]:,} chars)' for g in plan.excluded)}")
    if plan.missing:
        lines.append(f"  no data for: {', '.join(plan.missing)} (other weights renormalized)")
    return lines


def stats_path(output: Path) -> Path:
    """The JSON summary written beside the mixed corpus."""
    return output.with_name(output.name.split(".")[0] + ".stats.json")


def _reusable(output: Path, files: list[Path], settings: dict) -> Optional[dict]:
    path = stats_path(output)
    if not (output.is_file() and path.is_file()):
        return None
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return None
    if old.get("settings") != settings or old.get("output", {}).get("bytes") != output.stat().st_size:
        return None
    stamp = file_stamp(files)
    if old["inputs"]["files"] != stamp:
        if [f[0] for f in old["inputs"]["files"]] != [f[0] for f in stamp]:
            return None
        if old["inputs"]["content_sha256"] != content_hash(files):
            return None
    return old


def write_mixed_corpus(
    files: list[Path],
    output: Path,
    weights: Optional[dict],
    *,
    mix_by: str = "lang",
    seed: int = 1234,
    strict: bool = False,
    force: bool = False,
    log: Callable[[str], None] = print,
) -> dict:
    """Read, clean and de-duplicate ``files``, mix them and write ``output`` (JSONL).

    Clean documents go to a temporary file first (the corpus is never held in
    memory); the chosen ones are then copied in shuffled order and the result
    renamed into place. Returns the summary also saved as ``<name>.stats.json``.
    """
    output = Path(output)
    settings = {"format": MIX_FORMAT, "weights": weights, "mix_by": mix_by, "seed": seed}
    old = None if force else _reusable(output, files, settings)
    if old is not None:
        log(f"reusing {output} (input and mix unchanged; --force rebuilds)")
        log("\n".join(old["report"]))
        return old
    output.parent.mkdir(parents=True, exist_ok=True)
    stats = IngestStats()
    docs_path = output.with_name(f".{output.name}.docs-{os.getpid()}")
    tmp_out = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    records: list[tuple[int, int, str, int]] = []  # offset, length, lang, chars
    groups: dict[str, list[tuple[int, int]]] = {}
    try:
        with open(docs_path, "wb") as out:
            for doc in iter_documents(files, stats, strict=strict, log=log):
                line = (json.dumps({"text": doc.text, "lang": doc.lang, "source": doc.source},
                                   ensure_ascii=False) + "\n").encode("utf-8")
                key = doc.lang if mix_by == "lang" else doc.source
                groups.setdefault(key, []).append((len(records), len(doc.text)))
                records.append((out.tell(), len(line), doc.lang, len(doc.text)))
                out.write(line)
        plan = plan_mix({g: sum(c for _, c in docs) for g, docs in groups.items()}, weights)
        order = select_documents(groups, plan, seed)
        selected: dict[str, int] = {}
        per_lang: dict[str, dict] = {}
        group_of = {index: g for g, docs in groups.items() for index, _ in docs}
        with open(docs_path, "rb") as src, open(tmp_out, "wb") as dst:
            for index in order:
                offset, length, lang, chars = records[index]
                src.seek(offset)
                dst.write(src.read(length))
                selected[group_of[index]] = selected.get(group_of[index], 0) + chars
                row = per_lang.setdefault(lang, {"docs": 0, "chars": 0})
                row["docs"] += 1
                row["chars"] += chars
        os.replace(tmp_out, output)
    finally:
        for path in (docs_path, tmp_out):
            path.unlink(missing_ok=True)
    total = sum(r["chars"] for r in per_lang.values())
    report = [format_summary(stats), f"mix by {mix_by} -> {output} ({len(order):,} docs, {total:,} chars):",
              *describe(plan, selected)]
    summary = {
        "settings": settings,
        "inputs": {"files": file_stamp(files), "content_sha256": content_hash(files)},
        "ingest": stats.to_dict(),
        "mix": {"available_chars": plan.available, "target_chars": plan.targets, "selected_chars": selected,
                "achieved_share": {g: c / max(total, 1) for g, c in selected.items()},
                "left_out": plan.excluded, "no_data": plan.missing},
        "output": {"path": str(output), "bytes": output.stat().st_size, "docs": len(order), "chars": total,
                   "per_lang": per_lang},
        "report": report,
    }
    tmp = stats_path(output).with_name(stats_path(output).name + ".tmp")
    tmp.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, stats_path(output))
    log("\n".join(report))
    return summary
