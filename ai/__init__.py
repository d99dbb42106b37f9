"""AI on stable studies: the model registry, volume loading with patient geometry, MONAI
inference (CUDA when there is a GPU, else CPU), and DICOM SEG / TID 1500 SR results stored back
through archive ingest.

Modules: :mod:`ai.registry` (models and weights), :mod:`ai.selector` (which series),
:mod:`ai.volume` (series to volume), :mod:`ai.engines` (loaded models, PyTorch/MONAI),
:mod:`ai.writers` (highdicom SEG and SR), :mod:`ai.runs` (planning, executing and recording
runs). Imports only ``archive`` and ``config``.
"""
