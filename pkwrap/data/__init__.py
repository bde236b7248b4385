"""Data preparation helpers: waveform augmentation (:mod:`pkwrap.data.augment`)."""
