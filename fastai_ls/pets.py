"""The classic fastai Oxford-IIIT Pets example (resnet34, 37 breeds) with label smoothing and calibration tracking."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

# Importing these registers `Learner.fit_one_cycle` and fastai's progress bars, as `fastai.vision.all` would.
import fastai.callback.progress  # noqa: F401
import fastai.callback.schedule  # noqa: F401
import numpy as np
import torchvision
from fastai.data.block import CategoryBlock, DataBlock
from fastai.data.external import URLs, fastai_path, untar_data
from fastai.data.transforms import Normalize, RandomSplitter, RegexLabeller, get_image_files
from fastai.learner import Learner
from fastai.metrics import error_rate
from fastai.vision.augment import Resize, aug_transforms
from fastai.vision.core import imagenet_stats
from fastai.vision.data import ImageBlock
from fastai.vision.learner import vision_learner
from fastcore.basics import using_attr
from PIL import Image

from fastai_ls.callback import CalibrationCallback
from fastai_ls.losses import LabelSmoothingCrossEntropy

# The breed is the file name up to the last `_<digits>.jpg`: breeds contain underscores (american_pit_bull_terrier).
PETS_PATTERN = r"^(.+)_\d+\.jpg$"


def pets_images(path: str | Path | None = None) -> Path:
    """The folder of Pets images: `path` (the extracted archive or its `images/`), else `untar_data(URLs.PETS)`."""
    if path is None:
        try:
            path = untar_data(URLs.PETS)
        except OSError as err:  # offline: fastdownload found no extracted copy and could not download the archive
            expected = fastai_path("data") / "oxford-iiit-pet"
            raise FileNotFoundError(
                f"Oxford-IIIT Pets is not in {expected} and could not be downloaded from {URLs.PETS} ({err}). "
                "Download and extract that archive there, or pass path= the extracted folder (holding images/)."
            ) from err
    path = Path(path).expanduser()
    images = path / "images" if (path / "images").is_dir() else path
    if not images.is_dir() or not get_image_files(images):
        raise FileNotFoundError(f"no Pets images in {images}: pass path= the extracted oxford-iiit-pet folder "
                                f"(holding images/) or its images/ folder")
    return images


def pets_dataloaders(
    images: Path,  # folder of `<breed>_<n>.jpg` files
    bs: int = 64,  # batch size
    presize: int = 460,  # per-item resize, larger than `size`, so the batch augmentations crop without black borders
    size: int = 224,  # training image size
    min_scale: float = 0.75,  # smallest random crop, as a share of the image
    valid_pct: float = 0.2,  # share of images held out for validation
    seed: int = 42,  # seed of the random split
    num_workers: int | None = None,  # DataLoader workers (None: fastai's default)
):
    """fastai's presizing pipeline for Pets: labels from file names, `Resize(presize)`, `aug_transforms(size)`."""
    block = DataBlock(
        blocks=(ImageBlock, CategoryBlock),
        get_items=get_image_files,  # .jpg and friends only: the archive's .mat files are skipped
        splitter=RandomSplitter(valid_pct, seed=seed),
        get_y=using_attr(RegexLabeller(PETS_PATTERN), "name"),
        item_tfms=Resize(presize),  # PILImage opens every file as RGB: palette, RGBA and grey files included
        batch_tfms=[*aug_transforms(size=size, min_scale=min_scale), Normalize.from_stats(*imagenet_stats)],
    )
    kwargs = {} if num_workers is None else {"num_workers": num_workers}
    return block.dataloaders(images, bs=bs, **kwargs)


def resolve_arch(arch: str | Callable) -> Callable | str:
    """A torchvision architecture for a name torchvision knows (fastai's model_meta applies); other names go to timm.

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
    """Where torch's cache keeps the default ImageNet weights of a torchvision `arch` (None if unknown)."""
    import torch.hub

    try:
        name = arch if isinstance(arch, str) else arch.__name__
        url = torchvision.models.get_model_weights(name).DEFAULT.url
    except (ValueError, KeyError, AttributeError):
        return None
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


def pets_learner(
    path: str | Path | None = None,  # extracted Pets folder (or its images/); None: `untar_data(URLs.PETS)`
    arch: str | Callable = "resnet34",  # a torchvision name, a timm name, or an architecture function
    eps: float = 0.1,  # label smoothing (0: plain cross-entropy, the baseline)
    smoothing: str = "uniform",  # 'uniform' or 'others', see `LabelSmoothingCrossEntropy`
    bs: int = 64,  # batch size
    presize: int = 460,  # per-item resize before augmentation
    size: int = 224,  # training image size
    min_scale: float = 0.75,  # smallest random crop
    valid_pct: float = 0.2,  # validation share
    seed: int = 42,  # seed of the random split
    pretrained: bool = True,  # ImageNet weights (from torch's cache, or downloaded)
    lr: float = 3e-3,  # fastai v1's default, which the classic `fit_one_cycle(4)` ran with (v2's is 1e-3)
    calibration: bool = True,  # add a `CalibrationCallback` (ECE column, reliability diagrams)
    num_workers: int | None = None,  # DataLoader workers (None: fastai's default)
    **kwargs,  # passed on to `vision_learner`
) -> Learner:
    """A `vision_learner` on Oxford-IIIT Pets with label smoothing and calibration tracking.

    >>> learn = pets_learner()          # doctest: +SKIP
    >>> learn.fit_one_cycle(4)          # doctest: +SKIP
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
                                f"({err}). Put them there, or pass pretrained=False to train from scratch.") from err


def make_pets_like_tree(
    folder: str | Path,  # where to write `images/` (and an `annotations/`-style decoy)
    breeds: tuple[str, ...] = ("Abyssinian", "Egyptian_Mau", "beagle", "american_pit_bull_terrier"),
    per_breed: int = 8,  # images per breed
    size: int = 48,  # image side in pixels
    seed: int = 0,
) -> Path:
    """A small generated tree laid out like the Pets archive, with its quirks (a .mat decoy, and grey, palette and
    RGBA images named .jpg), for trying the real pipeline offline. Each breed has its own colour, so it is learnable.
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
