"""What keeps a training job alive on a shared cluster, for MoCo's pretraining and the detector's stages alike.

Processes and hardware: ``distributed`` (torchrun, Slurm or one process), ``devices``, ``precision``, ``workers``
(data-loading workers that outlive Slurm's signals), ``doctor`` and ``exercise`` (the preflight). Not losing work:
``checkpoint`` (atomic writes), ``preemption`` (stop at a step, exit to be requeued), ``runs`` and ``runlock``
(which run a directory holds, one job at a time), ``unreadable`` (bad images replaced and counted), ``failures``
(exit statuses, non-finite losses). Telling what happened: ``logger``, ``metrics``, ``progress``.
"""
