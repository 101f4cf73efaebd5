"""The validation loss: held-out samples (a seeded split of the training data, or another tokenized file), split
once over ranks and micro-batches the way training steps are, and their exact mean cross-entropy over all ranks."""

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from data import TokenizedData, pack_micro_batch
from distributed import Dist, fail_distributed
from sampler import distribute_batch

# A seed stream of its own: the sampler's (seed, epoch) streams never reach this epoch.
VALIDATION_STREAM = 2**32 - 1


def split_validation(num_samples: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training ids, held-out ids), each sorted: round(fraction * num_samples) samples, at least one, chosen from
    the seed alone, so that the split is the same on any number of ranks and on resume."""
    num_held_out = max(1, round(fraction * num_samples))
    order = np.random.default_rng([seed, VALIDATION_STREAM]).permutation(num_samples)
    return np.sort(order[num_held_out:]), np.sort(order[:num_held_out])


def evaluation_due(samples_seen: int, step_samples: int, every: int | None) -> bool:
    """Whether the samples seen passed a multiple of `every` in the last step (of `step_samples`). It depends on
    the counts alone, so a resumed run evaluates at the same steps as an uninterrupted one."""
    return every is not None and samples_seen // every > (samples_seen - step_samples) // every


@dataclass
class ValidationSet:
    data: TokenizedData
    plans: list[list[list[list[int]]]]  # chunks of samples, each split over ranks and micro-batches like a step
    num_loss_tokens: int


def pack_validation_set(data: TokenizedData, ids: np.ndarray, batch_size: int, max_tokens_per_gpu: int,
                        world_size: int) -> ValidationSet:
    """Splits the samples `ids` once, in chunks of a training batch, with the training packer; each evaluation
    builds the rows again from these plans."""
    chunks = [ids[i:i + batch_size].tolist() for i in range(0, len(ids), batch_size)]
    plans = [distribute_batch(chunk, data.lengths, world_size, max_tokens_per_gpu) for chunk in chunks]
    return ValidationSet(data, plans, int(data.num_loss_tokens[ids].sum()))


def training_and_validation(data: TokenizedData, validation_data: TokenizedData | None, split: float | None,
                            seed: int, batch_size: int, max_tokens_per_gpu: int,
                            d: Dist) -> tuple[np.ndarray, ValidationSet | None]:
    """The ids of the samples to train on, and the validation samples (held out of `data` by `split`, or all of
    `validation_data`), split into micro-batches once for every evaluation."""
    if split is not None:
        train_ids, held_out_ids = split_validation(len(data), split, seed)
        validation_data = data
        if len(train_ids) == 0:
            fail_distributed(f"--validation-split {split} holds out all {len(data)} usable samples; lower it")
    elif validation_data is not None:
        train_ids, held_out_ids = np.arange(len(data)), np.arange(len(validation_data))
        if len(held_out_ids) == 0:
            fail_distributed("--validation-data-path: no usable sample (empty file, or every sample was dropped)")
    else:
        return np.arange(len(data)), None
    return train_ids, pack_validation_set(validation_data, held_out_ids, batch_size, max_tokens_per_gpu,
                                          d.world_size)


@torch.no_grad()
def evaluate(wrapper: torch.nn.Module, validation: ValidationSet, d: Dist) -> float:
    """The sum of cross-entropy over every loss token of the validation samples, on all ranks and micro-batches
    (summed in float64), divided by the number of those tokens: exact, and the same on any number of ranks."""
    was_training = wrapper.training
    wrapper.eval()
    ce_sum = torch.zeros((), dtype=torch.float64, device=d.device)
    for plan in validation.plans:
        for sample_ids in plan[d.rank]:
            ce_sum += wrapper(pack_micro_batch(validation.data, sample_ids, d.device)).double()
    dist.all_reduce(ce_sum)
    wrapper.train(was_training)
    return ce_sum.item() / validation.num_loss_tokens
