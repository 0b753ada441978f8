"""Mixing: choose documents so that languages (or sources) reach target shares.

Weights are target shares of *characters* (the unit available before a
tokenizer exists). Documents are never repeated: the group that is scarcest
relative to its weight is used in full and the others are sampled down, with
a fixed seed. Groups present in the data but absent from the weights are left
out and reported; weights for groups that have no data are reported and the
remaining weights renormalized ("where the data allows").

A group whose surplus over its budget is only rounding (one of its average
documents, or MIX_MATCH_POINTS of the output) is used in full too, so an input
that already has the target shares loses nothing. When a share still ends up
more than MIX_MISS_POINTS from its target, one warning line names the short
group, the reason and a --mix the data can meet; the stats file records target,
achieved and missed per group.
"""
from __future__ import annotations

import errno
import json
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from koen_sllm.data import DataError
from koen_sllm.data.ingest import (IngestStats, content_hash, file_stamp, format_bytes, format_summary, iter_documents,
                                   text_bytes)
from koen_sllm.data.progress import Progress

DEFAULT_MIX = "ko=0.6,en=0.4"
MIX_FORMAT = 2  # 2: a surplus within rounding is kept (the selection differs from format 1)

# A surplus smaller than this share of the output (in percentage points) is rounding, not
# excess: the report shows shares to 0.1 point, and cutting it would only lose documents.
MIX_MATCH_POINTS = 0.05
# An achieved share further than this from its target (percentage points) is a missed target.
MIX_MISS_POINTS = 3.0
# A sampled group over its budget by this much of the output (points) is named as a cause of a miss.
OVERSHOOT_POINTS = 1.0


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
    targets: dict  # group -> chars to select; equal to available when the group is used in full
    excluded: list = field(default_factory=list)  # groups with data but no weight
    missing: list = field(default_factory=list)  # weighted groups without data


def _rounding(available: int, docs: int, output_chars: float) -> float:
    """The largest surplus over a group's budget that still counts as matching it.

    The budget is a float derived from another group's total; whole documents
    cannot meet it more finely than about one document; and a surplus below
    MIX_MATCH_POINTS of the output does not show in the shares. Sampling such a
    surplus away only drops whichever short documents come last in the shuffle.
    """
    one_document = available / docs if docs else 0.0
    return max(1e-9 * available, one_document, MIX_MATCH_POINTS / 100 * output_chars)


def plan_mix(available: dict[str, int], weights: Optional[dict[str, float]],
             docs: Optional[dict[str, int]] = None) -> MixPlan:
    """Characters to select per group; ``docs`` (group -> documents) sets the rounding of whole documents."""
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
    targets = {}
    for g, s in shares.items():
        budget = s * total
        whole = available[g] - budget <= _rounding(available[g], (docs or {}).get(g, 0), total)
        targets[g] = available[g] if whole else budget
    return MixPlan(dict(weights), dict(available), targets, excluded, missing)


def select_documents(groups: dict[str, list[tuple[int, int]]], plan: MixPlan, seed: int) -> list[int]:
    """Indices of the chosen documents, in a seeded shuffled order.

    ``groups`` maps a group to its documents as (index, chars). A group whose
    target is all of it (``plan_mix`` decides, rounding included) is taken whole.
    """
    rng = random.Random(seed)
    chosen: list[int] = []
    for group in sorted(plan.targets):
        docs = list(groups.get(group, []))
        target = plan.targets[group]
        if target >= plan.available[group]:
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


def requested_shares(weights: Optional[dict]) -> dict[str, float]:
    """Each weighted group's share as asked, before renormalizing over the groups that have data."""
    positive = {g: w for g, w in (weights or {}).items() if w > 0}
    total = sum(positive.values())
    return {g: w / total for g, w in positive.items()}


def mix_outcome(plan: MixPlan, selected: dict[str, int]) -> dict[str, dict]:
    """Per weighted group: target and achieved share of the output's characters, and whether it missed."""
    total = sum(selected.values())
    outcome = {}
    for group, target in requested_shares(plan.weights).items():
        achieved = selected.get(group, 0) / total if total else 0.0
        outcome[group] = {"target_share": target, "achieved_share": achieved,
                          "missed": abs(achieved - target) * 100 > MIX_MISS_POINTS}
    return outcome


def describe(plan: MixPlan, selected: dict[str, int]) -> list[str]:
    """Report lines: target vs achieved share per group, what was left out and why."""
    total = sum(selected.values()) or 1
    outcome = mix_outcome(plan, selected)
    lines = []
    for group in sorted([*plan.targets, *plan.missing], key=lambda g: -selected.get(g, 0)):
        want = f"{100.0 * outcome[group]['target_share']:5.1f}%" if plan.weights else "natural"
        used = (f"({selected.get(group, 0):,} of {plan.available[group]:,} chars used)" if group in plan.targets
                else "(no data; the other weights were renormalized)")
        missed = "  MISSED" if outcome.get(group, {}).get("missed") else ""
        lines.append(f"  {group:<24} target {want:>7}  achieved {100.0 * selected.get(group, 0) / total:5.1f}%  "
                     f"{used}{missed}")
    if plan.excluded:
        lines.append(f"  left out (no weight): {', '.join(f'{g} ({plan.available[g]:,} chars)' for g in plan.excluded)}")
    return lines


def _pct(share: float) -> str:
    """0.4 -> "40%", 1/3 -> "33.3%"."""
    return f"{100.0 * share:.1f}".removesuffix(".0") + "%"


def _spec(shares: dict[str, float]) -> str:
    return ",".join(f"{g}={s:.2f}" for g, s in shares.items())


def _overshooting(plan: MixPlan, selected: dict[str, int]) -> Optional[str]:
    """The sampled group that overshot its budget the most, when by OVERSHOOT_POINTS or more.

    Sampling stops at the first document that reaches the budget, so a group
    made of few large documents can overshoot by most of one of them.
    """
    total = sum(selected.values()) or 1
    over = {g: selected.get(g, 0) - t for g, t in plan.targets.items() if t < plan.available[g]}
    group = max(over, key=over.get, default=None)
    return group if group is not None and 100.0 * over[group] / total >= OVERSHOOT_POINTS else None


def _scarcity(plan: MixPlan, group: str, text_bytes: dict[str, int]) -> str:
    """Why a short group could not supply more: it has no data, or all of it is used ("" when neither)."""
    if group in plan.missing:
        return f"the input holds no {group} text"
    if plan.targets[group] >= plan.available[group]:
        return f"the input holds only {format_bytes(text_bytes.get(group, 0))} of {group} text"
    return ""


def mix_warning(plan: MixPlan, selected: dict[str, int], text_bytes: dict[str, int],
                largest: dict[str, int]) -> Optional[str]:
    """One line naming each group short of its target by more than MIX_MISS_POINTS, why, and what to do.

    ``text_bytes`` and ``largest`` give each group's bytes and its largest document's bytes.
    """
    outcome = mix_outcome(plan, selected)
    short = [g for g, o in outcome.items() if o["missed"] and o["achieved_share"] < o["target_share"]]
    if not short:
        return None
    scarce = {g: _scarcity(plan, g, text_bytes) for g in short}
    statement = "; ".join(f"{g} is {100.0 * outcome[g]['achieved_share']:.1f}% of the output (target "
                          f"{_pct(outcome[g]['target_share'])})" + (f" because {scarce[g]}" if scarce[g] else "")
                          for g in short)
    big = _overshooting(plan, selected)
    if big or not any(scarce.values()):
        cause = (f"{big}'s documents are too large to sample down to match (the largest holds {format_bytes(largest[big])})"
                 if big else "whole documents overshoot the other groups' budgets")
        statement += f", and {cause}" if any(scarce.values()) else f" because {cause}"
    total = sum(selected.values()) or 1
    supported = {g: max(round(selected.get(g, 0) / total, 2), 0.01) for g in outcome if g in plan.targets}
    keys = ", ".join(short)
    advice = (f"add {keys} data or lower {'its weight' if len(short) == 1 else 'their weights'} "
              f"(--mix {_spec(supported)})")
    if big:
        advice += f", or split {big}'s documents into smaller ones"
    requested = _spec({g: o["target_share"] for g, o in outcome.items()})
    return f"warning: mix {requested} not reached: {statement}; {advice}"


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


@dataclass
class _Documents:
    """The clean documents in the working file: per document (offset, bytes, lang, chars, group)."""

    records: list = field(default_factory=list)
    groups: dict = field(default_factory=dict)  # group -> [(index, chars)]

    def chars(self) -> dict[str, int]:
        return {g: sum(c for _, c in docs) for g, docs in self.groups.items()}

    def counts(self) -> dict[str, int]:
        return {g: len(docs) for g, docs in self.groups.items()}

    def text_bytes(self) -> tuple[dict[str, int], dict[str, int]]:
        """Per group: its bytes in the output format, and its largest document's."""
        total: dict[str, int] = {}
        largest: dict[str, int] = {}
        for _, length, _, _, group in self.records:
            total[group] = total.get(group, 0) + length
            largest[group] = max(largest.get(group, 0), length)
        return total, largest

    def planned_bytes(self, order: list[int]) -> int:
        return sum(self.records[i][1] for i in order)


def _write_documents(files: list[Path], path: Path, stats: IngestStats, mix_by: str, strict: bool,
                     log: Callable[[str], None]) -> _Documents:
    """Clean documents go to a working file first: the corpus is never held in memory."""
    found = _Documents()
    with open(path, "wb") as out:
        for doc in iter_documents(files, stats, strict=strict, log=log):
            line = (json.dumps({"text": doc.text, "lang": doc.lang, "source": doc.source},
                               ensure_ascii=False) + "\n").encode("utf-8")
            group = doc.lang if mix_by == "lang" else doc.source
            found.groups.setdefault(group, []).append((len(found.records), len(doc.text)))
            found.records.append((out.tell(), len(line), doc.lang, len(doc.text), group))
            out.write(line)
    return found


def _copy_documents(src_path: Path, dst_path: Path, order: list[int], found: _Documents,
                    log: Callable[[str], None] = print) -> tuple[dict, dict]:
    """Copy the chosen documents in ``order``; returns the characters per group and the per-language counts."""
    selected: dict[str, int] = {}
    per_lang: dict[str, dict] = {}
    bar = Progress("writing the mix", sum(found.records[i][1] for i in order), log=log)
    with open(src_path, "rb") as src, open(dst_path, "wb") as dst:
        for index in order:
            offset, length, lang, chars, group = found.records[index]
            src.seek(offset)
            dst.write(src.read(length))
            bar.update(length)
            selected[group] = selected.get(group, 0) + chars
            row = per_lang.setdefault(lang, {"docs": 0, "chars": 0})
            row["docs"] += 1
            row["chars"] += chars
    bar.close()
    return selected, per_lang


@dataclass
class _DiskNeed:
    """What a disk-full error reports: the space the whole write needs, in parts."""

    documents: int  # the working copy of the clean documents
    corpus: int  # the mixed corpus
    estimated: bool = True

    def error(self, exc: OSError, output: Path) -> DataError:
        what = "disk quota exceeded" if exc.errno == errno.EDQUOT else "disk full"
        free = shutil.disk_usage(output.parent).free
        about = "about " if self.estimated else ""
        return DataError(
            f"{what} while writing {output}: it needs {about}{format_bytes(self.documents + self.corpus)} in {output.parent} "
            f"({format_bytes(self.documents)} of clean documents while mixing, {format_bytes(self.corpus)} for the corpus), "
            f"{format_bytes(free)} is free; free some space or write elsewhere with --output")


def _summary(settings: dict, files: list[Path], stats: IngestStats, plan: MixPlan, selected: dict,
             per_lang: dict, order: list[int], output: Path, out_bytes: int, mix_by: str,
             warning: Optional[str]) -> dict:
    total = sum(r["chars"] for r in per_lang.values())
    report = [format_summary(stats), f"mix by {mix_by} -> {output} ({len(order):,} docs, {total:,} chars):",
              *describe(plan, selected)]
    return {
        "settings": settings,
        "inputs": {"files": file_stamp(files), "content_sha256": content_hash(files)},
        "ingest": stats.to_dict(),
        "mix": {"available_chars": plan.available, "target_chars": plan.targets, "selected_chars": selected,
                "achieved_share": {g: c / max(total, 1) for g, c in selected.items()},
                "targets": mix_outcome(plan, selected), "miss_threshold_points": MIX_MISS_POINTS,
                "warning": warning, "left_out": plan.excluded, "no_data": plan.missing},
        "output": {"path": str(output), "bytes": out_bytes, "docs": len(order), "chars": total,
                   "per_lang": per_lang},
        "report": report,
    }


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

    Everything is written to temporary files beside the output first, and only
    then renamed into place: an interruption or a full disk leaves the previous
    output (or none) and no temporary file. Returns the summary also saved as
    ``<name>.stats.json``.
    """
    output = Path(output)
    settings = {"format": MIX_FORMAT, "weights": weights, "mix_by": mix_by, "seed": seed}
    old = None if force else _reusable(output, files, settings)
    if old is not None:
        log(f"reusing {output} (input and mix unchanged; --force rebuilds)")
        log("\n".join(old["report"]))
        if old["mix"].get("warning"):
            log(old["mix"]["warning"])
        return old
    output.parent.mkdir(parents=True, exist_ok=True)
    stats = IngestStats()
    docs_path = output.with_name(f".{output.name}.docs-{os.getpid()}")
    tmp_out = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    tmp_stats = output.with_name(f".{stats_path(output).name}.tmp-{os.getpid()}")
    estimate = text_bytes(files)
    need = _DiskNeed(estimate, estimate)  # until the plan exists: the corpus is at most all documents
    try:
        try:
            found = _write_documents(files, docs_path, stats, mix_by, strict, log)
            plan = plan_mix(found.chars(), weights, found.counts())
            order = select_documents(found.groups, plan, seed)
            need = _DiskNeed(docs_path.stat().st_size, found.planned_bytes(order), estimated=False)
            selected, per_lang = _copy_documents(docs_path, tmp_out, order, found, log)
            warning = mix_warning(plan, selected, *found.text_bytes())
            summary = _summary(settings, files, stats, plan, selected, per_lang, order, output,
                               tmp_out.stat().st_size, mix_by, warning)
            with open(tmp_stats, "w", encoding="utf-8") as f:
                f.write(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
            # Both files are complete before either is renamed. Stopped between the renames, the new
            # corpus sits beside the old stats file, which _reusable accepts only if it describes
            # the same settings, input and size, i.e. the same (deterministic) output.
            os.replace(tmp_out, output)
            os.replace(tmp_stats, stats_path(output))
        finally:
            for path in (docs_path, tmp_out, tmp_stats):
                path.unlink(missing_ok=True)
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise need.error(exc, output) from exc  # after the cleanup above, so "free" counts what it gave back
    log("\n".join(summary["report"]))
    if warning:
        log(warning)
    return summary
