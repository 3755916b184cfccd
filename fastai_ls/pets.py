"""The classic fastai Oxford-IIIT Pets example (resnet34, 37 breeds) with label smoothing and calibration tracking."""

from __future__ import annotations

import re
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

# Importing these registers `Learner.fit_one_cycle` and fastai's progress bars, as `fastai.vision.all` would.
import fastai.callback.progress  # noqa: F401
import fastai.callback.schedule  # noqa: F401
import numpy as np
import torchvision
from fastai.data.block import CategoryBlock, DataBlock
from fastai.data.core import DataLoaders
from fastai.data.external import URLs, fastai_path, untar_data
from fastai.data.transforms import IndexSplitter, Normalize, RandomSplitter, RegexLabeller, get_image_files
from fastai.learner import Learner
from fastai.metrics import error_rate
from fastai.vision.augment import Resize, aug_transforms
from fastai.vision.core import imagenet_stats
from fastai.vision.data import ImageBlock
from fastai.vision.learner import vision_learner
from fastcore.basics import using_attr
from PIL import Image

from fastai_ls.integration.callback import CalibrationCallback
from fastai_ls.integration.splits import check_classes_trained, check_split
from fastai_ls.loss.modules import LabelSmoothingCrossEntropy

# The breed is the file name up to the last `_<digits>.jpg`: breeds contain underscores (american_pit_bull_terrier).
PETS_PATTERN = r"^(.+)_\d+\.jpg$"


def pets_images(path: str | Path | None = None) -> Path:
    """The folder of Pets images: `path` (the extracted archive or its `images/`), else `untar_data(URLs.PETS)`.

    Parameters
    ----------
    path : str or Path, optional
        The extracted `oxford-iiit-pet` folder or its `images/`. None: `untar_data(URLs.PETS)`, which uses an
        extracted copy in fastai's data folder (`~/.fastai/data`, or `$FASTAI_HOME/data`) with no network, and
        otherwise downloads the archive (800 MB).

    Returns
    -------
    Path
        The folder holding the images.

    Raises
    ------
    FileNotFoundError
        If there are no images there, or no copy and no network: the message says where to put them.

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     pets_images(make_pets_like_tree(folder)).name
    'images'
    """
    if path is None:
        path = _untar_pets()
    path = Path(path).expanduser()
    images = path / "images" if (path / "images").is_dir() else path
    if not images.is_dir() or not get_image_files(images):
        raise FileNotFoundError(f"no Pets images in {images}: pass path= (fastai-ls pets --path) the extracted "
                                f"oxford-iiit-pet folder (holding images/) or its images/ folder")
    return images


def _untar_pets() -> Path:
    """`untar_data(URLs.PETS)`, or a `FileNotFoundError` that says where to put the data when there is no copy
    and no network."""
    expected = fastai_path("data") / "oxford-iiit-pet"
    archive = fastai_path("archive") / URLs.PETS.rsplit("/", 1)[-1]
    try:
        if not expected.exists() and not archive.exists():
            # fastdownload starts its progress bar before it opens the URL, and fastprogress's console bar prints
            # a block character (U+2588) and a carriage return on stdout: offline, that character would stand in
            # front of our error. So ask the server first.
            _reach(URLs.PETS)
        return untar_data(URLs.PETS)
    except OSError as err:  # offline: no extracted copy, and the archive could not be downloaded
        raise FileNotFoundError(
            f"Oxford-IIIT Pets is not in {expected} and could not be downloaded from {URLs.PETS} ({err}). "
            "Download and extract that archive there, or pass path= (fastai-ls pets --path) the extracted folder "
            "(holding images/)."
        ) from err


def _reach(url: str, timeout: float = 30) -> None:
    """Raise an `OSError` if `url`'s server cannot be reached (an HTTP error status is left to the download)."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
            pass
    except urllib.error.HTTPError:
        pass


def check_pets_names(items: Sequence[Path]) -> None:
    """Raise a `ValueError` naming a file whose name gives no breed (`<breed>_<n>.jpg`), or the one breed if all
    files give the same: a classifier needs two.

    Parameters
    ----------
    items : sequence of Path
        The image files.

    Examples
    --------
    >>> check_pets_names([Path("beagle_1.jpg"), Path("american_pit_bull_terrier_12.jpg")])
    >>> check_pets_names([Path("pets/beagle_1.jpg"), Path("pets/holiday.png")])  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: pets/holiday.png is not named <breed>_<n>.jpg like the Oxford-IIIT Pets images ...
    """
    wrong = sorted(item for item in items if not re.match(PETS_PATTERN, Path(item).name))
    if wrong:
        raise ValueError(f"{wrong[0]} is not named <breed>_<n>.jpg like the Oxford-IIIT Pets images (e.g. "
                         "Abyssinian_1.jpg, american_pit_bull_terrier_12.jpg): the breed is read from the file name "
                         f"({len(wrong)} of {len(items)} images do not match)")
    breeds = {re.match(PETS_PATTERN, Path(item).name)[1] for item in items}
    if len(breeds) == 1:
        raise ValueError(f"every image is named {breeds.pop()}_<n>.jpg ({Path(items[0]).name}, ...): the breed is "
                         "read from the file name up to _<n>.jpg, and a classifier needs two breeds or more")


def pets_dataloaders(
    images: Path,
    bs: int = 64,
    presize: int = 460,
    size: int = 224,
    min_scale: float = 0.75,
    valid_pct: float = 0.2,
    seed: int = 42,
    num_workers: int | None = None,
) -> DataLoaders:
    """fastai's presizing pipeline for Pets: labels from file names, `Resize(presize)`, `aug_transforms(size)`.

    Parameters
    ----------
    images : Path
        Folder of `<breed>_<n>.jpg` files (other files, such as the archive's `.mat`, are skipped).
    bs : int, default 64
        Batch size.
    presize : int, default 460
        Per-item resize, larger than `size`, so that the batch augmentations crop without black borders.
    size : int, default 224
        Training image size.
    min_scale : float, default 0.75
        Smallest random crop, as a share of the image.
    valid_pct : float, default 0.2
        Share of images held out for validation (a random split).
    seed : int, default 42
        Seed of the random split.
    num_workers : int, optional
        DataLoader workers (None: fastai's default).

    Returns
    -------
    DataLoaders

    Raises
    ------
    ValueError
        If a file name does not give a breed, or the split leaves no training batch (`bs` larger than the training
        set), no validation image, or a breed with no training image.

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     dls = pets_dataloaders(pets_images(make_pets_like_tree(folder)), bs=8, presize=40, size=32)
    ...     len(dls.train_ds), len(dls.valid_ds), dls.vocab
    (26, 6, ['Abyssinian', 'Egyptian_Mau', 'american_pit_bull_terrier', 'beagle'])
    """
    items = get_image_files(images)  # .jpg and friends only: the archive's .mat files are skipped
    check_pets_names(items)
    train, valid = RandomSplitter(valid_pct, seed=seed)(items)
    check_split(len(train), len(valid), bs)
    check_classes_trained([re.match(PETS_PATTERN, item.name)[1] for item in items], train, valid, kind="breed")
    block = DataBlock(
        blocks=(ImageBlock, CategoryBlock),
        splitter=IndexSplitter(valid),
        get_y=using_attr(RegexLabeller(PETS_PATTERN), "name"),
        item_tfms=Resize(presize),  # PILImage opens every file as RGB: palette, RGBA and grey files included
        batch_tfms=[*aug_transforms(size=size, min_scale=min_scale), Normalize.from_stats(*imagenet_stats)],
    )
    kwargs = {} if num_workers is None else {"num_workers": num_workers}
    return block.dataloaders(items, bs=bs, **kwargs)


def resolve_arch(arch: str | Callable) -> Callable | str:
    """A torchvision architecture for a name torchvision knows (fastai's model_meta applies); other names go to timm.

    Parameters
    ----------
    arch : str or callable
        A torchvision model name, a timm model name, or an architecture function (returned as it is).

    Returns
    -------
    callable or str
        The torchvision function, or the timm name (which fastai's `vision_learner` builds with timm).

    Examples
    --------
    >>> resolve_arch("resnet34") is torchvision.models.resnet34
    True
    """
    if not isinstance(arch, str):
        return arch
    if arch in torchvision.models.list_models(module=torchvision.models):
        return getattr(torchvision.models, arch)
    try:
        import timm
    except ImportError:
        raise ValueError(f"unknown architecture {arch!r}: not a torchvision model, and timm (which fastai uses for "
                         "other names) is not installed") from None
    if not timm.is_model(arch):
        raise ValueError(f"unknown architecture {arch!r}: neither a torchvision nor a timm model")
    return arch


def pretrained_weights_file(arch: Callable | str) -> Path | None:
    """Where torch's cache keeps the default ImageNet weights of a torchvision `arch` (None if unknown).

    Parameters
    ----------
    arch : callable or str
        A torchvision architecture function or name.

    Returns
    -------
    Path or None

    Examples
    --------
    >>> pretrained_weights_file(torchvision.models.resnet34).name
    'resnet34-b627a593.pth'
    """
    import torch.hub

    try:
        name = arch if isinstance(arch, str) else arch.__name__
        url = torchvision.models.get_model_weights(name).DEFAULT.url
    except (ValueError, KeyError, AttributeError):
        return None
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


def pets_learner(
    path: str | Path | None = None,
    arch: str | Callable = "resnet34",
    eps: float = 0.1,
    smoothing: str = "uniform",
    bs: int = 64,
    presize: int = 460,
    size: int = 224,
    min_scale: float = 0.75,
    valid_pct: float = 0.2,
    seed: int = 42,
    pretrained: bool = True,
    lr: float = 3e-3,
    calibration: bool = True,
    num_workers: int | None = None,
    **kwargs,
) -> Learner:
    """A `vision_learner` on Oxford-IIIT Pets with label smoothing and calibration tracking: the classic fastai
    example (`pets_learner().fit_one_cycle(4)`).

    Bad data fails before any model is built, with one message naming the problem: no data (and no network), a
    file name that gives no breed, a split too small for one training batch or with a breed only in validation,
    missing pretrained weights.

    Parameters
    ----------
    path : str or Path, optional
        The extracted Pets folder or its `images/`. None: `untar_data(URLs.PETS)` (see `pets_images`). To try the
        pipeline offline, pass a generated tree: `path=make_pets_like_tree(folder)`, with `bs=8`.
    arch : str or callable, default 'resnet34'
        A torchvision name (fastai's splits and statistics apply), a timm name, or an architecture function.
    eps : float, default 0.1
        Label smoothing (0: plain cross-entropy, the baseline).
    smoothing : {'uniform', 'others'}, default 'uniform'
        How the smoothing mass is spread, see `LabelSmoothingCrossEntropy`.
    bs : int, default 64
        Batch size. The training set must hold at least one batch.
    presize : int, default 460
        Per-item resize before the batch augmentations crop `size` from it.
    size : int, default 224
        Training image size.
    min_scale : float, default 0.75
        Smallest random crop, as a share of the image.
    valid_pct : float, default 0.2
        Share of images held out for validation.
    seed : int, default 42
        Seed of the random split.
    pretrained : bool, default True
        ImageNet weights, from torch's cache or downloaded. Missing and offline: an error, never random weights.
    lr : float, default 3e-3
        fastai v1's default, which the classic `fit_one_cycle(4)` ran with (v2's is 1e-3).
    calibration : bool, default True
        Add a `CalibrationCallback` (the `ece` column, `learn.calibration`, reliability diagrams).
    num_workers : int, optional
        DataLoader workers (None: fastai's default).
    **kwargs
        Passed on to fastai's `vision_learner`.

    Returns
    -------
    Learner

    Examples
    --------
    >>> learn = pets_learner()          # doctest: +SKIP
    >>> learn.fit_one_cycle(4)          # doctest: +SKIP
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as folder:  # offline: 32 generated images of 4 "breeds"
    ...     learn = pets_learner(path=make_pets_like_tree(folder), arch="resnet18", pretrained=False, bs=8)
    ...     learn.dls.c
    4
    """
    dls = pets_dataloaders(pets_images(path), bs=bs, presize=presize, size=size, min_scale=min_scale,
                           valid_pct=valid_pct, seed=seed, num_workers=num_workers)
    arch = resolve_arch(arch)
    cbs = [CalibrationCallback()] if calibration else []
    loss_func = LabelSmoothingCrossEntropy(eps, smoothing=smoothing)
    try:
        return vision_learner(dls, arch, pretrained=pretrained, loss_func=loss_func, metrics=error_rate, lr=lr,
                              cbs=cbs, **kwargs)
    except OSError as err:  # offline and the weights are not in torch's cache
        if not pretrained:
            raise
        cached = pretrained_weights_file(arch)
        where = f"the cache file {cached}" if cached else "torch's cache"
        name = getattr(arch, "__name__", arch)
        raise FileNotFoundError(f"pretrained weights for {name!r} are not in {where} and could not be downloaded "
                                f"({err}). Put them there, or pass pretrained=False (fastai-ls pets "
                                f"--no-pretrained) to train from scratch.") from err


def make_pets_like_tree(
    folder: str | Path,
    breeds: tuple[str, ...] = ("Abyssinian", "Egyptian_Mau", "beagle", "american_pit_bull_terrier"),
    per_breed: int = 8,
    size: int = 48,
    seed: int = 0,
) -> Path:
    """A small generated tree laid out like the Pets archive, for trying the real pipeline offline
    (`pets_learner(path=make_pets_like_tree(folder), pretrained=False, bs=8)`, or `fastai-ls pets --path`).

    It has the archive's quirks: a `.mat` decoy, and grey, palette and RGBA images named `.jpg`. Each breed has its
    own colour, so it is learnable. With the defaults, 32 images: 26 train and 6 validate, so use `bs` of at most 26.

    Parameters
    ----------
    folder : str or Path
        Where to write `images/` (created if needed).
    breeds : tuple of str
        The breed names, as in Pets file names (underscores allowed).
    per_breed : int, default 8
        Images per breed.
    size : int, default 48
        Image side in pixels.
    seed : int, default 0
        Seed of the colours and the noise.

    Returns
    -------
    Path
        `folder`, which holds `images/`.

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     sorted(p.name for p in (make_pets_like_tree(folder) / "images").iterdir())[:3]
    ['Abyssinian_1.jpg', 'Abyssinian_2.jpg', 'Abyssinian_3.jpg']
    """
    rng = np.random.default_rng(seed)
    images = Path(folder) / "images"
    images.mkdir(parents=True, exist_ok=True)
    for b, breed in enumerate(breeds):
        colour = rng.integers(0, 256, 3)
        for i in range(1, per_breed + 1):
            pixels = np.clip(colour + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
            img = Image.fromarray(pixels)
            if b == 0 and i == 1:
                img = img.convert("L")  # a greyscale JPEG
            if b in (1, 2) and i == 1:  # PNG content named .jpg: a palette image, an RGBA image
                img.convert("P" if b == 1 else "RGBA").save(images / f"{breed}_{i}.jpg", format="PNG")
                continue
            img.save(images / f"{breed}_{i}.jpg", quality=90)
    (images / f"{breeds[0]}_{per_breed + 1}.mat").write_bytes(b"MATLAB 5.0 MAT-file decoy")
    return images.parent
