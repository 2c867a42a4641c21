"""Shard training over processes with PyTorch FSDP2: launch, measure, checkpoint, resume, plan a cluster.

The training itself lives in ``lowmem_course.shard_train``, the script ``torchrun`` starts on every
rank. This module is what a notebook calls around it:

* ``torchrun_command`` / ``launch``: start the script on N local processes (or print the multi-node
  command), with a timeout, and turn a dead rank into a one-line ``RankFailed`` naming its exit code;
* ``zero_state_bytes``: the ZeRO paper's per-rank bytes of parameters, gradients and optimizer state;
* ``check_checkpoint`` / ``load_resharded``: find the last complete DCP checkpoint of a model, and load
  a checkpoint saved by N ranks into one unsharded model (DCP reshards on load);
* ``gpus_needed``: how many GPUs of a given size the estimator says a family member needs.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
from transformers import PretrainedConfig

from lowmem_course import family
from lowmem_course.estimate import Setup, estimate
from lowmem_course.shard_train import latest_checkpoint

SCRIPT = "lowmem_course.shard_train"


class RankFailed(RuntimeError):
    """A rank of a ``torchrun`` job died; ``rank`` and ``exit_code`` say which and how (-9: SIGKILL)."""

    def __init__(self, rank: int | None, exit_code: int | None, reason: str) -> None:
        self.rank, self.exit_code = rank, exit_code
        super().__init__(reason)


def torchrun_command(script_args: list[str], nproc_per_node: int = 2, nnodes: int = 1, node_rank: int = 0,
                     rdzv_endpoint: str | None = None) -> list[str]:
    """The command that starts ``shard_train`` with ``script_args`` on ``nproc_per_node`` processes per node.

    One node: ``--standalone`` (torchrun picks a free port, so concurrent jobs never collide). Several
    nodes: run the same command on every node with its own ``node_rank`` and the shared
    ``rdzv_endpoint`` ("host:port" of node 0); the script itself is unchanged.
    """
    if nproc_per_node < 1 or nnodes < 1 or not 0 <= node_rank < nnodes:
        raise ValueError(f"need nproc_per_node >= 1, nnodes >= 1 and 0 <= node_rank < nnodes, got "
                         f"{nproc_per_node}, {nnodes}, {node_rank}")
    rendezvous = ["--standalone"]
    if nnodes > 1:
        if not rdzv_endpoint or ":" not in rdzv_endpoint:
            raise ValueError(f"{nnodes} nodes need rdzv_endpoint='host:port' of node 0, got {rdzv_endpoint!r}")
        rendezvous = ["--nnodes", str(nnodes), "--node-rank", str(node_rank), "--rdzv-endpoint", rdzv_endpoint]
    return [sys.executable, "-m", "torch.distributed.run", *rendezvous, "--nproc-per-node", str(nproc_per_node),
            "-m", SCRIPT, *script_args]


def error_records(log_dir: Path) -> dict[int, str]:
    """The error of each rank that recorded one in a torchrun log folder, by rank (one line each).

    A rank whose main is wrapped in torch's ``@record`` (``shard_train.main`` is) writes its uncaught
    exception to ``<log_dir>/<run>/attempt_<n>/<local rank>/error.json``; a rank killed by a signal
    writes nothing. Local rank is the rank here: ``launch`` runs one node.
    """
    records = {}
    for path in sorted(Path(log_dir).glob("*/attempt_*/*/error.json")):
        try:
            message = json.loads(path.read_text())["message"]["message"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        records[int(path.parent.name)] = next(iter(str(message).strip().splitlines()), "")
    return records


_RANK_EXIT = r"rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)"  # one failure in torchrun's summary


def _lost_its_peer(rank: int, stderr: str, records: dict[int, str] | None) -> bool:
    """True when ``rank``'s error (its record, or what it printed) is gloo's "... by peer": a rank whose
    peer died, not the rank that died first."""
    said = (records or {}).get(rank, "") + "\n".join(re.findall(rf"^\[rank{rank}\]: (.+)$", stderr, re.MULTILINE))
    return "by peer" in said


def _failure(stderr: str, returncode: int, records: dict[int, str] | None = None) -> RankFailed:
    """The ``RankFailed`` for a torchrun job that exited with ``returncode``.

    torchrun's summary in ``stderr`` names the root-cause rank and its exit code (negative: killed by
    a signal): the first failure it observed. A rank that torchrun itself stopped (SIGTERM) is not the
    cause when another rank failed: a rank whose peer was killed can record its error ("connection
    closed by peer") before torchrun notices the kill, and torchrun may even name that rank, killed
    after the failure, as the root cause: a rank whose error is "... by peer" is passed over for a
    failed rank whose error is not. Why it died: that rank's error record
    (``error_records``) when it wrote one, else the last exception it printed (or an argument error,
    printed before ranks exist; never another rank's exception for a rank killed by a signal).
    """
    summary = stderr[stderr.find("Root Cause"):] if "Root Cause" in stderr else stderr
    match = re.search(_RANK_EXIT, summary, re.DOTALL)
    if not match:
        return RankFailed(None, None, f"torchrun exited {returncode}: {stderr.strip()[-300:]}")
    rank, code = int(match.group(1)), int(match.group(2))
    failed = [(int(r), int(c)) for r, c in re.findall(_RANK_EXIT, stderr, re.DOTALL)]
    if code == -signal.SIGTERM:  # stopped by torchrun after another rank failed: that one is the cause
        others = [(r, c) for r, c in failed if c != code]
        rank, code = others[0] if others else (rank, code)
    if _lost_its_peer(rank, stderr, records):  # its peer's death broke its collective: the peer is the cause
        others = [(r, c) for r, c in failed if r != rank and not _lost_its_peer(r, stderr, records)]
        rank, code = others[0] if others else (rank, code)
    how = f" ({signal.Signals(-code).name})" if -code in {s.value for s in signal.Signals} else ""
    printed = (re.findall(rf"^\[rank{rank}\]: (\w+(?:Error|Exception): .+)$", stderr, re.MULTILINE)
               or (code >= 0 and re.findall(r"^(\w+(?:Error|Exception): .+|[\w.]+: error: .+)$", stderr, re.MULTILINE))
               or re.findall(r"^(?:\[rank\d+\]: )?\s*(terminate called .+|what\(\): .+)$", stderr, re.MULTILINE))
    error = (records or {}).get(rank) or (printed[-1] if printed else "")
    why = f": {error}" if error else ""
    return RankFailed(rank, code, f"rank {rank} died with exit code {code}{how}{why} (torchrun exited {returncode})")


def launch(script_args: list[str], nproc: int = 2, timeout_s: float = 120.0) -> str:
    """Run ``shard_train`` on ``nproc`` local processes and wait; returns torchrun's stdout.

    Raises ``RankFailed`` (rank, exit code and the rank's error) when a rank dies, and ``TimeoutError``
    after ``timeout_s`` seconds, having killed the whole job (no hung collective outlives the call).
    """
    with tempfile.TemporaryDirectory(prefix="lowmem-torchrun-") as logs:
        env = {**os.environ, "PYTHONWARNINGS": "ignore", "PET_LOG_DIR": logs}  # torchrun --log-dir: the error records
        with subprocess.Popen(torchrun_command(script_args, nproc), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env, start_new_session=True) as proc:
            try:
                stdout, stderr = proc.communicate(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
                raise TimeoutError(
                    f"torchrun with {nproc} ranks did not finish in {timeout_s:g} s: killed it") from None
        if proc.returncode != 0:
            raise _failure(stderr, proc.returncode, error_records(Path(logs)))
    return stdout


def zero_state_bytes(n_params: int, world_size: int, stage: int, param_bytes: int = 4,
                     optimizer_bytes: int = 8) -> dict[str, float]:
    """Per-rank bytes of parameters, gradients and optimizer state under ZeRO ``stage`` (0-3).

    The ZeRO paper's formulas (Rajbhandari et al., 2020) for ``n_params`` parameters of ``param_bytes``
    bytes with gradients of the same size and ``optimizer_bytes`` of optimizer state per parameter
    (8 for fp32 AdamW): stage 1 divides the optimizer state by ``world_size``, stage 2 also the
    gradients, stage 3 also the parameters.
    """
    if stage not in (0, 1, 2, 3) or world_size < 1 or n_params < 0:
        raise ValueError(f"need stage in 0-3, world_size >= 1, n_params >= 0; got {stage}, {world_size}, {n_params}")
    share = [1 / world_size if stage >= s else 1.0 for s in (3, 2, 1)]
    return {"parameters": n_params * param_bytes * share[0], "gradients": n_params * param_bytes * share[1],
            "optimizer": n_params * optimizer_bytes * share[2]}


def check_checkpoint(ckpt_dir: str | Path, cfg: PretrainedConfig) -> tuple[Path, int]:
    """The newest complete checkpoint of ``cfg``'s model in ``ckpt_dir`` and the step it was saved at.

    Raises ``FileNotFoundError`` for a missing or empty directory and ``ValueError`` for a checkpoint
    of another model, before any process is started.
    """
    return latest_checkpoint(Path(ckpt_dir), cfg)


def load_resharded(ckpt_dir: str | Path, cfg: PretrainedConfig) -> torch.nn.Module:
    """One unsharded model on this process, loaded from the last checkpoint that N ranks saved.

    DCP stores each rank's shards with their global offsets, so any number of processes can load
    it; here one process without a process group reads every shard.
    """
    path, _ = check_checkpoint(ckpt_dir, cfg)
    model = family.build(cfg, seed=None)
    state = {"model": get_model_state_dict(model)}
    with warnings.catch_warnings():  # DCP warns that no process group exists: one process is the point here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(path), no_dist=True)
    set_model_state_dict(model, state["model"])
    return model


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The full weights a run wrote with ``--final`` (a safetensors file), by parameter name."""
    return load_file(str(path))


def gpus_needed(name: str, mode: str, gpu_bytes: int, max_gpus: int = 4096) -> int | None:
    """Fewest GPUs of ``gpu_bytes`` each (a power of two) on which the estimator fits ``mode`` of ``name``.

    ``mode`` is one of the estimator's modes ("full", "lora", "qlora", "inference"); several GPUs
    shard ZeRO-3 style. Training uses bf16 mixed precision, AdamW and full activation checkpointing,
    inference bf16 weights; batch 1, sequence 1,024. None when even ``max_gpus`` are not enough.
    """
    gpus = 1
    while gpus <= max_gpus:
        setup = Setup(mode=mode, precision="bf16" if mode == "inference" else "bf16-mixed", batch=1, seq=1024,
                      checkpointing="none" if mode == "inference" else "full", gpus=gpus, zero=3 if gpus > 1 else 0)
        if estimate(name, setup).bytes["total"] <= gpu_bytes:
            return gpus
        gpus *= 2
    return None
