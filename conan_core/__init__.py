"""conan: Conan-embedding training as a library (schemas, cleaning, model, losses, mining, training, eval).

This package never imports Prefect; orchestration lives in `tasks/` and `flows/`.
"""

__version__ = "0.1.0"
