"""Multi-head latent attention (DeepSeek MLA) over the paged latent cache: the backend
contract for latent queries (`base.py`), the torch oracle (`reference.py`) and the Triton
kernels."""
