"""The networks: Morlet filter banks, wavelet transforms, complex non-linearities, the Flax
layers and the models built from them. Pure maths and Flax; imports nothing else of pcjax."""
