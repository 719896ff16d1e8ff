"""Research tooling around the layer library: data, training, sweeps, paper numbers and tables,
reports, class activation maps and plots. Needs the ``train`` extra (``pip install gpconv[train]``:
numpy, pillow, tqdm, matplotlib, pyyaml) on top of torch."""

# The names only (numpy-free, so the CLI lists them with torch alone); the loaders are in .data.
PAPER_DATASETS = ("oxford_pets", "malaria", "colorectal_histology", "cropped_plantdoc")
DATASETS = ("cifar10", "cifar100", "folder", "synthetic") + PAPER_DATASETS
