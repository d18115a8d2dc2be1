"""Models as lists of indivisible layers, and the parts of them that peers run.

`spec` says what a model is and how a peer builds only its slice; `zoo`, `vgg` and `resnet`
define the built-in models; `part` runs a slice with its own optimizer; `owner` and `copies`
hold the parts of a data owner and of a compute node.
"""

from p2psl.learning.models.copies import CopySet
from p2psl.learning.models.owner import OwnerModel
from p2psl.learning.models.part import OptimConfig, Part
from p2psl.learning.models.spec import ModelSpec, layer_seed
from p2psl.learning.models.zoo import ZOO, model_spec
from p2psl.topology import MODEL_ZOO  # the names; the topology validates them, ZOO builds them

__all__ = ["MODEL_ZOO", "ZOO", "CopySet", "ModelSpec", "OptimConfig", "OwnerModel", "Part", "layer_seed", "model_spec"]
