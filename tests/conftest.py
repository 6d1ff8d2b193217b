import os

import torch

# Tests share two cores with whatever else runs; one thread keeps them predictable.
torch.set_num_threads(int(os.environ.get("ANYSTORY_TEST_THREADS", "1")))
