"""Forward+backward time and loss-owned peak memory of label-smoothing cross-entropies on wide outputs.

    python benchmarks/bench_loss.py [--quick] [--device cpu|cuda] [--no-memory] [--shape NxC ...]

Every repetition runs every method in turn (so load on a shared machine hits all alike) and the median is reported.
On the CPU, "fastai_ls, no C kernel" is this package as installed without a C compiler (its torch path).
"floor" is one `torch.exp` over the logits into a fresh tensor: reading the logits once, one exponential per logit
and writing one N x C tensor, the work that any loss handing back an N x C softmax gradient must do (a loss with a
cheaper exponential than torch's can go below it). Memory is the peak beyond the logits
during forward+backward, the logits' gradient included, so one N x C buffer ("1.00 NC") is the best possible:
on CPU the rise of the peak resident set of a forked child per (method, shape), on CUDA `max_memory_allocated`.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from fastai.losses import CrossEntropyLossFlat
from fastai.losses import LabelSmoothingCrossEntropy as FastaiLabelSmoothingCrossEntropy
from torch import Tensor

from fastai_ls import label_smoothing_cross_entropy
from fastai_ls.loss import cpu_kernel

EPS = 0.1
SHAPES = [(64, 37), (256, 1000), (4096, 1000), (2048, 32000), (512, 128000)]
CUDA_SHAPES = [(4096, 128000, torch.float32), (4096, 128000, torch.bfloat16)]
QUICK_SHAPES = [(64, 37), (256, 1000), (1024, 8000)]
FLOOR = "floor (exp)"
NATIVE = "torch F.cross_entropy"
TORCH_PATH = "fastai_ls, no C kernel"


def methods(device: torch.device) -> dict[str, Callable]:
    """Name -> loss function of (logits, targets); the floor is special-cased in `step`."""
    found = {"fastai_ls": lambda x, y: label_smoothing_cross_entropy(x, y, EPS)}
    if device.type == "cpu":
        found[TORCH_PATH] = without_c_kernel
    found |= {
        NATIVE: lambda x, y: F.cross_entropy(x, y, label_smoothing=EPS),
        "fastai LabelSmoothingCE": FastaiLabelSmoothingCrossEntropy(eps=EPS),
        "fastai CrossEntropyLossFlat": CrossEntropyLossFlat(label_smoothing=EPS),
    }
    try:
        from timm.loss import LabelSmoothingCrossEntropy as TimmLabelSmoothingCrossEntropy
    except ImportError:
        pass
    else:
        found["timm LabelSmoothingCE"] = TimmLabelSmoothingCrossEntropy(smoothing=EPS)
    found[FLOOR] = None
    return found


def without_c_kernel(x: Tensor, y: Tensor) -> Tensor:
    """fastai_ls as installed without a C compiler: the fused path's torch operations."""
    available, cpu_kernel.AVAILABLE = cpu_kernel.AVAILABLE, False
    try:
        return label_smoothing_cross_entropy(x, y, EPS)
    finally:
        cpu_kernel.AVAILABLE = available


def step(name: str, loss_func: Callable | None, x: Tensor, y: Tensor) -> None:
    """One forward+backward (for the floor: one exp into a fresh tensor), gradient left in `x.grad`."""
    if loss_func is None:
        x.grad = torch.exp(x.detach())
        return
    loss_func(x, y).backward()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_inputs(n_rows: int, n_classes: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n_rows, n_classes, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    return x, torch.randint(0, n_classes, (n_rows,), generator=gen).to(device)


def time_shape(funcs: dict[str, Callable], x: Tensor, y: Tensor, reps: int) -> dict[str, float]:
    """Median seconds per forward+backward, the methods interleaved within every repetition."""
    times: dict[str, list[float]] = {name: [] for name in funcs}
    names = list(funcs)
    for rep in range(reps + 1):  # repetition 0 warms up
        # Rotate the order every repetition: what ran just before (and what it left in the allocator's free
        # lists, or handed back to the OS) changes the cost of the next fresh N x C allocation.
        for name in names[rep % len(names):] + names[: rep % len(names)]:
            func = funcs[name]
            x.grad = None
            synchronize(x.device)
            start = time.perf_counter()
            step(name, func, x, y)
            synchronize(x.device)
            if rep:
                times[name].append(time.perf_counter() - start)
    x.grad = None
    return {name: statistics.median(t) for name, t in times.items()}


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _cpu_peak_in_child(name: str, func: Callable | None, shape: tuple[int, int], dtype: torch.dtype) -> int:
    """Peak resident-set rise (bytes) over one forward+backward, in a forked child so peaks do not mix."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: measure, write the number, exit without running the parent's cleanup
        try:
            # Every block above 64 KiB is mmapped and unmapped on free, so the resident set follows allocations.
            ctypes.CDLL(None).mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
            x, y = make_inputs(*shape, dtype, torch.device("cpu"))
            step(name, func, *make_inputs(4, shape[1], dtype, torch.device("cpu")))  # first-call allocations
            with open("/proc/self/clear_refs", "w") as clear_refs:
                clear_refs.write("5")  # resets the peak (VmHWM) to the current resident set
            before = _rss_bytes("VmRSS:")
            step(name, func, x, y)
            os.write(write_end, str(_rss_bytes("VmHWM:") - before).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        text = pipe.read()
    os.waitpid(pid, 0)
    return int(text) if text else -1


def cuda_peak(name: str, func: Callable | None, x: Tensor, y: Tensor) -> int:
    """Peak CUDA memory allocated beyond what existed before (the logits) over one forward+backward."""
    x.grad = None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step(name, func, x, y)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    x.grad = None
    return peak


def machine(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            cpu = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    text = f"CPU: {cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"
    if device.type == "cuda":
        text += f", GPU: {torch.cuda.get_device_name(device)}"
    return text


def reps_for(numel: int, quick: bool) -> int:
    """More repetitions for small shapes, whose times are short and noisy."""
    reps = 1000 if numel < 10**5 else 200 if numel < 10**6 else 30 if numel < 10**7 else 11
    return max(3, reps // 4) if quick else reps


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes and few repetitions")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    parser.add_argument("--shape", action="append", type=_shape, help="NxC instead of the default shapes; repeatable")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    shapes = [(n, c, torch.float32) for n, c in (args.shape or (QUICK_SHAPES if args.quick else SHAPES))]
    if device.type == "cuda" and not (args.quick or args.shape):
        shapes += CUDA_SHAPES
    funcs = methods(device)
    print(machine(device))
    print(f"label smoothing {EPS}, integer targets, forward+backward; times are medians; 'xT' = ratio to "
          f"{NATIVE}, 'xF' = ratio to the floor; memory = peak beyond the logits, 'NC' = in N x C gradients\n")

    peaks: dict[tuple, dict[str, int]] = {}
    if not args.no_memory and device.type == "cpu":  # forked before any timing run starts worker threads
        peaks = {shape: {name: _cpu_peak_in_child(name, func, shape[:2], shape[2]) for name, func in funcs.items()}
                 for shape in shapes}

    steady_allocator()
    header = f"{'shape':<22}{'method':<30}{'time ms':>10}{'xT':>7}{'xF':>7}{'peak MiB':>10}{'NC':>7}{'xT':>7}{'xF':>7}"
    print(header)
    print("-" * len(header))
    for n_rows, n_classes, dtype in shapes:
        x, y = make_inputs(n_rows, n_classes, dtype, device)
        times = time_shape(funcs, x, y, reps_for(n_rows * n_classes, args.quick))
        if device.type == "cuda" and not args.no_memory:
            peaks[(n_rows, n_classes, dtype)] = {name: cuda_peak(name, func, x, y) for name, func in funcs.items()}
        memory = peaks.get((n_rows, n_classes, dtype), {})
        nc_bytes = x.numel() * x.element_size()
        label = f"{n_rows}x{n_classes} {str(dtype).removeprefix('torch.')}"
        for name in funcs:
            row = f"{label:<22}{name:<30}{1e3 * times[name]:>10.3f}{times[name] / times[NATIVE]:>7.2f}" \
                  f"{times[name] / times[FLOOR]:>7.2f}"
            if name in memory:
                peak, native, floor = memory[name], memory[NATIVE], memory[FLOOR]
                row += f"{peak / 2**20:>10.1f}{peak / nc_bytes:>7.2f}{_ratio(peak, native):>7}{_ratio(peak, floor):>7}"
            print(row)
            label = ""
        print()
        del x, y
    if device.type == "cpu":
        fastai_targets(funcs, reps_for(64 * 37, args.quick))
    sys.stdout.flush()


def fastai_targets(funcs: dict[str, Callable], reps: int) -> None:
    """64 x 37 again, with the target typed as fastai's Learner passes it (`TensorCategory`)."""
    from fastai.torch_core import TensorCategory

    x, y = make_inputs(64, 37, torch.float32, torch.device("cpu"))
    chosen = {name: funcs[name] for name in ("fastai_ls", NATIVE, "fastai CrossEntropyLossFlat", FLOOR)}
    times = time_shape(chosen, x, TensorCategory(y), reps)
    print("64x37 float32, target as fastai's TensorCategory (what a fastai Learner passes to its loss):")
    for name, seconds in times.items():
        print(f"  {name:<30}{1e3 * seconds:>10.3f} ms{seconds / times[NATIVE]:>7.2f} xT")


def steady_allocator() -> None:
    """Keep freed memory in glibc's heap for reuse, as a training loop with fixed shapes ends up doing.

    By default glibc maps each large block afresh and unmaps it on free, so every method's N x C buffers start
    as page faults whose cost depends on which method ran before: at 4096 x 1000 that moved the floor between
    1.3 and 3.4 ms. Blocks above 32 MiB (glibc's ceiling) are still mapped afresh, for every method alike.
    """
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None)
        libc.mallopt(-3, 32 * 2**20)  # M_MMAP_THRESHOLD: serve blocks up to 32 MiB from the heap
        libc.mallopt(-1, 2**30)  # M_TRIM_THRESHOLD: do not hand freed heap memory back to the OS


def _shape(text: str) -> tuple[int, int]:
    n_rows, _, n_classes = text.lower().partition("x")
    try:
        return int(n_rows), int(n_classes)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NxC, e.g. 4096x1000, got {text!r}") from None


def _ratio(value: int, reference: int) -> str:
    return f"{value / reference:.2f}" if reference > 0 else "-"


if __name__ == "__main__":
    main()
