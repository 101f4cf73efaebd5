"""What a run tells its user, through the real entry point: one clear line for an expected failure, a finished run
resumed, plain progress lines in a log file, the validation loss, the picture of the run, trackers, and the summary.

Two training runs carry most of the assertions: one rank with a quarter of the data held out (TensorBoard on), and
two ranks on the same split written as two files (a stand-in wandb, and a plot that cannot be written)."""

import importlib.util
import io
import json
import os
import resource
import shutil
import struct

import pytest
import torch
from conftest import REPO_ROOT, run_train, write_tokenized_samples
from transformers import AutoModelForCausalLM

from evaluation import evaluation_due, split_validation
from metrics import ProgressDisplay, read_metrics

# 24 samples, a quarter held out: 18 trained on in batches of 4 (4, 4, 4, 4, 2), 5 steps an epoch, 10 in 2 epochs.
# Samples seen after each step: 4 8 12 16 18 22 26 30 34 36; multiples of 8 are passed at steps 2, 4, 7 and 9,
# and the end evaluates too.
NUM_SAMPLES, SEED, SPLIT = 24, 7, 0.25
NUM_STEPS, EVAL_STEPS = 10, [2, 4, 7, 9, 10]

# Stands in for wandb: records each call, per process, into $FAKE_WANDB_LOG.
FAKE_WANDB = """
import json, os

def _record(**fields):
    with open(os.path.join(os.environ["FAKE_WANDB_LOG"], f"{os.getpid()}.jsonl"), "a") as f:
        f.write(json.dumps(fields) + "\\n")

class Run:
    def log(self, values, step):
        _record(call="log", values=values, step=step)

    def finish(self):
        _record(call="finish")

def init(**kwargs):
    _record(call="init", mode=kwargs.get("mode"), dir=kwargs.get("dir"))
    return Run()
"""


@pytest.fixture(scope="module")
def data_path(tmp_path_factory, tiny_tokenizer):
    return write_tokenized_samples(tmp_path_factory.mktemp("data") / "data.jsonl", tiny_tokenizer,
                                   num_samples=NUM_SAMPLES)


def args(data_path, model_dir, output_dir, *extra) -> list[str]:
    return ["--data-path", str(data_path), "--model-name-or-path", str(model_dir), "--output-dir", str(output_dir),
            "--batch-size", "4", "--max-tokens-per-gpu", "64", "--num-epochs", "2", "--learning-rate", "3e-3",
            "--num-warmup-steps", "2", "--seed", str(SEED), "--eval-every-samples", "8",
            "--min-samples-per-checkpoint", "20", *extra]


def with_python_path(folder) -> dict[str, str]:
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")]))}


@pytest.fixture(scope="module")
def split_run(tmp_path_factory, tiny_model_dir, data_path):
    """One rank, --validation-split, TensorBoard (a dev requirement); output captured as in a log file."""
    output_dir = tmp_path_factory.mktemp("split") / "run"
    tracker = "tensorboard" if importlib.util.find_spec("tensorboard") else "none"
    result = run_train(args(data_path, tiny_model_dir, output_dir, "--validation-split", str(SPLIT),
                            "--report-to", tracker))
    return output_dir, result


@pytest.fixture(scope="module")
def files_run(tmp_path_factory, tiny_model_dir, data_path):
    """Two ranks on the same split as two files: the training samples, in their order, and the held-out ones.
    A folder stands where the plot goes, so plotting fails; wandb is the stand-in, with no API key."""
    root = tmp_path_factory.mktemp("files")
    train_ids, held_out_ids = split_validation(NUM_SAMPLES, SPLIT, SEED)
    lines = data_path.read_text().splitlines()
    (root / "train.jsonl").write_text("".join(lines[i] + "\n" for i in train_ids))
    (root / "validation.jsonl").write_text("".join(lines[i] + "\n" for i in held_out_ids))
    (root / "fake" / "wandb").mkdir(parents=True)
    (root / "fake" / "wandb" / "__init__.py").write_text(FAKE_WANDB)
    (root / "wandb_log").mkdir()
    output_dir = root / "run"
    (output_dir / "training_metrics.png").mkdir(parents=True)
    env = {**with_python_path(root / "fake"), "FAKE_WANDB_LOG": str(root / "wandb_log"), "HOME": str(root),
           "WANDB_API_KEY": "", "WANDB_MODE": ""}
    result = run_train(args(root / "train.jsonl", tiny_model_dir, output_dir, "--validation-data-path",
                            str(root / "validation.jsonl"), "--report-to", "wandb"), nproc=2, env=env)
    return output_dir, result, root / "wandb_log"


# ----------------------------------------------------------------------------------------------------------------------
# Validation


def test_eval_loss_is_the_exact_token_weighted_mean_over_the_held_out_samples(split_run, data_path):
    output_dir, _ = split_run
    metrics = read_metrics(output_dir / "training_metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, NUM_STEPS + 1))
    assert [m["step"] for m in metrics if m["eval_loss"] is not None] == EVAL_STEPS
    assert sum(m["num_samples"] for m in metrics[:5]) == 18  # an epoch is the 18 samples not held out
    # The reference: the saved model's own loss (mean over a sample's label tokens), weighted by those tokens.
    model = AutoModelForCausalLM.from_pretrained(output_dir / "hf_format" / "samples_36")
    samples = [json.loads(line) for line in data_path.read_text().splitlines()]
    loss_sum, num_tokens = 0.0, 0
    with torch.no_grad():
        for i in split_validation(NUM_SAMPLES, SPLIT, SEED)[1]:
            input_ids, labels = torch.tensor([samples[i]["input_ids"]]), torch.tensor([samples[i]["labels"]])
            count = int((labels[0, 1:] != -100).sum())
            loss_sum += model(input_ids=input_ids, labels=labels).loss.double().item() * count
            num_tokens += count
    assert metrics[-1]["eval_loss"] == pytest.approx(loss_sum / num_tokens, rel=1e-5, abs=0)


def test_one_rank_equals_two_and_held_out_samples_are_never_trained_on(split_run, files_run):
    """Training on the split and training on a file of the same samples without the held-out ones give the same
    steps: the held-out samples were never in a batch. The eval losses agree too, on 1 and on 2 ranks."""
    split_metrics = read_metrics(split_run[0] / "training_metrics.jsonl")
    files_metrics = read_metrics(files_run[0] / "training_metrics.jsonl")
    assert [m["num_samples"] for m in split_metrics] == [m["num_samples"] for m in files_metrics]
    for a, b in zip(split_metrics, files_metrics, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), a["step"]
        assert (a["eval_loss"] is None) == (b["eval_loss"] is None), a["step"]
        if a["eval_loss"] is not None:
            assert a["eval_loss"] == pytest.approx(b["eval_loss"], rel=1e-5), a["step"]


def test_a_resumed_run_keeps_the_split(tmp_path, split_run, tiny_model_dir, data_path):
    """Stopped after 5 steps (which evaluates: the end of that run) and resumed: the same losses and eval losses.
    A different split would change the data order, so resuming with one is refused."""
    output_dir = tmp_path / "run"
    run_train(args(data_path, tiny_model_dir, output_dir, "--validation-split", str(SPLIT), "--max-steps", "5"))
    result = run_train(args(data_path, tiny_model_dir, output_dir, "--validation-split", "0.5", "--resume"),
                       check=False)
    assert result.returncode != 0 and "validation_split: 0.25 -> 0.5" in result.stderr
    run_train(args(data_path, tiny_model_dir, output_dir, "--validation-split", str(SPLIT), "--resume"))
    resumed = read_metrics(output_dir / "training_metrics.jsonl")
    uninterrupted = read_metrics(split_run[0] / "training_metrics.jsonl")
    assert [m["loss"] for m in resumed] == pytest.approx([m["loss"] for m in uninterrupted], rel=1e-6)
    assert ([m["eval_loss"] for m in resumed if m["step"] in EVAL_STEPS]
            == pytest.approx([m["eval_loss"] for m in uninterrupted if m["step"] in EVAL_STEPS], rel=1e-6))


def test_split_is_seeded_disjoint_and_at_least_one_sample():
    train_ids, held_out_ids = split_validation(100, 0.1, seed=3)
    assert len(held_out_ids) == 10 and sorted([*train_ids, *held_out_ids]) == list(range(100))
    assert (split_validation(100, 0.1, seed=3)[1] == held_out_ids).all()
    assert not (split_validation(100, 0.1, seed=4)[1] == held_out_ids).all()
    assert len(split_validation(5, 0.01, seed=3)[1]) == 1


def test_evaluation_falls_where_the_samples_pass_a_multiple():
    seen, due = 0, []
    for step, samples in enumerate([4, 4, 4, 4, 2, 4, 4, 4, 4, 2], start=1):
        seen += samples
        if evaluation_due(seen, samples, 8):
            due.append(step)
    assert due == [2, 4, 7, 9]
    assert not evaluation_due(8, 8, None)


# ----------------------------------------------------------------------------------------------------------------------
# Logs, picture, trackers, summary


def test_a_log_file_gets_plain_lines_and_no_loading_bars(split_run):
    _, result = split_run
    output = result.stdout + result.stderr
    assert "\r" not in output
    assert "Loading weights" not in output and "Writing model shards" not in output
    progress_lines = [line for line in result.stderr.splitlines() if line.startswith("step ")]
    assert progress_lines[0].startswith(f"step 1/{NUM_STEPS} | loss ")
    assert progress_lines[-1].startswith(f"step {NUM_STEPS}/{NUM_STEPS} | loss ")
    assert all("eval_loss" in line for line in progress_lines if line.split()[1] in ("2/10", "4/10"))


def test_a_terminal_gets_a_progress_bar():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    metrics = {"step": 1, "loss": 2.0, "eval_loss": None, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_second": 10.0}
    for stream, expect_bar in ((Terminal(), True), (io.StringIO(), False)):
        display = ProgressDisplay(first_step=0, stop_step=3, stream=stream)
        display.update(metrics)
        display.close()
        assert ("\r" in stream.getvalue()) == expect_bar
        assert ("step 1/3 | loss 2.0000" in stream.getvalue()) != expect_bar


def test_the_run_is_plotted(split_run):
    output_dir, _ = split_run
    png = (output_dir / "training_metrics.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    assert width > 600 and height > 400


def test_a_failing_plot_is_warned_about_once_and_training_goes_on(files_run):
    output_dir, result, _ = files_run  # run_train checked the exit code
    assert result.stderr.count("warning: plotting training_metrics.png failed") == 1
    assert len(read_metrics(output_dir / "training_metrics.jsonl")) == NUM_STEPS


def test_tensorboard_gets_every_step(split_run):
    pytest.importorskip("tensorboard", reason="pip install -r requirements-dev.txt")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    output_dir, _ = split_run
    events = EventAccumulator(str(output_dir / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == list(range(1, NUM_STEPS + 1))
    assert [e.step for e in events.Scalars("eval_loss")] == EVAL_STEPS
    metrics = read_metrics(output_dir / "training_metrics.jsonl")
    assert events.Scalars("loss")[-1].value == pytest.approx(metrics[-1]["loss"])


def test_wandb_logs_offline_from_rank_0_without_an_api_key(files_run):
    output_dir, result, log_dir = files_run
    assert "wandb: no API key" in result.stdout and "logging offline" in result.stdout
    [log_file] = log_dir.iterdir()  # one process, rank 0, called wandb
    calls = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert calls[0] == {"call": "init", "mode": "offline", "dir": str(output_dir)}
    assert [c["step"] for c in calls if c["call"] == "log"] == list(range(1, NUM_STEPS + 1))
    assert [c["step"] for c in calls if c["call"] == "log" and "eval_loss" in c["values"]] == EVAL_STEPS
    assert calls[-1] == {"call": "finish"}


def test_the_summary_names_the_numbers_and_the_outputs(split_run):
    output_dir, result = split_run
    metrics = read_metrics(output_dir / "training_metrics.jsonl")
    tokens = sum(m["num_tokens"] for m in metrics)
    assert (f"finished at step {NUM_STEPS} of {NUM_STEPS}: {NUM_STEPS} steps in this run, 36 samples, {tokens:,} "
            "tokens") in result.stdout
    assert f"final loss {metrics[-1]['loss']:.4f}, eval loss {metrics[-1]['eval_loss']:.4f}" in result.stdout
    assert f"last checkpoint: {output_dir / 'hf_format' / 'samples_36'}" in result.stdout
    assert f"last state:      {output_dir / 'state' / f'step_{NUM_STEPS}'}" in result.stdout


# ----------------------------------------------------------------------------------------------------------------------
# Resuming a finished run, and expected failures


def test_resuming_a_finished_run_says_so_and_writes_nothing(tmp_path, split_run, tiny_model_dir, data_path):
    output_dir = tmp_path / "run"
    shutil.copytree(split_run[0], output_dir)

    def snapshot():
        return {(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in output_dir.rglob("*")}

    before = snapshot()
    result = run_train(args(data_path, tiny_model_dir, output_dir, "--validation-split", str(SPLIT), "--resume"))
    assert (f"the run in {output_dir} already finished at step {NUM_STEPS} of {NUM_STEPS}; nothing to do"
            in result.stdout)
    assert snapshot() == before


def test_argument_problems_are_one_message_from_one_rank_before_anything_starts(tmp_path, data_path):
    (tmp_path / "broken" / "wandb").mkdir(parents=True)
    (tmp_path / "broken" / "wandb" / "__init__.py").write_text("raise ImportError('no wandb here')\n")
    result = run_train(["--data-path", str(data_path), "--model-name-or-path", str(tmp_path / "no-model"),
                        "--output-dir", str(tmp_path / "run"), "--validation-data-path", str(tmp_path / "no.jsonl"),
                        "--report-to", "wandb"], nproc=2, check=False, env=with_python_path(tmp_path / "broken"))
    assert result.returncode != 0
    assert result.stderr.count("error: invalid arguments:") == 1
    assert f"--model-name-or-path {tmp_path / 'no-model'}: no such folder" in result.stderr
    assert f"--validation-data-path {tmp_path / 'no.jsonl'} does not exist" in result.stderr
    assert "--report-to wandb needs the wandb package: pip install wandb" in result.stderr
    assert "traceback : invalid arguments:" in result.stderr  # torchrun's summary names the reason
    assert f'File "{REPO_ROOT / "train.py"}"' not in result.stderr and "[rank" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_a_bad_flag_or_a_folder_that_is_no_model_is_one_line(tmp_path, data_path):
    result = run_train(["--data-path", str(data_path), "--model-name-or-path", str(tmp_path), "--output-dir",
                        str(tmp_path / "run"), "--batch-size", "many"], nproc=2, check=False)
    assert result.returncode != 0
    assert result.stderr.count("error: argument --batch-size: invalid int value: 'many'") == 1
    assert "usage:" not in result.stderr
    result = run_train(["--data-path", str(data_path), "--model-name-or-path", str(tmp_path), "--output-dir",
                        str(tmp_path / "run")], check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert f"--model-name-or-path {tmp_path}: the folder has no config.json" in result.stderr


def test_a_full_disk_is_one_line_naming_what_could_not_be_written(tmp_path, tiny_model_dir, data_path):
    """Writes past 512 bytes fail (EFBIG) as on a full disk: the data cache, the first thing written, cannot be."""
    output_dir = tmp_path / "run"
    result = run_train(args(data_path, tiny_model_dir, output_dir, "--validation-split", str(SPLIT)), check=False,
                       preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (512, 512)))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"error: could not write the data cache {output_dir / '.data_cache'}" in result.stderr
    assert not list((output_dir / ".data_cache").iterdir())  # no half-written cache for the next run to load
