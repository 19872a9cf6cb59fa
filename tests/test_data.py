import pytest
import torch
from PIL import Image

from moco.data import EpochSampler, UnlabeledImages, find_unlabeled_images, sample_seed


def _write_pngs(folder, numbers):
    folder.mkdir(parents=True, exist_ok=True)
    for n in numbers:
        Image.new("RGB", (8, 8), (n, 0, 0)).save(folder / f"{n}.PNG")


@pytest.mark.parametrize("given", ["root", "train", "unlabeled"])
def test_finds_unsquashed_layout_from_any_level(tmp_path, given):
    _write_pngs(tmp_path / "train" / "unlabeled", [0, 1, 2, 10, 11])
    start = {"root": tmp_path, "train": tmp_path / "train", "unlabeled": tmp_path / "train" / "unlabeled"}[given]
    paths = find_unlabeled_images(start)
    assert [p.name for p in paths] == ["0.PNG", "1.PNG", "2.PNG", "10.PNG", "11.PNG"]  # numeric, not lexical


def test_missing_or_empty_folder_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope: no such directory"):
        find_unlabeled_images(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty: no \.PNG/\.JPEG images found"):
        find_unlabeled_images(tmp_path / "empty")


def truncate_png(path):
    """A PNG cut in the middle of its pixels: the header reads, the image does not decode."""
    noise = torch.randint(0, 256, (64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    Image.fromarray(noise.numpy()).save(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _write_broken(folder):
    """Images 0..7 with 2 truncated, 3 empty, 4 a text file, 7 truncated: replaced by 5, 5, 5 and (wrapping) 0."""
    _write_pngs(folder, range(8))
    truncate_png(folder / "2.PNG")
    (folder / "3.PNG").write_bytes(b"")
    (folder / "4.PNG").write_text("not an image\n")
    truncate_png(folder / "7.PNG")
    return {2: 5, 3: 5, 4: 5, 7: 0}


def test_an_unreadable_image_is_the_next_readable_one_with_its_own_seed(tmp_path):
    replaced_by = _write_broken(tmp_path)

    def colour_and_draw(image):  # which image was read, and a draw from the sample's seed
        return image.getpixel((0, 0))[0], torch.rand(1).item()

    dataset = UnlabeledImages(find_unlabeled_images(tmp_path), colour_and_draw, seed=3)
    for index in range(8):
        (colour, draw), failed, error = dataset[(1, index)]
        assert colour == replaced_by.get(index, index)
        assert draw == torch.rand(1, generator=torch.Generator().manual_seed(sample_seed(3, 1, index))).item()
        if index in replaced_by:
            assert failed == index and error.startswith(f"{tmp_path / f'{index}.PNG'}: cannot read image: ")
        else:
            assert (failed, error) == (-1, "")


def test_sampler_shards_are_disjoint_equal_and_change_per_epoch():
    shards = [list(EpochSampler(10, rank=r, world_size=3, seed=1)) for r in range(3)]
    assert all(len(s) == 3 for s in shards)  # 10 // 3, tail dropped so ranks step together
    indices = [i for s in shards for _, i in s]
    assert len(set(indices)) == 9
    sampler = EpochSampler(10, seed=1)
    first = [i for _, i in sampler]
    assert sorted(first) == list(range(10))
    sampler.set_epoch(1)
    second = list(sampler)
    assert {e for e, _ in second} == {1}
    assert [i for _, i in second] != first
    assert list(EpochSampler(10, seed=1)) == list(EpochSampler(10, seed=1))


def test_numeric_order_puts_numbered_files_first():
    from moco.course.images import number_key

    assert sorted(["10.PNG", "2.PNG", "b.png", "1.jpeg", "a.png"], key=number_key) == [
        "1.jpeg", "2.PNG", "10.PNG", "a.png", "b.png"]
