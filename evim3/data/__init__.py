"""evim3.data: datasets for training and evaluation.

- ``evim3.data.synth``: the built-in synthetic echo dataset in the EchoNet-Dynamic layout (numpy and PyAV
  only; ``evim3 data synth``).
- ``evim3.data.echonet``: ``EchoNetDataset``, EF regression on EchoNet-Dynamic or the synthetic dataset.
- ``evim3.data.classification``: ``VideoClassificationDataset``, videos listed in a CSV with class labels.
- ``evim3.data.stats``: ``compute_mean_std``, normalisation constants from a sample of training videos.
- ``evim3.data.tables``: reading FileList.csv / VolumeTracings.csv and the label rules (torch-free).
- ``evim3.data.check``: ``check_dataset``, what ``evim3 data check`` reports (torch-free).

The datasets turn pixels into model input only through ``evim3.runtime.preprocess``, the same code the
edge runtime runs. Import submodules directly: this package imports nothing, so ``synth``, ``tables`` and
``check`` stay torch-free.
"""

# Zero padding of TRAIN clips before the random crop back to size, pixels (the paper's augmentation): the
# datasets' default and `evim3 train --pad`'s.
CROP_PAD = 12
