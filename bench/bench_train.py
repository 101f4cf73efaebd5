"""Tokens/s, MFU and peak memory of train.py on one GPU, on a synthetic chat-like workload.

    python bench/bench_train.py --use-liger-kernels                # Qwen2.5-1.5B shape, 16k tokens per micro-batch
    python bench/bench_train.py --model tiny --max-steps 5         # a quick check of the script itself

The workload is deterministic: 6000 samples with lognormal lengths (median 600, mean about 820) clipped to
24..8192, the first 35% of each sample masked, random token ids. The model is a random init of the Qwen2.5-1.5B
config, saved in bf16 and trained by train.py itself (same code path as a user's run). MFU counts model FLOPs
(train.step_flops: 6 x matmul parameters incl. the LM head per token, plus causal attention) over the bf16
matmul peak measured in the same process with an 8192^3 product.
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
TINY = dict(model_type="qwen2", vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["qwen2.5-1.5b", "tiny"], default="qwen2.5-1.5b")
    parser.add_argument("--num-samples", type=int, default=6000)
    parser.add_argument("--max-tokens-per-gpu", type=int, default=16384)
    parser.add_argument("--batch-size", type=int, default=16, help="Samples per step (16 fill about one 16k row).")
    parser.add_argument("--max-steps", type=int, default=40)
    parser.add_argument("--warmup-steps", type=int, default=5, help="Steps left out of the timing.")
    parser.add_argument("--work-dir", default=None, help="Where data, model and run go (default: a temp folder).")
    parser.add_argument("--label", default="", help="Name of this configuration in the printed table.")
    parser.add_argument("--profile-step", type=int, default=None,
                        help="Profile this optimizer step (1-based) with torch.profiler (GPU only).")
    parser.add_argument("--loss", choices=["liger", "chunked"], default=None,
                        help="Override train.py's loss implementation (default: its own choice).")
    parser.add_argument("--liger-chunk-mem-const", type=int, default=None,
                        help="Liger fused CE: logits budget per chunk, in units of rows x hidden (Liger default 1).")
    parser.add_argument("--profile-dir", default=None, help="Where the profile table goes (default: work dir).")
    args, train_args = parser.parse_known_args()

    from transformers import AutoConfig, AutoModelForCausalLM

    work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_train_"))
    work_dir.mkdir(parents=True, exist_ok=True)
    config_kwargs = QWEN25_15B if args.model == "qwen2.5-1.5b" else TINY
    model_dir = work_dir / f"model-{args.model}"
    if not (model_dir / "config.json").exists():
        model_config = AutoConfig.for_model(**config_kwargs, dtype="bfloat16")
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(model_config, dtype=torch.bfloat16).save_pretrained(model_dir)
    data_path = work_dir / f"data-{args.num_samples}.jsonl"
    if not data_path.exists():
        write_workload(data_path, args.num_samples, config_kwargs["vocab_size"])

    if args.loss or args.liger_chunk_mem_const:
        original_init = model.CausalLMWithSummedLoss.__init__

        def init_with_loss_override(self, *a, **k):
            original_init(self, *a, **k)
            self.loss_impl = args.loss or self.loss_impl
            self.liger_chunk_mem_const = args.liger_chunk_mem_const or self.liger_chunk_mem_const

        model.CausalLMWithSummedLoss.__init__ = init_with_loss_override
    if args.profile_step and torch.cuda.is_available():
        profile_train_step(args.profile_step, Path(args.profile_dir or work_dir / "profile"))
    # The same folder on every rank under torchrun (create the model and data with one process first).
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    output_dir = work_dir / f"run-{''.join(c if c.isalnum() else '_' for c in args.label)}-ws{world_size}"
    train.main([
        "--data-path", str(data_path), "--model-name-or-path", str(model_dir), "--output-dir", str(output_dir),
        "--batch-size", str(args.batch_size), "--max-tokens-per-gpu", str(args.max_tokens_per_gpu),
        "--max-steps", str(args.max_steps), "--num-warmup-steps", "2", "--learning-rate", "1e-5",
        "--min-samples-per-checkpoint", str(10**9), "--overwrite", *train_args,
    ])
    if os.environ.get("RANK", "0") != "0":
        return
    metrics = [json.loads(line) for line in open(output_dir / "training_metrics.jsonl")]
    timed = [m for m in metrics[args.warmup_steps:] if m["step"] != args.profile_step]  # profiler slows its step
    seconds = sum(m["num_tokens"] / m["tokens_per_second"] for m in timed)
    tokens_per_second = sum(m["num_tokens"] for m in timed) / seconds
    result = dict(label=args.label or " ".join(train_args), world_size=world_size,
                  tokens_per_second=round(tokens_per_second),
                  tokens_per_second_per_gpu=round(tokens_per_second / world_size))
    if torch.cuda.is_available():
        device = torch.device("cuda")
        measured_peak = measure_matmul_peak(device)
        # metrics' mfu is against the datasheet peak; convert it to the measured one, weighting steps by time
        mfu = sum(m["mfu"] * m["num_tokens"] / m["tokens_per_second"] for m in timed) / seconds
        result.update(
            device=torch.cuda.get_device_name(device), measured_matmul_tflops=round(measured_peak / 1e12, 1),
            mfu_vs_measured_peak=round(mfu * model.device_peak_flops(device) / measured_peak, 4),
            mfu_vs_datasheet=round(mfu, 4), peak_memory_gb=round(max(m["peak_memory_gb"] for m in metrics), 2),
        )
    result.update(
        timed_steps=len(timed),
        micro_batches_per_step=round(statistics.mean(m["micro_batches"] for m in timed), 2),
        final_loss=round(metrics[-1]["loss"], 4), first_loss=round(metrics[0]["loss"], 4),
    )
    print("BENCH " + json.dumps(result), flush=True)


if __name__ == "__main__":
    run_and_exit(main)
