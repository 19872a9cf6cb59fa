import torch
import torch.nn.functional as F

from moco.probe import knn_top1, load_crops


def test_knn_separates_clustered_features_and_not_shuffled_labels():
    torch.manual_seed(0)
    centres = F.normalize(torch.randn(4, 16), dim=1)
    train_y, test_y = torch.arange(4).repeat(10), torch.arange(4).repeat(5)
    train = F.normalize(centres[train_y] + 0.1 * torch.randn(40, 16), dim=1)
    test = F.normalize(centres[test_y] + 0.1 * torch.randn(20, 16), dim=1)
    assert knn_top1(train, train_y, test, test_y, k=5) == 1.0
    shuffled = train_y[torch.randperm(40)]
    assert knn_top1(train, shuffled, test, test_y, k=5) < 0.8


def test_crops_follow_the_label_boxes(tiny_data):
    crops, names = load_crops(tiny_data / "labeled", "validation", size=24)
    assert crops.dtype == torch.uint8 and crops.shape[1:] == (3, 24, 24)
    assert len(names) == crops.shape[0] >= 16  # every validation image holds at least one object
