"""pcjax: phase collapse networks in JAX/Flax.

Fixed complex Morlet wavelet filters, a complex modulus (the phase collapse) and learned
1x1 complex projections (Guth, Zarka & Mallat, "Phase Collapse in Neural Networks", ICLR 2022).
"""

__version__ = "0.1.0"
