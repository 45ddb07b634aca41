"""Data sets: FFJORD's 2-D toys with their true densities, scikit-learn's digits, the MAF
tabular benchmarks read from user-supplied files, and a loader for a user's own arrays.

Everything here is numpy (scikit-learn, pandas and h5py are imported only by the
loaders that need them) and nothing is downloaded at run time.
"""
from ._digits import (
    DIGITS_DIM,
    DIGITS_LEVELS,
    digits_bits_per_dim,
    digits_dequantize,
    digits_logit,
    load_digits,
)
from ._files import load_array
from ._images import (
    CIFAR10_RECORD_BYTES,
    IDX_IMAGES_MAGIC,
    IDX_LABELS_MAGIC,
    PIXEL_LEVELS,
    ImageData,
    ImageFileError,
    is_image_source,
    load_images,
)
from ._maf import (
    MAF_DIMS,
    MAF_FILES,
    MAF_ZENODO_URL,
    load_bsds300,
    load_gas,
    load_hepmass,
    load_maf,
    load_miniboone,
    load_power,
)
from ._split import Split
from ._toys import DatasetInfo, info, names, sample, true_entropy, true_log_prob

__all__ = [
    "names",
    "info",
    "sample",
    "true_log_prob",
    "true_entropy",
    "DatasetInfo",
    "Split",
    "load_digits",
    "digits_dequantize",
    "digits_logit",
    "digits_bits_per_dim",
    "DIGITS_LEVELS",
    "DIGITS_DIM",
    "load_maf",
    "load_power",
    "load_gas",
    "load_hepmass",
    "load_miniboone",
    "load_bsds300",
    "MAF_DIMS",
    "MAF_FILES",
    "MAF_ZENODO_URL",
    "load_array",
    "load_images",
    "is_image_source",
    "ImageData",
    "ImageFileError",
    "PIXEL_LEVELS",
    "IDX_IMAGES_MAGIC",
    "IDX_LABELS_MAGIC",
    "CIFAR10_RECORD_BYTES",
]
