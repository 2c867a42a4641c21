"""lowmem_course.shard and its torchrun script: real 2-rank FSDP2 runs on gloo, exact bytes, bitwise resume."""

import json
import math
import sys

import pytest
import torch

from lowmem_course import family, shard
from lowmem_course.estimate import Setup, estimate
from lowmem_course.shard_train import META_FILE, checkpoint_meta

MODEL = "r1-distill-qwen-1.5b"
CFG = family.tiny(MODEL)
STEPS, EVERY, KILL_AT = 6, 2, 5  # rank 1 dies after step 5: the last checkpoint is step 4


@pytest.fixture(scope="module")
def drill(tmp_path_factory):
    """One launch, as in the notebook: measure DDP and FSDP on 2 ranks, train uninterrupted (the reference),
    then train again with a checkpoint every 2 steps until rank 1 is SIGKILLed after step 5."""
    tmp = tmp_path_factory.mktemp("drill")
    with pytest.raises(shard.RankFailed) as failure:
        shard.launch(["--measure", "ddp,zero3", "--out", str(tmp / "bytes.json"), "--train-steps", str(STEPS),
                      "--reference", str(tmp / "reference.safetensors"), "--ckpt-dir", str(tmp / "ckpt"),
                      "--ckpt-every", str(EVERY), "--kill-rank", "1", "--kill-step", str(KILL_AT)],
                     nproc=2, timeout_s=240)
    return tmp, failure.value


@pytest.fixture(scope="module")
def reference(drill):
    tmp, _ = drill
    return json.loads((tmp / "bytes.json").read_text()), shard.read_weights(tmp / "reference.safetensors")


def by(results, strategy, rank):
    return next(r for r in results["results"] if r["strategy"] == strategy and r["rank"] == rank)


def test_unsharded_ranks_hold_every_byte(reference):
    results, _ = reference
    n = family.count_parameters(CFG).total
    n_tensors = sum(1 for _ in family.build(CFG, device="meta").parameters())
    for rank in (0, 1):
        state = by(results, "ddp", rank)["state"]
        assert state == {"parameters": 4 * n, "gradients": 4 * n, "optimizer": 8 * n + 4 * n_tensors}


def test_full_sharding_holds_one_padded_half_per_rank(reference):
    results, _ = reference
    model = family.build(CFG, device="meta")
    # FSDP2 shards dim 0 of every parameter, padded up to a multiple of the world size
    shard_numel = sum(math.ceil(p.shape[0] / 2) * p[0].numel() for p in model.parameters())
    n_tensors = sum(1 for _ in model.parameters())
    unsharded = sum(by(results, "ddp", 0)["state"].values())
    for rank in (0, 1):
        state = by(results, "zero3", rank)["state"]
        assert state == {"parameters": 4 * shard_numel, "gradients": 4 * shard_numel,
                         "optimizer": 8 * shard_numel + 4 * n_tensors}
        assert sum(state.values()) <= (1 / 2 + 0.05) * unsharded


def test_fsdp_trains_like_ddp(reference):
    results, _ = reference
    for rank in (0, 1):
        assert by(results, "zero3", rank)["losses"] == pytest.approx(by(results, "ddp", rank)["losses"], rel=1e-5)


def test_a_killed_rank_is_reported_then_training_resumes_bitwise(drill, reference):
    tmp, failure = drill
    _, uninterrupted = reference
    assert (failure.rank, failure.exit_code) == (1, -9)
    assert str(failure) == "rank 1 died with exit code -9 (SIGKILL) (torchrun exited 1)"
    ckpt = tmp / "ckpt"
    assert shard.check_checkpoint(ckpt, CFG)[1] == 4
    shard.launch(["--train-steps", str(STEPS), "--ckpt-dir", str(ckpt), "--ckpt-every", str(EVERY), "--resume",
                  "--final", str(tmp / "resumed.safetensors")], nproc=2, timeout_s=240)
    resumed = shard.read_weights(tmp / "resumed.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)
    # reshard on load: the 2-rank checkpoint of the last step, read by this single process
    single = shard.load_resharded(ckpt, CFG).state_dict()
    assert all(torch.equal(single[k], resumed[k]) for k in resumed)


def test_missing_or_foreign_checkpoints_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        shard.check_checkpoint(tmp_path / "nowhere", CFG)
    (tmp_path / "step_0002").mkdir()
    (tmp_path / "step_0002" / ".done").touch()
    (tmp_path / META_FILE).write_text(json.dumps(checkpoint_meta(family.tiny("r1"))))
    with pytest.raises(ValueError, match="checkpoint of another model"):
        shard.check_checkpoint(tmp_path, CFG)


def test_a_rank_error_reaches_the_caller(tmp_path):
    expected = r"rank 0 died with exit code 1: FileNotFoundError: checkpoint directory"
    with pytest.raises(shard.RankFailed, match=expected):
        shard.launch(["--train-steps", "2", "--ckpt-dir", str(tmp_path / "nowhere"), "--resume"], nproc=1,
                     timeout_s=240)


def test_a_hung_job_is_killed_at_the_timeout(tmp_path):
    with pytest.raises(TimeoutError, match=r"did not finish in 0\.5 s"):
        shard.launch(["--train-steps", "50", "--final", str(tmp_path / "never.safetensors")], nproc=2, timeout_s=0.5)


def test_torchrun_commands():
    assert shard.torchrun_command(["--train-steps", "3"]) == [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "lowmem_course.shard_train", "--train-steps", "3"]
    assert shard.torchrun_command([], nproc_per_node=8, nnodes=4, node_rank=3, rdzv_endpoint="node0:29500")[3:11] == [
        "--nnodes", "4", "--node-rank", "3", "--rdzv-endpoint", "node0:29500", "--nproc-per-node", "8"]
    with pytest.raises(ValueError, match="rdzv_endpoint"):
        shard.torchrun_command([], nnodes=2)
    with pytest.raises(ValueError, match="node_rank"):
        shard.torchrun_command([], nnodes=2, node_rank=2, rdzv_endpoint="h:1")


def test_zero_formulas():
    n = 1000
    assert shard.zero_state_bytes(n, 4, 0) == {"parameters": 4000, "gradients": 4000, "optimizer": 8000}
    assert shard.zero_state_bytes(n, 4, 1) == {"parameters": 4000, "gradients": 4000, "optimizer": 2000}
    assert shard.zero_state_bytes(n, 4, 2) == {"parameters": 4000, "gradients": 1000, "optimizer": 2000}
    assert shard.zero_state_bytes(n, 4, 3) == {"parameters": 1000, "gradients": 1000, "optimizer": 2000}
    with pytest.raises(ValueError):
        shard.zero_state_bytes(n, 4, 4)


def test_failure_report_names_rank_and_signal():
    stderr = "Root Cause (first observed failure):\n[0]:\n  rank      : 1 (local_rank: 1)\n  exitcode  : -9 (pid: 7)\n"
    err = shard._failure(stderr, 1)
    assert (err.rank, err.exit_code, str(err)) == (1, -9, "rank 1 died with exit code -9 (SIGKILL) (torchrun exited 1)")
    bad_args = ("usage: shard_train.py [-h]\nshard_train.py: error: unknown strategies ['zero4']\n"
                + stderr.replace("-9", "2"))
    assert str(shard._failure(bad_args, 1)) == ("rank 1 died with exit code 2: shard_train.py: error: unknown "
                                                "strategies ['zero4'] (torchrun exited 1)")
    assert str(shard._failure("no summary", 1)) == "torchrun exited 1: no summary"


def test_a_killed_rank_is_the_cause_even_when_its_peer_recorded_an_error_first():
    # rank 1 killed; rank 0's collective failed and recorded it before torchrun saw the kill, so torchrun's
    # "first observed failure" is rank 0, which torchrun then stopped with SIGTERM
    stderr = ("RuntimeError: [gloo] Connection closed by peer\nFailures:\n[1]:\n  rank      : 1 (local_rank: 1)\n"
              "  exitcode  : -9 (pid: 8)\nRoot Cause (first observed failure):\n[0]:\n  rank      : 0 (local_rank: 0)\n"
              "  exitcode  : -15 (pid: 7)\n")
    err = shard._failure(stderr, 1, {0: "RuntimeError: [gloo] Connection closed by peer"})
    assert (err.rank, err.exit_code, str(err)) == (1, -9, "rank 1 died with exit code -9 (SIGKILL) (torchrun exited 1)")
    alone = stderr[stderr.find("Root Cause"):]  # no other failure: the stopped rank is all there is to report
    assert shard._failure(alone, 1).rank == 0


def test_a_rank_that_lost_its_peer_is_not_the_cause_even_when_torchrun_killed_it():
    # seen in CI: torchrun named rank 0, killed (-9) after its collective broke, as the root cause
    stderr = ("Failures:\n[1]:\n  rank      : 1 (local_rank: 1)\n  exitcode  : -9 (pid: 8)\n"
              "Root Cause (first observed failure):\n[0]:\n  rank      : 0 (local_rank: 0)\n"
              "  exitcode  : -9 (pid: 7)\n")
    records = {0: "RuntimeError: [gloo] Read error: Connection reset by peer"}
    err = shard._failure(stderr, 1, records)
    assert (err.rank, err.exit_code, str(err)) == (1, -9, "rank 1 died with exit code -9 (SIGKILL) (torchrun exited 1)")


def total_bytes(name, mode, n):
    """The estimated peak of ``name`` in ``mode`` on ``n`` GPUs (ZeRO-3 when sharded)."""
    precision = "bf16" if mode == "inference" else "bf16-mixed"
    checkpointing = "none" if mode == "inference" else "full"
    return estimate(name, Setup(mode=mode, precision=precision, checkpointing=checkpointing, gpus=n,
                                zero=3 if n > 1 else 0)).bytes["total"]


def test_gpus_needed_is_the_smallest_power_of_two_that_fits():
    gpu = 80 * 10**9
    for name, mode in [("r1-distill-qwen-1.5b", "inference"), ("r1-distill-qwen-14b", "full"), ("r1", "inference")]:
        gpus = shard.gpus_needed(name, mode, gpu)
        assert total_bytes(name, mode, gpus) <= gpu
        assert gpus == 1 or total_bytes(name, mode, gpus // 2) > gpu
    assert shard.gpus_needed("r1", "full", gpu, max_gpus=2) is None


def test_a_ranks_error_record_says_why_it_died(tmp_path):
    folder = tmp_path / "run_abc" / "attempt_0" / "1"
    folder.mkdir(parents=True)
    (folder / "error.json").write_text(json.dumps({"message": {"message": "ValueError: bad shard\nmore detail",
                                                               "extraInfo": {"timestamp": "1"}}}))
    records = shard.error_records(tmp_path)
    assert records == {1: "ValueError: bad shard"}
    summary = "Root Cause (first observed failure):\n[0]:\n  rank      : 1 (local_rank: 1)\n  exitcode  : 1 (pid: 7)\n"
    printed = "[rank1]: RuntimeError: what the rank printed last\n" + summary
    assert str(shard._failure(printed, 1, records)) == (
        "rank 1 died with exit code 1: ValueError: bad shard (torchrun exited 1)")
    assert str(shard._failure(printed, 1)) == ("rank 1 died with exit code 1: RuntimeError: what the rank printed last "
                                               "(torchrun exited 1)")  # no record: what it printed
