import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from torchvision import transforms as T

from moco.augment import ColorJitter, GaussianBlur, Normalize, TwoCropsTransform, moco_augmentation
from moco.course.images import load_rgb
from moco.data import UnlabeledImages, find_unlabeled_images


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
    assert isinstance(color, ColorJitter)
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
    assert isinstance(color, ColorJitter)
    assert (color.brightness, color.contrast, color.saturation, color.hue) == ((0.6, 1.4), (0.6, 1.4), (0.6, 1.4),
                                                                             (-0.4, 0.4))
    assert isinstance(flip, T.RandomHorizontalFlip) and isinstance(to_tensor, T.PILToTensor)


def test_blur_draws_its_radius_within_the_range():
    image = _image()
    for radius in (0.5, 1.5):
        blurred = image.filter(ImageFilter.GaussianBlur(radius))
        assert GaussianBlur((radius, radius))(image).tobytes() == blurred.tobytes()


@pytest.fixture(scope="module")
def crops(tiny_data) -> list[Image.Image]:
    """224-pixel crops of the tiny set's unlabeled scenes: the colours the jitter meets in the demo."""
    torch.manual_seed(0)
    crop = T.RandomResizedCrop(224, scale=(0.2, 1.0))
    return [crop(load_rgb(path)) for path in find_unlabeled_images(tiny_data / "train")[:48]]


def _jitter_both(jitter_args, image, seed):
    """Ours and torchvision's on one image with the same seed; also whether both left torch's RNG alike."""
    torch.manual_seed(seed)
    ours = np.asarray(ColorJitter(*jitter_args)(image), dtype=np.int16)
    after_ours = torch.get_rng_state()
    torch.manual_seed(seed)
    theirs = np.asarray(T.ColorJitter(*jitter_args)(image), dtype=np.int16)
    return ours, theirs, torch.equal(after_ours, torch.get_rng_state())


@pytest.mark.parametrize("hue, mean_bound, worst_bound", [(0.0, 2.5, 10), (0.1, 5.5, 20), (0.4, 6.5, 25)])
def test_jitter_draws_as_torchvision_and_stays_close_to_its_output(crops, hue, mean_bound, worst_bound):
    """The same factors in the same order from the same seed, so the rest of the pipeline draws as before; per
    pixel, within a few levels of 255 (measured: 1.7 without hue, where only the clipping between torchvision's
    steps differs; 4.1 at aug+'s hue 0.1, 4.8 at MoCo v1's 0.4)."""
    errors = []
    for seed, image in enumerate(crops):
        ours, theirs, same_draws = _jitter_both((0.4, 0.4, 0.4, hue), image, seed)
        assert same_draws
        errors.append(np.abs(ours - theirs).mean())
    assert np.mean(errors) < mean_bound and max(errors) < worst_bound, (np.mean(errors), max(errors))


def test_each_adjustment_alone_is_torchvisions_where_nothing_clips():
    """Mid-range colours, one adjustment at a time: equal to torchvision's to rounding."""
    g = torch.Generator().manual_seed(0)
    image = Image.fromarray(torch.randint(90, 166, (32, 32, 3), dtype=torch.uint8, generator=g).numpy())
    for args in [(0.4, 0, 0, 0), (0, 0.4, 0, 0), (0, 0, 0.4, 0)]:
        for seed in range(8):
            ours, theirs, _ = _jitter_both(args, image, seed)
            assert np.abs(ours - theirs).max() <= 1, (args, seed)


def test_hue_turns_primaries_into_each_other_at_thirds_of_a_turn_and_keeps_grey():
    """A third of a turn takes red to green (HSV's direction) and a third back takes it to blue, exactly as an
    HSV shift does (torchvision's own is 8-bit in H and off by up to 5 levels here); grey stays grey."""
    primaries = np.array([[[200, 30, 30], [30, 200, 30], [30, 30, 200], [128, 128, 128]]], dtype=np.uint8)
    image = Image.fromarray(primaries)
    for turns, shift in ((1 / 3, -1), (-1 / 3, 1)):  # red, green, blue -> green, blue, red (or blue, red, green)
        out = np.asarray(ColorJitter(hue=(turns, turns))(image))  # a degenerate range: exactly ``turns``
        assert out[0, :3].tolist() == np.roll(primaries[0, :3], shift, axis=0).tolist(), turns
        theirs = np.asarray(T.functional.adjust_hue(image, turns), dtype=np.int16)
        assert np.abs(out.astype(np.int16) - theirs).max() <= 5
    for hue in (0.05, -0.1):  # small turns move red towards yellow (+) or magenta (-), as HSV does
        out = np.asarray(ColorJitter(hue=(hue, hue))(image), dtype=np.int16)
        assert (out[0, 0, 1] > out[0, 0, 2]) == (hue > 0)
        assert out[0, 3].tolist() == [128, 128, 128]


def test_augmentation_statistics_match_torchvisions_jitter(crops):
    """aug+ views with our jitter and with torchvision's, same seeds: the views' brightness, contrast and colour
    saturation are distributed alike (means over 96 views within a level or two of 255)."""
    ours_pipeline, theirs_pipeline = moco_augmentation(224), moco_augmentation(224)
    theirs_pipeline.transforms[1].transforms[0] = T.ColorJitter(0.4, 0.4, 0.4, 0.1)

    def statistics(pipeline) -> np.ndarray:
        rows = []
        for seed in range(96):
            torch.manual_seed(seed)
            view = pipeline(crops[seed % len(crops)]).double()
            rows.append([view.mean(), view.std(), (view.amax(0) - view.amin(0)).mean()])
        return np.array(rows)

    ours, theirs = statistics(ours_pipeline), statistics(theirs_pipeline)
    assert np.abs(ours.mean(0) - theirs.mean(0)).max() < 2.0, (ours.mean(0), theirs.mean(0))
    assert np.abs(ours.std(0) - theirs.std(0)).max() < 2.0, (ours.std(0), theirs.std(0))


def test_images_other_than_rgb_take_torchvisions_path():
    grey = Image.fromarray(np.full((8, 8), 100, dtype=np.uint8), "L")
    torch.manual_seed(0)
    ours = ColorJitter(0.4, 0.4, 0.4, 0.1)(grey)
    torch.manual_seed(0)
    assert ours.mode == "L" and ours.tobytes() == T.ColorJitter(0.4, 0.4, 0.4, 0.1)(grey).tobytes()
