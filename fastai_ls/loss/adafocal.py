"""AdaFocal (Ghosh et al., "AdaFocal: Calibration-aware Adaptive Focal Loss", NeurIPS 2022): `ada_focal_loss` and
`AdaFocalLoss`, with its `Flat` twin, and `ada_focal_update`, the per-bin gamma update from validation counters.

Each training row's gamma is that of the validation bin its true-class probability p_y falls in. A bin with
gamma >= `switch` uses the focal loss -(1 - p_y)^gamma log p_y; below it, the inverse focal loss
-(1 + p_y)^|gamma| log p_y, which raises confidence instead of lowering it. After each validation pass, over
equal-mass bins of the top-label confidence, gamma_b <- gamma_b exp(lam (conf_b - acc_b)) where gamma_b >= `switch`
(the paper's update); below `switch`, where a product cannot change gamma's sign, gamma_b <- gamma_b + lam (conf_b
- acc_b), so that a bin moves between the focal and the inverse-focal loss in the same direction (up when
over-confident). gamma is clipped to [gamma_min, gamma_max]. `fastai_ls.integration.adafocal.AdaFocalCallback`
runs the update from the `CalibrationCallback`'s counters. On class ids the loss runs the fused kernels
(`fastai_ls.loss.backends.fused_family_loss`), z-loss included."""

from __future__ import annotations

import torch
from torch import Tensor

from fastai_ls.loss.backends.family import check_bins
from fastai_ls.loss.backends.family_formulas import ada_focal_rows
from fastai_ls.loss.base import FamilyLoss, FlatFamilyLoss, check_parameter, family_loss

__all__ = ["ada_focal_loss", "ada_focal_update", "equal_mass_bins", "AdaFocalLoss", "AdaFocalLossFlat"]


def ada_focal_loss(
    input: Tensor,
    target: Tensor,
    gammas: Tensor,
    edges: Tensor | None = None,
    switch: float = 0.2,
    weight: Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int = -100,
    *,
    z_loss: float = 0.0,
) -> Tensor:
    """AdaFocal: per row -(1 - p_y)^g log p_y where g = gammas[b] >= `switch`, else -(1 + p_y)^|g| log p_y, b the
    bin of p_y. g is chosen without a gradient; the factor is differentiated, as in the focal loss.

    Parameters
    ----------
    input : Tensor
        Logits, (N, C) or (N, C, d1, ..., dk): the class axis is 1, as in PyTorch. Never written to.
    target : Tensor
        Class ids with the input's shape minus the class axis, or probabilities q with the input's shape (the loss
        is then the q-weighted sum of each class's term, with each class's gamma from the bin of its own p_c).
    gammas : Tensor
        (B,) one gamma per bin; not differentiated.
    edges : Tensor or None, default None
        (B + 1,) non-decreasing bin edges from 0 to 1, bins (e_b, e_b+1]; None: B equal-width bins.
    switch : float, default 0.2
        The gamma below which a bin uses the inverse focal loss, >= 0 (the paper's threshold).
    weight : Tensor or None, default None
        Per-class weights (C,), finite and non-negative: a row with class id y counts w_y times, and 'mean' divides
        by the sum of w_y over the kept rows (PyTorch's convention). Not differentiated.
    reduction : str, default 'mean'
        'mean', 'sum' or 'none' (one loss per position, the target's shape).
    ignore_index : int, default -100
        Integer targets equal to this contribute nothing, to the loss, the divisor or the gradient.
    z_loss : float, default 0.0
        lambda >= 0 of the z-loss: lambda * logsumexp(z)^2 added to each row's loss and weighted like it (w_y), which
        keeps the log-partition near 0 (Chowdhery et al. 2022, PaLM; Liger's `lse_square_scale`). 0 leaves it out.

    Returns
    -------
    Tensor
        float32 for half-precision logits, else the logits' dtype: a scalar, or per position for 'none'.

    Examples
    --------
    >>> import torch
    >>> x, y = torch.tensor([[1., 3., 0.], [2., 0., 0.]]), torch.tensor([1, 2])
    >>> round(ada_focal_loss(x, y, torch.tensor([0.0, 1.0, 3.0])).item(), 4)
    1.1201
    """
    switch = check_parameter("switch", switch)
    # `fused_family_loss` checks the bins itself: checked here too, they would cost a second host read on a GPU.
    return family_loss(input, target, weight, reduction, ignore_index, z_loss,
                       lambda rows: ada_focal_rows(rows, switch, gammas, edges),
                       ("ada_focal", {"switch": switch, "gammas": gammas, "edges": edges}),
                       check=lambda: check_bins(gammas, edges))


def _check_counters(name: str, counts: Tensor) -> None:
    """Raise unless `counts` (K, 3) holds, per cell, a count, a sum of confidences and a number correct, each finite
    with 0 <= correct <= count and 0 <= sum <= count (within 2%): else a NaN or negative cell would move the edges or
    gammas silently."""
    if not isinstance(counts, Tensor) or counts.dim() != 2 or counts.shape[1] != 3 or counts.is_complex() \
            or counts.dtype == torch.bool:
        got = tuple(counts.shape) if isinstance(counts, Tensor) else type(counts).__name__
        raise ValueError(f"{name} must be a real (K, 3) tensor of count, sum of confidence and number correct per "
                         f"cell, got {got}")
    c = counts.detach().to(torch.float64)
    # Room for rounding: weighted sums round, and a probability row may miss 1 by up to 2% (`CalibrationState`).
    fits = (c[:, 2] <= c[:, 0] * (1 + 1e-9)) & (c[:, 1] <= c[:, 0] * 1.02)
    if not bool(c.isfinite().all() & (c >= 0).all() & fits.all()):
        raise ValueError(f"{name} must be finite counters with 0 <= number correct <= count and 0 <= sum of "
                         f"confidence <= count (within 2%) in every cell")


def equal_mass_bins(fine: Tensor, n_bins: int) -> tuple[Tensor, Tensor]:
    """`n_bins` bins of about equal count merged from fine equal-width cells: `fine` (K, 3) holds count, sum of
    confidence and number correct per cell ((k-1)/K, k/K] (a `CalibrationState`'s `fine`). Returns the float64 edges
    (n_bins + 1,) on the cell boundaries and the merged (n_bins, 3) counters; a bin can be empty where one cell holds
    more than a bin's share."""
    _check_counters("fine", fine)
    fine = fine.detach().to(torch.float64)
    k = fine.shape[0]
    cumulative = torch.cat([fine.new_zeros(1, 3), fine.cumsum(0)])  # (K + 1, 3): totals up to each boundary
    total = cumulative[-1, 0]
    shares = total * torch.arange(1, n_bins, dtype=torch.float64) / n_bins
    inner = torch.searchsorted(cumulative[1:, 0].contiguous(), shares) + 1  # the first boundary past each share
    cuts = torch.cat([torch.tensor([0]), inner.clamp(max=k), torch.tensor([k])])
    cuts = cuts.cummax(0).values
    return cuts.to(torch.float64) / k, cumulative[cuts[1:]] - cumulative[cuts[:-1]]


def ada_focal_update(gammas: Tensor, bins: Tensor, lam: float = 1.0, switch: float = 0.2, gamma_min: float = -2.0,
                     gamma_max: float = 20.0) -> Tensor:
    """The gammas after one validation pass (a new tensor): `bins` (B, 3) count, sum of confidence and number
    correct per bin. E_b = conf_b - acc_b; gamma_b exp(lam E_b) where gamma_b >= `switch`, gamma_b + lam E_b below
    it, clipped to [gamma_min, gamma_max]; an empty bin keeps its gamma.

    Examples
    --------
    >>> import torch
    >>> ada_focal_update(torch.tensor([1.0, 0.1]), torch.tensor([[10., 9., 7.], [10., 3., 5.]]))
    tensor([ 1.2214, -0.1000])
    """
    check_bins(gammas, None)
    _check_counters("bins", bins)
    if bins.shape[0] != gammas.numel():
        raise ValueError(f"bins has {bins.shape[0]} rows for {gammas.numel()} gammas: one row per bin")
    # As the loss's constructor checks them: a negative lam would step every gamma the wrong way, silently.
    lam = check_parameter("lam", lam, inclusive=False)
    switch = check_parameter("switch", switch)
    gamma_min = check_parameter("gamma_min", gamma_min, -float("inf"))
    gamma_max = check_parameter("gamma_max", gamma_max, gamma_min)
    bins = bins.detach().to(torch.float64)
    count = bins[:, 0]
    error = torch.where(count > 0, (bins[:, 1] - bins[:, 2]) / count.clamp(min=1), 0.0)
    g = gammas.detach().to(torch.float64)
    new = torch.where(g >= switch, g * (lam * error).exp(), g + lam * error)
    return new.clamp(gamma_min, gamma_max).to(gammas.dtype)


class AdaFocalLoss(FamilyLoss):
    """AdaFocal for fastai with PyTorch's semantics (class axis 1); see `ada_focal_loss`. The bins' gammas and edges
    are buffers (saved and exported with the model); `update(fine)` moves them after a validation pass, and
    `AdaFocalCallback` calls it from the `CalibrationCallback`'s counters.

    Parameters
    ----------
    n_bins : int, default 15
        The number of equal-mass bins (the paper's 15).
    gamma_init : float, default 1.0
        Every bin's gamma before the first update (the paper's gamma_0).
    lam : float, default 1.0
        The update's step, > 0 (the paper's lambda).
    switch : float, default 0.2
        The gamma below which a bin uses the inverse focal loss (the paper's S_th).
    gamma_min, gamma_max : float, default -2.0 and 20.0
        The range gamma is clipped to.
    weight : Tensor or None, default None
        Per-class weights (C,): a row with class id y counts w_y times, 'mean' divides by the sum of w_y.
    reduction : str, default 'mean'
        'mean', 'sum' or 'none'; a plain attribute that fastai's `NoneReduce` sets.
    ignore_index : int, default -100
        Integer targets equal to this contribute nothing.
    z_loss : float, default 0.0
        lambda >= 0 of the z-loss, lambda * logsumexp(z)^2 per row, weighted like the row; 0 leaves it out.

    Examples
    --------
    >>> import torch
    >>> AdaFocalLoss()(torch.randn(4, 3), torch.tensor([0, 2, 1, 0])).shape
    torch.Size([])
    """

    function = staticmethod(ada_focal_loss)
    parameters = ("gammas", "edges", "switch")

    def __init__(self, n_bins: int = 15, gamma_init: float = 1.0, lam: float = 1.0, switch: float = 0.2,
                 gamma_min: float = -2.0, gamma_max: float = 20.0, weight: Tensor | None = None,
                 reduction: str = "mean", ignore_index: int = -100, *, z_loss: float = 0.0):
        """Check and store the options (see the class's Parameters)."""
        super().__init__(weight, reduction, ignore_index, z_loss=z_loss)
        if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
            raise ValueError(f"n_bins must be a positive int, got {n_bins!r}")
        self.lam = check_parameter("lam", lam, inclusive=False)
        self.switch = check_parameter("switch", switch)
        self.gamma_min = check_parameter("gamma_min", gamma_min, -float("inf"))
        self.gamma_max = check_parameter("gamma_max", gamma_max, self.gamma_min)
        gamma_init = check_parameter("gamma_init", gamma_init, self.gamma_min, high=self.gamma_max)
        self.register_buffer("gammas", torch.full((n_bins,), gamma_init, dtype=torch.float64))
        self.register_buffer("edges", torch.linspace(0, 1, n_bins + 1, dtype=torch.float64))

    @torch.no_grad()
    def update(self, fine: Tensor) -> None:
        """Re-bin and step the gammas from one validation pass's fine counters (K, 3): count, sum of top-label
        confidence and number correct per equal-width cell (a `CalibrationState`'s `fine`). As in the paper, bin b
        is the b-th equal-mass bin of each pass: its gamma takes one step from the error of this pass's bin b, whose
        edges become the new edges. A pass with no rows changes nothing."""
        _check_counters("fine", fine)
        if not float(fine[:, 0].sum()):
            return
        edges, bins = equal_mass_bins(fine, self.gammas.numel())
        self.gammas.copy_(ada_focal_update(self.gammas, bins.to(self.gammas.device), self.lam, self.switch,
                                           self.gamma_min, self.gamma_max))
        self.edges.copy_(edges.to(self.edges.device))

    def extra_repr(self) -> str:
        return f"n_bins={self.gammas.numel()}, lam={self.lam}, switch={self.switch}, " \
               f"gamma_min={self.gamma_min}, gamma_max={self.gamma_max}, {self.options_repr()}"


class AdaFocalLossFlat(FlatFamilyLoss, AdaFocalLoss):
    """`AdaFocalLoss` with fastai's `BaseLoss` conventions (class axis `axis`, default last; 'none' flattened).

    Parameters
    ----------
    n_bins, gamma_init, lam, switch, gamma_min, gamma_max, weight, reduction, ignore_index, z_loss
        As for `AdaFocalLoss`.
    axis : int, default -1
        The class axis of the model's output; `activation` and `decodes` use it too.
    flatten : bool, default True
        Flatten 'none' losses to one dimension.
    floatify : bool, default False
        Cast the target to float: a probability target laid out like the input.

    Examples
    --------
    >>> import torch
    >>> AdaFocalLossFlat()(torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5)), reduction='none').shape
    torch.Size([10])
    """

    def __init__(self, n_bins: int = 15, gamma_init: float = 1.0, lam: float = 1.0, switch: float = 0.2,
                 gamma_min: float = -2.0, gamma_max: float = 20.0, weight: Tensor | None = None,
                 reduction: str = "mean", ignore_index: int = -100, *, z_loss: float = 0.0, axis: int = -1,
                 flatten: bool = True, floatify: bool = False):
        """Check and store the options (see the class's Parameters)."""
        super().__init__(n_bins, gamma_init, lam, switch, gamma_min, gamma_max, weight, reduction, ignore_index,
                         z_loss=z_loss)
        self._flat_options(axis, flatten, floatify)
