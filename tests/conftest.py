"""Session-wide set-up: Triton kernels run on CPU through Triton's interpreter.

Triton reads TRITON_INTERPRET when @triton.jit decorates a function, and that includes
Triton's own standard library at `import triton`, which diffusers / transformers
trigger early in the session. So the variable must be set before any test module is
imported, which is what this file is for. An explicit TRITON_INTERPRET=0 is respected
(the kernel tests then run on CUDA, or skip without it).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# The tiny DiTTransformer2DModel the tests share: 8x8 single-channel images, 16 tokens,
# 2 blocks of 2 heads x 8, ten classes (plus diffusers' null class for CFG).
TINY_DIT = dict(
    sample_size=8,
    patch_size=2,
    in_channels=1,
    num_layers=2,
    num_attention_heads=2,
    attention_head_dim=8,
    num_embeds_ada_norm=10,
)


def build_tiny_dit(seed: int = 0, **config):
    """A DiT of TINY_DIT (`config` overrides any key; out_channels=2 gives DiT-XL/2's
    learned variance), its init drawn from `seed` alone, in eval mode.

    The same seed and config give the same weights as the pipeline's
    repro.core.modelio.build_dit({... "seed": seed}).
    """
    from diffusers import DiTTransformer2DModel  # imported here: collection stays fast

    config = {**TINY_DIT, **config}
    config.setdefault("out_channels", config["in_channels"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DiTTransformer2DModel(**config, norm_type="ada_norm_zero")
    return model.eval()


@pytest.fixture(scope="session")
def tiny_dit():
    """build_tiny_dit: call it as tiny_dit(seed=..., **config_overrides)."""
    return build_tiny_dit


@pytest.fixture
def tiny_dit_config():
    """TINY_DIT as a fresh dict: the params a test hands to repro.core.modelio.build_dit."""
    return dict(TINY_DIT)


@pytest.fixture(scope="module")
def quiet_and_one_thread():
    """For a module of stage tests (`pytestmark = pytest.mark.usefixtures(...)`): no
    MLflow runs, and one torch thread (tiny models gain nothing from a second thread on
    a busy machine); both restored after the module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("REPRO_MLFLOW", "0")
        yield
    torch.set_num_threads(threads)
