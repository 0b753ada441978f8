"""deploy/kubeflow/trainjob.yaml and scripts/make_trainjob.py, checked offline (no cluster).

* the TrainJob against the TrainJob CRD's openAPIV3Schema from the shared Kubeflow Trainer
  reference (../shared/reference/kubeflow-trainer), made strict the way the API server checks a
  new object (tests/support/k8s_crd.py), and against the torch-distributed runtime it names;
* the pods' command: torchrun's own parser with the PET_* variables the runtime's torch policy
  sets, then the trainer's parser and resolution for nodes x GPUs processes;
* the generator: the checked-in YAML is its default output, other sizes validate too, bad input
  is one error line.

Each check is also run on a broken copy, to show that it can fail.
"""
from __future__ import annotations

import copy
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path, PurePosixPath

import pytest

from koen_sllm.config import ConfigError, repo_root

ROOT = repo_root()
REFERENCE = ROOT.parent / "shared" / "reference" / "kubeflow-trainer"
CRD_FILE = REFERENCE / "trainer.kubeflow.org_trainjobs.yaml"
RUNTIME_FILE = REFERENCE / "torch-distributed-runtime.yaml"
DEPLOY = ROOT / "deploy" / "kubeflow"
TRAINJOB = DEPLOY / "trainjob.yaml"
GENERATOR = ROOT / "scripts" / "make_trainjob.py"

_spec = importlib.util.spec_from_file_location("make_trainjob", GENERATOR)
MT = sys.modules["make_trainjob"] = importlib.util.module_from_spec(_spec)  # its dataclass looks itself up there
_spec.loader.exec_module(MT)


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def yaml():
    return pytest.importorskip("yaml", reason="PyYAML is needed to read the manifests (pip install -e '.[dev]')")


def _reference(path: Path) -> Path:
    if not path.is_file():
        pytest.skip(f"the Kubeflow Trainer reference is not here: {path} (the shared folder beside the checkout)")
    return path


@pytest.fixture(scope="module")
def crd(yaml):
    return yaml.safe_load(_reference(CRD_FILE).read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def validator(crd):
    pytest.importorskip("jsonschema", reason="jsonschema is needed for the CRD check (pip install -e '.[dev]')")
    import k8s_crd

    return k8s_crd.validator_for(crd)


@pytest.fixture(scope="module")
def runtime(yaml):
    # A Helm template: its {{ ... }} lines only add labels, so without them it is plain YAML.
    text = _reference(RUNTIME_FILE).read_text(encoding="utf-8")
    return yaml.safe_load("\n".join(line for line in text.splitlines() if "{{" not in line))


@pytest.fixture
def job(yaml):
    return yaml.safe_load(TRAINJOB.read_text(encoding="utf-8"))


def schema_errors(validator, document) -> list[str]:
    import k8s_crd

    return k8s_crd.errors(validator, document)


# ---------------------------------------------------------------- checks used by the tests


def runtime_mismatches(job: dict, runtime: dict) -> list[str]:
    """What in the TrainJob does not fit the runtime it names (an empty list: all fits)."""
    problems = []
    ref = job["spec"]["runtimeRef"]
    if ref.get("name") != runtime["metadata"]["name"]:
        problems.append(f"runtimeRef.name {ref.get('name')!r} is not the runtime {runtime['metadata']['name']!r}")
    if ref.get("kind", "ClusterTrainingRuntime") != runtime["kind"]:
        problems.append(f"runtimeRef.kind {ref.get('kind')!r} is not {runtime['kind']!r}")
    if "torch" not in runtime["spec"].get("mlPolicy", {}):
        problems.append("the runtime has no torch policy, so nothing sets PET_* for torchrun")
    jobs = {j["name"]: j for j in runtime["spec"]["template"]["spec"]["replicatedJobs"]}
    for patch in job["spec"].get("runtimePatches", []):
        for rjob in patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]:
            if rjob["name"] not in jobs:
                problems.append(f"runtimePatches names job {rjob['name']!r}; the runtime has {sorted(jobs)}")
                continue
            target = jobs[rjob["name"]]["template"]
            if target["metadata"]["labels"].get("trainer.kubeflow.org/trainjob-ancestor-step") != "trainer":
                problems.append(f"job {rjob['name']!r} is not the runtime's trainer step")
            have = {c["name"] for c in target["spec"]["template"]["spec"]["containers"]}
            for container in rjob["template"]["spec"]["template"]["spec"].get("containers", []):
                if container["name"] not in have:
                    problems.append(f"runtimePatches names container {container['name']!r}; job "
                                    f"{rjob['name']!r} has {sorted(have)}")
    return problems


def pod_spec(job: dict) -> dict:
    (patch,) = job["spec"]["runtimePatches"]
    (rjob,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    return rjob["template"]["spec"]["template"]["spec"]


def shared_mount(job: dict) -> tuple[str, str]:
    """(claim name, mount path) of the TrainJob's PersistentVolumeClaim."""
    spec = pod_spec(job)
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"] if "persistentVolumeClaim" in v}
    (container,) = spec["containers"]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] in claims]
    return claims[mount["name"]], mount["mountPath"]


def torchrun_view(job: dict, monkeypatch) -> tuple[object, int]:
    """torchrun's parse of the pods' command line, with the PET_* variables that the runtime's torch
    policy gives every node (torch.go in kubeflow/trainer: numNodes, numProcPerNode, the node's
    completion index, <name>-node-0-0.<name>, port 29500). Returns (torchrun's args, world size)."""
    run = pytest.importorskip("torch.distributed.run", reason="torch is needed to parse the torchrun command")
    trainer = job["spec"]["trainer"]
    name = job["metadata"]["name"]
    env = {"PET_NNODES": str(trainer["numNodes"]), "PET_NPROC_PER_NODE": str(trainer["numProcPerNode"]),
           "PET_NODE_RANK": "0", "PET_MASTER_ADDR": f"{name}-node-0-0.{name}", "PET_MASTER_PORT": "29500"}
    for key in [k for k in os.environ if k.startswith("PET_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    command = trainer["command"] + trainer.get("args", [])
    assert PurePosixPath(command[0]).name == "torchrun", command
    args = run.get_args_parser().parse_args(command[1:])
    nnodes = int(args.nnodes)  # a fixed count, not an elastic min:max range
    return args, nnodes * int(args.nproc_per_node)


def trainer_problems(job: dict, monkeypatch) -> list[str]:
    """The trainer's view of the pods' command: its parser, then its resolution (cli.resolve_config,
    as the trainer runs it, and resolve_fully) for the job's world size on GPUs. Returns the
    problems; a ConfigError from the trainer is one of them."""
    from koen_sllm.cli import resolve_config, resolve_fully

    trainer = job["spec"]["trainer"]
    args, world = torchrun_view(job, monkeypatch)
    problems = []
    if (int(args.nnodes), int(args.nproc_per_node)) != (trainer["numNodes"], trainer["numProcPerNode"]):
        problems.append(f"torchrun runs {args.nnodes} x {args.nproc_per_node}, the TrainJob asks for "
                        f"{trainer['numNodes']} x {trainer['numProcPerNode']}")
    gpus = trainer["resourcesPerNode"]["limits"].get("nvidia.com/gpu")
    if str(gpus) != str(trainer["numProcPerNode"]):
        problems.append(f"nvidia.com/gpu {gpus} per node but numProcPerNode {trainer['numProcPerNode']}")
    script = PurePosixPath(args.training_script)
    if script != PurePosixPath(MT.IMAGE_REPO_DIR) / MT.TRAINER_SCRIPT or not (ROOT / MT.TRAINER_SCRIPT).is_file():
        problems.append(f"torchrun starts {script}, not the image's {MT.IMAGE_REPO_DIR}/{MT.TRAINER_SCRIPT}")
    reserved = sorted(e["name"] for e in trainer.get("env", []) if e["name"].startswith("PET_"))
    if reserved:
        problems.append(f"env sets {reserved}, which the torch policy reserves (the TrainJob would be refused)")
    try:
        cfg, _, explicit, notes = resolve_config(args.training_script_args, world, has_cuda=True)
        resolve_fully(cfg, explicit, notes, world, has_cuda=True)
    except ConfigError as exc:
        return problems + [f"the trainer refuses its options: {exc}"]
    if cfg.train.mode != "train" or cfg.ckpt.resume != "auto":
        problems.append(f"mode {cfg.train.mode}, --resume {cfg.ckpt.resume}: a restarted pod would not resume")
    _, mount = shared_mount(job)
    for what, path in (("--output-dir", cfg.output_dir), ("--logs-dir", cfg.logs_dir),
                       ("--dataset-path", cfg.dataset_path)):
        if not PurePosixPath(path).is_relative_to(mount):
            problems.append(f"{what} {path} is not on the shared volume at {mount}")
    return problems


# ---------------------------------------------------------------- the checked-in TrainJob


def test_checked_in_trainjob_is_the_generators_default_output():
    text = TRAINJOB.read_text(encoding="utf-8")
    assert text == MT.render(MT.JobSpec()), "deploy/kubeflow/trainjob.yaml differs: python scripts/make_trainjob.py " \
                                            "-o deploy/kubeflow/trainjob.yaml"
    res = subprocess.run([sys.executable, str(GENERATOR)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout == text, res.stderr


def test_trainjob_validates_against_the_crd(crd, validator, job):
    version = next(v for v in crd["spec"]["versions"] if v["storage"])
    assert version["served"]
    assert job["apiVersion"] == f"{crd['spec']['group']}/{version['name']}"
    assert job["kind"] == crd["spec"]["names"]["kind"]
    assert schema_errors(validator, job) == []


def test_the_schema_check_covers_the_whole_trainjob(validator, job):
    """Not vacuous: every part of the TrainJob is under a schema with its fields listed (only
    metadata, which the API server checks as ObjectMeta, is free-form in the CRD), and unknown
    fields are refused."""
    import k8s_crd

    assert k8s_crd.free_form_paths(validator.schema, job) == ["metadata"]
    assert validator.schema["properties"]["spec"]["additionalProperties"] is False


def _set(doc: dict, path: str, value) -> None:
    """Sets doc[a][b]...: `path` is "a.b.0.c" (numbers index lists), "[...]" one key with dots in it."""
    keys = [k.strip("[]") for k in re.findall(r"\[[^]]*\]|[^.]+", path)]
    for key in keys[:-1]:
        doc = doc[int(key)] if isinstance(doc, list) else doc[key]
    doc[int(keys[-1]) if isinstance(doc, list) else keys[-1]] = value


PATCH_POD = "spec.runtimePatches.0.trainingRuntimeSpec.template.spec.replicatedJobs.0.template.spec.template.spec"


@pytest.mark.parametrize("path, value, fragment", [
    ("spec.trainer.numNodes", "4", "spec.trainer.numNodes: '4' is not of type 'integer'"),
    ("spec.trainer.numNodes", -1, "spec.trainer.numNodes: -1 is less than the minimum of 0"),
    ("spec.trainer.numNodes", 2**31, "is not a 'int32'"),
    ("spec.trainer.numProcPerNode", 0, "numProcPerNode must be greater than or equal to 1"),
    ("spec.trainer.env.0.value", 1, "spec.trainer.env.0.value: 1 is not of type 'string'"),
    ("spec.trainer.args", "--train", "spec.trainer.args: '--train' is not of type 'array'"),
    ("spec.trainer.resourcesPerNode.limits.[nvidia.com/gpu]", "one", "'one' does not match"),
    ("spec.trainer.resourcePerNode", {}, "'resourcePerNode' was unexpected"),
    ("spec.runtimeRef.name", "", "should be non-empty"),
    ("spec.runtimeRef", {"kind": "ClusterTrainingRuntime"}, "'name' is a required property"),
    ("spec.managedBy", "me", "ManagedBy must be"),
    ("metadata.name", "Koen_SLLM", "metadata.name must match RFC 1035 DNS label format"),
    ("metadata.name", "k" * 64, "metadata.name must be no more than 63 characters"),
    ("spec.runtimePatches.0", {"trainingRuntimeSpec": {}}, "'manager' is a required property"),
    (f"{PATCH_POD}.volumes.0.persistentVolumeClaim.claimName", 5, "5 is not of type 'string'"),
    (f"{PATCH_POD}.containers.0.resources", {"limits": {}}, "'resources' was unexpected"),
    (f"{PATCH_POD}.terminationGracePeriodSeconds", "300", "'300' is not of type 'integer'"),
])
def test_the_schema_check_rejects_a_broken_copy(validator, job, path, value, fragment):
    broken = copy.deepcopy(job)
    _set(broken, path, value)
    found = schema_errors(validator, broken)
    assert any(fragment in line for line in found), found


def test_the_schema_check_rejects_a_repeated_list_map_key(validator, job):
    broken = copy.deepcopy(job)
    env = broken["spec"]["trainer"]["env"]
    env.append(dict(env[0]))
    assert any("duplicate entry (name=" in line for line in schema_errors(validator, broken))


@pytest.mark.parametrize("gpus", [1, "1", 8, "8"])
def test_gpu_counts_are_int_or_string(validator, job, gpus):
    job["spec"]["trainer"]["resourcesPerNode"]["limits"]["nvidia.com/gpu"] = gpus
    assert schema_errors(validator, job) == []


def test_trainjob_fits_the_torch_distributed_runtime(job, runtime):
    assert runtime_mismatches(job, runtime) == []
    assert job["spec"]["runtimeRef"]["name"] == runtime["metadata"]["name"] == "torch-distributed"


@pytest.mark.parametrize("change, fragment", [
    (lambda j: j["spec"]["runtimeRef"].update(name="torch-distributed-gpu"), "runtimeRef.name"),
    (lambda j: j["spec"]["runtimeRef"].update(kind="TrainingRuntime"), "runtimeRef.kind"),
    (lambda j: pod_spec(j)["containers"][0].update(name="trainer"), "container 'trainer'"),
    (lambda j: j["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
     .update(name="launcher"), "job 'launcher'"),
])
def test_the_runtime_check_rejects_a_broken_copy(job, runtime, change, fragment):
    change(job)
    assert any(fragment in p for p in runtime_mismatches(job, runtime))


def test_pods_run_torchrun_with_options_the_trainer_accepts(job, monkeypatch):
    assert trainer_problems(job, monkeypatch) == []
    args, world = torchrun_view(job, monkeypatch)
    assert (args.nnodes, args.nproc_per_node, args.node_rank, args.master_port) == ("4", "1", 0, 29500)
    assert args.master_addr == "koen-sllm-node-0-0.koen-sllm" and args.rdzv_backend == "static" and world == 4


@pytest.mark.parametrize("change, fragment", [
    (lambda t: t["args"].extend(["--batch-size", "abc"]), "invalid int value: 'abc'"),
    (lambda t: t["args"].extend(["--global-batch-size", "6"]), "not a multiple of --batch-size 4 x 4 processes"),
    (lambda t: t["args"].append("--test"), "not allowed with argument"),
    (lambda t: t["args"].extend(["--resume", "none"]), "--resume none"),
    (lambda t: t["args"].extend(["--output-dir", "/tmp/outputs"]), "--output-dir /tmp/outputs is not on the shared"),
    (lambda t: t.update(numProcPerNode=2), "nvidia.com/gpu 1 per node but numProcPerNode 2"),
    (lambda t: t["command"].insert(1, "--nnodes=2"), "torchrun runs 2 x 1"),
    (lambda t: t["command"].__setitem__(1, "train.py"), "not the image's /opt/koen-sllm/scripts/train_h100_dual.py"),
    (lambda t: t["env"].append({"name": "PET_NNODES", "value": "4"}), "reserves"),
])
def test_the_command_check_rejects_a_broken_copy(job, monkeypatch, change, fragment):
    change(job["spec"]["trainer"])
    problems = trainer_problems(job, monkeypatch)
    assert any(fragment in p for p in problems), problems


def test_the_shared_volume_holds_the_runs_files(yaml, job):
    claim, mount = shared_mount(job)
    pvc = yaml.safe_load((DEPLOY / "pvc.yaml").read_text(encoding="utf-8"))
    assert (pvc["kind"], pvc["metadata"]["name"]) == ("PersistentVolumeClaim", claim)
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]  # numNodes > 1: every node mounts it
    shell = yaml.safe_load((DEPLOY / "shell-pod.yaml").read_text(encoding="utf-8"))
    assert shell["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == claim
    assert shell["spec"]["containers"][0]["volumeMounts"][0]["mountPath"] == mount
    env = {e["name"]: e.get("value") for e in job["spec"]["trainer"]["env"]}
    assert PurePosixPath(env["KOEN_CONSOLE_LOG"]).is_relative_to(mount)
    spec = pod_spec(job)
    names = {v["name"] for v in spec["volumes"]}
    assert {m["name"] for m in spec["containers"][0]["volumeMounts"]} <= names
    assert spec["terminationGracePeriodSeconds"] > int(env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"])


# ---------------------------------------------------------------- the generator


def generate(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(GENERATOR), *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


def test_generator_4_nodes_x_1_gpu_validates(yaml, validator, runtime, tmp_path, monkeypatch):
    out = tmp_path / "job.yaml"
    res = generate("--nodes", "4", "--gpus-per-node", "1", "--image", "registry.example.com/koen-sllm:latest",
                   "--pvc", "koen-sllm-data", "-o", str(out))
    assert res.returncode == 0 and res.stdout == "", res.stderr
    job = yaml.safe_load(out.read_text(encoding="utf-8"))
    assert schema_errors(validator, job) == [] and runtime_mismatches(job, runtime) == []
    assert trainer_problems(job, monkeypatch) == []
    assert job == yaml.safe_load(TRAINJOB.read_text(encoding="utf-8"))  # the defaults, spelled out


def test_generator_other_sizes_efa_and_trainer_options(yaml, validator, runtime, tmp_path, monkeypatch):
    out = tmp_path / "job.yaml"
    res = generate("--nodes", "2", "--gpus-per-node", "8", "--efa", "32", "--name", "ko-1b3", "--pvc", "fsx-claim",
                   "--mount-path", "/fsx/koen", "--image", "123456789012.dkr.ecr.us-east-1.amazonaws.com/koen:v1",
                   "-o", str(out), "--", "--batch-size", "8", "--model-size", "1.3b", "--learning-rate", "3e-4",
                   "--save-steps", "1000")
    assert res.returncode == 0, res.stderr
    text = out.read_text(encoding="utf-8")
    job = yaml.safe_load(text)
    assert schema_errors(validator, job) == [] and runtime_mismatches(job, runtime) == []
    assert trainer_problems(job, monkeypatch) == []
    trainer = job["spec"]["trainer"]
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (2, 8)
    assert trainer["resourcesPerNode"]["limits"] == {"nvidia.com/gpu": 8, "vpc.amazonaws.com/efa": 32}
    assert {"name": "FI_PROVIDER", "value": "efa"} in trainer["env"]
    assert trainer["args"][-8:] == ["--batch-size", "8", "--model-size", "1.3b", "--learning-rate", "3e-4",
                                    "--save-steps", "1000"]
    assert shared_mount(job) == ("fsx-claim", "/fsx/koen")
    assert "python scripts/make_trainjob.py --nodes 2 --gpus-per-node 8 --efa 32" in text  # how to make it again


def test_generator_the_references_8b_zero3_job(yaml, validator, runtime, tmp_path, monkeypatch):
    """Reference 002's shape: 4 nodes x 1 GPU, the 8b preset under the shipped ZeRO-3 offload file
    (a path inside the image's checkout, which is the pods' working directory)."""
    out = tmp_path / "job.yaml"
    res = generate("--image", "registry.example.com/koen-sllm:deepspeed", "-o", str(out), "--",
                   "--model-size", "8b", "--batch-size", "1", "--deepspeed", "configs/ds_zero3_offload.json")
    assert res.returncode == 0, res.stderr
    job = yaml.safe_load(out.read_text(encoding="utf-8"))
    assert schema_errors(validator, job) == [] and runtime_mismatches(job, runtime) == []
    assert trainer_problems(job, monkeypatch) == []
    assert job["spec"]["trainer"]["args"][-6:] == ["--model-size", "8b", "--batch-size", "1", "--deepspeed",
                                                   "configs/ds_zero3_offload.json"]
    res = generate("-o", str(tmp_path / "bad.yaml"), "--", "--deepspeed", "configs/no_such.json")
    assert res.returncode == 2 and "no_such.json: file not found" in res.stderr


@pytest.mark.parametrize("value", ["8", "3e-4", "1e999", "-1", ".inf", "-.5", "+1", "-1:20", "-0x1F", "yes", "Yes", "on",
                                   "null", "NULL", "~", "a b", "x: y", "a:b", "k:", "#x", "'q'", '"dq"', "[1]", "{a}",
                                   "*ref", "&a", "!tag", "%p", "@a", "`b", "<<", "", "-", "--", "?", "a\\b", "tab\there",
                                   "한국어 데이터", "/mnt/a,b"])
def test_generator_scalars_read_back_as_the_same_string(yaml, value):
    assert yaml.safe_load(f"key: {MT.scalar(value)}\n") == {"key": value}
    assert yaml.safe_load(f"- {MT.scalar(value)}\n") == [value]


@pytest.mark.parametrize("args, fragment", [
    (["--nodes", "0"], "--nodes needs a positive integer (nodes to train on), got '0'"),
    (["--nodes", "two"], "--nodes needs a positive integer (nodes to train on), got 'two'"),
    (["--nodes", "1.5"], "--nodes needs a positive integer"),
    (["--nodes=-2"], "--nodes needs a positive integer"),
    (["--gpus-per-node", "0"], "--gpus-per-node needs a positive integer"),
    (["--gpus-per-node", "eight"], "--gpus-per-node needs a positive integer"),
    (["--efa", "-1"], "--efa needs an integer of 0 or more"),
    (["--nodes"], "--nodes needs a value"),
    (["--nodse", "2"], "unknown option '--nodse'"),
    (["--name", "Koen_SLLM"], "--name 'Koen_SLLM' must be a lower-case DNS label"),
    (["--pvc", "My Claim"], "--pvc 'My Claim' is not a valid claim name"),
    (["--mount-path", "data"], "--mount-path 'data' must be an absolute path"),
    (["--", "--batch-size", "abc"], "argument --batch-size: invalid int value: 'abc'"),
    (["--nodes", "3", "--", "--global-batch-size", "16"], "not a multiple of --batch-size 4 x 3 processes = 12"),
    (["--mount-path", "/"], "--mount-path '/' must be an absolute path (not /)"),
    (["--", "--output-dir", "/tmp/x"], "trainer option --output-dir is set by this script"),
    (["--", "--output", "/tmp/x"], "trainer option --output-dir is set by this script"),  # an abbreviation
    (["--", "--resume=none"], "trainer option --resume is set by this script"),
    (["--", "--test"], "trainer option --test/--train is set by this script"),
])
def test_generator_bad_input_is_one_error_line(tmp_path, args, fragment):
    out = tmp_path / "job.yaml"
    res = generate("-o", str(out), *args)
    assert res.returncode == 2 and res.stdout == ""
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("❌ 옵션 오류 / "), res.stderr
    assert fragment in lines[0], lines[0]
    assert not out.exists()


def test_generator_help():
    res = generate("--help")
    assert res.returncode == 0 and res.stderr == "" and res.stdout == MT.USAGE
    for option in ("--nodes N", "--gpus-per-node G", "--image IMAGE", "--pvc CLAIM", "--efa N", "-- OPTIONS"):
        assert option in res.stdout
