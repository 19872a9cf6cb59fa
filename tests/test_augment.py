import torch
from PIL import Image

from moco.augment import Normalize, TwoCropsTransform, moco_augmentation
from moco.data import UnlabeledImages


def _image() -> Image.Image:
    g = torch.Generator().manual_seed(0)
    return Image.fromarray(torch.randint(0, 256, (224, 224, 3), dtype=torch.uint8, generator=g).numpy())


def test_two_crops_are_different_views_with_expected_shape_and_dtype():
    for aug_plus in (True, False):
        torch.manual_seed(0)
        q, k = TwoCropsTransform(moco_augmentation(64, aug_plus))(_image())
        assert q.shape == k.shape == (3, 64, 64)
        assert q.dtype == k.dtype == torch.uint8
        assert not torch.equal(q, k)


def test_views_depend_on_seed_epoch_and_index_only(tmp_path):
    for i in range(2):
        _image().save(tmp_path / f"{i}.PNG")
    paths = sorted(tmp_path.glob("*.PNG"))
    dataset = UnlabeledImages(paths, TwoCropsTransform(moco_augmentation(32)), seed=7)
    torch.manual_seed(123)
    a = dataset[(3, 1)]
    torch.manual_seed(456)  # the caller's RNG does not leak into the sample ...
    b = dataset[(3, 1)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    state = torch.get_rng_state()
    dataset[(3, 1)]
    assert torch.equal(state, torch.get_rng_state())  # ... and the sample does not disturb the caller's RNG
    c = dataset[(4, 1)]  # another epoch, other views
    assert not torch.equal(a[0], c[0])
    other_seed = UnlabeledImages(paths, TwoCropsTransform(moco_augmentation(32)), seed=8)[(3, 1)]
    assert not torch.equal(a[0], other_seed[0])


def test_device_normalisation_matches_imagenet_normalisation():
    x = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    out = Normalize(memory_format=torch.channels_last)(x)
    assert out.dtype == torch.float32 and out.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(out, (x.float() / 255 - mean) / std, atol=1e-5)
