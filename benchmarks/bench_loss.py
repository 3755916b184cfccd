"""Time and loss-owned peak memory of label-smoothing cross-entropies: forward+backward (training) and forward under
`torch.no_grad()` (fastai's validation loss, `get_preds(with_loss=True)`), in both CPU allocator regimes.

    python benchmarks/bench_loss.py [--quick] [--device cpu|cuda] [--regime realistic|pinned|both] [--no-memory]
                                    [--shape NxC ...] [--breakdown] [--family]

`--family` times the calibration-loss family instead (focal, FLSD-53, MbLS, MaxSup, LogitNorm, the confidence
penalty, label smoothing with z-loss; default shapes 4096x1000 and 2048x32000): each fused loss against the same
formula written with torch operations and against `F.cross_entropy`, training and no-grad, interleaved as above (the
loss classes, as a fastai Learner calls them: on class ids they run the fused kernels).

Every repetition runs every method in turn, the order rotated each time (so load on a shared machine hits all alike),
and the median is reported. On the CPU, "fastai_ls, no C kernel" is this package as installed without a C compiler
(its torch path).

Floors. Training: one `torch.exp` over the logits into a fresh tensor (read the logits once, one exponential per
logit, write one N x C tensor: what any loss handing back an N x C softmax gradient must do; a loss with a cheaper
exponential than torch's can go below it). No grad: `torch.logsumexp` over the class axis (read the logits once, one
exponential per logit, write N numbers).

Allocator regimes (CPU). glibc serves blocks above its mmap threshold with fresh pages, which page-fault on first
touch, and hands freed memory back to the OS above its trim threshold. Both thresholds adapt at run time:
- realistic: glibc's defaults, what a training loop sees. After the first frees the mmap threshold has risen to the
  largest freed block up to 32 MiB, so N x C buffers up to 32 MiB are reused from the heap (unless a method frees
  more than the trim threshold at once), and larger ones are fresh pages on every call;
- pinned: mmap threshold fixed at 32 MiB and no trimming, so every buffer up to 32 MiB is reused whatever ran
  before (steadier numbers, the regime of the README's first tables).
The `faults` column (minor page faults per call, median) shows which buffers were fresh pages; each regime runs in
its own process, so neither inherits the other's allocator state.

On a machine whose cores other jobs share, a parallel region whose second thread waits for a busy core stalls for a
scheduler slice (here ~8 ms, for `torch.exp` as for the kernel), which swamps the medians of the larger shapes;
`--threads 1` measures without that.

Memory is the peak beyond the logits during forward+backward, the logits' gradient included, so one N x C buffer
("1.00 NC") is the best possible: on CPU the rise of the peak resident set of a forked child per (method, shape), on
CUDA `max_memory_allocated`.

`--breakdown` times the fused C kernel's parts on each shape (kernel with and without the gradient's write, the
Python around it, backward, fresh versus reused output buffers), to see where a gap to the floor comes from.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from fastai.losses import CrossEntropyLossFlat
from fastai.losses import LabelSmoothingCrossEntropy as FastaiLabelSmoothingCrossEntropy
from report import add_report_argument, report_to  # benchmarks/report.py, beside this script
from torch import Tensor

from fastai_ls import (
    AdaFocalLoss,
    AdaptiveFocalLoss,
    ConfidencePenaltyLoss,
    FocalLoss,
    LogitNormLoss,
    MarginLabelSmoothing,
    MaxSupLoss,
    label_smoothing_cross_entropy,
)
from fastai_ls.loss.backends import c_kernel

EPS = 0.1
SHAPES = [(64, 37), (256, 1000), (4096, 1000), (16384, 1000), (2048, 32000), (512, 128000)]
CUDA_SHAPES = [(4096, 128000, torch.float32), (4096, 128000, torch.bfloat16)]
QUICK_SHAPES = [(64, 37), (256, 1000), (1024, 8000)]
FLOOR = "floor (exp)"
NO_GRAD_FLOOR = "floor (logsumexp)"
NATIVE = "torch F.cross_entropy"
NATIVE_NONE = "torch F.cross_entropy, 'none'"
TORCH_PATH = "fastai_ls, no C kernel"
REGIMES = ("realistic", "pinned")


def methods(device: torch.device, no_grad: bool = False) -> dict[str, Callable | None]:
    """Name -> loss function of (logits, targets); None for the floor, special-cased in `step`."""
    found: dict[str, Callable | None] = {"fastai_ls": lambda x, y: label_smoothing_cross_entropy(x, y, EPS)}
    if no_grad:  # get_preds(with_loss=True) and Interpretation ask for one loss per item
        found["fastai_ls, 'none'"] = lambda x, y: label_smoothing_cross_entropy(x, y, EPS, reduction="none")
    if device.type == "cpu":
        found[TORCH_PATH] = without_c_kernel
    found[NATIVE] = lambda x, y: F.cross_entropy(x, y, label_smoothing=EPS)
    if no_grad:
        found[NATIVE_NONE] = lambda x, y: F.cross_entropy(x, y, label_smoothing=EPS, reduction="none")
    found |= {
        "fastai LabelSmoothingCE": FastaiLabelSmoothingCrossEntropy(eps=EPS),
        "fastai CrossEntropyLossFlat": CrossEntropyLossFlat(label_smoothing=EPS),
    }
    try:
        from timm.loss import LabelSmoothingCrossEntropy as TimmLabelSmoothingCrossEntropy
    except ImportError:
        pass
    else:
        found["timm LabelSmoothingCE"] = TimmLabelSmoothingCrossEntropy(smoothing=EPS)
    found[NO_GRAD_FLOOR if no_grad else FLOOR] = None
    return found


def reference_of(name: str) -> str:
    """The PyTorch row that `name`'s xT ratio is taken against (same reduction)."""
    return NATIVE_NONE if name.endswith("'none'") else NATIVE


def without_c_kernel(x: Tensor, y: Tensor) -> Tensor:
    """fastai_ls as installed without a C compiler: the fused path's torch operations."""
    available, c_kernel.AVAILABLE = c_kernel.AVAILABLE, False
    try:
        return label_smoothing_cross_entropy(x, y, EPS)
    finally:
        c_kernel.AVAILABLE = available


def step(loss_func: Callable | None, x: Tensor, y: Tensor) -> None:
    """One forward+backward (for the floor: one exp into a fresh tensor), gradient left in `x.grad`."""
    if loss_func is None:
        x.grad = torch.exp(x.detach())
        return
    loss_func(x, y).backward()


def no_grad_step(loss_func: Callable | None, x: Tensor, y: Tensor) -> None:
    """One forward under no_grad, as fastai's validation runs it (for the floor: one logsumexp)."""
    with torch.no_grad():
        if loss_func is None:
            torch.logsumexp(x, 1)
        else:
            loss_func(x, y)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_inputs(n_rows: int, n_classes: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n_rows, n_classes, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    return x, torch.randint(0, n_classes, (n_rows,), generator=gen).to(device)


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def time_shape(funcs: dict[str, Callable | None], x: Tensor, y: Tensor, reps: int,
               run: Callable = step) -> tuple[dict[str, float], dict[str, float]]:
    """Median seconds and minor page faults per call of `run(func, x, y)`, the methods interleaved in every
    repetition."""
    times: dict[str, list[float]] = {name: [] for name in funcs}
    faults: dict[str, list[int]] = {name: [] for name in funcs}
    names = list(funcs)
    for rep in range(reps + 1):  # repetition 0 warms up (and lets glibc's thresholds adapt)
        # Rotate the order every repetition: what ran just before (and what it left in the allocator's free
        # lists, or handed back to the OS) changes the cost of the next fresh N x C allocation.
        for name in names[rep % len(names):] + names[: rep % len(names)]:
            x.grad = None
            synchronize(x.device)
            before = minor_faults()
            start = time.perf_counter()
            run(funcs[name], x, y)
            synchronize(x.device)
            if rep:
                times[name].append(time.perf_counter() - start)
                faults[name].append(minor_faults() - before)
    x.grad = None
    return ({name: statistics.median(t) for name, t in times.items()},
            {name: statistics.median(f) for name, f in faults.items()})


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _cpu_peak_in_child(func: Callable | None, shape: tuple[int, int], dtype: torch.dtype) -> int:
    """Peak resident-set rise (bytes) over one forward+backward, in a forked child so peaks do not mix."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: measure, write the number, exit without running the parent's cleanup
        try:
            # Every block above 64 KiB is mmapped and unmapped on free, so the resident set follows allocations.
            ctypes.CDLL(None).mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
            x, y = make_inputs(*shape, dtype, torch.device("cpu"))
            step(func, *make_inputs(4, shape[1], dtype, torch.device("cpu")))  # first-call allocations
            with open("/proc/self/clear_refs", "w") as clear_refs:
                clear_refs.write("5")  # resets the peak (VmHWM) to the current resident set
            before = _rss_bytes("VmRSS:")
            step(func, x, y)
            os.write(write_end, str(_rss_bytes("VmHWM:") - before).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        text = pipe.read()
    os.waitpid(pid, 0)
    return int(text) if text else -1


def cuda_peak(func: Callable | None, x: Tensor, y: Tensor) -> int:
    """Peak CUDA memory allocated beyond what existed before (the logits) over one forward+backward."""
    x.grad = None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step(func, x, y)
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
    try:
        text += f", load average {os.getloadavg()[0]:.1f}"
    except OSError:
        pass
    return text


def reps_for(numel: int, quick: bool) -> int:
    """More repetitions for small shapes, whose times are short and noisy."""
    reps = 1000 if numel < 10**5 else 200 if numel < 10**6 else 30 if numel < 10**7 else 11
    return max(3, reps // 4) if quick else reps


def set_regime(regime: str) -> None:
    """Pin glibc's allocator ('pinned'), or leave its adaptive defaults ('realistic'); see the module docstring."""
    if regime == "pinned" and sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None)
        libc.mallopt(-3, 32 * 2**20)  # M_MMAP_THRESHOLD: serve blocks up to 32 MiB from the heap
        libc.mallopt(-1, 2**30)  # M_TRIM_THRESHOLD: do not hand freed heap memory back to the OS


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes and few repetitions")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--regime", choices=(*REGIMES, "both"), default="both",
                        help="CPU allocator regime; 'both' runs each in its own process")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    parser.add_argument("--shape", action="append", type=_shape, help="NxC instead of the default shapes; repeatable")
    parser.add_argument("--breakdown", action="store_true", help="time the C kernel's parts instead")
    parser.add_argument("--family", action="store_true", help="time the calibration-loss family instead")
    parser.add_argument("--losses", help="with --family, only the losses whose name contains this text")
    parser.add_argument("--threads", type=int, help="torch's (and the kernel's) threads; default: torch's. On cores "
                        "shared with other work, 1 avoids the stalls of threads spin-waiting for a busy core")
    add_report_argument(parser)
    args = parser.parse_args(argv)
    title = "The calibration-loss family's speed" if args.family else "The loss's speed and memory"
    with report_to(args.report, f"{title} (`benchmarks/bench_loss.py`)"):
        run(args, without_report(argv))


def without_report(argv: list[str]) -> list[str]:
    """`argv` less `--report PATH` (the processes of the regimes print; the parent writes the report)."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--report":
            skip = True
        elif not arg.startswith("--report="):
            kept.append(arg)
    return kept


def run(args: argparse.Namespace, argv: list[str]) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    default_shapes = FAMILY_SHAPES if args.family else QUICK_SHAPES if args.quick else SHAPES
    shapes = [(n, c, torch.float32) for n, c in (args.shape or default_shapes)]
    if device.type == "cuda" and not (args.quick or args.shape or args.family):
        shapes += CUDA_SHAPES
    if device.type == "cpu" and args.regime == "both":  # a fresh process per regime: no inherited allocator state
        for regime in REGIMES:
            rest = [a for a in argv if not a.startswith("--regime")]
            sys.stdout.flush()
            child = subprocess.run([sys.executable, __file__, *rest, "--regime", regime], check=True,
                                   stdout=subprocess.PIPE, text=True)
            print(child.stdout, end="")
            argv = [*argv, "--no-memory"]  # memory does not depend on the regime: measured once
        return
    print(machine(device))
    if device.type == "cpu":
        set_regime(args.regime)
        print(f"\n===== allocator regime: {args.regime} " + "=" * 60)
    if args.breakdown:
        for n_rows, n_classes, _ in shapes:
            breakdown(n_rows, n_classes, args.quick)
        return
    if args.family:
        family_table(device, shapes, args.quick, args.losses)
        return
    training_table(device, shapes, args)
    no_grad_table(device, shapes, args)
    if device.type == "cpu":
        fastai_targets(reps_for(64 * 37, args.quick))
    sys.stdout.flush()


def training_table(device: torch.device, shapes: list, args) -> None:
    funcs = methods(device)
    print(f"\nforward+backward, label smoothing {EPS}, integer targets; times are medians; 'xT' = ratio to "
          f"{NATIVE}, 'xF' = ratio to the floor; faults = minor page faults per call; memory = peak beyond the "
          f"logits, 'NC' = in N x C gradients\n")
    peaks: dict[tuple, dict[str, int]] = {}
    if not args.no_memory and device.type == "cpu":  # forked before any timing run starts worker threads
        peaks = {shape: {name: _cpu_peak_in_child(func, shape[:2], shape[2]) for name, func in funcs.items()}
                 for shape in shapes}
    header = (f"{'shape':<22}{'method':<30}{'time ms':>10}{'xT':>7}{'xF':>7}{'faults':>8}"
              f"{'peak MiB':>10}{'NC':>7}{'xT':>7}{'xF':>7}")
    print(header)
    print("-" * len(header))
    for n_rows, n_classes, dtype in shapes:
        x, y = make_inputs(n_rows, n_classes, dtype, device)
        times, faults = time_shape(funcs, x, y, reps_for(n_rows * n_classes, args.quick))
        if device.type == "cuda" and not args.no_memory:
            peaks[(n_rows, n_classes, dtype)] = {name: cuda_peak(func, x, y) for name, func in funcs.items()}
        memory = peaks.get((n_rows, n_classes, dtype), {})
        nc_bytes = x.numel() * x.element_size()
        label = f"{n_rows}x{n_classes} {str(dtype).removeprefix('torch.')}"
        for name in funcs:
            row = (f"{label:<22}{name:<30}{1e3 * times[name]:>10.3f}{times[name] / times[NATIVE]:>7.2f}"
                   f"{times[name] / times[FLOOR]:>7.2f}{faults[name]:>8.0f}")
            if name in memory:
                peak, native, floor = memory[name], memory[NATIVE], memory[FLOOR]
                row += f"{peak / 2**20:>10.1f}{peak / nc_bytes:>7.2f}{_ratio(peak, native):>7}{_ratio(peak, floor):>7}"
            print(row)
            label = ""
        print()
        del x, y


def no_grad_table(device: torch.device, shapes: list, args) -> None:
    funcs = methods(device, no_grad=True)
    print(f"\nno grad (fastai's validation loss; get_preds(with_loss=True) and Interpretation take 'none'), label "
          f"smoothing {EPS}; 'xT' = ratio to {NATIVE} with the same reduction, 'xF' = ratio to the floor\n")
    header = f"{'shape':<22}{'method':<34}{'time ms':>10}{'xT':>7}{'xF':>7}{'faults':>8}"
    print(header)
    print("-" * len(header))
    for n_rows, n_classes, dtype in shapes:
        x, y = make_inputs(n_rows, n_classes, dtype, device)
        x.requires_grad_(False)
        times, faults = time_shape(funcs, x, y, reps_for(n_rows * n_classes, args.quick), no_grad_step)
        label = f"{n_rows}x{n_classes} {str(dtype).removeprefix('torch.')}"
        for name in funcs:
            print(f"{label:<22}{name:<34}{1e3 * times[name]:>10.3f}{times[name] / times[reference_of(name)]:>7.2f}"
                  f"{times[name] / times[NO_GRAD_FLOOR]:>7.2f}{faults[name]:>8.0f}")
            label = ""
        print()
        del x, y


def fastai_targets(reps: int) -> None:
    """64 x 37 again, with the target typed as fastai's Learner passes it (`TensorCategory`)."""
    from fastai.torch_core import TensorCategory

    x, y = make_inputs(64, 37, torch.float32, torch.device("cpu"))
    for title, funcs, run in [("forward+backward", methods(torch.device("cpu")), step),
                              ("no grad", methods(torch.device("cpu"), no_grad=True), no_grad_step)]:
        chosen = {name: f for name, f in funcs.items()
                  if name in ("fastai_ls", "fastai_ls, 'none'", NATIVE, NATIVE_NONE, "fastai CrossEntropyLossFlat")}
        times, _ = time_shape(chosen, x.requires_grad_(run is step), TensorCategory(y), reps, run)
        print(f"64x37 float32, {title}, target as fastai's TensorCategory (what a fastai Learner passes):")
        for name, seconds in times.items():
            print(f"  {name:<34}{1e3 * seconds:>10.3f} ms{seconds / times[reference_of(name)]:>7.2f} xT")


def breakdown(n_rows: int, n_classes: int, quick: bool) -> None:
    """Where the fused C path's time goes at one shape, every part timed interleaved (medians)."""
    x, y = make_inputs(n_rows, n_classes, torch.float32, torch.device("cpu"))
    xd = x.detach()
    grad, out = torch.empty_like(xd), torch.empty_like(xd)

    def kernel(with_grad: bool) -> Callable:  # the kernel alone, on buffers allocated once
        return lambda x, y: c_kernel.loss_and_grad(xd, y, -100, None, EPS, True, grad if with_grad else None, False)

    parts = {
        "kernel, loss + gradient": kernel(True),
        "kernel, loss alone": kernel(False),
        "forward (fresh gradient buffer)": lambda x, y: label_smoothing_cross_entropy(x, y, EPS),
        "forward + backward": lambda x, y: label_smoothing_cross_entropy(x, y, EPS).backward(),
        "no-grad forward": lambda x, y: no_grad_step(lambda x, y: label_smoothing_cross_entropy(x, y, EPS), x, y),
        "floor: exp into a fresh tensor": lambda x, y: torch.exp(xd),
        "exp into a reused tensor": lambda x, y: torch.exp(xd, out=out),
        "fresh N x C, one write per page": lambda x, y: torch.empty_like(xd).view(-1)[::1024].fill_(0),
    }
    times, faults = time_shape(parts, x, y, reps_for(n_rows * n_classes, quick), lambda part, x, y: part(x, y))
    print(f"\n{n_rows}x{n_classes} float32{'time ms':>24}{'faults':>8}")
    for name in parts:
        print(f"  {name:<40}{1e3 * times[name]:>10.3f}{faults[name]:>8.0f}")


FAMILY_SHAPES = [(4096, 1000), (2048, 32000)]
ADA_FOCAL = AdaFocalLoss()  # 15 equal-width bins
ADA_FOCAL.gammas.copy_(torch.linspace(-1.0, 4.0, 15))  # inverse focal in the lowest bins, focal above
# name: (the loss class, which runs fused_family_loss on class ids; the same formula with torch operations), each of
# (logits, ids), mean over the rows
FAMILY = {
    "focal gamma=3": (FocalLoss(gamma=3.0),
                      lambda x, y: ((1 - (-F.cross_entropy(x, y, reduction="none")).exp()) ** 3
                                    * F.cross_entropy(x, y, reduction="none")).mean()),
    "FLSD-53": (AdaptiveFocalLoss(),
                lambda x, y: _flsd53(F.cross_entropy(x, y, reduction="none"))),
    "MbLS m=10 a=0.1": (MarginLabelSmoothing(margin=10.0, alpha=0.1),
                        lambda x, y: F.cross_entropy(x, y) + 0.1 * (x.max(1, keepdim=True).values - x - 10.0)
                        .relu().mean(1).mean()),
    "MaxSup a=0.1": (MaxSupLoss(alpha=0.1),
                     lambda x, y: F.cross_entropy(x, y) + 0.1 * (x.max(1).values - x.mean(1)).mean()),
    "LogitNorm tau=0.04": (LogitNormLoss(tau=0.04),
                           lambda x, y: F.cross_entropy(x / (0.04 * (x.norm(dim=1, keepdim=True) + 1e-7)), y)),
    "conf. penalty b=0.1": (ConfidencePenaltyLoss(beta=0.1),
                            lambda x, y: F.cross_entropy(x, y) + 0.1 * (x.softmax(1) * x.log_softmax(1)).sum(1)
                            .mean()),
    "focal g=3 eps=0.1": (FocalLoss(gamma=3.0, eps=0.1), lambda x, y: _smoothed_focal(x, y, 3.0, 0.1)),
    "FLSD-53 + z-loss 1e-4": (AdaptiveFocalLoss(z_loss=1e-4),
                              lambda x, y: _flsd53(F.cross_entropy(x, y, reduction="none"))
                              + 1e-4 * (torch.logsumexp(x, 1) ** 2).mean()),
    "AdaFocal 15 bins": (ADA_FOCAL, lambda x, y: _ada_focal(F.cross_entropy(x, y, reduction="none"),
                                                            ADA_FOCAL.gammas)),
    "LS 0.1 + z-loss 1e-4": (lambda x, y: label_smoothing_cross_entropy(x, y, EPS, z_loss=1e-4),
                             lambda x, y: F.cross_entropy(x, y, label_smoothing=EPS)
                             + 1e-4 * (torch.logsumexp(x, 1) ** 2).mean()),
}


def _smoothed_focal(x: Tensor, y: Tensor, gamma: float, eps: float) -> Tensor:
    """-sum_c q_c (1 - p_c)^gamma log p_c, q = (1 - eps) onehot(y) + eps / C, mean over the rows."""
    log_p = x.log_softmax(1)
    q = F.one_hot(y, x.shape[1]).to(x.dtype) * (1 - eps) + eps / x.shape[1]
    return -(q * (1 - log_p.exp()) ** gamma * log_p).sum(1).mean()


def _ada_focal(ce: Tensor, gammas: Tensor) -> Tensor:
    """AdaFocal's mean row loss from the cross-entropies: gamma of p_y's equal-width bin, focal from 0.2 on, else
    inverse focal."""
    p_y = (-ce).exp()
    g = gammas.to(ce)[(p_y.detach() * len(gammas)).ceil().long().sub(1).clamp(0, len(gammas) - 1)]
    return (torch.where(g >= 0.2, (1 - p_y) ** g.clamp_min(0), (1 + p_y) ** g.abs()) * ce).mean()


def _flsd53(ce: Tensor) -> Tensor:
    p_y = (-ce).exp()
    return ((1 - p_y) ** torch.where(p_y.detach() < 0.2, 5.0, 3.0) * ce).mean()


def family_table(device: torch.device, shapes: list, quick: bool, losses: str | None = None) -> None:
    """Each fused loss of the family (those whose name contains `losses`, if given) against its torch-operations
    formula and F.cross_entropy (no smoothing)."""
    family = {name: pair for name, pair in FAMILY.items() if losses is None or losses in name}
    if not family:
        raise SystemExit(f"no loss of the family is named like {losses!r}: {', '.join(FAMILY)}")
    print("\ncalibration-loss family, integer targets, 'mean'; medians; 'xCE' = ratio to F.cross_entropy, 'xOps' "
          "= ratio to the same formula written with torch operations (training: forward+backward)\n")
    header = f"{'shape':<14}{'loss':<24}{'train ms':>10}{'xCE':>7}{'xOps':>7}{'no-grad ms':>12}{'xCE':>7}{'xOps':>7}"
    print(header)
    print("-" * len(header))
    for n_rows, n_classes, dtype in shapes:
        x, y = make_inputs(n_rows, n_classes, dtype, device)
        funcs = {NATIVE: lambda x, y: F.cross_entropy(x, y)}
        for name, (fused, ops) in family.items():
            funcs[name], funcs[name + " (ops)"] = fused, ops
        reps = reps_for(n_rows * n_classes, quick)
        train, _ = time_shape(funcs, x, y, reps)
        x.requires_grad_(False)
        no_grad, _ = time_shape(funcs, x, y, reps, no_grad_step)
        label = f"{n_rows}x{n_classes}"
        for name in family:
            cells = [f"{1e3 * train[name]:>10.2f}{train[name] / train[NATIVE]:>7.2f}"
                     f"{train[name] / train[name + ' (ops)']:>7.2f}",
                     f"{1e3 * no_grad[name]:>12.2f}{no_grad[name] / no_grad[NATIVE]:>7.2f}"
                     f"{no_grad[name] / no_grad[name + ' (ops)']:>7.2f}"]
            print(f"{label:<14}{name:<24}{''.join(cells)}")
            label = ""
        print(f"{'':<14}{NATIVE:<24}{1e3 * train[NATIVE]:>10.2f}{'':>14}{1e3 * no_grad[NATIVE]:>12.2f}\n")
        del x, y


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
