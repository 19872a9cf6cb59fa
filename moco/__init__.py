"""MoCo v2 (He et al. 2020; Chen et al. 2020): a ResNet backbone learned from unlabeled images.

The method, in this folder: ``builder`` (the MoCo model: encoder_q, encoder_k, the queue, InfoNCE), ``batchnorm``
(split BatchNorm for one process), ``augment`` and ``data`` (the two views of an unlabeled image), ``backbone``
(the torchvision ResNet both stages share), ``train`` (pretraining), ``probe`` (the kNN probe) and ``export``
(the backbone for detection).

Two sub-packages that both trainers, this one and ``demo/``'s detector, use:
- ``moco.runtime``: what keeps a cluster job alive and honest: processes, devices and precision, checkpoints,
  stop signals, run identity and locks, logs and metrics, exit statuses, the preflight.
- ``moco.course``: the course dataset's files: image files, the labeled layout and its problems, the class list,
  and the synthetic tiny set in the same layout.
"""
