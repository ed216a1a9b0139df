"""Suite-wide settings: never reach a model hub; make the repository root importable so the
example modules (``examples.vision.vit`` ...) resolve as the ``lit-efficient`` command resolves them."""

import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
