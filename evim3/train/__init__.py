"""evim3.train: MAE pre-training, EF / classification fine-tuning and evaluation.

- ``recipe``: ``TrainConfig`` (the paper's recipe as defaults), optimizer, learning-rate schedule, EMA.
- ``loop``: ``Trainer`` / ``train(cfg)``, the one loop both stages run (resumable, multi-process).
- ``tasks``: which task a run trains (``make_task``; the tasks themselves are evim3.tasks) and ``--init``.
- ``sampling``: epoch order and per-item seeds that make a resumed run continue exactly.
- ``state``: the resume file (``last.state.pt``): tensors and plain containers only.
- ``distributed``: torchrun / DistributedDataParallel helpers.
- ``metrics``: MAE, RMSE, R^2 with bootstrap intervals; AUC and accuracy.
- ``evaluate``: ``evim3 eval``: loads a checkpoint and runs its task's evaluation (predictions, metrics, plots).
- ``logging``: CSV log, TensorBoard when installed, progress bar and the end-of-run summary.

Import submodules directly; this package imports nothing itself.
"""
