"""A deterministic dummy Korean/English corpus for --test runs without data.

Sentences come from small grammatical templates (Korean particles follow
the final consonant of the word before them), so the text is repetitive
enough that a tiny model's loss clearly falls within ~20 steps, yet varied
enough that it does not collapse to memorizing one line. It is never real
data: the file name says so, every record has ``"source": "dummy"``, and
koen_sllm.data.prepare writes it under the run's work folder, never in datasets/.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

DUMMY_FILE = "DUMMY_NOT_REAL_DATA.jsonl"
DUMMY_SEED = 1234
DUMMY_DOCS = 2000

_KO_PEOPLE = ["민수", "지영", "철수", "영희", "선생님", "할머니", "동생", "친구", "학생들", "아버지", "어머니", "수진"]
_KO_PLACES = ["학교", "도서관", "공원", "시장", "식당", "회사", "바다", "산", "집", "카페", "서울", "부산"]
_KO_TIMES = ["아침에", "저녁에", "주말에", "어제", "오늘", "방학 동안", "점심시간에", "밤늦게"]
# (object, past, present): each verb goes with objects it can take.
_KO_ACTIONS = [("책", "읽었다", "읽는다"), ("밥", "먹었다", "먹는다"), ("영화", "보았다", "본다"),
               ("편지", "썼다", "쓴다"), ("노래", "불렀다", "부른다"), ("커피", "마셨다", "마신다"),
               ("사과", "샀다", "산다"), ("축구", "했다", "한다"), ("숙제", "했다", "한다"),
               ("그림", "그렸다", "그린다"), ("사진", "찍었다", "찍는다"), ("음악", "들었다", "듣는다")]
_KO_STATES = [("날씨", "좋았다"), ("하늘", "맑았다"), ("바람", "시원했다"), ("거리", "조용했다"),
              ("음식", "맛있었다"), ("사람", "많았다"), ("공기", "차가웠다"), ("길", "복잡했다")]

_EN_PEOPLE = ["Alice", "Brian", "Chloe", "Daniel", "Emma", "Felix", "Grace", "Henry", "the teacher", "my sister"]
_EN_PLACES = ["school", "library", "park", "market", "restaurant", "office", "beach", "station", "museum", "garden"]
_EN_TIMES = ["in the morning", "in the evening", "on the weekend", "yesterday", "today", "after lunch", "at night"]
_EN_ACTIONS = [("a book", "read", "reads"), ("lunch", "ate", "eats"), ("a movie", "watched", "watches"),
               ("a letter", "wrote", "writes"), ("a song", "sang", "sings"), ("coffee", "drank", "drinks"),
               ("some apples", "bought", "buys"), ("soccer", "played", "plays"), ("a picture", "painted", "paints"),
               ("the news", "heard", "hears")]
_EN_STATES = [("weather", "warm"), ("sky", "clear"), ("wind", "cool"), ("street", "quiet"), ("food", "good"),
              ("room", "crowded"), ("air", "cold"), ("road", "busy")]


def _has_final(word: str) -> bool:
    """True when the last Hangul syllable ends in a consonant (batchim)."""
    code = ord(word[-1]) - 0xAC00
    return 0 <= code < 11172 and code % 28 != 0


def _p(word: str, with_final: str, without_final: str) -> str:
    return word + (with_final if _has_final(word) else without_final)


def _korean_sentence(rng: random.Random) -> str:
    who, where, when = rng.choice(_KO_PEOPLE), rng.choice(_KO_PLACES), rng.choice(_KO_TIMES)
    obj, past, present = rng.choice(_KO_ACTIONS)
    kind = rng.randrange(5)
    if kind == 0:
        return f"{when} {_p(who, '은', '는')} {where}에서 {_p(obj, '을', '를')} {past}."
    if kind == 1:
        thing, state = rng.choice(_KO_STATES)
        return f"{when} {where}의 {_p(thing, '이', '가')} {state}."
    if kind == 2:
        other = rng.choice([p for p in _KO_PEOPLE if p != who])
        return f"{_p(who, '은', '는')} {_p(other, '과', '와')} 함께 {where}에 갔다."
    if kind == 3:
        return f"{_p(who, '은', '는')} 매일 {_p(obj, '을', '를')} {present}."
    return f"{where}에서 {_p(who, '이', '가')} 웃으며 {_p(obj, '을', '를')} {past}."


def _english_sentence(rng: random.Random) -> str:
    who, where, when = rng.choice(_EN_PEOPLE), rng.choice(_EN_PLACES), rng.choice(_EN_TIMES)
    obj, past, present = rng.choice(_EN_ACTIONS)
    kind = rng.randrange(5)
    if kind == 0:
        text = f"{when.capitalize()}, {who} {past} {obj} at the {where}."
    elif kind == 1:
        thing, state = rng.choice(_EN_STATES)
        text = f"The {thing} at the {where} was {state} {when}."
    elif kind == 2:
        other = rng.choice([p for p in _EN_PEOPLE if p != who])
        text = f"{who} and {other} went to the {where} together."
    elif kind == 3:
        text = f"{who} {present} {obj} every day."
    else:
        text = f"At the {where}, {who} smiled and {past} {obj}."
    return text[0].upper() + text[1:]


def dummy_documents(n_docs: int = DUMMY_DOCS, seed: int = DUMMY_SEED) -> list[dict]:
    """About 60% Korean and 40% English documents of 4-8 sentences each."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        lang = "ko" if rng.random() < 0.6 else "en"
        make = _korean_sentence if lang == "ko" else _english_sentence
        docs.append({"text": " ".join(make(rng) for _ in range(rng.randint(4, 8))), "lang": lang, "source": "dummy"})
    return docs


def write_dummy_corpus(folder: Path, n_docs: int = DUMMY_DOCS, seed: int = DUMMY_SEED) -> Path:
    """``folder/DUMMY_NOT_REAL_DATA.jsonl`` with the same bytes on every call.

    An identical existing file is left untouched so that its modification
    time, and with it the prepared-data cache, stays valid.
    """
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / DUMMY_FILE
    data = "".join(json.dumps(doc, ensure_ascii=False) + "\n" for doc in dummy_documents(n_docs, seed)).encode()
    if path.is_file() and path.read_bytes() == data:
        return path
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path
