"""Robust reading, cleaning, language detection, de-duplication and mixing."""
from __future__ import annotations

import json
import os
import unicodedata
from collections import Counter

import pytest

from koen_sllm.config import repo_root
from koen_sllm.data import DataError
from koen_sllm.data import ingest
from koen_sllm.data.ingest import IngestStats, clean_text, detect_language, find_input_files, iter_documents
from koen_sllm.data.mix import parse_mix, plan_mix, select_documents, write_mixed_corpus
from koen_sllm.data import prepare

SAMPLE = repo_root().parent / "shared" / "data" / "ko_en_sample.jsonl"


def _j(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n"


BIG = "가나다라 " * 200_000  # 2.6 MB of UTF-8 in a single line
HUGE = "x" * (5 << 20)


def _bad_file_lines() -> list[bytes]:
    """Every case of the reading rules, one per line (line numbers in comments)."""
    return [
        _j({"text": "첫 번째 정상 문서입니다.", "lang": "ko"}),                     # 1 ok
        b"\xef\xbb\xbf" + _j({"text": "bom at the start"}),                          # 2 bom
        b'{"text": "windows line end"}\r\n',                                         # 3 crlf
        b'{"text": "no closing brace"\n',                                            # 4 malformed_json
        b"[1, 2, 3]\n",                                                              # 5 not_object
        b'"just a string"\n',                                                        # 6 not_object
        b'{"body": "wrong field"}\n',                                                # 7 missing_text
        b'{"text": 42}\n',                                                           # 8 non_string_text
        b'{"text": null}\n',                                                         # 9 non_string_text
        b'{"text": ""}\n',                                                           # 10 empty_text
        b'{"text": "  \\n\\t  "}\n',                                                 # 11 empty_text
        b'{"text": "caf\xe9 au lait is one bad byte in a long enough line"}\n',      # 12 invalid_utf8 (repaired)
        '{"text": "한국어 문장입니다 여기 저기 모두"}\n'.encode("cp949"),            # 13 not_utf8
        b'{"text": "nul\\u0000inside and bell\\u0007 and raw\x01control"}\n',        # 14 control_chars
        b'{"text": "lone \\ud800 surrogate"}\n',                                     # 15 lone_surrogates
        b'{"text": "paired \\ud83d\\ude00 emoji stays"}\n',                          # 16 ok
        b"\n",                                                                       # 17 blank_line
        _j({"text": unicodedata.normalize("NFD", "맥에서 온 한글")}),                # 18 nfc
        _j({"text": BIG, "lang": "ko"}),                                             # 19 multi-megabyte, ok
        _j({"text": HUGE}),                                                          # 20 too_long (limit patched)
        _j({"text": "첫 번째 정상 문서입니다.", "lang": "ko"}),                     # 21 duplicate of 1
        _j({"text": "mixed 한국어 and English", "lang": "KOR", "source": "web"}),    # 22 lang alias
        b'{"text": "last line without newline"}',                                    # 23 no_final_newline
    ]


@pytest.fixture
def bad_file(tmp_path, monkeypatch):
    monkeypatch.setattr(ingest, "MAX_LINE_BYTES", 4 << 20)
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"".join(_bad_file_lines()))
    return path


def test_every_bad_line_is_skipped_or_repaired_with_exact_counts(bad_file):
    stats, logs = IngestStats(), []
    docs = list(iter_documents([bad_file], stats, log=logs.append))
    fs = stats.files[0]
    assert dict(fs.skipped) == {"malformed_json": 1, "not_object": 2, "missing_text": 1, "non_string_text": 2,
                                "empty_text": 2, "not_utf8": 1, "blank_line": 1, "too_long": 1}
    assert dict(fs.repaired) == {"bom": 1, "crlf": 1, "invalid_utf8": 1, "control_chars": 1,
                                 "lone_surrogates": 1, "nfc": 1, "no_final_newline": 1}
    assert fs.examples["not_object"] == [5, 6] and fs.examples["empty_text"] == [10, 11]
    assert fs.lines == 23 and fs.duplicates == 1 and stats.duplicates == 1
    texts = [d.text for d in docs]
    assert texts == ["첫 번째 정상 문서입니다.", "bom at the start", "windows line end",
                     "caf au lait is one bad byte in a long enough line", "nulinside and bell and rawcontrol",
                     "lone  surrogate", "paired 😀 emoji stays", "맥에서 온 한글", BIG.strip(),
                     "mixed 한국어 and English", "last line without newline"]
    assert unicodedata.is_normalized("NFC", texts[7])
    assert [d.lang for d in docs][:3] == ["ko", "en", "en"] and docs[9].lang == "ko" and docs[9].source == "web"
    assert docs[1].source == "bad"  # default source: the file name
    warning = [line for line in logs if line.startswith("WARNING")]
    assert len(warning) == 1 and "not_object 2 (lines 5, 6)" in warning[0] and "malformed_json 1 (line 4)" in warning[0]
    assert stats.docs == 11 and stats.per_lang["ko"]["docs"] == 4


def test_strict_stops_at_first_bad_line(bad_file):
    with pytest.raises(DataError) as err:
        list(iter_documents([bad_file], IngestStats(), strict=True, log=lambda _: None))
    msg = str(err.value)
    assert msg.startswith(f"{bad_file}:4: not valid JSON (malformed_json)") and "without --strict" in msg


def test_file_where_nothing_loads_is_an_error(tmp_path):
    path = tmp_path / "junk.jsonl"
    path.write_bytes(b"not json\n[1]\n{\"text\": \"\"}\n")
    with pytest.raises(DataError, match=r"junk.jsonl: no usable document in 3 lines: skipped: empty_text 1 \(line 3\)"):
        list(iter_documents([path], IngestStats(), log=lambda _: None))
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="the file is empty"):
        list(iter_documents([empty], IngestStats(), log=lambda _: None))


def test_cli_exit_code_and_one_line_message_for_all_bad_file(tmp_path, capsys):
    path = tmp_path / "junk.jsonl"
    path.write_bytes(b"{broken\n")
    code = prepare.main([str(path), "--output", str(tmp_path / "out" / "mixed.jsonl")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and "junk.jsonl" in err[0]
    assert not (tmp_path / "out" / "mixed.jsonl").exists()


def test_nfd_becomes_nfc_in_jsonl_and_txt(tmp_path):
    nfd = unicodedata.normalize("NFD", "한국어 자모 분해 텍스트")
    assert nfd != unicodedata.normalize("NFC", nfd)
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": nfd}) + "\n", encoding="utf-8")
    (tmp_path / "b.txt").write_bytes(("\ufeff" + nfd + "\r\n둘째 줄\r\n\r\nsecond paragraph\r\n").encode("utf-8"))
    stats = IngestStats()
    docs = list(iter_documents(find_input_files([tmp_path]), stats, log=lambda _: None))
    assert [d.text for d in docs] == ["한국어 자모 분해 텍스트", "한국어 자모 분해 텍스트\n둘째 줄", "second paragraph"]
    assert stats.files[1].repaired["nfc"] == 1 and stats.files[1].repaired["bom"] == 1
    assert stats.files[1].repaired["crlf"] == 4


def test_exact_duplicates_removed_across_files(tmp_path):
    (tmp_path / "a.jsonl").write_text(_j({"text": "same"}).decode() + _j({"text": "a only"}).decode(), encoding="utf-8")
    (tmp_path / "b.jsonl").write_text(_j({"text": "same"}).decode() + _j({"text": " same "}).decode(), encoding="utf-8")
    stats = IngestStats()
    docs = list(iter_documents(find_input_files([tmp_path]), stats, log=lambda _: None))
    assert [d.text for d in docs] == ["same", "a only"]  # " same " is the same document once trimmed
    assert stats.duplicates == 2 and stats.files[1].duplicates == 2 and stats.files[1].docs == 0


def test_clean_text_keeps_compatibility_jamo_and_emoji():
    text, repairs = clean_text("ㅋㅋㅋ ㅠㅠ 😀\t tab\n")
    assert text == "ㅋㅋㅋ ㅠㅠ 😀\t tab" and repairs == []


@pytest.mark.parametrize("text,lang", [
    ("오늘은 날씨가 정말 좋네요.", "ko"),
    ("나는 PyTorch와 Python으로 모델을 학습했다.", "ko"),
    ("I met 김민수 in Seoul yesterday afternoon.", "en"),
    ("The quick brown fox jumps over the lazy dog.", "en"),
    ("中文文本没有韩文也没有拉丁字母", "other"),
    ("12345 678 90", "other"),
])
def test_detect_language(text, lang):
    assert detect_language(text) == lang


def test_find_input_files_folders_globs_and_errors(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("a.jsonl", "b.txt", "c.json", ".hidden.jsonl", "sub/d.jsonl"):
        (tmp_path / name).write_text('{"text": "x"}\n', encoding="utf-8")
    assert [p.name for p in find_input_files([tmp_path])] == ["a.jsonl", "b.txt"]
    assert [p.name for p in find_input_files([str(tmp_path / "**" / "*.jsonl")])] == ["a.jsonl", "d.jsonl"]
    assert [p.name for p in find_input_files([tmp_path, tmp_path / "a.jsonl"], exclude=[tmp_path / "b.txt"])] == ["a.jsonl"]
    with pytest.raises(DataError, match="matches no file"):
        find_input_files([str(tmp_path / "nothing*.jsonl")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no"):
        find_input_files([tmp_path / "empty"])


def test_mix_plan_downsamples_the_surplus_and_reports_missing_groups():
    plan = plan_mix({"ko": 600, "en": 2000, "ja": 50}, parse_mix("ko=0.6,en=0.4"))
    assert plan.targets == {"ko": 600, "en": pytest.approx(400)} and plan.excluded == ["ja"]
    plan = plan_mix({"ko": 600}, parse_mix("ko=0.6,en=0.4"))
    assert plan.targets == {"ko": 600} and plan.missing == ["en"]
    assert parse_mix("natural") is None
    with pytest.raises(DataError, match="KEY=WEIGHT"):
        parse_mix("ko:0.6")
    groups = {"ko": [(i, 100) for i in range(6)], "en": [(i, 100) for i in range(6, 26)]}
    plan = plan_mix({"ko": 600, "en": 2000}, {"ko": 0.6, "en": 0.4})
    chosen = select_documents(groups, plan, seed=1)
    assert sorted(i for i in chosen if i < 6) == list(range(6)) and sum(1 for i in chosen if i >= 6) == 4
    assert chosen == select_documents(groups, plan, seed=1)


def _corpus(tmp_path, n_ko=60, n_en=90):
    path = tmp_path / "raw.jsonl"
    lines = [_j({"text": f"한국어 문서 번호 {i} 입니다. " * 3, "lang": "ko"}) for i in range(n_ko)]
    lines += [_j({"text": f"English document number {i}. " * 3}) for i in range(n_en)]
    path.write_bytes(b"".join(lines))
    return path


def test_mixed_corpus_ratio_stats_file_and_reuse(tmp_path):
    raw = _corpus(tmp_path)
    out = tmp_path / "ds" / "mixed_pretraining.jsonl"
    logs = []
    summary = write_mixed_corpus([raw], out, {"ko": 0.6, "en": 0.4}, seed=3, log=logs.append)
    share = summary["mix"]["achieved_share"]
    assert summary["mix"]["selected_chars"]["ko"] == summary["mix"]["available_chars"]["ko"]
    assert abs(share["ko"] - 0.6) < 0.02 and summary["output"]["docs"] == len(out.read_text().splitlines())
    saved = json.loads((tmp_path / "ds" / "mixed_pretraining.stats.json").read_text(encoding="utf-8"))
    assert saved["ingest"]["per_lang"]["en"]["docs"] == 90 and saved["output"]["per_lang"]["ko"]["docs"] == 60
    assert any("achieved" in line for line in logs)
    before = out.read_bytes()
    os.utime(raw, ns=(1, 1))  # touched, same content: still reused
    logs.clear()
    write_mixed_corpus([raw], out, {"ko": 0.6, "en": 0.4}, seed=3, log=logs.append)
    assert logs[0].startswith("reusing") and out.read_bytes() == before
    logs.clear()
    write_mixed_corpus([raw], out, {"ko": 0.5, "en": 0.5}, seed=3, log=logs.append)
    assert not logs[0].startswith("reusing")


@pytest.mark.skipif(not SAMPLE.is_file(), reason=f"sample data not found at {SAMPLE}")
def test_sample_data_reads_cleanly():
    stats = IngestStats()
    docs = list(iter_documents([SAMPLE], stats, log=lambda _: None))
    assert len(docs) == 2811 and stats.chars == 5_453_339 and stats.duplicates == 0
    assert stats.per_lang["ko"] == {"docs": 1956, "chars": 3_271_574}
    assert not stats.skipped()
    # Detection agrees with every "lang" label of the sample.
    assert Counter(detect_language(d.text) == d.lang for d in docs) == Counter({True: 2811})


def test_gzip_inputs_are_read(tmp_path):
    import gzip

    with gzip.open(tmp_path / "a.jsonl.gz", "wb") as f:
        f.write(_j({"text": "압축된 문서"}) + b"{bad\n")
    with gzip.open(tmp_path / "b.txt.gz", "wb") as f:
        f.write("first paragraph\n\nsecond\n".encode())
    stats = IngestStats()
    docs = list(iter_documents(find_input_files([tmp_path]), stats, log=lambda _: None))
    assert [(d.text, d.lang) for d in docs] == [("압축된 문서", "ko"), ("first paragraph", "en"), ("second", "en")]
    assert stats.files[0].skipped == Counter({"malformed_json": 1})


def test_cli_strict_names_file_line_and_reason(bad_file, tmp_path, capsys):
    code = prepare.main([str(bad_file), "--strict", "--output", str(tmp_path / "out" / "m.jsonl")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and f"{bad_file}:4: not valid JSON (malformed_json)" in err[0]


def test_cli_mix_by_source_and_recipe_conflict(tmp_path, capsys):
    raw = tmp_path / "raw.jsonl"
    raw.write_bytes(b"".join(_j({"text": f"doc {i} " * 10, "source": "a" if i < 30 else "b"}) for i in range(40)))
    out = tmp_path / "m.jsonl"
    assert prepare.main([str(raw), "--mix-by", "source", "--mix", "a=1,b=1", "--output", str(out), "--no-shards"]) == 0
    summary = json.loads((tmp_path / "m.stats.json").read_text(encoding="utf-8"))
    assert summary["mix"]["selected_chars"]["b"] == summary["mix"]["available_chars"]["b"]
    assert abs(summary["mix"]["achieved_share"]["a"] - 0.5) < 0.05 and summary["output"]["docs"] < 40
    assert prepare.main([str(raw), "--recipe1", "--mix", "a=1", "--output", str(out)]) == 2
    assert "--recipe1 means --mix ko=0.6,en=0.4" in capsys.readouterr().err


def test_cli_bad_option_is_one_line(capsys):
    assert prepare.main(["--vocab-size", "abc"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: argument --vocab-size: invalid int value: 'abc' (see python -m koen_sllm.data.prepare --help)"]


# ---------------------------------------------------------------- inputs that used to abort the run


def test_deeply_nested_json_and_huge_integer_are_counted_skips(tmp_path):
    path = tmp_path / "deep.jsonl"
    deep = b'{"text": ' + b"[" * 200_000 + b"]" * 200_000 + b"}\n"
    huge_int = b'{"text": "id too long", "id": ' + b"7" * 5000 + b"}\n"
    path.write_bytes(_j({"text": "before"}) + deep + huge_int + _j({"text": "after"}))
    stats, logs = IngestStats(), []
    docs = list(iter_documents([path], stats, log=logs.append))
    assert [d.text for d in docs] == ["before", "after"]
    assert stats.files[0].skipped == Counter({"too_deep": 1, "number_too_long": 1})
    assert "too_deep 1 (line 2)" in logs[-1] and "number_too_long 1 (line 3)" in logs[-1]
    assert "skipped lines: number_too_long 1, too_deep 1" in ingest.format_summary(stats)
    with pytest.raises(DataError) as err:
        list(iter_documents([path], IngestStats(), strict=True, log=lambda _: None))
    assert str(err.value).startswith(f"{path}:2: JSON nested deeper than Python's recursion limit") and \
        "(too_deep)" in str(err.value)


def _gz_corpus(tmp_path, n=2000):
    """A .jsonl.gz of ``n`` distinct documents: (its compressed bytes, the texts)."""
    import gzip

    texts = [f"document {i}: " + "filler words to make it compress" * 3 for i in range(n)]
    return gzip.compress(b"".join(_j({"text": t}) for t in texts)), texts


def _truncated(gz: bytes) -> bytes:
    return gz[:len(gz) // 2]


def _bad_member(gz: bytes) -> bytes:
    """A second gzip member whose first deflate block has the reserved type: zlib.error."""
    import gzip

    return gz + gzip.compress(b"x")[:10] + b"\xff" * 32


def _bad_crc(gz: bytes) -> bytes:
    return gz[:-8] + bytes(b ^ 0xFF for b in gz[-8:-4]) + gz[-4:]


@pytest.mark.parametrize("damage,what", [
    (_truncated, r"compressed stream ends early after line {n} \(truncated file\?\)"),
    (_bad_member, r"compressed data is corrupt after line {n} \(Error -3 while decompressing data: invalid block type\)"),
    (_bad_crc, r"compressed data is corrupt after line {n} \(CRC check failed 0x[0-9a-f]+ != 0x[0-9a-f]+\)"),
])
def test_damaged_gzip_keeps_what_was_read_and_names_file_and_line(tmp_path, damage, what):
    import re

    gz, texts = _gz_corpus(tmp_path)
    path = tmp_path / "a.jsonl.gz"
    path.write_bytes(damage(gz))
    good = tmp_path / "b.jsonl"
    good.write_bytes(_j({"text": "the next file is still read"}))
    stats, logs = IngestStats(), []
    docs = list(iter_documents([path, good], stats, log=logs.append))
    n = len(docs) - 1
    assert 0 < n <= len(texts) and [d.text for d in docs[:n]] == texts[:n]  # a prefix, in order
    assert docs[-1].text == "the next file is still read" and stats.files[0].lines == n
    what = what.format(n=f"{n:,}")
    warnings = [line for line in logs if line.startswith("WARNING")]
    assert len(warnings) == 1 and re.fullmatch(
        f"WARNING: {re.escape(str(path))}: {what}; the rest of this file is skipped", warnings[0]), warnings
    assert re.search(f"damaged, rest of file skipped: {re.escape(str(path))}: {what}$", ingest.format_summary(stats))
    saved = stats.to_dict()
    assert saved["damaged_files"] == [str(path)] and saved["files"][0]["damage"]["after_line"] == n
    assert saved["files"][1]["damage"] is None
    with pytest.raises(DataError) as err:
        list(iter_documents([path, good], IngestStats(), strict=True, log=lambda _: None))
    assert re.match(f"{re.escape(str(path))}: {what}; replace the file, or run without --strict", str(err.value))
    # The input hash reads raw bytes, so a damaged file still has one (the cache check needs it).
    assert len(ingest.content_hash([path])) == 64 and ingest.file_stamp([path])[0][1] == path.stat().st_size


def test_plain_text_named_gz_and_empty_gzip_stream_are_one_line_errors(tmp_path):
    import gzip

    plain = tmp_path / "plain.jsonl.gz"
    plain.write_bytes(_j({"text": "not compressed at all"}))
    header_only = tmp_path / "header.jsonl.gz"
    header_only.write_bytes(gzip.compress(b"")[:10])
    for path, what in ((plain, r"not gzip data \(a plain file named \.gz\? rename it without \.gz\)"),
                       (header_only, r"compressed stream ends early at the start \(truncated file\?\)")):
        with pytest.raises(DataError, match=f"{path.name}: no usable document in 0 lines: {what}"):
            list(iter_documents([path], IngestStats(), log=lambda _: None))
        with pytest.raises(DataError, match=f"{path.name}: {what}; replace the file"):
            list(iter_documents([path], IngestStats(), strict=True, log=lambda _: None))


def test_cli_truncated_gzip_warns_once_and_strict_is_one_error_line(tmp_path, capsys):
    gz, texts = _gz_corpus(tmp_path)
    path = tmp_path / "a.jsonl.gz"
    path.write_bytes(_truncated(gz))
    out = tmp_path / "out" / "m.jsonl"
    assert prepare.main([str(path), "--no-shards", "--output", str(out)]) == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.out.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1 and str(path) in warnings[0] and "truncated file?" in warnings[0]
    assert "damaged, rest of file skipped" in captured.out and not captured.err
    assert 0 < len(out.read_text(encoding="utf-8").splitlines()) < len(texts)
    assert prepare.main([str(path), "--strict", "--force", "--output", str(tmp_path / "strict" / "m.jsonl")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {path}: compressed stream ends early after line ")
