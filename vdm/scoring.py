"""Deprecated: ``vdm.image_bpd`` (bits/dim per image), under its 0.2 name, kept for one release.

``score_images`` is ``vdm.image_bpd.per_image_bpd``; every other name is the same. Importing this module warns
once (a ``DeprecationWarning`` naming the new module); ``--mode score`` is unchanged.
"""
from __future__ import annotations

import warnings

from vdm.image_bpd import (PASSES, auroc, check_finite, per_image_bounds, per_image_bpd, read_images, summary,
                           write_csv)

score_images = per_image_bpd  # the 0.2 name

warnings.warn("vdm.scoring is deprecated: use vdm.image_bpd (bits/dim per image; score_images is now "
              "vdm.image_bpd.per_image_bpd)", DeprecationWarning, stacklevel=2)

__all__ = ["PASSES", "auroc", "check_finite", "per_image_bounds", "per_image_bpd", "read_images", "score_images",
           "summary", "write_csv"]
