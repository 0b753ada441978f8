#!/usr/bin/env python3
"""Write a Kubeflow Trainer TrainJob that runs this project's trainer on N nodes x G GPUs.

    python scripts/make_trainjob.py                                   # the defaults: 4 nodes x 1 GPU
    python scripts/make_trainjob.py --nodes 2 --gpus-per-node 8 --efa 32 \\
        --image 123456789012.dkr.ecr.us-east-1.amazonaws.com/koen-sllm:v1 \\
        -o deploy/kubeflow/trainjob.yaml -- --batch-size 8 --model-size 1.3b
    python scripts/make_trainjob.py --help

Options after ``--`` are trainer options (python scripts/train_h100_dual.py --help); they are
checked with the trainer's own parser and resolved for nodes x GPUs processes before anything
is written, so a bad one is one line on stderr (exit 2) here rather than a failed pod later.
The paths of the data, the checkpoints and the logs are on the shared volume (--pvc mounted
at --mount-path) and are set here; the job always resumes (--resume auto), so a restarted
pod continues from the latest checkpoint.

deploy/kubeflow/trainjob.yaml is this script's output with the defaults (a test keeps the two
equal). Standard library only, plus the trainer's option parser from this checkout.
See docs/clusters.md, "Kubeflow Trainer (TrainJob)".
"""
from __future__ import annotations

import json
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # runnable from a checkout without installation

from koen_sllm.config import ConfigError, apply_device_defaults, explicit_options, parse_args  # noqa: E402

# Where the image keeps this checkout (docker/Dockerfile: WORKDIR, installed with pip install -e),
# and the uid it runs as (its user koen): the shared volume must be writable by that uid.
IMAGE_REPO_DIR = "/opt/koen-sllm"
IMAGE_UID = 1000
TRAINER_SCRIPT = "scripts/train_h100_dual.py"
# The ClusterTrainingRuntime installed with Kubeflow Trainer's runtimes, and the names inside it
# that the patch below must match (its replicated job and its trainer container are both "node").
RUNTIME = "torch-distributed"
RUNTIME_JOB = "node"
RUNTIME_CONTAINER = "node"
PATCH_MANAGER = "koen-sllm"
# Seconds a pod gets between SIGTERM and SIGKILL (deletion, eviction): torchrun passes SIGTERM on
# to the workers, which finish the step and save a checkpoint; torchrun waits SHUTDOWN_TIMEOUT_S
# of it before it kills them. Raise both if a save to your storage takes longer.
GRACE_PERIOD_S = 300
SHUTDOWN_TIMEOUT_S = 270
# Trainer options this script sets itself (their parser destinations), so the run's files are on
# the shared volume and a restarted pod resumes.
OWNED = {"dataset_path": "--dataset-path", "output_dir": "--output-dir", "logs_dir": "--logs-dir",
         "resume": "--resume", "mode": "--test/--train"}

DEFAULT_OUTPUT = "deploy/kubeflow/trainjob.yaml"
DEFAULT_COMMAND = f"python scripts/make_trainjob.py -o {DEFAULT_OUTPUT}"
DEFAULTS = dict(nodes=4, gpus_per_node=1, image="registry.example.com/koen-sllm:latest", pvc="koen-sllm-data",
                name="koen-sllm", mount_path="/mnt/koen-sllm", efa=0)

_RFC1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_RFC1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_PLAIN = re.compile(r"^[A-Za-z_/.-]([A-Za-z0-9_./=+:-]*[A-Za-z0-9_./=+-])?$")  # no ':' at the end
_YAML_WORDS = {"y", "n", "yes", "no", "true", "false", "on", "off", "null", "~"}
INT32_MAX = 2**31 - 1

USAGE = """usage: make_trainjob.py [--nodes N] [--gpus-per-node G] [--image IMAGE] [--pvc CLAIM]
                        [--name NAME] [--mount-path PATH] [--efa N] [-o FILE] [-- TRAINER OPTIONS ...]

Write a Kubeflow Trainer TrainJob (trainer.kubeflow.org/v1alpha1) for this project.

options (defaults in brackets):
  --nodes N            nodes (pods), one torchrun each [{nodes}]
  --gpus-per-node G    GPUs per node = processes per node [{gpus_per_node}]
  --image IMAGE        the project's container image (docker/Dockerfile) [{image}]
  --pvc CLAIM          PersistentVolumeClaim holding datasets/, outputs/ and logs/ [{pvc}]
  --name NAME          the TrainJob's name [{name}]
  --mount-path PATH    where the claim is mounted in every pod [{mount_path}]
  --efa N              EFA interfaces per node (AWS; 0 = off: the EFA settings stay comments) [{efa}]
  -o, --output FILE    write here instead of standard output
  -h, --help           this help
  -- OPTIONS           trainer options (python scripts/train_h100_dual.py --help), e.g. -- --batch-size 8;
                       checked with the trainer's parser for nodes x GPUs processes
""".format(**DEFAULTS)


class UsageError(ValueError):
    """A bad value for this script; the message is one line."""


@dataclass
class JobSpec:
    nodes: int = DEFAULTS["nodes"]
    gpus_per_node: int = DEFAULTS["gpus_per_node"]
    image: str = DEFAULTS["image"]
    pvc: str = DEFAULTS["pvc"]
    name: str = DEFAULTS["name"]
    mount_path: str = DEFAULTS["mount_path"]
    efa: int = DEFAULTS["efa"]
    trainer_options: list[str] = field(default_factory=list)

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    def trainer_args(self) -> list[str]:
        m = self.mount_path.rstrip("/") or "/"
        return ["--train", "--resume", "auto", "--dataset-path", f"{m}/datasets", "--output-dir", f"{m}/outputs",
                "--logs-dir", f"{m}/logs", *self.trainer_options]


# ---------------------------------------------------------------- checks


def _count(option: str, text: str, minimum: int, what: str) -> int:
    value = int(text) if re.fullmatch(r"[0-9]+", text) else None
    if value is None or value < minimum or value > INT32_MAX:
        kind = "a positive integer" if minimum > 0 else "an integer of 0 or more"
        raise UsageError(f"{option} needs {kind} ({what}), got {text!r}")
    return value


def check_spec(spec: JobSpec) -> None:
    """The job's own values (names, paths) and the trainer options. Raises UsageError or ConfigError."""
    if not (_RFC1035_LABEL.match(spec.name) and len(spec.name) <= 63):
        raise UsageError(f"--name {spec.name!r} must be a lower-case DNS label of at most 63 characters "
                         "(a-z, 0-9 and '-', starting with a letter), e.g. koen-sllm")
    if not (_RFC1123_SUBDOMAIN.match(spec.pvc) and len(spec.pvc) <= 253):
        raise UsageError(f"--pvc {spec.pvc!r} is not a valid claim name (lower-case a-z, 0-9, '-' and '.')")
    if not spec.image or len(spec.image) > 500 or any(ch.isspace() for ch in spec.image):
        raise UsageError(f"--image {spec.image!r} must be an image reference without spaces, at most 500 characters")
    if not spec.mount_path.startswith("/") or not spec.mount_path.strip("/") or ":" in spec.mount_path \
            or any(ch.isspace() for ch in spec.mount_path):
        raise UsageError(f"--mount-path {spec.mount_path!r} must be an absolute path (not /) without spaces or ':'")
    if spec.world_size > INT32_MAX:
        raise UsageError(f"--nodes {spec.nodes} x --gpus-per-node {spec.gpus_per_node} is too many processes")
    owned = [option for dest, option in OWNED.items() if dest in explicit_options(spec.trainer_options)]
    if owned:  # asked of the trainer's parser, so an abbreviation such as --output counts too
        raise UsageError(f"trainer option {owned[0]} is set by this script (the run's files live on the shared "
                         "volume at --mount-path, and the job always trains with --resume auto); drop it")
    check_trainer_options(spec.trainer_args(), spec.world_size)


def check_trainer_options(args: Sequence[str], world_size: int) -> None:
    """The trainer's parser and its resolution for `world_size` GPU processes (the output folder's
    run.json lives on the cluster, so the rules of a resume apply there). Raises ConfigError."""
    from koen_sllm.cli import resolve_fully

    cfg, _ = parse_args(list(args))
    notes = apply_device_defaults(cfg, has_cuda=True)
    resolve_fully(cfg, explicit_options(list(args)), notes, world_size, has_cuda=True)


# ---------------------------------------------------------------- YAML


def scalar(value) -> str:
    """A YAML scalar that reads back as exactly this string (or integer)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    text = str(value)
    if _PLAIN.match(text) and text != "-" and text.lower() not in _YAML_WORDS and not _numeric(text):
        return text
    return json.dumps(text, ensure_ascii=False)  # a JSON string is a YAML double-quoted scalar


def _numeric(text: str) -> bool:
    """Anything YAML 1.1 might read as a number (1e3, -1:20, .inf, 0x1F), to be quoted."""
    if re.match(r"^[-+.]*[0-9]", text):
        return True
    try:
        float(text)
    except ValueError:
        return text.lower().lstrip("+-") in (".inf", ".nan")
    return True


def _items(values: Sequence[str], indent: int) -> str:
    pad = " " * indent
    return "".join(f"{pad}- {scalar(v)}\n" for v in values)


def render(spec: JobSpec, command_line: str = DEFAULT_COMMAND, path: str = DEFAULT_OUTPUT) -> str:
    """The TrainJob as YAML text with comments; `command_line` wrote it into `path` (both shown in
    its header). The checked-in file is this with the defaults."""
    m = spec.mount_path.rstrip("/") or "/"
    g = spec.gpus_per_node
    efa_on = spec.efa > 0
    efa_limit = (f"        vpc.amazonaws.com/efa: {spec.efa}  # EFA interfaces per node (EFA device plugin)\n" if efa_on else
                 "        # EFA (AWS): interfaces per node from the EFA device plugin (the g6e.8xlarge walkthrough\n"
                 "        # in docs/clusters.md asks for 8; p5.48xlarge has 32); make_trainjob.py --efa N sets it:\n"
                 "        # vpc.amazonaws.com/efa: 8\n")
    efa_env = ("      - name: FI_PROVIDER  # libfabric's EFA provider (the image needs libfabric and aws-ofi-nccl)\n"
               "        value: efa\n") if efa_on else (
               "      # EFA (AWS), with vpc.amazonaws.com/efa above; the image needs libfabric and aws-ofi-nccl:\n"
               "      # - name: FI_PROVIDER\n"
               "      #   value: efa\n")
    env_options = (
        "      # - name: FI_EFA_USE_DEVICE_RDMA  # GPUDirect RDMA over EFA, on instances that have it (p4d, p5)\n"
        "      #   value: \"1\"\n"
        "      # - name: NCCL_SOCKET_IFNAME  # interfaces NCCL may use for its sockets (^ excludes)\n"
        "      #   value: \"^docker0,lo\"\n"
        "      # - name: NCCL_IB_DISABLE  # clusters without InfiniBand or EFA: TCP sockets only\n"
        "      #   value: \"1\"\n")
    return f"""\
# koen-sllm pretraining on Kubernetes with Kubeflow Trainer (TrainJob, trainer.kubeflow.org/v1alpha1):
# {spec.nodes} node(s) x {g} GPU(s) = {spec.world_size} training processes.
#
# Written by scripts/make_trainjob.py (python scripts/make_trainjob.py --help); other nodes, GPUs,
# image, volume or trainer options: run it again rather than editing this file. This one came from
#   {command_line}
#
#   kubectl apply -f deploy/kubeflow/pvc.yaml   # once: the shared volume (datasets/, outputs/, logs/)
#   kubectl apply -f {path}
#   kubectl logs -f -l jobset.sigs.k8s.io/jobset-name={spec.name},batch.kubernetes.io/job-completion-index=0
#
# Steps, EFA/NCCL settings and resuming: docs/clusters.md, "Kubeflow Trainer (TrainJob)".
apiVersion: trainer.kubeflow.org/v1alpha1
kind: TrainJob
metadata:
  name: {spec.name}
spec:
  runtimeRef:
    # Installed with Kubeflow Trainer's runtimes. Its torch policy gives each node's container
    # PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK, PET_MASTER_ADDR and PET_MASTER_PORT, which
    # torchrun reads as --nnodes, --nproc-per-node, --node-rank, --master-addr, --master-port.
    name: {RUNTIME}
  trainer:
    # The project's image, built from docker/Dockerfile and pushed to a registry the cluster can
    # pull from. A placeholder: put your image here (or --image).
    image: {scalar(spec.image)}
    numNodes: {spec.nodes}  # nodes (pods): --nodes
    numProcPerNode: {g}  # training processes per node, one per GPU: --gpus-per-node
    resourcesPerNode:
      limits:
        nvidia.com/gpu: {g}  # GPUs per node, equal to numProcPerNode
{efa_limit}\
    # Replaces the image's entrypoint (the one-host launcher): torchrun takes the node count, the
    # node's rank and the rendezvous address from the PET_* variables above.
    command:
      - torchrun
      - {IMAGE_REPO_DIR}/{TRAINER_SCRIPT}
    # Trainer options (python scripts/train_h100_dual.py --help). The data, the checkpoints with
    # run.json (written by rank 0) and the logs are on the shared volume, so a restarted pod
    # resumes (--resume auto) from the latest checkpoint with the recorded settings.
    args:
{_items(spec.trainer_args(), 6)}\
    env:
      - name: KOEN_CONSOLE_LOG  # rank 0 also writes its console lines here
        value: {scalar(m + '/logs/training_console.log')}
      - name: TORCH_ELASTIC_SHUTDOWN_TIMEOUT  # seconds torchrun lets the workers save after SIGTERM (recent torch)
        value: "{SHUTDOWN_TIMEOUT_S}"
      - name: TORCH_NCCL_ASYNC_ERROR_HANDLING  # a failed collective ends the pod instead of hanging
        value: "1"
      - name: NCCL_DEBUG  # INFO shows the transport NCCL picked (EFA or sockets)
        value: WARN
{efa_env}\
{env_options}\
  runtimePatches:
    # The shared volume and a larger /dev/shm (NCCL between the GPUs of a node), patched into the
    # runtime's "{RUNTIME_JOB}" job and its "{RUNTIME_CONTAINER}" container.
    - manager: {PATCH_MANAGER}
      trainingRuntimeSpec:
        template:
          spec:
            replicatedJobs:
              - name: {RUNTIME_JOB}
                template:
                  spec:
                    template:
                      spec:
                        # Time to save a checkpoint when a pod is deleted or evicted.
                        terminationGracePeriodSeconds: {GRACE_PERIOD_S}
                        # The image runs as uid {IMAGE_UID}; volumes that support it are made writable by
                        # its group (on NFS/EFS, give the export or access point that uid instead).
                        securityContext:
                          fsGroup: {IMAGE_UID}
                          fsGroupChangePolicy: OnRootMismatch
                        volumes:
                          - name: koen-data
                            persistentVolumeClaim:
                              claimName: {spec.pvc}  # --pvc; ReadWriteMany when numNodes > 1
                          - name: dshm
                            emptyDir:
                              medium: Memory
                        containers:
                          - name: {RUNTIME_CONTAINER}
                            volumeMounts:
                              - name: koen-data
                                mountPath: {scalar(m)}
                              - name: dshm
                                mountPath: /dev/shm
"""


# ---------------------------------------------------------------- command line


def parse_command_line(argv: Sequence[str]) -> tuple[JobSpec, Optional[str], bool]:
    """(spec, output file or None, help wanted). Raises UsageError."""
    argv = list(argv)
    trainer: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, trainer = argv[:cut], argv[cut + 1:]
    values: dict[str, str] = {}
    output = None
    names = {"--nodes": "nodes", "--gpus-per-node": "gpus_per_node", "--image": "image", "--pvc": "pvc",
             "--name": "name", "--mount-path": "mount_path", "--efa": "efa", "-o": "output", "--output": "output"}
    i = 0
    while i < len(argv):
        word = argv[i]
        if word in ("-h", "--help"):
            return JobSpec(), None, True
        opt, eq, inline = word.partition("=")
        if opt not in names or (eq and not opt.startswith("--")):
            raise UsageError(f"unknown option {word!r} (see --help; trainer options go after --)")
        if eq:
            value = inline
        elif i + 1 < len(argv):
            i += 1
            value = argv[i]
        else:
            raise UsageError(f"{opt} needs a value")
        if names[opt] == "output":
            output = value
        else:
            values[names[opt]] = value
        i += 1
    spec = JobSpec(trainer_options=trainer)
    if "nodes" in values:
        spec.nodes = _count("--nodes", values["nodes"], 1, "nodes to train on")
    if "gpus_per_node" in values:
        spec.gpus_per_node = _count("--gpus-per-node", values["gpus_per_node"], 1, "GPUs, i.e. processes, per node")
    if "efa" in values:
        spec.efa = _count("--efa", values["efa"], 0, "EFA interfaces per node; 0 = no EFA")
    for key in ("image", "pvc", "name", "mount_path"):
        if key in values:
            setattr(spec, key, values[key])
    return spec, output, False


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        spec, output, wants_help = parse_command_line(argv)
        if wants_help:
            print(USAGE, end="")
            return 0
        check_spec(spec)
    except (UsageError, ConfigError) as exc:
        print(f"❌ 옵션 오류 / {exc}", file=sys.stderr)
        return 2
    if spec == JobSpec() and output in (None, "-", DEFAULT_OUTPUT):
        text = render(spec)  # the checked-in file, byte for byte
    else:
        text = render(spec, shlex.join(["python", "scripts/make_trainjob.py", *argv]),
                      output if output not in (None, "-") else "FILE")
    if output in (None, "-"):
        sys.stdout.write(text)
        return 0
    try:
        Path(output).write_text(text, encoding="utf-8")
    except OSError as exc:
        print(f"❌ 파일을 쓸 수 없습니다 / cannot write {output}: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {output}: TrainJob {spec.name}, {spec.nodes} node(s) x {spec.gpus_per_node} GPU(s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
