"""Token files (packing, cache, dummy fallback) and the resumable rank-sharded loader."""
from __future__ import annotations

import json
import os
import shutil
import stat

import numpy as np
import pytest
import torch

from koen_sllm.config import repo_root
from koen_sllm.data import DataError
from koen_sllm.data.dummy import DUMMY_FILE
from koen_sllm.data.loader import TokenLoader, iter_eval_batches
from koen_sllm.data.pack import encode_jsonl, open_tokens, token_dtype
from koen_sllm.data.prepare import ensure_training_data, find_dataset_files
from koen_sllm.tokenizer import EOS_ID, KoEnTokenizer

SHARED = repo_root().parent / "shared"
SAMPLE = SHARED / "data" / "ko_en_sample.jsonl"
needs_sample = pytest.mark.skipif(not SAMPLE.is_file(), reason=f"sample data not found at {SAMPLE}")


def _docs(n_ko=80, n_en=60):
    ko = [f"한국어 문서 {i}번입니다. 오늘은 {i % 7}일이고 날씨가 맑습니다. ㅋㅋ" for i in range(n_ko)]
    en = [f"English document {i}. It is day {i % 5} and the sky is clear!" for i in range(n_en)]
    return [{"text": t, "lang": "ko"} for t in ko] + [{"text": t} for t in en]


def _write(path, docs):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    return path


def _prepare(path, tmp_path, logs=None, **kw):
    args = dict(mode="train", vocab_size=400, val_fraction=0.1, num_proc=2, strict=False, work_dir=tmp_path / "work")
    args.update(kw)
    return ensure_training_data(path, log=(logs.append if logs is not None else lambda _: None), **args)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("prep")
    docs = _docs()
    path = _write(root / "ds" / "mixed_pretraining.jsonl", docs)
    return path, docs, _prepare(root / "ds", root)


def _split_docs(tokens: np.ndarray) -> list[list[int]]:
    ends = np.flatnonzero(tokens == EOS_ID)
    assert len(tokens) and ends[-1] == len(tokens) - 1  # every document ends with EOS
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tokens[s:e].tolist() for s, e in zip(starts, ends)]


def test_token_files_decode_back_to_the_documents(prepared):
    path, docs, data = prepared
    tok = KoEnTokenizer.load(data.tokenizer_dir)
    assert data.prepared_dir == path.parent / "prepared" / "mixed_pretraining" and not data.used_dummy
    decoded = {}
    for name, file in [("train", data.train_file)] + [(f"val_{k}", v) for k, v in data.val_files.items()]:
        tokens = open_tokens(file)
        assert tokens.dtype == np.uint16 and len(tokens) == data.meta["splits"][name]["tokens"]
        decoded[name] = [tok.decode(ids) for ids in _split_docs(np.asarray(tokens))]
        assert len(decoded[name]) == data.meta["splits"][name]["docs"]
    assert sorted(sum(decoded.values(), [])) == sorted(d["text"] for d in docs)
    assert set(data.val_files) == {"ko", "en"}
    assert all(t.startswith("한국어") for t in decoded["val_ko"]) and all(t.startswith("English") for t in decoded["val_en"])
    assert decoded["train"] == [d["text"] for d in docs if d["text"] in decoded["train"]]  # file order kept
    meta = data.meta
    assert meta["tokens_per_lang"]["ko"] == sum(meta["splits"][s]["per_lang"].get("ko", {}).get("tokens", 0)
                                                for s in meta["splits"])
    assert meta["splits"]["train"]["bytes"] == sum(len(t.encode()) for t in decoded["train"])
    assert meta["tokenizer"]["fingerprint"] == tok.fingerprint() and meta["dtype"] == "uint16"
    assert len(meta["input"]["content_sha256"]) == 64 and meta["ingest"]["docs"] == len(docs)


def test_cache_reused_touched_kept_changed_rebuilt(tmp_path):
    path = _write(tmp_path / "ds" / "data.jsonl", _docs(30, 30))
    first = _prepare(path, tmp_path)
    logs = []
    again = _prepare(path, tmp_path, logs)
    assert any(line.startswith("reusing prepared data") for line in logs) and again.meta == first.meta
    os.utime(path, ns=(5, 5))
    logs.clear()
    assert _prepare(path, tmp_path, logs).meta["fingerprint"] == first.meta["fingerprint"]
    assert any(line.startswith("reusing") for line in logs)
    _write(path, _docs(31, 30))
    logs.clear()
    changed = _prepare(path, tmp_path, logs)
    assert any("input content changed" in line for line in logs) and changed.meta["splits"]["train"]["docs"] != \
        first.meta["splits"]["train"]["docs"]
    logs.clear()
    _prepare(path, tmp_path, logs, val_fraction=0.2)
    assert any("settings changed" in line for line in logs)


def test_unwritable_data_folder_falls_back_to_work_dir(tmp_path):
    path = _write(tmp_path / "ro" / "data.jsonl", _docs(20, 20))
    blocker = tmp_path / "ro" / "prepared"
    blocker.write_text("a file where the folder would go")  # makes the data-side location unusable
    data = _prepare(path, tmp_path)
    assert str(data.prepared_dir).startswith(str(tmp_path / "work" / "prepared" / "data-"))
    # A folder marked read-only stays untouched even for root (shared data).
    shared = _write(tmp_path / "shared" / "data.jsonl", _docs(20, 20))
    shared.parent.chmod(0o555)
    try:
        data = _prepare(shared, tmp_path)
        assert sorted(os.listdir(shared.parent)) == ["data.jsonl"]
        assert str(data.prepared_dir).startswith(str(tmp_path / "work" / "prepared" / "data-"))
    finally:
        shared.parent.chmod(0o755)
    # Prepared data already on a read-only disk is reused without writing a lock file there.
    done = _prepare(shared, tmp_path, work_dir=tmp_path / "w2")  # writable now: built beside the data
    (done.prepared_dir.parent / ".data.lock").unlink()
    for folder in (shared.parent, done.prepared_dir.parent):
        folder.chmod(0o555)
    try:
        logs = []
        again = _prepare(shared, tmp_path, logs, work_dir=tmp_path / "w2")
        assert again.prepared_dir == done.prepared_dir and logs[0].startswith("reusing")
        assert sorted(os.listdir(done.prepared_dir.parent)) == ["data"]
    finally:
        for folder in (shared.parent, done.prepared_dir.parent):
            folder.chmod(0o755)


def test_dummy_corpus_in_test_mode_and_clear_error_in_train_mode(tmp_path):
    empty = tmp_path / "nothing_here"
    empty.mkdir()
    logs = []
    data = _prepare(empty, tmp_path, logs, mode="test", vocab_size=32000)
    assert data.used_dummy and data.meta["used_dummy"]
    text = "\n".join(logs)
    assert "WARNING: NO TRAINING DATA FOUND" in text and str(empty) in text and "capped from 32000" in text
    assert (tmp_path / "work" / "dummy_data" / DUMMY_FILE).is_file() and not any(empty.iterdir())
    assert data.meta["splits"]["train"]["tokens"] > 50_000 and set(data.val_files) == {"ko", "en"}
    again = _prepare(empty, tmp_path, mode="test", vocab_size=32000)
    assert again.meta["fingerprint"] == data.meta["fingerprint"]  # deterministic, and reused
    with pytest.raises(DataError) as err:
        _prepare(empty, tmp_path, mode="train")
    assert str(empty) in str(err.value) and "scripts/run_preprocessing.sh" in str(err.value)
    _write(empty / "raw" / "corpus.jsonl", _docs(2, 2))  # raw input only: say how to prepare it
    with pytest.raises(DataError, match=r"raw holds raw corpora: prepare them with scripts/run_preprocessing.sh"):
        _prepare(empty, tmp_path, mode="train")


def test_dataset_path_file_or_folder(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "a"}\n')
    (tmp_path / "b.txt").write_text("b\n")
    (tmp_path / "notes.md").write_text("ignored\n")
    assert [p.name for p in find_dataset_files(tmp_path)] == ["a.jsonl", "b.txt"]
    (tmp_path / "mixed_pretraining.jsonl").write_text('{"text": "m"}\n')
    assert [p.name for p in find_dataset_files(tmp_path)] == ["mixed_pretraining.jsonl"]
    assert find_dataset_files(tmp_path / "b.txt") == [tmp_path / "b.txt"]
    assert find_dataset_files(tmp_path / "missing") == []


def test_prepared_folder_copied_without_its_corpus_is_used_as_it_is(prepared, tmp_path):
    """The cluster case: only datasets/prepared/<name>/ is copied to the nodes' volume."""
    _, _, data = prepared
    volume = tmp_path / "volume" / "datasets"
    shutil.copytree(data.prepared_dir, volume / "prepared" / data.prepared_dir.name)
    for given in (volume, volume / "prepared" / data.prepared_dir.name):  # the folder above it, or itself
        logs = []
        used = _prepare(given, tmp_path, logs, val_fraction=0.2)
        assert used.prepared_dir == volume / "prepared" / data.prepared_dir.name and not used.used_dummy
        assert used.meta == data.meta and used.train_file.is_file() and set(used.val_files) == {"ko", "en"}
        assert any(line.startswith("using the prepared data in") for line in logs)
        assert any("--val-fraction 0.2 does not apply" in line for line in logs)
    assert sorted(p.name for p in volume.iterdir()) == ["prepared"]  # nothing written beside it
    with pytest.raises(DataError, match="cannot be rebuilt: pass --dataset-path the corpus"):
        _prepare(volume, tmp_path, force=True)
    # A damaged copy names what is wrong, and a second prepared folder makes the choice the user's.
    train = volume / "prepared" / data.prepared_dir.name / "train.bin"
    train.write_bytes(train.read_bytes()[:-2])
    with pytest.raises(DataError, match=r"cannot be used: train.bin is missing or truncated; copy the whole folder"):
        _prepare(volume, tmp_path)
    shutil.copytree(data.prepared_dir, volume / "prepared" / "other")
    with pytest.raises(DataError, match=r"2 prepared folders under .*pass --dataset-path the one to train on"):
        _prepare(volume, tmp_path)
    (volume / "prepared" / "other" / "meta.json").write_text('{"settings": {"format": 0}}')
    with pytest.raises(DataError, match=r"prepared in format 0 and this version reads format"):
        _prepare(volume / "prepared" / "other", tmp_path)
    # A corpus beside it wins: the usual cache rules apply again.
    _write(volume / "mixed_pretraining.jsonl", _docs(10, 10))
    logs = []
    _prepare(volume, tmp_path, logs)
    assert not any(line.startswith("using the prepared data") for line in logs)


def test_parallel_paths_equal_plain_loop(prepared, tmp_path):
    path, docs, data = prepared
    tok = KoEnTokenizer.load(data.tokenizer_dir)
    expected = np.concatenate([np.array(tok.encode(d["text"]) + [EOS_ID]) for d in docs])
    for backend, procs in (("auto", 2), ("processes", 2), ("threads", 2), ("threads", 3), ("processes", 1)):
        chunks = list(encode_jsonl(path, tok, procs, backend, chunk_bytes=512))
        assert len(chunks) > 5
        assert np.array_equal(np.concatenate([c.ids for c in chunks]), expected), backend
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32


def test_worker_processes_are_not_forked_from_this_possibly_threaded_process():
    """A "processes" encode after a "threads" one (the sequence above) once hung: the worker was
    forked while SentencePiece's thread pool held a lock, and waited on it forever."""
    from koen_sllm.data import pack

    assert pack._pool_context().get_start_method() in ("forkserver", "spawn")


# ---------------------------------------------------------------- loader


@pytest.fixture
def token_file(tmp_path):
    """1,001 tokens 0..1000 (so every window is recognisable) with a meta.json."""
    (tmp_path / "meta.json").write_text(json.dumps({"dtype": "uint32", "fingerprint": "test"}))
    np.arange(1001, dtype=np.uint32).tofile(tmp_path / "train.bin")
    return tmp_path / "train.bin"


def _take(loader, n):
    return [loader.next_batch() for _ in range(n)]


def test_batches_are_shifted_windows_and_deterministic(token_file):
    a, b = TokenLoader(token_file, 10, 4, seed=7), TokenLoader(token_file, 10, 4, seed=7)
    for (xa, ya), (xb, yb) in zip(_take(a, 5), _take(b, 5)):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert xa.dtype == torch.int64 and xa.shape == (4, 10)
        assert torch.equal(ya[:, :-1], xa[:, 1:]) and torch.equal(ya[:, -1], xa[:, -1] + 1)
        assert torch.all(xa[:, 0] % 10 == 0)
    other = TokenLoader(token_file, 10, 4, seed=8)
    assert not torch.equal(other.next_batch()[0], TokenLoader(token_file, 10, 4, seed=7).next_batch()[0])


def test_one_epoch_visits_every_sample_once(token_file):
    loader = TokenLoader(token_file, 10, 4, seed=1)
    assert loader.num_samples == 100
    starts = torch.cat([x[:, 0] for x, _ in _take(loader, 25)]).tolist()
    assert sorted(starts) == list(range(0, 1000, 10)) and loader.epoch == 1.0
    second = torch.cat([x[:, 0] for x, _ in _take(loader, 25)]).tolist()
    assert sorted(second) == sorted(starts) and second != starts and loader.epoch == 2.0


def test_two_ranks_together_equal_one_rank_with_twice_the_batch(token_file):
    r0, r1 = TokenLoader(token_file, 10, 2, 0, 2, seed=3), TokenLoader(token_file, 10, 2, 1, 2, seed=3)
    single = TokenLoader(token_file, 10, 4, 0, 1, seed=3)
    for _ in range(30):  # crosses an epoch boundary
        (x0, y0), (x1, y1), (x, y) = r0.next_batch(), r1.next_batch(), single.next_batch()
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)
    assert not torch.equal(x0, x1)


def test_state_dict_resume_gives_the_same_next_batches(token_file):
    loader = TokenLoader(token_file, 10, 3, seed=5)
    _take(loader, 40)
    state = json.loads(json.dumps(loader.state_dict()))  # must survive JSON
    expected = _take(loader, 10)
    resumed = TokenLoader(token_file, 10, 3, seed=5)
    resumed.load_state_dict(state)
    for (x, y), (xr, yr) in zip(expected, _take(resumed, 10)):
        assert torch.equal(x, xr) and torch.equal(y, yr)


def test_world_size_change_with_same_global_batch_continues_at_same_position(token_file):
    # 2 ranks x 2 sequences x 1 accumulation step == 1 rank x 2 sequences x 2 steps.
    ranks = [TokenLoader(token_file, 10, 2, r, 2, seed=9) for r in range(2)]
    for _ in range(7):
        for loader in ranks:
            loader.next_batch()
    state = ranks[0].state_dict()
    continued = torch.cat([loader.next_batch()[0] for loader in ranks])
    one = TokenLoader(token_file, 10, 2, 0, 1, seed=9)
    one.load_state_dict(state)
    assert torch.equal(torch.cat([one.next_batch()[0], one.next_batch()[0]]), continued)
    assert one.cursor == ranks[0].cursor == 32


def test_state_from_other_data_or_length_is_refused(token_file):
    state = TokenLoader(token_file, 10, 2, seed=1).state_dict()
    with pytest.raises(DataError, match="--max-seq-length"):
        TokenLoader(token_file, 20, 2, seed=1).load_state_dict(state)
    with pytest.raises(DataError, match="dataset"):
        TokenLoader(token_file, 10, 2, seed=1).load_state_dict({**state, "dataset_id": "other"})


def test_too_short_file_is_a_clear_error(tmp_path):
    (tmp_path / "meta.json").write_text(json.dumps({"dtype": "uint16"}))
    np.arange(5, dtype=np.uint16).tofile(tmp_path / "train.bin")
    with pytest.raises(DataError, match="fewer than one sequence of 9"):
        TokenLoader(tmp_path / "train.bin", 8, 1)
    assert list(iter_eval_batches(tmp_path / "train.bin", 8, 1)) == []


def test_eval_batches_deterministic_sharded_and_even(token_file):
    one = [x for x, _ in iter_eval_batches(token_file, 10, 4, 0, 1, max_batches=None)]
    assert len(one) == 25 and one[0][:, 0].tolist() == [0, 10, 20, 30]
    r0 = [x for x, _ in iter_eval_batches(token_file, 10, 3, 0, 2, max_batches=100)]
    r1 = [x for x, _ in iter_eval_batches(token_file, 10, 3, 1, 2, max_batches=100)]
    assert len(r0) == len(r1) == 17  # ceil(100 / 6); the last batch wraps to the start
    assert r0[0][:, 0].tolist() == [0, 10, 20] and r1[0][:, 0].tolist() == [30, 40, 50]
    assert r0[-1][:, 0].tolist() == [960, 970, 980] and r1[-1][:, 0].tolist() == [990, 0, 10]
    assert len(list(iter_eval_batches(token_file, 10, 3, 1, 2, max_batches=4))) == 4


def _tree(root) -> dict:
    """Every path under ``root`` with its kind, size and modification time (links not followed)."""
    found = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            st = os.lstat(path)
            found[os.path.relpath(path, root)] = (stat.S_IFMT(st.st_mode), st.st_size, st.st_mtime_ns)
    return found


@pytest.fixture(scope="module")
def sample_prepared(tmp_path_factory):
    """The shared sample prepared under a temporary folder, and ../shared's listing from before.

    Preparation puts its output beside the data when it can write there, else under the work
    folder. The sample is therefore read through a link in the temporary folder, so that "beside
    the data" is temporary as well, whether ../shared is writable or not."""
    root = tmp_path_factory.mktemp("sample")
    link = root / "data" / SAMPLE.name
    link.parent.mkdir()
    try:
        link.symlink_to(SAMPLE)
    except OSError:  # no symbolic links on this filesystem: a copy in the temporary folder serves
        shutil.copyfile(SAMPLE, link)
    before = _tree(SHARED)
    data = ensure_training_data(link, mode="test", vocab_size=8000, val_fraction=0.01, num_proc=2, strict=True,
                                work_dir=root / "work", log=lambda _: None)
    return root, data, before


@needs_sample
def test_sample_data_end_to_end(sample_prepared):
    root, data, _ = sample_prepared
    assert data.prepared_dir == root / "data" / "prepared" / "ko_en_sample"
    meta = data.meta
    assert meta["ingest"]["docs"] == 2811 and set(data.val_files) == {"ko", "en"}
    assert sum(s["docs"] for s in meta["splits"].values()) == 2811
    loader = TokenLoader(data.train_file, 128, 4, seed=0)
    x, _ = loader.next_batch()
    assert int(x.max()) < meta["vocab_size"] and loader.num_samples == (meta["splits"]["train"]["tokens"] - 1) // 128


@needs_sample
def test_preparing_the_sample_writes_nothing_under_shared(sample_prepared):
    root, data, before = sample_prepared
    after = _tree(SHARED)
    assert after == before, {"new": sorted(after.keys() - before.keys()), "gone": sorted(before.keys() - after.keys()),
                             "changed": sorted(k for k in after.keys() & before.keys() if after[k] != before[k])}
    for path in (data.prepared_dir, data.tokenizer_dir, data.train_file, *data.val_files.values()):
        assert root.resolve() in path.resolve().parents, path
