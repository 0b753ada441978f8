"""Atomic checkpoints: round trip, manifest checks, resume resolution, crashes, retention, disk errors."""
from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import torch

from koen_sllm.checkpoint import store as ck
from koen_sllm.checkpoint.store import CheckpointError

REPO = Path(__file__).resolve().parents[2]


def model_state(v: float) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(int(v * 1000))
    return {
        "model.embed_tokens.weight": torch.randn(32, 8, generator=g),
        "model.norm.weight": torch.full((8,), float(v), dtype=torch.bfloat16),
        "model.layers.0.mlp.up_proj.weight": torch.randn(16, 8, generator=g).to(torch.float16),
        "position_ids": torch.arange(12),
    }


def make_tokenizer_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer.model").write_bytes(bytes(range(256)) * 3)
    (path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 128}))
    (path / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<s>"}))
    return path


def save(root: Path, name: str, v: float = 1.0, **kw) -> Path:
    kw.setdefault("trainer_state", {"step": int(v), "moment": torch.full((5,), float(v))})
    return ck.save_checkpoint(
        root, name, model_state=model_state(v), hf_config={"model_type": "llama", "v": v},
        tokenizer_dir=kw.pop("tokenizer_dir", None), training_info={"step": int(v), "note": "학습 정보"}, **kw,
    )


def assert_same_state(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith((".tmp-", ".trash-", ".del-")))


# ---------------------------------------------------------------- round trip and manifest


def test_round_trip_is_bit_exact_and_complete(tmp_path):
    tok = make_tokenizer_dir(tmp_path / "tok")
    root = tmp_path / "out"
    path = save(root, "checkpoint-10", 10, tokenizer_dir=tok)
    assert path == root / "checkpoint-10"
    assert_same_state(ck.load_model_state(path), model_state(10))
    assert json.loads((path / "config.json").read_text()) == {"model_type": "llama", "v": 10}
    assert ck.load_training_info(path) == {"step": 10, "note": "학습 정보"}
    assert "학습 정보" in (path / "training_info.json").read_text(encoding="utf-8")  # ensure_ascii=False
    for f in tok.iterdir():
        assert (path / f.name).read_bytes() == f.read_bytes()
    state = ck.load_trainer_state(path)
    assert state["step"] == 10 and torch.equal(state["moment"], torch.full((5,), 10.0))
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["name"] == "checkpoint-10"
    assert {e["path"] for e in manifest["files"]} == {
        "model.safetensors", "config.json", "training_info.json", "trainer_state.pt",
        "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"}
    assert all(e["size"] == (path / e["path"]).stat().st_size for e in manifest["files"])
    assert ck.read_latest(root) == "checkpoint-10"
    assert ck.verify_checkpoint(path)[0]
    assert leftovers(root) == []


def test_manifest_catches_truncation_and_flipped_byte(tmp_path):
    a, b = save(tmp_path, "checkpoint-1", 1), save(tmp_path, "checkpoint-2", 2)
    f = a / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-7])
    ok, why = ck.verify_checkpoint(a)
    assert not ok and "model.safetensors" in why and "truncated" in why
    g = b / "trainer_state.pt"
    data = bytearray(g.read_bytes())
    data[len(data) // 2] ^= 0x01
    g.write_bytes(bytes(data))
    ok, why = ck.verify_checkpoint(b)
    assert not ok and why == "trainer_state.pt fails its sha256 check (corrupt)"
    assert ck.verify_checkpoint(b, check_hashes=False)[0]  # same size: only the hash sees it


def test_verify_reports_missing_manifest_and_file(tmp_path):
    p = save(tmp_path, "checkpoint-1", 1)
    (p / "config.json").unlink()
    assert ck.verify_checkpoint(p) == (False, "config.json is missing")
    (p / "manifest.json").unlink()
    assert ck.verify_checkpoint(p) == (False, "no manifest.json (the save did not finish)")
    assert ck.verify_checkpoint(tmp_path / "nope")[0] is False


def test_same_name_rerun_replaces_the_old_copy(tmp_path):
    save(tmp_path, "checkpoint-5", 1)
    path = save(tmp_path, "checkpoint-5", 2)
    assert_same_state(ck.load_model_state(path), model_state(2))
    assert ck.verify_checkpoint(path)[0] and leftovers(tmp_path) == []


def test_extra_writer_files_are_in_the_manifest(tmp_path):
    def ds_writer(tmp: Path) -> None:
        (tmp / "global_step3").mkdir()
        (tmp / "global_step3" / "mp_rank_00_model_states.pt").write_bytes(b"engine" * 100)

    p = save(tmp_path, "checkpoint-3", 3, extra_writer=ds_writer)
    paths = {e["path"] for e in json.loads((p / "manifest.json").read_text())["files"]}
    assert "global_step3/mp_rank_00_model_states.pt" in paths
    (p / "global_step3" / "mp_rank_00_model_states.pt").write_bytes(b"ENGINE" * 100)
    assert ck.verify_checkpoint(p) == (False, "global_step3/mp_rank_00_model_states.pt fails its sha256 check (corrupt)")


def test_bad_inputs_are_refused_before_anything_is_written(tmp_path):
    shared = torch.randn(4, 4)
    with pytest.raises(CheckpointError, match=r"model_state\['lm_head.weight'\] shares memory with 'model.embed_tokens.weight'"):
        ck.save_checkpoint(tmp_path, "checkpoint-1", model_state={"model.embed_tokens.weight": shared,
                           "lm_head.weight": shared}, hf_config={}, tokenizer_dir=None, training_info={})
    with pytest.raises(CheckpointError, match="tokenizer directory .* does not exist"):
        save(tmp_path, "checkpoint-1", tokenizer_dir=tmp_path / "missing")
    with pytest.raises(CheckpointError, match="checkpoint name '../x' is invalid"):
        save(tmp_path, "../x")
    assert not (tmp_path / "checkpoint-1").exists() and leftovers(tmp_path) == []


# ---------------------------------------------------------------- trainer state (weights_only)


def test_trainer_state_with_optimizer_and_rng_loads_weights_only(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    model(torch.randn(4, 6)).pow(2).mean().backward()
    opt.step()
    sched.step()
    random.seed(7)
    np.random.seed(7)
    py, npy = random.getstate(), np.random.get_state()
    state = {
        "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": 1,
        "rng_per_rank": [{
            "torch": torch.get_rng_state(),
            "python": [py[0], list(py[1]), py[2]],
            "numpy": [npy[0], npy[1].tolist(), npy[2], npy[3], npy[4]],
        }],
        "loader": {"cursor": 128, "epoch": 0.25, "fingerprint": "abc"},
    }
    path = save(tmp_path, "checkpoint-1", trainer_state=state)
    back = torch.load(path / "trainer_state.pt", weights_only=True)  # what resume uses
    exp_avg = opt.state_dict()["state"][0]["exp_avg"]
    assert torch.equal(back["optimizer"]["state"][0]["exp_avg"], exp_avg) and exp_avg.abs().sum() > 0
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert back["scheduler"]["last_epoch"] == 1 and back["loader"]["cursor"] == 128
    rng = back["rng_per_rank"][0]
    expected_py, expected_np = random.random(), np.random.rand()
    random.setstate((rng["python"][0], tuple(rng["python"][1]), rng["python"][2]))
    np.random.set_state((rng["numpy"][0], np.asarray(rng["numpy"][1], dtype=np.uint32), *rng["numpy"][2:]))
    assert random.random() == expected_py and np.random.rand() == expected_np
    fresh = torch.optim.AdamW(torch.nn.Linear(6, 3).parameters(), lr=1e-3)
    fresh.load_state_dict(ck.load_trainer_state(path)["optimizer"])
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg_sq"], opt.state_dict()["state"][0]["exp_avg_sq"])


def test_numpy_array_in_trainer_state_is_refused_at_save_time(tmp_path):
    state = {"step": 3, "rng": {"numpy": list(np.random.get_state())}}
    with pytest.raises(CheckpointError) as err:
        save(tmp_path, "checkpoint-3", trainer_state=state)
    msg = str(err.value)
    assert msg.startswith("trainer_state['rng']['numpy'][1] is a numpy.ndarray, which torch.load(weights_only=True) refuses")
    assert "tolist()" in msg and "\n" not in msg
    with pytest.raises(CheckpointError, match=r"trainer_state\['lr'\] is a numpy.float64"):
        save(tmp_path, "checkpoint-3", trainer_state={"lr": np.float64(0.1)})
    assert not (tmp_path / "checkpoint-3").exists() and leftovers(tmp_path) == []


# ---------------------------------------------------------------- resume resolution


def test_resolve_auto_skips_corrupt_newest_with_a_warning(tmp_path):
    save(tmp_path, "checkpoint-100", 1)
    newest = save(tmp_path, "checkpoint-200", 2)
    data = bytearray((newest / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (newest / "model.safetensors").write_bytes(bytes(data))
    warnings: list[str] = []
    assert ck.resolve_resume("auto", tmp_path, log=warnings.append) == tmp_path / "checkpoint-100"
    assert len(warnings) == 1
    assert "names checkpoint-200, which is not usable (model.safetensors fails its sha256 check" in warnings[0]


def test_resolve_auto_without_latest_takes_newest_valid_by_step(tmp_path):
    for step in (9, 10, 100):
        save(tmp_path, f"checkpoint-{step}", step)
    (tmp_path / "latest").unlink()
    (tmp_path / "checkpoint-100" / "manifest.json").unlink()  # as if killed before the manifest
    warnings: list[str] = []
    assert ck.resolve_resume("auto", tmp_path, log=warnings.append) == tmp_path / "checkpoint-10"
    assert any("skipping" in w and "checkpoint-100" in w and "no manifest.json" in w for w in warnings)


def test_resolve_auto_on_empty_or_missing_dir_and_none(tmp_path):
    warnings: list[str] = []
    assert ck.resolve_resume("auto", tmp_path, log=warnings.append) is None
    assert ck.resolve_resume("auto", tmp_path / "never-created", log=warnings.append) is None
    save(tmp_path, "checkpoint-1", 1)
    assert ck.resolve_resume("none", tmp_path, log=warnings.append) is None
    assert warnings == []


def test_resolve_explicit_paths(tmp_path, monkeypatch):
    root = tmp_path / "run"
    good = save(root, "checkpoint-1", 1)
    save(root, "checkpoint-2", 2)
    assert ck.resolve_resume(str(good), tmp_path / "elsewhere") == good
    monkeypatch.chdir(tmp_path)
    assert ck.resolve_resume("checkpoint-1", root) == good  # a bare name is looked up under the output dir
    assert ck.resolve_resume(str(root), tmp_path / "elsewhere") == root / "checkpoint-2"  # run dir: like auto
    with pytest.raises(CheckpointError, match=r"--resume .*missing-7: .*does not exist"):
        ck.resolve_resume(str(root / "missing-7"), root)
    (root / "checkpoint-2" / "model.safetensors").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"is not a usable checkpoint \(model.safetensors has 1 bytes"):
        ck.resolve_resume(str(root / "checkpoint-2"), root)


def test_missing_resume_path_lists_the_checkpoints_that_exist(tmp_path, monkeypatch):
    root = tmp_path / "o"
    for name in ("checkpoint-10", "checkpoint-20", "checkpoint-3", "initial_model", "notes", ".tmp-checkpoint-30-1"):
        (root / name).mkdir(parents=True)
    (root / "checkpoint-40").write_text("a file, not a checkpoint")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError) as err:
        ck.resolve_resume("checkpoint-999", root)
    assert str(err.value) == (
        f"체크포인트가 없습니다 / --resume checkpoint-999: {root / 'checkpoint-999'} does not exist; checkpoints in "
        f"{root}: checkpoint-20, checkpoint-10, checkpoint-3, initial_model; pass one of them, 'auto' or 'none'")
    assert ck.checkpoint_names(root) == ["checkpoint-20", "checkpoint-10", "checkpoint-3", "initial_model"]


def test_missing_resume_path_lists_at_most_eight_newest_first(tmp_path):
    for step in range(1, 12):
        (tmp_path / f"checkpoint-{step * 10}").mkdir()
    with pytest.raises(CheckpointError) as err:
        ck.resolve_resume(str(tmp_path / "checkpoint-999"), tmp_path)
    msg = str(err.value)
    assert ("checkpoint-110, checkpoint-100, checkpoint-90, checkpoint-80, checkpoint-70, checkpoint-60, "
            "checkpoint-50, checkpoint-40 (and 3 older); pass one of them") in msg
    assert "checkpoint-30," not in msg and "\n" not in msg


def test_missing_resume_path_with_no_checkpoints_says_none(tmp_path):
    with pytest.raises(CheckpointError) as err:
        ck.resolve_resume("checkpoint-5", tmp_path)
    assert str(err.value) == (f"체크포인트가 없습니다 / --resume checkpoint-5: {tmp_path / 'checkpoint-5'} does not "
                              f"exist; checkpoints in {tmp_path}: none; pass a checkpoint directory, 'auto' or 'none'")
    with pytest.raises(CheckpointError, match=r"checkpoints in .*never: none \(the folder does not exist\); "):
        ck.resolve_resume("checkpoint-5", tmp_path / "never")


def test_resume_errors_are_bilingual_one_liners(tmp_path):
    root = tmp_path / "run"
    save(root, "checkpoint-1", 1)
    (root / "checkpoint-1" / "model.safetensors").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"^사용할 수 없는 체크포인트입니다 / --resume .*checkpoint-1: .* is not a "
                                              r"usable checkpoint"):
        ck.resolve_resume(str(root / "checkpoint-1"), root)
    with pytest.raises(CheckpointError, match=r"^체크포인트가 없습니다 / --resume .*run: no valid checkpoint in "):
        ck.resolve_resume(str(root), root)  # a run folder with 'latest' but nothing usable in it
    model_only = save(root, "initial_model", 0, update_latest=False, trainer_state=None)
    with pytest.raises(CheckpointError, match=r"^이어서 학습할 수 없습니다 / .*trainer_state.pt is missing: "):
        ck.load_trainer_state(model_only)


# ---------------------------------------------------------------- crash safety (SIGKILL mid-save)

KILLER = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    import torch
    from koen_sllm.checkpoint import store as ck

    root, point, name = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    real_fsync, real_rename, real_save_file = os.fsync, os.rename, ck.save_file
    die = lambda: os.kill(os.getpid(), signal.SIGKILL)
    kind, _, target = point.partition(":")
    if kind == "fsync":  # killed as the file (or directory) `target` is about to be synced
        def fsync(fd):
            if target in os.readlink(f"/proc/self/fd/{fd}"):
                die()
            real_fsync(fd)
        os.fsync = fsync
    elif kind == "fsync-root":  # killed right after the rename, as the parent directory is synced
        def fsync(fd):
            if os.readlink(f"/proc/self/fd/{fd}") == str(root.resolve()):
                die()
            real_fsync(fd)
        os.fsync = fsync
    elif kind == "write":  # killed halfway through the weights file
        def save_file(tensors, filename, metadata=None):
            real_save_file(tensors, filename, metadata=metadata)
            os.truncate(filename, os.path.getsize(filename) // 2)
            die()
        ck.save_file = save_file
    elif kind == "rename":  # killed after the old same-named copy was moved aside
        def rename(src, dst):
            real_rename(src, dst)
            if os.path.basename(dst).startswith(".trash-"):
                die()
        os.rename = rename
    ck.save_checkpoint(root, name, model_state={"w": torch.full((256, 64), 9.0)}, hf_config={"v": 9},
                       tokenizer_dir=None, training_info={"step": 9}, trainer_state={"step": 9})
    print("save finished without being killed")
""")


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="the kill points find files through /proc/self/fd")
@pytest.mark.parametrize("point,name", [
    ("write:model.safetensors", "checkpoint-2"),
    ("fsync:trainer_state.pt", "checkpoint-2"),
    ("fsync:manifest.json", "checkpoint-2"),
    ("fsync-root:", "checkpoint-2"),
    ("fsync:.tmp-latest-", "checkpoint-2"),
    ("rename:trash", "checkpoint-1"),
])
def test_sigkill_during_save_leaves_latest_and_earlier_checkpoints_valid(tmp_path, point, name):
    root = tmp_path / "out"
    save(root, "checkpoint-0", 0)
    save(root, "checkpoint-1", 1)
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, str(script), str(root), point, name], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    assert ck.read_latest(root) == "checkpoint-1"
    if point != "fsync-root:":  # there the temporary directory had just been renamed into place
        assert leftovers(root), "the kill should have left a temporary or moved-aside entry"
    assert ck.verify_checkpoint(root / "checkpoint-0")[0]
    if point.startswith(("fsync-root", "fsync:.tmp-latest")):  # published, pointer not yet moved
        assert ck.verify_checkpoint(root / "checkpoint-2")[0]
    else:
        assert not (root / "checkpoint-2").exists()
    warnings: list[str] = []
    resumed = ck.resolve_resume("auto", root, log=warnings.append)
    assert resumed is not None and ck.verify_checkpoint(resumed)[0]
    assert_same_state(ck.load_model_state(resumed), model_state(1))
    assert bool(warnings) == point.startswith("rename")  # only the moved-aside copy needs a word
    save(root, "checkpoint-3", 3)  # the next save cleans up after the crash
    assert leftovers(root) == []
    assert_same_state(ck.load_model_state(root / "checkpoint-1"), model_state(1))
    for p in root.glob("checkpoint-*"):
        assert ck.verify_checkpoint(p)[0], p
    assert ck.read_latest(root) == "checkpoint-3"


# ---------------------------------------------------------------- retention


def steps_in(root: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in root.glob("checkpoint-*"))


def test_retention_keeps_newest_k_and_initial_model(tmp_path):
    save(tmp_path, "initial_model", 0, update_latest=False, trainer_state=None)
    for step in (100, 200, 300, 400, 500):
        save(tmp_path, f"checkpoint-{step}", step, keep_last=2)
    assert steps_in(tmp_path) == [400, 500]
    assert (tmp_path / "initial_model" / "model.safetensors").exists()
    assert ck.read_latest(tmp_path) == "checkpoint-500" and leftovers(tmp_path) == []


def test_retention_never_removes_what_latest_names_even_when_older(tmp_path):
    for step in (100, 200, 300):
        save(tmp_path, f"checkpoint-{step}", step)
    # Resumed from checkpoint-100 (say 200 and 300 were from an abandoned attempt), then saved 150.
    save(tmp_path, "checkpoint-150", 150, keep_last=2)
    assert steps_in(tmp_path) == [150, 200, 300]
    # Saves that do not move the pointer still keep the checkpoint it names.
    for step in (400, 500):
        save(tmp_path, f"checkpoint-{step}", step, update_latest=False, keep_last=1)
    assert steps_in(tmp_path) == [150, 500] and ck.read_latest(tmp_path) == "checkpoint-150"


# ---------------------------------------------------------------- failures while saving


def _enospc_save_file(tensors, filename, metadata=None):
    Path(filename).write_bytes(b"\0" * 100)  # a partial file, as a full disk leaves
    raise OSError(errno.ENOSPC, "No space left on device", filename)


def _rust_enospc_save_file(tensors, filename, metadata=None):
    raise RuntimeError('Error while serializing: I/O error: No space left on device (os error 28)')


@pytest.mark.parametrize("inject", ["oserror", "safetensors-message"])
def test_disk_full_during_save_raises_and_keeps_earlier_ones(tmp_path, monkeypatch, inject):
    root = tmp_path / "out"
    save(root, "checkpoint-1", 1)
    monkeypatch.setattr(ck, "save_file", _enospc_save_file if inject == "oserror" else _rust_enospc_save_file)
    with pytest.raises(CheckpointError) as err:
        save(root, "checkpoint-2", 2)
    tmp = root / f".tmp-checkpoint-2-{os.getpid()}"
    assert str(err.value) == (f"disk full while writing {tmp}/model.safetensors: free space or point "
                              "--output-dir elsewhere; earlier checkpoints are intact")
    assert leftovers(root) == [] and not (root / "checkpoint-2").exists()
    assert ck.read_latest(root) == "checkpoint-1" and ck.verify_checkpoint(root / "checkpoint-1")[0]


def test_io_error_in_fsync_and_failing_extra_writer(tmp_path, monkeypatch):
    save(tmp_path, "checkpoint-1", 1)

    def bad_writer(tmp: Path) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp / "zero"))

    with pytest.raises(CheckpointError, match=r"^permission denied while writing .*\.tmp-checkpoint-2-\d+: make "):
        save(tmp_path, "checkpoint-2", 2, extra_writer=bad_writer)
    real_fsync = os.fsync

    def eio_on_state(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith("trainer_state.pt"):
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", eio_on_state)
    with pytest.raises(CheckpointError, match=r"^I/O error while writing .*: check the disk"):
        save(tmp_path, "checkpoint-2", 2)
    assert leftovers(tmp_path) == [] and not (tmp_path / "checkpoint-2").exists()
    assert ck.read_latest(tmp_path) == "checkpoint-1" and ck.verify_checkpoint(tmp_path / "checkpoint-1")[0]


def test_failure_replacing_latest_keeps_the_old_pointer(tmp_path, monkeypatch):
    save(tmp_path, "checkpoint-1", 1)

    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(CheckpointError, match=r"checkpoint-2 is saved but replacing .*latest failed \(No space left "
                                              r"on device\); 'latest' still names the previous checkpoint"):
        save(tmp_path, "checkpoint-2", 2)
    assert ck.read_latest(tmp_path) == "checkpoint-1" and leftovers(tmp_path) == []
    assert ck.verify_checkpoint(tmp_path / "checkpoint-2")[0]


# ---------------------------------------------------------------- output directory checks


def test_output_dir_under_a_regular_file_is_refused(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(CheckpointError, match=r"^출력 폴더를 만들 수 없습니다 / cannot create output directory "
                                              r".*afile/out \(Not a directory\); "
                                              r"pass --output-dir PATH on a writable disk$"):
        ck.check_output_dir(tmp_path / "afile" / "out", 0)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes through chmod 0o500")
def test_read_only_output_dir_is_refused(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(CheckpointError, match=r"output directory .*ro is not writable \(Permission denied\)"):
            ck.check_output_dir(ro, 0)
    finally:
        ro.chmod(0o700)


def test_failed_write_probe_is_refused(tmp_path, monkeypatch):
    # Root ignores chmod, so the probe's failure is injected the way a read-only mount reports it.
    def read_only(path, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(ck, "open", read_only, raising=False)
    with pytest.raises(CheckpointError) as err:
        ck.check_output_dir(tmp_path, 0)
    assert str(err.value) == (f"출력 폴더에 쓸 수 없습니다 / output directory {tmp_path} is not writable "
                              "(Read-only file system); "
                              "fix its permissions or pass --output-dir PATH on a writable disk")


def test_too_little_free_space_is_refused(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(ck.shutil, "disk_usage", lambda p: usage(100 << 30, 99 << 30, 1 << 30))
    need = ck.estimate_checkpoint_bytes(350_000_000)
    with pytest.raises(CheckpointError) as err:
        ck.check_output_dir(tmp_path / "out", 3 * need, per_checkpoint_bytes=need)
    assert str(err.value) == (
        f"디스크 공간이 부족합니다 / only 1.0 GiB free on the disk holding {tmp_path / 'out'}, but checkpoints need "
        "about 12.2 GiB (one checkpoint is about 4.1 GiB); free space, lower --save-total-limit or pass --output-dir "
        "on a larger disk")
    ck.check_output_dir(tmp_path / "out", 1 << 29)  # half a GiB fits
    assert (tmp_path / "out").is_dir() and list((tmp_path / "out").iterdir()) == []


def test_estimate_checkpoint_bytes():
    assert ck.estimate_checkpoint_bytes(1_000_000) == int(12_000_000 * 1.02) + (64 << 20)
    assert ck.estimate_checkpoint_bytes(1_000_000, with_optimizer=False) == int(4_000_000 * 1.02) + (64 << 20)
    assert ck.estimate_checkpoint_bytes(1_000_000, moment_bytes=2) == int(8_000_000 * 1.02) + (64 << 20)  # bf16 moments


# ---------------------------------------------------------------- the output folder, agreed by every rank


def main_process(rank: int = 0):
    from koen_sllm.distributed import DistInfo

    return DistInfo(rank, rank, 1, torch.device("cpu"), None)  # no process group: broadcasts return their input


def run_config_for(out: Path):
    from koen_sllm.config import RunConfig

    cfg = RunConfig()
    cfg.ckpt.output_dir = str(out)
    return cfg


def test_output_dir_check_on_main_raises_one_setup_error(tmp_path, monkeypatch):
    from koen_sllm.run_state import RunSetupError, check_output_dir_on_main

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(ck.shutil, "disk_usage", lambda p: usage(100 << 30, 99 << 30, 1 << 30))
    need = 3 << 30
    with pytest.raises(RunSetupError) as err:
        check_output_dir_on_main(run_config_for(tmp_path / "out"), main_process(), 2 * need, need)
    assert str(err.value) == (
        f"디스크 공간이 부족합니다 / only 1.0 GiB free on the disk holding {tmp_path / 'out'}, but checkpoints need "
        "about 6.0 GiB (one checkpoint is about 3.0 GiB); free space, lower --save-total-limit or pass --output-dir "
        "on a larger disk")
    # another rank does not probe the disk: it takes rank 0's answer from the broadcast
    assert check_output_dir_on_main(run_config_for(tmp_path / "other"), main_process(1), 2 * need, need) is None
    assert not (tmp_path / "other").exists()


def test_output_dir_check_on_main_passes_and_creates_the_folder(tmp_path):
    from koen_sllm.run_state import check_output_dir_on_main

    out = tmp_path / "a" / "out"
    assert check_output_dir_on_main(run_config_for(out), main_process(), 1 << 20, 1 << 19) is None
    assert out.is_dir() and list(out.iterdir()) == []


def test_output_dir_check_on_main_refuses_an_unwritable_folder(tmp_path):
    from koen_sllm.run_state import RunSetupError, check_output_dir_on_main

    (tmp_path / "afile").write_text("x")
    with pytest.raises(RunSetupError, match=r"^출력 폴더를 만들 수 없습니다 / cannot create output directory "):
        check_output_dir_on_main(run_config_for(tmp_path / "afile" / "out"), main_process(), 0, 0)


def test_output_dir_check_on_main_reports_any_failure_as_a_setup_error(tmp_path, monkeypatch):
    """A failure check_output_dir does not word itself still goes through the broadcast, not past it."""
    from koen_sllm.run_state import RunSetupError, check_output_dir_on_main

    def stale(path):
        raise OSError(errno.ESTALE, "Stale file handle")

    monkeypatch.setattr(ck.shutil, "disk_usage", stale)
    with pytest.raises(RunSetupError, match=r"^출력 폴더를 확인할 수 없습니다 / cannot check output directory .*out "
                                            r"\(OSError: \[Errno \d+\] Stale file handle\); pass --output-dir"):
        check_output_dir_on_main(run_config_for(tmp_path / "out"), main_process(), 0, 0)


def test_output_dir_check_on_main_agrees_through_the_broadcast(tmp_path, monkeypatch):
    """Every rank gets rank 0's outcome: here a stand-in broadcast hands a non-main rank rank 0's error."""
    from koen_sllm import run_state
    from koen_sllm.run_state import RunSetupError, check_output_dir_on_main

    sent = RunSetupError("디스크 공간이 부족합니다 / only 1 MiB free")
    monkeypatch.setattr(run_state.D, "broadcast_object", lambda obj, src=0: sent)
    with pytest.raises(RunSetupError, match="only 1 MiB free"):
        check_output_dir_on_main(run_config_for(tmp_path / "out"), main_process(1), 0, 0)


def test_resume_with_another_global_batch_is_refused_in_both_languages(tmp_path):
    from types import SimpleNamespace

    from koen_sllm.config import BatchPlan
    from koen_sllm.run_state import RunSetupError, load_resume_state

    ckpt = tmp_path / "checkpoint-68"
    ckpt.mkdir()
    torch.save({"backend": "ddp", "sequences_per_step": 16, "seq_len": 128}, ckpt / ck.TRAINER_STATE_FILE)
    engine = SimpleNamespace(name="ddp")
    with pytest.raises(RunSetupError) as err:
        load_resume_state(engine, ckpt, BatchPlan(4, 128, 2, 1))
    msg = str(err.value)
    assert msg.startswith(f"이어서 학습할 수 없습니다 / {ckpt} was trained with 16 sequences x 128 tokens per step; "
                          "this run has 8 x 128") and "--global-batch-size 16 --max-seq-length 128" in msg
    assert "\n" not in msg
