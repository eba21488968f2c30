"""medseg: train, run and evaluate segmentation models on CT and MR scans, keeping each scan's geometry."""

import logging
import warnings

__version__ = "0.1.0"

# MONAI announces at import that an optional GPU JPEG decoder (nvImageCodec) is absent; pydicom's own
# decoders (pylibjpeg, gdcm) are what medseg uses, so the notice is only noise for users.
logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=".*nvImageCodec.*")
