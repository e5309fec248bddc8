"""HASTE z-stack → fluorescence translation models (Wieslander et al. 2021, Adipocyte Cell Challenge).

Modules: :mod:`.layers` (tiramisu blocks, ICNR pixel-shuffle upsampling), :mod:`.dense_unet`
(regression / GAN generator), :mod:`.lupi_unet` (two-decoder nuclei net learning with the
privileged nuclei mask), :mod:`.patchgan` (conditional PatchGAN discriminator) and
:mod:`.losses` (log-squared, median-normalised MAE, gradient, relativistic average LS GAN,
image pool, mask BCE, loss-weight modules). Pure torch; imported only when a model is built
(:func:`napari_pathfm.models.create_model`), never by importing the package.
"""

from .dense_unet import DenseUNet, dense_unet
from .lupi_unet import LUPIOutput, LUPIUNet, lupi_unet
from .patchgan import PatchGAN, patchgan

__all__ = ["DenseUNet", "LUPIOutput", "LUPIUNet", "PatchGAN", "dense_unet", "lupi_unet", "patchgan"]
