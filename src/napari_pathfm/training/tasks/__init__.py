"""One module per task family; each exposes ``build(recipe) -> (LightningModule, LightningDataModule, card)``.

The LightningModule keeps the registry model as ``.model`` (exported at the end of
training); ``card`` holds the model-card fields the family knows (classes,
normalisation, tile size, µm/px, training data). Each family's spec names its module
(``FamilySpec.training`` in :mod:`napari_pathfm.families`); the engine finds it by the
recipe's ``family``.
"""
