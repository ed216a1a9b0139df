"""Train a vision example with the ``lit-efficient`` LightningCLI, from any directory::

    python examples/vision/train.py fit --config examples/vision/vit_digits.yaml
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from lit_efficient.cli import entry_point  # noqa: E402

if __name__ == "__main__":
    entry_point()
