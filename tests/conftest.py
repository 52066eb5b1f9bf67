"""Session-wide set-up: Triton kernels run on CPU through Triton's interpreter.

Triton reads TRITON_INTERPRET when @triton.jit decorates a function, and that includes
Triton's own standard library at `import triton`, which diffusers / transformers
trigger early in the session. So the variable must be set before any test module is
imported, which is what this file is for. An explicit TRITON_INTERPRET=0 is respected
(the kernel tests then run on CUDA, or skip without it).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
