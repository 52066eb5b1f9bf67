"""repro: one workflow that reproduces six ML papers end to end."""

from repro.core.lazy_diffusers import install as _install_lazy_diffusers

__version__ = "0.1.0"

# Before anything imports diffusers: a job then loads the model classes it uses, not
# all of diffusers' (repro.core.lazy_diffusers; 1.6 s of CPU a job).
_install_lazy_diffusers()
