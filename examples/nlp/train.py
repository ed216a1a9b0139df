"""Run the NLP examples without the installed ``lit-efficient`` command, from anywhere::

    HF_HUB_OFFLINE=1 python examples/nlp/train.py fit --config examples/nlp/lm_pydoc.yaml
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from lit_efficient.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
