"""Exact resume and fault tolerance, through the real entry point: a run stopped at any step (by --max-steps, a
signal, or SIGKILL in the middle of a save) and resumed, on the same or another number of processes, continues
with the losses and weights of a run that never stopped."""

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO_ROOT, run_train, write_tokenized_samples
from safetensors.torch import load_file

import checkpoint
from checkpoint import save_due

# 20 samples in batches of 3: 7 steps an epoch (the last one of 2 samples), 14 steps in 2 epochs.
NUM_STEPS = 14
STEPS_PER_EPOCH = 7


@pytest.fixture(scope="module")
def data_path(tmp_path_factory, tiny_tokenizer):
    return write_tokenized_samples(tmp_path_factory.mktemp("data") / "data.jsonl", tiny_tokenizer, num_samples=20)


def args(data_path, model_dir, output_dir, *extra) -> list[str]:
    return ["--data-path", str(data_path), "--model-name-or-path", str(model_dir), "--output-dir", str(output_dir),
            "--batch-size", "3", "--max-tokens-per-gpu", "48", "--num-epochs", "2", "--learning-rate", "3e-3",
            "--num-warmup-steps", "2", "--lr-scheduler", "cosine", "--seed", "7", *extra]


def losses_by_step(output_dir) -> dict[int, float]:
    """A resumed run appends to the metrics: the last line of each step is the one that counts."""
    return {m["step"]: m["loss"] for m in map(json.loads, open(output_dir / "training_metrics.jsonl"))}


def final_weights(output_dir) -> dict[str, torch.Tensor]:
    return load_file(output_dir / "hf_format" / "samples_40" / "model.safetensors")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir, data_path):
    """Uninterrupted runs, by number of processes, computed once when first asked for."""
    runs = {}

    def get(nproc: int):
        if nproc not in runs:
            output_dir = tmp_path_factory.mktemp(f"reference_{nproc}")
            # --resume with nothing to resume from says so and starts fresh.
            result = run_train(args(data_path, tiny_model_dir, output_dir, "--resume"), nproc=nproc)
            assert "no complete state" in result.stdout and "starting fresh" in result.stdout
            runs[nproc] = losses_by_step(output_dir), final_weights(output_dir)
            assert sorted(runs[nproc][0]) == list(range(1, NUM_STEPS + 1))
        return runs[nproc]

    return get


def assert_same_run(output_dir, expected, rtol: float = 0.0, weights_rtol: float = 0.0):
    """Same per-step losses, and the same final weights tensor by tensor (norm of the difference)."""
    expected_losses, expected_weights = expected
    losses = losses_by_step(output_dir)
    assert sorted(losses) == sorted(expected_losses)
    for step, loss in losses.items():
        assert loss == pytest.approx(expected_losses[step], rel=rtol, abs=0), step
    for name, weight in final_weights(output_dir).items():
        assert (weight - expected_weights[name]).norm() <= weights_rtol * expected_weights[name].norm(), name


def test_stop_at_max_steps_and_resume_is_exact(tmp_path, tiny_model_dir, data_path, reference):
    """Stopped at the last step of the first epoch, resumed into the second: identical in fp32 on CPU."""
    output_dir = tmp_path / "run"
    run_train(args(data_path, tiny_model_dir, output_dir, "--max-steps", str(STEPS_PER_EPOCH)))
    state = output_dir / "state" / f"step_{STEPS_PER_EPOCH}"
    assert {p.name for p in state.iterdir()} == {".metadata", "__0_0.distcp", "trainer_state.json",
                                                   "rng_rank_0.pt", "COMPLETE"}
    trainer_state = json.loads((state / "trainer_state.json").read_text())
    assert trainer_state["progress"] == {"step": 7, "epoch": 0, "batch_index": 7, "samples_seen": 20,
                                         "bad_steps": 0, "bad_steps_in_a_row": 0,
                                         "samples_at_last_checkpoint": 0, "samples_at_last_state": 0}
    assert trainer_state["run_params"]["total_steps"] == NUM_STEPS  # --max-steps does not shorten the schedule
    result = run_train(args(data_path, tiny_model_dir, output_dir, "--resume", "--save-state-every-samples", "3"))
    assert f"resumed from {state}: step 7, epoch 0" in result.stdout
    assert_same_run(output_dir, reference(1))
    # A state each 3 samples, the newest 2 kept.
    assert [p.name for p in checkpoint.complete_states(output_dir)] == ["step_13", "step_14"]


def run_until_signal(command: list[str], output_dir, signum=signal.SIGTERM) -> tuple[int, str]:
    """Starts train.py, sends `signum` once the first step is logged, and waits for it to exit."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    metrics = output_dir / "training_metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and metrics.stat().st_size > 0):
        assert process.poll() is None and time.time() < deadline, process.communicate()[0][-3000:]
        time.sleep(0.005)
    process.send_signal(signum)
    output = process.communicate(timeout=300)[0]
    return process.returncode, output


@pytest.mark.parametrize("nproc", [1, 2])
def test_sigterm_saves_a_state_and_resume_is_exact(tmp_path, tiny_model_dir, data_path, reference, nproc):
    """SIGTERM to the python process, or to torchrun (which forwards it to every rank)."""
    output_dir = tmp_path / "run"
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    f"--nproc-per-node={nproc}"]
    returncode, output = run_until_signal([*launcher, str(REPO_ROOT / "train.py"),
                                           *args(data_path, tiny_model_dir, output_dir)], output_dir)
    if nproc == 1:
        assert returncode == 0, output[-3000:]
    else:  # torchrun exits non-zero for the signal it got itself, but would name a worker that failed
        assert "exitcode" not in output and "ChildFailedError" not in output, output[-3000:]
    assert "received SIGTERM: stopping after step" in output, output[-3000:]
    [state] = checkpoint.complete_states(output_dir)
    stopped_at = checkpoint.state_step(state)
    assert 1 <= stopped_at < NUM_STEPS
    assert not (output_dir / "hf_format").exists()  # preemption saves the state only, the fast part
    run_train(args(data_path, tiny_model_dir, output_dir, "--resume"), nproc=nproc)
    assert_same_run(output_dir, reference(nproc))


@pytest.mark.parametrize(("saved_with", "resumed_with"), [(2, 1), (1, 2)])
def test_resume_on_another_number_of_processes(tmp_path, tiny_model_dir, data_path, reference, saved_with,
                                               resumed_with):
    """DCP reshards weights and Adam's moments; the data order is the same on any number of ranks."""
    output_dir = tmp_path / "run"
    run_train(args(data_path, tiny_model_dir, output_dir, "--max-steps", "4"), nproc=saved_with)
    result = run_train(args(data_path, tiny_model_dir, output_dir, "--resume"), nproc=resumed_with)
    assert "resuming with a changed setting" not in result.stdout  # world size is not a setting of the run
    # Weights within 1e-4: the k_proj biases get no gradient but rounding, which Adam scales up to full steps in a
    # direction that depends on the reduction order (see test_train_equivalence.assert_same_weights).
    assert_same_run(output_dir, reference(resumed_with), rtol=1e-5, weights_rtol=1e-4)


def test_sigkill_during_a_save_leaves_the_previous_state(tmp_path, tiny_model_dir, data_path, reference):
    output_dir = tmp_path / "run"
    # A state each 2 steps; rank 0 is SIGKILLed in the save of step 6, after its shards, before the marker.
    result = run_train(args(data_path, tiny_model_dir, output_dir, "--save-state-every-samples", "6"), check=False,
                       env={"MINI_TRAINER_TEST_KILL_IN_SAVE": "6"})
    assert result.returncode == -signal.SIGKILL
    assert (output_dir / "state" / ".step_6.tmp" / "__0_0.distcp").exists()
    assert [p.name for p in checkpoint.complete_states(output_dir)] == ["step_2", "step_4"]
    result = run_train(args(data_path, tiny_model_dir, output_dir, "--resume"))
    assert f"resumed from {output_dir / 'state' / 'step_4'}" in result.stdout
    assert_same_run(output_dir, reference(1))
    assert not list((output_dir / "state").glob(".*.tmp"))  # the next good save cleaned it up


@pytest.fixture(scope="module")
def two_step_run(tmp_path_factory, tiny_model_dir, data_path):
    output_dir = tmp_path_factory.mktemp("two_steps") / "run"
    run_train(args(data_path, tiny_model_dir, output_dir, "--max-steps", "2"))
    return output_dir


def test_changed_data_order_refuses_unless_forced(tmp_path, tiny_model_dir, data_path, tiny_tokenizer, two_step_run):
    output_dir = tmp_path / "run"
    shutil.copytree(two_step_run, output_dir)
    result = run_train(args(data_path, tiny_model_dir, output_dir, "--resume", "--batch-size", "4", "--seed", "8"),
                       check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "the data order would change (batch_size: 3 -> 4; seed: 7 -> 8)" in result.stderr
    assert "--force-resume" in result.stderr
    other_data = write_tokenized_samples(tmp_path / "other.jsonl", tiny_tokenizer, num_samples=20, seed=1)
    result = run_train(args(other_data, tiny_model_dir, output_dir, "--resume"), check=False)
    assert result.returncode != 0 and "data_fingerprint" in result.stderr
    result = run_train(args(data_path, tiny_model_dir, output_dir, "--resume", "--batch-size", "4",
                            "--learning-rate", "1e-3", "--max-steps", "3", "--force-resume"))
    assert "resuming with a changed setting: batch_size: 3 -> 4" in result.stdout
    assert "resuming with a changed setting: learning_rate: 0.003 -> 0.001" in result.stdout
    assert sorted(losses_by_step(output_dir)) == [1, 2, 3]


def test_resume_with_new_hyperparameters_applies_them_from_the_next_step(tmp_path, tiny_model_dir, data_path,
                                                                         two_step_run):
    """Step 3 from the same state, with the saved settings and with a new peak LR and weight decay: AdamW's step
    is w * (1 - lr * wd) - lr * direction, and the direction (gradient, moments) is the same in both, so the new
    run's weights follow from the old run's. A new --max-grad-norm changes the step too."""
    runs = {}
    for name, extra in {"same": [], "new_lr_wd": ["--learning-rate", "6e-3", "--weight-decay", "0.1"],
                        "new_clip": ["--max-grad-norm", "1e-4"]}.items():
        output_dir = tmp_path / name
        shutil.copytree(two_step_run, output_dir)
        result = run_train(args(data_path, tiny_model_dir, output_dir, "--resume", "--max-steps", "3", *extra))
        metrics = {m["step"]: m for m in map(json.loads, open(output_dir / "training_metrics.jsonl"))}
        runs[name] = result.stdout, metrics[3], load_file(output_dir / "hf_format" / "samples_9" / "model.safetensors")
    before = load_file(two_step_run / "hf_format" / "samples_6" / "model.safetensors")
    (_, same, same_weights), (stdout, new, new_weights) = runs["same"], runs["new_lr_wd"]
    assert "learning_rate: 0.003 -> 0.006 (applies from the next step)" in stdout
    assert "weight_decay: 0.0 -> 0.1 (applies from the next step)" in stdout
    assert new["lr"] == pytest.approx(2 * same["lr"]) and same["lr"] > 0
    assert new["loss"] == same["loss"]  # step 3's forward runs on the step-2 weights of the state
    for name, w in before.items():
        expected = w * (1 - new["lr"] * 0.1) + (new["lr"] / same["lr"]) * (same_weights[name] - w)
        assert (new_weights[name] - expected).norm() <= 1e-4 * (new_weights[name] - w).norm() + 1e-9, name
    clip_stdout, clipped, clipped_weights = runs["new_clip"]
    assert "max_grad_norm: 1.0 -> 0.0001 (applies from the next step)" in clip_stdout
    assert clipped["grad_norm"] == pytest.approx(same["grad_norm"], rel=1e-6)  # the norm is logged before clipping
    assert any((clipped_weights[name] - same_weights[name]).norm() > 1e-2 * (same_weights[name] - w).norm()
               for name, w in before.items())


def test_existing_output_is_resumed_or_overwritten_never_silently(tmp_path, tiny_model_dir, data_path, two_step_run):
    output_dir = tmp_path / "run"
    shutil.copytree(two_step_run, output_dir)
    result = run_train(args(data_path, tiny_model_dir, output_dir, "--max-steps", "1"), check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "already holds a run" in result.stderr and "--resume" in result.stderr and "--overwrite" in result.stderr
    assert sorted(losses_by_step(output_dir)) == [1, 2]
    result = run_train(args(data_path, tiny_model_dir, output_dir, "--max-steps", "1", "--overwrite"))
    assert "--overwrite: deleting" in result.stdout
    assert sorted(losses_by_step(output_dir)) == [1]
    assert [p.name for p in checkpoint.complete_states(output_dir)] == ["step_1"]
    assert sorted(p.name for p in (output_dir / "hf_format").iterdir()) == ["samples_3"]


def limit_file_size(max_bytes: int):
    """Writes past `max_bytes` fail with EFBIG, like a full disk (Python ignores SIGXFSZ)."""
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))


def test_failed_saves_keep_earlier_checkpoints_and_are_reported(tmp_path, tiny_model_dir, data_path, two_step_run):
    output_dir = tmp_path / "run"
    shutil.copytree(two_step_run, output_dir)
    hf_size = (output_dir / "hf_format" / "samples_6" / "model.safetensors").stat().st_size
    state_size = (output_dir / "state" / "step_2" / "__0_0.distcp").stat().st_size
    assert state_size > 2 * hf_size
    # Room for a Hugging Face checkpoint, not for a state (weights and Adam's two moments).
    result = run_train(args(data_path, tiny_model_dir, output_dir, "--resume", "--max-steps", "4",
                            "--save-state-every-samples", "3"), check=False,
                       preexec_fn=limit_file_size((hf_size + state_size) // 2))
    assert result.returncode == 1
    assert f"could not save the training state {output_dir / 'state' / 'step_3'}: rank 0:" in result.stderr
    assert "the final save failed" in result.stderr and "Traceback" not in result.stderr
    assert sorted(losses_by_step(output_dir)) == [1, 2, 3, 4]  # training went on after the failed save
    assert sorted(p.name for p in (output_dir / "hf_format").iterdir()) == ["samples_12", "samples_6"]
    assert [p.name for p in checkpoint.complete_states(output_dir)] == ["step_2"]
    assert sorted(p.name for p in (output_dir / "state").iterdir()) == ["step_2"]  # no half-written folder
    assert checkpoint.read_trainer_state(output_dir / "state" / "step_2")["progress"]["step"] == 2


def test_non_finite_steps_are_skipped_and_counted(tmp_path, tiny_model_dir, data_path):
    output_dir = tmp_path / "run"
    result = run_train(args(data_path, tiny_model_dir, output_dir, "--max-steps", "5", "--max-bad-steps", "2"),
                       env={"MINI_TRAINER_TEST_NAN_STEPS": "2,3"})
    assert "step 2: non-finite loss nan" in result.stdout
    metrics = [json.loads(line) for line in open(output_dir / "training_metrics.jsonl")]
    assert [m["skipped"] for m in metrics] == [False, True, True, False, False]
    assert [m["bad_steps"] for m in metrics] == [0, 1, 2, 2, 2]
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics if not m["skipped"])
    # The scheduler skipped them too: steps 2, 3 and 4 share the LR of the second update.
    assert [m["lr"] for m in metrics] == pytest.approx([0.0, 1.5e-3, 1.5e-3, 1.5e-3, 3e-3])
    trainer_state = checkpoint.read_trainer_state(checkpoint.latest_state(output_dir))
    assert trainer_state["progress"]["bad_steps"] == 2


def test_too_many_non_finite_steps_in_a_row_stop_the_run(tmp_path, tiny_model_dir, data_path):
    output_dir = tmp_path / "run"
    result = run_train(args(data_path, tiny_model_dir, output_dir, "--max-bad-steps", "2",
                            "--min-samples-per-checkpoint", "3"), nproc=2, check=False,
                       env={"MINI_TRAINER_TEST_NAN_STEPS": "2,3,4,5"})
    assert result.returncode != 0
    assert "3 non-finite steps in a row (up to step 4), more than --max-bad-steps 2" in result.stderr
    assert f'File "{REPO_ROOT / "train.py"}"' not in result.stderr  # a clear message, no traceback of ours
    # Checkpoints and states were saved after each step up to the 3rd; the skipped steps left the weights as
    # they were, so nothing saved is corrupt.
    assert sorted(p.name for p in (output_dir / "hf_format").iterdir()) == ["samples_3", "samples_6", "samples_9"]
    assert [p.name for p in checkpoint.complete_states(output_dir)] == ["step_2", "step_3"]
    after_step_1 = load_file(output_dir / "hf_format" / "samples_3" / "model.safetensors")
    for samples in (6, 9):
        weights = load_file(output_dir / "hf_format" / f"samples_{samples}" / "model.safetensors")
        for name, weight in weights.items():
            assert torch.equal(weight, after_step_1[name]) and torch.isfinite(weight).all(), name


# The classes of bad line named by the issue go through the real entry point; the rarer ones are checked on
# read_tokenized_jsonl directly below, which the entry point calls.
BAD_LINES = {
    "malformed JSON": ('{"input_ids": [1, 2', "malformed JSON"),
    "mismatched lengths": ('{"input_ids": [1, 2, 3], "labels": [1, 2]}',
                           "'input_ids' and 'labels' must be lists of the same length"),
    "token id out of vocabulary": ('{"input_ids": [1, 999999], "labels": [1, 2]}', "token id out of the model's"),
    "label out of vocabulary": ('{"input_ids": [1, 2], "labels": [1, 999999]}', "label out of the model's"),
}
MORE_BAD_LINES = {
    "missing labels": ('{"input_ids": [1, 2, 3]}', "missing 'input_ids' or 'labels'"),
    "negative token id": ('{"input_ids": [1, -5], "labels": [1, 2]}', "token id out of the model's"),
    "not integers": ('{"input_ids": [1, "a"], "labels": [1, 2]}', "'input_ids' and 'labels' must hold integers"),
    "empty": ('{"input_ids": [], "labels": []}', "empty 'input_ids'"),
    "not an object": ('[1, 2]', "expected a JSON object"),
}


def with_bad_line(data_path, bad_line: str, output_path):
    """The good samples with `bad_line` as line 4."""
    good_lines = data_path.read_text().splitlines()
    output_path.write_text("\n".join([*good_lines[:3], bad_line, *good_lines[3:]]) + "\n")
    return output_path


@pytest.fixture(scope="module")
def bad_data_results(tmp_path_factory, tiny_model_dir, data_path):
    """train.py on each file, all at once to save time: {case: (data path, output dir, stderr)}."""
    root = tmp_path_factory.mktemp("bad_data")
    processes = {}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for index, (name, (line, _)) in enumerate(BAD_LINES.items()):
        path, output_dir = with_bad_line(data_path, line, root / f"bad_{index}.jsonl"), root / f"run_{index}"
        command = [sys.executable, str(REPO_ROOT / "train.py"), *args(path, tiny_model_dir, output_dir)]
        processes[name] = path, output_dir, subprocess.Popen(command, env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE,
                                                             stderr=subprocess.PIPE, text=True)
    return {name: (path, output_dir, process.communicate(timeout=300)[1])
            for name, (path, output_dir, process) in processes.items()}


@pytest.mark.parametrize("name", BAD_LINES)
def test_bad_data_line_is_a_clear_error_before_training(bad_data_results, name):
    path, output_dir, stderr = bad_data_results[name]
    assert f"error: {path}:4: {BAD_LINES[name][1]}" in stderr, stderr[-2000:]
    assert "Traceback" not in stderr
    assert not (output_dir / "training_metrics.jsonl").exists()


@pytest.mark.parametrize("name", MORE_BAD_LINES)
def test_more_bad_data_lines_name_their_line(tmp_path, data_path, name):
    import re

    from data import read_tokenized_jsonl
    from utils import InputError

    line, message = MORE_BAD_LINES[name]
    path = with_bad_line(data_path, line, tmp_path / "bad.jsonl")
    with pytest.raises(InputError, match=re.escape(f"{path}:4: {message}")):
        read_tokenized_jsonl(str(path), max_tokens_per_gpu=64, vocab_size=320)


# ----------------------------------------------------------------------------------------------------------------------
# The pure parts


def test_finding_and_pruning_states(tmp_path):
    for step in (1, 2, 10, 11):
        (tmp_path / "state" / f"step_{step}").mkdir(parents=True)
        if step != 11:
            (tmp_path / "state" / f"step_{step}" / checkpoint.MARKER).touch()
    (tmp_path / "state" / ".step_12.tmp").mkdir()
    assert [p.name for p in checkpoint.complete_states(tmp_path)] == ["step_1", "step_2", "step_10"]
    assert checkpoint.latest_state(tmp_path).name == "step_10"
    checkpoint.prune_states(tmp_path, keep_last=2)
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["step_10", "step_11", "step_2"]
    assert checkpoint.latest_state(tmp_path / "nothing_here") is None


def test_a_save_is_due_when_the_samples_since_the_last_one_reach_the_interval():
    saved_at, last = [], 0
    for seen in range(3, 61, 3):
        if save_due(seen, last, 10):
            saved_at.append(seen)
            last = seen
    assert saved_at == [12, 24, 36, 48, 60]
    assert not save_due(20, 0, None)


def test_changed_params_sorts_out_what_breaks_the_data_order():
    saved = {"batch_size": 8, "seed": 1, "data_fingerprint": "a", "learning_rate": 1e-3, "max_steps": 3,
             "world_size": 2}
    current = {**saved, "seed": 2, "learning_rate": 2e-3, "max_steps": None, "world_size": 1}
    assert checkpoint.changed_params(saved, current) == (["seed: 1 -> 2"], ["learning_rate: 0.001 -> 0.002"])
