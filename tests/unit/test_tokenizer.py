"""SentencePiece tokenizer: round trips, fixed ids, NFC, and identical ids through transformers."""
from __future__ import annotations

import hashlib
import json
import os
import unicodedata

import pytest

from koen_sllm.config import repo_root
from koen_sllm.data.dummy import dummy_documents
from koen_sllm.tokenizer import (BOS_ID, EOS_ID, PAD_ID, UNK_ID, KoEnTokenizer, TokenizerError, normalize_text,
                                 train_tokenizer)

os.environ["HF_HUB_OFFLINE"] = "1"
SAMPLE = repo_root().parent / "shared" / "data" / "ko_en_sample.jsonl"

CASES = [
    "안녕하세요, 세계! 오늘은 날씨가 좋네요.",
    "The quick brown fox jumps over the lazy dog.",
    "emoji 😀👍🏽🇰🇷 and ❤️",
    "rare syllables 똠 뙇 꽯 쓟 햏 뷁",
    "compatibility jamo ㅋㅋㅋ ㅠㅠ ㄱㄴㄷ ㅏㅑ",
    "   leading spaces",
    "trailing spaces   ",
    "multiple   spaces\tand\ttabs",
    "new\nlines\n\n\nand a final newline\n",
    "\n",
    "",
    "숫자 1234567 and 3.14159",
    "literal </s> <s> <pad> <unk> text",
    "中文 日本語 Ελληνικά кириллица",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "corpus.jsonl"
    docs = dummy_documents(400)
    docs.append({"text": "ㅋㅋㅋㅋ 진짜 웃기다 ㅠㅠ\n재밌어요!! 😀", "lang": "ko"})
    path.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tok(corpus):
    return train_tokenizer(corpus, corpus.parent / "tokenizer", 600, log=lambda _: None)


def test_special_ids_and_files(tok):
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (PAD_ID, UNK_ID, BOS_ID, EOS_ID) == (0, 1, 2, 3)
    assert tok.vocab_size == 600 and tok.model_type == "bpe"
    files = sorted(os.listdir(tok.model_file.parent))
    assert files == ["koen_tokenizer.json", "special_tokens_map.json", "tokenizer.json", "tokenizer.model",
                     "tokenizer_config.json"]
    assert tok.fingerprint() == hashlib.sha256(tok.model_file.read_bytes()).hexdigest()
    assert tok.encode("abc", add_bos=True, add_eos=True)[0] == BOS_ID
    assert tok.encode("abc", add_bos=True, add_eos=True)[-1] == EOS_ID
    assert tok.decode(tok.encode("abc", add_bos=True, add_eos=True)) == "abc"


@pytest.mark.parametrize("text", CASES)
def test_round_trip_without_unknowns(tok, text):
    ids = tok.encode(text)
    assert UNK_ID not in ids
    assert tok.decode(ids) == text


def test_nfc_at_encode_time_and_jamo_untouched(tok):
    composed = "한국어 텍스트"
    assert tok.encode(unicodedata.normalize("NFD", composed)) == tok.encode(composed)
    assert normalize_text("ㅋ") == "ㅋ"  # NFKC would give U+110F
    assert tok.encode("ㅋ") != tok.encode("\u110f")
    assert tok.decode(tok.encode("ㅋㅋ")) == "ㅋㅋ"


def test_batch_encoding_matches_single(tok):
    assert tok.encode_batch(CASES, num_threads=2) == [tok.encode(t) for t in CASES]


def test_transformers_gives_identical_ids(tok):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tok.model_file.parent, local_files_only=True)
    for text in CASES + [unicodedata.normalize("NFD", "맥에서 온 한글")]:
        assert hf(normalize_text(text))["input_ids"] == tok.encode(text), text
        assert hf.decode(tok.encode(text)) == normalize_text(text)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id, hf.unk_token_id) == (2, 3, 0, 1)


def test_save_pretrained_to_another_folder(tok, tmp_path):
    tok.save_pretrained(tmp_path / "copy")
    again = KoEnTokenizer.load(tmp_path / "copy")
    assert again.fingerprint() == tok.fingerprint() and again.model_type == "bpe"
    assert again.encode(CASES[0]) == tok.encode(CASES[0])


def test_vocabulary_capped_to_what_data_supports(corpus, tmp_path):
    notes = []
    capped = train_tokenizer(corpus, tmp_path / "big", 50_000, log=notes.append)
    assert capped.vocab_size < 50_000 and len(notes) == 1 and "capped from 50000" in notes[0]
    info = json.loads((tmp_path / "big" / "koen_tokenizer.json").read_text())
    assert info["requested_vocab_size"] == 50_000 and info["vocab_size"] == capped.vocab_size


def test_too_small_vocabulary_and_missing_model_are_clear_errors(corpus, tmp_path):
    with pytest.raises(TokenizerError, match=r"--vocab-size 270 is too small .* use --vocab-size \d+"):
        train_tokenizer(corpus, tmp_path / "small", 270, log=lambda _: None)
    assert not (tmp_path / "small").exists()
    with pytest.raises(TokenizerError, match="no SentencePiece model"):
        KoEnTokenizer.load(tmp_path / "nowhere")


def test_unigram_also_exports(corpus, tmp_path):
    with pytest.warns(UserWarning, match="unigram ties"):
        uni = train_tokenizer(corpus, tmp_path / "uni", 600, model_type="unigram", log=lambda _: None)
    assert uni.model_type == "unigram" and uni.decode(uni.encode(CASES[2])) == CASES[2]


@pytest.mark.skipif(not SAMPLE.is_file(), reason=f"sample data not found at {SAMPLE}")
def test_sample_data_identical_ids_for_every_document(tmp_path):
    from transformers import AutoTokenizer

    tok = train_tokenizer(SAMPLE, tmp_path / "sample_tok", 8000, log=lambda _: None)
    hf = AutoTokenizer.from_pretrained(tmp_path / "sample_tok", local_files_only=True)
    texts = [json.loads(line)["text"] for line in SAMPLE.open(encoding="utf-8")]
    assert [hf(t)["input_ids"] for t in texts] == tok.encode_batch(texts, num_threads=2)
    assert all(UNK_ID not in ids for ids in tok.encode_batch(texts[:200]))


# ---------------------------------------------------------------- unusable --tokenizer-path


def _damaged_model(tok, tmp_path, kind: str):
    """A tokenizer folder copied from ``tok`` whose model is damaged as ``kind`` says; the path to pass."""
    import random
    import shutil

    folder = tmp_path / kind
    shutil.copytree(tok.model_file.parent, folder)
    model = folder / "tokenizer.model"
    good = model.read_bytes()
    if kind == "no_model":
        model.unlink()
        return folder
    if kind == "a_data_file":
        data = tmp_path / "corpus.jsonl"
        data.write_text('{"text": "not a model"}\n', encoding="utf-8")
        return data
    model.write_bytes({"random": random.Random(0).randbytes(5000), "half": good[:len(good) // 2],
                       "empty": b""}[kind])
    return folder


@pytest.mark.parametrize("kind,what", [
    ("random", r"tokenizer\.model cannot be read as a SentencePiece model \(it does not parse: truncated, or another"),
    ("half", r"tokenizer\.model cannot be read as a SentencePiece model \(it does not parse: truncated, or another"),
    ("empty", r"tokenizer\.model cannot be read as a SentencePiece model \(the file is empty\)"),
    ("a_data_file", r"corpus\.jsonl cannot be read as a SentencePiece model \(it does not parse"),
    ("no_model", r"no SentencePiece model at .*no_model/tokenizer\.model; pass a folder"),
])
def test_unusable_model_is_one_tokenizer_error_line(tok, tmp_path, kind, what):
    path = _damaged_model(tok, tmp_path, kind)
    with pytest.raises(TokenizerError, match=what) as err:
        KoEnTokenizer.load(path)
    assert "\n" not in str(err.value) and str(tmp_path) in str(err.value) and "--tokenizer-path" in str(err.value)


def test_constructor_and_info_file_errors_name_the_file(tok, tmp_path):
    import shutil

    with pytest.raises(TokenizerError, match=r"cannot be read as a SentencePiece model \(it is a folder\)"):
        KoEnTokenizer(tok.model_file.parent)
    with pytest.raises(TokenizerError, match=r"cannot be read as a SentencePiece model \(cannot read it: No such"):
        KoEnTokenizer(tmp_path / "missing.model")
    folder = tmp_path / "info"
    shutil.copytree(tok.model_file.parent, folder)
    (folder / "koen_tokenizer.json").write_text("{broken", encoding="utf-8")
    with pytest.raises(TokenizerError, match=r"info/koen_tokenizer\.json cannot be read \(Expecting"):
        KoEnTokenizer.load(folder)


@pytest.mark.parametrize("kind", ["random", "empty", "no_model", "a_data_file"])
def test_cli_bad_tokenizer_path_is_one_error_line_exit_2(tok, corpus, tmp_path, capsys, kind):
    from koen_sllm.data import prepare

    bad = _damaged_model(tok, tmp_path, kind)
    code = prepare.main([str(corpus), "--tokenizer-path", str(bad), "--output", str(tmp_path / "x" / "mixed.jsonl")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and str(bad) in err[0], err


# ---------------------------------------------------------------- literal U+2581 and newline pieces

SPACE_SYMBOL_TEXTS = ["a\u2581b", "\u2581", "\u2581\u2581 x \u2581", "word\u2581 \u2581word\n\u2581\n", "가\u2581나 다",
                      "\u2581the \u2581영화", "internal marks \ufdd0 \ufdd1 stay text"]


def test_literal_space_symbol_round_trips_with_identical_transformers_ids(tok):
    """SentencePiece writes a space as U+2581 and decodes U+2581 as a space; a literal one in the text
    is encoded as its three UTF-8 byte pieces instead, here and in the transformers export."""
    from transformers import AutoTokenizer

    literal = [tok.sp.piece_to_id(p) for p in ("<0xE2>", "<0x96>", "<0x81>")]
    assert tok.encode("\u2581") == literal
    assert tok.encode("a\u2581b") == tok.encode("a") + literal + tok.encode("b")
    assert tok.encode(" b") != tok.encode("\u2581b")
    hf = AutoTokenizer.from_pretrained(tok.model_file.parent, local_files_only=True)
    for text in SPACE_SYMBOL_TEXTS:
        ids = tok.encode(text)
        assert tok.decode(ids) == text, text
        assert hf(text)["input_ids"] == ids, text
        assert hf.decode(ids) == text, text
    assert tok.encode_batch(SPACE_SYMBOL_TEXTS, num_threads=2) == [tok.encode(t) for t in SPACE_SYMBOL_TEXTS]
    assert tok.encode("a\u2581b", add_bos=True, add_eos=True) == [BOS_ID, *tok.encode("a\u2581b"), EOS_ID]


def test_training_lines_end_with_their_newlines_and_hold_none():
    """One sentence per line with the newlines after it, written as a mark so a sample can go through a
    file line by line; a delimiter keeps each newline run apart from its line."""
    from koen_sllm.tokenizer import _NEWLINE_MARK as NL, _TRAIN_DELIMITER as CUT, training_lines

    lines = list(training_lines(["첫 줄.\n\n둘째 줄\n셋째  \n넷째", "\n\nx ㅋㅋ\n9\n", "", "한 줄", "a\ufdd0b\ufdd1c"]))
    assert lines == [f"첫 줄.{CUT}{NL}{NL}", f"둘째 줄{CUT}{NL}", f"셋째  {CUT}{NL}", "넷째", f"{NL}{NL}",
                     f"x ㅋㅋ{CUT}{NL}", f"9{CUT}{NL}", "한 줄", "abc"]
    assert all("\n" not in line for line in lines)


@pytest.fixture(scope="module")
def newline_tok(tmp_path_factory):
    from koen_sllm.tokenizer import train_tokenizer_on_texts

    texts = ["오늘 영화 정말 재밌었다.\n배우들 연기가 좋았어요!\n\n다시 보고 싶다\n최고", "Hello there.\nGood morning\n\n"
             "Are you ready?\nYes.", "ㅋㅋㅋ 웃기다 ㅋㅋ\n\n\n좋아요~\n그래서 1234 5678\n"] * 40
    return train_tokenizer_on_texts(lambda: iter(texts), tmp_path_factory.mktemp("nl") / "tok", 400,
                                    log=lambda _: None), texts


def test_newline_runs_are_pieces_of_their_own(newline_tok):
    from transformers import AutoTokenizer

    tok, texts = newline_tok
    pieces = [tok.sp.id_to_piece(i) for i in range(tok.vocab_size) if not tok.sp.is_byte(i)]
    assert "\n" in pieces and "\n\n" in pieces and "\n\n\n" in pieces
    assert tok.encode("끝.\n\n다음") == tok.encode("끝.") + [tok.sp.piece_to_id("\n\n")] + tok.encode("다음")
    assert any(p.endswith(".") and len(p) > 1 for p in pieces)  # punctuation joins the word before it
    for piece in pieces:
        assert "\n" not in piece or set(piece) == {"\n"}, piece  # newlines never join text
        assert len(piece) == 1 or not any(c.isdigit() for c in piece), piece  # digits stay split
    hf = AutoTokenizer.from_pretrained(tok.model_file.parent, local_files_only=True)
    for text in texts[:3] + CASES + SPACE_SYMBOL_TEXTS:
        ids = tok.encode(text)
        assert tok.decode(ids) == normalize_text(text) and hf(normalize_text(text))["input_ids"] == ids, text
