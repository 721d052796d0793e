import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/reference.py
torch.use_deterministic_algorithms(False)
