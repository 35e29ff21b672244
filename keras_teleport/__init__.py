"""keras-teleport: symmetry teleportation for Keras 3 optimizers."""

from keras_teleport.callbacks import MeasuresLogger
from keras_teleport.callbacks import TeleportData
from keras_teleport.callbacks import TeleportLogger
from keras_teleport.groups import DiagonalScaling
from keras_teleport.groups import GeneralLinear
from keras_teleport.layers import SymmetricDensePair
from keras_teleport.symmetries import Junction
from keras_teleport.symmetries import RefusedJunction
from keras_teleport.symmetries import Symmetries
from keras_teleport.symmetries import find_symmetries
from keras_teleport.teleport import Teleport
from keras_teleport import measures

__version__ = "0.1.0"

__all__ = [
    "DiagonalScaling",
    "GeneralLinear",
    "Junction",
    "MeasuresLogger",
    "RefusedJunction",
    "SymmetricDensePair",
    "Symmetries",
    "Teleport",
    "TeleportData",
    "TeleportLogger",
    "find_symmetries",
    "measures",
]
