"""One module per task family; each exposes ``build(recipe) -> (LightningModule, LightningDataModule, card)``.

The LightningModule keeps the registry model as ``.model`` (exported at the end of
training); ``card`` holds the model-card fields the family knows (classes,
normalisation, tile size, µm/px, training data). Families are listed in
:data:`napari_pathfm.training.recipes.FAMILIES`.
"""
