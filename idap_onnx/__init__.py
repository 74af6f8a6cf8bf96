"""idap-onnx: IDAP++ flow-divergence pruning on the ONNX graph itself.

A walk through the house:

- ``model_io`` / ``shapes``: load, save (atomic), shape inference and completion.
- ``graph``: a read-only index over a graph (producers, consumers, constants, shapes).
- ``oprules``: the one table of how each ONNX op treats channels; ``layout`` the element
  arrays that carry channels through it; ``dependency`` builds groups and units from it.
- ``blocks``: removable residual branches and chains.
- ``accounting`` / ``group_costs``: parameters and MACs, per node and per group.
- ``planner``: calibration-free scores and global ranking; ``calib``: data, in-graph
  statistics and the IDAP++ scores.
- ``passes``: graph rewrites (``prune_channels``, ``remove_blocks``, ``cleanup``).
- ``verify`` / ``selfcheck``: ONNX Runtime checks of every rewrite.
- ``api``: the functions a pipeline calls; ``cli``: the thin ``idap-onnx`` command.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("idap-onnx")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+local"

__all__ = ["__version__"]
