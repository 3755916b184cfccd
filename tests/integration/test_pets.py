"""`pets_learner` on a generated Pets-shaped tree, through the real `untar_data` and torchvision weight cache."""

from __future__ import annotations

import inspect
import urllib.request
from urllib.error import URLError

import fastdownload
import pytest
import torch
import torch.hub
import torchvision
from fastai.data.external import fastai_cfg, fastai_path
from fastai.data.transforms import RandomSplitter, get_image_files
from PIL import Image

from fastai_ls import CalibrationCallback, LabelSmoothingCrossEntropy, pets_learner
from fastai_ls.pets import make_pets_like_tree

SMALL = dict(pretrained=False, presize=40, size=32, bs=8, num_workers=0)


def offline(*args, **kwargs):
    raise URLError("network is unreachable (test)")


@pytest.fixture
def homes(tmp_path, monkeypatch):
    """Empty FASTAI_HOME and TORCH_HOME, and no network for fastai's or torch's downloads."""
    monkeypatch.setenv("FASTAI_HOME", str(tmp_path / "fastai"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(fastdownload.FastDownload, "download", offline)
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    monkeypatch.setattr(urllib.request, "urlopen", offline)  # the reachability check before a Pets download
    fastai_cfg.cache_clear()  # fastai reads FASTAI_HOME once per process and caches the config
    yield tmp_path
    fastai_cfg.cache_clear()


@pytest.fixture
def pets_home(homes):
    """A Pets-shaped tree where `untar_data(URLs.PETS)` finds an extracted copy."""
    make_pets_like_tree(fastai_path("data") / "oxford-iiit-pet")
    return homes


def test_defaults_reproduce_the_classic_example():
    defaults = {k: p.default for k, p in inspect.signature(pets_learner).parameters.items() if p.default is not p.empty}
    assert defaults == dict(path=None, arch="resnet34", eps=0.1, smoothing="uniform", bs=64, presize=460, size=224,
                            min_scale=0.75, valid_pct=0.2, seed=42, pretrained=True, lr=3e-3, calibration=True,
                            num_workers=None)


@pytest.mark.slow
def test_untar_data_finds_the_extracted_tree_and_one_epoch_trains(pets_home):
    learn = pets_learner(arch="resnet18", **SMALL)
    # breed names keep their case and their underscores; the .mat decoy is skipped
    assert list(learn.dls.vocab) == ["Abyssinian", "Egyptian_Mau", "american_pit_bull_terrier", "beagle"]
    assert len(learn.dls.train_ds) + len(learn.dls.valid_ds) == 32
    assert isinstance(learn.loss_func, LabelSmoothingCrossEntropy) and learn.loss_func.eps == 0.1
    assert learn.lr == 3e-3 and any(isinstance(cb, CalibrationCallback) for cb in learn.cbs)
    with learn.no_bar(), learn.no_logging():
        learn.fit_one_cycle(1)
    assert torch.isfinite(torch.tensor(learn.recorder.values[-1])).all()


def test_grey_palette_and_rgba_files_load_as_rgb(pets_home):
    learn = pets_learner(arch="resnet18", **SMALL)
    # a grey JPEG, and PNG palette and RGBA content named .jpg
    odd = {"Abyssinian_1.jpg": "L", "Egyptian_Mau_1.jpg": "P", "beagle_1.jpg": "RGBA"}
    for ds in (learn.dls.train_ds, learn.dls.valid_ds):
        for i, item in enumerate(ds.items):
            if item.name in odd:
                assert Image.open(item).mode == odd.pop(item.name)
                image, _ = ds[i]
                assert image.mode == "RGB" and image.getbands() == ("R", "G", "B")
    assert not odd, f"not in the data set: {odd}"
    xb, _ = learn.dls.one_batch()
    assert xb.shape[1:] == (3, 32, 32)


@pytest.mark.slow
@pytest.mark.parametrize("sub", ["", "images"])
def test_path_may_name_the_extracted_folder_or_its_images(homes, sub):
    root = make_pets_like_tree(homes / "my_pets")
    learn = pets_learner(path=root / sub, arch="resnet18", eps=0.0, calibration=False, **SMALL)
    assert learn.dls.c == 4 and learn.loss_func.eps == 0.0
    assert not any(isinstance(cb, CalibrationCallback) for cb in learn.cbs)


def test_missing_data_offline_is_one_clear_error(homes):
    with pytest.raises(FileNotFoundError) as err:
        pets_learner(**SMALL)
    message = str(err.value)
    assert "oxford-iiit-pet" in message and "fast-ai-imageclas/oxford-iiit-pet.tgz" in message
    assert "path=" in message


def test_a_folder_without_images_is_a_clear_error(homes):
    (homes / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no Pets images"):
        pets_learner(path=homes / "empty", **SMALL)


def test_a_tree_too_small_for_one_batch_is_refused_with_the_reason(homes):
    # 26 training images and fastai's training DataLoader drops the last partial batch: no batch of 64 at all
    # (fit used to warn "Your generator is empty" and record train_loss nan).
    with pytest.raises(ValueError) as err:
        pets_learner(path=make_pets_like_tree(homes / "tree"), pretrained=False)
    assert str(err.value) == ("no training batch: the training set has 26 images, fewer than one batch (bs=64), and "
                              "fastai drops the last partial training batch. Pass a smaller bs (at most 26) or use "
                              "more images.")
    learn = pets_learner(path=homes / "tree", arch="resnet18", **{**SMALL, "bs": 26})
    assert len(learn.dls.train) == 1


def test_a_breed_whose_images_all_fall_into_validation_is_refused_before_training(homes):
    # fastai takes the vocabulary from the training labels: the split trained a whole epoch, then the first
    # validation batch failed with "KeyError: Label 'zebu' was not included in the training dataset", a traceback.
    images = make_pets_like_tree(homes / "tree") / "images"
    Image.new("RGB", (48, 48), (200, 100, 0)).save(images / "zebu_1.jpg")
    items = get_image_files(images)
    seed = next(s for s in range(100)
                if any(items[i].name == "zebu_1.jpg" for i in RandomSplitter(0.2, seed=s)(items)[1]))
    with pytest.raises(ValueError, match=r"^breed 'zebu' has no training image: its one image is in the validation "
                                         r"set; .* change the split \(seed, valid_pct\)$"):
        pets_learner(path=images, seed=seed, **SMALL)


def test_files_not_named_like_pets_images_are_named_in_the_error(homes):
    photos = homes / "photos"
    photos.mkdir()
    for name in ["IMG_0042.jpg", "beach.jpg", "holiday.png"]:
        Image.new("RGB", (20, 20)).save(photos / name)
    with pytest.raises(ValueError) as err:
        pets_learner(path=photos, **SMALL)
    assert str(err.value).startswith(f"{photos / 'beach.jpg'} is not named <breed>_<n>.jpg like the Oxford-IIIT "
                                     "Pets images")
    assert "(2 of 3 images do not match)" in str(err.value)
    for name in ["beach.jpg", "holiday.png"]:
        (photos / name).unlink()
    Image.new("RGB", (20, 20)).save(photos / "IMG_0043.jpg")
    with pytest.raises(ValueError, match=r"every image is named IMG_<n>\.jpg .* needs two breeds or more"):
        pets_learner(path=photos, **SMALL)


def test_missing_weights_offline_name_the_cache_file_and_pretrained_false(pets_home):
    with pytest.raises(FileNotFoundError) as err:
        pets_learner(**{**SMALL, "pretrained": True})
    message = str(err.value)
    assert "resnet34-b627a593.pth" in message and "pretrained=False" in message


def test_unknown_architecture_is_one_clear_error(pets_home):
    with pytest.raises(ValueError, match="unknown architecture 'resnet_typo'"):
        pets_learner(arch="resnet_typo", **SMALL)


def test_cached_weights_load_with_no_network(pets_home):
    weights = torchvision.models.resnet18().state_dict()
    cache = pets_home / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(weights, cache / "resnet18-f37072fd.pth")
    learn = pets_learner(arch="resnet18", **{**SMALL, "pretrained": True})
    torch.testing.assert_close(learn.model[0][0].weight, weights["conv1.weight"])
