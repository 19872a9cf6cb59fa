import pytest
from PIL import Image

from moco.data import EpochSampler, UnlabeledImages, find_unlabeled_images


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


def test_corrupt_image_error_names_the_file(tmp_path):
    _write_pngs(tmp_path, [0])
    (tmp_path / "1.PNG").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    dataset = UnlabeledImages(find_unlabeled_images(tmp_path), transform=lambda im: im)
    assert dataset[(0, 0)].size == (8, 8)
    with pytest.raises(RuntimeError, match=r"1\.PNG: cannot read image"):
        dataset[(0, 1)]


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
    from moco.images import number_key

    assert sorted(["10.PNG", "2.PNG", "b.png", "1.jpeg", "a.png"], key=number_key) == [
        "1.jpeg", "2.PNG", "10.PNG", "a.png", "b.png"]
