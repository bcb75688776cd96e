"""What measures the package, kept beside it and not installed with it: speed against torchvision
(:mod:`.speed`), of the exported model (:mod:`.deploy_speed`), COCO-scale annotation memory, scoring and
tiling (:mod:`.scale`), int8 accuracy (:mod:`.int8`) and the transfer experiment (:mod:`.transfer`).

The scripts beside them parse arguments and print; run them from the repository root as modules, e.g.
``python -m benchmarks.benchmark --quick``. Tests import this package from the repository root.
"""
