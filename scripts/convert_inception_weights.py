"""Convert pytorch-fid's InceptionV3 weights (.pth) to the .npz that vdm reads without torch.

    python scripts/convert_inception_weights.py pt_inception-2015-12-05-6726825d.pth inception-2015-12-05.npz

Download the .pth first (``vdm.inception.URL``), from
https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth;
this script needs torch (``pip install torch``; CPU is enough) and downloads nothing. The .npz
holds the arrays of the state dict that the network uses, under their names (the classifier is
left out), every name and shape checked. Use it with
``--config.eval.inception_weights=inception-2015-12-05.npz``.
"""
from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    from vdm import inception

    if len(argv) != 3 or not argv[1].endswith(".pth") or not argv[2].endswith(".npz"):
        print(f"usage: python {argv[0]} WEIGHTS.pth OUT.npz", file=sys.stderr)
        return 2
    try:
        weights = inception.load_weights(argv[1])
    except inception.WeightsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    inception.save_npz(argv[2], weights.state_dict)
    print(f"wrote {argv[2]}: {len(weights.state_dict)} arrays of {argv[1]} (sha256 {weights.sha256[:16]}...)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
