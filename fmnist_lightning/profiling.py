"""What a trained model costs: inference speed, latency and memory, measured where it runs."""

import resource
import statistics
import time
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import Tensor, nn


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def inference_speed(
    model: nn.Module,
    example: Tensor,
    batch_size: int = 1024,
    repeats: int = 3,
    latency_runs: int = 30,
    context: AbstractContextManager | None = None,
) -> dict[str, float]:
    """Images per second at ``batch_size`` and the median milliseconds for one image.

    Args:
        model: The network (or task) to time, called on normalised images.
        example: One input image ``(1, C, H, W)``, on the model's device.
        batch_size: Batch of the throughput measurement.
        repeats: Timed batches after one warm-up batch.
        latency_runs: Single-image calls whose median is the latency.
        context: Precision context to run in (e.g. the Trainer's autocast).

    Returns:
        ``inference_images_per_s``, ``inference_batch_size`` and ``latency_ms_batch1``.
    """
    device = example.device
    big = example.expand(batch_size, *example.shape[1:]).contiguous()
    was_training = model.training
    model.eval()
    with torch.inference_mode(), context or nullcontext():
        model(big)  # warm-up: first-call allocations and oneDNN/cuDNN kernel choice
        _sync(device)
        start = time.perf_counter()
        for _ in range(repeats):
            model(big)
        _sync(device)
        throughput = repeats * batch_size / (time.perf_counter() - start)
        latencies = []
        for _ in range(latency_runs):
            start = time.perf_counter()
            model(example)
            _sync(device)
            latencies.append(time.perf_counter() - start)
    model.train(was_training)
    return {
        "inference_images_per_s": throughput,
        "inference_batch_size": batch_size,
        "latency_ms_batch1": 1000 * statistics.median(latencies),
    }


def peak_memory() -> dict[str, float]:
    """Peak resident memory of this process in MB, and peak GPU memory where there is a GPU."""
    figures = {"peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # Linux: KiB
    if torch.cuda.is_available():
        figures["peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return figures
