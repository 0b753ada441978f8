"""Mixing: the limiting group keeps every document, missed targets are reported, writes are all-or-nothing."""
from __future__ import annotations

import errno
import json
import pathlib
import random

import pytest

from koen_sllm.data import DataError
from koen_sllm.data import mix
from koen_sllm.data.mix import MIX_MISS_POINTS, plan_mix, select_documents, stats_path, write_mixed_corpus

RECIPE = {"ko": 0.6, "en": 0.4}


def _write_jsonl(path, docs: list[tuple[str, str]]):
    path.write_text("".join(json.dumps({"text": t, "lang": lang}, ensure_ascii=False) + "\n" for lang, t in docs),
                    encoding="utf-8")
    return path


def _text(lang: str, i: int, chars: int) -> str:
    """A unique document of exactly ``chars`` characters (at least 12)."""
    head = f"{'문서' if lang == 'ko' else 'doc'}{i:06d}:"
    assert chars > len(head)
    return head + ("가" if lang == "ko" else "a") * (chars - len(head))


def _lost(groups, plan, seed) -> dict[str, int]:
    chosen = set(select_documents(groups, plan, seed))
    return {g: sum(1 for i, _ in docs if i not in chosen) for g, docs in groups.items()}


def _groups(lengths: dict[str, list[int]]):
    groups, index = {}, 0
    for g, sizes in lengths.items():
        groups[g] = [(index + k, c) for k, c in enumerate(sizes)]
        index += len(sizes)
    return groups


def _plan(groups):
    available = {g: sum(c for _, c in docs) for g, docs in groups.items()}
    return plan_mix(available, RECIPE, {g: len(docs) for g, docs in groups.items()})


# ---------------------------------------------------------------- documents kept


def test_input_at_target_shares_keeps_every_document():
    # Exactly 60/40, and 60/40 within one document (the en side ends in a few short documents):
    # the sampler used to cut that surplus by dropping whichever short en documents came last.
    exact = _groups({"ko": [100] * 60, "en": [100] * 40})
    near = _groups({"ko": [100] * 60, "en": [100] * 39 + [90, 3, 3, 3, 3, 3]})
    for seed in range(30):
        assert _lost(exact, _plan(exact), seed) == {"ko": 0, "en": 0}
        assert _lost(near, _plan(near), seed) == {"ko": 0, "en": 0}, f"seed {seed}"


def test_large_input_within_rounding_keeps_every_document():
    # Many documents of heavy-tailed lengths, en over 40% by less than one long document: invisible in
    # the shares, and cutting it would drop whichever short en documents the shuffle put last.
    for trial in range(5):
        rng = random.Random(trial)
        lengths = {}
        for g, total in (("ko", 3_000_000), ("en", 2_000_000)):
            sizes, left = [], total
            while left > 0:
                sizes.append(min(left, max(20, int(rng.lognormvariate(6, 1.5)))))
                left -= sizes[-1]
            lengths[g] = sizes
        lengths["en"] += [2_000] + [25] * 10
        groups = _groups(lengths)
        available = {g: sum(c for _, c in docs) for g, docs in groups.items()}
        assert _lost(groups, plan_mix(available, RECIPE), seed=trial) == {"ko": 0, "en": 0}


def test_limiting_language_keeps_every_document(tmp_path):
    rng = random.Random(7)
    docs = [("ko", _text("ko", i, rng.randint(20, 400))) for i in range(300)]
    docs += [("en", _text("en", i, rng.randint(20, 400))) for i in range(120)]  # en is scarce for 40%
    raw = _write_jsonl(tmp_path / "raw.jsonl", docs)
    summary = write_mixed_corpus([raw], tmp_path / "out" / "m.jsonl", RECIPE, seed=5, log=lambda _: None)
    assert summary["output"]["per_lang"]["en"] == summary["ingest"]["per_lang"]["en"]
    assert summary["output"]["per_lang"]["ko"]["docs"] < 300
    assert abs(summary["mix"]["achieved_share"]["en"] - 0.4) < 0.01


def test_exact_input_keeps_every_document_end_to_end(tmp_path):
    rng = random.Random(3)
    ko = [rng.randint(20, 500) for _ in range(240)]
    ko[-1] += -sum(ko) % 3
    target, en = sum(ko) * 2 // 3, []  # en is exactly 40% of the characters
    while sum(en) < target - 520:
        en.append(rng.randint(20, 500))
    en.append(target - sum(en))
    raw = _write_jsonl(tmp_path / "raw.jsonl", [("ko", _text("ko", i, c)) for i, c in enumerate(ko)]
                       + [("en", _text("en", i, c)) for i, c in enumerate(en)])
    summary = write_mixed_corpus([raw], tmp_path / "m.jsonl", RECIPE, seed=11, log=lambda _: None)
    assert summary["ingest"]["per_lang"]["en"]["chars"] * 3 == summary["ingest"]["per_lang"]["ko"]["chars"] * 2
    assert summary["output"]["per_lang"] == summary["ingest"]["per_lang"] and summary["mix"]["warning"] is None


def test_same_input_and_seed_give_identical_bytes(tmp_path):
    rng = random.Random(1)
    docs = [("ko" if i % 3 else "en", _text("ko" if i % 3 else "en", i, rng.randint(20, 300))) for i in range(200)]
    raw = _write_jsonl(tmp_path / "raw.jsonl", docs)
    out = tmp_path / "m.jsonl"
    write_mixed_corpus([raw], out, RECIPE, seed=9, force=True, log=lambda _: None)
    first = out.read_bytes()
    write_mixed_corpus([raw], out, RECIPE, seed=9, force=True, log=lambda _: None)
    assert out.read_bytes() == first
    write_mixed_corpus([raw], out, RECIPE, seed=10, force=True, log=lambda _: None)
    assert out.read_bytes() != first


# ---------------------------------------------------------------- missed targets


def _mostly_korean(tmp_path):
    # Korean in a few long documents (whole books or dumps), English a little: ko cannot be cut to 60%.
    docs = [("ko", _text("ko", i, 30_000)) for i in range(4)] + [("en", _text("en", i, 200)) for i in range(10)]
    return _write_jsonl(tmp_path / "raw.jsonl", docs)


def test_missed_target_warns_once_with_the_reason_and_a_mix_the_data_meets(tmp_path):
    out = tmp_path / "ds" / "m.jsonl"
    logs: list[str] = []
    summary = write_mixed_corpus([_mostly_korean(tmp_path)], out, RECIPE, seed=2, log=logs.append)
    warnings = [line for line in logs if line.startswith("warning:")]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    text = warnings[0]
    en = summary["mix"]["achieved_share"]["en"]
    assert text.startswith(f"warning: mix ko=0.60,en=0.40 not reached: en is {100 * en:.1f}% of the output "
                           "(target 40%) because the input holds only ")
    assert "of en text" in text and "ko's documents are too large" in text
    assert f"add en data or lower its weight (--mix ko={1 - en:.2f},en={en:.2f})" in text
    saved = json.loads(stats_path(out).read_text(encoding="utf-8"))
    assert saved["mix"]["targets"]["en"] == {"target_share": 0.4, "achieved_share": en, "missed": True}
    assert saved["mix"]["targets"]["ko"]["missed"] and saved["mix"]["warning"] == text
    report = "\n".join(saved["report"])
    assert "target   40.0%  achieved" in report and "MISSED" in report
    logs.clear()  # reusing the output repeats the warning
    write_mixed_corpus([_mostly_korean(tmp_path)], out, RECIPE, seed=2, log=logs.append)
    assert logs[0].startswith("reusing") and logs[-1] == text


def test_group_without_data_is_a_missed_target(tmp_path):
    raw = _write_jsonl(tmp_path / "raw.jsonl", [("ko", _text("ko", i, 100)) for i in range(20)])
    logs: list[str] = []
    summary = write_mixed_corpus([raw], tmp_path / "m.jsonl", RECIPE, log=logs.append)
    assert logs[-1] == ("warning: mix ko=0.60,en=0.40 not reached: en is 0.0% of the output (target 40%) because "
                        "the input holds no en text; add en data or lower its weight (--mix ko=1.00)")
    assert summary["mix"]["targets"]["en"] == {"target_share": 0.4, "achieved_share": 0.0, "missed": True}


def test_met_target_gives_no_warning(tmp_path):
    rng = random.Random(4)
    docs = [("ko", _text("ko", i, rng.randint(50, 150))) for i in range(200)]
    docs += [("en", _text("en", i, rng.randint(50, 150))) for i in range(200)]
    logs: list[str] = []
    summary = write_mixed_corpus([_write_jsonl(tmp_path / "raw.jsonl", docs)], tmp_path / "m.jsonl", RECIPE,
                                 log=logs.append)
    assert not [line for line in logs if "warning" in line.lower()] and summary["mix"]["warning"] is None
    for row in summary["mix"]["targets"].values():
        assert abs(row["achieved_share"] - row["target_share"]) * 100 <= MIX_MISS_POINTS and not row["missed"]
    assert "MISSED" not in "\n".join(summary["report"])


# ---------------------------------------------------------------- interrupted or full disk


def _break_writes(monkeypatch, name_part: str, exc: BaseException) -> None:
    """Writing a file whose name contains ``name_part`` writes part of the data, then raises ``exc``.

    Both ways mix.py could write a file are covered (its ``open`` and ``Path.write_text``), so the
    test does not depend on which one a given file uses.
    """
    real_open, real_write_text = open, pathlib.Path.write_text

    class Breaking:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            self.f.write(data[: len(data) // 2])
            raise exc

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *args):
            self.f.close()

    def fake_open(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        return Breaking(f) if "w" in mode and name_part in pathlib.Path(path).name else f

    def fake_write_text(self, data, *args, **kwargs):
        if name_part not in self.name:
            return real_write_text(self, data, *args, **kwargs)
        real_write_text(self, data[: len(data) // 2], *args, **kwargs)
        raise exc

    monkeypatch.setattr(mix, "open", fake_open, raising=False)
    monkeypatch.setattr(pathlib.Path, "write_text", fake_write_text)


# The three files written: the working copy of the documents, the corpus, its stats file.
STAGES = [".docs-", ".jsonl.tmp-", "stats.json.tmp"]


def _previous_output(tmp_path):
    rng = random.Random(6)
    docs = [("ko" if i % 2 else "en", _text("ko" if i % 2 else "en", i, rng.randint(40, 400))) for i in range(300)]
    raw = _write_jsonl(tmp_path / "raw.jsonl", docs)
    out = tmp_path / "m.jsonl"
    write_mixed_corpus([raw], out, RECIPE, seed=1, log=lambda _: None)
    return raw, out, out.read_bytes(), stats_path(out).read_bytes()


@pytest.mark.parametrize("stage", STAGES)
def test_full_disk_is_one_error_and_leaves_the_previous_output(tmp_path, monkeypatch, stage):
    raw, out, before, stats_before = _previous_output(tmp_path)
    _break_writes(monkeypatch, stage, OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(DataError) as caught:
        write_mixed_corpus([raw], out, RECIPE, seed=1, force=True, log=lambda _: None)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"disk full while writing {out}: it needs ")
    assert " is free; free some space or write elsewhere with --output" in message
    if stage != ".docs-":  # past the plan the size is known: the planned corpus is the old one's size
        assert f"{mix.format_bytes(len(before))} for the corpus" in message
    assert out.read_bytes() == before and stats_path(out).read_bytes() == stats_before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.jsonl", "m.stats.json", "raw.jsonl"]


@pytest.mark.parametrize("stage", STAGES)
def test_interrupt_leaves_the_previous_output_and_no_temporary_file(tmp_path, monkeypatch, stage):
    raw, out, before, stats_before = _previous_output(tmp_path)
    _break_writes(monkeypatch, stage, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        write_mixed_corpus([raw], out, {"ko": 0.5, "en": 0.5}, seed=2, log=lambda _: None)
    assert out.read_bytes() == before and stats_path(out).read_bytes() == stats_before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.jsonl", "m.stats.json", "raw.jsonl"]


def test_interrupt_of_a_first_run_leaves_nothing(tmp_path, monkeypatch):
    raw = _write_jsonl(tmp_path / "raw.jsonl", [("en", _text("en", i, 100)) for i in range(30)])
    _break_writes(monkeypatch, ".jsonl.tmp-", KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        write_mixed_corpus([raw], tmp_path / "ds" / "m.jsonl", {"en": 1}, log=lambda _: None)
    assert list((tmp_path / "ds").iterdir()) == []
