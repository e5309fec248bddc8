"""HistoKT toolkit: standardise small histology data sets, transfer between them, distil encoders.

- :mod:`.standardize` — rescale to one µm/px, 272 px crops, reflection wrap, low-contrast filter, splits by
  source image (numpy/PIL/scikit-image only).
- :mod:`.distill` — weight distillation of several checkpoints of one architecture by SVD of stacked filters.
- :mod:`.transfer` — the cross-transfer grid (scratch / fine-tune / deep-tune) over the classify engine, with
  the HistoKT table (CSV + heatmap).
- :mod:`.tsne` — t-SNE of encoder features coloured by class and data set.

Import the submodules directly; this package imports nothing heavy.
"""
