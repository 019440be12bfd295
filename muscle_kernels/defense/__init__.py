"""The application: the defended fine-tuning pipeline (data loading, attacks, metrics, the training loop, the demo)
built on the library below it (`ops`, `nn`, `align`, `integrations`). Kept import-free on purpose: `import
muscle_kernels.defense` must stay cheap, so import the submodule you need (e.g. `from muscle_kernels.defense.train
import run_methods`). The gradient aligner itself lives in `muscle_kernels.align`."""
