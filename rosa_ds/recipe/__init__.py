"""The training recipe behind ``launch/train.py``: configuration and command line (``config``),
models, data, the ``Trainer`` loop, metrics, the LoRA / full baselines and the run's memory
report. Built on the pure method (``rosa_ds``) and the DeepSpeed seam (``rosa_ds.ds``)."""
from ..utils.log import quiet_third_party

# Before anything below imports DeepSpeed (it logs its accelerator guess on import).
quiet_third_party()
