"""Suite-wide settings. `make test` runs 2 pytest workers on 2 cores: one torch thread each,
because two workers each spinning two OpenMP threads run many times slower than one."""

import torch

torch.set_num_threads(1)
