"""Research tooling around the layer library: data, training, sweeps, paper numbers and tables,
reports, class activation maps and plots. Needs the ``train`` extra (``pip install gpconv[train]``:
numpy, pillow, tqdm, matplotlib, pyyaml) on top of torch."""
