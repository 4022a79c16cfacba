"""Train a frostnet model: FP, QAT, QAT fine-tune, StatAssist, StatAssist + GradBoost.

    python tools/train.py --help
    python tools/train.py --model frostnet_small_0_35 --data fashion_mnist --mode statassist+gradboost \
        --epochs 2 --train-subset 2000 --output-dir runs/smoke
    torchrun --nproc-per-node 2 tools/train.py ...        # DDP (gloo on CPU)
    python tools/train.py ... --mode qat --qat-method octav --weight-bits 4 --act-bits 4   # QAT methods:
    python tools/train.py ... --mode statassist+gradboost --qat-method ewgs --talr        # see --help
"""

import sys

from frostnet.recipe import get_args_parser, main

if __name__ == "__main__":
    main(get_args_parser().parse_args())
    sys.exit(0)
