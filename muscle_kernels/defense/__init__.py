"""The backdoor defence: gradient alignment (aligner.py), reference-set selection (refset.py) and the training
pipeline around them. Kept import-free on purpose: `import muscle_kernels.defense` must stay cheap, so import the
submodule you need (e.g. `from muscle_kernels.defense.aligner import GradientAligner`)."""
