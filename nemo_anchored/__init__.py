"""nemo_anchored: Anchored Learning fine-tuning on megatron-core."""

from nemo_anchored.parallel.megatron_compat import register_import_stand_ins

__version__ = "0.1.0"

# Before any module of this package imports megatron-core (see megatron_compat).
register_import_stand_ins()
