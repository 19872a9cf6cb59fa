import torch
from PIL import Image, ImageFilter
from torchvision import transforms as T

from moco.augment import GaussianBlur, Normalize, TwoCropsTransform, moco_augmentation
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
    a, _, _ = dataset[(3, 1)]
    torch.manual_seed(456)  # the caller's RNG does not leak into the sample ...
    b, _, _ = dataset[(3, 1)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    state = torch.get_rng_state()
    dataset[(3, 1)]
    assert torch.equal(state, torch.get_rng_state())  # ... and the sample does not disturb the caller's RNG
    c, _, _ = dataset[(4, 1)]  # another epoch, other views
    assert not torch.equal(a[0], c[0])
    other_seed = UnlabeledImages(paths, TwoCropsTransform(moco_augmentation(32)), seed=8)[(3, 1)][0]
    assert not torch.equal(a[0], other_seed[0])


def test_device_normalisation_matches_imagenet_normalisation():
    x = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    out = Normalize(memory_format=torch.channels_last)(x)
    assert out.dtype == torch.float32 and out.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(out, (x.float() / 255 - mean) / std, atol=1e-5)


def test_moco_v2_and_v1_recipes_as_published():
    """The augmentations of MoCo v2 (Chen et al. 2020, after SimCLR) and v1 (He et al. 2020), parameter by
    parameter; the blur's sigma range (0.1, 2.0) is for 224-pixel crops and scales with the crop."""
    crop, jitter, gray, blur, flip, to_tensor = moco_augmentation().transforms  # defaults: 224 pixels, v2
    assert isinstance(crop, T.RandomResizedCrop) and crop.size == (224, 224) and crop.scale == (0.2, 1.0)
    assert isinstance(jitter, T.RandomApply) and jitter.p == 0.8
    [color] = jitter.transforms
    assert (color.brightness, color.contrast, color.saturation, color.hue) == ((0.6, 1.4), (0.6, 1.4), (0.6, 1.4),
                                                                             (-0.1, 0.1))
    assert isinstance(gray, T.RandomGrayscale) and gray.p == 0.2
    assert isinstance(blur, T.RandomApply) and blur.p == 0.5
    [gaussian] = blur.transforms
    assert isinstance(gaussian, GaussianBlur) and gaussian.sigma == (0.1, 2.0)
    assert isinstance(flip, T.RandomHorizontalFlip) and flip.p == 0.5
    assert isinstance(to_tensor, T.PILToTensor)
    small_blur = moco_augmentation(112).transforms[3].transforms[0]
    assert small_blur.sigma == (0.05, 1.0) and moco_augmentation(112).transforms[0].size == (112, 112)

    crop, gray, color, flip, to_tensor = moco_augmentation(64, aug_plus=False).transforms
    assert isinstance(crop, T.RandomResizedCrop) and crop.size == (64, 64) and crop.scale == (0.2, 1.0)
    assert isinstance(gray, T.RandomGrayscale) and gray.p == 0.2
    assert isinstance(color, T.ColorJitter)
    assert (color.brightness, color.contrast, color.saturation, color.hue) == ((0.6, 1.4), (0.6, 1.4), (0.6, 1.4),
                                                                             (-0.4, 0.4))
    assert isinstance(flip, T.RandomHorizontalFlip) and isinstance(to_tensor, T.PILToTensor)


def test_blur_draws_its_radius_within_the_range():
    image = _image()
    for radius in (0.5, 1.5):
        blurred = image.filter(ImageFilter.GaussianBlur(radius))
        assert GaussianBlur((radius, radius))(image).tobytes() == blurred.tobytes()
