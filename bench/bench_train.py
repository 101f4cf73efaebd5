"""Tokens/s, MFU and peak memory of train.py on one GPU, on a synthetic chat-like workload.

    python bench/bench_train.py --use-liger-kernels                # Qwen2.5-1.5B shape, 16k tokens per micro-batch
    python bench/bench_train.py --model tiny --max-steps 5         # a quick check of the script itself
    python bench/bench_train.py --peer trl                         # TRL's SFTTrainer on the same samples
    python bench/bench_train.py --use-liger-kernels --time-to-first-step   # launch -> first step, as a user would

The workload is deterministic: 6000 samples with lognormal lengths (median 600, mean about 820) clipped to
24..8192, the first 35% of each sample masked, random token ids. The model is a random init of the Qwen2.5-1.5B
config, saved in bf16 and trained by train.py itself (same code path as a user's run). MFU counts model FLOPs
(train.step_flops: 6 x matmul parameters incl. the LM head per token, plus causal attention) over the bf16
matmul peak measured in the same process with an 8192^3 product. tokens/s is wall time from the end of step
--warmup-steps to the end of the last (training_metrics' elapsed_s), everything between steps included.
Throughput runs skip the saves at the end; --save keeps them and times them, with rank 0's host RSS sampled
during the Hugging Face save.
"""

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import model  # noqa: E402
import train  # noqa: E402
from distributed import run_and_exit  # noqa: E402

QWEN25_15B = dict(
    model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
    num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=32768,
    rope_theta=1000000.0, rms_norm_eps=1e-6,
)
QWEN25_7B = dict(
    model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
    num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False, max_position_embeddings=32768,
    rope_theta=1000000.0, rms_norm_eps=1e-6,
)
MODELS = {"qwen2.5-1.5b": QWEN25_15B, "qwen2.5-7b": QWEN25_7B}
TINY = dict(model_type="qwen2", vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
MODELS["tiny"] = TINY


def write_workload(path: Path, num_samples: int, vocab_size: int, seed: int = 0) -> np.ndarray:
    """process_data.py-style JSONL: lognormal lengths (median 600, mean ~820), first 35% of each sample masked."""
    rng = np.random.default_rng(seed)
    sigma = math.sqrt(2 * math.log(820 / 600))  # lognormal mean = median * exp(sigma^2 / 2)
    lengths = np.clip(rng.lognormal(math.log(600), sigma, num_samples).astype(int), 24, 8192)
    with open(path, "w") as f:
        for length in lengths:
            input_ids = rng.integers(0, vocab_size, length).tolist()
            num_masked = int(0.35 * length)
            labels = [-100] * num_masked + input_ids[num_masked:]
            f.write(json.dumps({"input_ids": input_ids, "labels": labels, "len": int(length)}) + "\n")
    return lengths


def measure_matmul_peak(device: torch.device) -> float:
    """bf16 FLOP/s of an 8192^3 matmul on random data, median of 20 after warm-up."""
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * 8192**3 / statistics.median(times)


KERNEL_CATEGORIES = [  # first match wins; matched against the lower-cased kernel name
    ("attention", ("flash",)),
    ("loss", ("cross_entropy", "element_mul")),
    ("optimizer", ("adam",)),
    ("grad clip", ("norm_kernel", "l2norm", "lpnorm", "norm_reduce")),
    ("communication", ("nccl",)),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "sm90_", "cublas", "splitk")),
    ("norm/rope/swiglu", ("rms_norm", "rope", "swiglu", "_layer_norm")),
    ("copies (FSDP, casts)", ("memcpy", "memset", "copy", "cat", "split_with_sizes", "foreach")),
]


def profile_train_step(profile_step: int, out_dir: Path):
    """Wraps train.train_step so that call `profile_step` (1-based) runs under torch.profiler; writes the kernel
    table and prints a PROFILE line with time per category, idle share and host-device syncs of that step."""
    from torch.profiler import ProfilerActivity, profile

    original, calls = train.train_step, [0]

    def wrapped(*args, **kwargs):
        calls[0] += 1
        if calls[0] != profile_step:
            return original(*args, **kwargs)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            start = time.perf_counter()
            result = original(*args, **kwargs)
            torch.cuda.synchronize()
            wall_us = (time.perf_counter() - start) * 1e6
        summarize_profile(prof, wall_us, out_dir)
        return result

    train.train_step = wrapped


def summarize_profile(prof, wall_us: float, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    averages = prof.key_averages()
    (out_dir / "profile_table.txt").write_text(
        averages.table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=90) + "\n\nBy host time:\n"
        + averages.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=90))
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
               and not getattr(e, "is_user_annotation", False) and "#" not in e.name]
    per_kernel: dict[str, list[float]] = {}
    for e in kernels:
        entry = per_kernel.setdefault(e.name, [0.0, 0])
        entry[0] += e.time_range.elapsed_us()
        entry[1] += 1
    lines = [f"{t / 1e3:9.2f} ms {n:6d}x  {name[:150]}" for name, (t, n) in
             sorted(per_kernel.items(), key=lambda x: -x[1][0])[:60]]
    ordered = sorted(kernels, key=lambda e: e.time_range.start)
    gaps, latest_end, latest_name = [], -math.inf, ""
    for e in ordered:
        if e.time_range.start - latest_end > 200:
            gaps.append((e.time_range.start - latest_end, latest_name[:60], e.name[:60]))
        if e.time_range.end > latest_end:
            latest_end, latest_name = e.time_range.end, e.name
    lines += ["", "gaps over 0.2 ms between consecutive kernels (us, kernel before, kernel after):"]
    lines += [f"{g:9.0f}  {b}  ->  {a}" for g, b, a in sorted(gaps, reverse=True)[:25]]
    (out_dir / "profile_kernels.txt").write_text("\n".join(lines) + "\n")
    by_category: dict[str, float] = {}
    intervals = []
    for e in kernels:
        name = e.name.lower()
        category = next((c for c, keys in KERNEL_CATEGORIES if any(k in name for k in keys)), "other elementwise")
        by_category[category] = by_category.get(category, 0.0) + e.time_range.elapsed_us()
        intervals.append((e.time_range.start, e.time_range.end))
    busy, last_end = 0.0, -math.inf
    for start, end in sorted(intervals):  # union of kernel intervals (streams overlap)
        if end > last_end:
            busy += end - max(start, last_end)
            last_end = end
    cpu_names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CPU]
    syncs = {name: cpu_names.count(name) for name in ("aten::_local_scalar_dense", "cudaStreamSynchronize",
                                                       "cudaDeviceSynchronize", "cudaEventSynchronize")}
    syncs["memcpy DtoH"] = sum("dtoh" in e.name.lower() for e in kernels)
    summary = dict(
        wall_ms=round(wall_us / 1e3, 2), gpu_busy_ms=round(busy / 1e3, 2),
        idle_share=round(1 - busy / wall_us, 4),
        ms_by_category={c: round(t / 1e3, 2) for c, t in sorted(by_category.items(), key=lambda x: -x[1])},
        share_of_wall={c: round(t / wall_us, 4) for c, t in sorted(by_category.items(), key=lambda x: -x[1])},
        syncs=syncs, kernels=len(kernels),
    )
    (out_dir / "profile_summary.json").write_text(json.dumps(summary, indent=2))
    print("PROFILE " + json.dumps(summary), flush=True)


def host_rss_gb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1e6  # kB


def time_saves(events: list) -> None:
    """Times the Hugging Face save, the state save and the state load; samples rank 0's host RSS (every 50 ms)
    during the Hugging Face save."""
    import threading

    import checkpoint

    def timed(name, function, sample_rss=False):
        def wrapped(*a, **k):
            peak, stop = [host_rss_gb()], threading.Event()
            before = peak[0]

            def sample():
                while not stop.wait(0.05):
                    peak[0] = max(peak[0], host_rss_gb())

            sampler = threading.Thread(target=sample, daemon=True)
            if sample_rss:
                sampler.start()
            start = time.time()
            result = function(*a, **k)
            seconds = time.time() - start
            stop.set()
            events.append(dict(what=name, seconds=round(seconds, 1), rss_before_gb=round(before, 2),
                               rss_peak_gb=round(max(peak[0], host_rss_gb()), 2) if sample_rss else None))
            if os.environ.get("RANK", "0") == "0":
                print("SAVE " + json.dumps(events[-1]), flush=True)
            return result
        return wrapped

    checkpoint.save_hf_checkpoint = timed("hf_save", checkpoint.save_hf_checkpoint, sample_rss=True)
    checkpoint.save_state = timed("state_save", checkpoint.save_state)
    train.load_state = timed("state_load", train.load_state)


def apply_levers(args) -> None:
    """The bench's switches for levers that train.py does not expose, applied by replacing its functions."""
    if args.loss in ("liger", "chunked") or args.liger_chunk_mem_const:
        original_init = model.CausalLMWithSummedLoss.__init__

        def init_with_loss_override(self, *a, **k):
            original_init(self, *a, **k)
            self.loss_impl = args.loss or self.loss_impl
            self.liger_chunk_mem_const = args.liger_chunk_mem_const or self.liger_chunk_mem_const

        model.CausalLMWithSummedLoss.__init__ = init_with_loss_override
    if args.loss == "liger-flce":  # Liger's own fused linear CE (reads a count back to the host per micro-batch)
        def liger_flce(hidden, weight, targets, softcap, chunk_mem_const):
            from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

            return LigerFusedLinearCrossEntropyFunction.apply(
                hidden, weight, targets, None, None, -100, 0.0, 0.0, "sum", softcap, False, torch.float32, False,
                False, False, None, None, chunk_mem_const)[0]

        model.LinearCrossEntropySum.apply = liger_flce
    if args.compile_layers:  # a lever tried and not kept (BENCHMARKS.md): compiled decoder layers instead of Liger's
        def compile_layers(module: torch.nn.Module) -> None:
            """Each decoder layer's forward compiled, one graph that every layer reuses, the length dynamic."""
            for layer in model.decoder_layers(module):
                layer.forward = torch.compile(layer.forward, dynamic=True)

        train.apply_liger = compile_layers
    if args.keep_gathered:  # no resharding after forward on one GPU (FSDP2 keeps the bf16 weights gathered)
        original_fully_shard = model.fully_shard
        model.fully_shard = lambda module, **k: original_fully_shard(module, **{**k, "reshard_after_forward": False})
    if args.no_background:
        train.in_background = lambda items, ahead=1: items
    if not args.save:
        train.Checkpointer.save = lambda self, progress, hf: True


def run_peer(args, data_path: Path, model_dir: Path) -> None:
    """TRL in its own python process (its imports and compile caches stay out of ours)."""
    import subprocess

    command = [sys.executable, str(Path(__file__).parent / "peer_trl_train.py"), "--data-path", str(data_path),
               "--model-dir", str(model_dir), "--max-length", str(args.max_tokens_per_gpu), "--max-steps",
               str(args.max_steps), "--warmup-steps", str(args.warmup_steps), "--modes", args.peer_modes,
               "--work-dir", str(Path(args.work_dir or tempfile.gettempdir()) / "peer_trl")]
    subprocess.run(command, check=True)


def time_to_first_step(train_argv: list[str], output_dir: Path) -> None:
    """Launches train.py as a user would and reports the seconds until its first step is logged."""
    import signal
    import subprocess

    metrics_file = output_dir / "training_metrics.jsonl"
    metrics_file.unlink(missing_ok=True)  # --overwrite would delete it too, once train.py is up
    start = time.time()
    process = subprocess.Popen([sys.executable, str(Path(train.__file__)), *train_argv], start_new_session=True)
    while not (metrics_file.exists() and metrics_file.stat().st_size > 0):
        if process.poll() is not None:
            raise SystemExit(f"train.py exited with {process.returncode} before its first step")
        time.sleep(0.05)
    seconds = time.time() - start
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    first = json.loads(metrics_file.read_text().splitlines()[0])
    print("BENCH " + json.dumps(dict(label="time to first step", first_step_s_since_launch=round(seconds, 1),
                                     first_step_s=round(first["num_tokens"] / first["tokens_per_second"], 2))),
          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="qwen2.5-1.5b")
    parser.add_argument("--num-samples", type=int, default=6000)
    parser.add_argument("--max-tokens-per-gpu", type=int, default=16384)
    parser.add_argument("--batch-size", type=int, default=16, help="Samples per step (16 fill about one 16k row).")
    parser.add_argument("--max-steps", type=int, default=40)
    parser.add_argument("--warmup-steps", type=int, default=5, help="Steps left out of the timing.")
    parser.add_argument("--work-dir", default=None, help="Where data, model and run go (default: a temp folder).")
    parser.add_argument("--label", default="", help="Name of this configuration in the printed table.")
    parser.add_argument("--run-name", default=None, help="Output folder name under the work dir (default: from "
                        "the label and world size; give the saved run's to --resume it on another number of GPUs).")
    parser.add_argument("--profile-step", type=int, default=None,
                        help="Profile this optimizer step (1-based) with torch.profiler (GPU only).")
    parser.add_argument("--loss", choices=["liger", "chunked", "liger-flce"], default=None,
                        help="Override train.py's loss implementation (liger-flce: Liger's own fused linear CE).")
    parser.add_argument("--liger-chunk-mem-const", type=int, default=None,
                        help="Liger fused CE: logits budget per chunk, in units of rows x hidden (Liger default 1).")
    parser.add_argument("--profile-dir", default=None, help="Where the profile table goes (default: work dir).")
    parser.add_argument("--peer", choices=["trl"], default=None, help="Run TRL's SFTTrainer instead of train.py.")
    parser.add_argument("--peer-modes", default="bf16,fp32,bf16-gc", help="TRL modes (see peer_trl_train.py).")
    parser.add_argument("--compile-layers", action="store_true",
                        help="Lever: torch.compile each decoder layer instead of Liger's layer kernels.")
    parser.add_argument("--keep-gathered", action="store_true", help="Lever: never reshard after forward.")
    parser.add_argument("--no-background", action="store_true", help="Lever off: pack each step in the loop.")
    parser.add_argument("--prepare-only", action="store_true",
                        help="Write the model and data, then stop (run once before torchrun).")
    parser.add_argument("--save", nargs="?", const="all", choices=["all", "hf"], default=None,
                        help="Keep the final saves (timed, as is a resume's load); hf: the Hugging Face one only.")
    parser.add_argument("--time-to-first-step", action="store_true",
                        help="Launch train.py in a new process and time its first step (data cached by a run "
                             "with the same --run-name first).")
    args, train_args = parser.parse_known_args()

    from transformers import AutoConfig, AutoModelForCausalLM

    work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_train_"))
    work_dir.mkdir(parents=True, exist_ok=True)
    config_kwargs = MODELS[args.model]
    model_dir = work_dir / f"model-{args.model}"
    if not (model_dir / "config.json").exists() and os.environ.get("RANK", "0") == "0":
        model_config = AutoConfig.for_model(**config_kwargs, dtype="bfloat16")
        torch.manual_seed(0)
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # a 7B random init is slow on a CPU
            AutoModelForCausalLM.from_config(model_config, dtype=torch.bfloat16).save_pretrained(model_dir)
    data_path = work_dir / f"data-{args.num_samples}-vocab{config_kwargs['vocab_size']}.jsonl"  # ids < vocab
    if not data_path.exists():
        write_workload(data_path, args.num_samples, config_kwargs["vocab_size"])
    if args.prepare_only:
        return None
    if args.peer:
        return run_peer(args, data_path, model_dir)

    apply_levers(args)
    save_events: list[dict] = []
    time_saves(save_events)
    if args.save == "hf":
        import checkpoint

        checkpoint.save_state = lambda *a, **k: None
    if args.profile_step and torch.cuda.is_available():
        profile_train_step(args.profile_step, Path(args.profile_dir or work_dir / "profile"))
    # The same folder on every rank under torchrun (create the model and data with one process first).
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    run_name = args.run_name or f"run-{''.join(c if c.isalnum() else '_' for c in args.label)}-ws{world_size}"
    output_dir = work_dir / run_name
    resuming = "--resume" in train_args or "--resume-from" in train_args
    train_argv = [
        "--data-path", str(data_path), "--model-name-or-path", str(model_dir), "--output-dir", str(output_dir),
        "--batch-size", str(args.batch_size), "--max-tokens-per-gpu", str(args.max_tokens_per_gpu),
        "--max-steps", str(args.max_steps), "--num-warmup-steps", "2", "--learning-rate", "1e-5",
        "--min-samples-per-checkpoint", str(10**9), *([] if resuming else ["--overwrite"]), *train_args,
    ]
    if args.time_to_first_step:
        return time_to_first_step(train_argv, output_dir)
    metrics_file = output_dir / "training_metrics.jsonl"
    earlier_lines = len(metrics_file.read_text().splitlines()) if resuming and metrics_file.exists() else 0
    start = time.time()
    train.main(train_argv)
    if os.environ.get("RANK", "0") != "0":
        return
    metrics = [json.loads(line) for line in metrics_file.read_text().splitlines()[earlier_lines:]]
    timed = [m for m in metrics[args.warmup_steps:] if m["step"] != args.profile_step]  # profiler slows its step
    wall = metrics[-1]["elapsed_s"] - metrics[args.warmup_steps - 1]["elapsed_s"]
    step_seconds = sum(m["num_tokens"] / m["tokens_per_second"] for m in timed)
    tokens_per_second = sum(m["num_tokens"] for m in timed) / wall
    result = dict(label=args.label or " ".join(train_args), world_size=world_size,
                  tokens_per_second=round(tokens_per_second),
                  tokens_per_second_per_gpu=round(tokens_per_second / world_size),
                  tokens_per_second_in_steps=round(sum(m["num_tokens"] for m in timed) / step_seconds))
    if torch.cuda.is_available():
        device = torch.device("cuda")
        measured_peak = measure_matmul_peak(device)
        # metrics' mfu is against the datasheet peak over the step's own time; rescale it to wall time
        mfu = sum(m["mfu"] * m["num_tokens"] / m["tokens_per_second"] for m in timed) / wall
        result.update(
            device=torch.cuda.get_device_name(device), measured_matmul_tflops=round(measured_peak / 1e12, 1),
            mfu_vs_measured_peak=round(mfu * model.device_peak_flops(device) / measured_peak, 4),
            mfu_vs_datasheet=round(mfu, 4), peak_memory_gb=round(max(m["peak_memory_gb"] for m in metrics), 2),
        )
    result.update(
        timed_steps=len(timed), tokens_per_step=round(statistics.mean(m["num_tokens"] for m in timed)),
        micro_batches_per_step=round(statistics.mean(m["micro_batches"] for m in timed), 2),
        final_loss=round(metrics[-1]["loss"], 4), first_loss=round(metrics[0]["loss"], 4),
        saves=save_events, seconds_total=round(time.time() - start, 1),
    )
    print("BENCH " + json.dumps(result), flush=True)


if __name__ == "__main__":
    run_and_exit(main)
